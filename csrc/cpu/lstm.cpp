// The LSTM layer: forward and backprop through time in the phases of layer.h (shape legend in
// kernels.h; math in cells.h).
//
// Private layout (only these two functions read it; the bindings size the buffers):
//   * hidden units padded to Hp = a multiple of V = 64 bytes / sizeof(T) (16 floats, 8 doubles);
//   * gate columns INTERLEAVED in blocks of V units: column icol(k, j) = (j/V)*4V + k*V + j%V
//     holds gate k (i, f, g, o) of unit j, so each step's pointwise pass reads every gate as
//     whole vectors whatever H is (the per-row layout of the other cells left most lanes idle
//     at H = 25 and spent more time than the GEMMs);
//   * saved arrays TIME-major, rows of one step contiguous:
//       xh  [T+1, B, R]  row (t, b) = [h_t (H) | x_t (I) | 1 | unused], K = H + I + 1,
//                        R = K rounded up to V (>= Hp); the pointwise pass writes h_{t+1} as
//                        whole vectors (Hp lanes, over the start of x), then x_{t+1} and the 1
//                        go in after it (unpadded: at H = 25 the GEMMs' K is 51, not 58 with h
//                        padded to Hp); so ONE GEMM per step, xh[t] Wc (Wc = [W_hh^T; W_ih^T;
//                        b_ih + b_hh], K x 4Hp), gives every gate pre-activation with its bias,
//                        and one GEMM gives [dW_hh; dW_ih; db] in the backward; xh[T] holds h_T;
//       cs  [T+1, B, Hp] the cell state entering step t (cs[T]: the final one);
//       act [T, Hp/V, B, 5V] (shaped [T, B, 5Hp]): per step and unit block, every batch
//                        row's 4V gate activations (interleaved), then its V values tanh(c');
//                        so each GEMM call of the forward writes one contiguous block of rows.
// The weights are repacked once per call, as contiguous GEMM panels (Panels), into per-thread
// workspaces that are reused.
//
// Backward, per batch chunk on its thread: per step one fused pass from dh, dc to the gate
// gradients dG (into a ring of Tb steps), then dh = dG W_hh'. Every Tb steps the ring's rows go
// through two GEMMs while they are still in cache: dx = dG W_ih', and this chunk's partial
// [dW_hh; dW_ih; db]^T += xh^T dG. Only the partials (K x 4Hp per chunk) are summed after the
// join; dG never goes to memory in full (it did at first: 5 MB per char-rnn layer written, then
// read back by separate weight-gradient GEMMs).
//
// Projected input (a.projected: x [B,T,4H] is already x_orig W_ih^T, kernels.h): the rows are
// [h | 1] (K = Hp + 1), so the per-step GEMM gives h W_hh^T + b and the pointwise pass first
// adds the step's projected row into the pre-activations; the backward has no dx GEMM (each
// row's dG goes straight to dx, un-interleaved, as it is made) and its weight-gradient GEMM
// gives [dW_hh; db] only. At char-rnn size, (B,T,H,I) = (50,50,128,128), that drops 1 of the
// 4 GEMM shares (the x W_ih^T part of the forward GEMM, dx and dW_ih in the backward).
// From a table (a.ids): row (b, t) is table row ids[b, t], from a copy packed into the
// interleaved columns once per call; the backward adds each row's dG into its chunk's packed
// partial table [V, 4Hp], and the partials are summed and unpacked into dx after the join. In
// the fused training step this replaced a gather of [B,T,4H] before the forward and a scatter
// after the backward, each a serial pass.
#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>

#include "buffer.h"
#include "chunks.h"
#include "dispatch.h"
#include "gemm.h"
#include "layer.h"
#include "rnnkern/cells.h"

