"""Weight initializers: Glorot (Xavier), He (Kaiming) and LeCun, uniform and
normal, plus the plain ``uniform`` and ``normal`` they are built on.

Shapes follow PyTorch's layout, ``(out, in, *kernel)``: a dense layer's
weight is ``(out_features, in_features)``, a convolution's
``(out_channels, in_channels, *kernel_size)``. The fans are PyTorch's
(``torch.nn.init._calculate_fan_in_and_fan_out``)::

    receptive = prod(shape[2:])       (1 for a 2-D shape)
    fan_in    = shape[1] * receptive
    fan_out   = shape[0] * receptive

A shape with fewer than two dimensions has no fans: ValueError, as in
PyTorch. Each initializer draws zero-mean values with the variance its
rule prescribes; the uniform ones on ``[-bound, bound]`` with
``bound = sqrt(3 * variance)``, the normal ones from an untruncated normal
(as PyTorch, unlike Keras' truncated normal)::

    glorot   variance = gain^2 * 2 / (fan_in + fan_out)    gain = 1
    he       variance = gain^2 / fan_in                     gain = sqrt(2): ReLU
    lecun    variance = 1 / fan_in                          gain = 1

These are PyTorch's ``xavier_*_`` (gain 1) and
``kaiming_*_(mode='fan_in', nonlinearity='relu')``. He's variance
2 / fan_in is what keeps the pre-activation variance constant from layer
to layer in a ReLU network, which passes on half of it. Another gain
(leaky ReLU, fan_out mode) is one line with ``uniform`` or ``normal`` and
``fans``. A shape with a zero dimension gives an empty array.

Random numbers come from numpy's ``Generator`` with its default bit
generator, PCG64: ``seed`` is an int (the same int gives the same values on
every platform numpy supports), None (fresh entropy) or a
``numpy.random.Generator`` to draw from (it advances, so that successive
calls give different values). Values are drawn in float64 and rounded once
to ``dtype``. ``device='cuda'`` draws the same values on the host and copies
them into a CuPy array, so a seed gives identical weights on both devices.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["INITIALIZERS", "fans", "glorot_normal", "glorot_uniform", "he_normal",
           "he_uniform", "lecun_normal", "lecun_uniform", "normal", "uniform"]

INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                "lecun_uniform", "lecun_normal")

_DTYPES = ("float16", "float32", "float64")
_DEVICES = ("cpu", "cuda")


def _shape(shape, function: str) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"fusednn.init.{function}: shape must be a tuple of integers, "
                        f"not {type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"fusednn.init.{function}: shape must hold integers, got {shape!r}")
        if d < 0:
            raise ValueError(f"fusednn.init.{function}: shape has a negative dimension: {shape!r}")
    return tuple(int(d) for d in dims)


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of this shape, as PyTorch computes
    them for ``(out, in, *kernel)``."""
    _, fan_in, fan_out = _fans_of(shape, "fans")
    return fan_in, fan_out


def _generator(seed, function: str) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"fusednn.init.{function}: seed must be a non-negative int, None or a "
                        f"numpy.random.Generator, not {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"fusednn.init.{function}: seed must be non-negative, got {seed}")
    return np.random.default_rng(int(seed))


def _dtype(dtype, function: str) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in _DTYPES:
        raise TypeError(f"fusednn.init.{function}: dtype {dtype!r} is not supported; "
                        f"choose one of {', '.join(_DTYPES)}")
    return resolved


def _cupy(function: str):
    try:
        import cupy
    except ImportError:
        raise RuntimeError(f"fusednn.init.{function}: device='cuda' needs CuPy "
                           "(pip install cupy-cuda12x), which is not installed") from None
    return cupy


