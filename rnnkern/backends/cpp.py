"""C++ CPU backend: the pybind11 extension ``rnnkern._C`` (csrc/cpu, csrc/bindings.cpp).

Same seam as :mod:`rnnkern.reference` (one layer, one direction, whole sequence; shape legend
there). ``_C`` checks every array itself (dtype, C-contiguity, shapes, lengths range) and raises
``ValueError`` naming the argument, then runs without the GIL. Imported from a source tree
(a checkout), the backend runs only a ``_C`` built from the C++ sources the tree holds now
(``rnnkern/_source_tree.py``); otherwise :func:`available` says it is missing or stale and
how to build it: the fall-back to Numba is never silent, and an outdated binary never runs.

GEMMs: products from M*N*K = 2^23 up go to SciPy's BLAS, whose Fortran ``sgemm``/``dgemm``
function pointers ``scipy.linalg.cython_blas`` exports as capsules (handed to ``_C`` once, at
import); smaller ones, and all of them without SciPy, to the extension's register-tiled loop,
built per ISA and chosen at run time (``_C.gemm_loop_isa()``; ``RNNKERN_GEMM_ISA=base|avx2``
forces a narrower build). Measured: ``benchmarks/bench_cpp_gemm.py``.

Threads: from B*T*G*H*H = 2^23 recurrent multiply-adds up (the LSTM: a quarter of that), the
batch is cut into row chunks that run their whole time loop on their own thread
(``_C.set_threads(n)``, 0 = the CPUs this process may use, at most 8; ``_C.set_split_min_work``),
so nothing synchronises per step. The chunks beyond the first run on persistent worker threads,
which spin ~500 us after each call for the next one, then sleep (csrc/cpu/chunks.cpp).

The LSTM has its own kernels (csrc/cpu/lstm.cpp): its ``saved`` arrays are private, time-major,
with H padded to whole vectors and the gate columns interleaved per vector block, so every
pointwise pass runs on full vectors; its weights are repacked per call into contiguous GEMM
panels, and its backward gathers a few steps of gate gradients before the dx and weight-gradient
GEMMs (``_C.set_lstm_ring_rows``). Result arrays from about 256 KiB up come from a pool of freed
blocks, so repeated calls with the same shapes do not page-fault (``_C.set_pool_limit``,
``_C.pool_held``). Those blocks and the kernels' kept work buffers from 64 KiB up sit on
transparent huge pages where Linux allows them (csrc/cpu/buffer.h, ``_C.set_huge_page_min``).

Projected input (LSTM only; ``forward(..., projected=True)``): ``x`` [B,T,4H] is already
``x_orig W_ih^T`` (gate order i, f, g, o, without bias), e.g. rows gathered from a [V,4H] table
for one-hot or embedded ids; ``w_ih`` is passed (any width) but not read. The saved rows are then
``[h | 1]``, so the per-step GEMM skips the input columns, and the backward skips the dx and dW_ih
GEMMs: its ``dx`` [B,T,4H] is the gradient w.r.t. that projection (the gate pre-activation
gradients) and ``w_ih``'s gradient comes back as zeros, for the caller to form
(``dx.reshape(-1, 4H).T @ x_orig.reshape(-1, I)``, or a table scatter).

From a table (``forward(x=table, ..., projected=True, ids=ids)``): ``table`` [V,4H] holds the
projections of V inputs (``W_ih^T`` for one-hot ids, ``E W_ih^T`` for an embedding ``E``) and
``ids`` int64 [B,T] picks step t of sequence b; the kernels read the rows in place, and the
backward's ``dx`` is the table's gradient [V,4H] (each step's gate gradients added into its id's
row), so the caller needs neither a gather before nor a scatter after.
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


def _options(spec):
    return dict(nonlinearity=spec.nonlinearity, forget_bias=float(spec.forget_bias),
                reset_after=bool(spec.reset_after))


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None, projected=False,
            ids=None):
    """See :func:`rnnkern.reference.forward`; ``saved`` holds _C's activation buffers.
    ``projected``, ``ids``: see the module docstring (LSTM only; else ValueError)."""
    out, h_n, c_n, buffers = _C.forward(spec.kind, x, w_ih, w_hh, b_ih, b_hh, h0,
                                        c0 if spec.has_cell_state else None, lengths,
                                        projected=bool(projected), ids=ids, **_options(spec))
    saved = dict(buffers, x=x, w_ih=w_ih, w_hh=w_hh, lengths=lengths, projected=bool(projected),
                 ids=ids)
    return out, h_n, c_n, saved


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :func:`rnnkern.reference.backward`. After a projected forward, ``dx`` [B,T,4H] is the
    gradient w.r.t. ``x_orig W_ih^T`` (with ``ids``: [V,4H], the table's) and the ``w_ih``
    gradient is zeros (module docstring)."""
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = _C.backward(
        spec.kind, saved["x"], saved["w_ih"], saved["w_hh"], saved["lengths"], saved["hprev"],
        saved["cprev"], saved["act"], saved["rh"], d_outputs, d_h_n,
        d_c_n if spec.has_cell_state else None, projected=saved.get("projected", False),
        ids=saved.get("ids"), **_options(spec))
    return dx, dh0, dc0, dict(w_ih=dw_ih, w_hh=dw_hh, b_ih=db_ih, b_hh=db_hh)


def dense_softmax_xent(h, weight, bias, targets, weights, inv_total, d_logits, dw, db, dh):
    """The fused training step's dense head + softmax cross-entropy, forward and backward, in
    one call (csrc/cpu/head.h; the shapes and math are in its docstring there). Returns the
    loss; writes d_logits, dw, db (with a bias) and dh."""
    return _C.dense_softmax_xent(h, weight, bias, targets, weights, inv_total, d_logits, dw, db,
                                 dh)
