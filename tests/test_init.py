"""fn.init: fans as PyTorch computes them, the exact uniform bounds, the
variance of every rule and option (gain, mode, a), calculate_gain against
PyTorch's table, orthogonal and truncated normal draws, the channels-last
warning, reproducibility from a seed, dtypes, and bad input.

Variances are checked on 10^6 draws against a bound of 4 standard errors
of the sample variance (sqrt(Var(w^2) / n) relative to Var(w): 2 for a
normal, sqrt(4/5) for a uniform, at most sqrt(2) for a truncated normal,
whose kurtosis is below a normal's).
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


def test_initializers_tuple_lists_every_shape_only_initializer():
    assert fn.init.INITIALIZERS == tuple(RULES) + ("orthogonal", "trunc_normal")
    for name in fn.init.INITIALIZERS:
        assert callable(getattr(fn.init, name))
        assert getattr(fn.init, name)((3, 4), seed=0).shape == (3, 4)


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


# ---- options: gain, mode, a --------------------------------------------------------

# (name, keywords, Var(w) as a function of (fan_in, fan_out)), PyTorch's
# xavier_*_(gain) and kaiming_*_(a, mode) formulas.
OPTION_CASES = [
    ("glorot_uniform", {"gain": 5 / 3}, lambda fi, fo: (5 / 3) ** 2 * 2 / (fi + fo)),
    ("glorot_normal", {"gain": 0.5}, lambda fi, fo: 0.25 * 2 / (fi + fo)),
    ("he_uniform", {"a": 0.2}, lambda fi, fo: 2 / (1 + 0.04) / fi),
    ("he_normal", {"a": math.sqrt(5)}, lambda fi, fo: 2 / 6 / fi),
    ("he_normal", {"mode": "fan_out"}, lambda fi, fo: 2 / fo),
    ("he_uniform", {"a": 1.0, "mode": "fan_out"}, lambda fi, fo: 1 / fo),
    ("lecun_uniform", {"mode": "fan_out"}, lambda fi, fo: 1 / fo),
    ("lecun_normal", {"mode": "fan_in"}, lambda fi, fo: 1 / fi),
]


@pytest.mark.parametrize("name,keywords,variance", OPTION_CASES)
def test_options_set_the_variance(name, keywords, variance):
    shape = (300, 120, 5)
    w = getattr(fn.init, name)(shape, seed=2, dtype="float64", **keywords)
    expected = variance(*fn.init.fans(shape))
    relative_sd = math.sqrt(0.8) if name.endswith("uniform") else 2.0
    assert abs(w.var() / expected - 1) < 4 * relative_sd / math.sqrt(w.size)
    if name.endswith("uniform"):
        bound = math.sqrt(3 * expected)
        assert np.abs(w).max() <= bound * (1 + 1e-15) and np.abs(w).max() > bound * 0.999


def test_default_options_keep_the_textbook_bounds_bit_for_bit():
    w = fn.init.glorot_uniform((7, 5), seed=1, gain=1.0, dtype="float64")
    bound = math.sqrt(6.0 / 12)
    assert np.array_equal(w, np.random.default_rng(1).uniform(-bound, bound, (7, 5)))
    assert np.array_equal(fn.init.he_normal((7, 5), seed=1, a=0.0, mode="fan_in"),
                          fn.init.he_normal((7, 5), seed=1))


def test_options_match_pytorch_draws():
    torch = pytest.importorskip("torch")
    shape = (400, 250)
    cases = [("glorot_uniform", {"gain": 2.0}, torch.nn.init.xavier_uniform_, {"gain": 2.0}),
             ("he_normal", {"a": 0.3, "mode": "fan_out"}, torch.nn.init.kaiming_normal_,
              {"a": 0.3, "mode": "fan_out", "nonlinearity": "leaky_relu"}),
             ("he_uniform", {"a": 0.1}, torch.nn.init.kaiming_uniform_,
              {"a": 0.1, "nonlinearity": "leaky_relu"})]
    for name, ours_kw, torch_init, torch_kw in cases:
        t = torch.empty(shape, dtype=torch.float64)
        torch_init(t, generator=torch.Generator().manual_seed(0), **torch_kw)
        theirs = t.numpy()
        ours = getattr(fn.init, name)(shape, seed=0, dtype="float64", **ours_kw)
        tolerance = 4 * 2.0 / math.sqrt(ours.size)
        assert abs(ours.var() / theirs.var() - 1) < 2 * tolerance, name
        if name.endswith("uniform"):
            assert np.abs(ours).max() == pytest.approx(np.abs(theirs).max(), rel=1e-3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: fn.init.he_normal((4, 4), mode="fan_avg"), ValueError, "mode"),
    (lambda: fn.init.lecun_uniform((4, 4), mode=None), ValueError, "mode"),
    (lambda: fn.init.glorot_normal((4, 4), gain=-1.0), ValueError, "gain"),
    (lambda: fn.init.glorot_normal((4, 4), gain="2"), TypeError, "gain"),
    (lambda: fn.init.he_uniform((4, 4), a=float("nan")), ValueError, "a must be finite"),
])
def test_bad_options(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- calculate_gain ----------------------------------------------------------------

# torch.nn.init.calculate_gain's documented table.
GAINS = [("linear", None, 1.0), ("conv1d", None, 1.0), ("conv2d", None, 1.0),
         ("conv3d", None, 1.0), ("conv_transpose2d", None, 1.0), ("sigmoid", None, 1.0),
         ("tanh", None, 5 / 3), ("relu", None, math.sqrt(2)), ("selu", None, 0.75),
         ("leaky_relu", None, math.sqrt(2 / (1 + 0.01 ** 2))),
         ("leaky_relu", 0.2, math.sqrt(2 / 1.04)), ("leaky_relu", 1, 1.0),
         ("leaky_relu", 0, math.sqrt(2))]


@pytest.mark.parametrize("nonlinearity,param,gain", GAINS)
def test_calculate_gain_table(nonlinearity, param, gain):
    assert fn.init.calculate_gain(nonlinearity, param) == pytest.approx(gain, rel=1e-15)


def test_calculate_gain_matches_pytorch():
    torch = pytest.importorskip("torch")
    for nonlinearity, param, _ in GAINS:
        assert fn.init.calculate_gain(nonlinearity, param) == pytest.approx(
            torch.nn.init.calculate_gain(nonlinearity, param), rel=1e-15)


@pytest.mark.parametrize("nonlinearity,param", [("gelu", None), ("ReLU", None),
                                                ("leaky_relu", True), ("leaky_relu", "0.1")])
def test_calculate_gain_rejects_what_pytorch_rejects(nonlinearity, param):
    with pytest.raises(ValueError):
        fn.init.calculate_gain(nonlinearity, param)


def test_gain_keeps_tanh_signal_alive():
    """What the gain is for: 20 tanh layers with Glorot's gain 5/3 keep a
    usable signal, gain 1 lets it decay (the variance table in docs/nn.md)."""
    x = np.random.default_rng(0).standard_normal((500, 200))
    finals = {}
    for gain in (1.0, fn.init.calculate_gain("tanh")):
        a = x
        for layer in range(20):
            a = np.tanh(a @ fn.init.glorot_normal((200, 200), gain=gain, seed=layer,
                                                  dtype="float64").T)
        finals[gain] = a.std()
    assert finals[5 / 3] > 0.5 and finals[1.0] < 0.6 * finals[5 / 3]


# ---- orthogonal --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40), (16, 4, 3, 3), (64, 8, 5)])
def test_orthogonal_rows_or_columns_are_orthonormal(shape):
    q = fn.init.orthogonal(shape, seed=0, dtype="float64", gain=2.5)
    assert q.shape == shape
    flat = q.reshape(shape[0], -1) / 2.5
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-13)


def test_orthogonal_is_uniform_over_the_group():
    """numpy's QR leaves R's diagonal negative where the Householder step
    flips it; without moving those signs into Q, q[0, 0] would always be
    negative. Haar-uniform 3x3 matrices have E q00 = 0, E q00^2 = 1/3 and
    E q00^4 = 3/15 (a coordinate of a uniform point on the 2-sphere)."""
    rng = np.random.default_rng(0)
    first = np.array([fn.init.orthogonal((3, 3), seed=rng, dtype="float64")[0, 0]
                      for _ in range(20000)])
    se = 1 / math.sqrt(first.size)
    assert abs(first.mean()) < 4 * se * math.sqrt(1 / 3)
    assert abs((first ** 2).mean() - 1 / 3) < 4 * se * 0.3
    assert abs((first ** 4).mean() - 0.2) < 4 * se * 0.3


def test_orthogonal_matches_pytorch_statistics():
    torch = pytest.importorskip("torch")
    t = torch.empty(200, 300, dtype=torch.float64)
    torch.nn.init.orthogonal_(t, gain=3.0, generator=torch.Generator().manual_seed(0))
    ours = fn.init.orthogonal((200, 300), gain=3.0, seed=0, dtype="float64")
    np.testing.assert_allclose(np.linalg.svd(ours, compute_uv=False),
                               np.linalg.svd(t.numpy(), compute_uv=False), rtol=1e-12)
    assert ours.var() == pytest.approx(t.numpy().var(), rel=0.02)


def test_orthogonal_edge_cases():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fn.init.orthogonal((5,))
    assert fn.init.orthogonal((0, 4)).shape == (0, 4)
    assert fn.init.orthogonal((3, 0, 2)).shape == (3, 0, 2)
    assert fn.init.orthogonal((4, 4), seed=1, dtype="float16").dtype == np.float16
    assert np.array_equal(fn.init.orthogonal((6, 9), seed=4), fn.init.orthogonal((6, 9), seed=4))


# ---- truncated normal --------------------------------------------------------------


def _phi(x):
    return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def truncated_moments(mean, std, a, b):
    """Mean and variance of N(mean, std^2) conditioned on [a, b]; the mass
    from erfc on the interval's side away from 0, exact in the tails."""
    alpha, beta = (a - mean) / std, (b - mean) / std
    if alpha > 0:
        mass = (math.erfc(alpha / math.sqrt(2)) - math.erfc(beta / math.sqrt(2))) / 2
    elif beta < 0:
        mass = (math.erfc(-beta / math.sqrt(2)) - math.erfc(-alpha / math.sqrt(2))) / 2
    else:
        mass = (math.erf(beta / math.sqrt(2)) - math.erf(alpha / math.sqrt(2))) / 2
    pa, pb = _phi(alpha), _phi(beta)
    ta = 0.0 if math.isinf(alpha) else alpha * pa
    tb = 0.0 if math.isinf(beta) else beta * pb
    shift = (pa - pb) / mass
    return mean + std * shift, std * std * (1 + (ta - tb) / mass - shift * shift)


