// The per-activation part of the CPU activation kernels: the vectorized
// arithmetic of contiguous runs (with the half types' widening and
// rounding) and of float64's strided runs, y = f(x) and grad_input = g *
// f'(.), for the activations a file names with FUSEDNN_ACTIVATION_KERNELS
// (at the end), and their entry points, which hand it to the loops shared
// by all activations (cpu/activation_kernels.h). The math is
// fusednn/activations.h. Compiled once per ISA into namespace FUSEDNN_ISA.
#pragma once

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "cpu/activation_kernels.h"
#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"
#include "cpu/half_convert.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// n values of storage s (float16 or bfloat16) from src + at to float32,
// and back to dst + at, streamed where `stream` is set. Inlined where the
// ISA converts in a few instructions (AVX-512), so that the arithmetic
// beside them keeps its constants in registers; elsewhere the conversions
// are loops of integer arithmetic that, inlined, more than doubled each
// block function's code, and a call per kHalfBlock costs little beside
// them.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FUSEDNN_HALF_INLINE __attribute__((always_inline)) inline
#else
#define FUSEDNN_HALF_INLINE __attribute__((noinline)) inline
#endif
FUSEDNN_HALF_INLINE void widen_stored(BlockStorage s, const void* src, int64_t at, float* dst,
                                         int64_t n) {
  if (s == BlockStorage::float16) {
    widen(static_cast<const Float16*>(src) + at, dst, n);
  } else {
    widen(static_cast<const BFloat16*>(src) + at, dst, n);
  }
}
FUSEDNN_HALF_INLINE void narrow_stored(BlockStorage s, const float* src, void* dst, int64_t at,
                                          int64_t n, bool stream) {
  if (s == BlockStorage::float16) {
    narrow_to(src, static_cast<Float16*>(dst) + at, n, stream);
  } else {
    narrow_to(src, static_cast<BFloat16*>(dst) + at, n, stream);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Elements per chunk of the half types' light blocks below
// (stored_blocks): one kCoreBlock, four float32 vectors, widened from two
// 64-byte lines of the storage type and narrowed back into two from
// registers, the arithmetic's loops on a constant count between them.
constexpr int64_t kHalfChunk = kCoreBlock;
#else
// Without AVX-512 a conversion is a loop of integer arithmetic (or F16C
// on 8 lanes) whose call costs little beside a block of kHalfBlock.
constexpr int64_t kHalfChunk = kHalfBlock;
#endif

// Asks for the 64-byte lines of `values` half-type values at src + at (2
// bytes a value), ahead of their widening. The light chunks take their
// two lines 16 chunks (2 KiB) ahead: a chunk is tens of instructions per
// two input lines where a copy is a few, so fewer of its loads are in
// flight at once: with the inputs out of the cache, bfloat16 relu over
// 2^24 elements (2 threads) ran at 63-66% of a copy, with the prefetches
// at 93% (4 chunks ahead: 70%). The exponential activations' blocks take
// their eight lines 2 KiB ahead too: their arithmetic is heavier still per
// line, and in the bench, whose PyTorch calls run between ours, their
// inputs come from memory.
constexpr int64_t kHalfPrefetchAhead = 16 * kHalfChunk;
constexpr int64_t kHalfBlockPrefetchAhead = 1024;
template <int64_t kValues> inline void prefetch_values(const void* src, int64_t at) {
  const char* p = static_cast<const char*>(src) + 2 * at;
  for (int64_t line = 0; line < 2 * kValues; line += 64) __builtin_prefetch(p + line, 0, 3);
}

// Widens the m <= kHalfChunk stored values at src + at into dst, and
// zeroes the rest of the chunk, so that the arithmetic always runs on a
// whole chunk (a constant count, one copy of its loops).
FUSEDNN_HALF_INLINE void widen_chunk(BlockStorage s, const void* src, int64_t at, float* dst,
                                     int64_t m) {
  if (m == kHalfChunk) {
    widen_stored(s, src, at, dst, kHalfChunk);
  } else {
    widen_stored(s, src, at, dst, m);
    std::fill(dst + m, dst + kHalfChunk, 0.0f);
  }
}

// Narrows the first m <= kHalfChunk results of a chunk to dst + at,
// streaming a whole chunk where `stream` is set (dst + at then 64-byte
// aligned).
FUSEDNN_HALF_INLINE void narrow_chunk(BlockStorage s, const float* src, void* dst, int64_t at,
                                      int64_t m, bool stream) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (m == kHalfChunk) {
    const auto lines = [&](auto stored) FUSEDNN_INLINE_LAMBDA {
      using S = decltype(stored);
      uint16_t* out = reinterpret_cast<uint16_t*>(static_cast<S*>(dst) + at);
      for (int64_t j = 0; j < kHalfChunk; j += kHalfLineElems) {
        const HalfLine line = narrow_lines(load_line(src + j), load_line(src + j + 16), S{});
        if (stream) {
          stream_line(out + j, line);
        } else {
          std::memcpy(out + j, &line, sizeof line);
        }
      }
    };
    if (s == BlockStorage::float16) {
      lines(Float16{});
    } else {
      lines(BFloat16{});
    }
    return;
  }
  stream = false;
#endif
  narrow_stored(s, src, dst, at, m, stream);
}
#undef FUSEDNN_HALF_INLINE

// Calls run(o, ins, m, stream) over a block's n elements, operands stored
// as mode.storage: once on the operands themselves where they are stored
// as T. For float16 and bfloat16 (T = float), on L1 buffers they are
// widened into, the results narrowed after (streamed with mode.stream):
// with kChunked a kHalfChunk at a time, run always on a whole chunk (a
// constant count; the widened tail padded with zeros), otherwise a
// kHalfBlock at a time. Chunks suit the light arithmetic (no core range),
// whose time is the widening, narrowing and stores: bfloat16 relu over
// 2^24 elements on 2 threads took 0.87x the time in chunks of 64. An
// exponential's chunk in registers exposed its latency instead (elu,
// sigmoid and silu 1.05-1.24x the time), so those keep blocks of 256.
template <class T, bool kChunked, int K, class Run>
inline void stored_blocks(void* out, const void* const (&in)[K], int64_t n, BlockMode mode,
                          Run run) {
  if constexpr (!std::is_same_v<T, float>) {
    const T* ins[K];
    for (int k = 0; k < K; ++k) ins[k] = static_cast<const T*>(in[k]);
    run(static_cast<T*>(out), ins, n, mode.stream);
  } else if constexpr (kChunked) {
    if (mode.storage == BlockStorage::compute) {
      const float* ins[K];
      for (int k = 0; k < K; ++k) ins[k] = static_cast<const float*>(in[k]);
      run(static_cast<float*>(out), ins, n, mode.stream);
      return;
    }
    alignas(64) float widened[K][kHalfChunk];
    alignas(64) float results[kHalfChunk];
    const float* ins[K];
    for (int k = 0; k < K; ++k) ins[k] = widened[k];
    for (int64_t b = 0; b < n; b += kHalfChunk) {
      const int64_t m = std::min(kHalfChunk, n - b);
      for (int k = 0; k < K; ++k) {
        prefetch_values<64>(in[k], b + kHalfPrefetchAhead);
        widen_chunk(mode.storage, in[k], b, widened[k], m);
      }
      run(results, ins, kHalfChunk, false);
      narrow_chunk(mode.storage, results, out, b, m, mode.stream);
    }
  } else {
    const bool staged = mode.storage != BlockStorage::compute;
    const int64_t step = staged ? kHalfBlock : std::max<int64_t>(n, 1);
    alignas(64) float widened[K][kHalfBlock];
    alignas(64) float results[kHalfBlock];
    for (int64_t b = 0; b < n; b += step) {
      const int64_t m = std::min(step, n - b);
      const float* ins[K];
      float* o;
      if (staged) {
        for (int k = 0; k < K; ++k) {
          prefetch_values<kHalfBlock>(in[k], b + kHalfBlockPrefetchAhead);
          widen_stored(mode.storage, in[k], b, widened[k], m);
          ins[k] = widened[k];
        }
        o = results;
      } else {
        for (int k = 0; k < K; ++k) ins[k] = static_cast<const float*>(in[k]) + b;
        o = static_cast<float*>(out) + b;
      }
      run(o, ins, m, mode.stream && !staged);
      if (staged) narrow_stored(mode.storage, results, out, b, m, mode.stream);
    }
  }
}

// An activation's arithmetic, once per compute type; all else is the
// loops of activations.cpp, once per storage type, which call these
// through pointers: the contiguous runs of every dtype, streamed or not,
// and the gathered blocks of the strided runs of float32 and the half
// types. Inlined into each kernel, an activation's vectorized loops were
// compiled again for float16 and for bfloat16, for strided runs, and for
// streamed and cached outputs of each, and the loop drivers once per
// activation: most of the activations' code.
template <class Op, class T>
__attribute__((noinline)) void forward_block(void* o, const void* x, int64_t n,
                                             const ActivationParams q, BlockMode mode) {
  const void* const ins[1] = {x};
  const bool half = mode.storage != BlockStorage::compute;
  stored_blocks<T, !HasForwardCore<Op>::value>(
      o, ins, n, mode,
      [q, half](T* out, const T* const* src, int64_t m, bool stream) FUSEDNN_INLINE_LAMBDA {
    const T* xs = src[0];
    const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return xs[i]; };
    const auto as_is = [](int64_t, T v) FUSEDNN_INLINE_LAMBDA { return v; };
    activation_run<Op, true, true>(out, m, q, input, as_is, stream, half);
  });
}

