// The seam of one layer (rnnkern.backends.cpp): CellSpec, forward, backward.
//
// forward checks the arrays' structure, allocates the results and the saved activations,
// releases the GIL and runs rk::forward; what backward needs stays in an opaque Saved object,
// so backward checks only the gradients it is given. Shape legend: csrc/cpu/kernels.h.
#include <pybind11/stl.h>

#include <string>

#include "common.h"
#include "kernels.h"

namespace rkpy {
namespace {

rk::Spec make_spec(const std::string& kind, const std::string& nonlinearity, double forget_bias,
                   bool reset_after) {
    rk::Spec s;
    if (kind == "rnn") s.cell = rk::Cell::rnn;
    else if (kind == "lstm") s.cell = rk::Cell::lstm;
    else if (kind == "gru") s.cell = rk::Cell::gru;
    else throw py::value_error("kind must be 'rnn', 'lstm' or 'gru', got '" + kind + "'");
    if (nonlinearity != "tanh" && nonlinearity != "relu")
        throw py::value_error("nonlinearity must be 'tanh' or 'relu', got '" + nonlinearity + "'");
    s.relu = nonlinearity == "relu";
    s.forget_bias = forget_bias;
    s.reset_after = reset_after;
    return s;
}

const char* kind_name(rk::Cell c) {
    return c == rk::Cell::lstm ? "lstm" : c == rk::Cell::gru ? "gru" : "rnn";
}

// What a forward keeps for its backward: its inputs and the activations (their layout: the
// LSTM's private one, kernels.h). Only backward reads it.
struct Saved {
    rk::Spec spec;
    bool f64 = false;
    int64_t B = 0, T = 0, I = 0, H = 0;
    py::object x = py::none(), w_ih = py::none(), w_hh = py::none(), lengths = py::none();
    py::object hprev = py::none(), cprev = py::none(), act = py::none(), rh = py::none();
};

template <typename T>
py::tuple forward_t(const rk::Spec& spec, py::handle x, py::handle w_ih, py::handle w_hh,
                    py::handle b_ih, py::handle b_hh, py::handle h0, py::handle c0,
                    py::handle lengths) {
    const auto dt = py::dtype::of<T>();
    auto xa = py::reinterpret_borrow<py::array>(x);
    if (xa.ndim() != 3) throw py::value_error("x must be 3-D [B,T,I], got shape " + shape_of(xa));
    const int64_t B = xa.shape(0), Tn = xa.shape(1), I = xa.shape(2);
    const int64_t H = matrix(w_hh, "w_hh", "[G*H,H]").shape(1);
    const int64_t GH = rk::gates_of(spec.cell) * H, S = rk::slots_of(spec.cell);
    const bool lstm = spec.cell == rk::Cell::lstm;
    const bool gru_before = spec.cell == rk::Cell::gru && !spec.reset_after;
    auto s = std::make_unique<Saved>();
    s->spec = spec;
    s->f64 = sizeof(T) == 8;
    s->B = B; s->T = Tn; s->I = I; s->H = H;
    s->x = checked(x, "x", dt, {B, Tn, I});
    s->w_ih = checked(w_ih, "w_ih", dt, {GH, I});
    s->w_hh = checked(w_hh, "w_hh", dt, {GH, H});
    py::object bi = checked(b_ih, "b_ih", dt, {GH});
    py::object bh = checked(b_hh, "b_hh", dt, {GH});
    py::object h = checked(h0, "h0", dt, {B, H}, true);
    if (!lstm && !c0.is_none()) throw py::value_error("c0 is for LSTM only; pass None");
    py::object c = checked(c0, "c0", dt, {B, H}, true);
    s->lengths = checked(lengths, "lengths", py::dtype::of<int64_t>(), {B}, true);

    // the saved arrays, padded to Hp: the LSTM's time-major, the others batch-major (kernels.h)
    const int64_t Hp = rk::padded_hidden(H, sizeof(T));
    auto out = new_array<T>({B, Tn, H});
    py::array_t<T> h_n({B, H});
    auto hprev = lstm ? new_array<T>({Tn + 1, B, rk::lstm_xh_width(I, H, sizeof(T))})
                      : new_array<T>({B, Tn, Hp});
    auto act = lstm ? new_array<T>({Tn, B, S * Hp}) : new_array<T>({B, Tn, S * Hp});
    py::object c_n = py::none();
    rk::ForwardArgs<T> a;
    a.spec = spec;
    a.B = B; a.T_ = Tn; a.I = I; a.H = H;
    a.x = cptr<T>(s->x); a.w_ih = cptr<T>(s->w_ih); a.w_hh = cptr<T>(s->w_hh);
    a.b_ih = cptr<T>(bi); a.b_hh = cptr<T>(bh); a.h0 = cptr<T>(h); a.c0 = cptr<T>(c);
    a.lengths = cptr<int64_t>(s->lengths);
    a.out = out.mutable_data(); a.h_n = h_n.mutable_data();
    a.hprev = hprev.mutable_data(); a.act = act.mutable_data();
    if (lstm) {
        py::array_t<T> cn({B, H});
        auto cp = new_array<T>({Tn + 1, B, Hp});
        a.c_n = cn.mutable_data(); a.cprev = cp.mutable_data();
        c_n = cn;
        s->cprev = cp;
    }
    if (gru_before) {
        auto r = new_array<T>({B, Tn, Hp});
        a.rh = r.mutable_data();
        s->rh = r;
    }
    {
        py::gil_scoped_release nogil;
        rk::forward<T>(a);
    }
    s->hprev = hprev;
    s->act = act;
    return py::make_tuple(out, h_n, c_n, py::cast(std::move(s)));
}

template <typename T>
py::tuple backward_t(const Saved& s, py::handle d_out, py::handle d_h_n, py::handle d_c_n) {
    const auto dt = py::dtype::of<T>();
    const bool lstm = s.spec.cell == rk::Cell::lstm;
    const int64_t GH = rk::gates_of(s.spec.cell) * s.H;
    py::object dout = checked(d_out, "d_outputs", dt, {s.B, s.T, s.H}, true);
    py::object dhn = checked(d_h_n, "d_h_n", dt, {s.B, s.H}, true);
    if (!lstm && !d_c_n.is_none()) throw py::value_error("d_c_n is for LSTM only; pass None");
    py::object dcn = checked(d_c_n, "d_c_n", dt, {s.B, s.H}, true);

    auto dx = new_array<T>({s.B, s.T, s.I});
    py::array_t<T> dh0({s.B, s.H});
    py::array_t<T> dw_ih({GH, s.I}), dw_hh({GH, s.H}), db_ih({GH}), db_hh({GH});
    py::object dc0 = py::none();
    rk::BackwardArgs<T> a;
    a.spec = s.spec;
    a.B = s.B; a.T_ = s.T; a.I = s.I; a.H = s.H;
    a.x = cptr<T>(s.x); a.w_ih = cptr<T>(s.w_ih); a.w_hh = cptr<T>(s.w_hh);
    a.lengths = cptr<int64_t>(s.lengths);
    a.hprev = cptr<T>(s.hprev); a.cprev = cptr<T>(s.cprev); a.act = cptr<T>(s.act);
    a.rh = cptr<T>(s.rh);
    a.d_out = cptr<T>(dout); a.d_h_n = cptr<T>(dhn); a.d_c_n = cptr<T>(dcn);
    a.dx = dx.mutable_data(); a.dh0 = dh0.mutable_data();
    a.dw_ih = dw_ih.mutable_data(); a.dw_hh = dw_hh.mutable_data();
    a.db_ih = db_ih.mutable_data(); a.db_hh = db_hh.mutable_data();
    if (lstm) {
        py::array_t<T> dc({s.B, s.H});
        a.dc0 = dc.mutable_data();
        dc0 = dc;
    }
    {
        py::gil_scoped_release nogil;
        rk::backward<T>(a);
    }
    return py::make_tuple(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh);
}

}  // namespace

void bind_seam(py::module_& m) {
    py::class_<rk::Spec>(m, "CellSpec",
        "One cell's kind and options, parsed once (rnnkern.CellSpec's C++ twin; the backend\n"
        "builds one per spec and passes it to every call).")
        .def(py::init(&make_spec), py::arg("kind"), py::arg("nonlinearity") = "tanh",
             py::arg("forget_bias") = 0.0, py::arg("reset_after") = true)
        .def_property_readonly("kind", [](const rk::Spec& s) { return kind_name(s.cell); })
        .def_property_readonly("nonlinearity",
                               [](const rk::Spec& s) { return s.relu ? "relu" : "tanh"; })
        .def_readonly("forget_bias", &rk::Spec::forget_bias)
        .def_readonly("reset_after", &rk::Spec::reset_after)
        .def("__repr__", [](const rk::Spec& s) {
            return std::string("CellSpec('") + kind_name(s.cell) + "', nonlinearity='" +
                   (s.relu ? "relu" : "tanh") + "', forget_bias=" + std::to_string(s.forget_bias) +
                   ", reset_after=" + (s.reset_after ? "True" : "False") + ")";
        });

    py::class_<Saved>(m, "Saved", "What a forward keeps for its backward (opaque).");

    m.def("forward",
          [](const rk::Spec& spec, py::object x, py::object w_ih, py::object w_hh,
             py::object b_ih, py::object b_hh, py::object h0, py::object c0,
             py::object lengths) {
              if (float_dtype_of(x, "x").equal(py::dtype::of<float>()))
                  return forward_t<float>(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths);
              return forward_t<double>(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths);
          },
          py::arg("spec"), py::arg("x"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
          py::arg("b_hh"), py::arg("h0") = py::none(), py::arg("c0") = py::none(),
          py::arg("lengths") = py::none(),
          "One layer's forward over a whole sequence. spec: CellSpec; x [B,T,I], w_ih [G*H,I],\n"
          "w_hh [G*H,H], b_* [G*H], h0, c0 [B,H] or None (zeros), lengths int64 [B] or None.\n"
          "Returns (outputs [B,T,H], h_n [B,H], c_n [B,H] | None, saved).");

    m.def("backward",
          [](const Saved& s, py::object d_out, py::object d_h_n, py::object d_c_n) {
              if (s.f64) return backward_t<double>(s, d_out, d_h_n, d_c_n);
              return backward_t<float>(s, d_out, d_h_n, d_c_n);
          },
          py::arg("saved"), py::arg("d_outputs") = py::none(), py::arg("d_h_n") = py::none(),
          py::arg("d_c_n") = py::none(),
          "Backprop through time from a forward's saved; d_* None: zeros.\n"
          "Returns (dx, dh0, dc0 | None, dw_ih, dw_hh, db_ih, db_hh).");
}

}  // namespace rkpy
