// Dense head + softmax cross-entropy, forward and backward (head.h for the math and shapes).
//
// Per range of rows: one GEMM for the logits, the softmax as passes over the range, the dh GEMM
// and each row's loss; none of it sums over rows, so the ranges may be cut anywhere (the fused
// stack step moves its cut with the threads' measured speeds, stack.cpp). Per chunk of a
// fixed cut: the dW^T and db partials, added in chunk order after the join, where the loss is
// summed over rows in order: so every result is the same to the bit whatever the ranges.
// The logits live in rows padded to Cp = C rounded up to whole 64-byte vectors (zero columns in
// W^T), so at C = 25 the logits and dW GEMMs run on 2-vector panels instead of a 1-vector panel
// plus a copied tail, and the per-row passes are whole vectors. dW is formed transposed
// (dW^T = h^T dlogits: N = Cp, not F), then transposed back. The Numba version of this spent
// ~300 us at lab 12-4's size (N, F, C) = (1700, 25, 25), about half of it in three OpenBLAS
// calls at these skinny shapes.
#include "head.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "buffer.h"
#include "chunks.h"
#include "dispatch.h"
#include "gemm.h"
#include "rnnkern/cells.h"

namespace rk {
namespace {

template <typename T>
constexpr int64_t lanes() { return int64_t(64 / sizeof(T)); }

template <typename T>
struct Head {
    const HeadArgs<T>* a;
    int64_t Cp;           // C rounded up to whole vectors
    const T* wt;          // [F,Cp] = W^T, zero columns past C: the logits GEMM's B operand
    const T* bias;        // [Cp] the bias (or 0), zero past C
    int n;                // chunks of the fixed cut
    T* z;                 // [N,Cp] logits, then d logits (zero past C)
    T* part_dwt;          // [n,F,Cp] each chunk's dW^T
    T* part_db;           // [n,Cp] each chunk's db
    double* loss;         // [N] each row's loss, before inv_total
    GemmPath path;
};

// The softmax cross-entropy of rows [lo, hi) in place on their padded logits: they end as
// d logits, zero past C; each row's loss, before inv_total, goes to w.loss.
template <typename T>
RK_ALWAYS_INLINE void softmax_xent_impl(const Head<T>& w, int64_t lo, int64_t hi) {
    const HeadArgs<T>& a = *w.a;
    const int64_t C = a.C, Cp = w.Cp, n = hi - lo;
    T* __restrict__ z = w.z + lo * Cp;
    const T* __restrict__ bias = w.bias;
    double* __restrict__ loss = w.loss + lo;
    for (int64_t r = 0; r < n; ++r) {  // bias; shift by the row max so every exp argument <= 0
        T* __restrict__ row = z + r * Cp;
        for (int64_t j = 0; j < Cp; ++j) row[j] += bias[j];
        T m = row[0];  // four running maxima: one chain of C dependent compares was the cost
        T m1 = m, m2 = m, m3 = m;
        int64_t j = 1;
        for (; j + 3 < C; j += 4) {
            m = row[j] > m ? row[j] : m;
            m1 = row[j + 1] > m1 ? row[j + 1] : m1;
            m2 = row[j + 2] > m2 ? row[j + 2] : m2;
            m3 = row[j + 3] > m3 ? row[j + 3] : m3;
        }
        for (; j < C; ++j) m = row[j] > m ? row[j] : m;
        m = std::max(std::max(m, m1), std::max(m2, m3));
        for (int64_t j = 0; j < Cp; ++j) row[j] -= m;
        const double wn = a.w ? double(a.w[lo + r]) : 1.0;
        loss[r] = -wn * double(row[a.targets[lo + r]]);
    }
    for (int64_t k = 0; k < n * Cp; ++k) z[k] = act_exp(z[k]);
    for (int64_t r = 0; r < n; ++r) {
        T* __restrict__ row = z + r * Cp;
        for (int64_t j = C; j < Cp; ++j) row[j] = T(0);  // the padding's exp, whatever it was
        T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);  // four chains, as for the max
        int64_t j = 0;
        for (; j + 3 < C; j += 4) {
            s0 += row[j];
            s1 += row[j + 1];
            s2 += row[j + 2];
            s3 += row[j + 3];
        }
        for (; j < C; ++j) s0 += row[j];
        const T s = (s0 + s1) + (s2 + s3);
        const double wn = a.w ? double(a.w[lo + r]) : 1.0;
        loss[r] += wn * double(std::log(s));  // logf for float: the double log was 1/9 of the time
        const T share = T(wn * a.inv_total);  // this row's weight in the mean
        const T scale = share / s;
        for (int64_t j = 0; j < Cp; ++j) row[j] *= scale;
        row[a.targets[lo + r]] -= share;
    }
}

RK_CLONES void softmax_xent(const Head<float>& w, int64_t lo, int64_t hi) {
    softmax_xent_impl(w, lo, hi);
}
RK_CLONES void softmax_xent(const Head<double>& w, int64_t lo, int64_t hi) {
    softmax_xent_impl(w, lo, hi);
}

// Rows [lo, hi): logits, softmax cross-entropy (each row's loss), dh.
template <typename T>
void head_rows(const Head<T>& w, int64_t lo, int64_t hi) {
    const HeadArgs<T>& a = *w.a;
    const int64_t C = a.C, F = a.F, Cp = w.Cp, n = hi - lo;
    if (n <= 0) return;
    T* dl = w.z + lo * Cp;
    gemm<T>(false, n, Cp, F, T(1), a.h + lo * F, F, w.wt, Cp, T(0), dl, Cp, w.path);
    softmax_xent(w, lo, hi);
    gemm<T>(false, n, F, C, T(1), dl, Cp, a.weight, F, T(0), a.dh + lo * F, F, w.path);
}

}  // namespace

