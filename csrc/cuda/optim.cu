// optim.cu -- the optimizers' update rules, each fused into ONE element-wise kernel over the flat
// parameter, gradient and state buffers of a model on the GPU, and the step gate that decides,
// on the device, whether they run (launched by rnnkern/backends/cuda/elementwise.py for
// rnnkern/optim.py).
//
// Each kernel repeats the NumPy rule of its optimizer in rnnkern/optim.py operation by
// operation, every operation rounded once to `real` as one NumPy ufunc call rounds it: the
// _rn intrinsics are never contracted into an FMA (nvcc and NVRTC contract a*b+c by default),
// and sqrt/division are IEEE round-to-nearest, as NumPy's. Scalars arrive already rounded to
// `real` by the host, as NumPy rounds a Python float against a float32 array; the two that
// depend on the step count (Adam's) are formed here in double from the host's table, as Python
// forms them, then rounded once. So the results are those of the NumPy rule to the bit
// (tests/test_device.py checks it in the host emulator).
//
// The gate: a training step on the device never reads its loss on the host. rk_step_gate (one
// thread) looks at the loss instead and writes the step's flags; every update kernel reads
// them first and, for a non-finite loss, leaves every parameter and state element as it was.
// The step count lives on the device too (clock[0]), advanced only by a finite step, so a
// skipped step does not count, as on the host.
//
// Shape legend: N parameters in all (the flat length); every buffer is [N], C-contiguous.
// Any 1-D grid works (grid-stride loop).
//   clock [2] long long: [0] finite steps taken (t), [1] 1 once the lazily made state slots
//                        (SGD's momentum buffer) hold values, 0 while they are new
//   flags [2] int:       this step's [0] go (the loss is finite, or no loss was given),
//                        [1] first (go, and the lazily made slots are written for the first time)
//   tally [4] double:    [0] sum of the finite losses, [1] finite steps, [2] non-finite steps,
//                        [3] the last loss (the Trainer reads it every few steps)
//   bias  [R,2] double:  Adam's (1 - b1^t, sqrt(1 - b2^t)) for t = 1..R, as Python computes
//                        them; rows past R equal row R (the host stops the table where both
//                        reach 1.0 exactly, and makes it long enough for every other t)
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

// finite: x - x is 0 for every finite x, NaN for NaN and +-inf (no <cmath> needed in NVRTC)
__device__ __forceinline__ bool rk_finite(double x) { return rk_sub(x, x) == 0.0; }

// Every update kernel starts with RK_GATE: a step the gate stopped reads and writes nothing.
#define RK_GATE(flags) \
    if (!(flags)[0]) return

// The step gate, launched with ONE thread before the update kernels (n is 1). go = the loss is
// finite (always, when has_loss is 0: a plain optimizer.step); a go step advances t and marks
// the lazily made slots written; has_tally: add the loss to the tally as well.
extern "C" __global__ void rk_step_gate(long long n, const double* loss, int has_loss,
                                        long long* clock, int* flags, double* tally,
                                        int has_tally) {
    if (blockIdx.x != 0 || threadIdx.x != 0 || n < 1) return;
    const double value = has_loss ? loss[0] : 0.0;
    const int go = !has_loss || rk_finite(value);
    flags[0] = go;
    flags[1] = go && clock[1] == 0;
    if (go) {
        clock[0] += 1;
        clock[1] = 1;
    }
    if (has_tally) {
        if (go) {
            tally[0] = rk_add(tally[0], value);
            tally[1] = rk_add(tally[1], 1.0);
        } else {
            tally[2] = rk_add(tally[2], 1.0);
        }
        tally[3] = value;
    }
}

// SGD (torch.optim.SGD): g += wd p; buf = g (first step) or momentum buf + g;
// g = nesterov ? g + momentum buf : buf; p -= lr g.  buf is unused without momentum.
extern "C" __global__ void rk_sgd_update(long long n, real* p, const real* g_in, real* buf,
                                         const int* flags, real lr, real momentum,
                                         real weight_decay, int has_wd, int has_momentum,
                                         int nesterov) {
    RK_GATE(flags);
    const int first = flags[1];
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

// Adam: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; then, with t = clock[0] (this step's,
// the gate has advanced it) and (bc1, bc2_sqrt) = bias row t:
//   tf:    p -= step (m / (sqrt(v) + eps)),           step = lr bc2_sqrt / bc1
//   torch: p -= step (m / (sqrt(v) / bc2_sqrt + eps)), step = lr / bc1
// step is formed in double, left to right as Python does, then rounded to real, as are the
// host's scalars.
extern "C" __global__ void rk_adam_update(long long n, real* p, const real* g_in, real* m,
                                          real* v, const int* flags, const long long* clock,
                                          const double* bias, long long bias_rows, double lr,
                                          real beta1, real one_minus_beta1, real beta2,
                                          real one_minus_beta2, real eps, real weight_decay,
                                          int has_wd, int torch_mode) {
    RK_GATE(flags);
    const long long t = clock[0];  // >= 1: the gate advanced it
    const long long row = (t < bias_rows ? t : bias_rows) - 1;
    const double bc1 = bias[2 * row], bc2 = bias[2 * row + 1];
    const real step = (real)(torch_mode ? rk_div(lr, bc1) : rk_div(rk_mul(lr, bc2), bc1));
    const real bc2_sqrt = (real)bc2;
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
                                             real* ga, real* buf, const int* flags, real rho,
                                             real one_minus_rho, real eps, real lr,
                                             real momentum, int centered, int has_momentum) {
    RK_GATE(flags);
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
                                             const int* flags, real lr, real eps) {
    RK_GATE(flags);
    RK_FOR_EACH_ELEMENT(n) {
        const real g = g_in[e];
        const real s = rk_add(sum[e], rk_mul(g, g));
        sum[e] = s;
        p[e] = rk_sub(p[e], rk_mul(lr, rk_div(g, rk_add(rk_sqrt(s), eps))));
    }
}
