"""Property-based sweep (hypothesis): every CPU backend against the NumPy reference through the
layer API, over random cells, shapes, lengths, dtypes and input layouts.

Two variants of one property:

* ``test_backends_match_reference``: 200 examples, derandomized (the same examples on every
  run, no example database), part of the default ``python -m pytest`` run (CI);
* ``test_backends_match_reference_slow``: 2000 other examples (also derandomized) over wider
  shapes, marked ``slow``. pytest.ini's ``addopts`` carries ``-m "not slow"``, so the default
  run deselects it; run it with ``python -m pytest -m slow tests/test_properties.py`` (a ``-m``
  on the command line replaces the one in ``addopts``).

Shape legend: B batch 1..5, T time steps 0..6 (T=0 included), I input size 1..9, H hidden
size 1..9 (slow: B 1..8, T 0..12, I and H 1..33, past a SIMD vector with a remainder), L layers
1..2; lengths None or ints [B] in [0, T] (0 and T drawn often).
Cells: LSTM forget_bias 0/1, GRU reset_after True/False, RNN tanh/relu. dtype float32/float64.

Per example, for every CPU backend (``rk.available_backends()``; an unavailable one is skipped
with its reason, the NumPy reference must be there):

1. **Against the reference.** One layer per backend with the same parameters runs forward and
   backward on the same inputs (x, initial state or None, lengths, d_outputs, d_state or None),
   all rounded to the layer's dtype. Outputs, final states, dx, d_state0 and every weight
   gradient must match the NumPy backend run in float64 on those rounded values, within
   ``conftest.TOLERANCE`` (float64 rtol 1e-10 / atol 1e-12, float32 rtol 1e-4 / atol 1e-5), and
   numba's and cpp's must also match the NumPy backend's in the layer's own dtype within the
   same tolerance; every result has the layer's dtype and the reference's shape.
2. **Across layouts, bit for bit.** The same backend given the same values as a C-contiguous
   array, a Fortran-ordered array, a non-contiguous view with negative and non-unit strides,
   nested Python lists, and (float32 layers) the unrounded float64 array that the layer casts,
   returns bit-identical outputs, states and gradients (the layout is applied to x, the initial
   state, d_outputs and d_state alike; lengths as an int64 array, an int32 array or a list).
   Lists are not tried for T=0 (nested lists cannot hold an empty [B,0,I] array), nor for a
   GRU/RNN initial state (the API wants one array there; a list would read as (h0, c0)).

What is *not* asserted: bit-identity across backends. numba and cpp differ from numpy in the
last bits (float64 ~1e-16, float32 ~1e-7: other summation orders and, in float32, fast
activations), so "bit-identical on numpy, numba and cpp" holds per backend across layouts and
dtypes of the input, not between backends; between backends the tolerance of 1. holds.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnkern as rk

from conftest import assert_close

REFERENCE = "numpy"
CPU_BACKENDS = [b for b in rk.available_backends() if b != "cuda"]

# (label, layer class, cell options)
CELLS = [
    ("lstm_fb0", rk.LSTM, dict(forget_bias=0.0)),
    ("lstm_fb1", rk.LSTM, dict(forget_bias=1.0)),
    ("gru", rk.GRU, dict(reset_after=True)),
    ("gru_tf1", rk.GRU, dict(reset_after=False)),
    ("rnn_tanh", rk.RNN, dict(nonlinearity="tanh")),
    ("rnn_relu", rk.RNN, dict(nonlinearity="relu")),
]
LAYOUTS = ["fortran", "strided", "list", "float64_cast"]   # each compared with "C"

COMMON = dict(deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow])
CI_SETTINGS = settings(max_examples=200, **COMMON)
SLOW_SETTINGS = settings(max_examples=2000, **COMMON)


@st.composite
def cases(draw, max_b=5, max_t=6, max_size=9):
    """One example: cell, L, B, T, I, H, dtype, lengths, which optional arrays are given, seed."""
    label, cls, options = draw(st.sampled_from(CELLS))
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(0, max_t))
    # lengths: None, or per sequence one of the ends (0, T) or anything in between
    one_length = st.sampled_from([0, T]) | st.integers(0, T)
    lengths = draw(st.none() | st.lists(one_length, min_size=B, max_size=B))
    return dict(label=label, cls=cls, options=options, L=draw(st.integers(1, 2)), B=B, T=T,
                I=draw(st.integers(1, max_size)), H=draw(st.integers(1, max_size)),
                dtype=draw(st.sampled_from(["float32", "float64"])), lengths=lengths,
                with_state=draw(st.booleans()), with_d_state=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


# ------------------------------------------------------------------------------ inputs
def _values(case):
    """float64 values of every input: x [B,T,I], state (LSTM (h0, c0), else h0 [L,B,H]) or None,
    d_outputs [B,T,H], d_state (the state's structure) or None."""
    rng = np.random.default_rng(case["seed"])
    L, B, T, I, H = (case[k] for k in "LBTIH")
    lstm = case["cls"] is rk.LSTM

    def one():
        return 0.5 * rng.standard_normal((L, B, H))

    def state():
        return (one(), one()) if lstm else one()

    return dict(x=rng.standard_normal((B, T, I)),
                state=state() if case["with_state"] else None,
                d_out=rng.standard_normal((B, T, H)),
                d_state=state() if case["with_d_state"] else None)


def _strided(a):
    """A view of ``a``'s values with a negative stride on the first axis and a stride of 3 on
    the last (no two of its axes contiguous)."""
    shape = list(a.shape)
    shape[0] *= 2
    shape[-1] *= 3
    buf = np.full(shape, np.nan, a.dtype)
    view = buf[::-2, ..., 1::3]
    view[...] = a
    assert not view.flags.c_contiguous or a.size <= 1 or 0 in a.shape
    return view


def _arrange(values, layout, dtype):
    """``values`` (float64) in ``layout``: "C", "fortran", "strided", "list" hold the values
    rounded to ``dtype``; "float64_cast" leaves them float64 for the layer to round."""
    def one(a):
        if a is None:
            return None
        if isinstance(a, tuple):
            return tuple(one(v) for v in a)
        if layout == "float64_cast":
            return np.array(a, np.float64)
        r = a.astype(dtype)
        return {"C": np.ascontiguousarray, "fortran": np.asfortranarray,
                "strided": _strided, "list": lambda v: v.tolist()}[layout](r)
    arranged = {k: one(v) for k, v in values.items()}
    if layout == "list" and isinstance(arranged["state"], list):
        # a GRU/RNN initial_state must be an array: the API refuses a list there (it would
        # read like an LSTM's (h0, c0)); d_state and the LSTM's (h0, c0) may hold lists
        arranged["state"] = values["state"].astype(dtype)
    return arranged


def _lengths(lengths, layout):
    if lengths is None or layout == "list":
        return lengths
    return np.asarray(lengths, np.int32 if layout == "fortran" else np.int64)


# ------------------------------------------------------------------------------ runs
def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def _run(layer, inputs, lengths):
    """Forward and backward once; every result copied, by name."""
    out, state = layer(inputs["x"], inputs["state"], lengths)
    dx, d_state0 = layer.backward(inputs["d_out"], inputs["d_state"])
    got = {"outputs": out, "dx": dx}
    got.update({f"state[{k}]": s for k, s in enumerate(_flat(state))})
    got.update({f"d_state0[{k}]": s for k, s in enumerate(_flat(d_state0))})
    got.update({f"grads[{n}]": g for n, g in layer.grads.items()})
    return {k: np.array(v, copy=True) for k, v in got.items()}


def _layer(case, backend, dtype, params=None):
    layer = case["cls"](case["I"], case["H"], case["L"], dtype=dtype, backend=backend,
                        seed=case["seed"], **case["options"])
    if params is not None:
        layer.load_params(params)
    return layer


def _describe(case):
    return ("{label} L={L} B={B} T={T} I={I} H={H} {dtype} lengths={lengths} "
            "state={with_state} d_state={with_d_state} seed={seed}").format(**case)


def check_case(case, backends=None):
    """Property 1 (vs the float64 reference) and 2 (bit-identical across layouts) for one
    example on ``backends`` (default: every CPU backend that is available here)."""
    available = rk.available_backends()
    assert available[REFERENCE][0], available[REFERENCE][1]
    backends = [b for b in (backends or CPU_BACKENDS) if available[b][0]]
    dtype = np.dtype(case["dtype"])
    label = _describe(case)
    values = _values(case)

    ref = _layer(case, REFERENCE, "float64")
    params = {k: v.astype(dtype) for k, v in ref.params.items()}   # rounded: same for all
    ref.load_params(params)
    rounded = _arrange(values, "C", dtype)
    want = _run(ref, _arrange(rounded, "C", np.float64), _lengths(case["lengths"], "C"))

    same_dtype = None   # the NumPy backend's results in the layer's dtype
    for backend in [REFERENCE] + [b for b in backends if b != REFERENCE]:
        layer = _layer(case, backend, dtype.name, params)
        base = _run(layer, rounded, _lengths(case["lengths"], "C"))
        assert base.keys() == want.keys()
        for key, expected in want.items():
            assert base[key].dtype == dtype, f"{backend} {label}: {key} is {base[key].dtype}"
            assert base[key].shape == expected.shape, f"{backend} {label}: {key} shape"
            assert_close(base[key], expected, f"{backend} {label}: {key} vs the reference")
            if same_dtype is not None:
                assert_close(base[key], same_dtype[key],
                             f"{backend} {label}: {key} vs the numpy backend in {dtype}")
        if backend == REFERENCE:
            same_dtype = base
        for layout in LAYOUTS:
            if layout == "float64_cast" and dtype == np.float64:
                continue   # nothing to cast
            if layout == "list" and case["T"] == 0:
                continue   # [[], ...] has no I axis: a list cannot hold [B,0,I]
            got = _run(layer, _arrange(values if layout == "float64_cast" else rounded,
                                       layout, dtype), _lengths(case["lengths"], layout))
            for key, expected in base.items():
                assert got[key].dtype == dtype and np.array_equal(got[key], expected), \
                    (f"{backend} {label}: {key} with {layout} input differs from C-order "
                     f"input (max |diff| {np.max(np.abs(got[key] - expected), initial=0)})")


# ------------------------------------------------------------------------------ tests
def test_cpu_backends_present():
    """Report (and skip) CPU backends that cannot run here; the reference always must."""
    available = rk.available_backends()
    assert available[REFERENCE][0], available[REFERENCE][1]
    missing = {b: available[b][1] for b in CPU_BACKENDS if not available[b][0]}
    if missing:
        pytest.skip(f"CPU backends not swept here: {missing}")


@CI_SETTINGS
@given(case=cases())
def test_backends_match_reference(case):
    check_case(case)


@pytest.mark.slow
@SLOW_SETTINGS
@given(case=cases(max_b=8, max_t=12, max_size=33))
def test_backends_match_reference_slow(case):
    check_case(case)
