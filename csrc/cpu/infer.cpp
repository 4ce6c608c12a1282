// One-step inference over a recurrent stack (infer.h).
#include "infer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "chunks.h"
#include "gemm.h"

namespace rk {

// A layer prepared for one step: its args (pointing at the buffers below, which never move), its
// phases, its state and one step's outputs and activations.
template <typename T>
struct InferStack<T>::Slot {
    ForwardArgs<T> f;
    std::unique_ptr<Layer<T>> layer;
    int n = 1;  // batch chunks of its step
    Buffer<T> h, c, h_n, c_n, out, hprev, cprev, act, rh;
};

template <typename T>
InferStack<T>::InferStack(const std::vector<InferLayerArgs<T>>& layers, int64_t B,
                          const T* table, int64_t V, int64_t I, const T* weight, const T* bias,
                          int64_t C)
    : B_(B), V_(V), I_(I), C_(C), table_(table), weight_(weight), bias_(bias) {
    grow(x_, B * I);
    int64_t in = I;
    for (const InferLayerArgs<T>& y : layers) {
        std::unique_ptr<Slot> s(new Slot);
        const int64_t H = y.H, Hp = padded_hidden(H, sizeof(T));
        const bool lstm = y.spec.cell == Cell::lstm;
        ForwardArgs<T>& f = s->f;
        f.spec = y.spec;
        f.B = B; f.T_ = 1; f.I = in; f.H = H;
        f.x = layers_.empty() ? x_.data() : layers_.back()->out.data();
        f.w_ih = y.w_ih; f.w_hh = y.w_hh; f.b_ih = y.b_ih; f.b_hh = y.b_hh;
        f.h0 = grow(s->h, B * H);
        f.h_n = grow(s->h_n, B * H);
        f.out = grow(s->out, B * H);
        if (lstm) {
            f.c0 = grow(s->c, B * H);
            f.c_n = grow(s->c_n, B * H);
            f.hprev = grow(s->hprev, 2 * B * lstm_xh_width(in, H, sizeof(T)));
            f.cprev = grow(s->cprev, 2 * B * Hp);
        } else {
            f.hprev = grow(s->hprev, B * Hp);
            if (y.spec.cell == Cell::gru && !y.spec.reset_after) f.rh = grow(s->rh, B * Hp);
        }
        f.act = grow(s->act, B * slots_of(y.spec.cell) * Hp);
        s->n = chunks_for(B, layer_work(y.spec, B, 1, H));
        s->layer = make_layer<T>(y.spec.cell);
        s->layer->forward_prepare(f, s->n);  // the weights packed once, for every step
        layers_.push_back(std::move(s));
        in = H;
    }
    // the head multiplies by W^T [H_top, C]
    T* wt = grow(wt_, in * C);
    for (int64_t k = 0; k < C; ++k)
        for (int64_t j = 0; j < in; ++j) wt[j * C + k] = weight[k * in + j];
    grow(logits_, B * C);
    reset();
}

template <typename T>
InferStack<T>::~InferStack() = default;

template <typename T>
T* InferStack<T>::h(size_t l) { return layers_[l]->h.data(); }

template <typename T>
T* InferStack<T>::c(size_t l) { return layers_[l]->f.c0 ? layers_[l]->c.data() : nullptr; }

template <typename T>
void InferStack<T>::reset() {
    for (auto& s : layers_) {
        std::memset(s->h.data(), 0, s->h.size() * sizeof(T));
        if (s->f.c0) std::memset(s->c.data(), 0, s->c.size() * sizeof(T));
    }
}

template <typename T>
void InferStack<T>::step(const int64_t* ids, T* logits) {
    for (int64_t b = 0; b < B_; ++b)
        std::memcpy(x_.data() + b * I_, table_ + ids[b] * I_, I_ * sizeof(T));
    for (auto& s : layers_) {
        run_chunks(B_, s->n, [](void* p, int64_t lo, int64_t hi) {
            static_cast<const Layer<T>*>(p)->forward_rows(lo, hi);
        }, s->layer.get());
        const int64_t n = B_ * s->f.H;  // the step's final state is the next step's first
        std::memcpy(s->h.data(), s->h_n.data(), n * sizeof(T));
        if (s->f.c0) std::memcpy(s->c.data(), s->c_n.data(), n * sizeof(T));
    }
    const Slot& top = *layers_.back();
    gemm<T>(false, B_, C_, top.f.H, T(1), top.out.data(), top.f.H, wt_.data(), C_, T(0), logits,
            C_, GemmPath::automatic);
    if (bias_)
        for (int64_t b = 0; b < B_; ++b)
            for (int64_t k = 0; k < C_; ++k) logits[b * C_ + k] += bias_[k];
}

template <typename T>
void InferStack<T>::generate(const int64_t* ids, int64_t length, const double* u,
                             const SampleArgs& s, int64_t* out) {
    std::vector<int64_t> order;
    std::vector<double> cdf;
    const int64_t* feed = ids;
    for (int64_t t = 0; t < length; ++t) {
        step(feed, logits_.data());
        int64_t* next = out + t * B_;
        for (int64_t b = 0; b < B_; ++b) {
            next[b] = sample_row(logits_.data() + b * C_, C_, s, u ? u[t * B_ + b] : 0.0, order,
                                 cdf);
            if (next[b] < 0) return;  // the caller reads the code and raises
        }
        feed = next;
    }
}

// rnnkern.sample.sample_logits, one row: the same operations in double, so the same id but
// where exp's last bit differs between libm and NumPy and moves a draw across a boundary.
template <typename T>
int64_t sample_row(const T* logits, int64_t C, const SampleArgs& s, double u,
                   std::vector<int64_t>& order, std::vector<double>& cdf) {
    constexpr double ninf = -std::numeric_limits<double>::infinity();
    bool finite_one = false;
    for (int64_t k = 0; k < C; ++k) {
        const double z = double(logits[k]);
        if (std::isnan(z) || z == -ninf) return kNonFinite;
        finite_one = finite_one || z != ninf;
    }
    if (!finite_one) return kAllMasked;
    if (s.temperature == 0.0)  // argmax, the first of tied maxima
        return int64_t(std::max_element(logits, logits + C) - logits);
    cdf.assign(size_t(C), 0.0);
    for (int64_t k = 0; k < C; ++k) cdf[size_t(k)] = double(logits[k]);
    if (s.top_k > 0 && s.top_k < C) {  // keep the k largest logits, lower ids first on ties
        order.resize(size_t(C));
        for (int64_t k = 0; k < C; ++k) order[size_t(k)] = k;
        auto before = [&](int64_t a, int64_t b) {
            return cdf[size_t(a)] > cdf[size_t(b)] || (cdf[size_t(a)] == cdf[size_t(b)] && a < b);
        };
        std::nth_element(order.begin(), order.begin() + s.top_k, order.end(), before);
        for (size_t k = size_t(s.top_k); k < order.size(); ++k) cdf[size_t(order[k])] = ninf;
    }
    const double zmax = *std::max_element(cdf.begin(), cdf.end());
    double total = 0.0;
    for (int64_t k = 0; k < C; ++k) {  // exp((z - max) / temperature), -inf staying -inf
        const double z = cdf[size_t(k)] - zmax;
        total += std::isinf(z) ? 0.0 : std::exp(z / s.temperature);
        cdf[size_t(k)] = total;
    }
    const double target = u * total;
    int64_t id = 0;  // the first index whose cdf exceeds the target
    while (id < C && cdf[size_t(id)] <= target) ++id;
    return std::min(id, C - 1);
}

template class InferStack<float>;
template class InferStack<double>;
template int64_t sample_row<float>(const float*, int64_t, const SampleArgs&, double,
                                   std::vector<int64_t>&, std::vector<double>&);
template int64_t sample_row<double>(const double*, int64_t, const SampleArgs&, double,
                                    std::vector<int64_t>&, std::vector<double>&);

}  // namespace rk
