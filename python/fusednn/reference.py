"""The float64 numpy reference for every fusednn kernel.

Readable, numpy-only and computed in float64 whatever the input dtype (the
results are float64): this is what the tests check the kernels against.
Formulas are the numerically stable ones (sigmoid from exp(-|x|), softplus
as log1p(exp(-|x|)) + max(x, 0), derivatives without 1 - s or 1 - t*t
cancellation) so that the reference is accurate at every input the float32
kernels can see. GELU's Phi and phi also carry x / sqrt(2) and x^2 exactly
and keep their accuracy down to subnormal results, which makes float64
gelu and its derivative accurate to a few ulp too (measured against mpmath
by scripts/accuracy_gelu64.py). Parameters, kinks and infinities follow PyTorch.
"""
from __future__ import annotations

import collections
import math

import numpy as np

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu",
               "softplus", "mish", "hardsigmoid", "hardswish", "hardtanh")

SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715

_erfc = np.frompyfunc(math.erfc, 1, 1)
# 1/sqrt(2), 1/sqrt(2 pi) and exp(-400) as a double and its remainder.
_INV_SQRT2 = (0.7071067811865476, -4.833646656726457e-17)
_INV_SQRT_2PI = (0.3989422804014327, -2.49232720227773e-17)
_EXP_M400 = (1.9151695967140057e-174, 1.2644597855524639e-191)
# Below -NORMAL_TAIL, Phi comes from the Mills-ratio series.
NORMAL_TAIL = 26.0


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _quiet(func):
    """Evaluates with floating-point warnings off: infinities and NaN are
    part of the domain here."""
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)
    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _two_product(a, b):
    """a * b as hi + lo exactly (Dekker's product with Veltkamp splitting),
    so that an exponential of the product (exp(beta * x), exp(-x^2 / 2))
    does not inherit its rounding. lo is 0 where the product overflows."""
    def split(v):
        c = 134217729.0 * v  # 2^27 + 1
        hi = c - (c - v)
        return hi, v - hi
    hi = a * b
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    lo = ((a_hi * b_hi - hi) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return hi, np.where(np.isfinite(lo), lo, 0.0)


@_quiet
def _gauss_times(f, x):
    """f * phi(x). x^2 is carried exactly (sq + sq_lo), since rounding it
    would cost a relative (x^2 / 2) 2^-53 of phi (16 ulp at |x| = 10).
    Where exp(-x^2 / 2) alone would be subnormal it is evaluated as
    exp(-x^2 / 2 + 400) * exp(-400) (the sum is exact there, and exp(-400)
    a pair), so that the product is rounded to the subnormal grid once."""
    sq, sq_lo = _two_product(x, x)
    half = -0.5 * sq
    sq_lo = np.where(half < -800, 0.0, sq_lo)  # phi is 0 there; sq_lo may be huge
    # k = f / sqrt(2 pi) * (1 - sq_lo / 2), the factor exp(-sq_lo / 2) to
    # first order, rounded once: f times the constant's pair, exactly.
    p, p_lo = _two_product(f, _INV_SQRT_2PI[0])
    k = p + (p_lo + f * (_INV_SQRT_2PI[1] - 0.5 * _INV_SQRT_2PI[0] * sq_lo))
    deep = (k * _EXP_M400[0] + k * _EXP_M400[1]) * np.exp(half + 400.0)
    return np.where(half < -708, deep, k * np.exp(half))


def _normal_tail_series(t):
    """S(t) = t Phi(-t) / phi(t) for t >= NORMAL_TAIL: the asymptotic
    series sum_k (-1)^k (2k - 1)!! / t^(2k) to k = 8, whose remainder is
    below the first omitted term, 17!! / 26^18 = 1.2e-18."""
    u = 1.0 / (t * t)
    s = np.zeros_like(u)
    for k in range(8, -1, -1):
        s = s * u + (-1) ** k * math.prod(range(1, 2 * k, 2))
    return s


@_quiet
def normal_cdf(x):
    """Phi(x). From x = -NORMAL_TAIL up, erfc(w) / 2 with w = -x / sqrt(2)
    carried as w_hi + w_lo: erfc at w_hi, corrected to first order with
    d/dw erfc(w) / 2 = -sqrt(2) phi(x) (rounding w alone would cost a
    relative 2 w^2 2^-53 of Phi, 25 ulp at x = -7). Below, phi(x) S(t) / t
    with t = -x, where erfc(w) would soon be subnormal. x is clamped to
    [-40, 40] for the erfc form, beyond which its value no longer changes."""
    x = _f64(x)
    xc = np.clip(x, -40.0, 40.0)
    w, w_lo = _two_product(-xc, _INV_SQRT2[0])
    w_lo = w_lo - xc * _INV_SQRT2[1]
    central = 0.5 * np.asarray(_erfc(w), dtype=np.float64) - math.sqrt(2.0) * w_lo * normal_pdf(xc)
    t = np.maximum(-x, NORMAL_TAIL)
    return np.where(x < -NORMAL_TAIL, _gauss_times(_normal_tail_series(t) / t, x), central)


def normal_pdf(x):
    """phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    return _gauss_times(1.0, _f64(x))


@_quiet
def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


@_quiet
def _sigmoid_slope(x):
    """sigmoid'(x) = e / (1 + e)^2 with e = exp(-|x|)."""
    e = np.exp(-np.abs(x))
    return e / (1.0 + e) ** 2


@_quiet
def _times_exp(f, x):
    """f * exp(x), also where exp(x) alone underflows but the product does
    not (x < -600 in float64): exp(x + 400) * exp(-400) then rounds once."""
    return np.where(x < -600, f * np.exp(x + 400.0) * np.exp(-400.0), f * np.exp(x))


@_quiet
def _softplus_core(z):
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)


