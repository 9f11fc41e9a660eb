// The CPU activation kernels of one activation at a time, and the
// half-precision runs that all activations share. The kernels are defined
// in cpu/activation_loops.h and compiled in the activations_*.cpp files, a
// few activations each, so that the costliest part of the CPU module
// compiles as several translation units in parallel; activations.cpp
// dispatches to them and compiles the shared runs. Declared once per ISA
// into namespace FUSEDNN_ISA.
#pragma once

#include <cstdint>

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

// The arithmetic of a contiguous run of T (float or double): o[i] =
// f(x[i]), and o[i] = g[i] f'(.) from x or y values v, for i < n; with
// stream set, o is 64-byte aligned and its whole lines are written past
// the cache. The shared runs below take pointers to an activation's.
template <class T>
using ForwardBlock = void (*)(T* o, const T* x, int64_t n, ActivationParams q, bool stream);
template <class T>
using BackwardBlock = void (*)(T* o, const T* g, const T* v, int64_t n, ActivationParams q,
                               bool stream);
template <class S> using ComputeOf = typename Storage<S>::Compute;

// Runs shared by all activations, once per storage type S
// (activations.cpp), that hand the arithmetic to `block` a block at a
// time. The contiguous runs of the half-precision kernels: each block of
// inputs widened to float32 and the results narrowed into dst, which with
// kStream is 64-byte aligned and written past the cache.
template <class S, bool kStream>
void half_forward_run(S* dst, int64_t count, const S* x, ForwardBlock<float> block,
                      ActivationParams q);
template <class S, bool kStream>
void half_backward_run(S* dst, int64_t count, const S* grad, const S* value,
                       BackwardBlock<float> block, ActivationParams q);
// Runs with other strides (inner, in elements: the inputs', then the
// output's): each block of inputs gathered into a contiguous buffer (and
// widened), the results scattered into out (and narrowed).
template <class S>
void strided_forward_run(const S* x, S* out, int64_t len, const int64_t* inner,
                         ForwardBlock<ComputeOf<S>> block, ActivationParams q);
template <class S>
void strided_backward_run(const S* grad, const S* value, S* out, int64_t len,
                          const int64_t* inner, BackwardBlock<ComputeOf<S>> block,
                          ActivationParams q);

// Calls fn(S{}) with S the storage type of dtype d.
template <class Fn> void visit_storage(DType d, Fn&& fn) {
  switch (d) {
    case DType::float64: fn(double{}); return;
    case DType::float16: fn(Float16{}); return;
    case DType::bfloat16: fn(BFloat16{}); return;
    default: fn(float{}); return;
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
