"""The direct cuBLAS binding of the cuda backend (rnnkern/backends/cuda/blas.py) without a GPU:
a stand-in libcublas built here with g++ exports the same five entry points with cuBLAS's
signatures and computes the column-major GEMM on host memory, so the ctypes argument types and
order, the status checks, and the row-major-to-column-major operand mapping of
``runtime.gemm_args`` are checked end to end on NumPy arrays.
"""
import shutil
import subprocess
import types

import numpy as np
import pytest

from rnnkern.backends.cuda import blas, runtime

FAKE_CUBLAS = r"""
#include <cstdint>
static void* g_stream = nullptr;
static int g_mode = -1;
template <class T>
static int gemm(int ta, int tb, int m, int n, int k, const T* alpha, const T* A, int lda,
                const T* B, int ldb, const T* beta, T* C, int ldc) {
    if (ta < 0 || ta > 1 || tb < 0 || tb > 1 || g_mode != 0) return 7;  // INVALID_VALUE
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            T acc = 0;
            for (int p = 0; p < k; ++p)
                acc += (ta ? A[p + (int64_t)i * lda] : A[i + (int64_t)p * lda]) *
                       (tb ? B[j + (int64_t)p * ldb] : B[p + (int64_t)j * ldb]);
            T& c = C[i + (int64_t)j * ldc];
            c = *beta == 0 ? *alpha * acc : *alpha * acc + *beta * c;  // beta 0: C not read
        }
    return 0;
}
extern "C" {
int cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha,
                   const float* A, int lda, const float* B, int ldb, const float* beta,
                   float* C, int ldc) { return gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc); }
int cublasDgemm_v2(void*, int ta, int tb, int m, int n, int k, const double* alpha,
                   const double* A, int lda, const double* B, int ldb, const double* beta,
                   double* C, int ldc) { return gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc); }
int cublasSetStream_v2(void*, void* s) { g_stream = s; return 0; }
int cublasSetPointerMode_v2(void*, int mode) { g_mode = mode; return 0; }
void* fake_stream() { return g_stream; }
}
"""


@pytest.fixture(scope="module")
def fake_cublas(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot build the stand-in libcublas")
    d = tmp_path_factory.mktemp("fake_cublas")
    (d / "fake.cpp").write_text(FAKE_CUBLAS)
    lib = d / "libcublas.so.13"
    subprocess.run(["g++", "-O1", "-shared", "-fPIC", str(d / "fake.cpp"), "-o", str(lib)],
                   check=True, capture_output=True)
    return blas.Cublas(str(lib))


def matmul(cb, a, b, out, accumulate=False):
    """What CupyRuntime.matmul does with its direct binding, on NumPy arrays."""
    spec = runtime.gemm_args(a, b, out)
    op_b, op_a, m, n, k, ld_b, ld_a, ld_c = spec
    one, zero = np.ones(1, out.dtype), np.zeros(1, out.dtype)
    cb.gemm(out.dtype == np.float64, 0, op_b, op_a, m, n, k, one.ctypes.data, b.ctypes.data,
            ld_b, a.ctypes.data, ld_a, (one if accumulate else zero).ctypes.data,
            out.ctypes.data, ld_c)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gemm_through_the_binding_matches_numpy(fake_cublas, dtype):
    """The operand views of the stepwise loops: h_all[t] @ W^T, d_gh[t] @ W, a column block
    of d_gh[t] against a row block of W, and the side stream's accumulated d_gh^T h."""
    rng = np.random.default_rng(0)
    fake_cublas.set_pointer_mode_host(0)
    B, H, G, T = 3, 5, 4, 6
    h = rng.standard_normal((T + 1, B, H)).astype(dtype)
    w = rng.standard_normal((G * H, H)).astype(dtype)
    d_gh = rng.standard_normal((T, B, G * H)).astype(dtype)
    tol = dict(rtol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    out = np.empty((B, G * H), dtype)
    matmul(fake_cublas, h[2], w.T, out)
    np.testing.assert_allclose(out, h[2] @ w.T, **tol)
    out = np.empty((B, H), dtype)
    matmul(fake_cublas, d_gh[1], w, out)
    np.testing.assert_allclose(out, d_gh[1] @ w, **tol)
    matmul(fake_cublas, d_gh[1][:, 2 * H:], w[2 * H:], out)
    np.testing.assert_allclose(out, d_gh[1][:, 2 * H:] @ w[2 * H:], **tol)
    dw = np.ones((G * H, H), dtype)
    rows = d_gh[2:5].reshape(3 * B, G * H)
    matmul(fake_cublas, rows.T, h[2:5].reshape(3 * B, H), dw, accumulate=True)
    np.testing.assert_allclose(dw, 1 + rows.T @ h[2:5].reshape(3 * B, H), **tol)


def test_a_failing_status_raises(fake_cublas):
    fake_cublas._set_pointer_mode(0, 1)  # device pointer mode: the stand-in refuses the GEMM
    a = np.ones((2, 2))
    with pytest.raises(RuntimeError, match="cublasgemm failed with status 7"):
        matmul(fake_cublas, a, a, np.empty((2, 2)))
    fake_cublas.set_pointer_mode_host(0)
    fake_cublas.set_stream(0, 1234)  # reaches the library as the stream pointer
    import ctypes
    stream = ctypes.CDLL(fake_cublas.path).fake_stream
    stream.restype = ctypes.c_void_p
    assert stream() == 1234


def test_the_symbols_are_found_through_a_module_that_links_the_library(fake_cublas, tmp_path):
    """CuPy's cuBLAS extension links libcublas: the binding looks the entry points up through
    it, so it lands on the library CuPy uses (a stand-in module linking the stand-in here)."""
    (tmp_path / "module.cpp").write_text('extern "C" int cupy_like_module_marker() { return 1; }')
    module = tmp_path / "cublas_module.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(tmp_path / "module.cpp"), "-Wl,--no-as-needed",
                    fake_cublas.path, "-o", str(module)], check=True, capture_output=True)
    loaded = blas.load(types.SimpleNamespace(__file__=str(module)))
    assert loaded is not None and loaded.path == str(module)
    out = np.empty((2, 2))
    loaded.set_pointer_mode_host(0)
    matmul(loaded, np.eye(2), np.full((2, 2), 3.0), out)
    np.testing.assert_array_equal(out, np.full((2, 2), 3.0))
    # a module without the symbols: the next way (the library in the process maps)
    plain = blas.load(types.SimpleNamespace(__file__=str(tmp_path / "missing.so")))
    assert plain is None or plain.path == blas.loaded_library()


def test_the_loaded_library_is_found_in_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /opt/nvidia/cublas/lib/libcublasLt.so.13\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /opt/nvidia/cublas/lib/libcublas.so.13\n"
        "7f04-7f05 rw-p 00000000 00:00 0 \n")
    assert blas.loaded_library(maps) == "/opt/nvidia/cublas/lib/libcublas.so.13"
