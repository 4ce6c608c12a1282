// What every file of the rnnkern._C bindings shares: the checks on the arrays Python hands in,
// the result arrays handed back, and one binder per file (module.cpp calls them).
//
// The Python side validates every user input once, at the API (rnnkern/layers.py, the step plan);
// the checks here are the structural ones a C++ kernel needs so that no call can read or write
// out of bounds (type, dtype, shape, C order, alignment): O(1) each, no scan of values, except
// the ids a table is read by (a bad one would read past the table). Each raises ValueError
// naming the argument. Shape legend: csrc/cpu/kernels.h.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace rkpy {

namespace py = pybind11;

std::string shape_str(const std::vector<int64_t>& s);
std::string shape_of(const py::array& a);

// An ndarray of dtype `dt`, C-contiguous, aligned, with exactly `shape`; or None when allowed.
py::object checked(py::handle obj, const std::string& name, const py::dtype& dt,
                   const std::vector<int64_t>& shape, bool optional = false);

// A 2-D ndarray (any dtype; for reading its dims before the full check), legend e.g. "[G*H,I]".
py::array matrix(py::handle w, const std::string& name, const char* legend);

// x's dtype, float32 or float64, which decides the kernels' type; else ValueError.
py::dtype float_dtype_of(py::handle x, const std::string& name);

// Every value of p [n] in [0, hi); else ValueError naming `what` and the bound.
void check_range(const int64_t* p, int64_t n, int64_t hi, const std::string& what,
                 const std::string& bound);

// A new C-contiguous array; from about 256 KiB up its memory comes from rk's pool (pool.h) and
// goes back there when the array (and every view of it) is gone.
template <typename T>
py::array_t<T> new_array(const std::vector<int64_t>& shape);

template <typename T>
const T* cptr(const py::object& o) {
    return o.is_none() ? nullptr
                       : static_cast<const T*>(py::reinterpret_borrow<py::array>(o).data());
}
template <typename T>
T* mptr(const py::object& o) {
    return o.is_none() ? nullptr
                       : static_cast<T*>(py::reinterpret_borrow<py::array>(o).mutable_data());
}

// One binder per job, each in its own file.
void bind_seam(py::module_& m);      // seam.cpp: CellSpec, forward, backward (one layer)
void bind_stack(py::module_& m);     // stack.cpp: StackLayer, StackStep (a training step)
void bind_infer(py::module_& m);     // infer.cpp: InferStack (one-step inference, generation)
void bind_optim(py::module_& m);     // optim.cpp: Adam's update over flat arrays
void bind_tunables(py::module_& m);  // tunables.cpp: threads, pools, BLAS (rnnkern.config)
void bind_bench(py::module_& m);     // bench.cpp: the GEMM benchmark hook

}  // namespace rkpy
