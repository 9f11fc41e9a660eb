// What the elementwise CUDA kernel families share: CUDA errors turned into
// C++ exceptions, the device and stream a launch runs on, grids sized from
// the device, the storage types (float16 and bfloat16 kept as raw bits and
// computed in float32), 16-byte packs, and the strided layout that merges the
// dimensions every operand steps through contiguously. Kernels index with
// 64-bit integers throughout, so arrays past 2^31 elements work.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/array.h"

namespace fusednn {
namespace cuda {

constexpr int kThreads = 256;
// Dimensions left after merging; more cannot be described to a kernel.
constexpr int kMaxLayoutDims = 16;

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fusednn CUDA: ") + what + ": " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

// Launch errors (bad configuration, no kernel image for this GPU) and the
// sticky errors of earlier kernels both surface here, after the launch.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// Makes `device` current for the launches in scope and restores the caller's
// device afterwards, so that a call never changes the thread's state.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

inline cudaStream_t stream_of(const LaunchTarget& target) {
  return reinterpret_cast<cudaStream_t>(target.stream);
}

// Blocks for a grid-stride loop over `work` items: enough to fill every
// multiprocessor at full occupancy, no more (extra blocks would only
// re-launch the same loop). Attributes are cached per device.
inline unsigned grid_for(int64_t work, int device) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> resident_blocks[kCachedDevices];
  int blocks = device >= 0 && device < kCachedDevices ? resident_blocks[device].load() : 0;
  if (blocks == 0) {
    int sms = 0;
    int threads_per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor,
                                      device),
               "cudaDeviceGetAttribute");
    blocks = std::max(1, sms * std::max(1, threads_per_sm / kThreads));
    if (device >= 0 && device < kCachedDevices) resident_blocks[device].store(blocks);
  }
  const int64_t needed = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(needed, blocks)));
}

__device__ __forceinline__ int64_t global_thread() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// How each dtype is stored and in which type it is computed: float16 and
// bfloat16 are moved as their 16 bits and computed in float32, rounded once
// on the way out (from_double: once from a float64 sum).
template <DType D> struct Storage;

template <> struct Storage<DType::float32> {
  using Stored = float;
  using Compute = float;
  static __device__ __forceinline__ Compute load(Stored s) { return s; }
  static __device__ __forceinline__ Stored store(Compute c) { return c; }
};

template <> struct Storage<DType::float64> {
  using Stored = double;
  using Compute = double;
  static __device__ __forceinline__ Compute load(Stored s) { return s; }
  static __device__ __forceinline__ Stored store(Compute c) { return c; }
};

template <> struct Storage<DType::float16> {
  using Stored = unsigned short;
  using Compute = float;
  static __device__ __forceinline__ Compute load(Stored s) { return __half2float(__ushort_as_half(s)); }
  static __device__ __forceinline__ Stored store(Compute c) {
    return __half_as_ushort(__float2half_rn(c));
  }
  static __device__ __forceinline__ Stored from_double(double d) {
    return __half_as_ushort(__double2half(d));
  }
};

template <> struct Storage<DType::bfloat16> {
  using Stored = unsigned short;
  using Compute = float;
  static __device__ __forceinline__ Compute load(Stored s) {
    return __bfloat162float(__ushort_as_bfloat16(s));
  }
  static __device__ __forceinline__ Stored store(Compute c) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(c));
  }
  static __device__ __forceinline__ Stored from_double(double d) {
    return __bfloat16_as_ushort(__double2bfloat16(d));
  }
};

// 16 bytes of elements, loaded and stored as one vector access.
template <class S> struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(S);
  S v[kSize];
};

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Calls fn(dtype tag) with the Storage for `d`.
template <class Fn> void visit_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::float64: fn(Storage<DType::float64>{}); return;
    case DType::float16: fn(Storage<DType::float16>{}); return;
    case DType::bfloat16: fn(Storage<DType::bfloat16>{}); return;
    case DType::float32: fn(Storage<DType::float32>{}); return;
  }
  throw std::invalid_argument("unknown dtype code");
}

// N operands of one shape, in element strides, with length-1 dimensions
// dropped and neighbours merged where every operand steps over them as one
// extent. With `any_order`, dimensions are first sorted by the last
// operand's stride, so that e.g. transposed arrays still merge into one run
// (only for kernels whose result does not depend on the element's logical
// position). Passed to kernels by value.
template <int N> struct Layout {
  int ndim = 0;
  int64_t size = 0;
  int64_t shape[kMaxLayoutDims];
  int64_t strides[N][kMaxLayoutDims];

  bool contiguous() const {
    if (ndim != 1) return false;
    for (int k = 0; k < N; ++k)
      if (strides[k][0] != 1) return false;
    return true;
  }

  // Element k's offset, in elements, for flat index i of the merged shape.
  __device__ __forceinline__ void offsets(int64_t i, int64_t (&off)[N]) const {
    for (int k = 0; k < N; ++k) off[k] = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t extent = shape[d];
      const int64_t q = i / extent;
      const int64_t index = i - q * extent;
      i = q;
      for (int k = 0; k < N; ++k) off[k] += index * strides[k][d];
    }
  }
};

template <int N>
Layout<N> make_layout(const DeviceArrayRef* const (&ops)[N], bool any_order) {
  const DeviceArrayRef& first = *ops[0];
  const int item = itemsize(first.dtype);
  int order[64];
  int kept = 0;
  int64_t size = 1;
  for (int d = 0; d < first.ndim; ++d) {
    size *= first.shape[d];
    if (first.shape[d] != 1) {
      if (kept == 64) throw std::invalid_argument("arrays have more than 64 dimensions");
      order[kept++] = d;
    }
  }
  if (any_order) {
    const DeviceArrayRef& last = *ops[N - 1];
    std::stable_sort(order, order + kept, [&](int a, int b) {
      const int64_t sa = last.strides[a] < 0 ? -last.strides[a] : last.strides[a];
      const int64_t sb = last.strides[b] < 0 ? -last.strides[b] : last.strides[b];
      return sa > sb;
    });
  }
  Layout<N> layout;
  layout.size = size;
  // Outermost to innermost; a dimension merges into the previous one when
  // every operand's previous stride spans exactly this dimension's extent.
  for (int j = 0; j < kept; ++j) {
    const int d = order[j];
    bool mergeable = layout.ndim > 0;
    for (int k = 0; k < N && mergeable; ++k)
      mergeable = layout.strides[k][layout.ndim - 1] == (ops[k]->strides[d] / item) * first.shape[d];
    if (mergeable) {
      layout.shape[layout.ndim - 1] *= first.shape[d];
      for (int k = 0; k < N; ++k) layout.strides[k][layout.ndim - 1] = ops[k]->strides[d] / item;
      continue;
    }
    if (layout.ndim == kMaxLayoutDims)
      throw std::invalid_argument("arrays with more than 16 dimensions that cannot be merged "
                                  "are not supported; make them contiguous first");
    layout.shape[layout.ndim] = first.shape[d];
    for (int k = 0; k < N; ++k) layout.strides[k][layout.ndim] = ops[k]->strides[d] / item;
    ++layout.ndim;
  }
  if (layout.ndim == 0) {
    layout.ndim = 1;
    layout.shape[0] = 1;
    for (int k = 0; k < N; ++k) layout.strides[k][0] = 1;
  }
  return layout;
}

}  // namespace cuda
}  // namespace fusednn
