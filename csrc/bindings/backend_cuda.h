// The CUDA adapter behind the shared bindings: Operands in device memory
// become cuda::DeviceArrayRef views, and each launcher is enqueued on the
// device and stream of the call's first array (the caller's current
// stream, which the Python layer put into every Operand) with the GIL
// released. Scratch buffers arrive as Operands allocated by the caller on
// that stream.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "bindings/operand.h"
#include "bindings/without_gil.h"
#include "cuda/activations.h"
#include "cuda/batchnorm.h"
#include "cuda/dropout.h"

namespace fusednn {
namespace bindings {

struct Backend {
  using Ref = cuda::DeviceArrayRef;
  using DropoutSpec = cuda::DropoutSpec;

  static Ref ref(const Operand& a, const char* function, const char* name) {
    if (a.device < 0)
      throw py::value_error(operand_error(function, name, "is in host memory; the CUDA "
                                                          "module takes device arrays"));
    if (a.dtype == DTypeCode::uint8)
      throw py::type_error(operand_error(function, name, "has dtype uint8; the CUDA kernels "
                                                         "take float32, float64, float16 and "
                                                         "bfloat16"));
    return a.ref<Ref>();
  }

  static cuda::LaunchTarget target(const Operand& a) {
    return cuda::LaunchTarget{a.device, a.stream};
  }

  static void activation_forward(Activation act, const ActivationParams& p, const Operand& x,
                                 const Operand& y) {
    const Ref xr = ref(x, "activation_forward", "x"), yr = ref(y, "activation_forward", "out");
    run_without_gil([&] { cuda::activation_forward(act, p, xr, yr, target(x)); });
  }

  static void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                                  const Operand& g, const Operand& saved, const Operand& out) {
    const char* f = "activation_backward";
    const Ref gr = ref(g, f, "grad_output"), sr = ref(saved, f, "saved"), orf = ref(out, f, "out");
    run_without_gil([&] {
      cuda::activation_backward(act, p, from_output, gr, sr, orf, target(g));
    });
  }

  static int64_t batch_norm_workspace_bytes(const std::vector<int64_t>& shape, int axis,
                                            int dtype) {
    if (dtype < 0 || dtype > static_cast<int>(DTypeCode::bfloat16))
      throw py::type_error("batch_norm_workspace_bytes: dtype must be float32, float64, float16 "
                           "or bfloat16");
    int64_t outer = 1, inner = 1;
    for (int d = 0; d < axis; ++d) outer *= shape[static_cast<size_t>(d)];
    for (size_t d = static_cast<size_t>(axis) + 1; d < shape.size(); ++d) inner *= shape[d];
    return cuda::batch_norm_workspace_bytes(static_cast<cuda::DType>(dtype), outer,
                                            shape[static_cast<size_t>(axis)], inner);
  }

  static void batch_norm_forward(const Operand& x, const Operand& y, const Operand* gamma,
                                 const Operand* beta, const Operand* running_mean,
                                 const Operand* running_var, const Operand& save_mean,
                                 const Operand& save_invstd,
                                 const std::optional<Operand>& workspace, bool training,
                                 double momentum, double eps, int axis, bool relu) {
    const char* f = "batch_norm_forward";
    const Ref xr = ref(x, f, "x"), yr = ref(y, f, "out");
    const Ref sm = ref(save_mean, f, "save_mean"), si = ref(save_invstd, f, "save_invstd");
    const auto g = optional_ref(gamma, f, "gamma"), b = optional_ref(beta, f, "beta");
    const auto rm = optional_ref(running_mean, f, "running_mean");
    const auto rv = optional_ref(running_var, f, "running_var");
    const cuda::BatchNormForwardArgs args{axis,        training,    momentum,    eps, pointer(g),
                                          pointer(b),  pointer(rm), pointer(rv), &sm, &si,
                                          relu};
    const cuda::Workspace ws = scratch(workspace, x, f);
    run_without_gil([&] { cuda::batch_norm_forward(xr, yr, args, ws, target(x)); });
  }