namespace rk {
namespace {

template <typename T>
constexpr int64_t lanes() { return int64_t(64 / sizeof(T)); }

template <typename T>
inline int64_t round_lanes(int64_t n) { return (n + lanes<T>() - 1) / lanes<T>() * lanes<T>(); }

template <typename T>
inline int64_t icol(int64_t k, int64_t j) {
    constexpr int64_t V = lanes<T>();
    return (j / V) * 4 * V + k * V + j % V;
}

// dst[0, n) = src[0, n), for the short per-row copies inside the time loops (n ~ H, I, K: tens
// of elements, thousands of copies per call): fixed-size moves, the last one overlapping its
// predecessor, inlined. As memcpy calls they were ~4% of the lab 12-4 step's samples (perf).
RK_ALWAYS_INLINE void copy_bytes(char* __restrict__ d, const char* __restrict__ s, size_t n) {
    if (n >= 64) {
        for (size_t o = 0; o + 64 < n; o += 64) std::memcpy(d + o, s + o, 64);
        std::memcpy(d + n - 64, s + n - 64, 64);
    } else if (n >= 32) {
        std::memcpy(d, s, 32);
        std::memcpy(d + n - 32, s + n - 32, 32);
    } else if (n >= 16) {
        std::memcpy(d, s, 16);
        std::memcpy(d + n - 16, s + n - 16, 16);
    } else if (n >= 8) {
        std::memcpy(d, s, 8);
        std::memcpy(d + n - 8, s + n - 8, 8);
    } else if (n >= 4) {
        std::memcpy(d, s, 4);
        std::memcpy(d + n - 4, s + n - 4, 4);
    }
}

template <typename T>
RK_ALWAYS_INLINE void copy_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
    copy_bytes(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src),
               size_t(n) * sizeof(T));
}

// A layer call's work arrays, grown on demand and kept between calls (no page faults per call):
// one set per layer object, i.e. per calling thread for the seam (seam.cpp) and per layer in a
// stack.
template <typename T>
struct Buffers {
    Buffer<T> wc, table, whb, wxb, dh, dc, ring_g, ring_x, ring_dx, part, tables;
};

// For every unit block (gate k, units j0 .. j0+V-1, whose interleaved columns are contiguous):
// f(k, j0, c0, cnt) with c0 = icol(k, j0) and cnt valid units. The weight packing and the
// gradient unpacking walk blocks of V rows of the [4H, .] matrices at once, so both their
// reads and their writes stay within a few cache lines per step (row by row, the strided side
// cost ~0.45 ms per char-rnn layer call).
template <typename T, typename F>
inline void for_unit_blocks(int64_t H, F f) {
    constexpr int64_t V = lanes<T>();
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j0 = 0; j0 < H; j0 += V) f(k, j0, icol<T>(k, j0), std::min(V, H - j0));
}

// A GEMM B operand [K, N] stored as column panels of PW = 4V columns, each [K, w] and
// contiguous (w = PW but for a narrower last panel). The GEMM loop sweeps one such panel per
// pass (gemm_loop.h); read from a row-major [K, N] matrix its rows were N apart, and at
// char-rnn size (K, N) = (194, 512) the 2 KB stride left the forward ~20% slower (A/B in
// separate processes, alternating: min 3.22 -> 2.63 ms, median 4.47 -> 3.66 ms per layer).
template <typename T>
struct Panels {
    static constexpr int64_t PW = 4 * lanes<T>();
    int64_t K, N;
    T* p;
    Panels(int64_t K_, int64_t N_, T* buf) : K(K_), N(N_), p(buf) {
        std::memset(p, 0, K * N * sizeof(T));
    }
    T& at(int64_t k, int64_t c) const {
        const int64_t c0 = c / PW * PW;
        return p[c0 * K + k * std::min(PW, N - c0) + c - c0];
    }
};

// C[M, N] = A B (+ beta C) with A [M, 4Hp] stored as column blocks of PW (one interleaved unit
// block each), block q at A + q * qstride with rows PW apart, and B [4Hp, N] in panels: one
// contiguous [PW, w] piece of B per call. Only the H valid units of A's columns are summed: a
// partial last block (H % V units, e.g. 9 of 16 at H = 25) goes as one call per gate over its
// valid rows, not one over the whole block, whose padding rows of B are zero (the dh and dx
// GEMMs of lab 12-4's backward: 100 of K = 128 summed).
template <typename T>
void gemm_blocks(int64_t M, int64_t H, const T* A, int64_t qstride, const Panels<T>& b, T beta,
                 T* C, int64_t ldc, GemmPath path) {
    constexpr int64_t V = lanes<T>();
    const int64_t PW = b.PW;
    if (b.K == 0) {  // nothing to sum (H = 0): C = beta C
        gemm<T>(false, M, b.N, 0, T(1), A, PW, b.p, b.N, beta, C, ldc, path);
        return;
    }
    for (int64_t c0 = 0; c0 < b.N; c0 += PW) {
        const int64_t w = std::min(PW, b.N - c0);
        T bq = beta;  // the first call's beta, then accumulate
        for (int64_t q = 0; q < b.K / PW; ++q) {
            const int64_t cnt = std::min(V, H - q * V);
            const T* Bq = b.p + c0 * b.K + q * PW * w;
            if (cnt == V) {
                gemm<T>(false, M, w, PW, T(1), A + q * qstride, PW, Bq, w, bq, C + c0, ldc, path);
                bq = T(1);
                continue;
            }
            for (int64_t k = 0; k < 4; ++k) {
                gemm<T>(false, M, w, cnt, T(1), A + q * qstride + k * V, PW, Bq + k * V * w, w,
                        bq, C + c0, ldc, path);
                bq = T(1);
            }
        }
    }
}

