// Host-side queries of the CUDA runtime, callable without nvcc-specific
// headers so the bindings stay plain C++.
#pragma once

namespace fusednn {
namespace cuda {

int runtime_version();
int device_count();

}  // namespace cuda
}  // namespace fusednn
