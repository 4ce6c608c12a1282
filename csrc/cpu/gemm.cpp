#include "gemm.h"

#include <climits>

#include "gemm_loop.h"

namespace rk {

namespace {
sgemm_fn g_sgemm = nullptr;
dgemm_fn g_dgemm = nullptr;
// M*N*K: below it the loop wins (no thread hand-off; OpenBLAS per-step calls spent most of their
// time in thread sync at char-rnn size, perf); above it BLAS's two threads pay.
int64_t g_min_flops = int64_t(1) << 23;

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
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc, GemmPath path) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // C = beta C
        gemm_loop(false, M, N, 0, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    const bool fits = M < INT_MAX && N < INT_MAX && K < INT_MAX && lda < INT_MAX &&
                      ldb < INT_MAX && ldc < INT_MAX;
    const bool big = M * N * K >= g_min_flops;
    if (blas_ready<T>() && fits &&
        (path == GemmPath::blas || (path == GemmPath::automatic && big))) {
        // row-major C = op(A) B  <=>  column-major C^T = B^T op(A)^T: swap the operands;
        // a row-major [r,c] matrix with stride ld is a column-major [c,r] one with the same ld
        blas_call('N', trans_a ? 'T' : 'N', int(N), int(M), int(K), alpha, B, int(ldb), A,
                  int(lda), beta, C, int(ldc));
        return;
    }
    gemm_loop(trans_a, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template void gemm<float>(bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t, GemmPath);
template void gemm<double>(bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t, GemmPath);

}  // namespace rk
