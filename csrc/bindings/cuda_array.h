// Turns the operand tuples the Python layer builds from CuPy arrays,
// (device pointer, dtype code, shape, byte strides), into the
// DeviceArrayRef views the CUDA launchers take. The Python layer has
// already validated the arguments; these checks only keep a direct call
// into the private module from handing a kernel a malformed view.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/array.h"

namespace fusednn {
namespace bindings {

namespace py = pybind11;

class DeviceArrayView {
 public:
  DeviceArrayView(const py::tuple& operand, const char* name) {
    if (operand.size() != 4)
      throw py::value_error(std::string(name) + ": expected (pointer, dtype, shape, strides)");
    const auto pointer = operand[0].cast<std::uintptr_t>();
    const int code = operand[1].cast<int>();
    if (code < 0 || code > static_cast<int>(cuda::DType::bfloat16))
      throw py::type_error(std::string(name) +
                           ": dtype must be float32, float64, float16 or bfloat16");
    shape_ = operand[2].cast<std::vector<int64_t>>();
    strides_ = operand[3].cast<std::vector<int64_t>>();
    if (shape_.size() != strides_.size())
      throw py::value_error(std::string(name) + ": shape and strides differ in length");
    ref_.dtype = static_cast<cuda::DType>(code);
    const int item = cuda::itemsize(ref_.dtype);
    for (size_t d = 0; d < shape_.size(); ++d) {
      if (shape_[d] < 0) throw py::value_error(std::string(name) + ": negative extent");
      if (strides_[d] % item != 0)
        throw py::value_error(std::string(name) + ": strides must be multiples of the item size");
    }
    if (pointer % item != 0) throw py::value_error(std::string(name) + " is not aligned");
    ref_.data = reinterpret_cast<void*>(pointer);
    ref_.ndim = static_cast<int>(shape_.size());
    ref_.shape = shape_.data();
    ref_.strides = strides_.data();
  }

  DeviceArrayView(const DeviceArrayView&) = delete;
  DeviceArrayView& operator=(const DeviceArrayView&) = delete;

  const cuda::DeviceArrayRef& ref() const { return ref_; }
  cuda::DType dtype() const { return ref_.dtype; }
  const std::vector<int64_t>& shape() const { return shape_; }

 private:
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
  cuda::DeviceArrayRef ref_{};
};

inline void require_same(const DeviceArrayView& a, const DeviceArrayView& b, const char* what) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape())
    throw py::value_error(std::string(what) + ": arrays differ in shape or dtype");
}

inline cuda::LaunchTarget launch_target(int device, std::uintptr_t stream) {
  return cuda::LaunchTarget{device, stream};
}

}  // namespace bindings
}  // namespace fusednn
