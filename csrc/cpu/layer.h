// One recurrent layer's forward and backward, split into phases so that a caller can run several
// layers' batch chunks inside one split of the batch (stack.cpp), or one layer alone (seam.cpp):
//
//   forward_prepare(args, n)   weights packed into the layer's own work arrays (serial)
//   forward_rows(lo, hi)       the time loop of batch rows [lo, hi), from their starting state
//                              to their final one; any cut of [0, B) gives the same bits
//   backward_prepare(args, n)  likewise for the backward; n = the chunks run_chunks cuts
//   backward_rows(lo, hi)      chunk [lo, hi) of that even cut (chunks.h), its gradient
//                              partials kept per chunk
//   backward_finish()          the partials summed in chunk order, the weight gradients out
//
// One implementation per cell family: lstm.cpp (its private time-major layout) and rnn_gru.cpp.
// The args given to a prepare must outlive its rows and finish. Shape legend: kernels.h.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels.h"

namespace rk {

template <typename T>
class Layer {
  public:
    virtual ~Layer() = default;
    virtual void forward_prepare(const ForwardArgs<T>& a, int n) = 0;
    virtual void forward_rows(int64_t lo, int64_t hi) const = 0;
    virtual void backward_prepare(const BackwardArgs<T>& a, int n) = 0;
    virtual void backward_rows(int64_t lo, int64_t hi) const = 0;
    virtual void backward_finish() const = 0;
};

template <typename T> std::unique_ptr<Layer<T>> make_lstm_layer();     // lstm.cpp
template <typename T> std::unique_ptr<Layer<T>> make_rnn_gru_layer();  // rnn_gru.cpp

template <typename T>
std::unique_ptr<Layer<T>> make_layer(Cell c) {
    return c == Cell::lstm ? make_lstm_layer<T>() : make_rnn_gru_layer<T>();
}

// The recurrent work by which chunks_for (chunks.h) decides a layer's threads: B*T*G*H*H
// multiply-adds, counted 4x, so that a layer splits from a quarter of chunks.h's threshold.
// Measured with two threads: the LSTM at lab-batch (B,T,H) = (170,10,25), fwd+bwd of one layer
// 1.27-1.48 -> 0.89-0.98 ms min; lab 12-4's whole training step (two layers, the head, Adam)
// with RNN 642 -> 338 us, GRU 1538 -> 818 us, blocks alternating in one process.
inline int64_t layer_work(const Spec& s, int64_t B, int64_t T, int64_t H) {
    return 4 * B * T * gates_of(s.cell) * H * H;
}

}  // namespace rk
