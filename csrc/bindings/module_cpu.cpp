// The fusednn._cpu extension module: build facts, thread and ISA settings,
// the threaded copy (the bench's memory roof), and the kernel families,
// bound in files shared with _cuda (see backend.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings/backend.h"
#include "bindings/byte_extent.h"
#include "bindings/dlpack_host.h"
#include "cpu/isa.h"
#include "cpu/threadpool.h"

namespace py = pybind11;

namespace fusednn {
namespace bindings {
void bind_activations(py::module_& m);
void bind_batchnorm(py::module_& m);
void bind_dropout(py::module_& m);
void bind_quick(py::module_& m);
}  // namespace bindings
}  // namespace fusednn

namespace {

namespace dlpack = fusednn::bindings::dlpack;

// A numpy array over a torch CPU tensor's memory, as Tensor.numpy() makes
// it but from the tensor's DLPack export: arguments (tensor, to_dlpack),
// to_dlpack being torch._C._to_dlpack. The array's base is the DLPack
// capsule, whose destructor releases the tensor once the array is gone.
// Tensor.numpy() parses its arguments and checks more, and was the larger
// part of what a torch tensor cost a small call over a numpy array; one
// export is about a third of it. Returns None for a tensor this does not
// cover (a dtype other than float16/32/64, a negative view, whose memory
// holds the negated values, memory not on the CPU, no elements), for which
// the caller takes Tensor.numpy()'s path; raises what the export raises (a
// sparse tensor). Python's C API directly (METH_FASTCALL, no pybind11 wrappers):
// this runs once per tensor on every call.
PyObject* torch_view(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "torch_view(tensor, to_dlpack)");
    return nullptr;
  }
  dlpack::ManagedTensor* managed = nullptr;
  PyObject* const capsule = dlpack::export_tensor(args[0], args[1], managed);
  if (capsule == nullptr) {
    if (PyErr_Occurred() != nullptr) return nullptr;
    Py_RETURN_NONE;
  }
  const dlpack::Tensor& t = managed->dl_tensor;
  int type_num = -1;
  if (t.dtype.code == dlpack::kFloat && t.dtype.lanes == 1) {
    if (t.dtype.bits == 32) type_num = py::detail::npy_api::NPY_FLOAT_;
    if (t.dtype.bits == 64) type_num = py::detail::npy_api::NPY_DOUBLE_;
    if (t.dtype.bits == 16) type_num = 23;  // NPY_HALF
  }
  bool empty = false;
  for (int d = 0; d < t.ndim && d < 64; ++d) empty = empty || t.shape[d] == 0;
  // (No elements: numpy would allocate memory of its own for a null data
  // pointer; Tensor.numpy()'s path takes those.)
  if (type_num < 0 || t.device.device_type != dlpack::kCpu || t.ndim > 64 || empty) {
    Py_DECREF(capsule);
    Py_RETURN_NONE;
  }
  const auto& api = py::detail::npy_api::get();
  PyObject* const descr = api.PyArray_DescrFromType_(type_num);  // a new reference
  const Py_ssize_t itemsize = t.dtype.bits / 8;
  Py_ssize_t sizes[64], strides[64];
  for (int d = 0; d < t.ndim; ++d) sizes[d] = static_cast<Py_ssize_t>(t.shape[d]);
  dlpack::byte_strides(t, itemsize, strides);
  PyObject* const array = api.PyArray_NewFromDescr_(
      api.PyArray_Type_, descr, t.ndim, sizes, strides,
      static_cast<char*>(t.data) + t.byte_offset, py::detail::npy_api::NPY_ARRAY_WRITEABLE_,
      nullptr);
  if (array == nullptr) {
    Py_DECREF(capsule);
    return nullptr;
  }
  if (api.PyArray_SetBaseObject_(array, capsule) != 0) {  // steals the capsule
    Py_DECREF(array);
    return nullptr;
  }
  return array;
}