TRUNC_CASES = [(0.0, 1.0, -2.0, 2.0), (0.0, 0.02, -0.04, 0.04), (1.0, 2.0, -1.0, 5.0),
               (0.0, 1.0, 0.0, 1.0), (0.0, 1.0, -0.3, 0.2), (0.0, 1.0, 2.0, 3.0),
               (0.0, 1.0, 5.0, 6.0), (0.0, 1.0, 8.0, math.inf), (0.0, 1.0, -math.inf, -3.0),
               (3.0, 0.5, 3.5, 3.6), (0.0, 1.0, -math.inf, math.inf)]


@pytest.mark.parametrize("mean,std,a,b", TRUNC_CASES)
def test_trunc_normal_moments(mean, std, a, b):
    w = fn.init.trunc_normal((1000, 1000), mean=mean, std=std, a=a, b=b, seed=5,
                             dtype="float64")
    assert w.min() >= a and w.max() <= b
    expected_mean, expected_var = truncated_moments(mean, std, a, b)
    se = math.sqrt(expected_var / w.size)
    assert abs(w.mean() - expected_mean) < 4 * se
    assert abs(w.var() / expected_var - 1) < 4 * math.sqrt(2 / w.size)


def test_trunc_normal_reaches_its_bounds():
    w = fn.init.trunc_normal((1000, 1000), std=1.0, a=-1.0, b=1.5, seed=0, dtype="float64")
    assert w.min() < -1.0 + 1e-4 and w.max() > 1.5 - 1e-4


