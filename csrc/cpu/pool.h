// Recycled memory for the large arrays the bindings return (outputs, saved activations,
// gradients). A fresh multi-megabyte allocation page-faults on first touch every call (glibc
// hands such blocks back to the OS when they are freed): perf counted ~670 faults, about 1 ms,
// per char-rnn (50,50,65,128) 2-layer LSTM fwd+bwd, inside the kernels' first stores. Training
// calls with the same shapes every step, so a freed block of the same size is nearly always
// waiting here for the next call.
#pragma once

#include <cstddef>

namespace rk {

// A 64-byte aligned block of at least `bytes` (a recycled one of exactly that size if held);
// throws std::bad_alloc when memory is exhausted.
void* pool_take(size_t bytes);
// Returns a block from pool_take; kept for reuse while the pool holds at most pool_limit()
// bytes (oldest blocks freed first), else freed.
void pool_give(void* p);
// Bytes of free blocks the pool may keep (default 256 MiB; 0: keep none).
void set_pool_limit(size_t bytes);
size_t pool_limit();
size_t pool_held();

}  // namespace rk
