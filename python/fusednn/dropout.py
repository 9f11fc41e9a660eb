"""Inverted dropout and the fused bias + activation + dropout epilogue, on
arrays of any library the array layer takes (numpy, CuPy, torch, JAX,
DLPack; see _arrays). float16 and bfloat16 (on the GPU bfloat16 from torch
or JAX, CuPy having none) are computed in float32 and rounded once.

``p`` is the drop probability; kept elements are scaled by ``1 / (1 - p)``.
The mask is a pure function of (seed, offset, start, p, n): element ``i``
(flat C-order index of the logical array, whatever its strides) takes the
decision of global index ``g = start + i``, kept iff lane ``g % 4`` of
Philox4x32-10 with counter ``(g // 4, offset)`` and key ``seed`` is below
``round((1 - p) * 2**32)``; ``start`` lets the slices of a batch split
across processes draw the one-process mask of the whole batch. It can be
returned bit-packed (bit ``i % 8`` of byte ``i // 8``) or not stored at
all: the backward functions accept either the packed mask or the (seed,
offset, start) that drew it. Both devices draw the same bits. See
docs/dropout.md and docs/cuda.md.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _arrays, _backend
from .activations import _IDS, _check_name, _check_same, _kernel_params

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


def _check_start(value, size: int, function: str) -> int:
    """start, the global index of the call's first element: an integer in
    [0, 2**64) with every index start + i of the call's size elements below
    2**64."""
    if type(value) is int and 0 <= value < _UINT64_LIMIT - size:  # the common case
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fusednn.{function}: start must be an integer, "
                        f"not {type(value).__name__}")
    value = int(value)
    if not 0 <= value < _UINT64_LIMIT:
        raise ValueError(f"fusednn.{function}: start must lie in [0, 2**64), got {value}")
    if value + size > _UINT64_LIMIT:
        raise ValueError(f"fusednn.{function}: start + n must not exceed 2**64 (every global "
                         f"index below 2**64), got start = {value} for n = {size}")
    return value


def _mask_bytes(size: int) -> int:
    return (size + 7) // 8


_MASK_DTYPES = (np.dtype(np.uint8),)


def _check_mask(place, mask, size: int, function: str):
    """The descriptor of a bit-packed mask for `size` elements: uint8,
    (size + 7) // 8 bytes, made C-contiguous (the kernels read it as bytes)."""
    mask = place.view(mask, "mask (bit-packed)", function, dtypes=_MASK_DTYPES)
    if mask.size != _mask_bytes(size):
        raise ValueError(f"fusednn.{function}: mask must hold (n + 7) // 8 = "
                         f"{_mask_bytes(size)} bytes for {size} elements, got {mask.size}")
    return place.contiguous(mask)


def _mask_or_seed(place, mask, seed, offset, start, size: int, function: str):
    """Validates the backward's source of the mask: exactly one of mask and
    seed. Returns (mask descriptor or None, seed, offset, start). A mask
    holds the call's own elements (bit i for element i, as the forward
    returned it with the same start), so start is checked but not used
    with one."""
    if mask is None and seed is None:
        raise ValueError(f"fusednn.{function}: give the forward's mask, or the seed (and "
                         "offset) that drew it")
    if mask is not None and seed is not None:
        raise ValueError(f"fusednn.{function}: give either mask or seed, not both")
    offset = _check_counter(offset, "offset", function)
    start = _check_start(start, size, function)
    if mask is not None:
        return _check_mask(place, mask, size, function), 0, 0, 0
    return None, _check_counter(seed, "seed", function), offset, start


