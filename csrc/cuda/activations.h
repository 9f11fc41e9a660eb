// Host launchers of the CUDA activation kernels. Arguments are validated by
// the Python layer (same shape and dtype, out writable and on the same
// device); the launchers enqueue on target.stream and return without
// waiting. CUDA errors throw std::runtime_error, unsupported layouts
// std::invalid_argument.
#pragma once

#include "cuda/array.h"
#include "fusednn/activations.h"

namespace fusednn {
namespace cuda {

// y = f(x)                       x, y: same shape
void activation_forward(Activation act, const ActivationParams& p, const DeviceArrayRef& x,
                        const DeviceArrayRef& y, const LaunchTarget& target);

// grad_input = grad_output * f'(.), from the forward output y when
// from_output, else from the forward input x (`saved`).
void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                         const DeviceArrayRef& grad_output, const DeviceArrayRef& saved,
                         const DeviceArrayRef& grad_input, const LaunchTarget& target);

}  // namespace cuda
}  // namespace fusednn
