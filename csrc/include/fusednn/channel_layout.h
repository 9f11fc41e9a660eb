// The (outer, C, inner) view of an array around a channel axis that every
// batch-norm kernel (CPU and CUDA) works on: NC, NCHW, NCDHW and
// channels-last are the same family, told apart only by inner == 1. Host
// code, shared so that both backends accept exactly the same layouts. The
// functions are static: the per-ISA CPU builds each compile them with their
// own instruction set, and one merged copy could be the AVX-512 build.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace fusednn {

struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  int64_t stride_outer;  // elements
  int64_t stride_channel;
  int64_t stride_inner;
};

// Merges dimensions [begin, end) of an array (byte strides, item size
// `item`) into one extent of `size` elements spaced `stride` elements
// apart; false if they do not form one. Length-1 dimensions never matter.
static inline bool merge_extent(const int64_t* shape, const int64_t* strides, int item,
                                int begin, int end, int64_t& size, int64_t& stride) {
  size = 1;
  stride = 1;
  bool found = false;
  bool merges = true;
  int64_t next = 0;
  for (int d = end - 1; d >= begin; --d) {
    size *= shape[d];
    if (shape[d] == 1) continue;
    const int64_t s = strides[d] / item;
    if (!found) {
      stride = s;
      found = true;
    } else if (s != next) {
      merges = false;
    }
    next = s * shape[d];
  }
  return merges || size == 0;
}

// Throws std::invalid_argument when the dimensions on either side of the
// axis do not merge (the Python layer copies such inputs first).
static inline ChannelLayout channel_layout(const int64_t* shape, const int64_t* strides,
                                           int ndim, int item, int axis) {
  if (axis < 0 || axis >= ndim) throw std::invalid_argument("batch_norm: axis out of range");
  ChannelLayout v;
  v.channels = shape[axis];
  v.stride_channel = strides[axis] / item;
  if (!merge_extent(shape, strides, item, 0, axis, v.outer, v.stride_outer) ||
      !merge_extent(shape, strides, item, axis + 1, ndim, v.inner, v.stride_inner))
    throw std::invalid_argument("batch_norm: the dimensions around the channel axis must merge");
  return v;
}

static inline bool is_contiguous_layout(const int64_t* shape, const int64_t* strides, int ndim,
                                        int item) {
  int64_t size, stride;
  return merge_extent(shape, strides, item, 0, ndim, size, stride) && (stride == 1 || size <= 1);
}

}  // namespace fusednn
