// One-step inference over a recurrent stack (csrc/cpu/infer.h), as rnnkern/inference.py uses it
// for Sequential.step and rnnkern.generate: InferStack checks every array once, when it is
// made, and keeps them; step() and generate() take the ids (checked against V) and run without
// the GIL.
#include <pybind11/stl.h>

#include <string>
#include <tuple>

#include "common.h"
#include "infer.h"

namespace rkpy {
namespace {

// One layer as Python hands it: (spec, w_ih [G*H,I], w_hh [G*H,H], b_ih [G*H], b_hh [G*H]).
using LayerTuple = std::tuple<rk::Spec, py::object, py::object, py::object, py::object>;

template <typename T>
class InferStack {
  public:
    InferStack(const std::vector<LayerTuple>& layers, int64_t batch, py::handle table,
               int64_t input_size, py::handle weight, py::handle bias) {
        if (layers.empty()) throw py::value_error("layers must hold at least one layer");
        if (batch < 1) throw py::value_error("batch must be >= 1, got " + std::to_string(batch));
        int64_t in = input_size;
        const T* tp = nullptr;
        if (!table.is_none()) {
            auto tm = matrix(table, "table", "[V,I]");
            V_ = tm.shape(0);
            in = tm.shape(1);
            tp = keep(table, "table", {V_, in});
        } else if (in < 1) {
            throw py::value_error("input_size must be >= 1 without a table");
        }
        const int64_t I = in;
        std::vector<rk::InferLayerArgs<T>> args;
        for (size_t l = 0; l < layers.size(); ++l) {
            const std::string at = "layers[" + std::to_string(l) + "].";
            rk::InferLayerArgs<T> y;
            y.spec = std::get<0>(layers[l]);
            y.H = matrix(std::get<2>(layers[l]), at + "w_hh", "[G*H,H]").shape(1);
            const int64_t GH = rk::gates_of(y.spec.cell) * y.H;
            y.w_ih = keep(std::get<1>(layers[l]), at + "w_ih", {GH, in});
            y.w_hh = keep(std::get<2>(layers[l]), at + "w_hh", {GH, y.H});
            y.b_ih = keep(std::get<3>(layers[l]), at + "b_ih", {GH});
            y.b_hh = keep(std::get<4>(layers[l]), at + "b_hh", {GH});
            args.push_back(y);
            in = y.H;
        }
        const int64_t C = matrix(weight, "weight", "[C,H]").shape(0);
        const T* w = keep(weight, "weight", {C, in});
        const T* b = bias.is_none() ? nullptr : keep(bias, "bias", {C});
        stack_.reset(new rk::InferStack<T>(args, batch, tp, V_, I, w, b, C));
        for (const auto& y : args) hidden_.push_back(y.H);
        I_ = I;
    }

    void need_table() const {
        if (V_ == 0) throw py::value_error("this stack takes floats (no table): use run(x=...)");
    }

    py::array_t<T> step(py::handle ids) {
        need_table();
        const int64_t* id = checked_ids(ids, {stack_->batch()});
        auto logits = new_array<T>({stack_->batch(), stack_->classes()});
        T* out = logits.mutable_data();
        py::gil_scoped_release nogil;
        stack_->step(id, out);
        return logits;
    }

    py::array_t<T> run(py::handle ids, py::handle x, py::handle lengths) {
        const int64_t B = stack_->batch();
        if (ids.is_none() == x.is_none()) throw py::value_error("give ids or x, not both");
        py::handle in = ids.is_none() ? x : ids;
        const int want = ids.is_none() ? 3 : 2;
        if (!py::isinstance<py::array>(in) || py::reinterpret_borrow<py::array>(in).ndim() != want)
            throw py::value_error(ids.is_none() ? "x must be a 3-D numpy.ndarray [B,T,I]"
                                                : "ids must be a 2-D numpy.ndarray [B,T]");
        const int64_t Tn = py::reinterpret_borrow<py::array>(in).shape(1);
        const int64_t* id = nullptr;
        const T* xp = nullptr;
        py::object io;
        if (!ids.is_none()) {
            need_table();
            io = checked(ids, "ids", py::dtype::of<int64_t>(), {B, Tn});
            id = cptr<int64_t>(io);
            check_range(id, B * Tn, V_, "ids", "[0, V) = [0, " + std::to_string(V_) + ")");
        } else {
            io = checked(x, "x", py::dtype::of<T>(), {B, Tn, I_});
            xp = cptr<T>(io);
        }
        py::object lo = checked(lengths, "lengths", py::dtype::of<int64_t>(), {B}, true);
        const int64_t* len = cptr<int64_t>(lo);
        if (len) check_range(len, B, Tn + 1, "lengths", "[0, T] = [0, " + std::to_string(Tn) + "]");
        auto logits = new_array<T>({B, Tn, stack_->classes()});
        T* out = logits.mutable_data();
        py::gil_scoped_release nogil;
        stack_->run(id, xp, Tn, len, out);
        return logits;
    }

