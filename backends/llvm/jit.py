"""llvmlite set-up: the host target machine, the O3 pipeline, MCJIT engines, BLAS symbol binding."""
from __future__ import annotations

import ctypes
import glob
import os
import re
import struct
import sys
import threading
import time
import warnings

import llvmlite
import llvmlite.binding as llvm
import numpy as np
from llvmlite.binding import ffi as _ffi

from graphc.backends.schedule import cache as _cache
from graphc.errors import GraphcError

CACHE_SUB = "llvm"  # the object code's directory in the shared cache

_lock = threading.RLock()
_state: dict = {}


def target_machine():
    """The target machine for this host's CPU and the features code is generated for: the host's (AVX-512
    where present), or fewer where GRAPHC_LLVM_ISA names a narrower ISA (`cpu_features`)."""
    with _lock:
        if "target" not in _state:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            if not _lsr():   # LLVM's command-line options are process-wide and may be given once
                llvm.set_option("graphc", "--disable-lsr")
            _state["lsr"] = _lsr()
            _state["target"] = llvm.Target.from_default_triple()
            _state["cpu"] = llvm.get_host_cpu_name()
            _state["host_features"] = llvm.get_host_cpu_features().flatten()
            _state["tms"] = {}
            bind_blas()
        feats = cpu_features()
        tm = _state["tms"].get(feats)
        if tm is None:
            tm = _state["tms"][feats] = _new_tm()
            if not has_feature(feats, "f16c"):
                runtime_symbols()
        return tm


#: The vector ISA levels GRAPHC_LLVM_ISA may narrow the generated code to, widest first, and the features
#: (LLVM's names; a name ending in "*" is a prefix) each level leaves out on top of the wider levels'. A
#: level the host lacks changes only the micro-kernels' vector shapes (tune.isa): its instructions would
#: not run here. "avx" is a Sandy Bridge (AVX without FMA and F16C), "sse" a Nehalem-class x86-64.
ISA_LEVELS = (("avx512", ()),
              ("avx2+fma", ("avx512*", "amx*", "avxvnni*", "avxifma", "avxneconvert", "avx10*", "evex512")),
              ("avx", ("avx2", "fma", "fma4", "xop", "f16c", "vaes", "vpclmulqdq")),
              ("sse", ("avx",)))


def has_feature(feats: str, name: str) -> bool:
    return f"+{name}" in feats.split(",")


def cpu_features(isa: str | None = None) -> str:
    """The feature string code is generated for (e.g. "+avx512f,..."): the host CPU's, with the features
    of ISAs wider than GRAPHC_LLVM_ISA's level turned off where the host has them (so an AVX-512 host
    forced to avx2 runs AVX2 machine code, and any host the SSE fallback's). `isa`: that level's instead."""
    host = _state.get("host_features")
    if host is None:
        target_machine()
        host = _state["host_features"]
    forced = (os.environ.get("GRAPHC_LLVM_ISA", "") if isa is None else isa).strip().lower()
    forced = "avx2+fma" if forced == "avx2" else forced
    key = ("features", forced)
    got = _state.get(key)
    if got is None:
        names = [lv for lv, _ in ISA_LEVELS]
        if forced and forced not in names:   # a typo must not silently leave the host's code in place
            raise GraphcError(f"GRAPHC_LLVM_ISA={forced!r} is not an ISA level; use one of "
                              f"{', '.join(names[:1] + ['avx2'] + names[2:])} (or unset it for the host's)")
        got = _state[key] = narrowed(host, forced)
    return got


def narrowed(features: str, level: str) -> str:
    """LLVM feature string `features` with the features of the ISA levels wider than `level` (one of
    ISA_LEVELS' names; anything else changes nothing) turned off."""
    names = [lv for lv, _ in ISA_LEVELS]
    drop: list[str] = []
    if level in names:
        for _, off in ISA_LEVELS[1:names.index(level) + 1]:
            drop.extend(off)

    def dropped(f: str) -> bool:
        return any(f == d or (d.endswith("*") and f.startswith(d[:-1])) for d in drop)
    return ",".join(f"-{f[1:]}" if f.startswith("+") and dropped(f[1:]) else f for f in features.split(",") if f)


