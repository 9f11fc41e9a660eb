// The CPU module's quick paths: batch_norm, batch_norm_backward, the
// forward activations and activation_backward for calls of the ordinary
// kind, checked, allocated, run and wrapped back in one call from Python.
// The public functions try
// them first. A call is ordinary when every array is a numpy array or a
// torch CPU tensor (all of one library) of float32 or float64, aligned and
// in native byte order, with elements; per-channel arrays have the right
// shape and dtype; outputs (out=, running statistics in training) are
// writable, without overlapping elements and apart from every other
// operand (or the very input they overwrite, where the function allows
// in place); the scalars are plain bool, float and int of valid values.
// Anything else, every error included, is declined: None comes back with
// nothing written, and the function takes its general path, which raises
// the errors, makes the copies and handles the other libraries and dtypes.
// So these paths add no rule of their own; they skip the Python work an
// ordinary call does not need (descriptor objects, one look-up per check,
// a Python call per allocation), which at (32, 64) cost more than the
// kernel. Python's C API directly (METH_FASTCALL, no pybind11 wrappers).
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <new>

#include "bindings/byte_extent.h"
#include "bindings/dlpack_host.h"
#include "bindings/without_gil.h"
#include "cpu/activations.h"
#include "cpu/batchnorm.h"
#include "cpu/isa.h"
#include "fusednn/activations.h"

namespace py = pybind11;

namespace fusednn {
namespace bindings {

namespace {

using npy = py::detail::npy_api;

// Arrays with more dimensions take the general path.
constexpr int kMaxDims = 32;

// torch's side, handed over by register_torch once a torch tensor has
// arrived (torch is never imported here): the exact types taken (subclasses
// such as fake or functional tensors are declined), torch._C._to_dlpack
// and torch._C._from_dlpack.
struct TorchApi {
  PyObject* tensor = nullptr;
  PyObject* parameter = nullptr;
  PyObject* to_dlpack = nullptr;
  PyObject* from_dlpack = nullptr;
} torch_api;

// fusednn.BatchNormResult (a named tuple), handed over by
// register_batch_norm_result.
PyTypeObject* batch_norm_result = nullptr;

enum class Library { none, numpy, torch };

// One array argument as the kernels read it, with the bytes it spans.
struct HostArray {
  char* data = nullptr;
  int ndim = 0;
  int type_num = 0;  // NPY_FLOAT or NPY_DOUBLE
  int64_t itemsize = 0;
  bool writable = false;
  int64_t size = 1;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];  // bytes
  int64_t low = 0, high = 0;  // [low, high)
  PyObject* capsule = nullptr;  // a torch tensor's export, held for the call

  HostArray() = default;
  HostArray(const HostArray&) = delete;
  HostArray& operator=(const HostArray&) = delete;
  ~HostArray() { Py_XDECREF(capsule); }

