"""Whole models on a device (``model.to("cuda")``), issue 23 item 1.

Without a GPU (CI, most machines): the NumPy path of everything the device work touched
(``to("cpu")`` round trips, the device argument, the CuPy-missing message, device-mismatch
errors, optimizer state placement, checkpoints, losses, generate), and the two GPU kernels it
added -- the optimizers' fused updates (``csrc/cuda/optim.cu``) and the dropout masks
(``csrc/cuda/dropout.cu``) -- in the host emulator (``cuda_emu``), against the NumPy rule to the
bit. Device arrays are stood in for by :class:`Tagged`, a NumPy array whose type claims to be
CuPy's, wherever the code only asks where an array lives.

With a GPU (``-m gpu``, ``benchmarks/gpu_check.sh``): the same model trained on the device
equals the CPU run, masks, checkpoints GPU -> CPU -> GPU, generate, the fused kernels on the
device.

Shape legend: B batch, T time steps, V vocabulary, E embedding width, H hidden, N elements.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import config, device, layers
from rnnkern.backends import cuda

import cuda_emu


class Tagged(np.ndarray):
    """A host array that says it lives on the GPU (its type's module starts with "cupy"), with
    CuPy's ``get()``: the code under test only asks where arrays are and copies them home."""

    def get(self):
        return np.array(self.view(np.ndarray))


Tagged.__module__ = "cupy._tagged_for_tests"


def tagged(a):
    return np.asarray(a).view(Tagged)


def on_the_host(call, *args):
    """``call(*args)`` with the optimizers' NumPy rules, where a test steps others through the
    fused kernels (fixture ``fused_on_host``)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(rk.optim, "_FUSED_ON_HOST", False)
        return call(*args)


def _cupy_installed():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def lm(V=7, E=5, H=6, dtype="float64", seed=0):
    """Embedding -> LSTM -> Dense, the model of the device parity test."""
    return rk.Sequential([rk.Embedding(V, E, seed=seed, dtype=dtype),
                          rk.LSTM(E, H, seed=seed + 1, dtype=dtype),
                          rk.Dense(H, V, seed=seed + 2, dtype=dtype)])


def every_module(dtype="float64"):
    return [rk.Dense(3, 4, seed=0, dtype=dtype), rk.Embedding(5, 3, seed=0, dtype=dtype),
            rk.OneHot(5, dtype=dtype), rk.Dropout(0.3, seed=0), rk.LastStep(),
            rk.LSTM(3, 4, seed=0, dtype=dtype), rk.GRU(3, 4, 2, seed=0, dtype=dtype),
            rk.RNN(3, 4, seed=0, dtype=dtype, bidirectional=True)]


# ====================================================================== rnnkern.device
def test_array_module_and_device_of():
    a = np.zeros(3)
    assert device.array_module(a) is np and device.device_of(a) == "cpu"
    assert device.device_of(tagged(a)) == "cuda" and device.is_device_array(tagged(a))
    assert device.device_of([1, 2]) == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:0", "", None, 0])
def test_bad_device_names_are_refused(bad):
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda', got"):
        device.check_device(bad)
    with pytest.raises(ValueError, match="device must be"):
        lm().to(bad)
    for m in every_module():
        with pytest.raises(ValueError, match="device must be"):
            m.to(bad)
    with pytest.raises(ValueError, match="device must be"):
        layers.dropout_mask(np.random.default_rng(0), (2,), 0.5, np.float32, device=bad)


def test_to_device_on_the_host():
    a = np.arange(4.0)
    assert device.to_device(a, "cpu") is a and device.to_host(a) is a
    b = device.to_host(a, copy=True)
    assert b is not a and np.array_equal(a, b)
    assert device.to_device(None, "cpu") is None
    assert device.to_device([1, 2], "cpu").tolist() == [1, 2]
    host = device.to_host(tagged(a))                       # a "device" array comes home
    assert type(host) is np.ndarray and np.array_equal(host, a)


@pytest.mark.skipif(_cupy_installed(), reason="CuPy is installed here")
def test_missing_cupy_names_what_to_install():
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x or cupy-cuda13x"):
        device.to_device(np.zeros(2), "cuda")
    model = lm()
    with pytest.raises(ImportError, match="needs CuPy"):
        model.to("cuda")
    # the backend's probe gives the same words (one copy)
    assert cuda.available() == (False, device.CUPY_MISSING)


def test_importing_rnnkern_leaves_cupy_alone(tmp_path):
    """A stand-in cupy on the path that ends the process when imported: even a guarded import
    (try: import cupy) at import time would show, where CuPy is not installed."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("import os\nos._exit(17)\n")
    code = ("import sys, rnnkern, rnnkern.device, rnnkern.backends.cuda.elementwise; "
            "print('cupy' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (res.returncode, res.stdout.strip()) == (0, "False"), res.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import cupy"], env=env)
    assert probe.returncode == 17                  # the stand-in is what 'import cupy' finds