def _new_tm(opt: int = 3, features: str | None = None):
    return _state["target"].create_target_machine(cpu=_state["cpu"], features=features or cpu_features(),
                                                  opt=opt, codemodel="jitdefault")


def target_id() -> str:
    """What the cache key records about the target: triple, CPU, features, LLVM binding version."""
    target_machine()
    if "triple" not in _state:
        _state["triple"] = llvm.get_process_triple()
    return f"{_state['triple']}|{_state['cpu']}|{cpu_features()}|llvmlite {llvmlite.__version__}"


def _pipeline() -> tuple[bool, bool]:
    """(loop unrolling, loop interleaving) of the O3 pipeline (GRAPHC_LLVM_UNROLL / _INTERLEAVE)."""
    return os.environ.get("GRAPHC_LLVM_UNROLL", "0") == "1", os.environ.get("GRAPHC_LLVM_INTERLEAVE", "1") == "1"


def _lsr() -> bool:
    """Whether machine code generation runs LLVM's loop strength reduction (GRAPHC_LLVM_LSR=0: not). It
    is the one super-linear codegen pass met so far: 6.5 s of the 7.6 s of machine code of W10's stem
    convolution kernel when its 49 im2col taps were unrolled (160 KB of IR; conv.py now loops over them:
    11 KB, 0.1 s with LSR). Read once per process (LLVM's option is global). compile_program's
    .kernel_compile lists each kernel's seconds, to find the next such kernel."""
    return _state.get("lsr", os.environ.get("GRAPHC_LLVM_LSR", "1") != "0")


def pipeline_id() -> str:
    """What the cache key records about the optimisation pipeline (its switches change the code)."""
    unroll, interleave = _pipeline()
    return (f"O3 loop-vectorize slp-vectorize unroll={int(unroll)} interleave={int(interleave)}"
            + ("" if _lsr() else " no-lsr"))


def optimise(module) -> None:
    """Run LLVM's O3 pipeline (new pass manager) with loop and SLP vectorisation on."""
    tm = target_machine()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    # unrolling doubled optimise + codegen time (W5: 0.8 s -> 0.45 s without) for no measured gain;
    # vector interleaving stays on (several accumulators hide FMA/exp latency)
    pto.loop_unrolling, pto.loop_interleaving = _pipeline()
    pb = llvm.create_pass_builder(tm, pto)
    mpm = pb.getModulePassManager()
    mpm.run(module, pb)


class Compiled:
    """A JIT-compiled module: function addresses plus the engine that owns the code."""

    def __init__(self, ir, names: list[str], cache_hit: bool, engine, module, times: dict | None = None):
        self._ir = ir   # the text, or a function making it (a program loaded by key: made when asked)
        self.addresses = {n: engine.get_function_address(n) for n in names}
        self.cache_hit = cache_hit
        self._engine = engine
        self._module = module
        #: seconds per phase (compile_program): llvm_opt, machine_code, load
        self.times = times or {}

    @property
    def ir(self) -> str:
        if callable(self._ir):
            self._ir = self._ir()
        return self._ir

    def asm(self) -> str:
        """Assembly of the optimised module (recompiled on demand after a cache hit)."""
        tm = target_machine()
        with _lock:
            mod = llvm.parse_assembly(self.ir)
            optimise(mod)
            return tm.emit_assembly(mod)


def compile_ir(ir: str, names: list[str]) -> Compiled:
    """Parse, optimise and JIT `ir`; the object code comes from the shared on-disk cache
    (graphc.backends.schedule.cache, sub "llvm") when present and intact. Serialised: llvmlite parses
    into LLVM's global context, which is not thread-safe."""
    target_machine()
    key = _cache.key(ir, target_id(), pipeline_id())
    entry = f"{key}.o"
    with _lock:
        cached = _cache.load_blob(CACHE_SUB, entry)
        mod = llvm.parse_assembly(ir)
        mod.verify()
        if cached is None:
            optimise(mod)
        mod.name = f"graphc_{key[:16]}"
        # the engine owns (and frees) its target machine: give it its own
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _new_tm())
        built: list[bytes] = []

        # the cache callbacks also fire for the engine's empty initial module: only `mod`'s object
        # belongs under `key` (storing the empty one let a concurrent process load it and crash)
        def notify(m, data):
            if m.name == mod.name:
                built.append(bytes(data))
        engine.set_object_cache(notify, lambda m: cached if m.name == mod.name else None)
        engine.add_module(mod)
        engine.finalize_object()
        if cached is None and built:   # stored outside the callback: its errors reach Python
            _store(entry, built[-1])
        return Compiled(ir, names, cached is not None, engine, mod)


