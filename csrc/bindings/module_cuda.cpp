// The fusednn._cuda extension module: what the CUDA build targets, what
// the driver reports (its version, the devices, or why there are none), and
// the kernel families, bound in files shared with _cpu (see backend.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cuda/device.h"

namespace py = pybind11;

namespace fusednn {
namespace bindings {
void bind_activations(py::module_& m);
void bind_batchnorm(py::module_& m);
void bind_dropout(py::module_& m);
}  // namespace bindings
}  // namespace fusednn

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusednn CUDA kernels (private; use the fusednn package)";
  m.attr("version") = FUSEDNN_VERSION;
  m.def("archs", [] {
    std::vector<int> archs;
    std::string csv = FUSEDNN_CUDA_ARCHS;
    size_t start = 0;
    while (start < csv.size()) {
      size_t end = csv.find(',', start);
      if (end == std::string::npos) end = csv.size();
      archs.push_back(std::stoi(csv.substr(start, end - start)));
      start = end + 1;
    }
    return archs;
  });
  // The architecture whose PTX is embedded, which the driver compiles for a
  // GPU no SASS above runs on.
  m.def("ptx_arch", [] { return FUSEDNN_CUDA_PTX_ARCH; });
  m.def("runtime_version", &fusednn::cuda::runtime_version);
  m.def("driver_version", &fusednn::cuda::driver_version,
        "The installed driver's CUDA version (e.g. 12040), 0 without a driver.");
  m.def("device_count", &fusednn::cuda::device_count,
        "Number of visible CUDA devices (0 when there is no driver or device).");
  m.def(
      "device_error",
      []() -> py::object {
        const std::string error = fusednn::cuda::device_error();
        if (error.empty()) return py::none();
        return py::str(error);
      },
      "Why device_count() is 0, as the CUDA runtime names it (cudaErrorNoDevice, "
      "cudaErrorInsufficientDriver: the driver is older than the runtime, ...); None when "
      "there are devices.");
  fusednn::bindings::bind_activations(m);
  fusednn::bindings::bind_batchnorm(m);
  fusednn::bindings::bind_dropout(m);
}
