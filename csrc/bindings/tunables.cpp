// The C++ backend's settings (rnnkern.config's CPP_* names read and set them through these) and
// the registration of the BLAS it hands large GEMMs to.
#include <string>

#include "buffer.h"
#include "chunks.h"
#include "common.h"
#include "gemm.h"
#include "gemm_loop.h"
#include "kernels.h"
#include "pool.h"

namespace rkpy {
namespace {

void* capsule_pointer(py::handle cap, const char* name) {
    if (!PyCapsule_CheckExact(cap.ptr()))
        throw py::value_error(std::string(name) + " must be a PyCapsule holding a Fortran ?gemm");
    void* p = PyCapsule_GetPointer(cap.ptr(), PyCapsule_GetName(cap.ptr()));
    if (!p) throw py::error_already_set();
    return p;
}

int64_t non_negative(int64_t v, const char* name) {
    if (v < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(v));
    return v;
}

}  // namespace

void bind_tunables(py::module_& m) {
    m.def("set_blas",
          [](py::object sgemm, py::object dgemm) {
              if (sgemm.is_none() && dgemm.is_none()) {
                  rk::set_blas(nullptr, nullptr);
                  return;
              }
              void* s = capsule_pointer(sgemm, "sgemm");  // in order: the error names the first
              void* d = capsule_pointer(dgemm, "dgemm");
              rk::set_blas(reinterpret_cast<rk::sgemm_fn>(s), reinterpret_cast<rk::dgemm_fn>(d));
          },
          py::arg("sgemm"), py::arg("dgemm"),
          "Register Fortran BLAS sgemm/dgemm (PyCapsules, e.g. from scipy.linalg.cython_blas."
          "__pyx_capi__); None, None unregisters (the built-in loop does every GEMM).");
    m.def("have_blas", &rk::have_blas);
    m.def("gemm_loop_isa", &rk::gemm_loop_isa, "Which ISA build of the GEMM loop runs here.");

    // rnnkern.config.CPP_* (its docstrings say what each means)
    m.def("set_blas_min_flops", &rk::set_blas_min_flops, py::arg("m_n_k"));
    m.def("blas_min_flops", &rk::blas_min_flops);
    m.def("set_threads", &rk::set_threads, py::arg("n"));
    m.def("threads", &rk::threads);
    m.def("set_split_min_work", &rk::set_split_min_work, py::arg("b_t_g_h_h"));
    m.def("split_min_work", &rk::split_min_work);
    m.def("set_pool_limit", [](int64_t b) { rk::set_pool_limit(size_t(non_negative(b, "bytes"))); },
          py::arg("bytes"));
    m.def("pool_limit", [] { return int64_t(rk::pool_limit()); });
    m.def("pool_held", [] { return int64_t(rk::pool_held()); },
          "Bytes of freed result arrays held for reuse now.");
    m.def("set_lstm_ring_rows", &rk::set_lstm_ring_rows, py::arg("rows"));
    m.def("lstm_ring_rows", &rk::lstm_ring_rows);
    m.def("set_huge_page_min", [](int64_t b) { rk::set_huge_page_min(non_negative(b, "bytes")); },
          py::arg("bytes"));
    m.def("huge_page_min", &rk::huge_page_min);
}

}  // namespace rkpy
