// pybind11 bindings of the CUDA batch-normalization kernels: argument
// unpacking only, with the GIL released while the launches are enqueued.
// Optional per-channel arrays arrive as None; the workspace as a device
// pointer and its size in bytes, allocated by the caller on the stream.
#include <optional>

#include "bindings/cuda_array.h"
#include "bindings/without_gil.h"
#include "cuda/batchnorm.h"

namespace fusednn {
namespace bindings {

namespace {

std::optional<DeviceArrayView> optional_operand(const py::object& operand, const char* name) {
  if (operand.is_none()) return std::nullopt;
  return std::optional<DeviceArrayView>(std::in_place, operand.cast<py::tuple>(), name);
}

const cuda::DeviceArrayRef* ref_or_null(const std::optional<DeviceArrayView>& view) {
  return view ? &view->ref() : nullptr;
}

void require_channels(const DeviceArrayView* view, int64_t channels, const char* name) {
  if (view != nullptr && (view->shape().size() != 1 || view->shape()[0] != channels))
    throw py::value_error(std::string(name) + " must have one value per channel");
}

int64_t channel_count(const DeviceArrayView& x, int axis) {
  if (axis < 0 || axis >= static_cast<int>(x.shape().size()))
    throw py::value_error("axis out of range");
  return x.shape()[static_cast<size_t>(axis)];
}

}  // namespace

void bind_cuda_batchnorm(py::module_& m) {
  m.def(
      "batch_norm_workspace_bytes",
      [](const std::vector<int64_t>& shape, int axis, int dtype) {
        if (axis < 0 || axis >= static_cast<int>(shape.size()))
          throw py::value_error("axis out of range");
        if (dtype < 0 || dtype > static_cast<int>(cuda::DType::bfloat16))
          throw py::type_error("dtype must be float32, float64, float16 or bfloat16");
        int64_t outer = 1, inner = 1;
        for (int d = 0; d < axis; ++d) outer *= shape[static_cast<size_t>(d)];
        for (size_t d = static_cast<size_t>(axis) + 1; d < shape.size(); ++d) inner *= shape[d];
        return cuda::batch_norm_workspace_bytes(static_cast<cuda::DType>(dtype), outer,
                                                shape[static_cast<size_t>(axis)], inner);
      },
      py::arg("shape"), py::arg("axis"), py::arg("dtype"));

  m.def(
      "batch_norm_forward",
      [](const py::tuple& x, const py::tuple& out, const py::object& gamma, const py::object& beta,
         const py::object& running_mean, const py::object& running_var,
         const py::tuple& save_mean, const py::tuple& save_invstd, std::uintptr_t workspace,
         int64_t workspace_bytes, bool training, double momentum, double eps, int axis,
         int device, std::uintptr_t stream) {
        const DeviceArrayView xv(x, "x");
        const DeviceArrayView yv(out, "out");
        require_same(xv, yv, "batch_norm_forward");
        const int64_t channels = channel_count(xv, axis);
        const auto gv = optional_operand(gamma, "gamma");
        const auto bv = optional_operand(beta, "beta");
        const auto rm = optional_operand(running_mean, "running_mean");
        const auto rv = optional_operand(running_var, "running_var");
        const DeviceArrayView sm(save_mean, "save_mean");
        const DeviceArrayView si(save_invstd, "save_invstd");
        for (const auto* view : {&gv, &bv, &rm, &rv})
          require_channels(*view ? &**view : nullptr, channels, "per-channel array");
        require_channels(&sm, channels, "save_mean");
        require_channels(&si, channels, "save_invstd");
        const cuda::BatchNormForwardArgs args{axis,
                                              training,
                                              momentum,
                                              eps,
                                              ref_or_null(gv),
                                              ref_or_null(bv),
                                              ref_or_null(rm),
                                              ref_or_null(rv),
                                              &sm.ref(),
                                              &si.ref()};
        const cuda::Workspace ws{reinterpret_cast<void*>(workspace), workspace_bytes};
        run_without_gil([&] {
          cuda::batch_norm_forward(xv.ref(), yv.ref(), args, ws, launch_target(device, stream));
        });
      },
      py::arg("x"), py::arg("out"), py::arg("gamma"), py::arg("beta"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("save_mean"), py::arg("save_invstd"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("training"), py::arg("momentum"), py::arg("eps"),
      py::arg("axis"), py::arg("device"), py::arg("stream"));

  m.def(
      "batch_norm_backward",
      [](const py::tuple& grad_output, const py::tuple& x, const py::tuple& grad_input,
         const py::object& gamma, const py::tuple& save_mean, const py::tuple& save_invstd,
         const py::tuple& grad_gamma, const py::tuple& grad_beta, std::uintptr_t workspace,
         int64_t workspace_bytes, int axis, bool training, int device, std::uintptr_t stream) {
        const DeviceArrayView gv(grad_output, "grad_output");
        const DeviceArrayView xv(x, "x");
        const DeviceArrayView dv(grad_input, "grad_input");
        require_same(gv, xv, "batch_norm_backward");
        require_same(gv, dv, "batch_norm_backward");
        const int64_t channels = channel_count(xv, axis);
        const auto wv = optional_operand(gamma, "gamma");
        const DeviceArrayView sm(save_mean, "save_mean");
        const DeviceArrayView si(save_invstd, "save_invstd");
        const DeviceArrayView gg(grad_gamma, "grad_gamma");
        const DeviceArrayView gb(grad_beta, "grad_beta");
        require_channels(wv ? &*wv : nullptr, channels, "gamma");
        for (const DeviceArrayView* view : {&sm, &si, &gg, &gb})
          require_channels(view, channels, "per-channel array");
        const cuda::BatchNormBackwardArgs args{axis,      training,  ref_or_null(wv), &sm.ref(),
                                               &si.ref(), &gg.ref(), &gb.ref()};
        const cuda::Workspace ws{reinterpret_cast<void*>(workspace), workspace_bytes};
        run_without_gil([&] {
          cuda::batch_norm_backward(gv.ref(), xv.ref(), dv.ref(), args, ws,
                                    launch_target(device, stream));
        });
      },
      py::arg("grad_output"), py::arg("x"), py::arg("grad_input"), py::arg("gamma"),
      py::arg("save_mean"), py::arg("save_invstd"), py::arg("grad_gamma"), py::arg("grad_beta"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("axis"), py::arg("training"),
      py::arg("device"), py::arg("stream"));
}

}  // namespace bindings
}  // namespace fusednn
