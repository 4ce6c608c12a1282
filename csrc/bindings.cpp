// rnnkern._C: thin pybind11 bindings over the C++ CPU kernels (csrc/cpu).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "rnnkern C++ CPU backend";
    m.attr("__version__") = RK_VERSION;
}
