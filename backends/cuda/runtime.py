"""Execution on a real GPU through the CUDA driver API (libcuda via ctypes: no extra dependency).

Temporaries in one device arena per function (the plan's layout; grown when a call needs more),
device buffers per call for inputs, outputs and update values; constants uploaded once; parameters
kept resident between calls, and an update's new value stays on the device as the parameter's copy.
None of this can run on a machine without an NVIDIA driver: the tests skip it with the reason."""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

from graphc.errors import BackendUnavailable, GraphcError
from .executor import Memory

_lock = threading.Lock()
_driver = {}


def driver():
    """(libcuda, context) initialised once per process; raises BackendUnavailable with the reason."""
    with _lock:
        if "error" in _driver:
            raise BackendUnavailable(_driver["error"])
        if "lib" in _driver:
            return _driver["lib"]
        try:
            _driver["lib"] = _init()
        except BackendUnavailable as e:
            _driver["error"] = str(e)
            raise
        return _driver["lib"]


def make_current() -> None:
    """The primary context is current per OS thread: every call sets it for the calling thread."""
    lib = driver()
    _call(lib, "cuCtxSetCurrent", lib.graphc_ctx)


def _init():
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise BackendUnavailable("no NVIDIA driver on this machine (libcuda.so not found)") from None
    _call(lib, "cuInit", 0, unavailable=True)
    count = ctypes.c_int()
    _call(lib, "cuDeviceGetCount", ctypes.byref(count), unavailable=True)
    if count.value == 0:
        raise BackendUnavailable("the NVIDIA driver reports no CUDA device")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _call(lib, "cuDeviceGet", ctypes.byref(dev), 0)
    _call(lib, "cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
    lib.graphc_ctx = ctx
    return lib


def _call(lib, fn, *args, unavailable=False):
    rc = getattr(lib, fn)(*args)
    if rc != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        text = f"{fn} failed: CUDA error {rc} ({(msg.value or b'?').decode()})"
        raise (BackendUnavailable if unavailable else GraphcError)(text)


def device_arch() -> str:
    """sm_XY of device 0 (CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR = 75/76)."""
    lib = driver()
    major, minor, dev = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _call(lib, "cuDeviceGet", ctypes.byref(dev), 0)
    _call(lib, "cuDeviceGetAttribute", ctypes.byref(major), 75, dev)
    _call(lib, "cuDeviceGetAttribute", ctypes.byref(minor), 76, dev)
    return f"sm_{major.value}{minor.value}"


class DeviceModule:
    """The compiled PTX loaded into the primary context, with its kernels looked up by name."""

    def __init__(self, ptx: bytes, kernel_names):
        self.lib = driver()
        _call(self.lib, "cuCtxSetCurrent", self.lib.graphc_ctx)
        self.module = ctypes.c_void_p()
        _call(self.lib, "cuModuleLoadData", ctypes.byref(self.module), ctypes.c_char_p(ptx + b"\0"))
        self.fns = {}
        for k in kernel_names:
            f = ctypes.c_void_p()
            _call(self.lib, "cuModuleGetFunction", ctypes.byref(f), self.module, k.encode())
            self.fns[k] = f


class DeviceMemory(Memory):
    """Device pointers as handles. One instance per compiled function; calls are serialised."""

    def __init__(self, module: DeviceModule, plan=None):
        super().__init__()
        self.m, self.lib = module, module.lib
        self.resident = {}   # param index -> (host array it mirrors, device pointer)
        self.consts = {}     # (schedule id, const index) -> device pointer
        self.temps = []      # this call's input copies and output buffers
        self.lock = threading.Lock()

    def _alloc_bytes(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        _call(self.lib, "cuMemAlloc_v2", ctypes.byref(p), ctypes.c_size_t(max(nbytes, 1)))
        return p.value

    def _upload(self, a: np.ndarray) -> int:
        p = self._alloc_bytes(a.nbytes)
        self.write(p, np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        return p

    def bind(self, array, kind, key):
        if kind == "param":
            held = self.resident.get(key)
            if held is not None and (held[0] is array or np.array_equal(held[0], array)):
                return held[1]  # unchanged since it was uploaded (or computed here by an update)
            if held is not None:
                self._free(held[1])
            p = self._upload(array)
            self.resident[key] = (array, p)
            return p
        if kind == "const":
            if key not in self.consts:
                self.consts[key] = self._upload(array)
            return self.consts[key]
        p = self._upload(array)
        self.temps.append(p)
        return p

    def new_arena(self, nbytes):
        return self._alloc_bytes(nbytes)

    def free_arena(self, base):
        self._free(base)

    def sub(self, handle, offset, nbytes):
        return handle + offset

    def alloc(self, nbytes):
        p = self._alloc_bytes(nbytes)
        self.temps.append(p)
        return p

    def pointer(self, handle) -> int:
        return handle

    def read(self, handle, nbytes, copy):
        a = np.empty(nbytes, np.uint8)
        if nbytes:
            _call(self.lib, "cuMemcpyDtoH_v2", a.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(handle),
                  ctypes.c_size_t(nbytes))
        return a

    def write(self, handle, data):
        a = np.ascontiguousarray(data)
        if a.nbytes:
            _call(self.lib, "cuMemcpyHtoD_v2", ctypes.c_uint64(handle), a.ctypes.data_as(ctypes.c_void_p),
                  ctypes.c_size_t(a.nbytes))

    def zero(self, handle, nbytes):
        if nbytes:
            _call(self.lib, "cuMemsetD8_v2", ctypes.c_uint64(handle), ctypes.c_ubyte(0), ctypes.c_size_t(nbytes))

    def launch(self, kernel, grid, block, params, sync):
        _call(self.lib, "cuLaunchKernel", self.m.fns[kernel], *[ctypes.c_uint(v) for v in grid],
              *[ctypes.c_uint(v) for v in block], ctypes.c_uint(0), None, params, None)

    def after_run(self, outs, updates):
        """Keep each update's device buffer as its parameter's resident copy; free the rest."""
        keep = set()
        for pidx, handle, host in updates:
            if handle in keep:
                continue
            old = self.resident.get(pidx)
            if old is not None and old[1] != handle:
                self._free(old[1])
            self.resident[pidx] = (host, handle)
            keep.add(handle)
        for p in self.temps:
            if p not in keep:
                self._free(p)
        self.temps = []

    def _free(self, p):
        self.lib.cuMemFree_v2(ctypes.c_uint64(p))
