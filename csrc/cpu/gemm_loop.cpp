// Runtime choice among the ISA builds of the GEMM loop (gemm_loop.h).
#include "gemm_loop.h"

#include <cstdlib>
#include <cstring>

namespace rk {
namespace {

enum class Isa { base, avx2, avx512 };

// RNNKERN_GEMM_ISA=base|avx2 forces a narrower build (tests cover every build on one machine)
Isa detect() {
    const char* forced = std::getenv("RNNKERN_GEMM_ISA");
    if (forced && std::strcmp(forced, "base") == 0) return Isa::base;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(RK_NO_ISA_DISPATCH)
    __builtin_cpu_init();
    if (forced && std::strcmp(forced, "avx2") == 0 && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        return Isa::avx2;
    if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
    return Isa::base;
}

const Isa g_isa = detect();

template <typename T>
void dispatch(bool ta, int64_t M, int64_t N, int64_t K, T al, const T* A, int64_t lda,
              const T* B, int64_t ldb, T be, T* C, int64_t ldc) {
    switch (g_isa) {
        case Isa::avx512: gemm_loop_avx512(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc); break;
        case Isa::avx2: gemm_loop_avx2(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc); break;
        default: gemm_loop_base(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc); break;
    }
}

}  // namespace

const char* gemm_loop_isa() {
    return g_isa == Isa::avx512 ? "avx512" : g_isa == Isa::avx2 ? "avx2" : "base";
}

void gemm_loop(bool ta, int64_t M, int64_t N, int64_t K, float al, const float* A, int64_t lda,
               const float* B, int64_t ldb, float be, float* C, int64_t ldc) {
    dispatch(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc);
}
void gemm_loop(bool ta, int64_t M, int64_t N, int64_t K, double al, const double* A, int64_t lda,
               const double* B, int64_t ldb, double be, double* C, int64_t ldc) {
    dispatch(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc);
}

}  // namespace rk
