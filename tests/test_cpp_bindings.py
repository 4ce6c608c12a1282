"""The binding boundary of the C++ extension ``rnnkern._C``: every bad input is a Python exception
naming the argument (never a crash or a silent copy), and the two GEMM paths agree.

Numerical parity with the reference lives in test_backend_parity.py (it covers ``cpp``).
Shape legend: B batch, T time steps, I input size, H hidden size, G gates.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from rnnkern import reference
from rnnkern.cellspec import CellSpec

from conftest import assert_close

_C = pytest.importorskip("rnnkern._C", reason="rnnkern._C is not built (pip install -e .)")
from rnnkern.backends import cpp  # noqa: E402  (after the skip: it registers the BLAS)

B, T, I, H = 3, 4, 5, 6


def _args(cell="lstm", dtype=np.float64, seed=0):
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    rng = np.random.default_rng(seed)
    n = lambda *s: (rng.standard_normal(s) * 0.5).astype(dtype)  # noqa: E731
    return dict(x=n(B, T, I), w_ih=n(G * H, I), w_hh=n(G * H, H), b_ih=n(G * H), b_hh=n(G * H),
                h0=n(B, H), c0=n(B, H) if cell == "lstm" else None,
                lengths=np.array([T, 0, 2], np.int64))


def _forward(cell="lstm", **kw):
    a = _args(cell)
    opts = {k: kw.pop(k) for k in ("nonlinearity", "forget_bias", "reset_after") if k in kw}
    a.update(kw)
    return _C.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"], a["c0"],
                      a["lengths"], **opts)


def _backward_kwargs(cell="lstm", reset_after=True):
    a = _args(cell)
    _, _, _, saved = _C.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"],
                                a["c0"], a["lengths"], reset_after=reset_after)
    return dict(cell=cell, x=a["x"], w_ih=a["w_ih"], w_hh=a["w_hh"], lengths=a["lengths"],
                hprev=saved["hprev"], cprev=saved["cprev"], act=saved["act"], rh=saved["rh"],
                d_outputs=np.ones((B, T, H)), d_h_n=np.ones((B, H)),
                d_c_n=np.ones((B, H)) if cell == "lstm" else None, reset_after=reset_after)


def test_valid_call_runs():
    out, h_n, c_n, saved = _forward()
    assert out.shape == (B, T, H) and h_n.shape == c_n.shape == (B, H)
    assert np.all(out[1] == 0) and np.all(out[2, 2:] == 0)  # lengths 0 and 2


@pytest.mark.parametrize("name, bad, message", [
    ("x", lambda a: np.asfortranarray(a["x"]), "x must be C-contiguous"),
    ("x", lambda a: a["x"][:, ::2], "x must be C-contiguous"),  # T halves: lengths fixed below
    ("w_hh", lambda a: a["w_hh"].T.copy().T, "w_hh must be C-contiguous"),
    ("h0", lambda a: np.repeat(a["h0"], 2, axis=1)[:, ::2], "h0 must be C-contiguous"),
    ("x", lambda a: a["x"].astype(np.int64), "x must have dtype float32 or float64"),
    ("w_ih", lambda a: a["w_ih"].astype(np.float32), "w_ih must have dtype float64"),
    ("b_hh", lambda a: a["b_hh"].astype(np.float32), "b_hh must have dtype float64"),
    ("c0", lambda a: a["c0"].astype(np.float32), "c0 must have dtype float64"),
    ("x", lambda a: a["x"][0], "x must be 3-D"),
    ("x", lambda a: a["x"].tolist(), "x must be a numpy.ndarray, got list"),
    ("w_ih", lambda a: a["w_ih"][:, :-1].copy(), "w_ih must have shape [24, 5], got [24, 4]"),
    ("w_hh", lambda a: a["w_hh"][:-1].copy(), "w_hh must have shape [24, 6], got [23, 6]"),
    ("w_hh", lambda a: a["w_hh"][:, :, None], "w_hh must be 2-D"),
    ("b_ih", lambda a: a["b_ih"][:-1].copy(), "b_ih must have shape [24]"),
    ("h0", lambda a: a["h0"][:-1].copy(), "h0 must have shape [3, 6], got [2, 6]"),
    ("c0", lambda a: a["c0"][:, :-1].copy(), "c0 must have shape [3, 6]"),
    ("lengths", lambda a: np.array([T, 0, T + 1], np.int64), "lengths[2] = 5"),
    ("lengths", lambda a: np.array([-1, 0, 1], np.int64), "lengths[0] = -1"),
    ("lengths", lambda a: a["lengths"].astype(np.int32), "lengths must have dtype int64"),
    ("lengths", lambda a: a["lengths"][:2].copy(), "lengths must have shape [3]"),
    ("w_ih", lambda a: None, "w_ih must be an array, got None"),
])
def test_forward_rejects_bad_input(name, bad, message):
    a = _args("lstm")
    a[name] = bad(a)
    if name == "x" and isinstance(a["x"], np.ndarray) and a["x"].ndim == 3:
        a["lengths"] = np.minimum(a["lengths"], a["x"].shape[1])
    with pytest.raises(ValueError, match=re.escape(message)):
        _C.forward("lstm", a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"], a["c0"],
                   a["lengths"])


def test_forward_rejects_bad_options_and_stray_state():
    a = _args("rnn")
    with pytest.raises(ValueError, match="cell must be 'rnn', 'lstm' or 'gru', got 'conv'"):
        _C.forward("conv", a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"])
    with pytest.raises(ValueError, match="nonlinearity must be"):
        _forward("rnn", nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="c0 is for LSTM only"):
        _forward("gru", c0=np.zeros((B, H)))


@pytest.mark.parametrize("cell, reset_after", [("lstm", True), ("gru", False), ("rnn", True)])
@pytest.mark.parametrize("name, bad, message", [
    ("d_outputs", lambda v: v[:, :-1].copy(), "d_outputs must have shape"),
    ("d_outputs", lambda v: np.asfortranarray(v), "d_outputs must be C-contiguous"),
    ("d_outputs", lambda v: v.astype(np.float32), "d_outputs must have dtype float64"),
    ("d_h_n", lambda v: v[None], "d_h_n must have shape"),
    ("act", lambda v: v[..., :-1].copy(), "act must have shape"),
    ("hprev", lambda v: v[:, ::-1], "hprev must be C-contiguous"),
    ("lengths", lambda v: v + 10, "lengths must lie in"),
])
def test_backward_rejects_bad_input(cell, reset_after, name, bad, message):
    kw = _backward_kwargs(cell, reset_after)
    kw[name] = bad(kw[name])
    with pytest.raises(ValueError, match=message):
        _C.backward(**kw)


def test_backward_requires_the_cell_specific_buffers():
    kw = _backward_kwargs("gru", reset_after=False)
    with pytest.raises(ValueError, match="rh must be an array"):
        _C.backward(**dict(kw, rh=None))
    with pytest.raises(ValueError, match="rh is for GRU with reset_after=False only"):
        _C.backward(**dict(kw, reset_after=True))
    kw = _backward_kwargs("lstm")
    with pytest.raises(ValueError, match="cprev must be an array"):
        _C.backward(**dict(kw, cprev=None))
    with pytest.raises(ValueError, match="d_c_n is for LSTM only"):
        _C.backward(**dict(_backward_kwargs("rnn"), d_c_n=np.zeros((B, H))))


def test_set_blas_rejects_non_capsules():
    with pytest.raises(ValueError, match="sgemm must be a PyCapsule"):
        _C.set_blas(1, 2)


def test_results_are_fresh_arrays():
    """Returned arrays belong to the caller: a second call must not overwrite the first's."""
    out1, h1, _, saved1 = _forward()
    kept = out1.copy(), saved1["act"].copy()
    _forward(x=np.zeros((B, T, I)))
    np.testing.assert_array_equal(out1, kept[0])
    np.testing.assert_array_equal(saved1["act"], kept[1])


