// The RNN and GRU layers (the phases of layer.h; the LSTM's are lstm.cpp). Shape legend and the
// arrays' layouts: kernels.h; the pointwise math: rnnkern/cells.h.
//
// Private layout: every gate block, saved slot and state row is padded from H to Hp units, a
// whole number of 64-byte vectors (padded_hidden), with zeros in the padding: hprev [B,T,Hp],
// act [B,T,S*Hp], rh [B,T,Hp], and the kernels' own d_gx, d_gh [B,T,G*Hp] and running dh
// [B,Hp]. So every GEMM's N and every pointwise pass is whole vectors (at H = 25 the 9-unit
// tails of each block went through the GEMM loop's copied tail panel and scalar loops, and
// cost more than the arithmetic); the padding stays zero through every step (zero
// pre-activations give h' = 0 for both cells).
//
// Forward, per batch chunk: what is not recurrent is hoisted out of the time loop: gx =
// x W_ih^T for the chunk's B*T rows as one GEMM, written straight into the activation buffer
// `act`. Each step then runs one h W_hh^T GEMM and one fused pointwise pass that adds the biases
// (b_ih + b_hh combined where the cell sums them) and turns those pre-activations into the
// saved activations in place.
// Backward, per chunk: per step one fused pointwise pass from dh to the gate gradients d_gx,
// then dh_prev = d_gh W_hh as one GEMM accumulated into dh; after the loop the chunk's dx =
// d_gx W_ih and its partial dW_ih^T = x^T d_gx, dW_hh^T = h_prev^T d_gh and bias sums are one
// GEMM (or pass) each over its B*T rows, while they are in cache; the finish (after the join)
// adds the chunks' partials in chunk order and unpads them. Steps past lengths[b] leave the
// rows of d_gx at zero, so those GEMMs need no masks, and carry dh unchanged.
//
// Projected input (kernels.h): gx = the given row x_orig W_ih^T (from x, or from the table row
// of the step's id) instead of the GEMM; the backward's d_gx rows are then dx itself,
// or, from a table, are added into the chunk's partial table gradient, summed in the finish.
#include <algorithm>
#include <cstring>
#include <memory>

#include "buffer.h"
#include "chunks.h"
#include "dispatch.h"
#include "gemm.h"
#include "layer.h"
#include "rnnkern/cells.h"

