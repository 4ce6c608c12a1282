// The fused LSTM-stack training step (lstm_stack.h).
#include "lstm_stack.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <stdexcept>

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
    // The forward's cut of the batch: thread k runs rows [cut[k], cut[k+1]). The even cut (one
    // split) until the threads' measured speeds differ, then moved with them (move_cut); back
    // to the even cut whenever B or the thread count changes.
    std::vector<int64_t> cut, held;  // held: hold_cut's, used as given while it fits
    std::vector<double> speed, secs;
    bool timed_even = true;  // speed: measured on the even cut (one split), else forward only
    std::atomic<int64_t> next_task{0};  // the finish's tasks, taken in turn by the threads
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

// The forward of rows [lo, hi): every layer, the head and loss, and the gradient at the top
// layer's output. No sum over rows is formed here (head.h), so the rows may be cut anywhere
// without changing any result's bits.
template <typename T, typename State>
void forward_part(const State& st, int64_t lo, int64_t hi) {
    const StackArgs<T>& a = *st.a;
    const size_t L = a.layers.size();
    for (size_t l = 0; l < L; ++l) {
        const StackLayer<T>& y = a.layers[l];
        st.layers[l]->forward_rows(lo, hi);
        if (y.mask) product_rows(y.f.out, y.mask, y.dropped, lo, hi, a.T_ * y.f.H);
    }
    const StackLayer<T>& top = a.layers[L - 1];
    if (a.head_mask)
        product_rows(top.f.out, a.head_mask, a.head_dropped, lo, hi, a.T_ * top.f.H);
    st.head.rows(lo * a.T_, hi * a.T_);
    if (a.head_mask) multiply_rows(a.head.dh, a.head_mask, lo, hi, a.T_ * top.f.H);  // d top.out
}

// Chunk [lo, hi) of the even cut: the head's dW, db partials over its rows, then every layer's
// backward (their weight-gradient partials are per chunk too and added in chunk order: lstm.h).
template <typename T, typename State>
void backward_part(const State& st, int64_t lo, int64_t hi) {
    const StackArgs<T>& a = *st.a;
    st.head.grads(chunk_index(st.a->B, st.n, lo), lo * a.T_, hi * a.T_);
    for (size_t l = a.layers.size(); l-- > 0;) {
        st.layers[l]->backward_rows(lo, hi);
        if (l == 0 || !a.layers[l - 1].mask) continue;
        const StackLayer<T>& below = a.layers[l - 1];  // d its output = d its dropped copy * mask
        multiply_rows(a.layers[l].b.dx, below.mask, lo, hi, a.T_ * below.f.H);
    }
}

// Seconds since `start`.
inline double since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The next step's cut from this one's timings (secs[k]: thread k's seconds over its rows of the
// cut, forward only when the step ran in two splits, forward and backward in one): thread k's
// share of the rows follows its speed (smoothed over the steps of one kind, a step moving it at
// most 2x), each share within [1/2, 2] of the even one. The cut leaves the even one when the
// speeds differ by more than 8%, and returns to it when it comes within 2 rows of it; so a
// balanced machine keeps the single split (one join less).
//
// On this 2-vCPU host one thread often ran 10-40% slower than the other for seconds at a time
// (the other tenants), and the even cut left the faster one waiting 100-360 us of a ~1 ms
// lab 12-4 step. Measured, lab 12-4 through rk.TrainStep in one process, blocks of 25 steps
// alternating with the even cut held: mean 1308 vs 1328, 1154 vs 1172, 1188 vs 1193 us a step
// (1-2%; the host was not in its lopsided mode then); the kernel alone against the single split
// before this, 16 pairs of processes: 1052 vs 1039 us mean, within the noise. (Keeping dG whole
// so the backward could take the cut too was slower: its weight gradients, formed after the
// join from 0.87 MB of dG a layer, cost more than the wait.)
template <typename State>
void move_cut(State& st, int64_t B, bool was_even) {
    const int n = st.n;
    double total = 0.0, lo_speed = 0.0, hi_speed = 0.0;
    for (int k = 0; k < n; ++k) {
        const int64_t rows = st.cut[k + 1] - st.cut[k];
        if (rows > 0 && st.secs[k] > 0.0) {
            const double v = double(rows) / st.secs[k], old = st.speed[k];
            st.speed[k] = old > 0.0 && was_even == st.timed_even
                              ? 0.5 * old + 0.5 * std::min(2.0 * old, std::max(0.5 * old, v))
                              : v;
        }
        if (!(st.speed[k] > 0.0)) return;  // not measured: keep the cut
        total += st.speed[k];
        lo_speed = k ? std::min(lo_speed, st.speed[k]) : st.speed[k];
        hi_speed = std::max(hi_speed, st.speed[k]);
    }
    st.timed_even = was_even;
    if (was_even && hi_speed <= 1.08 * lo_speed) return;
    const int64_t even = B / n, lo = std::max<int64_t>(1, even / 2), hi = 2 * even;
    double sum = 0.0;
    bool near_even = true;
    for (int k = 1; k < n; ++k) {
        sum += st.speed[k - 1];
        int64_t c = std::llround(double(B) * sum / total);
        c = std::max(c, st.cut[k - 1] + lo);
        c = std::min(c, st.cut[k - 1] + hi);
        st.cut[k] = std::min(c, B - int64_t(n - k) * lo);
        near_even = near_even && std::llabs(st.cut[k] - B * k / n) <= 2;
    }
    if (near_even)
        for (int k = 0; k <= n; ++k) st.cut[k] = B * k / n;
}

// The weight packing before the splits and the gradient sums after them, as independent tasks
// over the same threads: packing = per layer its forward and backward (task l) and the head
// (task L); sums = finish_tasks. Serial, each was ~20 us of a ~1 ms lab 12-4 step while the
// other thread waited.
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

// The gradient sums, as tasks taken in turn by every thread until none is left (each writes
// its own outputs, so who runs which changes nothing): each layer's, from the top down, then
// the head's (which gives the loss). Their costs differ, and a static cut of them had left one
// thread waiting up to ~30 us a lab 12-4 step.
template <typename T, typename State>
void finish_tasks(State& st) {
    const int64_t L = int64_t(st.layers.size());
    for (int64_t i; (i = st.next_task.fetch_add(1)) <= L;) {
        if (i == L) st.loss = st.head.finish();
        else st.layers[L - 1 - i]->backward_finish();
    }
}

}  // namespace

