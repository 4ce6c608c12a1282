// optim.cu -- the optimizers' update rules, each fused into ONE element-wise kernel over the flat
// parameter, gradient and state buffers of a model on the GPU (launched by
// rnnkern/backends/cuda/elementwise.py for rnnkern/optim.py).
//
// Each kernel repeats the NumPy rule of its optimizer in rnnkern/optim.py operation by
// operation, every operation rounded once to `real` as one NumPy ufunc call rounds it: the
// _rn intrinsics are never contracted into an FMA (nvcc and NVRTC contract a*b+c by default),
// and sqrt/division are IEEE round-to-nearest, as NumPy's. Scalars arrive already rounded to
// `real` by the host, as NumPy rounds a Python float against a float32 array. So the results
// are those of the NumPy rule to the bit (tests/test_device.py checks it in the host emulator).
//
// Shape legend: N parameters in all (the flat length); every buffer is [N], C-contiguous.
// Any 1-D grid works (grid-stride loop).
#include "common.cuh"

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float rk_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rk_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rk_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rk_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float rk_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double rk_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rk_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rk_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double rk_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double rk_sqrt(double a) { return __dsqrt_rn(a); }
#else  // the host (emulator): plain IEEE operations; x86-64 without -mfma cannot contract them
RK_HD inline float rk_add(float a, float b) { return a + b; }
RK_HD inline float rk_sub(float a, float b) { return a - b; }
RK_HD inline float rk_mul(float a, float b) { return a * b; }
RK_HD inline float rk_div(float a, float b) { return a / b; }
RK_HD inline float rk_sqrt(float a) { return ::sqrtf(a); }
RK_HD inline double rk_add(double a, double b) { return a + b; }
RK_HD inline double rk_sub(double a, double b) { return a - b; }
RK_HD inline double rk_mul(double a, double b) { return a * b; }
RK_HD inline double rk_div(double a, double b) { return a / b; }
RK_HD inline double rk_sqrt(double a) { return ::sqrt(a); }
#endif

#define RK_FOR_EACH_ELEMENT(n)                                                      \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n);   \
         e += (long long)gridDim.x * blockDim.x)

// SGD (torch.optim.SGD): g += wd p; buf = g (first step) or momentum buf + g;
// g = nesterov ? g + momentum buf : buf; p -= lr g.  buf is unused without momentum.
extern "C" __global__ void rk_sgd_update(long long n, real* p, const real* g_in, real* buf,
                                         real lr, real momentum, real weight_decay,
                                         int has_wd, int has_momentum, int nesterov,
                                         int first) {
    RK_FOR_EACH_ELEMENT(n) {
        real g = g_in[e];
        if (has_wd) g = rk_add(g, rk_mul(weight_decay, p[e]));
        if (has_momentum) {
            real b = first ? g : rk_add(rk_mul(buf[e], momentum), g);
            buf[e] = b;
            g = nesterov ? rk_add(g, rk_mul(momentum, b)) : b;
        }
        p[e] = rk_sub(p[e], rk_mul(lr, g));
    }
}

// Adam: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; then
//   tf:    p -= step (m / (sqrt(v) + eps)),           step = lr sqrt(1-b2^t) / (1-b1^t)
//   torch: p -= step (m / (sqrt(v) / bc2_sqrt + eps)), step = lr / (1-b1^t)
extern "C" __global__ void rk_adam_update(long long n, real* p, const real* g_in, real* m,
                                          real* v, real beta1, real one_minus_beta1, real beta2,
                                          real one_minus_beta2, real eps, real step,
                                          real bc2_sqrt, real weight_decay, int has_wd,
                                          int torch_mode) {
    RK_FOR_EACH_ELEMENT(n) {
        real g = g_in[e];
        if (has_wd) g = rk_add(g, rk_mul(weight_decay, p[e]));
        const real m_new = rk_add(rk_mul(m[e], beta1), rk_mul(one_minus_beta1, g));
        const real v_new = rk_add(rk_mul(v[e], beta2), rk_mul(one_minus_beta2, rk_mul(g, g)));
        m[e] = m_new;
        v[e] = v_new;
        real denom = rk_sqrt(v_new);
        if (torch_mode) denom = rk_div(denom, bc2_sqrt);
        denom = rk_add(denom, eps);
        p[e] = rk_sub(p[e], rk_mul(step, rk_div(m_new, denom)));
    }
}

// RMSprop (torch.optim.RMSprop): sq = rho sq + (1-rho) g^2; avg = sqrt(sq) + eps (centered:
// ga = rho ga + (1-rho) g, avg = sqrt(sq - ga^2) + eps); p -= lr g/avg, or with momentum
// buf = momentum buf + g/avg, p -= lr buf.  ga and buf are unused when their flag is 0.
extern "C" __global__ void rk_rmsprop_update(long long n, real* p, const real* g_in, real* sq,
                                             real* ga, real* buf, real rho,
                                             real one_minus_rho, real eps, real lr,
                                             real momentum, int centered, int has_momentum) {
    RK_FOR_EACH_ELEMENT(n) {
        const real g = g_in[e];
        const real s = rk_add(rk_mul(sq[e], rho), rk_mul(one_minus_rho, rk_mul(g, g)));
        sq[e] = s;
        real avg;
        if (centered) {
            const real a = rk_add(rk_mul(ga[e], rho), rk_mul(one_minus_rho, g));
            ga[e] = a;
            avg = rk_sqrt(rk_sub(s, rk_mul(a, a)));
        } else {
            avg = rk_sqrt(s);
        }
        avg = rk_add(avg, eps);
        if (has_momentum) {
            const real b = rk_add(rk_mul(buf[e], momentum), rk_div(g, avg));
            buf[e] = b;
            p[e] = rk_sub(p[e], rk_mul(lr, b));
        } else {
            p[e] = rk_sub(p[e], rk_mul(lr, rk_div(g, avg)));
        }
    }
}

// Adagrad (torch.optim.Adagrad): s += g^2; p -= lr g / (sqrt(s) + eps)
extern "C" __global__ void rk_adagrad_update(long long n, real* p, const real* g_in, real* sum,
                                             real lr, real eps) {
    RK_FOR_EACH_ELEMENT(n) {
        const real g = g_in[e];
        const real s = rk_add(sum[e], rk_mul(g, g));
        sum[e] = s;
        p[e] = rk_sub(p[e], rk_mul(lr, rk_div(g, rk_add(rk_sqrt(s), eps))));
    }
}