template <class Op, class T, bool kFromOutput>
__attribute__((noinline)) void backward_block(void* o, const void* g, const void* v, int64_t n,
                                              const ActivationParams q, BlockMode mode) {
  const void* const ins[2] = {g, v};
  stored_blocks<T, kFromOutput || !HasBackwardCore<Op>::value>(
      o, ins, n, mode, [q](T* out, const T* const* src, int64_t m, bool stream) FUSEDNN_INLINE_LAMBDA {
    const T* gs = src[0];
    const T* vs = src[1];
    if constexpr (kFromOutput) {
      write_lines(out, m, stream, [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
        return Op::template backward_y<T>(gs[i], vs[i], q);
      });
    } else {
      const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return vs[i]; };
      const auto grad_at = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return gs[i]; };
      activation_backward_run<Op, true>(out, m, q, input, grad_at, stream);
    }
  });
}

// float64's strided runs: the same values as the blocks above (float64
// has no core evaluation, so these are the per-element formulas the
// blocks' lines compute), one vectorized loop with the loads and stores.
template <class Op>
__attribute__((noinline)) void forward_strided_f64(const double* x, double* o, int64_t n,
                                                   const int64_t* steps, const ActivationParams q) {
  const int64_t x_step = steps[0], o_step = steps[1];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i * o_step] = Op::template forward<double>(x[i * x_step], q);
}

