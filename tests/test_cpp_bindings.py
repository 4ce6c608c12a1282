"""The binding boundary of the C++ extension ``rnnkern._C`` (csrc/bindings/seam.cpp) and the
machinery under it: every bad input is a Python exception naming the argument (never a crash or a
silent copy); every code path the tunables of ``rnnkern.config`` select -- the GEMM loop or BLAS,
each ISA build of the loop, batch chunks on threads, the LSTM backward's ring, the result pool --
matches ``rnnkern.reference``; lengths outside [0, T] act as their nearest end.

The layer-level parity of every backend lives in test_backend_parity.py (it covers ``cpp``).
Shape legend: B batch, T time steps, I input size, H hidden size, G gates.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from rnnkern import config, reference
from rnnkern.cellspec import CellSpec

from conftest import assert_close

_C = pytest.importorskip("rnnkern._C", reason="rnnkern._C is not built (pip install -e .)")
from rnnkern.backends import cpp  # noqa: E402  (after the skip: it registers the BLAS)

if not cpp.available()[0]:
    pytest.skip(cpp.available()[1], allow_module_level=True)

B, T, I, H = 3, 4, 5, 6

# every cell and convention the kernels implement
SPECS = {"lstm": CellSpec("lstm", forget_bias=1.0), "gru": CellSpec("gru"),
         "gru_tf1": CellSpec("gru", reset_after=False), "rnn": CellSpec("rnn"),
         "rnn_relu": CellSpec("rnn", nonlinearity="relu")}
CELLS = pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))


def _problem(spec, B=B, T=T, I=I, H=H, dtype=np.float64, seed=0, scale=0.4, lengths=None):
    """Keyword arguments of one forward: x, weights, biases, h0, c0 (LSTM only), lengths."""
    G = spec.gates
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(x=n(B, T, I), w_ih=n(G * H, I) * dtype(scale), w_hh=n(G * H, H) * dtype(scale),
                b_ih=n(G * H), b_hh=n(G * H), h0=n(B, H),
                c0=n(B, H) if spec.has_cell_state else None,
                lengths=None if lengths is None else np.asarray(lengths, np.int64))


def _grads(spec, B=B, T=T, H=H, dtype=np.float64, seed=1):
    """d_outputs, d_h_n, d_c_n (LSTM only) for a backward."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, H)).astype(dtype), rng.standard_normal((B, H)).astype(dtype),
            rng.standard_normal((B, H)).astype(dtype) if spec.has_cell_state else None)


def _as64(a):
    return {k: v if v is None or k == "lengths" else v.astype(np.float64) for k, v in a.items()}


def _check_against_reference(spec, a, d=None):
    """cpp.forward / backward on ``a`` (float32 or float64) against the reference in float64:
    outputs, final states and every gradient. Returns the C++ results."""
    got = cpp.forward(spec, **a)
    want = reference.forward(spec, **_as64(a))
    for g, w, what in zip(got[:3], want[:3], ("outputs", "h_n", "c_n")):
        assert (g is None) == (w is None), what
        if w is not None:
            assert_close(g, w, what)
    d = _grads(spec, *a["x"].shape[:2], a["w_hh"].shape[1], a["x"].dtype) if d is None else d
    gb = cpp.backward(spec, got[3], *d)
    wb = reference.backward(spec, want[3], *(None if v is None else v.astype(np.float64)
                                             for v in d))
    _assert_backward_matches(gb, wb)
    return got, gb


def _assert_backward_matches(got, want):
    """(dx, dh0, dc0, weight grads) of the backend against the reference's."""
    for g, w, what in zip(got[:3], want[:3], ("dx", "dh0", "dc0")):
        assert (g is None) == (w is None), what
        if w is not None:
            assert_close(g, w, what)
    for k in want[3]:
        assert_close(got[3][k], want[3][k], k)


def _native_forward(spec, a):
    return _C.forward(cpp.native_spec(spec), a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                      a["h0"], a["c0"], a["lengths"])


@pytest.fixture
def tunables():
    """Sets ``rnnkern.config``'s CPP_* names for one test (``tunables(CPP_THREADS=2)``) and
    restores every one it set after. (Not monkeypatch.setattr: pytest 9.2's undo deletes a name
    that is missing from the module's ``__dict__`` -- config forwards CPP_* through
    ``__getattr__`` -- and that deletion fails, leaving the value set.)"""
    before = {}

    def set_(**values):
        for name, value in values.items():
            before.setdefault(name, getattr(config, name))
            setattr(config, name, value)

    yield set_
    for name, value in before.items():
        setattr(config, name, value)


# ---------------------------------------------------------------------- CellSpec, valid calls