// Sizes of the private layout for one call. I: the x columns of the saved rows (0 when the
// input comes projected: rows [h | 1]).
template <typename T>
struct Dims {
    int64_t B, Tn, I, H, Hp, GP, SP, K, R;
    Dims(int64_t B_, int64_t T_, int64_t I_, int64_t H_)
        : B(B_), Tn(T_), I(I_), H(H_), Hp(padded_hidden(H_, sizeof(T))), GP(4 * Hp),
          SP(5 * Hp), K(H_ + I_ + 1), R(round_lanes<T>(H_ + I_ + 1)) {}
};

// Projected input: the columns of unit block q (units j0 = qV ..) of one row of a [.., 4H]
// array in the canonical gate order (i, f, g, o) are, per gate k, the cnt = min(V, H - j0)
// values at k*H + j0; in the interleaved layout they sit at k*V of that block.
// Forward: add x W_ih^T (xp, [4H]) into this row's pre-activations (block q at g + q * qstride).
template <typename T>
RK_ALWAYS_INLINE void add_projected(int64_t H, const T* __restrict__ xp, T* __restrict__ g,
                                    int64_t qstride) {
    constexpr int64_t V = lanes<T>();
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j0 = 0, q = 0; j0 < H; j0 += V, ++q) {
            T* __restrict__ gq = g + q * qstride + k * V;
            const T* __restrict__ xq = xp + k * H + j0;
            const int64_t cnt = std::min(V, H - j0);
            for (int64_t l = 0; l < cnt; ++l) gq[l] += xq[l];
        }
}

// Backward: this row's gate gradients (block q at dg + q * qstride) out to dx ([4H]).
template <typename T>
RK_ALWAYS_INLINE void put_projected(int64_t H, const T* __restrict__ dg, int64_t qstride,
                                    T* __restrict__ dx) {
    constexpr int64_t V = lanes<T>();
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j0 = 0, q = 0; j0 < H; j0 += V, ++q) {
            const T* __restrict__ d = dg + q * qstride + k * V;
            T* __restrict__ xq = dx + k * H + j0;
            const int64_t cnt = std::min(V, H - j0);
            for (int64_t l = 0; l < cnt; ++l) xq[l] = d[l];
        }
}

// From a table (ids): the table [V, 4H] is repacked once per call into the interleaved gate
// columns, padding zero ([V, 4Hp]), and so are the partial table gradients, so a row's add is
// whole vectors (at H = 25 the second unit block's 9-unit pieces of each gate were scalar loops,
// in both directions).

template <typename T>
void pack_table(const T* __restrict__ x, const TableIndex& at, int64_t V, int64_t H, int64_t GP,
                T* __restrict__ tp) {
    std::memset(tp, 0, V * GP * sizeof(T));
    for (int64_t v = 0; v < V; ++v)
        for_unit_blocks<T>(H, [&](int64_t k, int64_t j0, int64_t c0, int64_t cnt) {
            for (int64_t l = 0; l < cnt; ++l) tp[v * GP + c0 + l] = x[at(v, k * H + j0 + l)];
        });
}

// Forward: add a packed table row tp ([4Hp]) into this row's pre-activations (unit block q at
// g + q * qstride).
template <typename T>
RK_ALWAYS_INLINE void add_packed(int64_t nblk, const T* __restrict__ tp, T* __restrict__ g,
                                 int64_t qstride) {
    constexpr int64_t PW = 4 * lanes<T>();
    for (int64_t q = 0; q < nblk; ++q)
        for (int64_t l = 0; l < PW; ++l) g[q * qstride + l] += tp[q * PW + l];
}

// Backward: add this row's gate gradients (block q at dg + q * qstride) into a packed table row.
template <typename T>
RK_ALWAYS_INLINE void add_to_packed(int64_t nblk, const T* __restrict__ dg, int64_t qstride,
                                    T* __restrict__ tp) {
    constexpr int64_t PW = 4 * lanes<T>();
    for (int64_t q = 0; q < nblk; ++q)
        for (int64_t l = 0; l < PW; ++l) tp[q * PW + l] += dg[q * qstride + l];
}

// ---- pointwise passes over one batch row: Hp/V blocks of V units -----------------------------

