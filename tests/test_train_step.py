"""TrainStep and its step plans: a plan gives the generic loop's results (the seam plans bit for
bit, the C++ one-call plan to float rounding), runs the layers on the backend they resolve to
when called directly, says which stage ran where, keeps the model's params/grads and the
optimizer's state consistent with the generic loop, falls back where it does not apply, and
rejects bad input with the generic loop's errors. The C++ call itself: tests/test_stack_step.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import backends
from rnnkern.step_plan.cpp import CppPlan
from rnnkern.step_plan.seam import SeamPlan

F64 = dict(rtol=1e-9, atol=1e-12)
CPU = ["numpy", "numba", "cpp"]
CELLS = [("lstm", {}), ("lstm", {"forget_bias": 0.0}), ("gru", {"reset_after": True}),
         ("gru", {"reset_after": False}), ("rnn", {"nonlinearity": "tanh"}),
         ("rnn", {"nonlinearity": "relu"})]
CELL_IDS = [f"{c}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for c, o in CELLS]


@pytest.fixture(params=CPU)
def backend(request):
    ok, reason = rk.available_backends()[request.param]
    if not ok:
        pytest.skip(reason)
    return request.param


def make_model(enc="onehot", cell="lstm", layers=(1,), V=6, H=5, C=4, dtype="float64",
               dropout=0.0, head_dropout=0.0, bias=True, seed=0, backend="auto", **cell_opts):
    """[OneHot(V) | Embedding(V,3) | nothing (floats of width V)] -> recurrent layers ->
    [Dropout] -> Dense(C)."""
    cls = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}[cell]
    mods, n_in = [], V
    if enc == "onehot":
        mods.append(rk.OneHot(V, dtype=dtype))
    elif enc == "embedding":
        mods.append(rk.Embedding(V, 3, seed=seed, dtype=dtype))
        n_in = 3
    for i, L in enumerate(layers):
        mods.append(cls(n_in, H, L, dtype=dtype, seed=seed + 1 + i, dropout=dropout,
                        backend=backend, **cell_opts))
        n_in = H
    if head_dropout:
        mods.append(rk.Dropout(head_dropout, seed=seed + 7))
    mods.append(rk.Dense(H, C, bias=bias, seed=seed + 9, dtype=dtype))
    return rk.Sequential(mods)


def batch(enc, B=3, T=4, V=6, C=4, dtype="float64", seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, V, (B, T)) if enc != "none"
         else rng.standard_normal((B, T, V)).astype(dtype))
    return x, rng.integers(0, C, (B, T))


def run_pair(build, make_opt, calls, loss=rk.sequence_loss):
    """The same calls through a planned and a generic TrainStep on identical models."""
    runs = []
    for generic in (False, True):
        model, opt = build(), make_opt()
        step = rk.TrainStep(model, loss, opt, generic=generic)
        out = [step(*args, **kwargs) for args, kwargs in calls]
        runs.append((model, opt, step, out))
    return runs


def _assert_close(a, b, exact, msg=""):
    if exact:
        np.testing.assert_array_equal(a, b, err_msg=msg)
    else:
        np.testing.assert_allclose(a, b, err_msg=msg, **F64)


def assert_same_run(planned, generic, exact=False):
    """Losses, returned states, parameters, gradients and optimizer state agree (``exact``:
    bit for bit)."""
    (m1, o1, s1, l1), (m2, o2, s2, l2) = planned, generic
    assert s1.plan is not None, s1.generic_reason
    assert s2.plan is None and s2.generic_reason == "generic=True"
    for a, b in zip(l1, l2):
        if isinstance(a, tuple):
            _assert_close(a[0], b[0], exact)
            flat_a = [v for s in a[1] if s is not None for v in (s if isinstance(s, tuple) else (s,))]
            flat_b = [v for s in b[1] if s is not None for v in (s if isinstance(s, tuple) else (s,))]
            assert len(flat_a) == len(flat_b)
            for va, vb in zip(flat_a, flat_b):
                _assert_close(va, vb, exact, "state")
        else:
            _assert_close(a, b, exact)
    assert m1.params.keys() == m2.params.keys()
    for k in m1.params:
        _assert_close(m1.params[k], m2.params[k], exact, k)
        _assert_close(m1.grads[k], m2.grads[k], exact, f"grad {k}")
    assert o1.iterations == o2.iterations
    st1, st2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert st1.keys() == st2.keys()
    for k in st1:
        for slot in st1[k]:
            _assert_close(st1[k][slot], st2[k][slot], exact, f"{k}.{slot}")


# ---------------------------------------------------------------------------------------------
# the plan matches the generic loop
@pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("enc", ["onehot", "embedding", "none"])
def test_plan_equals_generic_for_every_cell_input_and_backend(backend, cell, opts, enc):
    x, y = batch(enc)
    runs = run_pair(lambda: make_model(enc, cell, backend=backend, **opts),
                    lambda: rk.Adam(0.05), [((x, y), {})] * 3)
    assert type(runs[0][2].plan) is (CppPlan if backend == "cpp" else SeamPlan)
    assert runs[0][2].plan.backend.name == backend
    assert_same_run(*runs, exact=backend != "cpp")


@pytest.mark.parametrize("layers", [(2,), (1, 1), (2, 1)], ids=["2", "1+1", "2+1"])
def test_plan_equals_generic_stacked(backend, layers):
    x, y = batch("onehot")
    assert_same_run(*run_pair(lambda: make_model("onehot", "gru", layers, backend=backend),
                              lambda: rk.Adam(0.05), [((x, y), {})] * 3),
                    exact=backend != "cpp")


@pytest.mark.parametrize("enc", ["onehot", "embedding", "none"])
def test_plan_with_lengths_weights_and_state(backend, enc):
    x, y = batch(enc, B=4, T=5)
    rng = np.random.default_rng(3)
    lengths = np.array([5, 0, 3, 1])
    weights = rng.uniform(0, 1, (4, 5))
    weights[1] = 0
    h0 = rng.standard_normal((2, 4, 5))
    c0 = rng.standard_normal((2, 4, 5))
    state = ((h0, c0), None) if enc == "none" else (None, (h0, c0), None)
    calls = [((x, y), dict(lengths=lengths)),
             ((x, y), dict(weights=weights)),
             ((x, y), dict(initial_state=state, return_state=True)),
             ((x, y), dict(initial_state=state, lengths=lengths, weights=weights,
                           return_state=True)),
             ((x, y), {})]   # after a call with a state: zeros again
    assert_same_run(*run_pair(lambda: make_model(enc, "lstm", (2,), backend=backend),
                              lambda: rk.Adam(0.05), calls), exact=backend != "cpp")


@pytest.mark.parametrize("make_opt", [
    lambda: rk.SGD(0.1), lambda: rk.SGD(0.1, momentum=0.9, nesterov=True),
    lambda: rk.Adam(0.05, eps_mode="torch", weight_decay=0.01), lambda: rk.Adam(0.05, clip_norm=0.5),
    lambda: rk.RMSprop(0.01, centered=True, momentum=0.5), lambda: rk.Adagrad(0.1),
    lambda: rk.Adam(0.05, clip_value=0.01)],
    ids=["sgd", "nesterov", "adam-torch-wd", "adam-clip-norm", "rmsprop", "adagrad",
         "adam-clip-value"])
def test_plan_equals_generic_for_every_optimizer(backend, make_opt):
    x, y = batch("embedding")
    # clipping by the global norm sums the squares in another order over the flat array
    exact = backend != "cpp" and "clip_norm" not in repr(make_opt().__dict__)
    assert_same_run(*run_pair(lambda: make_model("embedding", "rnn", backend=backend),
                              make_opt, [((x, y), {})] * 3), exact=exact)


@pytest.mark.parametrize("enc", ["onehot", "none"])
def test_plan_with_dropout_between_cells_and_before_the_head(backend, enc):
    """The masks come from the same generators in the same order as the generic loop's."""
    x, y = batch(enc, B=4, T=5)
    runs = run_pair(lambda: make_model(enc, "gru", (3,), dropout=0.3, head_dropout=0.4,
                                       backend=backend),
                    lambda: rk.Adam(0.05), [((x, y), {})] * 3)
    assert_same_run(*runs, exact=backend != "cpp")
    # eval mode: no masks; the plan is rebuilt for it and still agrees
    for model, _, step, _ in runs:
        model.eval()
        step(x, y)
    assert_same_run(*runs, exact=backend != "cpp")


