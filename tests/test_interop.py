"""Weight interop: round trips, torch modules, and TF1 / Keras semantics checked against small
independent NumPy forwards written from those libraries' cell formulas in their own layouts
(TF1 ``rnn_cell_impl``: BasicRNNCell, BasicLSTMCell, GRUCell; Keras SimpleRNN/LSTM/GRU cells)."""
import numpy as np
import pytest

import rnnkern as rk
from rnnkern import interop
from conftest import numeric_grad

CELLS = ["rnn", "lstm", "gru"]
I, H, B, T = 3, 4, 2, 5


def sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def rand_layer(cell, L=2, seed=0, **opts):
    """A float64 layer with N(0, 0.5) params, so every bias (incl. bias_hh) is nonzero."""
    cls = {"rnn": rk.RNN, "lstm": rk.LSTM, "gru": rk.GRU}[cell]
    layer = cls(I, H, L, dtype="float64", backend="numpy", **opts)
    rng = np.random.default_rng(seed)
    layer.load_params({k: rng.normal(0, 0.5, v.shape) for k, v in layer.params.items()})
    return layer


def run(layer, x, state=None):
    out, st = layer(x, state)
    return out, st


def assert_same_function(a, b, seed=1, tol=1e-13):
    x = np.random.default_rng(seed).normal(size=(B, T, a.input_size))
    oa, sa = a(x)
    ob, sb = b(x)
    np.testing.assert_allclose(oa, ob, rtol=0, atol=tol)
    for u, v in zip(np.atleast_1d(sa) if not isinstance(sa, tuple) else sa,
                    np.atleast_1d(sb) if not isinstance(sb, tuple) else sb):
        np.testing.assert_allclose(u, v, rtol=0, atol=tol)


# ====================================================================== independent forwards
def tf1_forward(cell, weights, x, forget_bias=1.0, act=np.tanh):
    """MultiRNNCell of TF1 cells over x [B,T,I] from zero state; returns outputs [B,T,H]."""
    Bx, Tx, _ = x.shape
    layer_in = x
    for w in weights:
        Hk = (w["candidate/bias"] if cell == "gru" else w["bias"]).shape[0] // \
            {"rnn": 1, "lstm": 4, "gru": 1}[cell]
        h, c = np.zeros((Bx, Hk)), np.zeros((Bx, Hk))
        outs = []
        for t in range(Tx):
            xt = layer_in[:, t]
            if cell == "rnn":
                h = act(np.concatenate([xt, h], 1) @ w["kernel"] + w["bias"])
            elif cell == "lstm":
                gi, gj, gf, go = np.split(np.concatenate([xt, h], 1) @ w["kernel"] + w["bias"], 4, 1)
                c = c * sig(gf + forget_bias) + sig(gi) * np.tanh(gj)
                h = np.tanh(c) * sig(go)
            else:
                r, u = np.split(sig(np.concatenate([xt, h], 1) @ w["gates/kernel"]
                                    + w["gates/bias"]), 2, 1)
                cand = np.tanh(np.concatenate([xt, r * h], 1) @ w["candidate/kernel"]
                               + w["candidate/bias"])
                h = u * h + (1 - u) * cand
            outs.append(h)
        layer_in = np.stack(outs, 1)
    return layer_in


def keras_forward(cell, weights, x):
    """Stacked Keras cells (return_sequences) over x [B,T,I] from zero state."""
    Bx, Tx, _ = x.shape
    layer_in = x
    for kernel, rec, bias in weights:
        Hk = rec.shape[0]
        h, c = np.zeros((Bx, Hk)), np.zeros((Bx, Hk))
        outs = []
        for t in range(Tx):
            xt = layer_in[:, t]
            if cell == "rnn":
                h = np.tanh(xt @ kernel + bias + h @ rec)
            elif cell == "lstm":
                zi, zf, zc, zo = np.split(xt @ kernel + h @ rec + bias, 4, 1)
                c = sig(zf) * c + sig(zi) * np.tanh(zc)
                h = sig(zo) * np.tanh(c)
            else:
                reset_after = bias.ndim == 2
                b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, None)
                x_z, x_r, x_h = np.split(xt @ kernel + b_in, 3, 1)
                if reset_after:
                    inner = h @ rec + b_rec
                    z = sig(x_z + inner[:, :Hk])
                    r = sig(x_r + inner[:, Hk:2 * Hk])
                    hh = np.tanh(x_h + r * inner[:, 2 * Hk:])
                else:
                    inner = h @ rec[:, :2 * Hk]
                    z = sig(x_z + inner[:, :Hk])
                    r = sig(x_r + inner[:, Hk:])
                    hh = np.tanh(x_h + (r * h) @ rec[:, 2 * Hk:])
                h = z * h + (1 - z) * hh
            outs.append(h)
        layer_in = np.stack(outs, 1)
    return layer_in