def test_cell_spec_parses_and_reports_its_options():
    s = _C.CellSpec("gru", reset_after=False)
    assert (s.kind, s.nonlinearity, s.forget_bias, s.reset_after) == ("gru", "tanh", 0.0, False)
    s = _C.CellSpec("rnn", "relu")
    assert (s.kind, s.nonlinearity) == ("rnn", "relu")
    s = _C.CellSpec("lstm", forget_bias=1.5)
    assert (s.kind, s.forget_bias, s.reset_after) == ("lstm", 1.5, True)
    assert repr(s).startswith("CellSpec('lstm', nonlinearity='tanh', forget_bias=1.5")
    spec = CellSpec("gru", reset_after=False)
    native = cpp.native_spec(spec)
    assert native is cpp.native_spec(CellSpec("gru", reset_after=False))  # made once per spec
    assert (native.kind, native.reset_after) == ("gru", False)


def test_cell_spec_rejects_bad_options():
    for kind in ("conv", "LSTM", ""):
        with pytest.raises(ValueError,
                           match=re.escape(f"kind must be 'rnn', 'lstm' or 'gru', got '{kind}'")):
            _C.CellSpec(kind)
    with pytest.raises(ValueError,
                       match=re.escape("nonlinearity must be 'tanh' or 'relu', got 'sigmoid'")):
        _C.CellSpec("rnn", nonlinearity="sigmoid")
    with pytest.raises(TypeError):  # not a string: pybind11's own argument check
        _C.CellSpec(3)


@CELLS
def test_valid_call_runs(spec):
    a = _problem(spec, lengths=[T, 0, 2])
    out, h_n, c_n, saved = _native_forward(spec, a)
    assert out.shape == (B, T, H) and h_n.shape == (B, H) and out.dtype == h_n.dtype == np.float64
    assert (c_n is None) != spec.has_cell_state and (c_n is None or c_n.shape == (B, H))
    assert isinstance(saved, _C.Saved)
    assert np.all(out[1] == 0) and np.all(out[2, 2:] == 0)  # lengths 0 and 2
    np.testing.assert_array_equal(h_n[1], a["h0"][1])       # length 0: the initial state
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = _C.backward(saved, np.ones((B, T, H)))
    G = spec.gates
    assert dx.shape == (B, T, I) and dh0.shape == (B, H) and (dc0 is None) != spec.has_cell_state
    assert (dw_ih.shape, dw_hh.shape, db_ih.shape, db_hh.shape) == ((G * H, I), (G * H, H),
                                                                    (G * H,), (G * H,))
    np.testing.assert_array_equal(dx[1], 0)  # no step of sequence 1 ran
    # every d_* may be None (zeros): all gradients vanish
    zero = _C.backward(saved)
    for g in zero:
        if g is not None:
            np.testing.assert_array_equal(g, 0)


def test_forward_takes_a_native_cell_spec_only():
    a = _problem(SPECS["lstm"])
    with pytest.raises(TypeError):
        _C.forward("lstm", a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
    with pytest.raises(TypeError):
        _C.forward(SPECS["lstm"], a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])


@CELLS
def test_inputs_are_read_only_and_never_written(spec):
    """Read-only arrays are accepted, and no call writes into what it was given."""
    a = _problem(spec, lengths=[T, 0, 2])
    d = _grads(spec)
    kept = {k: None if v is None else v.copy() for k, v in a.items()}
    for v in (*a.values(), *d):
        if v is not None:
            v.flags.writeable = False
    out, h_n, c_n, saved = _native_forward(spec, a)
    grads = _C.backward(saved, *d)
    for k, v in a.items():
        if v is not None:
            np.testing.assert_array_equal(v, kept[k], err_msg=k)
    for r in (out, h_n, c_n, *grads):  # results are the caller's, writeable, sharing nothing
        if r is not None:
            assert r.flags.writeable and r.flags.c_contiguous
            assert not any(np.shares_memory(r, v) for v in (*a.values(), *d) if v is not None)


# ---------------------------------------------------------------------- forward: bad input

