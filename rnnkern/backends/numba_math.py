"""Pieces shared by the Numba kernels: scalar activations specialised by dtype, the
weight-gradient GEMMs that follow every backward loop, and small row loops.

float64 uses libm (``np.tanh``, ``np.exp``): the float64 path must agree with
:mod:`rnnkern.reference` to ``rtol 1e-10``. float32 uses a rational approximation of tanh that
LLVM vectorises (scalar libm ``tanhf`` measured 20-50 ns per element here, this 0.5 ns); its
absolute error is <= 3.1e-7 (dense grid over [-12, 12]), well inside the float32 tolerance.
The coefficients were fitted for this project by ``benchmarks/fit_fast_tanh.py``
(Sanathanan-Koerner iteration plus Lawson weights; the odd 13/6-degree form of Eigen's ``ptanh``).

Each public function here is a plain Python function (what runs under ``NUMBA_DISABLE_JIT=1``)
plus a ``@overload`` giving Numba a per-dtype implementation. No module globals are read by the
compiled code, so ``cache=True`` kernels never freeze a stale value.

Caveat: Numba's on-disk cache does not track this module. After editing it, delete the
``__pycache__/*.nbi``/``*.nbc`` files of the ``numba_*`` kernel modules (CI starts clean).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

# Options of every kernel: cached on disk, GIL released, NumPy's error model (Python's keeps
# loops that divide from vectorising), and FMA contraction (a*b+c in one rounding; harmless
# for float64 agreement, halves the latency of the float32 polynomials). No other fast-math
# flag: 'nnan'/'ninf' would let NaN weights pass silently as numbers.
JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})


def _tanh_f32(x):
    """tanh for float32, |error| <= 3.1e-7; branch-free so loops over it vectorise."""
    x = min(max(x, np.float32(-9.0)), np.float32(9.0))  # tanh(+-9) rounds to +-1 in float32
    s = x * x
    p = np.float32(-8.821895e-14)
    p = p * s + np.float32(5.4323167e-11)
    p = p * s + np.float32(-2.05861e-08)
    p = p * s + np.float32(1.1248937e-05)
    p = p * s + np.float32(0.0031131832)
    p = p * s + np.float32(0.13092294)
    p = p * s + np.float32(1.0)
    q = np.float32(0.00025594985)
    q = q * s + np.float32(0.024532009)
    q = q * s + np.float32(0.4642562)
    q = q * s + np.float32(1.0)
    # the fit overshoots 1 by ~1e-7 near |x| = 9: clamp so |tanh| <= 1 and sigmoid in [0, 1]
    return min(max(x * p / q, np.float32(-1.0)), np.float32(1.0))


def _sigmoid_f32(x):
    # sigmoid(x) = (1 + tanh(x/2)) / 2: reuses the vectorisable tanh, abs error <= 1.6e-7
    return np.float32(0.5) * tanh(np.float32(0.5) * x) + np.float32(0.5)


def _tanh_f64(x):
    return np.tanh(x)


def _sigmoid_f64(x):
    return 1.0 / (1.0 + np.exp(-x))  # the reference's formula, for bitwise-close float64


def tanh(x):
    """tanh(x) for a float32 or float64 scalar (fast rational form for float32)."""
    return _tanh_f32(x) if isinstance(x, np.float32) else _tanh_f64(x)


def sigmoid(x):
    """1 / (1 + exp(-x)) for a float32 or float64 scalar (via the fast tanh for float32)."""
    return _sigmoid_f32(x) if isinstance(x, np.float32) else _sigmoid_f64(x)


def _pick(f32, f64):
    def typer(x):
        if x == types.float32:
            return f32
        if x == types.float64:
            return f64
        return None
    return typer


overload(tanh)(_pick(_tanh_f32, _tanh_f64))
overload(sigmoid)(_pick(_sigmoid_f32, _sigmoid_f64))


@njit(**JIT)
def weight_grads(x, h_prev, d_gx, d_gh, same, w_ih, dx, dw_ih, dw_hh, db_ih, db_hh):
    """After a backward loop, as single GEMMs over all B*T rows.

    In:  x [B,T,I], h_prev [B,T,H] (what W_hh multiplied at each step), d_gx [B,T,G*H] and
         d_gh [B,T,G*H] gradients of the input- and hidden-side pre-activations; ``same``: they
         are one array (RNN, LSTM), so the bias gradients are summed once.
    Out: dx = d_gx W_ih [B,T,I], dw_ih = d_gx^T x, dw_hh = d_gh^T h_prev, db_ih = sum d_gx,
         db_hh = sum d_gh.
    """
    B, T, I = x.shape
    GH = d_gx.shape[2]
    Dx = d_gx.reshape(B * T, GH)
    Dh = d_gh.reshape(B * T, GH)
    np.dot(Dx, w_ih, dx.reshape(B * T, I))
    np.dot(Dx.T, x.reshape(B * T, I), dw_ih)
    np.dot(Dh.T, h_prev.reshape(B * T, h_prev.shape[2]), dw_hh)
    column_sums(Dx, db_ih)
    if same:
        copy_into(db_hh, db_ih)
    else:
        column_sums(Dh, db_hh)


@njit(**JIT)
def column_sums(D, out):
    """out[j] = sum_r D[r, j] for a [R,N] array (a loop over rows that vectorises over j)."""
    out[:] = 0
    for r in range(D.shape[0]):
        for j in range(D.shape[1]):
            out[j] += D[r, j]


@njit(**JIT)
def copy_into(a, b):
    """a[:] = b for 1-D arrays. (Numba's own array slice assignment compiles ~6 s of
    shape-mismatch error formatting; this loop compiles in milliseconds.)"""
    for j in range(a.shape[0]):
        a[j] = b[j]


@njit(**JIT)
def add_into(a, b):
    """a += b for 1-D arrays (a small function, so the loop vectorises)."""
    for j in range(a.shape[0]):
        a[j] += b[j]
