// rnnkern._C: thin pybind11 bindings over the C++ CPU kernels (csrc/cpu).
// Each entry point checks every array (ndarray, dtype, C-contiguous, aligned, shape, lengths
// range) and raises ValueError naming the argument, allocates the results, releases the GIL and
// calls the kernel. Nothing is converted or copied silently: a wrong input is an error.
// Shape legend: B batch, T time, I input, H hidden, G gates, S saved slots (csrc/cpu/kernels.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "buffer.h"
#include "chunks.h"
#include "gemm.h"
#include "gemm_loop.h"
#include "head.h"
#include "kernels.h"
#include "lstm_stack.h"
#include "pool.h"

#ifndef RK_SOURCE_DIGEST
#define RK_SOURCE_DIGEST ""  // built without setup.py: a source tree reports it as stale
#endif

namespace py = pybind11;

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

std::string shape_of(const py::array& a) {
    std::vector<int64_t> s(a.shape(), a.shape() + a.ndim());
    return shape_str(s);
}

// An ndarray of dtype `dt`, C-contiguous, aligned, with exactly `shape`; or None when allowed.
py::object checked(py::handle obj, const char* name, const py::dtype& dt,
                   const std::vector<int64_t>& shape, bool optional = false) {
    if (obj.is_none()) {
        if (optional) return py::none();
        throw py::value_error(std::string(name) + " must be an array, got None");
    }
    if (!py::isinstance<py::array>(obj))
        throw py::value_error(std::string(name) + " must be a numpy.ndarray, got " +
                              std::string(Py_TYPE(obj.ptr())->tp_name));
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!a.dtype().is(dt))
        throw py::value_error(std::string(name) + " must have dtype " +
                              std::string(py::str(dt)) + ", got " +
                              std::string(py::str(a.dtype())));
    std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
    if (got != shape)
        throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) +
                              ", got " + shape_of(a));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous");
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(std::string(name) + " must be aligned");
    return std::move(a);
}

// A new C-contiguous array; from about 256 KiB up its memory comes from rk's pool (pool.h) and
// goes back there when the array (and every view of it) is gone.
template <typename T>
py::array_t<T> new_array(const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (int64_t s : shape) n *= size_t(s);
    if (n * sizeof(T) < (size_t(1) << 18)) return py::array_t<T>(shape);
    void* p = rk::pool_take(n * sizeof(T));
    py::capsule owner(p, [](void* q) { rk::pool_give(q); });
    return py::array_t<T>(shape, static_cast<T*>(p), owner);
}

template <typename T>
const T* cptr(const py::object& o) {
    return o.is_none() ? nullptr : static_cast<const T*>(py::reinterpret_borrow<py::array>(o).data());
}

rk::Spec make_spec(const std::string& cell, const std::string& nonlinearity, double forget_bias,
                   bool reset_after) {
    rk::Spec s;
    if (cell == "rnn") s.cell = rk::Cell::rnn;
    else if (cell == "lstm") s.cell = rk::Cell::lstm;
    else if (cell == "gru") s.cell = rk::Cell::gru;
    else throw py::value_error("cell must be 'rnn', 'lstm' or 'gru', got '" + cell + "'");
    if (nonlinearity != "tanh" && nonlinearity != "relu")
        throw py::value_error("nonlinearity must be 'tanh' or 'relu', got '" + nonlinearity + "'");
    s.relu = nonlinearity == "relu";
    s.forget_bias = forget_bias;
    s.reset_after = reset_after;
    return s;
}

// x's dtype decides T; everything else must match it.
py::dtype float_dtype_of(py::handle x, const std::string& name = "x") {
    if (!py::isinstance<py::array>(x))
        throw py::value_error(name + " must be a numpy.ndarray, got " +
                              std::string(Py_TYPE(x.ptr())->tp_name));
    auto dt = py::reinterpret_borrow<py::array>(x).dtype();
    if (dt.is(py::dtype::of<float>()) || dt.is(py::dtype::of<double>())) return dt;
    throw py::value_error(name + " must have dtype float32 or float64, got " +
                          std::string(py::str(dt)));
}

struct Dims { int64_t B, T, I, H; };

py::array matrix(py::handle w, const char* name, const char* legend) {
    if (!py::isinstance<py::array>(w))
        throw py::value_error(std::string(name) + " must be a numpy.ndarray");
    auto wa = py::reinterpret_borrow<py::array>(w);
    if (wa.ndim() != 2)
        throw py::value_error(std::string(name) + " must be 2-D " + legend + ", got shape " +
                              shape_of(wa));
    return wa;
}

