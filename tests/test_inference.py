"""Inference without the training forward's bookkeeping: the compiled one-step stack
(rnnkern.inference.Inference over _C.InferStack) gives the training forward's logits to the bit
and sample_logits' draws; generate() takes it where the model allows and the step-by-step path
otherwise, with the same ids; Sequential.infer keeps nothing for a backward.

Shape legend: B batch, T steps, P prime length, V vocabulary, H hidden size, C classes.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import inference

CPP_OK, CPP_WHY = rk.available_backends()["cpp"]
needs_cpp = pytest.mark.skipif(not CPP_OK, reason=f"backend 'cpp' unavailable: {CPP_WHY}")

CELLS = [(rk.LSTM, {}), (rk.LSTM, {"forget_bias": 0.0}), (rk.GRU, {}),
         (rk.GRU, {"reset_after": False}), (rk.RNN, {}), (rk.RNN, {"nonlinearity": "relu"})]
IDS = ["lstm", "lstm-fb0", "gru", "gru-tf1", "rnn", "rnn-relu"]


def lm(cell=rk.LSTM, opts=None, enc="embedding", V=11, H=6, layers=(2,), dtype="float64",
       backend="auto", dropout=0.0, bias=True):
    """[OneHot | Embedding | nothing: floats of width 5] -> recurrent layer objects ->
    [Dropout] -> Dense(V)."""
    mods = ([] if enc == "none" else
            [rk.OneHot(V, dtype=dtype) if enc == "onehot" else rk.Embedding(V, 5, seed=0,
                                                                             dtype=dtype)])
    n_in = V if enc == "onehot" else 5
    for i, L in enumerate(layers):
        mods.append(cell(n_in, H, L, seed=1 + i, dtype=dtype, backend=backend, dropout=dropout,
                         **(opts or {})))
        n_in = H
    if dropout:
        mods.append(rk.Dropout(dropout, seed=9))
    mods.append(rk.Dense(H, V, bias=bias, seed=7, dtype=dtype))
    return rk.Sequential(mods)


@needs_cpp
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell, opts", CELLS, ids=IDS)
def test_steps_give_the_training_forwards_logits_and_state_to_the_bit(cell, opts, dtype):
    for enc, layers, B, bias in (("embedding", (2,), 3, True), ("onehot", (1, 2), 1, False)):
        model = lm(cell, opts, enc=enc, layers=layers, dtype=dtype, dropout=0.3, bias=bias)
        model.eval()
        ids = np.random.default_rng(B).integers(0, 11, (B, 7))
        want, want_state = model(ids, return_state=True)
        inf = model.inference(batch=B)
        got = np.stack([inf.step(ids[:, t]) for t in range(7)], axis=1)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        for s_got, s_want in zip(inf.state, want_state):
            if s_want is None:
                assert s_got is None
                continue
            for a, b in zip(s_got if isinstance(s_want, tuple) else (s_got,),
                            s_want if isinstance(s_want, tuple) else (s_want,)):
                np.testing.assert_array_equal(a, b)
        inf.reset()
        np.testing.assert_array_equal(inf.step(ids[:, 0]), want[:, 0])


@needs_cpp
@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                    dict(temperature=0.0), dict(temperature=1e-300)],
                         ids=["t1", "t0.7-top4", "greedy", "tiny-t"])
@pytest.mark.parametrize("prime_shape", [(4,), (1,), (3, 2)], ids=["P4", "P1", "B3-P2"])
def test_generate_compiled_gives_the_stepwise_ids(monkeypatch, kwargs, prime_shape):
    model = lm(rk.GRU, layers=(1, 1), dtype="float32")
    prime = np.random.default_rng(0).integers(0, 11, prime_shape)
    assert inference.inference_reason(model) is None
    fast = rk.generate(model, prime, 40, rng=5, **kwargs)
    monkeypatch.setattr(inference, "inference_reason", lambda m: "forced stepwise")
    slow = rk.generate(model, prime, 40, rng=5, **kwargs)
    assert fast.shape == (prime_shape[0], 40) if len(prime_shape) == 2 else (40,)
    np.testing.assert_array_equal(fast, slow)
    assert model.training     # restored


@needs_cpp
def test_inference_errors_name_the_problem():
    model = lm()
    inf = model.inference(batch=2)
    with pytest.raises(ValueError, match=r"Embedding ids must lie in \[0, 11\)"):
        inf.step([0, 11])
    with pytest.raises(ValueError, match=r"ids must have shape \[B\] = \(2,\)"):
        inf.step([0, 1, 2])
    with pytest.raises(TypeError, match="integer ids"):
        inf.step([0.0, 1.0])
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        model.inference(batch=0)
    floats = rk.Sequential([rk.LSTM(3, 4), rk.Dense(4, 2)])
    assert "no OneHot or Embedding input" in inference.inference_reason(floats)
    with pytest.raises(ValueError, match="no OneHot or Embedding input"):
        floats.inference()
    with pytest.raises(ValueError, match="does not run on the C\\+\\+ backend"):
        lm(backend="numpy").inference()
    with pytest.raises(ValueError, match="not \\[OneHot|Embedding\\]"):
        rk.Sequential([rk.Embedding(5, 3), rk.LSTM(3, 4), rk.LastStep(), rk.Dense(4, 2)]).inference()
    model.params["1.weight_hh_l0"][0, 0] = np.nan
    with pytest.raises(ValueError, match="logits contain NaN"):
        rk.generate(model, [1, 2], 5, rng=0)


@needs_cpp
def test_inference_is_a_snapshot_of_the_parameters():
    model = lm()
    model.eval()
    ids = np.array([3])
    inf = model.inference()
    before = inf.step(ids)
    model.layers[-1].params["bias"][:] += 1.0
    model.layers[0].params["weight"][:] *= 2.0
    inf.reset()
    np.testing.assert_array_equal(inf.step(ids), before)        # the packed weights
    np.testing.assert_array_equal(model.inference().step(ids), model.step(ids)[0])


def test_generate_on_other_backends_takes_the_stepwise_path():
    model = lm(rk.LSTM, backend="numpy")
    assert "C++" in inference.inference_reason(model)
    out = rk.generate(model, [[1, 2], [3, 4]], 6, rng=0, temperature=0.5)
    assert out.shape == (2, 6) and out.dtype == np.int64 and out.min() >= 0 and out.max() < 11


def _flat_state(state):
    return [a for s in state if s is not None for a in (s if isinstance(s, tuple) else (s,))]


@pytest.mark.parametrize("enc", ["embedding", "none"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell, opts", CELLS[::2], ids=IDS[::2])
@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_sequential_infer_equals_forward_and_keeps_nothing(backend, cell, opts, dtype, enc):
    """Layer by layer through layer.infer (auto: cpp, else numpy; ids or floats in): the
    forward's logits and states, with lengths 0..T and an initial state, and nothing kept for
    a backward."""
    model = lm(cell, opts, enc=enc, layers=(1, 2), backend=backend, dropout=0.4, dtype=dtype)
    rng = np.random.default_rng(1)

    def batch(T):
        return (rng.integers(0, 11, (3, T)) if enc != "none"
                else rng.standard_normal((3, T, 5)).astype(dtype))
    ids = batch(5)
    lengths = np.array([5, 2, 0])
    model.eval()
    _, s0 = model(batch(4), return_state=True)
    want, want_state = model(ids, initial_state=s0, lengths=lengths, return_state=True)
    model.train()
    got, got_state = model.infer(ids, initial_state=s0, lengths=lengths, return_state=True)
    assert model.training                               # restored
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, **tol)
    assert got.dtype == want.dtype
    for a, b in zip(_flat_state(got_state), _flat_state(want_state), strict=True):
        np.testing.assert_allclose(a, b, **tol)
    np.testing.assert_allclose(model.infer(ids[:, :0]), want[:, :0])   # T = 0
    model.infer(ids)
    assert all(getattr(layer, "_saved", None) is None for layer in model.layers)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.zeros_like(want))
    with pytest.raises(ValueError, match="lengths must lie in"):
        model.infer(ids, lengths=[6, 1, 1])


def test_trainer_evaluate_runs_through_infer(monkeypatch):
    model = lm(rk.GRU, layers=(1,))
    x = np.random.default_rng(2).integers(0, 11, (2, 6))
    calls = []
    monkeypatch.setattr(model, "infer", lambda *a, **k: calls.append(1) or model.forward(*a, **k))
    tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.01), progress=False)
    value = tr.evaluate([(x, x)])
    assert calls == [1] and value == pytest.approx(rk.sequence_loss(model(x), x))


@pytest.mark.gpu
def test_sequential_infer_on_the_gpu_equals_forward():
    ok, why = rk.available_backends()["cuda"]
    if not ok:
        pytest.skip(f"backend 'cuda' unavailable: {why}")
    import cupy
    model = rk.Sequential([rk.GRU(4, 6, 2, seed=0, dtype="float64"),
                           rk.LSTM(6, 5, seed=1, dtype="float64")])
    model.to("cuda")
    x = cupy.asarray(np.random.default_rng(0).standard_normal((3, 7, 4)))
    lengths = cupy.asarray([7, 3, 0])
    got = model.infer(x, lengths=lengths)
    assert all(layer._saved is None for layer in model.layers)
    np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(model(x, lengths=lengths)))


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b
                        for b in ("numpy", "numba", "cpp", "cuda")])
def any_backend(request):
    ok, why = rk.available_backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {why}")
    return request.param


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell, opts", CELLS, ids=IDS)
def test_layer_infer_runs_in_time_chunks_and_equals_forward(monkeypatch, any_backend, cell,
                                                            opts, bidirectional):
    """layer.infer over runs of K=3 steps of a T=8 sequence (runs 3+3+2; rows of length 8, 5,
    3, 1 and 0 end inside, at the edge of and before a run): the eval-mode forward's outputs and
    states, dropout off, nothing kept."""
    from rnnkern import config, recurrent_stack
    xp = np
    if any_backend == "cuda":
        import cupy as xp
    layer = cell(4, 5, 2, seed=3, dtype="float64", backend=any_backend, dropout=0.5,
                 bidirectional=bidirectional, **opts)
    if xp is not np:
        layer.to("cuda")                  # device input needs the parameters there too
    monkeypatch.setattr(config, "INFER_CHUNK_BYTES", 3 * 5 * (layer.spec.gates + 3) * 5 * 8)
    assert recurrent_stack.infer_run_steps(layer.spec, 5, 5, 8) == 3
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((5, 8, 4)))
    lengths = xp.asarray([8, 5, 3, 1, 0])
    D = 2 if bidirectional else 1
    h0 = xp.asarray(rng.standard_normal((2 * D, 5, 5)))
    s0 = (h0, xp.asarray(rng.standard_normal((2 * D, 5, 5)))) if cell is rk.LSTM else h0
    layer.eval()
    want, want_state = layer(x, s0, lengths)
    layer.train()
    got, got_state = layer.infer(x, s0, lengths)
    assert layer._saved is None and layer.training
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(None)
    as_np = (lambda a: a.get()) if xp is not np else np.asarray
    np.testing.assert_allclose(as_np(got), as_np(want), rtol=1e-12, atol=1e-14)
    for a, b in zip(got_state if cell is rk.LSTM else (got_state,),
                    want_state if cell is rk.LSTM else (want_state,)):
        np.testing.assert_allclose(as_np(a), as_np(b), rtol=1e-12, atol=1e-14)


def test_layer_infer_holds_a_chunks_activations_not_the_sequences(monkeypatch):
    """Peak memory (tracemalloc sees NumPy's allocations) of the reference backend's LSTM over a
    long sequence: forward keeps O(T*B*G*H) activations for the backward, infer those of one
    run (INFER_CHUNK_BYTES, here half an output's worth) besides the [B,T,H] output; the
    output is the same."""
    import tracemalloc
    from rnnkern import config
    monkeypatch.setattr(config, "INFER_CHUNK_BYTES", 1 << 19)
    layer = rk.LSTM(8, 32, seed=0, dtype="float64", backend="numpy")
    x = np.random.default_rng(0).standard_normal((4, 1024, 8))
    out_bytes = 4 * 1024 * 32 * 8

    def peak(run):
        tracemalloc.start()
        try:
            y, _ = run(x)
            return tracemalloc.get_traced_memory()[1], y
        finally:
            tracemalloc.stop()
    layer._saved = None
    fwd_peak, want = peak(layer.forward)
    layer._saved = None
    inf_peak, got = peak(layer.infer)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert fwd_peak > 8 * out_bytes          # gates, cell states, caches: many outputs' worth
    assert inf_peak < 3 * out_bytes, (inf_peak, out_bytes)
