// stepwise.cu -- strategy "stepwise": per time step, cuBLAS does the recurrent GEMM (launched
// by rnnkern/backends/cuda/seam.py through CuPy) and one of these kernels does the fused
// pointwise cell math for all B*H elements. One thread per element (b, j); any 1-D grid
// covering B*H works.
//
// Shape legend and buffer layouts: common.cuh. Every kernel takes the step index t and reads
// or writes its slice of the whole-sequence buffers, so the host never builds views.
//
//   forward   RNN/LSTM: gh = h_all[t] W_hh^T                     -> rk_{rnn,lstm}_fwd_step
//             GRU reset_after=true:  gh = h_all[t] W_hh^T         -> rk_gru_fwd_step
//             GRU reset_after=false: gh_rz = h_all[t] W_hh[:2H]^T -> rk_gru_fwd_gates_step
//                                    gh_n = rh[t] W_hh[2H:]^T     -> rk_gru_fwd_cand_step
//   backward  dh_in = dh + dh_gemm -> rk_*_bwd_step -> dh_gemm = d_gh[t] W_hh (GRU with
//             reset_after=false: rk_gru_bwd_step, d_rh = d_gh[t][:,2H:] W_hh[2H:],
//             rk_gru_bwd_reset_step, dh_gemm = d_gh[t][:,:2H] W_hh[:2H]).
#include "common.cuh"

#define RK_ELEMENT_INDEX                                               \
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;          \
    if (e >= (i64)B * H) return;                                       \
    const int b = (int)(e / H), j = (int)(e % H);

#define RK_FWD_ARGS                                                                      \
    int B, int T, int H, int t, int flag, real forget_bias, const real* __restrict__ gx,   \
        const real* __restrict__ gh, int ldgh, const real* __restrict__ b_ih,            \
        const real* __restrict__ b_hh,                                                   \
        const i64* __restrict__ lengths, real* h_all, real* c_all, real* outputs,         \
        real* acts, real* rh

#define RK_FWD_STRUCT \
    {B, T, H, flag, forget_bias, gx, b_ih, b_hh, lengths, h_all, c_all, outputs, acts, rh}

// gh [B, ldgh]: the step's GEMM output, gate block g of element (b, j) at g*H + j
extern "C" __global__ void rk_rnn_fwd_step(RK_FWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkFwd a = RK_FWD_STRUCT;
    rk_rnn_fwd_elem(a, t, b, j, gh[(i64)b * ldgh + j]);
}

extern "C" __global__ void rk_lstm_fwd_step(RK_FWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkFwd a = RK_FWD_STRUCT;
    const real* g = gh + (i64)b * ldgh + j;
    rk_lstm_fwd_elem(a, t, b, j, g[0], g[H], g[2 * H], g[3 * H]);
}

// GRU, reset_after=true: all three blocks from one GEMM
extern "C" __global__ void rk_gru_fwd_step(RK_FWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkFwd a = RK_FWD_STRUCT;
    const real* g = gh + (i64)b * ldgh + j;
    rk_gru_fwd_gates_elem(a, t, b, j, g[0], g[H]);
    rk_gru_fwd_cand_elem(a, t, b, j, g[2 * H]);
}

// GRU, reset_after=false, phase 1: gh = h_all[t] W_hh[:2H]^T  [B, 2H]; writes r, z, rh[t]
extern "C" __global__ void rk_gru_fwd_gates_step(RK_FWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkFwd a = RK_FWD_STRUCT;
    const real* g = gh + (i64)b * ldgh + j;
    rk_gru_fwd_gates_elem(a, t, b, j, g[0], g[H]);
}

// GRU, reset_after=false, phase 2: gh = rh[t] W_hh[2H:]^T  [B, H]
extern "C" __global__ void rk_gru_fwd_cand_step(RK_FWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkFwd a = RK_FWD_STRUCT;
    rk_gru_fwd_cand_elem(a, t, b, j, gh[(i64)b * ldgh + j]);
}

// ---------------------------------------------------------------------------------------------
// backward. dh_gemm [B,H]: the previous (later in time) step's d_gh W_hh product.

#define RK_BWD_ARGS                                                                          \
    int B, int T, int H, int t, int flag, const i64* __restrict__ lengths,                    \
        const real* __restrict__ acts, const real* __restrict__ h_all,                       \
        const real* __restrict__ c_all, const real* __restrict__ d_out, int has_dout,         \
        const real* __restrict__ dh_gemm, real* dh, real* dc, real* d_gx, real* d_gh

#define RK_BWD_STRUCT {B, T, H, flag, lengths, acts, h_all, c_all, d_out, has_dout, dh, dc, d_gx, d_gh}

extern "C" __global__ void rk_rnn_bwd_step(RK_BWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkBwd a = RK_BWD_STRUCT;
    rk_rnn_bwd_elem(a, t, b, j, dh[e] + dh_gemm[e]);
}

extern "C" __global__ void rk_lstm_bwd_step(RK_BWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkBwd a = RK_BWD_STRUCT;
    rk_lstm_bwd_elem(a, t, b, j, dh[e] + dh_gemm[e]);
}

extern "C" __global__ void rk_gru_bwd_step(RK_BWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkBwd a = RK_BWD_STRUCT;
    rk_gru_bwd_elem(a, t, b, j, dh[e] + dh_gemm[e]);
}

// GRU, reset_after=false, phase 2: dh_gemm here carries d_rh = d_gh[t][:, 2H:] W_hh[2H:]  [B,H]
extern "C" __global__ void rk_gru_bwd_reset_step(RK_BWD_ARGS) {
    RK_ELEMENT_INDEX
    const RkBwd a = RK_BWD_STRUCT;
    rk_gru_bwd_reset_elem(a, t, b, j, dh_gemm[e]);
}
