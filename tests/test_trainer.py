"""Trainer: learns, equals a hand-written loop, callbacks, schedules, carried state, progress bar,
and checkpoint resume that continues bit-for-bit like an uninterrupted run."""
import os

import numpy as np
import pytest

import rnnkern as rk


def hihello():
    v = rk.CharVocab.from_text("hihello")
    return v, v.encode("hihell")[None], v.encode("ihello")[None]


def char_model(V=5, H=5, dropout=0.0, seed=0, layers=1, dtype="float64"):
    return rk.Sequential([rk.OneHot(V, dtype=dtype),
                          rk.LSTM(V, H, num_layers=layers, seed=seed, dtype=dtype, backend="numpy",
                                  dropout=dropout),
                          rk.Dropout(dropout, seed=seed + 1),
                          rk.Dense(H, V, seed=seed + 2, dtype=dtype)])


def test_fit_learns_hihello():
    v, x, y = hihello()
    model = char_model(dtype="float32")
    tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.1), progress=False)
    hist = tr.fit([(x, y)], epochs=50)
    assert len(hist["loss"]) == 50 and hist["loss"][-1] < 0.05 < hist["loss"][0]
    assert v.decode(rk.argmax(model(x))[0]) == "ihello"
    assert tr.epoch == 50 and tr.global_step == 50
    assert tr.fit([(x, y)], epochs=50) is tr.history and tr.global_step == 50  # already done


def test_fit_equals_hand_written_loop():
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 5, (3, 4)), rng.integers(0, 5, (3, 4))) for _ in range(3)]
    m1, m2, m3 = char_model(), char_model(), char_model()
    o1, o2, o3 = (rk.Adam(0.05, clip_norm=1.0) for _ in range(3))
    # generic=True: the very same operations as the loop below, so bitwise equal; the default
    # (a step plan) computes the same function, with other rounding on the C++ backend
    for m, o, generic in ((m1, o1, True), (m3, o3, False)):
        rk.Trainer(m, rk.sequence_loss, o, progress=False, generic=generic,
                   lr_schedule=rk.ExponentialDecay(0.05, 0.5)).fit(batches, epochs=3)
    for epoch in range(3):
        o2.lr = 0.05 * 0.5 ** epoch
        for x, y in batches:
            _, d = rk.sequence_loss(m2(x), y, return_grad=True)
            m2.backward(d)
            o2.step(m2.params, m2.grads)
    for k, p in m1.params.items():
        np.testing.assert_array_equal(p, m2.params[k])
        np.testing.assert_allclose(m3.params[k], m2.params[k], rtol=1e-9, atol=1e-12)


def test_callbacks_history_and_stop():
    v, x, y = hihello()
    seen = {"steps": [], "epochs": []}

    class Stopper(rk.Callback):
        def on_epoch_end(self, t):
            seen["epochs"].append((t.epoch, len(t.history["loss"])))
            if t.epoch == 3:
                t.stop_training = True

    cb = rk.LambdaCallback(on_step_end=lambda t: seen["steps"].append((t.global_step, t.last_loss)))
    tr = rk.Trainer(char_model(), rk.sequence_loss, rk.SGD(0.5), progress=False,
                    callbacks=[cb, Stopper()], lr_schedule=rk.ExponentialDecay(0.5, 0.9))
    hist = tr.fit([(x, y), (x, y)], epochs=10)
    assert tr.epoch == 3 and len(hist["loss"]) == 3
    assert seen["epochs"] == [(1, 1), (2, 2), (3, 3)]
    assert [s for s, _ in seen["steps"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(hist["lr"], [0.5, 0.45, 0.405], rtol=1e-15)
    assert hist["loss"][0] == pytest.approx((seen["steps"][0][1] + seen["steps"][1][1]) / 2)
    assert hist["val_loss"] == [None] * 3


def test_evaluate_and_val_loss_use_eval_mode():
    v, x, y = hihello()
    model = char_model(dropout=0.5)
    tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.05), progress=False)
    before = {k: p.copy() for k, p in model.params.items()}
    a, b = tr.evaluate([(x, y)]), tr.evaluate([(x, y)])
    assert a == b == pytest.approx(rk.sequence_loss(model.eval()(x), y))  # no dropout
    model.train()
    assert all(np.array_equal(p, before[k]) for k, p in model.params.items())
    assert model.training
    hist = tr.fit([(x, y)], epochs=2, val_data=[(x, y)])
    assert hist["val_loss"][1] == pytest.approx(tr.evaluate([(x, y)]))


