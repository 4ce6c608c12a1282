"""Tunables of the layers and the CPU backends, in one place. Read at call time, so tests may
patch them.

Never read inside a compiled (cached) kernel: Numba would freeze the value into its cache.
"""

# Workspace pool of the Numba backend (rnnkern.backends.numba_cpu): arrays of at least this many
# bytes (saved activations, backward scratch) are recycled instead of freshly allocated, since a
# fresh large array page-faults on first touch (measured at B=50, T=50, H=128: 5 ms of a 13 ms
# LSTM forward). Smaller ones come cheaply from malloc.
POOL_MIN_BYTES = 1 << 18

# The pool keeps at most this many idle bytes; beyond it, returned arrays are simply dropped.
POOL_MAX_BYTES = 1 << 30

# Batch-parallel runs of the Numba backend: the batch is cut into contiguous chunks that run the
# whole recurrence independently on THREADS threads (no synchronisation per time step), with the
# BLAS pinned to one thread meanwhile. None: the CPUs this process may use.
THREADS = None

# Cut only when each chunk keeps at least SPLIT_MIN_ROWS batch rows and the layer's GEMM work,
# 2*B*T*G*H*(I+H) flops, reaches SPLIT_MIN_FLOPS (below it, handing work to a thread costs more
# than it saves).
SPLIT_MIN_ROWS = 8
SPLIT_MIN_FLOPS = 4_000_000

# The Numba kernels hold SciPy's OpenBLAS (what np.dot inside @njit calls) to one thread while they
# run, from this much GEMM work (2*B*T*G*H*(I+H) flops) up: NumPy's own OpenBLAS copy and
# SciPy's would otherwise spin their idle pools against each other on 2 cores (lab 12-4 training
# 15x slower). Below it OpenBLAS stays single-threaded by itself and the switch would only cost.
BLAS_ONE_THREAD_MIN_FLOPS = 1_000_000

# rnnkern.TrainStep runs recurrent layers left on backend="auto" through the Numba kernels (low
# per-step overhead: their argument lists are kept between steps) when one step's recurrent
# GEMM work, the sum of 2*B*T*G*H*(I+H) over the stacked cells, is below this; above it, or
# when the C++ whole-stack call takes the model (all LSTMs fed by ids), through the backend
# "auto" picks for the cell. Measured (28 Nov 2026, quiet): lab 12-1 (2.4 kflop) Numba 64 us vs
# C++ per layer 73 us a step; lab 12-4 (34 Mflop) C++ 2.8 vs Numba 3.6 ms. 29 Nov, lab 12-1 in
# one process: C++ whole stack 12.8 us vs Numba 45.9 us a step (median).
TRAIN_STEP_NUMBA_MAX_FLOPS = 1_000_000

# The layers reject input and initial states holding NaN or infinity with a ValueError naming the
# argument. For CuPy arrays that scan is a device-to-host read: the host waits for the GPU to
# finish everything queued, on every call, so the next call cannot be queued while the GPU works
# (on an H200, dropping the scan took the layer's LSTM (1,6,5,5,1) fwd+bwd from 1.21 to 0.34 ms;
# benchmarks/README.md, GPU runs 2 and 3). Device arrays are therefore scanned only when this is
# True; otherwise NaN propagates to the outputs, as in PyTorch. NumPy input is always scanned.
CHECK_FINITE_ON_DEVICE = False
