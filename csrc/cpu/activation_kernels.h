// The CPU activation kernels of one activation at a time, and the loops
// that all activations share. An activation's arithmetic is defined in
// cpu/activation_loops.h and compiled in the activations_*.cpp files, a
// few activations each, so that they compile in parallel; activations.cpp
// dispatches to them and compiles the shared loops. Declared once per ISA
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
// the cache. The loops below take pointers to an activation's.
template <class T>
using ForwardBlock = void (*)(T* o, const T* x, int64_t n, ActivationParams q, bool stream);
template <class T>
using BackwardBlock = void (*)(T* o, const T* g, const T* v, int64_t n, ActivationParams q,
                               bool stream);
template <class S> using ComputeOf = typename Storage<S>::Compute;

// The kernels' loops over arrays of any shape and strides, once per
// storage type S for all activations (activations.cpp): threads,
// contiguous runs (streamed past the cache when large), strided runs, and
// for the half types the widening and rounding; `block` is the
// activation's arithmetic (float32's for the half types), costing
// ns_per_element per float32 element.
template <class S>
void forward_loops(const ActivationParams& params, double ns_per_element, const ArrayRef& x,
                   const ArrayRef& y, ForwardBlock<ComputeOf<S>> block);
template <class S>
void backward_loops(const ActivationParams& params, double ns_per_element,
                    const ArrayRef& grad_output, const ArrayRef& saved,
                    const ArrayRef& grad_input, BackwardBlock<ComputeOf<S>> block);

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
