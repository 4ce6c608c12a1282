// The array checks and result arrays of common.h.
#include <string>

#include "common.h"
#include "pool.h"

namespace rkpy {

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

std::string shape_of(const py::array& a) {
    return shape_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

static std::string type_name(py::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

py::object checked(py::handle obj, const std::string& name, const py::dtype& dt,
                   const std::vector<int64_t>& shape, bool optional) {
    if (obj.is_none()) {
        if (optional) return py::none();
        throw py::value_error(name + " must be an array, got None");
    }
    if (!py::isinstance<py::array>(obj))
        throw py::value_error(name + " must be a numpy.ndarray, got " + type_name(obj));
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!a.dtype().equal(dt))
        throw py::value_error(name + " must have dtype " + std::string(py::str(dt)) + ", got " +
                              std::string(py::str(a.dtype())));
    if (std::vector<int64_t>(a.shape(), a.shape() + a.ndim()) != shape)
        throw py::value_error(name + " must have shape " + shape_str(shape) + ", got " +
                              shape_of(a));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous");
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(name + " must be aligned");
    return std::move(a);
}

py::array matrix(py::handle w, const std::string& name, const char* legend) {
    if (!py::isinstance<py::array>(w))
        throw py::value_error(name + " must be a numpy.ndarray, got " + type_name(w));
    auto wa = py::reinterpret_borrow<py::array>(w);
    if (wa.ndim() != 2)
        throw py::value_error(name + " must be 2-D " + legend + ", got shape " + shape_of(wa));
    return wa;
}

py::dtype float_dtype_of(py::handle x, const std::string& name) {
    if (!py::isinstance<py::array>(x))
        throw py::value_error(name + " must be a numpy.ndarray, got " + type_name(x));
    auto dt = py::reinterpret_borrow<py::array>(x).dtype();
    if (dt.equal(py::dtype::of<float>()) || dt.equal(py::dtype::of<double>())) return dt;
    throw py::value_error(name + " must have dtype float32 or float64, got " +
                          std::string(py::str(dt)));
}

void check_range(const int64_t* p, int64_t n, int64_t hi, const std::string& what,
                 const std::string& bound) {
    for (int64_t i = 0; i < n; ++i)
        if (p[i] < 0 || p[i] >= hi)
            throw py::value_error(what + " must lie in " + bound + ", got " +
                                  std::to_string(p[i]) + " at position " + std::to_string(i));
}

template <typename T>
py::array_t<T> new_array(const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (int64_t s : shape) n *= size_t(s);
    if (n * sizeof(T) < (size_t(1) << 18)) return py::array_t<T>(shape);
    void* p = rk::pool_take(n * sizeof(T));
    py::capsule owner(p, [](void* q) { rk::pool_give(q); });
    return py::array_t<T>(shape, static_cast<T*>(p), owner);
}

template py::array_t<float> new_array<float>(const std::vector<int64_t>&);
template py::array_t<double> new_array<double>(const std::vector<int64_t>&);

}  // namespace rkpy