def _store(entry: str, data: bytes) -> None:
    try:
        _cache.store_blob(CACHE_SUB, entry, data)
    except GraphcError as e:   # nowhere to write: the code is in memory, only the cache is lost
        warnings.warn(str(e), RuntimeWarning, stacklevel=3)


def _entry_tm():
    """A target machine without optimisation (fast instruction selection and register allocation) for
    entry modules: they only load pointers and call kernels, and at O3 their machine code cost most of
    a large graph's compile time (an 80-layer MLP step: 0.77 s -> 0.19 s; the calls cost the same)."""
    target_machine()
    with _lock:
        key = ("tm0", cpu_features())
        if key not in _state:
            _state[key] = _new_tm(0)
        return _state[key]


def _object(ir: str, times: dict, entry: bool = False) -> bytes:
    """Object code of module `ir`: parsed, verified, optimised (O3), machine code for this CPU; an entry
    module (`entry`) is translated as it is, without optimisation."""
    t0 = time.perf_counter()
    mod = llvm.parse_assembly(ir)
    mod.verify()
    if not entry:
        optimise(mod)
    t1 = time.perf_counter()
    obj = (_entry_tm() if entry else target_machine()).emit_object(mod)
    times["llvm_opt"] += t1 - t0
    times["machine_code"] += time.perf_counter() - t1
    return obj


# ---- kernels compiled in parallel -----------------------------------------------------------------------
# llvmlite serialises every call into LLVM behind one process-wide lock (its modules share LLVM's global
# context). LLVM itself compiles modules of *different* contexts concurrently (each thread: its own
# context, target machine and pass builder), and ctypes releases the GIL during a call. So a kernel
# compiled by a worker thread is parsed into the worker's own context and its three heavy steps (parse,
# the O3 pipeline, machine code) call the C functions behind llvmlite's wrappers directly; the cheap calls
# (creating and freeing those objects) keep the lock. Without those functions (another llvmlite), or
# with one core, or GRAPHC_COMPILE_THREADS=1, kernels compile one after the other as before. The object
# code is the same either way (tests/test_compile_parallel.py compares the bytes).

#: the C functions called without llvmlite's lock by worker threads (each on objects of its own context)
_UNLOCKED = ("LLVMPY_ParseAssembly", "LLVMPY_VerifyModule", "LLVMPY_RunNewModulePassManager",
             "LLVMPY_TargetMachineEmitToMemory")


def _raw(name: str):
    """The ctypes function behind llvmlite's locked wrapper of `name` (None if this llvmlite has none)."""
    try:
        fn = getattr(_ffi.lib, name)
    except AttributeError:
        return None
    cfn = getattr(fn, "_cfn", None)
    return cfn if cfn is not None and cfn.argtypes is not None else None