  cpu::ArrayRef ref() const {
    cpu::ArrayRef r{};
    r.data = data;
    r.dtype = itemsize == 8 ? cpu::DType::float64 : cpu::DType::float32;
    r.ndim = ndim;
    r.shape = shape;
    r.strides = strides;
    return r;
  }
};

// Size and extent; arrays without elements are declined.
bool finish(HostArray& a) {
  a.size = 1;
  for (int d = 0; d < a.ndim; ++d) a.size *= a.shape[d];
  if (a.size == 0) return false;
  const ByteExtent extent = byte_extent(a.data, a.ndim, a.shape, a.strides, a.itemsize);
  a.low = extent.low;
  a.high = extent.high;
  return true;
}

bool read_numpy(PyObject* o, HostArray& a) {
  const auto* p = reinterpret_cast<const py::detail::PyArray_Proxy*>(o);
  const auto* descr = reinterpret_cast<const py::detail::PyArrayDescr_Proxy*>(p->descr);
  if (descr->byteorder == '>' || (p->flags & npy::NPY_ARRAY_ALIGNED_) == 0 ||
      p->nd > kMaxDims)
    return false;
  if (descr->type_num == npy::NPY_FLOAT_) {
    a.itemsize = 4;
  } else if (descr->type_num == npy::NPY_DOUBLE_) {
    a.itemsize = 8;
  } else {
    return false;
  }
  a.type_num = descr->type_num;
  a.writable = (p->flags & npy::NPY_ARRAY_WRITEABLE_) != 0;
  a.data = p->data;
  a.ndim = p->nd;
  for (int d = 0; d < a.ndim; ++d) {
    a.shape[d] = p->dimensions[d];
    a.strides[d] = p->strides[d];
  }
  return finish(a);
}

// A torch tensor through its DLPack export (see torch_view in
// module_cpu.cpp for why not Tensor.numpy()). Negative views are declined:
// their memory holds the negated values.
bool read_torch(PyObject* o, HostArray& a) {
  dlpack::ManagedTensor* managed = nullptr;
  a.capsule = dlpack::export_tensor(o, torch_api.to_dlpack, managed);
  if (a.capsule == nullptr) {
    PyErr_Clear();
    return false;
  }
  const dlpack::Tensor& t = managed->dl_tensor;
  if (t.device.device_type != dlpack::kCpu || t.dtype.code != dlpack::kFloat ||
      t.dtype.lanes != 1 || (t.dtype.bits != 32 && t.dtype.bits != 64) || t.ndim < 0 ||
      t.ndim > kMaxDims)
    return false;
  a.itemsize = t.dtype.bits / 8;
  a.type_num = t.dtype.bits == 32 ? npy::NPY_FLOAT_ : npy::NPY_DOUBLE_;
  a.writable = true;
  a.data = static_cast<char*>(t.data) + t.byte_offset;
  a.ndim = t.ndim;
  for (int d = 0; d < a.ndim; ++d) a.shape[d] = t.shape[d];
  dlpack::byte_strides(t, a.itemsize, a.strides);
  if (t.data == nullptr || reinterpret_cast<std::uintptr_t>(a.data) % a.itemsize != 0)
    return false;
  return finish(a);
}

// Reads o into a when it is an ordinary array of `library` (none: the first
// array, which sets it).
bool read(PyObject* o, Library& library, HostArray& a) {
  Library kind;
  if (Py_TYPE(o) == npy::get().PyArray_Type_) {
    kind = Library::numpy;
  } else if (torch_api.tensor != nullptr &&
             (Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(torch_api.tensor) ||
              Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(torch_api.parameter))) {
    kind = Library::torch;
  } else {
    return false;
  }
  if (library != Library::none && library != kind) return false;
  library = kind;
  return kind == Library::numpy ? read_numpy(o, a) : read_torch(o, a);
}

bool c_contiguous(const HostArray& a) {
  int64_t expected = a.itemsize;
  for (int d = a.ndim - 1; d >= 0; --d) {
    if (a.shape[d] != 1 && a.strides[d] != expected) return false;
    expected *= a.shape[d];
  }
  return true;
}

// Whether dimensions [begin, end) form one strided extent (batchnorm.py's
// _merges).
bool merges(const HostArray& a, int begin, int end) {
  int previous = -1;
  for (int d = begin; d < end; ++d) {
    if (a.shape[d] == 1) continue;
    if (previous >= 0 && a.strides[previous] != a.strides[d] * a.shape[d]) return false;
    previous = d;
  }
  return true;
}

// What the reductions walk without a copy (batchnorm.py's _channel_viewable).
bool channel_viewable(const HostArray& a, int axis) {
  return c_contiguous(a) || (merges(a, 0, axis) && merges(a, axis + 1, a.ndim));
}

// Rotates dimensions [axis, ndim) of a's view by one, the channel axis
// going last (towards: true) or back from last (false): the same memory,
// as torch's movedim(axis, -1) and its inverse view it.
void rotate(HostArray& a, int axis, bool towards) {
  const int last = a.ndim - 1;
  const int64_t shape = towards ? a.shape[axis] : a.shape[last];
  const int64_t stride = towards ? a.strides[axis] : a.strides[last];
  if (towards) {
    for (int d = axis; d < last; ++d) {
      a.shape[d] = a.shape[d + 1];
      a.strides[d] = a.strides[d + 1];
    }
    a.shape[last] = shape;
    a.strides[last] = stride;
  } else {
    for (int d = last; d > axis; --d) {
      a.shape[d] = a.shape[d - 1];
      a.strides[d] = a.strides[d - 1];
    }
    a.shape[axis] = shape;
    a.strides[axis] = stride;
  }
}

// For fusednn.torch's operators, given x of a channels_last layout (its
// channel axis 1 innermost in memory, the rest in C order): x read with
// the channel axis moved last, which the kernels stream through as
// channels-last (NC layout) instead of striding across it; the operators'
// other tensors follow with move_like. True when moved.
bool move_channels_last(HostArray& x, int axis) {
  if (axis != 1 || x.ndim < 3 || c_contiguous(x)) return false;
  rotate(x, axis, true);
  if (c_contiguous(x)) return true;
  rotate(x, axis, false);
  return false;
}

bool same_shape(const HostArray& a, const HostArray& b) {
  if (a.ndim != b.ndim) return false;
  for (int d = 0; d < a.ndim; ++d)
    if (a.shape[d] != b.shape[d]) return false;
  return true;
}

bool per_channel(const HostArray& a, int64_t channels) {
  return a.ndim == 1 && a.shape[0] == channels;
}

// A (C,) array written in place: no two elements at one address.
bool elements_apart(const HostArray& a) {
  return a.shape[0] <= 1 || a.strides[0] >= a.itemsize || a.strides[0] <= -a.itemsize;
}

bool meet(const HostArray& a, const HostArray& b) { return a.low < b.high && b.low < a.high; }

// The same elements at the same addresses.
bool same_view(const HostArray& a, const HostArray& b) {
  if (a.data != b.data || !same_shape(a, b)) return false;
  for (int d = 0; d < a.ndim; ++d)
    if (a.strides[d] != b.strides[d]) return false;
  return true;
}

// Whether `a` is apart from every present array of `others`.
template <size_t N> bool apart(const HostArray& a, const HostArray* const (&others)[N]) {
  for (const HostArray* other : others)
    if (other != nullptr && other != &a && meet(a, *other)) return false;
  return true;
}

// An optional array argument (None: absent): false when declined.
bool read_optional(PyObject* o, Library& library, HostArray& a, const HostArray*& present) {
  if (o == Py_None) {
    present = nullptr;
    return true;
  }
  present = &a;
  return read(o, library, a);
}

// A new C-contiguous numpy array, read into `view`; null with a Python
// error set when numpy cannot allocate it.
PyObject* new_numpy(int ndim, const int64_t* shape, int type_num, HostArray& view) {
  const auto& api = npy::get();
  Py_intptr_t dims[kMaxDims];
  for (int d = 0; d < ndim; ++d) dims[d] = static_cast<Py_intptr_t>(shape[d]);
  PyObject* const array = api.PyArray_NewFromDescr_(
      api.PyArray_Type_, api.PyArray_DescrFromType_(type_num), ndim, dims, nullptr, nullptr, 0,
      nullptr);
  if (array != nullptr) read_numpy(array, view);
  return array;
}

// A torch tensor's memory made here and handed to torch through DLPack:
// cheaper than a numpy array and torch.from_numpy over it (no numpy object
// to make and release, fewer arguments to parse). Torch frees it with the
// tensor, through the deleter, from whichever thread releases it last.
struct TensorBuffer {
  dlpack::ManagedTensor managed;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];  // elements
};

void free_tensor_buffer(dlpack::ManagedTensor* managed) {
  std::free(managed->dl_tensor.data);
  delete static_cast<TensorBuffer*>(managed->manager_ctx);
}

// A capsule torch did not take still owns its buffer.
void release_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;  // "used_dltensor": torch's now
  auto* const managed =
      static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  managed->deleter(managed);
}