# ---- forward -----------------------------------------------------------------

@_quiet
def sigmoid(x):
    return _sigmoid(_f64(x))


@_quiet
def tanh(x):
    return np.tanh(_f64(x))


@_quiet
def relu(x):
    x = _f64(x)
    return np.where(x < 0, 0.0, x)


@_quiet
def leaky_relu(x, negative_slope=0.01):
    x = _f64(x)
    return np.where(x > 0, x, x * negative_slope)


@_quiet
def elu(x, alpha=1.0):
    x = _f64(x)
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


@_quiet
def selu(x):
    x = _f64(x)
    return SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0.0)))


@_quiet
def gelu(x, approximate="none"):
    x = _f64(x)
    if approximate == "tanh":
        # 0.5 x (1 + tanh(u)) written as x * sigmoid(2u), which does not cancel.
        u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x ** 3)
        return x * _sigmoid(2.0 * u)
    if approximate != "none":
        raise ValueError("approximate must be 'none' or 'tanh'")
    # In the tail x Phi(x) = -phi(x) S(-x), rounded to the subnormal grid once.
    t = np.maximum(-x, NORMAL_TAIL)
    tail = np.where(x < -40, x * 0.0, -_gauss_times(_normal_tail_series(t), x))  # -inf: NaN
    return np.where(x < -NORMAL_TAIL, tail, x * normal_cdf(x))


@_quiet
def silu(x):
    x = _f64(x)
    # Far below zero silu(x) = x e^x to within e^x: keep its subnormal tail.
    return np.where(x < -600, _times_exp(x, x), x * _sigmoid(x))


@_quiet
def _softplus_scaled(x, beta):
    """softplus(beta * x) with beta * x carried exactly."""
    hi, lo = _two_product(x, beta)
    positive = hi > 0
    e = np.exp(-np.abs(hi)) * (1.0 - np.where(positive, lo, -lo))
    return np.log1p(e) + np.where(positive, hi + lo, 0.0)


@_quiet
def softplus(x, beta=1.0, threshold=20.0):
    x = _f64(x)
    z = x * beta
    return np.where(z > threshold, x, _softplus_scaled(x, beta) / beta)


@_quiet
def mish(x):
    x = _f64(x)
    # Far below zero mish(x) = x e^x to within e^x: keep its subnormal tail.
    return np.where(x < -600, _times_exp(x, x), x * np.tanh(_softplus_core(x)))


@_quiet
def hardsigmoid(x):
    x = _f64(x)
    return np.where(x <= -3, 0.0, np.where(x >= 3, 1.0, (x + 3.0) / 6.0))


