// The dense head of a sequence model with its softmax cross-entropy loss, forward and backward,
// in phases inside the stack's split (stack.h): the same math as rnnkern.Dense +
// rnnkern.sequence_loss (rnnkern/losses.py), the Python copy.
//
// Shape legend: N rows (B*T positions), F features in (the last layer's H), C classes.
//   logits = h W^T + bias                                   [N,C]
//   loss   = sum_n w_n (logsumexp(logits_n) - logits_n[target_n]) * inv_total
//   d_logits = (softmax(logits_n) - onehot(target_n)) * w_n * inv_total
//   dw = d_logits^T h [C,F],  db = column sums of d_logits [C],  dh = d_logits W [N,F]
// w_n = 1 when no position weights are given; inv_total = 1 / (sum of all weights + 1e-12),
// over the whole batch (the caller's: TF's sequence_loss divides by the weight total).
#pragma once

#include <cstdint>
#include <memory>

namespace rk {

template <typename T>
struct HeadArgs {
    int64_t N = 0, F = 0, C = 0;
    const T* h = nullptr;             // [N,F]
    const T* weight = nullptr;        // [C,F]
    const T* bias = nullptr;          // [C] or null (no bias)
    const int64_t* targets = nullptr; // [N], every one in [0, C) (the caller checks)
    const T* w = nullptr;             // [N] position weights, or null: all ones
    double inv_total = 0.0;
    T* dw = nullptr;                  // [C,F]
    T* db = nullptr;                  // [C], written when bias is given
    T* dh = nullptr;                  // [N,F]
};

// The phases, for a caller that runs rows inside its own splits (stack.cpp): prepare (n: the
// threads, and the chunks of a fixed cut of [0, N)), rows [lo, hi) of any cut (each writes its
// rows' dh, d logits and losses), grads(k, lo, hi) for chunk k of the fixed cut (its dW, db
// partials, from its rows' d logits), then after the join finish: the partials added in chunk
// order, the loss summed over rows in order. So the result does not depend on how rows() was
// cut. The args passed to prepare must outlive rows and finish.
template <typename T>
class HeadStep {
  public:
    HeadStep();
    ~HeadStep();
    HeadStep(const HeadStep&) = delete;
    HeadStep& operator=(const HeadStep&) = delete;
    void prepare(const HeadArgs<T>& a, int n);
    void rows(int64_t lo, int64_t hi) const;
    void grads(int k, int64_t lo, int64_t hi) const;
    double finish() const;

  private:
    struct State;
    std::unique_ptr<State> s;
};

}  // namespace rk
