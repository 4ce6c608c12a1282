// common.cuh -- what every rnnkern CUDA kernel shares: the element type, the per-element cell
// steps (wrapping rnnkern/cells.h with the indexing, masking and saving of one (b, j) element),
// a grid-wide barrier for the persistent kernels, and the thread-block cluster primitives of
// the cluster kernels.
//
// Shape legend: B batch, T time steps, I input, H hidden, G gates (RNN 1, LSTM 4, GRU 3),
// S saved activations per element (RNN 1: h'; LSTM 5: i f g o tanh(c'); GRU 4: r z n gh_n).
//
// Buffer layouts (every kernel and rnnkern/backends/cuda/ agree on these):
//   gx      [B,T,G*H]  x W_ih^T, one GEMM before the time loop (b_ih is added in the kernels)
//   h_all   [T+1,B,H]  carried hidden state; h_all[0] = h0, h_all[t+1] = state after step t
//   c_all   [T+1,B,H]  carried cell state (LSTM)
//   outputs [B,T,H]    zero at t >= lengths[b]
//   acts    [T,B,S*H]  saved activations, block s of element (b, j) at s*H + j
//   rh      [T,B,H]    r * h_prev (GRU reset_after=false: the input of the W_hn GEMM)
//   d_gx    [B,T,G*H]  gradient of the input-side pre-activation (dx, dW_ih, db_ih GEMMs)
//   d_gh    [T,B,G*H]  gradient of the hidden-side pre-activation (dh_prev, dW_hh, db_hh)
//
// Compiled once per element type: -DRK_REAL=float or -DRK_REAL=double. No host headers here
// (NVRTC has none); cells.h guards its own.
#pragma once

#include "rnnkern/cells.h"

#ifndef RK_REAL
#define RK_REAL float
#endif

typedef RK_REAL real;
typedef long long i64;

enum { RK_RNN = 0, RK_LSTM = 1, RK_GRU = 2 };

// Dynamic shared memory of the block, 16-byte aligned (the host emulator used in the CPU tests
// defines its own version of this macro).
#ifndef RK_DYNAMIC_SMEM
#define RK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// A grid-stride loop over elements e in [0, n) of the element-wise kernels (optim.cu,
// dropout.cu): any 1-D grid covers any n.
#define RK_FOR_EACH_ELEMENT(n)                                                      \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n);   \
         e += (long long)gridDim.x * blockDim.x)

// Loads of buffers that other blocks of the same launch write (h_all, rh, d_gh): through L2
// only, because L1 is not coherent between SMs.
template <typename T>
__device__ __forceinline__ T rk_ld_shared_state(const T* p) { return __ldcg(p); }

// ---------------------------------------------------------------------------------------------
// grid barrier for the persistent kernels
//
// bar[0] counts arrivals, bar[1] is the generation, bar[2] an error flag the host checks: a
// block that waits too long (blocks not co-resident) sets it and leaves, so a bad launch becomes
// a Python error instead of a hang. bar[0] must be 0 at launch.

#define RK_BARRIER_SPIN_LIMIT (1LL << 26)

