// pybind11 bindings of the CPU batch-normalization kernels: argument
// unpacking only, with the GIL released while the kernels run. Optional
// per-channel arrays arrive as None.
#include <optional>

#include "bindings/array_ref.h"
#include "bindings/without_gil.h"
#include "cpu/batchnorm.h"

namespace fusednn {
namespace bindings {

namespace {

// A per-channel array, or nothing for None.
std::optional<ArrayView> optional_view(const py::object& array, bool writable, const char* name) {
  if (array.is_none()) return std::nullopt;
  if (!py::isinstance<py::array>(array)) throw py::type_error(std::string(name) + " must be an array");
  ArrayView view(py::reinterpret_borrow<py::array>(array), writable, name);
  require_full_precision(view, name);
  return view;
}

const cpu::ArrayRef* ref_or_null(const std::optional<ArrayView>& view) {
  return view ? &view->ref() : nullptr;
}

void require_channels(const std::optional<ArrayView>& view, int64_t channels, const char* name) {
  if (view && (view->shape().size() != 1 || view->shape()[0] != channels))
    throw py::value_error(std::string(name) + " must have one value per channel");
}

int checked_axis(const ArrayView& x, int axis) {
  const int ndim = static_cast<int>(x.shape().size());
  if (axis < 0 || axis >= ndim) throw py::value_error("axis out of range");
  return axis;
}

}  // namespace

void bind_batchnorm(py::module_& m) {
  m.def(
      "batch_norm_forward",
      [](const py::array& x, const py::array& out, const py::object& gamma, const py::object& beta,
         const py::object& running_mean, const py::object& running_var, const py::array& save_mean,
         const py::array& save_invstd, bool training, double momentum, double eps, int axis) {
        const ArrayView xv(x, false, "x");
        const ArrayView yv(out, true, "out");
        require_same(xv, yv, "batch_norm_forward");
        const int ax = checked_axis(xv, axis);
        const int64_t channels = xv.shape()[static_cast<size_t>(ax)];
        const auto gv = optional_view(gamma, false, "gamma");
        const auto bv = optional_view(beta, false, "beta");
        const auto rm = optional_view(running_mean, training, "running_mean");
        const auto rv = optional_view(running_var, training, "running_var");
        const ArrayView sm(save_mean, true, "save_mean");
        const ArrayView si(save_invstd, true, "save_invstd");
        for (const ArrayView* v : {&xv, &yv, &sm, &si}) require_full_precision(*v, "batch_norm");
        require_channels(gv, channels, "gamma");
        require_channels(bv, channels, "beta");
        require_channels(rm, channels, "running_mean");
        require_channels(rv, channels, "running_var");
        require_channels(std::optional<ArrayView>(sm), channels, "save_mean");
        require_channels(std::optional<ArrayView>(si), channels, "save_invstd");
        if (!training && (!rm || !rv))
          throw py::value_error("batch_norm_forward: inference needs the running statistics");
        cpu::BatchNormForwardArgs args{ax,
                                       training,
                                       momentum,
                                       eps,
                                       ref_or_null(gv),
                                       ref_or_null(bv),
                                       ref_or_null(rm),
                                       ref_or_null(rv),
                                       &sm.ref(),
                                       &si.ref()};
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(batch_norm_forward)(xv.ref(), yv.ref(), args);
        });
      },
      py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("gamma"), py::arg("beta"),
      py::arg("running_mean"), py::arg("running_var"), py::arg("save_mean").noconvert(),
      py::arg("save_invstd").noconvert(), py::arg("training"), py::arg("momentum"),
      py::arg("eps"), py::arg("axis"));

  m.def(
      "batch_norm_backward",
      [](const py::array& grad_output, const py::array& x, const py::array& grad_input,
         const py::object& gamma, const py::array& save_mean, const py::array& save_invstd,
         const py::array& grad_gamma, const py::array& grad_beta, int axis, bool training) {
        const ArrayView gv(grad_output, false, "grad_output");
        const ArrayView xv(x, false, "x");
        const ArrayView dv(grad_input, true, "grad_input");
        require_same(gv, xv, "batch_norm_backward");
        require_same(gv, dv, "batch_norm_backward");
        const int ax = checked_axis(xv, axis);
        const int64_t channels = xv.shape()[static_cast<size_t>(ax)];
        const auto wv = optional_view(gamma, false, "gamma");
        const ArrayView sm(save_mean, false, "save_mean");
        const ArrayView si(save_invstd, false, "save_invstd");
        const ArrayView gg(grad_gamma, true, "grad_gamma");
        const ArrayView gb(grad_beta, true, "grad_beta");
        for (const ArrayView* v : {&gv, &xv, &dv, &sm, &si, &gg, &gb})
          require_full_precision(*v, "batch_norm_backward");
        require_channels(wv, channels, "gamma");
        for (const ArrayView* v : {&sm, &si, &gg, &gb})
          require_channels(std::optional<ArrayView>(*v), channels, "per-channel array");
        cpu::BatchNormBackwardArgs args{ax,        training,  ref_or_null(wv), &sm.ref(),
                                        &si.ref(), &gg.ref(), &gb.ref()};
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(batch_norm_backward)(gv.ref(), xv.ref(), dv.ref(), args);
        });
      },
      py::arg("grad_output").noconvert(), py::arg("x").noconvert(),
      py::arg("grad_input").noconvert(), py::arg("gamma"), py::arg("save_mean").noconvert(),
      py::arg("save_invstd").noconvert(), py::arg("grad_gamma").noconvert(),
      py::arg("grad_beta").noconvert(), py::arg("axis"), py::arg("training"));
}

}  // namespace bindings
}  // namespace fusednn
