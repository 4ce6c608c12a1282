"""Run-time machinery of the Numba backend (:mod:`rnnkern.backends.numba_cpu`): the workspace
pool and the batch-parallel chunks. No kernels here, and Numba is not imported.

Workspace pool: large arrays that never reach the caller (saved activations, backward scratch)
are recycled, since fresh large arrays page-fault on first touch (5 ms of a 13 ms LSTM forward at
B=50, T=50, H=128). Saved arrays return to the pool when their ``saved`` record is garbage
collected (the layer drops it at its next forward); scratch returns at the end of the backward.

Batch chunks: with several CPUs and enough work, the batch is cut into contiguous chunks
(batch-major arrays make every chunk a contiguous view) and each chunk runs the whole recurrence
on its own thread, the kernels releasing the GIL. That needs no synchronisation per time step,
unlike multi-threaded BLAS inside the loop, whose spinning workers also fare badly on a busy
machine. Meanwhile the BLAS that Numba's ``np.dot`` calls (SciPy's OpenBLAS) is pinned to one
thread, process-wide, and restored after. Tunables: :mod:`rnnkern.config`.

Shape legend: B batch, T time steps, I input size, H hidden size, G gates.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ..blas_threads import scipy_openblas

from .. import config


# ------------------------------------------------------------------------------ workspace pool

class _Pool:
    """Idle arrays by (shape, dtype); thread-safe; bounded by ``config.NUMBA_POOL_MAX_BYTES``."""

    def __init__(self):
        self._idle = {}
        self._bytes = 0
        # reentrant: the cyclic GC may run a saved record's finalizer (-> give) inside give
        self._lock = threading.RLock()

    def take(self, shape, dtype):
        """An array of ``shape`` and ``dtype`` (a np.dtype), recycled or new; contents undefined."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < config.NUMBA_POOL_MIN_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            idle = self._idle.get((shape, dtype))
            if idle:
                self._bytes -= nbytes
                return idle.pop()
        return np.empty(shape, dtype)

    def give(self, arrays):
        with self._lock:
            for a in arrays:
                if a.nbytes < config.NUMBA_POOL_MIN_BYTES or \
                        self._bytes + a.nbytes > config.NUMBA_POOL_MAX_BYTES:
                    continue
                self._idle.setdefault((a.shape, a.dtype), []).append(a)
                self._bytes += a.nbytes

    def clear(self):
        with self._lock:
            self._idle.clear()
            self._bytes = 0


POOL = _Pool()


def clear_workspaces():
    """Drop every idle pooled array (frees memory; the next calls allocate afresh)."""
    POOL.clear()


class _Saved(dict):
    """What forward saved for backward; its pooled arrays go back to the pool when it dies."""

    __slots__ = ("__weakref__",)


def saved_record(pooled, **items):
    """The ``saved`` dict of a forward: ``items`` plus the ``pooled`` arrays, which go back to
    the pool when the record is garbage collected."""
    if all(a.nbytes < config.NUMBA_POOL_MIN_BYTES for a in pooled.values()):
        return dict(items, **pooled)  # nothing to recycle: a plain dict is cheaper
    saved = _Saved(items, **pooled)
    big = [a for a in pooled.values() if a.nbytes >= config.NUMBA_POOL_MIN_BYTES]
    if big:
        weakref.finalize(saved, POOL.give, big)
    return saved


# ------------------------------------------------------------------------------ batch chunks

