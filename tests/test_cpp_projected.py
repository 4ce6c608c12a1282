"""The C++ LSTM's projected-input mode (``rnnkern.backends.cpp.forward(..., projected=True)``).

Given ``x_proj = x @ w_ih.T`` [B,T,4H], the projected forward must give the normal forward's
outputs and final states, and its backward the normal dh0, dc0, dW_hh and biases, with
``dx_proj @ w_ih == dx`` and ``dx_proj.reshape(-1, 4H).T @ x.reshape(-1, I) == dW_ih`` (its own
dW_ih is zeros: the caller forms it). The normal C++ path is checked against the reference in
test_backend_parity.py / test_cpp_bindings.py; here the projected one is checked against both.
Shape legend: B batch, T time steps, I input size, H hidden size.
"""
from __future__ import annotations

import numpy as np
import pytest

from rnnkern import reference
from rnnkern.cellspec import CellSpec

_C = pytest.importorskip("rnnkern._C", reason="rnnkern._C is not built (pip install -e .)")
from rnnkern.backends import cpp  # noqa: E402  (after the skip: it registers the BLAS)

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture
def threads():
    """Sets the time loop's thread count, forcing the batch split even at test sizes (and the
    LSTM backward's ring size); restores all three after."""
    work, ring = _C.split_min_work(), _C.lstm_ring_rows()

    def use(n, ring_rows=None):
        _C.set_threads(n)
        _C.set_split_min_work(0 if n > 1 else work)
        if ring_rows is not None:
            _C.set_lstm_ring_rows(ring_rows)

    yield use
    _C.set_threads(0)
    _C.set_split_min_work(work)
    _C.set_lstm_ring_rows(ring)


def _case(B, T, I, H, dtype, lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(dtype)  # noqa: E731
    a = dict(x=n(B, T, I), w_ih=n(4 * H, I, k=0.4), w_hh=n(4 * H, H, k=0.4), b_ih=n(4 * H),
             b_hh=n(4 * H), h0=n(B, H), c0=n(B, H),
             lengths=None if lengths is None else np.array(lengths, np.int64))
    d = dict(d_outputs=n(B, T, H), d_h_n=n(B, H), d_c_n=n(B, H))
    return a, d


def _project(a):
    """x [B,T,I] -> x W_ih^T [B,T,4H] in x's dtype, as a caller's table gather would give."""
    return np.ascontiguousarray(a["x"] @ a["w_ih"].T)


def _close(got, want, what, dtype):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL[dtype])


# (B, T, I, H, lengths): odd H (two float / five double vectors, padded), T=1, B=1, H=1,
# lengths incl. 0, I wider and narrower than 4H
SHAPES = [(3, 5, 7, 33, [5, 0, 2]), (2, 1, 4, 6, None), (1, 4, 3, 5, [3]),
          (3, 4, 2, 1, [4, 1, 0]), (5, 7, 80, 17, [7, 0, 3, 7, 1])]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("nthreads, ring_rows", [(1, None), (1, 1), (2, None), (2, 3)],
                         ids=["1t", "1t-ring1", "2t", "2t-ring3"])
@pytest.mark.parametrize("B, T, I, H, lengths", SHAPES,
                         ids=[f"B{s[0]}T{s[1]}I{s[2]}H{s[3]}" for s in SHAPES])
