"""The C++ dense head + softmax cross-entropy (csrc/cpu/head.cpp, ``_C.dense_softmax_xent``)
against the NumPy layers it fuses (rk.Dense + rk.sequence_loss), and inside the fused step."""
from __future__ import annotations

import numpy as np
import pytest

import rnnkern as rk
from rnnkern.backends import cpp

if not cpp.available()[0]:
    pytest.skip(f"C++ backend unavailable: {cpp.available()[1]}", allow_module_level=True)
_C = cpp._C


@pytest.fixture(params=["one-thread", "split"])
def split(request):
    """Rows on one thread, or split over the threads from the smallest size up."""
    old = _C.head_split_min()
    _C.set_head_split_min(1 << 62 if request.param == "one-thread" else 1)
    yield request.param
    _C.set_head_split_min(old)


def reference(h, weight, bias, targets, weights):
    """loss, dw, db, dh through rk.Dense and rk.sequence_loss (one batch row of N steps)."""
    dense = rk.Dense(weight.shape[1], weight.shape[0], bias=bias is not None,
                     dtype=h.dtype.name)
    dense.params["weight"][...] = weight
    if bias is not None:
        dense.params["bias"][...] = bias
    logits = dense.forward(h[None])
    w = None if weights is None else weights[None]
    loss, d_logits = rk.sequence_loss(logits, targets[None], weights=w, return_grad=True)
    dh = dense.backward(d_logits)[0]
    return loss, dense.grads["weight"], dense.grads.get("bias"), dh


def head_call(h, weight, bias, targets, weights):
    N, C = len(h), len(weight)
    total = (float(weights.sum()) if weights is not None else float(N)) + 1e-12
    d_logits = np.full((N, C), np.nan, h.dtype)
    dw = np.full(weight.shape, np.nan, h.dtype)
    db = None if bias is None else np.full(C, np.nan, h.dtype)
    dh = np.full(h.shape, np.nan, h.dtype)
    loss = _C.dense_softmax_xent(h, weight, bias, targets, weights, 1.0 / total, d_logits, dw,
                                 db, dh)
    return loss, dw, db, dh


def problem(N, F, C, dtype, has_bias, has_weights, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    h = (scale * rng.standard_normal((N, F))).astype(dtype)
    weight = rng.standard_normal((C, F)).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype) if has_bias else None
    targets = rng.integers(0, C, N).astype(np.int64)
    weights = rng.random(N).astype(dtype) if has_weights else None
    return h, weight, bias, targets, weights


@pytest.mark.parametrize("N,F,C", [(1, 1, 1), (1, 5, 3), (7, 1, 2), (30, 25, 25), (33, 17, 65),
                                   (5, 40, 1)])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("has_weights", [False, True], ids=["ones", "weights"])
def test_matches_dense_and_sequence_loss_float64(split, N, F, C, has_bias, has_weights):
    args = problem(N, F, C, np.float64, has_bias, has_weights)
    got, want = head_call(*args), reference(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-14)
    for g, w in zip(got[1:], want[1:]):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


def test_float32_close_to_the_float64_result(split):
    args64 = problem(1700, 25, 25, np.float64, True, False, scale=3.0)
    args32 = tuple(None if a is None else a.astype(np.float32) if a.dtype.kind == "f" else a
                   for a in args64)
    got, want = head_call(*args32), reference(*args64)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-7)


def test_gradients_match_finite_differences():
    h, weight, bias, targets, weights = problem(4, 3, 5, np.float64, True, True, seed=2)

    def loss_at(hh, ww, bb):
        return head_call(hh, ww, bb, targets, weights)[0]
    _, dw, db, dh = head_call(h, weight, bias, targets, weights)
    eps = 1e-6
    for value, grad in ((h, dh), (weight, dw), (bias, db)):
        for idx in np.ndindex(value.shape):
            saved = value[idx]
            value[idx] = saved + eps
            up = loss_at(h, weight, bias)
            value[idx] = saved - eps
            down = loss_at(h, weight, bias)
            value[idx] = saved
            assert abs((up - down) / (2 * eps) - grad[idx]) < 1e-7


