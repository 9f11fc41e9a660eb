// CUDA runtime queries: the runtime version the module was linked with and
// the number of devices the driver exposes (0, not an error, when there is
// no driver or no device).
#include <cuda_runtime.h>

#include "cuda/device.h"

namespace fusednn {
namespace cuda {

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
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

}  // namespace cuda
}  // namespace fusednn