def rand_tf1(cell, L=2, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(L):
        n_in = (I if k == 0 else H) + H
        if cell == "gru":
            out.append({"gates/kernel": rng.normal(0, .5, (n_in, 2 * H)),
                        "gates/bias": rng.normal(0, .5, 2 * H),
                        "candidate/kernel": rng.normal(0, .5, (n_in, H)),
                        "candidate/bias": rng.normal(0, .5, H)})
        else:
            G = 4 if cell == "lstm" else 1
            out.append({"kernel": rng.normal(0, .5, (n_in, G * H)), "bias": rng.normal(0, .5, G * H)})
    return out


def rand_keras(cell, L=2, reset_after=True, seed=4):
    rng = np.random.default_rng(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    out = []
    for k in range(L):
        n_in = I if k == 0 else H
        bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
        out.append([rng.normal(0, .5, (n_in, G * H)), rng.normal(0, .5, (H, G * H)),
                    rng.normal(0, .5, bshape)])
    return out


def grads_of(layer, x, g_out):
    layer(x)
    layer.backward(g_out)
    return layer



X = np.random.default_rng(11).normal(size=(B, T, I))


# ====================================================================== TF1
@pytest.mark.parametrize("cell", CELLS)
def test_from_tf1_matches_tf1_formulas(cell):
    w = rand_tf1(cell)
    layer = interop.from_tf1(cell, w, backend="numpy")
    assert layer.dtype == np.float64 and layer.num_layers == 2
    if cell == "lstm":
        assert layer.spec.forget_bias == 1.0
    if cell == "gru":
        assert layer.spec.reset_after is False
    np.testing.assert_allclose(layer(X)[0], tf1_forward(cell, w, X), rtol=0, atol=1e-13)


def test_from_tf1_relu_rnn_and_custom_source_forget_bias():
    w = rand_tf1("rnn")
    layer = interop.from_tf1("rnn", w, nonlinearity="relu", backend="numpy")
    np.testing.assert_allclose(layer(X)[0], tf1_forward("rnn", w, X, act=lambda a: np.maximum(a, 0)),
                               atol=1e-13)
    w = rand_tf1("lstm")
    for fb in (0.0, 1.0, 2.5):  # layer forget_bias differs from the TF cell's -> folded
        layer = interop.from_tf1("lstm", w, source_forget_bias=0.5, forget_bias=fb,
                                 backend="numpy")
        assert layer.spec.forget_bias == fb
        np.testing.assert_allclose(layer(X)[0], tf1_forward("lstm", w, X, forget_bias=0.5),
                                   atol=1e-13)


@pytest.mark.parametrize("cell, opts", [("rnn", {}), ("lstm", {"forget_bias": 1.0}),
                                        ("lstm", {"forget_bias": 0.0}),
                                        ("gru", {"reset_after": False})])
def test_to_tf1_runs_in_tf1_formulas(cell, opts):
    layer = rand_layer(cell, **opts)
    for tf_fb in ((1.0, 0.0) if cell == "lstm" else (1.0,)):
        w = interop.to_tf1(layer, forget_bias=tf_fb)
        np.testing.assert_allclose(tf1_forward(cell, w, X, forget_bias=tf_fb), layer(X)[0],
                                   atol=1e-13)


@pytest.mark.parametrize("cell", CELLS)
def test_tf1_round_trip_is_exact(cell):
    w = rand_tf1(cell)
    back = interop.to_tf1(interop.from_tf1(cell, w))
    assert len(back) == len(w)
    for a, b in zip(w, back):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("cell, opts", [("rnn", {}), ("lstm", {"forget_bias": 0.0}),
                                        ("gru", {"reset_after": False})])
def test_to_tf1_grads_match_finite_differences_of_tf1_formulas(cell, opts):
    layer = rand_layer(cell, **opts)
    g_out = np.random.default_rng(5).normal(size=(B, T, H))
    grads_of(layer, X, g_out)
    dw = interop.to_tf1(layer, "grads")
    w = interop.to_tf1(layer, forget_bias=1.0)
    for k, wk in enumerate(w):
        for name, arr in wk.items():
            num = numeric_grad(lambda: float((tf1_forward(cell, w, X) * g_out).sum()), arr)
            np.testing.assert_allclose(dw[k][name], num, rtol=1e-6, atol=1e-8,
                                       err_msg=f"layer {k} {name}")


def test_to_tf1_refuses_reset_after_gru():
    with pytest.raises(ValueError, match="reset_after"):
        interop.to_tf1(rand_layer("gru", reset_after=True))


@pytest.mark.parametrize("which", ["params", "grads"])
def test_to_torch_refuses_reset_before_gru(which):
    with pytest.raises(ValueError, match="reset_after=False"):
        interop.to_torch(rand_layer("gru", reset_after=False), which)


# ====================================================================== Keras
KERAS_CASES = [("rnn", True), ("lstm", True), ("gru", True), ("gru", False)]


@pytest.mark.parametrize("cell, reset_after", KERAS_CASES)
def test_from_keras_matches_keras_formulas(cell, reset_after):
    w = rand_keras(cell, reset_after=reset_after)
    layer = interop.from_keras(cell, w, backend="numpy")
    if cell == "gru":
        assert layer.spec.reset_after is reset_after
    if cell == "lstm":
        assert layer.spec.forget_bias == 0.0
    np.testing.assert_allclose(layer(X)[0], keras_forward(cell, w, X), rtol=0, atol=1e-13)


@pytest.mark.parametrize("cell, opts", [("rnn", {}), ("lstm", {"forget_bias": 1.0}),
                                        ("lstm", {"forget_bias": 0.0}),
                                        ("gru", {"reset_after": True}),
                                        ("gru", {"reset_after": False})])
def test_to_keras_runs_in_keras_formulas(cell, opts):
    layer = rand_layer(cell, **opts)
    w = interop.to_keras(layer)
    if cell == "gru":
        assert w[0][2].shape == ((2, 3 * H) if opts["reset_after"] else (3 * H,))
    np.testing.assert_allclose(keras_forward(cell, w, X), layer(X)[0], atol=1e-13)


@pytest.mark.parametrize("cell, reset_after", KERAS_CASES)
def test_keras_round_trip_is_exact(cell, reset_after):
    w = rand_keras(cell, reset_after=reset_after)
    back = interop.to_keras(interop.from_keras(cell, w))
    for a, b in zip(w, back):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_from_keras_accepts_single_layer_and_flat_lists():
    w = rand_keras("lstm")
    one = interop.from_keras("lstm", w[0])
    assert one.num_layers == 1
    flat = interop.from_keras("lstm", [a for layer in w for a in layer])
    assert flat.num_layers == 2
    assert_same_function(flat, interop.from_keras("lstm", w))


@pytest.mark.parametrize("cell, reset_after", KERAS_CASES)
def test_to_keras_grads_match_finite_differences_of_keras_formulas(cell, reset_after):
    layer = rand_layer(cell, L=1, **({"reset_after": reset_after} if cell == "gru" else {}))
    g_out = np.random.default_rng(6).normal(size=(B, T, H))
    grads_of(layer, X, g_out)
    dw = interop.to_keras(layer, "grads")
    w = interop.to_keras(layer)
    for j, arr in enumerate(w[0]):
        num = numeric_grad(lambda: float((keras_forward(cell, w, X) * g_out).sum()), arr)
        np.testing.assert_allclose(dw[0][j], num, rtol=1e-6, atol=1e-8, err_msg=f"array {j}")


# ====================================================================== rnnkern <-> rnnkern
_ROUND_TRIPS = [(fmt, cell, opts) for fmt in ("torch", "tf1", "keras")
                for cell, opts in [("rnn", {"nonlinearity": "relu"}), ("lstm", {}),
                                   ("lstm", {"forget_bias": 0.0}), ("gru", {"reset_after": True}),
                                   ("gru", {"reset_after": False})]
                # not expressible (their refusals are tested below)
                if not (fmt == "tf1" and opts.get("reset_after") is True)
                and not (fmt == "torch" and opts.get("reset_after") is False)]


@pytest.mark.parametrize("fmt, cell, opts", _ROUND_TRIPS)
def test_layer_round_trip_keeps_the_function(fmt, cell, opts):
    layer = rand_layer(cell, **opts)
    kw = dict(opts, backend="numpy")
    if cell == "lstm":
        kw["forget_bias"] = layer.spec.forget_bias  # else each format's default applies
    if fmt == "torch":
        back = interop.from_torch(interop.to_torch(layer), cell, **kw)
        if not layer.spec.forget_bias:
            for k, v in layer.params.items():
                np.testing.assert_array_equal(back.params[k], v)
    elif fmt == "tf1":
        back = interop.from_tf1(cell, interop.to_tf1(layer), **kw)
    else:
        back = interop.from_keras(cell, interop.to_keras(layer), **kw)
    assert type(back) is type(layer) and back.spec == layer.spec
    assert_same_function(layer, back)


def test_to_torch_grads_are_layer_grads():
    layer = rand_layer("lstm")
    grads_of(layer, X, np.ones((B, T, H)))
    g = interop.to_torch(layer, "grads")
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(g[k], v)
        assert g[k] is not v  # a copy the caller owns


def test_dtype_follows_source_unless_given():
    w = rand_tf1("rnn")
    assert interop.from_tf1("rnn", w).dtype == np.float64
    w32 = [{k: v.astype(np.float32) for k, v in d.items()} for d in w]
    assert interop.from_tf1("rnn", w32).dtype == np.float32
    assert interop.from_tf1("rnn", w, dtype="float32").dtype == np.float32


# ====================================================================== torch modules
def _torch_out(torch, module, x):
    xt = torch.from_numpy(x)
    if not module.batch_first:
        xt = xt.transpose(0, 1)
    out = module(xt)[0]
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out.detach().numpy()


@pytest.mark.parametrize("kind, kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}),
                                      ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_module_loads_with_same_outputs(kind, kw, batch_first):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(I, H, 2, batch_first=batch_first, **kw).double()
    for src in (module, module.state_dict()):
        layer = interop.from_torch(src, backend="numpy",
                                   **({"nonlinearity": kw["nonlinearity"]}
                                      if kw and src is not module else {}))
        assert layer.num_layers == 2 and layer.dtype == np.float64
        np.testing.assert_allclose(layer(X)[0], _torch_out(torch, module, X), atol=1e-13)
    if kind == "RNN":
        assert interop.from_torch(module).spec.nonlinearity == kw.get("nonlinearity", "tanh")


def test_torch_lstm_with_forget_bias_is_compensated_and_to_torch_loads_back():
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    module = torch.nn.LSTM(I, H, 2, batch_first=True).double()
    ref = _torch_out(torch, module, X)
    layer = interop.from_torch(module, forget_bias=1.0, backend="numpy")
    assert layer.spec.forget_bias == 1.0
    np.testing.assert_allclose(layer(X)[0], ref, atol=1e-13)
    # a default rk.LSTM (forget_bias 1.0) exported to torch computes the same there
    mine = rand_layer("lstm")
    module.load_state_dict({k: torch.from_numpy(v) for k, v in interop.to_torch(mine).items()})
    np.testing.assert_allclose(_torch_out(torch, module, X), mine(X)[0], atol=1e-13)


def test_from_torch_float32_tensors():
    torch = pytest.importorskip("torch")
    module = torch.nn.GRU(I, H, 1, batch_first=True)
    layer = interop.from_torch(module.state_dict())
    assert layer.kind == "gru" and layer.dtype == np.float32
    np.testing.assert_allclose(layer(X.astype(np.float32))[0],
                               _torch_out(torch, module, X.astype(np.float32)), atol=1e-5)


@pytest.mark.parametrize("kw, match", [({"proj_size": 2}, "proj_size"),
                                       ({"bias": False}, "bias=False")])
def test_from_torch_refuses_unsupported_modules(kw, match):
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(I, H, 1, **kw)
    with pytest.raises(ValueError, match=match):
        interop.from_torch(module)
    with pytest.raises(ValueError, match=match.split("=")[0].replace("proj_size", "proj")):
        interop.from_torch(module.state_dict())


# ====================================================================== bad inputs
def torch_sd(cell="lstm", L=1):
    return interop.to_torch(rand_layer(cell, L=L, **({"forget_bias": 0.0} if cell == "lstm" else {})))


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda sd: sd.pop("weight_hh_l0"), ValueError, "weight_hh_l0"),
    (lambda sd: sd.pop("bias_hh_l0"), ValueError, "bias"),
    (lambda sd: sd.update(extra=np.zeros(1)), ValueError, "unexpected keys"),
    (lambda sd: sd.update(weight_hh_l0=np.zeros((2 * H, H))), ValueError, "infer the cell"),
    (lambda sd: sd.update(weight_ih_l0=np.zeros((3 * H, I))), ValueError, "weight_ih_l0"),
    (lambda sd: sd.update(weight_ih_l0=np.zeros((4 * H, I), int)), TypeError, "weight_ih_l0"),
    (lambda sd: sd.update(bias_ih_l0=np.full(4 * H, np.nan)), ValueError, "bias_ih_l0"),
    (lambda sd: sd.update(weight_ih_l0_reverse=np.zeros((4 * H, I))), ValueError,
     r"missing \['bias_hh_l0_reverse', 'bias_ih_l0_reverse', 'weight_hh_l0_reverse'\]: a bidir"),
])
def test_from_torch_rejects_bad_state_dicts(mutate, exc, match):
    sd = torch_sd()
    mutate(sd)
    with pytest.raises(exc, match=match):
        interop.from_torch(sd)


