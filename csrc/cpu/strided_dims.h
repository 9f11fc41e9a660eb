// The dimension merging behind the elementwise loop driver (StridedLoop in
// cpu/elementwise.h). It runs once per kernel call and its code does not
// depend on the instruction set, so it is compiled once (strided_dims.cpp)
// rather than once per ISA and operand count.
#pragma once

#include <cstdint>

namespace fusednn {
namespace cpu {

constexpr int kMaxDims = 64;

// Merges the dimensions of `operands` arrays that share in_shape (strides
// in bytes, 0 broadcasts): length-1 axes are dropped, and an axis is folded
// into the next inner one when every operand steps over both as one
// contiguous extent. Writes the merged shape (outermost first) to shape and
// each operand's strides, in elements, to strides[k * kMaxDims + d];
// returns the merged rank (at least 1) and the element count in *size.
// Throws std::invalid_argument past kMaxDims dimensions.
int merge_dimensions(int operands, int in_ndim, const int64_t* in_shape,
                     const int64_t* const* in_strides, const int* itemsizes, int64_t* shape,
                     int64_t* strides, int64_t* size);

// Where flat index `begin` of a merged loop (shape and strides as
// merge_dimensions writes them, ndim >= 1) lies: its index along each
// dimension, and each operand's address, ptr[k] = base[k] plus its offset
// in bytes. Once per slice of a walk, so also compiled once.
void locate_flat_index(int operands, int ndim, const int64_t* shape, const int64_t* strides,
                       const int* itemsizes, char* const* base, int64_t begin, int64_t* index,
                       char** ptr);

}  // namespace cpu
}  // namespace fusednn
