// rnnkern._C: pybind11 bindings over the C++ CPU kernels (csrc/cpu), one file per job
// (common.h lists them). Shape legend: csrc/cpu/kernels.h.
#include "common.h"

#ifndef RK_SOURCE_DIGEST
#define RK_SOURCE_DIGEST ""  // built without setup.py: a source tree reports it as stale
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "rnnkern C++ CPU backend (see rnnkern.backends.cpp)";
    m.attr("__version__") = RK_VERSION;
    // rnnkern/_source_tree.py source_digest() over the sources this build compiled (see
    // CMakeLists.txt)
    m.attr("__source_digest__") = RK_SOURCE_DIGEST;
    rkpy::bind_seam(m);
    rkpy::bind_stack(m);
    rkpy::bind_optim(m);
    rkpy::bind_infer(m);
    rkpy::bind_tunables(m);
    rkpy::bind_bench(m);
}