def test_float32_plan_close_to_generic(backend):
    x, y = batch("onehot", dtype="float32")
    runs = run_pair(lambda: make_model("onehot", "lstm", (2,), dtype="float32", backend=backend),
                    lambda: rk.Adam(0.05), [((x, y), {})] * 5)
    (m1, _, s1, l1), (m2, _, _, l2) = runs
    assert s1.plan is not None
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for k in m1.params:
        assert m1.params[k].dtype == np.float32
        np.testing.assert_allclose(m1.params[k], m2.params[k], rtol=1e-4, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------
# which plan runs, and what it says
def test_the_plan_runs_the_layers_on_their_direct_backend(monkeypatch):
    """A layer left on "auto" runs where it runs when called directly: the plan follows
    rnnkern.backends.resolve, including set_backend / RNNKERN_BACKEND."""
    x, y = batch("onehot")
    model = make_model("onehot", "gru")
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    step(x, y)
    direct = backends.resolve("auto", np.zeros(1)).name
    assert step.plan.backend.name == direct
    for name in CPU:
        if not rk.available_backends()[name][0]:
            continue
        monkeypatch.setenv("RNNKERN_BACKEND", name)
        step(x, y)
        assert step.plan.backend.name == name
        assert model.layers[1](np.zeros((1, 2, 6)))[0].shape == (1, 2, 5)


def test_the_plan_says_which_stage_runs_where(backend):
    x, y = batch("embedding")
    step = rk.TrainStep(make_model("embedding", "lstm", (2,), backend=backend),
                        rk.sequence_loss, rk.Adam(0.05))
    step(x, y)
    text = str(step.plan)
    assert f"backend {backend}" in text and "[B,T] = [3,4]" in text
    for stage in ("input", "stack", "head", "update"):
        assert f"  {stage} " in text
    assert "Embedding ids" in text and "LSTM(3->5 x2)" in text
    if backend == "cpp":
        assert "one call for the whole stack" in text
    else:
        assert f"{backend}, one seam call per cell" in text
    assert "Adam.step_flat" in text     # an embedding's gradient is formed after the call
    if backend == "cpp":
        assert "its rule in C++ after the call" in text
    assert repr(step).startswith("TrainStep(step plan")


def test_a_plain_adam_runs_inside_the_cpp_call_after_its_first_step():
    if not rk.available_backends()["cpp"][0]:
        pytest.skip(rk.available_backends()["cpp"][1])
    x, y = batch("onehot")
    step = rk.TrainStep(make_model("onehot", "rnn", backend="cpp"), rk.sequence_loss,
                        rk.Adam(0.05))
    step(x, y)
    assert "Adam.step_flat" in str(step.plan)          # the first step builds its flat state
    step(x, y)
    assert "Adam inside the call" in str(step.plan)


def test_falls_back_where_the_plan_does_not_apply():
    x, y = batch("onehot")
    cases = [
        (lambda m: rk.TrainStep(m, rk.mse, rk.Adam(0.1)), "loss is not rnnkern.sequence_loss"),
        (lambda m: rk.TrainStep(m, rk.sequence_loss, _OwnOptimizer()),
         "optimizer is not one of rnnkern.optim's"),
        (lambda m: rk.TrainStep(m, rk.sequence_loss, rk.Adam(0.1), generic=True),
         "generic=True"),
    ]
    for make, reason in cases:
        step = make(make_model())
        try:
            step(x, y)
        except Exception:   # noqa: BLE001 - mse on these shapes may refuse; the reason is set
            pass
        assert step.plan is None and step.generic_reason == reason
    model = rk.Sequential([rk.OneHot(6), rk.LSTM(6, 5), rk.LastStep(), rk.Dense(5, 4)])
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.1))
    with pytest.raises(ValueError):
        step(x, y)
    assert "Dense" in step.generic_reason
    model = rk.Sequential([rk.OneHot(6, dtype="float64"), rk.LSTM(6, 5, backend="numpy",
                                                                  dtype="float64"),
                           rk.GRU(5, 5, backend="numba", dtype="float64"),
                           rk.Dense(5, 4, dtype="float64")])
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.1))
    step(x, y)
    assert step.plan is None and "different backends" in step.generic_reason
    generic = rk.TrainStep(make_model(), rk.sequence_loss, rk.Adam(0.1), generic=True)
    assert "generic loop" in repr(generic)


