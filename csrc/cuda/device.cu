// CUDA runtime queries: the runtime version the module was linked with,
// the driver's version, and the devices the driver exposes. No driver or
// no device is not an error here (the CPU module still works); the reason
// is reported by name instead, so that "driver too old for this runtime"
// reads differently from "no GPU".
#include <cuda_runtime.h>

#include "cuda/device.h"

namespace fusednn {
namespace cuda {

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string device_error() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess) return count > 0 ? "" : cudaGetErrorName(cudaErrorNoDevice);
  cudaGetLastError();
  return cudaGetErrorName(status);
}

}  // namespace cuda
}  // namespace fusednn
