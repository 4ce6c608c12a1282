// LSTM forward and backprop through time (shape legend in kernels.h; math in cells.h).
//
// Private layout (only these two functions read it; the bindings size the buffers):
//   * hidden units padded to Hp = a multiple of V = 64 bytes / sizeof(T) (16 floats, 8 doubles);
//   * gate columns INTERLEAVED in blocks of V units: column icol(k, j) = (j/V)*4V + k*V + j%V
//     holds gate k (i, f, g, o) of unit j, so each step's pointwise pass reads every gate as
//     whole vectors whatever H is (the per-row layout of the other cells left most lanes idle
//     at H = 25 and spent more time than the GEMMs);
//   * saved arrays TIME-major: hs [T+1,B,Hp] (h entering step t; hs[T] is the final h),
//     cs [T+1,B,Hp] likewise for c, act [T,B,5Hp] = gate activations (4Hp, interleaved) then
//     tanh(c') (Hp). Rows of one step are contiguous, so a batch chunk's per-step GEMMs are
//     plain strided products.
// The weights are repacked once per call into that column order (transposed for the forward,
// row-permuted for the backward) in per-thread workspaces that are reused, not reallocated.
//
// Forward, per step t and batch chunk: act[t] = x_t W_ih'^T, += h_t W_hh'^T (two GEMMs into the
// same rows), then one fused pass adds the bias and turns pre-activations into activations,
// c and h. Backward, per step: one fused pass from dh, dc to the gate gradients dG[t], then
// dh = dG[t] W_hh' (GEMM); after the loop dx = dG W_ih' per chunk, and after the chunks join
// [dW_ih | db]^T = [x | 1]^T dG and dW_hh^T = h^T dG as two GEMMs over all T*B rows, split by
// columns across the threads.
#include <algorithm>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "dispatch.h"
#include "gemm.h"
#include "kernels.h"
#include "rnnkern/cells.h"

