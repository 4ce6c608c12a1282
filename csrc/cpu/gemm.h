// Row-major GEMM used by the C++ kernels: C[M,N] = alpha * op(A) B + beta * C.
//   op(A) = A [M,K] (row stride lda) or, with trans_a, A^T where A is stored [K,M].
//   B is [K,N] (row stride ldb); C is [M,N] (row stride ldc).
// Large products go to a Fortran BLAS sgemm/dgemm registered at import time (SciPy's OpenBLAS,
// through the function pointers scipy.linalg.cython_blas exports); small ones, or all of them when
// no BLAS was registered, to a register-blocked loop here (a BLAS call's fixed cost dominates at
// the lab sizes).
#pragma once

#include <cstdint>

namespace rk {

// Fortran BLAS ?gemm signatures (column-major, every argument by pointer; int is 32-bit LP64).
using sgemm_fn = void (*)(char*, char*, int*, int*, int*, float*, float*, int*, float*, int*,
                          float*, float*, int*);
using dgemm_fn = void (*)(char*, char*, int*, int*, int*, double*, double*, int*, double*, int*,
                          double*, double*, int*);

void set_blas(sgemm_fn s, dgemm_fn d);
bool have_blas();
// products with M*N*K below this use the loop (default 2^23, from benchmarks; settable)
void set_blas_min_flops(int64_t v);
int64_t blas_min_flops();

// automatic: BLAS from blas_min_flops() up; loop / blas force one path (benchmarks; blas falls
// back to the loop when none is registered or a dimension exceeds BLAS's 32-bit int)
enum class GemmPath { automatic, loop, blas };

template <typename T>
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc,
          GemmPath path = GemmPath::automatic);

}  // namespace rk
