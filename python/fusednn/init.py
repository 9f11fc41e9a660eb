"""Weight initializers: Glorot (Xavier), He (Kaiming) and LeCun, uniform and
normal, orthogonal and truncated normal, plus the plain ``uniform`` and
``normal`` they are built on, and PyTorch's ``calculate_gain``.

Shapes follow PyTorch's layout, ``(out, in, *kernel)``: a dense layer's
weight is ``(out_features, in_features)``, a convolution's
``(out_channels, in_channels, *kernel_size)``. The fans are PyTorch's
(``torch.nn.init._calculate_fan_in_and_fan_out``)::

    receptive = prod(shape[2:])       (1 for a 2-D shape)
    fan_in    = shape[1] * receptive
    fan_out   = shape[0] * receptive

A shape with fewer than two dimensions has no fans: ValueError, as in
PyTorch. A shape that reads like the channels-last layout of Keras and
TensorFlow, ``(*kernel, in, out)`` (every kernel dimension larger than both
channel counts, as in ``(3, 3, 64, 128)``), draws a UserWarning, since its
fans would come out wrong; a 2-D ``(in, out)`` cannot be told from
``(out, in)``, which is why ``nn.Dense`` passes its own shape.

Each initializer draws zero-mean values with the variance its rule
prescribes; the uniform ones on ``[-bound, bound]`` with
``bound = sqrt(3 * variance)``, the normal ones from an untruncated normal
(as PyTorch, unlike Keras' truncated normal)::

    glorot   variance = gain^2 * 2 / (fan_in + fan_out)         gain = 1
    he       variance = 2 / (1 + a^2) / fan     (fan = fan_in or fan_out: mode)
    lecun    variance = 1 / fan

These are PyTorch's ``xavier_*_(gain=...)``,
``kaiming_*_(a=..., mode=..., nonlinearity='leaky_relu')`` (whose default
a = 0 is ReLU's gain sqrt(2)) and LeCun's 1 / fan_in. He's variance
2 / fan_in is what keeps the pre-activation variance constant from layer
to layer in a ReLU network, which passes on half of it; ``mode='fan_out'``
keeps the gradients' variance constant instead. A shape with a zero
dimension gives an empty array.

Random numbers come from numpy's ``Generator`` with its default bit
generator, PCG64: ``seed`` is an int (the same int gives the same values on
every platform numpy supports), None (fresh entropy) or a
``numpy.random.Generator`` to draw from (it advances, so that successive
calls give different values). Values are drawn in float64 and rounded once
to ``dtype``. Values are always drawn on the host; ``device`` says where they
go and in which library: 'cpu' (numpy), 'cuda' (a CuPy array on the current
device), 'cuda:N' (CuPy, device N), a ``torch.device`` (a torch tensor
there), or an array of any library fusednn takes (that library, on that
array's device). So a seed gives identical weights on every device.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings

import numpy as np

from . import _arrays, _backend

__all__ = ["INITIALIZERS", "calculate_gain", "fans", "glorot_normal", "glorot_uniform",
           "he_normal", "he_uniform", "lecun_normal", "lecun_uniform", "normal", "orthogonal",
           "trunc_normal", "uniform"]

# The initializers that need nothing but a shape (nn.Dense(init=name) takes
# these names).
INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                "lecun_uniform", "lecun_normal", "orthogonal", "trunc_normal")

_DTYPES = ("float16", "bfloat16", "float32", "float64")


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
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes  # numpy's bfloat16; imported only when asked for
        except ImportError:
            raise TypeError(f"fusednn.init.{function}: dtype 'bfloat16' needs ml_dtypes "
                            "(pip install ml_dtypes)") from None
        dtype = ml_dtypes.bfloat16
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
        raise RuntimeError(f"fusednn.init.{function}: device='cuda' needs CuPy, which is "
                           f"not installed ({_backend.cupy_install_hint()})") from None
    return cupy


def _draw(sample, shape, seed, dtype, device, function: str):
    """Calls sample(rng, shape) once every argument has been checked, so a
    bad argument leaves a passed Generator where it was."""
    rng = _generator(seed, function)
    dt = _dtype(dtype, function)
    if isinstance(device, str) and (device == "cuda" or device[:5] == "cuda:"
                                    and device[5:].isdigit()):
        _check_cupy_dtype(dt, function)
        _cupy(function)  # the message naming the CuPy this build needs
    place = _arrays.device_place(f"init.{function}", device, kernels=False)
    if isinstance(place, _arrays.CupyPlace):  # a CuPy or JAX GPU array's place
        _check_cupy_dtype(dt, function)
    return place.from_host(_round_once(sample(rng, shape), dt))


def _check_cupy_dtype(dt: np.dtype, function: str) -> None:
    if dt.name == "bfloat16":
        raise TypeError(f"fusednn.init.{function}: CuPy has no bfloat16; draw on the CPU and "
                        "move the array with torch or JAX, or use float16 on the GPU")


def _round_once(values: np.ndarray, dt: np.dtype) -> np.ndarray:
    """float64 values rounded to dt once, to nearest even. numpy's casts do
    that; ml_dtypes' cast to bfloat16 goes through float32 and may round
    twice, so bfloat16 rounds here onto its grid (8 significant bits, no
    value is near its overflow), which the cast then keeps exactly."""
    if dt.name != "bfloat16":
        return values.astype(dt)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.abs(values)))
    exponent = np.where(np.isfinite(exponent), np.maximum(exponent, -126), -126)
    step = np.exp2(exponent - 7)
    return (np.round(values / step) * step).astype(dt)


def _uniform_sampler(low: float, high: float):
    return lambda rng, shape: rng.uniform(low, high, size=shape)


def _normal_sampler(mean: float, std: float):
    return lambda rng, shape: rng.normal(mean, std, size=shape)


def uniform(shape, low=0.0, high=1.0, *, seed=None, dtype="float32", device="cpu"):
    """Values uniform on ``[low, high)``: e.g. ``uniform(shape, -1/sqrt(n),
    1/sqrt(n))``, the plain rule whose variance ``1 / (3 n)`` shrinks the
    signal by 1/3 per layer."""
    function = "uniform"
    dims = _backend.check_shape(shape, f"init.{function}")
    low = _backend.check_real(low, "low", f"init.{function}")
    high = _backend.check_real(high, "high", f"init.{function}")
    if low > high:
        raise ValueError(f"fusednn.init.{function}: low ({low}) must not exceed high ({high})")
    return _draw(_uniform_sampler(low, high), dims, seed, dtype, device, function)


def normal(shape, mean=0.0, std=1.0, *, seed=None, dtype="float32", device="cpu"):
    """Values from N(mean, std^2), untruncated."""
    function = "normal"
    dims = _backend.check_shape(shape, f"init.{function}")
    mean = _backend.check_real(mean, "mean", f"init.{function}")
    std = _backend.check_real(std, "std", f"init.{function}")
    if std < 0:
        raise ValueError(f"fusednn.init.{function}: std must be non-negative, got {std}")
    return _draw(_normal_sampler(mean, std), dims, seed, dtype, device, function)


def _fans_of(shape, function: str) -> tuple[tuple[int, ...], int, int]:
    dims = _backend.check_shape(shape, f"init.{function}")
    if len(dims) < 2:
        raise ValueError(f"fusednn.init.{function}: fan in and fan out can not be computed for "
                         f"a shape with fewer than 2 dimensions, got {dims!r}; weights are "
                         "(out, in, *kernel)")
    _warn_if_channels_last(dims, function)
    receptive = math.prod(dims[2:])
    return dims, dims[1] * receptive, dims[0] * receptive


def _warn_if_channels_last(dims: tuple[int, ...], function: str) -> None:
    """Kernels are small and channel counts are not: a shape whose trailing
    dimensions all exceed its leading two is most likely Keras'
    (*kernel, in, out), for which every fan below would be wrong."""
    if len(dims) >= 3 and min(dims) > 0 and max(dims[:2]) < min(dims[2:]):
        guess = (dims[-1], dims[-2], *dims[:-2])
        warnings.warn(f"fusednn.init.{function}: shape {dims!r} looks like the channels-last "
                      f"layout (*kernel, in, out); fusednn reads shapes as (out, in, *kernel), "
                      f"as PyTorch does, so this reads as out={dims[0]}, in={dims[1]}, kernel "
                      f"{dims[2:]}; for out={dims[-1]}, in={dims[-2]} pass {guess!r}",
                      UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside this module, so
    the warning names the user's line whichever initializer was called."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def calculate_gain(nonlinearity, param=None) -> float:
    """PyTorch's recommended gain for a nonlinearity
    (``torch.nn.init.calculate_gain``): 1 for 'linear', the conv names and
    'sigmoid'; 5/3 for 'tanh'; sqrt(2) for 'relu';
    sqrt(2 / (1 + param^2)) for 'leaky_relu' (param = negative slope,
    default 0.01); 3/4 for 'selu'. Anything else: ValueError."""
    if nonlinearity in _LINEAR_NAMES or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, bool) or not isinstance(param, numbers.Real):
            raise ValueError(f"fusednn.init.calculate_gain: negative_slope {param!r} is not a "
                             "valid number")
        else:
            slope = float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"fusednn.init.calculate_gain: unsupported nonlinearity {nonlinearity!r}; "
                     f"choose one of {', '.join(_LINEAR_NAMES)}, sigmoid, tanh, relu, "
                     "leaky_relu, selu")


_LINEAR_NAMES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d")


def _fan(fan_in: int, fan_out: int, mode, function: str) -> int:
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"fusednn.init.{function}: mode must be 'fan_in' or 'fan_out', got {mode!r}")


def _initialize(function: str, shape, numerator, fan_of, seed, dtype, device, *, gain=1.0):
    """Draws with variance gain^2 * numerator / fan. The numerator stays
    inside the square root (2.0 for glorot and he with a = 0) so that the
    uniform bounds are the textbook sqrt(6 / (fan_in + fan_out)),
    sqrt(6 / fan_in) or sqrt(3 / fan_in) to the last bit."""
    dims, fan_in, fan_out = _fans_of(shape, function)
    fan = fan_of(fan_in, fan_out)
    if function.endswith("uniform"):
        bound = gain * math.sqrt(3.0 * numerator / fan) if fan else 0.0
        sample = _uniform_sampler(-bound, bound)
    else:
        sample = _normal_sampler(0.0, gain * math.sqrt(numerator / fan) if fan else 0.0)
    return _draw(sample, dims, seed, dtype, device, function)


def _gain(gain, function: str) -> float:
    gain = _backend.check_real(gain, "gain", f"init.{function}")
    if gain < 0:
        raise ValueError(f"fusednn.init.{function}: gain must be non-negative, got {gain}")
    return gain


def _glorot(function, shape, gain, seed, dtype, device):
    return _initialize(function, shape, 2.0, lambda fan_in, fan_out: fan_in + fan_out, seed,
                       dtype, device, gain=_gain(gain, function))


def _he(function, shape, a, mode, seed, dtype, device):
    a = _backend.check_real(a, "a", f"init.{function}")
    _fan(0, 0, mode, function)
    return _initialize(function, shape, 2.0 / (1.0 + a * a),
                       lambda fan_in, fan_out: _fan(fan_in, fan_out, mode, function),
                       seed, dtype, device)


def _lecun(function, shape, mode, seed, dtype, device):
    _fan(0, 0, mode, function)
    return _initialize(function, shape, 1.0,
                       lambda fan_in, fan_out: _fan(fan_in, fan_out, mode, function),
                       seed, dtype, device)


def glorot_uniform(shape, *, gain=1.0, seed=None, dtype="float32", device="cpu"):
    """U[-b, b] with ``b = gain * sqrt(6 / (fan_in + fan_out))`` (Glorot &
    Bengio 2010; PyTorch's ``xavier_uniform_``)."""
    return _glorot("glorot_uniform", shape, gain, seed, dtype, device)


def glorot_normal(shape, *, gain=1.0, seed=None, dtype="float32", device="cpu"):
    """N(0, gain^2 * 2 / (fan_in + fan_out)) (PyTorch's ``xavier_normal_``)."""
    return _glorot("glorot_normal", shape, gain, seed, dtype, device)


def he_uniform(shape, *, a=0.0, mode="fan_in", seed=None, dtype="float32", device="cpu"):
    """U[-b, b] with ``b = sqrt(6 / ((1 + a^2) fan))``: variance 2 / fan for
    ReLU, 2 / ((1 + a^2) fan) for leaky ReLU of slope a (He et al. 2015;
    PyTorch's ``kaiming_uniform_(a=a, mode=mode)``)."""
    return _he("he_uniform", shape, a, mode, seed, dtype, device)


def he_normal(shape, *, a=0.0, mode="fan_in", seed=None, dtype="float32", device="cpu"):
    """N(0, 2 / ((1 + a^2) fan)) (PyTorch's ``kaiming_normal_(a=a, mode=mode)``)."""
    return _he("he_normal", shape, a, mode, seed, dtype, device)


def lecun_uniform(shape, *, mode="fan_in", seed=None, dtype="float32", device="cpu"):
    """U[-b, b] with ``b = sqrt(3 / fan)``: variance 1 / fan."""
    return _lecun("lecun_uniform", shape, mode, seed, dtype, device)


def lecun_normal(shape, *, mode="fan_in", seed=None, dtype="float32", device="cpu"):
    """N(0, 1 / fan) (the initialization SELU networks assume)."""
    return _lecun("lecun_normal", shape, mode, seed, dtype, device)


def orthogonal(shape, *, gain=1.0, seed=None, dtype="float32", device="cpu"):
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2013; PyTorch's
    ``orthogonal_``): the shape is viewed as ``(shape[0], prod(shape[1:]))``;
    its rows are orthonormal when there are no more rows than columns, its
    columns otherwise. Q of the QR factorization of a standard normal
    matrix, with the signs of R's diagonal moved into Q, which makes Q
    uniform over the orthogonal matrices (Mezzadri 2007)."""
    function = "orthogonal"
    dims = _backend.check_shape(shape, f"init.{function}")
    if len(dims) < 2:
        raise ValueError(f"fusednn.init.{function}: needs a shape with at least 2 dimensions, "
                         f"got {dims!r}")
    _warn_if_channels_last(dims, function)
    gain = _backend.check_real(gain, "gain", f"init.{function}")

    def sample(rng, shape):
        rows = shape[0]
        cols = math.prod(shape) // rows if rows else 0
        if rows == 0 or cols == 0:
            return np.zeros(shape)
        flat = rng.standard_normal((rows, cols))
        if rows < cols:
            flat = flat.T
        q, r = np.linalg.qr(flat)
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return gain * q.reshape(shape)

    return _draw(sample, dims, seed, dtype, device, function)


def trunc_normal(shape, *, mean=0.0, std=1.0, a=-2.0, b=2.0, seed=None, dtype="float32",
                 device="cpu"):
    """N(mean, std^2) conditioned on [a, b], with a and b in absolute units
    (PyTorch's ``trunc_normal_``: the defaults cut at +-2 for std = 1, and
    at +-2 / std standard deviations otherwise).

    a or b may be infinite (no cut on that side). Exact for any interval,
    far tails included (PyTorch's inverse-CDF method loses them to
    rounding): each value is drawn by rejection from whichever proposal
    accepts often on that interval (Robert 1995): the normal itself when the
    interval holds 0 and is at least one standard deviation wide, a uniform
    on the interval when it is narrow, an exponential shifted to the
    interval's near end in a tail. Every proposal accepts at least a third
    of its draws."""
    function = "trunc_normal"
    dims = _backend.check_shape(shape, f"init.{function}")
    mean = _backend.check_real(mean, "mean", f"init.{function}")
    std = _backend.check_real(std, "std", f"init.{function}")
    a = _bound(a, "a", function)
    b = _bound(b, "b", function)
    if std <= 0:
        raise ValueError(f"fusednn.init.{function}: std must be positive, got {std}")
    if not a < b:
        raise ValueError(f"fusednn.init.{function}: a ({a}) must be below b ({b})")
    low, high = (a - mean) / std, (b - mean) / std

    def sample(rng, shape):
        z = _truncated_standard_normal(rng, math.prod(shape), low, high).reshape(shape)
        # One rounding of mean + std * z can step past a bound by an ulp.
        return np.clip(mean + std * z, a, b)

    return _draw(sample, dims, seed, dtype, device, function)


def _bound(value, name: str, function: str) -> float:
    """A truncation point: any real, infinities included (no cut on that side)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"fusednn.init.{function}: {name} must be a real number, got {value!r}")
    return float(value)


