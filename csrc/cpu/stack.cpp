// The training step of a recurrent stack in one call (stack.h).
#include "stack.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <thread>

#include "chunks.h"
#include "layer.h"

namespace rk {

template <typename T>
struct Stack<T>::State {
    std::vector<std::unique_ptr<Layer<T>>> layers;
    HeadStep<T> head;
    const StackArgs<T>* a = nullptr;
    int n = 1;
    double loss = 0.0;
    // The forward's cut of the batch: thread k forwards rows [cut[k], cut[k+1]) (move_cut);
    // the even cut until the threads have been timed, and whenever B or the thread count
    // changes. The backward always runs on the even chunks.
    std::vector<int64_t> cut, held;  // held: hold_cut's, used as given while it fits
    // Per thread, smoothed seconds a row of the forward and of the backward (0: not timed),
    // and this step's rows and seconds of each.
    std::vector<double> fwd_cost, bwd_cost, fwd_secs, bwd_secs;
    std::vector<int64_t> fwd_rows;
    // The forward's pieces: piece (k, j) = rows of cut range k in even chunk j, at k * n + j;
    // each kIdle, kTaken, kDone (its rows may be read) or kFailed (split_part).
    std::unique_ptr<std::atomic<int>[]> piece;
    std::atomic<int64_t> next_task{0};  // the finish's tasks, taken in turn by the threads
};

template <typename T>
Stack<T>::Stack(const std::vector<Cell>& cells) : s(new State) {
    for (Cell c : cells) s->layers.push_back(make_layer<T>(c));
}
template <typename T> Stack<T>::~Stack() = default;

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

// Chunk k of the even cut, rows [lo, hi): the head's dW, db partials over its rows, then every
// layer's backward (their weight-gradient partials are per chunk too and added in chunk order:
// layer.h).
template <typename T, typename State>
void backward_part(const State& st, int k) {
    const StackArgs<T>& a = *st.a;
    const int64_t lo = a.B * k / st.n, hi = a.B * (k + 1) / st.n;
    st.head.grads(k, lo * a.T_, hi * a.T_);
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

// The next step's cut from this one's timings. Per thread k, the seconds a row of its forward
// and of its backward take (smoothed over the steps, a step moving each at most 2x) give the
// forward rows f_k with which every thread ends its forward and backward together:
//     f_k fwd_cost_k + b_k bwd_cost_k = S for every k,  sum_k f_k = B
// (b_k: the rows of its even chunk), each share kept within [1/2, 2] of the even one (so a
// thread up to ~1.5x slower than the other is evened out at lab 12-4, where the forward is
// ~45% of the work), and a cut within 2 rows of the even one made even (no sliver pieces).
//
// On this 2-vCPU host one thread often ran 10-40% slower than the other for seconds at a time
// (the other tenants): in one 3000-step lab 12-4 run with the old cut, which balanced the forward
// alone, the main thread waited ~310 us of a ~1.37 ms step for the worker (per-thread timers
// inside the step).
template <typename State>
void move_cut(State& st, int64_t B) {
    const int n = st.n;
    auto smooth = [](double& cost, int64_t rows, double secs) {
        if (rows <= 0 || !(secs > 0.0)) return;
        const double c = secs / double(rows), old = cost;
        cost = old > 0.0 ? 0.5 * old + 0.5 * std::min(2.0 * old, std::max(0.5 * old, c)) : c;
    };
    auto rows = [&](int k) { return B * (k + 1) / n - B * k / n; };
    double per_second = 0.0, backlog = 0.0;
    for (int k = 0; k < n; ++k) {
        smooth(st.fwd_cost[k], st.fwd_rows[k], st.fwd_secs[k]);
        smooth(st.bwd_cost[k], rows(k), st.bwd_secs[k]);
        if (!(st.fwd_cost[k] > 0.0 && st.bwd_cost[k] > 0.0)) return;  // not timed: keep the cut
        per_second += 1.0 / st.fwd_cost[k];
        backlog += double(rows(k)) * st.bwd_cost[k] / st.fwd_cost[k];
    }
    const double S = (double(B) + backlog) / per_second;
    const int64_t even = B / n, lo = std::max<int64_t>(1, even / 2), hi = 2 * even;
    double sum = 0.0;
    bool near_even = true;
    for (int k = 1; k < n; ++k) {
        const int j = k - 1;
        sum += std::max(0.0, (S - double(rows(j)) * st.bwd_cost[j]) / st.fwd_cost[j]);
        int64_t c = std::llround(sum);
        c = std::max(c, st.cut[k - 1] + lo);
        c = std::min(c, st.cut[k - 1] + hi);
        st.cut[k] = std::min(c, B - int64_t(n - k) * lo);
        near_even = near_even && std::llabs(st.cut[k] - B * k / n) <= 2;
    }
    if (near_even)
        for (int k = 0; k <= n; ++k) st.cut[k] = B * k / n;
}

// Piece states (State::piece)
constexpr int kIdle = 0, kTaken = 1, kDone = 2, kFailed = 3;

// Thread k's part of the split. Its forward pieces of the cut, those in other threads' chunks
// first (their owners will wait for them), then its own chunk's; then it waits for every piece
// of its own chunk -- running any that no thread has taken yet itself, so a thread that is late
// to start (or ranges run one after another on one thread) cannot hold it up -- and runs that
// chunk's backward. No result depends on the cut or on who ran a piece: the forward sums
// nothing over rows, and the backward's chunks never move.
template <typename T, typename State>
void split_part(State& st, int k) {
    const int n = st.n;
    const int64_t B = st.a->B;
    auto piece_rows = [&](int i, int j, int64_t& lo, int64_t& hi) {  // cut range i in chunk j
        lo = std::max(st.cut[i], B * j / n);
        hi = std::min(st.cut[i + 1], B * (j + 1) / n);
        return lo < hi;
    };
    auto run_piece = [&](int i, int j) {
        int64_t lo, hi;
        int idle = kIdle;
        std::atomic<int>& state = st.piece[i * n + j];
        if (!piece_rows(i, j, lo, hi) || !state.compare_exchange_strong(idle, kTaken)) return;
        try {
            forward_part<T>(st, lo, hi);
        } catch (...) {
            state.store(kFailed, std::memory_order_release);  // its waiter gives up too
            throw;
        }
        st.fwd_rows[k] += hi - lo;
        state.store(kDone, std::memory_order_release);
    };
    if (n == 1) {  // one thread: nothing to balance, so no clock reads
        run_piece(0, 0);
        backward_part<T>(st, 0);
        return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (int j = 0; j < n; ++j)
        if (j != k) run_piece(k, j);
    run_piece(k, k);
    for (int i = 0; i < n; ++i) run_piece(i, k);
    st.fwd_secs[k] = since(start);
    for (int i = 0; i < n; ++i) {
        int64_t lo, hi;
        if (!piece_rows(i, k, lo, hi)) continue;
        for (int spins = 1;; ++spins) {
            const int state = st.piece[i * n + k].load(std::memory_order_acquire);
            if (state == kDone) break;
            if (state == kFailed) return;  // the thread that failed rethrows (run_chunks)
            cpu_relax();
            if (spins % 4096 == 0) std::this_thread::yield();
        }
    }
    const auto mid = std::chrono::steady_clock::now();
    backward_part<T>(st, k);
    st.bwd_secs[k] = since(mid);
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
double Stack<T>::step(const StackArgs<T>& a) {
    State& st = *s;
    int64_t work = 0;
    for (const StackLayer<T>& y : a.layers) work += layer_work(y.f.spec, a.B, a.T_, y.f.H);
    const int n = a.B > 0 && a.T_ > 0 ? chunks_for(a.B, work) : 1;
    if (n != st.n || int64_t(st.cut.size()) != n + 1 || st.cut[n] != a.B) {  // the even cut
        st.n = n;
        st.cut.resize(n + 1);
        for (int k = 0; k <= n; ++k) st.cut[k] = a.B * k / n;
        for (auto* v : {&st.fwd_cost, &st.bwd_cost, &st.fwd_secs, &st.bwd_secs}) v->assign(n, 0.0);
        st.fwd_rows.assign(n, 0);
        st.piece.reset(new std::atomic<int>[size_t(n) * n]);
    }
    const bool held = int64_t(st.held.size()) == n + 1 && st.held[n] == a.B;
    if (held) st.cut = st.held;
    st.a = &a;
    const int64_t L = int64_t(a.layers.size());
    run_chunks(L + 1, int(std::min<int64_t>(n, L + 1)), [](void* p, int64_t lo, int64_t hi) {
        prepare_tasks<T>(*static_cast<State*>(p), lo, hi);
    }, &st);
    for (int i = 0; i < n * n; ++i) st.piece[i].store(kIdle, std::memory_order_relaxed);
    std::fill(st.fwd_rows.begin(), st.fwd_rows.end(), 0);
    run_chunks(n, n, [](void* p, int64_t k, int64_t) {
        split_part<T>(*static_cast<State*>(p), int(k));
    }, &st);
    if (n > 1 && !held) move_cut(st, a.B);
    st.next_task = 0;
    const int finishers = int(std::min<int64_t>(n, L + 1));
    run_chunks(finishers, finishers, [](void* p, int64_t, int64_t) {
        finish_tasks<T>(*static_cast<State*>(p));
    }, &st);
    // on the same threads, the gradients still in cache; a non-finite loss updates nothing (the
    // caller reports it: rnnkern.TrainStep)
    if (a.adam && std::isfinite(st.loss)) adam_update(*a.adam, n);
    return st.loss;
}

template <typename T>
std::vector<int64_t> Stack<T>::cut() const { return s->cut; }

template <typename T>
void Stack<T>::hold_cut(std::vector<int64_t> cut) {
    bool rises = cut.empty() || cut[0] == 0;
    for (size_t k = 1; k < cut.size(); ++k) rises = rises && cut[k] >= cut[k - 1];
    if (!rises) throw std::invalid_argument("cut must rise from 0 to B");
    s->held = std::move(cut);
}

template class Stack<float>;
template class Stack<double>;

}  // namespace rk