def _unaligned(a):
    """A C-contiguous copy of ``a`` whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous
    return u


# (argument, how to spoil it, the message: {GH} = G*H of the cell)
_BAD_FORWARD = [
    ("x", lambda a: np.asfortranarray(a["x"]), "x must be C-contiguous"),
    ("x", lambda a: a["x"][:, ::2], "x must be C-contiguous"),  # T halves; lengths fixed below
    ("x", lambda a: _unaligned(a["x"]), "x must be aligned"),
    ("x", lambda a: a["x"].astype(np.int64), "x must have dtype float32 or float64, got int64"),
    ("x", lambda a: a["x"].astype(np.float16), "x must have dtype float32 or float64"),
    ("x", lambda a: a["x"].astype(">f8"), "x must have dtype float32 or float64, got >f8"),
    ("x", lambda a: a["x"][0], "x must be 3-D [B,T,I], got shape [4, 5]"),
    ("x", lambda a: a["x"][..., None], "x must be 3-D"),
    ("x", lambda a: a["x"].tolist(), "x must be a numpy.ndarray, got list"),
    ("x", lambda a: None, "x must be a numpy.ndarray, got NoneType"),
    ("w_ih", lambda a: a["w_ih"].astype(np.float32), "w_ih must have dtype float64, got float32"),
    ("w_ih", lambda a: a["w_ih"].astype(">f8"), "w_ih must have dtype float64, got >f8"),
    ("w_ih", lambda a: a["w_ih"][:, :-1].copy(), "w_ih must have shape [{GH}, 5], got [{GH}, 4]"),
    ("w_ih", lambda a: a["w_ih"][:-1].copy(), "w_ih must have shape [{GH}, 5]"),
    ("w_ih", lambda a: a["w_ih"].ravel(), "w_ih must have shape [{GH}, 5]"),
    ("w_ih", lambda a: np.asfortranarray(a["w_ih"]), "w_ih must be C-contiguous"),
    ("w_ih", lambda a: None, "w_ih must be an array, got None"),
    ("w_hh", lambda a: a["w_hh"].T.copy().T, "w_hh must be C-contiguous"),
    ("w_hh", lambda a: a["w_hh"][:-1].copy(), "w_hh must have shape [{GH}, 6]"),
    ("w_hh", lambda a: a["w_hh"][:, :, None], "w_hh must be 2-D [G*H,H], got shape"),
    ("w_hh", lambda a: a["w_hh"].tolist(), "w_hh must be a numpy.ndarray, got list"),
    ("w_hh", lambda a: None, "w_hh must be a numpy.ndarray, got NoneType"),
    ("w_hh", lambda a: _unaligned(a["w_hh"]), "w_hh must be aligned"),
    ("w_hh", lambda a: a["w_hh"].astype(np.float32), "w_hh must have dtype float64"),
    ("b_ih", lambda a: a["b_ih"][:-1].copy(), "b_ih must have shape [{GH}], got"),
    ("b_ih", lambda a: a["b_ih"][None], "b_ih must have shape [{GH}], got [1, {GH}]"),
    ("b_ih", lambda a: a["b_ih"].tolist(), "b_ih must be a numpy.ndarray, got list"),
    ("b_hh", lambda a: a["b_hh"].astype(np.float32), "b_hh must have dtype float64"),
    ("b_hh", lambda a: None, "b_hh must be an array, got None"),
    ("b_hh", lambda a: np.repeat(a["b_hh"], 2)[::2], "b_hh must be C-contiguous"),
    ("h0", lambda a: np.repeat(a["h0"], 2, axis=1)[:, ::2], "h0 must be C-contiguous"),
    ("h0", lambda a: a["h0"][:-1].copy(), "h0 must have shape [3, 6], got [2, 6]"),
    ("h0", lambda a: a["h0"].astype(np.float32), "h0 must have dtype float64, got float32"),
    ("h0", lambda a: a["h0"].tolist(), "h0 must be a numpy.ndarray, got list"),
    ("h0", lambda a: _unaligned(a["h0"]), "h0 must be aligned"),
    ("lengths", lambda a: a["lengths"].astype(np.int32),
     "lengths must have dtype int64, got int32"),
    ("lengths", lambda a: a["lengths"].astype(np.float64), "lengths must have dtype int64"),
    ("lengths", lambda a: a["lengths"][:2].copy(), "lengths must have shape [3], got [2]"),
    ("lengths", lambda a: np.repeat(a["lengths"], 2)[::2], "lengths must be C-contiguous"),
    ("lengths", lambda a: a["lengths"].tolist(), "lengths must be a numpy.ndarray, got list"),
]
_BAD_C0 = [  # LSTM only
    ("c0", lambda a: a["c0"].astype(np.float32), "c0 must have dtype float64, got float32"),
    ("c0", lambda a: a["c0"][:, :-1].copy(), "c0 must have shape [3, 6], got [3, 5]"),
    ("c0", lambda a: np.asfortranarray(np.repeat(a["c0"], 2, axis=0)[::2]),
     "c0 must be C-contiguous"),
]


def _bad_forward_cases():
    for cell in ("lstm", "gru", "gru_tf1", "rnn"):
        for k, case in enumerate(_BAD_FORWARD + (_BAD_C0 if cell == "lstm" else [])):
            yield pytest.param(cell, *case, id=f"{cell}-{case[0]}-{k}")
        if cell != "lstm":  # an initial cell state for a cell without one is an error, not ignored
            yield pytest.param(cell, "c0", lambda a: np.zeros((B, H)),
                               "c0 is for LSTM only; pass None", id=f"{cell}-c0-stray")


@pytest.mark.parametrize("cell, name, bad, message", list(_bad_forward_cases()))
def test_forward_rejects_bad_input(cell, name, bad, message):
    spec = SPECS[cell]
    a = _problem(spec, lengths=[T, 0, 2])
    a[name] = bad(a)
    if name == "x" and isinstance(a["x"], np.ndarray) and a["x"].ndim == 3:
        a["lengths"] = np.minimum(a["lengths"], a["x"].shape[1])
    with pytest.raises(ValueError, match=re.escape(message.format(GH=spec.gates * H))):
        _native_forward(spec, a)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_wants_every_array_in_xs_dtype(cell):
    """x's dtype picks the kernels' type; every other float array must have it too."""
    spec = SPECS[cell]
    for dtype, other in ((np.float32, np.float64), (np.float64, np.float32)):
        for name in ("w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0"):
            a = _problem(spec, dtype=dtype)
            if a[name] is None:
                continue
            a[name] = a[name].astype(other)
            with pytest.raises(ValueError, match=re.escape(
                    f"{name} must have dtype {np.dtype(dtype).name}, got {np.dtype(other).name}")):
                _native_forward(spec, a)


# ---------------------------------------------------------------------- backward: bad input

# (argument, how to spoil the good value, the message)
_BAD_BACKWARD = [
    ("d_outputs", lambda v: v[:, :-1].copy(), "d_outputs must have shape [3, 4, 6], got [3, 3, 6]"),
    ("d_outputs", lambda v: v[0], "d_outputs must have shape [3, 4, 6]"),
    ("d_outputs", np.asfortranarray, "d_outputs must be C-contiguous"),
    ("d_outputs", lambda v: np.repeat(v, 2, axis=2)[..., ::2], "d_outputs must be C-contiguous"),
    ("d_outputs", _unaligned, "d_outputs must be aligned"),
    ("d_outputs", lambda v: v.tolist(), "d_outputs must be a numpy.ndarray, got list"),
    ("d_outputs", lambda v: v.astype(np.int64), "d_outputs must have dtype {dt}, got int64"),
    ("d_h_n", lambda v: v[None], "d_h_n must have shape [3, 6], got [1, 3, 6]"),
    ("d_h_n", lambda v: v.T.copy(), "d_h_n must have shape [3, 6], got [6, 3]"),
    ("d_h_n", lambda v: v.astype(np.float16), "d_h_n must have dtype {dt}, got float16"),
    ("d_h_n", lambda v: np.asfortranarray(np.repeat(v, 2, axis=0)[::2]), "d_h_n must be C-"),
    ("d_h_n", lambda v: 1.0, "d_h_n must be a numpy.ndarray, got float"),
]
_BAD_D_C_N = [
    ("d_c_n", lambda v: v[:, :-1].copy(), "d_c_n must have shape [3, 6], got [3, 5]"),
    ("d_c_n", lambda v: v.astype(np.int32), "d_c_n must have dtype {dt}, got int32"),
    ("d_c_n", lambda v: np.asfortranarray(np.repeat(v, 2, axis=0)[::2]), "d_c_n must be C-"),
]


def _bad_backward_cases():
    for cell in ("lstm", "gru", "gru_tf1", "rnn"):
        for k, case in enumerate(_BAD_BACKWARD + (_BAD_D_C_N if cell == "lstm" else [])):
            yield pytest.param(cell, *case, id=f"{cell}-{case[0]}-{k}")
        if cell != "lstm":
            yield pytest.param(cell, "d_c_n", lambda v: np.zeros((B, H)),
                               "d_c_n is for LSTM only; pass None", id=f"{cell}-d_c_n-stray")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell, name, bad, message", list(_bad_backward_cases()))
def test_backward_rejects_bad_input(dtype, cell, name, bad, message):
    spec = SPECS[cell]
    *_, saved = _native_forward(spec, _problem(spec, lengths=[T, 0, 2], dtype=dtype))
    d = dict(zip(("d_outputs", "d_h_n", "d_c_n"), _grads(spec, dtype=dtype)))
    d[name] = bad(d[name] if d[name] is not None else np.zeros((B, H), dtype))
    with pytest.raises(ValueError, match=re.escape(message.format(dt=np.dtype(dtype).name))):
        _C.backward(saved, **d)
    _C.backward(saved)  # the failed call left the saved record usable


@pytest.mark.parametrize("dtype, other", [(np.float32, np.float64), (np.float64, np.float32)])
def test_backward_gradients_must_have_the_forwards_dtype(dtype, other):
    spec = SPECS["lstm"]
    *_, saved = _native_forward(spec, _problem(spec, dtype=dtype))
    names = {np.float32: "float32", np.float64: "float64"}
    for k, name in enumerate(("d_outputs", "d_h_n", "d_c_n")):
        d = [None, None, None]
        d[k] = np.zeros((B, T, H) if k == 0 else (B, H), other)
        with pytest.raises(ValueError, match=re.escape(
                f"{name} must have dtype {names[dtype]}, got {names[other]}")):
            _C.backward(saved, *d)


def test_saved_is_opaque():
    """Nothing but a forward makes a Saved, and nothing in it is reachable from Python: a
    backward can only ever see the shapes its own forward allocated."""
    *_, saved = _native_forward(SPECS["lstm"], _problem(SPECS["lstm"]))
    with pytest.raises(TypeError):
        _C.Saved()
    with pytest.raises(TypeError):
        saved["act"]
    assert not [n for n in dir(saved) if not n.startswith("_")]
    with pytest.raises(TypeError):
        _C.backward(dict(act=np.zeros(3)))
    with pytest.raises(TypeError):
        _C.backward(None)


@CELLS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saved_drives_its_backward_in_its_dtype_and_can_be_reused(spec, dtype):
    """A float32 forward's saved gives a float32 backward (float64 likewise) that matches the
    reference; a second backward from the same saved gives the same bits (nothing consumed)."""
    a = _problem(spec, B=4, T=5, I=3, H=7, dtype=dtype, lengths=[5, 0, 3, 9])
    got, gb = _check_against_reference(spec, a)
    for r in (*got[:3], *gb[:3], *gb[3].values()):
        assert r is None or r.dtype == dtype
    again = cpp.backward(spec, got[3], *_grads(spec, 4, 5, 7, dtype))
    for g1, g2 in zip((*gb[:3], *gb[3].values()), (*again[:3], *again[3].values())):
        if g1 is not None:
            np.testing.assert_array_equal(g1, g2)


# ---------------------------------------------------------------------- lengths outside [0, T]

@CELLS
@pytest.mark.parametrize("threads", [1, 2])
def test_lengths_outside_0_T_act_as_their_nearest_end(tunables, spec, threads):
    """The layer API validates lengths once; the kernels take any int64 and treat a length below
    0 as 0 and one above T as T (same bits), reading and writing nothing out of bounds."""
    tunables(CPP_THREADS=threads, CPP_SPLIT_MIN_WORK=0 if threads > 1 else 1 << 62)
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    wild = [-1, T + 5, small, big, 2, -(1 << 40), 1 << 40, T]
    near = [0, T, 0, T, 2, 0, T, T]
    a = _problem(spec, B=len(wild), lengths=near)
    clipped = _check_against_reference(spec, a)
    got = cpp.forward(spec, **dict(a, lengths=np.array(wild, np.int64)))
    gb = cpp.backward(spec, got[3], *_grads(spec, B=len(wild)))
    for g, w in zip((*got[:3], *gb[:3], *gb[3].values()),
                    (*clipped[0][:3], *clipped[1][:3], *clipped[1][3].values())):
        if w is not None:
            np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------- tunables, BLAS, results

def test_set_blas_rejects_non_capsules():
    with pytest.raises(ValueError, match="sgemm must be a PyCapsule"):
        _C.set_blas(1, 2)
    with pytest.raises(ValueError, match="sgemm must be a PyCapsule"):
        _C.set_blas(None, 2)
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return
    capi = cython_blas.__pyx_capi__
    try:
        with pytest.raises(ValueError, match="dgemm must be a PyCapsule"):
            _C.set_blas(capi["sgemm"], None)
    finally:
        cpp._register_blas()
    assert _C.have_blas()


def test_negative_sizes_are_rejected_through_config(tunables):
    for name in ("CPP_POOL_LIMIT", "CPP_HUGE_PAGE_MIN"):
        tunables(**{name: getattr(config, name)})  # restored after
        with pytest.raises(ValueError, match="bytes must be >= 0, got -1"):
            setattr(config, name, -1)


def test_config_reads_and_sets_the_extensions_tunables(tunables):
    tunables(CPP_LSTM_RING_ROWS=37, CPP_BLAS_MIN_FLOPS=12345, CPP_THREADS=3,
             CPP_SPLIT_MIN_WORK=77, CPP_POOL_LIMIT=1 << 20, CPP_HUGE_PAGE_MIN=1 << 17)
    assert config.CPP_LSTM_RING_ROWS == _C.lstm_ring_rows() == 37
    assert config.CPP_BLAS_MIN_FLOPS == _C.blas_min_flops() == 12345
    assert config.CPP_THREADS == _C.threads() == 3
    assert config.CPP_SPLIT_MIN_WORK == _C.split_min_work() == 77
    assert config.CPP_POOL_LIMIT == _C.pool_limit() == 1 << 20
    assert config.CPP_HUGE_PAGE_MIN == _C.huge_page_min() == 1 << 17


@CELLS
def test_results_are_fresh_arrays(spec):
    """Returned arrays belong to the caller: a later call must not overwrite earlier results."""
    a = _problem(spec, lengths=[T, 0, 2])
    out1, h1, c1, saved1 = _native_forward(spec, a)
    g1 = _C.backward(saved1, *_grads(spec))
    kept = [None if r is None else r.copy() for r in (out1, h1, c1, *g1)]
    b = dict(a, x=-a["x"], h0=-a["h0"], lengths=None)
    _, _, _, saved2 = _native_forward(spec, b)
    _C.backward(saved2, *_grads(spec, seed=5))
    for r, k in zip((out1, h1, c1, *g1), kept):
        if r is not None:
            np.testing.assert_array_equal(r, k)
    # and saved1 still gives the same gradients after another call used the kernels' buffers
    for r, k in zip(_C.backward(saved1, *_grads(spec)), kept[3:]):
        if r is not None:
            np.testing.assert_array_equal(r, k)


@pytest.fixture
def gemm_path(tunables):
    """A setter for the GEMM path; the BLAS registration and threshold are restored after."""

    def use(path):
        if path == "loop":
            _C.set_blas(None, None)
            assert not _C.have_blas()
        else:
            cpp._register_blas()
            if not _C.have_blas():
                pytest.skip("SciPy BLAS unavailable")
            tunables(CPP_BLAS_MIN_FLOPS=0)  # every product through BLAS

    yield use
    cpp._register_blas()


@pytest.mark.parametrize("path", ["loop", "blas"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_tf1", "rnn"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_both_gemm_paths_match_reference(gemm_path, path, cell, dtype):
    """The built-in loop and BLAS give the same answers. B=5 leaves a row remainder in every
    tile height; B*T = 135 > 128 takes the weight-gradient GEMMs through the loop's K blocks."""
    gemm_path(path)
    spec = SPECS[cell]
    a = _problem(spec, B=5, T=27, I=7, H=9, dtype=dtype, seed=3, scale=0.3,
                 lengths=[27, 1, 0, 27, 13])
    _check_against_reference(spec, a)


