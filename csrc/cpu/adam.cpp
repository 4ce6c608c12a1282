// Adam's update (adam.h). Built with -ffp-contract=off (no FMAs: the NumPy rule's roundings) and
// -fno-math-errno (so the square roots vectorise), CMakeLists.txt.
#include "adam.h"

#include <cmath>

#include "dispatch.h"

namespace rk {
namespace {

template <typename T>
RK_ALWAYS_INLINE void adam_impl(const AdamArgs<T>& a, int64_t lo, int64_t hi) {
    const T b1 = a.s[0], c1 = a.s[1], b2 = a.s[2], c2 = a.s[3], eps = a.s[4], step = a.s[5],
            bc2 = a.s[6];
    T* __restrict__ p = a.p;
    const T* __restrict__ g = a.g;
    T* __restrict__ m = a.m;
    T* __restrict__ v = a.v;
    const bool tf_form = a.tf_form;  // loop-invariant: GCC unswitches the loop on it
    for (int64_t i = lo; i < hi; ++i) {
        const T gi = g[i];
        const T mi = m[i] * b1 + c1 * gi;
        const T vi = v[i] * b2 + c2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const T denom = tf_form ? std::sqrt(vi) + eps : std::sqrt(vi) / bc2 + eps;
        p[i] = p[i] - step * (mi / denom);
    }
}

}  // namespace

RK_CLONES void adam_range(const AdamArgs<float>& a, int64_t lo, int64_t hi) {
    adam_impl(a, lo, hi);
}
RK_CLONES void adam_range(const AdamArgs<double>& a, int64_t lo, int64_t hi) {
    adam_impl(a, lo, hi);
}

}  // namespace rk
