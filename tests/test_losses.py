"""Losses: TF lab values, gradients vs central finite differences (float64), torch parity,
and input validation."""
import numpy as np
import pytest

import rnnkern as rk
from rnnkern.losses import mse, one_hot, sequence_loss, sum_squares


# ------------------------------------------------------------------ lab values (TF1 lab 12)
def test_sequence_loss_lab_logits():
    logits = [[[0.2, 0.7], [0.6, 0.2], [0.2, 0.9]]]
    assert sequence_loss(logits, [[1, 1, 1]]) == pytest.approx(0.596759, abs=5e-7)


@pytest.mark.parametrize("row, expected", [([0.3, 0.7], 0.513015), ([0.1, 0.9], 0.371101)])
def test_sequence_loss_lab_constant_predictions(row, expected):
    # lab 12 "rnn basics": prediction1 / prediction2 against targets [[1,1,1]], weights ones
    pred = np.array([[row] * 3], dtype=np.float32)
    loss = sequence_loss(pred, np.array([[1, 1, 1]]), np.ones((1, 3), np.float32))
    assert loss == pytest.approx(expected, abs=5e-7)


def test_sequence_loss_is_weighted_mean_of_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5))
    targets = rng.integers(0, 5, size=(3, 4))
    w = rng.uniform(0, 2, size=(3, 4))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ce = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    assert sequence_loss(logits, targets, w) == pytest.approx((w * ce).sum() / w.sum(), rel=1e-12)
    assert sequence_loss(logits, targets) == pytest.approx(ce.mean(), rel=1e-12)


def test_sequence_loss_accepts_mask_weights():
    logits = np.random.default_rng(5).normal(size=(2, 3, 4))
    t = np.zeros((2, 3), int)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    assert sequence_loss(logits, t, mask) == pytest.approx(
        sequence_loss(logits, t, mask.astype(np.float64)), rel=1e-15)
    assert sequence_loss(logits, t, mask) == pytest.approx(
        sequence_loss(logits[:, :1], t[:, :1]) * 2 / 3 + sequence_loss(logits[:1, 1:2], t[:1, 1:2]) / 3,
        rel=1e-12)


def test_sequence_loss_zero_weights_gives_zero_like_tf():
    logits = np.zeros((2, 3, 4))
    loss, d = sequence_loss(logits, np.zeros((2, 3), int), np.zeros((2, 3)), return_grad=True)
    assert loss == 0.0 and not d.any()


def test_sequence_loss_is_stable_for_huge_logits():
    logits = np.array([[[1000.0, 0.0], [0.0, -1000.0]]])
    loss, d = sequence_loss(logits, [[1, 0]], return_grad=True)
    assert loss == pytest.approx(500.0, rel=1e-12)
    assert np.isfinite(d).all()


def test_sequence_loss_keeps_float32():
    logits = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    loss, d = sequence_loss(logits, np.zeros((2, 3), np.int32), return_grad=True)
    assert d.dtype == np.float32 and isinstance(loss, float)


# ------------------------------------------------------------------ gradients
def _fd(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f(x)
        x[idx] = old - eps
        down = f(x)
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_loss_grad_matches_finite_differences(weighted):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4))
    targets = rng.integers(0, 4, size=(2, 3))
    w = rng.uniform(0, 2, size=(2, 3)) if weighted else None
    _, d = sequence_loss(logits, targets, w, return_grad=True)
    num = _fd(lambda z: sequence_loss(z, targets, w), logits.copy())
    np.testing.assert_allclose(d, num, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("fn", [mse, sum_squares])
def test_squares_grad_matches_finite_differences(fn):
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    loss, d = fn(pred, target, return_grad=True)
    num = _fd(lambda p: fn(p, target), pred.copy())
    np.testing.assert_allclose(d, num, rtol=1e-7, atol=1e-9)


def test_mse_and_sum_squares_values():
    pred, target = np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.0, 2.0], [1.0, 1.0]])
    assert mse(pred, target) == pytest.approx((1 + 0 + 4 + 16) / 4)
    assert sum_squares(pred, target) == pytest.approx(21.0)


# ------------------------------------------------------------------ torch parity
def test_sequence_loss_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 5, 7))
    targets = rng.integers(0, 7, size=(3, 5))
    w = rng.uniform(0.1, 2, size=(3, 5))
    lt = torch.tensor(logits, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(lt.reshape(-1, 7), torch.tensor(targets).reshape(-1),
                                           reduction="none")
    wt = torch.tensor(w).reshape(-1)
    ref = (ce * wt).sum() / wt.sum()
    ref.backward()
    loss, d = sequence_loss(logits, targets, w, return_grad=True)
    assert loss == pytest.approx(ref.item(), rel=1e-11)
    np.testing.assert_allclose(d, lt.grad.numpy(), rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ one_hot
def test_one_hot():
    out = one_hot(np.array([[0, 2], [1, 1]]), 3)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out.argmax(-1), [[0, 2], [1, 1]])
    assert out.sum() == 4
    assert one_hot([1], 2, dtype="float64").dtype == np.float64


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("logits, targets, weights, exc, match", [
    (np.zeros((2, 3)), np.zeros((2, 3), int), None, ValueError, "logits"),
    (np.zeros((2, 3, 4)), np.zeros((2, 4), int), None, ValueError, "targets"),
    (np.zeros((2, 3, 4)), np.full((2, 3), 4), None, ValueError, "targets"),
    (np.zeros((2, 3, 4)), np.full((2, 3), -1), None, ValueError, "targets"),
    (np.zeros((2, 3, 4)), np.zeros((2, 3)), None, TypeError, "targets"),
    (np.full((2, 3, 4), np.nan), np.zeros((2, 3), int), None, ValueError, "logits"),
    (np.zeros((2, 3, 4), int), np.zeros((2, 3), int), None, TypeError, "logits"),
    (np.zeros((2, 3, 4)), np.zeros((2, 3), int), np.ones((3, 2)), ValueError, "weights"),
    (np.zeros((2, 3, 4)), np.zeros((2, 3), int), np.full((2, 3), np.inf), ValueError, "weights"),
])
def test_sequence_loss_rejects_bad_input(logits, targets, weights, exc, match):
    with pytest.raises(exc, match=match):
        sequence_loss(logits, targets, weights)


@pytest.mark.parametrize("fn", [mse, sum_squares])
def test_squares_reject_bad_input(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="pred"):
        fn(np.array([np.nan]), np.zeros(1))
    with pytest.raises(TypeError, match="pred"):
        fn(np.zeros(2, int), np.zeros(2))
    assert fn(np.ones(2), np.zeros(2, int)) > 0  # integer targets are cast


def test_one_hot_rejects_bad_input():
    with pytest.raises(ValueError, match="indices"):
        one_hot([0, 3], 3)
    with pytest.raises(ValueError, match="depth"):
        one_hot([0], 0)
    with pytest.raises(TypeError, match="indices"):
        one_hot(np.array([0.0]), 2)


def test_public_names():
    assert rk.sequence_loss is sequence_loss and rk.one_hot is one_hot
    assert rk.mse is mse and rk.sum_squares is sum_squares
    assert rk.interop.from_torch is not None