_ISA_CHECK = """
import numpy as np
from rnnkern import reference
from rnnkern.backends import cpp
from rnnkern.cellspec import CellSpec
cpp._C.set_blas(None, None)  # every product through the loop build under test
print(cpp._C.gemm_loop_isa())
rng = np.random.default_rng(5)
for spec in (CellSpec("lstm"), CellSpec("gru"), CellSpec("gru", reset_after=False),
             CellSpec("rnn")):
    for dtype, tol in ((np.float64, dict(rtol=1e-10, atol=1e-12)),
                       (np.float32, dict(rtol=1e-4, atol=1e-5))):
        B, T, I, H, G = 6, 3, 19, 37, spec.gates  # 4-row blocks + remainder, full and tail columns
        a = dict(x=rng.standard_normal((B, T, I)), w_ih=rng.standard_normal((G * H, I)) * 0.2,
                 w_hh=rng.standard_normal((G * H, H)) * 0.2, b_ih=rng.standard_normal(G * H),
                 b_hh=rng.standard_normal(G * H), h0=rng.standard_normal((B, H)),
                 c0=rng.standard_normal((B, H)) if spec.has_cell_state else None)
        d = rng.standard_normal((B, T, H))
        lengths = np.array([3, 0, 1, 3, 2, 3], np.int64)
        want = reference.forward(spec, **a, lengths=lengths)
        wb = reference.backward(spec, want[3], d, None, None)
        a = {k: None if v is None else v.astype(dtype) for k, v in a.items()}
        got = cpp.forward(spec, **a, lengths=lengths)
        np.testing.assert_allclose(got[0], want[0], **tol)
        gb = cpp.backward(spec, got[3], d.astype(dtype), None, None)
        np.testing.assert_allclose(gb[0], wb[0], **tol)
        np.testing.assert_allclose(gb[1], wb[1], **tol)
        for k in wb[3]:
            np.testing.assert_allclose(gb[3][k], wb[3][k], err_msg=k, **tol)
"""


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_gemm_builds_match_reference(isa):
    """The GEMM loop is compiled per ISA; this machine runs its widest, so force the others."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, RNNKERN_GEMM_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    ran = run.stdout.split()[0]
    if ran != isa:  # avx2 requested on a CPU without it: the base build ran instead
        assert isa == "avx2" and ran == "base", ran
        pytest.skip("this CPU lacks AVX2")


# ---------------------------------------------------------------------- batch chunks on threads

@pytest.fixture
def split_time_loop(tunables):
    """A setter forcing the time loop onto n batch chunks on threads, even at test sizes (n = 1:
    one thread); config's values are restored after."""

    def use(n):
        tunables(CPP_THREADS=n, CPP_SPLIT_MIN_WORK=0)

    return use


