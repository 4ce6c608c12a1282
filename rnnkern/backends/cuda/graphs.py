"""CUDA graphs for the stepwise strategy: its time loop (per step a cuBLAS GEMM and a fused
pointwise kernel, launched from Python: tens of microseconds of argument building, stream and
pointer-mode calls per step) is captured once and then replayed with one graph launch.

A graph bakes in every pointer it was captured with, so a captured loop runs on buffers it
owns: an :class:`Instance` holds one layer call's :class:`~.seam.LoopBuffers` (what the loop
reads is copied in before a replay, what it leaves is copied out after) and the graphs captured
over them. The :class:`GraphPool` of a runtime keeps the instances:

- a shape (stream, cell, dtype, B, T, H, and the tunables the loop reads) is captured from its
  ``config.CUDA_GRAPH_MIN_CALLS``-th
  stepwise call on; earlier calls, and every call when ``config.CUDA_GRAPHS`` is off, run the
  same loop eagerly on fresh buffers;
- an instance is busy from its forward until that forward's saved record is garbage (a backward
  may run more than once from one record, as under ``retain_graph``), then idle, and the next
  call of its shape replays its graphs;
- the idle instances of the ``config.CUDA_GRAPH_POOL`` shapes released last are kept (all of a
  shape's: a deep stack has many layer-directions of one shape), older shapes' are dropped
  (:func:`clear` frees them all);
- if a capture fails (a toolkit that refuses one), the pool warns once and from then on every
  call runs eagerly.

A captured body may only call the runtime's ``launch``, ``matmul``, ``on_side_stream`` and
``join_side``: anything else (an array operation, an allocation, a host read) would run once at
capture time instead of at each replay.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections import Counter, OrderedDict

from ... import config

_MAX_SHAPES_COUNTED = 4096  # call counts kept per pool before they start over


class Instance:
    """One shape's owned buffers, the graphs captured over them (by name), and ``done``: an
    event the caller records on its stream once it has finished with the buffers (the next
    user of the instance, on whatever stream, waits for it)."""

    def __init__(self, key, buffers, done):
        self.key = key
        self.buffers = buffers
        self.graphs = {}
        self.done = done

    def run(self, rt, pool, name, body):
        """Run ``body`` (the loop over :attr:`buffers`) through graph ``name``: captured on the
        first run, replayed after; eagerly when capture fails or the pool has given up on it."""
        graph = self.graphs.get(name)
        if graph is None and pool.broken is None:
            try:
                graph = rt.capture(body)
            except Exception as exc:  # noqa: BLE001 - any refusal: run eagerly from now on
                pool.give_up(exc)
            else:
                self.graphs[name] = graph
                pool.captures += 1
        if graph is None:
            body()
        else:
            rt.replay(graph)


class GraphPool:
    """The instances of one runtime (see the module docstring). Thread-safe: a lock guards
    the counts and the idle lists (a record's finalizer may run on any thread)."""

    def __init__(self):
        self.calls = Counter()      # stepwise calls seen per shape key
        self.idle = OrderedDict()   # key -> [idle instances], least recently used key first
        self.captures = 0           # graphs captured so far (tests and benchmarks read it)
        self.broken = None          # why capture was given up, or None
        self._lock = threading.Lock()

    def acquire(self, rt, key, make_buffers):
        """An idle instance of ``key`` (the current stream made to wait for its last use), a
        new one, or None: run eagerly on fresh buffers."""
        # a graph needs the GEMMs straight to cuBLAS: cupy.matmul sets the stream (and may
        # allocate) inside a capture
        if not (config.CUDA_GRAPHS and config.CUDA_DIRECT_GEMM) or self.broken is not None:
            return None
        with self._lock:
            if len(self.calls) > _MAX_SHAPES_COUNTED:
                self.calls.clear()
            self.calls[key] += 1
            if self.calls[key] < max(1, int(config.CUDA_GRAPH_MIN_CALLS)):
                return None
            idle = self.idle.get(key)
            inst = idle.pop() if idle else None
            if idle is not None and not idle:
                del self.idle[key]
        if inst is None:
            return Instance(key, make_buffers(), rt.new_event())
        rt.wait(inst.done)
        return inst

    def hold(self, inst, record):
        """Keep ``inst`` busy until ``record`` (the forward's saved dict) is garbage."""
        weakref.finalize(record, self.release, inst)

    def release(self, inst):
        """``inst`` is idle: kept with its shape's others, while its shape is one of the
        ``config.CUDA_GRAPH_POOL`` most recently released."""
        with self._lock:
            self.idle.setdefault(inst.key, []).append(inst)
            self.idle.move_to_end(inst.key)
            while len(self.idle) > max(0, int(config.CUDA_GRAPH_POOL)):
                self.idle.popitem(last=False)

    def clear(self):
        """Drop every idle instance (their buffers and graphs) and the call counts."""
        with self._lock:
            self.idle.clear()
            self.calls.clear()

    def give_up(self, exc):
        self.broken = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"rnnkern's cuda backend could not capture its stepwise time loop as a "
                      f"CUDA graph ({self.broken}); it runs the loop from Python from now on",
                      RuntimeWarning, stacklevel=4)


def pool(rt):
    """The runtime's :class:`GraphPool` (made on first use)."""
    if "graph_pool" not in rt.cache:
        rt.cache["graph_pool"] = GraphPool()
    return rt.cache["graph_pool"]


def clear():
    """Free every idle captured instance of this process's runtime (their buffers hold a layer
    call's activations each), say after training; later calls capture again as needed."""
    from . import runtime
    if runtime._runtime is not None:
        pool(runtime._runtime).clear()