# ====================================================================== to() and .device
def test_every_module_moves_to_cpu_and_says_where_it_is():
    for m in every_module():
        before = {k: v.copy() for k, v in m.params.items()}
        assert m.to("cpu") is m
        assert m.device == (None if isinstance(m, (rk.Dropout, rk.LastStep)) else "cpu")
        for k, v in m.params.items():
            assert type(v) is np.ndarray and np.array_equal(v, before[k]), k
        for k, g in m.grads.items():
            assert type(g) is np.ndarray and g.shape == m.params[k].shape, k


def test_sequential_round_trip_keeps_values_and_training():
    model = lm()
    x = np.array([[1, 2, 3], [4, 5, 6]])
    before = model(x)
    assert model.to("cpu") is model and model.device == "cpu"
    np.testing.assert_array_equal(model(x), before)
    model.backward(np.ones_like(before))                   # forward kept after the move
    rk.Adam(0.1).step(model.params, model.grads)
    assert model.device == "cpu"


def test_a_cpu_backend_layer_refuses_the_gpu_before_moving():
    lstm = rk.LSTM(2, 3, backend="numpy")
    with pytest.raises(ValueError, match=r"backend='numpy' runs on the CPU.*'auto' or 'cuda'"):
        lstm.to("cuda")
    assert lstm.device == "cpu"


def test_to_drops_what_a_forward_kept():
    model = lm()
    model(np.array([[1, 2]]))
    model.to("cpu")
    assert all(getattr(m, a, None) is None for m in model for a in ("_x", "_ids", "_saved"))
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.zeros((1, 2, 7)))


def test_sequential_device_of_mixed_layers_names_them():
    model = lm()
    model[2].params["weight"] = tagged(model[2].params["weight"])    # one layer "moved"
    model[2].params["bias"] = tagged(model[2].params["bias"])
    with pytest.raises(RuntimeError, match=r"cpu: layers \[0, 1\].*cuda: layers \[2\]"):
        model.device


def test_parameter_free_model_remembers_to():
    model = rk.Sequential([rk.Dropout(0.5, seed=0), rk.LastStep()])
    assert model.device == "cpu" and model.to("cpu").device == "cpu"


def test_layer_without_to_is_named():
    class Bare:
        params, grads = {}, {}

        def forward(self, x, lengths=None):
            return x

        def backward(self, d):
            return d

        def train(self, mode=True):
            return self

    with pytest.raises(TypeError, match=r"layers\[1\] \(Bare\) has no to"):
        rk.Sequential([rk.Dense(2, 2), Bare()]).to("cpu")


# ====================================================================== device mismatch
@pytest.mark.parametrize("module, x", [
    (rk.Dense(3, 2, dtype="float64"), np.zeros((2, 3))),
    (rk.Embedding(5, 3), np.array([[1, 2]])),
    (rk.OneHot(5), np.array([[1, 2]])),
    (rk.LSTM(3, 2), np.zeros((1, 2, 3))),
    (rk.GRU(3, 2, bidirectional=True), np.zeros((1, 2, 3))),
], ids=["Dense", "Embedding", "OneHot", "LSTM", "GRU"])
def test_input_on_another_device_names_both(module, x):
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"{name}: .* is on 'cuda' but the parameters are on "
                                         rf"'cpu'.*\.to\('cuda'\)"):
        module(tagged(x))
    # and the other way: parameters "on the GPU", input on the host
    for k, v in module.params.items():
        module.params[k] = tagged(v)
    if isinstance(module, rk.OneHot):
        module._table = tagged(module._table)
    with pytest.raises(ValueError, match=rf"{name}: .* is on 'cpu' but the parameters are on "
                                         rf"'cuda'.*to_device"):
        module(x)


def test_parameter_free_modules_follow_their_input():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    assert rk.LastStep()(x).shape == (2, 4)
    drop = rk.Dropout(0.5, seed=0).eval()
    assert drop(x) is x


def test_sequential_names_the_layer_that_refuses():
    model = lm()
    with pytest.raises(ValueError, match=r"Embedding: ids is on 'cuda'"):
        model(tagged(np.array([[1, 2]])))