# (B, T, I, H, lengths, dtype): lengths with 0 and T over uneven row ranges and odd H; T = 1;
# B = 1 (one chunk whatever the threads); float32
_CHUNK_CASES = {
    "B5": (5, 4, 3, 7, [4, 0, 2, 4, 1], np.float64),
    "T1": (4, 1, 3, 5, [1, 0, 1, 0], np.float64),
    "B1": (1, 3, 2, 3, [3], np.float64),
    "B7_f32": (7, 3, 5, 9, [3, 0, 3, 1, 2, 0, 3], np.float32),
}


@pytest.mark.parametrize("threads", [2, 3])
@CELLS
@pytest.mark.parametrize("case", list(_CHUNK_CASES))
def test_batch_chunks_on_threads_match_reference(split_time_loop, threads, spec, case):
    split_time_loop(threads)
    Bq, Tq, Iq, Hq, lengths, dtype = _CHUNK_CASES[case]
    _check_against_reference(spec, _problem(spec, B=Bq, T=Tq, I=Iq, H=Hq, dtype=dtype, seed=11,
                                            lengths=lengths))


def test_split_calls_from_concurrent_threads_match_reference(split_time_loop):
    """Python threads calling the split kernels at once (the GIL is released): one job holds the
    persistent workers, the others run on threads of their own; every cell's forward and
    backward is right, including a backward on another thread than its forward."""
    import threading

    split_time_loop(2)
    cells = ["lstm", "gru", "gru_tf1", "rnn", "rnn_relu", "lstm"]
    problems = [_problem(SPECS[c], B=7, T=3, I=4, H=5, seed=k, lengths=[3, 0, 1, 3, 2, 3, 3])
                for k, c in enumerate(cells)]
    d = [_grads(SPECS[c], 7, 3, 5, seed=k) for k, c in enumerate(cells)]
    wants = []
    for c, a, dk in zip(cells, problems, d):
        w = reference.forward(SPECS[c], **a)
        wants.append((w[0], reference.backward(SPECS[c], w[3], *dk)[0]))
    # saved records made here, differentiated on the workers
    handed = [cpp.forward(SPECS[c], **a)[3] for c, a in zip(cells, problems)]
    errors = []

    def run(k):
        try:
            spec = SPECS[cells[k]]
            dx = cpp.backward(spec, handed[k], *d[k])[0]
            np.testing.assert_allclose(dx, wants[k][1], rtol=1e-10, atol=1e-12)
            for _ in range(15):
                out, _, _, saved = cpp.forward(spec, **problems[k])
                np.testing.assert_allclose(out, wants[k][0], rtol=1e-10, atol=1e-12)
                dx = cpp.backward(spec, saved, *d[k])[0]
                np.testing.assert_allclose(dx, wants[k][1], rtol=1e-10, atol=1e-12)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a split call never returned"
    assert not errors, errors[0]


