"""Dense / Embedding / OneHot / Dropout / LastStep / Sequential: values, gradients (central
finite differences in float64), state carrying, step-by-step inference, torch parity."""
import numpy as np
import pytest

import rnnkern as rk
from conftest import numeric_grad

F64 = "float64"



def close(a, b, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------- Dense
@pytest.mark.parametrize("shape", [(3, 4), (2, 5, 4), (1, 1, 4)])
def test_dense_forward_and_gradients(shape):
    rng = np.random.default_rng(0)
    fc = rk.Dense(4, 3, seed=1, dtype=F64)
    x = rng.standard_normal(shape)
    R = rng.standard_normal(shape[:-1] + (3,))
    y = fc(x)
    close(y, x @ fc.params["weight"].T + fc.params["bias"], rtol=1e-14)
    dx = fc.backward(R)

    def loss():
        return float((fc.forward(x) * R).sum())
    for k in ("weight", "bias"):
        close(fc.grads[k], numeric_grad(loss, fc.params[k]))
    close(dx, numeric_grad(loss, x))


def test_dense_inits_and_errors():
    fc = rk.Dense(100, 50, seed=0, init="glorot")
    bound = np.sqrt(6 / 150)
    assert np.abs(fc.params["weight"]).max() <= bound and fc.params["weight"].std() > bound / 3
    assert not fc.params["bias"].any()
    t = rk.Dense(100, 50, seed=0)
    assert np.abs(t.params["weight"]).max() <= 0.1 and np.abs(t.params["bias"]).max() <= 0.1
    assert t.params["weight"].dtype == np.float32
    assert "bias" not in rk.Dense(3, 2, bias=False).params
    with pytest.raises(ValueError, match="in_features. Expected 4, got 5"):
        rk.Dense(4, 2)(np.zeros((2, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        rk.Dense(4, 2)(np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="init"):
        rk.Dense(4, 2, init="he")
    with pytest.raises(RuntimeError, match="forward"):
        rk.Dense(4, 2).backward(np.zeros((1, 2)))


# ---------------------------------------------------------------------- Embedding / OneHot
def test_embedding_lookup_and_accumulated_gradient():
    emb = rk.Embedding(6, 3, seed=0, dtype=F64)
    ids = np.array([[1, 2, 1], [5, 1, 0]])
    y = emb(ids)
    close(y, emb.params["weight"][ids], rtol=0)
    R = np.random.default_rng(1).standard_normal((2, 3, 3))
    assert emb.backward(R) is None
    expected = np.zeros((6, 3))
    for b in range(2):
        for t in range(3):
            expected[ids[b, t]] += R[b, t]      # id 1 appears three times
    close(emb.grads["weight"], expected, rtol=1e-14)
    for dtype, rtol in (("float32", 1e-5), ("float64", 1e-13)):   # reduceat vs np.add.at
        big = rk.Embedding(9, 5, seed=1, dtype=dtype)
        ids = np.random.default_rng(2).integers(0, 9, (7, 40))
        dy = np.random.default_rng(3).standard_normal((7, 40, 5)).astype(dtype)
        big(ids)
        big.backward(dy)
        ref = np.zeros((9, 5), dtype)
        np.add.at(ref, ids.reshape(-1), dy.reshape(-1, 5))
        np.testing.assert_allclose(big.grads["weight"], ref, rtol=rtol, atol=rtol)
    big(np.zeros((0, 3), np.int64))
    big.backward(np.zeros((0, 3, 5)))
    assert not big.grads["weight"].any()
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        emb(np.array([[6]]))
    with pytest.raises(TypeError, match="integer"):
        emb(np.zeros((1, 2)))


def test_onehot_layer():
    oh = rk.OneHot(4, dtype=F64)
    y = oh(np.array([[0, 3], [2, 2]]))
    assert y.shape == (2, 2, 4) and y.dtype == np.float64
    np.testing.assert_array_equal(y, rk.one_hot(np.array([[0, 3], [2, 2]]), 4, dtype="float64"))
    assert oh.params == {} and oh.backward(y) is None


# ---------------------------------------------------------------------- Dropout / LastStep
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.25, 1 / 3, 0.9])
def test_dropout_mask_is_the_inverted_dropout_formula(dtype, p):
    """Every dropout draws its mask through rnnkern.layers.dropout_mask: the element-wise
    formula (rng.random(shape) < 1-p) / (1-p) in the given dtype, to the bit, from the same
    draw of the generator (the fused step and the layers must agree on both)."""
    from rnnkern.layers import dropout_mask
    shape, keep = (4, 6, 9), 1.0 - p
    ref_rng, rng = np.random.default_rng(3), np.random.default_rng(3)
    u = ref_rng.random(shape)
    want = np.where(u < keep, 1.0 / keep, 0.0).astype(dtype)
    got = dropout_mask(rng, shape, p, dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)
    out = np.full(shape, np.nan, dtype)
    dropout_mask(np.random.default_rng(3), shape, p, dtype, out=out)
    np.testing.assert_array_equal(out, want)
    assert rng.random() == ref_rng.random()   # the generator moved by one draw of the shape


def test_dropout_train_and_eval():
    d = rk.Dropout(0.25, seed=0)
    x = np.ones((200, 50))
    y = d(x)
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    close(y[kept], 1 / 0.75, rtol=1e-15)
    close(d.backward(2 * x), 2 * y, rtol=1e-15)
    d.eval()
    assert d(x) is x or np.array_equal(d(x), x)
    with pytest.raises(ValueError, match="p must"):
        rk.Dropout(1.0)


def test_laststep_picks_last_valid_step_and_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 3))
    lengths = np.array([5, 2, 0, 1])
    ls = rk.LastStep()
    y = ls(x, lengths)
    close(y[0], x[0, 4], rtol=0)
    close(y[1], x[1, 1], rtol=0)
    assert not y[2].any()
    close(y[3], x[3, 0], rtol=0)
    R = rng.standard_normal((4, 3))
    dx = ls.backward(R)
    close(dx, numeric_grad(lambda: float((ls.forward(x, lengths) * R).sum()), x))
    close(ls(x), x[:, -1], rtol=0)
    with pytest.raises(ValueError, match="lengths"):
        ls(x, np.array([6, 1, 1, 1]))


