// The view of an array that CPU kernels receive: a pointer, dtype, shape
// and byte strides. The bindings build it from numpy arrays; kernels never
// see Python objects.
#pragma once

#include <cstdint>

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

}  // namespace cpu
}  // namespace fusednn