namespace rk {
namespace {

// ---- forward pointwise rows: one (b, t), Hp lanes ------------------------------------------
// act: this row's S*Hp slots, holding gx (= x W_ih^T, G*Hp of them) on entry.
// gh: this row of h W_hh^T (no bias); bx: the biases summed outside W_hn's product (padded
// [G*Hp]: r, z: b_ih + b_hh; n: b_in; RNN: b_ih + b_hh); bhn: b_hn [Hp]; h_new: Hp lanes out.

template <typename T>
RK_ALWAYS_INLINE void rnn_fwd_row(int64_t Hp, bool relu, T* __restrict__ act,
                                  const T* __restrict__ gh, const T* __restrict__ bx,
                                  T* __restrict__ h_new) {
    for (int64_t j = 0; j < Hp; ++j) {
        const T h = rnn_forward_point(act[j] + gh[j] + bx[j], relu);
        act[j] = h;
        h_new[j] = h;
    }
}

// GRU, reset_after=true: gh holds all three blocks of h W_hh^T. Each slot block of act is its
// own restrict parameter (s_r .. s_ghn = act, act + Hp, ..): GCC honours restrict on parameters,
// not on locals derived from one pointer, and versioned every row's loop for aliasing otherwise
// (the checks cost more than the 2 vectors of work at H = 25).
template <typename T>
RK_ALWAYS_INLINE void gru_after_fwd_row(int64_t Hp, T* __restrict__ s_r, T* __restrict__ s_z,
                                        T* __restrict__ s_n, T* __restrict__ s_ghn,
                                        const T* __restrict__ gh, const T* __restrict__ bx,
                                        const T* __restrict__ bhn, const T* __restrict__ h_prev,
                                        T* __restrict__ h_new) {
    for (int64_t j = 0; j < Hp; ++j) {
        T r, z, n, h;
        gru_gates_point(s_r[j] + gh[j] + bx[j], s_z[j] + gh[Hp + j] + bx[Hp + j], r, z);
        const T ghn = gh[2 * Hp + j] + bhn[j];
        gru_forward_point(r, z, s_n[j] + bx[2 * Hp + j], ghn, h_prev[j], true, n, h);
        h_new[j] = h;
        s_r[j] = r;
        s_z[j] = z;
        s_n[j] = n;
        s_ghn[j] = ghn;
    }
}

// GRU, reset_after=false, phase 1: gates r, z (gh holds the r, z blocks) and r*h for the W_hn GEMM.
template <typename T>
RK_ALWAYS_INLINE void gru_before_gates_row(int64_t Hp, T* __restrict__ s_r, T* __restrict__ s_z,
                                           const T* __restrict__ gh, const T* __restrict__ bx,
                                           const T* __restrict__ h_prev, T* __restrict__ rh) {
    for (int64_t j = 0; j < Hp; ++j) {
        T r, z;
        gru_gates_point(s_r[j] + gh[j] + bx[j], s_z[j] + gh[Hp + j] + bx[Hp + j], r, z);
        s_r[j] = r;
        s_z[j] = z;
        rh[j] = r * h_prev[j];
    }
}

// GRU, reset_after=false, phase 2: ghn = (r h) W_hn^T without bias.
template <typename T>
RK_ALWAYS_INLINE void gru_before_new_row(int64_t Hp, const T* __restrict__ s_r,
                                         const T* __restrict__ s_z, T* __restrict__ s_n,
                                         T* __restrict__ s_ghn, const T* __restrict__ ghn,
                                         const T* __restrict__ b_in, const T* __restrict__ b_hn,
                                         const T* __restrict__ h_prev, T* __restrict__ h_new) {
    for (int64_t j = 0; j < Hp; ++j) {
        T n, h;
        const T g = ghn[j] + b_hn[j];
        gru_forward_point(s_r[j], s_z[j], s_n[j] + b_in[j], g, h_prev[j], false, n, h);
        h_new[j] = h;
        s_n[j] = n;
        s_ghn[j] = g;
    }
}

// ---- backward pointwise rows: one (b, t), Hp lanes -----------------------------------------
// dh: this batch row of the running dh (Hp lanes), replaced by the part of dh_prev that bypasses
// W_hh (the GEMM adds the rest); d_out: this row of d_outputs (H units) or null.

template <typename T>
RK_ALWAYS_INLINE T with_out(const T* __restrict__ dh, const T* __restrict__ d_out, int64_t H,
                            int64_t j) {
    return d_out && j < H ? dh[j] + d_out[j] : dh[j];
}

template <typename T>
RK_ALWAYS_INLINE void rnn_back_row(int64_t H, int64_t Hp, bool relu, const T* __restrict__ act,
                                   const T* __restrict__ d_out, T* __restrict__ dh,
                                   T* __restrict__ dgx) {
    for (int64_t j = 0; j < Hp; ++j) {
        dgx[j] = rnn_backward_point(act[j], with_out(dh, d_out, H, j), relu);
        dh[j] = T(0);
    }
}

// GRU reset_after=true: d_gh differs from d_gx in the n block (d_an * r).
template <typename T>
RK_ALWAYS_INLINE void gru_after_back_row(int64_t H, int64_t Hp, const T* __restrict__ act,
                                         const T* __restrict__ h_prev,
                                         const T* __restrict__ d_out, T* __restrict__ dh,
                                         T* __restrict__ x_r, T* __restrict__ x_z,
                                         T* __restrict__ x_n, T* __restrict__ h_r,
                                         T* __restrict__ h_z, T* __restrict__ h_n) {
    for (int64_t j = 0; j < Hp; ++j) {
        T d_ar, d_az, d_an, d_ghn, direct;
        gru_backward_point(act[j], act[Hp + j], act[2 * Hp + j], act[3 * Hp + j], h_prev[j],
                           with_out(dh, d_out, H, j), true, d_ar, d_az, d_an, d_ghn, direct);
        x_r[j] = d_ar;
        x_z[j] = d_az;
        x_n[j] = d_an;
        h_r[j] = d_ar;
        h_z[j] = d_az;
        h_n[j] = d_ghn;
        dh[j] = direct;
    }
}

// GRU reset_after=false, phase 1: z and n blocks; r needs d_rh = d_an W_hn first.
template <typename T>
RK_ALWAYS_INLINE void gru_before_back_row1(int64_t H, int64_t Hp, const T* __restrict__ act,
                                           const T* __restrict__ h_prev,
                                           const T* __restrict__ d_out, T* __restrict__ dh,
                                           T* __restrict__ x_z, T* __restrict__ x_n) {
    for (int64_t j = 0; j < Hp; ++j) {
        T d_ar, d_az, d_an, d_ghn, direct;
        gru_backward_point(act[j], act[Hp + j], act[2 * Hp + j], act[3 * Hp + j], h_prev[j],
                           with_out(dh, d_out, H, j), false, d_ar, d_az, d_an, d_ghn, direct);
        x_z[j] = d_az;
        x_n[j] = d_an;
        dh[j] = direct;
    }
}

template <typename T>
RK_ALWAYS_INLINE void gru_before_back_row2(int64_t Hp, const T* __restrict__ act,
                                           const T* __restrict__ h_prev,
                                           const T* __restrict__ d_rh, T* __restrict__ dh,
                                           T* __restrict__ dgx) {
    for (int64_t j = 0; j < Hp; ++j) {
        T d_ar, add;
        gru_backward_reset_before(act[j], h_prev[j], d_rh[j], d_ar, add);
        dgx[j] = d_ar;
        dh[j] += add;
    }
}

template <typename T>
inline void column_sums(int64_t rows, int64_t cols, const T* __restrict__ m, T* __restrict__ out) {
    for (int64_t c = 0; c < cols; ++c) out[c] = T(0);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[c] += m[r * cols + c];
}

// ---- the phases -----------------------------------------------------------------------------

// Work arrays kept between calls (per layer object: no page faults per call).
template <typename T>
struct Buffers {
    Buffer<T> w_ih_t, w_hh_t, bx, bhn, gh, ghn, last, w_ih_p, w_hh_p, d_gx, d_gh, dh, d_rh, parts,
        tables;
};

// Padded sizes of one call: Hp units per block, GP = G*Hp gate columns, SP = S*Hp saved slots.
struct Dims {
    int64_t B, Tn, I, H, Hp, G, GP, SP;
    Dims(const Spec& s, int64_t B_, int64_t T_, int64_t I_, int64_t H_, int64_t elem)
        : B(B_), Tn(T_), I(I_), H(H_), Hp(padded_hidden(H_, elem)), G(gates_of(s.cell)),
          GP(G * Hp), SP(slots_of(s.cell) * Hp) {}
};

template <typename T>
struct Fwd {
    const ForwardArgs<T>* a;
    Dims d;
    const T* w_ih_t;  // [I, GP] = W_ih^T, padded columns zero; null for projected input
    const T* w_hh_t;  // [Hp, GP] = W_hh^T, padded rows and columns zero
    const T* bx;      // [GP] the biases outside W_hn's product (the row functions' legend)
    const T* bhn;     // [Hp] b_hn (GRU)
    T* gh;            // [B, GP] a step's h W_hh^T (each chunk its rows)
    T* ghn;           // [B, Hp] a step's (r h) W_hn^T (GRU reset-before)
    T* last;          // [B, Hp] the state after the last step
    GemmPath path;
};

template <typename T>
RK_ALWAYS_INLINE void forward_rows_impl(const Fwd<T>& f, int64_t lo, int64_t hi) {
    const ForwardArgs<T>& a = *f.a;
    const Dims& d = f.d;
    const Spec& s = a.spec;
    const int64_t Tn = d.Tn, I = d.I, H = d.H, Hp = d.Hp, GP = d.GP, SP = d.SP, Bc = hi - lo;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;
    const GemmPath path = f.path;

    for (int64_t b = lo; b < hi; ++b) {  // the state entering step 0, padding zero
        T* hp = a.hprev + b * Tn * Hp;
        if (Tn == 0) {
            if (a.h0) std::memcpy(a.h_n + b * H, a.h0 + b * H, H * sizeof(T));
            else std::memset(a.h_n + b * H, 0, H * sizeof(T));
            continue;
        }
        std::memset(hp, 0, Hp * sizeof(T));
        if (a.h0) std::memcpy(hp, a.h0 + b * H, H * sizeof(T));
    }
    // act[lo:hi, :, :GP] = x W_ih^T: this chunk's B*T rows at once, hoisted out of the time
    // loop (each chunk does its own, so no BLAS thread pool runs beside the chunk threads)
    if (a.projected) {
        const int64_t GH = d.G * H;
        const TableIndex at(a.V, GH, a.table_t);
        for (int64_t r = lo * Tn; r < hi * Tn; ++r) {
            T* __restrict__ gx = a.act + r * SP;
            std::memset(gx, 0, GP * sizeof(T));
            for (int64_t g = 0; g < d.G; ++g)
                for (int64_t j = 0; j < H; ++j)
                    gx[g * Hp + j] = a.ids ? a.x[at(a.ids[r], g * H + j)] : a.x[r * GH + g * H + j];
        }
    } else {
        gemm<T>(false, Bc * Tn, GP, I, T(1), a.x + lo * Tn * I, I, f.w_ih_t, GP, T(0),
                a.act + lo * Tn * SP, SP, path);
    }
    T* const gh = f.gh + lo * GP;  // this chunk's rows of the step scratch
    T* const ghn = gru_before ? f.ghn + lo * Hp : nullptr;
    T* const last = f.last + lo * Hp;
    const int64_t n_rec = gru_before ? 2 * Hp : GP;  // columns of h W_hh^T computed from h itself
    for (int64_t t = 0; t < Tn; ++t) {
        // gh = h_t W_hh^T: row b of h_t is hprev[b, t], rows T*Hp apart
        gemm<T>(false, Bc, n_rec, Hp, T(1), a.hprev + (lo * Tn + t) * Hp, Tn * Hp, f.w_hh_t, GP,
                T(0), gh, GP, path);
        if (gru_before) {
            for (int64_t b = lo; b < hi; ++b) {
                const int64_t row = b * Tn + t;
                T* rh = a.rh + row * Hp;
                if (a.lengths && t >= a.lengths[b]) {
                    std::memset(rh, 0, Hp * sizeof(T));  // unused, but keep the GEMM input defined
                    continue;
                }
                T* act = a.act + row * SP;
                gru_before_gates_row(Hp, act, act + Hp, gh + (b - lo) * GP, f.bx,
                                     a.hprev + row * Hp, rh);
            }
            gemm<T>(false, Bc, Hp, Hp, T(1), a.rh + (lo * Tn + t) * Hp, Tn * Hp, f.w_hh_t + 2 * Hp,
                    GP, T(0), ghn, Hp, path);
        }
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t row = b * Tn + t;
            const T* h_prev = a.hprev + row * Hp;
            T* h_next = t + 1 == Tn ? last + (b - lo) * Hp : a.hprev + (row + 1) * Hp;
            T* out = a.out + row * H;
            if (a.lengths && t >= a.lengths[b]) {  // past this sequence's end: carry the state
                std::memset(out, 0, H * sizeof(T));
                std::memcpy(h_next, h_prev, Hp * sizeof(T));
                continue;
            }
            T* act = a.act + row * SP;
            const T* ghb = gh + (b - lo) * GP;
            if (s.cell == Cell::rnn)
                rnn_fwd_row(Hp, s.relu, act, ghb, f.bx, h_next);
            else if (gru_before)
                gru_before_new_row(Hp, act, act + Hp, act + 2 * Hp, act + 3 * Hp,
                                   ghn + (b - lo) * Hp, f.bx + 2 * Hp, f.bhn, h_prev,
                                   h_next);
            else
                gru_after_fwd_row(Hp, act, act + Hp, act + 2 * Hp, act + 3 * Hp, ghb, f.bx, f.bhn,
                                  h_prev, h_next);
            std::memcpy(out, h_next, H * sizeof(T));
        }
    }
    for (int64_t b = lo; b < hi && Tn > 0; ++b)  // the final state
        std::memcpy(a.h_n + b * H, last + (b - lo) * Hp, H * sizeof(T));
}

// the time loop per ISA (the pointwise rows vectorise to the widest one available)
RK_CLONES void fwd_rows(const Fwd<float>& f, int64_t lo, int64_t hi) {
    forward_rows_impl(f, lo, hi);
}
RK_CLONES void fwd_rows(const Fwd<double>& f, int64_t lo, int64_t hi) {
    forward_rows_impl(f, lo, hi);
}

template <typename T>
struct Bwd {
    const BackwardArgs<T>* a;
    Dims d;
    int n;              // chunks
    const T* w_ih_p;    // [GP, I] W_ih, padded gate rows zero
    const T* w_hh_p;    // [GP, Hp] W_hh, padded gate rows and columns zero
    T* d_gx;            // [B,T,GP] gate pre-activation gradients (the input side)
    T* d_gh;            // [B,T,GP] their hidden side: d_gx itself but for GRU reset_after
    T* dh;              // [B,Hp] the running dh
    T* d_rh;            // [B,Hp] a step's d(r h) (GRU reset-before)
    T* parts;           // per chunk its partials: [dW_ih^T [I,GP] | dW_hh^T [Hp,GP] | db_ih | db_hh]
    int64_t part_size;  // GP * (I + Hp + 2)
    T* tables;          // table input: per chunk [V,G*H] its partial table gradient
    GemmPath path;
};

// The backward of chunk [lo, hi): its rows of d_gx (and d_gh), dh0, its partial weight
// gradients and its input gradient.
template <typename T>
RK_ALWAYS_INLINE void backward_rows_impl(const Bwd<T>& w, int64_t lo, int64_t hi) {
    const BackwardArgs<T>& a = *w.a;
    const Dims& d = w.d;
    const Spec& s = a.spec;
    const int64_t Tn = d.Tn, H = d.H, Hp = d.Hp, GP = d.GP, SP = d.SP, I = d.I, Bc = hi - lo;
    const bool gru_after = s.cell == Cell::gru && s.reset_after;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;
    const GemmPath path = w.path;
    T* d_gx = w.d_gx;
    T* d_gh = w.d_gh;
    T* dh = w.dh;
    const int64_t R = Bc * Tn, r0 = lo * Tn;
    std::memset(dh + lo * Hp, 0, Bc * Hp * sizeof(T));
    if (a.d_h_n)
        for (int64_t b = lo; b < hi; ++b)
            std::memcpy(dh + b * Hp, a.d_h_n + b * H, H * sizeof(T));
    T* const d_rh = gru_before ? w.d_rh + lo * Hp : nullptr;  // this chunk's rows
    for (int64_t t = Tn - 1; t >= 0; --t) {
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t row = b * Tn + t;
            if (a.lengths && t >= a.lengths[b]) {  // past its end: zero gate gradients
                std::memset(d_gx + row * GP, 0, GP * sizeof(T));
                if (gru_after) std::memset(d_gh + row * GP, 0, GP * sizeof(T));
                continue;
            }
            const T* act = a.act + row * SP;
            const T* d_out = a.d_out ? a.d_out + row * H : nullptr;
            T* dgx = d_gx + row * GP;
            if (s.cell == Cell::rnn)
                rnn_back_row(H, Hp, s.relu, act, d_out, dh + b * Hp, dgx);
            else if (gru_after) {
                T* dgh = d_gh + row * GP;
                gru_after_back_row(H, Hp, act, a.hprev + row * Hp, d_out, dh + b * Hp, dgx,
                                   dgx + Hp, dgx + 2 * Hp, dgh, dgh + Hp, dgh + 2 * Hp);
            } else {
                gru_before_back_row1(H, Hp, act, a.hprev + row * Hp, d_out, dh + b * Hp,
                                     dgx + Hp, dgx + 2 * Hp);
            }
        }
        const int64_t first = lo * Tn + t;  // row (lo, t); rows of one step are T*GP apart
        if (gru_before) {
            // d_rh = d_an W_hn; rows of finished sequences are zero
            gemm<T>(false, Bc, Hp, Hp, T(1), d_gx + first * GP + 2 * Hp, Tn * GP,
                    w.w_hh_p + 2 * Hp * Hp, Hp, T(0), d_rh, Hp, path);
            for (int64_t b = lo; b < hi; ++b) {
                if (a.lengths && t >= a.lengths[b]) continue;
                const int64_t row = b * Tn + t;
                gru_before_back_row2(Hp, a.act + row * SP, a.hprev + row * Hp,
                                     d_rh + (b - lo) * Hp, dh + b * Hp, d_gx + row * GP);
            }
            // dh += [d_ar d_az] W_h{r,z}
            gemm<T>(false, Bc, Hp, 2 * Hp, T(1), d_gx + first * GP, Tn * GP, w.w_hh_p, Hp, T(1),
                    dh + lo * Hp, Hp, path);
        } else {
            gemm<T>(false, Bc, Hp, GP, T(1), d_gh + first * GP, Tn * GP, w.w_hh_p, Hp, T(1),
                    dh + lo * Hp, Hp, path);
        }
    }
    if (a.dh0)
        for (int64_t b = lo; b < hi; ++b) std::memcpy(a.dh0 + b * H, dh + b * Hp, H * sizeof(T));
    // this chunk's partial weight gradients from its B*T rows, while they are in cache
    T* pw_ih = w.parts + chunk_index(a.B, w.n, lo) * w.part_size;  // [I, GP]
    T* pw_hh = pw_ih + I * GP;                                       // [Hp, GP]
    T* pb_ih = pw_hh + Hp * GP;
    T* pb_hh = pb_ih + GP;
    if (!a.projected)
        gemm<T>(true, I, GP, R, T(1), a.x + r0 * I, I, d_gx + r0 * GP, GP, T(0), pw_ih, GP, path);
    if (gru_before) {
        gemm<T>(true, Hp, 2 * Hp, R, T(1), a.hprev + r0 * Hp, Hp, d_gx + r0 * GP, GP, T(0), pw_hh,
                GP, path);
        gemm<T>(true, Hp, Hp, R, T(1), a.rh + r0 * Hp, Hp, d_gx + r0 * GP + 2 * Hp, GP, T(0),
                pw_hh + 2 * Hp, GP, path);
    } else {
        gemm<T>(true, Hp, GP, R, T(1), a.hprev + r0 * Hp, Hp, d_gh + r0 * GP, GP, T(0), pw_hh, GP,
                path);
    }
    column_sums(R, GP, d_gx + r0 * GP, pb_ih);
    if (gru_after) column_sums(R, GP, d_gh + r0 * GP, pb_hh);
    // the input gradient of this chunk's rows
    const int64_t GH = d.G * H;
    if (!a.projected) {
        if (a.dx)
            gemm<T>(false, R, I, GP, T(1), d_gx + r0 * GP, GP, w.w_ih_p, I, T(0), a.dx + r0 * I, I,
                    path);
    } else if (!a.ids) {
        for (int64_t r = r0; r < r0 + R; ++r)
            for (int64_t g = 0; g < d.G; ++g)
                std::memcpy(a.dx + r * GH + g * H, d_gx + r * GP + g * Hp, H * sizeof(T));
    } else {
        T* table = w.tables + chunk_index(a.B, w.n, lo) * a.V * GH;
        std::memset(table, 0, a.V * GH * sizeof(T));
        for (int64_t r = r0; r < r0 + R; ++r) {
            T* __restrict__ row = table + a.ids[r] * GH;
            const T* __restrict__ dg = d_gx + r * GP;
            for (int64_t g = 0; g < d.G; ++g)
                for (int64_t j = 0; j < H; ++j) row[g * H + j] += dg[g * Hp + j];
        }
    }
}