def test_projected_matches_normal(threads, nthreads, ring_rows, dtype, B, T, I, H, lengths):
    threads(nthreads, ring_rows)
    spec = CellSpec("lstm", forget_bias=0.5)
    a, d = _case(B, T, I, H, dtype, lengths)
    xp = _project(a)
    want = cpp.forward(spec, **a)
    got = cpp.forward(spec, **dict(a, x=xp), projected=True)
    for g, w, what in zip(got[:3], want[:3], ("outputs", "h_n", "c_n")):
        assert g.dtype == dtype
        _close(g, w, what, dtype)
    wb = cpp.backward(spec, want[3], **d)
    gb = cpp.backward(spec, got[3], **d)
    dxp, dW = gb[0], gb[3]
    assert dxp.shape == (B, T, 4 * H) and dxp.dtype == dtype
    _close(dxp @ a["w_ih"], wb[0], "dx_proj @ w_ih vs dx", dtype)
    _close(dxp.reshape(-1, 4 * H).T @ a["x"].reshape(-1, I), wb[3]["w_ih"],
           "dx_proj^T x vs dW_ih", dtype)
    assert dW["w_ih"].shape == a["w_ih"].shape and not np.any(dW["w_ih"])
    for g, w, what in zip(gb[1:3], wb[1:3], ("dh0", "dc0")):
        _close(g, w, what, dtype)
    for k in ("w_hh", "b_ih", "b_hh"):
        _close(dW[k], wb[3][k], k, dtype)
    if lengths is not None:  # finished steps: no output, no gradient
        for b, n in enumerate(lengths):
            assert not np.any(got[0][b, n:]) and not np.any(dxp[b, n:])


def test_projected_matches_reference_f64():
    """Directly against the NumPy reference (its dx maps through w_ih), d_* None allowed."""
    spec = CellSpec("lstm", forget_bias=1.0)
    a, d = _case(4, 6, 9, 13, np.float64, [6, 2, 0, 5], seed=3)
    ref = reference.forward(spec, **a)
    got = cpp.forward(spec, **dict(a, x=_project(a)), projected=True)
    for g, w, what in zip(got[:3], ref[:3], ("outputs", "h_n", "c_n")):
        _close(g, w, what, np.float64)
    d["d_h_n"] = None
    rb = reference.backward(spec, ref[3], **d)
    gb = cpp.backward(spec, got[3], **d)
    _close(gb[0] @ a["w_ih"], rb[0], "dx", np.float64)
    _close(gb[0].reshape(-1, 52).T @ a["x"].reshape(-1, 9), rb[3]["w_ih"], "dW_ih", np.float64)
    for k in ("w_hh", "b_ih", "b_hh"):
        _close(gb[3][k], rb[3][k], k, np.float64)
    _close(gb[1], rb[1], "dh0", np.float64)
    _close(gb[2], rb[2], "dc0", np.float64)


def test_projected_ignores_w_ih_values():
    """The forward does not read w_ih (only its shape): NaNs there change nothing."""
    spec = CellSpec("lstm")
    a, d = _case(2, 3, 5, 7, np.float64, None)
    xp = _project(a)
    clean = cpp.forward(spec, **dict(a, x=xp), projected=True)
    nan = cpp.forward(spec, **dict(a, x=xp, w_ih=np.full_like(a["w_ih"], np.nan)), projected=True)
    np.testing.assert_array_equal(clean[0], nan[0])
    gb = cpp.backward(spec, nan[3], **d)
    assert np.all(np.isfinite(gb[0])) and not np.any(gb[3]["w_ih"])


def test_projected_x_of_wrong_width_is_a_value_error():
    spec = CellSpec("lstm")
    a, _ = _case(2, 3, 5, 7, np.float64, None)
    bad = np.ascontiguousarray(_project(a)[:, :, :-1])
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, G\*H\] = \[2, 3, 28\]"):
        cpp.forward(spec, **dict(a, x=bad), projected=True)
    with pytest.raises(ValueError, match=r"x must have shape"):  # unprojected x, projected call
        cpp.forward(spec, **a, projected=True)


@pytest.mark.parametrize("spec", [CellSpec("gru"), CellSpec("rnn")], ids=["gru", "rnn"])
def test_projected_other_cells_are_a_value_error(spec):
    rng = np.random.default_rng(0)
    G, H = spec.gates, 4
    a = dict(x=rng.standard_normal((2, 3, G * H)), w_ih=rng.standard_normal((G * H, 5)),
             w_hh=rng.standard_normal((G * H, H)), b_ih=np.zeros(G * H), b_hh=np.zeros(G * H),
             h0=None)
    with pytest.raises(ValueError, match="projected input is supported for the LSTM only"):
        cpp.forward(spec, **a, projected=True)
    with pytest.raises(ValueError, match="projected input is supported for the LSTM only"):
        _C.backward(spec.kind, a["x"], a["w_ih"], a["w_hh"], None, a["x"], None, a["x"], None,
                    projected=True)