def compile_threads() -> int:
    """Threads compiling a program's kernels: GRAPHC_COMPILE_THREADS, else the cores this process may use
    (at most 8); 1 where this llvmlite offers no way around its lock."""
    if any(_raw(n) is None for n in _UNLOCKED):
        return 1
    env = os.environ.get("GRAPHC_COMPILE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class _Worker(threading.local):
    """A worker thread's own LLVM context and target machine (created on its first kernel)."""

    def setup(self):
        if not hasattr(self, "ctx"):
            self.ctx = llvm.create_context()
            self.tms = {}
        feats = cpu_features()
        if feats not in self.tms:
            self.tms[feats] = _new_tm()
        self.tm = self.tms[feats]
        return self


def _object_in_thread(ir: str, worker: _Worker) -> tuple[bytes, float, float]:
    """(object code, optimisation seconds, machine-code seconds) of kernel module `ir`, compiled as
    _object does but in this worker's own context without llvmlite's lock on the heavy calls."""
    w = worker.setup()
    t0 = time.perf_counter()
    text = ir.encode()
    with _ffi.OutputString() as err:
        mod = llvm.ModuleRef(_raw("LLVMPY_ParseAssembly")(w.ctx, ctypes.c_char_p(text), err), w.ctx)
        if err:
            mod.close()
            raise RuntimeError(f"LLVM IR parsing error\n{err}")
    try:
        with _ffi.OutputString() as err:
            if _raw("LLVMPY_VerifyModule")(mod, err):
                raise RuntimeError(str(err))
        unroll, interleave = _pipeline()
        pto = llvm.create_pipeline_tuning_options(speed_level=3)
        pto.loop_vectorization = True
        pto.slp_vectorization = True
        pto.loop_unrolling, pto.loop_interleaving = unroll, interleave
        pb = llvm.create_pass_builder(w.tm, pto)
        mpm = pb.getModulePassManager()
        _raw("LLVMPY_RunNewModulePassManager")(mpm, mod, pb)
        t1 = time.perf_counter()
        with _ffi.OutputString() as err:
            mb = _raw("LLVMPY_TargetMachineEmitToMemory")(w.tm, mod, 1, err)
            if not mb:
                raise RuntimeError(str(err))
        try:
            obj = ctypes.string_at(_ffi.lib.LLVMPY_GetBufferStart(mb), _ffi.lib.LLVMPY_GetBufferSize(mb))
        finally:
            _ffi.lib.LLVMPY_DisposeMemoryBuffer(mb)
        return obj, t1 - t0, time.perf_counter() - t1
    finally:
        mod.close()


def _kernel_name(ir: str) -> str:
    m = re.search(r"^define [^@]*@(k_\w+)", ir, re.M)
    return m.group(1) if m else "?"


def compile_kernels(irs: list[str], times: dict, threads: int | None = None, per: list | None = None) -> list[bytes]:
    """Object code of each kernel module in `irs` (in order), compiled by up to `threads` worker threads
    (compile_threads()); seconds are added to times["llvm_opt"] / ["machine_code"] (summed over threads:
    CPU time, not wall time). `per`, when given, gets one (kernel function, IR characters, optimisation
    seconds, machine-code seconds) per module, in order (compile_program keeps them as .kernel_compile)."""
    threads = compile_threads() if threads is None else threads
    if threads <= 1 or len(irs) <= 1:
        out = []
        for ir in irs:
            o0, m0 = times["llvm_opt"], times["machine_code"]
            out.append(_object(ir, times))
            if per is not None:
                per.append((_kernel_name(ir), len(ir), times["llvm_opt"] - o0, times["machine_code"] - m0))
        return out
    from concurrent.futures import ThreadPoolExecutor
    worker = _Worker()
    # the longest kernels first: the pool's last task is a short one
    order = sorted(range(len(irs)), key=lambda i: -len(irs[i]))
    with ThreadPoolExecutor(max_workers=min(threads, len(irs)), thread_name_prefix="graphc-llvm") as pool:
        done = dict(zip(order, pool.map(lambda i: _object_in_thread(irs[i], worker), order)))
    out = []
    for i in range(len(irs)):
        obj, opt, mc = done[i]
        times["llvm_opt"] += opt
        times["machine_code"] += mc
        out.append(obj)
        if per is not None:
            per.append((_kernel_name(irs[i]), len(irs[i]), opt, mc))
    return out


_BUNDLE = b"GCOBJS1\n"


def _bundle(objs: list[bytes]) -> bytes:
    head = struct.pack(f"<I{len(objs)}Q", len(objs), *[len(o) for o in objs])
    return _BUNDLE + head + b"".join(objs)


def _unbundle(blob: bytes | None) -> list[bytes] | None:
    if blob is None or not blob.startswith(_BUNDLE):
        return None
    p = len(_BUNDLE)
    (n,) = struct.unpack_from("<I", blob, p)
    sizes = struct.unpack_from(f"<{n}Q", blob, p + 4)
    p += 4 + 8 * n
    out = []
    for k in sizes:
        out.append(blob[p:p + k])
        p += k
    return out if p == len(blob) else None


def compile_program(head: str, kernels: list[str], entry: str, ir: str, names: list[str]) -> Compiled:
    """JIT a program made of kernel modules (`kernels`: each a whole module, `head` + one kernel
    definition) and an entry module (`entry`) calling them; `ir` (all of it as one module) is kept
    for f.asm. Each kernel's object code is cached on its own (sub "llvm", `<key>.kernel`, the key a
    hash of the kernel's module, the target and the pipeline), so a kernel compiled for one graph is
    reused by every other graph that has it; the whole program's objects are also cached together
    (`<key>.o`: a warm start reads one file). The kernels the cache lacks compile on compile_threads()
    threads (compile_kernels). Records seconds per phase in `.times` (llvm_opt, machine_code: wall
    time, split between them as their CPU time is; load: cache reads and linking), the CPU seconds of
    both in `.compile_cpu_s`, `.kernels_from_cache`, and per kernel compiled in `.kernel_compile`."""
    target_machine()
    tid, pid = target_id(), pipeline_id()
    times = {"llvm_opt": 0.0, "machine_code": 0.0, "load": 0.0}
    per: list = []
    t0 = time.perf_counter()
    wall = 0.0
    key = _cache.key("program; entry module at O0", entry, *kernels, tid, pid)
    with _lock:
        objs = None if key in _absent else _unbundle(_cache.load_blob(CACHE_SUB, f"{key}.o"))
        _absent.discard(key)
        hit = objs is not None and len(objs) == len(kernels) + 1
        reused = len(kernels) if hit else 0
        if not hit:
            kkeys = [f"{_cache.key(k, tid, pid)}.kernel" for k in kernels]
            objs = [_cache.load_blob(CACHE_SUB, kk) for kk in kkeys]
            missing = [i for i, o in enumerate(objs) if o is None]
            reused = len(kernels) - len(missing)
            t1 = time.perf_counter()
            for i, obj in zip(missing, compile_kernels([kernels[i] for i in missing], times, per=per)):
                objs[i] = obj
                _store(kkeys[i], obj)
            objs.append(_object(entry, times, entry=True))
            wall = time.perf_counter() - t1
            _store(f"{key}.o", _bundle(objs))
        # the engine owns (and frees) its target machine: give it its own
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _new_tm())
        for obj in objs:
            engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
        compiled = Compiled(ir, names, hit, engine, None, times)
    compiled.kernels_from_cache = reused
    compiled.key, compiled.objects = key, len(objs)
    #: the kernels compiled here (not from the cache), costliest first: (function, IR characters, O3 seconds,
    #: machine-code seconds: wall time on its compile thread). A diagnostic: f.program._last.compiled
    compiled.kernel_compile = sorted(per, key=lambda r: -(r[2] + r[3]))
    # llvm_opt and machine_code are summed over the compile threads; scaled to the wall time they took
    # together, so that the phases still add up to the call's time (the CPU seconds are kept as well)
    cpu = times["llvm_opt"] + times["machine_code"]
    compiled.compile_cpu_s = cpu
    if cpu > wall > 0:
        times["llvm_opt"] *= wall / cpu
        times["machine_code"] *= wall / cpu
    times["load"] = max(0.0, time.perf_counter() - t0 - times["llvm_opt"] - times["machine_code"])
    return compiled


