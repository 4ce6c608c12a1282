"""The model's element-wise kernels on the GPU: the optimizers' fused updates
(``csrc/cuda/optim.cu``) and dropout masks (``csrc/cuda/dropout.cu``).

Both run over 1-D buffers of N elements in a grid-stride loop, on the runtime of
:mod:`.runtime` (CuPy's current stream; the tests' host emulator runs the same calls on NumPy
arrays). Shape legend: N elements.
"""
from __future__ import annotations

import math

import numpy as np

from ... import config
from . import runtime


def launch(module, fname, n, args, dtype):
    """Launch kernel ``fname`` of ``csrc/cuda/<module>.cu`` for ``dtype`` over ``n`` elements:
    ``fname(long long n, *args)``, ``config.CUDA_THREADS`` threads a block, at most
    ``config.CUDA_ELEMENTWISE_BLOCKS_PER_SM`` blocks per SM. Nothing runs when ``n`` is 0."""
    if n == 0:
        return
    rt = runtime.get_runtime()
    threads = int(config.CUDA_THREADS)
    blocks = min(-(-n // threads), rt.props()[0] * int(config.CUDA_ELEMENTWISE_BLOCKS_PER_SM))
    rt.launch(rt.kernel(module, fname, dtype), max(1, blocks), threads, (np.int64(n), *args))


def dropout_mask(key, shape, p, dtype, out=None):
    """The inverted-dropout mask ``1/(1-p)`` where element e's uniform draw from the
    counter-based generator keyed by ``key`` is below ``1-p``, else 0, of ``dtype``
    (``out``: a C-contiguous array to write into). ``key``: an int in [0, 2^63), drawn from the
    layer's own host generator, so the mask is a function of that generator's state."""
    xp = runtime.get_runtime().xp
    dtype = np.dtype(dtype)
    if out is None:
        out = xp.empty(shape, dtype=dtype)
    elif not (out.flags.c_contiguous and out.dtype == dtype and tuple(out.shape) == tuple(shape)):
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {tuple(shape)}")
    keep = 1.0 - p
    threshold = np.int64(math.ceil(keep * 2.0 ** 53))        # u < keep  <=>  u53 < threshold
    scale = np.asarray(1.0 / keep).astype(dtype)[()]          # as the host mask rounds it
    launch("dropout", "rk_dropout_mask", out.size, (out, np.int64(key), threshold, scale), dtype)
    return out
