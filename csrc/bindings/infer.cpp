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
               py::handle weight, py::handle bias) {
        if (layers.empty()) throw py::value_error("layers must hold at least one layer");
        if (batch < 1) throw py::value_error("batch must be >= 1, got " + std::to_string(batch));
        auto tm = matrix(table, "table", "[V,I]");
        V_ = tm.shape(0);
        int64_t in = tm.shape(1);
        const T* tp = keep(table, "table", {V_, in});
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
        stack_.reset(new rk::InferStack<T>(args, batch, tp, V_, tm.shape(1), w, b, C));
        for (const auto& y : args) hidden_.push_back(y.H);
    }

    py::array_t<T> step(py::handle ids) {
        const int64_t* id = checked_ids(ids, {stack_->batch()});
        auto logits = new_array<T>({stack_->batch(), stack_->classes()});
        T* out = logits.mutable_data();
        py::gil_scoped_release nogil;
        stack_->step(id, out);
        return logits;
    }

    py::array_t<int64_t> generate(py::handle ids, int64_t length, py::handle u,
                                  double temperature, int64_t top_k) {
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
    int64_t V_ = 0;
    std::unique_ptr<rk::InferStack<T>> stack_;
};

template <typename T>
void bind(py::module_& m, const char* name) {
    py::class_<InferStack<T>>(m, name,
        "One-step inference over [ids -> table rows -> recurrent layers -> dense head]\n"
        "(csrc/cpu/infer.h), every array checked once, here. layers: (CellSpec, w_ih, w_hh,\n"
        "b_ih, b_hh) per layer, bottom up; batch: B; table [V,I] the rows ids select (the\n"
        "identity for one-hot input); weight [C,H_top], bias [C] | None.")
        .def(py::init<const std::vector<LayerTuple>&, int64_t, py::handle, py::handle,
                      py::handle>(),
             py::arg("layers"), py::kw_only(), py::arg("batch"), py::arg("table"),
             py::arg("weight"), py::arg("bias"))
        .def("step", &InferStack<T>::step, py::arg("ids"),
             "One step from ids int64 [B] in [0, V): the state moves on; returns logits [B,C].")
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
