// The view of an array that CPU kernels receive: a pointer, dtype, shape
// and byte strides. The bindings build it from numpy arrays; kernels never
// see Python objects.
#pragma once

#include <cstdint>

#include "fusednn/channel_layout.h"

namespace fusednn {
namespace cpu {

enum class DType : int { float32 = 0, float64 = 1 };

inline int itemsize(DType d) { return d == DType::float64 ? 8 : 4; }

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
