"""Activation functions and their derivatives, on arrays of any library
the array layer takes (numpy, CuPy, torch, JAX, DLPack; see _arrays).

Every function takes an array of any shape (0-d, empty and strided views
included) in float32 or float64, or float16 and bfloat16 (ml_dtypes arrays,
torch and JAX arrays; on the GPU bfloat16 from torch or JAX) computed in float32 and
rounded once, and returns a new array of the same library and device, or
writes ``out`` when given (``out=x`` works in place). Parameters and edge cases follow PyTorch; see docs/activations.md
for each formula, the derivative's input and the measured accuracy, and
docs/cuda.md for the GPU.
"""
from __future__ import annotations

import numpy as np

from . import _arrays, _backend, _cpu

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu",
               "softplus", "mish", "hardsigmoid", "hardswish", "hardtanh")
_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}

# name -> {parameter: default}
_PARAMETERS = {
    "leaky_relu": {"negative_slope": 0.01},
    "elu": {"alpha": 1.0},
    "gelu": {"approximate": "none"},
    "softplus": {"beta": 1.0, "threshold": 20.0},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
}

# Activations whose derivative can be formed from the forward output y.
_FROM_OUTPUT = {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "hardtanh"}


def _check_same(a, b, names: str, function: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"fusednn.{function}: {names} must have the same shape, "
                         f"got {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"fusednn.{function}: {names} must have the same dtype, "
                        f"got {a.dtype} and {b.dtype}")


def _check_name(name: str, function: str) -> None:
    if not isinstance(name, str) or name not in _IDS:
        raise ValueError(f"fusednn.{function}: unknown activation {name!r}; "
                         f"choose one of {', '.join(ACTIVATIONS)}")


def _validated_kernel_params(name: str, params: dict, function: str):
    """Validates an activation's keyword parameters and maps them to the
    kernel's (a, b, tanh_approximation)."""
    allowed = _PARAMETERS.get(name, {})
    if any(key not in allowed for key in params):
        unknown = sorted(set(params) - set(allowed))
        accepted = ", ".join(allowed) if allowed else "no parameters"
        raise TypeError(f"fusednn.{function}: {name} got unexpected parameter(s) "
                        f"{', '.join(unknown)} (it takes {accepted})")
    p = {**allowed, **params}
    if name == "leaky_relu":
        return _backend.check_real(p["negative_slope"], "negative_slope", function), 0.0, False
    if name == "elu":
        return _backend.check_real(p["alpha"], "alpha", function), 0.0, False
    if name == "gelu":
        if p["approximate"] not in ("none", "tanh"):
            raise ValueError(f"fusednn.{function}: approximate must be 'none' or 'tanh', "
                             f"got {p['approximate']!r}")
        return 0.0, 0.0, p["approximate"] == "tanh"
    if name == "softplus":
        beta = _backend.check_real(p["beta"], "beta", function)
        if beta <= 0:
            raise ValueError(f"fusednn.{function}: beta must be positive, got {beta}")
        return beta, _backend.check_real(p["threshold"], "threshold", function), False
    if name == "hardtanh":
        lo = _backend.check_real(p["min_val"], "min_val", function)
        hi = _backend.check_real(p["max_val"], "max_val", function)
        if lo > hi:
            raise ValueError(f"fusednn.{function}: min_val ({lo}) must not exceed max_val ({hi})")
        return lo, hi, False
    return 0.0, 0.0, False


# The kernel parameters of each activation called without keywords, formed
# once: most calls pass none.
_DEFAULT_KERNEL_PARAMS = {name: _validated_kernel_params(name, {}, name) for name in ACTIVATIONS}


def _kernel_params(name: str, params: dict, function: str):
    """_validated_kernel_params, from the table above when params is empty
    (name is already checked)."""
    if not params:
        return _DEFAULT_KERNEL_PARAMS[name]
    return _validated_kernel_params(name, params, function)


def activation(name: str, x, *, out=None, **params):
    """Applies the activation ``name`` elementwise: ``y = f(x)``.

    ``params`` are the activation's own keyword parameters (e.g.
    ``negative_slope`` for leaky_relu). Returns ``out`` when given.
    """
    if type(name) is not str or name not in _IDS:
        _check_name(name, "activation")
    return _forward(name, x, out, _kernel_params(name, params, name))


_activation_quick = _cpu.activation_quick
_activation_backward_quick = _cpu.activation_backward_quick


def _forward(name: str, x, out, kernel_params):
    """The one path of every forward activation: `name` is checked,
    kernel_params are its (a, b, tanh_approximation)."""
    # Ordinary calls (numpy arrays or torch CPU tensors of float32/float64;
    # out C-contiguous, x itself or apart from it) in one compiled call,
    # which declines the rest, errors included, with nothing written.
    result = _activation_quick(_IDS[name], x, out, kernel_params)
    if result is not None:
        return result
    place = _arrays.locate(name, ("x",), x)
    x = place.view(x, "x", name)
    result = place.output(out, x, name)
    if out is not None:  # a new result shares memory with nothing
        x = place.detach(x, result)
    a, b, tanh_approx = kernel_params
    place.backend.activation_forward(_IDS[name], x, result, a, b, tanh_approx)
    return place.result(result, out)