// g: this row's act slots, unit block q at g + q * qstride: 4V pre-activations in, the gate
// activations out, then tanh(c') (V) out. h' goes to h_new (whole vectors) and its H valid units
// to out, as masked stores: a copy from h_new after was a vector load across two just-stored
// vectors, which the store buffer cannot forward (perf: the forward's top stall).
template <typename T>
RK_ALWAYS_INLINE void fwd_cells(int64_t nblk, int64_t H, T fb, T* __restrict__ g,
                                int64_t qstride, const T* __restrict__ c_prev,
                                T* __restrict__ c_new, T* __restrict__ h_new,
                                T* __restrict__ out) {
    constexpr int64_t V = lanes<T>();
    for (int64_t q = 0; q < nblk; ++q) {
        T* __restrict__ gq = g + q * qstride;
        const T* __restrict__ cp = c_prev + q * V;
        T* __restrict__ cn = c_new + q * V;
        T* __restrict__ hn = h_new + q * V;
        T* __restrict__ oq = out + q * V;
        T* __restrict__ tq = gq + 4 * V;
        const int64_t cnt = H - q * V;  // valid units in this block (>= V: all)
        for (int64_t l = 0; l < V; ++l) {
            T i, f, gg, o, t, c, h;
            lstm_forward_point(gq[l], gq[V + l], gq[2 * V + l], gq[3 * V + l], cp[l], fb, i, f,
                               gg, o, t, c, h);
            gq[l] = i;
            gq[V + l] = f;
            gq[2 * V + l] = gg;
            gq[3 * V + l] = o;
            tq[l] = t;
            cn[l] = c;
            hn[l] = h;
            if (l < cnt) oq[l] = h;
        }
    }
}