def test_from_torch_rejects_contradictions():
    with pytest.raises(ValueError, match="cell='gru'"):
        interop.from_torch(torch_sd("lstm"), cell="gru")
    with pytest.raises(ValueError, match="reset_after"):
        interop.from_torch(torch_sd("gru"), reset_after=False)
    with pytest.raises(ValueError, match="cell must be"):
        interop.from_torch(torch_sd("lstm"), cell="lstmx")
    with pytest.raises(TypeError, match="state_dict_or_module"):
        interop.from_torch([1, 2, 3])


def test_from_tf1_rejects_bad_weights():
    w = rand_tf1("lstm")
    with pytest.raises(ValueError, match=r"weights\[0\] must have keys"):
        interop.from_tf1("lstm", [{"kernel": w[0]["kernel"]}])
    with pytest.raises(ValueError, match=r"weights\[0\]\['kernel'\]"):
        interop.from_tf1("lstm", [{"kernel": w[0]["kernel"][:, :-1], "bias": w[0]["bias"]}])
    with pytest.raises(ValueError, match=r"weights\[1\] kernel"):
        interop.from_tf1("lstm", [w[0], w[0]])  # layer 1 input must be H, not I
    with pytest.raises(ValueError, match="reset_after"):
        interop.from_tf1("gru", rand_tf1("gru"), reset_after=True)
    with pytest.raises(ValueError, match="non-empty list"):
        interop.from_tf1("rnn", [])
    with pytest.raises(ValueError, match="cell must be"):
        interop.from_tf1("lstn", w)