def perf_map(compiled: Compiled, names: list[str]) -> None:
    """GRAPHC_PERF_MAP=1: append the functions `names` of a compiled program to /tmp/perf-<pid>.map (the
    format `perf report` reads for JIT code: start address, size, name, in hex), so a profile names graphc's
    kernels instead of bare addresses. A function's size is the distance to the next mapped one (capped at
    1 MiB). Only programs compiled in this process (a warm start maps nothing: run with GRAPHC_WARM_CACHE=0)."""
    if os.environ.get("GRAPHC_PERF_MAP", "0") != "1":
        return
    found = []
    for n in dict.fromkeys(names):
        try:
            a = compiled._engine.get_function_address(n)
        except Exception:   # noqa: BLE001 - a name the objects do not define
            a = 0
        if a:
            found.append((a, n))
    found.sort()
    lines = []
    for i, (a, n) in enumerate(found):
        size = min(found[i + 1][0] - a, 1 << 20) if i + 1 < len(found) else 4096
        lines.append(f"{a:x} {max(size, 1):x} {n}\n")
    with open(f"/tmp/perf-{os.getpid()}.map", "a") as fh:
        fh.writelines(lines)


#: program keys load_program just found missing or damaged (looked up once, not twice, before the rebuild)
_absent: set = set()


