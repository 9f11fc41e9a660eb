// Entry points of the CPU dropout kernels (one build per ISA): inverted
// dropout with the Philox mask of fusednn/philox.h, its backward, the mask
// alone, and the fused epilogue o = mask * act(h + bias) / keep with its
// backward. Inputs are validated by the Python layer before these run.
#pragma once

#include <cstdint>

#include "cpu/array.h"
#include "cpu/isa.h"
#include "fusednn/activations.h"

namespace fusednn {
namespace cpu {

// Where the keep decisions come from, and where they go. With mask_in set
// the decisions are read from that bit-packed mask (bit i % 8 of byte
// i / 8); otherwise they are drawn from (seed, offset) with `threshold`
// (philox::dropout_threshold(keep)). With mask_out set the drawn decisions
// are also written there, bit-packed, (n + 7) / 8 bytes.
struct DropoutSpec {
  uint64_t seed = 0;
  uint64_t offset = 0;
  // Global index of element 0: element i takes the decision of index
  // start + i (philox::block_start); masks stay those of the call's own
  // elements, bit i for element i.
  uint64_t start = 0;
  uint64_t threshold = 0;
  double scale = 0.0;  // 1 / keep, 0 when keep = 0
  const uint8_t* mask_in = nullptr;
  uint8_t* mask_out = nullptr;
};

}  // namespace cpu
}  // namespace fusednn

#define FUSEDNN_DROPOUT_DECLS                                                                  \
  /* y = x * keep_i * scale, elementwise over x's logical C order. */                         \
  void dropout_apply(const DropoutSpec& spec, const ArrayRef& x, const ArrayRef& y);          \
  /* Writes the bit-packed mask of n elements to spec.mask_out. */                             \
  void dropout_mask(const DropoutSpec& spec, int64_t n);                                       \
  /* out = keep_i * scale * act(h + bias); bias is broadcast to h's shape. */                 \
  void bias_act_dropout_forward(::fusednn::Activation act, const ::fusednn::ActivationParams& p, \
                                const DropoutSpec& spec, const ArrayRef& h,                    \
                                const ArrayRef& bias, const ArrayRef& out);                    \
  /* grad_h = grad_output * keep_i * scale * act'(h + bias), and                             \
     grad_bias[c] = sum of grad_h over every axis but `axis`, in a fixed                      \
     order that does not depend on the thread count or the ISA; grad_h is                      \
     C-contiguous. */                                                                          \
  void bias_act_dropout_backward(::fusednn::Activation act,                                    \
                                 const ::fusednn::ActivationParams& p, const DropoutSpec& spec, \
                                 const ArrayRef& grad_output, const ArrayRef& h,               \
                                 const ArrayRef& bias, const ArrayRef& grad_h, int axis,       \
                                 const ArrayRef& grad_bias);

FUSEDNN_DECLARE_FOR_EACH_ISA(FUSEDNN_DROPOUT_DECLS)
