// pybind11 bindings of the batch-normalization kernels, compiled once into
// each module (see backend.h): argument unpacking only. Optional
// per-channel arrays and the scratch buffer arrive as None; the buffer's
// size comes from batch_norm_workspace_bytes (0 on the CPU). `relu` and
// `relu_output` fuse a ReLU after the normalization (see
// fusednn/batchnorm.h).
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
         double momentum, double eps, int axis, bool relu) {
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
                                    training, momentum, eps, axis, relu);
      },
      py::arg("x"), py::arg("out"), py::arg("gamma"), py::arg("beta"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("save_mean"), py::arg("save_invstd"),
      py::arg("workspace"), py::arg("training"), py::arg("momentum"), py::arg("eps"),
      py::arg("axis"), py::arg("relu") = false);

  m.def(
      "batch_norm_backward",
      [](const Operand& grad_output, const Operand& x, const Operand& grad_input,
         const std::optional<Operand>& gamma, const Operand& save_mean,
         const Operand& save_invstd, const Operand& grad_gamma, const Operand& grad_beta,
         const std::optional<Operand>& workspace, int axis, bool training,
         const std::optional<Operand>& relu_output) {
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
        if (relu_output) require_same(grad_output, *relu_output, f);
        Backend::batch_norm_backward(grad_output, x, grad_input, pointer(gamma), save_mean,
                                     save_invstd, grad_gamma, grad_beta, workspace, axis,
                                     training, pointer(relu_output));
      },
      py::arg("grad_output"), py::arg("x"), py::arg("grad_input"), py::arg("gamma"),
      py::arg("save_mean"), py::arg("save_invstd"), py::arg("grad_gamma"), py::arg("grad_beta"),
      py::arg("workspace"), py::arg("axis"), py::arg("training"),
      py::arg("relu_output") = py::none());

  // The split phases of data-parallel batch normalization (see
  // docs/distributed.md); per-channel results are float64.
  m.def(
      "batch_norm_stats",
      [](const Operand& x, const Operand& mean, const Operand& m2,
         const std::optional<Operand>& workspace, int axis) {
        const char* f = "batch_norm_stats";
        const int64_t channels = x.shape[static_cast<size_t>(checked_axis(x, axis, f))];
        for (const Operand* a : {&mean, &m2}) {
          require_channels(a, channels, f, "per-channel output");
          require_dtype(*a, DTypeCode::float64, f, "per-channel output");
          require_writable(*a, f, "per-channel output");
        }
        Backend::batch_norm_stats(x, mean, m2, workspace, axis);
      },
      "Per-channel mean and M2 (sum of squared deviations) of x, in float64.", py::arg("x"),
      py::arg("mean"), py::arg("m2"), py::arg("workspace"), py::arg("axis"));

  m.def(
      "batch_norm_combine_workspace_bytes",
      [](int64_t ranks) {
        if (ranks < 0) throw py::value_error("batch_norm_combine_workspace_bytes: ranks < 0");
        return Backend::batch_norm_combine_workspace_bytes(ranks);
      },
      "Bytes of scratch memory batch_norm_combine needs for `ranks` rows.", py::arg("ranks"));

  m.def(
      "batch_norm_combine",
      [](const std::vector<double>& counts, const Operand& means, const Operand& m2s,
         const Operand& mean, const Operand& var, const std::optional<Operand>& workspace) {
        const char* f = "batch_norm_combine";
        if (means.shape.size() != 2 || means.shape != m2s.shape ||
            means.shape[0] != static_cast<int64_t>(counts.size()))
          throw py::value_error("batch_norm_combine: means and m2s must both be (ranks, C) "
                                "with one count per rank");
        for (const Operand* a : {&means, &m2s, &mean, &var})
          require_dtype(*a, DTypeCode::float64, f, "statistics");
        for (const Operand* a : {&mean, &var}) {
          require_channels(a, means.shape[1], f, "per-channel output");
          require_writable(*a, f, "per-channel output");
        }
        Backend::batch_norm_combine(counts, means, m2s, mean, var, workspace);
      },
      "Merges per-rank (count, mean, M2) rows in rank order into the mean and biased "
      "variance of the whole batch (Chan et al.).",
      py::arg("counts"), py::arg("means"), py::arg("m2s"), py::arg("mean"), py::arg("var"),
      py::arg("workspace"));

  m.def(
      "batch_norm_finalize",
      [](const Operand& mean, const Operand& var, const Operand& invstd,
         const std::optional<Operand>& running_mean, const std::optional<Operand>& running_var,
         double count, double eps, double momentum) {
        const char* f = "batch_norm_finalize";
        const int64_t channels = var.shape.size() == 1 ? var.shape[0] : -1;
        for (const Operand* a :
             {&mean, &var, &invstd, pointer(running_mean), pointer(running_var)})
          require_channels(a, channels, f, "per-channel array");
        require_writable(invstd, f, "invstd");
        if (running_mean) require_writable(*running_mean, f, "running_mean");
        if (running_var) require_writable(*running_var, f, "running_var");
        Backend::batch_norm_finalize(mean, var, invstd, pointer(running_mean),
                                     pointer(running_var), count, eps, momentum);
      },
      "invstd = 1 / sqrt(var + eps), and the running statistics updated in place.",
      py::arg("mean"), py::arg("var"), py::arg("invstd"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("count"), py::arg("eps"), py::arg("momentum"));

  m.def(
      "batch_norm_apply",
      [](const Operand& x, const Operand& out, const Operand& mean, const Operand& invstd,
         const std::optional<Operand>& gamma, const std::optional<Operand>& beta,
         const std::optional<Operand>& workspace, int axis) {
        const char* f = "batch_norm_apply";
        require_same(x, out, f);
        require_writable(out, f, "out");
        const int64_t channels = x.shape[static_cast<size_t>(checked_axis(x, axis, f))];
        for (const Operand* a : {&mean, &invstd, pointer(gamma), pointer(beta)})
          require_channels(a, channels, f, "per-channel array");
        Backend::batch_norm_apply(x, out, mean, invstd, pointer(gamma), pointer(beta),
                                  workspace, axis);
      },
      py::arg("x"), py::arg("out"), py::arg("mean"), py::arg("invstd"), py::arg("gamma"),
      py::arg("beta"), py::arg("workspace"), py::arg("axis"));

  m.def(
      "batch_norm_backward_reduce",
      [](const Operand& grad_output, const Operand& x, const Operand& mean,
         const Operand& invstd, const Operand& sum_dy, const Operand& sum_dy_xhat,
         const std::optional<Operand>& workspace, int axis) {
        const char* f = "batch_norm_backward_reduce";
        require_same(grad_output, x, f);
        const int64_t channels = x.shape[static_cast<size_t>(checked_axis(x, axis, f))];
        for (const Operand* a : {&mean, &invstd, &sum_dy, &sum_dy_xhat})
          require_channels(a, channels, f, "per-channel array");
        for (const Operand* a : {&sum_dy, &sum_dy_xhat}) {
          require_dtype(*a, DTypeCode::float64, f, "per-channel output");
          require_writable(*a, f, "per-channel output");
        }
        Backend::batch_norm_backward_reduce(grad_output, x, mean, invstd, sum_dy, sum_dy_xhat,
                                            workspace, axis);
      },
      py::arg("grad_output"), py::arg("x"), py::arg("mean"), py::arg("invstd"),
      py::arg("sum_dy"), py::arg("sum_dy_xhat"), py::arg("workspace"), py::arg("axis"));

  m.def(
      "batch_norm_backward_apply",
      [](const Operand& grad_output, const Operand& x, const Operand& grad_input,
         const Operand& mean, const Operand& invstd, const std::optional<Operand>& gamma,
         const Operand& sum_dy, const Operand& sum_dy_xhat, double count,
         const std::optional<Operand>& workspace, int axis) {
        const char* f = "batch_norm_backward_apply";
        require_same(grad_output, x, f);
        require_same(grad_output, grad_input, f);
        require_writable(grad_input, f, "grad_input");
        const int64_t channels = x.shape[static_cast<size_t>(checked_axis(x, axis, f))];
        for (const Operand* a : {&mean, &invstd, pointer(gamma), &sum_dy, &sum_dy_xhat})
          require_channels(a, channels, f, "per-channel array");
        if (!(count > 0.0))
          throw py::value_error("batch_norm_backward_apply: count must be positive");
        Backend::batch_norm_backward_apply(grad_output, x, grad_input, mean, invstd,
                                           pointer(gamma), sum_dy, sum_dy_xhat, count,
                                           workspace, axis);
      },
      py::arg("grad_output"), py::arg("x"), py::arg("grad_input"), py::arg("mean"),
      py::arg("invstd"), py::arg("gamma"), py::arg("sum_dy"), py::arg("sum_dy_xhat"),
      py::arg("count"), py::arg("workspace"), py::arg("axis"));
}

}  // namespace bindings
}  // namespace fusednn
