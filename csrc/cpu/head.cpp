// Dense head + softmax cross-entropy, forward and backward (head.h for the math and shapes).
//
// Per chunk of rows: one GEMM for the logits, the softmax as flat passes over the chunk (row
// maxima and sums are short scalar loops; the exponentials, one pass over all n*C values,
// vectorise), then the two gradient GEMMs. The Numba version of this spent ~300 us at lab 12-4's
// size (N, F, C) = (1700, 25, 25), about half of it in three OpenBLAS calls at these skinny shapes.
#include "head.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "chunks.h"
#include "dispatch.h"
#include "gemm.h"
#include "rnnkern/cells.h"

namespace rk {
namespace {

// N*C*F from which the rows are split over threads
int64_t g_split_min = int64_t(1) << 20;

template <typename T>
struct Head {
    const HeadArgs<T>* a;
    const T* wt;          // [F,C] = W^T, the logits GEMM's B operand
    int n;                // chunks
    T* part_dw;           // [n-1, C, F]: chunks 1.. (chunk 0 writes a->dw)
    T* part_db;           // [n-1, C]
    double* loss;         // [n]
    GemmPath path;
};

// The softmax cross-entropy of rows [lo, hi) in place on their logits: they end as d logits.
// Returns those rows' share of the loss, before inv_total.
template <typename T>
RK_ALWAYS_INLINE double softmax_xent_impl(const HeadArgs<T>& a, int64_t lo, int64_t hi) {
    const int64_t C = a.C, n = hi - lo;
    T* __restrict__ z = a.d_logits + lo * C;
    double loss = 0.0;
    for (int64_t r = 0; r < n; ++r) {  // bias; shift by the row max so every exp argument <= 0
        T* __restrict__ row = z + r * C;
        if (a.bias)
            for (int64_t j = 0; j < C; ++j) row[j] += a.bias[j];
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
        for (int64_t j = 0; j < C; ++j) row[j] -= m;
        const double wn = a.w ? double(a.w[lo + r]) : 1.0;
        loss -= wn * double(row[a.targets[lo + r]]);
    }
    for (int64_t k = 0; k < n * C; ++k) z[k] = act_exp(z[k]);
    for (int64_t r = 0; r < n; ++r) {
        T* __restrict__ row = z + r * C;
        T s = T(0);
        for (int64_t j = 0; j < C; ++j) s += row[j];
        const double wn = a.w ? double(a.w[lo + r]) : 1.0;
        loss += wn * double(std::log(s));  // logf for float: the double log was 1/9 of the time
        const T share = T(wn * a.inv_total);  // this row's weight in the mean
        const T scale = share / s;
        for (int64_t j = 0; j < C; ++j) row[j] *= scale;
        row[a.targets[lo + r]] -= share;
    }
    return loss;
}

RK_CLONES double softmax_xent(const HeadArgs<float>& a, int64_t lo, int64_t hi) {
    return softmax_xent_impl(a, lo, hi);
}
RK_CLONES double softmax_xent(const HeadArgs<double>& a, int64_t lo, int64_t hi) {
    return softmax_xent_impl(a, lo, hi);
}

// Rows [lo, hi) of chunk k: logits, softmax cross-entropy, this chunk's dw and db, dh.
template <typename T>
void head_rows(const Head<T>& w, int k, int64_t lo, int64_t hi) {
    const HeadArgs<T>& a = *w.a;
    const int64_t C = a.C, F = a.F, n = hi - lo;
    T* dl = a.d_logits + lo * C;
    const T* h = a.h + lo * F;
    gemm<T>(false, n, C, F, T(1), h, F, w.wt, C, T(0), dl, C, w.path);
    w.loss[k] = softmax_xent(a, lo, hi);
    T* dw = k == 0 ? a.dw : w.part_dw + (k - 1) * C * F;
    gemm<T>(true, C, F, n, T(1), dl, C, h, F, T(0), dw, F, w.path);
    if (a.bias) {
        T* db = k == 0 ? a.db : w.part_db + (k - 1) * C;
        std::fill(db, db + C, T(0));
        for (int64_t r = 0; r < n; ++r)
            for (int64_t j = 0; j < C; ++j) db[j] += dl[r * C + j];
    }
    gemm<T>(false, n, F, C, T(1), dl, C, a.weight, F, T(0), a.dh + lo * F, F, w.path);
}

template <typename T>
T* grow(std::vector<T>& buf, size_t n) {
    if (buf.size() < std::max<size_t>(n, 1)) buf.resize(std::max<size_t>(n, 1));
    return buf.data();
}

}  // namespace

void set_head_split_min(int64_t v) { g_split_min = v; }
int64_t head_split_min() { return g_split_min; }

template <typename T>
struct HeadStep<T>::State {
    std::vector<T> wt, dw, db;
    std::vector<double> loss;
    Head<T> w;
};

template <typename T> HeadStep<T>::HeadStep() : s(new State) {}
template <typename T> HeadStep<T>::~HeadStep() = default;

template <typename T>
void HeadStep<T>::prepare(const HeadArgs<T>& a, int n) {
    const int64_t F = a.F, C = a.C;
    T* wt = grow(s->wt, C * F);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t f = 0; f < F; ++f) wt[f * C + c] = a.weight[c * F + f];
    s->loss.assign(n, 0.0);
    s->w = Head<T>{&a, wt, n, grow(s->dw, (n - 1) * C * F), grow(s->db, (n - 1) * C),
                   s->loss.data(), n > 1 ? GemmPath::loop : GemmPath::automatic};
}

template <typename T>
void HeadStep<T>::rows(int k, int64_t lo, int64_t hi) const {
    if (hi > lo) head_rows(s->w, k, lo, hi);
}

template <typename T>
double HeadStep<T>::finish() const {
    const Head<T>& w = s->w;
    const HeadArgs<T>& a = *w.a;
    const int64_t F = a.F, C = a.C;
    if (a.N <= 0) {  // no rows: zero loss and gradients
        std::fill(a.dw, a.dw + C * F, T(0));
        if (a.bias) std::fill(a.db, a.db + C, T(0));
        return 0.0;
    }
    for (int k = 1; k < w.n; ++k) {
        const T* dw = w.part_dw + (k - 1) * C * F;
        for (int64_t e = 0; e < C * F; ++e) a.dw[e] += dw[e];
        if (a.bias)
            for (int64_t j = 0; j < C; ++j) a.db[j] += w.part_db[(k - 1) * C + j];
    }
    double total = 0.0;
    for (double l : s->loss) total += l;
    return total * a.inv_total;
}

template class HeadStep<float>;
template class HeadStep<double>;

template <typename T>
double dense_softmax_xent(const HeadArgs<T>& a) {
    thread_local HeadStep<T> step;
    const int64_t N = a.N;
    const int n = N > 0 && N * a.C * a.F >= g_split_min ? int(std::min<int64_t>(threads(), N)) : 1;
    step.prepare(a, n);
    struct Split { const HeadStep<T>* step; int64_t N; int n; } split{&step, N, n};
    if (N > 0)
        run_chunks(N, n, [](void* p, int64_t lo, int64_t hi) {
            const Split& sp = *static_cast<const Split*>(p);
            int k = 0;  // this range's index (run_chunks: lo = N*k/n)
            while (sp.N * k / sp.n != lo) ++k;
            sp.step->rows(k, lo, hi);
        }, &split);
    return step.finish();
}

template double dense_softmax_xent<float>(const HeadArgs<float>&);
template double dense_softmax_xent<double>(const HeadArgs<double>&);

}  // namespace rk