// projected (LSTM only): x holds x_orig W_ih^T, [B,T,G*H], or with ids [B,T] the table
// [V,G*H] whose row ids[b,t] is step t of sequence b; I is then w_ih's width.
Dims dims_of(const rk::Spec& spec, py::handle x, py::handle w_ih, py::handle w_hh,
             bool projected, py::handle ids) {
    if (projected && spec.cell != rk::Cell::lstm)
        throw py::value_error("projected input is supported for the LSTM only");
    if (!ids.is_none() && !projected)
        throw py::value_error("ids is for projected input from a table only (projected=True)");
    auto xa = py::reinterpret_borrow<py::array>(x);
    const int64_t H = matrix(w_hh, "w_hh", "[G*H,H]").shape(1);
    if (!projected) {
        if (xa.ndim() != 3)
            throw py::value_error("x must be 3-D [B,T,I], got shape " + shape_of(xa));
        return {xa.shape(0), xa.shape(1), xa.shape(2), H};
    }
    const int64_t I = matrix(w_ih, "w_ih", "[G*H,I]").shape(1), GH = rk::gates_of(spec.cell) * H;
    if (!ids.is_none()) {
        auto ia = matrix(ids, "ids", "[B,T]");
        if (xa.ndim() != 2 || xa.shape(1) != GH)
            throw py::value_error("x must be a table [V, G*H] = [V, " + std::to_string(GH) +
                                  "] when ids are given, got shape " + shape_of(xa));
        return {ia.shape(0), ia.shape(1), I, H};
    }
    if (xa.ndim() != 3 || xa.shape(2) != GH)
        throw py::value_error("x must have shape [B, T, G*H] = " +
                              shape_str({xa.ndim() > 0 ? xa.shape(0) : 0,
                                         xa.ndim() > 1 ? xa.shape(1) : 0, GH}) +
                              " when projected (x_orig W_ih^T), got " + shape_of(xa));
    return {xa.shape(0), xa.shape(1), I, H};
}

// Every value of the int64 array p [n] in [0, hi); else ValueError naming `what`.
void check_range(const int64_t* p, int64_t n, int64_t hi, const std::string& what,
                 const std::string& bound) {
    for (int64_t i = 0; i < n; ++i)
        if (p[i] < 0 || p[i] >= hi)
            throw py::value_error(what + " must lie in " + bound + ", got " +
                                  std::to_string(p[i]) + " at position " + std::to_string(i));
}

// ids [B,T] int64, every one a row of the [V, .] table x
py::object checked_ids(py::handle ids, const Dims& d, int64_t V) {
    py::object o = checked(ids, "ids", py::dtype::of<int64_t>(), {d.B, d.T}, true);
    if (!o.is_none())
        check_range(cptr<int64_t>(o), d.B * d.T, V, "ids",
                    "[0, V) = [0, " + std::to_string(V) + ")");
    return o;
}

py::object checked_lengths(py::handle obj, int64_t B, int64_t T) {
    py::object l = checked(obj, "lengths", py::dtype::of<int64_t>(), {B}, true);
    if (l.is_none()) return l;
    const int64_t* p = cptr<int64_t>(l);
    for (int64_t b = 0; b < B; ++b)
        if (p[b] < 0 || p[b] > T)
            throw py::value_error("lengths must lie in [0, T] = [0, " + std::to_string(T) +
                                  "], got lengths[" + std::to_string(b) + "] = " +
                                  std::to_string(p[b]));
    return l;
}

template <typename T>
py::tuple forward_t(const rk::Spec& spec, py::handle x, py::handle w_ih, py::handle w_hh,
                    py::handle b_ih, py::handle b_hh, py::handle h0, py::handle c0,
                    py::handle lengths, bool projected, py::handle ids) {
    const auto dt = py::dtype::of<T>();
    const Dims d = dims_of(spec, x, w_ih, w_hh, projected, ids);
    const int64_t G = rk::gates_of(spec.cell), GH = G * d.H, S = rk::slots_of(spec.cell);
    const bool lstm = spec.cell == rk::Cell::lstm;
    const bool gru_before = spec.cell == rk::Cell::gru && !spec.reset_after;
    const int64_t Ix = projected ? GH : d.I;  // x's last dim; I of the saved rows: 0
    const int64_t V = ids.is_none() ? 0 : py::reinterpret_borrow<py::array>(x).shape(0);
    py::object xo = ids.is_none() ? checked(x, "x", dt, {d.B, d.T, Ix})
                                  : checked(x, "x", dt, {V, GH});
    py::object io = checked_ids(ids, d, V);
    py::object wi = checked(w_ih, "w_ih", dt, {GH, d.I});
    py::object wh = checked(w_hh, "w_hh", dt, {GH, d.H});
    py::object bi = checked(b_ih, "b_ih", dt, {GH});
    py::object bh = checked(b_hh, "b_hh", dt, {GH});
    py::object h = checked(h0, "h0", dt, {d.B, d.H}, true);
    if (!lstm && !c0.is_none()) throw py::value_error("c0 is for LSTM only; pass None");
    py::object c = checked(c0, "c0", dt, {d.B, d.H}, true);
    py::object len = checked_lengths(lengths, d.B, d.T);

    // the LSTM's saved arrays are time-major and padded (kernels.h); the others batch-major
    const int64_t Hs = lstm ? rk::lstm_padded_hidden(d.H, sizeof(T)) : d.H;
    auto out = new_array<T>({d.B, d.T, d.H});
    py::array_t<T> h_n({d.B, d.H});
    auto hprev = lstm ? new_array<T>({d.T + 1, d.B,
                                      rk::lstm_xh_width(projected ? 0 : d.I, d.H, sizeof(T))})
                      : new_array<T>({d.B, d.T, d.H});
    auto act = lstm ? new_array<T>({d.T, d.B, S * Hs}) : new_array<T>({d.B, d.T, S * d.H});
    py::object c_n = py::none(), cprev = py::none(), rh = py::none();
    rk::ForwardArgs<T> a;
    a.spec = spec;
    a.B = d.B; a.T_ = d.T; a.I = d.I; a.H = d.H;
    a.x = cptr<T>(xo); a.w_ih = cptr<T>(wi); a.w_hh = cptr<T>(wh);
    a.b_ih = cptr<T>(bi); a.b_hh = cptr<T>(bh); a.h0 = cptr<T>(h); a.c0 = cptr<T>(c);
    a.lengths = cptr<int64_t>(len);
    a.projected = projected;
    a.ids = cptr<int64_t>(io); a.V = V;
    a.out = out.mutable_data(); a.h_n = h_n.mutable_data();
    a.hprev = hprev.mutable_data(); a.act = act.mutable_data();
    if (lstm) {
        py::array_t<T> cn({d.B, d.H});
        auto cp = new_array<T>({d.T + 1, d.B, Hs});
        a.c_n = cn.mutable_data(); a.cprev = cp.mutable_data();
        c_n = cn; cprev = cp;
    }
    if (gru_before) {
        auto r = new_array<T>({d.B, d.T, d.H});
        a.rh = r.mutable_data();
        rh = r;
    }
    {
        py::gil_scoped_release nogil;
        rk::forward<T>(a);
    }
    py::dict saved;
    if (lstm) {  // the backward reads the states entering steps 0..T-1: rows [0, T)
        py::slice first_t(0, d.T, 1);
        saved["hprev"] = hprev[first_t]; saved["cprev"] = cprev[first_t];
    } else {
        saved["hprev"] = hprev; saved["cprev"] = cprev;
    }
    saved["act"] = act; saved["rh"] = rh;
    return py::make_tuple(out, h_n, c_n, saved);
}

