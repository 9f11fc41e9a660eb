// The CPU adapter behind the shared bindings: Operands in host memory
// become cpu::ArrayRef views, and each kernel runs on the ISA picked at
// import (FUSEDNN_ISA_SELECT) with the GIL released. The launch fields of
// an Operand (device, stream) have no meaning here; scratch buffers are
// never needed (workspace sizes are 0).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "bindings/operand.h"
#include "bindings/without_gil.h"
#include "cpu/activations.h"
#include "cpu/batchnorm.h"
#include "cpu/dropout.h"

namespace fusednn {
namespace bindings {

struct Backend {
  using Ref = cpu::ArrayRef;
  using DropoutSpec = cpu::DropoutSpec;

  // A float array the CPU kernels take (float16 and bfloat16 stored, computed
  // in float32); the Python layer has refused everything else already.
  static Ref ref(const Operand& a, const char* function, const char* name) {
    if (a.device != -1)
      throw py::value_error(operand_error(function, name, "is in device memory; the CPU "
                                                          "module takes host arrays"));
    if (a.dtype == DTypeCode::uint8)
      throw py::type_error(operand_error(function, name, "has dtype uint8; the CPU kernels "
                                                         "take float32, float64, float16 and "
                                                         "bfloat16"));
    return a.ref<Ref>();
  }

  static void activation_forward(Activation act, const ActivationParams& p, const Operand& x,
                                 const Operand& y) {
    const Ref xr = ref(x, "activation_forward", "x"), yr = ref(y, "activation_forward", "out");
    run_without_gil([&] { FUSEDNN_ISA_SELECT(activation_forward)(act, p, xr, yr); });
  }

  static void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                                  const Operand& g, const Operand& saved, const Operand& out) {
    const char* f = "activation_backward";
    const Ref gr = ref(g, f, "grad_output"), sr = ref(saved, f, "saved"), orf = ref(out, f, "out");
    run_without_gil([&] {
      FUSEDNN_ISA_SELECT(activation_backward)(act, p, from_output, gr, sr, orf);
    });
  }

  static int64_t batch_norm_workspace_bytes(const std::vector<int64_t>&, int, int) { return 0; }