def test_backward_mode_must_match_forward():
    """Saved arrays of a normal forward handed to a projected backward (or the reverse): the
    row widths differ, so the binding refuses them by name instead of misreading memory."""
    spec = CellSpec("lstm")
    a, d = _case(2, 3, 40, 7, np.float64, None)
    xp = _project(a)
    normal = cpp.forward(spec, **a)[3]
    proj = cpp.forward(spec, **dict(a, x=xp), projected=True)[3]
    with pytest.raises(ValueError, match="hprev must have shape"):
        cpp.backward(spec, dict(normal, x=xp, projected=True), **d)
    with pytest.raises(ValueError, match="hprev must have shape"):
        cpp.backward(spec, dict(proj, x=a["x"], projected=False), **d)


# ---- from a table: x [V,4H] and ids [B,T] (the fused training step's first cell) -------------

def _table_case(B, T, V, H, dtype, lengths, seed=0):
    """A table [V,4H] and ids [B,T] using every row at least once where B*T >= V."""
    a, d = _case(B, T, 1, H, dtype, lengths, seed)
    rng = np.random.default_rng(seed + 1)
    table = (rng.standard_normal((V, 4 * H))).astype(dtype)
    ids = rng.permutation(np.resize(np.arange(V), B * T)).reshape(B, T).astype(np.int64)
    return a, d, table, ids


TABLE_SHAPES = [(3, 5, 4, 33, [5, 0, 2]), (2, 1, 1, 6, None), (1, 4, 7, 5, [3]),
                (3, 4, 2, 1, [4, 1, 0]), (5, 7, 25, 17, [7, 0, 3, 7, 1])]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("nthreads, ring_rows", [(1, None), (2, 3), (3, None)],
                         ids=["1t", "2t-ring3", "3t"])
@pytest.mark.parametrize("B, T, V, H, lengths", TABLE_SHAPES,
                         ids=[f"B{s[0]}T{s[1]}V{s[2]}H{s[3]}" for s in TABLE_SHAPES])
def test_table_by_ids_matches_gathered_rows(threads, nthreads, ring_rows, dtype, B, T, V, H,
                                            lengths):
    """Reading table[ids] in place gives the gathered projected call's results exactly, and its
    dx is that call's dx summed per id (V=1, ids past a length, more chunks than ids)."""
    threads(nthreads, ring_rows)
    spec = CellSpec("lstm", forget_bias=0.5)
    a, d, table, ids = _table_case(B, T, V, H, dtype, lengths)
    gathered = cpp.forward(spec, **dict(a, x=np.ascontiguousarray(table[ids])), projected=True)
    got = cpp.forward(spec, **dict(a, x=table), projected=True, ids=ids)
    for g, w in zip(got[:3], gathered[:3]):
        np.testing.assert_array_equal(g, w)
    wb = cpp.backward(spec, gathered[3], **d)
    gb = cpp.backward(spec, got[3], **d)
    assert gb[0].shape == (V, 4 * H) and gb[0].dtype == dtype
    want = np.zeros((V, 4 * H))
    np.add.at(want, ids.reshape(-1), wb[0].reshape(-1, 4 * H).astype(np.float64))
    _close(gb[0], want, "d table", dtype)
    for g, w, what in zip(gb[1:3], wb[1:3], ("dh0", "dc0")):
        np.testing.assert_array_equal(g, w, err_msg=what)
    for k in ("w_ih", "w_hh", "b_ih", "b_hh"):
        np.testing.assert_array_equal(gb[3][k], wb[3][k], err_msg=k)


