// The RNN and GRU layers (the phases of layer.h; the LSTM's are lstm.cpp). Shape legend and the
// arrays' layouts: kernels.h; the pointwise math: rnnkern/cells.h.
//
// Forward, per batch chunk: what is not recurrent is hoisted out of the time loop: gx =
// x W_ih^T + b_ih for the chunk's B*T rows as one GEMM, written straight into the activation
// buffer `act` (row stride S*H >= G*H). Each step then runs one h W_hh^T GEMM and one fused
// pointwise pass that turns those pre-activations into the saved activations in place.
// Backward, per chunk: per step one fused pointwise pass from dh to the gate gradients d_gx,
// then dh_prev = d_gh W_hh as one GEMM accumulated into dh; after the loop the chunk's dx =
// d_gx W_ih is one GEMM. The finish (after the join) forms dW_ih = d_gx^T x, dW_hh =
// d_gh^T h_prev and the biases' sums over all B*T rows at once. Steps past lengths[b] leave
// the rows of d_gx at zero, so those GEMMs need no masks, and carry dh unchanged.
//
// Projected input (kernels.h): gx = b_ih + the given row x_orig W_ih^T (from x, or from the
// table row of the step's id) instead of the GEMM; the backward's d_gx rows are then dx itself,
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

// ---- forward pointwise rows: one (b, t), j = 0..H-1 ----------------------------------------
// act: this row's S*H slots, holding gx (= x W_ih^T + b_ih, G*H of them) on entry.
// gh: this row of h W_hh^T (no bias).

template <typename T>
RK_ALWAYS_INLINE void rnn_fwd_row(int64_t H, bool relu, T* __restrict__ act,
                                  const T* __restrict__ gh, const T* __restrict__ b_hh,
                                  T* __restrict__ h_new) {
    for (int64_t j = 0; j < H; ++j) {
        const T h = rnn_forward_point(act[j] + gh[j] + b_hh[j], relu);
        act[j] = h;
        h_new[j] = h;
    }
}

// GRU, reset_after=true: gh holds all three blocks of h W_hh^T.
template <typename T>
RK_ALWAYS_INLINE void gru_after_fwd_row(int64_t H, T* act, const T* __restrict__ gh,
                                        const T* __restrict__ bh, const T* __restrict__ h_prev,
                                        T* __restrict__ h_new) {
    // one restrict pointer per slot block: with a single `act` GCC cannot rule out that a write
    // to act[j] feeds a later read of act[H + j'] and leaves the loop scalar; results go into
    // locals first for the same reason
    T* __restrict__ s_r = act;
    T* __restrict__ s_z = act + H;
    T* __restrict__ s_n = act + 2 * H;
    T* __restrict__ s_ghn = act + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
        T r, z, n, h;
        gru_gates_point(s_r[j] + gh[j] + bh[j], s_z[j] + gh[H + j] + bh[H + j], r, z);
        const T ghn = gh[2 * H + j] + bh[2 * H + j];
        gru_forward_point(r, z, s_n[j], ghn, h_prev[j], true, n, h);
        h_new[j] = h;
        s_r[j] = r;
        s_z[j] = z;
        s_n[j] = n;
        s_ghn[j] = ghn;
    }
}

// GRU, reset_after=false, phase 1: gates r, z (gh holds the r, z blocks) and r*h for the W_hn GEMM.
template <typename T>
RK_ALWAYS_INLINE void gru_before_gates_row(int64_t H, T* act, const T* __restrict__ gh,
                                           const T* __restrict__ bh, const T* __restrict__ h_prev,
                                           T* __restrict__ rh) {
    T* __restrict__ s_r = act;
    T* __restrict__ s_z = act + H;
    for (int64_t j = 0; j < H; ++j) {
        T r, z;
        gru_gates_point(s_r[j] + gh[j] + bh[j], s_z[j] + gh[H + j] + bh[H + j], r, z);
        s_r[j] = r;
        s_z[j] = z;
        rh[j] = r * h_prev[j];
    }
}

// GRU, reset_after=false, phase 2: ghn = (r h) W_hn^T without bias.
template <typename T>
RK_ALWAYS_INLINE void gru_before_new_row(int64_t H, T* act, const T* __restrict__ ghn,
                                         const T* __restrict__ b_hn, const T* __restrict__ h_prev,
                                         T* __restrict__ h_new) {
    const T* __restrict__ s_r = act;
    const T* __restrict__ s_z = act + H;
    T* __restrict__ s_n = act + 2 * H;
    T* __restrict__ s_ghn = act + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
        T n, h;
        const T g = ghn[j] + b_hn[j];
        gru_forward_point(s_r[j], s_z[j], s_n[j], g, h_prev[j], false, n, h);
        h_new[j] = h;
        s_n[j] = n;
        s_ghn[j] = g;
    }
}

