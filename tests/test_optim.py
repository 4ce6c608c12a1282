"""Optimizers vs torch.optim on the same gradient sequences (float64), clipping, schedules,
state round trips, errors."""
import math

import numpy as np
import pytest

import rnnkern as rk

STEPS = 12


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3),
              "tiny": rng.standard_normal((2,)) * 1e-3}
    grad_seq = [{k: rng.standard_normal(v.shape) * (1e-4 if k == "tiny" else 1.0)
                 for k, v in params.items()} for _ in range(STEPS)]
    return params, grad_seq


def run_pair(ours, torch_factory, per_step=None, seed=0):
    """Run ours and torch's optimizer on identical params and gradients; compare every step."""
    torch = pytest.importorskip("torch")
    params, grad_seq = make_problem(seed)
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    topt = torch_factory(list(tparams.values()))
    for t, grads in enumerate(grad_seq, start=1):
        if per_step is not None:
            per_step(t, ours, topt)
        ours.step(params, {k: g.copy() for k, g in grads.items()})
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k].copy())
        topt.step()
        for k in params:
            np.testing.assert_allclose(params[k], tparams[k].detach().numpy(),
                                       rtol=1e-12, atol=1e-15, err_msg=f"step {t} param {k}")
    return params


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.8, nesterov=True),
                                dict(momentum=0.5, weight_decay=0.01)])
def test_sgd_matches_torch(kw):
    torch = pytest.importorskip("torch")
    run_pair(rk.SGD(0.05, **kw), lambda p: torch.optim.SGD(p, lr=0.05, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(eps=1e-3), dict(weight_decay=0.1),
                                dict(beta1=0.5, beta2=0.9)])
def test_adam_torch_mode_matches_torch(kw):
    torch = pytest.importorskip("torch")
    tkw = {"eps": kw.get("eps", 1e-8), "weight_decay": kw.get("weight_decay", 0.0),
           "betas": (kw.get("beta1", 0.9), kw.get("beta2", 0.999))}
    run_pair(rk.Adam(0.01, eps_mode="torch", **kw),
             lambda p: torch.optim.Adam(p, lr=0.01, foreach=False, **tkw))


def test_adam_tf_mode_equals_torch_with_rescaled_eps():
    """TF1's epsilon-hat form == torch's with eps_t = eps / sqrt(1 - beta2^t) at step t."""
    torch = pytest.importorskip("torch")
    eps = 1e-3   # large, so the two conventions differ visibly (checked below)

    def rescale(t, ours, topt):
        topt.param_groups[0]["eps"] = eps / math.sqrt(1 - 0.999 ** t)
    tf_params = run_pair(rk.Adam(0.01, eps=eps), lambda p: torch.optim.Adam(p, lr=0.01, eps=eps),
                         per_step=rescale)
    torch_params, grad_seq = make_problem(0)
    opt = rk.Adam(0.01, eps=eps, eps_mode="torch")
    for g in grad_seq:
        opt.step(torch_params, g)
    assert not np.allclose(tf_params["tiny"], torch_params["tiny"], rtol=1e-6, atol=0)


def test_adam_modes_agree_without_eps_and_defaults_are_tf():
    a = rk.Adam()
    assert (a.lr, a.beta1, a.beta2, a.eps, a.eps_mode) == (0.001, 0.9, 0.999, 1e-8, "tf")
    p1, grad_seq = make_problem(1)
    p2 = {k: v.copy() for k, v in p1.items()}
    o1, o2 = rk.Adam(0.1, eps=0.0), rk.Adam(0.1, eps=0.0, eps_mode="torch")
    for g in grad_seq:
        o1.step(p1, g)
        o2.step(p2, g)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-13)


def test_adam_first_step_is_lr_times_sign():
    p = {"w": np.array([1.0, -2.0, 3.0])}
    rk.Adam(0.1).step(p, {"w": np.array([5.0, -0.5, 0.0])})    # step t=1: m/sqrt(v) = sign(g)
    np.testing.assert_allclose(p["w"], [0.9, -1.9, 3.0], rtol=1e-7)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(centered=True),
                                dict(centered=True, momentum=0.5), dict(eps=1e-2)])
def test_rmsprop_matches_torch(kw):
    torch = pytest.importorskip("torch")
    tkw = dict(kw)
    rho = 0.9
    run_pair(rk.RMSprop(0.01, rho=rho, **kw),
             lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=rho, foreach=False,
                                           **{"eps": 1e-8, **tkw}))


@pytest.mark.parametrize("kw", [dict(), dict(initial_accumulator_value=0.1),
                                dict(eps=1e-3)])