def test_batch_dicts_pass_lengths_and_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5, 2))
    lengths = np.array([5, 4, 2, 1])
    y = rng.standard_normal((4, 1))
    model = rk.Sequential([rk.GRU(2, 3, seed=0, dtype="float64", backend="numpy"), rk.LastStep(),
                           rk.Dense(3, 1, seed=1, dtype="float64")])
    tr = rk.Trainer(model, rk.sum_squares, rk.Adam(0.01), progress=False)
    loss = tr.train_step({"x": x, "y": y, "lengths": lengths})
    assert loss == pytest.approx(rk.sum_squares(
        model.forward(x, lengths=lengths), y), rel=0.2)  # one small step changes it only slightly
    ids = rng.integers(0, 5, (2, 3))
    w = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    m2 = char_model()
    tr2 = rk.Trainer(m2, rk.sequence_loss, rk.SGD(0.0), progress=False)
    got = tr2.train_step({"x": ids, "y": ids, "weights": w})
    assert got == pytest.approx(rk.sequence_loss(m2(ids), ids, weights=w), rel=1e-12)
    with pytest.raises(ValueError, match="batch"):
        tr2.train_step((ids,))


def test_stateful_carries_state_within_epoch_and_resets():
    rng = np.random.default_rng(2)
    stream = rk.StreamBatches(rng.integers(0, 5, 200), batch_size=3, seq_length=6)
    m1, m2, m3 = char_model(), char_model(), char_model()
    rk.Trainer(m1, rk.sequence_loss, rk.SGD(0.1), stateful=True, progress=False,
               generic=True).fit(stream, 2)   # bitwise the loop below (plans: test_train_step)
    o2 = rk.SGD(0.1)
    for _ in range(2):
        state = None
        for x, y in stream:
            logits, state = m2(x, initial_state=state, return_state=True)
            _, d = rk.sequence_loss(logits, y, return_grad=True)
            m2.backward(d)
            o2.step(m2.params, m2.grads)
    for k, p in m1.params.items():
        np.testing.assert_array_equal(p, m2.params[k])
    rk.Trainer(m3, rk.sequence_loss, rk.SGD(0.1), stateful=False, progress=False).fit(stream, 2)
    assert not np.array_equal(m3.params["3.weight"], m1.params["3.weight"])


def test_progress_bar_shows_loss(capsys):
    v, x, y = hihello()
    rk.Trainer(char_model(), rk.sequence_loss, rk.Adam(0.1), progress=True).fit([(x, y)], epochs=3)
    err = capsys.readouterr().err
    assert "loss=" in err and "3/3" in err and "step" in err


def test_nonfinite_loss_raises_by_default_and_updates_nothing(tmp_path):
    v, x, y = hihello()
    model, opt = char_model(), rk.Adam(0.1)
    tr = rk.Trainer(model, rk.sequence_loss, opt, progress=False)
    tr.fit([(x, y)], epochs=2)
    model.params["3.bias"][0] = np.nan
    before = {k: p.copy() for k, p in model.params.items()}
    with pytest.raises(rk.NonFiniteLossError):
        tr.fit([(x, y)], epochs=3)
    assert tr.global_step == 2 and opt.iterations == 2 and tr.skipped_steps == 0
    for k, p in model.params.items():
        np.testing.assert_array_equal(p, before[k])


