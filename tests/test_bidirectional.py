"""Bidirectional RNN/LSTM/GRU layers (``bidirectional=True``): PyTorch's layout and semantics on
every backend. Parity with ``torch.nn.LSTM/GRU/RNN(bidirectional=True, batch_first=True)`` on
packed sequences (outputs, h_n/c_n, dx, dh0/dc0 and every parameter gradient, float64), the
reference's gradients against finite differences, zeros and no gradient past each length, the
[2L,B,H] state layout and its errors, dropout between layers, and training through TrainStep and
Trainer (the step plans decline bidirectional layers: the generic loop runs them).
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnkern as rk
from rnnkern.layers import dropout_mask
from conftest import TOLERANCE, numeric_grad

CPU = ["numpy", "numba", "cpp"]
CLS = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}
TORCH = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
# torch's conventions: no run-time forget bias, reset-after GRU
TORCH_OPTS = {"lstm": {"forget_bias": 0.0}, "gru": {"reset_after": True}, "rnn": {}}
F64 = dict(rtol=1e-10, atol=1e-12)
I, H = 3, 4


@pytest.fixture(params=CPU)
def backend(request):
    ok, reason = rk.available_backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param


def make(cell, L=2, backend="numpy", dtype="float64", seed=0, scale=0.5, **opts):
    """A bidirectional layer with N(0, scale) parameters (every bias nonzero)."""
    layer = CLS[cell](I, H, L, bidirectional=True, dtype=dtype, backend=backend,
                      **{**TORCH_OPTS[cell], **opts})
    rng = np.random.default_rng(seed)
    layer.load_params({k: rng.normal(0, scale, s) for k, s in layer.param_shapes().items()})
    return layer


def state_of(cell, h, c):
    return (h, c) if cell == "lstm" else h


# ====================================================================== layout
@pytest.mark.parametrize("cell", CLS)
def test_parameters_have_torch_names_shapes_and_order(cell):
    torch = pytest.importorskip("torch")
    module = getattr(torch.nn, TORCH[cell])(I, H, 3, bidirectional=True)
    layer = CLS[cell](I, H, 3, bidirectional=True)
    assert list(layer.param_shapes()) == list(module.state_dict())
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == layer.param_shapes()
    assert list(layer.params) == list(layer.grads) == list(module.state_dict())
    assert layer.num_directions == 2 and layer.output_size == 2 * H
    assert "bidirectional=True" in repr(layer) and "bidirectional" not in repr(CLS[cell](I, H))


def test_load_params_checks_the_reverse_names_and_shapes():
    layer = rk.GRU(I, H, 2, bidirectional=True)
    params = {k: np.zeros(s) for k, s in layer.param_shapes().items()}
    layer.load_params(params)
    assert layer.params["weight_ih_l1_reverse"].shape == (3 * H, 2 * H)
    with pytest.raises(ValueError, match="weight_ih_l0_reverse"):
        layer.load_params({k: v for k, v in params.items() if k != "weight_ih_l0_reverse"})
    bad = dict(params, weight_ih_l1=np.zeros((3 * H, H)))   # layer 1 reads 2H features
    with pytest.raises(ValueError, match=r"weight_ih_l1.*\(12, 8\)"):
        layer.load_params(bad)
    with pytest.raises(ValueError, match="bidirectional must be True or False"):
        rk.GRU(I, H, bidirectional="yes")


# ====================================================================== torch parity
def _torch_run(torch, cell, layer, x, lengths, h0, c0, g_out, g_h, g_c):
    """torch's module with ``layer``'s weights over a packed batch: (out, h_n, c_n, dx, dh0, dc0,
    {name: grad}) as NumPy, for the loss sum(out*g_out) + sum(h_n*g_h) (+ sum(c_n*g_c))."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    module = getattr(torch.nn, TORCH[cell])(I, H, layer.num_layers, bidirectional=True,
                                            batch_first=True).double()
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.params.items()})
    T = x.shape[1]
    xt = torch.from_numpy(x.copy()).requires_grad_()
    h0t = torch.from_numpy(h0.copy()).requires_grad_()
    c0t = torch.from_numpy(c0.copy()).requires_grad_() if cell == "lstm" else None
    packed = pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=True,
                                  enforce_sorted=False)
    out, st = module(packed, (h0t, c0t) if cell == "lstm" else h0t)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    h_n, c_n = st if cell == "lstm" else (st, None)
    loss = (out * torch.from_numpy(g_out)).sum() + (h_n * torch.from_numpy(g_h)).sum()
    if cell == "lstm":
        loss = loss + (c_n * torch.from_numpy(g_c)).sum()
    loss.backward()
    npy = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    return (npy(out), npy(h_n), npy(c_n), npy(xt.grad), npy(h0t.grad),
            npy(c0t.grad) if cell == "lstm" else None,
            {k: npy(p.grad) for k, p in module.named_parameters()})