def test_adagrad_matches_torch(kw):
    torch = pytest.importorskip("torch")
    run_pair(rk.Adagrad(0.1, **kw), lambda p: torch.optim.Adagrad(p, lr=0.1, foreach=False, **kw))


def test_lr_change_mid_run_matches_torch():
    torch = pytest.importorskip("torch")
    decay = rk.ExponentialDecay(0.05, 0.97)

    def set_lr(t, ours, topt):
        ours.lr = decay(t // 3)
        topt.param_groups[0]["lr"] = decay(t // 3)
    run_pair(rk.Adam(0.05, eps_mode="torch"), lambda p: torch.optim.Adam(p, lr=0.05), per_step=set_lr)
    run_pair(rk.SGD(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
             per_step=set_lr)


def test_exponential_decay():
    d = rk.ExponentialDecay(2e-3, 0.97)
    assert d(0) == 2e-3 and abs(d(3) - 2e-3 * 0.97 ** 3) < 1e-18
    with pytest.raises(ValueError, match="rate"):
        rk.ExponentialDecay(1e-3, -1)


# ---------------------------------------------------------------------- clipping
def test_clip_grad_norm_matches_tf_formula_and_torch_norm():
    torch = pytest.importorskip("torch")
    _, seq = make_problem(2)
    grads = seq[0]
    norm = math.sqrt(sum((g ** 2).sum() for g in grads.values()))
    orig = {k: g.copy() for k, g in grads.items()}
    tg = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(tg, grads.values()):
        t.grad = torch.tensor(g.copy())
    tnorm = torch.nn.utils.clip_grad_norm_(tg, 1.0)
    got = rk.clip_grad_norm(grads, 1.0)
    assert abs(got - norm) < 1e-12 and abs(got - float(tnorm)) < 1e-12
    for k in grads:   # TF: g * clip / norm (torch adds 1e-6 to the norm)
        np.testing.assert_allclose(grads[k], orig[k] / norm, rtol=1e-14)
    for t, g in zip(tg, grads.values()):
        np.testing.assert_allclose(t.grad.numpy(), g, rtol=1e-5)
    assert math.isclose(math.sqrt(sum((g ** 2).sum() for g in grads.values())), 1.0, rel_tol=1e-13)
    # below the threshold nothing changes
    small = {k: g * 1e-3 for k, g in orig.items()}
    before = {k: g.copy() for k, g in small.items()}
    rk.clip_grad_norm(small, 10.0)
    for k in small:
        np.testing.assert_array_equal(small[k], before[k])


def test_clip_grad_value_matches_torch():
    torch = pytest.importorskip("torch")
    _, seq = make_problem(3)
    grads = seq[0]
    tg = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(tg, grads.values()):
        t.grad = torch.tensor(g.copy())
    torch.nn.utils.clip_grad_value_(tg, 0.5)
    rk.clip_grad_value(grads, 0.5)
    for t, g in zip(tg, grads.values()):
        np.testing.assert_array_equal(t.grad.numpy(), g)
    assert max(np.abs(g).max() for g in grads.values()) == 0.5


def test_clipping_inside_step_equals_manual_clipping():
    p1, seq = make_problem(4)
    p2 = {k: v.copy() for k, v in p1.items()}
    o1 = rk.Adam(0.01, clip_norm=0.5, clip_value=0.8)
    o2 = rk.Adam(0.01)
    for g in seq:
        g1 = {k: v.copy() for k, v in g.items()}
        g2 = {k: v.copy() for k, v in g.items()}
        o1.step(p1, g1)
        rk.clip_grad_value(g2, 0.8)
        n = rk.clip_grad_norm(g2, 0.5)
        o2.step(p2, g2)
        assert o1.last_grad_norm == n
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


# ---------------------------------------------------------------------- state, dtype, errors
@pytest.mark.parametrize("make", [lambda: rk.SGD(0.1, momentum=0.9), lambda: rk.Adam(0.1),
                                  lambda: rk.RMSprop(0.1, momentum=0.5, centered=True),
                                  lambda: rk.Adagrad(0.1)])
def test_state_dict_roundtrip_continues_exactly(make):
    p1, seq = make_problem(5)
    p2 = {k: v.copy() for k, v in p1.items()}
    o1, o2 = make(), make()
    for g in seq[:5]:
        o1.step(p1, g)
        o2.step(p2, g)
    o3 = make()
    o3.load_state_dict(o2.state_dict())
    for g in seq[5:]:
        o1.step(p1, g)
        o3.step(p2, g)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    assert o3.iterations == STEPS
    with pytest.raises(ValueError, match="state is for"):
        (rk.SGD(0.1) if not isinstance(o1, rk.SGD) else rk.Adam()).load_state_dict(o1.state_dict())


def test_float32_params_stay_float32_and_update_in_place():
    w = np.ones((3, 2), np.float32)
    params = {"w": w}
    rk.Adam(0.1).step(params, {"w": np.full((3, 2), 0.5, np.float32)})
    assert params["w"] is w and w.dtype == np.float32
    np.testing.assert_allclose(w, 0.9, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        rk.Adam(-1.0)
    with pytest.raises(ValueError, match="beta1"):
        rk.Adam(beta1=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        rk.SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="clip_norm"):
        rk.SGD(0.1, clip_norm=0)
    with pytest.raises(ValueError, match="eps_mode"):
        rk.Adam(eps_mode="keras")
    opt = rk.SGD(0.1)
    with pytest.raises(ValueError, match="missing"):
        opt.step({"a": np.zeros(2), "b": np.zeros(2)}, {"a": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"a": np.zeros(2)}, {"a": np.zeros(3)})
    with pytest.raises(TypeError, match="floating-point"):
        opt.step({"a": np.zeros(2, np.int64)}, {"a": np.zeros(2)})



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [
    lambda: rk.Adam(0.01), lambda: rk.Adam(0.01, eps=1e-3, eps_mode="torch", weight_decay=0.1),
    lambda: rk.SGD(0.1, momentum=0.9, nesterov=True), lambda: rk.SGD(0.1),
    lambda: rk.RMSprop(0.01, momentum=0.5, centered=True),
    lambda: rk.Adagrad(0.1, initial_accumulator_value=0.1)])
def test_concatenated_update_is_bitwise_identical_to_per_array(make, dtype):
    """Small models take the one-concatenated-array path; it must equal the per-array path,
    also when switching between them mid-run and through state_dict()."""
    p1, seq = make_problem(6)
    p1 = {k: v.astype(dtype) for k, v in p1.items()}
    p2 = {k: v.copy() for k, v in p1.items()}
    o1, o2 = make(), make()
    o2.FLAT_MAX_ELEMENTS = 0                       # per-array path only
    for i, g in enumerate(seq):
        if i == 4:
            o1.FLAT_MAX_ELEMENTS = 0               # switch paths: state must carry over
        if i == 8:
            o1.FLAT_MAX_ELEMENTS = 1 << 16
            o3 = make()
            o3.load_state_dict(o1.state_dict())
            o1 = o3
        o1.step(p1, {k: v.astype(dtype) for k, v in g.items()})
        o2.step(p2, {k: v.astype(dtype) for k, v in g.items()})
        assert o1.state.keys() == o2.state.keys()
    for k in p1:
        assert p1[k].dtype == dtype
        np.testing.assert_array_equal(p1[k], p2[k])
        for s in o2.state[k]:
            np.testing.assert_array_equal(o1.state[k][s], o2.state[k][s])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(eps=1e-3, eps_mode="torch"), dict(weight_decay=0.1)])
def test_adam_over_one_flat_array_is_bitwise_the_per_name_update(kw, dtype):
    """The concatenated update (FLAT_MAX_ELEMENTS) and step_flat give the per-name bits."""
    p1, seq = make_problem(7)
    p1 = {k: v.astype(dtype) for k, v in p1.items()}
    p2 = {k: v.copy() for k, v in p1.items()}
    layout = tuple((k, v.shape) for k, v in p1.items())
    p3 = np.concatenate([v.reshape(-1) for v in p1.values()])
    o1, o2, o3 = rk.Adam(0.01, **kw), rk.Adam(0.01, **kw), rk.Adam(0.01, **kw)
    o1.FLAT_MAX_ELEMENTS, o2.FLAT_MAX_ELEMENTS = 0, 1 << 16
    for g in seq:
        o1.step(p1, {k: v.astype(dtype) for k, v in g.items()})
        o2.step(p2, {k: v.astype(dtype) for k, v in g.items()})
        o3.step_flat(p3, np.concatenate([g[k].astype(dtype).reshape(-1) for k in p1]), layout)
    assert o1._flat is None and o2._flat is not None and o3._flat is not None
    lo = 0
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
        np.testing.assert_array_equal(p1[k].reshape(-1), p3[lo:lo + p1[k].size])
        lo += p1[k].size
        for s in ("m", "v"):
            np.testing.assert_array_equal(o1.state[k][s], o2.state[k][s])
            np.testing.assert_array_equal(o1.state[k][s], o3.state[k][s])
