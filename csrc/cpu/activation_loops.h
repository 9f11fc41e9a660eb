// The loops of the CPU activation kernels, y = f(x) and grad_input =
// g * f'(.) over arrays of any shape and strides, for the activations a
// file names with FUSEDNN_ACTIVATION_KERNELS (at the end).
// The math is fusednn/activations.h; this file only decides how to loop
// (vectorized contiguous runs, strided fallback, threads, streaming
// stores). float16 and bfloat16 run the float32 arithmetic on blocks
// widened to float32 and round each result once (cpu/half_convert.h).
// Compiled once per ISA into namespace FUSEDNN_ISA.
#pragma once

#include <stdexcept>
#include <type_traits>

#include "cpu/activation_kernels.h"
#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"
#include "cpu/half_convert.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// Out of line, once per activation and compute type: the contiguous runs
// of the float32 and float64 kernels, streamed or not, the half-precision
// kernels' blocks and the strided runs of every dtype share them. Inlined
// into each kernel, an activation's vectorized loops were compiled again
// for float16 and for bfloat16, for strided runs, and for streamed and
// cached outputs of each, most of the activations' code. A call per run or
// per block costs little beside the block's arithmetic.
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

// Elements per unit of a kernel's cost: a float64 vector holds half as
// many elements as a float32 one; the half types compute in float32 and
// their conversions are cheap.
template <class S> constexpr double storage_cost(double ns) {
  return cost_of<typename Storage<S>::Compute>(ns);
}

// y = f(x) for storage type S.
template <class Op, class S>
void forward_typed(const ActivationParams& params, double ns_per_element, const ArrayRef& x,
                   const ArrayRef& y) {
  const int64_t* strides[2] = {x.strides, y.strides};
  const int sizes[2] = {int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<2> loop(x.ndim, x.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(S)) >= kStreamBytes;
  char* base[2] = {static_cast<char*>(x.data), static_cast<char*>(y.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const S* in = reinterpret_cast<const S*>(ptr[0]);
      S* out = reinterpret_cast<S*>(ptr[1]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1) {
        produce_lines(out, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
          constexpr bool kStream = decltype(streamed)::value;
          const S* src = in + start;
          if constexpr (std::is_floating_point_v<S>) {
            forward_block<Op, S>(dst, src, count, local, kStream);
          } else {
            half_forward_run<S, kStream>(dst, count, src, &forward_block<Op, float>, local);
          }
        });
      } else {
        strided_forward_run<S>(in, out, len, inner, &forward_block<Op, ComputeOf<S>>, local);
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, storage_cost<S>(ns_per_element), [&] { return Body{params, stream}; });
}

// grad_input = g * f'(.) for storage type S, from x or (kFromOutput) y.
template <class Op, class S, bool kFromOutput>
void backward_typed(const ActivationParams& params, double ns_per_element, const ArrayRef& g,
                    const ArrayRef& saved, const ArrayRef& gi) {
  const int64_t* strides[3] = {g.strides, saved.strides, gi.strides};
  const int sizes[3] = {int(sizeof(S)), int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<3> loop(g.ndim, g.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(S)) >= kStreamBytes;
  char* base[3] = {static_cast<char*>(g.data), static_cast<char*>(saved.data),
                   static_cast<char*>(gi.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const S* grad = reinterpret_cast<const S*>(ptr[0]);
      const S* value = reinterpret_cast<const S*>(ptr[1]);
      S* out = reinterpret_cast<S*>(ptr[2]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1 && inner[2] == 1) {
        produce_lines(out, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
          constexpr bool kStream = decltype(streamed)::value;
          const S* gs = grad + start;
          const S* vs = value + start;
          if constexpr (std::is_floating_point_v<S>) {
            backward_block<Op, S, kFromOutput>(dst, gs, vs, count, local, kStream);
          } else {
            half_backward_run<S, kStream>(dst, count, gs, vs,
                                          &backward_block<Op, float, kFromOutput>, local);
          }
        });
      } else {
        strided_backward_run<S>(grad, value, out, len, inner,
                                &backward_block<Op, ComputeOf<S>, kFromOutput>, local);
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, storage_cost<S>(ns_per_element), [&] { return Body{params, stream}; });
}

template <class Op>
void activation_forward_op(const ActivationParams& params, double ns, const ArrayRef& x,
                           const ArrayRef& y) {
  visit_storage(x.dtype, [&](auto stored) {
    forward_typed<Op, decltype(stored)>(params, ns, x, y);
  });
}

template <class Op>
void activation_backward_op(const ActivationParams& params, double ns, bool from_output,
                            const ArrayRef& grad_output, const ArrayRef& saved,
                            const ArrayRef& grad_input) {
  const auto run = [&](auto from_y) {
    visit_storage(grad_output.dtype, [&](auto stored) {
      backward_typed<Op, decltype(stored), decltype(from_y)::value>(params, ns, grad_output,
                                                                    saved, grad_input);
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