// Allocation alignment: torch's CPU allocator's.
constexpr size_t kTensorAlignment = 64;

PyObject* new_tensor(int ndim, const int64_t* shape, int type_num, HostArray& view) {
  const int64_t itemsize = type_num == npy::NPY_DOUBLE_ ? 8 : 4;
  int64_t elements = 1;
  for (int d = 0; d < ndim; ++d) elements *= shape[d];
  const size_t bytes = static_cast<size_t>(elements * itemsize);
  const size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  void* const data = std::aligned_alloc(kTensorAlignment, rounded > 0 ? rounded : kTensorAlignment);
  auto* const buffer = data != nullptr ? new (std::nothrow) TensorBuffer : nullptr;
  if (buffer == nullptr) {
    std::free(data);
    return PyErr_NoMemory();
  }
  int64_t step = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    buffer->shape[d] = shape[d];
    buffer->strides[d] = step;
    step *= shape[d];
  }
  dlpack::Tensor& t = buffer->managed.dl_tensor;
  t.data = data;
  t.device = {dlpack::kCpu, 0};
  t.ndim = ndim;
  t.dtype = {dlpack::kFloat, static_cast<uint8_t>(itemsize * 8), 1};
  t.shape = buffer->shape;
  t.strides = buffer->strides;
  t.byte_offset = 0;
  buffer->managed.manager_ctx = buffer;
  buffer->managed.deleter = free_tensor_buffer;
  PyObject* const capsule = PyCapsule_New(&buffer->managed, "dltensor", release_capsule);
  if (capsule == nullptr) {
    free_tensor_buffer(&buffer->managed);
    return nullptr;
  }
  PyObject* const tensor = PyObject_CallOneArg(torch_api.from_dlpack, capsule);
  Py_DECREF(capsule);  // frees the buffer unless torch took it
  if (tensor == nullptr) return nullptr;
  view.data = static_cast<char*>(data);
  view.ndim = ndim;
  view.type_num = type_num;
  view.itemsize = itemsize;
  view.writable = true;
  for (int d = 0; d < ndim; ++d) {
    view.shape[d] = shape[d];
    view.strides[d] = buffer->strides[d] * itemsize;
  }
  finish(view);
  return tensor;
}