def test_large_logits_stay_finite_and_zero_rows_give_zero():
    h, weight, bias, targets, _ = problem(6, 4, 3, np.float32, True, False, scale=200.0)
    loss, dw, db, dh = head_call(h, weight, bias, targets, None)
    assert np.isfinite(loss) and np.isfinite(dw).all() and np.isfinite(dh).all()
    want = reference(*(a.astype(np.float64) if a.dtype.kind == "f" else a
                       for a in (h, weight, bias, targets)), None)
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    # no rows: zero loss, zero weight gradients
    h0 = np.zeros((0, 4), np.float32)
    loss, dw, db, dh = head_call(h0, weight, bias, np.zeros(0, np.int64), None)
    assert loss == 0.0 and not dw.any() and not db.any() and dh.shape == (0, 4)


def test_nan_logits_give_a_nan_loss():
    h, weight, bias, targets, _ = problem(3, 4, 3, np.float64, True, False)
    h[1, 2] = np.nan
    assert np.isnan(head_call(h, weight, bias, targets, None)[0])


def test_bad_input_raises_naming_the_argument():
    h, weight, bias, targets, weights = problem(5, 4, 3, np.float32, True, True)
    N, C = 5, 3

    def call(**kw):
        a = dict(h=h, weight=weight, bias=bias, targets=targets, weights=weights,
                 inv_total=0.2, d_logits=np.empty((N, C), np.float32),
                 dw=np.empty((C, 4), np.float32), db=np.empty(C, np.float32),
                 dh=np.empty((N, 4), np.float32))
        a.update(kw)
        return _C.dense_softmax_xent(**a)
    call()
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C\) = \[0, 3\), got 3 at "
                                         r"position 2"):
        call(targets=np.array([0, 1, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"got -1"):
        call(targets=np.array([0, 1, 2, 0, -1]))
    with pytest.raises(ValueError, match="targets must have dtype int64"):
        call(targets=targets.astype(np.int32))
    with pytest.raises(ValueError, match=r"weight must have shape \[3, 4\]|weight must have "
                                         r"dtype"):
        call(weight=weight.astype(np.float64))
    with pytest.raises(ValueError, match=r"dh must have shape \[5, 4\]"):
        call(dh=np.empty((4, 4), np.float32))
    with pytest.raises(ValueError, match="db must be an array"):
        call(db=None)
    with pytest.raises(ValueError, match="h must have dtype float32 or float64"):
        call(h=h.astype(np.int64))
    with pytest.raises(ValueError, match="d_logits must be C-contiguous"):
        call(d_logits=np.empty((C, N), np.float32).T)


def test_fused_step_on_the_cpp_backend_uses_it_and_matches_the_generic_step():
    """lab 12-4's form on the C++ LSTM, with position weights and a head without bias."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, (9, 7))
    y = rng.integers(0, 4, (9, 7))
    weights = (rng.random((9, 7)) < 0.8).astype(np.float64)

    def build():
        lstm = rk.LSTM(6, 5, 2, dtype="float64", seed=1, backend="cpp")
        return rk.Sequential([rk.OneHot(6, dtype="float64"), lstm,
                              rk.Dense(5, 4, bias=False, dtype="float64", seed=2)])
    losses = []
    for fused in (None, False):
        model = build()
        step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05), fused=fused)
        losses.append([step(x, y, weights=weights) for _ in range(3)])
        if fused is None:
            assert step.fused_reason is None and step._plan.backend.name == "cpp"
            params = model.params
        else:
            np.testing.assert_allclose(
                np.concatenate([v.ravel() for v in model.params.values()]),
                np.concatenate([v.ravel() for v in params.values()]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-10)
