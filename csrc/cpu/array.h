// The view of an array that CPU kernels receive: a pointer, dtype, shape
// and byte strides. The bindings build it from numpy arrays; kernels never
// see Python objects.
#pragma once

#include <cstdint>

#include "fusednn/channel_layout.h"

namespace fusednn {
namespace cpu {

// float16 and bfloat16 are stored as fusednn::Float16 and BFloat16
// (fusednn/half.h) and computed in float32.
enum class DType : int { float32 = 0, float64 = 1, float16 = 2, bfloat16 = 3 };

inline int itemsize(DType d) {
  return d == DType::float64 ? 8 : (d == DType::float32 ? 4 : 2);
}

inline bool is_half(DType d) { return d == DType::float16 || d == DType::bfloat16; }

struct ArrayRef {
  void* data;
  DType dtype;
  int ndim;
  const int64_t* shape;
  const int64_t* strides;  // bytes, each a multiple of the item size
};

// Whether a's elements are laid out in C order with no gaps. Static, like
// the layout helpers it uses: the per-ISA builds each keep their own copy.
static inline bool is_contiguous(const ArrayRef& a) {
  return is_contiguous_layout(a.shape, a.strides, a.ndim, itemsize(a.dtype));
}

}  // namespace cpu
}  // namespace fusednn
