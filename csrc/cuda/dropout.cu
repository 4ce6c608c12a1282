// dropout.cu -- inverted-dropout masks drawn on the GPU (launched by
// rnnkern/backends/cuda/elementwise.py for rnnkern.layers.dropout_mask on device arrays).
//
// A counter-based generator: element e's 53-bit uniform draw is SplitMix64's output for the
// state key + (e+1) * golden_gamma, so a mask is a pure function of (key, shape). The host draws
// `key` from the layer's own NumPy generator, once per mask: the masks are reproducible from the
// seed, and a checkpoint of the host generator's state (Sequential.get_rng_state) covers them,
// with no device generator state to save. tests/test_device.py repeats the function in NumPy
// and compares every bit in the host emulator.
//
//   out[e] = scale  where (bits(key, e) >> 11) < threshold,  else 0
//
// threshold = ceil(keep * 2^53), so the test is exactly `u < keep` for the double
// u = (bits >> 11) * 2^-53 in [0, 1), as NumPy's `rng.random() < keep` would be for its u;
// scale = 1/keep rounded to `real`. Shape legend: N elements of the mask, [N] C-contiguous.
// Any 1-D grid works (grid-stride loop).
#include "common.cuh"

RK_HD inline unsigned long long rk_splitmix64(unsigned long long key, unsigned long long e) {
    unsigned long long z = key + (e + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

extern "C" __global__ void rk_dropout_mask(long long n, real* out, long long key,
                                           long long threshold, real scale) {
    const unsigned long long k = (unsigned long long)key;
    RK_FOR_EACH_ELEMENT(n) {
        const long long u53 = (long long)(rk_splitmix64(k, (unsigned long long)e) >> 11);
        out[e] = u53 < threshold ? scale : (real)0;
    }
}