def test_skip_nonfinite_steps_and_terminate_on_nan():
    """on_nonfinite="skip": the bad steps update nothing and count nowhere but in
    skipped_steps; TerminateOnNaN stops at the first one, with the last finite parameters."""
    v, x, y = hihello()
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 5, (2, 6)), rng.integers(0, 5, (2, 6))) for _ in range(4)]
    model, opt = char_model(), rk.Adam(0.05)
    good = model.params["3.bias"][0]

    def poison(t):    # the parameter is NaN during steps 2 and 3 of each epoch
        model.params["3.bias"][0] = np.nan if t.step_in_epoch in (1, 2) else good

    tr = rk.Trainer(model, rk.sequence_loss, opt, progress=False, on_nonfinite="skip",
                    callbacks=[rk.LambdaCallback(on_step_end=poison)])
    hist = tr.fit(batches, epochs=2)
    assert tr.skipped_steps == 4 and tr.global_step == 4 and opt.iterations == 4
    assert all(np.isfinite(hist["loss"])) and all(np.isfinite(p).all() for k, p in model.params.items() if k != "3.bias")
    # TerminateOnNaN: stops right after the first skipped step
    model, opt = char_model(), rk.Adam(0.05)
    good = model.params["3.bias"][0]
    stop = rk.TerminateOnNaN()
    tr = rk.Trainer(model, rk.sequence_loss, opt, progress=False, on_nonfinite="skip",
                    callbacks=[rk.LambdaCallback(on_step_end=poison), stop])
    tr.fit(batches, epochs=2)
    assert stop.stopped_at == 1 and tr.global_step == 1 and tr.skipped_steps == 1
    assert tr.epoch == 0 and np.isnan(tr.last_loss)


def test_empty_batches_are_refused():
    v, x, y = hihello()
    tr = rk.Trainer(char_model(), rk.sequence_loss, rk.Adam(0.1), progress=False)
    empty = (np.zeros((0, 6), np.int64), np.zeros((0, 6), np.int64))
    with pytest.raises(ValueError, match="empty batch"):
        tr.fit([(x, y), empty], epochs=1)
    assert tr.global_step == 1
    with pytest.raises(ValueError, match="empty batch"):
        tr.evaluate([(x[:, :0], y[:, :0])])


def test_bad_construction():
    with pytest.raises(TypeError, match="forward"):
        rk.Trainer(object(), rk.sequence_loss, rk.Adam())
    with pytest.raises(ValueError, match="checkpoint_every"):
        rk.Trainer(char_model(), rk.sequence_loss, rk.Adam(), checkpoint_every=0)
    with pytest.raises(ValueError, match="shuffle"):
        rk.Trainer(char_model(), rk.sequence_loss, rk.Adam(), stateful=True, shuffle=True)
    with pytest.raises(TypeError, match=r"\[\(x, y\)\]"):
        rk.Trainer(char_model(), rk.sequence_loss, rk.Adam(), progress=False).fit(
            (np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64)))
    with pytest.raises(ValueError, match="epochs"):
        rk.Trainer(char_model(), rk.sequence_loss, rk.Adam(), progress=False).fit([], epochs=-1)


# ---------------------------------------------------------------------- checkpoint / resume
def resume_setup(seed, checkpoint=None, every="epoch", stateful=False):
    """Dropout everywhere, shuffling, clipping and decay: every RNG and counter matters."""
    model = char_model(H=6, dropout=0.3, layers=2, seed=seed)
    opt = rk.Adam(0.02, clip_norm=1.0)
    tr = rk.Trainer(model, rk.sequence_loss, opt, shuffle=not stateful, seed=7, progress=False,
                    stateful=stateful, lr_schedule=rk.ExponentialDecay(0.02, 0.9),
                    checkpoint=checkpoint, checkpoint_every=every)
    return model, opt, tr


