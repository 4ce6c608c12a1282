// Forward time loop for RNN / GRU (shape legend in kernels.h; the LSTM has its own: lstm.cpp).
// Hoisted out of the loop:
// x W_ih^T + b_ih for all B*T rows as one GEMM, written straight into the activation buffer
// `act` (row stride S*H >= G*H); each step then runs one h W_hh^T GEMM and one fused pointwise
// pass that turns those pre-activations into the saved activations in place. Large batches run
// as row chunks on threads (chunks.h), each chunk doing its own share of all of this.
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
// act: this row's S*H slots, holding gx (= x W_ih^T + b_ih, G*H of them) on entry.
// gh: this row of h W_hh^T (no bias).

template <typename T>
RK_ALWAYS_INLINE void rnn_row(int64_t H, bool relu, T* __restrict__ act, const T* __restrict__ gh,
                              const T* __restrict__ b_hh, T* __restrict__ h_new) {
    for (int64_t j = 0; j < H; ++j) {
        const T h = rnn_forward_point(act[j] + gh[j] + b_hh[j], relu);
        act[j] = h;
        h_new[j] = h;
    }
}

// GRU, reset_after=true: gh holds all three blocks of h W_hh^T.
template <typename T>
RK_ALWAYS_INLINE void gru_after_row(int64_t H, T* act, const T* __restrict__ gh, const T* __restrict__ bh,
                                    const T* __restrict__ h_prev, T* __restrict__ h_new) {
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
RK_ALWAYS_INLINE void gru_before_gates_row(int64_t H, T* act, const T* __restrict__ gh, const T* __restrict__ bh,
                                           const T* __restrict__ h_prev, T* __restrict__ rh) {
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

template <typename T>
RK_ALWAYS_INLINE void forward_steps_impl(const ForwardArgs<T>& a, const T* w_ih_t,
                                         const T* w_hh_t, int64_t lo, int64_t hi,
                                         GemmPath path) {
    const Spec& s = a.spec;
    const int64_t Tn = a.T_, I = a.I, H = a.H, Bc = hi - lo;
    const int64_t G = gates_of(s.cell), GH = G * H, SH = slots_of(s.cell) * H;
    const bool gru_before = s.cell == Cell::gru && !s.reset_after;

    // act[lo:hi, :, :G*H] = b_ih + x W_ih^T: this chunk's B*T rows at once, hoisted out of the
    // time loop (each chunk does its own, so no BLAS thread pool runs beside the chunk threads)
    for (int64_t r = lo * Tn; r < hi * Tn; ++r)
        std::memcpy(a.act + r * SH, a.b_ih, GH * sizeof(T));
    gemm<T>(false, Bc * Tn, GH, I, T(1), a.x + lo * Tn * I, I, w_ih_t, GH, T(1),
            a.act + lo * Tn * SH, SH, path);
    std::vector<T> gh(Bc * GH), ghn(gru_before ? Bc * H : 0);
    const int64_t n_rec = gru_before ? 2 * H : GH;  // columns of h W_hh^T computed from h itself
    for (int64_t t = 0; t < Tn; ++t) {
        // gh = h_t W_hh^T: row b of h_t is hprev[b, t], rows T*H apart
        gemm<T>(false, Bc, n_rec, H, T(1), a.hprev + lo * Tn * H + t * H, Tn * H, w_hh_t, GH,
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
            gemm<T>(false, Bc, H, H, T(1), a.rh + lo * Tn * H + t * H, Tn * H, w_hh_t + 2 * H, GH,
                    T(0), ghn.data(), H, path);
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
            switch (s.cell) {
                case Cell::rnn: rnn_row(H, s.relu, act, ghb, a.b_hh, out); break;
                case Cell::lstm: break;  // lstm.cpp
                case Cell::gru:
                    if (gru_before)
                        gru_before_new_row(H, act, ghn.data() + (b - lo) * H, a.b_hh + 2 * H,
                                           h_prev, out);
                    else
                        gru_after_row(H, act, ghb, a.b_hh, h_prev, out);
                    break;
            }
            std::memcpy(h_next, out, H * sizeof(T));
        }
    }
}

// the time loop per ISA (the pointwise rows vectorise to the widest one available)
RK_CLONES void forward_steps(const ForwardArgs<float>& a, const float* w_ih_t,
                             const float* w_hh_t, int64_t lo, int64_t hi, GemmPath p) {
    forward_steps_impl(a, w_ih_t, w_hh_t, lo, hi, p);
}
RK_CLONES void forward_steps(const ForwardArgs<double>& a, const double* w_ih_t,
                             const double* w_hh_t, int64_t lo, int64_t hi, GemmPath p) {
    forward_steps_impl(a, w_ih_t, w_hh_t, lo, hi, p);
}

template <typename T>
struct StepsCtx {
    const ForwardArgs<T>* a;
    const T* w_ih_t;
    const T* w_hh_t;
    GemmPath path;
};

template <typename T>
void forward_chunk(void* ctx, int64_t lo, int64_t hi) {
    auto* c = static_cast<StepsCtx<T>*>(ctx);
    forward_steps(*c->a, c->w_ih_t, c->w_hh_t, lo, hi, c->path);
}

template <typename T>
void forward_impl(const ForwardArgs<T>& a) {
    const Spec& s = a.spec;
    const int64_t B = a.B, Tn = a.T_, I = a.I, H = a.H;
    const int64_t G = gates_of(s.cell), GH = G * H;

    // transposed weights, so every GEMM reads its B operand as [K, N] rows
    std::vector<T> w_ih_t(I * GH), w_hh_t(H * GH);
    for (int64_t g = 0; g < GH; ++g) {
        for (int64_t i = 0; i < I; ++i) w_ih_t[i * GH + g] = a.w_ih[g * I + i];
        for (int64_t k = 0; k < H; ++k) w_hh_t[k * GH + g] = a.w_hh[g * H + k];
    }
    // state entering step 0
    for (int64_t b = 0; b < B; ++b) {
        T* hp = Tn > 0 ? a.hprev + b * Tn * H : a.h_n + b * H;
        if (a.h0) std::memcpy(hp, a.h0 + b * H, H * sizeof(T));
        else std::memset(hp, 0, H * sizeof(T));
    }

    const int n = chunks_for(B, B * Tn * GH * H);
    // one thread: GEMMs as sized; several: each thread's on the loop (no nested BLAS threads)
    StepsCtx<T> ctx{&a, w_ih_t.data(), w_hh_t.data(),
                    n > 1 ? GemmPath::loop : GemmPath::automatic};
    run_chunks(B, n, &forward_chunk<T>, &ctx);
}

}  // namespace

template <> void forward<float>(const ForwardArgs<float>& a) {
    if (a.spec.cell == Cell::lstm) lstm_forward(a);
    else forward_impl(a);
}
template <> void forward<double>(const ForwardArgs<double>& a) {
    if (a.spec.cell == Cell::lstm) lstm_forward(a);
    else forward_impl(a);
}

}  // namespace rk
