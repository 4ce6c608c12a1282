"""Shared fixtures and helpers for the test suite.

``compiled_backend``: every backend in the registry except the NumPy reference, one test per
name; a backend that cannot run here skips with its own ``available()`` reason, so new backends
(cpp, cuda) are picked up without touching the tests.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnkern as rk
from rnnkern.backends import BACKENDS

COMPILED_BACKENDS = [b for b in BACKENDS if b != "numpy"]

# float64 must match the reference to rtol 1e-10; float32 (fast activations) to 1e-4 / 1e-5
TOLERANCE = {np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),
             np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b
                        for b in COMPILED_BACKENDS])
def compiled_backend(request):
    """Name of a non-reference backend that is available here (else the test skips)."""
    ok, reason = rk.available_backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param


def array_module(backend_name):
    """The array module a backend's seam takes: CuPy for ``cuda``, NumPy otherwise."""
    if backend_name == "cuda":
        import cupy
        return cupy
    return np


def to_numpy(a):
    """A NumPy copy of a NumPy or CuPy array (None stays None)."""
    if a is None:
        return None
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_close(actual, expected, what):
    """``actual`` (float32 or float64) matches ``expected`` within the tolerance of its dtype."""
    actual = to_numpy(actual)
    np.testing.assert_allclose(actual, expected, err_msg=what, **TOLERANCE[actual.dtype])


def numeric_grad(f, array, eps=1e-6):
    """Central differences of the scalar ``f()`` w.r.t. every element of ``array`` (float64),
    each perturbed in place and restored."""
    grad = np.zeros_like(array, dtype=np.float64)
    for idx in np.ndindex(array.shape):
        orig = array[idx]
        array[idx] = orig + eps
        up = f()
        array[idx] = orig - eps
        down = f()
        array[idx] = orig
        grad[idx] = (up - down) / (2 * eps)
    return grad