@_quiet
def hardswish(x):
    x = _f64(x)
    return np.where(x >= 3, x, x * np.clip(x + 3.0, 0.0, 6.0) / 6.0)


def _bounds_in_dtype_of(a, min_val, max_val):
    """hardtanh's bounds rounded to a's floating dtype (float64 for other
    inputs): PyTorch compares and clamps with the bounds in the tensor's
    dtype, so for float32 x, min_val=0.1 means float32(0.1)."""
    dtype = np.asarray(a).dtype
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    return float(np.asarray(min_val, dtype)), float(np.asarray(max_val, dtype))


@_quiet
def hardtanh(x, min_val=-1.0, max_val=1.0):
    min_val, max_val = _bounds_in_dtype_of(x, min_val, max_val)
    x = _f64(x)
    return np.where(x < min_val, min_val, np.where(x > max_val, max_val, x))


# ---- derivatives: f'(x) given x, and given y where that is possible ---------

@_quiet
def _d_sigmoid(x):
    return _sigmoid_slope(x)


@_quiet
def _d_tanh(x):
    return 1.0 / np.cosh(x) ** 2


def _d_relu(x):
    return np.where(x <= 0, 0.0, 1.0)


def _d_leaky_relu(x, negative_slope=0.01):
    return np.where(x > 0, 1.0, negative_slope)


@_quiet
def _d_elu(x, alpha=1.0):
    return np.where(x <= 0, alpha * np.exp(np.minimum(x, 0.0)), 1.0)


@_quiet
def _d_selu(x):
    return np.where(x <= 0, SELU_SCALE * SELU_ALPHA * np.exp(np.minimum(x, 0.0)), SELU_SCALE)


@_quiet
def _d_gelu(x, approximate="none"):
    if approximate == "tanh":
        u2 = 2.0 * _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x ** 3)
        du2 = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
        # For huge |x| sigmoid' is 0 and x^2 may overflow: the term is x * 0.
        slope = np.where(np.abs(x) > 1e10, x * 0.0, x * _sigmoid_slope(u2) * du2)
        return _sigmoid(u2) + slope
    # In the tail Phi(x) + x phi(x) = phi(x) (S(t) / t - t) with t = -x.
    t = np.maximum(-x, NORMAL_TAIL)
    tail = _gauss_times(_normal_tail_series(t) / t - t, x)
    return np.where(x < -NORMAL_TAIL, tail, normal_cdf(x) + _gauss_times(x, x))


@_quiet
def _d_silu(x):
    # Far below zero the derivative is (1 + x) e^x to within e^x.
    return np.where(x < -600, _times_exp(1.0 + x, x), _sigmoid(x) * (1.0 + x * _sigmoid(-x)))


@_quiet
def _d_softplus(x, beta=1.0, threshold=20.0):
    hi, lo = _two_product(x, beta)
    e = np.exp(-np.abs(hi)) * (1.0 - np.where(hi >= 0, lo, -lo))
    return np.where(hi > threshold, 1.0, np.where(hi >= 0, 1.0, e) / (1.0 + e))


@_quiet
def _d_mish(x):
    sp = _softplus_core(x)
    # Far below zero the derivative is (1 + x) e^x to within e^x.
    return np.where(x < -600, _times_exp(1.0 + x, x),
                    np.tanh(sp) + x * _sigmoid(x) / np.cosh(sp) ** 2)


def _d_hardsigmoid(x):
    return np.where((x > -3) & (x < 3), 1.0 / 6.0, 0.0)


@_quiet
def _d_hardswish(x):
    return np.where(x <= -3, 0.0, np.where(x < 3, x / 3.0 + 0.5, 1.0))


def _d_hardtanh(x, min_val=-1.0, max_val=1.0):
    """1 strictly between the bounds (rounded to x's dtype), else 0; the same
    test from y = hardtanh(x), which is a rounded bound exactly where x is
    outside or on one."""
    min_val, max_val = _bounds_in_dtype_of(x, min_val, max_val)
    x = _f64(x)
    return np.where((x <= min_val) | (x >= max_val), 0.0, 1.0)


