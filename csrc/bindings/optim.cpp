// Adam's update over flat arrays on the C++ threads (csrc/cpu/adam.h), for a training step
// whose stack call cannot run it inside (clipping or an embedding's gradients come first, in
// Python): the same rule and bits as rnnkern.optim.Adam.
#include <algorithm>
#include <string>

#include "adam.h"
#include "chunks.h"
#include "common.h"

namespace rkpy {
namespace {

template <typename T>
void adam(py::handle p, py::handle g, py::handle m, py::handle v, int64_t t, double lr,
          double b1, double b2, double eps, bool tf_form) {
    if (t < 1) throw py::value_error("t must be >= 1 (the step's count), got " + std::to_string(t));
    const int64_t n = int64_t(py::reinterpret_borrow<py::array>(p).size());
    const py::dtype dt = py::dtype::of<T>();
    py::object po = checked(p, "p", dt, {n}), go = checked(g, "g", dt, {n}),
               mo = checked(m, "m", dt, {n}), vo = checked(v, "v", dt, {n});
    const std::array<T, 7> s = rk::adam_scalars<T>(t, lr, b1, b2, eps, tf_form);
    rk::AdamArgs<T> a;
    a.n = n;
    a.p = mptr<T>(po);
    a.g = cptr<T>(go);
    a.m = mptr<T>(mo);
    a.v = mptr<T>(vo);
    a.s = s.data();
    a.tf_form = tf_form;
    // a thread's share at least ~16K elements: below that, waking a thread costs more than the
    // pass it takes over
    const int threads = int(std::min<int64_t>(rk::threads(), 1 + n / 16384));
    py::gil_scoped_release nogil;
    rk::adam_update(a, threads);
}

}  // namespace

void bind_optim(py::module_& m) {
    m.def("adam",
          [](py::handle p, py::handle g, py::handle mm, py::handle v, int64_t t, double lr,
             double b1, double b2, double eps, bool tf_form) {
              if (float_dtype_of(p, "p").equal(py::dtype::of<float>()))
                  adam<float>(p, g, mm, v, t, lr, b1, b2, eps, tf_form);
              else
                  adam<double>(p, g, mm, v, t, lr, b1, b2, eps, tf_form);
          },
          py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::kw_only(), py::arg("t"),
          py::arg("lr"), py::arg("b1"), py::arg("b2"), py::arg("eps"), py::arg("tf_form"),
          "Adam's update of step t in place over flat p, m, v [n] from gradients g [n] (all of\n"
          "p's dtype, float32 or float64, C-contiguous): rnnkern.optim.Adam's rule and bits,\n"
          "eps_mode 'tf' when tf_form, else 'torch'; on the C++ backend's threads.");
}

}  // namespace rkpy
