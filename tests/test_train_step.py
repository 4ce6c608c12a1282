"""TrainStep: the fused training step gives the generic step's results (float64: to rounding),
keeps the model's params/grads and the optimizer's state consistent with the generic path, falls
back where it does not apply, and rejects bad input with the generic path's errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

import rnnkern as rk

pytest.importorskip("numba")

F64 = dict(rtol=1e-9, atol=1e-12)


def make_model(enc="onehot", cell="lstm", layers=(1,), V=6, H=5, C=4, dtype="float64",
               dropout=0.0, bias=True, seed=0, **cell_opts):
    """[OneHot(V) | Embedding(V,E) | nothing] -> recurrent layers -> Dense(C)."""
    cls = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}[cell]
    mods, n_in = [], V
    if enc == "onehot":
        mods.append(rk.OneHot(V, dtype=dtype))
    elif enc == "embedding":
        mods.append(rk.Embedding(V, 3, seed=seed, dtype=dtype))
        n_in = 3
    for i, L in enumerate(layers):
        mods.append(cls(n_in, H, L, dtype=dtype, seed=seed + 1 + i, dropout=dropout,
                        **cell_opts))
        n_in = H
    mods.append(rk.Dense(H, C, bias=bias, seed=seed + 9, dtype=dtype))
    return rk.Sequential(mods)


def batch(enc, B=3, T=4, V=6, C=4, dtype="float64", seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, T)) if enc != "none" else rng.standard_normal((B, T, V)).astype(dtype)
    return x, rng.integers(0, C, (B, T))


def run_both(build, opt_factory, calls, loss=rk.sequence_loss):
    """The same calls through a fused and a generic TrainStep on identical models."""
    results = []
    for fused in (None, False):
        model, opt = build(), opt_factory()
        step = rk.TrainStep(model, loss, opt, fused=fused)
        losses = [step(*args, **kwargs) for args, kwargs in calls]
        results.append((model, opt, step, losses))
    return results


def assert_same_run(fused, generic):
    (m1, o1, s1, l1), (m2, o2, s2, l2) = fused, generic
    assert s1.fused_reason is None, s1.fused_reason
    assert s2.fused_reason == "fused=False"
    for a, b in zip(l1, l2):
        if isinstance(a, tuple):
            np.testing.assert_allclose(a[0], b[0], **F64)
            for sa, sb in zip(a[1], b[1]):
                for xa, xb in zip(np.atleast_1d(sa if isinstance(sa, tuple) else (sa,)),
                                  np.atleast_1d(sb if isinstance(sb, tuple) else (sb,))):
                    if xa is not None:
                        np.testing.assert_allclose(xa, xb, **F64)
        else:
            np.testing.assert_allclose(a, b, **F64)
    p1, p2 = m1.params, m2.params
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], err_msg=k, **F64)
        np.testing.assert_allclose(m1.grads[k], m2.grads[k], err_msg=k, **F64)
    assert o1.iterations == o2.iterations
    st1, st2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert st1.keys() == st2.keys()
    for k in st1:
        for slot in st1[k]:
            np.testing.assert_allclose(st1[k][slot], st2[k][slot], err_msg=f"{k}.{slot}", **F64)


CELLS = [("lstm", {}), ("lstm", {"forget_bias": 0.0}), ("gru", {"reset_after": True}),
         ("gru", {"reset_after": False}), ("rnn", {"nonlinearity": "tanh"}),
         ("rnn", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("cell,opts", CELLS, ids=[f"{c}-{o}" for c, o in CELLS])
@pytest.mark.parametrize("enc", ["onehot", "embedding", "none"])
def test_fused_equals_generic_for_every_cell_and_input(cell, opts, enc):
    x, y = batch(enc)
    calls = [((x, y), {})] * 3
    assert_same_run(*run_both(lambda: make_model(enc, cell, **opts), lambda: rk.Adam(0.05),
                              calls))


@pytest.mark.parametrize("cell,opts", CELLS, ids=[f"{c}-{o}" for c, o in CELLS])
@pytest.mark.parametrize("enc", ["onehot", "embedding"])
@pytest.mark.parametrize("B,T", [(3, 4), (1, 2)], ids=["projected", "more-ids-than-rows"])
def test_ids_input_projected_or_not(cell, opts, enc, B, T):
    """With fewer vocabulary rows than batch rows the first projection is gathered from a table
    W_ih^T (projected); otherwise the ids are encoded and multiplied as the layers do."""
    x, y = batch(enc, B=B, T=T)
    runs = run_both(lambda: make_model(enc, cell, (2,), **opts), lambda: rk.Adam(0.05),
                    [((x, y), {})] * 2)
    assert_same_run(*runs)
    assert runs[0][2]._plan.project == (6 <= B * T)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 0), (0, 3)])
@pytest.mark.parametrize("enc", ["onehot", "none"])
def test_awkward_batch_shapes(enc, B, T):
    x, y = batch(enc, B=B, T=T)
    runs = run_both(lambda: make_model(enc, "lstm", (2,)), lambda: rk.Adam(0.05),
                    [((x, y), {})] * 2)
    if B * T:
        assert_same_run(*runs)
    else:                        # nothing to fuse: the generic step's zero loss, zero grads
        assert runs[0][2].fused_reason.startswith("empty batch")
        assert runs[0][3] == [0.0, 0.0]


@pytest.mark.parametrize("backend", ["numpy", "cpp", "numba"])
@pytest.mark.parametrize("cell,opts", [("lstm", {}), ("gru", {"reset_after": False}),
                                       ("rnn", {})])
def test_fused_through_any_cpu_backend(backend, cell, opts):
    """Layers on another CPU backend run through its seam inside the fused step (head, loss,
    update and dropout still fused): the same results as the generic step on that backend."""
    ok, why = rk.available_backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    x, y = batch("embedding", B=4, T=5)
    lengths = np.array([5, 0, 3, 2])

    def build():
        model = make_model("embedding", cell, (3, 1), dropout=0.3, **opts)
        for layer in model.layers[1:3]:
            layer.backend = backend
        return model
    calls = [((x, y), dict(lengths=lengths, return_state=True)), ((x, y), {})]
    runs = run_both(build, lambda: rk.Adam(0.05), calls)
    assert_same_run(*runs)
    plan = runs[0][2]._plan
    assert plan.backend.name == backend
    # the C++ LSTM reads the projected table by ids itself (no gather, no scatter here)
    assert plan.by_ids == (backend == "cpp" and cell == "lstm")
    assert (plan.stack is not None) == (backend == "cpp" and cell == "lstm")  # one call a step


@pytest.mark.parametrize("layers", [(2,), (1, 2)], ids=["one-2-layer", "two-stacked"])
def test_fused_equals_generic_stacked(layers):
    x, y = batch("onehot")
    assert_same_run(*run_both(lambda: make_model("onehot", "lstm", layers), lambda: rk.Adam(0.05),
                              [((x, y), {})] * 3))


def test_fused_equals_generic_with_lengths_weights_state():
    x, y = batch("embedding", B=4, T=5)
    lengths = np.array([5, 0, 3, 1])
    weights = (np.arange(5)[None] < lengths[:, None]).astype(float)
    rng = np.random.default_rng(3)
    h0 = rng.standard_normal((2, 4, 5))
    c0 = rng.standard_normal((2, 4, 5))
    state = (None, (h0, c0), None)
    calls = [((x, y), dict(lengths=lengths, weights=weights, initial_state=state,
                           return_state=True)),
             ((x, y), dict(lengths=lengths, return_state=True)),
             ((x, y), dict(weights=weights))]
    runs = run_both(lambda: make_model("embedding", "lstm", (2,)), lambda: rk.Adam(0.05), calls)
    assert_same_run(*runs)
    final = runs[0][3][0][1]
    assert final[0] is None and final[2] is None
    assert final[1][0].shape == (2, 4, 5) and final[1][1].shape == (2, 4, 5)
    # a zero-length row keeps its initial state
    np.testing.assert_allclose(final[1][0][:, 1], h0[:, 1])


@pytest.mark.parametrize("opt", [
    lambda: rk.SGD(0.1, momentum=0.9, clip_norm=0.5),
    lambda: rk.RMSprop(0.01, momentum=0.5, centered=True, clip_value=0.05),
    lambda: rk.Adagrad(0.1, initial_accumulator_value=0.1),
    lambda: rk.Adam(0.05, eps_mode="torch", weight_decay=0.01, clip_norm=0.3),
], ids=["sgd-momentum-clipnorm", "rmsprop-clipvalue", "adagrad", "adam-torch-wd"])
def test_fused_equals_generic_for_every_optimizer(opt):
    x, y = batch("onehot")
    runs = run_both(lambda: make_model("onehot", "gru"), opt, [((x, y), {})] * 3)
    assert_same_run(*runs)
    if runs[0][1].clip_norm is not None:
        np.testing.assert_allclose(runs[0][1].last_grad_norm, runs[1][1].last_grad_norm, **F64)


def test_float32_fused_close_to_generic():
    x, y = batch("onehot", dtype="float32")
    (m1, *_), (m2, *_) = run_both(lambda: make_model(dtype="float32"), lambda: rk.Adam(0.05),
                                  [((x, y), {})] * 5)
    for k in m1.params:
        assert m1.params[k].dtype == np.float32
        np.testing.assert_allclose(m1.params[k], m2.params[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_params_grads_and_state_stay_consistent_when_paths_mix():
    """fused, generic, load_params (new arrays), fused again == generic all the way."""
    x, y = batch("onehot")
    models = [make_model(), make_model()]
    opts = [rk.Adam(0.05), rk.Adam(0.05)]
    fused = rk.TrainStep(models[0], rk.sequence_loss, opts[0])
    generic0 = rk.TrainStep(models[0], rk.sequence_loss, opts[0], fused=False)
    generic1 = rk.TrainStep(models[1], rk.sequence_loss, opts[1], fused=False)
    fused(x, y)
    generic1(x, y)
    generic0(x, y)          # generic backward replaces the layers' grads arrays
    generic1(x, y)
    new = {k: v + 0.01 for k, v in models[1].layers[1].params.items()}
    for m in models:
        m.layers[1].load_params(new)   # replaces the arrays the fused plan had bound
    fused(x, y)
    assert fused.fused_reason is None
    generic1(x, y)
    for k in models[0].params:
        np.testing.assert_allclose(models[0].params[k], models[1].params[k], err_msg=k, **F64)
        np.testing.assert_allclose(models[0].grads[k], models[1].grads[k], err_msg=k, **F64)
    s0, s1 = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    for k in s1:
        np.testing.assert_allclose(s0[k]["m"], s1[k]["m"], **F64)
    # after a fused step the layers hold no forward for a bare backward() call
    with pytest.raises(RuntimeError, match="forward"):
        models[0].backward(np.zeros((3, 4, 4)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_equals_generic_with_dropout_between_cells(cell):
    """Same masks (each layer's own seeded generator, drawn in the same order), same results;
    in eval mode no masks."""
    x, y = batch("embedding", B=4, T=5)
    runs = run_both(lambda: make_model("embedding", cell, (3, 2), dropout=0.4),
                    lambda: rk.Adam(0.05), [((x, y), dict(return_state=True))] * 3)
    assert_same_run(*runs)
    for model, *_ in runs:
        model.eval()
    fused, generic = (rk.TrainStep(m, rk.sequence_loss, o, fused=f)
                      for (m, o, *_), f in zip(runs, (None, False)))
    np.testing.assert_allclose(fused(x, y), generic(x, y), **F64)
    assert fused.fused_reason is None


@pytest.mark.parametrize("backend", ["auto", "cpp", "numba"])
def test_fused_equals_generic_with_a_dropout_module_before_the_head(backend):
    """char-rnn's --dropout model: [Embedding, LSTM(dropout), Dropout, Dense]."""
    if backend != "auto" and not rk.available_backends()[backend][0]:
        pytest.skip(f"backend {backend!r} unavailable")
    x, y = batch("embedding", B=3, T=4)

    def build():
        m = make_model("embedding", "lstm", (2,), dropout=0.25)
        m.layers[1].backend = backend
        return rk.Sequential(m.layers[:2] + [rk.Dropout(0.3, seed=7)] + m.layers[2:])
    runs = run_both(build, lambda: rk.Adam(0.05), [((x, y), dict(return_state=True))] * 3)
    assert_same_run(*runs)
    assert runs[0][2]._plan.head_dropped is not None
    whole = backend == "cpp" or (backend == "auto" and rk.available_backends()["cpp"][0])
    assert (runs[0][2]._plan.stack is not None) == whole


def test_falls_back_where_fusing_does_not_apply():
    x, y = batch("onehot")

    def my_loss(pred, target, return_grad=False):
        return rk.sequence_loss(pred, target, return_grad=return_grad)
    step = rk.TrainStep(make_model(), my_loss, rk.Adam(0.05))
    step(x, y)
    assert "loss" in step.fused_reason

    model = make_model(layers=(1, 1))
    model.layers[1].backend = "numpy"
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    step(x, y)
    assert "different backends" in step.fused_reason

    no_head = rk.Sequential([rk.OneHot(6, dtype="float64"), rk.LSTM(6, 4, dtype="float64")])
    step = rk.TrainStep(no_head, rk.sequence_loss, rk.Adam(0.05))
    step(x, y)
    assert "Dense" in step.fused_reason


@pytest.mark.parametrize("cell,opts", [("lstm", {}), ("gru", {"reset_after": False})])
def test_fused_equals_generic_with_batch_chunks_on_threads(monkeypatch, cell, opts):
    from rnnkern import config
    from rnnkern.backends import numba_runtime
    if not numba_runtime.BLAS.locate():
        pytest.skip("no OpenBLAS thread control found: runs are never split here")
    monkeypatch.setattr(config, "SPLIT_MIN_FLOPS", 1)
    monkeypatch.setattr(config, "SPLIT_MIN_ROWS", 1)
    monkeypatch.setattr(config, "THREADS", 3)
    assert len(numba_runtime.plan_chunks(rk.CellSpec(cell, **opts), 7, 4, 6, 5)) == 3
    x, y = batch("embedding", B=7)
    lengths = np.array([4, 0, 3, 1, 4, 2, 4])
    calls = [((x, y), dict(lengths=lengths, return_state=True))] * 3
    assert_same_run(*run_both(lambda: make_model("embedding", cell, (2,), **opts),
                              lambda: rk.Adam(0.05, clip_norm=0.5), calls))


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_bad_input_raises_like_the_generic_step(backend):
    if backend != "auto" and not rk.available_backends()[backend][0]:
        pytest.skip(f"backend {backend!r} unavailable")
    model = make_model()
    model.layers[1].backend = backend
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    x, y = batch("onehot")
    for bad in (6, -1):   # the ids check comes before any kernel reads the table
        with pytest.raises(ValueError, match=rf"ids must lie in \[0, 6\), got {bad}"):
            step(np.where(np.arange(12).reshape(3, 4) == 7, bad, x), y)
    with pytest.raises(TypeError, match="integer ids"):
        step(x.astype(float), y)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C\) = \[0, 4\)"):
        step(x, np.full((3, 4), 4))
    with pytest.raises(ValueError, match="targets must have shape"):
        step(x, y[:, :2])
    with pytest.raises(ValueError, match="lengths must lie"):
        step(x, y, lengths=np.array([1, 2, 9]))
    with pytest.raises(ValueError, match="weights must have shape"):
        step(x, y, weights=np.ones((3, 3)))
    with pytest.raises(ValueError, match="initial_state"):
        step(x, y, initial_state=(None,))
    # nothing was updated by the failed calls
    assert step.optimizer.iterations == 0
    with pytest.raises(ValueError, match="fused"):
        rk.TrainStep(make_model(), rk.sequence_loss, rk.Adam(0.05), fused=True)


