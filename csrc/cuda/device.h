// Host-side queries of the CUDA runtime, callable without nvcc-specific
// headers so the bindings stay plain C++.
#pragma once

#include <string>

namespace fusednn {
namespace cuda {

int runtime_version();
// The installed driver's CUDA version (e.g. 12040 for 12.4), 0 without a
// driver.
int driver_version();
int device_count();
// Why device_count() is 0: the runtime's error name (cudaErrorNoDevice,
// cudaErrorInsufficientDriver, ...), or "" when the driver lists devices.
std::string device_error();

}  // namespace cuda
}  // namespace fusednn
