// The one array descriptor both compiled modules take: a pointer, a dtype,
// a shape and byte strides, plus the device and stream of a launch. The
// Python array layer hands each array over in one of two forms, and this
// caster turns either into an Operand:
//   - a numpy array (memory the CPU can address: numpy's own arrays and
//     numpy views of torch, JAX and DLPack CPU arrays), read directly so
//     that a plain numpy call builds no tuple;
//   - a tuple (pointer, dtype code, shape, byte strides, device, stream,
//     ...) for device memory (CuPy, torch CUDA, JAX GPU); items after the
//     sixth belong to the Python layer and are ignored here.
// The Python layer has validated every argument; the checks here only keep
// a direct call into a private module from handing a kernel a malformed
// view. Kernels receive Operand::ref<Ref>() (cpu::ArrayRef or
// cuda::DeviceArrayRef), never Python objects.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fusednn {
namespace bindings {

namespace py = pybind11;

// Dtype codes shared with the Python layer (fusednn._arrays.DTYPE_CODES).
// The kernels' DType enums number their float types the same way.
enum class DTypeCode : int { float32 = 0, float64 = 1, float16 = 2, bfloat16 = 3, uint8 = 4 };

inline int code_itemsize(DTypeCode code) {
  switch (code) {
    case DTypeCode::float64: return 8;
    case DTypeCode::float32: return 4;
    case DTypeCode::float16:
    case DTypeCode::bfloat16: return 2;
    case DTypeCode::uint8: return 1;
  }
  return 0;
}

inline const char* code_name(DTypeCode code) {
  switch (code) {
    case DTypeCode::float32: return "float32";
    case DTypeCode::float64: return "float64";
    case DTypeCode::float16: return "float16";
    case DTypeCode::bfloat16: return "bfloat16";
    case DTypeCode::uint8: return "uint8";
  }
  return "?";
}

struct Operand {
  void* data = nullptr;
  DTypeCode dtype = DTypeCode::float32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // bytes, each a multiple of the item size
  int device = -1;               // -1: memory the CPU addresses; else a CUDA device
  std::uintptr_t stream = 0;     // cudaStream_t as an integer (0: legacy default)
  bool writable = true;

  int64_t size() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }

  // Empty arrays and extents of 1 place no constraint on strides.
  bool c_contiguous() const {
    if (size() == 0) return true;
    int64_t expected = code_itemsize(dtype);
    for (size_t d = shape.size(); d-- > 0;) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }

  // The kernels' view: cpu::ArrayRef or cuda::DeviceArrayRef (same fields,
  // each with its own DType enum numbered like DTypeCode). Points into this
  // Operand, which must outlive it.
  template <class Ref> Ref ref() const {
    Ref r{};
    r.data = data;
    r.dtype = static_cast<decltype(r.dtype)>(static_cast<int>(dtype));
    r.ndim = static_cast<int>(shape.size());
    r.shape = shape.data();
    r.strides = strides.data();
    return r;
  }
};

// One name for the errors below: which argument, in which call.
inline std::string operand_error(const char* function, const char* name, const std::string& what) {
  return std::string(function) + ": " + name + " " + what;
}

inline void require_dtype(const Operand& a, DTypeCode code, const char* function,
                          const char* name) {
  if (a.dtype != code)
    throw py::type_error(operand_error(function, name, "has dtype ") + code_name(a.dtype) +
                         ", expected " + code_name(code));
}

inline void require_writable(const Operand& a, const char* function, const char* name) {
  if (!a.writable) throw py::value_error(operand_error(function, name, "is read-only"));
}

inline void require_same(const Operand& a, const Operand& b, const char* function) {
  if (a.dtype != b.dtype || a.shape != b.shape)
    throw py::value_error(std::string(function) + ": arrays differ in shape or dtype");
  if (a.device != b.device)
    throw py::value_error(std::string(function) + ": arrays on different devices");
}

inline void require_channels(const Operand* a, int64_t channels, const char* function,
                             const char* name) {
  if (a != nullptr && (a->shape.size() != 1 || a->shape[0] != channels))
    throw py::value_error(operand_error(function, name, "must have one value per channel"));
}

inline int checked_axis(const Operand& a, int axis, const char* function) {
  if (axis < 0 || axis >= static_cast<int>(a.shape.size()))
    throw py::value_error(std::string(function) + ": axis out of range");
  return axis;
}