// A new C-contiguous array of the caller's library (a numpy array, or a
// torch tensor), read into `view`; null with a Python error set.
PyObject* new_array(Library library, int ndim, const int64_t* shape, int type_num,
                    HostArray& view) {
  return library == Library::torch ? new_tensor(ndim, shape, type_num, view)
                                   : new_numpy(ndim, shape, type_num, view);
}

// A call's array result: the caller's `out` when given (returned with a
// new reference) or a new array shaped like `like`, released here unless
// handed out by take().
class GivenOrMade {
 public:
  GivenOrMade() = default;
  GivenOrMade(const GivenOrMade&) = delete;
  GivenOrMade& operator=(const GivenOrMade&) = delete;
  ~GivenOrMade() { Py_XDECREF(made_); }

  // False with a Python error set when the new array cannot be made.
  bool make(Library library, const HostArray* given, PyObject* given_object,
            const HostArray& like) {
    given_ = given;
    given_object_ = given_object;
    if (given != nullptr) return true;
    made_ = new_array(library, like.ndim, like.shape, like.type_num, fresh_);
    return made_ != nullptr;
  }
  const HostArray& array() const { return given_ != nullptr ? *given_ : fresh_; }
  // A new reference to the result.
  PyObject* take() {
    if (given_ != nullptr) {
      Py_INCREF(given_object_);
      return given_object_;
    }
    PyObject* const made = made_;
    made_ = nullptr;
    return made;
  }

 private:
  const HostArray* given_ = nullptr;
  PyObject* given_object_ = nullptr;
  HostArray fresh_;
  PyObject* made_ = nullptr;
};

