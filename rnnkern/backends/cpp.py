"""C++ CPU backend: the pybind11 extension ``rnnkern._C`` (csrc/cpu, csrc/bindings).

Same seam as :mod:`rnnkern.reference` (one layer, one direction, whole sequence; shape legend
there), for validated input (:mod:`rnnkern.backends`). Each :class:`~rnnkern.CellSpec` becomes
a ``_C.CellSpec`` once (:func:`native_spec`); ``_C`` checks only the arrays' structure, so no
call can read out of bounds, and runs without the GIL; ``saved`` is an opaque ``_C.Saved``.
Imported from a source tree (a checkout), the backend runs only a ``_C`` built from the C++
sources the tree holds now (``rnnkern/_source_tree.py``); otherwise :func:`available` says it
is missing or stale and how to build it: the fall-back to Numba is never silent, and an
outdated binary never runs.

GEMMs: products from M*N*K = 2^23 up go to SciPy's BLAS, whose Fortran ``sgemm``/``dgemm``
function pointers ``scipy.linalg.cython_blas`` exports as capsules (handed to ``_C`` once, at
import); smaller ones, and all of them without SciPy, to the extension's register-tiled loop,
built per ISA and chosen at run time (``_C.gemm_loop_isa()``; ``RNNKERN_GEMM_ISA=base|avx2``
forces a narrower build). Measured: ``benchmarks/bench_cpp_gemm.py``.

Threads: from B*T*G*H*H = 2^23 recurrent multiply-adds up (the LSTM: a quarter of that), the
batch is cut into row chunks that run their whole time loop on their own thread
(``rnnkern.config.CPP_THREADS``, ``CPP_SPLIT_MIN_WORK``), so nothing synchronises per step. The
chunks beyond the first run on persistent worker threads, which spin ~500 us after each call
for the next one, then sleep (csrc/cpu/chunks.cpp).

The LSTM has its own kernels (csrc/cpu/lstm.cpp): its saved arrays are private, time-major,
with H padded to whole vectors and the gate columns interleaved per vector block, so every
pointwise pass runs on full vectors; its weights are repacked per call into contiguous GEMM
panels, and its backward gathers a few steps of gate gradients before the dx and weight-gradient
GEMMs (``config.CPP_LSTM_RING_ROWS``). RNN and GRU: csrc/cpu/rnn_gru.cpp. Result arrays from
about 256 KiB up come from a pool of freed blocks, so repeated calls with the same shapes do not
page-fault (``config.CPP_POOL_LIMIT``). Those blocks and the kernels' kept work buffers from
64 KiB up sit on transparent huge pages where Linux allows them (csrc/cpu/buffer.h,
``config.CPP_HUGE_PAGE_MIN``).

A whole training step -- every layer, the dense head and loss, every backward and optionally
Adam -- runs as one call through ``_C.StackStepF32/F64`` (csrc/cpu/stack.h), which the step
plan drives (:mod:`rnnkern.step_plan.cpp`).
"""
from __future__ import annotations

import os

from .._source_tree import source_digest, source_tree_root

name = "cpp"


def build_problem(root, ext, import_error=None):
    """Why ``ext`` (the imported ``_C``, or None when ``import_error`` stopped it) cannot serve
    the package at ``root`` (a source tree, or None when installed); "" when it can."""
    if ext is not None and root is not None:
        found_in = os.path.dirname(os.path.abspath(ext.__file__))
        if not os.path.samefile(found_in, os.path.join(root, "rnnkern")):
            # another checkout's editable install lent its build: never mix two trees
            ext, import_error = None, f"the one found was {found_in}'s"
    if ext is None:
        if root is None:
            return (f"rnnkern._C is missing from this installation ({import_error}); "
                    f"reinstall rnnkern")
        return (f"rnnkern is imported from the source tree {root}, whose extension rnnkern._C "
                f"is not built ({import_error}); build it there with `pip install -e .`, or run "
                f"from another directory to use an installed rnnkern")
    if root is not None and getattr(ext, "__source_digest__", "") != source_digest(root):
        return (f"rnnkern._C in the source tree {root} is stale: it was built from other C++ "
                f"sources than csrc/ holds now; rebuild it with `pip install -e .`")
    return ""


try:
    from .. import _C
except ImportError as exc:  # not built: pip install . (or -e .) compiles it with CMake
    _C, _IMPORT_ERROR = None, build_problem(source_tree_root(), None, exc)
else:
    _IMPORT_ERROR = build_problem(source_tree_root(), _C)
    if _IMPORT_ERROR:
        _C = None   # a stale build may not match the calls below: never run it


def _register_blas():
    """Hand SciPy's BLAS to _C; returns a short description for available()."""
    try:
        from scipy.linalg import cython_blas
        capi = cython_blas.__pyx_capi__
        _C.set_blas(capi["sgemm"], capi["dgemm"])
        return "SciPy BLAS for large GEMMs"
    except Exception as exc:  # noqa: BLE001 - any failure leaves the built-in loop in charge
        _C.set_blas(None, None)
        return f"built-in GEMM loop (SciPy BLAS unavailable: {exc})"


_BLAS = _register_blas() if _C is not None else ""


def available():
    if _C is None:
        return False, _IMPORT_ERROR
    return True, f"rnnkern._C {_C.__version__}, {_BLAS}"


_NATIVE = {}   # CellSpec -> _C.CellSpec


def native_spec(spec):
    """The ``_C.CellSpec`` of a :class:`~rnnkern.CellSpec`, made once per spec."""
    native = _NATIVE.get(spec)
    if native is None:
        native = _NATIVE[spec] = _C.CellSpec(spec.kind, spec.nonlinearity,
                                             float(spec.forget_bias), bool(spec.reset_after))
    return native


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """See :func:`rnnkern.reference.forward`; ``saved`` is _C's opaque record."""
    return _C.forward(native_spec(spec), x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :func:`rnnkern.reference.backward`."""
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = _C.backward(saved, d_outputs, d_h_n, d_c_n)
    return dx, dh0, dc0, dict(w_ih=dw_ih, w_hh=dw_hh, b_ih=db_ih, b_hh=db_hh)
