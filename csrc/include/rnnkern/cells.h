// rnnkern/cells.h -- the pointwise math of every recurrent cell, forward and backward, written once
// for the C++ CPU kernels (g++) and the CUDA kernels (nvcc). Same math as rnnkern/reference.py.
//
// Shape legend: B batch, T time steps, I input, H hidden, G gates (RNN 1, LSTM 4, GRU 3).
// Gate order follows PyTorch: LSTM i,f,g,o; GRU r,z,n.
//
// Every function here works on ONE element (b, j) of one time step; the caller owns the loops,
// the GEMMs (x W_ih^T hoisted over all B*T rows, h W_hh^T per step) and the `lengths` masking:
//   forward,  t >= lengths[b]: write outputs[b,t,:] = 0 and carry h (and c) unchanged;
//   backward, t >= lengths[b]: pass dh (and dc) through unchanged, the step's gate grads are 0.
// Names: `a_*` are gate pre-activations, i.e. (x W_ih^T + b_ih + h W_hh^T + b_hh)[b, gate*H + j];
// `d_*` are gradients of the loss with respect to the named quantity.
//
// Templates are meant for T = float or double. double uses libm (exact to the NumPy reference to
// ~1 ulp). float on the host uses branch-free forms that GCC auto-vectorises: a rational tanh
// (absolute error ~2.5e-7), sigmoid through it, and an exp
// (Cody-Waite range reduction + degree-7 Taylor polynomial, relative error ~2e-7, for the
// softmax), because glibc's scalar tanhf/expf
// keep the pointwise loops from vectorising (see DESIGN.md, "Measured"); on the device float uses
// CUDA's expf/tanhf. Define RK_EXACT_MATH to route float through libm on the host too.
// Host loops over these functions vectorise only with -fno-trapping-math (GCC otherwise refuses
// to if-convert the clamps); the CMake build sets it.
#pragma once

// NVRTC (CuPy's run-time compiler) has no host C headers; its built-ins declare the math
// functions, and the host-only float helpers below are left out of its device-only compile.
#if !defined(__CUDACC_RTC__)
#include <math.h>
#include <stdint.h>
#include <string.h>
#endif

#ifdef __CUDACC__
#define RK_HD __host__ __device__
#else
#define RK_HD
#endif

namespace rk {

// ---------------------------------------------------------------------------------------------
// activations

#if !defined(__CUDACC_RTC__)
namespace detail {

RK_HD inline uint32_t float_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
RK_HD inline float bits_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

// exp(x) for float without branches or float->int conversions, so loops over it vectorise.
// x is clamped to [-87, 88] so 2^n stays a normal float; NaN propagates through the polynomial.
RK_HD inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f;          // 1.5 * 2^23: adding it rounds to an integer...
    const float k = x * 1.44269504088896341f + magic;  // ...which then sits in k's low bits
    const float n = k - magic;                 // n = round(x / ln 2)
    // r = x - n ln2 in two steps (ln2 = hi + lo, hi has 9 significant bits so n*hi is exact)
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440054690583e-4f;
    // exp(r), |r| <= ln2/2: Taylor series to r^7 (truncation error < 6e-9 relative)
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // 2^n built in the exponent field; unsigned arithmetic so a NaN's garbage n is not UB
    const uint32_t scale = (float_bits(k) - float_bits(magic) + 127u) << 23;
    return p * bits_float(scale);
}

// tanh(x) for float: a P(a^2) / Q(a^2) on a = min(|x|, 9) (beyond 9, float32 tanh rounds to 1),
// the rational form and coefficients of rnnkern/backends/numba_math.py (fitted by
// benchmarks/fit_fast_tanh.py), then min(y, 1) so sigmoid stays in [0, 1], x's sign, and x
// itself when x is NaN. Absolute error 2.5e-7 (a 1e-4 grid over [-30, 30]); tanh(+-inf) = +-1.
// The clamps act on the bit patterns of magnitudes (non-negative floats order as unsigned
// integers): one integer min each. Written as float compares they vectorised to compare-and-
// blend chains that made the pointwise passes latency-bound. With them gone, a true divide is
// faster than a Newton reciprocal. LSTM forward pointwise pass, per 16-unit block (standalone,
// one core; -O3, before -> after): AVX-512 36.7 -> 29.4 ns, AVX2 99 -> 46 ns, SSE2 278 -> 230 ns.
RK_HD inline float tanh_f32(float x) {
    const uint32_t xb = float_bits(x), nine = 0x41100000u, one = 0x3F800000u;
    const uint32_t ab = xb & 0x7FFFFFFFu;
    const float a = bits_float(ab < nine ? ab : nine);  // NaN: 9 here, x restored below
    const float s = a * a;
    float p = -8.821895e-14f;
    p = p * s + 5.4323167e-11f;
    p = p * s + -2.05861e-08f;
    p = p * s + 1.1248937e-05f;
    p = p * s + 0.0031131832f;
    p = p * s + 0.13092294f;
    p = p * s + 1.0f;
    float q = 0.00025594985f;
    q = q * s + 0.024532009f;
    q = q * s + 0.4642562f;
    q = q * s + 1.0f;
    const uint32_t yb = float_bits(a * p / q);
    const float y = bits_float((yb < one ? yb : one) | (xb & 0x80000000u));
    return x != x ? x : y;
}

}  // namespace detail
#endif  // !__CUDACC_RTC__

