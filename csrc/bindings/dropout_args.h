// The dropout parameters both backends take, formed once from the Python
// arguments: the Philox key and stream, the keep threshold of the mask
// contract and the 1 / keep scale (0 when everything is dropped). Templated
// on the backend's spec struct (cpu::DropoutSpec or cuda::DropoutSpec).
#pragma once

#include <cstdint>

#include "fusednn/philox.h"

namespace fusednn {
namespace bindings {

template <class Spec> Spec dropout_spec(double p, uint64_t seed, uint64_t offset) {
  Spec spec;
  const double keep = 1.0 - p;
  spec.seed = seed;
  spec.offset = offset;
  spec.threshold = philox::dropout_threshold(keep);
  spec.scale = keep > 0.0 ? 1.0 / keep : 0.0;
  return spec;
}

}  // namespace bindings
}  // namespace fusednn
