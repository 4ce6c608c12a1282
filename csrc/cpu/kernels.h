// C++ CPU kernels: one layer, one direction, whole sequence (the seam of rnnkern.backends), and
// the argument records every layer implementation (layer.h) takes.
//
// Shape legend: B batch, T time steps, I input, H hidden, G gates (RNN 1, LSTM 4, GRU 3),
// S saved slots per (b, t, j): RNN 1 (h'), LSTM 5 (i, f, g, o, tanh c'), GRU 4 (r, z, n, gh_n).
// Every array is C-contiguous. The layer's inputs and results are batch-major; the saved arrays
// are each cell family's own, with H padded to Hp = padded_hidden(H, sizeof(T)), a whole number
// of 64-byte vectors. RNN / GRU (rnn_gru.cpp): batch-major, each block padded: hprev [B,T,Hp],
// act [B,T,S*Hp], rh [B,T,Hp]. The LSTM's (lstm.cpp) are time-major with gates interleaved:
// hprev [T+1,B,R] (rows [h | x | 1], R = lstm_xh_width(I, H, sizeof(T))), cprev [T+1,B,Hp] in
// the forward (row T: the final state; the backward reads rows < T), act shaped [T,B,5Hp]
// (laid out [T,Hp/V,B,5V], V = 64 / sizeof(T); lstm.cpp).
// Projected input (`projected`, the first layer of a training stack, stack.h): x is
// [B,T,G*H] = x_orig W_ih^T (canonical gate order, no bias), w_ih [G*H,I] is not read (I is its
// width), dx is [B,T,G*H] = the gate pre-activation gradients and dw_ih comes back zero (the
// caller forms it from dx and its own x_orig). The LSTM's saved rows are then [h | 1]
// (R = lstm_xh_width(0, H, ...)).
// Projected input from a table (`projected` with `ids`): x is a table [V,G*H] (rows x_orig W_ih^T
// per id, e.g. W_ih^T for one-hot input) and step t of sequence b reads its row ids[b,t]; dx is
// then [V,G*H], the gate gradients summed per id (the table's gradient). The kernels do the
// gather and the scatter inside their batch chunks (per-chunk partial tables, added after).
// With `table_t` the table and dx are given transposed, [G*H,V]: for one-hot input these are
// W_ih and dW_ih themselves (dw_ih is then not zeroed when it is dx).
// dx null (not projected): the caller does not want it (a stack's first layer over floats), and
// its GEMM is skipped. Lengths outside [0, T] act as their nearest end (no bounds depend on them).
// The callers (bindings, stack) guarantee every array's shape; ids lie in [0, V).
#pragma once

#include <cstdint>

namespace rk {

enum class Cell { rnn, lstm, gru };

inline int gates_of(Cell c) { return c == Cell::lstm ? 4 : c == Cell::gru ? 3 : 1; }
inline int slots_of(Cell c) { return c == Cell::lstm ? 5 : c == Cell::gru ? 4 : 1; }

// H rounded up to whole 64-byte vectors of T (the saved arrays' layouts, above)
inline int64_t padded_hidden(int64_t H, int64_t elem_size) {
    const int64_t v = 64 / elem_size;
    return (H + v - 1) / v * v;
}
// row width of the LSTM's saved [h | x | 1] rows (h unpadded), whole 64-byte vectors
inline int64_t lstm_xh_width(int64_t I, int64_t H, int64_t elem_size) {
    return padded_hidden(H + I + 1, elem_size);
}

// Element (v, g) of an input table [V, G*H], or of its transpose [G*H, V] (one-hot input's W_ih)
struct TableIndex {
    int64_t sv, sg;
    TableIndex(int64_t V, int64_t GH, bool transposed)
        : sv(transposed ? 1 : GH), sg(transposed ? V : 1) {}
    int64_t operator()(int64_t v, int64_t g) const { return v * sv + g * sg; }
};

struct Spec {
    Cell cell = Cell::rnn;
    bool relu = false;         // rnn: relu instead of tanh
    double forget_bias = 0.0;  // lstm
    bool reset_after = true;   // gru
};

template <typename T>
struct ForwardArgs {
    Spec spec;
    int64_t B = 0, T_ = 0, I = 0, H = 0;
    // inputs
    const T* x = nullptr;               // [B,T,I]
    const T* w_ih = nullptr;            // [G*H,I]
    const T* w_hh = nullptr;            // [G*H,H]
    const T* b_ih = nullptr;            // [G*H]
    const T* b_hh = nullptr;            // [G*H]
    const T* h0 = nullptr;              // [B,H]
    const T* c0 = nullptr;              // [B,H], lstm only
    const int64_t* lengths = nullptr;   // [B] in [0,T], or null (all T)
    bool projected = false;             // x is [B,T,G*H] (see the legend)
    const int64_t* ids = nullptr;       // with projected: [B,T] in [0,V), x a table [V,G*H]
    int64_t V = 0;
    bool table_t = false;               // with ids: x is [G*H,V] instead
    // outputs
    T* out = nullptr;                   // [B,T,H], zero at t >= lengths[b]
    T* h_n = nullptr;                   // [B,H]
    T* c_n = nullptr;                   // [B,H], lstm only
    // saved for backward
    T* hprev = nullptr;                 // h entering step t (layout: see the legend)
    T* cprev = nullptr;                 // c entering step t, lstm only
    T* act = nullptr;                   // activations (S slots per unit)
    T* rh = nullptr;                    // r*h, gru with reset_after=false only
};

template <typename T>
struct BackwardArgs {
    Spec spec;
    int64_t B = 0, T_ = 0, I = 0, H = 0;
    const T* x = nullptr;               // [B,T,I]
    const T* w_ih = nullptr;            // [G*H,I]
    const T* w_hh = nullptr;            // [G*H,H]
    const int64_t* lengths = nullptr;   // [B] or null
    bool projected = false;             // as in the forward: x, dx [B,T,G*H]; dw_ih zero
    const int64_t* ids = nullptr;       // as in the forward; then x, dx are [V,G*H]
    int64_t V = 0;
    bool table_t = false;               // with ids: x, dx are [G*H,V] instead
    const T* hprev = nullptr;           // as saved by forward
    const T* cprev = nullptr;
    const T* act = nullptr;
    const T* rh = nullptr;
    const T* d_out = nullptr;           // [B,T,H] or null (zeros)
    const T* d_h_n = nullptr;           // [B,H] or null
    const T* d_c_n = nullptr;           // [B,H] or null, lstm only
    T* dx = nullptr;                    // [B,T,I], or null (not wanted; not projected)
    T* dh0 = nullptr;                   // [B,H], or null (not wanted)
    T* dc0 = nullptr;                   // [B,H] or null, lstm only
    T* dw_ih = nullptr;                 // [G*H,I]
    T* dw_hh = nullptr;                 // [G*H,H]
    T* db_ih = nullptr;                 // [G*H]
    T* db_hh = nullptr;                 // [G*H]
};

// One layer over the whole batch: the phases of layer.h around one split (seam.cpp).
template <typename T> void forward(const ForwardArgs<T>& a);
template <typename T> void backward(const BackwardArgs<T>& a);
// rows (steps x batch rows of a chunk) the LSTM backward gathers before its dx and weight-
// gradient GEMMs (lstm.cpp); small values exercise the flushes in tests
void set_lstm_ring_rows(int64_t rows);
int64_t lstm_ring_rows();

}  // namespace rk