def test_trunc_normal_matches_pytorch():
    torch = pytest.importorskip("torch")
    for mean, std, a, b in [(0.0, 1.0, -2.0, 2.0), (0.5, 0.02, 0.46, 0.6), (0.0, 1.0, 1.0, 2.5)]:
        t = torch.empty(400, 500, dtype=torch.float64)
        torch.nn.init.trunc_normal_(t, mean=mean, std=std, a=a, b=b,
                                    generator=torch.Generator().manual_seed(0))
        theirs = t.numpy()
        ours = fn.init.trunc_normal((400, 500), mean=mean, std=std, a=a, b=b, seed=0,
                                    dtype="float64")
        # Both are samples: the difference has sqrt(2) times one's standard error.
        n = ours.size
        assert abs(ours.mean() - theirs.mean()) < 4 * math.sqrt(2) * theirs.std() / math.sqrt(n)
        assert abs(ours.var() / theirs.var() - 1) < 4 * math.sqrt(2) * math.sqrt(2 / n)
        assert ours.min() >= a and ours.max() <= b


@pytest.mark.parametrize("keywords,error,match", [
    ({"std": 0.0}, ValueError, "std must be positive"),
    ({"a": 1.0, "b": 1.0}, ValueError, "below"),
    ({"a": 2.0, "b": -2.0}, ValueError, "below"),
    ({"a": float("nan")}, TypeError, "a must be a real"),
    ({"mean": float("inf")}, ValueError, "mean must be finite"),
])
def test_trunc_normal_bad_arguments(keywords, error, match):
    with pytest.raises(error, match=match):
        fn.init.trunc_normal((3, 3), **keywords)


def test_trunc_normal_seed_and_dtype():
    a = fn.init.trunc_normal((20, 30), std=0.02, a=-0.04, b=0.04, seed=3)
    assert a.dtype == np.float32
    assert np.array_equal(a, fn.init.trunc_normal((20, 30), std=0.02, a=-0.04, b=0.04, seed=3))
    assert fn.init.trunc_normal((0, 3)).shape == (0, 3)


# ---- layout warning ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (1, 1, 64, 128), (5, 64, 128)])
def test_channels_last_shape_warns(shape):
    with pytest.warns(UserWarning, match=r"\(out, in, \*kernel\)") as record:
        fn.init.he_normal(shape, seed=0)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="channels-last"):
        fn.init.orthogonal(shape, seed=0)


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (16, 3, 3, 3), (64, 3, 7),
                                   (10, 256), (256, 10), (0, 0, 3)])
def test_pytorch_layout_does_not_warn(shape):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn.init.fans(shape)
        fn.init.glorot_uniform(shape, seed=0)