template <typename T>
py::tuple backward_t(const rk::Spec& spec, py::handle x, py::handle w_ih, py::handle w_hh,
                     py::handle lengths, py::handle hprev, py::handle cprev, py::handle act,
                     py::handle rh, py::handle d_out, py::handle d_h_n, py::handle d_c_n,
                     bool projected, py::handle ids) {
    const auto dt = py::dtype::of<T>();
    const Dims d = dims_of(spec, x, w_ih, w_hh, projected, ids);
    const int64_t G = rk::gates_of(spec.cell), GH = G * d.H, S = rk::slots_of(spec.cell);
    const bool lstm = spec.cell == rk::Cell::lstm;
    const bool gru_before = spec.cell == rk::Cell::gru && !spec.reset_after;
    const int64_t Ix = projected ? GH : d.I;  // x's and dx's last dim
    const int64_t V = ids.is_none() ? 0 : py::reinterpret_borrow<py::array>(x).shape(0);
    const std::vector<int64_t> xshape = ids.is_none() ? std::vector<int64_t>{d.B, d.T, Ix}
                                                      : std::vector<int64_t>{V, GH};
    py::object xo = checked(x, "x", dt, xshape);
    py::object io = checked_ids(ids, d, V);
    py::object wi = checked(w_ih, "w_ih", dt, {GH, d.I});
    py::object wh = checked(w_hh, "w_hh", dt, {GH, d.H});
    py::object len = checked_lengths(lengths, d.B, d.T);
    // shapes as forward saved them (the LSTM's: time-major, padded to Hs; kernels.h)
    const int64_t Hs = lstm ? rk::lstm_padded_hidden(d.H, sizeof(T)) : d.H;
    const std::vector<int64_t> state = lstm ? std::vector<int64_t>{d.T, d.B, Hs}
                                            : std::vector<int64_t>{d.B, d.T, d.H};
    const std::vector<int64_t> hstate =
        lstm ? std::vector<int64_t>{d.T, d.B,
                                    rk::lstm_xh_width(projected ? 0 : d.I, d.H, sizeof(T))}
             : state;
    const std::vector<int64_t> acts = lstm ? std::vector<int64_t>{d.T, d.B, S * Hs}
                                           : std::vector<int64_t>{d.B, d.T, S * d.H};
    py::object hp = checked(hprev, "hprev", dt, hstate);
    py::object ac = checked(act, "act", dt, acts);
    if (!lstm && !cprev.is_none()) throw py::value_error("cprev is for LSTM only; pass None");
    py::object cp = checked(cprev, "cprev", dt, state, !lstm);
    if (!gru_before && !rh.is_none())
        throw py::value_error("rh is for GRU with reset_after=False only; pass None");
    py::object r = checked(rh, "rh", dt, {d.B, d.T, d.H}, !gru_before);
    py::object dout = checked(d_out, "d_outputs", dt, {d.B, d.T, d.H}, true);
    py::object dhn = checked(d_h_n, "d_h_n", dt, {d.B, d.H}, true);
    if (!lstm && !d_c_n.is_none()) throw py::value_error("d_c_n is for LSTM only; pass None");
    py::object dcn = checked(d_c_n, "d_c_n", dt, {d.B, d.H}, true);

    auto dx = new_array<T>(xshape);  // from a table: the table's gradient
    py::array_t<T> dh0({d.B, d.H});
    py::array_t<T> dw_ih({GH, d.I}), dw_hh({GH, d.H}), db_ih({GH}), db_hh({GH});
    py::object dc0 = py::none();
    rk::BackwardArgs<T> a;
    a.spec = spec;
    a.B = d.B; a.T_ = d.T; a.I = d.I; a.H = d.H;
    a.x = cptr<T>(xo); a.w_ih = cptr<T>(wi); a.w_hh = cptr<T>(wh);
    a.lengths = cptr<int64_t>(len);
    a.projected = projected;
    a.ids = cptr<int64_t>(io); a.V = V;
    a.hprev = cptr<T>(hp); a.cprev = cptr<T>(cp); a.act = cptr<T>(ac); a.rh = cptr<T>(r);
    a.d_out = cptr<T>(dout); a.d_h_n = cptr<T>(dhn); a.d_c_n = cptr<T>(dcn);
    a.dx = dx.mutable_data(); a.dh0 = dh0.mutable_data();
    a.dw_ih = dw_ih.mutable_data(); a.dw_hh = dw_hh.mutable_data();
    a.db_ih = db_ih.mutable_data(); a.db_hh = db_hh.mutable_data();
    if (lstm) {
        py::array_t<T> dc({d.B, d.H});
        a.dc0 = dc.mutable_data();
        dc0 = dc;
    }
    {
        py::gil_scoped_release nogil;
        rk::backward<T>(a);
    }
    return py::make_tuple(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh);
}

