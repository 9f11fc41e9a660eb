"""fn.init: fans as PyTorch computes them, the exact uniform bounds, the
variance of every rule, reproducibility from a seed, dtypes, and bad input.

Variances are checked on 10^6 draws against a bound of 4 standard errors
of the sample variance (sqrt(Var(w^2) / n) relative to Var(w): 2 for a
normal, sqrt(4/5) for a uniform).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fusednn as fn

RULES = {  # name -> (distribution, variance as a function of (fan_in, fan_out))
    "glorot_uniform": ("uniform", lambda fi, fo: 2.0 / (fi + fo)),
    "glorot_normal": ("normal", lambda fi, fo: 2.0 / (fi + fo)),
    "he_uniform": ("uniform", lambda fi, fo: 2.0 / fi),
    "he_normal": ("normal", lambda fi, fo: 2.0 / fi),
    "lecun_uniform": ("uniform", lambda fi, fo: 1.0 / fi),
    "lecun_normal": ("normal", lambda fi, fo: 1.0 / fi),
}
BOUNDS = {"glorot_uniform": lambda fi, fo: math.sqrt(6.0 / (fi + fo)),
          "he_uniform": lambda fi, fo: math.sqrt(6.0 / fi),
          "lecun_uniform": lambda fi, fo: math.sqrt(3.0 / fi)}

# (shape, fan_in, fan_out) as torch.nn.init._calculate_fan_in_and_fan_out
# returns them (checked against PyTorch below when it is installed).
FAN_CASES = [((3, 5), 5, 3), ((128, 64), 64, 128), ((16, 3, 3, 3), 27, 144),
             ((8, 4, 5), 20, 40), ((2, 3, 2, 2, 2), 24, 16), ((1, 1), 1, 1),
             ((0, 7), 7, 0), ((4, 0, 3), 0, 12)]


def test_initializers_tuple_lists_the_six():
    assert fn.init.INITIALIZERS == tuple(RULES)
    for name in RULES:
        assert callable(getattr(fn.init, name))


@pytest.mark.parametrize("shape,fan_in,fan_out", FAN_CASES)
def test_fans(shape, fan_in, fan_out):
    assert fn.init.fans(shape) == (fan_in, fan_out)


def test_fans_match_pytorch():
    torch = pytest.importorskip("torch")
    for shape, _, _ in FAN_CASES:
        expected = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
        assert fn.init.fans(shape) == expected


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("shape", [(7,), (), 5])
def test_fewer_than_two_dimensions_is_an_error(name, shape):
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        getattr(fn.init, name)(shape, seed=0)


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("shape", [(1000, 1000), (250, 40, 5, 5)])
def test_variance_and_mean(name, shape):
    distribution, variance = RULES[name]
    w = getattr(fn.init, name)(shape, seed=7, dtype="float64")
    assert w.shape == shape and w.dtype == np.float64
    expected = variance(*fn.init.fans(shape))
    relative_sd = 2.0 if distribution == "normal" else math.sqrt(0.8)
    tolerance = 4 * relative_sd / math.sqrt(w.size)
    assert abs(w.var() / expected - 1) < tolerance
    assert abs(w.mean()) < 4 * math.sqrt(expected / w.size)


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("shape", [(300, 200), (64, 3, 3, 3)])
def test_uniform_bound_is_exact(name, shape):
    w = getattr(fn.init, name)(shape, seed=3, dtype="float64")
    bound = BOUNDS[name](*fn.init.fans(shape))
    assert np.abs(w).max() <= bound
    # The extremes reach the bound to within the spacing of the draws.
    assert w.max() > bound * (1 - 20.0 / w.size) and w.min() < -bound * (1 - 20.0 / w.size)


def test_he_normal_matches_pytorch_variance_convention():
    torch = pytest.importorskip("torch")
    shape = (512, 256)
    t = torch.empty(shape, dtype=torch.float64)
    torch.nn.init.kaiming_normal_(t, nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    ours = fn.init.he_normal(shape, seed=0, dtype="float64")
    tolerance = 4 * 2.0 / math.sqrt(t.numel())
    assert abs(ours.var() / float(t.var()) - 1) < 2 * tolerance


@pytest.mark.parametrize("name", list(RULES))
def test_seed_reproduces_and_differs(name):
    make = getattr(fn.init, name)
    a = make((20, 30), seed=11)
    assert np.array_equal(a, make((20, 30), seed=11))
    assert not np.array_equal(a, make((20, 30), seed=12))


def test_seed_is_numpys_pcg64_stream():
    w = fn.init.he_uniform((6, 4), seed=5, dtype="float64")
    bound = math.sqrt(6.0 / 4)
    assert np.array_equal(w, np.random.default_rng(5).uniform(-bound, bound, (6, 4)))


def test_generator_advances_between_calls():
    rng = np.random.default_rng(0)
    a = fn.init.glorot_normal((8, 8), seed=rng)
    b = fn.init.glorot_normal((8, 8), seed=rng)
    assert not np.array_equal(a, b)
    rng2 = np.random.default_rng(0)
    assert np.array_equal(a, fn.init.glorot_normal((8, 8), seed=rng2))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", np.float32])
def test_dtype_is_one_rounding_of_float64(dtype):
    w = fn.init.lecun_normal((16, 9), seed=1, dtype=dtype)
    assert w.dtype == np.dtype(dtype)
    w64 = fn.init.lecun_normal((16, 9), seed=1, dtype="float64")
    assert np.array_equal(w, w64.astype(dtype))


def test_default_dtype_is_float32_on_cpu():
    w = fn.init.glorot_uniform((3, 4), seed=0)
    assert isinstance(w, np.ndarray) and w.dtype == np.float32


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0, 3)])
def test_empty_shapes(shape):
    for name in RULES:
        w = getattr(fn.init, name)(shape, seed=0)
        assert w.shape == shape


def test_plain_uniform_and_normal():
    n = 50
    w = fn.init.uniform((400, n), -1 / math.sqrt(n), 1 / math.sqrt(n), seed=0, dtype="float64")
    assert np.abs(w).max() <= 1 / math.sqrt(n)
    assert abs(w.var() * 3 * n - 1) < 4 * math.sqrt(0.8 / w.size)
    z = fn.init.normal((1000, 100), 2.0, 0.5, seed=0, dtype="float64")
    assert abs(z.mean() - 2.0) < 4 * 0.5 / math.sqrt(z.size)
    assert abs(z.std() / 0.5 - 1) < 4 * math.sqrt(0.5 / z.size)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dtype": "int32"}, TypeError, "dtype"),
    ({"dtype": "complex64"}, TypeError, "dtype"),
    ({"device": "gpu"}, ValueError, "device"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": True}, TypeError, "seed"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fn.init.he_normal((4, 4), **kwargs)


@pytest.mark.parametrize("shape,error", [((4, -1), ValueError), ((4, 2.0), TypeError),
                                         ("ab", TypeError), (None, TypeError)])
def test_bad_shapes(shape, error):
    with pytest.raises(error):
        fn.init.glorot_uniform(shape)


def test_bad_argument_leaves_generator_untouched():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError):
        fn.init.he_normal((4, 4), seed=rng, dtype="int8")
    assert np.array_equal(fn.init.he_normal((4, 4), seed=rng),
                          fn.init.he_normal((4, 4), seed=np.random.default_rng(0)))


def test_plain_rules_reject_bad_parameters():
    with pytest.raises(ValueError, match="low"):
        fn.init.uniform((2, 2), 1.0, -1.0)
    with pytest.raises(ValueError, match="std"):
        fn.init.normal((2, 2), 0.0, -1.0)
    with pytest.raises(ValueError, match="finite"):
        fn.init.uniform((2, 2), 0.0, float("inf"))


def test_cuda_without_cupy_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="CuPy"):
        fn.init.he_normal((4, 4), seed=0, device="cuda")