def _truncated_standard_normal(rng: np.random.Generator, n: int, low: float,
                               high: float) -> np.ndarray:
    """n draws of N(0, 1) conditioned on [low, high]; see trunc_normal."""
    flip = high <= 0  # a negative tail: draw its mirror image and negate
    if flip:
        low, high = -high, -low
    if low <= 0 and high - low >= 1:
        proposal = "normal"   # accepts >= 0.34, the mass of [0, 1]
    elif low <= 0 or (high * high - low * low) / 2 <= 1:
        proposal = "uniform"  # accepts >= exp(-1)
    else:
        proposal = "tail"     # accepts >= 0.76 * (1 - exp(-1))
    peak = max(low, 0.0)  # where the density is largest on the interval
    lam = (low + math.sqrt(low * low + 4)) / 2  # the best exponential rate for [low, inf)
    out = np.empty(n)
    filled = 0
    while filled < n:
        size = 3 * (n - filled) + 16
        if proposal == "normal":
            x = rng.standard_normal(size)
            keep = (x >= low) & (x <= high)
        elif proposal == "uniform":
            x = rng.uniform(low, high, size)
            keep = rng.random(size) <= np.exp((peak * peak - x * x) / 2)
        else:
            x = low + rng.exponential(1 / lam, size)
            keep = (rng.random(size) <= np.exp(-(x - lam) ** 2 / 2)) & (x <= high)
        kept = x[keep][:n - filled]
        out[filled:filled + kept.size] = kept
        filled += kept.size
    return -out if flip else out