def test_table_gradient_against_finite_differences():
    """d loss / d table in float64, loss = sum(outputs * d_outputs) + h_n . d_h_n + c_n . d_c_n."""
    spec = CellSpec("lstm", forget_bias=1.0)
    a, d, table, ids = _table_case(3, 4, 5, 3, np.float64, [4, 2, 0], seed=5)

    def loss(tab):
        out, h, c, _ = cpp.forward(spec, **dict(a, x=tab), projected=True, ids=ids)
        return (out * d["d_outputs"]).sum() + (h * d["d_h_n"]).sum() + (c * d["d_c_n"]).sum()
    got = cpp.backward(spec, cpp.forward(spec, **dict(a, x=table), projected=True, ids=ids)[3],
                       **d)[0]
    num = np.zeros_like(table)
    eps = 1e-6
    for idx in np.ndindex(*table.shape):
        t1, t2 = table.copy(), table.copy()
        t1[idx] += eps
        t2[idx] -= eps
        num[idx] = (loss(t1) - loss(t2)) / (2 * eps)
    np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-8)


def test_table_by_ids_bad_input_is_a_value_error():
    spec = CellSpec("lstm")
    a, d, table, ids = _table_case(2, 3, 4, 5, np.float64, None)

    def call(x=table, ids=ids):
        return cpp.forward(spec, **dict(a, x=x), projected=True, ids=ids)
    for bad, where in ((4, 5), (-1, 0)):
        wrong = ids.copy()
        wrong.flat[where] = bad
        with pytest.raises(ValueError, match=rf"ids must lie in \[0, V\) = \[0, 4\), got {bad} "
                                             rf"at position {where}"):
            call(ids=wrong)
    with pytest.raises(ValueError, match="ids must have dtype int64"):
        call(ids=ids.astype(np.int32))
    with pytest.raises(ValueError, match=r"ids must be 2-D \[B,T\]"):
        call(ids=ids.reshape(-1))
    with pytest.raises(ValueError, match=r"h0 must have shape \[3, 5\]"):  # B, T come from ids
        call(ids=np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match=r"x must be a table \[V, G\*H\] = \[V, 20\]"):
        call(x=table[:, :-1].copy())
    with pytest.raises(ValueError, match="ids is for projected input from a table only"):
        cpp.forward(spec, **a, ids=ids)
    saved = cpp.forward(spec, **dict(a, x=table), projected=True, ids=ids)[3]
    with pytest.raises(ValueError, match="ids must lie in"):
        cpp.backward(spec, dict(saved, ids=np.full_like(ids, 9)), **d)


# ---- no initial state: the first step's product skips h's rows ------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("nthreads", [1, 2], ids=["1t", "2t"])
@pytest.mark.parametrize("mode", ["normal", "projected", "table"])
@pytest.mark.parametrize("B, T, I, H, lengths", SHAPES,
                         ids=[f"B{s[0]}T{s[1]}I{s[2]}H{s[3]}" for s in SHAPES])
def test_no_initial_state_is_zeros_exactly(threads, nthreads, mode, dtype, B, T, I, H, lengths):
    """h0 = c0 = None runs step 0's GEMM over the x rows only (h is zero there); every result,
    forward and backward, must equal the call given zero states bit for bit."""
    threads(nthreads)
    spec = CellSpec("lstm", forget_bias=0.5)
    if mode == "table":
        a, d, table, ids = _table_case(B, T, I, H, dtype, lengths)
        a, extra = dict(a, x=table), dict(projected=True, ids=ids)
    else:
        a, d = _case(B, T, I, H, dtype, lengths)
        extra = dict(projected=mode == "projected")
        if mode == "projected":
            a = dict(a, x=_project(a))
    zeros = np.zeros((B, H), dtype)
    want = cpp.forward(spec, **dict(a, h0=zeros, c0=zeros), **extra)
    got = cpp.forward(spec, **dict(a, h0=None, c0=None), **extra)
    for g, w, what in zip(got[:3], want[:3], ("outputs", "h_n", "c_n")):
        np.testing.assert_array_equal(g, w, err_msg=what)
    gb, wb = cpp.backward(spec, got[3], **d), cpp.backward(spec, want[3], **d)
    for g, w, what in zip(gb[:3], wb[:3], ("dx", "dh0", "dc0")):
        np.testing.assert_array_equal(g, w, err_msg=what)
    for k in ("w_ih", "w_hh", "b_ih", "b_hh"):
        np.testing.assert_array_equal(gb[3][k], wb[3][k], err_msg=k)