// Runs a kernel without the GIL; false with a Python error set when it
// threw.
template <class Kernel> bool run(Kernel&& kernel) {
  try {
    run_without_gil(kernel);
    return true;
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return false;
}

// A tuple of `type` (a tuple subclass, or tuple) holding the three new
// references, which it steals; null (and the references released) when
// one is null.
PyObject* triple(PyTypeObject* type, PyObject* a, PyObject* b, PyObject* c) {
  PyObject* const items[3] = {a, b, c};
  PyObject* result = nullptr;
  if (a != nullptr && b != nullptr && c != nullptr)
    result = type == &PyTuple_Type ? PyTuple_New(3) : type->tp_alloc(type, 3);
  if (result == nullptr) {
    for (PyObject* item : items) Py_XDECREF(item);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < 3; ++i) PyTuple_SET_ITEM(result, i, items[i]);
  return result;
}

// The channel axis from a plain int in [-ndim, ndim); -1 when declined.
int channel_axis(PyObject* o, int ndim) {
  if (!PyLong_CheckExact(o)) return -1;
  const long axis = PyLong_AsLong(o);
  if (axis == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return -1;
  }
  if (axis < -ndim || axis >= ndim) return -1;
  return static_cast<int>(axis < 0 ? axis + ndim : axis);
}

// activation: None (false) or 'relu' (true); -1 when declined.
int fused_relu(PyObject* o) {
  if (o == Py_None) return 0;
  if (PyUnicode_CheckExact(o) && PyUnicode_CompareWithASCIIString(o, "relu") == 0) return 1;
  return -1;
}

// batch_norm_quick(x, gamma, beta, running_mean, running_var, out,
// training, momentum, eps, axis, activation, channels_last):
// fusednn.batch_norm's BatchNormResult, or None. channels_last (True from
// fusednn.torch's operators only): see move_channels_last; out must then be
// laid out like x.
PyObject* batch_norm_quick(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 12) {
    PyErr_SetString(PyExc_TypeError, "batch_norm_quick takes 12 arguments");
    return nullptr;
  }
  PyObject* const training_arg = args[6];
  PyObject* const momentum_arg = args[7];
  PyObject* const eps_arg = args[8];
  if (batch_norm_result == nullptr || (training_arg != Py_True && training_arg != Py_False) ||
      !PyFloat_CheckExact(momentum_arg) || !PyFloat_CheckExact(eps_arg))
    Py_RETURN_NONE;
  const bool training = training_arg == Py_True;
  const double momentum = PyFloat_AS_DOUBLE(momentum_arg);
  const double eps = PyFloat_AS_DOUBLE(eps_arg);
  const int relu = fused_relu(args[10]);
  if (!(momentum >= 0.0 && momentum <= 1.0) || !(eps > 0.0) || !std::isfinite(eps) || relu < 0)
    Py_RETURN_NONE;
  Library library = Library::none;
  HostArray x, gamma, beta, running_mean, running_var, out;
  const HostArray *g = nullptr, *b = nullptr, *rm = nullptr, *rv = nullptr, *o = nullptr;
  if (!read(args[0], library, x) || x.ndim == 0) Py_RETURN_NONE;
  int axis = channel_axis(args[9], x.ndim);
  if (axis < 0) Py_RETURN_NONE;
  const int moved_from = axis;
  const bool moved = args[11] == Py_True && move_channels_last(x, axis);
  if (moved) axis = x.ndim - 1;
  if (!channel_viewable(x, axis)) Py_RETURN_NONE;
  const int64_t channels = x.shape[axis];
  if (training && x.size / channels < 2) Py_RETURN_NONE;
  if (!read_optional(args[1], library, gamma, g) || !read_optional(args[2], library, beta, b) ||
      !read_optional(args[3], library, running_mean, rm) ||
      !read_optional(args[4], library, running_var, rv) ||
      !read_optional(args[5], library, out, o))
    Py_RETURN_NONE;
  if (moved) {
    if (o == nullptr) Py_RETURN_NONE;  // a new y would have the moved shape
    rotate(out, moved_from, true);
  }
  for (const HostArray* weight : {g, b})
    if (weight != nullptr && (weight->type_num != x.type_num || !per_channel(*weight, channels)))
      Py_RETURN_NONE;
  for (const HostArray* statistic : {rm, rv}) {
    if (statistic == nullptr) {
      if (!training) Py_RETURN_NONE;
      continue;
    }
    if (!per_channel(*statistic, channels)) Py_RETURN_NONE;
    if (training && (!statistic->writable || !elements_apart(*statistic))) Py_RETURN_NONE;
  }
  if (o != nullptr && (!same_shape(*o, x) || o->type_num != x.type_num || !o->writable ||
                       !c_contiguous(*o)))
    Py_RETURN_NONE;
  // What is written must be apart from everything else.
  const HostArray* const operands[] = {o, &x, g, b, rm, rv};
  if ((o != nullptr && !apart(*o, operands)) ||
      (training && ((rm != nullptr && !apart(*rm, operands)) ||
                    (rv != nullptr && !apart(*rv, operands)))))
    Py_RETURN_NONE;

  HostArray mean_view, invstd_view;
  GivenOrMade y;
  if (!y.make(library, o, args[5], x)) return nullptr;
  PyObject* const mean = new_array(library, 1, &channels, x.type_num, mean_view);
  PyObject* const invstd =
      mean != nullptr ? new_array(library, 1, &channels, x.type_num, invstd_view) : nullptr;
  const cpu::ArrayRef xr = x.ref(), yr = y.array().ref(), mr = mean_view.ref(), ir = invstd_view.ref();
  const cpu::ArrayRef gr = gamma.ref(), br = beta.ref();
  const cpu::ArrayRef rmr = running_mean.ref(), rvr = running_var.ref();
  const cpu::BatchNormForwardArgs kernel_args{axis,
                                              training,
                                              momentum,
                                              eps,
                                              g != nullptr ? &gr : nullptr,
                                              b != nullptr ? &br : nullptr,
                                              rm != nullptr ? &rmr : nullptr,
                                              rv != nullptr ? &rvr : nullptr,
                                              &mr,
                                              &ir,
                                              relu == 1};
  if (mean == nullptr || invstd == nullptr ||
      !run([&] { FUSEDNN_ISA_SELECT(batch_norm_forward)(xr, yr, kernel_args); })) {
    Py_XDECREF(mean);
    Py_XDECREF(invstd);
    return nullptr;
  }
  return triple(batch_norm_result, y.take(), mean, invstd);
}