def test_optimizer_refuses_grads_on_another_device():
    p = {"w": np.ones(3)}
    with pytest.raises(ValueError, match=r"grads\['w'\] is on 'cuda' but params\['w'\] is on "
                                         r"'cpu'"):
        rk.Adam().step(p, {"w": tagged(np.ones(3))})
    with pytest.raises(ValueError, match="different devices"):
        rk.SGD().step({"a": np.ones(2), "b": tagged(np.ones(2))},
                      {"a": np.ones(2), "b": tagged(np.ones(2))})
    with pytest.raises(ValueError, match="mix host and GPU"):
        rk.clip_grad_norm([np.ones(2), tagged(np.ones(2))], 1.0)
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        rk.SGD().step({"w": [1.0]}, {"w": np.ones(1)})


# ====================================================================== optimizer state
def test_optimizer_state_lives_on_the_host_for_host_params():
    params = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    grads = {"w": np.full((2, 3), 0.5), "b": np.ones(3)}
    opt = rk.Adam(0.1)
    assert opt.device == "cpu"
    opt.step(params, grads)
    assert opt.device == "cpu"
    sd = opt.state_dict()
    for k, st in sd["state"].items():
        for s, a in st.items():
            assert type(a) is np.ndarray
            a += 1.0                                   # a copy: the optimizer is untouched
            assert not np.array_equal(a, opt.state[k][s])
    fresh = rk.Adam(0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.device == "cpu"
    for k in opt.state:
        for s in opt.state[k]:
            assert type(fresh.state[k][s]) is np.ndarray
            np.testing.assert_array_equal(fresh.state[k][s], opt.state[k][s])


def test_state_dict_brings_device_state_home_and_load_puts_it_on_the_host_device():
    opt = rk.RMSprop(0.1, momentum=0.5)
    opt.state = {"w": {"square_avg": tagged(np.arange(3.0)),
                       "momentum_buffer": tagged(np.ones(3))}}
    sd = opt.state_dict()
    assert all(type(a) is np.ndarray for a in sd["state"]["w"].values())
    np.testing.assert_array_equal(sd["state"]["w"]["square_avg"], np.arange(3.0))
    fresh = rk.RMSprop(0.1, momentum=0.5)
    fresh.load_state_dict({**sd, "state": {"w": {s: tagged(a) for s, a in
                                                 sd["state"]["w"].items()}}})
    assert all(type(a) is np.ndarray for a in fresh.state["w"].values())


def test_state_follows_the_parameters_device(monkeypatch):
    """The placement rule with a stand-in copy to the "GPU" (Tagged arrays): the state moves
    when the parameters' device changes, load_state_dict lands on the optimizer's device,
    state_dict is always host arrays."""
    from rnnkern import optim
    monkeypatch.setattr(optim, "to_device", lambda a, d: tagged(a) if d == "cuda"
                        else device.to_host(a))
    params = {"w": np.ones(4), "b": np.zeros(2)}
    opt = rk.Adam(0.1)
    opt.step(params, {"w": np.ones(4), "b": np.ones(2)})
    assert opt._flat is not None
    opt._follow("cuda")                                 # what a step on GPU params does first
    assert opt.device == "cuda" and opt._flat is None
    assert all(type(a) is Tagged for st in opt.state.values() for a in st.values())
    sd = opt.state_dict()
    assert all(type(a) is np.ndarray for st in sd["state"].values() for a in st.values())
    fresh = rk.Adam(0.1)
    fresh._follow("cuda")
    fresh.load_state_dict(sd)                           # onto the device of its parameters
    assert all(type(a) is Tagged for st in fresh.state.values() for a in st.values())
    opt._follow("cpu")
    assert opt.device == "cpu"
    assert all(type(a) is np.ndarray for st in opt.state.values() for a in st.values())
    opt.step(params, {"w": np.ones(4), "b": np.ones(2)})   # and goes on from the same numbers
    ref = rk.Adam(0.1)
    ref_params = {"w": np.ones(4), "b": np.zeros(2)}
    for _ in range(2):
        ref.step(ref_params, {"w": np.ones(4), "b": np.ones(2)})
    for k in params:
        np.testing.assert_array_equal(params[k], ref_params[k])


def test_clip_on_the_host_is_unchanged():
    g = [np.array([3.0, 4.0]), np.array([0.0])]
    assert rk.clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g[0], [0.6, 0.8])
    g = {"a": np.array([-3.0, 0.5])}
    rk.clip_grad_value(g, 1.0)
    np.testing.assert_array_equal(g["a"], [-1.0, 0.5])


