// persistent.cuh -- the time loops of the persistent strategies: ONE launch per layer runs the
// whole sequence, W_hh stays in shared memory, and the blocks that share the work of a batch row
// (a "team") meet once per step (twice for a GRU with reset_after=false). Two kinds of team:
//
//   RK_TEAM_GRID     (persistent.cu): the whole grid is one team. Block k owns hidden units
//                    [k*hb, k*hb + nj) of every batch row; the blocks meet at the global-memory
//                    grid barrier of common.cuh, so the host launches at most one block per SM.
//   RK_TEAM_CLUSTER  (cluster.cu, sm_90+): each thread-block cluster of RK_CLUSTER_SIZE blocks is
//                    a team that owns batch rows [id*bc, id*bc + bc); its block of rank r owns
//                    units [r*hb, r*hb + nj). Teams meet at the hardware cluster barrier and never
//                    wait for each other, so any number of clusters may be launched (no residency
//                    condition, no timeout) and the batch is spread over the SMs.
//
// Either way a block owns the same elements (b, j) at every step, so it only ever reads back its
// own h_all/c_all elements; what other blocks wrote (h_all rows, rh, d_gh) is read through L2.
//
//   forward:  W_hh rows of the owned units, w_s [G][hb][ldw]; per step each block stages h_t
//             (nbc batch rows at a time, h_s [nbc][ldh]) and forms its own
//             (h W_hh^T)[b, g*H + j], then the pointwise cell of its own elements.
//   backward: W_hh columns of the owned units, wc [hb][ldc]; per step phase A (own elements:
//             gate grads into d_gx, d_gh), barrier, phase B (own columns of
//             dh_prev = d_gh[t] W_hh, from the staged d_gh rows of every unit, g_s [nbc][ldg]).
//   Every row stride in shared memory is odd (ldw = H|1, ldh = H|1, ldc = ldg = G*H|1), so
//   threads reading the same offset of different rows hit different banks.
//
// Dot products (rk_block_dots): with many of them (a large batch), 4 x 4 tiles per thread, so
// shared memory is read a quarter as often; with more than half a block's worth, one per thread;
// with fewer (small B), each on a group of up to 32 lanes that take interleaved terms
// (consecutive addresses, no bank conflicts) and add up with shuffles, so a step is not a few
// threads' serial loops of length H (forward) or G*H (backward).
//
// Shape legend and buffer layouts: common.cuh. Dynamic shared memory (elements of real):
//   forward  G*hb*ldw + nbc*ldh + nbc*G*hb        backward  hb*ldc + nbc*ldg + nbc*hb
#pragma once

#include "common.cuh"

#ifndef RK_CLUSTER_SIZE
#define RK_CLUSTER_SIZE 8  // the host passes its own value (rnnkern/backends/cuda/plan.py)
#endif

enum { RK_TEAM_GRID = 0, RK_TEAM_CLUSTER = 1 };

template <int KIND>
__device__ __forceinline__ int rk_gates() { return KIND == RK_LSTM ? 4 : (KIND == RK_GRU ? 3 : 1); }

// The elements this block owns: units [j0, j0 + nj) of batch rows [b_lo, b_hi). nj may be 0
// (a cluster rank past H): such a block only takes part in the barriers.
struct RkOwned {
    int j0, nj, b_lo, b_hi;
};

template <int TEAM>
__device__ __forceinline__ RkOwned rk_owned(int B, int H, int hb, int bc) {
    int rank = blockIdx.x, team = 0;
    if constexpr (TEAM == RK_TEAM_CLUSTER) {
        rank = (int)rk_cluster_rank<TEAM>();
        team = (int)rk_cluster_id<TEAM>();
    }
    const int j0 = rank * hb, b_lo = min(B, team * bc);
    return {j0, max(0, min(hb, H - j0)), b_lo, min(B, b_lo + bc)};
}

// the once-per-step meeting of a team (see the top of this file)
template <int TEAM>
__device__ __forceinline__ void rk_team_sync(unsigned int* bar) {
    if constexpr (TEAM == RK_TEAM_CLUSTER) rk_cluster_sync<TEAM>();
    else rk_grid_sync(bar);
}

