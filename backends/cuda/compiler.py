"""Compile generated CUDA C: nvcc (subprocess) or NVRTC (in-process, through ctypes), to PTX or
cubin for a chosen architecture, cached in the native backends' shared on-disk cache
(graphc.backends.schedule.cache, sub "cuda": content-addressed, checksummed entries, atomic writes, a
private fallback for an unusable directory)."""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import tempfile

from graphc.backends.schedule import cache
from graphc.errors import GraphcError

DEFAULT_ARCH = "sm_80"
CACHE_SUB = "cuda"  # PTX / cubin's directory in the shared cache


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)


def error_with_source(what: str, log: str, source: str, first_line: int = 1) -> GraphcError:
    """A GraphcError quoting the compiler's first error and the generated lines around it."""
    m = re.search(r":(\d+)(?::\d+)?: (?:error|catastrophic error)", log) or re.search(r"\((\d+)\): error", log)
    lines = [f"{what} failed to compile the generated CUDA source:", log.strip()[:4000]]
    if m:
        at = int(m.group(1)) - first_line + 1
        src = source.splitlines()
        lo, hi = max(1, at - 4), min(len(src), at + 4)
        lines.append(f"generated source around line {at}:")
        lines += [f"{'>>' if i == at else '  '} {i:5d} | {src[i - 1]}" for i in range(lo, hi + 1)]
    return GraphcError("\n".join(lines))


def compile_cuda(source: str, arch: str = DEFAULT_ARCH, target: str = "ptx", options=()) -> bytes:
    """PTX (text, as bytes) or cubin for `source`; cached on disk (a damaged entry is recompiled)."""
    if target not in ("ptx", "cubin"):
        raise GraphcError(f"CUDA compile target must be 'ptx' or 'cubin', got {target!r}")
    nvcc = nvcc_path()
    tool = f"nvcc {cache.tool_identity(nvcc)}" if nvcc else f"nvrtc {cache.tool_identity(nvrtc_library())}"
    name = f"{cache.key(source, arch, target, ' '.join(options), tool)}.{target}"
    cached = cache.load_blob(CACHE_SUB, name)
    if cached is not None:
        return cached
    if nvcc:
        out = _nvcc(nvcc, source, arch, target, options)
    else:
        if target == "cubin":
            raise GraphcError("cubin output needs nvcc; NVRTC here produces PTX")
        out = _nvrtc(source, arch, options)
    cache.store_blob(CACHE_SUB, name, out)
    return out


def _nvcc(nvcc, source, arch, target, options) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "graph.cu"), os.path.join(d, f"graph.{target}")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc, f"-{target}", f"-arch={arch}", "-std=c++17", *options, "-o", out, src]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise error_with_source("nvcc", r.stderr + r.stdout, source)
        with open(out, "rb") as f:
            return f.read()


# ---- NVRTC through ctypes (the nvidia-cuda-nvrtc wheel or a toolkit's libnvrtc) ---------------

def nvrtc_library() -> str | None:
    pats = []
    try:
        import nvidia.cuda_nvrtc as w  # the nvidia-cuda-nvrtc-cu12 wheel (a namespace package)
        pats += [os.path.join(d, "lib", "libnvrtc.so*") for d in w.__path__]
    except ImportError:
        pass
    pats += ["/usr/local/cuda*/lib64/libnvrtc.so*", "/usr/lib/x86_64-linux-gnu/libnvrtc.so*"]
    for p in pats:
        hits = sorted(h for h in glob.glob(p) if "builtins" not in h and "alt" not in h)
        if hits:
            return hits[0]
    return None


def nvrtc_include_options(source: str) -> list[str]:
    """-I for a directory holding cuda_fp16.h / cuda_bf16.h (a toolkit's include, or the nvidia wheels'),
    when the source includes them (float16/bfloat16 graphs) and one is found: NVRTC versions without
    them built in find them there."""
    if "#include <cuda_fp16.h>" not in source:
        return []
    dirs = sorted(glob.glob("/usr/local/cuda*/include")) + sorted(glob.glob("/usr/include"))
    for mod in ("nvidia.cuda_runtime", "nvidia.cuda_nvrtc"):
        try:
            import importlib
            dirs += [os.path.join(d, "include") for d in importlib.import_module(mod).__path__]
        except ImportError:
            pass
    return [f"-I{d}" for d in dirs if os.path.exists(os.path.join(d, "cuda_fp16.h"))][:1]


def _nvrtc(source, arch, options) -> bytes:
    lib_path = nvrtc_library()
    if lib_path is None:
        raise GraphcError("no CUDA compiler: neither nvcc nor libnvrtc found (pip install graphc[cuda])")
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"graph.cu", 0, None, None))
    opts = [f"--gpu-architecture={arch.replace('sm_', 'compute_')}".encode(), b"-std=c++17",
            *[o.encode() for o in (*options, *nvrtc_include_options(source))]]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    if rc != 0:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise error_with_source("NVRTC", log.value.decode(errors="replace"), source)
    size = ctypes.c_size_t()
    _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
    buf = ctypes.create_string_buffer(size.value)
    _check(lib, lib.nvrtcGetPTX(prog, buf))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.raw.rstrip(b"\0")


def _check(lib, rc) -> None:
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise GraphcError(f"NVRTC error {rc}: {lib.nvrtcGetErrorString(rc).decode()}")