# ====================================================================== losses, checkpoints
def test_host_losses_return_floats():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4))
    loss, d = rk.sequence_loss(logits, rng.integers(0, 4, (2, 3)), return_grad=True)
    assert type(loss) is float and d.shape == logits.shape
    assert type(rk.mse(logits, logits * 0)) is float
    assert type(rk.sum_squares(logits, logits * 0)) is float


@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 3)])
def test_one_hot_matches_put_along_axis(shape):
    idx = np.random.default_rng(1).integers(0, 5, shape)
    want = np.zeros(idx.shape + (5,), np.float32)
    np.put_along_axis(want, idx[..., None], 1, axis=-1)
    got = rk.one_hot(idx, 5)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, depth\) = \[0, 5\), got min"):
        rk.one_hot(np.array([0, 5]), 5)


def test_device_targets_of_host_logits_come_home_and_are_checked():
    """Targets 'on the GPU' paired with host logits come home and are checked there."""
    logits = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C\) = \[0, 3\)"):
        rk.sequence_loss(logits, tagged(np.array([[0, 3]])))


def test_checkpoint_of_device_arrays_holds_host_arrays(tmp_path):
    """A model saved from the GPU: its arrays are written as host copies and load on the CPU."""
    model, opt = lm(), rk.Adam(0.1)
    x, y = np.array([[1, 2, 3]]), np.array([[2, 3, 4]])
    _, d = rk.sequence_loss(model(x), y, return_grad=True)
    model.backward(d)
    opt.step(model.params, model.grads)
    device_params = {k: tagged(v) for k, v in model.params.items()}
    state = opt.state_dict()
    state["state"] = {k: {s: tagged(a) for s, a in st.items()} for k, st in state["state"].items()}
    rk.save_checkpoint(tmp_path / "gpu.npz", params=device_params, optimizer_state=state,
                       arrays={"h": tagged(np.ones((1, 1, 6)))})
    ck = rk.load_checkpoint(tmp_path / "gpu.npz")
    cpu_model = lm(seed=5)
    cpu_model.load_params(ck["params"])
    for k, v in model.params.items():
        assert type(ck["params"][k]) is np.ndarray
        np.testing.assert_array_equal(cpu_model.params[k], v)
    cpu_opt = rk.Adam(0.1)
    cpu_opt.load_state_dict(ck["optimizer_state"])
    for k in opt.state:
        for s in opt.state[k]:
            np.testing.assert_array_equal(cpu_opt.state[k][s], opt.state[k][s])
    np.testing.assert_array_equal(ck["arrays"]["h"], np.ones((1, 1, 6)))


def test_recurrent_load_params_takes_device_values_onto_its_device():
    src, dst = rk.GRU(3, 4, seed=0, dtype="float64"), rk.GRU(3, 4, seed=1, dtype="float64")
    dst.load_params({k: tagged(v) for k, v in src.params.items()})
    assert dst.device == "cpu"
    for k, v in src.params.items():
        assert type(dst.params[k]) is np.ndarray
        np.testing.assert_array_equal(dst.params[k], v)


# ====================================================================== generate, inference
def test_generate_of_a_host_model_is_unchanged():
    model = lm()
    a = rk.generate(model, [1, 2, 3], 6, temperature=0.8, rng=3)
    b = rk.generate(model.to("cpu"), [1, 2, 3], 6, temperature=0.8, rng=3)
    np.testing.assert_array_equal(a, b)


def test_compiled_inference_refuses_a_model_on_the_gpu():
    from rnnkern.inference import inference_reason
    model = lm()
    for layer in model:
        for k, v in layer.params.items():
            layer.params[k] = tagged(v)
    assert "GPU" in inference_reason(model)


# ====================================================================== the kernels, emulated
needs_gxx = pytest.mark.skipif(cuda_emu.compiler() is None, reason="g++ not found: cannot "
                               "build the host emulation of the CUDA kernels")


@pytest.fixture(scope="module")
def emu_runtime(tmp_path_factory):
    return cuda_emu.EmuRuntime(n_sm=3, outdir=str(tmp_path_factory.mktemp("cuda_emu_device")))


@pytest.fixture
def emulated(emu_runtime, monkeypatch):
    """The cuda backend's runtime emulated on host threads; 32 threads a block and at most one
    block per 'SM' (3), so element-wise kernels loop over their grid-stride."""
    monkeypatch.setattr(cuda.runtime, "_runtime", emu_runtime)
    monkeypatch.setattr(config, "CUDA_THREADS", 32)
    monkeypatch.setattr(config, "CUDA_ELEMENTWISE_BLOCKS_PER_SM", 1)
    return emu_runtime