def test_from_keras_rejects_bad_weights():
    w = rand_keras("gru", reset_after=True)
    with pytest.raises(ValueError, match="use_bias=False"):
        interop.from_keras("gru", w[0][:2])
    with pytest.raises(ValueError, match="recurrent_kernel"):
        interop.from_keras("lstm", w)          # [H,3H] is no LSTM recurrent kernel
    with pytest.raises(ValueError, match="bias"):
        interop.from_keras("gru", [[w[0][0], w[0][1], np.zeros((2, 2 * H))]])
    with pytest.raises(ValueError, match="mixes GRU conventions"):
        interop.from_keras("gru", [w[0], rand_keras("gru", reset_after=False)[1]])
    with pytest.raises(ValueError, match="reset_after"):
        interop.from_keras("gru", w, reset_after=False)
    with pytest.raises(ValueError, match="mixture"):
        interop.from_keras("gru", [w[0], w[1][0]])


@pytest.mark.parametrize("fn", [interop.to_torch, interop.to_tf1, interop.to_keras])
def test_to_rejects_bad_which(fn):
    with pytest.raises(ValueError, match="which"):
        fn(rand_layer("rnn"), "weights")


def test_single_tf1_dict_is_one_layer():
    w = rand_tf1("gru", L=1)
    layer = interop.from_tf1("gru", w[0], backend="numpy")
    assert layer.num_layers == 1
    np.testing.assert_allclose(layer(X)[0], tf1_forward("gru", w, X), atol=1e-13)