    py::array_t<int64_t> generate(py::handle ids, int64_t length, py::handle u,
                                  double temperature, int64_t top_k) {
        need_table();
        const int64_t B = stack_->batch();
        if (length < 0) throw py::value_error("length must be >= 0");
        if (!(temperature >= 0)) throw py::value_error("temperature must be >= 0");
        if (top_k < 0) throw py::value_error("top_k must be >= 0 (0: no limit)");
        const int64_t* id = checked_ids(ids, {B});
        py::object uo = checked(u, "u", py::dtype::of<double>(), {length, B}, temperature == 0);
        if (temperature > 0 && uo.is_none())
            throw py::value_error("u [length, B] is needed for temperature > 0");
        const double* up = cptr<double>(uo);
        py::array_t<int64_t> out({length, B});
        int64_t* o = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            stack_->generate(id, length, up, rk::SampleArgs{temperature, top_k}, o);
        }
        for (int64_t i = 0; i < length * B; ++i) {
            if (o[i] == rk::kNonFinite)
                throw py::value_error("logits contain NaN or +infinity (a diverged model?)");
            if (o[i] == rk::kAllMasked)
                throw py::value_error("every logit of a row is -inf: nothing left to choose");
        }
        return out;
    }

    void reset() { stack_->reset(); }

    // views of each layer's state buffers, keeping this object alive
    py::tuple state() {
        py::object self = py::cast(this, py::return_value_policy::reference);
        py::list views;
        const int64_t B = stack_->batch();
        for (size_t l = 0; l < hidden_.size(); ++l) {
            const std::vector<int64_t> shape{B, hidden_[l]};
            views.append(py::array_t<T>(shape, stack_->h(l), self));
            views.append(stack_->c(l) ? py::object(py::array_t<T>(shape, stack_->c(l), self))
                                      : py::object(py::none()));
        }
        return py::tuple(views);
    }

  private:
    const T* keep(py::handle obj, const std::string& name, const std::vector<int64_t>& shape) {
        py::object o = checked(obj, name, py::dtype::of<T>(), shape);
        keep_.push_back(o);
        return cptr<T>(o);
    }
    const int64_t* checked_ids(py::handle ids, const std::vector<int64_t>& shape) {
        py::object o = checked(ids, "ids", py::dtype::of<int64_t>(), shape);
        const int64_t* p = cptr<int64_t>(o);
        check_range(p, shape[0], V_, "ids", "[0, V) = [0, " + std::to_string(V_) + ")");
        held_ = o;  // alive until the next call
        return p;
    }
    std::vector<py::object> keep_;
    std::vector<int64_t> hidden_;
    py::object held_;
    int64_t V_ = 0;  // table rows (0: floats in)
    int64_t I_ = 0;  // the first layer's input width
    std::unique_ptr<rk::InferStack<T>> stack_;
};

template <typename T>
void bind(py::module_& m, const char* name) {
    py::class_<InferStack<T>>(m, name,
        "One-step inference over [ids -> table rows -> recurrent layers -> dense head]\n"
        "(csrc/cpu/infer.h), every array checked once, here. layers: (CellSpec, w_ih, w_hh,\n"
        "b_ih, b_hh) per layer, bottom up; batch: B; table [V,I] the rows ids select (the\n"
        "identity for one-hot input), or None and input_size I for float input (run(x=)\n"
        "only); weight [C,H_top], bias [C] | None.")
        .def(py::init<const std::vector<LayerTuple>&, int64_t, py::handle, int64_t, py::handle,
                      py::handle>(),
             py::arg("layers"), py::kw_only(), py::arg("batch"), py::arg("table") = py::none(),
             py::arg("input_size") = 0, py::arg("weight"), py::arg("bias"))
        .def("step", &InferStack<T>::step, py::arg("ids"),
             "One step from ids int64 [B] in [0, V): the state moves on; returns logits [B,C].")
        .def("run", &InferStack<T>::run, py::kw_only(), py::arg("ids") = py::none(),
             py::arg("x") = py::none(), py::arg("lengths") = py::none(),
             "Steps over ids int64 [B,T] (or floats x [B,T,I] for a stack made without a\n"
             "table) from the current state; returns logits [B,T,C].\n"
             "lengths int64 [B] in [0, T] | None: row b stops at its length (its state then\n"
             "carried; later logits are the head's of a zero output), as the training forward.")
        .def("generate", &InferStack<T>::generate, py::arg("ids"), py::arg("length"),
             py::kw_only(), py::arg("u"), py::arg("temperature"), py::arg("top_k"),
             "length steps from ids [B], each next id drawn from the step's logits as\n"
             "rnnkern.sample_logits draws it (u [length,B] float64 uniform draws, one per row\n"
             "and step; None for temperature 0: argmax; top_k 0: no limit) and fed to the next\n"
             "step; returns the ids [length,B]. Logits with NaN or +inf raise ValueError.")
        .def("reset", &InferStack<T>::reset, "Every layer's state to zeros.")
        .def_property_readonly("state", &InferStack<T>::state,
             "(h_0, c_0 | None, h_1, c_1 | None, ...): each layer's state [B,H_l], views of\n"
             "the stack's own buffers, read and written in place.");
}

}  // namespace

void bind_infer(py::module_& m) {
    bind<float>(m, "InferStackF32");
    bind<double>(m, "InferStackF64");
}

}  // namespace rkpy