@pytest.fixture
def fused_on_host(emulated, monkeypatch):
    """Optimizers step host arrays through their fused kernels (the device path), emulated."""
    from rnnkern import optim
    monkeypatch.setattr(optim, "_FUSED_ON_HOST", True)
    return emulated


OPTIMIZERS = {
    "sgd": lambda: rk.SGD(0.1),
    "sgd-wd": lambda: rk.SGD(0.1, weight_decay=0.01),
    "sgd-momentum": lambda: rk.SGD(0.1, momentum=0.9),
    "sgd-nesterov-wd": lambda: rk.SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
    "adam-tf": lambda: rk.Adam(0.01),
    "adam-torch-wd": lambda: rk.Adam(0.01, eps=1e-6, eps_mode="torch", weight_decay=0.1),
    "rmsprop": lambda: rk.RMSprop(0.01),
    "rmsprop-centered-momentum": lambda: rk.RMSprop(0.01, momentum=0.9, centered=True),
    "rmsprop-momentum": lambda: rk.RMSprop(0.01, momentum=0.5),
    "adagrad": lambda: rk.Adagrad(0.1, initial_accumulator_value=0.1),
}
LAYOUT = (("w", (5, 7)), ("b", (7,)), ("v", (3, 2, 11)))    # N = 108 > 3 blocks x 32 threads
KERNELS = {rk.SGD: "rk_sgd_update", rk.Adam: "rk_adam_update", rk.RMSprop: "rk_rmsprop_update",
           rk.Adagrad: "rk_adagrad_update"}


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_fused_update_equals_the_numpy_rule_to_the_bit(fused_on_host, make, dtype):
    """Four steps of step_flat with the fused kernel against the NumPy rule: parameters, every
    state slot and the step count equal bit for bit (the gate and one update launch a step)."""
    rng = np.random.default_rng(0)
    n = sum(int(np.prod(s)) for _, s in LAYOUT)
    p0 = rng.standard_normal(n).astype(dtype)
    ref, fused = make(), make()
    p_ref, p_fused = p0.copy(), p0.copy()
    for _ in range(4):
        g = (rng.standard_normal(n) * 3).astype(dtype)
        on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        before = len(fused_on_host.launches)
        fused.step_flat(p_fused, g.copy(), LAYOUT)
        assert [name for name, *_ in fused_on_host.launches[before:]] == \
            ["rk_step_gate", KERNELS[type(fused)]]
        np.testing.assert_array_equal(p_fused, p_ref)
        assert fused._clock is not None and fused.iterations == ref.iterations
        assert ref.state.keys() == fused.state.keys()
        for k in ref.state:
            assert ref.state[k].keys() == fused.state[k].keys()
            for s in ref.state[k]:
                np.testing.assert_array_equal(fused.state[k][s], ref.state[k][s], err_msg=s)
    assert not np.array_equal(p_ref, p0)


@needs_gxx
def test_fused_update_of_a_strided_parameter(fused_on_host):
    """Parameters of two dtypes take a launch each, after one gate; a non-contiguous one is
    updated through a contiguous copy, written back."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((6, 8))
    ref = {"w": big[:, ::2].copy(), "b": np.ones(3, np.float32)}
    got = {"w": big.copy()[:, ::2], "b": np.ones(3, np.float32)}
    opt_ref, opt = rk.Adam(0.1), rk.Adam(0.1)
    for _ in range(2):
        g = {"w": rng.standard_normal((6, 4)), "b": rng.standard_normal(3).astype(np.float32)}
        on_the_host(opt_ref.step, ref, {k: v.copy() for k, v in g.items()})
        before = len(fused_on_host.launches)
        opt.step(got, g)
        assert [n for n, *_ in fused_on_host.launches[before:]] == \
            ["rk_step_gate", "rk_adam_update", "rk_adam_update"]
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
            np.testing.assert_array_equal(opt.state[k]["v"], opt_ref.state[k]["v"])
    assert not got["w"].flags.c_contiguous


@needs_gxx
def test_fused_clipped_update_equals_the_host_step(fused_on_host):
    """step_flat with clipping (value, then norm) and the fused rule: the host step's bits."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(108)
    ref = rk.SGD(0.1, momentum=0.9, clip_norm=1.0, clip_value=2.0)
    fused = rk.SGD(0.1, momentum=0.9, clip_norm=1.0, clip_value=2.0)
    p_ref, p_fused = p0.copy(), p0.copy()
    for _ in range(3):
        g = rng.standard_normal(108) * 5
        on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        fused.step_flat(p_fused, g.copy(), LAYOUT)
        np.testing.assert_array_equal(p_fused, p_ref)
        assert fused.last_grad_norm == ref.last_grad_norm > 1.0


