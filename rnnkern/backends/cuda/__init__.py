"""CUDA backend: CuPy arrays, cuBLAS GEMMs and the kernels of ``csrc/cuda/*.cu``.

The backend module of :mod:`rnnkern.backends` (``name``, ``available``, ``forward``,
``backward``; one layer, one direction, whole sequence). Importing it does not import CuPy:
that happens at the first probe or call. Shape legend: B batch, T time steps, I input,
H hidden, G gates (RNN 1, LSTM 4, GRU 3).

Three strategies run the time loop; all share the buffers of ``csrc/cuda/common.cuh`` and hoist
what is not recurrent (:mod:`.seam`):

* ``stepwise`` (``csrc/cuda/stepwise.cu``): per step a cuBLAS ``h W_hh^T`` (on the current
  stream) and one fused pointwise kernel; backward one kernel and one GEMM per step (a GRU with
  ``reset_after=False`` needs two of each), ``dW_hh`` summed range by range on a side stream.
  2T launches, captured once per shape as a CUDA graph and replayed (:mod:`.graphs`); wins
  when GEMMs are big.
* ``persistent`` (``csrc/cuda/persistent.cu``): one launch per layer and direction. Each block
  keeps its slice of ``W_hh`` in shared memory for the whole sequence (a block with many dot
  products forms them in 4 x 4 tiles per thread) and the blocks meet at a grid barrier once per
  step (plan: :func:`.plan.persistent_plan`; residency and the barrier's
  error flag: :mod:`.seam`). Wins when launches dominate.
* ``cluster`` (``csrc/cuda/cluster.cu``, compute capability 9.0+): the same time loop with one
  team per thread-block cluster of :data:`.runtime.CLUSTER_SIZE` blocks. A team owns a slice of
  the batch, its blocks split the hidden units and meet at the hardware cluster barrier, and
  teams never wait for each other: no residency condition, no error flag, no host sync, and the
  batch spreads over up to ``n_sm / CLUSTER_SIZE`` teams.

A size rule picks one (:mod:`.plan`, with the measurements behind it); force one with
``rnnkern.config.CUDA_STRATEGY`` or the environment variable ``RNNKERN_CUDA_STRATEGY``
(``stepwise`` | ``persistent`` | ``cluster`` | ``auto``). Every tunable is a ``CUDA_*`` name of
:mod:`rnnkern.config`, read at call time.

Files, one job each: :mod:`.runtime` (sources, compile, cache, launch, cuBLAS, graph capture,
the side stream, the probe), :mod:`.plan` (strategy and launch shapes), :mod:`.seam` (forward
and backward, the buffers of a call), :mod:`.graphs` (the pool of captured stepwise loops),
:mod:`.elementwise` (the whole model's element-wise kernels: fused optimizer updates, dropout
masks).
"""
from . import elementwise, graphs, plan, runtime, seam
from .runtime import available
from .seam import backward, forward

name = "cuda"

__all__ = ["name", "available", "forward", "backward", "elementwise", "graphs", "plan", "runtime",
           "seam"]