namespace rk {
namespace {

template <typename T>
constexpr int64_t lanes() { return int64_t(64 / sizeof(T)); }

template <typename T>
inline int64_t icol(int64_t k, int64_t j) {
    constexpr int64_t V = lanes<T>();
    return (j / V) * 4 * V + k * V + j % V;
}

// A grow-only scratch buffer per calling thread and purpose (no page faults per call).
template <typename T, int Tag>
T* scratch(size_t n) {
    thread_local std::vector<T> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

// ---- pointwise passes over one batch row: Hp/V blocks of V units -----------------------------

// g: this row's 4Hp pre-activations (without bias) in, activations out; tc: tanh(c') out.
template <typename T>
RK_ALWAYS_INLINE void fwd_cells(int64_t nblk, T fb, T* __restrict__ g, T* __restrict__ tc,
                                const T* __restrict__ bias, const T* __restrict__ c_prev,
                                T* __restrict__ c_new, T* __restrict__ h_new) {
    constexpr int64_t V = lanes<T>();
    for (int64_t q = 0; q < nblk; ++q) {
        T* __restrict__ gq = g + q * 4 * V;
        const T* __restrict__ bq = bias + q * 4 * V;
        const T* __restrict__ cp = c_prev + q * V;
        T* __restrict__ cn = c_new + q * V;
        T* __restrict__ hn = h_new + q * V;
        T* __restrict__ tq = tc + q * V;
        for (int64_t l = 0; l < V; ++l) {
            T i, f, gg, o, t, c, h;
            lstm_forward_point(gq[l] + bq[l], gq[V + l] + bq[V + l],
                               gq[2 * V + l] + bq[2 * V + l], gq[3 * V + l] + bq[3 * V + l],
                               cp[l], fb, i, f, gg, o, t, c, h);
            gq[l] = i;
            gq[V + l] = f;
            gq[2 * V + l] = gg;
            gq[3 * V + l] = o;
            tq[l] = t;
            cn[l] = c;
            hn[l] = h;
        }
    }
}

// act: this row's saved activations (4Hp gates, then Hp tanh c'); dh: total gradient at h'
// (zeroed here: the GEMM adds dG W_hh after); dc: in from step t+1, out to step t-1.
template <typename T>
RK_ALWAYS_INLINE void back_cells(int64_t nblk, const T* __restrict__ act,
                                 const T* __restrict__ c_prev, T* __restrict__ dh,
                                 T* __restrict__ dc, T* __restrict__ dg) {
    constexpr int64_t V = lanes<T>();
    const T* __restrict__ tc = act + nblk * 4 * V;
    for (int64_t q = 0; q < nblk; ++q) {
        const T* __restrict__ a = act + q * 4 * V;
        T* __restrict__ d = dg + q * 4 * V;
        const T* __restrict__ cp = c_prev + q * V;
        const T* __restrict__ tq = tc + q * V;
        T* __restrict__ dhq = dh + q * V;
        T* __restrict__ dcq = dc + q * V;
        for (int64_t l = 0; l < V; ++l) {
            T di, df, dgg, dO, dcp;
            lstm_backward_point(a[l], a[V + l], a[2 * V + l], a[3 * V + l], tq[l], cp[l], dhq[l],
                                dcq[l], di, df, dgg, dO, dcp);
            d[l] = di;
            d[V + l] = df;
            d[2 * V + l] = dgg;
            d[3 * V + l] = dO;
            dcq[l] = dcp;
            dhq[l] = T(0);
        }
    }
}

// ---- forward ---------------------------------------------------------------------------------

template <typename T>
struct Fwd {
    const ForwardArgs<T>* a;
    int64_t Hp;
    const T* wx;    // [I, 4Hp]  W_ih^T, columns interleaved, padding zero
    const T* wh;    // [H, 4Hp]  W_hh^T, likewise
    const T* bias;  // [4Hp]     b_ih + b_hh, interleaved
    GemmPath path;
};

template <typename T>
RK_ALWAYS_INLINE void fwd_steps_impl(const Fwd<T>& f, int64_t lo, int64_t hi) {
    const ForwardArgs<T>& a = *f.a;
    const int64_t B = a.B, Tn = a.T_, I = a.I, H = a.H, Hp = f.Hp, GP = 4 * Hp, SP = 5 * Hp;
    const int64_t Bc = hi - lo, nblk = Hp / lanes<T>();
    const T fb = T(a.spec.forget_bias);
    T* hs = a.hprev;
    T* cs = a.cprev;
    for (int64_t t = 0; t < Tn; ++t) {
        T* act = a.act + (t * B + lo) * SP;
        gemm<T>(false, Bc, GP, I, T(1), a.x + (lo * Tn + t) * I, Tn * I, f.wx, GP, T(0), act, SP,
                f.path);
        gemm<T>(false, Bc, GP, H, T(1), hs + (t * B + lo) * Hp, Hp, f.wh, GP, T(1), act, SP,
                f.path);
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t r = t * B + b, rn = r + B;  // row (t, b) and (t + 1, b)
            T* out = a.out + (b * Tn + t) * H;
            if (a.lengths && t >= a.lengths[b]) {  // past this sequence's end: carry the state
                std::memcpy(hs + rn * Hp, hs + r * Hp, Hp * sizeof(T));
                std::memcpy(cs + rn * Hp, cs + r * Hp, Hp * sizeof(T));
                std::memset(out, 0, H * sizeof(T));
                continue;
            }
            T* g = a.act + r * SP;
            fwd_cells(nblk, fb, g, g + GP, f.bias, cs + r * Hp, cs + rn * Hp, hs + rn * Hp);
            std::memcpy(out, hs + rn * Hp, H * sizeof(T));
        }
    }
}

RK_CLONES void fwd_steps(const Fwd<float>& f, int64_t lo, int64_t hi) { fwd_steps_impl(f, lo, hi); }
RK_CLONES void fwd_steps(const Fwd<double>& f, int64_t lo, int64_t hi) { fwd_steps_impl(f, lo, hi); }

template <typename T>
void fwd_chunk(void* ctx, int64_t lo, int64_t hi) {
    fwd_steps(*static_cast<const Fwd<T>*>(ctx), lo, hi);
}

template <typename T>
void forward_impl(const ForwardArgs<T>& a) {
    const int64_t B = a.B, Tn = a.T_, I = a.I, H = a.H;
    const int64_t Hp = lstm_padded_hidden(H, sizeof(T)), GP = 4 * Hp;
    T* wx = scratch<T, 0>(I * GP);
    T* wh = scratch<T, 1>(H * GP);
    T* bias = scratch<T, 2>(GP);
    std::memset(wx, 0, I * GP * sizeof(T));
    std::memset(wh, 0, H * GP * sizeof(T));
    std::memset(bias, 0, GP * sizeof(T));
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < H; ++j) {
            const int64_t g = k * H + j, c = icol<T>(k, j);
            for (int64_t i = 0; i < I; ++i) wx[i * GP + c] = a.w_ih[g * I + i];
            for (int64_t m = 0; m < H; ++m) wh[m * GP + c] = a.w_hh[g * H + m];
            bias[c] = a.b_ih[g] + a.b_hh[g];
        }
    // state entering step 0, padding zero
    for (int64_t b = 0; b < B; ++b) {
        T* hp = a.hprev + b * Hp;
        T* cp = a.cprev + b * Hp;
        std::memset(hp, 0, Hp * sizeof(T));
        std::memset(cp, 0, Hp * sizeof(T));
        if (a.h0) std::memcpy(hp, a.h0 + b * H, H * sizeof(T));
        if (a.c0) std::memcpy(cp, a.c0 + b * H, H * sizeof(T));
    }
    const int n = chunks_for(B, B * Tn * 4 * H * H);
    // one thread: GEMMs as sized; several: each thread's on the loop (no nested BLAS threads)
    Fwd<T> f{&a, Hp, wx, wh, bias, n > 1 ? GemmPath::loop : GemmPath::automatic};
    run_chunks(B, n, &fwd_chunk<T>, &f);
    for (int64_t b = 0; b < B; ++b) {
        std::memcpy(a.h_n + b * H, a.hprev + (Tn * B + b) * Hp, H * sizeof(T));
        std::memcpy(a.c_n + b * H, a.cprev + (Tn * B + b) * Hp, H * sizeof(T));
    }
}

// ---- backward --------------------------------------------------------------------------------

template <typename T>
struct Bwd {
    const BackwardArgs<T>* a;
    int64_t Hp;
    const T* whb;  // [4Hp, Hp] W_hh, rows interleaved, padding zero
    const T* wxb;  // [4Hp, Ip] W_ih, likewise (I padded to whole vectors: no GEMM column tail)
    int64_t Ip;
    T* dxs;        // [T, B, Ip] dx, time-major
    T* dg;         // [T, B, 4Hp] gate gradients
    T* dh;         // [B, Hp] running dh
    T* dc;         // [B, Hp] running dc
    T* x1;         // [T, B, I+1] x time-major with a column of ones (for db)
    GemmPath path;
};

template <typename T>
RK_ALWAYS_INLINE void back_steps_impl(const Bwd<T>& w, int64_t lo, int64_t hi) {
    const BackwardArgs<T>& a = *w.a;
    const int64_t B = a.B, Tn = a.T_, I = a.I, H = a.H, Hp = w.Hp, GP = 4 * Hp, SP = 5 * Hp;
    const int64_t Bc = hi - lo, nblk = Hp / lanes<T>();
    for (int64_t t = Tn - 1; t >= 0; --t) {
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t r = t * B + b;
            T* dg = w.dg + r * GP;
            if (a.lengths && t >= a.lengths[b]) {  // dh, dc pass through; no gate gradient
                std::memset(dg, 0, GP * sizeof(T));
                continue;
            }
            T* dh = w.dh + b * Hp;
            if (a.d_out) {
                const T* __restrict__ d = a.d_out + (b * Tn + t) * H;
                for (int64_t j = 0; j < H; ++j) dh[j] += d[j];
            }
            back_cells(nblk, a.act + r * SP, a.cprev + r * Hp, dh, w.dc + b * Hp, dg);
        }
        // dh_prev = dG W_hh (rows of finished sequences add zero to their carried dh)
        gemm<T>(false, Bc, Hp, GP, T(1), w.dg + (t * B + lo) * GP, GP, w.whb, Hp, T(1),
                w.dh + lo * Hp, Hp, w.path);
    }
    const int64_t Ip = w.Ip;
    for (int64_t t = 0; t < Tn; ++t) {
        // dx rows of this chunk at step t
        gemm<T>(false, Bc, Ip, GP, T(1), w.dg + (t * B + lo) * GP, GP, w.wxb, Ip, T(0),
                w.dxs + (t * B + lo) * Ip, Ip, w.path);
        for (int64_t b = lo; b < hi; ++b) {
            std::memcpy(a.dx + (b * Tn + t) * I, w.dxs + (t * B + b) * Ip, I * sizeof(T));
            T* row = w.x1 + (t * B + b) * (I + 1);  // [x | 1], time-major, for the weight GEMMs
            std::memcpy(row, a.x + (b * Tn + t) * I, I * sizeof(T));
            row[I] = T(1);
        }
    }
}