def splitmix_mask(key, n, p, dtype):
    """csrc/cuda/dropout.cu in NumPy (uint64 arithmetic wraps as the kernel's does)."""
    gamma = np.uint64(0x9E3779B97F4A7C15)
    z = np.uint64(key) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * gamma
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53        # exact: 53 bits
    keep = 1.0 - p
    return np.where(u < keep, np.asarray(1.0 / keep).astype(dtype), dtype(0)).astype(dtype)


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9])
def test_device_dropout_mask_is_the_counter_generator(emulated, p, dtype):
    shape = (4, 5, 7)
    rng = np.random.default_rng(11)
    mask = layers.dropout_mask(rng, shape, p, dtype, device="cuda")
    key = int(np.random.default_rng(11).integers(0, 2 ** 63))          # ONE draw from rng
    want = splitmix_mask(key, 140, p, dtype).reshape(shape)
    assert mask.dtype == dtype and mask.shape == shape
    np.testing.assert_array_equal(mask, want)
    # the generator moved by exactly that one draw
    follow = np.random.default_rng(11)
    follow.integers(0, 2 ** 63)
    assert rng.random() == follow.random()
    again = layers.dropout_mask(np.random.default_rng(11), shape, p, dtype, device="cuda")
    np.testing.assert_array_equal(again, mask)                           # reproducible
    out = np.full(shape, np.nan, dtype)
    assert layers.dropout_mask(np.random.default_rng(11), shape, p, dtype, out=out,
                               device="cuda") is out
    np.testing.assert_array_equal(out, mask)


def test_counter_generator_keeps_the_right_fraction():
    """The NumPy twin of the kernel: kept fraction near 1-p, values 0 or 1/(1-p), and masks of
    neighbouring keys uncorrelated."""
    n = 200_000
    for p in (0.1, 0.5, 0.8):
        m = splitmix_mask(12345, n, p, np.float64)
        assert set(np.unique(m)) <= {0.0, 1.0 / (1.0 - p)}
        assert abs(np.count_nonzero(m) / n - (1 - p)) < 4 * np.sqrt(p * (1 - p) / n)
    a, b = splitmix_mask(7, n, 0.5, np.float64) > 0, splitmix_mask(8, n, 0.5, np.float64) > 0
    assert abs(np.mean(a == b) - 0.5) < 0.01


@needs_gxx
def test_emulated_mask_refuses_a_wrong_out(emulated):
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array"):
        layers.dropout_mask(np.random.default_rng(0), (3, 4), 0.5, np.float32,
                            out=np.zeros((4, 3), np.float32)[:, :2], device="cuda")


# ====================================================================== on a GPU
def _gpu():
    ok, reason = cuda.available()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    import cupy
    return cupy


def _train(model, opt, batches, device_name):
    """A few Adam steps of model (already on device_name); the losses as floats."""
    losses = []
    for x, y in batches:
        x, y = device.to_device(x, device_name), device.to_device(y, device_name)
        loss, d = rk.sequence_loss(model(x), y, return_grad=True)
        model.backward(d)
        opt.step(model.params, model.grads)
        losses.append(float(loss))
    return losses


def _batches(n=3, B=4, T=6, V=7, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)]


@pytest.mark.gpu
def test_gpu_whole_model_trains_as_on_the_cpu():
    """Embedding -> LSTM -> Dense, sequence_loss, Adam with clipping, float64: three steps on
    the device equal the CPU run (losses and every parameter, rtol 1e-10)."""
    cupy = _gpu()
    cpu, gpu = lm(), lm().to("cuda")
    assert gpu.device == "cuda" and all(isinstance(v, cupy.ndarray) for v in gpu.params.values())
    opt_c, opt_g = rk.Adam(0.05, clip_norm=0.5), rk.Adam(0.05, clip_norm=0.5)
    loss_c = _train(cpu, opt_c, _batches(), "cpu")
    loss_g = _train(gpu, opt_g, _batches(), "cuda")
    np.testing.assert_allclose(loss_g, loss_c, rtol=1e-10)
    for k, v in cpu.params.items():
        np.testing.assert_allclose(cupy.asnumpy(gpu.params[k]), v, rtol=1e-10, atol=1e-12,
                                   err_msg=k)
    assert opt_g.device == "cuda"
    assert all(isinstance(a, cupy.ndarray) for st in opt_g.state.values() for a in st.values())
    assert isinstance(opt_g.last_grad_norm, cupy.ndarray)
    np.testing.assert_allclose(float(opt_g.last_grad_norm), opt_c.last_grad_norm, rtol=1e-10)


