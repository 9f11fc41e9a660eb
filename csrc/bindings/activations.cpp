// pybind11 bindings of the activation kernels, compiled once into each
// module (see backend.h): argument unpacking only.
#include "bindings/activation_args.h"
#include "bindings/backend.h"

namespace fusednn {
namespace bindings {

void bind_activations(py::module_& m) {
  m.def(
      "activation_forward",
      [](int id, const Operand& x, const Operand& out, double a, double b, bool tanh_approx) {
        const Activation act = activation_from_id(id);
        require_same(x, out, "activation_forward");
        require_writable(out, "activation_forward", "out");
        Backend::activation_forward(act, make_activation_params(a, b, tanh_approx), x, out);
      },
      py::arg("activation"), py::arg("x"), py::arg("out"), py::arg("a"), py::arg("b"),
      py::arg("tanh_approximation"));

  m.def(
      "activation_backward",
      [](int id, bool from_output, const Operand& g, const Operand& saved, const Operand& out,
         double a, double b, bool tanh_approx) {
        const Activation act = activation_from_id(id);
        require_same(g, saved, "activation_backward");
        require_same(g, out, "activation_backward");
        require_writable(out, "activation_backward", "out");
        Backend::activation_backward(act, make_activation_params(a, b, tanh_approx),
                                     from_output, g, saved, out);
      },
      py::arg("activation"), py::arg("from_output"), py::arg("grad_output"), py::arg("saved"),
      py::arg("out"), py::arg("a"), py::arg("b"), py::arg("tanh_approximation"));
}

}  // namespace bindings
}  // namespace fusednn