# ---------------------------------------------------------------------- Sequential
def make_model(kind="lstm", dropout=0.0, dtype=F64):
    cls = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}[kind]
    return rk.Sequential([
        rk.Embedding(7, 4, seed=0, dtype=dtype),
        cls(4, 5, num_layers=2, seed=1, dtype=dtype, backend="numpy", dropout=dropout),
        rk.Dropout(dropout, seed=2),
        rk.GRU(5, 3, seed=3, dtype=dtype, backend="numpy"),
        rk.Dense(3, 7, seed=4, dtype=dtype),
    ])


def test_sequential_param_names_are_prefixed_and_live():
    m = make_model()
    names = list(m.params)
    assert names[:3] == ["0.weight", "1.weight_ih_l0", "1.weight_hh_l0"]
    assert "4.bias" in names and "3.bias_hh_l0" in names and len(set(names)) == len(names)
    assert m.num_params() == sum(v.size for v in m.params.values())
    m.params["4.bias"][...] = 7.0     # in-place updates reach the layer
    assert (m[4].params["bias"] == 7.0).all()
    new = {k: np.full_like(v, 0.5) for k, v in m.params.items()}
    m.load_params(new)
    assert all((v == 0.5).all() for v in m.params.values())
    with pytest.raises(ValueError, match="missing"):
        m.load_params({k: v for k, v in new.items() if k != "0.weight"})


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_sequential_gradients_vs_finite_differences(kind):
    m = make_model(kind)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 7, (2, 4))
    lengths = np.array([4, 2])
    R = rng.standard_normal((2, 4, 7))
    m(ids, lengths=lengths)
    assert m.backward(R) is None           # integer input: no dx
    grads = {k: v.copy() for k, v in m.grads.items()}

    def loss():
        return float((m.forward(ids, lengths=lengths) * R).sum())
    for k, p in m.params.items():
        close(grads[k], numeric_grad(loss, p), rtol=1e-5, atol=1e-8)