@pytest.mark.gpu
def test_gpu_losses_stay_on_the_device():
    cupy = _gpu()
    rng = np.random.default_rng(0)
    logits, y = rng.standard_normal((3, 4, 5)), rng.integers(0, 5, (3, 4))
    w = rng.random((3, 4))
    for weights in (None, w):
        want, d_want = rk.sequence_loss(logits, y, weights, return_grad=True)
        got, d_got = rk.sequence_loss(cupy.asarray(logits), y, weights, return_grad=True)
        assert isinstance(got, cupy.ndarray) and got.shape == ()
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
        np.testing.assert_allclose(cupy.asnumpy(d_got), d_want, rtol=1e-12, atol=1e-15)
    got = rk.mse(cupy.asarray(logits), logits * 0.5)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(float(got), rk.mse(logits, logits * 0.5), rtol=1e-12)
    np.testing.assert_array_equal(cupy.asnumpy(rk.one_hot(cupy.asarray(y), 5)), rk.one_hot(y, 5))


@pytest.mark.gpu
def test_gpu_input_on_the_host_is_refused():
    _gpu()
    model = lm().to("cuda")
    with pytest.raises(ValueError, match=r"Embedding: ids is on 'cpu' but the parameters are on "
                                         r"'cuda'"):
        model(np.array([[1, 2]]))
    assert model.to("cpu").device == "cpu"
    assert all(type(v) is np.ndarray for v in model.params.values())


@pytest.mark.gpu
def test_gpu_embedding_gradient_equals_the_host_scatter():
    cupy = _gpu()
    emb = rk.Embedding(6, 3, seed=0, dtype="float64")
    ids = np.array([[1, 1, 5, 0], [5, 5, 1, 2]])           # repeats add up
    dy = np.random.default_rng(0).standard_normal((2, 4, 3))
    emb(ids)
    emb.backward(dy)
    want = emb.grads["weight"].copy()
    emb.to("cuda")
    emb(cupy.asarray(ids))
    emb.backward(cupy.asarray(dy))
    np.testing.assert_allclose(cupy.asnumpy(emb.grads["weight"]), want, rtol=1e-12, atol=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_gpu_fused_update_equals_the_numpy_rule(make, dtype):
    """Optimizer.step on device params (one fused launch over the flat buffers) against the
    NumPy rule on the same host params: equal to the bit, every step and state slot."""
    cupy = _gpu()
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal(s).astype(dtype) for k, s in LAYOUT}
    dev = {k: cupy.asarray(v) for k, v in host.items()}
    ref, fused = make(), make()
    for _ in range(3):
        g = {k: (rng.standard_normal(s) * 3).astype(dtype) for k, s in LAYOUT}
        ref.step(host, {k: v.copy() for k, v in g.items()})
        fused.step(dev, {k: cupy.asarray(v) for k, v in g.items()})
        for k in host:
            np.testing.assert_array_equal(cupy.asnumpy(dev[k]), host[k], err_msg=k)
            for s in ref.state[k]:
                np.testing.assert_array_equal(cupy.asnumpy(fused.state[k][s]), ref.state[k][s])


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.25, 0.6])
def test_gpu_dropout_masks_are_reproducible(p):
    """Dropout and the layers' inter-layer dropout on the device: the counter-generator masks of
    csrc/cuda/dropout.cu (equal to their NumPy twin), the same for the same seed, a new one each
    call, kept fraction near 1-p."""
    cupy = _gpu()
    x = cupy.ones((8, 50, 16), dtype=cupy.float32)
    a, b = rk.Dropout(p, seed=3), rk.Dropout(p, seed=3)
    ya, yb = a(x), b(x)
    np.testing.assert_array_equal(cupy.asnumpy(ya), cupy.asnumpy(yb))
    key = int(np.random.default_rng(3).integers(0, 2 ** 63))
    np.testing.assert_array_equal(cupy.asnumpy(ya).ravel(),
                                  splitmix_mask(key, x.size, p, np.float32))
    assert not bool((a(x) == ya).all())
    kept = float((ya > 0).mean())
    assert abs(kept - (1 - p)) < 0.02
    la = rk.LSTM(4, 5, 3, dropout=p, seed=1, dtype="float64").to("cuda")
    lb = rk.LSTM(4, 5, 3, dropout=p, seed=1, dtype="float64").to("cuda")
    xs = cupy.asarray(np.random.default_rng(0).standard_normal((3, 6, 4)))
    np.testing.assert_array_equal(cupy.asnumpy(la(xs)[0]), cupy.asnumpy(lb(xs)[0]))
    da, _ = la.backward(cupy.ones((3, 6, 5)))
    db, _ = lb.backward(cupy.ones((3, 6, 5)))
    np.testing.assert_array_equal(cupy.asnumpy(da), cupy.asnumpy(db))