_FORWARD = {name: globals()[name] for name in ACTIVATIONS}
_DERIVATIVE = {name: globals()["_d_" + name] for name in ACTIVATIONS}


@_quiet
def _derivative_from_y(name, y, params):
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "tanh":
        return (1.0 - y) * (1.0 + y)
    if name == "relu":
        return np.where(y <= 0, 0.0, 1.0)
    if name == "leaky_relu":
        return np.where(y > 0, 1.0, params.get("negative_slope", 0.01))
    # elu, selu: alpha e^x = y + alpha. Where y has been rounded to -alpha
    # (or just below it) the true slope is positive but below what y can
    # resolve: 0, never negative.
    if name == "elu":
        return np.where(y <= 0, np.maximum(y + params.get("alpha", 1.0), 0.0), 1.0)
    if name == "selu":
        return np.where(y <= 0, np.maximum(y + SELU_SCALE * SELU_ALPHA, 0.0), SELU_SCALE)
    if name == "hardtanh":
        return _d_hardtanh(y, **params)
    raise ValueError(f"the derivative of {name} needs x")


def activation(name, x, **params):
    """f(x) for the activation ``name``, in float64."""
    if name not in _FORWARD:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return _FORWARD[name](x, **params)


# Activations whose derivative can be formed from y (for leaky_relu and elu
# only with a non-negative slope or alpha, so that y and x have the same sign).
_FROM_OUTPUT = {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "hardtanh"}

# Activations whose backward selects 0 rather than multiplying by 0, as in
# PyTorch: an infinite or NaN grad_output still gives 0 there.
_ZERO_SELECTING = {"relu", "hardsigmoid", "hardswish", "hardtanh"}

# Where one of them has a root inside its active range, PyTorch multiplies
# there (hardswish' = x / 3 + 1/2 is 0 at x = -1.5), so an infinite or NaN
# grad_output gives NaN.
_ACTIVE_ROOTS = {"hardswish": -1.5}


def _accepts_output(name, params):
    if name not in _FROM_OUTPUT:
        return False
    if name == "leaky_relu":
        return params.get("negative_slope", 0.01) >= 0
    if name == "elu":
        return params.get("alpha", 1.0) >= 0
    return True


@_quiet
def activation_backward(name, grad_output, *, x=None, y=None, **params):
    """grad_output * f'(x), in float64, from x or from y.

    As in the kernels, y is used when given and the activation accepts it;
    otherwise x is required.
    """
    if name not in _FORWARD:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    g = _f64(grad_output)
    # hardtanh rounds its bounds to the dtype of the array it is given.
    keep_dtype = np.asarray if name == "hardtanh" else _f64
    if y is not None and _accepts_output(name, params):
        d = _derivative_from_y(name, keep_dtype(y), params)
    elif x is not None:
        d = _DERIVATIVE[name](keep_dtype(x), **params)
    else:
        raise ValueError(f"the derivative of {name} needs x, the forward input")
    if name not in _ZERO_SELECTING:
        return g * d
    selected = d == 0
    if name in _ACTIVE_ROOTS:
        selected &= _f64(x) != _ACTIVE_ROOTS[name]
    return np.where(selected, 0.0, g * d)


# ---- batch normalization ---------------------------------------------------

BatchNormResult = collections.namedtuple("BatchNormResult", ["y", "save_mean", "save_invstd"])
BatchNormResult.__doc__ = """Output of batch_norm: y, and the mean and 1/sqrt(var + eps) used."""