// A bit-packed mask or a scratch buffer: C-contiguous, `bytes` bytes long,
// on `like`'s device; null for None.
inline uint8_t* buffer_pointer(const std::optional<Operand>& buffer, int64_t bytes,
                               const Operand& like, const char* function, const char* name) {
  if (!buffer) return nullptr;
  const int64_t size = buffer->size() * code_itemsize(buffer->dtype);
  if (!buffer->c_contiguous())
    throw py::value_error(operand_error(function, name, "must be C-contiguous"));
  if (size != bytes)
    throw py::value_error(operand_error(function, name, "must hold ") + std::to_string(bytes) +
                          " bytes, got " + std::to_string(size));
  if (buffer->device != like.device)
    throw py::value_error(operand_error(function, name, "is on another device"));
  return static_cast<uint8_t*>(buffer->data);
}

namespace detail {

inline bool dtype_code_of(const py::dtype& dt, DTypeCode& code) {
  if (dt.byteorder() == '>') return false;  // this build runs on little-endian hosts only
  const char kind = dt.kind();
  const auto item = dt.itemsize();
  if (kind == 'f') {
    if (item == 4) code = DTypeCode::float32;
    else if (item == 8) code = DTypeCode::float64;
    else if (item == 2) code = DTypeCode::float16;
    else return false;
    return true;
  }
  if (kind == 'u' && item == 1) {
    code = DTypeCode::uint8;
    return true;
  }
  if (kind == 'V' && item == 2 && py::str(dt).cast<std::string>() == "bfloat16") {
    code = DTypeCode::bfloat16;  // ml_dtypes.bfloat16
    return true;
  }
  return false;
}

inline void check_layout(const Operand& a) {
  const int item = code_itemsize(a.dtype);
  if (a.shape.size() != a.strides.size())
    throw py::value_error("operand: shape and strides differ in length");
  for (size_t d = 0; d < a.shape.size(); ++d) {
    if (a.shape[d] < 0) throw py::value_error("operand: negative extent");
    if (a.strides[d] % item != 0)
      throw py::value_error("operand: strides must be multiples of the item size");
  }
  if (reinterpret_cast<std::uintptr_t>(a.data) % static_cast<std::uintptr_t>(item) != 0)
    throw py::value_error("operand: data is not aligned to its item size");
}

}  // namespace detail

}  // namespace bindings
}  // namespace fusednn

namespace pybind11 {
namespace detail {

template <> struct type_caster<fusednn::bindings::Operand> {
  PYBIND11_TYPE_CASTER(fusednn::bindings::Operand, const_name("Operand"));

  bool load(handle src, bool) {
    using fusednn::bindings::DTypeCode;
    if (isinstance<array>(src)) {
      const auto a = reinterpret_borrow<array>(src);
      if (!fusednn::bindings::detail::dtype_code_of(a.dtype(), value.dtype))
        throw type_error("operand: unsupported dtype " + std::string(str(a.dtype())));
      if (a.itemsize() != fusednn::bindings::code_itemsize(value.dtype))
        throw type_error("operand: bad item size");
      value.data = const_cast<void*>(a.data());
      value.shape.assign(a.shape(), a.shape() + a.ndim());
      value.strides.assign(a.strides(), a.strides() + a.ndim());
      value.device = -1;
      value.stream = 0;
      value.writable = a.writeable();
    } else if (isinstance<tuple>(src)) {
      const auto t = reinterpret_borrow<tuple>(src);
      if (t.size() < 6)
        throw value_error("operand: expected (pointer, dtype, shape, strides, device, stream)");
      value.data = reinterpret_cast<void*>(t[0].cast<std::uintptr_t>());
      const int code = t[1].cast<int>();
      if (code < 0 || code > static_cast<int>(DTypeCode::uint8))
        throw type_error("operand: unknown dtype code " + std::to_string(code));
      value.dtype = static_cast<DTypeCode>(code);
      value.shape = t[2].cast<std::vector<int64_t>>();
      value.strides = t[3].cast<std::vector<int64_t>>();
      value.device = t[4].cast<int>();
      value.stream = t[5].cast<std::uintptr_t>();
      value.writable = true;
    } else {
      return false;
    }
    fusednn::bindings::detail::check_layout(value);
    return true;
  }

  static handle cast(const fusednn::bindings::Operand&, return_value_policy, handle) {
    return none().release();  // never returned to Python
  }
};

}  // namespace detail
}  // namespace pybind11
