// Contiguous runs of an activation, forward and backward, shared by the
// activation kernels and the fused bias+activation+dropout kernels. Where
// the activation has a float32 core evaluation (HasForwardCore,
// HasBackwardCore), run_core_blocks takes it for the blocks inside its
// core range; otherwise one vectorized loop calls forward or backward_x.
// Compiled once per ISA, like elementwise.h.
#pragma once

#include <type_traits>

#include "cpu/elementwise.h"
#include "cpu/lanes.h"
#include "fusednn/activations.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// Nanoseconds per float32 element of each activation's forward and backward
// (from x) on one core with its data in L1: the slope of a call's time
// between 512 and 4096 normal inputs, so that the call's fixed cost
// cancels, on the bench's machine (2026-12-07). slice_count splits a call
// by them, against kMinElementwiseTaskNanoseconds.
struct ActivationCost {
  double forward, backward;
};
inline ActivationCost activation_cost(Activation act) {
  static constexpr ActivationCost kCosts[] = {
      {0.30, 0.34},  // sigmoid
      {0.35, 0.36},  // tanh
      {0.08, 0.17},  // relu
      {0.17, 0.27},  // leaky_relu
      {0.24, 0.29},  // elu
      {0.25, 0.33},  // selu
      {0.30, 0.75},  // gelu
      {0.31, 0.49},  // silu
      {0.44, 0.35},  // softplus
      {0.57, 0.76},  // mish
      {0.21, 0.24},  // hardsigmoid
      {0.21, 0.27},  // hardswish
      {0.10, 0.22},  // hardtanh
  };
  static_assert(sizeof kCosts / sizeof kCosts[0] == int(Activation::count),
                "one cost per activation");
  return kCosts[int(act)];
}

// The cost of an element of T where float32 costs `ns`: a vector holds
// half as many doubles.
template <class T> constexpr double cost_of(double ns) { return ns * sizeof(T) / sizeof(float); }

// Whether Op's float32 forward core is forward_core_pieces, which the
// loops evaluate a vector of FloatLanes at a time (cpu/lanes.h): GeluErf's
// alone, named rather than inherited, since GeluErfHalf derives from it
// with a core of its own.
template <class Op> constexpr bool kHasForwardCorePieces = std::is_same_v<Op, act::GeluErf>;