def test_trainer_steps_are_fused_and_equal_generic():
    x, y = batch("embedding", B=2, T=5)
    hist = []
    for fused in (None, False):
        model = make_model("embedding", "lstm", (2,))
        trainer = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.05), stateful=True,
                             progress=False, fused=fused)
        hist.append((trainer.fit([(x, y), (x, y)], epochs=2)["loss"], model.params,
                     trainer._step.fused_reason))
    np.testing.assert_allclose(hist[0][0], hist[1][0], **F64)
    for k in hist[0][1]:
        np.testing.assert_allclose(hist[0][1][k], hist[1][1][k], err_msg=k, **F64)
    assert hist[0][2] is None and hist[1][2] == "fused=False"


@pytest.mark.nojit
@pytest.mark.parametrize("enc,cell,B", [("onehot", "lstm", 3), ("embedding", "gru", 1),
                                        ("none", "rnn", 2)])
def test_nojit_fused_step_source(enc, cell, B):
    """Small enough to run interpreted (CI repeats the nojit tests with NUMBA_DISABLE_JIT=1), so
    the fused step's compiled helpers are covered as Python too."""
    x, y = batch(enc, B=B, T=3)
    assert_same_run(*run_both(lambda: make_model(enc, cell, (2,), dropout=0.3),
                              lambda: rk.Adam(0.05, clip_norm=1.0), [((x, y), {})] * 2))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_auto_layers_take_numba_when_small_and_the_cell_backend_when_large(monkeypatch, cell):
    """The size rule of TrainStep for layers left on "auto" (config.TRAIN_STEP_NUMBA_MAX_FLOPS):
    below it Numba's kept argument lists, unless the C++ whole-stack step takes the model (all
    LSTMs fed by ids, V <= B*T); a preset backend (set_backend / RNNKERN_BACKEND) always wins."""
    from rnnkern import backends, config
    if backends.preset() is not None:
        pytest.skip("a backend preset overrides the automatic choice")
    x, y = batch("onehot")
    step = rk.TrainStep(make_model("onehot", cell), rk.sequence_loss, rk.Adam(0.05))
    step(x, y)
    expected = backends.resolve("auto", np.zeros(1), cell).name
    if cell == "lstm" and expected == "cpp":
        assert step._plan.backend.name == "cpp" and step._plan.stack is not None
        wide = rk.TrainStep(make_model("onehot", cell, V=13), rk.sequence_loss, rk.Adam(0.05))
        wide(*batch("onehot", V=13))   # V = 13 > B*T = 12 rows: no whole stack, so Numba
        assert wide._plan.backend.name == "numba" and wide._plan.kept
    else:
        assert step._plan.backend.name == "numba" and step._plan.kept
    monkeypatch.setattr(config, "TRAIN_STEP_NUMBA_MAX_FLOPS", 0)
    step(x, y)
    assert step._plan.backend.name == expected and step.fused_reason is None
    monkeypatch.setattr(backends, "_chosen", "numpy")
    step(x, y)
    assert step._plan.backend.name == "numpy" and not step._plan.kept


