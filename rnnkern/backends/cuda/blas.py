"""cuBLAS called directly (ctypes), for the stepwise loops' per-step GEMMs.

CuPy's cuBLAS wrappers set the handle's stream to the current stream at every call, which a
stream capture does not allow, so a graph of the stepwise loop could not hold them. These are
the library's own entry points, on the ``libcublas`` CuPy has loaded (the same library and
handles as CuPy's); the handle's stream and pointer mode are set by the caller outside any
capture. Nothing here imports CuPy.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

OP = {"N": 0, "T": 1}   # cublasOperation_t
POINTER_MODE_HOST = 0   # cublasPointerMode_t


class Cublas:
    """``sgemm``/``dgemm`` (cublas{S,D}gemm_v2), ``set_stream`` and ``set_pointer_mode``:
    each raises RuntimeError on a status other than success."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        self.path = path
        self._sgemm, self._dgemm = lib.cublasSgemm_v2, lib.cublasDgemm_v2
        for fn in (self._sgemm, self._dgemm):
            # handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc
            fn.argtypes = [ptr, i32, i32, i32, i32, i32, ptr, ptr, i32, ptr, i32, ptr, ptr, i32]
            fn.restype = i32
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes, self._set_stream.restype = [ptr, ptr], i32
        self._set_pointer_mode = lib.cublasSetPointerMode_v2
        self._set_pointer_mode.argtypes, self._set_pointer_mode.restype = [ptr, i32], i32

    def gemm(self, double, handle, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        """Column-major ``C = alpha op(A) op(B) + beta C``; pointers as integers, ``op_*`` "N"
        or "T", alpha and beta host pointers (the handle's pointer mode must be host)."""
        fn = self._dgemm if double else self._sgemm
        _check(fn(handle, OP[op_a], OP[op_b], m, n, k, alpha, a, lda, b, ldb, beta, c, ldc),
               "gemm")

    def set_stream(self, handle, stream_ptr):
        _check(self._set_stream(handle, stream_ptr), "setStream")

    def set_pointer_mode_host(self, handle):
        _check(self._set_pointer_mode(handle, POINTER_MODE_HOST), "setPointerMode")


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"cublas{what} failed with status {status}")


def loaded_library(maps_path="/proc/self/maps"):
    """The path of the libcublas this process has loaded (CuPy loads it with its first
    handle), else what the loader finds by name; None when there is none."""
    try:
        with open(maps_path) as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return path
    except OSError:  # not Linux
        pass
    return ctypes.util.find_library("cublas")


def load(cupy_cublas_module=None):
    """A :class:`Cublas` on the library CuPy's cuBLAS module links (the symbols are looked up
    through that module, so it is the very library CuPy uses), else on
    :func:`loaded_library`; None when neither has them (then graphs cannot hold GEMMs)."""
    paths = [getattr(cupy_cublas_module, "__file__", None), loaded_library()]
    for path in paths:
        if path is None:
            continue
        try:
            return Cublas(path)
        except (OSError, AttributeError):
            continue
    return None