__device__ inline void rk_grid_sync(unsigned int* bar) {
    __syncthreads();
    if (gridDim.x == 1) return;  // one block: __syncthreads is the whole barrier
    if (threadIdx.x == 0) {
        volatile unsigned int* vbar = bar;
        const unsigned int gen = vbar[1];
        __threadfence();  // this block's writes are visible before it is counted
        if (atomicAdd(bar, 1u) == gridDim.x - 1) {
            atomicExch(bar, 0u);  // reset before releasing: nobody can arrive again until then
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            long long spins = 0;
            while (vbar[1] == gen) {
                if (vbar[2] != 0u || ++spins > RK_BARRIER_SPIN_LIMIT) {
                    atomicExch(bar + 2, 1u);
                    break;
                }
                __nanosleep(64);
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// thread-block clusters (sm_90+), for cluster.cu
//
// Templates on a tag, so that only kernels that call them emit these PTX instructions (the
// other modules also build for older GPUs). barrier.cluster.arrive.release + wait.acquire:
// every thread of every block of the cluster arrives, and the memory writes made before the
// arrive are visible to the cluster's threads after the wait. The host emulator of the tests
// defines its own versions (RK_HOST_EMULATION).

#ifndef RK_HOST_EMULATION
template <int TAG>
__device__ __forceinline__ unsigned int rk_cluster_rank() {  // this block's rank in its cluster
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

template <int TAG>
__device__ __forceinline__ unsigned int rk_cluster_id() {  // the cluster's index in the grid
    unsigned int r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}

template <int TAG>
__device__ __forceinline__ void rk_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\t"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
#endif

// ---------------------------------------------------------------------------------------------
// forward, one element (b, j) of step t
//
// hp_* are the hidden-side products (h W_hh^T)[b, gate*H + j] without b_hh (a cuBLAS GEMM in
// the stepwise strategy, shared-memory dot products in the persistent one).

struct RkFwd {
    int B, T, H, flag;  // flag: RNN 1 = relu; GRU 1 = reset_after
    real forget_bias;
    const real* gx;
    const real* b_ih;
    const real* b_hh;
    const i64* lengths;
    real* h_all;
    real* c_all;
    real* outputs;
    real* acts;
    real* rh;
};

__device__ __forceinline__ i64 rk_gx_at(const RkFwd& a, int t, int b, int G) {
    return ((i64)b * a.T + t) * G * a.H;
}

// pre-activation k of element row gx (already offset to (b, t)): x W_ih^T + b_ih + hp + b_hh
__device__ __forceinline__ real rk_pre(const RkFwd& a, const real* gx, int k, real hp) {
    return (gx[k] + a.b_ih[k]) + hp + a.b_hh[k];
}

// writes h_all[t+1], outputs[:, t] (and c_all[t+1]) for element (b, j) given the new values
__device__ __forceinline__ void rk_fwd_store(const RkFwd& a, int t, int b, int j, bool valid,
                                             real h_prev, real h_new) {
    const i64 bj = (i64)b * a.H + j;
    a.h_all[(i64)(t + 1) * a.B * a.H + bj] = valid ? h_new : h_prev;
    a.outputs[((i64)b * a.T + t) * a.H + j] = valid ? h_new : real(0);
}

__device__ inline void rk_rnn_fwd_elem(const RkFwd& a, int t, int b, int j, real hp) {
    const int H = a.H;
    const bool valid = t < a.lengths[b];
    const real h_prev = rk_ld_shared_state(a.h_all + ((i64)t * a.B + b) * H + j);
    const real pre = rk_pre(a, a.gx + rk_gx_at(a, t, b, 1), j, hp);
    const real h_new = rk::rnn_forward_point(pre, a.flag != 0);
    a.acts[((i64)t * a.B + b) * H + j] = h_new;
    rk_fwd_store(a, t, b, j, valid, h_prev, h_new);
}

__device__ inline void rk_lstm_fwd_elem(const RkFwd& a, int t, int b, int j, real hp_i,
                                        real hp_f, real hp_g, real hp_o) {
    const int H = a.H;
    const bool valid = t < a.lengths[b];
    const i64 bj = (i64)b * H + j;
    const real h_prev = rk_ld_shared_state(a.h_all + (i64)t * a.B * H + bj);
    const real c_prev = a.c_all[(i64)t * a.B * H + bj];
    const real* gx = a.gx + rk_gx_at(a, t, b, 4);
    real i, f, g, o, tanh_c, c_new, h_new;
    rk::lstm_forward_point(rk_pre(a, gx, j, hp_i), rk_pre(a, gx, H + j, hp_f),
                           rk_pre(a, gx, 2 * H + j, hp_g), rk_pre(a, gx, 3 * H + j, hp_o),
                           c_prev, a.forget_bias,
                           i, f, g, o, tanh_c, c_new, h_new);
    real* s = a.acts + ((i64)t * a.B + b) * 5 * H + j;
    s[0] = i; s[H] = f; s[2 * H] = g; s[3 * H] = o; s[4 * H] = tanh_c;
    a.c_all[(i64)(t + 1) * a.B * H + bj] = valid ? c_new : c_prev;
    rk_fwd_store(a, t, b, j, valid, h_prev, h_new);
}

// GRU phase 1: r and z (saved), and r * h_prev for reset_after=false
__device__ inline void rk_gru_fwd_gates_elem(const RkFwd& a, int t, int b, int j, real hp_r,
                                             real hp_z) {
    const int H = a.H;
    const real* gx = a.gx + rk_gx_at(a, t, b, 3);
    real r, z;
    rk::gru_gates_point(rk_pre(a, gx, j, hp_r), rk_pre(a, gx, H + j, hp_z), r, z);
    real* s = a.acts + ((i64)t * a.B + b) * 4 * H + j;
    s[0] = r; s[H] = z;
    if (!a.flag) {
        const real h_prev = rk_ld_shared_state(a.h_all + ((i64)t * a.B + b) * H + j);
        a.rh[((i64)t * a.B + b) * H + j] = r * h_prev;
    }
}

// GRU phase 2: candidate and new state; hp_n = (h W_hn^T) or ((r h) W_hn^T), without b_hn.
// Reads r and z saved by phase 1 (same thread or an earlier launch / __syncthreads).
__device__ inline void rk_gru_fwd_cand_elem(const RkFwd& a, int t, int b, int j, real hp_n) {
    const int H = a.H;
    const bool valid = t < a.lengths[b];
    const real h_prev = rk_ld_shared_state(a.h_all + ((i64)t * a.B + b) * H + j);
    const real gx_n = a.gx[rk_gx_at(a, t, b, 3) + 2 * H + j] + a.b_ih[2 * H + j];
    const real gh_n = hp_n + a.b_hh[2 * H + j];
    real* s = a.acts + ((i64)t * a.B + b) * 4 * H + j;
    real n, h_new;
    rk::gru_forward_point(s[0], s[H], gx_n, gh_n, h_prev, a.flag != 0, n, h_new);
    s[2 * H] = n; s[3 * H] = gh_n;
    rk_fwd_store(a, t, b, j, valid, h_prev, h_new);
}

// ---------------------------------------------------------------------------------------------
// backward, one element (b, j) of step t (time runs backwards)
//
// dh [B,H] holds, between steps, the part of dL/dh_t that does not come through the W_hh GEMM
// (the carried value where step t+1 was masked, dh_direct of a GRU, or d_h_n at the start).
// dh_in = dh[b,j] + (that GEMM's row, when the caller has it separately). After the element,
// dh[b,j] holds the same kind of partial sum for step t-1 and d_gx/d_gh hold the gate grads.

struct RkBwd {
    int B, T, H, flag;
    const i64* lengths;
    const real* acts;
    const real* h_all;
    const real* c_all;
    const real* d_out;  // [B,T,H] or nullptr-equivalent (has_dout == 0)
    int has_dout;
    real* dh;
    real* dc;
    real* d_gx;
    real* d_gh;
};

// dL/dh' of element (b, j) at step t (zero where masked)
__device__ __forceinline__ real rk_dh_new(const RkBwd& a, int t, int b, int j, bool valid,
                                          real dh_in) {
    if (!valid) return real(0);
    return a.has_dout ? dh_in + a.d_out[((i64)b * a.T + t) * a.H + j] : dh_in;
}

__device__ __forceinline__ void rk_bwd_store(const RkBwd& a, int t, int b, int j, int G,
                                             int gate, real d_x, real d_h) {
    const int GH = G * a.H;
    a.d_gx[((i64)b * a.T + t) * GH + gate * a.H + j] = d_x;
    a.d_gh[((i64)t * a.B + b) * GH + gate * a.H + j] = d_h;
}

__device__ inline void rk_rnn_bwd_elem(const RkBwd& a, int t, int b, int j, real dh_in) {
    const bool valid = t < a.lengths[b];
    const real dh_new = rk_dh_new(a, t, b, j, valid, dh_in);
    const real h_new = a.acts[((i64)t * a.B + b) * a.H + j];
    const real da = valid ? rk::rnn_backward_point(h_new, dh_new, a.flag != 0) : real(0);
    rk_bwd_store(a, t, b, j, 1, 0, da, da);
    a.dh[(i64)b * a.H + j] = valid ? real(0) : dh_in;
}

__device__ inline void rk_lstm_bwd_elem(const RkBwd& a, int t, int b, int j, real dh_in) {
    const int H = a.H;
    const bool valid = t < a.lengths[b];
    const i64 bj = (i64)b * H + j;
    const real dh_new = rk_dh_new(a, t, b, j, valid, dh_in);
    const real* s = a.acts + ((i64)t * a.B + b) * 5 * H + j;
    const real c_prev = a.c_all[(i64)t * a.B * H + bj];
    real d_ai = 0, d_af = 0, d_ag = 0, d_ao = 0, dc_prev = 0;
    if (valid)
        rk::lstm_backward_point(s[0], s[H], s[2 * H], s[3 * H], s[4 * H], c_prev, dh_new,
                                a.dc[bj], d_ai, d_af, d_ag, d_ao, dc_prev);
    rk_bwd_store(a, t, b, j, 4, 0, d_ai, d_ai);
    rk_bwd_store(a, t, b, j, 4, 1, d_af, d_af);
    rk_bwd_store(a, t, b, j, 4, 2, d_ag, d_ag);
    rk_bwd_store(a, t, b, j, 4, 3, d_ao, d_ao);
    if (valid) a.dc[bj] = dc_prev;
    a.dh[bj] = valid ? real(0) : dh_in;
}

// GRU phase 1: z and n blocks (and r for reset_after=true). For reset_after=false the r block
// is written by rk_gru_bwd_reset_elem once d_rh = d_an W_hn is known.
__device__ inline void rk_gru_bwd_elem(const RkBwd& a, int t, int b, int j, real dh_in) {
    const int H = a.H;
    const bool valid = t < a.lengths[b];
    const real dh_new = rk_dh_new(a, t, b, j, valid, dh_in);
    const real* s = a.acts + ((i64)t * a.B + b) * 4 * H + j;
    const real h_prev = rk_ld_shared_state(a.h_all + ((i64)t * a.B + b) * H + j);
    real d_ar = 0, d_az = 0, d_an = 0, d_ghn = 0, dh_direct = 0;
    if (valid)
        rk::gru_backward_point(s[0], s[H], s[2 * H], s[3 * H], h_prev, dh_new, a.flag != 0,
                               d_ar, d_az, d_an, d_ghn, dh_direct);
    if (a.flag) rk_bwd_store(a, t, b, j, 3, 0, d_ar, d_ar);
    rk_bwd_store(a, t, b, j, 3, 1, d_az, d_az);
    rk_bwd_store(a, t, b, j, 3, 2, d_an, d_ghn);
    a.dh[(i64)b * H + j] = valid ? dh_direct : dh_in;
}

// GRU reset_after=false, phase 2: d_rh = (d_an W_hn)[b, j] -> r block and dh += d_rh * r
__device__ inline void rk_gru_bwd_reset_elem(const RkBwd& a, int t, int b, int j, real d_rh) {
    const int H = a.H;
    const bool valid = t < a.lengths[b];
    const real r = a.acts[((i64)t * a.B + b) * 4 * H + j];
    const real h_prev = rk_ld_shared_state(a.h_all + ((i64)t * a.B + b) * H + j);
    real d_ar = 0, dh_add = 0;
    if (valid) rk::gru_backward_reset_before(r, h_prev, d_rh, d_ar, dh_add);
    rk_bwd_store(a, t, b, j, 3, 0, d_ar, d_ar);
    if (valid) a.dh[(i64)b * H + j] += dh_add;
}