  static void batch_norm_forward(const Operand& x, const Operand& y, const Operand* gamma,
                                 const Operand* beta, const Operand* running_mean,
                                 const Operand* running_var, const Operand& save_mean,
                                 const Operand& save_invstd, const std::optional<Operand>&,
                                 bool training, double momentum, double eps, int axis,
                                 bool relu) {
    const char* f = "batch_norm_forward";
    const Ref xr = ref(x, f, "x"), yr = ref(y, f, "out");
    const Ref sm = ref(save_mean, f, "save_mean");
    const Ref si = ref(save_invstd, f, "save_invstd");
    const auto g = optional_ref(gamma, f, "gamma"), b = optional_ref(beta, f, "beta");
    const auto rm = optional_ref(running_mean, f, "running_mean");
    const auto rv = optional_ref(running_var, f, "running_var");
    const cpu::BatchNormForwardArgs args{axis,        training,    momentum,    eps, pointer(g),
                                         pointer(b),  pointer(rm), pointer(rv), &sm, &si,
                                         relu};
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_forward)(xr, yr, args); });
  }

  static void batch_norm_backward(const Operand& g, const Operand& x, const Operand& grad_input,
                                  const Operand* gamma, const Operand& save_mean,
                                  const Operand& save_invstd, const Operand& grad_gamma,
                                  const Operand& grad_beta, const std::optional<Operand>&,
                                  int axis, bool training, const Operand* relu_output) {
    const char* f = "batch_norm_backward";
    const Ref gr = ref(g, f, "grad_output"), xr = ref(x, f, "x");
    const Ref dr = ref(grad_input, f, "grad_input");
    const Ref sm = ref(save_mean, f, "save_mean");
    const Ref si = ref(save_invstd, f, "save_invstd");
    const Ref gg = ref(grad_gamma, f, "grad_gamma"), gb = ref(grad_beta, f, "grad_beta");
    const auto w = optional_ref(gamma, f, "gamma");
    const auto ro = optional_ref(relu_output, f, "relu_output");
    const cpu::BatchNormBackwardArgs args{axis, training, pointer(w), &sm, &si,
                                          &gg,  &gb,      pointer(ro)};
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_backward)(gr, xr, dr, args); });
  }

  static void batch_norm_stats(const Operand& x, const Operand& mean, const Operand& m2,
                               const std::optional<Operand>&, int axis) {
    const char* f = "batch_norm_stats";
    const Ref xr = ref(x, f, "x"), mr = ref(mean, f, "mean"), m2r = ref(m2, f, "m2");
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_stats)(xr, axis, mr, m2r); });
  }

  static int64_t batch_norm_combine_workspace_bytes(int64_t) { return 0; }

  static void batch_norm_combine(const std::vector<double>& counts, const Operand& means,
                                 const Operand& m2s, const Operand& mean, const Operand& var,
                                 const std::optional<Operand>&) {
    const char* f = "batch_norm_combine";
    const Ref msr = ref(means, f, "means"), m2r = ref(m2s, f, "m2s");
    const Ref mr = ref(mean, f, "mean"), vr = ref(var, f, "var");
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_combine)(counts, msr, m2r, mr, vr); });
  }

  static void batch_norm_finalize(const Operand& mean, const Operand& var, const Operand& invstd,
                                  const Operand* running_mean, const Operand* running_var,
                                  double count, double eps, double momentum) {
    const char* f = "batch_norm_finalize";
    const Ref mr = ref(mean, f, "mean"), vr = ref(var, f, "var");
    const Ref ir = ref(invstd, f, "invstd");
    const auto rm = optional_ref(running_mean, f, "running_mean");
    const auto rv = optional_ref(running_var, f, "running_var");
    const cpu::BatchNormFinalizeArgs args{count, eps, momentum, &mr, &vr, &ir, pointer(rm),
                                          pointer(rv)};
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_finalize)(args); });
  }

  static void batch_norm_apply(const Operand& x, const Operand& y, const Operand& mean,
                               const Operand& invstd, const Operand* gamma, const Operand* beta,
                               const std::optional<Operand>&, int axis) {
    const char* f = "batch_norm_apply";
    const Ref xr = ref(x, f, "x"), yr = ref(y, f, "out");
    const Ref mr = ref(mean, f, "mean"), ir = ref(invstd, f, "invstd");
    const auto g = optional_ref(gamma, f, "gamma"), b = optional_ref(beta, f, "beta");
    const cpu::BatchNormApplyArgs args{axis, &mr, &ir, pointer(g), pointer(b)};
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_apply)(xr, yr, args); });
  }

  static void batch_norm_backward_reduce(const Operand& g, const Operand& x, const Operand& mean,
                                         const Operand& invstd, const Operand& sum_dy,
                                         const Operand& sum_dy_xhat,
                                         const std::optional<Operand>&, int axis) {
    const char* f = "batch_norm_backward_reduce";
    const Ref gr = ref(g, f, "grad_output"), xr = ref(x, f, "x");
    const Ref mr = ref(mean, f, "mean"), ir = ref(invstd, f, "invstd");
    const Ref s1 = ref(sum_dy, f, "sum_dy"), s2 = ref(sum_dy_xhat, f, "sum_dy_xhat");
    const cpu::BatchNormReduceArgs args{axis, &mr, &ir, &s1, &s2};
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_backward_reduce)(gr, xr, args); });
  }

  static void batch_norm_backward_apply(const Operand& g, const Operand& x,
                                        const Operand& grad_input, const Operand& mean,
                                        const Operand& invstd, const Operand* gamma,
                                        const Operand& sum_dy, const Operand& sum_dy_xhat,
                                        double count, const std::optional<Operand>&, int axis) {
    const char* f = "batch_norm_backward_apply";
    const Ref gr = ref(g, f, "grad_output"), xr = ref(x, f, "x");
    const Ref dr = ref(grad_input, f, "grad_input");
    const Ref mr = ref(mean, f, "mean"), ir = ref(invstd, f, "invstd");
    const Ref s1 = ref(sum_dy, f, "sum_dy"), s2 = ref(sum_dy_xhat, f, "sum_dy_xhat");
    const auto w = optional_ref(gamma, f, "gamma");
    const cpu::BatchNormBackwardApplyArgs args{axis, count, &mr, &ir, pointer(w), &s1, &s2};
    run_without_gil([&] { FUSEDNN_ISA_SELECT(batch_norm_backward_apply)(gr, xr, dr, args); });
  }

  static void dropout_apply(const DropoutSpec& spec, const Operand& x, const Operand& y) {
    const Ref xr = ref(x, "dropout", "x"), yr = ref(y, "dropout", "out");
    run_without_gil([&] { FUSEDNN_ISA_SELECT(dropout_apply)(spec, xr, yr); });
  }

  static void dropout_mask(const DropoutSpec& spec, int64_t n, const Operand&) {
    run_without_gil([&] { FUSEDNN_ISA_SELECT(dropout_mask)(spec, n); });
  }

  static void bias_act_dropout_forward(Activation act, const ActivationParams& p,
                                       const DropoutSpec& spec, const Operand& h,
                                       const Operand& bias, int axis, const Operand& out) {
    const char* f = "bias_act_dropout_forward";
    const Ref hr = ref(h, f, "h"), orf = ref(out, f, "out");
    const Operand view = broadcast_bias(bias, h, axis);
    const Ref br = ref(view, f, "bias");
    run_without_gil([&] {
      FUSEDNN_ISA_SELECT(bias_act_dropout_forward)(act, p, spec, hr, br, orf);
    });
  }

  static int64_t bias_grad_workspace_bytes(const std::vector<int64_t>&, int) { return 0; }

  // grad_h and, reduced from it in the same pass, grad_bias.
  static void bias_act_dropout_backward(Activation act, const ActivationParams& p,
                                        const DropoutSpec& spec, const Operand& g,
                                        const Operand& h, const Operand& bias, int axis,
                                        const Operand& grad_h, const Operand& grad_bias,
                                        const std::optional<Operand>&) {
    const char* f = "bias_act_dropout_backward";
    const Ref gr = ref(g, f, "grad_output"), hr = ref(h, f, "h");
    const Ref ghr = ref(grad_h, f, "grad_h"), gbr = ref(grad_bias, f, "grad_bias");
    const Operand view = broadcast_bias(bias, h, axis);
    const Ref br = ref(view, f, "bias");
    run_without_gil([&] {
      FUSEDNN_ISA_SELECT(bias_act_dropout_backward)(act, p, spec, gr, hr, br, ghr, axis, gbr);
    });
  }

 private:
  static std::optional<Ref> optional_ref(const Operand* a, const char* function,
                                         const char* name) {
    if (a == nullptr) return std::nullopt;
    return ref(*a, function, name);
  }

  static const Ref* pointer(const std::optional<Ref>& r) { return r ? &*r : nullptr; }

  // The CPU loops read bias as an array of h's shape: stride 0 along every
  // axis but `axis`, where it steps through the 1-d bias.
  static Operand broadcast_bias(const Operand& bias, const Operand& h, int axis) {
    Operand view = bias;
    view.shape = h.shape;
    view.strides.assign(h.shape.size(), 0);
    view.strides[static_cast<size_t>(axis)] = bias.strides[0];
    return view;
  }
};

}  // namespace bindings
}  // namespace fusednn