def torch_parity(cell, L, backend, lengths, T=6, B=None, seed=0):
    """Max |difference| of every compared array; asserts each within float64's tolerance."""
    torch = pytest.importorskip("torch")
    lengths = np.asarray(lengths, dtype=np.int64)
    B = len(lengths)
    layer = make(cell, L, backend, seed=seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(B, T, I))
    h0, c0 = rng.normal(size=(2 * L, B, H)), rng.normal(size=(2 * L, B, H))
    g_out, g_h, g_c = (rng.normal(size=s) for s in ((B, T, 2 * H), (2 * L, B, H), (2 * L, B, H)))
    out, st = layer(x, state_of(cell, h0, c0), lengths)
    dx, d0 = layer.backward(g_out, state_of(cell, g_h, g_c))
    mine = dict(out=out, h_n=st[0] if cell == "lstm" else st, dx=dx,
                dh0=d0[0] if cell == "lstm" else d0)
    if cell == "lstm":
        mine.update(c_n=st[1], dc0=d0[1])
    t_out, t_h, t_c, t_dx, t_dh0, t_dc0, t_g = _torch_run(torch, cell, layer, x, lengths, h0, c0,
                                                          g_out, g_h, g_c)
    ref = dict(out=t_out, h_n=t_h, dx=t_dx, dh0=t_dh0, c_n=t_c, dc0=t_dc0)
    assert set(t_g) == set(layer.grads)
    for k, g in t_g.items():
        mine[f"grad {k}"], ref[f"grad {k}"] = layer.grads[k], g
    worst = 0.0
    for k, v in mine.items():
        assert v.shape == ref[k].shape, k
        np.testing.assert_allclose(v, ref[k], err_msg=f"{cell} L={L} {backend}: {k}", **F64)
        worst = max(worst, float(np.abs(v - ref[k]).max()))
    return worst


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell", CLS)
def test_matches_torch_on_packed_sequences(cell, L, backend):
    # lengths 1 and T, unsorted, a repeated length
    torch_parity(cell, L, backend, [6, 1, 3, 6, 2])


@pytest.mark.parametrize("cell", CLS)
def test_matches_torch_with_full_rows_and_relu(cell, backend):
    """Every row full (the reversal is a plain flip), one row, and the ReLU RNN."""
    torch_parity(cell, 2, backend, [5, 5, 5], T=5)
    torch_parity(cell, 1, backend, [4], T=4, seed=3)
    if cell == "rnn":
        torch = pytest.importorskip("torch")
        layer = make("rnn", 2, backend, nonlinearity="relu")
        module = torch.nn.RNN(I, H, 2, nonlinearity="relu", bidirectional=True,
                              batch_first=True).double()
        module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.params.items()})
        x = np.random.default_rng(2).normal(size=(3, 5, I))
        out, h_n = module(torch.from_numpy(x))
        mine = layer(x)
        np.testing.assert_allclose(mine[0], out.detach().numpy(), **F64)
        np.testing.assert_allclose(mine[1], h_n.detach().numpy(), **F64)


