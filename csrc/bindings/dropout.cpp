// pybind11 bindings of the dropout kernels and the fused bias + activation
// + dropout epilogue, compiled once into each module (see backend.h):
// argument unpacking only. p arrives already validated; keep = 1 - p, the
// threshold and the scale are formed once, in double, exactly as the
// reference forms them (dropout_args.h). Masks are uint8 Operands of
// (n + 7) / 8 bytes, or None.
#include <optional>
#include <string>
#include <vector>

#include "bindings/activation_args.h"
#include "bindings/backend.h"
#include "bindings/dropout_args.h"
#include "fusednn/philox.h"

namespace fusednn {
namespace bindings {

namespace {

int64_t mask_bytes(const Operand& a) { return (a.size() + 7) / 8; }

uint8_t* mask_pointer(const std::optional<Operand>& mask, const Operand& like, bool writable,
                      const char* function, const char* name) {
  if (mask) {
    require_dtype(*mask, DTypeCode::uint8, function, name);
    if (writable) require_writable(*mask, function, name);
  }
  return buffer_pointer(mask, mask_bytes(like), like, function, name);
}

void require_bias(const Operand& h, const Operand& bias, int axis, const char* function) {
  checked_axis(h, axis, function);
  if (bias.dtype != h.dtype || bias.shape.size() != 1 ||
      bias.shape[0] != h.shape[static_cast<size_t>(axis)])
    throw py::value_error(std::string(function) +
                          ": bias must be 1-d, of h's dtype and length h.shape[axis]");
}

}  // namespace

void bind_dropout(py::module_& m) {
  m.def(
      "dropout_forward",
      [](const Operand& x, const Operand& out, double p, uint64_t seed, uint64_t offset,
         uint64_t start, const std::optional<Operand>& mask_out) {
        const char* f = "dropout_forward";
        require_same(x, out, f);
        require_writable(out, f, "out");
        auto spec = dropout_spec<Backend::DropoutSpec>(p, seed, offset, start, x.size(), f);
        spec.mask_out = mask_pointer(mask_out, x, true, f, "mask_out");
        Backend::dropout_apply(spec, x, out);
      },
      py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"), py::arg("offset"),
      py::arg("start"), py::arg("mask_out"));

  m.def(
      "dropout_backward",
      [](const Operand& g, const Operand& out, double p, const std::optional<Operand>& mask,
         uint64_t seed, uint64_t offset, uint64_t start) {
        const char* f = "dropout_backward";
        require_same(g, out, f);
        require_writable(out, f, "out");
        auto spec = dropout_spec<Backend::DropoutSpec>(p, seed, offset, start, g.size(), f);
        spec.mask_in = mask_pointer(mask, g, false, f, "mask");
        Backend::dropout_apply(spec, g, out);
      },
      py::arg("grad_output"), py::arg("out"), py::arg("p"), py::arg("mask"), py::arg("seed"),
      py::arg("offset"), py::arg("start"));

  m.def(
      "dropout_mask",
      [](int64_t n, double p, uint64_t seed, uint64_t offset, uint64_t start,
         const Operand& mask_out) {
        const char* f = "dropout_mask";
        if (n < 0) throw py::value_error("dropout_mask: n must be non-negative");
        require_dtype(mask_out, DTypeCode::uint8, f, "mask_out");
        require_writable(mask_out, f, "mask_out");
        auto spec = dropout_spec<Backend::DropoutSpec>(p, seed, offset, start, n, f);
        spec.mask_out = buffer_pointer(mask_out, (n + 7) / 8, mask_out, f, "mask_out");
        Backend::dropout_mask(spec, n, mask_out);
      },
      py::arg("n"), py::arg("p"), py::arg("seed"), py::arg("offset"), py::arg("start"),
      py::arg("mask_out"));

  m.def(
      "bias_act_dropout_forward",
      [](int id, const Operand& h, const Operand& bias, int axis, const Operand& out, double a,
         double b, bool tanh_approx, double p, uint64_t seed, uint64_t offset, uint64_t start,
         const std::optional<Operand>& mask_out) {
        const char* f = "bias_act_dropout_forward";
        const Activation act = activation_from_id(id);
        require_same(h, out, f);
        require_writable(out, f, "out");
        require_bias(h, bias, axis, f);
        auto spec = dropout_spec<Backend::DropoutSpec>(p, seed, offset, start, h.size(), f);
        spec.mask_out = mask_pointer(mask_out, h, true, f, "mask_out");
        Backend::bias_act_dropout_forward(act, make_activation_params(a, b, tanh_approx), spec, h,
                                          bias, axis, out);
      },
      "out = keep_i * scale * act(h + bias[c]), c the index along `axis`.",
      py::arg("activation"), py::arg("h"), py::arg("bias"), py::arg("axis"), py::arg("out"),
      py::arg("a"), py::arg("b"), py::arg("tanh_approximation"), py::arg("p"), py::arg("seed"),
      py::arg("offset"), py::arg("start"), py::arg("mask_out"));

  m.def(
      "bias_grad_workspace_bytes",
      [](const std::vector<int64_t>& shape, int axis) {
        if (axis < 0 || axis >= static_cast<int>(shape.size()))
          throw py::value_error("bias_grad_workspace_bytes: axis out of range");
        return Backend::bias_grad_workspace_bytes(shape, axis);
      },
      "Bytes of scratch memory bias_act_dropout_backward needs for h of `shape` (0 on the CPU).",
      py::arg("shape"), py::arg("axis"));

  m.def(
      "bias_act_dropout_backward",
      [](int id, const Operand& g, const Operand& h, const Operand& bias, int axis,
         const Operand& grad_h, const Operand& grad_bias, const std::optional<Operand>& workspace,
         double a, double b, bool tanh_approx, double p, const std::optional<Operand>& mask,
         uint64_t seed, uint64_t offset, uint64_t start) {
        const char* f = "bias_act_dropout_backward";
        const Activation act = activation_from_id(id);
        require_same(g, h, f);
        require_same(g, grad_h, f);
        require_writable(grad_h, f, "grad_h");
        require_writable(grad_bias, f, "grad_bias");
        require_bias(h, bias, axis, f);
        if (!grad_h.c_contiguous())
          throw py::value_error("bias_act_dropout_backward: grad_h must be C-contiguous");
        if (grad_bias.dtype != h.dtype || grad_bias.shape != bias.shape)
          throw py::value_error("bias_act_dropout_backward: grad_bias must be 1-d, of h's dtype "
                                "and length h.shape[axis]");
        auto spec = dropout_spec<Backend::DropoutSpec>(p, seed, offset, start, g.size(), f);
        spec.mask_in = mask_pointer(mask, g, false, f, "mask");
        const int64_t needed = Backend::bias_grad_workspace_bytes(h.shape, axis);
        if (needed > 0) buffer_pointer(workspace, needed, h, f, "workspace");
        Backend::bias_act_dropout_backward(act, make_activation_params(a, b, tanh_approx), spec,
                                           g, h, bias, axis, grad_h, grad_bias, workspace);
      },
      "grad_h = grad_output * keep_i * scale * act'(h + bias) and grad_bias, its sum over every "
      "axis but `axis` (grad_h C-contiguous).",
      py::arg("activation"), py::arg("grad_output"), py::arg("h"), py::arg("bias"),
      py::arg("axis"), py::arg("grad_h"), py::arg("grad_bias"), py::arg("workspace"),
      py::arg("a"), py::arg("b"), py::arg("tanh_approximation"), py::arg("p"), py::arg("mask"),
      py::arg("seed"), py::arg("offset"), py::arg("start"));

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