template <class Op, bool kFromOutput>
__attribute__((noinline)) void backward_strided_f64(const double* g, const double* v, double* o,
                                                    int64_t n, const int64_t* steps,
                                                    const ActivationParams q) {
  const int64_t g_step = steps[0], v_step = steps[1], o_step = steps[2];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kFromOutput) {
      o[i * o_step] = Op::template backward_y<double>(g[i * g_step], v[i * v_step], q);
    } else {
      o[i * o_step] = Op::template backward_x<double>(g[i * g_step], v[i * v_step], q);
    }
  }
}

// Elements per sub-block of the fused blocks below (their keep factors
// stay in L1). With 1024, the float32/float64 rows backward of page-aligned
// arrays took up to 1.2x the time they take with 128.
constexpr int64_t kFusedBlock = 128;

// kFusedBlock as a value the compiler cannot see through. Knowing that a
// sub-block holds at most 128 elements (two kCoreBlocks), GCC unrolled and
// peeled every activation's loops inside it: 90 KB more code over the
// three ISAs than with 1024, for the same loops.
inline int64_t fused_block_elements() {
  int64_t elements = kFusedBlock;
  asm("" : "+r"(elements));
  return elements;
}

// factor[k] = keep[k] ? s : 0 for k < n (n <= kFusedBlock). With AVX-512,
// 64 keep bytes at a time into one lane mask, the last group masked: the
// vectorized loop took 64 a step too and left each piece's last n % 64
// to scalar code (NCHW runs of 512 start 12 elements before a line, so
// every run had a scalar tail), which cost the light activations' fused
// float32 and float64 loops 3-10%. Without AVX-512 the loop is the
// vectorizer's, with its prologue and epilogue: out of line there, once
// per dtype rather than in both fused blocks of every activation (85 KB
// of the generic and AVX2 builds' code), for a call per kFusedBlock.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FUSEDNN_KEEP_FACTORS_INLINE inline
#else
#define FUSEDNN_KEEP_FACTORS_INLINE __attribute__((noinline)) inline
#endif
template <class T>
FUSEDNN_KEEP_FACTORS_INLINE void keep_factors(const uint8_t* keep, int64_t n, T s, T* factor) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  constexpr int64_t kLanes = 64 / int64_t(sizeof(T));
  for (int64_t k = 0; k < n; k += 64) {
    const int64_t m = std::min<int64_t>(64, n - k);
    const __mmask64 valid = m == 64 ? ~__mmask64(0) : (__mmask64(1) << m) - 1;
    const __m512i bytes = _mm512_maskz_loadu_epi8(valid, keep + k);
    __mmask64 kept = _mm512_test_epi8_mask(bytes, bytes);
    for (int64_t j = 0; j < m; j += kLanes, kept >>= kLanes) {
      if constexpr (sizeof(T) == 4) {
        _mm512_store_ps(factor + k + j, _mm512_maskz_mov_ps(__mmask16(kept), _mm512_set1_ps(s)));
      } else {
        _mm512_store_pd(factor + k + j, _mm512_maskz_mov_pd(__mmask8(kept), _mm512_set1_pd(s)));
      }
    }
  }