// ---- backward pointwise rows: one (b, t), j = 0..H-1 ---------------------------------------
// dh: this batch row of the running dh, replaced by the part of dh_prev that bypasses W_hh
// (the GEMM adds the rest); d_out: this row of d_outputs or null.

template <typename T>
RK_ALWAYS_INLINE void rnn_back_row(int64_t H, bool relu, const T* __restrict__ act,
                                   const T* __restrict__ d_out, T* __restrict__ dh,
                                   T* __restrict__ dgx) {
    for (int64_t j = 0; j < H; ++j) {
        dgx[j] = rnn_backward_point(act[j], (d_out ? dh[j] + d_out[j] : dh[j]), relu);
        dh[j] = T(0);
    }
}

// GRU reset_after=true: d_gh differs from d_gx in the n block (d_an * r).
template <typename T>
RK_ALWAYS_INLINE void gru_after_back_row(int64_t H, const T* __restrict__ act,
                                         const T* __restrict__ h_prev, const T* __restrict__ d_out,
                                         T* __restrict__ dh, T* dgx, T* dgh) {
    T* __restrict__ x_r = dgx;
    T* __restrict__ x_z = dgx + H;
    T* __restrict__ x_n = dgx + 2 * H;
    T* __restrict__ h_r = dgh;
    T* __restrict__ h_z = dgh + H;
    T* __restrict__ h_n = dgh + 2 * H;
    for (int64_t j = 0; j < H; ++j) {
        T d_ar, d_az, d_an, d_ghn, direct;
        gru_backward_point(act[j], act[H + j], act[2 * H + j], act[3 * H + j], h_prev[j],
                           (d_out ? dh[j] + d_out[j] : dh[j]), true, d_ar, d_az, d_an, d_ghn,
                           direct);
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
RK_ALWAYS_INLINE void gru_before_back_row1(int64_t H, const T* __restrict__ act,
                                           const T* __restrict__ h_prev,
                                           const T* __restrict__ d_out, T* __restrict__ dh,
                                           T* dgx) {
    T* __restrict__ x_z = dgx + H;
    T* __restrict__ x_n = dgx + 2 * H;
    for (int64_t j = 0; j < H; ++j) {
        T d_ar, d_az, d_an, d_ghn, direct;
        gru_backward_point(act[j], act[H + j], act[2 * H + j], act[3 * H + j], h_prev[j],
                           (d_out ? dh[j] + d_out[j] : dh[j]), false, d_ar, d_az, d_an, d_ghn,
                           direct);
        x_z[j] = d_az;
        x_n[j] = d_an;
        dh[j] = direct;
    }
}

template <typename T>
RK_ALWAYS_INLINE void gru_before_back_row2(int64_t H, const T* __restrict__ act,
                                           const T* __restrict__ h_prev,
                                           const T* __restrict__ d_rh, T* __restrict__ dh,
                                           T* __restrict__ dgx) {
    for (int64_t j = 0; j < H; ++j) {
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
    Buffer<T> w_ih_t, w_hh_t, d_gx, d_gh, dh, tables;
};

template <typename T>
struct Fwd {
    const ForwardArgs<T>* a;
    const T* w_ih_t;  // [I,G*H], or null (projected input)
    const T* w_hh_t;  // [H,G*H]
    GemmPath path;
};

template <typename T>
RK_ALWAYS_INLINE void forward_rows_impl(const Fwd<T>& f, int64_t lo, int64_t hi) {
    const ForwardArgs<T>& a = *f.a;
    const Spec& s = a.spec;
    const int64_t Tn = a.T_, I = a.I, H = a.H, Bc = hi - lo;
    const int64_t G = gates_of(s.cell), GH = G * H, SH = slots_of(s.cell) * H;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;
    const GemmPath path = f.path;

    for (int64_t b = lo; b < hi; ++b) {  // the state entering step 0
        T* hp = Tn > 0 ? a.hprev + b * Tn * H : a.h_n + b * H;
        if (a.h0) std::memcpy(hp, a.h0 + b * H, H * sizeof(T));
        else std::memset(hp, 0, H * sizeof(T));
    }
    // act[lo:hi, :, :G*H] = b_ih + x W_ih^T: this chunk's B*T rows at once, hoisted out of the
    // time loop (each chunk does its own, so no BLAS thread pool runs beside the chunk threads)
    if (a.projected) {
        const TableIndex at(a.V, GH, a.table_t);
        for (int64_t r = lo * Tn; r < hi * Tn; ++r) {
            T* __restrict__ gx = a.act + r * SH;
            if (a.ids) {
                const int64_t v = a.ids[r];
                for (int64_t g = 0; g < GH; ++g) gx[g] = a.b_ih[g] + a.x[at(v, g)];
            } else {
                const T* __restrict__ xr = a.x + r * GH;
                for (int64_t g = 0; g < GH; ++g) gx[g] = a.b_ih[g] + xr[g];
            }
        }
    } else {
        for (int64_t r = lo * Tn; r < hi * Tn; ++r)
            std::memcpy(a.act + r * SH, a.b_ih, GH * sizeof(T));
        gemm<T>(false, Bc * Tn, GH, I, T(1), a.x + lo * Tn * I, I, f.w_ih_t, GH, T(1),
                a.act + lo * Tn * SH, SH, path);
    }
    Buffer<T> gh(Bc * GH), ghn(gru_before ? Bc * H : 0);
    const int64_t n_rec = gru_before ? 2 * H : GH;  // columns of h W_hh^T computed from h itself
    for (int64_t t = 0; t < Tn; ++t) {
        // gh = h_t W_hh^T: row b of h_t is hprev[b, t], rows T*H apart
        gemm<T>(false, Bc, n_rec, H, T(1), a.hprev + lo * Tn * H + t * H, Tn * H, f.w_hh_t, GH,
                T(0), gh.data(), GH, path);
        if (gru_before) {
            for (int64_t b = lo; b < hi; ++b) {
                const int64_t row = b * Tn + t;
                T* rh = a.rh + row * H;
                if (a.lengths && t >= a.lengths[b]) {
                    std::memset(rh, 0, H * sizeof(T));  // unused, but keep the GEMM input defined
                    continue;
                }
                gru_before_gates_row(H, a.act + row * SH, gh.data() + (b - lo) * GH, a.b_hh,
                                     a.hprev + row * H, rh);
            }
            gemm<T>(false, Bc, H, H, T(1), a.rh + lo * Tn * H + t * H, Tn * H, f.w_hh_t + 2 * H,
                    GH, T(0), ghn.data(), H, path);
        }
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t row = b * Tn + t;
            const bool last = t + 1 == Tn;
            const T* h_prev = a.hprev + row * H;
            T* h_next = last ? a.h_n + b * H : a.hprev + (row + 1) * H;
            T* out = a.out + row * H;
            if (a.lengths && t >= a.lengths[b]) {  // past this sequence's end: carry the state
                std::memset(out, 0, H * sizeof(T));
                std::memcpy(h_next, h_prev, H * sizeof(T));
                continue;
            }
            T* act = a.act + row * SH;
            const T* ghb = gh.data() + (b - lo) * GH;
            if (s.cell == Cell::rnn)
                rnn_fwd_row(H, s.relu, act, ghb, a.b_hh, out);
            else if (gru_before)
                gru_before_new_row(H, act, ghn.data() + (b - lo) * H, a.b_hh + 2 * H, h_prev,
                                   out);
            else
                gru_after_fwd_row(H, act, ghb, a.b_hh, h_prev, out);
            std::memcpy(h_next, out, H * sizeof(T));
        }
    }
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
    int n;       // chunks
    T* d_gx;     // [B,T,G*H] gate pre-activation gradients (the input side)
    T* d_gh;     // [B,T,G*H] their hidden side: d_gx itself but for GRU reset_after
    T* dh;       // [B,H] the running dh
    T* tables;   // table input: per chunk [V,G*H] its partial table gradient
    GemmPath path;
};

// The backward of chunk [lo, hi): its rows of d_gx (and d_gh), dh0, and its input gradient.
template <typename T>
RK_ALWAYS_INLINE void backward_rows_impl(const Bwd<T>& w, int64_t lo, int64_t hi) {
    const BackwardArgs<T>& a = *w.a;
    const Spec& s = a.spec;
    const int64_t Tn = a.T_, H = a.H, Bc = hi - lo;
    const int64_t G = gates_of(s.cell), GH = G * H, SH = slots_of(s.cell) * H;
    const bool gru_after = s.cell == Cell::gru && s.reset_after;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;
    const GemmPath path = w.path;
    T* d_gx = w.d_gx;
    T* d_gh = w.d_gh;
    T* dh = w.dh;
    // rows past a sequence's end keep zero gate gradients
    std::memset(d_gx + lo * Tn * GH, 0, Bc * Tn * GH * sizeof(T));
    if (gru_after) std::memset(d_gh + lo * Tn * GH, 0, Bc * Tn * GH * sizeof(T));
    if (a.d_h_n) std::memcpy(dh + lo * H, a.d_h_n + lo * H, Bc * H * sizeof(T));
    else std::memset(dh + lo * H, 0, Bc * H * sizeof(T));
    Buffer<T> d_rh(gru_before ? Bc * H : 0);
    for (int64_t t = Tn - 1; t >= 0; --t) {
        for (int64_t b = lo; b < hi; ++b) {
            if (a.lengths && t >= a.lengths[b]) continue;
            const int64_t row = b * Tn + t;
            const T* act = a.act + row * SH;
            const T* d_out = a.d_out ? a.d_out + row * H : nullptr;
            T* dgx = d_gx + row * GH;
            if (s.cell == Cell::rnn)
                rnn_back_row(H, s.relu, act, d_out, dh + b * H, dgx);
            else if (gru_after)
                gru_after_back_row(H, act, a.hprev + row * H, d_out, dh + b * H, dgx,
                                   d_gh + row * GH);
            else
                gru_before_back_row1(H, act, a.hprev + row * H, d_out, dh + b * H, dgx);
        }
        const int64_t first = lo * Tn + t;  // row (lo, t); rows of one step are T*G*H apart
        if (gru_before) {
            // d_rh = d_an W_hn; rows of finished sequences are zero
            gemm<T>(false, Bc, H, H, T(1), d_gx + first * GH + 2 * H, Tn * GH, a.w_hh + 2 * H * H,
                    H, T(0), d_rh.data(), H, path);
            for (int64_t b = lo; b < hi; ++b) {
                if (a.lengths && t >= a.lengths[b]) continue;
                const int64_t row = b * Tn + t;
                gru_before_back_row2(H, a.act + row * SH, a.hprev + row * H,
                                     d_rh.data() + (b - lo) * H, dh + b * H, d_gx + row * GH);
            }
            // dh += [d_ar d_az] W_h{r,z}
            gemm<T>(false, Bc, H, 2 * H, T(1), d_gx + first * GH, Tn * GH, a.w_hh, H, T(1),
                    dh + lo * H, H, path);
        } else {
            gemm<T>(false, Bc, H, GH, T(1), d_gh + first * GH, Tn * GH, a.w_hh, H, T(1),
                    dh + lo * H, H, path);
        }
    }
    if (a.dh0) std::memcpy(a.dh0 + lo * H, dh + lo * H, Bc * H * sizeof(T));
    // the input gradient of this chunk's B*T rows (the weight gradients need every row: finish)
    if (!a.projected) {
        if (a.dx)
            gemm<T>(false, Bc * Tn, a.I, GH, T(1), d_gx + lo * Tn * GH, GH, a.w_ih, a.I, T(0),
                    a.dx + lo * Tn * a.I, a.I, path);
    } else if (!a.ids) {
        std::memcpy(a.dx + lo * Tn * GH, d_gx + lo * Tn * GH, Bc * Tn * GH * sizeof(T));
    } else {
        T* table = w.tables + chunk_index(a.B, w.n, lo) * a.V * GH;
        std::memset(table, 0, a.V * GH * sizeof(T));
        for (int64_t r = lo * Tn; r < hi * Tn; ++r) {
            T* __restrict__ row = table + a.ids[r] * GH;
            const T* __restrict__ d = d_gx + r * GH;
            for (int64_t g = 0; g < GH; ++g) row[g] += d[g];
        }
    }
}

RK_CLONES void bwd_rows(const Bwd<float>& w, int64_t lo, int64_t hi) {
    backward_rows_impl(w, lo, hi);
}
RK_CLONES void bwd_rows(const Bwd<double>& w, int64_t lo, int64_t hi) {
    backward_rows_impl(w, lo, hi);
}

// After every chunk: the table partials in chunk order, and the weight gradients over all rows.
template <typename T>
void backward_finish_impl(const Bwd<T>& w) {
    const BackwardArgs<T>& a = *w.a;
    const Spec& s = a.spec;
    const int64_t BT = a.B * a.T_, H = a.H, GH = gates_of(s.cell) * H;
    const bool gru_after = s.cell == Cell::gru && s.reset_after;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;
    if (!a.projected) {
        gemm<T>(true, GH, a.I, BT, T(1), w.d_gx, GH, a.x, a.I, T(0), a.dw_ih, a.I);
    } else if (a.dw_ih != a.dx) {  // the caller's to form (unless it is dx: table_t)
        std::memset(a.dw_ih, 0, GH * a.I * sizeof(T));
    }
    if (a.ids) {  // the chunks' table partials, summed in chunk order, into dx
        const TableIndex at(a.V, GH, a.table_t);
        for (int64_t v = 0; v < a.V; ++v)
            for (int64_t g = 0; g < GH; ++g) {
                T sum = w.tables[v * GH + g];
                for (int c = 1; c < w.n; ++c) sum += w.tables[(c * a.V + v) * GH + g];
                a.dx[at(v, g)] = sum;
            }
    }
    column_sums(BT, GH, w.d_gx, a.db_ih);
    if (gru_before) {
        gemm<T>(true, 2 * H, H, BT, T(1), w.d_gx, GH, a.hprev, H, T(0), a.dw_hh, H);
        gemm<T>(true, H, H, BT, T(1), w.d_gx + 2 * H, GH, a.rh, H, T(0), a.dw_hh + 2 * H * H, H);
        std::memcpy(a.db_hh, a.db_ih, GH * sizeof(T));
    } else {
        gemm<T>(true, GH, H, BT, T(1), w.d_gh, GH, a.hprev, H, T(0), a.dw_hh, H);
        if (gru_after) column_sums(BT, GH, w.d_gh, a.db_hh);
        else std::memcpy(a.db_hh, a.db_ih, GH * sizeof(T));
    }
}

template <typename T>
class RnnGruLayer final : public Layer<T> {
  public:
    void forward_prepare(const ForwardArgs<T>& a, int n) override {
        const int64_t I = a.I, H = a.H, GH = gates_of(a.spec.cell) * H;
        // transposed weights, so every GEMM reads its B operand as [K, N] rows
        T* w_ih_t = a.projected ? nullptr : grow(buf_.w_ih_t, I * GH);
        T* w_hh_t = grow(buf_.w_hh_t, H * GH);
        for (int64_t g = 0; g < GH; ++g) {
            for (int64_t i = 0; w_ih_t && i < I; ++i) w_ih_t[i * GH + g] = a.w_ih[g * I + i];
            for (int64_t k = 0; k < H; ++k) w_hh_t[k * GH + g] = a.w_hh[g * H + k];
        }
        // one thread: GEMMs as sized; several: each thread's on the loop (no nested BLAS
        // threads)
        f_ = Fwd<T>{&a, w_ih_t, w_hh_t, n > 1 ? GemmPath::loop : GemmPath::automatic};
    }
    void forward_rows(int64_t lo, int64_t hi) const override { fwd_rows(f_, lo, hi); }

    void backward_prepare(const BackwardArgs<T>& a, int n) override {
        const int64_t BT = a.B * a.T_, GH = gates_of(a.spec.cell) * a.H;
        const bool gru_after = a.spec.cell == Cell::gru && a.spec.reset_after;
        T* d_gx = grow(buf_.d_gx, BT * GH);
        b_ = Bwd<T>{&a, n, d_gx, gru_after ? grow(buf_.d_gh, BT * GH) : d_gx,
                    grow(buf_.dh, a.B * a.H), a.ids ? grow(buf_.tables, n * a.V * GH) : nullptr,
                    n > 1 ? GemmPath::loop : GemmPath::automatic};
    }
    void backward_rows(int64_t lo, int64_t hi) const override { bwd_rows(b_, lo, hi); }
    void backward_finish() const override { backward_finish_impl(b_); }

  private:
    Buffers<T> buf_;
    Fwd<T> f_{};
    Bwd<T> b_{};
};

}  // namespace

template <typename T>
std::unique_ptr<Layer<T>> make_rnn_gru_layer() {
    return std::unique_ptr<Layer<T>>(new RnnGruLayer<T>);
}
template std::unique_ptr<Layer<float>> make_rnn_gru_layer<float>();
template std::unique_ptr<Layer<double>> make_rnn_gru_layer<double>();

}  // namespace rk