def test_unpacked_input_without_lengths_matches_torch():
    torch = pytest.importorskip("torch")
    layer = make("lstm", 2)
    module = torch.nn.LSTM(I, H, 2, bidirectional=True, batch_first=True).double()
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.params.items()})
    x = np.random.default_rng(4).normal(size=(2, 7, I))
    out, (h_n, c_n) = module(torch.from_numpy(x))
    mine, (h, c) = layer(x)
    for a, b in ((mine, out), (h, h_n), (c, c_n)):
        np.testing.assert_allclose(a, b.detach().numpy(), **F64)


# ====================================================================== semantics
@pytest.mark.parametrize("cell", CLS)
def test_reverse_half_is_a_forward_layer_over_each_row_reversed_within_its_length(cell):
    """Independent of torch: the reverse direction equals a one-direction layer holding the
    ``_reverse`` weights run over each row's valid steps reversed."""
    layer = make(cell, 1)
    fwd = CLS[cell](I, H, dtype="float64", backend="numpy", **TORCH_OPTS[cell])
    bwd = CLS[cell](I, H, dtype="float64", backend="numpy", **TORCH_OPTS[cell])
    fwd.load_params({k: v for k, v in layer.params.items() if not k.endswith("_reverse")})
    bwd.load_params({k[:-8]: v for k, v in layer.params.items() if k.endswith("_reverse")})
    x = np.random.default_rng(5).normal(size=(3, 5, I))
    lengths = np.array([5, 2, 0])
    out, st = layer(x, lengths=lengths)
    h_n = st[0] if cell == "lstm" else st
    np.testing.assert_array_equal(out[:, :, :H], fwd(x, lengths=lengths)[0])
    for b, n in enumerate(lengths):
        o, s = bwd(x[b:b + 1, :n][:, ::-1]) if n else (np.zeros((1, 0, H)), None)
        np.testing.assert_allclose(out[b, :n, H:], o[0, ::-1], **F64)
        np.testing.assert_array_equal(out[b, n:], 0.0)
        if n:
            np.testing.assert_allclose(h_n[1, b], (s[0] if cell == "lstm" else s)[0, 0], **F64)
        else:   # a length-0 row keeps its initial state (zeros) in both directions
            np.testing.assert_array_equal(h_n[:, b], 0.0)


@pytest.mark.parametrize("cell", CLS)
def test_no_gradient_flows_past_each_length(cell, backend):
    layer = make(cell, 2, backend)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 5, I))
    lengths = np.array([5, 2, 0])
    g = rng.normal(size=(3, 5, 2 * H))
    layer(x, lengths=lengths)
    dx, _ = layer.backward(g)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    past = np.arange(5)[None, :] >= lengths[:, None]
    np.testing.assert_array_equal(dx[past], 0.0)
    layer(x, lengths=lengths)
    dx2, _ = layer.backward(np.where(past[:, :, None], 0.0, g))
    np.testing.assert_array_equal(dx2, dx)
    for k, v in grads.items():
        np.testing.assert_array_equal(layer.grads[k], v, err_msg=k)