class _OwnOptimizer(rk.SGD):
    def step(self, params, grads):
        return super().step(params, grads)


# ---------------------------------------------------------------------------------------------
# the model's params, grads and the optimizer's state stay one
def test_params_grads_and_state_stay_consistent_when_paths_mix(backend):
    x, y = batch("onehot")
    model, opt = make_model(backend=backend), rk.Adam(0.05)
    twin, twin_opt = make_model(backend=backend), rk.Adam(0.05)
    planned = rk.TrainStep(model, rk.sequence_loss, opt)
    generic = rk.TrainStep(model, rk.sequence_loss, opt, generic=True)
    reference = rk.TrainStep(twin, rk.sequence_loss, twin_opt, generic=True)
    for step in (planned, generic, planned, planned, generic):
        step(x, y)
        reference(x, y)
    assert planned.plan is not None
    for k in model.params:
        np.testing.assert_allclose(model.params[k], twin.params[k], err_msg=k, **F64)
        np.testing.assert_allclose(model.grads[k], twin.grads[k], err_msg=k, **F64)


def test_in_place_loads_and_replaced_parameters_reach_the_plan(backend):
    x, y = batch("onehot")
    model = make_model(backend=backend)
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    step(x, y)
    fresh = make_model(backend=backend, seed=5)
    model.load_params(fresh.params)                # in place: into the flat array
    twin = make_model(backend=backend, seed=5)
    twin_step = rk.TrainStep(twin, rk.sequence_loss, rk.Adam(0.05), generic=True)
    opt_state = step.optimizer.state_dict()
    twin_step.optimizer.load_state_dict(opt_state)
    assert step(x, y) == pytest.approx(twin_step(x, y), rel=1e-9)
    # a layer given new arrays (load_params replaces them): the next call rebinds
    model.layers[1].load_params(fresh.layers[1].params)
    twin.layers[1].load_params(fresh.layers[1].params)
    assert step(x, y) == pytest.approx(twin_step(x, y), rel=1e-9)
    for k in model.params:
        np.testing.assert_allclose(model.params[k], twin.params[k], err_msg=k, **F64)