def load_program(key: str, objects: int, names: list[str], ir) -> Compiled | None:
    """The program compile_program cached as `<key>.o` (its `objects` object files) linked into a new
    engine, or None when the cache lacks it (or it is damaged, or of another size). `ir`: the program's
    text or a function making it (f.source, f.asm ask for it). The warm-start cache (program.Specialised
    .restore) calls this with the key its entry recorded."""
    target_machine()
    t0 = time.perf_counter()
    with _lock:
        objs = _unbundle(_cache.load_blob(CACHE_SUB, f"{key}.o"))
        if objs is None or len(objs) != objects:
            _absent.add(key)   # compile_program, called next, rebuilds it without looking (or counting) again
            return None
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _new_tm())
        for obj in objs:
            engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
        compiled = Compiled(ir, names, True, engine, None, {"llvm_opt": 0.0, "machine_code": 0.0})
    compiled.kernels_from_cache = objects - 1
    compiled.compile_cpu_s = 0.0
    compiled.kernel_compile = []
    compiled.key, compiled.objects = key, objects
    compiled.times["load"] = time.perf_counter() - t0
    return compiled


# ---- BLAS -----------------------------------------------------------------------------------------

BLAS_NAMES = ("sgemm", "dgemm", "sgemv", "dgemv")


def _openblas_candidates() -> list[str]:
    import numpy
    out = []
    for pkg in (numpy, ):
        d = os.path.dirname(pkg.__file__)
        out += sorted(glob.glob(d + ".libs/lib*openblas*.so*")) + sorted(glob.glob(d + "/.dylibs/lib*openblas*"))
    try:
        import scipy
        d = os.path.dirname(scipy.__file__)
        out += sorted(glob.glob(d + ".libs/lib*openblas*.so*"))
    except ImportError:
        pass
    return out


def _find(lib, name):
    """The address of cblas_<name> in `lib` under OpenBLAS's prefixed/suffixed spellings."""
    for sym, ilp64 in ((f"scipy_cblas_{name}64_", True), (f"cblas_{name}64_", True),
                       (f"scipy_cblas_{name}", False), (f"cblas_{name}", False)):
        try:
            return ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value, ilp64, sym
        except AttributeError:
            continue
    return None