RK_CLONES void bwd_rows(const Bwd<float>& w, int64_t lo, int64_t hi) {
    backward_rows_impl(w, lo, hi);
}
RK_CLONES void bwd_rows(const Bwd<double>& w, int64_t lo, int64_t hi) {
    backward_rows_impl(w, lo, hi);
}

// After every chunk: the partial weight and table gradients summed in chunk order, unpadded.
template <typename T>
void backward_finish_impl(const Bwd<T>& w) {
    const BackwardArgs<T>& a = *w.a;
    const Dims& d = w.d;
    const int64_t H = d.H, Hp = d.Hp, I = d.I, G = d.G, GP = d.GP, GH = G * H;
    const bool gru_after = a.spec.cell == Cell::gru && a.spec.reset_after;
    auto sum = [&](int64_t e) {  // element e of a chunk's partials, summed over the chunks
        T v = w.parts[e];
        for (int c = 1; c < w.n; ++c) v += w.parts[c * w.part_size + e];
        return v;
    };
    const int64_t hh = I * GP, bi = hh + Hp * GP, bh = bi + GP;  // offsets in a chunk's partials
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < H; ++j) {
            const int64_t row = g * H + j, col = g * Hp + j;
            if (!a.projected)
                for (int64_t i = 0; i < I; ++i) a.dw_ih[row * I + i] = sum(i * GP + col);
            for (int64_t k = 0; k < H; ++k) a.dw_hh[row * H + k] = sum(hh + k * GP + col);
            a.db_ih[row] = sum(bi + col);
            a.db_hh[row] = gru_after ? sum(bh + col) : a.db_ih[row];
        }
    if (a.projected && a.dw_ih != a.dx)  // the caller's to form (unless it is dx: table_t)
        std::memset(a.dw_ih, 0, GH * I * sizeof(T));
    if (a.ids) {  // the chunks' table partials into dx
        const TableIndex at(a.V, GH, a.table_t);
        for (int64_t v = 0; v < a.V; ++v)
            for (int64_t g = 0; g < GH; ++g) {
                T total = w.tables[v * GH + g];
                for (int c = 1; c < w.n; ++c) total += w.tables[(c * a.V + v) * GH + g];
                a.dx[at(v, g)] = total;
            }
    }
}

