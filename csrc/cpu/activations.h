// Entry points of the CPU activation kernels (one build per ISA). Inputs
// are validated by the Python layer before these are called: same shapes,
// same dtype, writable output.
#pragma once

#include "cpu/array.h"
#include "cpu/isa.h"
#include "fusednn/activations.h"

#define FUSEDNN_ACTIVATION_DECLS                                                        \
  void activation_forward(::fusednn::Activation act, const ::fusednn::ActivationParams& p, \
                          const ArrayRef& x, const ArrayRef& y);                        \
  void activation_backward(::fusednn::Activation act, const ::fusednn::ActivationParams& p, \
                           bool from_output, const ArrayRef& grad_output,               \
                           const ArrayRef& saved, const ArrayRef& grad_input);          \
  /* dst = src; between float32 and float16/bfloat16 it converts, rounding */ \
  /* to nearest even, and is otherwise a plain copy of one dtype. */          \
  void copy(const ArrayRef& src, const ArrayRef& dst);

FUSEDNN_DECLARE_FOR_EACH_ISA(FUSEDNN_ACTIVATION_DECLS)
