"""Compile the generated CUDA source for the host with g++ and the emulation header, load it with
ctypes, and run the launch plan on host memory. Libraries and the precompiled header are cached in
the native backends' shared on-disk cache (graphc.backends.schedule.cache: checked before use, written
atomically)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from graphc._aligned import aligned_bytes
from graphc.backends.cuda.compiler import error_with_source
from graphc.backends.cuda.executor import Memory
from graphc.backends.schedule.steps import HostStep, LoopStep
from graphc.backends.cuda.prelude import C_TYPES
from graphc.backends.schedule.arena import DEFAULT_ALIGN as ALIGN
from graphc.backends.schedule.cache import find_files, key as cache_key, store_files, tool_identity
from graphc.errors import GraphcError

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulation.h")
FLAGS = ["-std=c++17", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-w", "-x", "c++"]
SUB = "cuda_emulated"  # its directory in the cache
_load_lock = threading.Lock()


def compiler() -> str | None:
    return os.environ.get("CXX") if os.environ.get("CXX") and shutil.which(os.environ["CXX"]) else \
        shutil.which("g++") or shutil.which("clang++")


_linker: dict = {}


def link_flags(cxx: str) -> list[str]:
    """["-fuse-ld=gold"] where the compiler links a shared library with it: GNU gold links one graph's
    library in 0.04 s against ld.bfd's 0.13 (a third of a small graph's whole build); [] elsewhere.
    Probed once per compiler and process."""
    if cxx not in _linker:
        flags = []
        if shutil.which("ld.gold"):
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "probe.cpp")
                with open(src, "w") as f:
                    f.write("extern \"C\" int gc_probe() { return 1; }\n")
                try:
                    r = subprocess.run([cxx, "-shared", "-fPIC", "-fuse-ld=gold", src, "-o", os.path.join(d, "p.so")],
                                       capture_output=True, timeout=60)
                    flags = ["-fuse-ld=gold"] if r.returncode == 0 else []
                except (OSError, subprocess.TimeoutExpired):
                    flags = []
        _linker[cxx] = flags
    return _linker[cxx]


def launchers(steps) -> str:
    """One `extern "C" gc_launch_<kernel>` per kernel: unpacks cuLaunchKernel-style void** params."""
    out, done = ["\n// ---- host launchers (emulation only) ----"], set()
    for step in _launches(steps):
        if step.kernel in done:
            continue
        done.add(step.kernel)
        casts = []
        for k, (b, dt) in enumerate(zip(step.args, step.dtypes)):
            casts.append(f"*({'' if b in step.writes else 'const '}{C_TYPES[dt]}**)p[{k}]")
        casts.append(f"*(GcDims*)p[{len(step.args)}]")
        out.append(f'extern "C" int gc_launch_{step.kernel}(unsigned gx, unsigned gy, unsigned gz, '
                   f'unsigned bx, unsigned by, unsigned bz, void** p) {{\n'
                   f'  auto body = [&]() {{ {step.kernel}({", ".join(casts)}); }};\n'
                   f'  return gc_emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), {str(step.sync).lower()}, body);\n}}')
    return "\n".join(out) + "\n"


def _launches(steps):
    """Every kernel launch of a schedule's steps, loop bodies included."""
    for step in steps:
        if isinstance(step, LoopStep):
            yield from _launches(step.body)
        elif not isinstance(step, HostStep):
            yield step


def precompiled_header(cxx: str, header: str) -> str:
    """A copy of the emulation header in the cache with its precompiled form beside it (g++ then
    skips re-parsing <cmath> and friends: about 40% of each small compile). Both are checked against
    their manifest before use, so a damaged .gch is rebuilt rather than handed to g++. Falls back to
    the plain header when the compiler cannot precompile it."""
    name = "pch-" + cache_key("pch", header, " ".join(FLAGS), tool_identity(cxx))
    manifest = f"{name}/manifest"
    d = find_files(SUB, manifest)
    if d is None:
        gch = _precompile(cxx) if "g++" in os.path.basename(cxx) else None
        # None: the entry records that no .gch may sit beside the header (a stray one would be used)
        d = store_files(SUB, manifest, {"emulation.h.gch": gch, "emulation.h": header.encode()})
    return os.path.join(d, name, "emulation.h")