  static void batch_norm_backward(const Operand& g, const Operand& x, const Operand& grad_input,
                                  const Operand* gamma, const Operand& save_mean,
                                  const Operand& save_invstd, const Operand& grad_gamma,
                                  const Operand& grad_beta,
                                  const std::optional<Operand>& workspace, int axis,
                                  bool training, const Operand* relu_output) {
    const char* f = "batch_norm_backward";
    const Ref gr = ref(g, f, "grad_output"), xr = ref(x, f, "x");
    const Ref dr = ref(grad_input, f, "grad_input");
    const Ref sm = ref(save_mean, f, "save_mean"), si = ref(save_invstd, f, "save_invstd");
    const Ref gg = ref(grad_gamma, f, "grad_gamma"), gb = ref(grad_beta, f, "grad_beta");
    const auto w = optional_ref(gamma, f, "gamma");
    const auto ro = optional_ref(relu_output, f, "relu_output");
    const cuda::BatchNormBackwardArgs args{axis, training, pointer(w), &sm, &si,
                                           &gg,  &gb,      pointer(ro)};
    const cuda::Workspace ws = scratch(workspace, x, f);
    run_without_gil([&] { cuda::batch_norm_backward(gr, xr, dr, args, ws, target(x)); });
  }

  static void batch_norm_stats(const Operand& x, const Operand& mean, const Operand& m2,
                               const std::optional<Operand>& workspace, int axis) {
    const char* f = "batch_norm_stats";
    const Ref xr = ref(x, f, "x"), mr = ref(mean, f, "mean"), m2r = ref(m2, f, "m2");
    const cuda::Workspace ws = scratch(workspace, x, f);
    run_without_gil([&] { cuda::batch_norm_stats(xr, axis, mr, m2r, ws, target(x)); });
  }

  static int64_t batch_norm_combine_workspace_bytes(int64_t ranks) {
    return cuda::batch_norm_combine_workspace_bytes(ranks);
  }

  static void batch_norm_combine(const std::vector<double>& counts, const Operand& means,
                                 const Operand& m2s, const Operand& mean, const Operand& var,
                                 const std::optional<Operand>& workspace) {
    const char* f = "batch_norm_combine";
    const Ref msr = ref(means, f, "means"), m2r = ref(m2s, f, "m2s");
    const Ref mr = ref(mean, f, "mean"), vr = ref(var, f, "var");
    const cuda::Workspace ws = scratch(workspace, means, f);
    run_without_gil([&] { cuda::batch_norm_combine(counts, msr, m2r, mr, vr, ws, target(means)); });
  }

  static void batch_norm_finalize(const Operand& mean, const Operand& var, const Operand& invstd,
                                  const Operand* running_mean, const Operand* running_var,
                                  double count, double eps, double momentum) {
    const char* f = "batch_norm_finalize";
    const Ref mr = ref(mean, f, "mean"), vr = ref(var, f, "var"), ir = ref(invstd, f, "invstd");
    const auto rm = optional_ref(running_mean, f, "running_mean");
    const auto rv = optional_ref(running_var, f, "running_var");
    const cuda::BatchNormFinalizeArgs args{count, eps, momentum, &mr, &vr, &ir, pointer(rm),
                                           pointer(rv)};
    run_without_gil([&] { cuda::batch_norm_finalize(args, target(var)); });
  }

  static void batch_norm_apply(const Operand& x, const Operand& y, const Operand& mean,
                               const Operand& invstd, const Operand* gamma, const Operand* beta,
                               const std::optional<Operand>& workspace, int axis) {
    const char* f = "batch_norm_apply";
    const Ref xr = ref(x, f, "x"), yr = ref(y, f, "out");
    const Ref mr = ref(mean, f, "mean"), ir = ref(invstd, f, "invstd");
    const auto g = optional_ref(gamma, f, "gamma"), b = optional_ref(beta, f, "beta");
    const cuda::BatchNormApplyArgs args{axis, &mr, &ir, pointer(g), pointer(b)};
    const cuda::Workspace ws = scratch(workspace, x, f);
    run_without_gil([&] { cuda::batch_norm_apply(xr, yr, args, ws, target(x)); });
  }

  static void batch_norm_backward_reduce(const Operand& g, const Operand& x, const Operand& mean,
                                         const Operand& invstd, const Operand& sum_dy,
                                         const Operand& sum_dy_xhat,
                                         const std::optional<Operand>& workspace, int axis) {
    const char* f = "batch_norm_backward_reduce";
    const Ref gr = ref(g, f, "grad_output"), xr = ref(x, f, "x");
    const Ref mr = ref(mean, f, "mean"), ir = ref(invstd, f, "invstd");
    const Ref s1 = ref(sum_dy, f, "sum_dy"), s2 = ref(sum_dy_xhat, f, "sum_dy_xhat");
    const cuda::BatchNormReduceArgs args{axis, &mr, &ir, &s1, &s2};
    const cuda::Workspace ws = scratch(workspace, x, f);
    run_without_gil([&] { cuda::batch_norm_backward_reduce(gr, xr, args, ws, target(x)); });
  }