#else
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) factor[k] = keep[k] ? s : T(0);
#endif
}
#undef FUSEDNN_KEEP_FACTORS_INLINE

// The fused blocks (FusedForwardBlock): the activation's vectorized loops
// with h + b as their input and the keep factor in the forward's finish
// and the backward's dy, rather than passes of their own over staged z =
// h + b and results (which cost the fused float32 and float64 kernels up
// to 24%). The keep bytes become factors of T first, a kFusedBlock at a
// time: read as bytes inside the activation's loop, they made the
// vectorizer take 64 elements a step and leave runs shorter than 64, and
// each run's last n % 64, to scalar code (float64 rows up to 1.5x slower).
template <class Op, class T>
__attribute__((noinline)) void fused_forward_block(T* out, int64_t n, const T* h, const T* b,
                                                   const uint8_t* keep, const T s,
                                                   const ActivationParams q) {
  const int64_t block = fused_block_elements();
  for (int64_t i = 0; i < n; i += block) {
    const int64_t m = std::min(block, n - i);
    alignas(64) T factor[kFusedBlock];
    keep_factors(keep + i, m, s, factor);
    const T* hs = h + i;
    const T* bs = b + i;
    const T* fs = factor;
    const auto z = [=](int64_t k) FUSEDNN_INLINE_LAMBDA { return hs[k] + bs[k]; };
    const auto kept = [=](int64_t k, T y) FUSEDNN_INLINE_LAMBDA { return y * fs[k]; };
    activation_run<Op>(out + i, m, q, z, kept);
  }
}

template <class Op, class T>
__attribute__((noinline)) void fused_backward_block(T* out, int64_t n, const T* g, const T* h,
                                                    const T* b, const uint8_t* keep, const T s,
                                                    const ActivationParams q) {
  const int64_t block = fused_block_elements();
  for (int64_t i = 0; i < n; i += block) {
    const int64_t m = std::min(block, n - i);
    alignas(64) T factor[kFusedBlock];
    keep_factors(keep + i, m, s, factor);
    const T* gs = g + i;
    const T* hs = h + i;
    const T* bs = b + i;
    const T* fs = factor;
    const auto dy = [=](int64_t k) FUSEDNN_INLINE_LAMBDA { return gs[k] * fs[k]; };
    const auto z = [=](int64_t k) FUSEDNN_INLINE_LAMBDA { return hs[k] + bs[k]; };
    activation_backward_run<Op>(out + i, m, q, z, dy);
  }
}

