// Host launchers of the CUDA dropout kernels: inverted dropout with the
// Philox mask of fusednn/philox.h, its backward, the mask alone, and the
// fused epilogue o = mask * act(h + bias) / keep with its backward and the
// deterministic grad_bias reduction. Arguments are validated by the Python
// layer (shapes, dtypes, devices, mask sizes); the launchers enqueue on
// target.stream and return without waiting. CUDA errors throw
// std::runtime_error, unsupported layouts std::invalid_argument.
#pragma once

#include <cstdint>

#include "cuda/array.h"
#include "fusednn/activations.h"

namespace fusednn {
namespace cuda {

// Where the keep decisions come from, and where they go, as on the CPU:
// with mask_in set they are read from that bit-packed device mask (bit
// i % 8 of byte i / 8); otherwise they are drawn from (seed, offset) with
// `threshold` (philox::dropout_threshold(keep)), and also written,
// bit-packed, to mask_out when it is set ((n + 7) / 8 bytes, bits past n
// zero).
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

// y = x * keep_i * scale                      x, y: same shape, any strides
void dropout_apply(const DropoutSpec& spec, const DeviceArrayRef& x, const DeviceArrayRef& y,
                   const LaunchTarget& target);

// Writes the bit-packed mask of n elements to spec.mask_out.
void dropout_mask(const DropoutSpec& spec, int64_t n, const LaunchTarget& target);

// out = keep_i * scale * act(h + bias[c]), c the index along `axis` of h;
// bias is 1-d of length h.shape[axis].
void bias_act_dropout_forward(Activation act, const ActivationParams& p, const DropoutSpec& spec,
                              const DeviceArrayRef& h, const DeviceArrayRef& bias, int axis,
                              const DeviceArrayRef& out, const LaunchTarget& target);

// grad_h = act'(h + bias[c]) * grad_output * keep_i * scale.
void bias_act_dropout_backward(Activation act, const ActivationParams& p,
                               const DropoutSpec& spec, const DeviceArrayRef& grad_output,
                               const DeviceArrayRef& h, const DeviceArrayRef& bias, int axis,
                               const DeviceArrayRef& grad_h, const LaunchTarget& target);

// float64 partial sums bias_grad needs for a C-contiguous grad_h of `shape`
// reduced over every axis but `axis`; a function of the shape alone.
int64_t bias_grad_workspace(int ndim, const int64_t* shape, int axis);

// grad_bias[c] = sum of grad_h over every axis but `axis`, accumulated in
// float64 in an order fixed by the shape (never by the grid or the device),
// so every run gives the same bits. grad_h is C-contiguous; workspace holds
// bias_grad_workspace(...) doubles of device memory.
void bias_grad(const DeviceArrayRef& grad_h, int axis, const DeviceArrayRef& grad_bias,
               double* workspace, int64_t workspace_size, const LaunchTarget& target);

}  // namespace cuda
}  // namespace fusednn