def _channel_layout(x, axis):
    """(channel axis, the other axes, the shape a per-channel array is
    broadcast with)."""
    axis = axis % x.ndim
    others = tuple(d for d in range(x.ndim) if d != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return axis, others, tuple(shape)


def batch_norm(x, gamma=None, beta=None, running_mean=None, running_var=None, *,
               training=True, momentum=0.1, eps=1e-5, axis=1, activation=None):
    """Batch normalization over the channel axis ``axis``, in float64.

    training: normalize with the batch mean and biased variance (two-pass)
    and update running_mean/running_var in place when given, the variance
    with the unbiased estimate var * m / (m - 1). Inference: normalize with
    the running statistics. activation="relu": y is relu(y) (relu above).
    Returns (y, mean, 1 / sqrt(var + eps)).
    """
    x = _f64(x)
    axis, others, shape = _channel_layout(x, axis)
    channels = x.shape[axis]
    m = x.size // channels if channels else math.prod(x.shape[d] for d in others)
    if training:
        if m < 2:
            raise ValueError("batch_norm needs more than one value per channel when training")
        # The mean around each channel's median: x.mean() alone rounds its
        # sum at the scale of |x|, which for a constant channel of 6.9e16
        # left x - mean at an ulp, normalized to -1 instead of 0; around the
        # median the rounding is at the scale of the spread.
        center = np.median(x, axis=others, keepdims=True)
        center = np.where(np.isfinite(center), center, 0.0)
        mean = center.reshape(-1) + (x - center).mean(axis=others)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=others)
        if running_mean is not None:
            running_mean[...] = (1 - momentum) * _f64(running_mean) + momentum * mean
        if running_var is not None:
            running_var[...] = (1 - momentum) * _f64(running_var) + momentum * var * m / (m - 1)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in inference needs running_mean and running_var")
        mean = _f64(running_mean).copy()
        var = _f64(running_var)
    invstd = 1.0 / np.sqrt(var + eps)
    gamma = np.ones(channels) if gamma is None else _f64(gamma)
    beta = np.zeros(channels) if beta is None else _f64(beta)
    y = ((x - mean.reshape(shape)) * (invstd * gamma).reshape(shape) + beta.reshape(shape))
    if activation == "relu":
        y = relu(y)
    elif activation is not None:
        raise ValueError(f"batch_norm: activation must be None or 'relu', got {activation!r}")
    return BatchNormResult(y, mean, invstd)


def batch_norm_backward(grad_output, x, gamma, save_mean, save_invstd, *, axis=1,
                        training=True, activation=None, y=None):
    """Gradients of batch_norm, in float64: with m values per channel and
    xhat = (x - mean) * invstd, grad_gamma = sum(dy * xhat), grad_beta = sum(dy),
    and grad_input =
    gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat)) (training:
    the statistics are functions of x) or gamma * invstd * dy (training=False:
    the running statistics are constants).
    activation="relu": the backward of batch_norm(..., activation="relu")
    whose output was y: dy is first taken through relu's derivative at y
    (0 where y <= 0, dy elsewhere, NaN y included), then as above.
    Returns (grad_input, grad_gamma, grad_beta)."""
    g = _f64(grad_output)
    if activation == "relu":
        with np.errstate(invalid="ignore"):
            g = np.where(_f64(y) <= 0, 0.0, g)
    elif activation is not None:
        raise ValueError(f"batch_norm_backward: activation must be None or 'relu', "
                         f"got {activation!r}")
    x = _f64(x)
    axis, others, shape = _channel_layout(x, axis)
    channels = x.shape[axis]
    m = x.size // channels if channels else 0
    gamma = np.ones(channels) if gamma is None else _f64(gamma)
    invstd = _f64(save_invstd).reshape(shape)
    xhat = (x - _f64(save_mean).reshape(shape)) * invstd
    grad_beta = g.sum(axis=others)
    grad_gamma = (g * xhat).sum(axis=others)
    if not training:
        return g * (gamma.reshape(shape) * invstd), grad_gamma, grad_beta
    with np.errstate(invalid="ignore", divide="ignore"):
        grad_input = (gamma.reshape(shape) * invstd / m
                      * (m * g - grad_beta.reshape(shape) - xhat * grad_gamma.reshape(shape)))
    return grad_input, grad_gamma, grad_beta


# ---- batch norm in split phases (data-parallel training) -----------------------


def batch_norm_stats(x, *, axis=1):
    """One slice's (count, mean, m2) per channel, in float64: the mean
    around each channel's median (as batch_norm), m2 = sum((x - mean)^2);
    a slice with no values gives count 0 and zeros."""
    x = _f64(x)
    axis, others, _ = _channel_layout(x, axis)
    channels = x.shape[axis]
    count = math.prod(x.shape[d] for d in others)
    if count == 0:
        return count, np.zeros(channels), np.zeros(channels)
    center = np.median(x, axis=others, keepdims=True)
    center = np.where(np.isfinite(center), center, 0.0)
    mean = center.reshape(-1) + (x - center).mean(axis=others)
    m2 = ((x - np.expand_dims(mean, others)) ** 2).sum(axis=others)
    return count, mean, m2


