#include "chunks.h"

#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

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

void run_chunks(int64_t B, int n, void (*body)(void*, int64_t, int64_t), void* ctx) {
    if (n <= 1) {
        body(ctx, 0, B);
        return;
    }
    std::vector<std::exception_ptr> errors(n);
    std::vector<std::thread> pool;
    auto bound = [&](int k) { return B * k / n; };
    auto run = [&](int k) {
        try {
            body(ctx, bound(k), bound(k + 1));
        } catch (...) {
            errors[k] = std::current_exception();
        }
    };
    for (int k = 1; k < n; ++k) {
        try {
            pool.emplace_back(run, k);
        } catch (...) {  // no thread to be had: run that range here instead
            run(k);
        }
    }
    run(0);
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace rk
