"""Every tunable of rnnkern, in one place, named ``<BACKEND>_<WHAT>``; tests patch them small so
multi-chunk and multi-block code runs on tiny inputs.

Read at call time (never inside a compiled, cached Numba kernel: Numba would freeze the value
into its cache). The ``CPP_*`` names are the C++ extension's own settings: reading one asks
``rnnkern._C``, assigning one sets it there (None when the extension is not built).

    >>> import rnnkern.config as config
    >>> config.NUMBA_THREADS = 1          # the Numba backend's batch chunks on one thread
    >>> config.CPP_THREADS = 1            # the C++ backend's
"""
import os
import sys
import types

# ---------------------------------------------------------------------- the layer API
# The layers reject input and initial states holding NaN or infinity with a ValueError naming the
# argument. For CuPy arrays that scan is a device-to-host read: the host waits for the GPU to
# finish everything queued, on every call, so the next call cannot be queued while the GPU works
# (on an H200, dropping the scan took the layer's LSTM (1,6,5,5,1) fwd+bwd from 1.21 to 0.34 ms;
# benchmarks/README.md). Device arrays (inputs, states, lengths) are therefore scanned only when
# this is True; otherwise NaN propagates to the outputs, as in PyTorch, and the kernels treat
# lengths outside [0, T] as their nearest end. NumPy input is always scanned.
CHECK_FINITE_ON_DEVICE = False

# Inference (``layer.infer``, ``Sequential.infer`` off the compiled stack) keeps nothing for a
# backward and runs each direction's time loop in runs of K steps, the state carried between
# them, K chosen so that a run's activations (about (G+3)*H numbers a row and step) stay under
# this many bytes: memory for activations is bounded whatever T is, instead of O(B*T*G*H).
# Not smaller: a run's input GEMM over B*K rows and its call cost lose speed when K is small
# (a 2x128 LSTM at B=50, T=500 measured ~15% slower in runs of 64 steps).
INFER_CHUNK_BYTES = 1 << 25

# ---------------------------------------------------------------------- Numba backend
# Workspace pool (rnnkern.backends.numba_runtime): arrays of at least this many bytes (saved
# activations, backward scratch) are recycled instead of freshly allocated, since a fresh large
# array page-faults on first touch (measured at B=50, T=50, H=128: 5 ms of a 13 ms LSTM
# forward). Smaller ones come cheaply from malloc. The pool keeps at most NUMBA_POOL_MAX_BYTES
# idle bytes; beyond it, returned arrays are dropped.
NUMBA_POOL_MIN_BYTES = 1 << 18
NUMBA_POOL_MAX_BYTES = 1 << 30

# Batch-parallel runs: the batch is cut into contiguous chunks that run the whole recurrence
# independently on NUMBA_THREADS threads (no synchronisation per time step), with the BLAS
# pinned to one thread meanwhile. None: the CPUs this process may use. A run is cut only when
# each chunk keeps at least NUMBA_SPLIT_MIN_ROWS batch rows and the layer's GEMM work,
# 2*B*T*G*H*(I+H) flops, reaches NUMBA_SPLIT_MIN_FLOPS (below it, handing work to a thread
# costs more than it saves).
NUMBA_THREADS = None
NUMBA_SPLIT_MIN_ROWS = 8
NUMBA_SPLIT_MIN_FLOPS = 4_000_000

# The kernels hold SciPy's OpenBLAS (what np.dot inside @njit calls) to one thread while they
# run, from this much GEMM work (2*B*T*G*H*(I+H) flops) up: NumPy's own OpenBLAS copy and
# SciPy's would otherwise spin their idle pools against each other on 2 cores (lab 12-4
# training 15x slower). Below it OpenBLAS stays single-threaded by itself and the switch would
# only cost.
NUMBA_BLAS_ONE_THREAD_MIN_FLOPS = 1_000_000

# ---------------------------------------------------------------------- CUDA backend
# The time-loop strategy: "auto" (the size rule of rnnkern.backends.cuda.plan), "stepwise",
# "persistent" or "cluster". The environment variable RNNKERN_CUDA_STRATEGY sets the default.
CUDA_STRATEGY = os.environ.get("RNNKERN_CUDA_STRATEGY") or "auto"
CUDA_THREADS = 256              # threads per block, every kernel
CUDA_PERSISTENT_MAX_H = 256     # size rule: persistent or cluster only up to this H ...
CUDA_PERSISTENT_MAX_BH = 8192   # ... and persistent only up to this B*H ...
CUDA_CLUSTER_MAX_BH = 32768     # ... cluster up to this one
CUDA_MAX_BATCH_CHUNK = 64       # persistent/cluster: batch rows staged in shared memory at once
CUDA_DOT_MIN_CHUNK = 8          # persistent/cluster: when a block has few dot products, each is
                                # shared by up to 32 lanes while every lane keeps at least this
                                # many terms (csrc/cuda/persistent.cuh)