// The dense head + softmax cross-entropy (csrc/cpu/head.h): checks, then the kernel without the GIL.
template <typename T>
double dense_softmax_xent_t(py::handle h, py::handle weight, py::handle bias, py::handle targets,
                            py::handle w, double inv_total, py::handle d_logits, py::handle dw,
                            py::handle db, py::handle dh) {
    const auto dt = py::dtype::of<T>();
    auto ha = matrix(h, "h", "[N,F]");
    auto wa = matrix(weight, "weight", "[C,F]");
    const int64_t N = ha.shape(0), F = ha.shape(1), C = wa.shape(0);
    py::object ho = checked(h, "h", dt, {N, F});
    py::object wo = checked(weight, "weight", dt, {C, F});
    py::object bo = checked(bias, "bias", dt, {C}, true);
    py::object to = checked(targets, "targets", py::dtype::of<int64_t>(), {N});
    py::object po = checked(w, "weights", dt, {N}, true);
    py::object lo = checked(d_logits, "d_logits", dt, {N, C});
    py::object dwo = checked(dw, "dw", dt, {C, F});
    py::object dbo = checked(db, "db", dt, {C}, bo.is_none());
    py::object dho = checked(dh, "dh", dt, {N, F});
    const int64_t* t = cptr<int64_t>(to);
    check_range(t, N, C, "targets", "[0, C) = [0, " + std::to_string(C) + ")");
    rk::HeadArgs<T> a;
    a.N = N; a.F = F; a.C = C;
    a.h = cptr<T>(ho); a.weight = cptr<T>(wo); a.bias = cptr<T>(bo); a.targets = t;
    a.w = cptr<T>(po); a.inv_total = inv_total;
    auto mut = [](const py::object& o) {
        return o.is_none() ? nullptr
                           : static_cast<T*>(py::reinterpret_borrow<py::array>(o).mutable_data());
    };
    a.d_logits = mut(lo); a.dw = mut(dwo); a.db = bo.is_none() ? nullptr : mut(dbo);
    a.dh = mut(dho);
    py::gil_scoped_release nogil;
    return rk::dense_softmax_xent<T>(a);
}

