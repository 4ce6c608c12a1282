// The training step of a stack [input -> recurrent layers of any cell -> dense head with softmax
// cross-entropy] in one call (what rnnkern's step plan runs per batch on the C++ backend,
// rnnkern/step_plan/cpp.py) with no hand-off per layer: each thread runs, over its chunk of the
// batch, every layer's forward time loop, its rows of the head and loss, the head's weight
// gradients and every layer's backward; after the join the gradient partials are summed in
// chunk order (layer.h, head.h), then optionally Adam updates the parameters (adam.h). Per
// layer call this saved the hand-offs, the waits for the slower thread and the Python between.
// The first layer reads its input from a table by ids (projected, kernels.h) or as floats
// [B,T,I] (then no dx is formed).
// The threads' speeds differ (on a shared host one often runs 10-40% slower than the other for
// seconds, and the Python between steps leaves the calling thread's caches cold), so the
// forward, which sums nothing over rows, runs on a cut that follows them, while the backward
// keeps the even chunks: a thread forwards the rows of its cut that lie in other chunks first
// and hands each piece over with a flag, with no join between forward and backward. Every result
// is the same to the bit whatever the cut.
//
// Shape legend: B batch, T time steps, V table rows, H_l units of layer l, C classes,
// N = B*T rows of the head. Every array is C-contiguous and batch-major.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "adam.h"
#include "head.h"
#include "kernels.h"

namespace rk {

template <typename T>
struct StackLayer {
    // f.x: layer 0: the table [V,G*H_0] read by f.ids, or floats [B,T,I]; above: the layer
    // below's output (or its dropped copy). b.d_out: the head's dh (last layer) or the layer
    // above's dx, masked in place.
    ForwardArgs<T> f;
    BackwardArgs<T> b;
    const T* mask = nullptr;  // [B,T,H_l] dropout mask on this layer's output (not the last's)
    T* dropped = nullptr;     // [B,T,H_l] output * mask: the next layer's input
};

template <typename T>
struct StackArgs {
    int64_t B = 0, T_ = 0;
    std::vector<StackLayer<T>> layers;
    HeadArgs<T> head;               // head.h: the last layer's output, or head_dropped
    const T* head_mask = nullptr;   // [B,T,F] dropout mask before the head, or null
    T* head_dropped = nullptr;      // [B,T,F]
    // Adam's update of the parameters after the gradient sums (every gradient must then be
    // final here: layer 0's dw_ih is, for a transposed one-hot table), or null: the caller's.
    // Skipped when the loss is not finite.
    const AdamArgs<T>* adam = nullptr;
};

template <typename T>
class Stack {
  public:
    explicit Stack(const std::vector<Cell>& cells);  // one per layer, bottom up
    ~Stack();
    // One step over a's buffers (which must outlive the call); returns the loss.
    double step(const StackArgs<T>& a);
    // The forward's cut of the batch over the threads (stack.cpp: it follows their measured
    // speeds): n+1 row indices from 0 to B. hold_cut fixes it for the next steps (tests: the
    // result must not depend on it), an empty vector lets it move again.
    std::vector<int64_t> cut() const;
    void hold_cut(std::vector<int64_t> cut);

  private:
    struct State;
    std::unique_ptr<State> s;
};

}  // namespace rk
