// pybind11 bindings of the CPU activation kernels and the copy kernel: argument
// unpacking only, with the GIL released while the kernel runs.
#include "bindings/activation_args.h"
#include "bindings/without_gil.h"
#include "bindings/array_ref.h"
#include "cpu/activations.h"

namespace fusednn {
namespace bindings {

void bind_activations(py::module_& m) {
  m.def(
      "activation_forward",
      [](int id, const py::array& x, const py::array& y, double a, double b, bool tanh_approx) {
        const Activation act = activation_from_id(id);
        const ArrayView xv(x, false, "x");
        const ArrayView yv(y, true, "out");
        require_same(xv, yv, "activation_forward");
        const ActivationParams p = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(activation_forward)(act, p, xv.ref(), yv.ref());
        });
      },
      py::arg("activation"), py::arg("x").noconvert(), py::arg("out").noconvert(),
      py::arg("a"), py::arg("b"), py::arg("tanh_approximation"));

  m.def(
      "activation_backward",
      [](int id, bool from_output, const py::array& g, const py::array& saved,
         const py::array& out, double a, double b, bool tanh_approx) {
        const Activation act = activation_from_id(id);
        const ArrayView gv(g, false, "grad_output");
        const ArrayView sv(saved, false, from_output ? "y" : "x");
        const ArrayView ov(out, true, "out");
        require_same(gv, sv, "activation_backward");
        require_same(gv, ov, "activation_backward");
        const ActivationParams p = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(activation_backward)(act, p, from_output, gv.ref(), sv.ref(), ov.ref());
        });
      },
      py::arg("activation"), py::arg("from_output"), py::arg("grad_output").noconvert(),
      py::arg("saved").noconvert(), py::arg("out").noconvert(), py::arg("a"), py::arg("b"),
      py::arg("tanh_approximation"));

  m.def(
      "copy",
      [](const py::array& src, const py::array& dst) {
        const ArrayView sv(src, false, "src");
        const ArrayView dv(dst, true, "dst");
        const bool converts = sv.dtype() != dv.dtype() &&
                              (sv.dtype() == cpu::DType::float32) != (dv.dtype() == cpu::DType::float32) &&
                              (cpu::is_half(sv.dtype()) || cpu::is_half(dv.dtype()));
        if (converts) {
          if (sv.shape() != dv.shape()) throw py::value_error("copy: arrays differ in shape");
        } else {
          require_same(sv, dv, "copy");
        }
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(copy)(sv.ref(), dv.ref());
        });
      },
      py::arg("src").noconvert(), py::arg("dst").noconvert());
}

}  // namespace bindings
}  // namespace fusednn
