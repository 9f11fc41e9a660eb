// The per-activation part of the CPU activation kernels: the vectorized
// arithmetic of contiguous runs, y = f(x) and grad_input = g * f'(.), for
// the activations a file names with FUSEDNN_ACTIVATION_KERNELS (at the
// end), and their entry points, which hand it to the loops shared by all
// activations (cpu/activation_kernels.h). The math is
// fusednn/activations.h. Compiled once per ISA into namespace FUSEDNN_ISA.
#pragma once

#include <stdexcept>
#include <type_traits>

#include "cpu/activation_kernels.h"
#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// An activation's arithmetic, once per compute type; all else is the
// loops of activations.cpp, once per storage type, which call these
// through pointers: the contiguous runs of the float32 and float64
// kernels, streamed or not, the half-precision kernels' blocks and the
// strided runs of every dtype. Inlined into each kernel, an activation's
// vectorized loops were compiled again for float16 and for bfloat16, for
// strided runs, and for streamed and cached outputs of each, and the loop
// drivers once per activation: most of the activations' code. A call per
// run or per block costs little beside the block's arithmetic.
template <class Op, class T>
__attribute__((noinline)) void forward_block(T* o, const T* x, int64_t n, const ActivationParams q,
                                             bool stream) {
  const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return x[i]; };
  const auto as_is = [](int64_t, T v) FUSEDNN_INLINE_LAMBDA { return v; };
  activation_run<Op, true>(o, n, q, input, as_is, stream);
}

template <class Op, class T, bool kFromOutput>
__attribute__((noinline)) void backward_block(T* o, const T* gs, const T* vs, int64_t n,
                                              const ActivationParams q, bool stream) {
  if constexpr (kFromOutput) {
    write_lines(o, n, stream, [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
      return Op::template backward_y<T>(gs[i], vs[i], q);
    });
  } else {
    const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return vs[i]; };
    const auto grad_at = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return gs[i]; };
    activation_backward_run<Op, true>(o, n, q, input, grad_at, stream);
  }
}

template <class Op>
void activation_forward_op(const ActivationParams& params, double ns, const ArrayRef& x,
                           const ArrayRef& y) {
  visit_storage(x.dtype, [&](auto stored) {
    using S = decltype(stored);
    forward_loops<S>(params, ns, x, y, &forward_block<Op, ComputeOf<S>>);
  });
}

template <class Op>
void activation_backward_op(const ActivationParams& params, double ns, bool from_output,
                            const ArrayRef& grad_output, const ArrayRef& saved,
                            const ArrayRef& grad_input) {
  const auto run = [&](auto from_y) {
    visit_storage(grad_output.dtype, [&](auto stored) {
      using S = decltype(stored);
      backward_loops<S>(params, ns, grad_output, saved, grad_input,
                        &backward_block<Op, ComputeOf<S>, decltype(from_y)::value>);
    });
  };
  if constexpr (Op::kBackwardFromY) {
    if (from_output) {
      run(std::true_type{});
      return;
    }
  } else if (from_output) {
    throw std::invalid_argument("this activation's derivative needs x, not y");
  }
  run(std::false_type{});
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn

// Compiles an activation's kernels into the including file (one of the
// activations_*.cpp files, inside no namespace).
#define FUSEDNN_ACTIVATION_KERNELS(Op)                                                       \
  namespace fusednn { namespace cpu { namespace FUSEDNN_ISA {                               \
  template void activation_forward_op<Op>(const ActivationParams&, double, const ArrayRef&,  \
                                          const ArrayRef&);                                 \
  template void activation_backward_op<Op>(const ActivationParams&, double, bool,            \
                                           const ArrayRef&, const ArrayRef&,                \
                                           const ArrayRef&);                                \
  } } }