def test_in_place_loads_reach_the_fused_step():
    """Sequential.load_params / a checkpoint load write into the current (flat-view) arrays:
    the next fused step trains from the loaded values, as the generic step would."""
    x, y = batch("onehot")
    models = [make_model(), make_model()]
    steps = [rk.TrainStep(m, rk.sequence_loss, rk.Adam(0.05), fused=f)
             for m, f in zip(models, (None, False))]
    for s in steps:
        s(x, y)
    snapshot = {k: v.copy() + 0.5 for k, v in models[1].params.items()}
    for m in models:
        m.load_params(snapshot)
    for s in steps:
        s(x, y)
    assert steps[0].fused_reason is None
    for k in models[0].params:
        np.testing.assert_allclose(models[0].params[k], models[1].params[k], err_msg=k, **F64)


@pytest.fixture
def cpp_threads():
    """Sets the C++ backend's thread count, forcing its batch split even at test sizes."""
    _C = pytest.importorskip("rnnkern._C", reason="rnnkern._C is not built")
    work = _C.split_min_work()

    def use(n):
        _C.set_threads(n)
        _C.set_split_min_work(0 if n > 1 else work)
    yield use
    _C.set_threads(0)
    _C.set_split_min_work(work)


STACKS = [  # (enc, layers, B, T, V, H, C, bias, dropout, head_dropout)
    ("onehot", (2,), 3, 4, 6, 5, 4, True, 0.0, 0.0),
    ("embedding", (1, 2), 4, 5, 6, 17, 6, False, 0.3, 0.2),
    ("onehot", (1,), 1, 6, 5, 1, 3, True, 0.0, 0.0),    # B=1, H=1
    ("embedding", (3,), 7, 1, 4, 33, 5, True, 0.25, 0.0),  # T=1, H over two vectors
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("case", STACKS, ids=[f"{s[0]}-L{s[1]}-B{s[2]}T{s[3]}H{s[5]}"
                                               for s in STACKS])
def test_whole_stack_step_equals_layer_by_layer(monkeypatch, cpp_threads, case, nthreads, dtype):
    """The C++ whole-stack step (csrc/cpu/lstm_stack.h) against the same fused step one layer
    call at a time: losses, final states, parameters and optimizer state over steps with
    lengths (incl. 0), position weights, an initial state and dropout masks."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    from rnnkern import train_step
    enc, layers, B, T, V, H, C, bias, dropout, head_dropout = case
    cpp_threads(nthreads)
    rng = np.random.default_rng(5)
    x = rng.integers(0, V, (B, T))
    x.flat[0] = V - 1  # the table's last row is read
    y = rng.integers(0, C, (B, T))
    lengths = rng.integers(0, T + 1, B)
    lengths[0] = T
    weights = rng.random((B, T))

    def build():
        m = make_model(enc, "lstm", layers, V=V, H=H, C=C, dtype=dtype, dropout=dropout,
                       bias=bias)
        for layer in m.layers[1:-1]:
            layer.backend = "cpp"
        if head_dropout:
            m = rk.Sequential(m.layers[:-1] + [rk.Dropout(head_dropout, seed=3)] + m.layers[-1:])
        return m

    state = None
    results = []
    for whole in (True, False):
        monkeypatch.setattr(train_step, "FUSE_WHOLE_STACK", whole)
        model = build()
        step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05, clip_norm=1.0))
        out = [step(x, y, lengths=lengths, weights=weights, return_state=True)]
        state = out[0][1]
        out.append(step(x, y, initial_state=state, return_state=True))
        out.append(step(x, y))
        assert step.fused_reason is None
        assert (step._plan.stack is not None) == whole
        results.append((out, model))
    tol = F64 if dtype == "float64" else dict(rtol=2e-4, atol=2e-5)
    (o1, m1), (o2, m2) = results
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a[0] if isinstance(a, tuple) else a,
                                   b[0] if isinstance(b, tuple) else b, **tol)
        if isinstance(a, tuple):
            for sa, sb in zip(a[1], b[1]):
                if sa is not None:
                    for xa, xb in zip(sa, sb):
                        np.testing.assert_allclose(xa, xb, **tol)
    for k in m1.params:
        np.testing.assert_allclose(m1.params[k], m2.params[k], err_msg=k, **tol)
        np.testing.assert_allclose(m1.grads[k], m2.grads[k], err_msg=k, **tol)


CUTS = {  # threads: held cuts of B = 9 rows, the even one first
    2: ([0, 4, 9], [0, 1, 9], [0, 8, 9], [0, 9, 9], [0, 0, 9]),
    # 3: a thread forwarding rows of both other chunks, or of none
    3: ([0, 3, 6, 9], [0, 0, 0, 9], [0, 9, 9, 9], [0, 1, 8, 9], [0, 0, 9, 9], [0, 5, 5, 9]),
}


@pytest.mark.parametrize("threads", sorted(CUTS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_whole_stack_result_does_not_depend_on_the_forward_cut(cpp_threads, dtype, threads):
    """The whole-stack step cuts its forward's rows over the threads by their measured speeds
    (csrc/cpu/lstm_stack.cpp), so the cut moves from step to step, and a thread forwards rows
    whose backward another runs: no result may depend on it. Under held cuts from even to
    lopsided (threads without rows), with lengths, weights and dropout masks, losses,
    parameters and optimizer state agree to the bit."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    cpp_threads(threads)
    B, T, V, H, C = 9, 5, 6, 17, 5
    rng = np.random.default_rng(11)
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, C, (B, T))
    lengths, weights = rng.integers(0, T + 1, B), rng.random((B, T))

    def run(cut):
        m = make_model("embedding", "lstm", (2,), V=V, H=H, C=C, dtype=dtype, dropout=0.3)
        m.layers[1].backend = "cpp"
        model = rk.Sequential(m.layers[:-1] + [rk.Dropout(0.2, seed=3)] + m.layers[-1:])
        opt = rk.Adam(0.05)
        step = rk.TrainStep(model, rk.sequence_loss, opt)
        losses = [step(x, y)]                  # builds the stack step (its cut: the even one)
        stack = step._plan.stack
        assert stack.cut[0] == 0 and stack.cut[-1] == B and len(stack.cut) == threads + 1
        stack.hold_cut(cut)
        losses += [step(x, y, lengths=lengths, weights=weights), step(x, y), step(x, y)]
        assert stack.cut == cut
        return losses, model.params, opt.state_dict()["state"]
    even, *others = CUTS[threads]
    l0, p0, s0 = run(even)
    for cut in others:
        l1, p1, s1 = run(cut)
        np.testing.assert_array_equal(l1, l0, err_msg=str(cut))
        for k in p0:
            np.testing.assert_array_equal(p1[k], p0[k], err_msg=f"{cut} {k}")
            for slot in s0[k]:
                np.testing.assert_array_equal(s1[k][slot], s0[k][slot], err_msg=f"{cut} {k}")