def test_importing_rnnkern_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, rnnkern; from rnnkern import interop, losses; print('torch' in sys.modules)"
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]  # finds the source tree if not installed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root)
    assert out.stdout.strip() == "False"


# ====================================================================== bidirectional
# Independent forwards: each direction is a one-direction stack of the formulas above over each
# row's valid steps (the backward one over them reversed, its outputs reversed back), zeros past
# the row's length, the two concatenated; layer k+1 reads layer k's concatenation.
def bidi_forward(run_one, layers, x, lengths=None):
    """``run_one(w, x [1,n,F]) -> [1,n,H]`` per direction; ``layers``: per layer (fw, bw)."""
    Bx, Tx, _ = x.shape
    lengths = np.full(Bx, Tx) if lengths is None else np.asarray(lengths)
    layer_in = x
    for fw, bw in layers:
        halves = []
        for w, backward in ((fw, False), (bw, True)):
            out = None
            for b, n in enumerate(lengths):
                seq = layer_in[b:b + 1, :n]
                o = run_one(w, seq[:, ::-1])[:, ::-1] if backward else run_one(w, seq)
                if out is None:
                    out = np.zeros((Bx, Tx, o.shape[2]))
                out[b, :n] = o[0]
            halves.append(out)
        layer_in = np.concatenate(halves, axis=2)
    return layer_in


