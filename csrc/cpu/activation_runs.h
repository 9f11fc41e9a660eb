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

// out[k] = finish(k, act(z(k))) for k in [0, m); kStream as in write_run.
template <class Op, bool kStream = false, class T, class Input, class Finish>
inline void activation_run(T* out, int64_t m, const ActivationParams q, Input z, Finish finish) {
  if constexpr (std::is_same_v<T, float> && HasForwardCore<Op>::value) {
    const auto core = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return finish(k, Op::forward_core_f32(z(k), q));
    };
    const auto full = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return finish(k, Op::template forward<T>(z(k), q));
    };
    run_core_blocks<kStream>(out, m, Op::kForwardCoreBound, z, core, full);
  } else {
    write_run<kStream>(out, m, [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return finish(k, Op::template forward<T>(z(k), q));
    });
  }
}

// out[k] = dy(k) act'(z(k)) for k in [0, m), the derivative formed from x;
// kStream as in write_run.
template <class Op, bool kStream = false, class T, class Input, class Grad>
inline void activation_backward_run(T* out, int64_t m, const ActivationParams q, Input z,
                                    Grad dy) {
  if constexpr (std::is_same_v<T, float> && HasBackwardCore<Op>::value) {
    const auto core = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return Op::backward_core_f32(dy(k), z(k), q);
    };
    const auto full = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return Op::template backward_x<T>(dy(k), z(k), q);
    };
    run_core_blocks<kStream>(out, m, Op::kBackwardCoreBound, z, core, full);
  } else {
    write_run<kStream>(out, m, [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return Op::template backward_x<T>(dy(k), z(k), q);
    });
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
