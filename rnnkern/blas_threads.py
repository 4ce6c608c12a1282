"""Thread counts of the OpenBLAS copies loaded in this process, through ctypes.

A process with NumPy and SciPy usually holds two OpenBLAS copies, each with its own thread pool:
NumPy's (``libscipy_openblas64_``, symbols suffixed ``64_``) for the dense layers and losses,
and SciPy's (``libscipy_openblas``), which ``np.dot`` inside the Numba kernels and the C++
backend's large GEMMs call. On 2 cores their idle pools spin against each other, so the Numba
backend holds SciPy's copy to one thread while it runs, and the examples can pin both.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re

_PREFIXES = (("scipy_openblas", ""), ("openblas", ""), ("scipy_openblas", "64_"),
             ("openblas", "64_"))


def _controls(path):
    """(set_num_threads, get_num_threads) of the OpenBLAS at ``path``, or None."""
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for prefix, suffix in _PREFIXES:
        set_fn = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
        get_fn = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
        if set_fn is not None and get_fn is not None:
            set_fn.argtypes, get_fn.restype = [ctypes.c_int], ctypes.c_int
            return set_fn, get_fn
    return None


def _load_scipy_blas():
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's OpenBLAS)


def scipy_openblas():
    """(set, get) of SciPy's OpenBLAS (the copy Numba's ``np.dot`` calls), or None."""
    try:
        import scipy
        _load_scipy_blas()
    except ImportError:
        return None
    root = os.path.dirname(scipy.__file__)
    for path in sorted(glob.glob(os.path.join(root, os.pardir, "scipy.libs", "*openblas*"))
                       + glob.glob(os.path.join(root, ".dylibs", "*openblas*"))):
        controls = _controls(path)
        if controls:
            return controls
    return None


def loaded_openblas():
    """[(set, get)] of every OpenBLAS mapped into this process (Linux; elsewhere [])."""
    try:
        _load_scipy_blas()
        with open("/proc/self/maps") as f:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
    except (ImportError, OSError):
        return []
    return [c for c in map(_controls, paths) if c]


def limit_blas_threads(n):
    """Set every loaded OpenBLAS to ``n`` threads; returns what :func:`restore_blas_threads`
    needs. ``OPENBLAS_NUM_THREADS=n`` before starting Python has the same effect."""
    libs = loaded_openblas()
    previous = [(set_fn, get_fn()) for set_fn, get_fn in libs]
    for set_fn, _ in libs:
        set_fn(int(n))
    return previous


def restore_blas_threads(previous):
    for set_fn, n in previous:
        set_fn(n)