// copy columns [col0, col0 + ncol) of nb rows of length ld, which other blocks may have written,
// into dst [nb][ld_dst]. 32-bit index arithmetic (64-bit division is a long instruction
// sequence on a GPU), and four loads in flight per thread before their stores: a store to
// shared memory keeps the compiler from moving the next global load above it, so a plain loop
// would wait for L2 once per element.
__device__ __forceinline__ void rk_stage_rows(real* dst, int ld_dst, const real* src, int nb,
                                              int ld, int col0, int ncol) {
    const int total = nb * ncol, step = blockDim.x;
    for (int base = threadIdx.x; base < total; base += 4 * step) {
        real v[4];
        for (int u = 0; u < 4; ++u) {
            const int i = base + u * step, r = i / ncol;
            if (i < total) v[u] = rk_ld_shared_state(src + (i64)r * ld + col0 + (i - r * ncol));
        }
        for (int u = 0; u < 4; ++u) {
            const int i = base + u * step, r = i / ncol;
            if (i < total) dst[(i64)r * ld_dst + (i - r * ncol)] = v[u];
        }
    }
}

// rk_block_dots with a 4 x 4 tile of dots per thread: a step k reads 8 values from shared
// memory for 16 products, where a dot per thread reads 2 for 1, so a block with many dots (the
// forward of a large batch) is bound by shared-memory reads a quarter as much. A tile is rows
// r0..r0+3 and the interleaved columns ct, ct + tiles_c, ct + 2 tiles_c, ct + 3 tiles_c:
// consecutive threads take consecutive ct of one row tile, so a warp reads x rows as
// broadcasts and consecutive w rows (odd strides: different banks). A tile past the edge
// repeats the last row or column and stores nothing for it.
template <class XRow, class WRow, class Out>
__device__ void rk_block_tiles(int nr, int nc, int n, XRow xrow, WRow wrow, Out out) {
    constexpr int R = 4, C = 4;
    const int tiles_c = (nc + C - 1) / C, tiles = (nr + R - 1) / R * tiles_c;
    for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
        const int r0 = tile / tiles_c * R, ct = tile % tiles_c;
        const real* x[R];
        const real* w[C];
#pragma unroll
        for (int u = 0; u < R; ++u) x[u] = xrow(min(r0 + u, nr - 1));
#pragma unroll
        for (int v = 0; v < C; ++v) w[v] = wrow(min(ct + v * tiles_c, nc - 1));
        real acc[R][C];
#pragma unroll
        for (int u = 0; u < R; ++u)
#pragma unroll
            for (int v = 0; v < C; ++v) acc[u][v] = 0;
        for (int k = 0; k < n; ++k) {
            real xk[R], wk[C];
#pragma unroll
            for (int u = 0; u < R; ++u) xk[u] = x[u][k];
#pragma unroll
            for (int v = 0; v < C; ++v) wk[v] = w[v][k];
#pragma unroll
            for (int u = 0; u < R; ++u)
#pragma unroll
                for (int v = 0; v < C; ++v) acc[u][v] += xk[u] * wk[v];
        }
#pragma unroll
        for (int u = 0; u < R; ++u)
#pragma unroll
            for (int v = 0; v < C; ++v) {
                const int c = ct + v * tiles_c;
                if (r0 + u < nr && c < nc) out(r0 + u, c, acc[u][v]);
            }
    }
    __syncthreads();
}

