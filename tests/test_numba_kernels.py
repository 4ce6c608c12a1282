"""Numba backend specifics: the float32 fast activations, batch-parallel chunks, the workspace
pool, and the BLAS thread count it restores. Parity of the kernels themselves with the reference
lives in test_backend_parity.py. Tunables in rnnkern.config are patched small so the multi-chunk
and pooled paths run on tiny inputs.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import config, reference
from rnnkern.cellspec import CellSpec

numba = pytest.importorskip("numba")
from rnnkern.backends import numba_cpu, numba_math, numba_runtime  # noqa: E402

from conftest import assert_close  # noqa: E402

SPECS = [CellSpec("lstm", forget_bias=1.0), CellSpec("gru"), CellSpec("gru", reset_after=False),
         CellSpec("rnn"), CellSpec("rnn", nonlinearity="relu")]
IDS = ["lstm", "gru", "gru_tf1", "rnn_tanh", "rnn_relu"]


@numba.njit
def _apply(fn_id, x, out):
    for i in range(x.shape[0]):
        out[i] = numba_math.tanh(x[i]) if fn_id == 0 else numba_math.sigmoid(x[i])


def _activations(x):
    t, s = np.empty_like(x), np.empty_like(x)
    _apply(0, x, t)
    _apply(1, x, s)
    return t, s


def test_float32_activations_are_accurate_everywhere():
    x = np.concatenate([np.linspace(-30, 30, 400_001), [-np.inf, np.inf, 0.0, -0.0],
                        np.geomspace(1e-30, 1e-3, 50)]).astype(np.float32)
    t, s = _activations(x)
    x64 = x.astype(np.float64)
    assert t.dtype == np.float32
    assert np.abs(t - np.tanh(x64)).max() <= 3.5e-7
    assert np.abs(s - 1 / (1 + np.exp(-x64))).max() <= 2e-7
    small = np.abs(x64) < 1e-3                      # tanh(x) ~ x: relative accuracy near zero
    assert np.all(np.abs(t[small] - x64[small]) <= 1e-6 * np.abs(x64[small]))
    assert t[-1] == 0 or np.all(np.sign(t) == np.sign(x))  # odd, saturates at +-1
    assert np.all(np.abs(t) <= 1) and np.all((s >= 0) & (s <= 1))


def test_float32_activations_match_their_pure_python_version():
    x = np.linspace(-12, 12, 2001).astype(np.float32)
    t, s = _activations(x)
    py_t = np.array([numba_math.tanh(v) for v in x], np.float32)
    py_s = np.array([numba_math.sigmoid(v) for v in x], np.float32)
    np.testing.assert_allclose(t, py_t, rtol=0, atol=2e-7)   # FMA contraction only
    np.testing.assert_allclose(s, py_s, rtol=0, atol=2e-7)


def test_float64_activations_are_libm():
    x = np.linspace(-40, 40, 10_001)
    t, s = _activations(x)
    np.testing.assert_allclose(t, np.tanh(x), rtol=1e-15, atol=0)
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-x)), rtol=1e-15, atol=0)


def _seam_case(spec, dtype, B=7, T=5, I=3, H=6, lengths=(5, 0, 3, 5, 1, 2, 4), seed=0):
    rng = np.random.default_rng(seed)
    G = spec.gates

    def n(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dtype)

    args = dict(x=n(B, T, I), w_ih=n(G * H, I), w_hh=n(G * H, H), b_ih=n(G * H), b_hh=n(G * H),
                h0=n(B, H), c0=n(B, H) if spec.has_cell_state else None,
                lengths=np.asarray(lengths, np.int64))
    grads = (n(B, T, H), n(B, H), n(B, H) if spec.has_cell_state else None)
    return args, grads


def _check_against_reference(spec, args, grads):
    out, h, c, saved = numba_cpu.forward(spec, **args)
    dx, dh0, dc0, g = numba_cpu.backward(spec, saved, *grads)

    def f64(a):
        return None if a is None or a.dtype.kind != "f" else a.astype(np.float64)

    r_out, r_h, r_c, r_saved = reference.forward(
        spec, **{k: (v if k == "lengths" else f64(v)) for k, v in args.items()})
    r_dx, r_dh0, r_dc0, r_g = reference.backward(spec, r_saved, *map(f64, grads))
    for got, want, what in [(out, r_out, "outputs"), (h, r_h, "h_n"), (dx, r_dx, "dx"),
                            (dh0, r_dh0, "dh0")] + [(g[k], r_g[k], k) for k in r_g]:
        assert_close(got, want, f"{spec}: {what}")
    if spec.has_cell_state:
        assert_close(c, r_c, f"{spec}: c_n")
        assert_close(dc0, r_dc0, f"{spec}: dc0")


@pytest.fixture
def split_small(monkeypatch):
    """Force batch-parallel runs on tiny inputs: 3 chunks of >= 1 row."""
    monkeypatch.setattr(config, "NUMBA_THREADS", 3)
    monkeypatch.setattr(config, "NUMBA_SPLIT_MIN_ROWS", 1)
    monkeypatch.setattr(config, "NUMBA_SPLIT_MIN_FLOPS", 0)
    if not numba_runtime.BLAS.locate():
        pytest.skip("no OpenBLAS thread control found: runs are never split here")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_chunks_match_reference(split_small, spec, dtype):
    assert len(numba_runtime.plan_chunks(spec, 7, 5, 3, 6)) == 3
    args, grads = _seam_case(spec, dtype)
    _check_against_reference(spec, args, grads)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_backward_cuts_the_chunks_its_forward_cut(split_small, monkeypatch, dtype):
    # the LSTM kernels keep a chunk's saved arrays in a private (time-major) layout: a backward
    # that re-planned the chunks after a config change would misread them
    spec = CellSpec("lstm", forget_bias=1.0)
    args, grads = _seam_case(spec, dtype)
    out, h, c, saved = numba_cpu.forward(spec, **args)
    monkeypatch.setattr(config, "NUMBA_THREADS", 1)
    dx, dh0, dc0, g = numba_cpu.backward(spec, saved, *grads)
    monkeypatch.undo()
    one = _seam_case(spec, dtype)[0]
    assert len(numba_runtime.plan_chunks(spec, 7, 5, 3, 6)) == 1
    _, _, _, saved1 = numba_cpu.forward(spec, **one)
    dx1, dh01, dc01, g1 = numba_cpu.backward(spec, saved1, *grads)
    for got, want in [(dx, dx1), (dh0, dh01), (dc0, dc01)] + [(g[k], g1[k]) for k in g]:
        assert_close(got, want, "chunked vs one-chunk backward")


def test_batch_chunks_restore_the_blas_thread_count(split_small):
    blas = numba_runtime.BLAS
    before = blas._get()
    args, grads = _seam_case(CellSpec("lstm"), np.float32)
    out, *_ = numba_cpu.forward(CellSpec("lstm"), **args)
    assert blas._get() == before and blas._depth == 0


def test_chunk_rule_keeps_small_work_on_one_thread(monkeypatch):
    monkeypatch.setattr(config, "NUMBA_THREADS", 2)
    lstm = CellSpec("lstm")
    assert numba_runtime.plan_chunks(lstm, 1, 6, 5, 5) == [(0, 1)]               # lab size
    assert numba_runtime.plan_chunks(lstm, 15, 100, 512, 512) == [(0, 15)]       # too few rows
    monkeypatch.setattr(config, "NUMBA_THREADS", 1)
    assert numba_runtime.plan_chunks(lstm, 64, 100, 512, 512) == [(0, 64)]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_pooled_workspaces_never_leak_between_calls(monkeypatch, spec):
    """With every array pooled, repeated calls (saved records dying in between) stay exact."""
    monkeypatch.setattr(config, "NUMBA_POOL_MIN_BYTES", 0)
    numba_cpu.clear_workspaces()
    for seed in range(4):
        args, grads = _seam_case(spec, np.float64, seed=seed)
        _check_against_reference(spec, args, grads)
    assert numba_runtime.POOL._bytes > 0, "nothing came back to the pool"
    numba_cpu.clear_workspaces()
    assert numba_runtime.POOL._bytes == 0


def test_pool_respects_its_byte_limit(monkeypatch):
    monkeypatch.setattr(config, "NUMBA_POOL_MIN_BYTES", 0)
    monkeypatch.setattr(config, "NUMBA_POOL_MAX_BYTES", 1000)
    numba_cpu.clear_workspaces()
    numba_runtime.POOL.give([np.empty(100), np.empty(100)])  # 800 bytes each
    assert numba_runtime.POOL._bytes == 800
    numba_cpu.clear_workspaces()


def test_layer_results_survive_later_calls_with_pooling(monkeypatch):
    monkeypatch.setattr(config, "NUMBA_POOL_MIN_BYTES", 0)
    layer = rk.LSTM(3, 4, 2, backend="numba", dtype="float64", seed=0)
    x1 = np.random.default_rng(1).standard_normal((2, 5, 3))
    out1, (h1, c1) = layer(x1)
    dx1, _ = layer.backward(np.ones_like(out1))
    keep = [a.copy() for a in (out1, h1, c1, dx1)]
    for seed in range(2, 5):
        out, _ = layer(np.random.default_rng(seed).standard_normal((2, 5, 3)))
        layer.backward(np.ones_like(out))
    for a, b in zip((out1, h1, c1, dx1), keep):
        np.testing.assert_array_equal(a, b)


def test_available_reports_numba_version():
    ok, reason = numba_cpu.available()
    assert ok and numba.__version__ in reason


def _child_run(queue):
    args, grads = _seam_case(CellSpec("gru"), np.float64)
    out, *_ = numba_cpu.forward(CellSpec("gru"), **args)
    queue.put(float(out.sum()))


def test_batch_chunks_work_in_a_forked_child(split_small):
    """A fork after batch-parallel runs must not inherit dead pool threads (it would hang)."""
    import multiprocessing
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    args, _ = _seam_case(CellSpec("gru"), np.float64)
    expected = float(numba_cpu.forward(CellSpec("gru"), **args)[0].sum())  # starts the pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_run, args=(queue,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a batch-parallel run")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(expected, rel=1e-12)


def test_without_numba_the_backend_says_why_and_auto_moves_on():
    """available() is truthful: with Numba unimportable, numba reports it and auto skips it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['numba'] = None\n"
            "import numpy as np, rnnkern as rk\n"
            "from rnnkern import backends\n"
            "ok, reason = rk.available_backends()['numba']\n"
            "assert not ok and 'numba is not importable' in reason, reason\n"
            "assert backends.resolve('auto', np.zeros((1, 1, 1))).name in ('cpp', 'numpy')\n"
            "print('OK')\n")
    import os
    env = {k: v for k, v in os.environ.items() if k != "RNNKERN_BACKEND"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=root)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_one_blas_thread_hold_restores_and_skips_redundant_calls():
    """The hold sets OpenBLAS to one thread for its outermost holder and restores the count
    after; when the count is 1 already it makes no calls (the examples pin it to 1)."""
    from rnnkern.backends.numba_runtime import _OneBlasThread
    hold, state, calls = _OneBlasThread(), {"n": 4}, []

    def set_threads(n):
        calls.append(n)
        state["n"] = n
    hold._get, hold._set, hold.found = (lambda: state["n"]), set_threads, True
    with hold:
        assert state["n"] == 1
        with hold:
            assert state["n"] == 1
        assert state["n"] == 1
    assert state["n"] == 4 and calls == [1, 4]
    calls.clear()
    state["n"] = 1
    with hold:
        assert state["n"] == 1
    assert calls == []
