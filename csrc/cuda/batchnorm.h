// Host launchers of the CUDA batch-normalization kernels. Every array is
// viewed as (outer, C, inner) around the channel axis; per-channel arrays
// are 1-D of length C with any stride. The Python layer has validated
// shapes, dtypes and devices, and guarantees that x and grad_output merge
// into a strided (outer, C, inner) view. The launchers enqueue on
// target.stream and return without waiting; CUDA errors throw
// std::runtime_error, unsupported arguments std::invalid_argument.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/array.h"

namespace fusednn {
namespace cuda {

// Device scratch memory the caller allocates (on the launch's stream) for
// the reduction's partial results and the per-channel coefficients.
struct Workspace {
  void* data;
  int64_t bytes;
};

struct BatchNormForwardArgs {
  int axis;
  bool training;
  double momentum;
  double eps;
  const DeviceArrayRef* gamma;         // (C,) or null for ones
  const DeviceArrayRef* beta;          // (C,) or null for zeros
  const DeviceArrayRef* running_mean;  // (C,) or null; read in inference,
  const DeviceArrayRef* running_var;   // updated in place in training
  const DeviceArrayRef* save_mean;     // (C,) output
  const DeviceArrayRef* save_invstd;   // (C,) output
  bool relu;                           // y = relu(batch_norm(x)), in the same pass
};

struct BatchNormBackwardArgs {
  int axis;
  // false: the backward of inference (save_mean, save_invstd are the
  // running statistics, constants): grad_input = gamma * invstd * dy.
  bool training;
  const DeviceArrayRef* gamma;        // (C,) or null for ones
  const DeviceArrayRef* save_mean;    // (C,)
  const DeviceArrayRef* save_invstd;  // (C,)
  const DeviceArrayRef* grad_gamma;   // (C,) output
  const DeviceArrayRef* grad_beta;    // (C,) output
  // The output y of a forward with a fused ReLU (x's shape and dtype), or
  // null: dy is masked by y > 0 inside the passes that read it.
  const DeviceArrayRef* relu_output;
};

// Bytes of workspace both launchers need for x of this dtype and view.
int64_t batch_norm_workspace_bytes(DType dtype, int64_t outer, int64_t channels, int64_t inner);

// y = (x - mean) * invstd * gamma + beta     x, y: same shape
void batch_norm_forward(const DeviceArrayRef& x, const DeviceArrayRef& y,
                        const BatchNormForwardArgs& args, const Workspace& workspace,
                        const LaunchTarget& target);

// grad_input, grad_gamma and grad_beta of training-mode batch_norm.
void batch_norm_backward(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                         const DeviceArrayRef& grad_input, const BatchNormBackwardArgs& args,
                         const Workspace& workspace, const LaunchTarget& target);

// The split phases of data-parallel batch normalization (see cpu/batchnorm.h;
// the same arguments on the device). The x-reading ones take the workspace
// of batch_norm_workspace_bytes; combine takes one of
// batch_norm_combine_workspace_bytes for the counts.
struct BatchNormApplyArgs {
  int axis;
  const DeviceArrayRef* mean;
  const DeviceArrayRef* invstd;
  const DeviceArrayRef* gamma;  // or null for ones
  const DeviceArrayRef* beta;   // or null for zeros
};

struct BatchNormFinalizeArgs {
  double count;
  double eps;
  double momentum;
  const DeviceArrayRef* mean;
  const DeviceArrayRef* var;
  const DeviceArrayRef* invstd;        // output
  const DeviceArrayRef* running_mean;  // or null, updated in place
  const DeviceArrayRef* running_var;   // or null, updated in place
};

struct BatchNormReduceArgs {
  int axis;
  const DeviceArrayRef* mean;
  const DeviceArrayRef* invstd;
  const DeviceArrayRef* sum_dy;       // float64 output
  const DeviceArrayRef* sum_dy_xhat;  // float64 output
};

struct BatchNormBackwardApplyArgs {
  int axis;
  double count;
  const DeviceArrayRef* mean;
  const DeviceArrayRef* invstd;
  const DeviceArrayRef* gamma;  // or null for ones
  const DeviceArrayRef* sum_dy;
  const DeviceArrayRef* sum_dy_xhat;
};

void batch_norm_stats(const DeviceArrayRef& x, int axis, const DeviceArrayRef& mean,
                      const DeviceArrayRef& m2, const Workspace& workspace,
                      const LaunchTarget& target);

int64_t batch_norm_combine_workspace_bytes(int64_t ranks);

void batch_norm_combine(const std::vector<double>& counts, const DeviceArrayRef& means,
                        const DeviceArrayRef& m2s, const DeviceArrayRef& mean,
                        const DeviceArrayRef& var, const Workspace& workspace,
                        const LaunchTarget& target);

void batch_norm_finalize(const BatchNormFinalizeArgs& args, const LaunchTarget& target);

void batch_norm_apply(const DeviceArrayRef& x, const DeviceArrayRef& y,
                      const BatchNormApplyArgs& args, const Workspace& workspace,
                      const LaunchTarget& target);

void batch_norm_backward_reduce(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                                const BatchNormReduceArgs& args, const Workspace& workspace,
                                const LaunchTarget& target);

void batch_norm_backward_apply(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                               const DeviceArrayRef& grad_input,
                               const BatchNormBackwardApplyArgs& args, const Workspace& workspace,
                               const LaunchTarget& target);

}  // namespace cuda
}  // namespace fusednn
