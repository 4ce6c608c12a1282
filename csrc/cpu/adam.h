// Adam's update over flat arrays: run by a training step's stack call right after the gradient
// sums (stack.h), while the gradients are still in cache, or on its own after the call, once
// Python has clipped the gradients or finished an embedding's (rnnkern/step_plan/cpp.py).
// The same IEEE operations, in the same order and dtype, as the Python copy (rnnkern/optim.py,
// Adam._update): adam.cpp is compiled without FMA contraction, so both give the same bits
// (tests/test_train_step.py).
//
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   TF form:      p -= step * m / (sqrt(v) + eps)             step = lr sqrt(1-b2^t) / (1-b1^t)
//   PyTorch form: p -= step * m / (sqrt(v) / bc2 + eps)       step = lr / (1-b1^t), bc2 = sqrt(1-b2^t)
#pragma once

#include <array>
#include <cstdint>

namespace rk {

template <typename T>
struct AdamArgs {
    int64_t n = 0;
    T* p = nullptr;        // [n] parameters, updated
    const T* g = nullptr;  // [n] their gradients
    T* m = nullptr;        // [n] first moments, updated
    T* v = nullptr;        // [n] second moments, updated
    const T* s = nullptr;  // [7] b1, 1-b1, b2, 1-b2, eps, step, bc2, in T (each run's: stack.cpp)
    bool tf_form = true;
};

// Step t's scalars s (above), from rnnkern.optim.Adam._update's: formed in double, each rounded
// once to T.
template <typename T>
std::array<T, 7> adam_scalars(int64_t t, double lr, double b1, double b2, double eps,
                              bool tf_form);

// The update of elements [lo, hi).
void adam_range(const AdamArgs<float>& a, int64_t lo, int64_t hi);
void adam_range(const AdamArgs<double>& a, int64_t lo, int64_t hi);

// The update of every element, in contiguous ranges on up to `threads` threads (chunks.h).
template <typename T>
void adam_update(const AdamArgs<T>& a, int threads);

}  // namespace rk