// The fused LSTM-stack step (csrc/cpu/lstm_stack.h) over buffers the Python caller keeps between
// steps (rnnkern/train_step.py): every array is checked once, here; run() then only checks the
// ids, targets and lengths it reads, and runs without the GIL. The layers' saved activations,
// outputs and the head's scratch live in this object.
template <typename T>
class StackStep {
  public:
    StackStep(py::list cells, py::handle table, py::handle ids, py::handle d_table,
              py::handle weight, py::handle bias, py::handle dw, py::handle db,
              py::handle targets, py::handle weights, py::handle lengths, py::handle head_mask,
              bool table_transposed)
        : stack_(cells.size()) {
        const int64_t L = int64_t(cells.size());
        if (L == 0) throw py::value_error("cells must hold at least one LSTM layer");
        auto ia = matrix(ids, "ids", "[B,T]");
        const int64_t B = ia.shape(0), Tn = ia.shape(1);
        a_.B = B;
        a_.T_ = Tn;
        ids_ = keep<int64_t>(ids, "ids", {B, Tn});
        auto ta = matrix(table, "table", table_transposed ? "[4H,V]" : "[V,4H]");
        V_ = ta.shape(table_transposed ? 1 : 0);
        lengths_ = keep<int64_t>(lengths, "lengths", {B});
        int64_t I = 0;  // the layer's input width (layer 0: w_ih's, read through the table)
        for (int64_t l = 0; l < L; ++l) {
            py::tuple c = cells[size_t(l)].cast<py::tuple>();
            if (c.size() != 14)
                throw py::value_error("each cell must be (w_ih, w_hh, b_ih, b_hh, h0, c0, h_n, "
                                      "c_n, dw_ih, dw_hh, db_ih, db_hh, forget_bias, mask)");
            const std::string at = "cells[" + std::to_string(l) + "].";
            const int64_t H = matrix(c[1], (at + "w_hh").c_str(), "[4H,H]").shape(1);
            if (l == 0) I = matrix(c[0], (at + "w_ih").c_str(), "[4H,I]").shape(1);
            const bool last = l == L - 1;
            rk::StackLayer<T> y;
            rk::ForwardArgs<T>& f = y.f;
            f.spec.cell = rk::Cell::lstm;
            f.spec.forget_bias = c[12].cast<double>();
            f.B = B; f.T_ = Tn; f.I = I; f.H = H;
            f.w_ih = keep<T>(c[0], at + "w_ih", {4 * H, I});
            f.w_hh = keep<T>(c[1], at + "w_hh", {4 * H, H});
            f.b_ih = keep<T>(c[2], at + "b_ih", {4 * H});
            f.b_hh = keep<T>(c[3], at + "b_hh", {4 * H});
            f.h0 = keep<T>(c[4], at + "h0", {B, H});
            f.c0 = keep<T>(c[5], at + "c0", {B, H});
            state_.push_back({f.h0, f.c0});
            f.h_n = keep<T>(c[6], at + "h_n", {B, H});
            f.c_n = keep<T>(c[7], at + "c_n", {B, H});
            if (l == 0) {
                f.x = table_transposed ? keep<T>(table, "table", {4 * H, V_})
                                       : keep<T>(table, "table", {V_, 4 * H});
                f.projected = true;
                f.ids = ids_;
                f.V = V_;
                f.table_t = table_transposed;
            } else {
                const rk::StackLayer<T>& below = a_.layers.back();
                f.x = below.dropped ? below.dropped : below.f.out;
            }
            const int64_t Hs = rk::lstm_padded_hidden(H, sizeof(T));
            const int64_t R = rk::lstm_xh_width(l == 0 ? 0 : I, H, sizeof(T));
            f.out = own(B * Tn * H);
            f.hprev = own((Tn + 1) * B * R);
            f.cprev = own((Tn + 1) * B * Hs);
            f.act = own(Tn * B * 5 * Hs);
            if (!c[13].is_none()) {
                if (last)
                    throw py::value_error(at + "mask must be None (the last layer's dropout "
                                          "is head_mask)");
                y.mask = keep<T>(c[13], at + "mask", {B, Tn, H});
                y.dropped = own(B * Tn * H);
            }
            rk::BackwardArgs<T>& b = y.b;
            b.spec = f.spec;
            b.B = B; b.T_ = Tn; b.I = I; b.H = H;
            b.x = f.x; b.w_ih = f.w_ih; b.w_hh = f.w_hh;
            b.projected = f.projected; b.ids = f.ids; b.V = f.V; b.table_t = f.table_t;
            b.hprev = f.hprev; b.cprev = f.cprev; b.act = f.act;
            if (l > 0) b.dx = own(B * Tn * I);
            else if (table_transposed) b.dx = keep<T>(d_table, "d_table", {4 * H, V_});
            else b.dx = keep<T>(d_table, "d_table", {V_, 4 * H});
            b.dw_ih = keep<T>(c[8], at + "dw_ih", {4 * H, I});
            b.dw_hh = keep<T>(c[9], at + "dw_hh", {4 * H, H});
            b.db_ih = keep<T>(c[10], at + "db_ih", {4 * H});
            b.db_hh = keep<T>(c[11], at + "db_hh", {4 * H});
            if (l > 0) a_.layers.back().b.d_out = b.dx;
            a_.layers.push_back(y);
            I = H;
        }
        rk::StackLayer<T>& top = a_.layers.back();
        const int64_t F = top.f.H, N = B * Tn;
        const int64_t C = matrix(weight, "weight", "[C,F]").shape(0);
        rk::HeadArgs<T>& h = a_.head;
        h.N = N; h.F = F; h.C = C;
        h.weight = keep<T>(weight, "weight", {C, F});
        h.bias = keep<T>(bias, "bias", {C}, true);
        h.dw = keep<T>(dw, "dw", {C, F});
        h.db = keep<T>(db, "db", {C}, h.bias == nullptr);
        h.targets = targets_ = keep<int64_t>(targets, "targets", {N});
        weights_ = keep<T>(weights, "weights", {N});
        if (!head_mask.is_none()) {
            a_.head_mask = keep<T>(head_mask, "head_mask", {B, Tn, F});
            a_.head_dropped = own(N * F);
        }
        h.h = a_.head_dropped ? a_.head_dropped : top.f.out;
        h.dh = own(N * F);
        top.b.d_out = h.dh;
        if (!h.bias) h.db = nullptr;
    }