  static void batch_norm_backward_apply(const Operand& g, const Operand& x,
                                        const Operand& grad_input, const Operand& mean,
                                        const Operand& invstd, const Operand* gamma,
                                        const Operand& sum_dy, const Operand& sum_dy_xhat,
                                        double count, const std::optional<Operand>& workspace,
                                        int axis) {
    const char* f = "batch_norm_backward_apply";
    const Ref gr = ref(g, f, "grad_output"), xr = ref(x, f, "x");
    const Ref dr = ref(grad_input, f, "grad_input");
    const Ref mr = ref(mean, f, "mean"), ir = ref(invstd, f, "invstd");
    const Ref s1 = ref(sum_dy, f, "sum_dy"), s2 = ref(sum_dy_xhat, f, "sum_dy_xhat");
    const auto w = optional_ref(gamma, f, "gamma");
    const cuda::BatchNormBackwardApplyArgs args{axis, count, &mr, &ir, pointer(w), &s1, &s2};
    const cuda::Workspace ws = scratch(workspace, x, f);
    run_without_gil([&] { cuda::batch_norm_backward_apply(gr, xr, dr, args, ws, target(x)); });
  }

  static void dropout_apply(const DropoutSpec& spec, const Operand& x, const Operand& y) {
    const Ref xr = ref(x, "dropout", "x"), yr = ref(y, "dropout", "out");
    run_without_gil([&] { cuda::dropout_apply(spec, xr, yr, target(x)); });
  }

  static void dropout_mask(const DropoutSpec& spec, int64_t n, const Operand& mask) {
    run_without_gil([&] { cuda::dropout_mask(spec, n, target(mask)); });
  }

  static void bias_act_dropout_forward(Activation act, const ActivationParams& p,
                                       const DropoutSpec& spec, const Operand& h,
                                       const Operand& bias, int axis, const Operand& out) {
    const char* f = "bias_act_dropout_forward";
    const Ref hr = ref(h, f, "h"), br = ref(bias, f, "bias"), orf = ref(out, f, "out");
    run_without_gil([&] {
      cuda::bias_act_dropout_forward(act, p, spec, hr, br, axis, orf, target(h));
    });
  }

  static int64_t bias_grad_workspace_bytes(const std::vector<int64_t>& shape, int axis) {
    return cuda::bias_grad_workspace(static_cast<int>(shape.size()), shape.data(), axis) *
           static_cast<int64_t>(sizeof(double));
  }

  // grad_h, then grad_bias reduced from it (two launches on one stream).
  static void bias_act_dropout_backward(Activation act, const ActivationParams& p,
                                        const DropoutSpec& spec, const Operand& g,
                                        const Operand& h, const Operand& bias, int axis,
                                        const Operand& grad_h, const Operand& grad_bias,
                                        const std::optional<Operand>& workspace) {
    const char* f = "bias_act_dropout_backward";
    const Ref gr = ref(g, f, "grad_output"), hr = ref(h, f, "h"), br = ref(bias, f, "bias");
    const Ref ghr = ref(grad_h, f, "grad_h"), gbr = ref(grad_bias, f, "grad_bias");
    const cuda::Workspace ws = scratch(workspace, h, f);
    const int64_t partials = ws.bytes / static_cast<int64_t>(sizeof(double));
    run_without_gil([&] {
      cuda::bias_act_dropout_backward(act, p, spec, gr, hr, br, axis, ghr, target(h));
      cuda::bias_grad(ghr, axis, gbr, static_cast<double*>(ws.data), partials, target(h));
    });
  }

 private:
  static std::optional<Ref> optional_ref(const Operand* a, const char* function,
                                         const char* name) {
    if (a == nullptr) return std::nullopt;
    return ref(*a, function, name);
  }

  static const Ref* pointer(const std::optional<Ref>& r) { return r ? &*r : nullptr; }

  static cuda::Workspace scratch(const std::optional<Operand>& workspace, const Operand& like,
                                 const char* function) {
    if (!workspace) return cuda::Workspace{nullptr, 0};
    if (workspace->device != like.device)
      throw py::value_error(std::string(function) + ": workspace is on another device");
    return cuda::Workspace{workspace->data,
                           workspace->size() * code_itemsize(workspace->dtype)};
  }
};

}  // namespace bindings
}  // namespace fusednn
