"""The MPI world of this process: joining it, non-blocking collectives with a deadline, fault notices.

Every wait here is a poll loop (MPI Test + a short sleep) that also watches three things, so a failure
elsewhere is an error here, never a hang:
  - fault notices: a rank whose Python code raises sends "rank r failed: <error>" to every other rank
    (on a communicator of its own) before it exits; the others raise DistributedError naming it;
  - dead processes: peers on this host are checked by process id (and, under `graphc launch`, which turns
    on Open MPI's fault tolerance (ULFM), MPI itself reports a failed process);
  - the deadline: `timeout` seconds (gd.init(timeout=...), else GRAPHC_DIST_TIMEOUT, else 300).
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

from graphc.errors import GraphcError

#: environment variables an MPI launcher sets in the processes it starts (Open MPI, PMIx, MPICH/Hydra,
#: Intel MPI, MVAPICH); without one of them gd.init makes a world of one and never loads MPI
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS",
                 "MV2_COMM_WORLD_SIZE", "GRAPHC_LAUNCHED")
_FAULT_TAG = 7301
_NOTICE_BYTES = 4096
#: seconds a failing rank waits, after telling the others, for the other ranks on its host to stop on their
#: own (each then prints its own error) before it exits: the launcher ends the whole job when the first rank
#: exits, and on a loaded machine it used to kill a told rank before that rank had printed why it stopped
LINGER_S = 10.0


class DistributedError(GraphcError):
    """A distributed job cannot go on: another rank failed or died, or a collective timed out."""


def launched() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARS)


def _default_timeout() -> float:
    try:
        return float(os.environ.get("GRAPHC_DIST_TIMEOUT", "300"))
    except ValueError:
        raise GraphcError(f"GRAPHC_DIST_TIMEOUT={os.environ['GRAPHC_DIST_TIMEOUT']!r} is not a number of "
                          "seconds") from None


class World:
    """This process's place in the job (one per process: `graphc.distributed._world.WORLD`)."""

    def __init__(self):
        self.initialized = False
        self.rank, self.size = 0, 1
        self.deterministic = False
        self.micro_shards = 8
        self.timeout = 300.0
        self.MPI = None
        self.comm = None          # collectives (a duplicate of COMM_WORLD)
        self.fault_comm = None    # fault notices (another duplicate: never mixed with collectives)
        self._fault_req = None
        self._fault_buf = None
        self.peers: list[tuple[str, int]] = [(socket.gethostname(), os.getpid())]
        self.failed: str | None = None
        self.lock = threading.Lock()
        self.pending: dict[int, dict] = {}   # token -> started collective
        self._next_token = 1
        self.stats = CollectiveStats()
        self._old_hook = None

    # ---- joining ------------------------------------------------------------------------------------
    def init(self, deterministic: bool, timeout: float | None, micro_shards: int | None) -> "World":
        if timeout is not None and not timeout > 0:
            raise GraphcError(f"gd.init: timeout must be a positive number of seconds, got {timeout!r}")
        if micro_shards is not None and (not isinstance(micro_shards, int) or micro_shards < 1):
            raise GraphcError(f"gd.init: micro_shards must be a positive int, got {micro_shards!r}")
        self.deterministic = bool(deterministic)
        self.timeout = float(timeout) if timeout is not None else _default_timeout()
        if micro_shards is not None:
            self.micro_shards = micro_shards
        if self.initialized:
            return self
        if launched():
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise GraphcError("gd.init: this process was started by an MPI launcher but mpi4py is not "
                                  f"installed ({e}); pip install 'graphc[dist]'") from None
            self.MPI = MPI
            world = MPI.COMM_WORLD
            self.rank, self.size = world.Get_rank(), world.Get_size()
            self.comm = world.Dup()
            self.fault_comm = world.Dup()
            for c in (self.comm, self.fault_comm):
                c.Set_errhandler(MPI.ERRORS_RETURN)
            self.peers = [tuple(p) for p in world.allgather((socket.gethostname(), os.getpid()))]
            if self.size > 1:
                self._fault_buf = bytearray(_NOTICE_BYTES)
                self._fault_req = self.fault_comm.Irecv([self._fault_buf, MPI.BYTE], source=MPI.ANY_SOURCE,
                                                        tag=_FAULT_TAG)
                self._old_hook = sys.excepthook
                sys.excepthook = self._excepthook
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, self._sigterm)
                atexit.register(self._at_exit)
        self.initialized = True
        return self

    # ---- tokens for started collectives -------------------------------------------------------------
    def new_token(self, entry: dict) -> int:
        with self.lock:
            tok = self._next_token
            self._next_token += 1
            self.pending[tok] = entry
        return tok

    def take(self, token: int) -> dict:
        with self.lock:
            entry = self.pending.pop(int(token), None)
        if entry is None:
            raise GraphcError(f"gd.allreduce: no collective started with token {int(token)} in this process "
                              "(a wait ran without its start: compiled graphs run them in order)")
        return entry

    def progress(self) -> None:
        """Let MPI move the started collectives along (Open MPI progresses them only inside MPI calls)."""
        if self.MPI is None:
            return
        with self.lock:
            reqs = [e["req"] for e in self.pending.values() if e.get("req") is not None and not e.get("done")]
            entries = [e for e in self.pending.values() if e.get("req") is not None and not e.get("done")]
        for e, r in zip(entries, reqs):
            try:
                if r.Test():
                    e["done"] = time.perf_counter()
            except self.MPI.Exception:
                return   # reported by the wait that owns it

    # ---- waiting --------------------------------------------------------------------------------------
    def wait(self, req, what: str) -> None:
        """Wait for MPI request `req` with the deadline, watching for failed ranks."""
        if req is None:
            return
        MPI = self.MPI
        t0 = time.perf_counter()
        deadline, next_check, pause = t0 + self.timeout, t0 + 0.5, 2e-5
        while True:
            try:
                if req.Test():
                    return
            except MPI.Exception as e:
                raise self._failure(what, str(e)) from None
            self.check_notices(what)
            now = time.perf_counter()
            if now >= next_check:
                dead = self.dead_local_peers()
                if dead:
                    raise self._failure(what, "")
                next_check = now + 0.5
            if now >= deadline:
                raise DistributedError(
                    f"{what}: not complete after {self.timeout:g} s on rank {self.rank} of {self.size}; no rank "
                    "reported a failure and every rank on this host is alive, so one is stuck or much slower "
                    "(raise the limit with gd.init(timeout=...) or GRAPHC_DIST_TIMEOUT)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def check_notices(self, what: str = "") -> None:
        if self._fault_req is None:
            return
        try:
            got = self._fault_req.Test()
        except self.MPI.Exception:
            got = False
        if got:
            msg = bytes(self._fault_buf).rstrip(b"\0").decode("utf-8", "replace")
            self._fault_req = None
            raise DistributedError(f"{msg}; rank {self.rank} stops" + (f" (it was in {what})" if what else ""))

    def dead_local_peers(self) -> list[int]:
        host = socket.gethostname()
        dead = []
        for r, (h, pid) in enumerate(self.peers):
            if r == self.rank or h != host:
                continue
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat", "rb") as f:   # a zombie has exited
                    if f.read().split(b") ", 1)[-1][:1] == b"Z":
                        dead.append(r)
            except ProcessLookupError:
                dead.append(r)
            except (PermissionError, OSError):
                pass
        return dead

    def _failure(self, what: str, mpi_msg: str) -> DistributedError:
        try:
            self.check_notices(what)
        except DistributedError as e:
            return e
        dead = self.dead_local_peers()
        failed = self._mpi_failed_ranks()
        ranks = sorted(set(dead) | set(failed))
        who = (", ".join(f"rank {r} (pid {self.peers[r][1]} on {self.peers[r][0]})" for r in ranks)
               if ranks else "a rank")
        return DistributedError(f"{who} died during {what}; rank {self.rank} of {self.size} stops"
                                + (f" (MPI: {mpi_msg})" if mpi_msg else ""))

    def _mpi_failed_ranks(self) -> list[int]:
        try:
            grp = self.comm.Get_failed()
            n = grp.Get_size()
            if not n:
                return []
            return list(self.MPI.Group.Translate_ranks(grp, list(range(n)), self.comm.Get_group()))
        except Exception:   # no ULFM in this MPI, or not enabled by the launcher
            return []

    # ---- faults -------------------------------------------------------------------------------------
    def notify(self, message: str) -> None:
        """Tell every other rank that this one fails (best effort, bounded to about a second)."""
        if self.fault_comm is None or self.size == 1 or self.failed is not None:
            return
        self.failed = message
        data = bytearray(message.encode("utf-8")[:_NOTICE_BYTES - 1].ljust(_NOTICE_BYTES, b"\0"))
        reqs = []
        for r in range(self.size):
            if r != self.rank:
                try:
                    reqs.append(self.fault_comm.Issend([data, self.MPI.BYTE], dest=r, tag=_FAULT_TAG))
                except Exception:
                    pass
        end = time.perf_counter() + 1.0
        while reqs and time.perf_counter() < end:
            try:
                reqs = [q for q in reqs if not q.Test()]
            except Exception:
                break
            time.sleep(1e-3)

    def _excepthook(self, typ, value, tb):
        """An uncaught exception on a rank: print it, tell the other ranks, exit (no MPI_Finalize, which
        would wait for them)."""
        sys.stdout.flush()
        text = "".join(traceback.format_exception(typ, value, tb))
        sys.stderr.write(f"[graphc rank {self.rank}] " + text)
        sys.stderr.flush()
        if not isinstance(value, DistributedError):
            first = "".join(traceback.format_exception_only(typ, value)).strip().splitlines()[-1]
            self.notify(f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}) failed: {first}")
            self.linger()   # the rank where the failure began: the told ones exit on their own first
        else:
            self.notify(f"rank {self.rank} stopped: {value}")
        os._exit(1)

    def linger(self, bound: float | None = None) -> None:
        """Wait (at most `bound` seconds, LINGER_S) until every other rank on this host has exited: a told
        rank stops at its next collective and prints its own error; exiting first would have the launcher
        kill it before it could. Only the rank where a failure began waits (a told rank exits at once: two
        waiting for each other would each wait the whole bound). Ranks on other hosts are not waited for."""
        if self.size == 1 or not self.peers:
            return
        host = socket.gethostname()
        others = {r for r, (h, _) in enumerate(self.peers) if r != self.rank and h == host}
        end = time.perf_counter() + (LINGER_S if bound is None else bound)
        try:
            while others and time.perf_counter() < end:
                if others <= set(self.dead_local_peers()):
                    return
                try:   # let MPI progress the others' notices to this rank (their sends complete sooner)
                    if self._fault_req is not None and self._fault_req.Test():
                        self._fault_req = None
                except Exception:
                    pass
                time.sleep(0.01)
        except BaseException:   # the launcher's SIGTERM (_sigterm raises) or ^C: stop waiting, exit as told
            return

    def _sigterm(self, signum, frame):
        dead = self.dead_local_peers()
        who = ", ".join(f"rank {r}" for r in dead) or "another rank"
        raise DistributedError(f"rank {self.rank} was stopped by the MPI runtime (SIGTERM): {who} exited "
                               "(run under `graphc launch` for fault-tolerant stops with the failing rank's error)")

    def _at_exit(self):
        """Cancel the pending fault-notice receive so MPI_Finalize does not wait for it."""
        req, self._fault_req = self._fault_req, None
        if req is not None:
            try:
                req.Cancel()
                req.Wait()
            except Exception:
                pass


class CollectiveStats:
    """Per-process timing of started collectives: wall time from start to observed completion, and the
    part of it a wait was blocked (the rest overlapped compute)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.count = 0
        self.bytes = 0
        self.seconds = 0.0       # start -> completion, summed over collectives
        self.blocked = 0.0       # time the waits spent blocked

    def add(self, nbytes: int, seconds: float, blocked: float):
        self.count += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.blocked += blocked

    def as_dict(self) -> dict:
        overlap = 0.0 if self.seconds <= 0 else max(0.0, 1.0 - self.blocked / self.seconds)
        return {"collectives": self.count, "bytes": self.bytes, "seconds": self.seconds,
                "blocked_seconds": self.blocked, "overlap": overlap}


WORLD = World()


def world() -> World:
    """The world, joined (a world of one) on first use when gd.init was not called."""
    if not WORLD.initialized:
        WORLD.init(False, None, None)
    return WORLD


def mpi_dtype(MPI, dtype: np.dtype):
    return MPI._typedict[np.dtype(dtype).char]