def activation_backward(name: str, grad_output, *, x=None, y=None, out=None, **params):
    """Returns ``grad_input = grad_output * f'(x)`` for the activation ``name``.

    Give the forward input ``x`` (every activation accepts it) or the
    forward output ``y`` (sigmoid, tanh, relu, leaky_relu with
    negative_slope >= 0, elu with alpha >= 0, selu, hardtanh). When both
    are given, ``y`` is used where the activation accepts it.
    """
    function = "activation_backward"
    _check_name(name, function)
    kernel_params = _kernel_params(name, params, function)
    a, b, tanh_approx = kernel_params
    if x is None and y is None:
        raise ValueError(f"fusednn.{function}: give x (the forward input) or y "
                         "(the forward output)")
    use_y = y is not None and name in _FROM_OUTPUT
    if use_y and name in ("leaky_relu", "elu") and a < 0:
        use_y = False
    if y is not None and x is None and not use_y:
        raise ValueError(f"fusednn.{function}: the derivative of {name} with these "
                         "parameters needs x, the forward input; y is not enough")
    saved_name = "y" if use_y else "x"
    saved = y if use_y else x
    # Ordinary calls in one compiled call, as in the forward.
    result = _activation_backward_quick(_IDS[name], use_y, grad_output, saved, out,
                                        kernel_params)
    if result is not None:
        return result
    place = _arrays.locate(function, ("grad_output", saved_name), grad_output, saved)
    grad_output = place.view(grad_output, "grad_output", function)
    saved = place.view(saved, saved_name, function)
    _check_same(grad_output, saved, f"grad_output and {saved_name}", function)
    result = place.output(out, grad_output, function)
    if out is not None:  # a new result shares memory with nothing
        grad_output = place.detach(grad_output, result)
        saved = place.detach(saved, result)
    place.backend.activation_backward(_IDS[name], use_y, grad_output, saved, result, a, b,
                                      tanh_approx)
    return place.result(result, out)


def sigmoid(x, *, out=None):
    """1 / (1 + exp(-x))."""
    return _forward("sigmoid", x, out, _DEFAULT_KERNEL_PARAMS["sigmoid"])


def tanh(x, *, out=None):
    """Hyperbolic tangent."""
    return _forward("tanh", x, out, _DEFAULT_KERNEL_PARAMS["tanh"])


def relu(x, *, out=None):
    """max(x, 0); -0 and NaN pass through, as in PyTorch."""
    return _forward("relu", x, out, _DEFAULT_KERNEL_PARAMS["relu"])


def leaky_relu(x, negative_slope=0.01, *, out=None):
    """x for x > 0, negative_slope * x otherwise."""
    return activation("leaky_relu", x, out=out, negative_slope=negative_slope)


def elu(x, alpha=1.0, *, out=None):
    """x for x > 0, alpha * (exp(x) - 1) otherwise."""
    return activation("elu", x, out=out, alpha=alpha)


def selu(x, *, out=None):
    """scale * elu(x, alpha) with the self-normalizing constants."""
    return _forward("selu", x, out, _DEFAULT_KERNEL_PARAMS["selu"])


def gelu(x, approximate="none", *, out=None):
    """x * Phi(x) (approximate='none') or its tanh approximation ('tanh')."""
    if type(approximate) is str and approximate == "none":  # the default, formed once
        return _forward("gelu", x, out, _DEFAULT_KERNEL_PARAMS["gelu"])
    return activation("gelu", x, out=out, approximate=approximate)


def silu(x, *, out=None):
    """x * sigmoid(x) (swish)."""
    return _forward("silu", x, out, _DEFAULT_KERNEL_PARAMS["silu"])


def softplus(x, beta=1.0, threshold=20.0, *, out=None):
    """log(1 + exp(beta x)) / beta, and x where beta x > threshold."""
    return activation("softplus", x, out=out, beta=beta, threshold=threshold)


def mish(x, *, out=None):
    """x * tanh(softplus(x))."""
    return _forward("mish", x, out, _DEFAULT_KERNEL_PARAMS["mish"])


def hardsigmoid(x, *, out=None):
    """clamp(x + 3, 0, 6) / 6."""
    return _forward("hardsigmoid", x, out, _DEFAULT_KERNEL_PARAMS["hardsigmoid"])


def hardswish(x, *, out=None):
    """x * clamp(x + 3, 0, 6) / 6."""
    return _forward("hardswish", x, out, _DEFAULT_KERNEL_PARAMS["hardswish"])


def hardtanh(x, min_val=-1.0, max_val=1.0, *, out=None):
    """clamp(x, min_val, max_val)."""
    return activation("hardtanh", x, out=out, min_val=min_val, max_val=max_val)
