"""Inverted dropout and the fused bias + activation + dropout epilogue on
numpy arrays (CPU kernels) and CuPy arrays (CUDA kernels, on CuPy's current
stream; float16 too, computed in float32).

``p`` is the drop probability; kept elements are scaled by ``1 / (1 - p)``.
The mask is a pure function of (seed, offset, p, n): element ``i`` (flat
C-order index of the logical array, whatever its strides) is kept iff lane
``i % 4`` of Philox4x32-10 with counter ``(i // 4, offset)`` and key
``seed`` is below ``round((1 - p) * 2**32)``. It can be returned bit-packed
(bit ``i % 8`` of byte ``i // 8``) or not stored at all: the backward
functions accept either the packed mask or the (seed, offset) that drew it.
Both devices draw the same bits. See docs/dropout.md and docs/cuda.md.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend, _interop
from ._backend import _cpu, _cuda
from .activations import _IDS, _check_name, _kernel_params

_UINT64_LIMIT = 1 << 64


def _check_flag(value, name: str, function: str) -> bool:
    """A bool (numpy's included): strings and numbers are errors, not
    truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"fusednn.{function}: {name} must be a bool, not {type(value).__name__}")
    return bool(value)


def _check_p(p, function: str) -> float:
    if type(p) is float and 0.0 <= p <= 1.0:  # the common case, checked first
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"fusednn.{function}: p must be a real number, not {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"fusednn.{function}: p must lie in [0, 1], got {p}")
    return p


def _check_counter(value, name: str, function: str) -> int:
    """seed and offset: integers in [0, 2**64)."""
    if type(value) is int and 0 <= value < _UINT64_LIMIT:  # the common case, checked first
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fusednn.{function}: {name} must be an integer, "
                        f"not {type(value).__name__}")
    value = int(value)
    if not 0 <= value < _UINT64_LIMIT:
        raise ValueError(f"fusednn.{function}: {name} must lie in [0, 2**64), got {value}")
    return value


def _check_shape(shape, function: str) -> tuple:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"fusednn.{function}: shape must be an integer or a tuple of "
                        f"integers, not {type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"fusednn.{function}: shape must hold integers, got {shape!r}")
        if d < 0:
            raise ValueError(f"fusednn.{function}: shape must not be negative, got {shape!r}")
    return _backend.check_element_count(tuple(int(d) for d in dims), function)


def _mask_bytes(size: int) -> int:
    return (size + 7) // 8


def _check_mask(mask, size: int, function: str) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"fusednn.{function}: mask must be a numpy array, "
                        f"not {type(mask).__name__}")
    if mask.dtype != np.uint8:
        raise TypeError(f"fusednn.{function}: mask must have dtype uint8 (bit-packed), "
                        f"got {mask.dtype}")
    if mask.size != _mask_bytes(size):
        raise ValueError(f"fusednn.{function}: mask must hold (n + 7) // 8 = "
                         f"{_mask_bytes(size)} bytes for {size} elements, got {mask.size}")
    return np.ascontiguousarray(mask).reshape(-1)


def _check_cuda_mask(mask, size: int, like, function: str):
    """A CuPy mask for the CuPy array `like`, as _check_mask checks a numpy
    one; returned C-contiguous and flat."""
    cupy = _backend._cupy()
    if mask.dtype != np.uint8:
        raise TypeError(f"fusednn.{function}: mask must have dtype uint8 (bit-packed), "
                        f"got {mask.dtype}")
    if mask.size != _mask_bytes(size):
        raise ValueError(f"fusednn.{function}: mask must hold (n + 7) // 8 = "
                         f"{_mask_bytes(size)} bytes for {size} elements, got {mask.size}")
    if mask.device.id != like.device.id:
        raise ValueError(f"fusednn.{function}: mask is on GPU {mask.device.id}, the arrays on "
                         f"GPU {like.device.id}")
    return cupy.ascontiguousarray(mask).reshape(-1)


def _device_buffer(buffer):
    """A CuPy array as the CUDA module takes a mask or workspace: (device
    pointer, bytes), or None."""
    return None if buffer is None else (buffer.data.ptr, buffer.nbytes)