@pytest.mark.parametrize("cell", CLS)
def test_gradients_match_finite_differences(cell):
    """The numpy backend's bidirectional BPTT against central differences, lengths 0..T, every
    parameter, x and both initial states."""
    L, B, T = 2, 3, 4
    layer = make(cell, L, "numpy", scale=0.4)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, T, I))
    lengths = np.array([4, 1, 0])
    h0, c0 = rng.normal(size=(2 * L, B, H)), rng.normal(size=(2 * L, B, H))
    g_out, g_h, g_c = (rng.normal(size=s) for s in ((B, T, 2 * H), (2 * L, B, H), (2 * L, B, H)))

    def loss():
        out, st = layer(x, state_of(cell, h0, c0), lengths)
        h_n, c_n = st if cell == "lstm" else (st, None)
        return float((out * g_out).sum() + (h_n * g_h).sum()
                     + ((c_n * g_c).sum() if cell == "lstm" else 0.0))

    loss()
    dx, d0 = layer.backward(g_out, state_of(cell, g_h, g_c))
    grads = {k: v.copy() for k, v in layer.grads.items()}
    checks = [("x", dx, x), ("h0", d0[0] if cell == "lstm" else d0, h0)]
    if cell == "lstm":
        checks.append(("c0", d0[1], c0))
    checks += [(k, grads[k], layer.params[k]) for k in grads]
    for name, analytic, array in checks:
        np.testing.assert_allclose(analytic, numeric_grad(loss, array), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_dropout_applies_between_layers_to_both_halves():
    """Layer k's [B,T,2H] output (both halves) is dropped before layer k+1, not after the last,
    with the layer's own generator; eval mode drops nothing."""
    layer = make("gru", 2, dropout=0.4)
    layer._rng = np.random.default_rng(9)
    x = np.random.default_rng(8).normal(size=(2, 5, I))
    lengths = np.array([5, 3])
    out, h_n = layer(x, lengths=lengths)
    one = [make("gru", 1), rk.GRU(2 * H, H, bidirectional=True, dtype="float64", backend="numpy")]
    one[0].load_params({k: v for k, v in layer.params.items() if "_l0" in k})
    one[1].load_params({k.replace("_l1", "_l0"): v for k, v in layer.params.items()
                        if "_l1" in k})
    mask = dropout_mask(np.random.default_rng(9), (2, 5, 2 * H), 0.4, np.float64)
    assert 0 < (mask == 0).sum() < mask.size
    mid, h0 = one[0](x, lengths=lengths)
    ref, h1 = one[1](mid * mask, lengths=lengths)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(h_n, np.concatenate([h0, h1]))
    layer.eval()
    np.testing.assert_array_equal(layer(x, lengths=lengths)[0], one[1](mid, lengths=lengths)[0])


@pytest.mark.parametrize("cell", CLS)
def test_backends_agree_in_float32(cell, backend):
    ref = make(cell, 2, "numpy", dtype="float32")
    mine = make(cell, 2, backend, dtype="float32")
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 6, I)).astype(np.float32)
    g = rng.normal(size=(4, 6, 2 * H)).astype(np.float32)
    lengths = np.array([6, 1, 4, 0])
    for layer in (ref, mine):
        layer(x, lengths=lengths)
    a, b = ref(x, lengths=lengths), mine(x, lengths=lengths)
    np.testing.assert_allclose(b[0], a[0], **TOLERANCE[np.dtype(np.float32)])
    dxa, dxb = ref.backward(g)[0], mine.backward(g)[0]
    np.testing.assert_allclose(dxb, dxa, **TOLERANCE[np.dtype(np.float32)])
    for k in ref.grads:
        np.testing.assert_allclose(mine.grads[k], ref.grads[k], err_msg=k,
                                   **TOLERANCE[np.dtype(np.float32)])


@pytest.mark.parametrize("L", [1, 2])
def test_final_state_carries_into_the_next_call(L):
    """h_n [2L,B,H] is a valid initial_state; with one layer, the forward half of a sequence
    run in two calls equals that of one call (the reverse direction restarts, as in torch)."""
    layer = make("lstm", L)
    x = np.random.default_rng(11).normal(size=(2, 6, I))
    whole, _ = layer(x)
    _, st = layer(x[:, :3])
    second, _ = layer(x[:, 3:], st)
    assert st[0].shape == st[1].shape == (2 * L, 2, H) and second.shape == (2, 3, 2 * H)
    if L == 1:
        np.testing.assert_allclose(second[:, :, :H], whole[:, 3:, :H], **F64)