def test_whole_stack_cut_follows_the_threads_and_refuses_a_bad_one(cpp_threads):
    """Left to move, the cut stays a cut of the batch with every thread some rows; a cut that
    does not rise from 0 is refused, and one for another batch is not used."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    cpp_threads(2)
    model = make_model("onehot", "lstm", (2,), V=6, H=5, C=4)
    model.layers[1].backend = "cpp"
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    x, y = batch("onehot", B=12, T=3)
    for _ in range(20):
        step(x, y)
    cut = step._plan.stack.cut
    assert cut[0] == 0 and cut[2] == 12 and 3 <= cut[1] <= 9, cut   # each share in [1/2, 2]x
    with pytest.raises(ValueError, match="cut must rise from 0 to B"):
        step._plan.stack.hold_cut([0, 7, 5])
    with pytest.raises(ValueError, match="cut must rise from 0 to B"):
        step._plan.stack.hold_cut([1, 7, 12])
    step._plan.stack.hold_cut([0, 7, 13])     # another batch's: the moving cut goes on
    step(x, y)
    assert step._plan.stack.cut[2] == 12


def _advised_huge_kib():
    """kB of this process's mappings advised MADV_HUGEPAGE (VmFlags "hg" in /proc/self/smaps)."""
    total, size = 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and " hg" in line:
                total += size
    return total


