"""The NumPy reference against central finite differences in float64, for every cell and option.

The loss is a random linear functional of the outputs and the final state, so every gradient path
(outputs, h_n, c_n) is exercised: ``loss = sum(R_out * outputs) + sum(R_h * h_n) [+ sum(R_c * c_n)]``.
"""
import numpy as np
import pytest

import rnnkern as rk
from conftest import numeric_grad

CELLS = [
    ("rnn", dict(nonlinearity="tanh")),
    ("rnn", dict(nonlinearity="relu")),
    ("lstm", dict(forget_bias=0.0)),
    ("lstm", dict(forget_bias=1.0)),
    ("gru", dict(reset_after=True)),
    ("gru", dict(reset_after=False)),
]
LAYER = {"rnn": rk.RNN, "lstm": rk.LSTM, "gru": rk.GRU}
ID = [f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}" for k, o in CELLS]


def _make(kind, opts, I, H, L, seed=0):
    layer = LAYER[kind](I, H, L, dtype="float64", backend="numpy", seed=seed, **opts)
    # wider than the default init so that gates are not all near their linear region
    rng = np.random.default_rng(seed + 1)
    layer.load_params({k: rng.uniform(-0.8, 0.8, v.shape) for k, v in layer.params.items()})
    return layer


def _loss_and_grads(layer, x, state0, lengths, R):
    out, state = layer(x, initial_state=state0, lengths=lengths)
    if layer.spec.has_cell_state:
        loss = np.sum(R["out"] * out) + np.sum(R["h"] * state[0]) + np.sum(R["c"] * state[1])
        d_state = (R["h"], R["c"])
    else:
        loss = np.sum(R["out"] * out) + np.sum(R["h"] * state)
        d_state = R["h"]
    return loss, d_state



@pytest.mark.parametrize("kind,opts", CELLS, ids=ID)
@pytest.mark.parametrize("L,lengths", [(1, None), (1, [4, 0, 2]), (2, [1, 4, 3])],
                         ids=["L1-full", "L1-lengths-0-and-T", "L2-lengths"])
def test_gradients_match_finite_differences(kind, opts, L, lengths):
    B, T, I, H = 3, 4, 3, 3
    rng = np.random.default_rng(42)
    layer = _make(kind, opts, I, H, L)
    x = rng.standard_normal((B, T, I))
    h0 = rng.standard_normal((L, B, H)) * 0.5
    c0 = rng.standard_normal((L, B, H)) * 0.5
    state0 = (h0, c0) if kind == "lstm" else h0
    R = {"out": rng.standard_normal((B, T, H)), "h": rng.standard_normal((L, B, H)),
         "c": rng.standard_normal((L, B, H))}
    if kind == "rnn" and opts["nonlinearity"] == "relu":
        x = x + 0.3  # keep pre-activations away from the kink at 0 for finite differences

    def loss():
        return _loss_and_grads(layer, x, state0, lengths, R)[0]

    _, d_state = _loss_and_grads(layer, x, state0, lengths, R)
    out_shape = (B, T, H)
    dx, d_state0 = layer.backward(R["out"], d_state)
    analytic = dict(layer.grads)
    analytic["x"] = dx
    analytic["h0"] = d_state0[0] if kind == "lstm" else d_state0
    if kind == "lstm":
        analytic["c0"] = d_state0[1]
    numeric = {name: numeric_grad(loss, p) for name, p in layer.params.items()}
    numeric["x"] = numeric_grad(loss, x)
    numeric["h0"] = numeric_grad(loss, h0)
    if kind == "lstm":
        numeric["c0"] = numeric_grad(loss, c0)
    assert out_shape == (B, T, H)
    for name in numeric:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("kind,opts", CELLS, ids=ID)
def test_lengths_semantics(kind, opts):
    """Zero outputs past each length, state after the last valid step, no gradient there."""
    B, T, I, H = 3, 5, 2, 4
    rng = np.random.default_rng(7)
    layer = _make(kind, opts, I, H, 1)
    x = rng.standard_normal((B, T, I))
    lengths = np.array([5, 2, 0])
    out, state = layer(x, lengths=lengths)
    h_n = state[0] if kind == "lstm" else state
    assert np.all(out[1, 2:] == 0) and np.all(out[2] == 0)
    assert np.all(h_n[0, 2] == 0)            # length 0 returns the (zero) initial state
    # the state after the last valid step equals that of a run truncated to that length
    out_short, state_short = layer(x[1:2, :2])
    h_short = state_short[0] if kind == "lstm" else state_short
    # (a different batch size may change BLAS rounding, hence allclose)
    np.testing.assert_allclose(h_n[0, 1], h_short[0, 0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out[1, :2], out_short[0], rtol=1e-13, atol=1e-15)
    # garbage past the length changes nothing
    x2 = x.copy()
    x2[1, 2:] = 100.0
    out2, _ = layer(x2, lengths=lengths)
    np.testing.assert_array_equal(out, out2)
    # gradients arriving at padded outputs are ignored; input grads there are exactly zero
    layer(x, lengths=lengths)
    dx, _ = layer.backward(rng.standard_normal((B, T, H)))
    assert np.all(dx[1, 2:] == 0) and np.all(dx[2] == 0)


def test_lstm_forget_bias_is_added_at_run_time():
    """forget_bias=b equals forget_bias=0 with b added to the forget-gate bias."""
    rng = np.random.default_rng(3)
    a = _make("lstm", dict(forget_bias=1.0), 3, 4, 1)
    b = _make("lstm", dict(forget_bias=0.0), 3, 4, 1)
    params = dict(a.params)
    bias = params["bias_ih_l0"].copy()
    bias[4:8] += 1.0
    b.load_params({**params, "bias_ih_l0": bias})
    x = rng.standard_normal((2, 3, 3))
    np.testing.assert_allclose(a(x)[0], b(x)[0], rtol=1e-13)


def test_gru_conventions_differ():
    """reset_after True/False are different cells on the same weights (unless r == 1)."""
    rng = np.random.default_rng(4)
    a = _make("gru", dict(reset_after=True), 3, 4, 1)
    b = _make("gru", dict(reset_after=False), 3, 4, 1)
    b.load_params(a.params)
    x = rng.standard_normal((2, 3, 3))
    h0 = rng.standard_normal((1, 2, 4))
    assert np.abs(a(x, h0)[0] - b(x, h0)[0]).max() > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_kept(dtype):
    layer = rk.LSTM(3, 4, 2, dtype=dtype, backend="numpy", seed=0)
    out, (h, c) = layer(np.ones((2, 3, 3)))
    dx, (dh, dc) = layer.backward(np.ones_like(out))
    for a in (out, h, c, dx, dh, dc, *layer.grads.values()):
        assert a.dtype == np.dtype(dtype)
