// The seam (kernels.h forward / backward): one layer over the whole batch, its phases (layer.h)
// around one split of the batch, with this thread's layer object of that cell family, so its
// work arrays are reused from call to call.
#include "chunks.h"
#include "layer.h"

namespace rk {
namespace {

template <typename T>
Layer<T>& thread_layer(Cell c) {
    thread_local std::unique_ptr<Layer<T>> layers[2];  // LSTM, RNN/GRU
    std::unique_ptr<Layer<T>>& layer = layers[c == Cell::lstm ? 0 : 1];
    if (!layer) layer = make_layer<T>(c);
    return *layer;
}

}  // namespace

template <typename T>
void forward(const ForwardArgs<T>& a) {
    Layer<T>& layer = thread_layer<T>(a.spec.cell);
    const int n = chunks_for(a.B, layer_work(a.spec, a.B, a.T_, a.H));
    layer.forward_prepare(a, n);
    run_chunks(a.B, n, [](void* p, int64_t lo, int64_t hi) {
        static_cast<const Layer<T>*>(p)->forward_rows(lo, hi);
    }, &layer);
}

template <typename T>
void backward(const BackwardArgs<T>& a) {
    Layer<T>& layer = thread_layer<T>(a.spec.cell);
    const int n = chunks_for(a.B, layer_work(a.spec, a.B, a.T_, a.H));
    layer.backward_prepare(a, n);
    run_chunks(a.B, n, [](void* p, int64_t lo, int64_t hi) {
        static_cast<const Layer<T>*>(p)->backward_rows(lo, hi);
    }, &layer);
    layer.backward_finish();
}

template void forward<float>(const ForwardArgs<float>&);
template void forward<double>(const ForwardArgs<double>&);
template void backward<float>(const BackwardArgs<float>&);
template void backward<double>(const BackwardArgs<double>&);

}  // namespace rk