def dropout(x, p, *, seed, offset=0, start=0, training=True, return_mask=False, out=None):
    """Inverted dropout: ``y = x * mask / (1 - p)``, elementwise.

    ``p = 1`` gives zeros (``x * 0``: NaN and infinities stay NaN, as in
    PyTorch), ``p = 0`` gives x. With ``training=False`` x is returned
    unchanged (copied into ``out``, or a copy). ``return_mask=True`` also
    returns the bit-packed uint8 mask of ``(x.size + 7) // 8`` bytes (all
    ones for ``training=False``). Element ``i`` takes the decision of
    global index ``start + i``: a rank whose slice of a batch starts at
    global element ``g`` passes ``start=g``, with the same seed and offset
    as every other rank, and the ranks' masks are the slices of the
    one-process mask of the whole batch.
    """
    function = "dropout"
    p = _check_p(p, function)
    seed = _check_counter(seed, "seed", function)
    offset = _check_counter(offset, "offset", function)
    training = _check_flag(training, "training", function)
    return_mask = _check_flag(return_mask, "return_mask", function)
    place = _arrays.locate(function, ("x",), x)
    x = place.view(x, "x", function)
    start = _check_start(start, x.size, function)
    y = place.output(out, x, function)
    if out is not None:  # a new y shares memory with nothing
        x = place.detach(x, y)
    mask = place.empty((_mask_bytes(x.size),), np.uint8) if return_mask else None
    if training:
        place.backend.dropout_forward(x, y, p, seed, offset, start, mask)
    else:
        place.copy(x, y)
        if return_mask:  # every element kept: the mask of p = 0
            place.backend.dropout_mask(x.size, 0.0, 0, 0, 0, mask)
    if return_mask:
        return place.result(y, out), place.result(mask)
    return place.result(y, out)


def dropout_backward(grad_output, p, *, mask=None, seed=None, offset=0, start=0, out=None):
    """``grad_input = grad_output * mask / (1 - p)``, with the mask given
    bit-packed or regenerated from the (seed, offset, start) of the
    forward."""
    function = "dropout_backward"
    p = _check_p(p, function)
    place = _arrays.locate(function, ("grad_output", "mask"), grad_output, mask)
    grad_output = place.view(grad_output, "grad_output", function)
    mask, seed, offset, start = _mask_or_seed(place, mask, seed, offset, start,
                                              grad_output.size, function)
    result = place.output(out, grad_output, function)
    if out is not None:  # a new result shares memory with nothing
        grad_output = place.detach(grad_output, result)
        mask = place.detach(mask, result, elementwise=False)
    place.backend.dropout_backward(grad_output, result, p, mask, seed, offset, start)
    return place.result(result, out)


def dropout_mask(shape, p, *, seed, offset=0, start=0, device="cpu"):
    """The bit-packed keep mask that ``dropout`` draws for an array of
    ``shape``: uint8, ``(n + 7) // 8`` bytes, bit ``i % 8`` of byte
    ``i // 8`` for element ``i`` (the decision of global index
    ``start + i``); ``np.unpackbits(mask, bitorder='little')[:n]`` unpacks
    it.

    ``device`` says where the mask is drawn and in which library it comes
    back: 'cpu' (numpy), 'cuda' (CuPy, its current device and stream),
    'cuda:N' (CuPy, device N), a ``torch.device`` (a uint8 torch tensor
    there, on torch's current stream), or an array of any library fusednn
    takes (that library, on that array's device). The bytes are the same
    everywhere."""
    function = "dropout_mask"
    shape = _backend.check_shape(shape, function)
    p = _check_p(p, function)
    seed = _check_counter(seed, "seed", function)
    offset = _check_counter(offset, "offset", function)
    size = math.prod(shape)
    start = _check_start(start, size, function)
    place = _arrays.device_place(function, device)
    mask = place.empty((_mask_bytes(size),), np.uint8)
    place.backend.dropout_mask(size, p, seed, offset, start, mask)
    return place.result(mask)


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


def _check_bias(place, bias, h, axis: int, function: str):
    """bias's descriptor: 1-d, of length h.shape[axis] and h's dtype (the
    kernels broadcast it along every other axis)."""
    bias = place.view(bias, "bias", function)
    if bias.ndim != 1 or bias.shape[0] != h.shape[axis]:
        raise ValueError(f"fusednn.{function}: bias must be 1-d of length h.shape[{axis}] = "
                         f"{h.shape[axis]}, got shape {bias.shape}")
    if bias.dtype != h.dtype:
        raise TypeError(f"fusednn.{function}: bias and h must have the same dtype, "
                        f"got {bias.dtype} and {h.dtype}")
    return bias


def _activation_args(act, act_params: dict, function: str):
    _check_name(act, function)
    return _IDS[act], _kernel_params(act, act_params, function)


