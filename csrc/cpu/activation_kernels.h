// The CPU activation kernels of one activation at a time, and the loops
// that all activations share. An activation's arithmetic is defined in
// cpu/activation_loops.h and compiled in the activations_*.cpp files, a
// few activations each, so that they compile in parallel; activations.cpp
// dispatches to them and compiles the shared loops. Declared once per ISA
// into namespace FUSEDNN_ISA.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/array.h"
#include "fusednn/activations.h"
#include "fusednn/half.h"

#if !defined(FUSEDNN_ISA)
#error "cpu/activation_kernels.h belongs to the per-ISA kernel files (FUSEDNN_ISA undefined)"
#endif

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// The kernels of one activation for every dtype, costing ns_per_element
// per float32 element (activation_cost); activation_backward_op throws
// std::invalid_argument for from_output where the activation's derivative
// needs x.
template <class Op>
void activation_forward_op(const ActivationParams& params, double ns_per_element,
                           const ArrayRef& x, const ArrayRef& y);
template <class Op>
void activation_backward_op(const ActivationParams& params, double ns_per_element,
                            bool from_output, const ArrayRef& grad_output, const ArrayRef& saved,
                            const ArrayRef& grad_input);

// How a block's operands are stored: as its compute type T, or, for
// float32 arithmetic, as float16 or bfloat16, which the block widens and
// rounds itself a kHalfBlock at a time (cpu/half_convert.h).
enum class BlockStorage : int { compute, float16, bfloat16 };
template <class S> constexpr BlockStorage block_storage_of() {
  if constexpr (std::is_same_v<S, Float16>) return BlockStorage::float16;
  if constexpr (std::is_same_v<S, BFloat16>) return BlockStorage::bfloat16;
  return BlockStorage::compute;
}
// stream: o is 64-byte aligned and its whole lines are written past the
// cache.
struct BlockMode {
  BlockStorage storage;
  bool stream;
};

// The arithmetic of a contiguous run of an activation computing in T
// (float or double), with operands stored as mode.storage says: o[i] =
// f(x[i]), and o[i] = g[i] f'(.) from x or y values v, for i < n. The
// loops below take pointers to an activation's.
template <class T>
using ForwardBlock = void (*)(void* o, const void* x, int64_t n, ActivationParams q,
                              BlockMode mode);
template <class T>
using BackwardBlock = void (*)(void* o, const void* g, const void* v, int64_t n,
                               ActivationParams q, BlockMode mode);
template <class S> using ComputeOf = typename Storage<S>::Compute;

// The same over a strided run of float64 (strides in elements: x, o; and
// g, v, o), the arithmetic next to the loads and stores: float64 strided
// runs measured 10-35% slower when gathered into blocks for ForwardBlock,
// where float32 and the half types ran faster that way.
using StridedForwardF64 = void (*)(const double* x, double* o, int64_t n, const int64_t* steps,
                                   ActivationParams q);
using StridedBackwardF64 = void (*)(const double* g, const double* v, double* o, int64_t n,
                                    const int64_t* steps, ActivationParams q);

// An activation's arithmetic for storage type S, as the loops take it:
// strided is set for float64 only.
template <class S> struct ForwardArithmetic {
  ForwardBlock<ComputeOf<S>> block;
  StridedForwardF64 strided = nullptr;
};
template <class S> struct BackwardArithmetic {
  BackwardBlock<ComputeOf<S>> block;
  StridedBackwardF64 strided = nullptr;
};

// An activation's part of the fused bias + activation + dropout kernels
// (dropout.cpp), computing in T over a contiguous piece of n elements:
// out[k] = act(h[k] + b[k]) * (keep[k] ? s : 0), and out[k] = dy[k]
// act'(h[k] + b[k]) with dy[k] = g[k] * (keep[k] ? s : 0), keep[k] 0 or 1.
// The bias add and the keep multiply are operands of the activation's
// vectorized loop, so that the fused loops make no extra pass over h, b
// or the results, while everything else in them (keep bits, bias layouts, strides,
// threads, grad_bias) is compiled once per dtype rather than once per
// activation and dtype. fused_blocks_op is compiled with each activation's
// kernels, fused_blocks (activations.cpp) picks the activation's.
template <class T>
using FusedForwardBlock = void (*)(T* out, int64_t n, const T* h, const T* b, const uint8_t* keep,
                                   T s, ActivationParams q);
template <class T>
using FusedBackwardBlock = void (*)(T* out, int64_t n, const T* g, const T* h, const T* b,
                                    const uint8_t* keep, T s, ActivationParams q);
// The fused forward's rows loop (dropout.cpp, AVX-512) applies the keep
// bits itself, as vector masks, to a stage of out[k] = act(h[k] + b[k]):
// biased, compiled for that ISA only.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FUSEDNN_FUSED_ROWS 1
template <class T>
using BiasedForwardBlock = void (*)(T* out, int64_t n, const T* h, const T* b, ActivationParams q);
#endif
template <class T> struct FusedBlocks {
  FusedForwardBlock<T> forward;
  FusedBackwardBlock<T> backward;
#if defined(FUSEDNN_FUSED_ROWS)
  BiasedForwardBlock<T> biased;
#endif
};
template <class Op, class T> FusedBlocks<T> fused_blocks_op();
template <class T> FusedBlocks<T> fused_blocks(Activation act, const ActivationParams& p);

// The kernels' loops over arrays of any shape and strides, once per
// storage type S for all activations (activations.cpp): threads,
// contiguous runs (streamed past the cache when large) and strided runs;
// `fns` is the activation's arithmetic (float32's for the half types),
// costing ns_per_element per float32 element.
template <class S>
void forward_loops(const ActivationParams& params, double ns_per_element, const ArrayRef& x,
                   const ArrayRef& y, ForwardArithmetic<S> fns);
template <class S>
void backward_loops(const ActivationParams& params, double ns_per_element,
                    const ArrayRef& grad_output, const ArrayRef& saved,
                    const ArrayRef& grad_input, BackwardArithmetic<S> fns);

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
