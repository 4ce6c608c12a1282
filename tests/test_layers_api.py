"""The public layer API: structure of results, backend selection, and bad input."""
import numpy as np
import pytest

import rnnkern as rk
from rnnkern import backends

LAYERS = [rk.RNN, rk.LSTM, rk.GRU]


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)


@pytest.mark.parametrize("cls", LAYERS)
def test_result_structure(cls, x):
    layer = cls(4, 5, 2, seed=0, backend="numpy")
    out, state = layer(x)
    assert out.shape == (2, 3, 5) and out.dtype == np.float32
    if cls is rk.LSTM:
        assert isinstance(state, tuple) and [s.shape for s in state] == [(2, 2, 5)] * 2
    else:
        assert state.shape == (2, 2, 5)
    dx, d_state0 = layer.backward(np.ones_like(out))
    assert dx.shape == x.shape
    assert set(layer.grads) == set(layer.params)
    assert all(layer.grads[k].shape == layer.params[k].shape for k in layer.params)
    assert sorted(layer.params) == sorted(
        f"{w}_l{k}" for k in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def test_param_shapes_follow_pytorch():
    G = {rk.RNN: 1, rk.LSTM: 4, rk.GRU: 3}
    for cls in LAYERS:
        layer = cls(4, 5, 2, seed=0)
        assert layer.params["weight_ih_l0"].shape == (G[cls] * 5, 4)
        assert layer.params["weight_ih_l1"].shape == (G[cls] * 5, 5)
        assert layer.params["weight_hh_l1"].shape == (G[cls] * 5, 5)
        assert layer.params["bias_hh_l0"].shape == (G[cls] * 5,)


def test_seed_makes_initialisation_reproducible():
    a, b, c = rk.LSTM(3, 4, seed=1), rk.LSTM(3, 4, seed=1), rk.LSTM(3, 4, seed=2)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["weight_ih_l0"], c.params["weight_ih_l0"])
    bound = 1 / np.sqrt(4)
    assert all(np.abs(v).max() <= bound for v in a.params.values())


def test_available_backends_reports_every_backend():
    info = rk.available_backends()
    assert list(info) == ["numpy", "numba", "cpp", "cuda"]
    for ok, reason in info.values():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert info["numpy"][0] is True


def test_explicit_unavailable_backend_raises_with_reason(x):
    missing = [n for n, (ok, _) in rk.available_backends().items() if not ok]
    if not missing:
        pytest.skip("every backend is available on this machine")
    layer = rk.LSTM(4, 5, backend=missing[0])
    with pytest.raises(backends.BackendUnavailable, match=missing[0]):
        layer(x)


def test_set_backend_and_environment(x, monkeypatch):
    try:
        rk.set_backend("numpy")
        assert backends.resolve("auto", x).name == "numpy"
    finally:
        rk.set_backend(None)
    monkeypatch.setenv("RNNKERN_BACKEND", "numpy")
    assert backends.resolve("auto", x).name == "numpy"
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.set_backend("tpu")


def test_auto_prefers_the_first_available_cpu_backend(x):
    info = rk.available_backends()
    expected = next(n for n in ("cpp", "numba", "numpy") if info[n][0])
    assert backends.resolve("auto", x).name == expected


def test_dropout_only_in_training_and_gradients_follow_the_mask():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 2))
    layer = rk.GRU(2, 3, 2, dtype="float64", backend="numpy", seed=0, dropout=0.5)
    layer.eval()
    ref = rk.GRU(2, 3, 2, dtype="float64", backend="numpy", seed=0)
    np.testing.assert_array_equal(layer(x)[0], ref(x)[0])
    layer.train()
    R = rng.standard_normal((3, 4, 3))

    def loss():
        layer._rng = np.random.default_rng(11)  # the same dropout mask on every call
        return np.sum(layer(x)[0] * R)

    loss()
    dx, _ = layer.backward(R)
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 2, 1), (2, 3, 0)]:
        x[idx] += eps
        up = loss()
        x[idx] -= 2 * eps
        down = loss()
        x[idx] += eps
        assert abs((up - down) / (2 * eps) - dx[idx]) < 1e-6


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(input_size=0), "input_size"),
    (dict(hidden_size=2.5), "hidden_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="int32"), "dtype"),
    (dict(backend="tpu"), "backend"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(input_size=3, hidden_size=4, num_layers=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rk.LSTM(args.pop("input_size"), args.pop("hidden_size"), args.pop("num_layers"), **args)


def test_bad_cell_options():
    with pytest.raises(ValueError, match="nonlinearity"):
        rk.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="forget_bias"):
        rk.LSTM(3, 4, forget_bias=float("nan"))


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_x(cls):
    layer = cls(4, 5, backend="numpy")
    with pytest.raises(ValueError, match=r"x must have 3 dimensions"):
        layer(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"input_size. Expected 4, got 3"):
        layer(np.zeros((2, 3, 3)))
    with pytest.raises(TypeError, match=r"x must be a floating-point array"):
        layer(np.zeros((2, 3, 4), dtype=np.int64))
    bad = np.zeros((2, 3, 4))
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"x contains NaN"):
        layer(bad)


def test_nan_scan_of_device_arrays_only_when_asked(monkeypatch):
    """NumPy arrays are always scanned; a device array (a stand-in for CuPy here) only with
    config.CHECK_FINITE_ON_DEVICE, since the answer is a device-to-host read: the NaN check
    and the range check alike (rnnkern.device.check_finite / check_range)."""
    from rnnkern import config, device

    class StandIn(np.ndarray):
        pass
    StandIn.__module__ = "cupy._stand_in"       # what device.is_device_array looks at
    monkeypatch.setattr(device, "array_module", lambda a: np)
    a = np.zeros((2, 3))
    a[1, 2] = np.inf
    on_device = a.view(StandIn)
    assert device.is_device_array(on_device) and not device.is_device_array(a)
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        device.check_finite(a, "x")
    device.check_finite(a[:1], "x")
    ids = np.array([0, 5])
    monkeypatch.setattr(config, "CHECK_FINITE_ON_DEVICE", False)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\), got min 0 and max 5"):
        device.check_range(ids, "ids", 0, 5, "[0, 5)")
    device.check_finite(on_device, "x")          # not scanned
    device.check_range(ids.view(StandIn), "ids", 0, 5, "[0, 5)")
    monkeypatch.setattr(config, "CHECK_FINITE_ON_DEVICE", True)
    with pytest.raises(ValueError, match="x contains NaN"):
        device.check_finite(on_device, "x")
    with pytest.raises(ValueError, match="ids must lie in"):
        device.check_range(ids.view(StandIn), "ids", 0, 5, "[0, 5)")