@pytest.mark.gpu
def test_gpu_checkpoint_to_cpu_and_back(tmp_path):
    """Train on the GPU, save; load on the CPU (same parameters, same next step); load onto a
    GPU model again; the three continue alike."""
    cupy = _gpu()
    gpu, opt = lm().to("cuda"), rk.Adam(0.05)
    _train(gpu, opt, _batches(2), "cuda")
    rk.save_checkpoint(tmp_path / "g.npz", params=gpu.params, optimizer_state=opt.state_dict())
    ck = rk.load_checkpoint(tmp_path / "g.npz")
    cpu, opt_c = lm(seed=9), rk.Adam(0.05)
    cpu.load_params(ck["params"])
    opt_c.load_state_dict(ck["optimizer_state"])
    back, opt_b = lm(seed=8).to("cuda"), rk.Adam(0.05)
    back.load_params(ck["params"])
    opt_b.load_state_dict(ck["optimizer_state"])
    assert back.device == "cuda" and isinstance(back.params["1.weight_hh_l0"], cupy.ndarray)
    nxt = _batches(1, seed=5)
    losses = [_train(m, o, nxt, d) for m, o, d in ((gpu, opt, "cuda"), (cpu, opt_c, "cpu"),
                                                   (back, opt_b, "cuda"))]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-12)
    for k, v in cpu.params.items():
        np.testing.assert_allclose(cupy.asnumpy(gpu.params[k]), v, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cupy.asnumpy(back.params[k]), cupy.asnumpy(gpu.params[k]),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
def test_gpu_generate_equals_the_cpu_ids():
    _gpu()
    cpu, gpu = lm(), lm().to("cuda")
    for kwargs in (dict(temperature=0), dict(temperature=0.9, rng=4),
                   dict(temperature=1.0, top_k=3, rng=5)):
        want = rk.generate(cpu, [[1, 2, 3], [4, 0, 6]], 12, **kwargs)
        got = rk.generate(gpu, [[1, 2, 3], [4, 0, 6]], 12, **kwargs)
        np.testing.assert_array_equal(got, want, err_msg=str(kwargs))


@pytest.mark.gpu
def test_gpu_trainer_fits_saves_and_resumes_as_on_the_cpu(tmp_path):
    """A stateful Trainer over host batches: the GPU model (the GPU form of the step, batches
    copied to the device) follows the CPU one (a step plan) over 2 epochs with validation,
    float64; the GPU checkpoint resumes on the CPU and on the GPU alike."""
    cupy = _gpu()
    batches = _batches(n=4)
    runs = {}
    for name in ("cpu", "cuda"):
        model = lm().to(name)
        tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.05, clip_norm=0.5), stateful=True,
                        progress=False)
        hist = tr.fit(batches, epochs=2, val_data=batches[:2])
        if name == "cuda":
            assert "step plan on the device" in str(tr._step.plan)
            assert all(isinstance(v, cupy.ndarray) for v in model.params.values())
        tr.save(str(tmp_path / f"{name}.ckpt"))
        runs[name] = (hist, {k: device.to_host(v) for k, v in model.params.items()})
    (h_cpu, p_cpu), (h_gpu, p_gpu) = runs["cpu"], runs["cuda"]
    np.testing.assert_allclose(h_gpu["loss"], h_cpu["loss"], rtol=1e-10)
    np.testing.assert_allclose(h_gpu["val_loss"], h_cpu["val_loss"], rtol=1e-10)
    for k in p_cpu:
        np.testing.assert_allclose(p_gpu[k], p_cpu[k], rtol=1e-10, atol=1e-12, err_msg=k)
    resumed = {}
    for name in ("cpu", "cuda"):
        model = lm(seed=5).to(name)
        tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.05, clip_norm=0.5), stateful=True,
                        progress=False)
        tr.load(str(tmp_path / "cuda.ckpt"))
        tr.fit(batches, epochs=3)
        resumed[name] = {k: device.to_host(v) for k, v in model.params.items()}
    for k in resumed["cpu"]:
        np.testing.assert_allclose(resumed["cuda"][k], resumed["cpu"][k], rtol=1e-10,
                                   atol=1e-12, err_msg=k)
