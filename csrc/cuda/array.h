// The view of a CuPy array that the CUDA launchers receive: a device
// pointer, dtype, shape and byte strides, plus the device and stream to run
// on. Plain C++ (no CUDA headers), so that the bindings compile with the
// host compiler and never see the kernels.
#pragma once

#include <cstdint>

namespace fusednn {
namespace cuda {

enum class DType : int { float32 = 0, float64 = 1, float16 = 2, bfloat16 = 3 };

inline int itemsize(DType d) {
  return d == DType::float64 ? 8 : (d == DType::float32 ? 4 : 2);
}

struct DeviceArrayRef {
  void* data;              // device memory
  DType dtype;
  int ndim;
  const int64_t* shape;
  const int64_t* strides;  // bytes, each a multiple of the item size
};

// Where a launch runs: the device the arrays live on and the stream (a
// cudaStream_t as an integer; 0 is the legacy default stream).
struct LaunchTarget {
  int device;
  std::uintptr_t stream;
};

}  // namespace cuda
}  // namespace fusednn