    // use_state false: every layer starts from zeros, whatever h0 and c0 hold (the kernel
    // then skips the first step's h rows of its product)
    double run(bool use_lengths, bool use_weights, double inv_total, bool use_state) {
        const int64_t B = a_.B, Tn = a_.T_;
        check_range(ids_, B * Tn, V_, "ids", "[0, V) = [0, " + std::to_string(V_) + ")");
        check_range(targets_, B * Tn, a_.head.C, "targets",
                    "[0, C) = [0, " + std::to_string(a_.head.C) + ")");
        if (use_lengths)
            check_range(lengths_, B, Tn + 1, "lengths", "[0, T] = [0, " + std::to_string(Tn) + "]");
        for (size_t l = 0; l < a_.layers.size(); ++l) {
            rk::StackLayer<T>& y = a_.layers[l];
            y.f.lengths = y.b.lengths = use_lengths ? lengths_ : nullptr;
            y.f.h0 = use_state ? state_[l][0] : nullptr;
            y.f.c0 = use_state ? state_[l][1] : nullptr;
        }
        a_.head.w = use_weights ? weights_ : nullptr;
        a_.head.inv_total = inv_total;
        py::gil_scoped_release nogil;
        return stack_.step(a_);
    }

    std::vector<int64_t> cut() const { return stack_.cut(); }
    void hold_cut(std::vector<int64_t> cut) { stack_.hold_cut(std::move(cut)); }

    // Adam's update at the end of every run() (csrc/cpu/adam.h) over the flat p, g, m, v [n]
    // with the scalars s [7] as they are at each run; p None: none (the caller updates).
    void set_adam(py::handle p, py::handle g, py::handle m, py::handle v, py::handle s,
                  bool tf_form) {
        a_.adam = nullptr;
        adam_keep_.clear();
        if (p.is_none()) return;
        if (!py::isinstance<py::array>(p))
            throw py::value_error("p must be a numpy.ndarray, got " +
                                  std::string(Py_TYPE(p.ptr())->tp_name));
        const int64_t n = int64_t(py::reinterpret_borrow<py::array>(p).size());
        auto take = [&](py::handle o, const char* name, int64_t len) {
            py::object c = checked(o, name, py::dtype::of<T>(), {len});
            adam_keep_.push_back(c);
            return static_cast<T*>(py::reinterpret_borrow<py::array>(c).mutable_data());
        };
        adam_.n = n;
        adam_.p = take(p, "p", n);
        adam_.g = take(g, "g", n);
        adam_.m = take(m, "m", n);
        adam_.v = take(v, "v", n);
        adam_.s = take(s, "s", 7);
        adam_.tf_form = tf_form;
        a_.adam = &adam_;
    }

  private:
    template <typename U>
    U* keep(py::handle obj, const std::string& name, const std::vector<int64_t>& shape,
            bool optional = false) {
        py::object o = checked(obj, name.c_str(), py::dtype::of<U>(), shape, optional);
        if (o.is_none()) return nullptr;
        keep_.push_back(o);
        return static_cast<U*>(py::reinterpret_borrow<py::array>(o).mutable_data());
    }
    T* own(int64_t n) {
        own_.emplace_back(size_t(std::max<int64_t>(n, 1)));
        return own_.back().data();
    }

    std::vector<py::object> keep_;     // the caller's arrays, alive as long as this object
    std::vector<std::array<const T*, 2>> state_;  // per layer: its h0, c0 (null: none given)
    std::vector<rk::Buffer<T>> own_;   // this object's buffers (moving the outer vector keeps
                                       // every inner one's storage where it is)
    rk::StackArgs<T> a_;
    rk::LstmStack<T> stack_;
    rk::AdamArgs<T> adam_;
    std::vector<py::object> adam_keep_;  // set_adam's arrays
    int64_t V_ = 0;
    int64_t* ids_ = nullptr;
    int64_t* targets_ = nullptr;
    int64_t* lengths_ = nullptr;
    T* weights_ = nullptr;
};

