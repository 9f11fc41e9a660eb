"""The float64 reference itself: its derivatives against finite
differences, its values against closed forms evaluated with the math module,
its derivative from y against its derivative from x, its conventions at
kinks and infinities against PyTorch (when installed), and its shapes and
dtypes. The kernel tests are only as good as this module.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import (PARAM_IDS, PARAM_SETS, accepts_output, assert_gelu_tail_exact,
                      assert_matches, magnitudes, may_overflow, special_values)
from fusednn import reference as ref

SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717

param_sets = pytest.mark.parametrize(("name", "params"), PARAM_SETS, ids=PARAM_IDS)
output_sets = pytest.mark.parametrize(
    ("name", "params"), [(n, p) for n, p in PARAM_SETS if accepts_output(n, p)],
    ids=[i for (n, p), i in zip(PARAM_SETS, PARAM_IDS) if accepts_output(n, p)])


def kinks(name: str, params: dict) -> list[float]:
    """Where f' jumps: finite differences do not apply there."""
    if name in ("relu", "leaky_relu", "elu", "selu"):
        return [0.0]
    if name in ("hardsigmoid", "hardswish"):
        return [-3.0, 3.0]
    if name == "hardtanh":
        return [params.get("min_val", -1.0), params.get("max_val", 1.0)]
    if name == "softplus":
        return [params.get("threshold", 20.0) / params.get("beta", 1.0)]
    return []


@param_sets
def test_derivative_matches_finite_differences(name, params):
    rng = np.random.default_rng(2)
    x = np.concatenate([np.linspace(-12.0, 12.0, 481), rng.standard_normal(200) * 3])
    h = 1e-3 * np.maximum(1.0, np.abs(x))
    away = np.ones(x.shape, dtype=bool)
    for k in kinks(name, params):
        away &= np.abs(x - k) > 3 * h
    x, h = x[away], h[away]

    def f(v):
        return ref.activation(name, v, **params)

    # Five-point central difference: error O(h^4) from the fifth derivative
    # and O(eps / h) from rounding, both far below the tolerance.
    fd = (f(x - 2 * h) - 8 * f(x - h) + 8 * f(x + h) - f(x + 2 * h)) / (12 * h)
    g = rng.uniform(0.5, 2.0, x.shape)
    d = ref.activation_backward(name, g, x=x, **params)
    assert np.isfinite(d).all() and np.isfinite(fd).all()
    np.testing.assert_allclose(d, g * fd, rtol=1e-7, atol=1e-10)


@output_sets
def test_derivative_from_y_equals_derivative_from_x(name, params):
    x = np.concatenate([np.linspace(-20.0, 20.0, 4001), special_values(np.float64)])
    x = x[~np.isnan(x)]
    g = np.random.default_rng(3).uniform(-2.0, 2.0, x.shape)
    y = ref.activation(name, x, **params)
    from_y = ref.activation_backward(name, g, y=y, **params)
    from_x = ref.activation_backward(name, g, x=x, **params)
    # From y, f' is formed from a rounded y: y + alpha (elu) or
    # y + scale * alpha (selu) is off by about eps * 1.76, times |g| <= 2.
    np.testing.assert_allclose(from_y, from_x, rtol=1e-12, atol=4 * np.finfo(float).eps * 2)


@output_sets
def test_derivative_from_y_handles_special_gradients_like_from_x(name, params):
    """An infinite or NaN upstream gradient gives the same result whichever
    of x or y the derivative is formed from (0 where a kink selects 0)."""
    xs = np.array([-np.inf, -5.0, -1.0, -0.0, 0.0, 0.25, 1.0, 5.0, np.inf])
    gs = np.array([np.inf, -np.inf, np.nan, 0.0, 1.0])
    x = np.repeat(xs, gs.size)
    g = np.tile(gs, xs.size)
    from_y = ref.activation_backward(name, g, y=ref.activation(name, x, **params), **params)
    from_x = ref.activation_backward(name, g, x=x, **params)
    np.testing.assert_array_equal(np.isnan(from_y), np.isnan(from_x),
                                  err_msg=f"NaN positions differ at x={x}, g={g}")
    np.testing.assert_allclose(from_y, from_x, rtol=1e-12, atol=1e-15)


def _closed_forms():
    """Each activation written directly with the math module, for moderate
    x where these forms are accurate."""
    c = math.sqrt(2.0 / math.pi)
    return {
        "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
        "tanh": math.tanh,
        "relu": lambda x: max(x, 0.0),
        "leaky_relu": lambda x: x if x > 0 else 0.01 * x,
        "elu": lambda x: x if x > 0 else math.expm1(x),
        "selu": lambda x: SELU_SCALE * (x if x > 0 else SELU_ALPHA * math.expm1(x)),
        "gelu": lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))),
        "gelu_tanh": lambda x: 0.5 * x * (1.0 + math.tanh(c * (x + 0.044715 * x ** 3))),
        "silu": lambda x: x / (1.0 + math.exp(-x)),
        "softplus": lambda x: math.log1p(math.exp(x)),
        "mish": lambda x: x * math.tanh(math.log1p(math.exp(x))),
        "hardsigmoid": lambda x: min(max(x + 3.0, 0.0), 6.0) / 6.0,
        "hardswish": lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0,
        "hardtanh": lambda x: min(max(x, -1.0), 1.0),
    }