def tf1_bidi(cell, weights, x, lengths=None, forget_bias=1.0):
    split = [tuple({n[3:]: v for n, v in w.items() if n.startswith(d)} for d in ("fw/", "bw/"))
             for w in weights]
    return bidi_forward(lambda w, seq: tf1_forward(cell, [w], seq, forget_bias), split, x, lengths)


def keras_bidi(cell, weights, x):
    return bidi_forward(lambda w, seq: keras_forward(cell, [w], seq),
                        [(g[:3], g[3:]) for g in weights], x)


def rand_bidi_layer(cell, L=2, seed=0, **opts):
    cls = {"rnn": rk.RNN, "lstm": rk.LSTM, "gru": rk.GRU}[cell]
    layer = cls(I, H, L, bidirectional=True, dtype="float64", backend="numpy", **opts)
    rng = np.random.default_rng(seed)
    layer.load_params({k: rng.normal(0, 0.5, s) for k, s in layer.param_shapes().items()})
    return layer


def rand_tf1_bidi(cell, L=2, seed=3):
    fw, bw = rand_tf1(cell, L, seed), rand_tf1(cell, L, seed + 100)
    rng = np.random.default_rng(seed + 200)
    out = []
    for k in range(L):
        w = {}
        for d, src in (("fw/", fw[k]), ("bw/", bw[k])):
            for n, v in src.items():
                if k and "kernel" in n:   # layer k > 0 reads 2H features: I + H = 3H rows
                    v = rng.normal(0, .5, (3 * H, v.shape[1]))
                w[d + n] = v
        out.append(w)
    return out


def rand_keras_bidi(cell, L=2, reset_after=True, seed=4):
    rng = np.random.default_rng(seed)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
    return [[a for _ in range(2) for a in
             (rng.normal(0, .5, (I if k == 0 else 2 * H, G * H)),
              rng.normal(0, .5, (H, G * H)), rng.normal(0, .5, bshape))] for k in range(L)]


LENGTHS = np.array([5, 2])
BI_TORCH = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("kind, kw", BI_TORCH)
@pytest.mark.parametrize("L", [1, 2])
def test_torch_bidirectional_module_loads_with_same_outputs(kind, kw, L):
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    module = getattr(torch.nn, kind)(I, H, L, bidirectional=True, **kw).double()
    want = _torch_out(torch, module, X)
    for src in (module, module.state_dict()):
        layer = interop.from_torch(src, backend="numpy", **(kw if src is not module else {}))
        assert layer.bidirectional and layer.num_layers == L
        assert list(layer.params) == list(module.state_dict())
        np.testing.assert_allclose(layer(X)[0], want, atol=1e-13)
    # and back: a bidirectional rk layer (forget_bias 1.0 folded into both directions' biases)
    mine = rand_bidi_layer(kind.lower(), L, **kw)
    sd = interop.to_torch(mine)
    assert set(sd) == set(module.state_dict())
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    np.testing.assert_allclose(_torch_out(torch, module, X), mine(X)[0], atol=1e-13)
    back = interop.from_torch(sd, forget_bias=1.0, backend="numpy", **kw) if kind == "LSTM" \
        else interop.from_torch(sd, backend="numpy", **kw)
    assert_same_function(mine, back)