// out[k] = act(h[k] + b[k]), for the rows loop of the fused forward
// (BiasedForwardBlock).
#if defined(FUSEDNN_FUSED_ROWS)
template <class Op, class T>
__attribute__((noinline)) void biased_forward_block(T* out, int64_t n, const T* h, const T* b,
                                                    const ActivationParams q) {
  const auto z = [=](int64_t k) FUSEDNN_INLINE_LAMBDA { return h[k] + b[k]; };
  const auto as_is = [](int64_t, T y) FUSEDNN_INLINE_LAMBDA { return y; };
  activation_run<Op>(out, n, q, z, as_is);
}
#endif

template <class Op, class T> FusedBlocks<T> fused_blocks_op() {
#if defined(FUSEDNN_FUSED_ROWS)
  return {&fused_forward_block<Op, T>, &fused_backward_block<Op, T>, &biased_forward_block<Op, T>};
#else
  return {&fused_forward_block<Op, T>, &fused_backward_block<Op, T>};
#endif
}

// Whether LeakyReluFloatSlope's kernels give LeakyRelu's stored results
// for every value v of half type S at slope p.a: the forward of v (x a
// where v <= 0) and the backward of the gradient v at x = -1 (g a), each
// through both kernels' own blocks, a kHalfBlock of values at a time. The
// verdicts of the last few slopes are kept (about 0.1 ms a slope to find).
template <class S> bool float_slope_rounds_alike(const ActivationParams& p) {
  static_assert(sizeof(S) == sizeof(uint16_t), "a half type");
  struct Verdict {
    uint64_t slope_bits;
    bool alike;
  };
  constexpr int kKept = 8;
  static std::mutex mutex;
  static Verdict kept[kKept];
  static int count = 0;
  uint64_t slope_bits;
  std::memcpy(&slope_bits, &p.a, sizeof slope_bits);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (int i = 0; i < count; ++i)
      if (kept[i].slope_bits == slope_bits) return kept[i].alike;
  }
  const BlockMode mode{block_storage_of<S>(), false};
  alignas(64) uint16_t values[kHalfBlock], minus_ones[kHalfBlock];
  alignas(64) uint16_t in_double[kHalfBlock], in_float[kHalfBlock];
  const S minus_one = Storage<S>::store(-1.0f);
  for (int64_t i = 0; i < kHalfBlock; ++i) std::memcpy(&minus_ones[i], &minus_one, sizeof minus_one);
  bool alike = true;
  for (uint32_t start = 0; alike && start < (1u << 16); start += kHalfBlock) {
    for (int64_t i = 0; i < kHalfBlock; ++i) values[i] = static_cast<uint16_t>(start + i);
    forward_block<act::LeakyRelu, float>(in_double, values, kHalfBlock, p, mode);
    forward_block<act::LeakyReluFloatSlope, float>(in_float, values, kHalfBlock, p, mode);
    alike = std::memcmp(in_double, in_float, sizeof in_double) == 0;
    backward_block<act::LeakyRelu, float, false>(in_double, values, minus_ones, kHalfBlock, p,
                                                 mode);
    backward_block<act::LeakyReluFloatSlope, float, false>(in_float, values, minus_ones,
                                                           kHalfBlock, p, mode);
    alike = alike && std::memcmp(in_double, in_float, sizeof in_double) == 0;
  }
  const std::lock_guard<std::mutex> lock(mutex);
  kept[count < kKept ? count++ : int(slope_bits % kKept)] = {slope_bits, alike};
  return alike;
}