def test_whole_stack_buffers_on_huge_pages_change_no_result():
    """csrc/cpu/buffer.h puts work buffers from _C.huge_page_min() bytes up on transparent huge
    pages (2 MiB-aligned, rounded up): with every buffer there, or none, a stacked run's
    losses, parameters and optimizer state agree to the bit; the threshold refuses < 0."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    from rnnkern import _C
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        _C.set_huge_page_min(-1)
    B, T, V, H, C = 9, 5, 6, 17, 5
    rng = np.random.default_rng(12)
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, C, (B, T))
    lengths = rng.integers(0, T + 1, B)

    smaps = os.path.exists("/proc/self/smaps")

    def run(threshold):
        _C.set_huge_page_min(threshold)
        before = _advised_huge_kib() if smaps else 0
        m = make_model("embedding", "lstm", (2,), V=V, H=H, C=C, dropout=0.3)
        m.layers[1].backend = "cpp"
        opt = rk.Adam(0.05)
        step = rk.TrainStep(m, rk.sequence_loss, opt)
        losses = [step(x, y), step(x, y, lengths=lengths), step(x, y)]
        assert step._plan.stack is not None
        advised = (_advised_huge_kib() if smaps else 0) - before   # while the step's buffers live
        return losses, m.params, opt.state_dict()["state"], advised
    saved = _C.huge_page_min()
    try:
        l0, p0, s0, advised = run(0)              # every buffer on huge pages
        l1, p1, s1, _ = run(2**62)                # none
    finally:
        _C.set_huge_page_min(saved)
    np.testing.assert_array_equal(l1, l0)
    for k in p0:
        np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)
        for slot in s0[k]:
            np.testing.assert_array_equal(s1[k][slot], s0[k][slot], err_msg=f"{k} {slot}")
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if smaps and os.path.exists(thp):
        with open(thp) as f:
            if "[never]" not in f.read():
                assert advised >= 2048, advised   # at least one 2 MiB page advised


def test_whole_stack_step_rejects_bad_ids_and_targets():
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    model = make_model("onehot", "lstm", (2,))
    model.layers[1].backend = "cpp"
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05))
    x, y = batch("onehot")
    step(x, y)
    stack = step._plan.stack
    assert stack is not None
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C\) = \[0, 4\)"):
        step(x, np.full((3, 4), 4))
    plan = step._plan
    plan.targets[:] = 0
    plan.ids_in[0, 0] = 6  # past the Python check: the kernel's own refuses it
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V\) = \[0, 6\), got 6 at "
                                         r"position 0"):
        stack.run(False, False, 1.0)
    plan.ids_in[0, 0] = 0
    plan.lens[1] = 5
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 4\]"):
        stack.run(True, False, 1.0)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_whole_stack_takes_any_integer_ids_and_names_a_bad_one():
    """The whole-stack step copies ids of any integer dtype and layout into its int64 buffer
    (the kernel checks their range): the same losses as int64 ids; an id out of range, negative
    or a uint64 that wraps to a negative int64, is named as given, the parameters untouched."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")

    def build():
        m = make_model("onehot", "lstm", (2,))
        m.layers[1].backend = "cpp"
        return m
    x, y = batch("onehot")
    losses = []
    for ids in (x.astype(np.int64), x.astype(np.int32), x.astype(np.uint8),
                np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2]):
        step = rk.TrainStep(build(), rk.sequence_loss, rk.Adam(0.05))
        losses.append([step(ids, y) for _ in range(2)])
        assert step._plan.stack is not None
    for got in losses[1:]:
        np.testing.assert_array_equal(got, losses[0])
    before = {k: v.copy() for k, v in step.model.params.items()}
    for dtype, bad in ((np.int64, -1), (np.uint64, 2**63 + 5)):
        xb = x.astype(dtype)
        xb[1, 2] = bad
        with pytest.raises(ValueError, match=rf"OneHot ids must lie in \[0, 6\), got {bad}$"):
            step(xb, y)
    for k, v in step.model.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_whole_stack_reads_a_transposed_table():
    """table_transposed: the kernel reads the table as [4H,V] (one-hot: W_ih itself) and writes
    its gradient in that layout; the same loss and gradients as the [V,4H] table, to rounding,
    with dw_ih zeroed when it is not the table's gradient array."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    from rnnkern import _C
    rng = np.random.default_rng(3)
    B, T, V, H, C = 5, 4, 7, 17, 6
    ids = rng.integers(0, V, (B, T))
    targets = rng.integers(0, C, B * T)
    w_ih = rng.standard_normal((4 * H, V))
    head_w = rng.standard_normal((C, H))
    out = []
    for transposed in (False, True):
        cell = (w_ih, rng.standard_normal((4 * H, H)) if not out else out[0][3][1],
                np.full(4 * H, 0.1), np.zeros(4 * H), np.zeros((B, H)), np.zeros((B, H)),
                np.empty((B, H)), np.empty((B, H)), np.full((4 * H, V), np.nan),
                np.empty((4 * H, H)), np.empty(4 * H), np.empty(4 * H), 0.0, None)
        table = w_ih if transposed else np.ascontiguousarray(w_ih.T)
        d_table = np.full(table.shape, np.nan)
        dw = np.empty((C, H))
        stack = _C.LstmStackStepF64([cell], table, ids, d_table, head_w, None, dw, None,
                                    targets, np.ones(B * T), np.full(B, T), None,
                                    table_transposed=transposed)
        loss = stack.run(False, False, 1.0 / (B * T))
        out.append((loss, d_table if transposed else d_table.T, dw, cell))
        assert not cell[8].any()   # dw_ih: zero, the caller's to form from d_table
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-12)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="table"):
        _C.LstmStackStepF64([out[0][3]], w_ih, ids, np.empty((4 * H, V)), head_w, None,
                            np.empty((C, H)), None, targets, np.ones(B * T), np.full(B, T),
                            None, table_transposed=False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eps_mode", ["tf", "torch"])
def test_adam_inside_the_whole_stack_call_gives_the_same_bits(monkeypatch, dtype, eps_mode):
    """With one-hot input the whole-stack call also runs Adam's update (csrc/cpu/adam.h): the
    same bits as rnnkern.optim's update after the call, over steps with an lr change and an
    optimizer state reload (fresh state arrays, bound again after one Python update)."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    from rnnkern import train_step
    x, y = batch("onehot", B=7, T=5)
    runs = []
    for inside in (True, False):
        monkeypatch.setattr(train_step, "FUSE_OPTIMIZER", inside)
        model = make_model("onehot", "lstm", (2,), H=17, dtype=dtype)
        model.layers[1].backend = "cpp"
        opt = rk.Adam(0.05, eps_mode=eps_mode)
        step = rk.TrainStep(model, rk.sequence_loss, opt)
        losses = [step(x, y) for _ in range(3)]
        used = [step._plan.adam_bound is not None]
        opt.lr = 0.02
        losses += [step(x, y) for _ in range(2)]
        opt.load_state_dict(opt.state_dict())
        losses += [step(x, y) for _ in range(3)]
        used.append(step._plan.adam_bound is not None)
        runs.append((losses, {k: v.copy() for k, v in model.params.items()}, opt.state_dict(),
                     used, opt.iterations))
    (l1, p1, s1, used1, it1), (l2, p2, s2, used2, it2) = runs
    assert used1 == [True, True] and used2 == [False, False]
    assert it1 == it2 == 8
    np.testing.assert_array_equal(l1, l2)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
    for k, slots in s1["state"].items():
        for slot, value in slots.items():
            np.testing.assert_array_equal(value, s2["state"][k][slot], err_msg=f"{k}.{slot}")