// act: this row's saved slots (unit block q at act + q * aqstride: 4V gate activations, then
// V tanh c'); dh: the gradient at h' from step t+1 (zeroed here: the GEMM adds dG W_hh after),
// plus dout ([H], the layer output's gradient, or null) for the H valid units; dc: in from step
// t+1, out to step t-1; dg: this row's gate gradients, unit block q at dg + q * qstride.
// dout is added here, as masked vector loads, and not into dh beforehand: that loop's scalar
// tail (9 units at H = 25) left stores the vector loads here could not forward from, the top
// stall of the backward (perf: a quarter of its samples).
template <typename T>
RK_ALWAYS_INLINE void back_cells(int64_t nblk, int64_t H, const T* __restrict__ act,
                                 int64_t aqstride, const T* __restrict__ c_prev,
                                 const T* __restrict__ dout, T* __restrict__ dh,
                                 T* __restrict__ dc, T* __restrict__ dg, int64_t qstride) {
    constexpr int64_t V = lanes<T>();
    for (int64_t q = 0; q < nblk; ++q) {
        const T* __restrict__ a = act + q * aqstride;
        T* __restrict__ d = dg + q * qstride;
        const T* __restrict__ cp = c_prev + q * V;
        const T* __restrict__ tq = a + 4 * V;
        T* __restrict__ dhq = dh + q * V;
        T* __restrict__ dcq = dc + q * V;
        const T* __restrict__ doq = dout ? dout + q * V : nullptr;
        const int64_t cnt = H - q * V;  // valid units in this block (>= V: all)
        for (int64_t l = 0; l < V; ++l) {
            T dhl = dhq[l];
            if (doq && l < cnt) dhl += doq[l];
            T di, df, dgg, dO, dcp;
            lstm_backward_point(a[l], a[V + l], a[2 * V + l], a[3 * V + l], tq[l], cp[l], dhl,
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
    Dims<T> d;
    Panels<T> wc;  // [K, 4Hp] = [W_hh^T (H rows); W_ih^T (I rows); b_ih + b_hh]
    const T* table;  // table input (ids): the table packed, [V, 4Hp]; else null
    GemmPath path;
};

template <typename T>
RK_ALWAYS_INLINE void fwd_steps_impl(const Fwd<T>& f, int64_t lo, int64_t hi) {
    const ForwardArgs<T>& a = *f.a;
    const Dims<T>& d = f.d;
    const int64_t B = d.B, Tn = d.Tn, I = d.I, H = d.H, Hp = d.Hp, R = d.R;
    constexpr int64_t V = lanes<T>(), PW = 4 * V;
    const int64_t nblk = Hp / V, aq = B * 5 * V;  // act: stride of a step's unit blocks
    const T fb = T(a.spec.forget_bias);
    T* xh = a.hprev;
    T* cs = a.cprev;
    // [x_t | 1] after row (t, b)'s h: once h is in (its padding lanes overlap them); the
    // columns past K, and row T's past h, are never read
    auto put_x = [&](int64_t t, int64_t b) {
        T* row = xh + (t * B + b) * R + H;
        copy_row(row, a.x + (b * Tn + t) * I, I);
        row[I] = T(1);
    };
    for (int64_t b = lo; b < hi; ++b) {  // the state entering step 0, padding zero
        T* hp = xh + b * R;
        T* cp = cs + b * Hp;
        std::memset(hp, 0, Hp * sizeof(T));
        std::memset(cp, 0, Hp * sizeof(T));
        if (a.h0) std::memcpy(hp, a.h0 + b * H, H * sizeof(T));
        if (a.c0) std::memcpy(cp, a.c0 + b * H, H * sizeof(T));
        if (Tn > 0) put_x(0, b);
    }
    for (int64_t t = 0; t < Tn; ++t) {
        // one unit block (4V columns) per call, into that block's contiguous act rows; with no
        // h0 the first step's h is zero, so its H rows of the product are skipped (lab 12-4's
        // step 0: K 26 -> 1 in the first layer, 51 -> 26 in the second)
        const int64_t k0 = t == 0 && !a.h0 ? H : 0;
        for (int64_t q = 0; q < nblk; ++q)
            gemm<T>(false, hi - lo, PW, d.K - k0, T(1), xh + (t * B + lo) * R + k0, R,
                    f.wc.p + (q * d.K + k0) * PW, PW, T(0),
                    a.act + t * B * d.SP + q * aq + lo * 5 * V, 5 * V, f.path);
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t r = t * B + b, rn = r + B;  // row (t, b) and (t + 1, b)
            T* out = a.out + (b * Tn + t) * H;
            if (a.lengths && t >= a.lengths[b]) {  // past this sequence's end: carry the state
                std::memcpy(xh + rn * R, xh + r * R, H * sizeof(T));
                std::memcpy(cs + rn * Hp, cs + r * Hp, Hp * sizeof(T));
                std::memset(out, 0, H * sizeof(T));
                if (t + 1 < Tn) put_x(t + 1, b);
                continue;
            }
            T* g = a.act + t * B * d.SP + b * 5 * V;
            if (f.table) add_packed(nblk, f.table + a.ids[b * Tn + t] * d.GP, g, aq);
            else if (a.projected) add_projected(H, a.x + (b * Tn + t) * 4 * H, g, aq);
            fwd_cells(nblk, H, fb, g, aq, cs + r * Hp, cs + rn * Hp, xh + rn * R, out);
            if (t + 1 < Tn) put_x(t + 1, b);
        }
    }
    for (int64_t b = lo; b < hi; ++b) {  // the final state
        std::memcpy(a.h_n + b * H, xh + (Tn * B + b) * R, H * sizeof(T));
        std::memcpy(a.c_n + b * H, cs + (Tn * B + b) * Hp, H * sizeof(T));
    }
}

RK_CLONES void fwd_steps(const Fwd<float>& f, int64_t lo, int64_t hi) { fwd_steps_impl(f, lo, hi); }
RK_CLONES void fwd_steps(const Fwd<double>& f, int64_t lo, int64_t hi) { fwd_steps_impl(f, lo, hi); }

// Packs the weights; the rows then run as fwd_steps (each chunk sets its rows' starting state
// and writes their final one).
template <typename T>
Fwd<T> fwd_prepare(const ForwardArgs<T>& a, Buffers<T>& buf, int n) {
    const Dims<T> d(a.B, a.T_, a.projected ? 0 : a.I, a.H);
    const int64_t I = d.I, H = d.H, GP = d.GP;
    const Panels<T> wc(d.K, GP, grow(buf.wc, d.K * GP));
    for_unit_blocks<T>(H, [&](int64_t k, int64_t j0, int64_t c0, int64_t cnt) {
        const int64_t g0 = k * H + j0;  // rows g0 .. g0+cnt-1 of the weights
        for (int64_t m = 0; m < H; ++m) {
            T* row = &wc.at(m, c0);  // a unit block never straddles two panels
            for (int64_t l = 0; l < cnt; ++l) row[l] = a.w_hh[(g0 + l) * H + m];
        }
        for (int64_t i = 0; i < I; ++i) {
            T* row = &wc.at(H + i, c0);
            for (int64_t l = 0; l < cnt; ++l) row[l] = a.w_ih[(g0 + l) * I + i];
        }
        T* row = &wc.at(H + I, c0);
        for (int64_t l = 0; l < cnt; ++l) row[l] = a.b_ih[g0 + l] + a.b_hh[g0 + l];
    });
    T* table = nullptr;
    if (a.ids)
        pack_table(a.x, TableIndex(a.V, 4 * H, a.table_t), a.V, H, GP,
                   table = grow(buf.table, a.V * GP));
    // one thread: GEMMs as sized; several: each thread's on the loop (no nested BLAS threads)
    return Fwd<T>{&a, d, wc, table, n > 1 ? GemmPath::loop : GemmPath::automatic};
}

// ---- backward --------------------------------------------------------------------------------

// rows of xh^T dG per ring flush: enough for the weight-gradient GEMM to amortise its pass
// over the K x 4Hp partial, few enough that the ring stays in L2 (settable: tests, benchmarks)
int64_t g_ring_rows = 256;

template <typename T>
struct Bwd {
    const BackwardArgs<T>* a;
    Dims<T> d;
    int n;          // chunks
    int64_t Tb;     // steps per ring
    int64_t Ip;     // I padded to whole vectors (no GEMM column tail in dx)
    Panels<T> whb;  // [4Hp, Hp] W_hh, rows interleaved, padding zero
    Panels<T> wxb;  // [4Hp, Ip] W_ih, likewise
    T* dh;          // [B, Hp] running dh
    T* dc;          // [B, Hp] running dc
    T* ring_g;      // per chunk [4Hp/PW, Tb*Bc, PW]: gate gradients of the last steps, one
                    // block of rows per unit block, so the GEMMs read them contiguously
    T* ring_x;      // per chunk [Tb, Bc, R]: their xh rows
    T* ring_dx;     // per chunk [Tb, Bc, Ip]: their dx
    T* part;        // per chunk [K, 4Hp]: partial [dW_hh; dW_ih; db]^T (interleaved columns)
    T* tables;      // table input: per chunk [V, 4Hp] its partial table gradient, packed
    GemmPath path;
};

// The backward reads each row's saved activations (5 cache lines per unit block) a whole
// forward after they were written, mostly from L3 at lab 12-4 size, and its rows of d_out, which
// are T*H apart; without a prefetch this many rows ahead the first loads of each row were the
// backward's top stalls (perf).
constexpr int64_t kPrefetchRows = 4;

template <typename T>
RK_ALWAYS_INLINE void back_steps_impl(const Bwd<T>& w, int64_t lo, int64_t hi) {
    const BackwardArgs<T>& a = *w.a;
    const Dims<T>& d = w.d;
    const int64_t B = d.B, Tn = d.Tn, I = d.I, H = d.H, Hp = d.Hp, GP = d.GP, R = d.R;
    const int64_t Bc = hi - lo, nblk = Hp / lanes<T>(), Tb = w.Tb, Ip = w.Ip;
    constexpr int64_t PW = 4 * lanes<T>();
    const int64_t qs = Tb * Bc * PW;  // ring_g: stride of its unit blocks
    const int chunk = chunk_index(B, w.n, lo);  // this range's index among the n chunks
    T* rg = w.ring_g + Tb * lo * GP;
    T* rx = w.ring_x + Tb * lo * R;
    T* rdx = w.ring_dx + Tb * lo * Ip;
    T* part = w.part + chunk * d.K * GP;
    std::memset(part, 0, d.K * GP * sizeof(T));
    T* table = nullptr;  // this chunk's partial table gradient (table input)
    if (a.ids) {
        table = w.tables + chunk * a.V * GP;
        std::memset(table, 0, a.V * GP * sizeof(T));
    }
    for (int64_t b = lo; b < hi; ++b) {  // dh, dc entering the last step
        T* dh = w.dh + b * Hp;
        T* dc = w.dc + b * Hp;
        std::memset(dh, 0, Hp * sizeof(T));
        std::memset(dc, 0, Hp * sizeof(T));
        if (a.d_h_n) std::memcpy(dh, a.d_h_n + b * H, H * sizeof(T));
        if (a.d_c_n) std::memcpy(dc, a.d_c_n + b * H, H * sizeof(T));
    }
    int64_t t_top = Tn - 1;  // the ring holds steps t_top, t_top - 1, ... (slot s = t_top - t)
    for (int64_t t = Tn - 1; t >= 0; --t) {
        const int64_t s = t_top - t;
        T* g = rg + s * Bc * PW;  // this step's rows in block 0
        for (int64_t b = lo; b < hi; ++b) {
            const int64_t r = t * B + b;
            T* dg = g + (b - lo) * PW;
            copy_row(rx + (s * Bc + b - lo) * R, a.hprev + r * R, d.K);
            if (a.lengths && t >= a.lengths[b]) {  // dh, dc pass through; no gate gradient
                for (int64_t q = 0; q < nblk; ++q) std::memset(dg + q * qs, 0, PW * sizeof(T));
                if (a.projected && !a.ids)
                    std::memset(a.dx + (b * Tn + t) * 4 * H, 0, 4 * H * sizeof(T));
                continue;
            }
            if (b + kPrefetchRows < hi) {  // a later row's saved activations (kPrefetchRows)
                const T* act = a.act + t * B * d.SP + (b + kPrefetchRows) * 5 * PW / 4;
                for (int64_t q = 0; q < nblk; ++q)
                    for (int64_t l = 0; l < 5; ++l)
                        __builtin_prefetch(act + q * B * 5 * PW / 4 + l * PW / 4, 0, 3);
                if (a.d_out) {  // and its output gradient, rows T*H apart in the batch-major d_out
                    const T* dout = a.d_out + ((b + kPrefetchRows) * Tn + t) * H;
                    for (int64_t j = 0; j < H; j += PW / 4) __builtin_prefetch(dout + j, 0, 3);
                    __builtin_prefetch(dout + H - 1, 0, 3);
                }
            }
            back_cells(nblk, H, a.act + t * B * d.SP + b * 5 * PW / 4, B * 5 * PW / 4,
                       a.cprev + r * Hp, a.d_out ? a.d_out + (b * Tn + t) * H : nullptr,
                       w.dh + b * Hp, w.dc + b * Hp, dg, qs);
            if (table) add_to_packed(nblk, dg, qs, table + a.ids[b * Tn + t] * GP);
            else if (a.projected) put_projected(H, dg, qs, a.dx + (b * Tn + t) * 4 * H);
        }
        // dh_prev = dG W_hh (rows of finished sequences add zero to their carried dh); step
        // 0's goes only to dh0, which a caller may not want (null: the stack's layers)
        if (t > 0 || a.dh0) gemm_blocks<T>(Bc, H, g, qs, w.whb, T(1), w.dh + lo * Hp, Hp, w.path);
        if (s + 1 < Tb && t > 0) continue;
        // flush the ring (steps t_top down to t): dx (projected: written above) and this
        // chunk's weight gradients
        const int64_t rows = (s + 1) * Bc;
        if (!a.projected && a.dx) {
            gemm_blocks<T>(rows, H, rg, qs, w.wxb, T(0), rdx, Ip, w.path);
            for (int64_t q = 0; q <= s; ++q)
                for (int64_t b = lo; b < hi; ++b)
                    copy_row(a.dx + (b * Tn + t_top - q) * I, rdx + (q * Bc + b - lo) * Ip, I);
        }
        for (int64_t q = 0; q < nblk; ++q)
            gemm<T>(true, d.K, PW, rows, T(1), rx, R, rg + q * qs, PW, T(1), part + q * PW, GP,
                    w.path);
        t_top = t - 1;
    }
    for (int64_t b = lo; b < hi; ++b) {  // dh, dc entering step 0
        if (a.dh0) std::memcpy(a.dh0 + b * H, w.dh + b * Hp, H * sizeof(T));
        if (a.dc0) std::memcpy(a.dc0 + b * H, w.dc + b * Hp, H * sizeof(T));
    }
}

RK_CLONES void back_steps(const Bwd<float>& w, int64_t lo, int64_t hi) { back_steps_impl(w, lo, hi); }
RK_CLONES void back_steps(const Bwd<double>& w, int64_t lo, int64_t hi) { back_steps_impl(w, lo, hi); }

// Packs the weights; the rows then run as back_steps (each chunk sets its rows' dh, dc entering
// the last step and writes them out entering step 0).
template <typename T>
Bwd<T> bwd_prepare(const BackwardArgs<T>& a, Buffers<T>& buf, int n) {
    const Dims<T> d(a.B, a.T_, a.projected ? 0 : a.I, a.H);
    const int64_t B = d.B, Tn = d.Tn, I = d.I, H = d.H, Hp = d.Hp, GP = d.GP;
    const int64_t Ip = round_lanes<T>(I);
    const Panels<T> whb(GP, Hp, grow(buf.whb, GP * Hp)), wxb(GP, Ip, grow(buf.wxb, GP * Ip));
    // row c = icol(k, j) of both is row g = kH + j of the weights, cut into panels
    auto put_row = [](const Panels<T>& dst, int64_t c, const T* src, int64_t m) {
        for (int64_t c0 = 0; c0 < m; c0 += dst.PW)
            std::memcpy(&dst.at(c, c0), src + c0, std::min(dst.PW, m - c0) * sizeof(T));
    };
    for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < H; ++j) {
            const int64_t g = k * H + j, c = icol<T>(k, j);
            put_row(whb, c, a.w_hh + g * H, H);
            put_row(wxb, c, a.w_ih + g * I, I);
        }
    const int64_t Bc_min = std::max<int64_t>(1, B / n);
    const int64_t Tb = std::max<int64_t>(1, std::min<int64_t>(Tn, (g_ring_rows + Bc_min - 1) / Bc_min));
    return Bwd<T>{&a, d, n, Tb, Ip, whb, wxb, grow(buf.dh, B * Hp), grow(buf.dc, B * Hp),
                  grow(buf.ring_g, Tb * B * GP), grow(buf.ring_x, Tb * B * d.R),
                  grow(buf.ring_dx, Tb * B * Ip), grow(buf.part, n * d.K * GP),
                  a.ids ? grow(buf.tables, n * a.V * GP) : nullptr,
                  n > 1 ? GemmPath::loop : GemmPath::automatic};
}

// After every chunk's rows: the chunks' partial sums added and unpacked.
template <typename T>
void bwd_finish(const Bwd<T>& w) {
    const BackwardArgs<T>& a = *w.a;
    const Dims<T>& d = w.d;
    const int64_t I = d.I, H = d.H, GP = d.GP;
    const int n = w.n;
    const TableIndex at(a.V, 4 * H, a.table_t);
    for (int64_t v = 0; a.ids && v < a.V; ++v)  // the chunks' packed table partials into dx
        for_unit_blocks<T>(H, [&](int64_t k, int64_t j0, int64_t c0, int64_t cnt) {
            for (int64_t l = 0; l < cnt; ++l) {
                T sum = w.tables[v * GP + c0 + l];
                for (int c = 1; c < n; ++c) sum += w.tables[(c * a.V + v) * GP + c0 + l];
                a.dx[at(v, k * H + j0 + l)] = sum;
            }
        });
    // sum the chunks' partials, then undo the interleaving and transposition
    T* p = w.part;
    for (int k = 1; k < n; ++k) {
        const T* __restrict__ q = w.part + k * d.K * GP;
        for (int64_t e = 0; e < d.K * GP; ++e) p[e] += q[e];
    }
    if (a.projected && a.dw_ih != a.dx)  // the caller's to form (unless it is dx, table_t)
        std::memset(a.dw_ih, 0, 4 * H * a.I * sizeof(T));
    for_unit_blocks<T>(H, [&](int64_t k, int64_t j0, int64_t c0, int64_t cnt) {
        const int64_t g0 = k * H + j0;
        for (int64_t m = 0; m < H; ++m)
            for (int64_t l = 0; l < cnt; ++l) a.dw_hh[(g0 + l) * H + m] = p[m * GP + c0 + l];
        for (int64_t i = 0; i < I; ++i)
            for (int64_t l = 0; l < cnt; ++l) a.dw_ih[(g0 + l) * I + i] = p[(H + i) * GP + c0 + l];
        for (int64_t l = 0; l < cnt; ++l) a.db_ih[g0 + l] = a.db_hh[g0 + l] = p[(H + I) * GP + c0 + l];
    });
}

template <typename T>
class LstmLayer final : public Layer<T> {
  public:
    void forward_prepare(const ForwardArgs<T>& a, int n) override {
        f_.emplace(fwd_prepare(a, buf_, n));
    }
    void forward_rows(int64_t lo, int64_t hi) const override { fwd_steps(*f_, lo, hi); }
    void backward_prepare(const BackwardArgs<T>& a, int n) override {
        b_.emplace(bwd_prepare(a, buf_, n));
    }
    void backward_rows(int64_t lo, int64_t hi) const override { back_steps(*b_, lo, hi); }
    void backward_finish() const override { bwd_finish(*b_); }

  private:
    Buffers<T> buf_;
    std::optional<Fwd<T>> f_;  // this call's (in place: no allocation per call)
    std::optional<Bwd<T>> b_;
};

}  // namespace

template <typename T>
std::unique_ptr<Layer<T>> make_lstm_layer() {
    return std::unique_ptr<Layer<T>>(new LstmLayer<T>);
}
template std::unique_ptr<Layer<float>> make_lstm_layer<float>();
template std::unique_ptr<Layer<double>> make_lstm_layer<double>();

void set_lstm_ring_rows(int64_t rows) { g_ring_rows = std::max<int64_t>(1, rows); }
int64_t lstm_ring_rows() { return g_ring_rows; }

}  // namespace rk