def test_from_torch_bidirectional_contradictions():
    sd = interop.to_torch(rand_bidi_layer("gru", 1))
    with pytest.raises(ValueError, match="bidirectional=False contradicts the state_dict"):
        interop.from_torch(sd, bidirectional=False)
    uni = interop.to_torch(rand_layer("gru", 1))
    with pytest.raises(ValueError, match="bidirectional=True contradicts the state_dict"):
        interop.from_torch(uni, bidirectional=True)
    sd.pop("weight_hh_l0_reverse")
    with pytest.raises(ValueError, match=r"missing \['weight_hh_l0_reverse'\]: a bidirectional"):
        interop.from_torch(sd)


@pytest.mark.parametrize("cell", CELLS)
def test_from_tf1_bidirectional_matches_bidirectional_dynamic_rnn(cell):
    w = rand_tf1_bidi(cell)
    layer = interop.from_tf1(cell, w, backend="numpy")
    assert layer.bidirectional and layer.num_layers == 2
    np.testing.assert_allclose(layer(X, lengths=LENGTHS)[0], tf1_bidi(cell, w, X, LENGTHS),
                               atol=1e-13)
    one = interop.from_tf1(cell, w[0], backend="numpy")   # a single dict: one layer
    np.testing.assert_allclose(one(X, lengths=LENGTHS)[0], tf1_bidi(cell, w[:1], X, LENGTHS),
                               atol=1e-13)


@pytest.mark.parametrize("cell, opts", [("rnn", {}), ("lstm", {"forget_bias": 1.0}),
                                        ("lstm", {"forget_bias": 0.0}),
                                        ("gru", {"reset_after": False})])
def test_to_tf1_bidirectional_runs_in_tf1_formulas_and_round_trips(cell, opts):
    layer = rand_bidi_layer(cell, **opts)
    for tf_fb in ((1.0, 0.0) if cell == "lstm" else (1.0,)):
        w = interop.to_tf1(layer, forget_bias=tf_fb)
        assert sorted(w[1]) == sorted(f"{d}/{n}" for d in ("fw", "bw")
                                      for n in interop._TF1_KEYS[cell])
        np.testing.assert_allclose(tf1_bidi(cell, w, X, LENGTHS, forget_bias=tf_fb),
                                   layer(X, lengths=LENGTHS)[0], atol=1e-13)
    w = rand_tf1_bidi(cell)
    back = interop.to_tf1(interop.from_tf1(cell, w))
    for a, b in zip(w, back):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_to_tf1_bidirectional_grads_match_finite_differences():
    layer = rand_bidi_layer("lstm", L=1, forget_bias=0.0)
    g_out = np.random.default_rng(5).normal(size=(B, T, 2 * H))
    layer(X, lengths=LENGTHS)
    layer.backward(g_out)
    dw = interop.to_tf1(layer, "grads")
    w = interop.to_tf1(layer, forget_bias=1.0)
    for name, arr in w[0].items():
        num = numeric_grad(lambda: float((tf1_bidi("lstm", w, X, LENGTHS) * g_out).sum()), arr)
        np.testing.assert_allclose(dw[0][name], num, rtol=1e-6, atol=1e-8, err_msg=name)