CUDA_TILE_MIN_DOTS = 1024      # persistent/cluster: a block with at least this many dot products
                                # in a step forms them in 4 x 4 tiles per thread (unmeasured on a
                                # GPU; 2**31 - 1 turns the tiles off)
CUDA_N_SM = None                # None: the device's SM count (tests: a small number)
CUDA_MAX_BLOCKS = None          # persistent: cap on blocks (None: one per SM); fewer blocks =
                                # cheaper barrier, more units per block
CUDA_MAX_TEAMS = None           # cluster: cap on clusters (None: n_sm // cluster size)
CUDA_SMEM_LIMIT = None          # None: the device's opt-in shared memory per block
CUDA_CHECK_BARRIER = True       # persistent: read the barrier's error flag after a launch
CUDA_DIRECT_GEMM = True         # stepwise: per-step GEMMs straight to cuBLAS (not cupy.matmul,
                                # whose Python overhead dominates a step)
CUDA_GRAPHS = os.environ.get("RNNKERN_CUDA_GRAPHS", "1") != "0"  # stepwise: capture the time
                                # loop as a CUDA graph and replay it (rnnkern/backends/cuda/
                                # graphs.py); needs CUDA_DIRECT_GEMM
CUDA_GRAPH_MIN_CALLS = 2        # ... from a shape's 2nd call on (a shape met once runs eagerly)
CUDA_GRAPH_POOL = 4             # ... idle captured instances kept for this many shapes (each
                                # instance holds one layer call's buffers)
CUDA_WGRAD_CHUNKS = 4           # stepwise backward: dW_hh summed over this many step ranges on a
                                # side stream, each as soon as the loop has left it
CUDA_ELEMENTWISE_BLOCKS_PER_SM = 32  # element-wise kernels (fused optimizer updates, dropout
                                # masks; grid-stride loops): at most this many blocks per SM

# ---------------------------------------------------------------------- C++ backend
# name: (the _C getter, the _C setter, what it means). csrc/cpu/chunks.h and the files it
# names say how each is used.
_CPP = {
    "CPP_THREADS": ("threads", "set_threads",
                    "threads for the time loops (batch chunks); 0 = the CPUs this process may "
                    "use, at most 8"),
    "CPP_SPLIT_MIN_WORK": ("split_min_work", "set_split_min_work",
                           "recurrent multiply-adds B*T*G*H*H below which a time loop stays on "
                           "one thread"),
    "CPP_LSTM_RING_ROWS": ("lstm_ring_rows", "set_lstm_ring_rows",
                           "LSTM backward: gate-gradient rows gathered per dx and weight-gradient "
                           "GEMM"),
    "CPP_HUGE_PAGE_MIN": ("huge_page_min", "set_huge_page_min",
                          "work buffers of at least this many bytes go on transparent huge pages "
                          "(Linux)"),
    "CPP_POOL_LIMIT": ("pool_limit", "set_pool_limit",
                       "bytes of freed result arrays kept for reuse by later calls"),
    "CPP_BLAS_MIN_FLOPS": ("blas_min_flops", "set_blas_min_flops",
                           "GEMMs with M*N*K below this use the built-in loop instead of BLAS"),
}


def _extension():
    from .backends import cpp
    return cpp._C


def _cpp_property(name):
    getter, setter, doc = _CPP[name]

    def get(module):
        ext = _extension()
        return None if ext is None else getattr(ext, getter)()

    def set_(module, value):
        ext = _extension()
        if ext is None:
            from .backends import cpp
            raise RuntimeError(f"cannot set {name}: {cpp.available()[1]}")
        getattr(ext, setter)(value)

    return property(get, set_, doc=doc)


class _ConfigModule(types.ModuleType):
    """This module, with the ``CPP_*`` names as properties forwarded to the extension
    (properties, so that ``monkeypatch.setattr`` restores them by assignment)."""

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_CPP))


for _name in _CPP:
    setattr(_ConfigModule, _name, _cpp_property(_name))

sys.modules[__name__].__class__ = _ConfigModule
