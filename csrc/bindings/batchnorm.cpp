// pybind11 bindings of the batch-normalization kernels, compiled once into
// each module (see backend.h): argument unpacking only. Optional
// per-channel arrays and the scratch buffer arrive as None; the buffer's
// size comes from batch_norm_workspace_bytes (0 on the CPU).
#include <optional>
#include <vector>

#include "bindings/backend.h"

namespace fusednn {
namespace bindings {

namespace {

const Operand* pointer(const std::optional<Operand>& a) { return a ? &*a : nullptr; }

}  // namespace

void bind_batchnorm(py::module_& m) {
  m.def(
      "batch_norm_workspace_bytes",
      [](const std::vector<int64_t>& shape, int axis, int dtype) {
        if (axis < 0 || axis >= static_cast<int>(shape.size()))
          throw py::value_error("batch_norm_workspace_bytes: axis out of range");
        return Backend::batch_norm_workspace_bytes(shape, axis, dtype);
      },
      "Bytes of scratch memory batch_norm_forward/backward need for x of `shape` (dtype code "
      "`dtype`) normalized over `axis`.",
      py::arg("shape"), py::arg("axis"), py::arg("dtype"));

  m.def(
      "batch_norm_forward",
      [](const Operand& x, const Operand& out, const std::optional<Operand>& gamma,
         const std::optional<Operand>& beta, const std::optional<Operand>& running_mean,
         const std::optional<Operand>& running_var, const Operand& save_mean,
         const Operand& save_invstd, const std::optional<Operand>& workspace, bool training,
         double momentum, double eps, int axis) {
        const char* f = "batch_norm_forward";
        require_same(x, out, f);
        require_writable(out, f, "out");
        const int64_t channels = x.shape[static_cast<size_t>(checked_axis(x, axis, f))];
        require_channels(pointer(gamma), channels, f, "gamma");
        require_channels(pointer(beta), channels, f, "beta");
        require_channels(pointer(running_mean), channels, f, "running_mean");
        require_channels(pointer(running_var), channels, f, "running_var");
        require_channels(&save_mean, channels, f, "save_mean");
        require_channels(&save_invstd, channels, f, "save_invstd");
        require_writable(save_mean, f, "save_mean");
        require_writable(save_invstd, f, "save_invstd");
        if (training) {
          if (running_mean) require_writable(*running_mean, f, "running_mean");
          if (running_var) require_writable(*running_var, f, "running_var");
        } else if (!running_mean || !running_var) {
          throw py::value_error("batch_norm_forward: inference needs the running statistics");
        }
        Backend::batch_norm_forward(x, out, pointer(gamma), pointer(beta), pointer(running_mean),
                                    pointer(running_var), save_mean, save_invstd, workspace,
                                    training, momentum, eps, axis);
      },
      py::arg("x"), py::arg("out"), py::arg("gamma"), py::arg("beta"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("save_mean"), py::arg("save_invstd"),
      py::arg("workspace"), py::arg("training"), py::arg("momentum"), py::arg("eps"),
      py::arg("axis"));

  m.def(
      "batch_norm_backward",
      [](const Operand& grad_output, const Operand& x, const Operand& grad_input,
         const std::optional<Operand>& gamma, const Operand& save_mean,
         const Operand& save_invstd, const Operand& grad_gamma, const Operand& grad_beta,
         const std::optional<Operand>& workspace, int axis, bool training) {
        const char* f = "batch_norm_backward";
        require_same(grad_output, x, f);
        require_same(grad_output, grad_input, f);
        require_writable(grad_input, f, "grad_input");
        const int64_t channels = x.shape[static_cast<size_t>(checked_axis(x, axis, f))];
        require_channels(pointer(gamma), channels, f, "gamma");
        for (const Operand* a : {&save_mean, &save_invstd, &grad_gamma, &grad_beta})
          require_channels(a, channels, f, "per-channel array");
        require_writable(grad_gamma, f, "grad_gamma");
        require_writable(grad_beta, f, "grad_beta");
        Backend::batch_norm_backward(grad_output, x, grad_input, pointer(gamma), save_mean,
                                     save_invstd, grad_gamma, grad_beta, workspace, axis,
                                     training);
      },
      py::arg("grad_output"), py::arg("x"), py::arg("grad_input"), py::arg("gamma"),
      py::arg("save_mean"), py::arg("save_invstd"), py::arg("grad_gamma"), py::arg("grad_beta"),
      py::arg("workspace"), py::arg("axis"), py::arg("training"));
}

}  // namespace bindings
}  // namespace fusednn