PyMethodDef torch_view_method = {"torch_view", reinterpret_cast<PyCFunction>(
                                     reinterpret_cast<void (*)()>(torch_view)),
                                 METH_FASTCALL, "A numpy view of a torch CPU tensor, or None."};

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  using namespace fusednn;
  m.doc() = "fusednn CPU kernels (private; use the fusednn package)";
  m.attr("version") = FUSEDNN_VERSION;
  m.def("simd", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  m.def("set_simd", [](const std::string& name) {
    if (!cpu::set_isa(name))
      throw py::value_error("SIMD path '" + name + "' is unknown or not supported by this CPU");
  });
  m.def("available_simd", [] {
    py::list names;
    for (auto isa : {cpu::Isa::generic, cpu::Isa::avx2, cpu::Isa::avx512})
      if (cpu::isa_available(isa)) names.append(cpu::isa_name(isa));
    return names;
  });
  m.attr("max_num_threads") = cpu::kMaxThreads;
  m.def("get_num_threads", &cpu::num_threads);
  m.def("set_num_threads", &cpu::set_num_threads);
  m.def("set_thread_pool", [](const std::string& kind) {
    if (kind == "auto") {
      cpu::set_pool_choice(cpu::PoolChoice::automatic);
    } else if (kind == "openmp") {
      cpu::set_pool_choice(cpu::PoolChoice::openmp);
    } else if (kind == "fusednn") {
      cpu::set_pool_choice(cpu::PoolChoice::own);
    } else {
      throw py::value_error("set_thread_pool: kind must be 'auto', 'openmp' or 'fusednn', got '" +
                            kind + "'");
    }
  });
  m.def("get_thread_pool", [] {
    switch (cpu::pool_choice()) {
      case cpu::PoolChoice::openmp: return std::string("openmp");
      case cpu::PoolChoice::own: return std::string("fusednn");
      default: return std::string("auto");
    }
  });
  m.def("openmp_team_available", &cpu::openmp_team_available);
  // The bench's probe of the pool itself: the median seconds of one
  // parallel region over `regions` back-to-back regions, timed here so that
  // no Python call is counted. Each of the region's tasks waits until all
  // have started, so every thread must join: empty tasks would all be run
  // by the caller before a sleeping worker woke, and time nothing.
  m.def("pool_region_seconds", [](int tasks, int regions) {
    if (tasks < 1 || tasks > cpu::num_threads() || regions < 1)
      throw py::value_error("pool_region_seconds: need 1 <= tasks <= get_num_threads(), "
                            "regions >= 1");
    std::vector<double> seconds(regions);
    std::atomic<bool> joined{true};
    {
      py::gil_scoped_release release;
      for (double& s : seconds) {
        std::atomic<int> started{0};
        const auto start = std::chrono::steady_clock::now();
        cpu::parallel_for(tasks, [&](int64_t) {
          started.fetch_add(1);
          // A pool busy with another caller runs the tasks one by one.
          while (started.load() < tasks && joined)
            if (std::chrono::steady_clock::now() - start > std::chrono::seconds(1))
              joined = false;
        });
        s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    }
    if (!joined) throw std::runtime_error("pool_region_seconds: the tasks did not run at once");
    std::nth_element(seconds.begin(), seconds.begin() + regions / 2, seconds.end());
    return seconds[regions / 2];
  }, py::arg("tasks"), py::arg("regions"));
  // The bytes [low, high) each numpy array spans (None for None; empty
  // arrays span none), in one call: the Python layer's overlap checks
  // compare these before any exact test, and reading an array's address
  // from Python (__array_interface__, ctypes) costs more than this call.
  // With `meets`, also which extents meet: entry i has bit j set when
  // arrays i and j (j != i) have a byte of their extents in common, so that
  // a call whose operands are all apart (the usual case) tests one integer
  // per operand in Python instead of comparing every pair.
  struct Extent {
    std::int64_t low = 0, high = 0;
    bool present = false;
  };
  const auto extent_of = [](const py::handle item) {
    Extent e;
    if (item.is_none()) return e;
    if (!py::isinstance<py::array>(item))
      throw py::type_error("byte_extents: expected numpy arrays or None");
    const auto a = py::reinterpret_borrow<py::array>(item);
    e.present = true;
    if (a.size() > 0) {
      const bindings::ByteExtent span = bindings::byte_extent(
          a.data(), static_cast<int>(a.ndim()), a.shape(), a.strides(), a.itemsize());
      e.low = span.low;
      e.high = span.high;
    } else {
      e.low = e.high = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(a.data()));
    }
    return e;
  };
  const auto as_tuple = [](const std::vector<Extent>& extents) {
    py::tuple out(extents.size());
    for (size_t i = 0; i < extents.size(); ++i)
      out[i] = extents[i].present ? py::object(py::make_tuple(extents[i].low, extents[i].high))
                                  : py::object(py::none());
    return out;
  };
  m.def("byte_extents", [extent_of, as_tuple](const py::args& arrays) {
    std::vector<Extent> extents;
    for (const py::handle item : arrays) extents.push_back(extent_of(item));
    return as_tuple(extents);
  });
  m.def("meeting_extents", [extent_of, as_tuple](const py::args& arrays) {
    if (arrays.size() > 63) throw py::value_error("meeting_extents: at most 63 arrays");
    std::vector<Extent> extents;
    for (const py::handle item : arrays) extents.push_back(extent_of(item));
    py::tuple meets(extents.size());
    for (size_t i = 0; i < extents.size(); ++i) {
      std::uint64_t bits = 0;
      const Extent& a = extents[i];
      for (size_t j = 0; j < extents.size(); ++j) {
        const Extent& b = extents[j];
        if (j != i && a.present && b.present && a.low < b.high && b.low < a.high)
          bits |= std::uint64_t(1) << j;
      }
      meets[i] = py::int_(bits);
    }
    return py::make_tuple(as_tuple(extents), meets);
  });
  m.add_object("torch_view",
               py::reinterpret_steal<py::object>(PyCFunction_New(&torch_view_method, nullptr)));
  m.def(
      "copy",
      [](const bindings::Operand& src, const bindings::Operand& dst) {
        // Also a conversion between float32 and a half type (either way).
        using bindings::DTypeCode;
        const auto half = [](DTypeCode c) {
          return c == DTypeCode::float16 || c == DTypeCode::bfloat16;
        };
        const bool f32_src = src.dtype == DTypeCode::float32;
        const bool f32_dst = dst.dtype == DTypeCode::float32;
        const bool converts = f32_src != f32_dst && (half(src.dtype) || half(dst.dtype));
        if (converts) {
          if (src.shape != dst.shape) throw py::value_error("copy: arrays differ in shape");
        } else {
          bindings::require_same(src, dst, "copy");
        }
        bindings::require_writable(dst, "copy", "dst");
        const cpu::ArrayRef s = bindings::Backend::ref(src, "copy", "src");
        const cpu::ArrayRef d = bindings::Backend::ref(dst, "copy", "dst");
        bindings::run_without_gil([&] { FUSEDNN_ISA_SELECT(copy)(s, d); });
      },
      py::arg("src"), py::arg("dst"));
  bindings::bind_activations(m);
  bindings::bind_batchnorm(m);
  bindings::bind_dropout(m);
  bindings::bind_quick(m);
}