# ====================================================================== errors
@pytest.mark.parametrize("cell", CLS)
def test_bad_state_shapes_name_the_2L_layout(cell):
    layer = make(cell, 2)
    x = np.zeros((3, 4, I))
    bad = np.zeros((2, 3, H))          # [L,B,H] of a one-direction layer
    good = np.zeros((4, 3, H))
    expect = r"must have shape \[2L,B,H\] = \(4, 3, 4\), got \(2, 3, 4\)"
    with pytest.raises(ValueError, match=expect):
        layer(x, (bad, good) if cell == "lstm" else bad)
    if cell == "lstm":
        with pytest.raises(ValueError, match=r"initial_state\[1\] \(c0\) " + expect[:5]):
            layer(x, (good, bad))
        with pytest.raises(ValueError, match=r"tuple \(h0, c0\), each \[2L,B,H\]"):
            layer(x, good)
    else:
        with pytest.raises(ValueError, match=r"one array \[2L,B,H\]"):
            layer(x, (good, good))
    layer(x, (good, good) if cell == "lstm" else good)
    with pytest.raises(ValueError, match=r"d_outputs must have shape \[B,T,2H\] = \(3, 4, 8\)"):
        layer.backward(np.zeros((3, 4, H)))
    with pytest.raises(ValueError, match=r"d_state.*\[2L,B,H\]"):
        layer.backward(None, (bad, None) if cell == "lstm" else bad)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must be equal to input_size"):
        rk.LSTM(I, H, 2, bidirectional=True)(np.zeros((1, 2, 2 * H), np.float32))