template <typename T>
void bind_stack_step(py::module_& m, const char* name) {
    py::class_<StackStep<T>>(m, name,
        "The fused training step of [table ids -> LSTM layers -> dense head + softmax\n"
        "cross-entropy] in one split of the batch (csrc/cpu/lstm_stack.h), over buffers checked\n"
        "once here. cells: per layer (w_ih, w_hh, b_ih, b_hh, h0, c0, h_n, c_n, dw_ih, dw_hh,\n"
        "db_ih, db_hh, forget_bias, mask | None); table [V,4H_0] = layer 0's input projection per\n"
        "id, ids int64 [B,T], d_table [V,4H_0] out (layer 0's dw_ih comes back zero: the caller\n"
        "forms it from d_table); weight [C,F], bias [C] | None, dw, db | None out; targets int64\n"
        "[N], weights [N], lengths int64 [B], head_mask [B,T,F] | None. table_transposed: table\n"
        "and d_table are [4H_0,V] (one-hot input: layer 0's w_ih and, as the same array as its\n"
        "dw_ih, dw_ih). run(use_lengths, use_weights, inv_total) -> loss; fills h_n, c_n and\n"
        "every gradient.")
        .def(py::init<py::list, py::handle, py::handle, py::handle, py::handle, py::handle,
                      py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                      bool>(),
             py::arg("cells"), py::arg("table"), py::arg("ids"), py::arg("d_table"),
             py::arg("weight"), py::arg("bias"), py::arg("dw"), py::arg("db"),
             py::arg("targets"), py::arg("weights"), py::arg("lengths"), py::arg("head_mask"),
             py::arg("table_transposed") = false)
        .def("run", &StackStep<T>::run, py::arg("use_lengths"), py::arg("use_weights"),
             py::arg("inv_total"), py::arg("use_state") = true,
             "One step; use_state False: every layer starts from zeros, whatever h0, c0 hold.")
        .def("set_adam", &StackStep<T>::set_adam, py::arg("p"), py::arg("g"), py::arg("m"),
             py::arg("v"), py::arg("s"), py::arg("tf_form"),
             "Adam's update at the end of every run (csrc/cpu/adam.h): flat p, g, m, v [n] of\n"
             "the dtype, s [7] = b1, 1-b1, b2, 1-b2, eps, step, sqrt(1-b2^t) as they are at each\n"
             "run; p None turns it off.")
        .def_property_readonly("cut", &StackStep<T>::cut,
             "The forward's rows per thread, [0, c1, .., B]: thread k runs [cut[k], cut[k+1]).\n"
             "It follows the threads' measured speeds from step to step.")
        .def("hold_cut", &StackStep<T>::hold_cut, py::arg("cut"),
             "Fix the forward's cut for the next runs (tests: no result depends on it); [] lets\n"
             "it move again. A cut that does not fit a run's batch and threads is not used.");
}