@pytest.fixture
def gemm_path():
    """Yields a setter for the GEMM path; restores BLAS registration and threshold after."""
    before = _C.blas_min_flops()

    def use(path):
        if path == "loop":
            _C.set_blas(None, None)
        else:
            cpp._register_blas()
            if not _C.have_blas():
                pytest.skip("SciPy BLAS unavailable")
            _C.set_blas_min_flops(0)  # every product through BLAS

    yield use
    cpp._register_blas()
    _C.set_blas_min_flops(before)


@pytest.mark.parametrize("path", ["loop", "blas"])
@pytest.mark.parametrize("spec", [CellSpec("lstm", forget_bias=1.0), CellSpec("gru"),
                                  CellSpec("gru", reset_after=False), CellSpec("rnn")],
                         ids=["lstm", "gru", "gru_tf1", "rnn"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_both_gemm_paths_match_reference(gemm_path, path, spec, dtype):
    """The built-in loop and BLAS give the same answers. B=5 leaves a row remainder in every
    tile height; B*T = 135 > 128 takes the weight-gradient GEMMs through the loop's K blocks."""
    gemm_path(path)
    rng = np.random.default_rng(3)
    Bq, Tq, Iq, Hq, G = 5, 27, 7, 9, spec.gates
    a = dict(x=rng.standard_normal((Bq, Tq, Iq)), w_ih=rng.standard_normal((G * Hq, Iq)) * 0.3,
             w_hh=rng.standard_normal((G * Hq, Hq)) * 0.3, b_ih=rng.standard_normal(G * Hq),
             b_hh=rng.standard_normal(G * Hq), h0=rng.standard_normal((Bq, Hq)),
             c0=rng.standard_normal((Bq, Hq)) if spec.has_cell_state else None)
    a = {k: None if v is None else v.astype(dtype) for k, v in a.items()}
    lengths = np.array([27, 1, 0, 27, 13], np.int64)
    d_out = rng.standard_normal((Bq, Tq, Hq)).astype(dtype)
    got = cpp.forward(spec, **a, lengths=lengths)
    want = reference.forward(spec, **{k: None if v is None else v.astype(np.float64)
                                      for k, v in a.items()}, lengths=lengths)
    for g, w, what in zip(got[:3], want[:3], ("outputs", "h_n", "c_n")):
        if w is not None:
            assert_close(g, w, what)
    gb = cpp.backward(spec, got[3], d_out, None, None)
    wb = reference.backward(spec, want[3], d_out.astype(np.float64), None, None)
    for g, w, what in zip(gb[:3], wb[:3], ("dx", "dh0", "dc0")):
        if w is not None:
            assert_close(g, w, what)
    for k in wb[3]:
        assert_close(gb[3][k], wb[3][k], k)


_ISA_CHECK = """
import numpy as np
from rnnkern import reference
from rnnkern.backends import cpp
from rnnkern.cellspec import CellSpec
cpp._C.set_blas(None, None)  # every product through the loop build under test
print(cpp._C.gemm_loop_isa())
rng = np.random.default_rng(5)
for spec in (CellSpec("lstm"), CellSpec("gru", reset_after=False)):
    B, T, I, H, G = 6, 3, 19, 37, spec.gates  # 4-row blocks + remainder, full and tail columns
    a = dict(x=rng.standard_normal((B, T, I)), w_ih=rng.standard_normal((G * H, I)) * 0.2,
             w_hh=rng.standard_normal((G * H, H)) * 0.2, b_ih=rng.standard_normal(G * H),
             b_hh=rng.standard_normal(G * H), h0=rng.standard_normal((B, H)),
             c0=rng.standard_normal((B, H)) if spec.has_cell_state else None, lengths=None)
    d = rng.standard_normal((B, T, H))
    got, want = cpp.forward(spec, **a), reference.forward(spec, **a)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
    gb = cpp.backward(spec, got[3], d, None, None)
    wb = reference.backward(spec, want[3], d, None, None)
    np.testing.assert_allclose(gb[0], wb[0], rtol=1e-10, atol=1e-12)
    for k in wb[3]:
        np.testing.assert_allclose(gb[3][k], wb[3][k], rtol=1e-10, atol=1e-12)
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


@pytest.fixture
def split_time_loop():
    """Forces the time loop onto batch chunks on threads, even at test sizes; restores after."""
    before_work = _C.split_min_work()

    def use(n):
        _C.set_threads(n)
        _C.set_split_min_work(0)

    yield use
    _C.set_threads(0)  # automatic
    _C.set_split_min_work(before_work)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spec", [CellSpec("lstm", forget_bias=1.0), CellSpec("gru"),
                                  CellSpec("gru", reset_after=False),
                                  CellSpec("rnn", nonlinearity="relu")],
                         ids=["lstm", "gru", "gru_tf1", "rnn_relu"])
def test_batch_chunks_on_threads_match_reference(split_time_loop, threads, spec):
    """B=5 rows over 2 or 3 threads (uneven ranges), lengths incl. 0: same as the reference."""
    split_time_loop(threads)
    rng = np.random.default_rng(11)
    Bq, Tq, Iq, Hq, G = 5, 4, 3, 6, spec.gates
    a = dict(x=rng.standard_normal((Bq, Tq, Iq)), w_ih=rng.standard_normal((G * Hq, Iq)) * 0.4,
             w_hh=rng.standard_normal((G * Hq, Hq)) * 0.4, b_ih=rng.standard_normal(G * Hq),
             b_hh=rng.standard_normal(G * Hq), h0=rng.standard_normal((Bq, Hq)),
             c0=rng.standard_normal((Bq, Hq)) if spec.has_cell_state else None,
             lengths=np.array([4, 0, 2, 4, 1], np.int64))
    d_out, d_h = rng.standard_normal((Bq, Tq, Hq)), rng.standard_normal((Bq, Hq))
    got, want = cpp.forward(spec, **a), reference.forward(spec, **a)
    for g, w, what in zip(got[:3], want[:3], ("outputs", "h_n", "c_n")):
        if w is not None:
            assert_close(g, w, what)
    _assert_backward_matches(cpp.backward(spec, got[3], d_out, d_h, None),
                             reference.backward(spec, want[3], d_out, d_h, None))


def _lstm_problem(seed, B=7, T=3, I=4, H=5):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((B, T, I)), w_ih=rng.standard_normal((4 * H, I)) * 0.4,
                w_hh=rng.standard_normal((4 * H, H)) * 0.4, b_ih=rng.standard_normal(4 * H),
                b_hh=rng.standard_normal(4 * H), h0=rng.standard_normal((B, H)),
                c0=rng.standard_normal((B, H)), lengths=None)


def test_split_calls_from_concurrent_threads_match_reference(split_time_loop):
    """Python threads calling the split kernels at once (the GIL is released): one job holds the
    persistent workers, the others run on threads of their own; every result is right."""
    import threading

    split_time_loop(2)
    spec = CellSpec("lstm")
    problems = [_lstm_problem(seed) for seed in range(6)]
    wants = [reference.forward(spec, **a)[0] for a in problems]
    errors = []

    def run(k):
        try:
            for _ in range(30):
                got = cpp.forward(spec, **problems[k])[0]
                np.testing.assert_allclose(got, wants[k], rtol=1e-10, atol=1e-12)
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
    spec = CellSpec("lstm")
    a = _lstm_problem(1)
    want = reference.forward(spec, **a)[0]
    for n in (2, 3, 2, 1, 3, 2) * 5:
        split_time_loop(n)
        np.testing.assert_allclose(cpp.forward(spec, **a)[0], want, rtol=1e-10, atol=1e-12)


def test_split_calls_work_in_a_forked_child(split_time_loop):
    """A child forked after the workers exist inherits none of them: it builds its own."""
    import multiprocessing
    import warnings

    split_time_loop(2)
    spec = CellSpec("lstm")
    a = _lstm_problem(2)
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


def _assert_backward_matches(got, want):
    """(dx, dh0, dc0, weight grads) of a backend against the reference's."""
    for g, w, what in zip(got[:3], want[:3], ("dx", "dh0", "dc0")):
        if w is not None:
            assert_close(g, w, what)
    for k in want[3]:
        assert_close(got[3][k], want[3][k], k)


@pytest.fixture
def lstm_ring_rows():
    """Sets the LSTM backward's ring size (rows per dx / weight-gradient flush); restores after."""
    before = _C.lstm_ring_rows()
    yield _C.set_lstm_ring_rows
    _C.set_lstm_ring_rows(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ring_rows", [1, 8, 1000])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lstm_ring_flushes_match_reference(split_time_loop, lstm_ring_rows, threads, ring_rows,
                                           dtype):
    """The LSTM backward gathers steps of gate gradients in a ring of about ``ring_rows`` rows
    before its dx and weight GEMMs (lstm.cpp). Steps per ring for T=7, B=5: one thread 1, 2, 7;
    two threads (chunks of 2 and 3 rows) 1, 4, 7: every step, rings with a shorter last one,
    and all steps at once; lengths incl. 0. H=17 and I=19 pad to two float vectors (three
    double ones), so interleaved gate blocks and padding are both exercised."""
    split_time_loop(threads)
    lstm_ring_rows(ring_rows)
    rng = np.random.default_rng(17)
    spec = CellSpec("lstm", forget_bias=0.5)
    Bq, Tq, Iq, Hq = 5, 7, 19, 17
    a = dict(x=rng.standard_normal((Bq, Tq, Iq)), w_ih=rng.standard_normal((4 * Hq, Iq)) * 0.3,
             w_hh=rng.standard_normal((4 * Hq, Hq)) * 0.3, b_ih=rng.standard_normal(4 * Hq),
             b_hh=rng.standard_normal(4 * Hq), h0=rng.standard_normal((Bq, Hq)),
             c0=rng.standard_normal((Bq, Hq)))
    a = {k: v.astype(dtype) for k, v in a.items()}
    lengths = np.array([7, 0, 3, 7, 1], np.int64)
    d_out, d_h, d_c = (rng.standard_normal(s).astype(dtype) for s in
                       ((Bq, Tq, Hq), (Bq, Hq), (Bq, Hq)))
    got = cpp.forward(spec, **a, lengths=lengths)
    want = reference.forward(spec, **{k: v.astype(np.float64) for k, v in a.items()},
                             lengths=lengths)
    wb = reference.backward(spec, want[3], *(v.astype(np.float64) for v in (d_out, d_h, d_c)))
    assert wb[2] is not None                           # dc0 is compared too
    _assert_backward_matches(cpp.backward(spec, got[3], d_out, d_h, d_c), wb)


@pytest.fixture
def pool_limit():
    """Sets the result-array pool's byte limit; restores it after."""
    before = _C.pool_limit()
    yield _C.set_pool_limit
    _C.set_pool_limit(before)


def test_large_results_are_recycled_only_after_release(pool_limit):
    """From ~256 KiB up, result arrays come from a pool of freed blocks (pool.h): a block is
    reused only once every array and view of it is gone, never while the caller holds one."""
    pool_limit(1 << 30)
    rng = np.random.default_rng(2)
    Bq, Tq, Iq, Hq = 32, 40, 16, 48  # act: 40*32*5*48 doubles = 2.4 MB
    a = dict(x=rng.standard_normal((Bq, Tq, Iq)), w_ih=rng.standard_normal((4 * Hq, Iq)) * 0.2,
             w_hh=rng.standard_normal((4 * Hq, Hq)) * 0.2, b_ih=np.zeros(4 * Hq),
             b_hh=np.zeros(4 * Hq), h0=None, c0=None)
    out1, _, _, saved1 = _C.forward("lstm", **a)
    kept = out1.copy(), saved1["hprev"].copy(), saved1["act"].copy()
    hprev_view = saved1["hprev"]  # a view of a larger pooled block
    del saved1
    for _ in range(3):  # more calls while out1 and the view are alive: they must not change
        _C.forward("lstm", **dict(a, x=-a["x"]))
    np.testing.assert_array_equal(out1, kept[0])
    np.testing.assert_array_equal(hprev_view, kept[1])
    held = _C.pool_held()
    assert held > 0  # the later calls' arrays went back to the pool
    _, _, _, saved2 = _C.forward("lstm", **a)  # same shapes: served from the pool
    assert _C.pool_held() < held
    np.testing.assert_array_equal(saved2["act"], kept[2])  # and fully rewritten
    pool_limit(0)
    assert _C.pool_held() == 0
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        _C.set_pool_limit(-1)