#: Half-precision conversions for targets without F16C (GRAPHC_LLVM_ISA=avx or sse, or such a CPU): LLVM
#: lowers `fptrunc`/`fpext` between float/double and half to calls of compiler-rt's routines, which this
#: process does not have (MCJIT left the call unresolved: a jump to address 0). graphc defines them once
#: per process, integer code that rounds to nearest even as F16C's vcvtps2ph does (overflow to inf, a NaN
#: kept quiet with its top payload bits, subnormals by one float addition), and double -> half through a
#: float rounded to odd (no double rounding). Compiled for the SSE level, called with LLVM's own ABI for
#: `half` (an XMM register) because they are LLVM IR too.
RUNTIME_IR = r"""
define internal half @graphc_f32_half(i32 %b) alwaysinline {
  %sign = and i32 %b, -2147483648
  %a = and i32 %b, 2147483647
  %isnan = icmp ugt i32 %a, 2139095040
  %sh = lshr i32 %a, 13
  %pay = and i32 %sh, 1023
  %nanbits = or i32 %pay, 32256
  %big = icmp uge i32 %a, 1199570944
  %small = icmp ult i32 %a, 947912704
  %af = bitcast i32 %a to float
  %ds = fadd float %af, 5.000000e-01
  %dsb = bitcast float %ds to i32
  %den = sub i32 %dsb, 1056964608
  %odd = and i32 %sh, 1
  %n1 = add i32 %a, -939520001
  %n2 = add i32 %n1, %odd
  %nrm = lshr i32 %n2, 13
  %r1 = select i1 %small, i32 %den, i32 %nrm
  %special = select i1 %isnan, i32 %nanbits, i32 31744
  %r2 = select i1 %big, i32 %special, i32 %r1
  %s16 = lshr i32 %sign, 16
  %r = or i32 %r2, %s16
  %t = trunc i32 %r to i16
  %h = bitcast i16 %t to half
  ret half %h
}

define half @__truncsfhf2(float %x) {
  %b = bitcast float %x to i32
  %h = call half @graphc_f32_half(i32 %b)
  ret half %h
}

define half @__truncdfhf2(double %x) {
  %t = fptrunc double %x to float
  %back = fpext float %t to double
  %ab = call double @llvm.fabs.f64(double %back)
  %av = call double @llvm.fabs.f64(double %x)
  %o = fcmp ogt double %ab, %av
  %over = zext i1 %o to i32
  %tb = bitcast float %t to i32
  %bits = sub i32 %tb, %over
  %st = fcmp one double %back, %x
  %sticky = zext i1 %st to i32
  %odd = or i32 %bits, %sticky
  %h = call half @graphc_f32_half(i32 %odd)
  ret half %h
}

define float @__extendhfsf2(half %h) {
  %hb = bitcast half %h to i16
  %w = zext i16 %hb to i32
  %sg = and i32 %w, 32768
  %sign = shl i32 %sg, 16
  %mag = and i32 %w, 32767
  %o = shl i32 %mag, 13
  %exp = and i32 %o, 260046848
  %o1 = add i32 %o, 939524096
  %isinf = icmp eq i32 %exp, 260046848
  %o2 = add i32 %o1, 939524096
  %man = and i32 %w, 1023
  %isnan = icmp ne i32 %man, 0
  %quiet = select i1 %isnan, i32 4194304, i32 0
  %o2q = or i32 %o2, %quiet
  %iszero = icmp eq i32 %exp, 0
  %o3 = add i32 %o1, 8388608
  %f3 = bitcast i32 %o3 to float
  %f4 = fsub float %f3, 0x3F10000000000000
  %b4 = bitcast float %f4 to i32
  %r1 = select i1 %isinf, i32 %o2q, i32 %o1
  %r2 = select i1 %iszero, i32 %b4, i32 %r1
  %r = or i32 %r2, %sign
  %f = bitcast i32 %r to float
  ret float %f
}

define double @__extendhfdf2(half %h) {
  %f = call float @__extendhfsf2(half %h)
  %d = fpext float %f to double
  ret double %d
}

declare double @llvm.fabs.f64(double)
"""
RUNTIME_SYMBOLS = ("__truncsfhf2", "__truncdfhf2", "__extendhfsf2", "__extendhfdf2")


def runtime_symbols() -> dict[str, int]:
    """Define RUNTIME_IR's routines in this process (once) for code compiled without F16C; their addresses."""
    with _lock:
        if "runtime" not in _state:
            tm = _new_tm(features=cpu_features("sse"))
            mod = llvm.parse_assembly(RUNTIME_IR)
            mod.verify()
            engine = llvm.create_mcjit_compiler(mod, tm)
            engine.finalize_object()
            addrs = {n: engine.get_function_address(n) for n in RUNTIME_SYMBOLS}
            for n, a in addrs.items():
                llvm.add_symbol(n, a)
            _state["runtime"] = (engine, addrs)
        return _state["runtime"][1]


def bind_blas() -> None:
    """Resolve CBLAS gemm/gemv once and bind them as gc_cblas_<name> for the JIT (llvm.add_symbol)."""
    if os.environ.get("GRAPHC_LLVM_NO_BLAS"):
        _state["blas"] = None
        return
    for path in _openblas_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        found = {n: _find(lib, n) for n in BLAS_NAMES}
        if all(found.values()) and len({f[1] for f in found.values()}) == 1:
            for n, (addr, _, _) in found.items():
                llvm.add_symbol(f"gc_cblas_{n}", addr)
            _state["blas"] = {"library": path, "ilp64": found["sgemm"][1],
                              "symbols": {n: f[2] for n, f in found.items()}, "lib": lib}
            _state["blas"]["prefault"] = prefault_blas_buffers(lib)
            return
    _state["blas"] = None


