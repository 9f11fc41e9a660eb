// Entry points of the CPU batch-normalization kernels (one build per ISA).
// Every array is viewed as (outer, C, inner) around the channel axis; the
// per-channel arrays are 1-D of length C. The Python layer has validated
// shapes, dtypes and writability before these are called, and guarantees
// that x and grad_output merge into a strided (outer, C, inner) view.
#pragma once

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
};

}  // namespace cpu
}  // namespace fusednn

#define FUSEDNN_BATCHNORM_DECLS                                                       \
  void batch_norm_forward(const ArrayRef& x, const ArrayRef& y,                       \
                          const BatchNormForwardArgs& args);                          \
  void batch_norm_backward(const ArrayRef& grad_output, const ArrayRef& x,            \
                           const ArrayRef& grad_input, const BatchNormBackwardArgs& args);

FUSEDNN_DECLARE_FOR_EACH_ISA(FUSEDNN_BATCHNORM_DECLS)
