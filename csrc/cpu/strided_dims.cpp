// merge_dimensions and locate_flat_index (strided_dims.h), compiled once
// for every instruction set's kernels.
#include "cpu/strided_dims.h"

#include <algorithm>
#include <stdexcept>

namespace fusednn {
namespace cpu {

int merge_dimensions(int operands, int in_ndim, const int64_t* in_shape,
                     const int64_t* const* in_strides, const int* itemsizes, int64_t* shape,
                     int64_t* strides, int64_t* size) {
  if (in_ndim > kMaxDims) throw std::invalid_argument("too many dimensions");
  int64_t total = 1;
  for (int d = 0; d < in_ndim; ++d) total *= in_shape[d];
  *size = total;
  // Built from the innermost dimension outwards, then reversed in place.
  int count = 0;
  for (int d = in_ndim - 1; d >= 0; --d) {
    if (in_shape[d] == 1) continue;
    bool mergeable = count > 0;
    for (int k = 0; k < operands && mergeable; ++k) {
      const int64_t s = in_strides[k][d] / itemsizes[k];
      mergeable = s == strides[k * kMaxDims + count - 1] * shape[count - 1];
    }
    if (mergeable) {
      shape[count - 1] *= in_shape[d];
    } else {
      shape[count] = in_shape[d];
      for (int k = 0; k < operands; ++k)
        strides[k * kMaxDims + count] = in_strides[k][d] / itemsizes[k];
      ++count;
    }
  }
  if (count == 0) {
    shape[0] = 1;
    for (int k = 0; k < operands; ++k) strides[k * kMaxDims] = 1;
    count = 1;
  }
  std::reverse(shape, shape + count);
  for (int k = 0; k < operands; ++k)
    std::reverse(strides + k * kMaxDims, strides + k * kMaxDims + count);
  return count;
}

void locate_flat_index(int operands, int ndim, const int64_t* shape, const int64_t* strides,
                       const int* itemsizes, char* const* base, int64_t begin, int64_t* index,
                       char** ptr) {
  int64_t rest = begin;
  for (int d = ndim - 1; d >= 0; --d) {
    index[d] = rest % shape[d];
    rest /= shape[d];
  }
  for (int k = 0; k < operands; ++k) {
    int64_t offset = 0;
    for (int d = 0; d < ndim; ++d) offset += index[d] * strides[k * kMaxDims + d];
    ptr[k] = base[k] + offset * itemsizes[k];
  }
}

}  // namespace cpu
}  // namespace fusednn
