// Contiguous runs of an activation, forward and backward, shared by the
// activation kernels and the fused bias+activation+dropout kernels. Where
// the activation has a float32 core evaluation (HasForwardCore,
// HasBackwardCore), run_core_blocks takes it for the blocks inside its
// core range; otherwise one vectorized loop calls forward or backward_x.
// Compiled once per ISA, like elementwise.h.
#pragma once

#include <type_traits>

#include "cpu/elementwise.h"
#include "fusednn/activations.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// Nanoseconds per float32 element of each activation's forward and backward
// (from x) on one core with its data in L1, measured on the bench's
// machine; slice_count splits a call by them. Only their ratios matter much:
// they tell a relu from a gelu.
struct ActivationCost {
  double forward, backward;
};
inline ActivationCost activation_cost(Activation act) {
  static constexpr ActivationCost kCosts[] = {
      {0.47, 0.69},  // sigmoid
      {0.56, 0.77},  // tanh
      {0.13, 0.27},  // relu
      {0.20, 0.48},  // leaky_relu
      {0.42, 0.62},  // elu
      {0.42, 0.54},  // selu
      {0.75, 1.10},  // gelu
      {0.49, 0.97},  // silu
      {0.79, 0.76},  // softplus
      {0.91, 1.45},  // mish
      {0.22, 0.40},  // hardsigmoid
      {0.20, 0.45},  // hardswish
      {0.10, 0.32},  // hardtanh
  };
  static_assert(sizeof kCosts / sizeof kCosts[0] == int(Activation::count),
                "one cost per activation");
  return kCosts[int(act)];
}

// The cost of an element of T where float32 costs `ns`: a vector holds
// half as many doubles.
template <class T> constexpr double cost_of(double ns) { return ns * sizeof(T) / sizeof(float); }

// out[k] = finish(k, act(z(k))) for k in [0, m). With kLines, a line at a
// time (write_lines), streamed where `stream` is set; otherwise in single
// vectorized loops.
template <class Op, bool kLines = false, class T, class Input, class Finish>
inline void activation_run(T* out, int64_t m, const ActivationParams q, Input z, Finish finish,
                           bool stream = kLines) {
  const auto value = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
    return finish(k, Op::template forward<T>(z(k), q));
  };
  if constexpr (std::is_same_v<T, float> && HasForwardCore<Op>::value) {
    const auto core = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return finish(k, Op::forward_core_f32(z(k), q));
    };
    run_core_blocks<kLines>(out, m, Op::kForwardCoreBound, z, core, value, stream);
  } else if constexpr (kLines) {
    write_lines(out, m, stream, value);
  } else {
    write_run<false>(out, m, value);
  }
}

// out[k] = dy(k) act'(z(k)) for k in [0, m), the derivative formed from x;
// kLines and stream as in activation_run.
template <class Op, bool kLines = false, class T, class Input, class Grad>
inline void activation_backward_run(T* out, int64_t m, const ActivationParams q, Input z,
                                    Grad dy, bool stream = kLines) {
  const auto value = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
    return Op::template backward_x<T>(dy(k), z(k), q);
  };
  if constexpr (std::is_same_v<T, float> && HasBackwardCore<Op>::value) {
    const auto core = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return Op::backward_core_f32(dy(k), z(k), q);
    };
    run_core_blocks<kLines>(out, m, Op::kBackwardCoreBound, z, core, value, stream);
  } else if constexpr (kLines) {
    write_lines(out, m, stream, value);
  } else {
    write_run<false>(out, m, value);
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