# ====================================================================== training
def tagging_batches(V=5, B=16, T=6, n=4, seed=0):
    """Label of step t = the id at step t+1 (the last step: its own id): only a model that
    sees the future can tag it."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, V, (B, T))
        out.append((x, np.concatenate([x[:, 1:], x[:, -1:]], axis=1)))
    return out


def test_train_step_runs_bidirectional_models_through_the_generic_loop():
    V, C = 5, 5
    data = tagging_batches(V, n=1)
    x, y = data[0]

    def model():
        return rk.Sequential([rk.OneHot(V, dtype="float64"),
                              rk.GRU(V, H, 2, bidirectional=True, dtype="float64", seed=1),
                              rk.LSTM(2 * H, H, bidirectional=True, dtype="float64", seed=2,
                                      forget_bias=0.0),
                              rk.Dense(2 * H, C, dtype="float64", seed=3)])
    m1, m2 = model(), model()
    opt1, opt2 = rk.Adam(0.01), rk.Adam(0.01)
    step = rk.TrainStep(m1, rk.sequence_loss, opt1)
    loss = step(x, y)
    assert step.plan is None
    assert step.generic_reason == "bidirectional layers take the generic loop"
    logits = m2(x)
    want, d = rk.sequence_loss(logits, y, return_grad=True)
    m2.backward(d)
    opt2.step(m2.params, m2.grads)
    assert loss == pytest.approx(want, rel=1e-12)
    for k, v in m2.params.items():
        np.testing.assert_allclose(m1.params[k], v, rtol=1e-12, atol=1e-14, err_msg=k)


def test_trainer_learns_a_tagging_task_that_needs_the_future():
    V = 5
    x, y = tagging_batches(V, n=1, seed=99)[0]
    acc = {}
    for bi in (True, False):
        model = rk.Sequential([rk.OneHot(V), rk.LSTM(V, 8, bidirectional=bi, seed=0),
                               rk.Dense(16 if bi else 8, V, seed=1)])
        tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.03), progress=False)
        tr.fit(tagging_batches(V, n=8), epochs=40)
        acc[bi] = (model.eval()(x).argmax(-1) == y).mean()
    assert acc[True] > 0.95 and acc[False] < 0.5, acc


def test_trainer_learns_many_to_one_with_last_step():
    """Regression of x[0] - x[len-1] from variable-length rows: LastStep takes step len-1 of the
    [B,T,2H] output, where the forward half has seen the whole row and the reverse half its
    last valid step."""
    rng = np.random.default_rng(12)
    batches = []
    for _ in range(6):
        x = rng.normal(size=(16, 6, 1))
        lengths = rng.integers(1, 7, 16)
        y = (x[:, 0, 0] - x[np.arange(16), lengths - 1, 0])[:, None]
        batches.append({"x": x, "y": y, "lengths": lengths})
    model = rk.Sequential([rk.GRU(1, 8, bidirectional=True, dtype="float64", seed=0),
                           rk.LastStep(), rk.Dense(16, 1, dtype="float64", seed=1)])
    tr = rk.Trainer(model, rk.mse, rk.Adam(0.02), progress=False)
    first = tr.evaluate(batches)
    tr.fit(batches, epochs=60)
    assert tr.evaluate(batches) < 0.1 * first
    # LastStep's gradient reaches the reverse half only at step len-1 of each row
    b = batches[0]
    model(b["x"], lengths=b["lengths"])
    model.backward(np.ones((16, 1)))
    assert np.isfinite(model.layers[0].grads["weight_hh_l0_reverse"]).all()


# ====================================================================== CUDA
@pytest.fixture(scope="module")
def emu_runtime(tmp_path_factory):
    import cuda_emu
    if cuda_emu.compiler() is None:
        pytest.skip("g++ not found: cannot build the host emulation of the CUDA kernels")
    return cuda_emu.EmuRuntime(n_sm=3, smem_limit=48 * 1024,
                               outdir=str(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture
def emulated_cuda(emu_runtime, monkeypatch):
    """The cuda backend's host code on NumPy with its kernels on host threads (as
    tests/test_cuda_emulated.py), small blocks so several blocks and batch chunks run."""
    from rnnkern import config
    from rnnkern.backends import cuda
    runtime = emu_runtime
    monkeypatch.setattr(cuda.runtime, "_runtime", runtime)
    monkeypatch.setattr(cuda, "available", lambda: (True, "emulated on host threads"))
    for name, value in dict(CUDA_THREADS=32, CUDA_MAX_BATCH_CHUNK=2, CUDA_STRATEGY="auto").items():
        monkeypatch.setattr(config, name, value)
    return runtime


@pytest.mark.parametrize("cell", CLS)
def test_cuda_backend_emulated_matches_numpy(emulated_cuda, cell):
    """backend='cuda' runs both directions through its own seam (kernels emulated)."""
    ref, dev = make(cell, 2, "numpy"), make(cell, 2, "cuda")
    rng = np.random.default_rng(14)
    x = rng.normal(size=(3, 5, I))
    h0 = rng.normal(size=(4, 3, H))
    g = rng.normal(size=(3, 5, 2 * H))
    results = []
    for layer in (ref, dev):
        out, st = layer(x, state_of(cell, h0, -h0), np.array([5, 2, 0]))
        dx, d0 = layer.backward(g, st)
        results.append((out, *(st if cell == "lstm" else (st,)), dx,
                        *(d0 if cell == "lstm" else (d0,)), *layer.grads.values()))
    assert len(emulated_cuda.launches) > 0
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, **F64)


# ====================================================================== GPU
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CLS)
def test_cuda_matches_numpy(cell):
    ok, reason = rk.available_backends()["cuda"]
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    import cupy
    ref, dev = make(cell, 2, "numpy"), make(cell, 2, "cuda").to("cuda")
    rng = np.random.default_rng(13)
    x = rng.normal(size=(5, 6, I))
    g = rng.normal(size=(5, 6, 2 * H))
    h0 = rng.normal(size=(4, 5, H))
    for lengths in (np.array([6, 1, 3, 0, 6]), None):
        state = state_of(cell, h0, h0 * 0.5)
        a_out, a_st = ref(x, state, lengths)
        b_out, b_st = dev(cupy.asarray(x), None if state is None else
                          state_of(cell, cupy.asarray(h0), cupy.asarray(h0 * 0.5)),
                          None if lengths is None else cupy.asarray(lengths))
        assert isinstance(b_out, cupy.ndarray)
        np.testing.assert_allclose(b_out.get(), a_out, **F64)
        for u, v in zip(a_st if cell == "lstm" else (a_st,), b_st if cell == "lstm" else (b_st,)):
            np.testing.assert_allclose(v.get(), u, **F64)
        a_dx, _ = ref.backward(g)
        b_dx, _ = dev.backward(cupy.asarray(g))
        np.testing.assert_allclose(b_dx.get(), a_dx, **F64)
        for k in ref.grads:
            np.testing.assert_allclose(cupy.asnumpy(dev.grads[k]), ref.grads[k], err_msg=k, **F64)