def _cupy_for(function: str):
    """CuPy, for a call that asks for the GPU without passing a CuPy array."""
    if _cuda is None:
        raise _backend.cuda_unavailable(function)
    try:
        return _backend._cupy()
    except ImportError:
        raise RuntimeError(f"fusednn.{function}: device='cuda' needs CuPy, which is not "
                           f"installed ({_backend.cupy_install_hint()})") from None


def _mask_or_seed(mask, seed, offset, size: int, function: str, like=None):
    """Validates the backward's source of the mask: exactly one of mask and
    seed; `like` is the CuPy array the mask must sit beside, or None on the
    CPU. Returns (packed mask or None, seed, offset)."""
    if mask is None and seed is None:
        raise ValueError(f"fusednn.{function}: give the forward's mask, or the seed (and "
                         "offset) that drew it")
    if mask is not None and seed is not None:
        raise ValueError(f"fusednn.{function}: give either mask or seed, not both")
    offset = _check_counter(offset, "offset", function)
    if mask is not None:
        if like is not None:
            return _check_cuda_mask(mask, size, like, function), 0, 0
        return _check_mask(mask, size, function), 0, 0
    return None, _check_counter(seed, "seed", function), offset


def dropout(x, p, *, seed, offset=0, training=True, return_mask=False, out=None):
    """Inverted dropout: ``y = x * mask / (1 - p)``, elementwise.

    ``p = 1`` gives zeros (``x * 0``: NaN and infinities stay NaN, as in
    PyTorch), ``p = 0`` gives x. With ``training=False`` x is returned
    unchanged (copied into ``out``, or a copy). ``return_mask=True`` also
    returns the bit-packed uint8 mask of ``(x.size + 7) // 8`` bytes (all
    ones for ``training=False``).
    """
    function = "dropout"
    p = _check_p(p, function)
    seed = _check_counter(seed, "seed", function)
    offset = _check_counter(offset, "offset", function)
    training = _check_flag(training, "training", function)
    return_mask = _check_flag(return_mask, "return_mask", function)
    device = _backend.device_of(function, x=x)
    if device == "foreign":
        return _interop.call(
            lambda **arrays: dropout(**arrays, p=p, seed=seed, offset=offset, training=training,
                                     return_mask=return_mask),
            {"x": x, "out": out}, function, "x")
    if device == "cuda":
        cupy = _backend._cupy()
        x = _backend.as_cuda_array(x, "x", function)
        out = _backend.prepare_cuda_out(out, x, function)
        x = _backend.detach_from_cuda_out(x, out)
        if not training:
            cupy.copyto(out, x)
            return (out, cupy.asarray(_all_kept(x.size))) if return_mask else out
        mask = cupy.empty(_mask_bytes(x.size), dtype=cupy.uint8) if return_mask else None
        _cuda.dropout_forward(_backend.cuda_operand(x), _backend.cuda_operand(out), p, seed,
                              offset, _device_buffer(mask), *_backend.cuda_target(x))
        return (out, mask) if return_mask else out
    x = _backend.as_cpu_array(x, "x", function)
    out = _backend.prepare_out(out, x.shape, x.dtype, function)
    x = _backend.detach_from_out(x, out)
    if not training:
        _cpu.copy(x, out)
        if return_mask:
            return out, _all_kept(x.size)
        return out
    mask = np.empty(_mask_bytes(x.size), dtype=np.uint8) if return_mask else None
    _cpu.dropout_forward(x, out, p, seed, offset, mask)
    return (out, mask) if return_mask else out


def _all_kept(size: int) -> np.ndarray:
    mask = np.full(_mask_bytes(size), 0xFF, dtype=np.uint8)
    if size % 8:
        mask[-1] = (1 << (size % 8)) - 1
    return mask


