// pybind11 bindings of the CPU dropout kernels and the fused bias +
// activation + dropout epilogue: argument unpacking only, with the GIL
// released while a kernel runs. p arrives already validated; keep = 1 - p,
// the threshold and the scale are formed here once, in double, exactly as
// the reference forms them.
#include "bindings/dropout_args.h"
#include "bindings/without_gil.h"
#include "bindings/activation_args.h"
#include <string>

#include "bindings/array_ref.h"
#include "cpu/dropout.h"
#include "fusednn/philox.h"

namespace fusednn {
namespace bindings {

namespace {

// A C-contiguous uint8 array of exactly `bytes` bytes, or None.
uint8_t* mask_pointer(const py::object& mask, int64_t bytes, bool writable, const char* name) {
  if (mask.is_none()) return nullptr;
  if (!py::isinstance<py::array>(mask)) throw py::type_error(std::string(name) + " must be an array");
  const py::array array = py::reinterpret_borrow<py::array>(mask);
  if (!array.dtype().is(py::dtype::of<uint8_t>()))
    throw py::type_error(std::string(name) + ": dtype must be uint8");
  if (!(array.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (array.size() != bytes)
    throw py::value_error(std::string(name) + " must hold " + std::to_string(bytes) + " bytes");
  if (writable && !array.writeable()) throw py::value_error(std::string(name) + " is read-only");
  return static_cast<uint8_t*>(const_cast<void*>(array.data()));
}

int64_t mask_bytes(const ArrayView& v) {
  int64_t n = 1;
  for (int64_t s : v.shape()) n *= s;
  return (n + 7) / 8;
}

}  // namespace

void bind_dropout(py::module_& m) {
  m.def(
      "dropout_forward",
      [](const py::array& x, const py::array& out, double p, uint64_t seed, uint64_t offset,
         const py::object& mask_out) {
        const ArrayView xv(x, false, "x");
        const ArrayView ov(out, true, "out");
        require_same(xv, ov, "dropout_forward");
        cpu::DropoutSpec spec = dropout_spec<cpu::DropoutSpec>(p, seed, offset);
        spec.mask_out = mask_pointer(mask_out, mask_bytes(xv), true, "mask_out");
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(dropout_apply)(spec, xv.ref(), ov.ref());
        });
      },
      py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("p"), py::arg("seed"),
      py::arg("offset"), py::arg("mask_out"));

  m.def(
      "dropout_backward",
      [](const py::array& g, const py::array& out, double p, const py::object& mask,
         uint64_t seed, uint64_t offset) {
        const ArrayView gv(g, false, "grad_output");
        const ArrayView ov(out, true, "out");
        require_same(gv, ov, "dropout_backward");
        cpu::DropoutSpec spec = dropout_spec<cpu::DropoutSpec>(p, seed, offset);
        spec.mask_in = mask_pointer(mask, mask_bytes(gv), false, "mask");
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(dropout_apply)(spec, gv.ref(), ov.ref());
        });
      },
      py::arg("grad_output").noconvert(), py::arg("out").noconvert(), py::arg("p"),
      py::arg("mask"), py::arg("seed"), py::arg("offset"));