def test_a_new_batch_shape_builds_a_new_plan(backend):
    model = make_model(backend=backend)
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    step(*batch("onehot", B=3, T=4))
    first = step.plan
    step(*batch("onehot", B=3, T=4, seed=2))
    assert step.plan is first
    step(*batch("onehot", B=2, T=7))
    assert step.plan is not first and step.plan.shape == (2, 7)


# ---------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize("enc", ["onehot", "embedding", "none"])
def test_bad_input_raises_like_the_generic_step_and_changes_nothing(backend, enc):
    x, y = batch(enc)
    bad_calls = [
        dict(y=np.full_like(y, 9)),                           # target outside [0, C)
        dict(y=y[:, :2]),                                     # targets of the wrong shape
        dict(y=y.astype(np.float64)),                         # float targets
        dict(lengths=np.array([5, 1, 1])),                    # a length past T
        dict(lengths=np.array([1, 1])),                       # lengths of the wrong shape
        dict(weights=np.ones((3, 2))),
        dict(weights=np.full((3, 4), np.nan)),
    ]
    if enc != "none":
        bad_calls += [dict(x=np.full_like(x, 6)), dict(x=np.full_like(x, -1)),
                      dict(x=x.astype(np.float64))]
    else:
        bad_calls += [dict(x=np.full_like(x, np.nan)), dict(x=x[..., :2])]
    for bad in bad_calls:
        args = dict(x=x, y=y)
        args.update(bad)
        kwargs = {k: v for k, v in args.items() if k not in ("x", "y")}
        errors = []
        for generic in (False, True):
            model = make_model(enc, "gru", (2,), dropout=0.5, backend=backend)
            rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05), generic=generic)(x, y)
            before = {k: v.copy() for k, v in model.params.items()}
            step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05), generic=generic)
            with pytest.raises((ValueError, TypeError)) as info:
                step(args["x"], args["y"], **kwargs)
            errors.append(type(info.value))
            for k, v in model.params.items():
                np.testing.assert_array_equal(v, before[k], err_msg=f"{bad}: {k} changed")
        assert errors[0] is errors[1], (bad, errors)


# ---------------------------------------------------------------------------------------------
# the trainer and the interpreted kernels
def test_trainer_steps_run_the_plan_and_equal_the_generic_loop(backend):
    data = [batch("embedding", seed=s) for s in range(3)]
    histories = []
    for generic in (False, True):
        model = make_model("embedding", "lstm", (2,), backend=backend)
        trainer = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.05), progress=False,
                             stateful=True, generic=generic)
        trainer.fit(data, epochs=2)
        histories.append(trainer.history["loss"])
        assert (trainer._step.plan is None) == generic
    np.testing.assert_allclose(histories[0], histories[1], **F64)


@pytest.mark.nojit
@pytest.mark.parametrize("enc", ["onehot", "none"])
def test_nojit_seam_plan(enc):
    """Small enough to run interpreted (CI repeats the nojit tests with NUMBA_DISABLE_JIT=1)."""
    x, y = batch(enc, B=2, T=3)
    assert_same_run(*run_pair(lambda: make_model(enc, "gru", backend="numba"),
                              lambda: rk.Adam(0.05), [((x, y), {})] * 2), exact=True)