def test_split_calls_with_changing_thread_counts(split_time_loop):
    """The workers are reused across calls whose thread count goes up and down."""
    spec = SPECS["lstm"]
    a = _problem(spec, B=7, T=3, I=4, H=5, seed=1)
    want = reference.forward(spec, **a)[0]
    for n in (2, 3, 2, 1, 3, 2) * 5:
        split_time_loop(n)
        np.testing.assert_allclose(cpp.forward(spec, **a)[0], want, rtol=1e-10, atol=1e-12)


def test_split_calls_work_in_a_forked_child(split_time_loop):
    """A child forked after the workers exist inherits none of them: it builds its own."""
    import multiprocessing
    import warnings

    split_time_loop(2)
    spec = SPECS["lstm"]
    a = _problem(spec, B=7, T=3, I=4, H=5, seed=2)
    want = reference.forward(spec, **a)[0]
    cpp.forward(spec, **a)  # the parent's workers now exist
    try:
        ctx = multiprocessing.get_context("fork")
    except ValueError:
        pytest.skip("no fork on this platform")

    def child():
        ok = np.allclose(cpp.forward(spec, **a)[0], want, rtol=1e-10, atol=1e-12)
        raise SystemExit(0 if ok else 3)
    with warnings.catch_warnings():  # Python 3.12+ warns about fork() with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        proc = ctx.Process(target=child)
        proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung in a split call")
    assert proc.exitcode == 0