def dropout_backward(grad_output, p, *, mask=None, seed=None, offset=0, out=None):
    """``grad_input = grad_output * mask / (1 - p)``, with the mask given
    bit-packed or regenerated from the (seed, offset) of the forward."""
    function = "dropout_backward"
    p = _check_p(p, function)
    device = _backend.device_of(function, grad_output=grad_output, mask=mask)
    if device == "foreign":
        return _interop.call(
            lambda **arrays: dropout_backward(**arrays, p=p, seed=seed, offset=offset),
            {"grad_output": grad_output, "mask": mask, "out": out}, function, "grad_output")
    if device == "cuda":
        grad_output = _backend.as_cuda_array(grad_output, "grad_output", function)
        mask, seed, offset = _mask_or_seed(mask, seed, offset, grad_output.size, function,
                                           like=grad_output)
        out = _backend.prepare_cuda_out(out, grad_output, function)
        grad_output = _backend.detach_from_cuda_out(grad_output, out)
        mask = _backend.detach_from_cuda_out(mask, out, elementwise=False)
        _cuda.dropout_backward(_backend.cuda_operand(grad_output), _backend.cuda_operand(out),
                               p, _device_buffer(mask), seed, offset,
                               *_backend.cuda_target(grad_output))
        return out
    grad_output = _backend.as_cpu_array(grad_output, "grad_output", function)
    mask, seed, offset = _mask_or_seed(mask, seed, offset, grad_output.size, function)
    out = _backend.prepare_out(out, grad_output.shape, grad_output.dtype, function)
    grad_output = _backend.detach_from_out(grad_output, out)
    mask = _backend.detach_from_out(mask, out, elementwise=False)
    _cpu.dropout_backward(grad_output, out, p, mask, seed, offset)
    return out


def dropout_mask(shape, p, *, seed, offset=0, device="cpu"):
    """The bit-packed keep mask that ``dropout`` draws for an array of
    ``shape``: uint8, ``(n + 7) // 8`` bytes, bit ``i % 8`` of byte
    ``i // 8`` for element ``i``; ``np.unpackbits(mask,
    bitorder='little')[:n]`` unpacks it. ``device='cuda'`` draws it on the
    current CuPy device and stream and returns a CuPy array with the same
    bytes."""
    function = "dropout_mask"
    shape = _check_shape(shape, function)
    p = _check_p(p, function)
    seed = _check_counter(seed, "seed", function)
    offset = _check_counter(offset, "offset", function)
    if device not in ("cpu", "cuda", "gpu"):
        raise ValueError(f"fusednn.{function}: device must be 'cpu' or 'cuda', got {device!r}")
    size = math.prod(shape)
    if device != "cpu":
        cupy = _cupy_for(function)
        mask = cupy.empty(_mask_bytes(size), dtype=cupy.uint8)
        _cuda.dropout_mask(size, p, seed, offset, _device_buffer(mask),
                           *_backend.cuda_target(mask))
        return mask
    mask = np.empty(_mask_bytes(size), dtype=np.uint8)
    _cpu.dropout_mask(size, p, seed, offset, mask)
    return mask


def _check_axis(axis, ndim: int, function: str) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"fusednn.{function}: axis must be an integer, not {type(axis).__name__}")
    if ndim == 0:
        raise ValueError(f"fusednn.{function}: h must have at least one dimension (the bias "
                         "axis)")
    if not -ndim <= axis < ndim:
        raise ValueError(f"fusednn.{function}: axis {axis} is out of range for {ndim} "
                         "dimensions")
    return int(axis) % ndim


def _check_bias(bias, h, axis: int, function: str):
    """bias itself (numpy or CuPy, like h) when it is 1-d of length
    h.shape[axis] and of h's dtype."""
    if bias.ndim != 1 or bias.shape[0] != h.shape[axis]:
        raise ValueError(f"fusednn.{function}: bias must be 1-d of length h.shape[{axis}] = "
                         f"{h.shape[axis]}, got shape {bias.shape}")
    if bias.dtype != h.dtype:
        raise TypeError(f"fusednn.{function}: bias and h must have the same dtype, "
                        f"got {bias.dtype} and {h.dtype}")
    return bias


