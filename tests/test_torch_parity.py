"""PyTorch parity, float64: the same weights in ``torch.nn.LSTM/GRU/RNN`` and in rnnkern layers
(loaded with :func:`rnnkern.interop.from_torch`) give the same outputs, final states, dx,
d(initial state) and every parameter gradient to 1e-10, on every available backend.

``python tests/test_torch_parity.py`` runs all cases on every available backend and prints
the largest absolute error measured per quantity.
"""
import numpy as np
import pytest

import rnnkern as rk
from rnnkern import interop

torch = pytest.importorskip("torch")

TOL = 1e-10
MAX_ERR = {}  # (backend, quantity) -> largest |rk - torch| seen; read by __main__

# id: (torch class, torch kwargs, B, T, I, H, L, batch_first, initial state, lengths)
CASES = {
    "lstm":             ("LSTM", {}, 3, 5, 4, 6, 1, True, False, None),
    "lstm-2l-state":    ("LSTM", {}, 3, 5, 4, 6, 2, True, True, None),
    "lstm-3l-timemajor": ("LSTM", {}, 2, 4, 3, 5, 3, False, True, None),
    "gru":              ("GRU", {}, 3, 5, 4, 6, 1, True, False, None),
    "gru-2l-state":     ("GRU", {}, 3, 5, 4, 6, 2, True, True, None),
    "rnn-tanh-2l-state": ("RNN", {}, 3, 5, 4, 6, 2, True, True, None),
    "rnn-relu-2l-state": ("RNN", {"nonlinearity": "relu"}, 3, 5, 4, 6, 2, True, True, None),
    "lstm-tiny":        ("LSTM", {}, 1, 1, 1, 1, 1, True, True, None),
    "gru-tiny":         ("GRU", {}, 1, 1, 1, 1, 2, True, True, None),
    "rnn-odd":          ("RNN", {}, 5, 7, 3, 9, 1, True, True, None),
    "lstm-odd":         ("LSTM", {}, 5, 7, 3, 9, 2, True, False, None),
    "lstm-lengths":     ("LSTM", {}, 4, 6, 3, 5, 2, True, True, [6, 1, 3, 4]),
    "gru-lengths":      ("GRU", {}, 4, 6, 3, 5, 2, True, True, [2, 6, 5, 1]),
    "rnn-lengths":      ("RNN", {}, 4, 6, 3, 5, 1, True, True, [3, 3, 6, 1]),
}


def _backends():
    for name, (ok, reason) in rk.available_backends().items():
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name} unavailable: {reason}")]
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        yield pytest.param(name, marks=marks, id=name)


def _dev(backend, a):
    """The array as the backend wants it: CuPy for cuda, NumPy otherwise."""
    if backend == "cuda":
        import cupy
        return cupy.asarray(a)
    return a


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _close(backend, what, mine, ref):
    mine = _host(mine)
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert mine.shape == ref.shape, f"{what}: shape {mine.shape} != torch {ref.shape}"
    err = float(np.max(np.abs(mine - ref))) if mine.size else 0.0
    key = (backend, what)
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    np.testing.assert_allclose(mine, ref, rtol=TOL, atol=TOL, err_msg=what)


def _torch_run(module, x, h0, c0, lengths, g_out, g_h, g_c, batch_first):
    """Torch forward + backward of sum(out*g_out) + sum(h_n*g_h) [+ sum(c_n*g_c)]."""
    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True) if h0 is not None else None
    c0t = torch.tensor(c0, requires_grad=True) if c0 is not None else None
    inp = xt if batch_first else xt.transpose(0, 1)
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(
            inp, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    state = None if h0t is None else ((h0t, c0t) if c0t is not None else h0t)
    out, st = module(inp, state)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first,
                                                        total_length=x.shape[1])
    if not batch_first:
        out = out.transpose(0, 1)
    h_n, c_n = st if isinstance(st, tuple) else (st, None)
    loss = (out * torch.tensor(g_out)).sum() + (h_n * torch.tensor(g_h)).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.tensor(g_c)).sum()
    loss.backward()
    return out, h_n, c_n, xt, h0t, c0t


def run_case(backend, case_id):
    kind, kw, B, T, I, H, L, batch_first, with_state, lengths = CASES[case_id]
    torch.manual_seed(list(CASES).index(case_id))  # str hash() varies per process
    module = getattr(torch.nn, kind)(I, H, L, batch_first=batch_first, **kw).double()
    layer = interop.from_torch(module, backend=backend)
    if backend == "cuda":
        layer.to("cuda")                  # device input needs the parameters there too
    assert layer.dtype == np.float64 and layer.num_layers == L
    if kind == "LSTM":
        assert layer.spec.forget_bias == 0.0  # PyTorch's LSTM has no runtime forget bias
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, T, I))
    lstm = kind == "LSTM"
    h0 = rng.normal(size=(L, B, H)) if with_state else None
    c0 = rng.normal(size=(L, B, H)) if (with_state and lstm) else None
    g_out = rng.normal(size=(B, T, H))
    if lengths is not None:  # torch gives no gradient to padding; rnnkern ignores it
        g_out *= (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[..., None]
    g_h = rng.normal(size=(L, B, H))
    g_c = rng.normal(size=(L, B, H)) if lstm else None

    out_t, h_t, c_t, xt, h0t, c0t = _torch_run(module, x, h0, c0, lengths, g_out, g_h, g_c,
                                               batch_first)

    init = None
    if with_state:
        init = (_dev(backend, h0), _dev(backend, c0)) if lstm else _dev(backend, h0)
    lens = None if lengths is None else np.asarray(lengths, dtype=np.int64)
    out, state = layer(_dev(backend, x), init, lens)
    d_state = (_dev(backend, g_h), _dev(backend, g_c)) if lstm else _dev(backend, g_h)
    dx, dstate0 = layer.backward(_dev(backend, g_out), d_state)

    _close(backend, "outputs", out, out_t)
    h_n, c_n = state if lstm else (state, None)
    _close(backend, "h_n", h_n, h_t)
    if lstm:
        _close(backend, "c_n", c_n, c_t)
    _close(backend, "dx", dx, xt.grad)
    if with_state:
        dh0, dc0 = dstate0 if lstm else (dstate0, None)
        _close(backend, "dh0", dh0, h0t.grad)
        if lstm:
            _close(backend, "dc0", dc0, c0t.grad)
    params = dict(module.named_parameters())
    assert set(params) == set(layer.grads)
    for name, p in params.items():
        _close(backend, "param grads", layer.grads[name], p.grad)


@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("backend", list(_backends()))
def test_matches_torch(backend, case_id):
    run_case(backend, case_id)


if __name__ == "__main__":
    for name, (ok, reason) in rk.available_backends().items():
        if not ok:
            print(f"{name:6s} skipped: {reason}")
            continue
        for case_id in CASES:
            run_case(name, case_id)
    for (backend, what), err in sorted(MAX_ERR.items()):
        print(f"{backend:6s} {what:12s} max |rk - torch| = {err:.3e}")