def _precompile(cxx: str) -> bytes | None:
    """The precompiled emulation header, or None when the compiler refuses."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "h.gch")
        flags = [f for f in FLAGS if f not in ("-shared", "-x", "c++")]
        r = subprocess.run([cxx, *flags, "-x", "c++-header", HEADER, "-o", out], capture_output=True)
        if r.returncode != 0:
            return None
        with open(out, "rb") as f:
            return f.read()


SANITIZERS = {"address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]}


def sanitize_flags(sanitize: str | None) -> list[str]:
    """Extra compiler flags for gc.function(..., sanitize="address"); the ASan runtime must already be
    in the process (LD_PRELOAD), since a Python started without it cannot load an instrumented .so."""
    if not sanitize:
        return []
    if sanitize not in SANITIZERS:
        raise GraphcError(f"sanitize={sanitize!r}: cuda-emulated supports {sorted(SANITIZERS)}")
    with open("/proc/self/maps") as f:
        if "libasan" not in f.read():
            raise GraphcError("sanitize='address' needs the ASan runtime loaded first: run Python with "
                              "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0")
    return SANITIZERS[sanitize]


def build(source: str, steps: list, sanitize: str | None = None) -> ctypes.CDLL:
    """The shared library for `source`, cached on disk by a hash of everything that goes into it. A
    cached .so is dlopen'ed only after its checksum matches its manifest (a damaged one could crash
    the process); otherwise it is rebuilt."""
    cxx = compiler()
    flags = FLAGS + sanitize_flags(sanitize) + link_flags(cxx)
    with open(HEADER) as f:
        header = f.read()
    tu = '#include "emulation.h"\n#line 1 "graph.cu"\n' + source + launchers(steps)
    key = cache_key("so", header, tu, " ".join(flags), tool_identity(cxx))
    d = find_files(SUB, f"{key}.manifest")
    if d is None:
        d = store_files(SUB, f"{key}.manifest", {f"{key}.so": _compile(cxx, flags, header, tu, source)})
    with _load_lock:
        lib = ctypes.CDLL(os.path.join(d, f"{key}.so"))
    lib.gc_emu_last_error.restype = ctypes.c_char_p
    return lib


def _compile(cxx: str, flags: list[str], header: str, tu: str, source: str) -> bytes:
    """The shared library's bytes, built in a private temporary directory."""
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "graph.cpp"), os.path.join(d, "graph.so")
        with open(src, "w") as f:
            f.write(tu)
        inc = os.path.dirname(precompiled_header(cxx, header))
        r = subprocess.run([cxx, *flags, "-I", inc, src, "-o", out], capture_output=True, text=True)
        if r.returncode != 0:
            raise error_with_source(os.path.basename(cxx), r.stderr, source)
        with open(out, "rb") as f:
            return f.read()


class HostMemory(Memory):
    """'Device' memory is host memory: buffers are uint8 NumPy arrays; launches call the host launchers.
    Calls may run concurrently (ctypes releases the GIL): each thread has its own arena. Under a
    sanitizer (`separate`), every temporary gets its own allocation instead, so that an overrun
    lands in a red zone rather than in a neighbouring temporary."""
    per_thread_arena = True

    def __init__(self, lib: ctypes.CDLL, separate: bool = False):
        super().__init__()
        self.lib = lib
        self.fns = {}
        self.separate = separate

    def new_arena(self, nbytes):
        return aligned_bytes(nbytes, ALIGN)

    def temp(self, base, offset, nbytes):
        return np.empty(nbytes, np.uint8) if self.separate else base[offset:offset + nbytes]

    def sub(self, handle, offset, nbytes):
        return handle[offset:offset + nbytes]

    def bind(self, array, kind, key):
        a = np.ascontiguousarray(array)
        return a.reshape(-1).view(np.uint8)

    def alloc(self, nbytes):
        return np.empty(nbytes, np.uint8)   # exactly sized: an overrun reaches ASan's red zone

    def pointer(self, handle) -> int:
        return handle.ctypes.data

    def read(self, handle, nbytes, copy):
        a = handle[:nbytes]
        return a.copy() if copy else a

    def write(self, handle, data):
        handle[:data.size] = data

    def zero(self, handle, nbytes):
        handle[:nbytes] = 0

    def launch(self, kernel, grid, block, params, sync):
        fn = self.fns.get(kernel)
        if fn is None:
            fn = getattr(self.lib, f"gc_launch_{kernel}")
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
            fn.restype = ctypes.c_int
            self.fns[kernel] = fn
        if fn(*grid, *block, ctypes.addressof(params)):
            raise GraphcError(f"emulated kernel {kernel} failed: {self.lib.gc_emu_last_error().decode()}")
