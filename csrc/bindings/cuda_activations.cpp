// pybind11 bindings of the CUDA activation kernels: argument unpacking
// only, with the GIL released while the launch is enqueued.
#include "bindings/activation_args.h"
#include "bindings/without_gil.h"
#include "bindings/cuda_array.h"
#include "cuda/activations.h"

namespace fusednn {
namespace bindings {

void bind_cuda_activations(py::module_& m) {
  m.def(
      "activation_forward",
      [](int id, const py::tuple& x, const py::tuple& y, double a, double b, bool tanh_approx,
         int device, std::uintptr_t stream) {
        const Activation act = activation_from_id(id);
        const DeviceArrayView xv(x, "x");
        const DeviceArrayView yv(y, "out");
        require_same(xv, yv, "activation_forward");
        const ActivationParams p = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          cuda::activation_forward(act, p, xv.ref(), yv.ref(), launch_target(device, stream));
        });
      },
      py::arg("activation"), py::arg("x"), py::arg("out"), py::arg("a"), py::arg("b"),
      py::arg("tanh_approximation"), py::arg("device"), py::arg("stream"));

  m.def(
      "activation_backward",
      [](int id, bool from_output, const py::tuple& g, const py::tuple& saved,
         const py::tuple& out, double a, double b, bool tanh_approx, int device,
         std::uintptr_t stream) {
        const Activation act = activation_from_id(id);
        const DeviceArrayView gv(g, "grad_output");
        const DeviceArrayView sv(saved, from_output ? "y" : "x");
        const DeviceArrayView ov(out, "out");
        require_same(gv, sv, "activation_backward");
        require_same(gv, ov, "activation_backward");
        const ActivationParams p = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          cuda::activation_backward(act, p, from_output, gv.ref(), sv.ref(), ov.ref(),
                                    launch_target(device, stream));
        });
      },
      py::arg("activation"), py::arg("from_output"), py::arg("grad_output"), py::arg("saved"),
      py::arg("out"), py::arg("a"), py::arg("b"), py::arg("tanh_approximation"),
      py::arg("device"), py::arg("stream"));
}

}  // namespace bindings
}  // namespace fusednn