def _real(value, name: str, function: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fusednn.init.{function}: {name} must be a real number, "
                        f"not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"fusednn.init.{function}: {name} must be finite, got {value}")
    return value


def _draw(sample, shape, seed, dtype, device, function: str):
    """Calls sample(rng, shape) once every argument has been checked, so a
    bad argument leaves a passed Generator where it was."""
    rng = _generator(seed, function)
    dt = _dtype(dtype, function)
    if device not in _DEVICES:
        raise ValueError(f"fusednn.init.{function}: device must be 'cpu' or 'cuda', "
                         f"got {device!r}")
    cupy = _cupy(function) if device == "cuda" else None
    values = sample(rng, shape).astype(dt)
    return values if cupy is None else cupy.asarray(values)


def _uniform_sampler(low: float, high: float):
    return lambda rng, shape: rng.uniform(low, high, size=shape)


def _normal_sampler(mean: float, std: float):
    return lambda rng, shape: rng.normal(mean, std, size=shape)


def uniform(shape, low=0.0, high=1.0, *, seed=None, dtype="float32", device="cpu"):
    """Values uniform on ``[low, high)``: e.g. ``uniform(shape, -1/sqrt(n),
    1/sqrt(n))``, the plain rule whose variance ``1 / (3 n)`` shrinks the
    signal by 1/3 per layer."""
    function = "uniform"
    dims = _shape(shape, function)
    low = _real(low, "low", function)
    high = _real(high, "high", function)
    if low > high:
        raise ValueError(f"fusednn.init.{function}: low ({low}) must not exceed high ({high})")
    return _draw(_uniform_sampler(low, high), dims, seed, dtype, device, function)


def normal(shape, mean=0.0, std=1.0, *, seed=None, dtype="float32", device="cpu"):
    """Values from N(mean, std^2), untruncated."""
    function = "normal"
    dims = _shape(shape, function)
    mean = _real(mean, "mean", function)
    std = _real(std, "std", function)
    if std < 0:
        raise ValueError(f"fusednn.init.{function}: std must be non-negative, got {std}")
    return _draw(_normal_sampler(mean, std), dims, seed, dtype, device, function)


def _fans_of(shape, function: str) -> tuple[tuple[int, ...], int, int]:
    dims = _shape(shape, function)
    if len(dims) < 2:
        raise ValueError(f"fusednn.init.{function}: fan in and fan out can not be computed for "
                         f"a shape with fewer than 2 dimensions, got {dims!r}; weights are "
                         "(out, in, *kernel)")
    receptive = math.prod(dims[2:])
    return dims, dims[1] * receptive, dims[0] * receptive


# Each rule's variance as numerator / fan, so that the uniform bound
# sqrt(3 * numerator / fan) is the textbook sqrt(6 / (fan_in + fan_out)),
# sqrt(6 / fan_in) or sqrt(3 / fan_in) to the last bit.
_RULES = {
    "glorot": (2.0, lambda fan_in, fan_out: fan_in + fan_out),
    "he": (2.0, lambda fan_in, fan_out: fan_in),
    "lecun": (1.0, lambda fan_in, fan_out: fan_in),
}


def _initialize(rule: str, distribution: str, shape, seed, dtype, device):
    function = f"{rule}_{distribution}"
    dims, fan_in, fan_out = _fans_of(shape, function)
    numerator, fan_of = _RULES[rule]
    fan = fan_of(fan_in, fan_out)
    if distribution == "uniform":
        bound = math.sqrt(3.0 * numerator / fan) if fan else 0.0
        sample = _uniform_sampler(-bound, bound)
    else:
        sample = _normal_sampler(0.0, math.sqrt(numerator / fan) if fan else 0.0)
    return _draw(sample, dims, seed, dtype, device, function)


def glorot_uniform(shape, *, seed=None, dtype="float32", device="cpu"):
    """U[-b, b] with ``b = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio
    2010; PyTorch's ``xavier_uniform_`` with gain 1)."""
    return _initialize("glorot", "uniform", shape, seed, dtype, device)


def glorot_normal(shape, *, seed=None, dtype="float32", device="cpu"):
    """N(0, 2 / (fan_in + fan_out)) (PyTorch's ``xavier_normal_`` with gain 1)."""
    return _initialize("glorot", "normal", shape, seed, dtype, device)


def he_uniform(shape, *, seed=None, dtype="float32", device="cpu"):
    """U[-b, b] with ``b = sqrt(6 / fan_in)``: variance 2 / fan_in, for ReLU
    (He et al. 2015; PyTorch's ``kaiming_uniform_(nonlinearity='relu')``)."""
    return _initialize("he", "uniform", shape, seed, dtype, device)


def he_normal(shape, *, seed=None, dtype="float32", device="cpu"):
    """N(0, 2 / fan_in), for ReLU (PyTorch's
    ``kaiming_normal_(nonlinearity='relu')``)."""
    return _initialize("he", "normal", shape, seed, dtype, device)


def lecun_uniform(shape, *, seed=None, dtype="float32", device="cpu"):
    """U[-b, b] with ``b = sqrt(3 / fan_in)``: variance 1 / fan_in."""
    return _initialize("lecun", "uniform", shape, seed, dtype, device)


def lecun_normal(shape, *, seed=None, dtype="float32", device="cpu"):
    """N(0, 1 / fan_in) (the initialization SELU networks assume)."""
    return _initialize("lecun", "normal", shape, seed, dtype, device)
