"""Compiled Adam update for :mod:`rnnkern.optim` (imported lazily; Numba compiles on first use).

One pass over the (1-D, C-contiguous) arrays instead of NumPy's ~12 ufunc calls: at lab sizes
those calls' overhead is the whole cost of a step, at char-rnn sizes their 12 passes over memory
are. The loop performs exactly the IEEE operations of ``Adam._update`` in the same order and
dtype (scalars arrive cast to the array dtype; no fastmath, so no contraction into FMAs), so
results are bitwise identical to the NumPy path -- tested, and relied on for exact resume.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")  # numpy: no zero-division checks, so the loop vectorises
def adam(p, g, m, v, s, tf_form):
    """s = [b1, c1, b2, c2, eps, step, bc2_sqrt] in the arrays' dtype (one array, not seven
    scalars: the dispatcher's per-argument typing was half the call at lab sizes), then
    m = b1 m + c1 g; v = b2 v + c2 g^2 (c1 = 1-b1, c2 = 1-b2), and
    tf_form: p -= step * m / (sqrt(v) + eps)            (step = lr sqrt(1-b2^t) / (1-b1^t))
    else:    p -= step * m / (sqrt(v) / bc2_sqrt + eps)  (step = lr / (1-b1^t), PyTorch)"""
    b1, c1, b2, c2, eps, step, bc2_sqrt = s[0], s[1], s[2], s[3], s[4], s[5], s[6]
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + c1 * gi
        vi = v[i] * b2 + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        if tf_form:
            denom = np.sqrt(vi) + eps
        else:
            denom = np.sqrt(vi) / bc2_sqrt + eps
        p[i] = p[i] - step * (mi / denom)
