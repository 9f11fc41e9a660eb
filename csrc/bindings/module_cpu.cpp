// The fusednn._cpu extension module: build facts, thread and ISA settings,
// and the kernel families (each bound in its own file).
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa.h"
#include "cpu/threadpool.h"

namespace py = pybind11;

namespace fusednn {
namespace bindings {
void bind_activations(py::module_& m);
void bind_batchnorm(py::module_& m);
void bind_dropout(py::module_& m);
}  // namespace bindings
}  // namespace fusednn

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
  bindings::bind_activations(m);
  bindings::bind_batchnorm(m);
  bindings::bind_dropout(m);
}