template <typename T>
class RnnGruLayer final : public Layer<T> {
  public:
    void forward_prepare(const ForwardArgs<T>& a, int n) override {
        const Dims d(a.spec, a.B, a.T_, a.I, a.H, sizeof(T));
        const int64_t I = d.I, H = d.H, Hp = d.Hp, GP = d.GP;
        // transposed, padded weights: every GEMM reads its B operand as whole-vector [K, N] rows
        T* w_ih_t = a.projected ? nullptr : grow(buf_.w_ih_t, I * GP);
        T* w_hh_t = grow(buf_.w_hh_t, Hp * GP);
        T* bx = grow(buf_.bx, GP);
        T* bhn = grow(buf_.bhn, Hp);
        if (w_ih_t) std::memset(w_ih_t, 0, I * GP * sizeof(T));
        std::memset(w_hh_t, 0, Hp * GP * sizeof(T));
        std::memset(bx, 0, GP * sizeof(T));
        std::memset(bhn, 0, Hp * sizeof(T));
        const bool gru = a.spec.cell == Cell::gru;
        for (int64_t g = 0; g < d.G; ++g)
            for (int64_t j = 0; j < H; ++j) {
                const int64_t row = g * H + j, col = g * Hp + j;
                for (int64_t i = 0; w_ih_t && i < I; ++i) w_ih_t[i * GP + col] = a.w_ih[row * I + i];
                for (int64_t k = 0; k < H; ++k) w_hh_t[k * GP + col] = a.w_hh[row * H + k];
                // a GRU's b_hn stays inside W_hn's product; every other pair of biases is summed
                const bool n_block = gru && g == 2;
                bx[col] = n_block ? a.b_ih[row] : a.b_ih[row] + a.b_hh[row];
                if (n_block) bhn[j] = a.b_hh[row];
            }
        // one thread: GEMMs as sized; several: each thread's on the loop (no nested BLAS
        // threads)
        const bool gru_before = gru && !a.spec.reset_after;
        f_ = Fwd<T>{&a, d, w_ih_t, w_hh_t, bx, bhn, grow(buf_.gh, a.B * GP),
                    gru_before ? grow(buf_.ghn, a.B * Hp) : nullptr, grow(buf_.last, a.B * Hp),
                    n > 1 ? GemmPath::loop : GemmPath::automatic};
    }
    void forward_rows(int64_t lo, int64_t hi) const override { fwd_rows(f_, lo, hi); }

