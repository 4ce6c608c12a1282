"""Every compiled backend against the NumPy reference: outputs, states and every gradient.

Parametrized over ``rnnkern.backends.BACKENDS`` minus ``numpy`` (fixture ``compiled_backend`` in
conftest.py: unavailable backends skip with their reason). The reference runs in float64 on the
same (dtype-rounded) inputs; float64 results must match to rtol 1e-10, float32 to rtol 1e-4 /
atol 1e-5. Tests marked ``nojit`` are also run under ``NUMBA_DISABLE_JIT=1`` (see
:func:`test_nojit_subset_passes_without_jit`) so the Numba kernel source stays covered.

Shape legend: B batch, T time steps, I input size, H hidden size, G gates, L layers.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import backends, reference
from rnnkern.backends import checked
from rnnkern.cellspec import CellSpec

from conftest import array_module, assert_close, to_numpy

SPECS = {
    "lstm": CellSpec("lstm"),
    "lstm_fb": CellSpec("lstm", forget_bias=1.0),
    "gru": CellSpec("gru"),
    "gru_tf1": CellSpec("gru", reset_after=False),
    "rnn_tanh": CellSpec("rnn"),
    "rnn_relu": CellSpec("rnn", nonlinearity="relu"),
}
# (B, T, I, H, lengths): ones everywhere, odd H, lengths 0 and T, all lengths 0, T=0, B=0,
# H beyond one SIMD vector with a remainder
SHAPES = {
    "odd": (3, 5, 4, 7, None),
    "ones": (1, 1, 1, 1, None),
    "lengths": (4, 6, 3, 5, [6, 0, 3, 1]),
    "all_len0": (2, 4, 2, 3, [0, 0]),
    "T0": (2, 0, 3, 2, None),
    "B0": (0, 3, 2, 4, None),
    "wide": (5, 3, 6, 17, [3, 3, 2, 3, 1]),
}
DTYPES = [np.float64, np.float32]


def _inputs(spec, dtype, B, T, I, H, lengths, seed=0):
    """Seam inputs (NumPy, ``dtype``) and output gradients for one layer."""
    rng = np.random.default_rng(seed)
    G = spec.gates
    bound = 1.0 / np.sqrt(H)

    def u(*shape):
        return rng.uniform(-bound, bound, shape).astype(dtype)

    def n(*shape):
        return rng.standard_normal(shape).astype(dtype)

    args = dict(x=n(B, T, I), w_ih=u(G * H, I), w_hh=u(G * H, H), b_ih=u(G * H), b_hh=u(G * H),
                h0=n(B, H) * dtype(0.5), c0=n(B, H) if spec.has_cell_state else None,
                lengths=None if lengths is None else np.asarray(lengths, np.int64))
    grads = dict(d_outputs=n(B, T, H), d_h_n=n(B, H),
                 d_c_n=n(B, H) if spec.has_cell_state else None)
    return args, grads


def _f64(a):
    return None if a is None or a.dtype.kind != "f" else a.astype(np.float64)


def _run_pair(backend_name, spec, args, grads):
    """(backend results, float64 reference results), each forward + backward, as NumPy."""
    xp = array_module(backend_name)
    dev = {k: (None if v is None else xp.asarray(v)) for k, v in args.items()}
    out, h, c, saved = checked.forward(backend_name, spec, **dev)
    dx, dh0, dc0, g = checked.backward(saved, *(None if v is None else xp.asarray(v)
                                               for v in grads.values()))
    ref_args = {k: (v if k == "lengths" else _f64(v)) for k, v in args.items()}
    r_out, r_h, r_c, r_saved = reference.forward(spec, **ref_args)
    r_dx, r_dh0, r_dc0, r_g = reference.backward(spec, r_saved, *map(_f64, grads.values()))
    got = dict(outputs=out, h_n=h, c_n=c, dx=dx, dh0=dh0, dc0=dc0,
               **{"d_" + k: v for k, v in g.items()})
    want = dict(outputs=r_out, h_n=r_h, c_n=r_c, dx=r_dx, dh0=r_dh0, dc0=r_dc0,
                **{"d_" + k: v for k, v in r_g.items()})
    return {k: to_numpy(v) for k, v in got.items()}, want


def _compare(got, want, dtype, label):
    assert got.keys() == want.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None, f"{label}: {key} should be None"
            continue
        assert got[key].dtype == dtype, f"{label}: {key} has dtype {got[key].dtype}"
        assert_close(got[key], want[key], f"{label}: {key}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_seam_matches_reference(compiled_backend, spec, shape, dtype):
    args, grads = _inputs(spec, dtype, *shape)
    got, want = _run_pair(compiled_backend, spec, args, grads)
    _compare(got, want, dtype, f"{compiled_backend} {spec} {shape}")


@pytest.mark.parametrize("missing", ["d_outputs", "d_h_n", "d_c_n", "all"])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_seam_missing_gradients_mean_zeros(compiled_backend, spec, missing):
    """``d_* = None`` behaves as zeros (the layer passes None for gradients it never got)."""
    args, grads = _inputs(spec, np.float64, 3, 4, 2, 5, [4, 2, 0], seed=1)
    for key in grads:
        if missing in (key, "all"):
            grads[key] = None
    got, want = _run_pair(compiled_backend, spec, args, grads)
    _compare(got, want, np.float64, f"{compiled_backend} {spec} without {missing}")


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_results_belong_to_the_caller(compiled_backend, spec):
    """A later call must not overwrite earlier results, and backward must not consume ``saved``."""
    xp = array_module(compiled_backend)
    a1, g1 = _inputs(spec, np.float32, 3, 4, 2, 5, None, seed=2)
    a2, _ = _inputs(spec, np.float32, 3, 4, 2, 5, None, seed=3)

    def dev(d):
        return {k: (None if v is None else xp.asarray(v)) for k, v in d.items()}

    out1, h1, _, saved1 = checked.forward(compiled_backend, spec, **dev(a1))
    first = [to_numpy(out1).copy(), to_numpy(h1).copy()]
    grad_args = [None if v is None else xp.asarray(v) for v in g1.values()]
    back1 = checked.backward(saved1, *grad_args)
    back1_copy = [to_numpy(v).copy() for v in back1[:2]] + \
        [to_numpy(v).copy() for v in back1[3].values()]
    checked.forward(compiled_backend, spec, **dev(a2))   # same shapes, other values
    checked.backward(saved1, *grad_args)                # saved1 again
    assert np.array_equal(to_numpy(out1), first[0]) and np.array_equal(to_numpy(h1), first[1])
    again = checked.backward(saved1, *grad_args)
    for old, new in zip(back1_copy, [*again[:2], *again[3].values()]):
        np.testing.assert_array_equal(to_numpy(new), old)
    g = back1[3]
    assert len({id(v) for v in g.values()}) == 4, "gradient arrays must not alias each other"


# ---------------------------------------------------------------------------------------------
# the public layer API, 1-3 layers

LAYERS = {
    "lstm": (rk.LSTM, dict(forget_bias=1.0)),
    "gru": (rk.GRU, dict(reset_after=True)),
    "gru_tf1": (rk.GRU, dict(reset_after=False)),
    "rnn_relu": (rk.RNN, dict(nonlinearity="relu")),
    "rnn_tanh": (rk.RNN, dict(nonlinearity="tanh")),
}


def _state(cls, rng, L, B, H, dtype):
    def one():
        return rng.standard_normal((L, B, H)).astype(dtype)
    return (one(), one()) if cls is rk.LSTM else one()


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_layer_api_matches_reference(compiled_backend, layer, num_layers, dtype):
    cls, options = layer
    B, T, I, H = 3, 4, 3, 5
    rng = np.random.default_rng(num_layers)
    xp = array_module(compiled_backend)
    fast = cls(I, H, num_layers, dtype=np.dtype(dtype).name, backend=compiled_backend, seed=4,
               **options)
    ref = cls(I, H, num_layers, dtype="float64", backend="numpy", **options)
    ref.load_params(fast.params)
    if xp is not np:
        fast.to("cuda")                   # device input needs the parameters there too
    x = rng.standard_normal((B, T, I)).astype(dtype)
    state0 = _state(cls, rng, num_layers, B, H, dtype)
    lengths = np.array([4, 0, 2])
    d_out = rng.standard_normal((B, T, H)).astype(dtype)
    d_state = _state(cls, rng, num_layers, B, H, dtype)

    def to_dev(s):
        return tuple(xp.asarray(a) for a in s) if isinstance(s, tuple) else xp.asarray(s)

    out, state = fast(xp.asarray(x), to_dev(state0), lengths)
    dx, d_state0 = fast.backward(xp.asarray(d_out), to_dev(d_state))
    r_out, r_state = ref(x.astype(np.float64), state0, lengths)
    r_dx, r_d_state0 = ref.backward(d_out, d_state)
    label = f"{compiled_backend} {cls.__name__}{options} L={num_layers}"
    assert_close(out, r_out, f"{label}: outputs")
    assert_close(dx, r_dx, f"{label}: dx")
    for k, (a, b) in enumerate(zip(_flat(state), _flat(r_state))):
        assert_close(a, b, f"{label}: state[{k}]")
    for k, (a, b) in enumerate(zip(_flat(d_state0), _flat(r_d_state0))):
        assert_close(a, b, f"{label}: d_state0[{k}]")
    for name in ref.grads:
        assert to_numpy(fast.grads[name]).dtype == dtype
        assert_close(fast.grads[name], ref.grads[name], f"{label}: grads[{name}]")


def test_auto_picks_cpp_then_numba_for_numpy_input():
    ok, reason = rk.available_backends()["numba"]
    if not ok:
        pytest.skip(reason)
    os_preset = os.environ.get("RNNKERN_BACKEND")
    if os_preset not in (None, "", "auto"):
        pytest.skip(f"RNNKERN_BACKEND={os_preset} overrides the automatic choice")
    x = np.zeros((1, 1, 1), np.float32)
    # the C++ kernels where built (measured faster up to char-rnn size), else Numba
    expected = "cpp" if rk.available_backends()["cpp"][0] else "numba"
    assert backends.resolve("auto", x).name == expected
    assert backends.resolve("numba", x).name == "numba"   # an explicit name wins


# ---------------------------------------------------------------------------------------------
# the NUMBA_DISABLE_JIT=1 subset: the kernels run as plain Python on tiny inputs

@pytest.mark.nojit
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_nojit_numba_kernels(spec, dtype):
    """Also runs in the JIT suite; under NUMBA_DISABLE_JIT=1 it covers the kernel source."""
    if not rk.available_backends()["numba"][0]:
        pytest.skip(rk.available_backends()["numba"][1])
    args, grads = _inputs(spec, dtype, 2, 3, 2, 3, [3, 1], seed=5)
    got, want = _run_pair("numba", spec, args, grads)
    _compare(got, want, dtype, f"numba {spec} (NUMBA_DISABLE_JIT={os.environ.get('NUMBA_DISABLE_JIT')})")
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        from rnnkern.backends import numba_lstm
        assert not hasattr(numba_lstm.lstm_forward, "signatures"), "JIT was not disabled"


def test_nojit_subset_passes_without_jit():
    """Run the ``nojit`` tests in a subprocess with NUMBA_DISABLE_JIT=1."""
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        pytest.skip("already running without JIT")
    if not rk.available_backends()["numba"][0]:
        pytest.skip(rk.available_backends()["numba"][1])
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "nojit", "-p",
                           "no:cacheprovider", os.path.abspath(__file__)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# The checked seam: direct callers get an error naming the argument, never an out-of-bounds kernel
@pytest.mark.parametrize("name, bad, error", [
    ("h0", lambda a: a[:, :-1], ValueError),                 # wrong shape
    ("w_hh", lambda a: a.astype(np.float64), TypeError),     # wrong dtype
    ("x", lambda a: np.asfortranarray(a), ValueError),       # not C-contiguous
    ("c0", lambda a: a[:1], ValueError),
    ("lengths", lambda a: a.astype(np.int32), TypeError),
    ("lengths", lambda a: a + 10, ValueError),               # outside [0, T]
    ("b_ih", lambda a: list(a), TypeError),                  # not an array
])
def test_checked_seam_rejects_bad_arrays_with_the_argument_name(compiled_backend, name, bad,
                                                                error):
    if compiled_backend == "cuda":
        pytest.skip("host arrays checked here")
    spec = CellSpec("lstm")
    args, _ = _inputs(spec, np.float32, 3, 4, 2, 5, [4, 2, 0])
    args[name] = bad(args[name])
    with pytest.raises(error, match=name):
        checked.forward(compiled_backend, spec, **args)


def test_checked_backward_rejects_a_wrong_gradient_shape(compiled_backend):
    if compiled_backend == "cuda":
        pytest.skip("host arrays checked here")
    spec = CellSpec("gru")
    args, grads = _inputs(spec, np.float32, 3, 4, 2, 5, None)
    saved = checked.forward(compiled_backend, spec, **args)[3]
    with pytest.raises(ValueError, match="d_outputs"):
        checked.backward(saved, grads["d_outputs"][:, :-1], grads["d_h_n"])
    with pytest.raises(ValueError, match="d_c_n is for the LSTM only"):
        checked.backward(saved, None, None, grads["d_h_n"])
