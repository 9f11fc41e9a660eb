// Entry points of the CPU batch-normalization kernels (one build per ISA).
// Every array is viewed as (outer, C, inner) around the channel axis; the
// per-channel arrays are 1-D of length C. The Python layer has validated
// shapes, dtypes and writability before these are called, and guarantees
// that x and grad_output merge into a strided (outer, C, inner) view.
// x may be float32, float64, float16 or bfloat16 (the half types computed
// in float32); a per-channel array may have any of these dtypes whatever
// x's (for half x the Python layer passes float32 statistics and
// gradients, and float32 or x's dtype for gamma and beta): each is read as
// doubles and written rounded once to its own dtype.
#pragma once

#include <vector>

#include "cpu/array.h"
#include "cpu/isa.h"

namespace fusednn {
namespace cpu {

struct BatchNormForwardArgs {
  int axis;
  bool training;
  double momentum;
  double eps;
  const ArrayRef* gamma;         // (C,) of x's dtype, or null for ones
  const ArrayRef* beta;          // (C,) of x's dtype, or null for zeros
  const ArrayRef* running_mean;  // (C,) float32/float64 or null; read in
  const ArrayRef* running_var;   // inference, updated in place in training
  const ArrayRef* save_mean;     // (C,) output, x's dtype
  const ArrayRef* save_invstd;   // (C,) output, x's dtype
  bool relu;                     // y = relu(batch_norm(x)), in the same pass
};

struct BatchNormBackwardArgs {
  int axis;
  // false: the backward of inference (save_mean, save_invstd are the
  // running statistics, constants): grad_input = gamma * invstd * dy.
  bool training;
  const ArrayRef* gamma;        // (C,) of x's dtype, or null for ones
  const ArrayRef* save_mean;    // (C,) float32/float64
  const ArrayRef* save_invstd;  // (C,) float32/float64
  const ArrayRef* grad_gamma;   // (C,) output, x's dtype
  const ArrayRef* grad_beta;    // (C,) output, x's dtype
  // The output y of a forward with a fused ReLU (x's shape and dtype), or
  // null: dy is masked by y > 0 inside the passes that read it.
  const ArrayRef* relu_output;
};

// The split phases of data-parallel batch normalization: each process
// reduces its own slice (batch_norm_stats, batch_norm_backward_reduce), the
// per-process results are exchanged and merged (batch_norm_combine, or an
// all-reduce of the backward sums), and each process writes its slice with
// the whole batch's statistics (batch_norm_apply, batch_norm_backward_apply).
// Per-channel results are float64.
struct BatchNormApplyArgs {
  int axis;
  const ArrayRef* mean;    // (C,) float32/float64
  const ArrayRef* invstd;  // (C,) float32/float64
  const ArrayRef* gamma;   // (C,) of x's dtype, or null for ones
  const ArrayRef* beta;    // (C,) of x's dtype, or null for zeros
};

struct BatchNormFinalizeArgs {
  double count;               // elements per channel of the whole batch
  double eps;
  double momentum;
  const ArrayRef* mean;          // (C,) the whole batch's
  const ArrayRef* var;           // (C,) the whole batch's biased variance
  const ArrayRef* invstd;        // (C,) output: 1 / sqrt(var + eps)
  const ArrayRef* running_mean;  // (C,) or null, updated in place
  const ArrayRef* running_var;   // (C,) or null, updated in place (unbiased)
};

struct BatchNormReduceArgs {
  int axis;
  const ArrayRef* mean;         // (C,) float32/float64
  const ArrayRef* invstd;       // (C,) float32/float64
  const ArrayRef* sum_dy;       // (C,) float64 output
  const ArrayRef* sum_dy_xhat;  // (C,) float64 output
};

struct BatchNormBackwardApplyArgs {
  int axis;
  double count;                 // elements per channel of the whole batch
  const ArrayRef* mean;         // (C,) float32/float64
  const ArrayRef* invstd;       // (C,) float32/float64
  const ArrayRef* gamma;        // (C,) of x's dtype, or null for ones
  const ArrayRef* sum_dy;       // (C,) float32/float64, over the whole batch
  const ArrayRef* sum_dy_xhat;  // (C,) float32/float64, over the whole batch
};

}  // namespace cpu
}  // namespace fusednn

#define FUSEDNN_BATCHNORM_DECLS                                                       \
  void batch_norm_forward(const ArrayRef& x, const ArrayRef& y,                       \
                          const BatchNormForwardArgs& args);                          \
  void batch_norm_backward(const ArrayRef& grad_output, const ArrayRef& x,            \
                           const ArrayRef& grad_input, const BatchNormBackwardArgs& args);   \
  void batch_norm_stats(const ArrayRef& x, int axis, const ArrayRef& mean, const ArrayRef& m2);  \
  void batch_norm_combine(const std::vector<double>& counts, const ArrayRef& means,             \
                          const ArrayRef& m2s, const ArrayRef& mean, const ArrayRef& var);      \
  void batch_norm_finalize(const BatchNormFinalizeArgs& args);                                  \
  void batch_norm_apply(const ArrayRef& x, const ArrayRef& y, const BatchNormApplyArgs& args);  \
  void batch_norm_backward_reduce(const ArrayRef& grad_output, const ArrayRef& x,               \
                                  const BatchNormReduceArgs& args);                             \
  void batch_norm_backward_apply(const ArrayRef& grad_output, const ArrayRef& x,                \
                                 const ArrayRef& grad_input,                                    \
                                 const BatchNormBackwardApplyArgs& args);

FUSEDNN_DECLARE_FOR_EACH_ISA(FUSEDNN_BATCHNORM_DECLS)