  m.def(
      "dropout_mask",
      [](int64_t n, double p, uint64_t seed, uint64_t offset, const py::array& mask_out) {
        if (n < 0) throw py::value_error("dropout_mask: n must be non-negative");
        cpu::DropoutSpec spec = dropout_spec<cpu::DropoutSpec>(p, seed, offset);
        spec.mask_out = mask_pointer(mask_out, (n + 7) / 8, true, "mask_out");
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(dropout_mask)(spec, n);
        });
      },
      py::arg("n"), py::arg("p"), py::arg("seed"), py::arg("offset"),
      py::arg("mask_out").noconvert());

  m.def(
      "bias_act_dropout_forward",
      [](int id, const py::array& h, const py::array& bias, const py::array& out, double a,
         double b, bool tanh_approx, double p, uint64_t seed, uint64_t offset,
         const py::object& mask_out) {
        const Activation act = activation_from_id(id);
        const ArrayView hv(h, false, "h");
        const ArrayView bv(bias, false, "bias");
        const ArrayView ov(out, true, "out");
        require_same(hv, bv, "bias_act_dropout_forward");
        require_same(hv, ov, "bias_act_dropout_forward");
        cpu::DropoutSpec spec = dropout_spec<cpu::DropoutSpec>(p, seed, offset);
        spec.mask_out = mask_pointer(mask_out, mask_bytes(hv), true, "mask_out");
        const ActivationParams params = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(bias_act_dropout_forward)(act, params, spec, hv.ref(), bv.ref(),
                                                       ov.ref());
        });
      },
      py::arg("activation"), py::arg("h").noconvert(), py::arg("bias").noconvert(),
      py::arg("out").noconvert(), py::arg("a"), py::arg("b"), py::arg("tanh_approximation"),
      py::arg("p"), py::arg("seed"), py::arg("offset"), py::arg("mask_out"));

  m.def(
      "bias_act_dropout_backward",
      [](int id, const py::array& g, const py::array& h, const py::array& bias,
         const py::array& grad_h, int axis, const py::array& grad_bias, double a, double b,
         bool tanh_approx, double p, const py::object& mask, uint64_t seed, uint64_t offset) {
        const Activation act = activation_from_id(id);
        const ArrayView gv(g, false, "grad_output");
        const ArrayView hv(h, false, "h");
        const ArrayView bv(bias, false, "bias");
        const ArrayView ov(grad_h, true, "grad_h");
        const ArrayView sv(grad_bias, true, "grad_bias");
        require_same(gv, hv, "bias_act_dropout_backward");
        require_same(gv, bv, "bias_act_dropout_backward");
        require_same(gv, ov, "bias_act_dropout_backward");
        if (!(grad_h.flags() & py::array::c_style))
          throw py::value_error("bias_act_dropout_backward: grad_h must be C-contiguous");
        if (axis < 0 || axis >= grad_h.ndim())
          throw py::value_error("bias_act_dropout_backward: bad axis");
        if (gv.dtype() != sv.dtype() || grad_bias.ndim() != 1 ||
            grad_bias.shape(0) != grad_h.shape(axis))
          throw py::value_error("bias_act_dropout_backward: grad_bias must be 1-d, of grad_h's "
                                "dtype and length grad_h.shape[axis]");
        cpu::DropoutSpec spec = dropout_spec<cpu::DropoutSpec>(p, seed, offset);
        spec.mask_in = mask_pointer(mask, mask_bytes(gv), false, "mask");
        const ActivationParams params = make_activation_params(a, b, tanh_approx);
        run_without_gil([&] {
          FUSEDNN_ISA_SELECT(bias_act_dropout_backward)(act, params, spec, gv.ref(), hv.ref(),
                                                        bv.ref(), ov.ref(), axis, sv.ref());
        });
      },
      "grad_h = grad_output * keep * scale * act'(h + bias) and grad_bias, its sum over every "
      "axis but `axis` (grad_h C-contiguous).",
      py::arg("activation"), py::arg("grad_output").noconvert(), py::arg("h").noconvert(),
      py::arg("bias").noconvert(), py::arg("grad_h").noconvert(), py::arg("axis"),
      py::arg("grad_bias").noconvert(), py::arg("a"), py::arg("b"),
      py::arg("tanh_approximation"), py::arg("p"), py::arg("mask"), py::arg("seed"),
      py::arg("offset"));

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(c0, c1, c2, c3);
      },
      "Philox4x32-10 of one counter (c0..c3) under the key (k0, k1); for tests.",
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"));

  m.def("dropout_threshold", &philox::dropout_threshold,
        "T = round(keep * 2**32), the bound below which a draw keeps its element.",
        py::arg("keep"));
}

}  // namespace bindings
}  // namespace fusednn