RK_CLONES void back_steps(const Bwd<float>& w, int64_t lo, int64_t hi) { back_steps_impl(w, lo, hi); }
RK_CLONES void back_steps(const Bwd<double>& w, int64_t lo, int64_t hi) { back_steps_impl(w, lo, hi); }

template <typename T>
void back_chunk(void* ctx, int64_t lo, int64_t hi) {
    back_steps(*static_cast<const Bwd<T>*>(ctx), lo, hi);
}

// Weight gradients, transposed and interleaved: columns [c0, c1) of
//   gx1 [I+1, 4Hp] = [x | 1]^T dG     and     gh [H, 4Hp] = h^T dG   (sums over all T*B rows)
template <typename T>
struct WGrad {
    const Bwd<T>* w;
    T* gx1;
    T* gh;
    GemmPath path;
};

template <typename T>
void wgrad_cols(void* ctx, int64_t c0, int64_t c1) {
    const auto& g = *static_cast<const WGrad<T>*>(ctx);
    const Bwd<T>& w = *g.w;
    const BackwardArgs<T>& a = *w.a;
    constexpr int64_t CB = 4 * lanes<T>();  // column blocks of one interleaved unit block
    const int64_t GP = 4 * w.Hp, TB = a.T_ * a.B, n = (c1 - c0) * CB, off = c0 * CB;
    gemm<T>(true, a.I + 1, n, TB, T(1), w.x1, a.I + 1, w.dg + off, GP, T(0), g.gx1 + off, GP,
            g.path);
    gemm<T>(true, a.H, n, TB, T(1), a.hprev, w.Hp, w.dg + off, GP, T(0), g.gh + off, GP, g.path);
}

