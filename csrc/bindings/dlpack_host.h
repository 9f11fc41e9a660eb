// DLPack's legacy (unversioned) structures, as torch's _to_dlpack makes
// them (dlpack.h, ABI stable since v0.2): how the CPU module reads a torch
// CPU tensor's pointer, dtype, shape and strides in one call instead of
// one Python call per attribute.
#pragma once

#include <Python.h>

#include <cstdint>

namespace fusednn {
namespace bindings {
namespace dlpack {

struct Device {
  int32_t device_type;  // 1: CPU
  int32_t device_id;
};
struct DataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null for a compact row-major tensor
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

constexpr int32_t kCpu = 1;
constexpr uint8_t kFloat = 2;

// A torch tensor's DLPack export, as the CPU module reads every tensor:
// the capsule (a new reference) with its structures in *managed, or null.
// Null without a Python error: a negative view (its memory holds the
// negated values, which the export does not resolve) or a capsule of
// another kind; null with one: what is_neg() or the export raised.
inline PyObject* export_tensor(PyObject* tensor, PyObject* to_dlpack, ManagedTensor*& managed) {
  static PyObject* const is_neg_name = PyUnicode_InternFromString("is_neg");
  PyObject* const negative = PyObject_CallMethodNoArgs(tensor, is_neg_name);
  if (negative == nullptr) return nullptr;
  const int is_negative = PyObject_IsTrue(negative);
  Py_DECREF(negative);
  if (is_negative != 0) return nullptr;
  PyObject* const capsule = PyObject_CallOneArg(to_dlpack, tensor);
  if (capsule == nullptr) return nullptr;
  managed = static_cast<ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    Py_DECREF(capsule);
    return nullptr;
  }
  return capsule;
}

// t's strides in bytes (DLPack's are in elements, and absent for a
// compact row-major tensor).
template <class Index>
void byte_strides(const Tensor& t, int64_t itemsize, Index* strides) {
  int64_t step = itemsize;
  for (int d = t.ndim - 1; d >= 0; --d) {
    strides[d] = static_cast<Index>(t.strides != nullptr ? t.strides[d] * itemsize : step);
    step *= t.shape[d];
  }
}

}  // namespace dlpack
}  // namespace bindings
}  // namespace fusednn
