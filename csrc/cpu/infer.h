// Inference over a stack [ids -> table rows -> recurrent layers of any cell -> dense head], one
// step at a time (rnnkern/inference.py): each layer's forward phases (layer.h) are prepared once,
// for T = 1, so a step costs each layer's cell step and the head's product and keeps one step's
// activations per layer (O(B*H), not O(B*T*G*H)); generate() then runs as many steps as asked in
// one call, sampling each next id from the logits as rnnkern.sample.sample_logits does.
//
// The same kernels and the same operations as the training forward over one-step sequences: the
// input rows are gathered into floats and multiplied by W_ih^T inside the layer (a one-hot
// input's table is the identity), so the logits equal the layer API's to the bit wherever its
// GEMMs take the same path (tests/test_inference.py).
//
// Shape legend: B batch, V table rows (ids), I table width (the first layer's input), H_l units
// of layer l, C classes. Every array is C-contiguous.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "buffer.h"
#include "kernels.h"
#include "layer.h"

namespace rk {

template <typename T>
struct InferLayerArgs {
    Spec spec;
    int64_t H = 0;
    const T* w_ih = nullptr;  // [G*H, I_l]
    const T* w_hh = nullptr;  // [G*H, H]
    const T* b_ih = nullptr;  // [G*H]
    const T* b_hh = nullptr;  // [G*H]
};

// How generate() picks each next id from a row of logits (rnnkern.sample.sample_logits): the
// argmax for temperature 0, else a draw from softmax(logits / temperature) over the top_k
// largest logits (0: all), by one uniform u in [0, 1) per row.
struct SampleArgs {
    double temperature = 1.0;
    int64_t top_k = 0;
};

// The id drawn from logits [C] (see SampleArgs), or kNonFinite (a NaN or +inf logit: a diverged
// model) or kAllMasked (every logit -inf); `order` and `cdf` are scratch.
constexpr int64_t kNonFinite = -1, kAllMasked = -2;
template <typename T>
int64_t sample_row(const T* logits, int64_t C, const SampleArgs& s, double u,
                   std::vector<int64_t>& order, std::vector<double>& cdf);

template <typename T>
class InferStack {
  public:
    // table [V, I]: the rows ids select (an embedding's E; the identity for one-hot input);
    // weight [C, H_top], bias [C] or null. The arrays must outlive this object.
    InferStack(const std::vector<InferLayerArgs<T>>& layers, int64_t B, const T* table,
               int64_t V, int64_t I, const T* weight, const T* bias, int64_t C);
    ~InferStack();

    int64_t batch() const { return B_; }
    int64_t classes() const { return C_; }
    size_t size() const { return layers_.size(); }
    // layer l's state, read and written in place: h [B,H_l], c [B,H_l] (null but for the LSTM)
    T* h(size_t l);
    T* c(size_t l);
    void reset();  // every state to zeros

    // One step from ids [B] (each in [0, V): the caller checks them): the states move on and
    // logits [B,C] receive the head's output.
    void step(const int64_t* ids, T* logits);
    // `length` steps from ids [B]: each step's logits pick the next ids (u [length, B] uniform
    // draws; null for temperature 0), written to out [length, B] and fed to the next step. A
    // row that cannot be sampled (sample_row's codes) ends the call there, its code in out.
    void generate(const int64_t* ids, int64_t length, const double* u, const SampleArgs& s,
                  int64_t* out);

  private:
    struct Slot;
    int64_t B_, V_, I_, C_;
    const T* table_;
    const T* weight_;
    const T* bias_;
    std::vector<std::unique_ptr<Slot>> layers_;
    Buffer<T> x_, wt_, logits_;   // gathered rows [B, I], W^T [H_top, C], scratch logits [B, C]
};

}  // namespace rk