@pytest.mark.parametrize("name", sorted(_closed_forms()))
def test_forward_matches_closed_form(name):
    x = np.linspace(-4.0, 4.0, 65)
    form = _closed_forms()[name]
    expected = np.array([form(float(v)) for v in x])
    if name == "gelu_tanh":
        got = ref.activation("gelu", x, approximate="tanh")
    else:
        got = ref.activation(name, x)
    # 1 + erf and 1 + tanh lose up to 1e-12 relative at x = -4
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=0)


def test_parameterized_forms():
    x = np.linspace(-4.0, 4.0, 33)
    np.testing.assert_allclose(ref.leaky_relu(x, 0.2), np.where(x > 0, x, 0.2 * x), rtol=1e-15)
    np.testing.assert_allclose(ref.elu(x, 0.5), np.where(x > 0, x, 0.5 * np.expm1(x)),
                               rtol=1e-15)
    np.testing.assert_allclose(ref.softplus(x, 2.5, 15.0), np.log1p(np.exp(2.5 * x)) / 2.5,
                               rtol=1e-14)
    big = np.array([6.01, 10.0, 1e10])
    assert (ref.softplus(big, 2.5, 15.0) == big).all()
    np.testing.assert_array_equal(ref.hardtanh(x, -2.0, 0.5), np.clip(x, -2.0, 0.5))


KNOWN_VALUES = [
    ("sigmoid", {}, 0.0, 0.5),
    ("sigmoid", {}, -np.inf, 0.0),
    ("sigmoid", {}, np.inf, 1.0),
    ("tanh", {}, 0.0, 0.0),
    ("tanh", {}, -np.inf, -1.0),
    ("softplus", {}, 0.0, math.log(2.0)),
    ("softplus", {}, -np.inf, 0.0),
    ("softplus", {}, np.inf, np.inf),
    ("softplus", {"beta": 2.0}, 0.0, math.log(2.0) / 2.0),
    ("gelu", {}, 1.0, 0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))),
    ("gelu", {}, -1.0, -0.5 * math.erfc(1.0 / math.sqrt(2.0))),
    ("gelu", {}, 0.0, 0.0),
    ("gelu", {}, -np.inf, np.nan),
    ("gelu", {}, np.inf, np.inf),
    ("gelu", {"approximate": "tanh"}, -np.inf, np.nan),
    ("silu", {}, 0.0, 0.0),
    ("silu", {}, 1.0, 1.0 / (1.0 + math.exp(-1.0))),
    ("silu", {}, -np.inf, np.nan),
    ("mish", {}, 0.0, 0.0),
    ("mish", {}, 1.0, math.tanh(math.log1p(math.e))),
    ("mish", {}, -np.inf, np.nan),
    ("selu", {}, 1.0, SELU_SCALE),
    ("selu", {}, -np.inf, -SELU_SCALE * SELU_ALPHA),
    ("elu", {}, -np.inf, -1.0),
    ("elu", {"alpha": 0.5}, -np.inf, -0.5),
    ("hardswish", {}, -3.0, -0.0),
    ("hardswish", {}, 3.0, 3.0),
    ("hardswish", {}, -np.inf, np.nan),
    ("hardsigmoid", {}, -3.0, 0.0),
    ("hardsigmoid", {}, 0.0, 0.5),
    ("hardsigmoid", {}, 3.0, 1.0),
    ("hardtanh", {}, 2.0, 1.0),
    ("leaky_relu", {}, -1.0, -0.01),
    ("relu", {}, -0.0, -0.0),
]


@pytest.mark.parametrize(("name", "params", "x", "expected"), KNOWN_VALUES,
                         ids=[f"{n}{p or ''}({x})" for n, p, x, _ in KNOWN_VALUES])
def test_known_values(name, params, x, expected):
    got = ref.activation(name, np.array([x]), **params)[0]
    if np.isnan(expected):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-15, abs=0)
        assert np.signbit(got) == np.signbit(expected)


def test_float64_gelu_tail_is_within_4_ulp_of_exact_values():
    assert_gelu_tail_exact(ref)


def test_scalars_are_accepted():
    for name in ref.ACTIVATIONS:
        assert np.shape(ref.activation(name, 0.5)) == ()
        assert np.shape(ref.activation_backward(name, 1.0, x=0.5)) == ()


