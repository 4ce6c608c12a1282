// A hook for benchmarks/bench_cpp_gemm.py: the GEMM of the kernels, timed in C++.
#include <algorithm>
#include <chrono>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace rkpy {

void bind_bench(py::module_& m) {
    m.def("_bench_gemm",
          [](int64_t M, int64_t N, int64_t K, bool trans_a, bool blas, int reps) {
              // float32 C[M,N] = op(A) B, best of `reps`
              if (M <= 0 || N <= 0 || K <= 0 || reps <= 0)
                  throw py::value_error("M, N, K and reps must be positive");
              std::vector<float> A(M * K, 0.5f), B(K * N, 0.25f), C(M * N);
              if (blas && !rk::have_blas()) throw py::value_error("no BLAS registered");
              const auto path = blas ? rk::GemmPath::blas : rk::GemmPath::loop;
              double best = 1e30;
              {
                  py::gil_scoped_release nogil;
                  for (int r = 0; r < reps; ++r) {
                      auto t0 = std::chrono::steady_clock::now();
                      rk::gemm<float>(trans_a, M, N, K, 1.0f, A.data(), trans_a ? M : K,
                                      B.data(), N, 0.0f, C.data(), N, path);
                      std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
                      best = std::min(best, dt.count());
                  }
              }
              return best;
          },
          py::arg("M"), py::arg("N"), py::arg("K"), py::arg("trans_a"), py::arg("blas"),
          py::arg("reps"));
}

}  // namespace rkpy