def _bias_view(bias, h: np.ndarray, axis: int, out: np.ndarray, function: str) -> np.ndarray:
    """bias (1-d, length h.shape[axis]) as a read-only view of h's shape with
    stride 0 along every other axis; copied first if it lies in out."""
    bias = _check_bias(_backend.as_cpu_array(bias, "bias", function), h, axis, function)
    bias = _backend.detach_from_out(bias, out, elementwise=False)
    if bias.flags.c_contiguous:
        # The same view as broadcast_to's, built directly: several times
        # faster, which counts for small calls.
        strides = [0] * h.ndim
        strides[axis] = bias.itemsize
        view = np.ndarray(h.shape, bias.dtype, bias, 0, strides)
        view.flags.writeable = False
        return view
    shape = [1] * h.ndim
    shape[axis] = h.shape[axis]
    return np.broadcast_to(bias.reshape(shape), h.shape)


def _cuda_bias(bias, h, axis: int, function: str):
    """bias as the CUDA kernels take it: 1-d CuPy, length h.shape[axis]; the
    kernels broadcast it themselves."""
    return _check_bias(_backend.as_cuda_array(bias, "bias", function), h, axis, function)


def _activation_args(act, act_params: dict, function: str):
    _check_name(act, function)
    return _IDS[act], _kernel_params(act, act_params, function)


def bias_act_dropout(h, bias, act, p, *, seed, offset=0, axis=-1, return_mask=False, out=None,
                     **act_params):
    """The fused epilogue ``o = mask * act(h + bias) / (1 - p)`` in one pass.

    ``bias`` is 1-d and broadcast along ``axis`` of h (``-1``: the last
    axis, as after ``x @ W``; ``1``: channels of NCHW). ``act`` is an
    activation name from ``fusednn.ACTIVATIONS`` and ``act_params`` its
    parameters. The mask is the one ``dropout`` draws for h's shape with
    the same (seed, offset, p); ``return_mask=True`` returns it too.
    """
    function = "bias_act_dropout"
    act_id, (a, b, tanh_approx) = _activation_args(act, act_params, function)
    p = _check_p(p, function)
    seed = _check_counter(seed, "seed", function)
    offset = _check_counter(offset, "offset", function)
    return_mask = _check_flag(return_mask, "return_mask", function)
    device = _backend.device_of(function, h=h, bias=bias)
    if device == "foreign":
        return _interop.call(
            lambda **arrays: bias_act_dropout(**arrays, act=act, p=p, seed=seed, offset=offset,
                                              axis=axis, return_mask=return_mask, **act_params),
            {"h": h, "bias": bias, "out": out}, function, "h")
    if device == "cuda":
        cupy = _backend._cupy()
        h = _backend.as_cuda_array(h, "h", function)
        axis = _check_axis(axis, h.ndim, function)
        bias = _cuda_bias(bias, h, axis, function)
        out = _backend.prepare_cuda_out(out, h, function)
        h = _backend.detach_from_cuda_out(h, out)
        bias = _backend.detach_from_cuda_out(bias, out, elementwise=False)
        mask = cupy.empty(_mask_bytes(h.size), dtype=cupy.uint8) if return_mask else None
        _cuda.bias_act_dropout_forward(act_id, _backend.cuda_operand(h),
                                       _backend.cuda_operand(bias), axis,
                                       _backend.cuda_operand(out), a, b, tanh_approx, p, seed,
                                       offset, _device_buffer(mask), *_backend.cuda_target(h))
        return (out, mask) if return_mask else out
    h = _backend.as_cpu_array(h, "h", function)
    axis = _check_axis(axis, h.ndim, function)
    out = _backend.prepare_out(out, h.shape, h.dtype, function)
    bias_view = _bias_view(bias, h, axis, out, function)
    h = _backend.detach_from_out(h, out)
    mask = np.empty(_mask_bytes(h.size), dtype=np.uint8) if return_mask else None
    _cpu.bias_act_dropout_forward(act_id, h, bias_view, out, a, b, tanh_approx, p, seed, offset,
                                  mask)
    return (out, mask) if return_mask else out


def _check_contiguous_out(out, function: str):
    if not out.flags.c_contiguous:
        raise ValueError(f"fusednn.{function}: out must be C-contiguous (grad_bias is reduced "
                         "from it); pass a contiguous array, or none")