# ---------------------------------------------------------------------- LSTM ring, result pool

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ring_rows", [1, 8, 1000])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lstm_ring_flushes_match_reference(split_time_loop, tunables, threads, ring_rows,
                                           dtype):
    """The LSTM backward gathers steps of gate gradients in a ring of about ``ring_rows`` rows
    before its dx and weight GEMMs (lstm.cpp). Steps per ring for T=7, B=5: one thread 1, 2, 7;
    two threads (chunks of 2 and 3 rows) 1, 4, 7: every step, rings with a shorter last one,
    and all steps at once; lengths incl. 0. H=17 and I=19 pad to two float vectors (three
    double ones), so interleaved gate blocks and padding are both exercised."""
    split_time_loop(threads)
    tunables(CPP_LSTM_RING_ROWS=ring_rows)
    spec = CellSpec("lstm", forget_bias=0.5)
    a = _problem(spec, B=5, T=7, I=19, H=17, dtype=dtype, seed=17, scale=0.3,
                 lengths=[7, 0, 3, 7, 1])
    _check_against_reference(spec, a)


def test_large_results_are_recycled_only_after_release(tunables):
    """From ~256 KiB up, result arrays come from a pool of freed blocks (pool.h): a block is
    reused only once every array and view of it is gone -- never while the caller holds one, nor
    while a saved record holds it -- and a reused block is fully rewritten (outputs past a
    sequence's length included)."""
    tunables(CPP_POOL_LIMIT=1 << 30)
    spec = CellSpec("lstm")
    # out [32,40,48] doubles: 480 KiB; the saved activations (act: 2.4 MB) are pooled too
    a = _problem(spec, B=32, T=40, I=16, H=48, seed=2, scale=0.2,
                 lengths=[40, 0, 17] + [40] * 29)
    d = _grads(spec, 32, 40, 48)
    out1, _, _, saved1 = cpp.forward(spec, **a)
    kept_out = out1.copy()
    kept_dx = cpp.backward(spec, saved1, *d)[0].copy()
    view = out1[1:]  # a view keeps the whole block
    del out1
    for _ in range(3):  # more calls, results dropped at once: their blocks go to the pool
        cpp.backward(spec, cpp.forward(spec, **dict(a, x=-a["x"], lengths=None))[3], *d)
    np.testing.assert_array_equal(view, kept_out[1:])
    np.testing.assert_array_equal(cpp.backward(spec, saved1, *d)[0], kept_dx)  # saved intact
    held = _C.pool_held()
    assert held > 0
    out2, _, _, saved2 = cpp.forward(spec, **a)  # same shapes: served from the pool
    assert _C.pool_held() < held
    np.testing.assert_array_equal(out2, kept_out)  # every element rewritten (zeros past 0, 17)
    np.testing.assert_array_equal(cpp.backward(spec, saved2, *d)[0], kept_dx)
    config.CPP_POOL_LIMIT = 0
    assert _C.pool_held() == 0
    del view, saved1, out2, saved2  # with a zero limit the blocks are freed, not kept
    assert _C.pool_held() == 0