    void backward_prepare(const BackwardArgs<T>& a, int n) override {
        const Dims d(a.spec, a.B, a.T_, a.I, a.H, sizeof(T));
        const int64_t I = d.I, H = d.H, Hp = d.Hp, GP = d.GP, BT = a.B * a.T_;
        const bool gru_after = a.spec.cell == Cell::gru && a.spec.reset_after;
        T* w_ih_p = a.projected ? nullptr : grow(buf_.w_ih_p, GP * I);
        T* w_hh_p = grow(buf_.w_hh_p, GP * Hp);
        if (w_ih_p) std::memset(w_ih_p, 0, GP * I * sizeof(T));
        std::memset(w_hh_p, 0, GP * Hp * sizeof(T));
        for (int64_t g = 0; g < d.G; ++g)
            for (int64_t j = 0; j < H; ++j) {
                const int64_t row = g * H + j, col = g * Hp + j;
                if (w_ih_p) std::memcpy(w_ih_p + col * I, a.w_ih + row * I, I * sizeof(T));
                std::memcpy(w_hh_p + col * Hp, a.w_hh + row * H, H * sizeof(T));
            }
        T* d_gx = grow(buf_.d_gx, BT * GP);
        const int64_t part_size = GP * (I + Hp + 2);
        b_ = Bwd<T>{&a, d, n, w_ih_p, w_hh_p, d_gx, gru_after ? grow(buf_.d_gh, BT * GP) : d_gx,
                    grow(buf_.dh, a.B * Hp),
                    a.spec.cell == Cell::gru && !a.spec.reset_after ? grow(buf_.d_rh, a.B * Hp)
                                                                    : nullptr,
                    grow(buf_.parts, n * part_size), part_size,
                    a.ids ? grow(buf_.tables, n * a.V * d.G * H) : nullptr,
                    n > 1 ? GemmPath::loop : GemmPath::automatic};
    }
    void backward_rows(int64_t lo, int64_t hi) const override { bwd_rows(b_, lo, hi); }
    void backward_finish() const override { backward_finish_impl(b_); }

  private:
    Buffers<T> buf_;
    Fwd<T> f_{nullptr, Dims(Spec{}, 0, 0, 0, 0, sizeof(T)), nullptr, nullptr, nullptr, nullptr,
              nullptr, nullptr, nullptr, GemmPath::automatic};
    Bwd<T> b_{nullptr, Dims(Spec{}, 0, 0, 0, 0, sizeof(T)), 0, nullptr, nullptr, nullptr,
              nullptr, nullptr, nullptr, nullptr, 0, nullptr, GemmPath::automatic};
};

}  // namespace

template <typename T>
std::unique_ptr<Layer<T>> make_rnn_gru_layer() {
    return std::unique_ptr<Layer<T>>(new RnnGruLayer<T>);
}
template std::unique_ptr<Layer<float>> make_rnn_gru_layer<float>();
template std::unique_ptr<Layer<double>> make_rnn_gru_layer<double>();

}  // namespace rk