def assert_same_run(m1, o1, t1, m2, o2, t2):
    for k, p in m1.params.items():
        np.testing.assert_array_equal(p, m2.params[k], err_msg=k)
    for k, st in o1.state.items():
        for s, a in st.items():
            np.testing.assert_array_equal(a, o2.state[k][s])
    assert t1.history == t2.history
    assert (t1.epoch, t1.global_step, o1.iterations) == (t2.epoch, t2.global_step, o2.iterations)


def test_resume_at_epoch_boundary_is_bit_exact(tmp_path):
    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 5, (2, 4)), rng.integers(0, 5, (2, 4))) for _ in range(4)]
    m1, o1, t1 = resume_setup(0)
    t1.fit(batches, epochs=4)
    path = tmp_path / "ck.npz"
    m2, o2, t2 = resume_setup(0, checkpoint=path)
    t2.checkpoint_meta = {"note": "meta travels"}
    t2.fit(batches, epochs=2)
    assert rk.load_checkpoint(path)["meta"]["user"] == {"note": "meta travels"}
    m3, o3, t3 = resume_setup(99)       # different initial weights: load must replace them
    t3.load(path)
    t3.fit(batches, epochs=4)
    assert_same_run(m1, o1, t1, m3, o3, t3)


def test_resume_mid_epoch_with_carried_state_is_bit_exact(tmp_path):
    stream = rk.StreamBatches(np.random.default_rng(4).integers(0, 5, 300), batch_size=2,
                              seq_length=7)
    assert len(stream) == 21
    m1, o1, t1 = resume_setup(0, stateful=True)
    t1.fit(stream, epochs=2)
    path = tmp_path / "mid.npz"
    m2, o2, t2 = resume_setup(0, checkpoint=path, every=5, stateful=True)

    def crash(t):   # stop right after the step-30 checkpoint (epoch 1, batch 9 of 21)
        if t.global_step == 30:
            t.stop_training = True
    t2.callbacks.append(rk.LambdaCallback(on_step_end=crash))
    t2.fit(stream, epochs=2)
    assert t2.global_step == 30 and t2.epoch == 1
    m3, o3, t3 = resume_setup(5, stateful=True)
    t3.load(path)
    assert t3.step_in_epoch == 9 and t3._state is not None
    t3.fit(stream, epochs=2)
    assert_same_run(m1, o1, t1, m3, o3, t3)


def test_checkpoint_user_data_and_mismatch(tmp_path):
    path = tmp_path / "ck.npz"
    m, o, t = resume_setup(0)
    t.save(path, user={"vocab": ["a", "b"]})
    assert rk.Trainer(char_model(H=6, layers=2), rk.sequence_loss, rk.Adam(0.02),
                      progress=False).load(path) == {"vocab": ["a", "b"]}
    with pytest.raises(ValueError, match="do not match|shape"):
        rk.Trainer(char_model(H=7, layers=2), rk.sequence_loss, rk.Adam(), progress=False).load(path)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    rk.save_checkpoint(path, params={"w": np.arange(3.0)}, meta={"epoch": 1})

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial garbage")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        rk.save_checkpoint(path, params={"w": np.zeros(3)}, meta={"epoch": 2})
    monkeypatch.undo()
    ck = rk.load_checkpoint(path)
    np.testing.assert_array_equal(ck["params"]["w"], np.arange(3.0))
    assert ck["meta"] == {"epoch": 1}
    assert os.listdir(tmp_path) == ["ck.npz"]     # no temporary files left behind


