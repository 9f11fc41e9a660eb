// DLPack's legacy (unversioned) structures, as torch's _to_dlpack makes
// them (dlpack.h, ABI stable since v0.2): how the CPU module reads a torch
// CPU tensor's pointer, dtype, shape and strides in one call instead of
// one Python call per attribute.
#pragma once

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

}  // namespace dlpack
}  // namespace bindings
}  // namespace fusednn