def batch_norm_combine(counts, means, m2s):
    """The whole batch's (count, mean, biased var) from the ranks' rows, by
    the direct formulas rather than a chain of pairwise merges:
    mean = sum(n_r * m_r) / n, M2 = sum(M2_r + n_r * (m_r - mean)^2)."""
    n_r = np.asarray(counts, dtype=np.float64)[:, None]
    means, m2s = _f64(means), _f64(m2s)
    count = float(n_r.sum())
    mean = (n_r * means).sum(axis=0) / count
    m2 = (m2s + n_r * (means - mean) ** 2).sum(axis=0)
    return int(count), mean, m2 / count


def batch_norm_apply(x, mean, invstd, gamma=None, beta=None, *, axis=1):
    """(x - mean) * invstd * gamma + beta with given statistics, float64."""
    x = _f64(x)
    axis, _, shape = _channel_layout(x, axis)
    channels = x.shape[axis]
    gamma = np.ones(channels) if gamma is None else _f64(gamma)
    beta = np.zeros(channels) if beta is None else _f64(beta)
    return ((x - _f64(mean).reshape(shape)) * (_f64(invstd) * gamma).reshape(shape)
            + beta.reshape(shape))


def batch_norm_backward_reduce(grad_output, x, mean, invstd, *, axis=1):
    """One slice's (sum(dy), sum(dy * xhat)) per channel, float64."""
    g, x = _f64(grad_output), _f64(x)
    axis, others, shape = _channel_layout(x, axis)
    xhat = (x - _f64(mean).reshape(shape)) * _f64(invstd).reshape(shape)
    return g.sum(axis=others), (g * xhat).sum(axis=others)


def batch_norm_backward_apply(grad_output, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count,
                              *, axis=1):
    """gamma * invstd / n * (n * dy - sum_dy - xhat * sum_dy_xhat) with the
    whole batch's sums and n = count, float64."""
    g, x = _f64(grad_output), _f64(x)
    axis, _, shape = _channel_layout(x, axis)
    channels = x.shape[axis]
    gamma = np.ones(channels) if gamma is None else _f64(gamma)
    invstd = _f64(invstd).reshape(shape)
    xhat = (x - _f64(mean).reshape(shape)) * invstd
    return (gamma.reshape(shape) * invstd / count
            * (count * g - _f64(sum_dy).reshape(shape) - xhat * _f64(sum_dy_xhat).reshape(shape)))


# Activations whose backward selects 0 rather than multiplying by 0.
_ZERO_SELECTING = {"relu", "hardsigmoid", "hardswish", "hardtanh"}


# ---- dropout: the Philox mask contract, written out in numpy -----------------

PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 of counters (c0, c1, c2, c3) under key (k0, k1).

    Each of the six may be an integer or an array (broadcast together);
    returns four uint32 arrays. Products are formed in uint64, where a
    32 x 32-bit product fits exactly.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = (np.uint64(m) for m in PHILOX_MULTIPLIERS)
    w0, w1 = (np.uint64(w) for w in PHILOX_KEY_STEPS)
    for r in range(10):
        if r > 0:
            k0 = (k0 + w0) & _LOW32
            k1 = (k1 + w1) & _LOW32
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _LOW32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _LOW32)
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def dropout_threshold(p):
    """T = round((1 - p) * 2**32): element i is kept iff its draw is < T.
    (1 - p) * 2**32 is exact in float64; round() rounds half to even."""
    return int(round((1.0 - float(p)) * 2.0 ** 32))