// The forms of an activation that the half types' kernels take
// (activations.h): where they round to the same stored results as Op's
// (hardsigmoid, hardswish's forward, hardtanh), or, where Op's float32
// bits cost double arithmetic or float32 accuracy that the storage types
// cannot hold, forms in float arithmetic within one ulp of the storage
// type (gelu, silu's backward, elu's and selu's backward from y,
// hardswish's backward). sigmoid, tanh, elu, selu and silu keep Op for
// their forward and take its forward_core_half inside the same
// instantiation (activation_run), where a form of their own would have
// compiled all of a block's loops again. The backward's form goes by
// what it reads: elu's and selu's change only the backward from y, and
// their backward from x keeps Op's instantiation rather than compiling
// the same arithmetic again under a second type.
template <class Op> struct HalfForward {
  using Form = Op;
};
template <> struct HalfForward<act::Hardsigmoid> {
  using Form = act::HardsigmoidHalf;
};
template <> struct HalfForward<act::Hardswish> {
  using Form = act::HardswishHalf;
};
template <> struct HalfForward<act::Hardtanh> {
  using Form = act::HardtanhHalf;
};
template <> struct HalfForward<act::GeluErf> {
  using Form = act::GeluErfHalf;
};
template <class Op, bool kFromOutput> struct HalfBackward {
  using Form = Op;
};
template <bool kFromOutput> struct HalfBackward<act::Hardsigmoid, kFromOutput> {
  using Form = act::HardsigmoidHalf;
};
template <bool kFromOutput> struct HalfBackward<act::Hardswish, kFromOutput> {
  using Form = act::HardswishHalf;
};
template <bool kFromOutput> struct HalfBackward<act::Silu, kFromOutput> {
  using Form = act::SiluHalf;
};
template <bool kFromOutput> struct HalfBackward<act::GeluErf, kFromOutput> {
  using Form = act::GeluErfHalf;
};
template <> struct HalfBackward<act::Elu, true> {
  using Form = act::EluHalf;
};
template <> struct HalfBackward<act::Selu, true> {
  using Form = act::SeluHalf;
};

// The arithmetic of Op's kernels for storage type S: on the half types,
// HalfForward's and HalfBackward's forms, and leaky_relu multiplies in
// float where that rounds alike (over 2^24 elements on 2 threads,
// 0.51-0.65x the time of the double product).
template <class Op, class S> ForwardArithmetic<S> forward_arithmetic(const ActivationParams& p) {
  if constexpr (sizeof(S) == sizeof(uint16_t)) {
    if constexpr (std::is_same_v<Op, act::LeakyRelu>) {
      if (float_slope_rounds_alike<S>(p))
        return {&forward_block<act::LeakyReluFloatSlope, float>};
    }
    return {&forward_block<typename HalfForward<Op>::Form, float>};
  }
  ForwardArithmetic<S> fns{&forward_block<Op, ComputeOf<S>>};
  if constexpr (std::is_same_v<S, double>) fns.strided = &forward_strided_f64<Op>;
  return fns;
}
template <class Op, class S, bool kFromOutput>
BackwardArithmetic<S> backward_arithmetic(const ActivationParams& p) {
  if constexpr (sizeof(S) == sizeof(uint16_t)) {
    if constexpr (std::is_same_v<Op, act::LeakyRelu>) {
      if (float_slope_rounds_alike<S>(p))
        return {&backward_block<act::LeakyReluFloatSlope, float, kFromOutput>};
    }
    return {&backward_block<typename HalfBackward<Op, kFromOutput>::Form, float, kFromOutput>};
  }
  BackwardArithmetic<S> fns{&backward_block<Op, ComputeOf<S>, kFromOutput>};
  if constexpr (std::is_same_v<S, double>) fns.strided = &backward_strided_f64<Op, kFromOutput>;
  return fns;
}

template <class Op>
void activation_forward_op(const ActivationParams& params, double ns, const ArrayRef& x,
                           const ArrayRef& y) {
  visit_storage(x.dtype, [&](auto stored) {
    using S = decltype(stored);
    forward_loops<S>(params, ns, x, y, forward_arithmetic<Op, S>(params));
  });
}

template <class Op>
void activation_backward_op(const ActivationParams& params, double ns, bool from_output,
                            const ArrayRef& grad_output, const ArrayRef& saved,
                            const ArrayRef& grad_input) {
  const auto run = [&](auto from_y) {
    visit_storage(grad_output.dtype, [&](auto stored) {
      using S = decltype(stored);
      constexpr bool kFromOutput = decltype(from_y)::value;
      backward_loops<S>(params, ns, grad_output, saved, grad_input,
                        backward_arithmetic<Op, S, kFromOutput>(params));
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
  template FusedBlocks<float> fused_blocks_op<Op, float>();                                  \
  template FusedBlocks<double> fused_blocks_op<Op, double>();                                \
  } } }