class _OneBlasThread:
    """Context manager: SciPy's OpenBLAS (what np.dot inside @njit calls) runs single-threaded
    while any kernel of this backend runs, and gets its own setting back after. OpenBLAS's thread
    count is process-wide (its ``_local`` setter is global too), so nested/concurrent users share
    one counter. A no-op where the setter cannot be found.

    Why every run, not only batch-parallel ones: the process also holds NumPy's own OpenBLAS
    copy (dense layers, losses), and the two copies' idle 2-thread pools spin against each other
    on a 2-core machine (lab 12-4 training measured 0.17 s with either pool at one thread vs
    2.6-2.8 s with both at two, benchmarks/README.md); the per-step GEMMs here are too small for
    a second BLAS thread to pay anyway, and large runs take their threads from batch chunks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None
        self._get = self._set = None
        self.found = False

    def locate(self):
        """Find the library's thread setter once; False if none (then runs are not split)."""
        if self.found:
            return True
        controls = scipy_openblas()
        if controls is None:
            return False
        self._set, self._get = controls
        self.found = True
        return True

    def __enter__(self):
        if not self.locate():
            return
        with self._lock:
            if self._depth == 0:
                self._saved = self._get()
                if self._saved != 1:   # (the examples hold it at 1 already: no call each step)
                    self._set(1)
            self._depth += 1

    def __exit__(self, *exc):
        if not self.found:
            return
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved != 1:
                self._set(self._saved)


BLAS = _OneBlasThread()
_EXECUTOR = None       # ThreadPoolExecutor for chunks 2.., created on first use
_EXECUTOR_SIZE = 0
_EXECUTOR_LOCK = threading.Lock()


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_CPUS = _cpus()


def _reset_after_fork():
    """In a forked child the parent's pool threads do not exist and a lock may have been held
    mid-call: start afresh (else the first batch-parallel run would wait forever)."""
    global _EXECUTOR, _EXECUTOR_SIZE, _EXECUTOR_LOCK
    _EXECUTOR, _EXECUTOR_SIZE, _EXECUTOR_LOCK = None, 0, threading.Lock()
    POOL._lock = threading.RLock()
    BLAS._lock = threading.Lock()
    if BLAS._depth:  # forked during a batch-parallel run: undo its one-thread BLAS setting
        BLAS._set(BLAS._saved)
        BLAS._depth = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _threads():
    return _CPUS if config.NUMBA_THREADS is None else max(1, int(config.NUMBA_THREADS))


def one_blas_thread(spec, B, T, I, H):
    """``BLAS`` (hold SciPy's OpenBLAS to one thread) for a run whose GEMMs are big enough for
    OpenBLAS to wake its pool; a no-op context below that (the switch costs a few us)."""
    if 2 * B * T * spec.gates * H * (I + H) < config.NUMBA_BLAS_ONE_THREAD_MIN_FLOPS:
        return contextlib.nullcontext()
    return BLAS


def plan_chunks(spec, B, T, I, H):
    """Contiguous batch ranges [(lo, hi), ...]: one range unless splitting pays (config)."""
    if 2 * B * T * spec.gates * H * (I + H) < config.NUMBA_SPLIT_MIN_FLOPS:
        return [(0, B)]
    n = min(_threads(), B // max(1, config.NUMBA_SPLIT_MIN_ROWS))
    if n < 2 or not BLAS.locate():
        return [(0, B)]
    bounds = [B * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_chunks(chunks, call):
    """call(lo, hi) for every chunk: the first on this thread, the others on pool threads."""
    global _EXECUTOR, _EXECUTOR_SIZE
    if len(chunks) == 1:
        call(*chunks[0])
        return
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR_SIZE < len(chunks) - 1:
            _EXECUTOR_SIZE = len(chunks) - 1
            _EXECUTOR = ThreadPoolExecutor(_EXECUTOR_SIZE, thread_name_prefix="rnnkern")
        executor = _EXECUTOR
    with BLAS:
        futures = [executor.submit(call, lo, hi) for lo, hi in chunks[1:]]
        try:
            call(*chunks[0])
        finally:
            wait(futures)
    for f in futures:
        f.result()  # re-raises a worker's error


def launch(kernel, chunks, args, batched):
    """kernel(*args) over every chunk; ``batched`` marks the batch-major args to slice."""
    if len(chunks) == 1:
        kernel(*args)
        return

    def call(lo, hi):
        kernel(*[a[lo:hi] if cut else a for a, cut in zip(args, batched)])
    run_chunks(chunks, call)