def test_sequential_initial_state_gradient_and_float_input():
    m = rk.Sequential([rk.LSTM(3, 4, seed=0, dtype=F64, backend="numpy"),
                       rk.Dense(4, 2, seed=1, dtype=F64)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 3))
    h0, c0 = rng.standard_normal((2, 1, 2, 4))
    R = rng.standard_normal((2, 3, 2))
    state0 = ((h0, c0), None)
    m(x, initial_state=state0)
    dx = m.backward(R)
    dh0, dc0 = m.d_initial_state[0]

    def loss():
        return float((m.forward(x, initial_state=state0) * R).sum())
    close(dx, numeric_grad(loss, x), rtol=1e-5)
    close(dh0, numeric_grad(loss, h0), rtol=1e-5)
    close(dc0, numeric_grad(loss, c0), rtol=1e-5)


def test_many_to_one_with_lengths_gradient():
    m = rk.Sequential([rk.LSTM(3, 4, seed=0, dtype=F64, backend="numpy"), rk.LastStep(),
                       rk.Dense(4, 1, seed=1, dtype=F64)])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 3))
    lengths = np.array([5, 3, 0])
    y = m(x, lengths=lengths)
    assert y.shape == (3, 1)
    outs, _ = m[0].forward(x, None, lengths)
    close(y[1], outs[1, 2] @ m[2].params["weight"].T + m[2].params["bias"], rtol=1e-14)
    close(y[2], m[2].params["bias"], rtol=1e-14)   # length 0: zero features
    target = rng.standard_normal((3, 1))
    _, d = rk.sum_squares(y, target, return_grad=True)
    m.backward(d)
    grads = {k: v.copy() for k, v in m.grads.items()}

    def loss():
        return rk.sum_squares(m.forward(x, lengths=lengths), target)
    for k, p in m.params.items():
        close(grads[k], numeric_grad(loss, p), rtol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_state_carrying_and_step_match_full_forward(kind):
    m = make_model(kind)
    m.eval()
    ids = np.random.default_rng(2).integers(0, 7, (3, 6))
    full, full_state = m(ids, return_state=True)
    a, s = m(ids[:, :4], return_state=True)
    b, s2 = m(ids[:, 4:], initial_state=s, return_state=True)
    close(np.concatenate([a, b], axis=1), full, rtol=1e-13)
    state = None
    for t in range(6):
        y_t, state = m.step(ids[:, t], state)
        assert y_t.shape == (3, 7)
        close(y_t, full[:, t], rtol=1e-13)
    # the recurrent layers' final states (both layers of the stacked cell) match too
    for i in (1, 3):
        for got, want in zip(np.atleast_1d(state[i]) if kind == "gru" else state[i],
                             np.atleast_1d(full_state[i]) if kind == "gru" else full_state[i]):
            close(got, want, rtol=1e-13)
    assert state[0] is None and state[4] is None


def test_one_argument_order_for_layers_and_sequential():
    """(x, initial_state, lengths) positionally, the same for a recurrent layer and Sequential."""
    rng = np.random.default_rng(4)
    lstm = rk.LSTM(3, 4, seed=0, dtype=F64)
    m = rk.Sequential([lstm, rk.Dense(4, 2, seed=1, dtype=F64)])
    x = rng.standard_normal((2, 5, 3))
    h0 = (rng.standard_normal((1, 2, 4)), rng.standard_normal((1, 2, 4)))
    lengths = np.array([5, 2])
    by_position = m(x, (h0, None), lengths)
    by_name = m(x, lengths=lengths, initial_state=(h0, None))
    close(by_position, by_name, rtol=0)
    out, _ = lstm(x, h0, lengths)
    assert np.all(out[1, 2:] == 0)                       # lengths took effect positionally too
    close(by_position, out @ m[1].params["weight"].T + m[1].params["bias"], rtol=1e-14)


@pytest.mark.parametrize("cls", [rk.RNN, rk.LSTM, rk.GRU, rk.Sequential, rk.Dense, rk.Embedding,
                                 rk.OneHot, rk.Dropout, rk.LastStep, rk.TrainStep, rk.Trainer,
                                 rk.SGD, rk.Adam, rk.RMSprop, rk.Adagrad])
def test_public_docstrings_stand_alone(cls):
    doc = cls.__doc__ or ""
    assert len(doc) > 150, f"{cls.__name__} has no real docstring"
    assert "as :class:" not in doc and "Other arguments" not in doc
    if cls in (rk.RNN, rk.LSTM, rk.GRU):
        for arg in ("input_size", "hidden_size", "num_layers", "dtype", "backend", "seed",
                    "dropout", "initial_state", "lengths"):
            assert arg in doc, f"{cls.__name__}'s docstring does not explain {arg}"


def test_laststep_of_zero_steps_gives_zeros():
    ls = rk.LastStep()
    x = np.zeros((3, 0, 4))
    close(ls(x), np.zeros((3, 4)), rtol=0)
    close(ls(x, np.zeros(3, np.int64)), np.zeros((3, 4)), rtol=0)
    assert ls.backward(np.ones((3, 4))).shape == (3, 0, 4)
    m = rk.Sequential([rk.LSTM(4, 5, dtype=F64), rk.LastStep(), rk.Dense(5, 2, dtype=F64)])
    y = m(x)
    close(y, np.broadcast_to(m[2].params["bias"], (3, 2)), rtol=0)   # zeros through the head


def test_train_eval_switches_dropout_everywhere():
    m = make_model(dropout=0.5)
    ids = np.random.default_rng(3).integers(0, 7, (2, 5))
    assert not np.allclose(m(ids), m(ids))           # masks differ call to call
    m.eval()
    assert not m[1].training and not m[2].training
    close(m(ids), m(ids), rtol=0)
    m.train()
    assert m[1].training and m[2].training


def test_rng_state_roundtrip_reproduces_dropout():
    m = make_model(dropout=0.5)
    ids = np.random.default_rng(3).integers(0, 7, (2, 5))
    st = m.get_rng_state()
    assert set(st) == {"1", "2", "3"}   # every layer with a generator
    y1 = m(ids)
    m.set_rng_state(st)
    np.testing.assert_array_equal(m(ids), y1)


def test_sequential_errors():
    m = make_model()
    with pytest.raises(ValueError, match="one entry per layer"):
        m(np.zeros((1, 2), np.int64), initial_state=(None,))
    with pytest.raises(RuntimeError, match="forward"):
        make_model().backward(np.zeros((1, 2, 7)))
    with pytest.raises(TypeError, match="layers\\[1\\]"):
        rk.Sequential([rk.Dense(2, 2), object()])
    with pytest.raises(ValueError, match="at least one"):
        rk.Sequential([])


def test_sequential_matches_torch():
    torch = pytest.importorskip("torch")
    m = rk.Sequential([rk.Embedding(6, 4, seed=0, dtype=F64),
                       rk.LSTM(4, 5, num_layers=2, forget_bias=0.0, seed=1, dtype=F64,
                               backend="numpy"),
                       rk.Dense(5, 6, seed=2, dtype=F64)])
    emb = torch.nn.Embedding(6, 4).double()
    lstm = torch.nn.LSTM(4, 5, num_layers=2, batch_first=True).double()
    fc = torch.nn.Linear(5, 6).double()
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(m[0].params["weight"]))
        for k, v in m[1].params.items():
            getattr(lstm, k).copy_(torch.from_numpy(v))
        fc.weight.copy_(torch.from_numpy(m[2].params["weight"]))
        fc.bias.copy_(torch.from_numpy(m[2].params["bias"]))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, (3, 7)), rng.integers(0, 6, (3, 7))
    logits = m(x)
    loss, d = rk.sequence_loss(logits, y, return_grad=True)
    m.backward(d)
    tl = fc(lstm(emb(torch.from_numpy(x)))[0])
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, 6), torch.from_numpy(y).reshape(-1))
    tloss.backward()
    close(logits, tl.detach().numpy(), rtol=1e-12)
    assert abs(loss - tloss.item()) < 1e-12
    g = m.grads
    close(g["0.weight"], emb.weight.grad.numpy(), rtol=1e-10, atol=1e-14)
    for k in m[1].params:
        close(g[f"1.{k}"], getattr(lstm, k).grad.numpy(), rtol=1e-10, atol=1e-14)
    close(g["2.weight"], fc.weight.grad.numpy(), rtol=1e-10, atol=1e-14)
    close(g["2.bias"], fc.bias.grad.numpy(), rtol=1e-10, atol=1e-14)