# ---------------------------------------------------------------------------------------------
# failures leave nothing half-applied, and the plan and the generic loop fail alike
OPTIMIZERS = {"adam": lambda: rk.Adam(0.05),                    # C++: inside the call
              "adam-clip": lambda: rk.Adam(0.05, clip_norm=1.0),  # C++: after the call
              "sgd-momentum": lambda: rk.SGD(0.1, momentum=0.9)}


def _snapshot(model, opt):
    return ({k: v.copy() for k, v in model.params.items()}, opt.iterations,
            {k: {s: a.copy() for s, a in st.items()} for k, st in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, iterations, state = snap
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    assert opt.iterations == iterations
    assert opt.state.keys() == state.keys()
    for k, st in opt.state.items():
        for slot, a in st.items():
            np.testing.assert_array_equal(a, state[k][slot], err_msg=f"{k} {slot}")


@pytest.mark.parametrize("generic", [False, True], ids=["plan", "generic"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("cell, opts", CELLS[::2] + [CELLS[3]], ids=CELL_IDS[::2] + [CELL_IDS[3]])
def test_a_nonfinite_loss_updates_nothing_and_raises_or_skips(backend, cell, opts, opt_name,
                                                               generic):
    """NaN in a parameter: both paths raise NonFiniteLossError (or, with on_nonfinite="skip",
    return the NaN loss) with the parameters, the optimizer's state and its step count as they
    were; once the parameter is repaired, training goes on."""
    x, y = batch("onehot")
    for mode in ("raise", "skip"):
        model, opt = make_model("onehot", cell, (2,), backend=backend, **opts), OPTIMIZERS[opt_name]()
        step = rk.TrainStep(model, rk.sequence_loss, opt, generic=generic, on_nonfinite=mode)
        step(x, y)
        step(x, y)                   # Adam's flat state exists: its update runs inside the call
        name = f"1.weight_hh_l{1}"
        good = model.params[name][0, 0]
        model.params[name][0, 0] = np.nan
        snap = _snapshot(model, opt)
        if mode == "raise":
            with pytest.raises(rk.NonFiniteLossError, match="nothing was updated"):
                step(x, y)
            assert step.skipped == 0
        else:
            assert np.isnan(step(x, y))
            assert step.skipped == 1
        _assert_unchanged(model, opt, snap)
        model.params[name][0, 0] = good
        assert np.isfinite(step(x, y)) and opt.iterations == snap[1] + 1


def test_a_nonfinite_loss_from_any_model_in_the_generic_loop():
    """A model the plan does not cover (many-to-one, mse): NaN in a parameter is the same
    NonFiniteLossError with nothing updated; a bad input is still the input's ValueError."""
    model = rk.Sequential([rk.LSTM(3, 4, dtype="float64", seed=0),
                           rk.LSTM(4, 4, dtype="float64", seed=1), rk.LastStep(),
                           rk.Dense(4, 1, dtype="float64", seed=2)])
    opt = rk.Adam(0.1)
    step = rk.TrainStep(model, rk.mse, opt)
    x, y = np.random.default_rng(0).standard_normal((2, 5, 3)), np.zeros((2, 1))
    step(x, y)
    model.params["0.weight_hh_l0"][1, 2] = np.inf   # the second LSTM's input check sees NaN
    snap = _snapshot(model, opt)
    with pytest.raises(rk.NonFiniteLossError):
        step(x, y)
    assert step.plan is None
    _assert_unchanged(model, opt, snap)
    model.params["0.weight_hh_l0"][1, 2] = 0.0
    x[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        step(x, y)


@pytest.mark.parametrize("generic", [False, True], ids=["plan", "generic"])
@pytest.mark.parametrize("shape", [(0, 4), (3, 0)], ids=["B=0", "T=0"])
def test_an_empty_batch_is_refused_and_updates_nothing(backend, shape, generic):
    model, opt = make_model(backend=backend), rk.Adam(0.05)
    step = rk.TrainStep(model, rk.sequence_loss, opt, generic=generic)
    x, y = batch("onehot")
    step(x, y)
    snap = _snapshot(model, opt)
    empty = np.zeros(shape, np.int64)
    with pytest.raises(ValueError, match="empty batch"):
        step(empty, empty)
    _assert_unchanged(model, opt, snap)
    many_to_one = rk.Sequential([rk.LSTM(3, 4), rk.LastStep(), rk.Dense(4, 1)])
    with pytest.raises(ValueError, match="empty batch"):
        rk.TrainStep(many_to_one, rk.mse, rk.SGD(0.1))(np.zeros(shape + (3,), np.float32),
                                                       np.zeros((shape[0], 1), np.float32))