template <typename T>
double LstmStack<T>::step(const StackArgs<T>& a) {
    State& st = *s;
    int64_t work = 0;
    for (const StackLayer<T>& y : a.layers) work += 4 * (a.B * a.T_ * 4 * y.f.H * y.f.H);
    const int n = a.B > 0 && a.T_ > 0 ? chunks_for(a.B, work) : 1;
    if (n != st.n || int64_t(st.cut.size()) != n + 1 || st.cut[n] != a.B) {  // the even cut
        st.n = n;
        st.cut.resize(n + 1);
        for (int k = 0; k <= n; ++k) st.cut[k] = a.B * k / n;
        st.speed.assign(n, 0.0);
        st.secs.assign(n, 0.0);
    }
    const bool held = int64_t(st.held.size()) == n + 1 && st.held[n] == a.B;
    if (held) st.cut = st.held;
    st.a = &a;
    const int64_t L = int64_t(a.layers.size());
    run_chunks(L + 1, int(std::min<int64_t>(n, L + 1)), [](void* p, int64_t lo, int64_t hi) {
        prepare_tasks<T>(*static_cast<State*>(p), lo, hi);
    }, &st);
    bool even = true;
    for (int k = 0; k <= n; ++k) even = even && st.cut[k] == a.B * k / n;
    if (even) {  // one split: each thread its chunk's forward, head and backward
        run_chunks(a.B, n, [](void* p, int64_t lo, int64_t hi) {
            State& st = *static_cast<State*>(p);
            const auto start = std::chrono::steady_clock::now();
            forward_part<T>(st, lo, hi);
            backward_part<T>(st, lo, hi);
            st.secs[chunk_index(st.a->B, st.n, lo)] = since(start);
        }, &st);
    } else {  // two: the forward on the cut, then the backward on the even cut's chunks
        run_chunks(n, n, [](void* p, int64_t k, int64_t) {
            State& st = *static_cast<State*>(p);
            const auto start = std::chrono::steady_clock::now();
            forward_part<T>(st, st.cut[k], st.cut[k + 1]);
            st.secs[k] = since(start);
        }, &st);
        run_chunks(a.B, n, [](void* p, int64_t lo, int64_t hi) {
            backward_part<T>(*static_cast<State*>(p), lo, hi);
        }, &st);
    }
    if (n > 1 && !held) move_cut(st, a.B, even);
    st.next_task = 0;
    const int finishers = int(std::min<int64_t>(n, L + 1));
    run_chunks(finishers, finishers, [](void* p, int64_t, int64_t) {
        finish_tasks<T>(*static_cast<State*>(p));
    }, &st);
    if (a.adam && a.adam->n > 0)  // on the same threads, the gradients still in their caches
        run_chunks(a.adam->n, int(std::min<int64_t>(n, a.adam->n)),
                   [](void* p, int64_t lo, int64_t hi) {
                       adam_range(*static_cast<const AdamArgs<T>*>(p), lo, hi);
                   }, const_cast<AdamArgs<T>*>(a.adam));
    return st.loss;
}

template <typename T>
std::vector<int64_t> LstmStack<T>::cut() const { return s->cut; }

template <typename T>
void LstmStack<T>::hold_cut(std::vector<int64_t> cut) {
    bool rises = cut.empty() || cut[0] == 0;
    for (size_t k = 1; k < cut.size(); ++k) rises = rises && cut[k] >= cut[k - 1];
    if (!rises) throw std::invalid_argument("cut must rise from 0 to B");
    s->held = std::move(cut);
}

template class LstmStack<float>;
template class LstmStack<double>;

}  // namespace rk
