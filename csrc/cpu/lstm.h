// One LSTM layer's forward and backward (lstm.cpp) split into phases, for a caller that runs
// several layers' batch chunks inside one split (lstm_stack.cpp): prepare (weights packed into
// this object's work arrays), the rows [lo, hi) of each chunk on its thread (with their starting
// and final states), and for the backward a finish (the chunks' gradient partials summed).
// lstm_forward and lstm_backward (kernels.h) are these phases around one run_chunks. The args
// passed to a prepare must outlive its rows and finish.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels.h"

namespace rk {

// Batch chunks for an LSTM over B rows, T steps, H units (chunks.h: from a quarter of the
// generic work threshold: lab-batch (B,T,H) = (170,10,25), 4.2e6, fwd+bwd 1.27-1.48 ->
// 0.89-0.98 ms min, one layer, with two threads)
int lstm_chunks(int64_t B, int64_t T, int64_t H);

template <typename T>
class LstmLayer {
  public:
    LstmLayer();
    ~LstmLayer();
    LstmLayer(const LstmLayer&) = delete;
    LstmLayer& operator=(const LstmLayer&) = delete;
    // n: the number of chunks run_chunks will cut the batch into (ranges B*k/n .. B*(k+1)/n)
    void forward_prepare(const ForwardArgs<T>& a, int n);
    void forward_rows(int64_t lo, int64_t hi) const;
    void backward_prepare(const BackwardArgs<T>& a, int n);
    void backward_rows(int64_t lo, int64_t hi) const;
    void backward_finish() const;

  private:
    struct State;
    std::unique_ptr<State> s;
};

}  // namespace rk