def test_checkpoint_roundtrip_of_optimizer_state(tmp_path):
    p = {"a.w": np.ones((2, 2)), "b": np.ones(3)}
    opt = rk.RMSprop(0.1, momentum=0.5)
    opt.step(p, {"a.w": np.ones((2, 2)), "b": np.ones(3)})
    rk.save_checkpoint(tmp_path / "o.npz", params=p, optimizer_state=opt.state_dict())
    ck = rk.load_checkpoint(tmp_path / "o.npz")
    o2 = rk.RMSprop(0.1, momentum=0.5)
    o2.load_state_dict(ck["optimizer_state"])
    assert o2.iterations == 1 and set(o2.state) == {"a.w", "b"}
    np.testing.assert_array_equal(o2.state["b"]["momentum_buffer"], opt.state["b"]["momentum_buffer"])
    (tmp_path / "bad.npz").write_bytes(b"")
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an rnnkern checkpoint"):
        rk.load_checkpoint(tmp_path / "plain.npz")


def test_resume_mid_epoch_with_shuffled_batches_is_bit_exact(tmp_path):
    rng = np.random.default_rng(8)
    batches = [(rng.integers(0, 5, (2, 4)), rng.integers(0, 5, (2, 4))) for _ in range(5)]
    m1, o1, t1 = resume_setup(0)
    t1.fit(batches, epochs=3)
    path = tmp_path / "mid.npz"
    m2, o2, t2 = resume_setup(0, checkpoint=path, every=3)
    t2.callbacks.append(rk.LambdaCallback(
        on_step_end=lambda t: setattr(t, "stop_training", t.global_step == 9)))
    t2.fit(batches, epochs=3)
    m3, o3, t3 = resume_setup(3)
    t3.load(path)
    assert (t3.epoch, t3.step_in_epoch) == (1, 4)   # step 9 = epoch 1, 4th batch of its order
    t3.fit(batches, epochs=3)
    assert_same_run(m1, o1, t1, m3, o3, t3)


def test_callable_data_gets_the_epoch():
    v, x, y = hihello()
    seen = []

    def data(epoch):
        seen.append(epoch)
        return iter([(x, y)] * (epoch + 1))       # a generator-style source, fresh each epoch
    tr = rk.Trainer(char_model(), rk.sequence_loss, rk.SGD(0.1), progress=False)
    tr.fit(data, epochs=3)
    assert seen == [0, 1, 2] and tr.global_step == 6


def test_training_run_matches_pytorch():
    """20 Adam steps of one-hot -> LSTM -> Linear with Trainer equal the same run in PyTorch."""
    torch = pytest.importorskip("torch")
    v, x, y = hihello()
    model = rk.Sequential([rk.OneHot(5, dtype="float64"),
                           rk.LSTM(5, 6, num_layers=2, forget_bias=0.0, seed=0, dtype="float64",
                                   backend="numpy"),
                           rk.Dense(6, 5, seed=1, dtype="float64")])
    lstm = torch.nn.LSTM(5, 6, num_layers=2, batch_first=True).double()
    fc = torch.nn.Linear(6, 5).double()
    with torch.no_grad():
        for k, p in model[1].params.items():
            getattr(lstm, k).copy_(torch.from_numpy(p))
        fc.weight.copy_(torch.from_numpy(model[2].params["weight"]))
        fc.bias.copy_(torch.from_numpy(model[2].params["bias"]))
    tr = rk.Trainer(model, rk.sequence_loss, rk.Adam(0.05, eps_mode="torch", clip_norm=1.0),
                    progress=False)
    hist = tr.fit([(x, y)], epochs=20)
    params = list(lstm.parameters()) + list(fc.parameters())
    opt = torch.optim.Adam(params, lr=0.05)
    xt = torch.nn.functional.one_hot(torch.from_numpy(x), 5).double()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(fc(lstm(xt)[0]).reshape(-1, 5),
                                                 torch.from_numpy(y).reshape(-1))
        loss.backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        for p in params:                       # TF-style global-norm clipping, as rk's
            p.grad *= 1.0 / max(norm.item(), 1.0)
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(hist["loss"], losses, rtol=1e-9)
    for k, p in model[1].params.items():
        np.testing.assert_allclose(p, getattr(lstm, k).detach().numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(model[2].params["weight"], fc.weight.detach().numpy(), rtol=1e-8)