template <typename T>
struct HeadStep<T>::State {
    Buffer<T> wt, bias, z, dwt, db;
    Buffer<double> loss;
    Head<T> w;
};

template <typename T> HeadStep<T>::HeadStep() : s(new State) {}
template <typename T> HeadStep<T>::~HeadStep() = default;

template <typename T>
void HeadStep<T>::prepare(const HeadArgs<T>& a, int n) {
    const int64_t F = a.F, C = a.C, Cp = (C + lanes<T>() - 1) / lanes<T>() * lanes<T>();
    T* wt = grow(s->wt, F * Cp);
    for (int64_t f = 0; f < F; ++f)
        for (int64_t c = 0; c < Cp; ++c) wt[f * Cp + c] = c < C ? a.weight[c * F + f] : T(0);
    T* bias = grow(s->bias, Cp);
    for (int64_t c = 0; c < Cp; ++c) bias[c] = a.bias && c < C ? a.bias[c] : T(0);
    s->w = Head<T>{&a, Cp, wt, bias, n, grow(s->z, a.N * Cp), grow(s->dwt, n * F * Cp),
                   grow(s->db, n * Cp), grow(s->loss, a.N),
                   n > 1 ? GemmPath::loop : GemmPath::automatic};
}

template <typename T>
void HeadStep<T>::rows(int64_t lo, int64_t hi) const {
    head_rows(s->w, lo, hi);
}

template <typename T>
void HeadStep<T>::grads(int k, int64_t lo, int64_t hi) const {
    const Head<T>& w = s->w;
    const HeadArgs<T>& a = *w.a;
    const int64_t F = a.F, Cp = w.Cp;
    T* dwt = w.part_dwt + k * F * Cp;
    T* db = w.part_db + k * Cp;
    std::fill(db, db + Cp, T(0));
    if (hi <= lo) {
        std::fill(dwt, dwt + F * Cp, T(0));
        return;
    }
    const T* dl = w.z + lo * Cp;
    gemm<T>(true, F, Cp, hi - lo, T(1), a.h + lo * F, F, dl, Cp, T(0), dwt, Cp, w.path);
    for (int64_t r = 0; r < hi - lo; ++r)
        for (int64_t j = 0; j < Cp; ++j) db[j] += dl[r * Cp + j];
}

template <typename T>
double HeadStep<T>::finish() const {
    const Head<T>& w = s->w;
    const HeadArgs<T>& a = *w.a;
    const int64_t F = a.F, C = a.C, Cp = w.Cp;
    // the chunks' dW^T and db summed (in chunk order), dW transposed
    for (int64_t c = 0; c < C; ++c)
        for (int64_t f = 0; f < F; ++f) {
            T sum = w.part_dwt[f * Cp + c];
            for (int k = 1; k < w.n; ++k) sum += w.part_dwt[(k * F + f) * Cp + c];
            a.dw[c * F + f] = sum;
        }
    if (a.bias)
        for (int64_t c = 0; c < C; ++c) {
            T sum = w.part_db[c];
            for (int k = 1; k < w.n; ++k) sum += w.part_db[k * Cp + c];
            a.db[c] = sum;
        }
    double total = 0.0;  // rows in order
    for (int64_t r = 0; r < a.N; ++r) total += w.loss[r];
    return total * a.inv_total;
}

template class HeadStep<float>;
template class HeadStep<double>;

}  // namespace rk
