// Turns numpy arrays into the ArrayRef views the CPU kernels take. The
// Python layer has already validated the arguments; these checks only make
// sure that a direct call into the private module cannot crash.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/array.h"

namespace fusednn {
namespace bindings {

namespace py = pybind11;

class ArrayView {
 public:
  ArrayView(const py::array& array, bool writable, const char* name) : array_(array) {
    const py::dtype dt = array.dtype();
    if (dt.is(py::dtype::of<float>())) {
      dtype_ = cpu::DType::float32;
    } else if (dt.is(py::dtype::of<double>())) {
      dtype_ = cpu::DType::float64;
    } else if (dt.equal(py::dtype::of<float>()) && dt.byteorder() != '>') {
      dtype_ = cpu::DType::float32;
    } else if (dt.equal(py::dtype::of<double>()) && dt.byteorder() != '>') {
      dtype_ = cpu::DType::float64;
    } else if (dt.kind() == 'f' && dt.itemsize() == 2 && dt.byteorder() != '>') {
      dtype_ = cpu::DType::float16;
    } else if (dt.itemsize() == 2 && py::str(dt.attr("name")).cast<std::string>() == "bfloat16") {
      dtype_ = cpu::DType::bfloat16;  // ml_dtypes.bfloat16, numpy's only bfloat16
    } else {
      throw py::type_error(std::string(name) +
                           ": dtype must be float32, float64, float16 or bfloat16");
    }
    if (writable && !array.writeable())
      throw py::value_error(std::string(name) + " is read-only");
    const int item = cpu::itemsize(dtype_);
    if (array.itemsize() != item) throw py::type_error(std::string(name) + ": bad item size");
    for (py::ssize_t d = 0; d < array.ndim(); ++d) {
      shape_.push_back(array.shape(d));
      strides_.push_back(array.strides(d));
      if (array.strides(d) % item != 0)
        throw py::value_error(std::string(name) + ": strides must be multiples of the item size");
    }
    if (reinterpret_cast<uintptr_t>(array.data()) % item != 0)
      throw py::value_error(std::string(name) + " is not aligned");
    ref_.data = const_cast<void*>(array.data());
    ref_.dtype = dtype_;
    ref_.ndim = static_cast<int>(array.ndim());
    ref_.shape = shape_.data();
    ref_.strides = strides_.data();
  }

  const cpu::ArrayRef& ref() const { return ref_; }
  cpu::DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }

 private:
  py::array array_;
  cpu::DType dtype_;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
  cpu::ArrayRef ref_{};
};

// For the kernels that take float32 and float64 only.
inline void require_full_precision(const ArrayView& a, const char* name) {
  if (cpu::is_half(a.dtype()))
    throw py::type_error(std::string(name) + ": dtype must be float32 or float64");
}

inline void require_same(const ArrayView& a, const ArrayView& b, const char* what) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape())
    throw py::value_error(std::string(what) + ": arrays differ in shape or dtype");
}

}  // namespace bindings
}  // namespace fusednn
