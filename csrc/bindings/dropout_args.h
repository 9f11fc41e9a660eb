// The dropout parameters both backends take, formed once from the Python
// arguments: the Philox key and stream, the global index of the call's
// first element, the keep threshold of the mask contract and the 1 / keep
// scale (0 when everything is dropped). Templated on the backend's spec
// struct (cpu::DropoutSpec or cuda::DropoutSpec).
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "fusednn/philox.h"

namespace fusednn {
namespace bindings {

// n elements from global index `start`: every index start + i must fit in
// 64 bits (the Python layer says so first; this guards the kernels).
template <class Spec>
Spec dropout_spec(double p, uint64_t seed, uint64_t offset, uint64_t start, int64_t n,
                  const char* function) {
  if (n > 0 && start > std::numeric_limits<uint64_t>::max() - static_cast<uint64_t>(n - 1))
    throw std::invalid_argument(std::string(function) + ": start + n must not exceed 2**64");
  Spec spec;
  const double keep = 1.0 - p;
  spec.seed = seed;
  spec.offset = offset;
  spec.start = start;
  spec.threshold = philox::dropout_threshold(keep);
  spec.scale = keep > 0.0 ? 1.0 / keep : 0.0;
  return spec;
}

}  // namespace bindings
}  // namespace fusednn