def bias_act_dropout_backward(grad_output, h, bias, act, p, *, mask=None, seed=None, offset=0,
                              axis=-1, out=None, **act_params):
    """Gradients of ``bias_act_dropout``: returns ``(grad_h, grad_bias)``
    with ``grad_h = grad_output * mask / (1 - p) * act'(h + bias)`` and
    ``grad_bias`` its sum over every axis but ``axis``, accumulated in
    double in an order fixed by the shape (the same bits for any thread
    count, and on the GPU on every run). Give the forward's packed mask, or
    the (seed, offset) that drew it. ``out``, a C-contiguous array of h's
    shape and dtype on h's device (``grad_output`` or ``h`` itself
    included), receives grad_h and is returned as it; a new array
    otherwise. grad_bias is reduced from grad_h as written, hence the
    layout.
    """
    function = "bias_act_dropout_backward"
    act_id, (a, b, tanh_approx) = _activation_args(act, act_params, function)
    p = _check_p(p, function)
    device = _backend.device_of(function, grad_output=grad_output, h=h, bias=bias, mask=mask)
    if device == "foreign":
        return _interop.call(
            lambda **arrays: bias_act_dropout_backward(
                **arrays, act=act, p=p, seed=seed, offset=offset, axis=axis, **act_params),
            {"grad_output": grad_output, "h": h, "bias": bias, "mask": mask, "out": out},
            function, "grad_output")
    if device == "cuda":
        cupy = _backend._cupy()
        grad_output = _backend.as_cuda_array(grad_output, "grad_output", function)
        h = _backend.as_cuda_array(h, "h", function)
        _backend.check_same(grad_output, h, "grad_output and h", function)
        axis = _check_axis(axis, h.ndim, function)
        bias = _cuda_bias(bias, h, axis, function)
        mask, seed, offset = _mask_or_seed(mask, seed, offset, h.size, function, like=h)
        target = _backend.cuda_target(h)
        grad_h = _backend.prepare_cuda_out(out, h, function)
        _check_contiguous_out(grad_h, function)
        grad_output = _backend.detach_from_cuda_out(grad_output, grad_h)
        h = _backend.detach_from_cuda_out(h, grad_h)
        bias = _backend.detach_from_cuda_out(bias, grad_h, elementwise=False)
        mask = _backend.detach_from_cuda_out(mask, grad_h, elementwise=False)
        _cuda.bias_act_dropout_backward(act_id, _backend.cuda_operand(grad_output),
                                        _backend.cuda_operand(h), _backend.cuda_operand(bias),
                                        axis, _backend.cuda_operand(grad_h), a, b, tanh_approx,
                                        p, _device_buffer(mask), seed, offset, *target)
        grad_bias = cupy.empty(h.shape[axis], dtype=h.dtype)
        # The float64 partial sums of the two-stage reduction: their count is
        # fixed by the shape, like the order in which they are added.
        workspace = cupy.empty(_cuda.bias_grad_workspace(h.shape, axis), dtype=cupy.float64)
        _cuda.bias_grad(_backend.cuda_operand(grad_h), axis, _backend.cuda_operand(grad_bias),
                        _device_buffer(workspace), *target)
        return grad_h, grad_bias
    grad_output = _backend.as_cpu_array(grad_output, "grad_output", function)
    h = _backend.as_cpu_array(h, "h", function)
    _backend.check_same(grad_output, h, "grad_output and h", function)
    axis = _check_axis(axis, h.ndim, function)
    mask, seed, offset = _mask_or_seed(mask, seed, offset, h.size, function)
    grad_h = _backend.prepare_out(out, h.shape, h.dtype, function)
    _check_contiguous_out(grad_h, function)
    bias_view = _bias_view(bias, h, axis, grad_h, function)
    grad_output = _backend.detach_from_out(grad_output, grad_h)
    h = _backend.detach_from_out(h, grad_h)
    mask = _backend.detach_from_out(mask, grad_h, elementwise=False)
    grad_bias = np.empty(h.shape[axis], dtype=h.dtype)
    _cpu.bias_act_dropout_backward(act_id, grad_output, h, bias_view, grad_h, axis, grad_bias, a,
                                   b, tanh_approx, p, mask, seed, offset)
    return grad_h, grad_bias