// batch_norm_backward_quick(grad_output, x, gamma, save_mean, save_invstd,
// axis, training, activation, y, out, channels_last):
// fusednn.batch_norm_backward's (grad_input, grad_gamma, grad_beta), or
// None. channels_last as in batch_norm_quick: grad_output, y and out are
// read with x's move. out may be grad_output itself (the same view: the
// kernel reads each gradient before it writes that element), as in the
// general path.
PyObject* batch_norm_backward_quick(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 11) {
    PyErr_SetString(PyExc_TypeError, "batch_norm_backward_quick takes 11 arguments");
    return nullptr;
  }
  PyObject* const training_arg = args[6];
  const int relu = fused_relu(args[7]);
  if ((training_arg != Py_True && training_arg != Py_False) || relu < 0 ||
      (relu == 1) == (args[8] == Py_None) || args[3] == Py_None || args[4] == Py_None)
    Py_RETURN_NONE;
  Library library = Library::none;
  HostArray grad_output, x, gamma, save_mean, save_invstd, relu_output, out;
  const HostArray *g = nullptr, *ro = nullptr, *o = nullptr;
  if (!read(args[0], library, grad_output) || !read(args[1], library, x) || x.ndim == 0 ||
      !same_shape(grad_output, x) || grad_output.type_num != x.type_num)
    Py_RETURN_NONE;
  int axis = channel_axis(args[5], x.ndim);
  if (axis < 0) Py_RETURN_NONE;
  const int moved_from = axis;
  const bool moved = args[10] == Py_True && move_channels_last(x, axis);
  if (moved) {
    axis = x.ndim - 1;
    rotate(grad_output, moved_from, true);
  }
  if (!channel_viewable(x, axis) || !channel_viewable(grad_output, axis)) Py_RETURN_NONE;
  const int64_t channels = x.shape[axis];
  if (!read_optional(args[2], library, gamma, g) || !read(args[3], library, save_mean) ||
      !read(args[4], library, save_invstd) || !read_optional(args[8], library, relu_output, ro) ||
      !read_optional(args[9], library, out, o))
    Py_RETURN_NONE;
  if (moved) {
    if (o == nullptr) Py_RETURN_NONE;  // a new grad_input would have the moved shape
    if (ro != nullptr) rotate(relu_output, moved_from, true);
    rotate(out, moved_from, true);
  }
  if ((g != nullptr && (g->type_num != x.type_num || !per_channel(*g, channels))) ||
      !per_channel(save_mean, channels) || !per_channel(save_invstd, channels))
    Py_RETURN_NONE;
  if (ro != nullptr && (!same_shape(*ro, x) || ro->type_num != x.type_num ||
                        !channel_viewable(*ro, axis)))
    Py_RETURN_NONE;
  if (o != nullptr) {
    const HostArray* const operands[] = {same_view(*o, grad_output) ? nullptr : &grad_output,
                                         &x, g, &save_mean, &save_invstd, ro};
    if (!same_shape(*o, x) || o->type_num != x.type_num || !o->writable || !c_contiguous(*o) ||
        !apart(*o, operands))
      Py_RETURN_NONE;
  }

  HostArray gamma_view, beta_view;
  GivenOrMade grad_input;
  if (!grad_input.make(library, o, args[9], x)) return nullptr;
  PyObject* const grad_gamma = new_array(library, 1, &channels, x.type_num, gamma_view);
  PyObject* const grad_beta =
      grad_gamma != nullptr ? new_array(library, 1, &channels, x.type_num, beta_view) : nullptr;
  const cpu::ArrayRef dyr = grad_output.ref(), xr = x.ref(), gir = grad_input.array().ref();
  const cpu::ArrayRef wr = gamma.ref(), smr = save_mean.ref(), sir = save_invstd.ref();
  const cpu::ArrayRef ggr = gamma_view.ref(), gbr = beta_view.ref(), ror = relu_output.ref();
  const cpu::BatchNormBackwardArgs kernel_args{axis, training_arg == Py_True,
                                               g != nullptr ? &wr : nullptr,
                                               &smr, &sir, &ggr, &gbr,
                                               ro != nullptr ? &ror : nullptr};
  if (grad_gamma == nullptr || grad_beta == nullptr ||
      !run([&] { FUSEDNN_ISA_SELECT(batch_norm_backward)(dyr, xr, gir, kernel_args); })) {
    Py_XDECREF(grad_gamma);
    Py_XDECREF(grad_beta);
    return nullptr;
  }
  return triple(&PyTuple_Type, grad_input.take(), grad_gamma, grad_beta);
}