// out(r, c, dot(xrow(r), wrow(c), n)) for every r < nr, c < nc: rows of shared memory, dotted
// in one of three ways (each adds its terms in order k = 0, 1, ... within a thread):
//  - at least tile_min dots: 4 x 4 tiles of them per thread (rk_block_tiles);
//  - more than half a block's worth: one per thread;
//  - fewer: each on a group of gs lanes of one warp (a power of two up to 32, while nr * nc * gs
//    fits the block and every lane keeps >= min_chunk terms): lane l of the group takes terms
//    l, l + gs, ... (the group reads consecutive addresses, no bank conflicts) and the group
//    adds up with shuffles. The passes over the dots are the same for every thread, so whole
//    warps reach each shuffle.
// Dot (r, c) is item i = r * nc + c of the one-per-thread and lane-group passes. Ends with
// __syncthreads.
template <class XRow, class WRow, class Out>
__device__ void rk_block_dots(int nr, int nc, int n, int min_chunk, int tile_min, XRow xrow,
                              WRow wrow, Out out) {
    const int n_items = nr * nc;
    if (n_items >= tile_min) {
        rk_block_tiles(nr, nc, n, xrow, wrow, out);
        return;
    }
    int gs = 1;
    if (blockDim.x % 32 == 0)
        while (gs < 32 && n_items * gs * 2 <= (int)blockDim.x && n >= gs * 2 * min_chunk) gs *= 2;
    if (gs == 1) {  // a plain loop: with the strided loop below instead, the cluster forward at
                    // B,T,I,H = 32,100,128,256 (two dots of 256 terms a thread) ran 2x slower
        for (int i = threadIdx.x; i < n_items; i += blockDim.x) {
            const int r = i / nc, c = i - r * nc;
            const real* x = xrow(r);
            const real* w = wrow(c);
            real acc = 0;
            for (int k = 0; k < n; ++k) acc += x[k] * w[k];
            out(r, c, acc);
        }
        __syncthreads();
        return;
    }
    const int per_pass = blockDim.x / gs, lane = threadIdx.x % gs;
    for (int base = 0; base < n_items; base += per_pass) {
        const int i = base + threadIdx.x / gs, r = i / nc, c = i - r * nc;
        real acc = 0;
        if (i < n_items) {
            const real* x = xrow(r);
            const real* w = wrow(c);
            for (int k = lane; k < n; k += gs) acc += x[k] * w[k];
        }
        for (int offset = gs / 2; offset > 0; offset >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (i < n_items && lane == 0) out(r, c, acc);
    }
    __syncthreads();
}

template <int KIND, int TEAM>
__device__ void rk_persist_fwd(int B, int T, int H, int hb, int bc, int nbc, int min_chunk,
                               int tile_min, int flag, real forget_bias,
                               const real* __restrict__ gx, const real* __restrict__ w_hh,
                               const real* __restrict__ b_ih, const real* __restrict__ b_hh,
                               const i64* __restrict__ lengths,
                               real* h_all, real* c_all, real* outputs, real* acts, real* rh,
                               unsigned int* bar) {
    const int G = rk_gates<KIND>();
    const int ldw = H | 1, ldh = H | 1;
    const RkOwned own = rk_owned<TEAM>(B, H, hb, bc);
    const int j0 = own.j0, nj = own.nj;
    const bool two_phase = KIND == RK_GRU && !flag;  // reset_after=false: (r h) W_hn^T
    const int Gd = two_phase ? 2 : G;                  // gate blocks formed from h_t
    RK_DYNAMIC_SMEM(smem_raw);
    real* w_s = reinterpret_cast<real*>(smem_raw);    // [G][hb][ldw]
    real* h_s = w_s + (i64)G * hb * ldw;                // [nbc][ldh]
    real* p_s = h_s + (i64)nbc * ldh;                   // [nbc][G][hb] dot products
    for (i64 i = threadIdx.x; i < (i64)G * nj * H; i += blockDim.x) {
        const int row = (int)(i / H), k = (int)(i % H), g = row / nj, jl = row % nj;
        w_s[((i64)g * hb + jl) * ldw + k] = w_hh[((i64)g * H + j0 + jl) * H + k];
    }
    const RkFwd a = {B, T, H, flag, forget_bias, gx, b_ih, b_hh, lengths, h_all, c_all,
                     outputs, acts, rh};
    __syncthreads();
    for (int t = 0; t < T; ++t) {
        for (int b0 = own.b_lo; b0 < own.b_hi; b0 += nbc) {
            const int nb = min(nbc, own.b_hi - b0);
            rk_stage_rows(h_s, ldh, h_all + ((i64)t * B + b0) * H, nb, H, 0, H);
            __syncthreads();
            // column c of the dots: gate block g = c / nj, unit jl = c % nj
            rk_block_dots(nb, Gd * nj, H, min_chunk, tile_min,
                          [&](int bl) { return h_s + (i64)bl * ldh; },
                          [&](int c) { return w_s + ((i64)(c / nj) * hb + c % nj) * ldw; },
                          [&](int bl, int c, real v) {
                              p_s[(bl * G + c / nj) * hb + c % nj] = v;
                          });
            for (int i = threadIdx.x; i < nb * nj; i += blockDim.x) {
                const int jl = i % nj, bl = i / nj, b = b0 + bl, j = j0 + jl;
                const real* p = p_s + (i64)bl * G * hb + jl;
                if (KIND == RK_RNN) {
                    rk_rnn_fwd_elem(a, t, b, j, p[0]);
                } else if (KIND == RK_LSTM) {
                    rk_lstm_fwd_elem(a, t, b, j, p[0], p[hb], p[2 * hb], p[3 * hb]);
                } else {
                    rk_gru_fwd_gates_elem(a, t, b, j, p[0], p[hb]);
                    if (!two_phase) rk_gru_fwd_cand_elem(a, t, b, j, p[2 * hb]);
                }
            }
            __syncthreads();
        }
        if (two_phase) {
            rk_team_sync<TEAM>(bar);  // rh[t] of every unit is written
            for (int b0 = own.b_lo; b0 < own.b_hi; b0 += nbc) {
                const int nb = min(nbc, own.b_hi - b0);
                rk_stage_rows(h_s, ldh, rh + ((i64)t * B + b0) * H, nb, H, 0, H);
                __syncthreads();
                rk_block_dots(nb, nj, H, min_chunk, tile_min,
                              [&](int bl) { return h_s + (i64)bl * ldh; },
                              [&](int jl) { return w_s + (2 * (i64)hb + jl) * ldw; },
                              [&](int bl, int jl, real v) { p_s[bl * nj + jl] = v; });
                for (int i = threadIdx.x; i < nb * nj; i += blockDim.x)
                    rk_gru_fwd_cand_elem(a, t, b0 + i / nj, j0 + i % nj, p_s[i]);
                __syncthreads();
            }
        }
        rk_team_sync<TEAM>(bar);  // h_all[t+1] of every unit is written
    }
}

template <int KIND, int TEAM>
__device__ void rk_persist_bwd(int B, int T, int H, int hb, int bc, int nbc, int min_chunk,
                               int tile_min, int flag, const real* __restrict__ w_hh,
                               const i64* __restrict__ lengths,
                               const real* __restrict__ acts, const real* __restrict__ h_all,
                               const real* __restrict__ c_all, const real* __restrict__ d_out,
                               int has_dout, real* dh, real* dc, real* d_gx, real* d_gh,
                               unsigned int* bar) {
    const int G = rk_gates<KIND>();
    const int GH = G * H;
    const int ldc = GH | 1, ldg = GH | 1;
    const RkOwned own = rk_owned<TEAM>(B, H, hb, bc);
    const int j0 = own.j0, nj = own.nj;
    const bool two_phase = KIND == RK_GRU && !flag;
    const int rows = two_phase ? 2 * H : GH;  // W_hh rows that multiply h itself
    RK_DYNAMIC_SMEM(smem_raw);
    real* wc = reinterpret_cast<real*>(smem_raw);  // [hb][ldc], wc[jl][row] = W_hh[row][j0+jl]
    real* g_s = wc + (i64)hb * ldc;                  // [nbc][ldg] staged d_gh rows
    real* r_s = g_s + (i64)nbc * ldg;                // [nbc][hb] dot products
    for (i64 i = threadIdx.x; i < (i64)GH * nj; i += blockDim.x) {
        const int row = (int)(i / nj), jl = (int)(i % nj);
        wc[(i64)jl * ldc + row] = w_hh[(i64)row * H + j0 + jl];
    }
    const RkBwd a = {B, T, H, flag, lengths, acts, h_all, c_all, d_out, has_dout, dh, dc,
                     d_gx, d_gh};
    __syncthreads();
    for (int t = T - 1; t >= 0; --t) {
        // phase A: gate gradients of the owned elements
        for (int i = threadIdx.x; i < (own.b_hi - own.b_lo) * nj; i += blockDim.x) {
            const int b = own.b_lo + i / nj, j = j0 + i % nj;
            const real dh_in = dh[(i64)b * H + j];
            if (KIND == RK_RNN) rk_rnn_bwd_elem(a, t, b, j, dh_in);
            else if (KIND == RK_LSTM) rk_lstm_bwd_elem(a, t, b, j, dh_in);
            else rk_gru_bwd_elem(a, t, b, j, dh_in);
        }
        rk_team_sync<TEAM>(bar);  // d_gh[t] of every unit is written
        const real* dg_t = d_gh + (i64)t * B * GH;
        if (two_phase) {  // d_rh = d_an W_hn, then the r block
            for (int b0 = own.b_lo; b0 < own.b_hi; b0 += nbc) {
                const int nb = min(nbc, own.b_hi - b0);
                rk_stage_rows(g_s, ldg, dg_t + (i64)b0 * GH, nb, GH, 2 * H, H);
                __syncthreads();
                rk_block_dots(nb, nj, H, min_chunk, tile_min,
                              [&](int bl) { return g_s + (i64)bl * ldg; },
                              [&](int jl) { return wc + (i64)jl * ldc + 2 * H; },
                              [&](int bl, int jl, real v) { r_s[bl * nj + jl] = v; });
                for (int i = threadIdx.x; i < nb * nj; i += blockDim.x)
                    rk_gru_bwd_reset_elem(a, t, b0 + i / nj, j0 + i % nj, r_s[i]);
                __syncthreads();
            }
            rk_team_sync<TEAM>(bar);  // r blocks of d_gh[t] are written
        }
        // phase B: dh_prev[b, j] += (d_gh[t] W_hh)[b, j] for the owned columns j
        for (int b0 = own.b_lo; b0 < own.b_hi; b0 += nbc) {
            const int nb = min(nbc, own.b_hi - b0);
            rk_stage_rows(g_s, ldg, dg_t + (i64)b0 * GH, nb, GH, 0, rows);
            __syncthreads();
            rk_block_dots(nb, nj, rows, min_chunk, tile_min,
                          [&](int bl) { return g_s + (i64)bl * ldg; },
                          [&](int jl) { return wc + (i64)jl * ldc; },
                          [&](int bl, int jl, real v) { r_s[bl * nj + jl] = v; });
            for (int i = threadIdx.x; i < nb * nj; i += blockDim.x) {
                const int b = b0 + i / nj;
                if (t < lengths[b]) dh[(i64)b * H + j0 + i % nj] += r_s[i];
            }
            __syncthreads();
        }
    }
}

// the kernels' parameter lists (persistent.cu and cluster.cu); bc: batch rows per team (B for
// the grid team); bar: the grid barrier's words (unused by the cluster kernels)
#define RK_PERSIST_FWD_ARGS                                                                 \
    int B, int T, int H, int hb, int bc, int nbc, int min_chunk, int tile_min, int flag,     \
        real forget_bias, const real* gx, const real* w_hh, const real* b_ih,                \
        const real* b_hh, const i64* lengths, real* h_all, real* c_all, real* outputs,       \
        real* acts, real* rh, unsigned int* bar
#define RK_PERSIST_FWD_CALL                                                                  \
    (B, T, H, hb, bc, nbc, min_chunk, tile_min, flag, forget_bias, gx, w_hh, b_ih, b_hh,      \
     lengths, h_all, c_all, outputs, acts, rh, bar)

#define RK_PERSIST_BWD_ARGS                                                                 \
    int B, int T, int H, int hb, int bc, int nbc, int min_chunk, int tile_min, int flag,     \
        const real* w_hh, const i64* lengths, const real* acts, const real* h_all,           \
        const real* c_all, const real* d_out, int has_dout, real* dh, real* dc, real* d_gx,  \
        real* d_gh, unsigned int* bar
#define RK_PERSIST_BWD_CALL                                                                  \
    (B, T, H, hb, bc, nbc, min_chunk, tile_min, flag, w_hh, lengths, acts, h_all, c_all,      \
     d_out, has_dout, dh, dc, d_gx, d_gh, bar)