void* capsule_pointer(py::handle cap, const char* name) {
    if (!PyCapsule_CheckExact(cap.ptr()))
        throw py::value_error(std::string(name) + " must be a PyCapsule holding a Fortran ?gemm");
    void* p = PyCapsule_GetPointer(cap.ptr(), PyCapsule_GetName(cap.ptr()));
    if (!p) throw py::error_already_set();
    return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "rnnkern C++ CPU backend: one layer, one direction, whole sequence "
              "(see rnnkern.backends.cpp)";
    m.attr("__version__") = RK_VERSION;
    // rnnkern/_source_tree.py source_digest() over the sources this build compiled (see CMakeLists.txt)
    m.attr("__source_digest__") = RK_SOURCE_DIGEST;

    m.def("forward",
          [](const std::string& cell, py::object x, py::object w_ih, py::object w_hh,
             py::object b_ih, py::object b_hh, py::object h0, py::object c0, py::object lengths,
             const std::string& nonlinearity, double forget_bias, bool reset_after,
             bool projected, py::object ids) {
              const rk::Spec s = make_spec(cell, nonlinearity, forget_bias, reset_after);
              if (float_dtype_of(x).is(py::dtype::of<float>()))
                  return forward_t<float>(s, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                                          projected, ids);
              return forward_t<double>(s, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, projected,
                                       ids);
          },
          py::arg("cell"), py::arg("x"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
          py::arg("b_hh"), py::arg("h0") = py::none(), py::arg("c0") = py::none(),
          py::arg("lengths") = py::none(), py::kw_only(), py::arg("nonlinearity") = "tanh",
          py::arg("forget_bias") = 0.0, py::arg("reset_after") = true,
          py::arg("projected") = false, py::arg("ids") = py::none(),
          "Forward over a whole sequence. x [B,T,I], w_ih [G*H,I], w_hh [G*H,H], b_* [G*H],\n"
          "h0, c0 [B,H] or None (zeros), lengths int64 [B] in [0,T] or None.\n"
          "projected (LSTM only): x is [B,T,G*H] = x_orig W_ih^T (no bias); w_ih is not read.\n"
          "ids (with projected): int64 [B,T]; x is then a table [V,G*H], row ids[b,t] for (b,t).\n"
          "Returns (outputs [B,T,H], h_n [B,H], c_n [B,H] | None, saved dict).");

    m.def("backward",
          [](const std::string& cell, py::object x, py::object w_ih, py::object w_hh,
             py::object lengths, py::object hprev, py::object cprev, py::object act,
             py::object rh, py::object d_out, py::object d_h_n, py::object d_c_n,
             const std::string& nonlinearity, double forget_bias, bool reset_after,
             bool projected, py::object ids) {
              const rk::Spec s = make_spec(cell, nonlinearity, forget_bias, reset_after);
              if (float_dtype_of(x).is(py::dtype::of<float>()))
                  return backward_t<float>(s, x, w_ih, w_hh, lengths, hprev, cprev, act, rh,
                                           d_out, d_h_n, d_c_n, projected, ids);
              return backward_t<double>(s, x, w_ih, w_hh, lengths, hprev, cprev, act, rh, d_out,
                                        d_h_n, d_c_n, projected, ids);
          },
          py::arg("cell"), py::arg("x"), py::arg("w_ih"), py::arg("w_hh"), py::arg("lengths"),
          py::arg("hprev"), py::arg("cprev"), py::arg("act"), py::arg("rh"),
          py::arg("d_outputs") = py::none(), py::arg("d_h_n") = py::none(),
          py::arg("d_c_n") = py::none(), py::kw_only(), py::arg("nonlinearity") = "tanh",
          py::arg("forget_bias") = 0.0, py::arg("reset_after") = true,
          py::arg("projected") = false, py::arg("ids") = py::none(),
          "Backprop through time from forward's saved arrays (hprev, cprev, act, rh).\n"
          "projected: as the forward was called; x is the projected input, dx [B,T,G*H] the\n"
          "gate pre-activation gradients, dw_ih zeros (not computed). With ids: x is the\n"
          "table and dx [V,G*H] its gradient (the gate gradients summed per id).\n"
          "Returns (dx, dh0, dc0 | None, dw_ih, dw_hh, db_ih, db_hh).");

    bind_stack_step<float>(m, "LstmStackStepF32");
    bind_stack_step<double>(m, "LstmStackStepF64");

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
    m.def("set_blas_min_flops", &rk::set_blas_min_flops, py::arg("m_n_k"),
          "GEMMs with M*N*K below this use the built-in loop instead of BLAS.");
    m.def("blas_min_flops", &rk::blas_min_flops);
    m.def("gemm_loop_isa", &rk::gemm_loop_isa, "Which ISA build of the GEMM loop runs here.");
    m.def("set_threads", &rk::set_threads, py::arg("n"),
          "Threads for the time loop (batch chunks); 0 = the CPUs this process may use, max 8.");
    m.def("threads", &rk::threads);
    m.def("set_split_min_work", &rk::set_split_min_work, py::arg("b_t_g_h_h"),
          "Recurrent multiply-adds B*T*G*H*H below which the time loop stays on one thread.");
    m.def("split_min_work", &rk::split_min_work);
    m.def("set_pool_limit", [](int64_t bytes) {
              if (bytes < 0) throw py::value_error("bytes must be >= 0, got " + std::to_string(bytes));
              rk::set_pool_limit(size_t(bytes));
          }, py::arg("bytes"),
          "Bytes of freed result arrays kept for reuse by later calls (default 256 MiB; 0: none).");
    m.def("pool_limit", [] { return int64_t(rk::pool_limit()); });
    m.def("pool_held", [] { return int64_t(rk::pool_held()); },
          "Bytes of freed result arrays held for reuse now.");
    m.def("dense_softmax_xent",
          [](py::object h, py::object weight, py::object bias, py::object targets, py::object w,
             double inv_total, py::object d_logits, py::object dw, py::object db, py::object dh) {
              if (float_dtype_of(h, "h").is(py::dtype::of<float>()))
                  return dense_softmax_xent_t<float>(h, weight, bias, targets, w, inv_total,
                                                     d_logits, dw, db, dh);
              return dense_softmax_xent_t<double>(h, weight, bias, targets, w, inv_total,
                                                  d_logits, dw, db, dh);
          },
          py::arg("h"), py::arg("weight"), py::arg("bias"), py::arg("targets"),
          py::arg("weights"), py::arg("inv_total"), py::arg("d_logits"), py::arg("dw"),
          py::arg("db"), py::arg("dh"),
          "Dense head + softmax cross-entropy and their backward (csrc/cpu/head.h).\n"
          "h [N,F], weight [C,F], bias [C] | None, targets int64 [N] in [0,C), weights [N] | None\n"
          "(all ones), inv_total = 1 / (sum of weights + 1e-12). Writes d_logits [N,C], dw [C,F],\n"
          "db [C] (with a bias), dh [N,F]; returns the loss (the weighted mean).");
    m.def("set_head_split_min", &rk::set_head_split_min, py::arg("n_c_f"),
          "dense_softmax_xent: N*C*F from which the rows are split over threads.");
    m.def("head_split_min", &rk::head_split_min);
    m.def("set_lstm_ring_rows", &rk::set_lstm_ring_rows, py::arg("rows"),
          "LSTM backward: rows (steps x chunk rows) of gate gradients gathered per dx and "
          "weight-gradient GEMM (default 256).");
    m.def("lstm_ring_rows", &rk::lstm_ring_rows);
    m.def("set_huge_page_min", [](int64_t bytes) {
              if (bytes < 0) throw py::value_error("bytes must be >= 0, got " + std::to_string(bytes));
              rk::set_huge_page_min(bytes);
          }, py::arg("bytes"),
          "Work buffers of at least this many bytes go on transparent huge pages (Linux; "
          "default 64 KiB; csrc/cpu/buffer.h). Buffers made after the call follow it.");
    m.def("huge_page_min", &rk::huge_page_min);
    m.def("_bench_gemm",
          [](int64_t M, int64_t N, int64_t K, bool trans_a, bool blas, int reps) {
              // float32 C[M,N] = op(A) B, best of `reps` (for benchmarks/bench_cpp_gemm.py)
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