// The activation and its parameters from an id (fn.ACTIVATIONS order) and
// the tuple (a, b, tanh_approximation) of plain floats and a bool; false
// when declined.
bool activation_of(PyObject* id_arg, PyObject* params, Activation& act, ActivationParams& p) {
  if (!PyLong_CheckExact(id_arg) || !PyTuple_CheckExact(params) || PyTuple_GET_SIZE(params) != 3)
    return false;
  PyObject* const a = PyTuple_GET_ITEM(params, 0);
  PyObject* const b = PyTuple_GET_ITEM(params, 1);
  PyObject* const tanh_approximation = PyTuple_GET_ITEM(params, 2);
  const long id = PyLong_AsLong(id_arg);
  if (id < 0 || id >= static_cast<long>(Activation::count) || !PyFloat_CheckExact(a) ||
      !PyFloat_CheckExact(b) || (tanh_approximation != Py_True && tanh_approximation != Py_False)) {
    PyErr_Clear();
    return false;
  }
  act = static_cast<Activation>(id);
  p = make_activation_params(PyFloat_AS_DOUBLE(a), PyFloat_AS_DOUBLE(b),
                             tanh_approximation == Py_True);
  return true;
}

// An elementwise kernel's out: like `like`, writable, C-contiguous, and
// each input either the very same view (in place) or apart from it.
template <size_t N>
bool elementwise_out(const HostArray& out, const HostArray& like,
                     const HostArray* const (&inputs)[N]) {
  if (!same_shape(out, like) || out.type_num != like.type_num || !out.writable ||
      !c_contiguous(out))
    return false;
  for (const HostArray* input : inputs)
    if (!same_view(out, *input) && meet(out, *input)) return false;
  return true;
}

// activation_quick(activation id, x, out, (a, b, tanh_approximation)): the
// forward activation's result (out itself when given), or None. out may be
// x itself (the same view) or apart from it.
PyObject* activation_quick(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "activation_quick takes 4 arguments");
    return nullptr;
  }
  Activation act;
  ActivationParams p;
  if (!activation_of(args[0], args[3], act, p)) Py_RETURN_NONE;
  Library library = Library::none;
  HostArray x, out;
  const HostArray* o = nullptr;
  if (!read(args[1], library, x) || !read_optional(args[2], library, out, o)) Py_RETURN_NONE;
  const HostArray* const inputs[] = {&x};
  if (o != nullptr && !elementwise_out(*o, x, inputs)) Py_RETURN_NONE;
  GivenOrMade y;
  if (!y.make(library, o, args[2], x)) return nullptr;
  const cpu::ArrayRef xr = x.ref(), yr = y.array().ref();
  if (!run([&] { FUSEDNN_ISA_SELECT(activation_forward)(act, p, xr, yr); })) return nullptr;
  return y.take();
}

