// The bytes a strided array spans, [low, high): how the CPU module's
// overlap checks (byte_extents and meeting_extents for the Python layer,
// the quick paths' own aliasing test) decide whether two operands can
// share memory, before any exact test. Written once so that both agree.
#pragma once

#include <cstdint>

namespace fusednn {
namespace bindings {

struct ByteExtent {
  std::int64_t low = 0, high = 0;
};

// For an array with at least one element: each dimension reaches
// stride * (extent - 1) bytes from the first element, below it for a
// negative stride, and the last element adds its own itemsize.
template <class Extent, class Stride>
ByteExtent byte_extent(const void* data, int ndim, const Extent* shape, const Stride* strides,
                       std::int64_t itemsize) {
  ByteExtent e;
  e.low = e.high = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(data));
  for (int d = 0; d < ndim; ++d) {
    const std::int64_t reach = static_cast<std::int64_t>(strides[d]) * (shape[d] - 1);
    (reach < 0 ? e.low : e.high) += reach;
  }
  e.high += itemsize;
  return e;
}

}  // namespace bindings
}  // namespace fusednn