@pytest.mark.parametrize(("name", "params", "x", "slope"), [
    ("relu", {}, 0.0, 0.0),
    ("leaky_relu", {}, 0.0, 0.01),
    ("elu", {"alpha": 0.5}, 0.0, 0.5),
    ("selu", {}, 0.0, SELU_SCALE * SELU_ALPHA),
    ("hardsigmoid", {}, -3.0, 0.0),
    ("hardsigmoid", {}, 3.0, 0.0),
    ("hardswish", {}, -3.0, -0.0),
    ("hardswish", {}, 3.0, 1.0),
    ("hardtanh", {}, -1.0, 0.0),
    ("hardtanh", {}, 1.0, 0.0),
    ("softplus", {"beta": 2.0, "threshold": 10.0}, 5.0 + 1e-12, 1.0),
    ("gelu", {}, 0.0, 0.5),
    ("silu", {}, 0.0, 0.5),
    ("mish", {}, 0.0, 0.6),
    ("sigmoid", {}, 0.0, 0.25),
    ("tanh", {}, 0.0, 1.0),
], ids=lambda v: str(v))
def test_derivative_at_kinks_is_pytorchs_choice(name, params, x, slope):
    got = ref.activation_backward(name, np.ones(1), x=np.array([x]), **params)[0]
    assert got == pytest.approx(slope, rel=1e-15, abs=0)


@param_sets
def test_finite_for_finite_inputs(name, params):
    """f(x) is finite unless its true value overflows, and f'(x) is finite:
    every derivative here is bounded."""
    x = np.concatenate([special_values(np.float64), magnitudes(np.float64)])
    x = x[np.isfinite(x)]
    y = ref.activation(name, x, **params)
    bad = ~np.isfinite(y) & ~may_overflow(name, params, x, np.float64)
    assert not bad.any(), f"f(x) not finite at x={x[bad][:6]}"
    d = ref.activation_backward(name, np.ones_like(x), x=x, **params)
    assert np.isfinite(d).all(), f"f'(x) not finite at x={x[~np.isfinite(d)][:6]}"


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3)], ids=str)
@param_sets
def test_shapes_and_dtype(name, params, shape):
    n = int(np.prod(shape))
    x = np.linspace(-2.0, 2.0, max(n, 1))[:n].reshape(shape).astype(np.float32)
    # numpy's convention: a 0-d input may give a numpy scalar
    y = ref.activation(name, x, **params)
    assert isinstance(y, (np.ndarray, np.float64)) and np.shape(y) == shape
    assert np.asarray(y).dtype == np.float64
    d = ref.activation_backward(name, np.ones_like(x), x=x, **params)
    assert isinstance(d, (np.ndarray, np.float64)) and np.shape(d) == shape
    assert np.asarray(d).dtype == np.float64


def test_bad_arguments():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="sigmoid"):
        ref.activation("swish", x)
    with pytest.raises(ValueError, match="sigmoid"):
        ref.activation_backward("swish", x, x=x)
    with pytest.raises(ValueError):
        ref.activation_backward("tanh", x)
    with pytest.raises(ValueError):
        ref.activation_backward("gelu", x, y=x)
    with pytest.raises(ValueError):
        ref.gelu(x, approximate="erf")


# ---- PyTorch's conventions -----------------------------------------------------


def _torch_forward(torch, name, params):
    functional = torch.nn.functional
    if name in ("sigmoid", "tanh"):
        return getattr(torch, name)
    return lambda t: getattr(functional, name)(t, **params)


@param_sets
def test_matches_pytorch(name, params):
    """Values, derivatives, kinks and infinities as PyTorch has them
    (PyTorch's float64 cancels at large |x|, hence the loose tolerance: this
    checks conventions, not accuracy)."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-20.0, 20.0, 801), special_values(np.float64)])
    x = x[(np.abs(x) < 1e10) | ~np.isfinite(x)]
    for k in kinks(name, params):
        x = np.append(x, [k, np.nextafter(k, -np.inf), np.nextafter(k, np.inf)])
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y_torch = _torch_forward(torch, name, params)(t)
    (d_torch,) = torch.autograd.grad(y_torch.sum(), t)
    y_torch, d_torch = y_torch.detach().numpy(), d_torch.numpy()
    y = ref.activation(name, x, **params)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_torch), err_msg="forward NaN positions")
    np.testing.assert_allclose(y, y_torch, rtol=1e-6, atol=1e-12)
    # PyTorch's derivative at a NaN input depends on its code path
    # (hardtanh: 0 vectorized, grad_output scalar), so NaN x is left out.
    number = ~np.isnan(x)
    d = ref.activation_backward(name, np.ones_like(x), x=x, **params)
    np.testing.assert_array_equal(np.isnan(d[number]), np.isnan(d_torch[number]),
                                  err_msg="derivative NaN positions")
    np.testing.assert_allclose(d[number], d_torch[number], rtol=1e-6, atol=1e-12)
