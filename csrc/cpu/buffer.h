// Work buffers the kernels keep between calls (saved activations, packed weights, partial
// gradients, results): std::vector with an allocator that puts the larger ones on transparent
// huge pages (Linux).
//
// Why: a step sweeps its buffers once or more (by their sizes, about 2.4 MB a thread at lab
// 12-4, 10 MB at char-rnn), over 4 KiB pages hundreds to thousands of TLB entries a step; and
// under KVM's nested paging a TLB miss walks both the guest's and the host's page tables. lab 12-4 through rk.TrainStep,
// blocks of 25 steps alternating in one process with the same build on 4 KiB pages: buffers
// from 1 MiB up on huge pages, -15 us of ~1290 a step (40 of 60 blocks faster); from 256 KiB,
// -54 of ~1460 (48 of 60); from 64 KiB, -117 of ~1450 (58 of 60). char-rnn, 100 batches,
// pairs of processes alternating: from 1 MiB up, 2.47 vs 2.67 s mean (faster in 8 of 10); from
// 64 KiB, 2.04 vs 2.14 s (5 of 8, one tie).
//
// From huge_page_min() bytes up (default 64 KiB), a buffer is 2 MiB-aligned, its length
// rounded up to whole 2 MiB pages (a huge page must lie wholly inside the advised range), and
// advised MADV_HUGEPAGE: a hint, which Linux follows when transparent huge pages are "madvise"
// or "always" and ignores when they are "never". The cost is memory: up to 2 MiB more per such
// buffer (lab 12-4's whole process: 198 MB resident instead of 170). set_huge_page_min moves
// the threshold (INT64_MAX: never). Smaller buffers are 64-byte aligned. Every buffer is freed
// with free(), whatever the threshold was when it was made. Elsewhere (not Linux) every buffer
// is 64-byte aligned, and none is on huge pages. The result arrays' pool (pool.cpp) takes its
// blocks from here too.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rk {

inline std::atomic<int64_t> g_huge_page_min{int64_t(64) << 10};
inline void set_huge_page_min(int64_t bytes) { g_huge_page_min.store(bytes); }
inline int64_t huge_page_min() { return g_huge_page_min.load(); }

// bytes of memory, 64-byte aligned; from huge_page_min() bytes up on huge pages as above.
// Release with std::free.
inline void* alloc_block(size_t bytes) {
    constexpr size_t kHugePage = size_t(2) << 20;
    bytes = std::max<size_t>(bytes, 1);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const bool huge = int64_t(bytes) >= huge_page_min();
#else
    const bool huge = false;
#endif
    const size_t len = huge ? (bytes + kHugePage - 1) / kHugePage * kHugePage : bytes;
    void* p = nullptr;
    if (posix_memalign(&p, huge ? kHugePage : 64, len) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(p, len, MADV_HUGEPAGE);  // a hint; if refused, 4 KiB pages as before
#endif
    return p;
}

template <typename T>
struct HugePageAllocator {
    using value_type = T;
    HugePageAllocator() = default;
    template <typename U>
    HugePageAllocator(const HugePageAllocator<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(alloc_block(n * sizeof(T))); }
    void deallocate(T* p, size_t) { std::free(p); }
};

template <typename T, typename U>
bool operator==(const HugePageAllocator<T>&, const HugePageAllocator<U>&) { return true; }
template <typename T, typename U>
bool operator!=(const HugePageAllocator<T>&, const HugePageAllocator<U>&) { return false; }

template <typename T>
using Buffer = std::vector<T, HugePageAllocator<T>>;

// v's storage grown to at least n elements (at least one: never null), kept between calls
template <typename T>
T* grow(Buffer<T>& v, size_t n) {
    if (v.size() < std::max<size_t>(n, 1)) v.resize(std::max<size_t>(n, 1));
    return v.data();
}

}  // namespace rk