def bias_act_dropout(h, bias, act, p, *, seed, offset=0, start=0, axis=-1, return_mask=False,
                     out=None, **act_params):
    """The fused epilogue ``o = mask * act(h + bias) / (1 - p)`` in one pass.

    ``bias`` is 1-d and broadcast along ``axis`` of h (``-1``: the last
    axis, as after ``x @ W``; ``1``: channels of NCHW). ``act`` is an
    activation name from ``fusednn.ACTIVATIONS`` and ``act_params`` its
    parameters. The mask is the one ``dropout`` draws for h's shape with
    the same (seed, offset, start, p); ``return_mask=True`` returns it too.
    """
    function = "bias_act_dropout"
    act_id, (a, b, tanh_approx) = _activation_args(act, act_params, function)
    p = _check_p(p, function)
    seed = _check_counter(seed, "seed", function)
    offset = _check_counter(offset, "offset", function)
    return_mask = _check_flag(return_mask, "return_mask", function)
    place = _arrays.locate(function, ("h", "bias"), h, bias)
    h = place.view(h, "h", function)
    axis = _check_axis(axis, h.ndim, function)
    start = _check_start(start, h.size, function)
    result = place.output(out, h, function)
    bias = _check_bias(place, bias, h, axis, function)
    if out is not None:  # a new result shares memory with nothing
        bias = place.detach(bias, result, elementwise=False)
        h = place.detach(h, result)
    mask = place.empty((_mask_bytes(h.size),), np.uint8) if return_mask else None
    place.backend.bias_act_dropout_forward(act_id, h, bias, axis, result, a, b, tanh_approx, p,
                                           seed, offset, start, mask)
    if return_mask:
        return place.result(result, out), place.result(mask)
    return place.result(result, out)


def _check_contiguous_out(out, function: str):
    if not _arrays.is_c_contiguous(out):
        raise ValueError(f"fusednn.{function}: out must be C-contiguous (grad_bias is reduced "
                         "from it); pass a contiguous array, or none")


def bias_act_dropout_backward(grad_output, h, bias, act, p, *, mask=None, seed=None, offset=0,
                              start=0, axis=-1, out=None, **act_params):
    """Gradients of ``bias_act_dropout``: returns ``(grad_h, grad_bias)``
    with ``grad_h = grad_output * mask / (1 - p) * act'(h + bias)`` and
    ``grad_bias`` its sum over every axis but ``axis``, accumulated in
    double in an order fixed by the shape (the same bits for any thread
    count, and on the GPU on every run). Give the forward's packed mask, or
    the (seed, offset, start) that drew it. ``out``, a C-contiguous array of h's
    shape and dtype on h's device (``grad_output`` or ``h`` itself
    included), receives grad_h and is returned as it; a new array
    otherwise. grad_bias is reduced from grad_h as written, hence the
    layout.
    """
    function = "bias_act_dropout_backward"
    act_id, (a, b, tanh_approx) = _activation_args(act, act_params, function)
    p = _check_p(p, function)
    place = _arrays.locate(function, ("grad_output", "h", "bias", "mask"), grad_output, h, bias,
                           mask)
    grad_output = place.view(grad_output, "grad_output", function)
    h = place.view(h, "h", function)
    _check_same(grad_output, h, "grad_output and h", function)
    axis = _check_axis(axis, h.ndim, function)
    bias = _check_bias(place, bias, h, axis, function)
    mask, seed, offset, start = _mask_or_seed(place, mask, seed, offset, start, h.size,
                                              function)
    grad_h = place.output(out, h, function)
    _check_contiguous_out(grad_h, function)
    if out is not None:  # a new grad_h shares memory with nothing
        grad_output = place.detach(grad_output, grad_h)
        h = place.detach(h, grad_h)
        bias = place.detach(bias, grad_h, elementwise=False)
        mask = place.detach(mask, grad_h, elementwise=False)
    grad_bias = place.empty((h.shape[axis],), h.dtype)
    backend = place.backend
    workspace = place.workspace(backend.bias_grad_workspace_bytes(h.shape, axis))
    backend.bias_act_dropout_backward(act_id, grad_output, h, bias, axis, grad_h, grad_bias,
                                      workspace, a, b, tanh_approx, p, mask, seed, offset,
                                      start)
    return place.result(grad_h, out), place.result(grad_bias)