template <typename T>
void backward_impl(const BackwardArgs<T>& a) {
    const int64_t B = a.B, Tn = a.T_, I = a.I, H = a.H;
    const int64_t Hp = lstm_padded_hidden(H, sizeof(T)), GP = 4 * Hp;
    const int64_t Ip = lstm_padded_hidden(I, sizeof(T));
    T* whb = scratch<T, 3>(GP * Hp);
    T* wxb = scratch<T, 4>(GP * Ip);
    std::memset(whb, 0, GP * Hp * sizeof(T));
    std::memset(wxb, 0, GP * Ip * sizeof(T));
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < H; ++j) {
            const int64_t g = k * H + j, c = icol<T>(k, j);
            std::memcpy(whb + c * Hp, a.w_hh + g * H, H * sizeof(T));
            std::memcpy(wxb + c * Ip, a.w_ih + g * I, I * sizeof(T));
        }
    T* dxs = scratch<T, 11>(Tn * B * Ip);
    T* dg = scratch<T, 5>(Tn * B * GP);
    T* dh = scratch<T, 6>(B * Hp);
    T* dc = scratch<T, 7>(B * Hp);
    T* x1 = scratch<T, 8>(Tn * B * (I + 1));
    std::memset(dh, 0, B * Hp * sizeof(T));
    std::memset(dc, 0, B * Hp * sizeof(T));
    for (int64_t b = 0; b < B; ++b) {
        if (a.d_h_n) std::memcpy(dh + b * Hp, a.d_h_n + b * H, H * sizeof(T));
        if (a.d_c_n) std::memcpy(dc + b * Hp, a.d_c_n + b * H, H * sizeof(T));
    }
    const int n = chunks_for(B, B * Tn * 4 * H * H);
    Bwd<T> w{&a, Hp, whb, wxb, Ip, dxs, dg, dh, dc, x1,
             n > 1 ? GemmPath::loop : GemmPath::automatic};
    run_chunks(B, n, &back_chunk<T>, &w);
    for (int64_t b = 0; b < B; ++b) {
        std::memcpy(a.dh0 + b * H, dh + b * Hp, H * sizeof(T));
        std::memcpy(a.dc0 + b * H, dc + b * Hp, H * sizeof(T));
    }

    // weight gradients: column blocks of the interleaved layout split across the threads
    T* gx1 = scratch<T, 9>((I + 1) * GP);
    T* gh = scratch<T, 10>(H * GP);
    const int64_t nb = GP / (4 * lanes<T>());
    const int nw = chunks_for(nb, Tn * B * GP * (I + 1 + H));
    WGrad<T> wg{&w, gx1, gh, nw > 1 ? GemmPath::loop : GemmPath::automatic};
    run_chunks(nb, nw, &wgrad_cols<T>, &wg);
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < H; ++j) {
            const int64_t g = k * H + j, c = icol<T>(k, j);
            for (int64_t i = 0; i < I; ++i) a.dw_ih[g * I + i] = gx1[i * GP + c];
            for (int64_t m = 0; m < H; ++m) a.dw_hh[g * H + m] = gh[m * GP + c];
            a.db_ih[g] = gx1[I * GP + c];
            a.db_hh[g] = a.db_ih[g];
        }
}

}  // namespace

template <> void lstm_forward<float>(const ForwardArgs<float>& a) { forward_impl(a); }
template <> void lstm_forward<double>(const ForwardArgs<double>& a) { forward_impl(a); }
template <> void lstm_backward<float>(const BackwardArgs<float>& a) { backward_impl(a); }
template <> void lstm_backward<double>(const BackwardArgs<double>& a) { backward_impl(a); }

}  // namespace rk