def test_from_tf1_rejects_bad_bidirectional_weights():
    w = rand_tf1_bidi("lstm")
    with pytest.raises(ValueError, match=r"weights\[1\] must have keys \['fw/kernel'"):
        interop.from_tf1("lstm", [w[0], {k[3:]: v for k, v in w[1].items() if k[:3] == "fw/"}])
    with pytest.raises(ValueError, match=r"weights\[1\] fw/kernel must have I\+H = 12 rows"):
        interop.from_tf1("lstm", [w[0], w[0]])
    bad = dict(w[0], **{"bw/kernel": w[0]["bw/kernel"][1:]})
    with pytest.raises(ValueError, match=r"weights\[0\] bw/kernel reads 2 inputs, fw/kernel 3"):
        interop.from_tf1("lstm", [bad])
    with pytest.raises(ValueError, match="bidirectional=False contradicts the TF1 variables"):
        interop.from_tf1("lstm", w, bidirectional=False)
    with pytest.raises(ValueError, match=r"or those under fw/ and bw/"):
        interop.from_tf1("lstm", [{"fw/kernel": w[0]["fw/kernel"]}])


@pytest.mark.parametrize("cell, reset_after", KERAS_CASES)
def test_keras_bidirectional_weights_both_ways(cell, reset_after):
    w = rand_keras_bidi(cell, reset_after=reset_after)
    layer = interop.from_keras(cell, w, bidirectional=True, backend="numpy")
    assert layer.bidirectional and layer.num_layers == 2
    np.testing.assert_allclose(layer(X)[0], keras_bidi(cell, w, X), rtol=0, atol=1e-13)
    flat = interop.from_keras(cell, [a for g in w for a in g], bidirectional=True)
    assert flat.num_layers == 2
    assert_same_function(flat, layer)
    back = interop.to_keras(interop.from_keras(cell, w, bidirectional=True))
    for a, b in zip(w, back):
        assert len(b) == 6
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    mine = rand_bidi_layer(cell, **({"reset_after": reset_after} if cell == "gru" else {}))
    np.testing.assert_allclose(keras_bidi(cell, interop.to_keras(mine), X), mine(X)[0],
                               atol=1e-13)


def test_from_keras_rejects_bad_bidirectional_weights():
    w = rand_keras_bidi("lstm")
    with pytest.raises(ValueError, match=r"forward then the backward layer per layer.*9 arrays"):
        interop.from_keras("lstm", w[0] + w[1][:3], bidirectional=True)
    with pytest.raises(ValueError, match=r"weights\[0\] must be .*backward layer, got 3 arrays"):
        interop.from_keras("lstm", [w[0][:3]], bidirectional=True)
    with pytest.raises(ValueError, match=r"weights\[1\] \(forward\) kernel must have 8 rows"):
        interop.from_keras("lstm", [w[0], w[0]], bidirectional=True)
    bad = w[0][:3] + [w[0][3][1:]] + w[0][4:]
    with pytest.raises(ValueError, match=r"\(backward\) kernel reads 2 inputs, the forward "
                                         r"layer 3"):
        interop.from_keras("lstm", [bad], bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional must be True or False"):
        interop.from_keras("lstm", w, bidirectional=1)


@pytest.mark.parametrize("fmt, cell, opts", _ROUND_TRIPS)
def test_bidirectional_layer_round_trip_keeps_the_function(fmt, cell, opts):
    layer = rand_bidi_layer(cell, **opts)
    kw = dict(opts, backend="numpy")
    if cell == "lstm":
        kw["forget_bias"] = layer.spec.forget_bias
    if fmt == "torch":
        back = interop.from_torch(interop.to_torch(layer), cell, **kw)
    elif fmt == "tf1":
        back = interop.from_tf1(cell, interop.to_tf1(layer), **kw)
    else:
        back = interop.from_keras(cell, interop.to_keras(layer), bidirectional=True, **kw)
    assert back.bidirectional and back.spec == layer.spec
    assert list(back.params) == list(layer.params)
    np.testing.assert_allclose(back(X, lengths=LENGTHS)[0], layer(X, lengths=LENGTHS)[0],
                               rtol=0, atol=1e-13)
    layer(X, lengths=LENGTHS)
    layer.backward(np.ones((B, T, 2 * H)))
    grads = getattr(interop, f"to_{fmt}")(layer, "grads")    # both directions' gradients
    if fmt == "torch":
        assert set(grads) == set(layer.grads)
        np.testing.assert_array_equal(grads["weight_hh_l1_reverse"],
                                      layer.grads["weight_hh_l1_reverse"])
    else:
        assert len(grads) == 2 and len(grads[1]) == (4 if fmt == "tf1" and cell != "gru"
                                                     else 8 if fmt == "tf1" else 6)
