// The fused LSTM-stack training step (lstm_stack.h).
#include "lstm_stack.h"

#include <algorithm>

#include "chunks.h"
#include "lstm.h"

namespace rk {

template <typename T>
struct LstmStack<T>::State {
    std::vector<std::unique_ptr<LstmLayer<T>>> layers;
    HeadStep<T> head;
    const StackArgs<T>* a = nullptr;
    int n = 1;
    double loss = 0.0;
};

template <typename T>
LstmStack<T>::LstmStack(size_t layers) : s(new State) {
    for (size_t l = 0; l < layers; ++l) s->layers.emplace_back(new LstmLayer<T>);
}
template <typename T> LstmStack<T>::~LstmStack() = default;

namespace {

// rows [lo, hi) of a batch-major [B, T, W] array: elements lo*T*W .. hi*T*W
template <typename T>
void multiply_rows(T* __restrict__ x, const T* __restrict__ mask, int64_t lo, int64_t hi,
                   int64_t TW) {
    for (int64_t e = lo * TW; e < hi * TW; ++e) x[e] *= mask[e];
}
template <typename T>
void product_rows(const T* __restrict__ x, const T* __restrict__ mask, T* __restrict__ out,
                  int64_t lo, int64_t hi, int64_t TW) {
    for (int64_t e = lo * TW; e < hi * TW; ++e) out[e] = x[e] * mask[e];
}

// Everything one chunk of batch rows does in a step, in the order the math needs it.
template <typename T, typename State>
void chunk_step(const State& st, int64_t lo, int64_t hi) {
    const StackArgs<T>& a = *st.a;
    const size_t L = a.layers.size();
    int k = 0;  // this range's index among the chunks (run_chunks: lo = B*k/n)
    while (a.B * k / st.n != lo) ++k;
    for (size_t l = 0; l < L; ++l) {
        const StackLayer<T>& y = a.layers[l];
        st.layers[l]->forward_rows(lo, hi);
        if (y.mask) product_rows(y.f.out, y.mask, y.dropped, lo, hi, a.T_ * y.f.H);
    }
    const StackLayer<T>& top = a.layers[L - 1];
    if (a.head_mask)
        product_rows(top.f.out, a.head_mask, a.head_dropped, lo, hi, a.T_ * top.f.H);
    st.head.rows(k, lo * a.T_, hi * a.T_);
    if (a.head_mask) multiply_rows(a.head.dh, a.head_mask, lo, hi, a.T_ * top.f.H);  // d top.out
    for (size_t l = L; l-- > 0;) {
        st.layers[l]->backward_rows(lo, hi);
        if (l == 0 || !a.layers[l - 1].mask) continue;
        const StackLayer<T>& below = a.layers[l - 1];  // d its output = d its dropped copy * mask
        multiply_rows(a.layers[l].b.dx, below.mask, lo, hi, a.T_ * below.f.H);
    }
}

// The weight packing before the split and the gradient sums after it, as independent tasks
// over the same threads: packing = per layer its forward and backward (task l) and the head
// (task L); sums = per layer its partials (task l) and the head's (task L, which gives the
// loss). Serial, each was ~20 us of a ~1 ms lab 12-4 step while the other thread waited.
template <typename T, typename State>
void prepare_tasks(State& st, int64_t lo, int64_t hi) {
    const StackArgs<T>& a = *st.a;
    const size_t L = a.layers.size();
    for (int64_t i = lo; i < hi; ++i) {
        if (size_t(i) == L) {
            st.head.prepare(a.head, st.n);
            continue;
        }
        st.layers[i]->forward_prepare(a.layers[i].f, st.n);
        st.layers[i]->backward_prepare(a.layers[i].b, st.n);
    }
}

template <typename T, typename State>
void finish_tasks(State& st, int64_t lo, int64_t hi) {
    const size_t L = st.a->layers.size();
    for (int64_t i = lo; i < hi; ++i) {
        if (size_t(i) == L) st.loss = st.head.finish();
        else st.layers[i]->backward_finish();
    }
}

}  // namespace

template <typename T>
double LstmStack<T>::step(const StackArgs<T>& a) {
    State& st = *s;
    int64_t work = 0;
    for (const StackLayer<T>& y : a.layers) work += 4 * (a.B * a.T_ * 4 * y.f.H * y.f.H);
    st.n = a.B > 0 && a.T_ > 0 ? chunks_for(a.B, work) : 1;
    st.a = &a;
    const int64_t tasks = int64_t(a.layers.size()) + 1;
    const int split = int(std::min<int64_t>(st.n, tasks));
    run_chunks(tasks, split, [](void* p, int64_t lo, int64_t hi) {
        prepare_tasks<T>(*static_cast<State*>(p), lo, hi);
    }, &st);
    run_chunks(a.B, st.n, [](void* p, int64_t lo, int64_t hi) {
        chunk_step<T>(*static_cast<const State*>(p), lo, hi);
    }, &st);
    run_chunks(tasks, split, [](void* p, int64_t lo, int64_t hi) {
        finish_tasks<T>(*static_cast<State*>(p), lo, hi);
    }, &st);
    if (a.adam && a.adam->n > 0)  // on the same threads, the gradients still in their caches
        run_chunks(a.adam->n, int(std::min<int64_t>(st.n, a.adam->n)),
                   [](void* p, int64_t lo, int64_t hi) {
                       adam_range(*static_cast<const AdamArgs<T>*>(p), lo, hi);
                   }, const_cast<AdamArgs<T>*>(a.adam));
    return st.loss;
}

template class LstmStack<float>;
template class LstmStack<double>;

}  // namespace rk
