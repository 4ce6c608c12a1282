"""The CUDA backend's CuPy runtime: finding and preparing the kernel sources, compiling, caching
and launching them, the per-step cuBLAS GEMM, and the probe that says whether CuPy and a device
are here (with the toolkit versions, for every error message).

Kernels compile lazily (first use per device and dtype) from the ``.cu`` sources shipped as
package data (``rnnkern/csrc`` in a wheel, ``<repo>/csrc`` in a checkout), with CuPy's
``RawModule`` (NVRTC). The local ``#include "..."`` files are inlined into the source text first,
so CuPy's on-disk kernel cache (keyed by source text) never serves a binary built from an older
header. Everything runs on CuPy's current stream. CuPy is imported only when a runtime is made
or the probe runs, never when this module is imported.

Shape legend: B batch, T time steps, I input, H hidden, G gates (RNN 1, LSTM 4, GRU 3).
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np

from ... import config
from ...device import CUPY_MISSING

ENV_CSRC = "RNNKERN_CSRC"
# csrc/cuda/<module>.cu: the recurrent time loops, then the model's element-wise kernels
# (fused optimizer updates, dropout masks)
MODULES = ("stepwise", "persistent", "cluster", "optim", "dropout")
CLUSTER_SIZE = 8  # blocks per cluster of the "cluster" kernels (8: the portable maximum)


class NotResident(RuntimeError):
    """The persistent kernel's blocks cannot all be resident at once on this device."""


# ----------------------------------------------------------------------------------------------
# sources


def source_root():
    """The ``csrc`` folder: ``$RNNKERN_CSRC``, then ``rnnkern/csrc`` (a wheel: setup.py's build_py
    copies it there), then ``<repo>/csrc`` (a checkout or an editable install)."""
    package = Path(__file__).resolve().parents[2]  # rnnkern/backends/cuda/runtime.py -> rnnkern
    candidates = [Path(os.environ[ENV_CSRC])] if os.environ.get(ENV_CSRC) else []
    candidates += [package / "csrc", package.parent / "csrc"]
    for root in candidates:
        if (root / "cuda" / "stepwise.cu").is_file():
            return root
    raise FileNotFoundError("CUDA kernel sources not found; looked for cuda/stepwise.cu under "
                            + ", ".join(str(c) for c in candidates))


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def kernel_source(module, real="float", root=None):
    """Source text of ``csrc/cuda/<module>.cu`` for element type ``real``, local includes inlined.

    ``#include "x"`` is looked up beside the including file, then in ``csrc/include``; each file
    is inlined once (the headers use ``#pragma once``). ``#include <...>`` lines are left alone.
    """
    if real not in ("float", "double"):
        raise ValueError(f"real must be 'float' or 'double', got {real!r}")
    root = Path(root) if root is not None else source_root()
    seen = set()

    def expand(path):
        path = path.resolve()
        if path in seen:
            return ""
        seen.add(path)
        text = path.read_text()

        def include(m):
            for base in (path.parent, root / "include"):
                if (base / m.group(1)).is_file():
                    return expand(base / m.group(1))
            raise FileNotFoundError(f'{path}: #include "{m.group(1)}" not found')

        text = re.sub(r"^\s*#\s*pragma\s+once\s*$", "", text, flags=re.M)
        return _INCLUDE.sub(include, text)

    return (f"#define RK_REAL {real}\n#define RK_CLUSTER_SIZE {CLUSTER_SIZE}\n"
            + expand(root / "cuda" / f"{module}.cu"))


# ----------------------------------------------------------------------------------------------
# availability and versions


def versions():
    """``"CuPy x, CUDA runtime a.b, driver c.d"``, for error messages; never raises."""
    try:
        import cupy
    except ImportError:
        return "CuPy not installed"
    parts = [f"CuPy {cupy.__version__}"]
    for label, fn in (("CUDA runtime", "runtimeGetVersion"), ("driver", "driverGetVersion")):
        try:
            v = getattr(cupy.cuda.runtime, fn)()
            parts.append(f"{label} {v // 1000}.{(v % 1000) // 10}")
        except Exception as exc:  # noqa: BLE001 - a version probe must not raise
            parts.append(f"{label} unknown ({type(exc).__name__})")
    return ", ".join(parts)


_available = None  # the probe's answer, once per process
_runtime = None    # the CupyRuntime (tests put the emulated one here)