@pytest.mark.parametrize("lengths,exc,match", [
    ([3, 4], ValueError, r"lengths must lie in \[0, T\] = \[0, 3\]"),
    ([-1, 2], ValueError, r"lengths must lie in"),
    ([1, 2, 3], ValueError, r"lengths must have shape \[B\]"),
    ([1.0, 2.0], TypeError, r"lengths must be integers"),
])
def test_bad_lengths(lengths, exc, match, x):
    layer = rk.GRU(4, 5, backend="numpy")
    with pytest.raises(exc, match=match):
        layer(x, lengths=lengths)


def test_bad_initial_state(x):
    gru = rk.GRU(4, 5, 2, backend="numpy")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[L,B,H\] = \(2, 2, 5\)"):
        gru(x, initial_state=np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match=r"must be one array"):
        gru(x, initial_state=(np.zeros((2, 2, 5)), np.zeros((2, 2, 5))))
    with pytest.raises(TypeError, match=r"initial_state must be a floating-point array"):
        gru(x, initial_state=np.zeros((2, 2, 5), dtype=int))
    nan = np.zeros((2, 2, 5))
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"initial_state contains NaN"):
        gru(x, initial_state=nan)
    lstm = rk.LSTM(4, 5, backend="numpy")
    with pytest.raises(ValueError, match=r"tuple \(h0, c0\)"):
        lstm(x, initial_state=np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match=r"initial_state\[1\] \(c0\) must have shape"):
        lstm(x, initial_state=(np.zeros((1, 2, 5)), np.zeros((1, 2, 4))))


def test_bad_backward_calls(x):
    layer = rk.LSTM(4, 5, backend="numpy")
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((2, 3, 5)))
    layer(x)
    with pytest.raises(ValueError, match=r"d_outputs must have shape \[B,T,H\] = \(2, 3, 5\)"):
        layer.backward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"d_state of an LSTM must be a tuple"):
        layer.backward(None, np.zeros((1, 2, 5)))


def test_load_params_checks_names_and_shapes():
    layer = rk.LSTM(3, 4)
    with pytest.raises(ValueError, match="params must have keys"):
        layer.load_params({"weight_ih_l0": np.zeros((16, 3))})
    bad = {k: np.zeros(v.shape) for k, v in layer.params.items()}
    bad["weight_hh_l0"] = np.zeros((16, 3))
    with pytest.raises(ValueError, match=r"params\['weight_hh_l0'\] must have shape \(16, 4\)"):
        layer.load_params(bad)


def test_zero_length_time_axis_returns_initial_state():
    layer = rk.LSTM(2, 3, backend="numpy", dtype="float64", seed=0)
    h0 = np.full((1, 2, 3), 0.5)
    c0 = np.full((1, 2, 3), -0.25)
    out, (h, c) = layer(np.zeros((2, 0, 2)), initial_state=(h0, c0))
    assert out.shape == (2, 0, 3)
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(c, c0)
    dx, (dh0, dc0) = layer.backward(np.zeros((2, 0, 3)), (np.ones((1, 2, 3)), np.ones((1, 2, 3))))
    assert dx.shape == (2, 0, 2)
    np.testing.assert_array_equal(dh0, 1.0)
    np.testing.assert_array_equal(dc0, 1.0)
