// Batch chunks on threads. The recurrence of one sequence never reads another's, so the time loop
// can run for rows [lo, hi) of the batch on each thread with no synchronisation until the end:
// one hand-off to persistent workers and one wait per call, instead of OpenBLAS's hand-off at
// every step (which perf showed costing more than the arithmetic at char-rnn size, and stalling
// for whole time slices on a busy machine). Each thread's per-step GEMMs then run on the
// single-threaded loop.
#pragma once

#include <cstdint>
#include <thread>

namespace rk {

// Threads for the time loop: 0 = automatic (CPUs this process may use, at most 8);
// a minimum of recurrent work B*T*G*H*H multiply-adds below which one thread runs everything.
void set_threads(int n);
int threads();
void set_split_min_work(int64_t v);
int64_t split_min_work();

// How many chunks a time loop over B rows with `work` recurrent multiply-adds gets.
int chunks_for(int64_t B, int64_t work);

// Calls body(lo, hi) for `n` contiguous ranges covering [0, B), range k = [B*k/n, B*(k+1)/n):
// ranges 1.. on persistent worker threads (new threads when the workers are busy with another
// caller's job) and range 0 on this one; waits for them all and rethrows the first exception
// any of them threw.
void run_chunks(int64_t B, int n, void (*body)(void* ctx, int64_t lo, int64_t hi), void* ctx);

// The index k of run_chunks' range that starts at row lo (lo = B*k/n; unique when n <= B, as
// chunks_for gives: no range is empty).
inline int chunk_index(int64_t B, int n, int64_t lo) {
    int k = 0;
    while (k + 1 < n && B * k / n != lo) ++k;
    return k;
}

// One turn of a spin-wait loop: the pause instruction (the sibling hyperthread and the memory
// order machinery get the core's resources back), or a yield where there is none.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
}

}  // namespace rk