def dropout_draws(n, *, seed, offset=0, start=0):
    """The uint32 draw of each of n elements, element i taking global index
    g = start + i: lane g % 4 of Philox with counter (g // 4 as two 32-bit
    words, offset as two 32-bit words) and key (seed low word, seed high
    word). Every g must be below 2**64."""
    start = int(start)
    if not 0 <= start < 2**64 or start + n > 2**64:
        raise ValueError(f"start must lie in [0, 2**64) and start + n in [0, 2**64], got "
                         f"start = {start}, n = {n}")
    first_block, lane_shift = divmod(start, 4)
    count = (lane_shift + n + 3) // 4
    # Block numbers past 2**62 do not fit numpy's int64 arange: add them.
    blocks = np.arange(count, dtype=np.uint64) + np.uint64(first_block)
    seed, offset = int(seed), int(offset)
    lanes = philox4x32_10(
        (blocks & _LOW32, blocks >> np.uint64(32), offset & 0xFFFFFFFF, offset >> 32),
        (seed & 0xFFFFFFFF, seed >> 32))
    return np.stack(lanes, axis=-1).reshape(-1)[lane_shift:lane_shift + n]


def dropout_keep(shape, p, *, seed, offset=0, start=0):
    """The boolean keep mask of an array of `shape`, in C order, its
    element i at global index start + i."""
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    return (dropout_draws(n, seed=seed, offset=offset, start=start).astype(np.int64)
            < dropout_threshold(p)).reshape(shape)


def dropout_mask(shape, p, *, seed, offset=0, start=0):
    """The keep mask bit-packed: bit i % 8 of byte i // 8."""
    return np.packbits(dropout_keep(shape, p, seed=seed, offset=offset, start=start).reshape(-1),
                       bitorder="little")


def unpack_mask(mask, shape):
    """The boolean keep mask of `shape` from its bit-packed form."""
    n = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(np.asarray(mask, dtype=np.uint8).reshape(-1),
                         bitorder="little")[:n].astype(bool).reshape(shape)


def _scale_kept(x, keep, p):
    """x * keep / (1 - p); x * 0 where nothing is kept (p = 1)."""
    keep_probability = 1.0 - float(p)
    if keep_probability == 0.0:
        return x * 0.0
    return x * keep / keep_probability


@_quiet
def dropout(x, p, *, seed, offset=0, start=0, training=True, return_mask=False):
    """Inverted dropout in float64: x * mask / (1 - p)."""
    x = _f64(x)
    keep = (dropout_keep(x.shape, p, seed=seed, offset=offset, start=start) if training
            else np.ones(x.shape, bool))
    y = _scale_kept(x, keep, p) if training else x.copy()
    if return_mask:
        return y, np.packbits(keep.reshape(-1), bitorder="little")
    return y


@_quiet
def dropout_backward(grad_output, p, *, mask=None, seed=None, offset=0, start=0):
    """grad_output * mask / (1 - p), the mask given packed or by (seed,
    offset, start)."""
    g = _f64(grad_output)
    if mask is not None:
        keep = unpack_mask(mask, g.shape)
    else:
        keep = dropout_keep(g.shape, p, seed=seed, offset=offset, start=start)
    return _scale_kept(g, keep, p)


def _broadcast_bias(bias, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return _f64(bias).reshape(shape)


@_quiet
def bias_act_dropout(h, bias, act, p, *, seed, offset=0, start=0, axis=-1, return_mask=False,
                     **act_params):
    """mask * act(h + bias) / (1 - p), bias broadcast along `axis`, in float64."""
    h = _f64(h)
    z = h + _broadcast_bias(bias, h.ndim, axis)
    keep = dropout_keep(h.shape, p, seed=seed, offset=offset, start=start)
    y = _scale_kept(activation(act, z, **act_params), keep, p)
    if return_mask:
        return y, np.packbits(keep.reshape(-1), bitorder="little")
    return y


@_quiet
def bias_act_dropout_backward(grad_output, h, bias, act, p, *, mask=None, seed=None, offset=0,
                              start=0, axis=-1, **act_params):
    """(grad_h, grad_bias) of bias_act_dropout, in float64."""
    h = _f64(h)
    axis = axis % h.ndim
    z = h + _broadcast_bias(bias, h.ndim, axis)
    g = dropout_backward(grad_output, p, mask=mask, seed=seed, offset=offset, start=start)
    grad_h = activation_backward(act, g, x=z, **act_params)
    other_axes = tuple(d for d in range(h.ndim) if d != axis)
    return grad_h, grad_h.sum(axis=other_axes)
