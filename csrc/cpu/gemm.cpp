#include "gemm.h"

#include <climits>

namespace rk {

namespace {
sgemm_fn g_sgemm = nullptr;
dgemm_fn g_dgemm = nullptr;
int64_t g_min_flops = 4096;

inline void blas_call(char ta, char tb, int m, int n, int k, float al, const float* a, int lda,
                      const float* b, int ldb, float be, float* c, int ldc) {
    g_sgemm(&ta, &tb, &m, &n, &k, &al, const_cast<float*>(a), &lda, const_cast<float*>(b), &ldb,
            &be, c, &ldc);
}
inline void blas_call(char ta, char tb, int m, int n, int k, double al, const double* a, int lda,
                      const double* b, int ldb, double be, double* c, int ldc) {
    g_dgemm(&ta, &tb, &m, &n, &k, &al, const_cast<double*>(a), &lda, const_cast<double*>(b), &ldb,
            &be, c, &ldc);
}
template <typename T> bool blas_ready();
template <> bool blas_ready<float>() { return g_sgemm != nullptr; }
template <> bool blas_ready<double>() { return g_dgemm != nullptr; }

// The loop: four rows of C at a time, so each row of B loaded from cache feeds four
// multiply-adds; the innermost loop runs along N and vectorises.
template <typename T>
void gemm_loop(bool trans_a, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* __restrict__ B, int64_t ldb, T beta, T* __restrict__ C, int64_t ldc) {
    for (int64_t m = 0; m < M; ++m) {
        T* c = C + m * ldc;
        if (beta == T(0)) {
            for (int64_t n = 0; n < N; ++n) c[n] = T(0);
        } else if (beta != T(1)) {
            for (int64_t n = 0; n < N; ++n) c[n] *= beta;
        }
    }
    auto a_at = [&](int64_t m, int64_t k) { return trans_a ? A[k * lda + m] : A[m * lda + k]; };
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
        T* __restrict__ c0 = C + m * ldc;
        T* __restrict__ c1 = c0 + ldc;
        T* __restrict__ c2 = c1 + ldc;
        T* __restrict__ c3 = c2 + ldc;
        for (int64_t k = 0; k < K; ++k) {
            const T a0 = alpha * a_at(m, k), a1 = alpha * a_at(m + 1, k);
            const T a2 = alpha * a_at(m + 2, k), a3 = alpha * a_at(m + 3, k);
            const T* __restrict__ b = B + k * ldb;
            for (int64_t n = 0; n < N; ++n) {
                const T bn = b[n];
                c0[n] += a0 * bn;
                c1[n] += a1 * bn;
                c2[n] += a2 * bn;
                c3[n] += a3 * bn;
            }
        }
    }
    for (; m < M; ++m) {
        T* __restrict__ c = C + m * ldc;
        for (int64_t k = 0; k < K; ++k) {
            const T a = alpha * a_at(m, k);
            const T* __restrict__ b = B + k * ldb;
            for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
        }
    }
}
}  // namespace

void set_blas(sgemm_fn s, dgemm_fn d) {
    g_sgemm = s;
    g_dgemm = d;
}
bool have_blas() { return g_sgemm != nullptr && g_dgemm != nullptr; }
void set_blas_min_flops(int64_t v) { g_min_flops = v; }
int64_t blas_min_flops() { return g_min_flops; }

template <typename T>
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // C = beta C
        gemm_loop<T>(false, M, N, 0, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    const bool fits = M < INT_MAX && N < INT_MAX && K < INT_MAX && lda < INT_MAX &&
                      ldb < INT_MAX && ldc < INT_MAX;
    if (blas_ready<T>() && fits && M * N * K >= g_min_flops) {
        // row-major C = op(A) B  <=>  column-major C^T = B^T op(A)^T: swap the operands;
        // a row-major [r,c] matrix with stride ld is a column-major [c,r] one with the same ld
        blas_call('N', trans_a ? 'T' : 'N', int(N), int(M), int(K), alpha, B, int(ldb), A,
                  int(lda), beta, C, int(ldc));
        return;
    }
    gemm_loop<T>(trans_a, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template void gemm<float>(bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

}  // namespace rk
