#include "chunks.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif
#include <new>

namespace rk {
namespace {
int g_threads = 0;
// B*T*G*H*H: char-rnn (50,50,.,128) is 1.6e8, lab-batch (170,10,.,25) 4.2e6: split from ~1e7
int64_t g_min_work = int64_t(1) << 23;

int cpus_allowed() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
}
}  // namespace

void set_threads(int n) { g_threads = std::max(0, n); }
int threads() { return g_threads > 0 ? g_threads : std::min(8, cpus_allowed()); }
void set_split_min_work(int64_t v) { g_min_work = v; }
int64_t split_min_work() { return g_min_work; }

int chunks_for(int64_t B, int64_t work) {
    if (work < g_min_work) return 1;
    const int64_t n = std::min<int64_t>(threads(), B);  // at least one row each
    return int(std::max<int64_t>(1, n));
}

namespace {

// Ranges 1.. of a split run on these persistent workers: starting and joining threads per call
// cost ~37 us (measured: a 4-row forward, 2 threads vs 1), against a whole lab 12-4 layer call of
// a few hundred us, and the fused step makes five such calls per step. Worker k runs range k of
// each job; one job at a time (another caller meanwhile, e.g. a second Python thread or a nested
// split, gets threads of its own as before). The pool is never destroyed (its workers sleep on a
// condition variable until the process exits) and is rebuilt in a forked child, which inherits
// the pool's memory but not its threads (pthread_atfork).
struct Pool {
    std::mutex run;       // held for a whole job
    std::mutex m;         // guards everything below (the atomics are also read while spinning)
    std::condition_variable wake, done;
    std::atomic<uint64_t> generation{0};  // bumped per job
    void (*body)(void*, int64_t, int64_t) = nullptr;
    void* ctx = nullptr;
    int64_t B = 0;
    int n = 0;
    std::atomic<int> pending{0};  // worker ranges of this job not finished
    std::vector<std::exception_ptr> errors;
    int workers = 0;
};

// A sleeping thread takes ~20 us to wake here (a futex wake and the scheduler), more than half
// of what the pool saves: so a worker spins this long for the next job before it sleeps, and the
// caller spins for the workers' ranges. The fused step's whole-stack call comes ~200 us after the
// previous one (optimizer, the next batch's Python, weight packing): with 200 us of spin the
// worker was asleep for half of them (median start 17 us after the hand-off, against 0.2).
constexpr auto kSpin = std::chrono::microseconds(500);

// Spins until ready() or kSpin has passed; returns ready().
template <typename F>
bool spin_until(F ready) {
    const auto end = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0; !ready(); ++i) {
        cpu_relax();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > end) return ready();
    }
    return true;
}

Pool* g_pool = nullptr;
std::mutex g_pool_lock;

#if defined(__unix__)
// In a forked child only the forking thread exists: forget the parent's pool (its workers are
// gone, its mutexes may be held by them) and reset the lock another thread may have held.
void forget_pool_in_child() {
    new (&g_pool_lock) std::mutex;
    g_pool = nullptr;
}
const int g_at_fork = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
#endif

Pool* pool() {
    std::lock_guard<std::mutex> lk(g_pool_lock);
    if (!g_pool) g_pool = new Pool;  // never freed: see Pool
    return g_pool;
}

// seen: the last generation before this worker existed (read by its creator: a worker that
// started after the job it was made for was published must still run it)
void worker(Pool* p, int k, uint64_t seen) {
    std::unique_lock<std::mutex> lk(p->m);
    for (;;) {
        lk.unlock();
        spin_until([&] { return p->generation.load(std::memory_order_acquire) != seen; });
        lk.lock();
        p->wake.wait(lk, [&] { return p->generation != seen; });
        seen = p->generation;
        if (k >= p->n) continue;  // this job has fewer ranges
        auto body = p->body;
        void* ctx = p->ctx;
        const int64_t lo = p->B * k / p->n, hi = p->B * (k + 1) / p->n;
        lk.unlock();
        std::exception_ptr error;
        try {
            body(ctx, lo, hi);
        } catch (...) {
            error = std::current_exception();
        }
        lk.lock();
        p->errors[k] = error;
        if (--p->pending == 0) p->done.notify_one();
    }
}

// The previous scheme, for a caller that finds the pool busy: ranges 1.. on new threads.
void run_on_new_threads(int64_t B, int n, void (*body)(void*, int64_t, int64_t), void* ctx) {
    std::vector<std::exception_ptr> errors(n);
    std::vector<std::thread> threads;
    auto run = [&](int k) {
        try {
            body(ctx, B * k / n, B * (k + 1) / n);
        } catch (...) {
            errors[k] = std::current_exception();
        }
    };
    for (int k = 1; k < n; ++k) {
        try {
            threads.emplace_back(run, k);
        } catch (...) {  // no thread to be had: run that range here instead
            run(k);
        }
    }
    run(0);
    for (auto& t : threads) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace

void run_chunks(int64_t B, int n, void (*body)(void*, int64_t, int64_t), void* ctx) {
    if (n <= 1) {
        body(ctx, 0, B);
        return;
    }
    Pool* p = pool();
    std::unique_lock<std::mutex> job(p->run, std::try_to_lock);
    if (!job.owns_lock()) {
        run_on_new_threads(B, n, body, ctx);
        return;
    }
    while (p->workers < n - 1) {  // grow on first use (or when n grows)
        try {
            std::thread(worker, p, p->workers + 1, p->generation.load()).detach();
        } catch (...) {  // no more threads to be had: the ranges beyond run here
            break;
        }
        ++p->workers;
    }
    const int on_workers = std::min(n - 1, p->workers);
    {
        std::lock_guard<std::mutex> lk(p->m);
        p->body = body;
        p->ctx = ctx;
        p->B = B;
        p->n = n;
        p->pending = on_workers;
        p->errors.assign(n, nullptr);
        ++p->generation;
    }
    if (on_workers > 0) p->wake.notify_all();
    std::vector<std::exception_ptr> here(n);  // range 0 and any the workers cannot take
    for (int k = 0; k < n; k = (k == 0 ? on_workers + 1 : k + 1)) {
        try {
            body(ctx, B * k / n, B * (k + 1) / n);
        } catch (...) {
            here[k] = std::current_exception();
        }
    }
    spin_until([&] { return p->pending.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lk(p->m);
    p->done.wait(lk, [&] { return p->pending == 0; });
    for (int k = 0; k < n; ++k) {
        if (here[k]) std::rethrow_exception(here[k]);
        if (p->errors[k]) std::rethrow_exception(p->errors[k]);
    }
}

}  // namespace rk