# ---------------------------------------------------------------------- degenerate sizes

def _degenerate_cases():
    for cell in ("lstm", "gru", "gru_tf1", "rnn"):
        for dims in [(3, 0, 2, 4), (0, 3, 2, 4), (3, 2, 0, 4), (3, 2, 2, 0)]:
            yield pytest.param(cell, dims, id=f"{cell}-B{dims[0]}T{dims[1]}I{dims[2]}H{dims[3]}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell, dims", list(_degenerate_cases()))
def test_empty_dimensions_match_reference(split_time_loop, threads, cell, dims):
    """B, T, I or H = 0 (reachable through _C only: the layers want positive sizes) runs and
    gives the reference's (empty or zero) results, also after a call that filled the kernels'
    work buffers with other values."""
    split_time_loop(threads)
    spec = SPECS[cell]
    _check_against_reference(spec, _problem(spec, B=3, T=2, I=2, H=5, seed=9))  # dirty buffers
    Bq, Tq, Iq, Hq = dims
    _check_against_reference(spec, _problem(spec, B=Bq, T=Tq, I=Iq, H=Hq))


# ---------------------------------------------------------------------------------------------
# _C.adam: Adam's update after a training step's call (csrc/bindings/optim.cpp)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps_mode", ["tf", "torch"])
@pytest.mark.parametrize("n", [1, 7, 40_000])     # 40_000: split over the threads
def test_native_adam_is_bitwise_the_numpy_rule(monkeypatch, dtype, eps_mode, n):
    from rnnkern.optim import Adam
    monkeypatch.setattr(config, "CPP_THREADS", 2)
    rng = np.random.default_rng(n)
    layout = (("w", (n,)),)
    p_np = rng.standard_normal(n).astype(dtype)
    p_c = p_np.copy()
    ref, ours = Adam(0.01, eps=1e-3, eps_mode=eps_mode), Adam(0.01, eps=1e-3, eps_mode=eps_mode)

    def native(p, g, state):
        _C.adam(p, g, state["m"], state["v"], t=ours.iterations, lr=ours.lr, b1=ours.beta1,
                b2=ours.beta2, eps=ours.eps, tf_form=ours.eps_mode == "tf")

    for _ in range(4):
        g = rng.standard_normal(n).astype(dtype)
        ref.step_flat(p_np, g.copy(), layout)
        ours.step_flat(p_c, g.copy(), layout, update=native)
    np.testing.assert_array_equal(p_c, p_np)
    for s in ("m", "v"):
        np.testing.assert_array_equal(ours.state["w"][s], ref.state["w"][s])


def test_native_adam_names_its_bad_arguments():
    p = np.zeros(5, np.float32)
    ok = dict(t=1, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, tf_form=True)
    with pytest.raises(ValueError, match="^p must have dtype float32 or float64"):
        _C.adam(p.astype(np.int64), p, p, p, **ok)
    with pytest.raises(ValueError, match="^g must"):
        _C.adam(p, np.zeros(5), p, p, **ok)
    with pytest.raises(ValueError, match="^v must"):
        _C.adam(p, p, p, np.zeros(4, np.float32), **ok)
    with pytest.raises(ValueError, match="^m must"):
        _C.adam(p, p, np.zeros(10, np.float32)[::2], p, **ok)
    with pytest.raises(ValueError, match="t must be >= 1"):
        _C.adam(p, p, p, p, **dict(ok, t=0))