def test_adam_stays_outside_the_call_where_a_gradient_is_not_final_there():
    """Clipping needs every gradient first, and Embedding input forms its gradients after the
    call: the update then runs after it, as before."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    for enc, opt in (("onehot", rk.Adam(0.05, clip_norm=1.0)), ("embedding", rk.Adam(0.05)),
                     ("onehot", rk.SGD(0.1))):
        model = make_model(enc, "lstm", (2,))
        model.layers[1].backend = "cpp"
        step = rk.TrainStep(model, rk.sequence_loss, opt)
        x, y = batch(enc)
        for _ in range(2):
            step(x, y)
        assert step._plan.stack is not None and step._plan.adam_bound is None
        assert opt.iterations == 2


def test_whole_stack_bad_ids_leave_dropout_generators_alone():
    """A batch refused for its ids draws no dropout mask: the next steps match a run that never
    saw it."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    x, y = batch("embedding", B=4, T=5)

    def build():
        m = make_model("embedding", "lstm", (2,), dropout=0.4)
        m.layers[1].backend = "cpp"
        return m
    losses = []
    for refuse_first in (True, False):
        step = rk.TrainStep(build(), rk.sequence_loss, rk.Adam(0.05))
        if refuse_first:
            with pytest.raises(ValueError, match=r"Embedding ids must lie in \[0, 6\), got 7"):
                step(np.where(x == x[0, 0], 7, x), y)
        losses.append([step(x, y) for _ in range(2)])
        assert step._plan.stack is not None
    np.testing.assert_array_equal(losses[0], losses[1])


