"""CUDA backend: CuPy arrays, cuBLAS GEMMs and the kernels of ``csrc/cuda/*.cu``.

The seam is the one in :mod:`rnnkern.backends` (one layer, one direction, whole sequence).
Shape legend: B batch, T time steps, I input, H hidden, G gates (RNN 1, LSTM 4, GRU 3).

Three strategies run the time loop; all share the buffers of ``csrc/cuda/common.cuh`` (so
backward may use any, whichever forward ran) and all hoist what is not recurrent:
``x W_ih^T`` is one GEMM over all ``B*T`` rows before the loop and ``dx, dW_ih, dW_hh`` are
single GEMMs after the backward loop.

* ``stepwise`` (``csrc/cuda/stepwise.cu``): per step a cuBLAS ``h W_hh^T`` (``matmul`` on the
  current stream) and one fused pointwise kernel; backward one kernel and one GEMM per step
  (a GRU with ``reset_after=False`` needs two of each). 2T launches; wins when GEMMs are big.
* ``persistent`` (``csrc/cuda/persistent.cu``): one launch per layer and direction. Each block
  keeps its slice of ``W_hh`` in shared memory for the whole sequence and the blocks meet at a
  grid barrier once per step; see :func:`persistent_plan`. Wins when launches dominate.
  The barrier needs every block resident at once: the grid is at most one block per SM, the
  occupancy calculator is asked before the launch (if it says no, the call runs stepwise), and
  a barrier that waits too long sets an error flag, read after the launch (one small sync;
  ``config.check_barrier``), instead of hanging. CuPy's cooperative launch is not used: it
  silently shrinks a grid that does not fit, and these kernels assign hidden units by block.
* ``cluster`` (``csrc/cuda/cluster.cu``, compute capability 9.0+): the same time loop with one
  team per thread-block cluster of :data:`CLUSTER_SIZE` blocks. A team owns a slice of the
  batch, its blocks split the hidden units and meet at the hardware cluster barrier, and teams
  never wait for each other: no residency condition, no error flag, no host sync, and the
  batch spreads over up to ``n_sm / CLUSTER_SIZE`` teams.

Size rule (:func:`choose_strategy`), for ``H <= config.persistent_max_h`` (256): ``cluster``
where the device has clusters, its plan fits on chip and ``B*H <= config.cluster_max_bh``
(32768), else ``persistent`` where its plan fits and ``B*H <= config.persistent_max_bh`` (8192);
otherwise ``stepwise``. Measured on an H200 with ``benchmarks/gpu_check.sh`` (benchmarks/
README.md): cluster beat stepwise at every shape up to B*H = 32768 (256,50,65,128: 2.3 vs 7.0
ms fwd+bwd), and persistent lost to stepwise above 8192 (64,100,128,256: 14.7 vs 11.3 ms). Force a strategy with
:func:`set_strategy` or the environment variable ``RNNKERN_CUDA_STRATEGY`` (``stepwise`` |
``persistent`` | ``cluster`` | ``auto``).

Kernels compile lazily (first use per device and dtype) from the ``.cu`` sources shipped as
package data (``rnnkern/csrc`` in a wheel, ``<repo>/csrc`` in a checkout), with CuPy's
``RawModule`` (NVRTC). The local ``#include "..."`` files are inlined into the source text first,
so CuPy's on-disk kernel cache (keyed by source text) never serves a binary built from an older
header. Everything runs on CuPy's current stream.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

name = "cuda"

STRATEGIES = ("stepwise", "persistent", "cluster")
ENV_STRATEGY = "RNNKERN_CUDA_STRATEGY"
ENV_CSRC = "RNNKERN_CSRC"
MODULES = ("stepwise", "persistent", "cluster")
CLUSTER_SIZE = 8  # blocks per cluster of the "cluster" kernels (8: the portable maximum)
# the persistent strategies' kernels are rk_<kind>_<stem>_fwd / _bwd
_KERNEL_STEM = {"persistent": "persist", "cluster": "cluster"}


@dataclass
class Config:
    """Tunables (tests patch them small so multi-block paths run on tiny inputs)."""

    threads: int = 256              # threads per block, every kernel
    persistent_max_h: int = 256     # size rule: persistent or cluster only up to this H ...
    persistent_max_bh: int = 8192   # ... and persistent only up to this B*H ...
    cluster_max_bh: int = 32768     # ... cluster up to this one
    max_batch_chunk: int = 64       # persistent/cluster: batch rows staged in shared memory
                                    # at once
    dot_min_chunk: int = 8          # persistent/cluster: when a block has few dot products,
                                    # each is shared by up to 32 lanes while every lane keeps
                                    # at least this many terms (persistent.cuh)
    n_sm: int | None = None         # None: the device's SM count (tests: a small number)
    max_blocks: int | None = None   # persistent: cap on blocks (None: one per SM); fewer
                                    # blocks = cheaper barrier, more units per block
    max_teams: int | None = None    # cluster: cap on clusters (None: n_sm // CLUSTER_SIZE)
    smem_limit: int | None = None   # None: the device's opt-in shared memory per block
    check_barrier: bool = True      # persistent: read the barrier's error flag after a launch
    direct_gemm: bool = True        # stepwise: per-step GEMMs straight to cuBLAS (not
                                    # cupy.matmul, whose Python overhead dominates a step)


config = Config()
_strategy_override = None


def set_strategy(strategy):
    """Force ``"stepwise"``, ``"persistent"`` or ``"cluster"`` for later calls; None or
    ``"auto"``: the size rule."""
    global _strategy_override
    if strategy not in (None, "auto") + STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES + ('auto',)}, got {strategy!r}")
    _strategy_override = None if strategy == "auto" else strategy


def _forced_strategy():
    forced = _strategy_override or os.environ.get(ENV_STRATEGY) or None
    if forced in (None, "auto"):
        return None
    if forced not in STRATEGIES:
        raise ValueError(f"{ENV_STRATEGY} must be one of {STRATEGIES + ('auto',)}, got {forced!r}")
    return forced


# ----------------------------------------------------------------------------------------------
# sources


def source_root():
    """The ``csrc`` folder: ``$RNNKERN_CSRC``, then ``rnnkern/csrc`` (wheel), then ``<repo>/csrc``."""
    here = Path(__file__).resolve().parent.parent  # the rnnkern package
    candidates = [Path(os.environ[ENV_CSRC])] if os.environ.get(ENV_CSRC) else []
    candidates += [here / "csrc", here.parent / "csrc"]
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
# runtime: CuPy (the emulated CPU runtime of the tests offers the same methods)


def _versions():
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


class CupyRuntime:
    """Compiles and launches the kernels with CuPy on the current device and stream."""

    def __init__(self):
        import cupy
        self.xp = cupy
        self.cache = {}       # small device buffers reused between calls (see _cached)
        self._modules = {}
        self._kernels = {}
        self._props = {}
        self._occupancy = {}

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
                                   f"{key[0]} failed with {_versions()}: {exc}") from exc
        return self._kernels[key]

    def launch(self, kern, grid, block, args, smem=0, resident=False, cluster=False):
        """Launch on the current stream. ``resident``: every block must be on an SM at once
        (the persistent kernels' grid barrier); raises :class:`NotResident` when the occupancy
        calculator says they cannot be. ``cluster``: a cluster kernel; a launch the driver
        refuses (say, no GPC with room for a whole cluster of these blocks) raises
        :class:`NotResident` too."""
        if smem > 48 * 1024:
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

    def matmul(self, a, b, out):
        """``out[m,n] = a[m,k] @ b[k,n]`` on the current stream. The stepwise loops call this
        twice per step, so it goes straight to cuBLAS (:func:`gemm_args`; a few µs from
        Python, where ``cupy.matmul`` takes tens); ``config.direct_gemm=False``, or operands
        cuBLAS cannot take as they are, use ``cupy.matmul``."""
        spec = gemm_args(a, b, out) if config.direct_gemm else None
        if spec is None:
            self.xp.matmul(a, b, out=out)
            return
        if spec == "empty":
            out.fill(0)
            return
        from cupy_backends.cuda.libs import cublas
        op_b, op_a, m, n, k, ld_b, ld_a, ld_c = spec
        ops = {"N": cublas.CUBLAS_OP_N, "T": cublas.CUBLAS_OP_T}
        double = out.dtype == np.float64
        one, zero = self._scalars(out.dtype)
        handle = self.xp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.xp.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        (cublas.dgemm if double else cublas.sgemm)(
            handle, ops[op_b], ops[op_a], m, n, k, one.ctypes.data, b.data.ptr, ld_b,
            a.data.ptr, ld_a, zero.ctypes.data, out.data.ptr, ld_c)

    def _scalars(self, dtype):
        """Host 1 and 0 of ``dtype`` for cuBLAS's alpha and beta, kept alive here."""
        key = ("gemm_scalars", np.dtype(dtype).name)
        if key not in self.cache:
            self.cache[key] = (np.ones(1, dtype), np.zeros(1, dtype))
        return self.cache[key]


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


class NotResident(RuntimeError):
    """The persistent kernel's blocks cannot all be resident at once on this device."""


def _cached(rt, key, make):
    """A small device buffer kept in ``rt.cache`` under ``key`` (made by ``make`` once)."""
    if key not in rt.cache:
        rt.cache[key] = make()
    return rt.cache[key]


_runtime = None


_available = None


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
            return False, "CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and friends, no driver
            return False, (f"no usable CUDA device ({type(exc).__name__}: {exc}; "
                           f"{_versions()}){_warned(caught)}")
    if n == 0:
        return False, f"no CUDA device ({_versions()}){_warned(caught)}"
    try:
        source_root()
    except FileNotFoundError as exc:
        return False, str(exc)
    return True, f"{n} CUDA device(s), {_versions()}{_warned(caught)}"


def _warned(caught):
    return "".join(f"; CuPy warned: {w.message}" for w in caught)


def _get_runtime():
    global _runtime
    if _runtime is None:
        ok, reason = available()
        if not ok:
            raise RuntimeError(f"the cuda backend is unavailable: {reason}")
        _runtime = CupyRuntime()
    return _runtime


# ----------------------------------------------------------------------------------------------
# size rule


@dataclass(frozen=True)
class PersistentPlan:
    """Launch shape of the persistent kernels (either team kind) for one layer.

    team  "grid" (strategy persistent) or "cluster";  blocks  grid size (grid team: <= SMs, one
    resident block per SM; cluster: teams * CLUSTER_SIZE);  hb  hidden units per block;
    bc  batch rows per team (grid: B);  nbc_fwd, nbc_bwd  batch rows staged in shared memory at
    once by each kernel;  smem_fwd, smem_bwd  their dynamic shared memory, bytes per block
    """

    team: str
    blocks: int
    threads: int
    hb: int
    bc: int
    nbc_fwd: int
    nbc_bwd: int
    smem_fwd: int
    smem_bwd: int


def persistent_plan(spec, B, H, itemsize, n_sm, smem_limit, threads=None, max_batch_chunk=None,
                    team="grid"):
    """The :class:`PersistentPlan` for these sizes, or None when W_hh does not fit on chip.

    ``team="grid"``: units are spread over as many blocks as there are SMs (``hb = ceil(H /
    n_sm)``, or fewer blocks with ``config.max_blocks``), every block sees the whole batch.
    ``team="cluster"``: units over the CLUSTER_SIZE blocks of a cluster, the batch over
    ``min(B, n_sm // CLUSTER_SIZE)`` clusters, or half as many when a block needs more than half
    of ``smem_limit`` (see below; ``config.max_teams`` overrides). Each kernel's batch chunk
    halves until its shared memory (persistent.cuh's layouts) fits ``smem_limit``.
    """
    if team not in ("grid", "cluster"):
        raise ValueError(f"team must be 'grid' or 'cluster', got {team!r}")
    threads = threads or config.threads
    G = spec.gates
    ldw, ldc = H | 1, (G * H) | 1  # persistent.cuh's odd row strides (ldh = ldw, ldg = ldc)

    def plan(hb, bc, blocks):
        layouts = (lambda nbc: (G * hb * ldw + nbc * ldw + nbc * G * hb) * itemsize,  # fwd
                   lambda nbc: (hb * ldc + nbc * ldc + nbc * hb) * itemsize)          # bwd
        chunks = []  # (fwd, bwd)
        for size in layouts:
            nbc = max(1, min(bc, max_batch_chunk or config.max_batch_chunk))
            while size(nbc) > smem_limit and nbc > 1:
                nbc = (nbc + 1) // 2
            if size(nbc) > smem_limit:
                return None
            chunks.append(nbc)
        return PersistentPlan(team, blocks, threads, hb, bc, chunks[0], chunks[1],
                              layouts[0](chunks[0]), layouts[1](chunks[1]))

    if team == "grid":
        hb = math.ceil(H / max(1, min(n_sm, config.max_blocks or n_sm, H)))
        return plan(hb, B, math.ceil(H / hb))
    hb = math.ceil(H / CLUSTER_SIZE)
    most = max(1, min(B, n_sm // CLUSTER_SIZE, config.max_teams or B))
    best = None
    # Blocks that need over half an SM's shared memory run one per SM, and then not all
    # n_sm / CLUSTER_SIZE clusters find their SMs free together: half as many teams, each with
    # twice the rows, ran faster (H200, LSTM B,T,I,H = 32,100,128,256: fwd+bwd 2.58 ms with 8
    # teams, 4.09 ms with 16).
    for teams in (most,) if config.max_teams else (most, max(1, most // 2)):
        bc = max(1, math.ceil(B / teams))
        best = plan(hb, bc, math.ceil(B / bc) * CLUSTER_SIZE if B else CLUSTER_SIZE)
        if best is None or max(best.smem_fwd, best.smem_bwd) <= smem_limit // 2:
            break
    return best


def choose_strategy(spec, B, H, itemsize, n_sm, smem_limit, clusters=False):
    """``(strategy, plan)`` by the size rule or the override; plan is None for ``stepwise``.
    ``clusters``: the device has thread-block clusters (compute capability 9.0+)."""
    forced = _forced_strategy()
    if forced == "stepwise":
        return "stepwise", None
    if forced == "cluster" and not clusters:
        raise ValueError("the cluster strategy needs thread-block clusters (compute capability "
                         "9.0 or later); use persistent or stepwise")
    candidates = [forced] if forced else (["cluster"] if clusters else []) + ["persistent"]
    max_bh = {"cluster": config.cluster_max_bh, "persistent": config.persistent_max_bh}
    for strategy in candidates:
        team = "cluster" if strategy == "cluster" else "grid"
        plan = persistent_plan(spec, B, H, itemsize, n_sm, smem_limit, team=team)
        if forced:
            if plan is None:
                raise ValueError(f"the {strategy} strategy cannot hold W_hh of H={H} on chip "
                                 f"({n_sm} SMs x {smem_limit} bytes); use stepwise")
            return strategy, plan
        if plan is not None and H <= config.persistent_max_h and B * H <= max_bh[strategy]:
            return strategy, plan
    return "stepwise", None


# ----------------------------------------------------------------------------------------------
# the seam

_SAVED_PER_UNIT = {"rnn": 1, "lstm": 5, "gru": 4}


def _device_limits(rt):
    n_sm, smem = rt.props()
    return config.n_sm or n_sm, config.smem_limit or smem


def _grid(n):
    return max(1, math.ceil(n / config.threads))


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """See :mod:`rnnkern.backends`; arrays may be CuPy or NumPy (copied to the device)."""
    rt = _get_runtime()
    xp = rt.xp
    dtype = np.dtype(x.dtype)
    x, w_ih, w_hh, b_ih, b_hh, h0 = (xp.ascontiguousarray(xp.asarray(a, dtype=dtype))
                                     for a in (x, w_ih, w_hh, b_ih, b_hh, h0))
    B, T, I = x.shape
    H = w_hh.shape[1]
    G = spec.gates
    lstm, two_phase = spec.kind == "lstm", spec.kind == "gru" and not spec.reset_after
    flag = int(spec.nonlinearity == "relu") if spec.kind == "rnn" else int(spec.reset_after)
    if lengths is None:  # read-only, so one per device and shape serves every call
        lengths_d = _cached(rt, ("lengths", rt.stream_key()[0], B, T),
                            lambda: xp.full((B,), T, dtype=np.int64))
    else:
        lengths_d = xp.ascontiguousarray(xp.asarray(lengths, dtype=np.int64))
    gx = (x.reshape(B * T, I) @ w_ih.T).reshape(B, T, G * H)  # hoisted GEMM; b_ih: kernels
    h_all = xp.empty((T + 1, B, H), dtype=dtype)
    h_all[0] = h0
    c_all = xp.empty((T + 1, B, H) if lstm else (1,), dtype=dtype)
    if lstm:
        c_all[0] = xp.asarray(c0, dtype=dtype)
    outputs = xp.empty((B, T, H), dtype=dtype)
    acts = xp.empty((T, B, _SAVED_PER_UNIT[spec.kind] * H), dtype=dtype)
    rh = xp.empty((T, B, H) if two_phase else (1,), dtype=dtype)
    n_sm, smem_limit = _device_limits(rt)
    strategy, plan = choose_strategy(spec, B, H, dtype.itemsize, n_sm, smem_limit,
                                     rt.supports_clusters())
    real = dtype.type
    i32 = np.int32
    if B and T and strategy in _KERNEL_STEM:
        kern = rt.kernel(strategy, f"rk_{spec.kind}_{_KERNEL_STEM[strategy]}_fwd", dtype)
        bar = _barrier(rt)
        args = (i32(B), i32(T), i32(H), i32(plan.hb), i32(plan.bc), i32(plan.nbc_fwd),
                i32(config.dot_min_chunk), i32(flag), real(spec.forget_bias), gx, w_hh, b_ih,
                b_hh, lengths_d, h_all, c_all, outputs, acts, rh, bar)
        if not _launch_persistent(rt, kern, plan, args, plan.smem_fwd, bar, "forward"):
            strategy, plan = "stepwise", None
    if B and T and strategy == "stepwise":
        _stepwise_forward(rt, spec, flag, real, gx, w_hh, b_ih, b_hh, lengths_d, h_all, c_all,
                          outputs, acts, rh)
    saved = dict(strategy=strategy, plan=plan, x=x, w_ih=w_ih, w_hh=w_hh, lengths=lengths_d,
                 h_all=h_all, c_all=c_all, acts=acts, rh=rh, flag=flag)
    # h_all[T] and c_all[T] are fresh per call and backward never reads them: safe to hand out
    return outputs, h_all[T], (c_all[T] if lstm else None), saved


def _barrier(rt):
    """The persistent kernels' barrier words for the current stream: [count, generation, error,
    spare]. The count is back to 0 after every complete barrier, so launches queued in order on
    one stream can share one buffer (it is zeroed again after an error)."""
    return _cached(rt, ("barrier",) + tuple(rt.stream_key()),
                   lambda: rt.xp.zeros(4, dtype=np.uint32))


def _launch_persistent(rt, kern, plan, args, smem, bar, where):
    """Launch a persistent kernel of either team kind; False (nothing launched) when it cannot
    run here and its strategy was not forced, so the caller runs the stepwise path instead. A
    grid team must be resident at once, and its barrier's error flag is checked after the
    launch; a cluster team needs neither (the hardware schedules a cluster's blocks together),
    but the driver may refuse the launch."""
    cluster = plan.team == "cluster"
    try:
        rt.launch(kern, plan.blocks, plan.threads, args, smem, resident=not cluster,
                  cluster=cluster)
    except NotResident:
        if _forced_strategy() == ("cluster" if cluster else "persistent"):
            raise
        return False
    if not cluster:
        _check_barrier(rt, bar, where)
    return True


def _check_barrier(rt, bar, where):
    if config.check_barrier and int(bar[2]) != 0:
        bar.fill(0)
        raise RuntimeError(f"persistent {where} kernel: blocks were not all resident at once "
                           f"(grid barrier timed out; {_versions()}); use "
                           f"{ENV_STRATEGY}=stepwise")


def _stepwise_forward(rt, spec, flag, real, gx, w_hh, b_ih, b_hh, lengths, h_all, c_all,
                      outputs, acts, rh):
    xp = rt.xp
    T, B, H = h_all.shape[0] - 1, h_all.shape[1], h_all.shape[2]
    G = spec.gates
    i32 = np.int32
    grid, threads = _grid(B * H), config.threads

    def args(t, gh):
        return (i32(B), i32(T), i32(H), i32(t), i32(flag), real(spec.forget_bias), gx, gh,
                i32(gh.shape[1]), b_ih, b_hh, lengths, h_all, c_all, outputs, acts, rh)

    if spec.kind == "gru" and not spec.reset_after:
        gates = rt.kernel("stepwise", "rk_gru_fwd_gates_step", gx.dtype)
        cand = rt.kernel("stepwise", "rk_gru_fwd_cand_step", gx.dtype)
        w_rz_t, w_n_t = w_hh[: 2 * H].T, w_hh[2 * H:].T
        gh_rz = xp.empty((B, 2 * H), dtype=gx.dtype)
        gh_n = xp.empty((B, H), dtype=gx.dtype)
        for t in range(T):
            rt.matmul(h_all[t], w_rz_t, gh_rz)
            rt.launch(gates, grid, threads, args(t, gh_rz))
            rt.matmul(rh[t], w_n_t, gh_n)
            rt.launch(cand, grid, threads, args(t, gh_n))
        return
    step = rt.kernel("stepwise", f"rk_{spec.kind}_fwd_step", gx.dtype)
    gh = xp.empty((B, G * H), dtype=gx.dtype)
    w_t = w_hh.T
    for t in range(T):
        rt.matmul(h_all[t], w_t, gh)
        rt.launch(step, grid, threads, args(t, gh))


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :mod:`rnnkern.backends`."""
    rt = _get_runtime()
    xp = rt.xp
    x, w_ih, w_hh = saved["x"], saved["w_ih"], saved["w_hh"]
    h_all, c_all, acts, rh = saved["h_all"], saved["c_all"], saved["acts"], saved["rh"]
    dtype = np.dtype(x.dtype)
    B, T, I = x.shape
    H = w_hh.shape[1]
    G = spec.gates
    GH = G * H
    lstm, two_phase = spec.kind == "lstm", spec.kind == "gru" and not spec.reset_after

    def state(d):  # a fresh [B,H] buffer the kernels may update in place
        return xp.zeros((B, H), dtype=dtype) if d is None else xp.array(d, dtype=dtype)

    dh = state(d_h_n)
    dc = state(d_c_n) if lstm else xp.zeros((1,), dtype=dtype)
    has_dout = d_outputs is not None
    d_out = (xp.ascontiguousarray(xp.asarray(d_outputs, dtype=dtype)) if has_dout
             else xp.zeros((1,), dtype=dtype))
    d_gx = xp.empty((B, T, GH), dtype=dtype)
    d_gh = xp.empty((T, B, GH), dtype=dtype)
    i32 = np.int32
    flag, lengths = saved["flag"], saved["lengths"]
    strategy = saved["strategy"]
    if B and T and strategy in _KERNEL_STEM:
        plan = saved["plan"]
        kern = rt.kernel(strategy, f"rk_{spec.kind}_{_KERNEL_STEM[strategy]}_bwd", dtype)
        bar = _barrier(rt)
        args = (i32(B), i32(T), i32(H), i32(plan.hb), i32(plan.bc), i32(plan.nbc_bwd),
                i32(config.dot_min_chunk), i32(flag), w_hh, lengths, acts, h_all, c_all, d_out,
                i32(has_dout), dh, dc, d_gx, d_gh, bar)
        if not _launch_persistent(rt, kern, plan, args, plan.smem_bwd, bar, "backward"):
            strategy = "stepwise"
    if B and T and strategy == "stepwise":
        dh_gemm = xp.zeros((B, H), dtype=dtype)
        grid, threads = _grid(B * H), config.threads

        def args(t, gemm):
            return (i32(B), i32(T), i32(H), i32(t), i32(flag), lengths, acts, h_all, c_all,
                    d_out, i32(has_dout), gemm, dh, dc, d_gx, d_gh)

        step = rt.kernel("stepwise", f"rk_{spec.kind}_bwd_step", dtype)
        if two_phase:
            reset = rt.kernel("stepwise", "rk_gru_bwd_reset_step", dtype)
            d_rh = xp.empty((B, H), dtype=dtype)
            w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H:]
            for t in reversed(range(T)):
                rt.launch(step, grid, threads, args(t, dh_gemm))
                rt.matmul(d_gh[t][:, 2 * H:], w_n, d_rh)
                rt.launch(reset, grid, threads, args(t, d_rh))
                rt.matmul(d_gh[t][:, : 2 * H], w_rz, dh_gemm)
        else:
            for t in reversed(range(T)):
                rt.launch(step, grid, threads, args(t, dh_gemm))
                rt.matmul(d_gh[t], w_hh, dh_gemm)
        dh += dh_gemm
    # the non-recurrent gradients, one GEMM each over all B*T rows
    d_gx2 = d_gx.reshape(B * T, GH)
    d_gh2 = d_gh.reshape(T * B, GH)
    h_prev = h_all[:T].reshape(T * B, H)
    dx = (d_gx2 @ w_ih).reshape(B, T, I)
    if two_phase:
        dw_hh = xp.concatenate([d_gh2[:, : 2 * H].T @ h_prev,
                                d_gh2[:, 2 * H:].T @ rh.reshape(T * B, H)], axis=0)
    else:
        dw_hh = d_gh2.T @ h_prev
    grads = dict(w_ih=d_gx2.T @ x.reshape(B * T, I), w_hh=dw_hh,
                 b_ih=d_gx2.sum(axis=0), b_hh=d_gh2.sum(axis=0))
    return dx, dh, (dc if lstm else None), grads