// activation_backward_quick(activation id, from_output, grad_output, saved,
// out, (a, b, tanh_approximation)): fusednn.activation_backward's result
// for the derivative from `saved` (the forward's output when from_output,
// else its input), or None. out may be grad_output or saved itself.
PyObject* activation_backward_quick(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "activation_backward_quick takes 6 arguments");
    return nullptr;
  }
  Activation act;
  ActivationParams p;
  PyObject* const from_output = args[1];
  if ((from_output != Py_True && from_output != Py_False) ||
      !activation_of(args[0], args[5], act, p))
    Py_RETURN_NONE;
  Library library = Library::none;
  HostArray grad_output, saved, out;
  const HostArray* o = nullptr;
  if (!read(args[2], library, grad_output) || !read(args[3], library, saved) ||
      !same_shape(grad_output, saved) || grad_output.type_num != saved.type_num ||
      !read_optional(args[4], library, out, o))
    Py_RETURN_NONE;
  const HostArray* const inputs[] = {&grad_output, &saved};
  if (o != nullptr && !elementwise_out(*o, grad_output, inputs)) Py_RETURN_NONE;
  GivenOrMade result;
  if (!result.make(library, o, args[4], grad_output)) return nullptr;
  const cpu::ArrayRef gr = grad_output.ref(), sr = saved.ref(), rr = result.array().ref();
  const bool use_output = from_output == Py_True;
  if (!run([&] {
        FUSEDNN_ISA_SELECT(activation_backward)(act, p, use_output, gr, sr, rr);
      }))
    return nullptr;
  return result.take();
}

PyMethodDef quick_methods[] = {
    {"batch_norm_quick", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                             batch_norm_quick)),
     METH_FASTCALL, "fusednn.batch_norm for an ordinary call, or None (see quick_cpu.cpp)."},
    {"batch_norm_backward_quick", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                                      batch_norm_backward_quick)),
     METH_FASTCALL,
     "fusednn.batch_norm_backward for an ordinary call, or None (see quick_cpu.cpp)."},
    {"activation_quick", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                             activation_quick)),
     METH_FASTCALL, "A forward activation for an ordinary call, or None (see quick_cpu.cpp)."},
    {"activation_backward_quick", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                                      activation_backward_quick)),
     METH_FASTCALL,
     "fusednn.activation_backward for an ordinary call, or None (see quick_cpu.cpp)."},
};

}  // namespace

void bind_quick(py::module_& m) {
  for (PyMethodDef& method : quick_methods)
    m.add_object(method.ml_name,
                 py::reinterpret_steal<py::object>(PyCFunction_New(&method, nullptr)));
  m.def(
      "register_batch_norm_result",
      [](const py::type& type) {
        if (!PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(type.ptr()), &PyTuple_Type))
          throw py::type_error("register_batch_norm_result: expected a tuple subclass");
        Py_XDECREF(batch_norm_result);
        batch_norm_result = reinterpret_cast<PyTypeObject*>(type.inc_ref().ptr());
      },
      "The named tuple batch_norm_quick returns.", py::arg("type"));
  m.def(
      "register_torch",
      [](const py::type& tensor, const py::type& parameter, const py::object& to_dlpack,
         const py::object& from_dlpack) {
        if (torch_api.tensor != nullptr) return;  // once: torch cannot be imported twice
        torch_api = {tensor.inc_ref().ptr(), parameter.inc_ref().ptr(),
                     to_dlpack.inc_ref().ptr(), from_dlpack.inc_ref().ptr()};
      },
      "Lets the quick paths take torch CPU tensors: torch.Tensor, torch.nn.Parameter, "
      "torch._C._to_dlpack and torch._C._from_dlpack.",
      py::arg("tensor"), py::arg("parameter"), py::arg("to_dlpack"), py::arg("from_dlpack"));
}

}  // namespace bindings
}  // namespace fusednn