#: bytes at the start of each OpenBLAS work buffer mapped in ahead (`prefault_blas_buffers`; the most a
#: single-thread product used, measured: 5.4 MB of its 32 MB buffer for float32 4096^3, 3 MB float64 1024^3)
BLAS_PREFAULT_BYTES = 8 << 20
#: OpenBLAS work buffers mapped in ahead at most (one per graphc thread)
BLAS_PREFAULT_MAX = 16
MADV_POPULATE_READ = 22


def _mapped_bytes(addr: int, want: int) -> int:
    """How many bytes from addr (up to want) lie in mapped memory (contiguous entries of /proc/self/maps)."""
    try:
        spans = []
        with open("/proc/self/maps") as fh:
            for line in fh:
                lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                spans.append((lo, hi))
    except OSError:
        return 0
    end = addr
    for lo, hi in sorted(spans):
        if lo <= end < hi:
            end = hi
        if end >= addr + want:
            break
    return min(want, end - addr)


def prefault_blas_buffers(lib, count: int | None = None) -> dict | None:
    """Map in (read, so the kernel's shared zero page: no memory is used) the start of OpenBLAS's first
    `count` work buffers. OpenBLAS packs both operands into a 32 MB buffer taken from one process-wide
    table (the first free slot per call, so two threads' concurrent calls use slots 0 and 1) and mmaps each
    slot on first use; its Haswell sgemm kernel prefetches a few pages past the packed data it writes. In a
    virtual machine a software prefetch of a page never touched walks the nested page tables on every
    execution (nothing is cached for a missing page): on a 2-core AMD EPYC Zen 1 VM a single-thread
    (256 x 784) @ (784 x 256) took 9.0 ms with a fresh buffer and 2.9 ms once the pages past its data were
    mapped (by any larger earlier product in that slot), and graphc's 2-thread split of W1 b256's
    (256 x 784) @ (784 x 512), each thread in its own fresh slot, 8.7-11 ms against 3.0-3.3 ms.
    count: graphc's threads (its concurrent BLAS calls), at most BLAS_PREFAULT_MAX. While OpenBLAS's server
    is up its threads hold the first slots and graphc's calls get the next ones, the ones mapped here;
    after the pool first stops those threads (pool.py) their slots come first again, and the pool maps in
    `count` buffers once more. Returns {'count', 'buffers'
    (mapped now), 'bytes', 'ms'} or None (not OpenBLAS's allocator;
    GRAPHC_BLAS_PREFAULT=0)."""
    if os.environ.get("GRAPHC_BLAS_PREFAULT", "1") == "0" or sys.platform != "linux":
        return None
    try:
        alloc, free = lib.blas_memory_alloc, lib.blas_memory_free
    except AttributeError:
        return None
    if count is None:
        from .program import num_threads
        count = num_threads()
    count = max(1, min(int(count), BLAS_PREFAULT_MAX))
    alloc.restype, alloc.argtypes = ctypes.c_void_p, [ctypes.c_int]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    libc = ctypes.CDLL(None, use_errno=True)
    t0 = time.perf_counter()
    held = [p for p in (alloc(0) for _ in range(count)) if p]
    done = 0
    try:
        for p in held:
            n = _mapped_bytes(p, BLAS_PREFAULT_BYTES)
            if n <= 0:
                continue
            if libc.madvise(ctypes.c_void_p(p), ctypes.c_size_t(n), MADV_POPULATE_READ) != 0:
                # kernels before 5.14: read one byte per page
                pages = np.ctypeslib.as_array((ctypes.c_ubyte * n).from_address(p))
                int(pages[::4096].sum())
            done += 1
    finally:
        for p in held:
            free(p)
    return {"count": count, "buffers": done, "bytes": BLAS_PREFAULT_BYTES,
            "ms": round((time.perf_counter() - t0) * 1e3, 2)}


def blas() -> dict | None:
    """{'library', 'ilp64', 'symbols'} of the BLAS bound for generated code, or None (pure-LLVM GEMM)."""
    target_machine()
    return _state["blas"]
