// pybind11 bindings of the CUDA dropout kernels and the fused bias +
// activation + dropout epilogue: argument unpacking only, with the GIL
// released while the launches are enqueued. p arrives already validated;
// keep = 1 - p, the threshold and the scale are formed here once, in
// double, exactly as the CPU bindings and the reference form them. Masks
// and the workspace arrive as (device pointer, size) pairs.
#include "bindings/dropout_args.h"
#include "bindings/without_gil.h"
#include "bindings/activation_args.h"
#include <cstdint>
#include <string>

#include "bindings/cuda_array.h"
#include "cuda/dropout.h"
#include "fusednn/philox.h"

namespace fusednn {
namespace bindings {

namespace {

int64_t element_count(const DeviceArrayView& v) {
  int64_t n = 1;
  for (int64_t s : v.shape()) n *= s;
  return n;
}

// A (device pointer, bytes) pair holding exactly `bytes` bytes, or None.
uint8_t* device_buffer(const py::object& buffer, int64_t bytes, const char* name) {
  if (buffer.is_none()) return nullptr;
  const auto pair = buffer.cast<py::tuple>();
  if (pair.size() != 2)
    throw py::value_error(std::string(name) + ": expected (pointer, bytes)");
  const auto pointer = pair[0].cast<std::uintptr_t>();
  const auto size = pair[1].cast<int64_t>();
  if (size != bytes)
    throw py::value_error(std::string(name) + " must hold " + std::to_string(bytes) + " bytes");
  return reinterpret_cast<uint8_t*>(pointer);
}



void require_bias(const DeviceArrayView& h, const DeviceArrayView& bias, int axis,
                  const char* what) {
  if (axis < 0 || axis >= static_cast<int>(h.shape().size()))
    throw py::value_error(std::string(what) + ": axis out of range");
  if (bias.dtype() != h.dtype() || bias.shape().size() != 1 ||
      bias.shape()[0] != h.shape()[static_cast<size_t>(axis)])
    throw py::value_error(std::string(what) +
                          ": bias must be 1-d, of h's dtype and length h.shape[axis]");
}

}  // namespace

void bind_cuda_dropout(py::module_& m) {
  m.def(
      "dropout_forward",
      [](const py::tuple& x, const py::tuple& out, double p, uint64_t seed, uint64_t offset,
         const py::object& mask_out, int device, std::uintptr_t stream) {
        const DeviceArrayView xv(x, "x");
        const DeviceArrayView ov(out, "out");
        require_same(xv, ov, "dropout_forward");
        cuda::DropoutSpec spec = dropout_spec<cuda::DropoutSpec>(p, seed, offset);
        spec.mask_out = device_buffer(mask_out, (element_count(xv) + 7) / 8, "mask_out");
        run_without_gil([&] {
          cuda::dropout_apply(spec, xv.ref(), ov.ref(), launch_target(device, stream));
        });
      },
      py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"), py::arg("offset"),
      py::arg("mask_out"), py::arg("device"), py::arg("stream"));

  m.def(
      "dropout_backward",
      [](const py::tuple& g, const py::tuple& out, double p, const py::object& mask,
         uint64_t seed, uint64_t offset, int device, std::uintptr_t stream) {
        const DeviceArrayView gv(g, "grad_output");
        const DeviceArrayView ov(out, "out");
        require_same(gv, ov, "dropout_backward");
        cuda::DropoutSpec spec = dropout_spec<cuda::DropoutSpec>(p, seed, offset);
        spec.mask_in = device_buffer(mask, (element_count(gv) + 7) / 8, "mask");
        run_without_gil([&] {
          cuda::dropout_apply(spec, gv.ref(), ov.ref(), launch_target(device, stream));
        });
      },
      py::arg("grad_output"), py::arg("out"), py::arg("p"), py::arg("mask"), py::arg("seed"),
      py::arg("offset"), py::arg("device"), py::arg("stream"));

  m.def(
      "dropout_mask",
      [](int64_t n, double p, uint64_t seed, uint64_t offset, const py::tuple& mask_out,
         int device, std::uintptr_t stream) {
        if (n < 0) throw py::value_error("dropout_mask: n must be non-negative");
        cuda::DropoutSpec spec = dropout_spec<cuda::DropoutSpec>(p, seed, offset);
        spec.mask_out = device_buffer(mask_out, (n + 7) / 8, "mask_out");
        run_without_gil([&] {
          cuda::dropout_mask(spec, n, launch_target(device, stream));
        });
      },
      py::arg("n"), py::arg("p"), py::arg("seed"), py::arg("offset"), py::arg("mask_out"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "bias_act_dropout_forward",
      [](int id, const py::tuple& h, const py::tuple& bias, int axis, const py::tuple& out,
         double a, double b, bool tanh_approx, double p, uint64_t seed, uint64_t offset,
         const py::object& mask_out, int device, std::uintptr_t stream) {
        const Activation act = activation_from_id(id);
        const DeviceArrayView hv(h, "h");
        const DeviceArrayView bv(bias, "bias");
        const DeviceArrayView ov(out, "out");
        require_same(hv, ov, "bias_act_dropout_forward");
        require_bias(hv, bv, axis, "bias_act_dropout_forward");
        cuda::DropoutSpec spec = dropout_spec<cuda::DropoutSpec>(p, seed, offset);
        spec.mask_out = device_buffer(mask_out, (element_count(hv) + 7) / 8, "mask_out");
        const ActivationParams params = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          cuda::bias_act_dropout_forward(act, params, spec, hv.ref(), bv.ref(), axis, ov.ref(),
                                         launch_target(device, stream));
        });
      },
      py::arg("activation"), py::arg("h"), py::arg("bias"), py::arg("axis"), py::arg("out"),
      py::arg("a"), py::arg("b"), py::arg("tanh_approximation"), py::arg("p"), py::arg("seed"),
      py::arg("offset"), py::arg("mask_out"), py::arg("device"), py::arg("stream"));