#if defined(FUSEDNN_FLOAT_LANES)
// The values of a forward core in pieces for a line of kLineElems<float>
// inputs at k into line: the core form a vector of FloatLanes at a time
// (forward_core_pieces), and unless `inside` (every input of the line in
// the core range), forward_outer_f32 where an input lies beyond (NaN
// included): Op::forward's values. Then finish, as activation_run's.
template <class Op, class Input, class Finish>
FUSEDNN_INLINE_LAMBDA inline void pieces_line(float* line, int64_t k, bool inside, Input z,
                                              Finish finish) {
  constexpr int64_t kLine = kLineElems<float>;
  for (int64_t v = 0; v < kLine; v += FloatLanes::kCount) {
    alignas(64) float inputs[FloatLanes::kCount];
#pragma omp simd
    for (int64_t j = 0; j < FloatLanes::kCount; ++j) inputs[j] = z(k + v + j);
    Op::forward_core_pieces(FloatLanes::load(inputs)).store(line + v);
  }
  if (!inside) {
#pragma omp simd
    for (int64_t j = 0; j < kLine; ++j) {
      const float x = z(k + j);
      const float outer = Op::forward_outer_f32(x);
      line[j] = math::magnitude(x) <= Op::kForwardCoreBound ? line[j] : outer;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < kLine; ++j) line[j] = finish(k + j, line[j]);
}

// activation_run for a forward core in pieces, a line at a time into
// registers, then streamed (where `stream` is set; out is then 64-byte
// aligned) or stored, as write_lines does. Blocks of kCoreBlock whose
// inputs all lie in the core range (core_block_inside) skip the outer
// form; the last partial line takes its inputs from a copy padded with
// zeros, whose values go unused.
template <class Op, bool kLines, class Input, class Finish>
inline void activation_run_pieces(float* out, int64_t m, Input z, Finish finish, bool stream) {
  constexpr int64_t kLine = kLineElems<float>;
  int64_t i = 0;
  for (; i + kCoreBlock <= m; i += kCoreBlock) {
    const bool inside = core_block_inside(z, i, Op::kForwardCoreBound);
    for (int64_t l = i; l < i + kCoreBlock; l += kLine) {
      alignas(64) float line[kLine];
      pieces_line<Op>(line, l, inside, z, finish);
      if (kLines && __builtin_expect(stream, false)) {
        stream_line(out + l, load_line(line));
      } else {
        std::memcpy(out + l, line, sizeof line);
      }
    }
  }
  for (; i < m; i += kLine) {
    const int64_t n = std::min(kLine, m - i);
    alignas(64) float inputs[kLine];
    for (int64_t j = 0; j < kLine; ++j) inputs[j] = j < n ? z(i + j) : 0.0f;
    const float* in = inputs;
    const int64_t at = i;
    alignas(64) float line[kLine];
    pieces_line<Op>(
        line, 0, false, [=](int64_t k) FUSEDNN_INLINE_LAMBDA { return in[k]; },
        [=](int64_t k, float y) FUSEDNN_INLINE_LAMBDA { return finish(at + k, y); });
    std::memcpy(out + i, line, n * sizeof(float));
  }
}
#endif

// out[k] = finish(k, act(z(k))) for k in [0, m). With kLines, a line at a
// time (write_lines), streamed where `stream` is set; otherwise in single
// vectorized loops. With kStored (the activation kernels' blocks, which
// may hold float16 or bfloat16 values), `half` says the values are to be
// rounded to one of those, and an activation with a core of the half
// types' own (HasHalfForwardCore) takes it wherever |z| lies within its
// core bound, in the same function as the float32 core: the half types'
// kernels share the float32 kernels' instantiation, and a second core
// loop costs a fraction of the code of a second instantiation.
template <class Op, bool kLines = false, bool kStored = false, class T, class Input, class Finish>
inline void activation_run(T* out, int64_t m, const ActivationParams q, Input z, Finish finish,
                           bool stream = kLines, bool half = false) {
  const auto value = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
    return finish(k, Op::template forward<T>(z(k), q));
  };
#if defined(FUSEDNN_FLOAT_LANES)
  if constexpr (std::is_same_v<T, float> && kHasForwardCorePieces<Op>) {
    activation_run_pieces<Op, kLines>(out, m, z, finish, stream);
    return;
  }
#endif
  if constexpr (kStored && std::is_same_v<T, float> && HasHalfForwardCore<Op>::value) {
    const auto core = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return finish(k, Op::forward_core_f32(z(k), q));
    };
    const auto half_core = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      return finish(k, Op::forward_core_half(z(k), q));
    };
    // Beyond the core blocks, the half core wherever |z| is inside the
    // bound all the same, so that the blocking never decides bits. The
    // bound is -1 for float32, a per-element select rather than a branch
    // on `half`, which the compiler would answer with a second copy of the
    // loop.
    const float half_bound = half ? Op::kForwardCoreBound : -1.0f;
    const auto either = [=](int64_t k) FUSEDNN_INLINE_LAMBDA {
      const float x = z(k);
      const float own = Op::forward_core_half(x, q);
      const float full = Op::template forward<T>(x, q);
      return finish(k, math::magnitude(x) <= half_bound ? own : full);
    };
    run_core_blocks<kLines>(out, m, Op::kForwardCoreBound, z, core, half_core, half, either,
                            stream);
  } else if constexpr (std::is_same_v<T, float> && HasForwardCore<Op>::value) {
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
    run_core_blocks<kLines>(out, m, backward_core_bound<Op>(q), z, core, value, stream);
  } else if constexpr (kLines) {
    write_lines(out, m, stream, value);
  } else {
    write_run<false>(out, m, value);
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