def available():
    """(ok, reason); probed once per process (the registry asks on every layer call)."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe():
    # CuPy may warn while it looks for the toolkit; keep the words for the reason instead of
    # letting a warnings-as-errors setting turn the probe into an exception
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import cupy
            n = cupy.cuda.runtime.getDeviceCount()
        except ImportError:
            return False, CUPY_MISSING
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and friends, no driver
            return False, (f"no usable CUDA device ({type(exc).__name__}: {exc}; "
                           f"{versions()}){_warned(caught)}")
    if n == 0:
        return False, f"no CUDA device ({versions()}){_warned(caught)}"
    try:
        source_root()
    except FileNotFoundError as exc:
        return False, str(exc)
    return True, f"{n} CUDA device(s), {versions()}{_warned(caught)}"


def _warned(caught):
    return "".join(f"; CuPy warned: {w.message}" for w in caught)


def get_runtime():
    """The process's :class:`CupyRuntime`, made on first use; raises with the probe's reason
    when the backend cannot run here."""
    global _runtime
    if _runtime is None:
        ok, reason = available()
        if not ok:
            raise RuntimeError(f"the cuda backend is unavailable: {reason}")
        _runtime = CupyRuntime()
    return _runtime


def cached(rt, key, make):
    """A small device buffer kept in ``rt.cache`` under ``key`` (made by ``make`` once)."""
    if key not in rt.cache:
        rt.cache[key] = make()
    return rt.cache[key]


# ----------------------------------------------------------------------------------------------
# the runtime (the emulated CPU runtime of the tests, tests/cuda_emu.py, offers the same methods)


class CupyRuntime:
    """Compiles and launches the kernels with CuPy on the current device and stream."""

    def __init__(self):
        import cupy
        self.xp = cupy
        self.cache = {}       # small device buffers reused between calls (see cached)
        self._modules = {}
        self._kernels = {}
        self._props = {}
        self._occupancy = {}
        # per thread: inside capture() (matmul leaves cuBLAS's stream alone), and the side
        # stream's cuBLAS handle inside on_side_stream()
        self._state = threading.local()
        self._capture_lock = threading.Lock()  # one capture at a time: they share a stream
        self._blas = None     # blas.Cublas once looked for (False: not found)

    def device_id(self):
        return self.xp.cuda.Device().id

    def stream_key(self):
        """(device, current stream): work queued under one key runs in order."""
        return self.device_id(), self.xp.cuda.get_current_stream().ptr

    def props(self):
        """``(n_sm, smem_optin_bytes)`` of the current device (cached)."""
        dev = self.device_id()
        if dev not in self._props:
            rt = self.xp.cuda.runtime
            try:  # cudaDevAttrMultiProcessorCount = 16, ...MaxSharedMemoryPerBlockOptin = 97
                n_sm, smem = rt.deviceGetAttribute(16, dev), rt.deviceGetAttribute(97, dev)
            except Exception:  # noqa: BLE001 - fall back to the properties struct
                p = rt.getDeviceProperties(dev)
                n_sm = p["multiProcessorCount"]
                smem = p.get("sharedMemPerBlockOptin", 48 * 1024)
            self._props[dev] = (int(n_sm), int(smem))
        return self._props[dev]

    def supports_clusters(self):
        """Thread-block clusters: compute capability 9.0 or later (cached)."""
        dev = self.device_id()
        key = ("cc_major", dev)
        if key not in self._props:  # cudaDevAttrComputeCapabilityMajor = 75
            self._props[key] = int(self.xp.cuda.runtime.deviceGetAttribute(75, dev))
        return self._props[key] >= 9

    def kernel(self, module, fname, dtype):
        real = "double" if np.dtype(dtype) == np.float64 else "float"
        key = (self.device_id(), module, real, fname)
        if key not in self._kernels:
            mkey = key[:3]
            try:
                if mkey not in self._modules:  # NVRTC's default dialect (C++17) is enough
                    self._modules[mkey] = self.xp.RawModule(code=kernel_source(module, real))
                self._kernels[key] = self._modules[mkey].get_function(fname)  # compiles
            except Exception as exc:
                raise RuntimeError(f"compiling csrc/cuda/{module}.cu ({real}) for device "
                                   f"{key[0]} failed with {versions()}: {exc}") from exc
        return self._kernels[key]

    def launch(self, kern, grid, block, args, smem=0, resident=False, cluster=False):
        """Launch on the current stream. ``resident``: every block must be on an SM at once
        (the persistent kernels' grid barrier); raises :class:`NotResident` when the occupancy
        calculator says they cannot be. ``cluster``: a cluster kernel; a launch the driver
        refuses (say, no GPC with room for a whole cluster of these blocks) raises
        :class:`NotResident` too."""
        if smem > 48 * 1024:  # beyond 48 KiB a kernel must opt in to dynamic shared memory
            with warnings.catch_warnings():  # some CuPy versions deprecate the attribute
                warnings.simplefilter("ignore", DeprecationWarning)
                if kern.max_dynamic_shared_size_bytes < smem:
                    kern.max_dynamic_shared_size_bytes = smem
        if resident and grid > self._max_resident(kern, block, smem):
            raise NotResident(f"{grid} blocks of {block} threads and {smem} bytes of shared "
                              f"memory cannot all be resident on device {self.device_id()}")
        if not cluster:
            kern((grid,), (block,), args, shared_mem=smem)
            return
        errors = tuple(getattr(mod, name) for mod, name in
                       ((self.xp.cuda.driver, "CUDADriverError"),
                        (self.xp.cuda.runtime, "CUDARuntimeError")) if hasattr(mod, name))
        try:
            kern((grid,), (block,), args, shared_mem=smem)
        except errors as exc:
            raise NotResident(f"clusters of {CLUSTER_SIZE} blocks of {block} threads and {smem} "
                              f"bytes of shared memory: the launch failed ({exc})") from exc

    def _max_resident(self, kern, block, smem):
        key = (self.device_id(), id(kern), block, smem)
        if key not in self._occupancy:
            try:
                per_sm = self.xp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    kern.kernel.ptr, block, smem)
                self._occupancy[key] = per_sm * self.props()[0]
            except Exception:  # noqa: BLE001 - no calculator: rely on the barrier's timeout
                self._occupancy[key] = float("inf")
        return self._occupancy[key]

    def capture(self, body):
        """A CUDA graph of what ``body()`` launches (it must only call :meth:`launch`,
        :meth:`matmul`, :meth:`on_side_stream` and :meth:`join_side`), captured on a stream of
        its own; nothing runs yet. cuBLAS's stream is set to that stream before the capture,
        and the GEMMs inside go straight to the library (:mod:`.blas`), as a handle's stream
        may not change inside a capture."""
        if self.direct_blas() is None:
            raise RuntimeError("the cuBLAS library CuPy loaded was not found for direct calls")
        with self._capture_lock:
            return self._capture(body)

    def _capture(self, body):
        key = ("capture_stream", self.device_id())
        if key not in self.cache:
            self.cache[key] = self.xp.cuda.Stream(non_blocking=True)
        stream = self.cache[key]
        self._side_of(stream)  # made now: nothing may allocate inside the capture
        self._bind(self.xp.cuda.device.get_cublas_handle(), stream)
        self._state.capturing = True
        try:
            with stream:
                stream.begin_capture()
                try:
                    body()
                finally:
                    graph = stream.end_capture()  # always: a stream left capturing is unusable
        finally:
            self._state.capturing = False
        return graph

    def replay(self, graph):
        """Launch a graph from :meth:`capture` on the current stream."""
        graph.launch()

    def new_event(self):
        return self.xp.cuda.Event(disable_timing=True)

    def record(self, event):
        """``event`` marks what is queued on the current stream so far."""
        event.record(self.xp.cuda.get_current_stream())

    def wait(self, event):
        """The current stream waits for ``event`` (recorded on any stream)."""
        self.xp.cuda.get_current_stream().wait_event(event)

    @contextlib.contextmanager
    def on_side_stream(self):
        """Queue what the block launches on the side stream of the current one, after all that
        is queued there so far, to overlap what the current stream does next; :meth:`join_side`
        makes the current stream wait for it. The side stream's GEMMs use a cuBLAS handle of
        their own (created once, its stream set once), so a capture never changes a handle's
        stream."""
        main = self.xp.cuda.get_current_stream()
        side, handle, start, done = self._side_of(main)
        start.record(main)
        side.wait_event(start)
        outer = getattr(self._state, "side_handle", None)
        self._state.side_handle = handle
        try:
            with side:
                yield
        finally:
            self._state.side_handle = outer
        done.record(side)

    def join_side(self):
        """The current stream waits for what :meth:`on_side_stream` queued beside it."""
        main = self.xp.cuda.get_current_stream()
        main.wait_event(self._side_of(main)[3])

    def _side_of(self, main):
        """(side stream, its cuBLAS handle, fork event, join event) of stream ``main``, made
        on first use (before a capture on ``main``: a handle's creation allocates). One handle
        per stream ever used: a program that makes streams without end makes handles so. No
        handle without the direct cuBLAS calls (the GEMMs then go through ``cupy.matmul``)."""
        key = ("side", self.device_id(), main.ptr)
        if key not in self.cache:
            side, handle = self.xp.cuda.Stream(non_blocking=True), None
            if self.direct_blas() is not None:
                from cupy_backends.cuda.libs import cublas
                handle = cublas.create()
                self._bind(handle, side)
            self.cache[key] = (side, handle, self.new_event(), self.new_event())
        return self.cache[key]

    def _bind(self, handle, stream):
        """Set a cuBLAS handle's stream, and host pointer mode (alpha and beta on the host)."""
        blas = self.direct_blas()
        blas.set_stream(handle, stream.ptr)
        blas.set_pointer_mode_host(handle)

    def direct_blas(self):
        """The :class:`.blas.Cublas` on the library CuPy loaded, or None (looked for once)."""
        if self._blas is None:
            from cupy_backends.cuda.libs import cublas

            from . import blas
            self.xp.cuda.device.get_cublas_handle()  # CuPy loads libcublas with a handle
            self._blas = blas.load(cublas) or False
        return self._blas or None

    def matmul(self, a, b, out, accumulate=False):
        """``out[m,n] = a[m,k] @ b[k,n]`` (``+=`` with ``accumulate``) on the current stream.
        The stepwise loops call this twice per step, so it goes straight to cuBLAS
        (:func:`gemm_args`, :mod:`.blas`; a few µs from Python, where ``cupy.matmul`` takes
        tens); ``rnnkern.config.CUDA_DIRECT_GEMM = False``, operands cuBLAS cannot take as
        they are, or no direct cuBLAS found, use ``cupy.matmul``."""
        spec = gemm_args(a, b, out) if config.CUDA_DIRECT_GEMM else None
        blas = self.direct_blas() if spec is not None else None
        if spec is None or blas is None:
            if accumulate:
                out += self.xp.matmul(a, b)
            else:
                self.xp.matmul(a, b, out=out)
            return
        if spec == "empty":
            if not accumulate:
                out.fill(0)
            return
        op_b, op_a, m, n, k, ld_b, ld_a, ld_c = spec
        one, zero = self._scalars(out.dtype)
        handle = getattr(self._state, "side_handle", None)  # bound to its stream for good
        if handle is None:
            handle = self.xp.cuda.device.get_cublas_handle()
            if not getattr(self._state, "capturing", False):  # capture() bound it already
                self._bind(handle, self.xp.cuda.get_current_stream())
        blas.gemm(out.dtype == np.float64, handle, op_b, op_a, m, n, k, one.ctypes.data,
                  b.data.ptr, ld_b, a.data.ptr, ld_a, (one if accumulate else zero).ctypes.data,
                  out.data.ptr, ld_c)

    def _scalars(self, dtype):
        """Host 1 and 0 of ``dtype`` for cuBLAS's alpha and beta, kept alive here."""
        key = ("gemm_scalars", np.dtype(dtype).name)
        if key not in self.cache:
            self.cache[key] = (np.ones(1, dtype), np.zeros(1, dtype))
        return self.cache[key]


# ----------------------------------------------------------------------------------------------
# GEMM operands: row-major NumPy/CuPy views as column-major cuBLAS sees them


def _colmajor_operand(shape, strides, itemsize):
    """How column-major cuBLAS can read a row-major 2-D view X [r, c]: ``("N", ld)`` when each
    row is contiguous (the memory holds X^T column-major, leading dimension ld = the row
    stride), ``("T", ld)`` when each column is (X is the transpose of a row-major matrix, so the
    memory holds X column-major), None otherwise."""
    r, c = shape
    if strides[0] % itemsize or strides[1] % itemsize:
        return None
    s0, s1 = strides[0] // itemsize, strides[1] // itemsize
    if c == 1 or s1 == 1:
        ld = s0 if r > 1 else c
        if ld >= max(1, c):
            return "N", ld
    if r == 1 or s0 == 1:
        ld = s1 if c > 1 else r
        if ld >= max(1, r):
            return "T", ld
    return None


def gemm_args(a, b, out):
    """The cuBLAS GEMM that computes row-major ``out[m,n] = a[m,k] @ b[k,n]`` without copies:
    ``(op_b, op_a, n, m, k, ld_b, ld_a, n)``, because column-major ``out^T = b^T a^T``; "empty"
    when k == 0 (out is zeros) or there is nothing to compute; None when an operand's layout
    (or out, which must be C-contiguous) does not suit cuBLAS."""
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or out.shape != (m, n) or not (a.dtype == b.dtype == out.dtype):
        raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} -> {out.shape} or dtypes differ")
    if not out.flags.c_contiguous:
        return None
    if m == 0 or n == 0 or k == 0:
        return "empty"
    ra = _colmajor_operand(a.shape, a.strides, a.itemsize)
    rb = _colmajor_operand(b.shape, b.strides, b.itemsize)
    if ra is None or rb is None:
        return None
    return rb[0], ra[0], n, m, k, rb[1], ra[1], n