  m.def(
      "bias_act_dropout_backward",
      [](int id, const py::tuple& g, const py::tuple& h, const py::tuple& bias, int axis,
         const py::tuple& grad_h, double a, double b, bool tanh_approx, double p,
         const py::object& mask, uint64_t seed, uint64_t offset, int device,
         std::uintptr_t stream) {
        const Activation act = activation_from_id(id);
        const DeviceArrayView gv(g, "grad_output");
        const DeviceArrayView hv(h, "h");
        const DeviceArrayView bv(bias, "bias");
        const DeviceArrayView ov(grad_h, "grad_h");
        require_same(gv, hv, "bias_act_dropout_backward");
        require_same(gv, ov, "bias_act_dropout_backward");
        require_bias(hv, bv, axis, "bias_act_dropout_backward");
        cuda::DropoutSpec spec = dropout_spec<cuda::DropoutSpec>(p, seed, offset);
        spec.mask_in = device_buffer(mask, (element_count(gv) + 7) / 8, "mask");
        const ActivationParams params = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          cuda::bias_act_dropout_backward(act, params, spec, gv.ref(), hv.ref(), bv.ref(), axis,
                                          ov.ref(), launch_target(device, stream));
        });
      },
      py::arg("activation"), py::arg("grad_output"), py::arg("h"), py::arg("bias"),
      py::arg("axis"), py::arg("grad_h"), py::arg("a"), py::arg("b"),
      py::arg("tanh_approximation"), py::arg("p"), py::arg("mask"), py::arg("seed"),
      py::arg("offset"), py::arg("device"), py::arg("stream"));

  m.def(
      "bias_grad_workspace",
      [](const std::vector<int64_t>& shape, int axis) {
        if (axis < 0 || axis >= static_cast<int>(shape.size()))
          throw py::value_error("bias_grad_workspace: axis out of range");
        return cuda::bias_grad_workspace(static_cast<int>(shape.size()), shape.data(), axis);
      },
      "float64 elements of the workspace bias_grad needs for grad_h of `shape`.",
      py::arg("shape"), py::arg("axis"));

  m.def(
      "bias_grad",
      [](const py::tuple& grad_h, int axis, const py::tuple& grad_bias,
         const py::tuple& workspace, int device, std::uintptr_t stream) {
        const DeviceArrayView gv(grad_h, "grad_h");
        const DeviceArrayView bv(grad_bias, "grad_bias");
        if (axis < 0 || axis >= static_cast<int>(gv.shape().size()))
          throw py::value_error("bias_grad: axis out of range");
        const int64_t needed = cuda::bias_grad_workspace(static_cast<int>(gv.shape().size()),
                                                         gv.shape().data(), axis);
        double* buffer = reinterpret_cast<double*>(
            device_buffer(workspace, needed * int64_t(sizeof(double)), "workspace"));
        run_without_gil([&] {
          cuda::bias_grad(gv.ref(), axis, bv.ref(), buffer, needed, launch_target(device, stream));
        });
      },
      py::arg("grad_h"), py::arg("axis"), py::arg("grad_bias"), py::arg("workspace"),
      py::arg("device"), py::arg("stream"));
}

}  // namespace bindings
}  // namespace fusednn