RK_HD inline double act_exp(double x) { return ::exp(x); }
RK_HD inline double act_tanh(double x) { return ::tanh(x); }

RK_HD inline float act_exp(float x) {
#if defined(__CUDA_ARCH__) || defined(RK_EXACT_MATH)
    return ::expf(x);
#else
    return detail::exp_f32(x);
#endif
}

RK_HD inline float act_tanh(float x) {
#if defined(__CUDA_ARCH__) || defined(RK_EXACT_MATH)
    return ::tanhf(x);
#else
    return detail::tanh_f32(x);
#endif
}

// logistic sigmoid, written as in the reference: 1 / (1 + exp(-a))
template <typename T>
RK_HD inline T act_sigmoid(T a) { return T(1) / (T(1) + act_exp(-a)); }

RK_HD inline float act_sigmoid(float a) {
#if defined(__CUDA_ARCH__) || defined(RK_EXACT_MATH)
    return 1.0f / (1.0f + ::expf(-a));
#else
    return 0.5f * detail::tanh_f32(0.5f * a) + 0.5f;  // sigmoid a = (1 + tanh(a/2)) / 2
#endif
}

// ---------------------------------------------------------------------------------------------
// RNN:  h' = act(a),  act = tanh | relu

/// Forward. a: pre-activation. Returns h' (also what backward needs; save it).
template <typename T>
RK_HD inline T rnn_forward_point(T a, bool relu) {
    return relu ? (a > T(0) ? a : T(0)) : act_tanh(a);
}

/// Backward. h_new: saved h'; dh_new: dL/dh' (output grad + recurrent grad, masked by caller).
/// Returns dL/da, which is both d_gx (input side) and d_gh (hidden side).
template <typename T>
RK_HD inline T rnn_backward_point(T h_new, T dh_new, bool relu) {
    return dh_new * (relu ? (h_new > T(0) ? T(1) : T(0)) : (T(1) - h_new * h_new));
}

// ---------------------------------------------------------------------------------------------
// LSTM:  i = s(a_i)  f = s(a_f + forget_bias)  g = tanh(a_g)  o = s(a_o)
//        c' = f c + i g      h' = o tanh(c')

/// Forward. Inputs: the four pre-activations of element (b, j), c_prev = c[b,j], forget_bias.
/// Outputs: activations i, f, g, o and tanh_c = tanh(c') (save them for backward), c_new, h_new.
template <typename T>
RK_HD inline void lstm_forward_point(T a_i, T a_f, T a_g, T a_o, T c_prev, T forget_bias,
                                     T& i, T& f, T& g, T& o, T& tanh_c, T& c_new, T& h_new) {
    i = act_sigmoid(a_i);
    f = act_sigmoid(a_f + forget_bias);
    g = act_tanh(a_g);
    o = act_sigmoid(a_o);
    c_new = f * c_prev + i * g;
    tanh_c = act_tanh(c_new);
    h_new = o * tanh_c;
}

