// The training step of a recurrent stack in one call (csrc/cpu/stack.h), as the C++ step plan
// uses it (rnnkern/step_plan/cpp.py): StackLayer records one layer's arrays; StackStep checks
// every array once, when it is made, and keeps them; run() takes the batch's ids and targets
// (the caller's arrays, read in place), checks them, and runs without the GIL. The layers' saved
// activations, outputs and the head's scratch live in the StackStep.
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>

#include "adam.h"
#include "buffer.h"
#include "common.h"
#include "stack.h"

namespace rkpy {
namespace {

// One layer of a StackStep as Python hands it: its spec, parameters and their gradients (out),
// its starting and final state, and the dropout mask on its output (None: none).
struct StackLayerArrays {
    rk::Spec spec;
    py::object w_ih, w_hh, b_ih, b_hh, dw_ih, dw_hh, db_ih, db_hh, h0, c0, h_n, c_n, mask;
};

template <typename T>
class StackStep {
  public:
    StackStep(const std::vector<StackLayerArrays>& layers, std::array<int64_t, 2> batch,
              py::handle table, py::handle d_table, bool table_transposed, py::handle x,
              py::handle dx, py::handle weight, py::handle bias, py::handle dw, py::handle db,
              py::handle weights, py::handle lengths, py::handle head_mask) {
        std::vector<rk::Cell> cells;
        for (const auto& y : layers) cells.push_back(y.spec.cell);
        stack_.reset(new rk::Stack<T>(cells));
        const int64_t L = int64_t(layers.size());
        if (L == 0) throw py::value_error("layers must hold at least one layer");
        if (table.is_none() == x.is_none())
            throw py::value_error("give the first layer's input as a table (read by ids) or as x");
        const int64_t B = batch[0], Tn = batch[1];
        if (B < 0 || Tn < 0) throw py::value_error("batch must be (B, T) >= 0");
        int64_t I;
        if (!x.is_none()) {
            if (!py::isinstance<py::array>(x) || py::reinterpret_borrow<py::array>(x).ndim() != 3)
                throw py::value_error("x must be a 3-D numpy.ndarray [B,T,I]");
            I = py::reinterpret_borrow<py::array>(x).shape(2);
        } else {
            auto ta = matrix(table, "table", table_transposed ? "[G*H,V]" : "[V,G*H]");
            V_ = ta.shape(table_transposed ? 1 : 0);
            I = matrix(layers[0].w_ih, "layers[0].w_ih", "[G*H,I]").shape(1);
        }
        a_.B = B;
        a_.T_ = Tn;
        lengths_ = keep<int64_t>(lengths, "lengths", {B});
        for (int64_t l = 0; l < L; ++l) {
            const StackLayerArrays& c = layers[size_t(l)];
            const std::string at = "layers[" + std::to_string(l) + "].";
            const rk::Spec& spec = c.spec;
            const bool lstm = spec.cell == rk::Cell::lstm;
            const bool gru_before = spec.cell == rk::Cell::gru && !spec.reset_after;
            const int64_t H = matrix(c.w_hh, at + "w_hh", "[G*H,H]").shape(1);
            const int64_t GH = rk::gates_of(spec.cell) * H, S = rk::slots_of(spec.cell);
            rk::StackLayer<T> y;
            rk::ForwardArgs<T>& f = y.f;
            f.spec = spec;
            f.B = B; f.T_ = Tn; f.I = I; f.H = H;
            f.w_ih = keep<T>(c.w_ih, at + "w_ih", {GH, I});
            f.w_hh = keep<T>(c.w_hh, at + "w_hh", {GH, H});
            f.b_ih = keep<T>(c.b_ih, at + "b_ih", {GH});
            f.b_hh = keep<T>(c.b_hh, at + "b_hh", {GH});
            f.h0 = keep<T>(c.h0, at + "h0", {B, H});
            f.c0 = keep<T>(c.c0, at + "c0", {B, H}, !lstm);
            state_.push_back({f.h0, f.c0});
            f.h_n = keep<T>(c.h_n, at + "h_n", {B, H});
            f.c_n = keep<T>(c.c_n, at + "c_n", {B, H}, !lstm);
            const bool from_table = l == 0 && !table.is_none();
            if (from_table) {
                f.x = table_transposed ? keep<T>(table, "table", {GH, V_})
                                       : keep<T>(table, "table", {V_, GH});
                f.projected = true;   // f.ids: each run's
                f.V = V_;
                f.table_t = table_transposed;
            } else if (l == 0) {
                f.x = keep<T>(x, "x", {B, Tn, I});
            } else {
                const rk::StackLayer<T>& below = a_.layers.back();
                f.x = below.dropped ? below.dropped : below.f.out;
            }
            // saved activations, padded to Hp: the LSTM's time-major, else batch-major (kernels.h)
            const int64_t Hp = rk::padded_hidden(H, sizeof(T));
            f.out = own(B * Tn * H);
            if (lstm) {
                f.hprev = own((Tn + 1) * B * rk::lstm_xh_width(from_table ? 0 : I, H, sizeof(T)));
                f.cprev = own((Tn + 1) * B * Hp);
                f.act = own(Tn * B * S * Hp);
            } else {
                f.hprev = own(B * Tn * Hp);
                f.act = own(B * Tn * S * Hp);
                if (gru_before) f.rh = own(B * Tn * Hp);
            }
            if (!c.mask.is_none()) {
                if (l == L - 1)
                    throw py::value_error(at + "mask must be None (the last layer's dropout is "
                                          "head_mask)");
                y.mask = keep<T>(c.mask, at + "mask", {B, Tn, H});
                y.dropped = own(B * Tn * H);
            }
            rk::BackwardArgs<T>& b = y.b;
            b.spec = spec;
            b.B = B; b.T_ = Tn; b.I = I; b.H = H;
            b.x = f.x; b.w_ih = f.w_ih; b.w_hh = f.w_hh;
            b.projected = f.projected; b.ids = f.ids; b.V = f.V; b.table_t = f.table_t;
            b.hprev = f.hprev; b.cprev = f.cprev; b.act = f.act; b.rh = f.rh;
            if (from_table)  // the table's gradient (transposed: the same array as dw_ih)
                b.dx = table_transposed ? keep<T>(d_table, "d_table", {GH, V_})
                                        : keep<T>(d_table, "d_table", {V_, GH});
            else if (l > 0)
                b.dx = own(B * Tn * I);
            else  // floats into layer 0: their gradient only when asked for (embedded rows)
                b.dx = keep<T>(dx, "dx", {B, Tn, I}, true);
            b.dw_ih = keep<T>(c.dw_ih, at + "dw_ih", {GH, I});
            b.dw_hh = keep<T>(c.dw_hh, at + "dw_hh", {GH, H});
            b.db_ih = keep<T>(c.db_ih, at + "db_ih", {GH});
            b.db_hh = keep<T>(c.db_hh, at + "db_hh", {GH});
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
        h.db = h.bias ? keep<T>(db, "db", {C}) : nullptr;
        weights_ = keep<T>(weights, "weights", {N});
        if (!head_mask.is_none()) {
            a_.head_mask = keep<T>(head_mask, "head_mask", {B, Tn, F});
            a_.head_dropped = own(N * F);
        }
        h.h = a_.head_dropped ? a_.head_dropped : top.f.out;
        h.dh = own(N * F);
        top.b.d_out = h.dh;
    }

    // One step over ids [B,T] (None: floats) and targets [B,T], both int64 and read in place.
    // use_state false: every layer starts from zeros, whatever h0 and c0 hold (the LSTM kernel
    // then skips the first step's h rows of its product). adam_t > 0: Adam's update of step t
    // (set_adam's arrays) with these hyper-parameters at the end, unless the loss is not
    // finite; 0: no update.
    double run(py::handle ids, py::handle targets, bool use_lengths, bool use_weights,
               double inv_total, bool use_state, int64_t adam_t, double lr, double b1, double b2,
               double eps) {
        const int64_t B = a_.B, Tn = a_.T_, N = B * Tn;
        py::object io = checked(ids, "ids", py::dtype::of<int64_t>(), {B, Tn}, V_ == 0);
        if (V_ == 0 && !io.is_none()) throw py::value_error("ids are for a table input only");
        py::object to = checked(targets, "targets", py::dtype::of<int64_t>(), {B, Tn});
        const int64_t* id = cptr<int64_t>(io);
        const int64_t* target = cptr<int64_t>(to);
        if (id) check_range(id, N, V_, "ids", "[0, V) = [0, " + std::to_string(V_) + ")");
        check_range(target, N, a_.head.C, "targets",
                    "[0, C) = [0, " + std::to_string(a_.head.C) + ")");
        a_.layers[0].f.ids = a_.layers[0].b.ids = id;
        a_.head.targets = target;
        for (size_t l = 0; l < a_.layers.size(); ++l) {
            rk::StackLayer<T>& y = a_.layers[l];
            y.f.lengths = y.b.lengths = use_lengths ? lengths_ : nullptr;
            y.f.h0 = use_state ? state_[l][0] : nullptr;
            y.f.c0 = use_state ? state_[l][1] : nullptr;
        }
        a_.head.w = use_weights ? weights_ : nullptr;
        a_.head.inv_total = inv_total;
        a_.adam = nullptr;
        if (adam_t > 0) {
            if (adam_.n == 0) throw py::value_error("adam_t > 0 needs set_adam's arrays first");
            adam_s_ = rk::adam_scalars<T>(adam_t, lr, b1, b2, eps, adam_.tf_form);
            adam_.s = adam_s_.data();
            a_.adam = &adam_;
        }
        py::gil_scoped_release nogil;
        return stack_->step(a_);
    }

    std::vector<int64_t> cut() const { return stack_->cut(); }
    void hold_cut(std::vector<int64_t> cut) { stack_->hold_cut(std::move(cut)); }

    // The arrays of Adam's update (csrc/cpu/adam.h), run at the end of each run() given an
    // adam_t: the flat p, g, m, v [n]; p None: none.
    void set_adam(py::handle p, py::handle g, py::handle m, py::handle v, bool tf_form) {
        adam_ = rk::AdamArgs<T>{};
        adam_keep_.clear();
        if (p.is_none()) return;
        if (!py::isinstance<py::array>(p))
            throw py::value_error("p must be a numpy.ndarray, got " +
                                  std::string(Py_TYPE(p.ptr())->tp_name));
        const int64_t n = int64_t(py::reinterpret_borrow<py::array>(p).size());
        auto take = [&](py::handle o, const char* name) {
            py::object c = checked(o, name, py::dtype::of<T>(), {n});
            adam_keep_.push_back(c);
            return mptr<T>(c);
        };
        adam_.p = take(p, "p");
        adam_.g = take(g, "g");
        adam_.m = take(m, "m");
        adam_.v = take(v, "v");
        adam_.tf_form = tf_form;
        adam_.n = n;
    }

  private:
    template <typename U>
    U* keep(py::handle obj, const std::string& name, const std::vector<int64_t>& shape,
            bool optional = false) {
        py::object o = checked(obj, name, py::dtype::of<U>(), shape, optional);
        if (o.is_none()) return nullptr;
        keep_.push_back(o);
        return mptr<U>(o);
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
    std::unique_ptr<rk::Stack<T>> stack_;
    rk::AdamArgs<T> adam_;
    std::array<T, 7> adam_s_{};         // this run's Adam scalars (adam.h)
    std::vector<py::object> adam_keep_;  // set_adam's arrays
    int64_t V_ = 0;                      // table rows (0: floats in)
    int64_t* lengths_ = nullptr;
    T* weights_ = nullptr;
};

template <typename T>
void bind_step(py::module_& m, const char* name) {
    py::class_<StackStep<T>>(m, name,
        "A training step of [input -> recurrent layers -> dense head + softmax cross-entropy\n"
        "(-> Adam)] in one call (csrc/cpu/stack.h) over arrays checked once, here.\n"
        "layers: StackLayer per layer, bottom up; batch: (B, T). The first layer's input: a\n"
        "table [V,G*H_0] (its input projection per id) that each run reads by its ids,\n"
        "d_table [V,G*H_0] out (then layer 0's dw_ih comes back zero: the caller forms it);\n"
        "table_transposed: table and d_table are [G*H_0,V] (one-hot input: layer 0's w_ih and,\n"
        "the same array as its dw_ih, dw_ih); or x [B,T,I] floats, with dx [B,T,I] out for\n"
        "their gradient (or None: not formed). Head: weight [C,F], bias [C] | None, dw,\n"
        "db | None out, weights [N], lengths int64 [B], head_mask [B,T,F] | None.")
        .def(py::init<const std::vector<StackLayerArrays>&, std::array<int64_t, 2>, py::handle,
                      py::handle, bool, py::handle, py::handle, py::handle, py::handle,
                      py::handle, py::handle, py::handle, py::handle, py::handle>(),
             py::arg("layers"), py::kw_only(), py::arg("batch"), py::arg("table") = py::none(),
             py::arg("d_table") = py::none(), py::arg("table_transposed") = false,
             py::arg("x") = py::none(), py::arg("dx") = py::none(), py::arg("weight"),
             py::arg("bias"), py::arg("dw"), py::arg("db"), py::arg("weights"),
             py::arg("lengths"), py::arg("head_mask") = py::none())
        .def("run", &StackStep<T>::run, py::arg("ids"), py::arg("targets"),
             py::arg("use_lengths"), py::arg("use_weights"), py::arg("inv_total"),
             py::arg("use_state"), py::arg("adam_t") = 0, py::arg("lr") = 0.0,
             py::arg("b1") = 0.0, py::arg("b2") = 0.0, py::arg("eps") = 0.0,
             "One step over ids [B,T] (None: floats in) and targets [B,T], int64, read in\n"
             "place; returns the loss and fills every h_n, c_n and gradient. use_state False:\n"
             "every layer starts from zeros, whatever h0, c0 hold. adam_t > 0: then Adam's\n"
             "update of step t (rnnkern.optim.Adam's rule and bits) with lr, b1, b2, eps, unless\n"
             "the loss is not finite (then nothing is updated).")
        .def("set_adam", &StackStep<T>::set_adam, py::arg("p"), py::arg("g"), py::arg("m"),
             py::arg("v"), py::arg("tf_form"),
             "The arrays of the update runs with adam_t > 0 (csrc/cpu/adam.h): flat p, g, m, v\n"
             "[n] of the dtype; tf_form: TF's eps (else PyTorch's); p None: none.")
        .def_property_readonly("cut", &StackStep<T>::cut,
             "The forward's rows per thread, [0, c1, .., B]: thread k runs [cut[k], cut[k+1]).\n"
             "It follows the threads' measured speeds from step to step.")
        .def("hold_cut", &StackStep<T>::hold_cut, py::arg("cut"),
             "Fix the forward's cut for the next runs (tests: no result depends on it); [] lets\n"
             "it move again. A cut that does not fit a run's batch and threads is not used.");
}

}  // namespace

void bind_stack(py::module_& m) {
    py::class_<StackLayerArrays>(m, "StackLayer",
        "One layer of a StackStep: spec (CellSpec), its parameters, their gradients (written\n"
        "by each run), h0/c0 [B,H] (read when a run uses the state), h_n/c_n [B,H] (written),\n"
        "and mask [B,T,H] | None, the dropout mask on its output (not the top layer's).")
        .def(py::init([](const rk::Spec& spec, py::object w_ih, py::object w_hh,
                         py::object b_ih, py::object b_hh, py::object dw_ih, py::object dw_hh,
                         py::object db_ih, py::object db_hh, py::object h0, py::object c0,
                         py::object h_n, py::object c_n, py::object mask) {
                 return StackLayerArrays{spec, w_ih, w_hh, b_ih, b_hh, dw_ih, dw_hh, db_ih,
                                         db_hh, h0, c0, h_n, c_n, mask};
             }),
             py::kw_only(), py::arg("spec"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
             py::arg("b_hh"), py::arg("dw_ih"), py::arg("dw_hh"), py::arg("db_ih"),
             py::arg("db_hh"), py::arg("h0"), py::arg("c0") = py::none(), py::arg("h_n"),
             py::arg("c_n") = py::none(), py::arg("mask") = py::none());
    bind_step<float>(m, "StackStepF32");
    bind_step<double>(m, "StackStepF64");
}

}  // namespace rkpy
