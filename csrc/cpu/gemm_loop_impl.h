// Included once by each gemm_loop_<isa>.cpp with RK_GEMM_ISA set; the vector width follows the
// -m flags that file is compiled with. Shape legend and tiling: gemm_loop.h.
#include <cstring>
#include <vector>

#include "gemm_loop.h"

#if defined(__AVX512F__)
#define RK_VB 64
#define RK_NV 4  // 6 rows x 4 zmm accumulators + 4 B vectors + 1 broadcast: 29 of 32 registers
#define RK_MR 6
#elif defined(__AVX2__)
#define RK_VB 32
#define RK_NV 2  // 4 x 2 ymm + 2: 11 of 16
#else
#define RK_VB 16
#define RK_NV 2
#endif
#ifndef RK_MR
#define RK_MR 4
#endif

#define RK_CAT2(a, b) a##b
#define RK_CAT(a, b) RK_CAT2(a, b)

namespace rk {
namespace RK_CAT(loop_, RK_GEMM_ISA) {

// GCC vector types (loaded and stored via memcpy, so any alignment); the attribute cannot sit on
// a template parameter, hence one typedef per element type
typedef float vec_f __attribute__((vector_size(RK_VB)));
typedef double vec_d __attribute__((vector_size(RK_VB)));
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = vec_f; };
template <> struct VecOf<double> { using type = vec_d; };
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
inline Vec<T> vload(const T* p) { Vec<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T>
inline void vstore(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof v); }

// C tile (+)= op(A) B; `zero`: start from 0 instead of C (beta = 0 needs no pass over C first)
template <typename T, int R, int NV>
inline __attribute__((always_inline)) void tile(bool trans_a, bool zero, int64_t K, const T* A,
                                                int64_t lda, const T* B, int64_t ldb, T* C,
                                                int64_t ldc) {
    constexpr int W = int(sizeof(Vec<T>) / sizeof(T));
    Vec<T> acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = zero ? Vec<T>{} : vload(C + r * ldc + v * W);
    for (int64_t k = 0; k < K; ++k) {
        Vec<T> b[NV];
        for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
        for (int r = 0; r < R; ++r) {
            const T a = trans_a ? A[k * lda + r] : A[r * lda + k];
            for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
}

// every row of C for one column panel of NV vectors
template <typename T, int NV>
void panel(bool trans_a, bool zero, int64_t M, int64_t K, const T* A, int64_t lda, const T* B,
           int64_t ldb, T* C, int64_t ldc) {
    auto a_row = [&](int64_t m) { return trans_a ? A + m : A + m * lda; };
    int64_t m = 0;
    for (; m + RK_MR <= M; m += RK_MR)
        tile<T, RK_MR, NV>(trans_a, zero, K, a_row(m), lda, B, ldb, C + m * ldc, ldc);
    T* c = C + m * ldc;
    switch (M - m) {  // the last M % RK_MR rows
#if RK_MR > 5
        case 5: tile<T, 5, NV>(trans_a, zero, K, a_row(m), lda, B, ldb, c, ldc); break;
        case 4: tile<T, 4, NV>(trans_a, zero, K, a_row(m), lda, B, ldb, c, ldc); break;
#endif
        case 3: tile<T, 3, NV>(trans_a, zero, K, a_row(m), lda, B, ldb, c, ldc); break;
        case 2: tile<T, 2, NV>(trans_a, zero, K, a_row(m), lda, B, ldb, c, ldc); break;
        case 1: tile<T, 1, NV>(trans_a, zero, K, a_row(m), lda, B, ldb, c, ldc); break;
        default: break;
    }
}

// one K chunk: every column panel, then the N % W tail; `zero`: C starts from 0, not read
template <typename T>
void block(bool trans_a, bool zero, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
           const T* B, int64_t ldb, T* C, int64_t ldc) {
    constexpr int64_t W = int64_t(sizeof(Vec<T>) / sizeof(T));
    int64_t n = 0;
    for (; n + RK_NV * W <= N; n += RK_NV * W)
        panel<T, RK_NV>(trans_a, zero, M, K, A, lda, B + n, ldb, C + n, ldc);
    switch ((N - n) / W) {  // whole vectors left: one panel of that width (1-wide is slowest)
        case 3: panel<T, 3>(trans_a, zero, M, K, A, lda, B + n, ldb, C + n, ldc); n += 3 * W; break;
        case 2: panel<T, 2>(trans_a, zero, M, K, A, lda, B + n, ldb, C + n, ldc); n += 2 * W; break;
        case 1: panel<T, 1>(trans_a, zero, M, K, A, lda, B + n, ldb, C + n, ldc); n += W; break;
        default: break;
    }
    if (n < N) {
        // the last N % W columns: copy them into zero-padded one-vector panels of B and C, run
        // the same vector tiles there, copy the valid columns back (a scalar tail was the
        // bottleneck at H = 25); the panels live in per-thread buffers reused across calls
        const int64_t tail = N - n;
        thread_local std::vector<T> bp, cp;
        if (int64_t(bp.size()) < K * W) bp.resize(K * W);
        if (int64_t(cp.size()) < M * W) cp.resize(M * W);
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < W; ++j) bp[k * W + j] = j < tail ? B[k * ldb + n + j] : T(0);
        if (!zero)
            for (int64_t m = 0; m < M; ++m)
                for (int64_t j = 0; j < tail; ++j) cp[m * W + j] = C[m * ldc + n + j];
        panel<T, 1>(trans_a, zero, M, K, A, lda, bp.data(), W, cp.data(), W);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t j = 0; j < tail; ++j) C[m * ldc + n + j] = cp[m * W + j];
    }
}

template <typename T>
void run(bool trans_a, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
         const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
    const bool product = K > 0 && alpha != T(0);
    if (beta != T(1) && !(beta == T(0) && product)) {  // C = beta C here; the tiles add to it
        for (int64_t m = 0; m < M; ++m) {
            T* c = C + m * ldc;
            for (int64_t n = 0; n < N; ++n) c[n] = beta == T(0) ? T(0) : beta * c[n];
        }
    }
    if (!product) return;
    const bool zero = beta == T(0);  // the first K chunk's tiles start from 0 instead
    std::vector<T> scaled;
    if (alpha != T(1)) {  // the kernels only use alpha = 1; kept correct rather than fast
        const int64_t rows = trans_a ? K : M, cols = trans_a ? M : K;
        scaled.resize(rows * cols);
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) scaled[r * cols + c] = alpha * A[r * lda + c];
        A = scaled.data();
        lda = cols;
    }
    // K in chunks so the B panel a tile streams (KC x NV vectors, 32 KiB for float at AVX-512)
    // stays in L1 across the row blocks; without it the weight-gradient GEMMs (K = B*T) ran
    // from L2 at a third of the speed
    constexpr int64_t KC = 128;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = K - k0 < KC ? K - k0 : KC;
        const T* Ak = trans_a ? A + k0 * lda : A + k0;
        block(trans_a, zero && k0 == 0, M, N, kc, Ak, lda, B + k0 * ldb, ldb, C, ldc);
    }
}

}  // namespace loop_<isa>

void RK_CAT(gemm_loop_, RK_GEMM_ISA)(bool ta, int64_t M, int64_t N, int64_t K, float al,
                                     const float* A, int64_t lda, const float* B, int64_t ldb,
                                     float be, float* C, int64_t ldc) {
    RK_CAT(loop_, RK_GEMM_ISA)::run(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc);
}
void RK_CAT(gemm_loop_, RK_GEMM_ISA)(bool ta, int64_t M, int64_t N, int64_t K, double al,
                                     const double* A, int64_t lda, const double* B, int64_t ldb,
                                     double be, double* C, int64_t ldc) {
    RK_CAT(loop_, RK_GEMM_ISA)::run(ta, M, N, K, al, A, lda, B, ldb, be, C, ldc);
}

}  // namespace rk
