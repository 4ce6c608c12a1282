// The built-in GEMM loop (see gemm.h for the operation), for products too small to be worth a
// BLAS call, or all of them when no BLAS is registered. One source, compiled three times
// (gemm_loop_{base,avx2,avx512}.cpp with matching -m flags) and picked at run time from the CPU's
// features, because the register tiling depends on the vector width.
//
// Tiling: C is cut into tiles of up to MR rows x NV vectors (AVX-512: 6 x 4 zmm; else 4 x 2)
// whose accumulators stay in registers while k runs; each B vector loaded feeds MR rows. Column
// panels are the outer loop and K runs in chunks of 128, so a panel of B stays in L1 while every
// row block of A passes over it.
#pragma once

#include <cstdint>

namespace rk {

// which build runs here: "avx512", "avx2" or "base"
const char* gemm_loop_isa();

void gemm_loop(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_loop(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
               int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

#define RK_GEMM_LOOP_DECLARE(isa)                                                             \
    void gemm_loop_##isa(bool, int64_t, int64_t, int64_t, float, const float*, int64_t,         \
                         const float*, int64_t, float, float*, int64_t);                        \
    void gemm_loop_##isa(bool, int64_t, int64_t, int64_t, double, const double*, int64_t,       \
                         const double*, int64_t, double, double*, int64_t);
RK_GEMM_LOOP_DECLARE(base)
RK_GEMM_LOOP_DECLARE(avx2)
RK_GEMM_LOOP_DECLARE(avx512)

}  // namespace rk