@pytest.mark.parametrize("enc", ["onehot", "embedding"])
def test_plain_steps_repeat_without_checks_and_every_change_reaches_them(monkeypatch, enc):
    """A plain ``step(x, y)`` after another skips the checks whose outcome cannot have changed
    (_FusedPlan.repeat). Every change between steps -- optimizer settings and state, train/eval,
    the backend preset, thread settings, new parameter arrays, other dtypes or shapes, a
    refused batch, an initial state -- still reaches the step: the run equals the generic one
    call for call, and the plain calls in between do repeat."""
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("backend 'cpp' unavailable")
    from rnnkern import config, train_step
    monkeypatch.setattr(config, "TRAIN_STEP_NUMBA_MAX_FLOPS", 0)  # "auto" -> the cell's backend
    repeats = []
    real_repeat = train_step._FusedPlan.repeat

    def counted(plan, x, y):
        loss = real_repeat(plan, x, y)
        repeats.append(loss is not None)
        return loss
    monkeypatch.setattr(train_step._FusedPlan, "repeat", counted)
    x, y = batch(enc, B=5, T=4)
    bad_x = np.where(x == x[0, 0], 6, x)
    h0 = np.full((2, 5, 5), 0.1)

    def new_arrays(model, opt):
        model.layers[1].load_params({k: v + 0.01 for k, v in model.layers[1].params.items()})

    def to_numba(model, opt):
        rk.set_backend("numba")

    def bad_batch(model, opt):
        with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\)"):
            model._step(bad_x, y)
    edits = [None, None,
             lambda m, o: setattr(o, "clip_norm", 0.01), None,
             lambda m, o: setattr(o, "clip_norm", None), None,
             lambda m, o: m.eval(), None, lambda m, o: m.train(), None,
             lambda m, o: setattr(o, "lr", 0.02), None,
             lambda m, o: o.load_state_dict(o.state_dict()), None, None,
             to_numba, None, lambda m, o: rk.set_backend(None), None,
             lambda m, o: monkeypatch.setattr(config, "THREADS", 1), None,
             new_arrays, None, bad_batch, None, None]
    runs = []
    for fused in (None, False):
        repeats.clear()
        model = make_model(enc, "lstm", (2,), dropout=0.3)
        opt = rk.Adam(0.05)
        step = model._step = rk.TrainStep(model, rk.sequence_loss, opt, fused=fused)
        losses, on_stack = [], []
        try:
            for edit in edits:
                if edit is not None:
                    edit(model, opt)
                losses.append(step(x, y))
                on_stack.append(step._plan is not None and step._plan.stack is not None)
            losses.append(step(x.astype(np.int32), y.astype(np.int16)))
            losses.append(step(x[:3], y[:3]))
            losses.append(step(x, y, initial_state=(None, (h0, h0), None)))
            losses += [step(x, y), step(x, y)]
        finally:
            rk.set_backend(None)
        assert step._plan is None or step._plan.stack is not None
        runs.append((model, opt, losses, list(repeats), on_stack))
    (m1, o1, l1, r1, s1), (m2, o2, l2, r2, _) = runs
    numba = edits.index(to_numba)       # the two calls on Numba, then the stack again
    assert s1 == [i not in (numba, numba + 1) for i in range(len(edits))]
    assert r2 == []
    assert sum(r1) >= 8, r1            # the plain calls after plain calls repeated
    assert not all(r1)                 # and the changed ones went the full way
    np.testing.assert_allclose(l1, l2, **F64)
    for k in m1.params:
        np.testing.assert_allclose(m1.params[k], m2.params[k], err_msg=k, **F64)
    assert o1.iterations == o2.iterations
