// Adam's update (adam.h). Built with -ffp-contract=off (no FMAs: the NumPy rule's roundings) and
// -fno-math-errno (so the square roots vectorise), CMakeLists.txt.
#include "adam.h"

#include <algorithm>
#include <cmath>

#include "chunks.h"
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

template <typename T>
std::array<T, 7> adam_scalars(int64_t t, double lr, double b1, double b2, double eps,
                              bool tf_form) {
    const double bc1 = 1.0 - std::pow(b1, double(t));
    const double bc2_sqrt = std::sqrt(1.0 - std::pow(b2, double(t)));
    return {T(b1), T(1.0 - b1), T(b2), T(1.0 - b2), T(eps),
            T(tf_form ? lr * bc2_sqrt / bc1 : lr / bc1), T(bc2_sqrt)};
}

template <typename T>
void adam_update(const AdamArgs<T>& a, int threads) {
    if (a.n <= 0) return;
    run_chunks(a.n, int(std::max<int64_t>(1, std::min<int64_t>(threads, a.n))),
               [](void* p, int64_t lo, int64_t hi) {
                   adam_range(*static_cast<const AdamArgs<T>*>(p), lo, hi);
               }, const_cast<AdamArgs<T>*>(&a));
}

template std::array<float, 7> adam_scalars<float>(int64_t, double, double, double, double, bool);
template std::array<double, 7> adam_scalars<double>(int64_t, double, double, double, double,
                                                    bool);
template void adam_update<float>(const AdamArgs<float>&, int);
template void adam_update<double>(const AdamArgs<double>&, int);

}  // namespace rk
