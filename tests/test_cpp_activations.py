"""The C++ kernels' float32 activations (csrc/include/rnnkern/cells.h: tanh_f32, sigmoid through
it), read through the kernels themselves:

* tanh: an RNN step with w_ih = [[1]], w_hh = 0, no bias and h0 = 0 gives out = tanh(x) for
  x [B,1,1] (one value per row, so a NaN or inf meets no other column in the GEMM);
* sigmoid: an LSTM step with the same weights on 4 gate columns gives c_1 = i g with
  i = sigmoid(a), g = tanh(20) (1 to within tanh's error).
"""
from __future__ import annotations

import numpy as np
import pytest

from rnnkern.cellspec import CellSpec

_C = pytest.importorskip("rnnkern._C", reason="rnnkern._C is not built (pip install -e .)")
from rnnkern.backends import cpp  # noqa: E402  (after the skip: it registers the BLAS)

GRID = np.concatenate([np.linspace(-30, 30, 600_001), np.geomspace(1e-30, 1e-3, 50),
                       -np.geomspace(1e-30, 1e-3, 50), [0.0, -0.0, 9.0, -9.0, 8.999, 9.001]])


def _tanh(x):
    x = np.asarray(x, np.float32).reshape(-1, 1, 1)
    one, zero = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    out, *_ = cpp.forward(CellSpec("rnn"), x, one, zero, zero[0], zero[0], None)
    return out.reshape(-1)


def _sigmoid(a):
    a = np.asarray(a, np.float32).reshape(-1, 1, 1)
    B = a.shape[0]
    x = np.concatenate([a, np.zeros_like(a), np.full_like(a, 20.0), np.zeros_like(a)], axis=2)
    w_ih = np.eye(4, dtype=np.float32)  # H = 1: gate rows i, f, g, o read x's columns 0..3
    w_hh, b = np.zeros((4, 1), np.float32), np.zeros(4, np.float32)
    _, _, c_n, _ = cpp.forward(CellSpec("lstm"), x, w_ih, w_hh, b, b,
                               np.zeros((B, 1), np.float32), np.zeros((B, 1), np.float32))
    return c_n.reshape(-1)


def test_tanh_is_accurate_odd_and_bounded():
    x = GRID.astype(np.float32)
    t = _tanh(x)
    x64 = x.astype(np.float64)
    assert t.dtype == np.float32
    assert np.abs(t - np.tanh(x64)).max() <= 3e-7
    small = np.abs(x64) < 1e-3  # tanh(x) ~ x: relative accuracy near zero
    assert np.all(np.abs(t[small] - x64[small]) <= 1e-6 * np.abs(x64[small]))
    np.testing.assert_array_equal(_tanh(-x), -t)  # odd, bit for bit (signed zeros included)
    assert np.all(np.abs(t) <= 1)
    assert np.all(np.diff(t[:600_001]) >= -5e-7)  # non-decreasing, up to twice the error


def test_tanh_special_values():
    t = _tanh([np.inf, -np.inf, np.nan, -np.nan, 1e30, -1e30, 3.4e38])
    np.testing.assert_array_equal(t[[0, 1, 4, 5, 6]], [1, -1, 1, -1, 1])
    assert np.isnan(t[2]) and np.isnan(t[3])


def test_sigmoid_is_accurate_and_in_unit_interval():
    a = GRID.astype(np.float32)
    s = _sigmoid(a)
    ref = 1 / (1 + np.exp(-a.astype(np.float64)))
    assert np.abs(s - ref).max() <= 6e-7  # sigmoid's error and tanh(20)'s
    assert np.all((s >= 0) & (s <= 1))
    special = _sigmoid([1e30, -1e30, np.nan])  # (an inf would meet 0 weights in the GEMM: NaN)
    assert special[0] == pytest.approx(1, abs=3e-7) and special[1] == 0 and np.isnan(special[2])
