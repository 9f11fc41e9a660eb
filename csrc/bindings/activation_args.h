// Turns the activation arguments that the Python layer passes (an integer
// id in fn.ACTIVATIONS order and the parameters a, b and the GELU flag) into
// the kernels' Activation and ActivationParams; shared by every binding
// that takes an activation (CPU and CUDA, plain and fused).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "fusednn/activations.h"

namespace fusednn {
namespace bindings {

inline Activation activation_from_id(int id) {
  if (id < 0 || id >= static_cast<int>(Activation::count))
    throw pybind11::value_error("unknown activation id " + std::to_string(id));
  return static_cast<Activation>(id);
}

}  // namespace bindings
}  // namespace fusednn
