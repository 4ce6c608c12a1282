// Backprop through time for RNN / GRU (shape legend in kernels.h; the LSTM has its own: lstm.cpp).
// Per step: one fused pointwise pass from dh to the gate gradients d_gx, then
// dh_prev = d_gh W_hh as one GEMM accumulated into dh. After the loop, everything that is not
// recurrent is one GEMM over all B*T rows: dx = d_gx W_ih (per row chunk when the loop runs on
// threads, chunks.h), dW_ih = d_gx^T x and dW_hh = d_gh^T h_prev (after the chunks join).
// Steps past lengths[b] leave the rows of d_gx at zero, so the GEMMs need no masks, and carry dh
// unchanged.
#include <cstring>
#include <vector>

#include "chunks.h"
#include "dispatch.h"
#include "gemm.h"
#include "kernels.h"
#include "rnnkern/cells.h"

namespace rk {
namespace {

// ---- pointwise rows: one (b, t), j = 0..H-1 ------------------------------------------------
// dh: this batch row of the running dh, replaced by the part of dh_prev that bypasses W_hh
// (the GEMM adds the rest); d_out: this row of d_outputs or null.

template <typename T>
RK_ALWAYS_INLINE void rnn_row(int64_t H, bool relu, const T* __restrict__ act,
                              const T* __restrict__ d_out, T* __restrict__ dh,
                              T* __restrict__ dgx) {
    for (int64_t j = 0; j < H; ++j) {
        dgx[j] = rnn_backward_point(act[j], (d_out ? dh[j] + d_out[j] : dh[j]), relu);
        dh[j] = T(0);
    }
}

// GRU reset_after=true: d_gh differs from d_gx in the n block (d_an * r).
template <typename T>
RK_ALWAYS_INLINE void gru_after_row(int64_t H, const T* __restrict__ act,
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
                           (d_out ? dh[j] + d_out[j] : dh[j]), true, d_ar, d_az, d_an, d_ghn, direct);
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
RK_ALWAYS_INLINE void gru_before_row1(int64_t H, const T* __restrict__ act,
                                      const T* __restrict__ h_prev, const T* __restrict__ d_out,
                                      T* __restrict__ dh, T* dgx) {
    T* __restrict__ x_z = dgx + H;
    T* __restrict__ x_n = dgx + 2 * H;
    for (int64_t j = 0; j < H; ++j) {
        T d_ar, d_az, d_an, d_ghn, direct;
        gru_backward_point(act[j], act[H + j], act[2 * H + j], act[3 * H + j], h_prev[j],
                           (d_out ? dh[j] + d_out[j] : dh[j]), false, d_ar, d_az, d_an, d_ghn, direct);
        x_z[j] = d_az;
        x_n[j] = d_an;
        dh[j] = direct;
    }
}

template <typename T>
RK_ALWAYS_INLINE void gru_before_row2(int64_t H, const T* __restrict__ act,
                                      const T* __restrict__ h_prev, const T* __restrict__ d_rh,
                                      T* __restrict__ dh, T* __restrict__ dgx) {
    for (int64_t j = 0; j < H; ++j) {
        T d_ar, add;
        gru_backward_reset_before(act[j], h_prev[j], d_rh[j], d_ar, add);
        dgx[j] = d_ar;
        dh[j] += add;
    }
}

template <typename T>
inline void column_sums(int64_t rows, int64_t cols, const T* __restrict__ m,
                                  T* __restrict__ out) {
    for (int64_t c = 0; c < cols; ++c) out[c] = T(0);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[c] += m[r * cols + c];
}

// The backward time loop for batch rows [lo, hi): fills those rows of d_gx (and d_gh) and
// leaves dh0 rows holding the running dh, initialised by the caller.
template <typename T>
RK_ALWAYS_INLINE void backward_steps_impl(const BackwardArgs<T>& a, T* d_gx, T* d_gh, int64_t lo,
                                          int64_t hi, GemmPath path) {
    const Spec& s = a.spec;
    const int64_t Tn = a.T_, H = a.H, Bc = hi - lo;
    const int64_t G = gates_of(s.cell), GH = G * H, SH = slots_of(s.cell) * H;
    const bool gru_after = s.cell == Cell::gru && s.reset_after;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;
    std::vector<T> d_rh(gru_before ? Bc * H : 0);
    T* dh = a.dh0;
    for (int64_t t = Tn - 1; t >= 0; --t) {
        for (int64_t b = lo; b < hi; ++b) {
            if (a.lengths && t >= a.lengths[b]) continue;
            const int64_t row = b * Tn + t;
            const T* act = a.act + row * SH;
            const T* d_out = a.d_out ? a.d_out + row * H : nullptr;
            T* dgx = d_gx + row * GH;
            switch (s.cell) {
                case Cell::rnn: rnn_row(H, s.relu, act, d_out, dh + b * H, dgx); break;
                case Cell::lstm: break;  // lstm.cpp
                case Cell::gru:
                    if (gru_after)
                        gru_after_row(H, act, a.hprev + row * H, d_out, dh + b * H, dgx,
                                      d_gh + row * GH);
                    else
                        gru_before_row1(H, act, a.hprev + row * H, d_out, dh + b * H, dgx);
                    break;
            }
        }
        const int64_t first = lo * Tn + t;  // row (lo, t); rows of one step are T*G*H apart
        if (gru_before) {
            // d_rh = d_an W_hn; rows of finished sequences are zero
            gemm<T>(false, Bc, H, H, T(1), d_gx + first * GH + 2 * H, Tn * GH, a.w_hh + 2 * H * H,
                    H, T(0), d_rh.data(), H, path);
            for (int64_t b = lo; b < hi; ++b) {
                if (a.lengths && t >= a.lengths[b]) continue;
                const int64_t row = b * Tn + t;
                gru_before_row2(H, a.act + row * SH, a.hprev + row * H,
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
    // dx for this chunk's B*T rows: d_gx W_ih (the weight gradients need every row: caller)
    gemm<T>(false, Bc * Tn, a.I, GH, T(1), d_gx + lo * Tn * GH, GH, a.w_ih, a.I, T(0),
            a.dx + lo * Tn * a.I, a.I, path);
}

// the time loop per ISA (the pointwise rows vectorise to the widest one available)
RK_CLONES void backward_steps(const BackwardArgs<float>& a, float* d_gx, float* d_gh, int64_t lo,
                              int64_t hi, GemmPath p) {
    backward_steps_impl(a, d_gx, d_gh, lo, hi, p);
}
RK_CLONES void backward_steps(const BackwardArgs<double>& a, double* d_gx, double* d_gh,
                              int64_t lo, int64_t hi, GemmPath p) {
    backward_steps_impl(a, d_gx, d_gh, lo, hi, p);
}

template <typename T>
struct StepsCtx {
    const BackwardArgs<T>* a;
    T* d_gx;
    T* d_gh;
    GemmPath path;
};

template <typename T>
void backward_chunk(void* ctx, int64_t lo, int64_t hi) {
    auto* c = static_cast<StepsCtx<T>*>(ctx);
    backward_steps(*c->a, c->d_gx, c->d_gh, lo, hi, c->path);
}

template <typename T>
void backward_impl(const BackwardArgs<T>& a) {
    const Spec& s = a.spec;
    const int64_t B = a.B, Tn = a.T_, I = a.I, H = a.H;
    const int64_t G = gates_of(s.cell), GH = G * H;
    const bool gru_after = s.cell == Cell::gru && s.reset_after;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;

    std::vector<T> d_gx(B * Tn * GH, T(0));                  // [B,T,G*H]
    std::vector<T> d_gh_own(gru_after ? B * Tn * GH : 0, T(0));
    T* d_gh = gru_after ? d_gh_own.data() : d_gx.data();      // [B,T,G*H]

    // the running dh lives in dh0, [B,H]
    if (a.d_h_n) std::memcpy(a.dh0, a.d_h_n, B * H * sizeof(T));
    else std::memset(a.dh0, 0, B * H * sizeof(T));

    const int n = chunks_for(B, B * Tn * GH * H);
    // one thread: GEMMs as sized; several: each thread's on the loop (no nested BLAS threads)
    StepsCtx<T> ctx{&a, d_gx.data(), d_gh, n > 1 ? GemmPath::loop : GemmPath::automatic};
    run_chunks(B, n, &backward_chunk<T>, &ctx);

    const int64_t BT = B * Tn;
    gemm<T>(true, GH, I, BT, T(1), d_gx.data(), GH, a.x, I, T(0), a.dw_ih, I);
    column_sums(BT, GH, d_gx.data(), a.db_ih);
    if (gru_before) {
        gemm<T>(true, 2 * H, H, BT, T(1), d_gx.data(), GH, a.hprev, H, T(0), a.dw_hh, H);
        gemm<T>(true, H, H, BT, T(1), d_gx.data() + 2 * H, GH, a.rh, H, T(0),
                a.dw_hh + 2 * H * H, H);
        std::memcpy(a.db_hh, a.db_ih, GH * sizeof(T));
    } else {
        gemm<T>(true, GH, H, BT, T(1), d_gh, GH, a.hprev, H, T(0), a.dw_hh, H);
        if (gru_after) column_sums(BT, GH, d_gh, a.db_hh);
        else std::memcpy(a.db_hh, a.db_ih, GH * sizeof(T));
    }
}

}  // namespace

template <> void backward<float>(const BackwardArgs<float>& a) {
    if (a.spec.cell == Cell::lstm) lstm_backward(a);
    else backward_impl(a);
}
template <> void backward<double>(const BackwardArgs<double>& a) {
    if (a.spec.cell == Cell::lstm) lstm_backward(a);
    else backward_impl(a);
}

}  // namespace rk