/// Backward. Inputs: saved i, f, g, o, tanh_c of this step, c_prev = the cell state it started
/// from, dh_new = dL/dh', dc_new = dL/dc' arriving from later steps (both masked by caller).
/// Outputs: d_ai, d_af, d_ag, d_ao (= d_gx = d_gh of the four gate blocks) and dc_prev.
/// dh_prev = [d_ai d_af d_ag d_ao] W_hh is the caller's GEMM.
template <typename T>
RK_HD inline void lstm_backward_point(T i, T f, T g, T o, T tanh_c, T c_prev, T dh_new, T dc_new,
                                      T& d_ai, T& d_af, T& d_ag, T& d_ao, T& dc_prev) {
    const T dc = dc_new + dh_new * o * (T(1) - tanh_c * tanh_c);
    d_ai = dc * g * i * (T(1) - i);
    d_af = dc * c_prev * f * (T(1) - f);
    d_ag = dc * i * (T(1) - g * g);
    d_ao = dh_new * tanh_c * o * (T(1) - o);
    dc_prev = dc * f;
}

// ---------------------------------------------------------------------------------------------
// GRU:  r = s(a_r)  z = s(a_z)
//   reset_after=true  (PyTorch/cuDNN): gh_n = (h W_hn^T + b_hn)[b,j],      n = tanh(gx_n + r gh_n)
//   reset_after=false (TF1 GRUCell):   gh_n = ((r h) W_hn^T + b_hn)[b,j],  n = tanh(gx_n + gh_n)
//   h' = (1 - z) n + z h
// gx_n = (x W_in^T + b_in)[b,j]. With reset_after=false the caller computes r for the whole row
// first (gru_gates_point), forms r*h, runs the W_hn GEMM, then calls gru_forward_point.

/// Forward, phase 1: the reset and update gates from their pre-activations.
template <typename T>
RK_HD inline void gru_gates_point(T a_r, T a_z, T& r, T& z) {
    r = act_sigmoid(a_r);
    z = act_sigmoid(a_z);
}

/// Forward, phase 2: candidate n and new state h_new. Save r, z, n, gh_n for backward.
template <typename T>
RK_HD inline void gru_forward_point(T r, T z, T gx_n, T gh_n, T h_prev, bool reset_after,
                                    T& n, T& h_new) {
    n = act_tanh(reset_after ? gx_n + r * gh_n : gx_n + gh_n);
    h_new = (T(1) - z) * n + z * h_prev;
}

/// Backward, phase 1. Inputs: saved r, z, n, gh_n, h_prev = h the step started from,
/// dh_new = dL/dh' (masked by caller). Outputs:
///   d_az, d_an      gradients of the z and n pre-activations (input side: d_gx blocks z, n)
///   d_ar            reset_after=true: gradient of the r pre-activation; false: 0 (needs phase 2)
///   d_ghn           gradient at the W_hn GEMM's output (+ b_hn): d_gh block n
///                   (reset_after=true: d_an * r;  false: d_an)
///   dh_direct       dh_new * z, the part of dh_prev that bypasses the GEMMs
/// reset_after=true: dh_prev = dh_direct + [d_ar d_az d_ghn] W_hh.
/// reset_after=false: the caller forms d_rh = d_an W_hn (a GEMM), then gru_backward_reset_before.
template <typename T>
RK_HD inline void gru_backward_point(T r, T z, T n, T gh_n, T h_prev, T dh_new, bool reset_after,
                                     T& d_ar, T& d_az, T& d_an, T& d_ghn, T& dh_direct) {
    d_an = dh_new * (T(1) - z) * (T(1) - n * n);
    d_az = dh_new * (h_prev - n) * z * (T(1) - z);
    d_ar = reset_after ? d_an * gh_n * r * (T(1) - r) : T(0);
    d_ghn = reset_after ? d_an * r : d_an;
    dh_direct = dh_new * z;
}

/// Backward, phase 2 (reset_after=false only). d_rh = (d_an W_hn)[b,j], the gradient at r*h.
/// Outputs d_ar (gradient of the r pre-activation) and dh_add = d_rh * r, to add to dh_prev
/// beside dh_direct and [d_ar d_az] W_hr,z.
template <typename T>
RK_HD inline void gru_backward_reset_before(T r, T h_prev, T d_rh, T& d_ar, T& dh_add) {
    d_ar = d_rh * h_prev * r * (T(1) - r);
    dh_add = d_rh * r;
}

}  // namespace rk
