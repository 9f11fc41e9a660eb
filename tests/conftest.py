"""Shared numerics for the tests: the accuracy bounds of DESIGN section 6,
the inputs they are checked on, an error measure in units in the last place
(ulp), fixtures that restore the global CPU settings (thread count, SIMD
path) a test changes, and, for the PyTorch tests, an inductor-compiled
training step whose generated code they inspect.

A kernel's result is compared with the float64 reference of
``fusednn.reference``. Its error is measured in ulp of the reference value
rounded to the kernel's dtype, so that a bound reads the same for every
magnitude; where the reference overflows the dtype, the ulp of the largest
finite value is used. NaN must meet NaN and an infinity the same infinity.
The float32 bounds are DESIGN's; the float64 ones are measured, and their
reasons are given beside them.
"""
from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref

DTYPES = (np.float32, np.float64)

# Property-based tests (test_properties.py): "ci", the default, keeps the
# suite within CI's time and draws the same examples every run, so that a
# run fails for a change, not for a draw; `--hypothesis-profile=thorough`
# draws 10,000 fresh examples per test to explore. No deadline: the machines
# are shared and noisy, and speed is the bench's business.
_PROFILE_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=_PROFILE_CHECKS)
settings.register_profile("thorough", max_examples=10_000, deadline=None,
                          suppress_health_check=_PROFILE_CHECKS)
settings.load_profile("ci")

# Every activation with its defaults, and the parameter sets that exercise
# its parameters (a value that is not a float32 number, zero, negative).
PARAM_SETS = [
    ("sigmoid", {}),
    ("tanh", {}),
    ("relu", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("leaky_relu", {"negative_slope": 0.0}),
    ("leaky_relu", {"negative_slope": -0.1}),
    ("elu", {}),
    ("elu", {"alpha": 0.5}),
    ("elu", {"alpha": 1.3}),
    ("elu", {"alpha": -0.5}),
    ("selu", {}),
    ("gelu", {}),
    ("gelu", {"approximate": "tanh"}),
    ("silu", {}),
    ("softplus", {}),
    ("softplus", {"beta": 2.5, "threshold": 15.0}),
    ("softplus", {"beta": 0.5, "threshold": 5.0}),
    ("mish", {}),
    ("hardsigmoid", {}),
    ("hardswish", {}),
    ("hardtanh", {}),
    ("hardtanh", {"min_val": -2.0, "max_val": 0.5}),
    ("hardtanh", {"min_val": -0.3, "max_val": 0.3}),
]


def param_id(name: str, params: dict) -> str:
    return name + "".join(f"-{k}={v}" for k, v in params.items())


PARAM_IDS = [param_id(name, params) for name, params in PARAM_SETS]

# Activations whose derivative the public API forms from the forward output
# y (for leaky_relu and elu only with a non-negative parameter).
FROM_OUTPUT = {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "hardtanh"}


def accepts_output(name: str, params: dict) -> bool:
    if name == "leaky_relu":
        return params.get("negative_slope", 0.01) >= 0
    if name == "elu":
        return params.get("alpha", 1.0) >= 0
    return name in FROM_OUTPUT


# Activations that select, or multiply once in double, round once, so they
# must equal the reference rounded to their dtype, bit for bit.
# hardsigmoid and hardswish run in float arithmetic in float32 (up to three
# roundings) and get the ulp bound; in float64, hardsigmoid' (g / 6 against
# the reference's g * (1/6)) and hardswish may differ by the reference's
# own rounding.
# float16 is computed in float32 and rounded once more: only
# the activations that select rather than compute stay exact.
EXACT = {np.dtype(np.float32): {"relu", "leaky_relu", "hardtanh"},
         np.dtype(np.float64): {"relu", "leaky_relu", "hardtanh"},
         np.dtype(np.float16): {"relu", "hardtanh"}}

# Elementwise bounds in ulp of the dtype. float32: DESIGN section 6.
# float64: the kernels and the reference both evaluate exp, log1p, erfc and
# tanh to about 1 ulp and combine a few of them, each ending within 6 ulp of
# the true value (measured against mpmath: mish' 5 ulp in the kernel, 6 in
# the reference; tanh' 2 and 3), so they differ by at most 12. float16: a
# float32 result within 4 float32 ulp, rounded to float16, is within half a
# float16 ulp plus 2^-11 of one, so 1 ulp.
ULP_BOUND = {np.dtype(np.float32): 4.0, np.dtype(np.float64): 12.0, np.dtype(np.float16): 1.0}

# Derivatives that are a sum of two terms of opposite sign below their
# root. Where the terms cancel (their sum is less than half their
# magnitudes' sum) the float32 bound is instead an absolute
# 8 * 2^-24 * |grad_output| (DESIGN section 6); float64 gets the same floor
# with 2^-53. In float64 each term carries the libm-level error above in
# ulp of the term, so the sum's bound is ULP_BOUND times the cancellation
# factor (|t1| + |t2|) / |t1 + t2| (mish' at x = -3.85, where the factor
# is 1.7, differs by 11 ulp between the two).
ROOT_CANCELLING = {"gelu", "silu", "mish"}
ROOT_FLOOR_UNITS = 8.0
CANCELLATION = 2.0

# The tanh GELU rounds its inner argument sqrt(2/pi) (x + 0.044715 x^3)
# before exp, whose relative condition there is about x^2; any float64
# evaluation, the reference's included, then carries an error of the size of
# f's change over a few ulp of x. For float64 its bound adds that change
# (CONDITIONED_STEPS ulp of x). (The erf form carries x / sqrt(2) and x^2
# exactly and needs no such allowance.)
CONDITIONED_STEPS = 8


# float64 gelu(x) and gelu'(x) in the far tail, where they are accurate only
# if x / sqrt(2) and x^2 are carried exactly and subnormal results are
# rounded once (below -37.5 both are subnormal). Computed once with mpmath
# 1.3.0 at 160 bits as x Phi(x) and Phi(x) + x phi(x), with
# Phi(x) = erfc(-x / sqrt(2)) / 2, and printed to 17 significant digits.
GELU_TAIL = [
    (-7.25, -1.5107971650372503e-12, -1.0946014325702037e-11),
    (-7.75, -3.5608362627284115e-14, -2.7582319252544149e-13),
    (-10.3, -3.6287570312942052e-24, -3.7369848728227811e-23),
    (-15.2, -2.6875199558657967e-51, -4.0848804871290036e-50),
    (-20.1, -7.4162585360799935e-89, -1.4906499224620215e-87),
    (-25.7, -1.502013466215859e-144, -3.8601570434696513e-143),
    (-26.3, -2.5217925121808573e-151, -6.6322867803009221e-150),
    (-33.3, -6.4285833347397066e-242, -2.1407147841940747e-240),
    (-36.6, -5.2339355765109576e-292, -1.9156182938439294e-290),
    (-37.3, -3.0606495771591782e-303, -1.1416211169449908e-301),
    (-37.4, -7.3067690405672307e-305, -2.7327288376572621e-303),
    (-37.56, -1.8169829880835001e-307, -6.8245812693168917e-306),
    (-37.75, -1.4197627754863712e-310, -5.359599217574855e-309),
    (-38.05, -1.6379185298303491e-315, -6.2322740799789959e-314),
    (-38.2, -5.3786473507571484e-318, -2.0546413647652701e-316),
    (-38.35, -1.7269596572925835e-320, -6.6228841827010731e-319),
]


def conditioned(name: str, params: dict) -> bool:
    return name == "gelu" and params.get("approximate", "none") == "tanh"


def may_overflow(name: str, params: dict, x: np.ndarray, dtype) -> np.ndarray:
    """Where the true f(x) lies beyond the dtype's range: only selu (scale
    > 1) and leaky_relu with |negative_slope| > 1 grow faster than |x|."""
    limit = float(np.finfo(dtype).max)
    x = np.abs(np.asarray(x, dtype=np.float64))
    if name == "selu":
        return x > limit / ref.SELU_SCALE
    if name == "leaky_relu":
        return x * abs(params.get("negative_slope", 0.01)) > limit
    return np.zeros(x.shape, dtype=bool)


def significand_bits(dtype) -> int:
    return np.finfo(dtype).nmant + 1


def ulp_error(actual: np.ndarray, expected64: np.ndarray) -> np.ndarray:
    """|actual - expected| in ulp of expected rounded to actual's dtype.

    0 where both are NaN or both are the same infinity (an expected value
    past the dtype's range rounds to infinity); inf where only one is NaN."""
    dtype = actual.dtype
    a = actual.astype(np.float64)
    e = np.asarray(expected64, dtype=np.float64)
    with np.errstate(all="ignore"):
        e_rounded = e.astype(dtype)
        ulp = np.spacing(np.abs(e_rounded)).astype(np.float64)
        ulp = np.where(np.isinf(e_rounded), float(np.spacing(np.finfo(dtype).max)), ulp)
        err = np.abs(a - e) / ulp
    agree = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & (a == e_rounded.astype(np.float64)))
    err = np.where(agree, 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


def cupy_or_skip(*, kernels: bool = True):
    """CuPy, for a GPU test module to use; skips the whole calling module
    unless CuPy imports, a CUDA device is visible and (with `kernels`) this
    fusednn was built with its CUDA module. Call it at module level."""
    cupy = pytest.importorskip("cupy")
    if kernels and not fn.info()["cuda_built"]:
        pytest.skip("fusednn was built without its CUDA module", allow_module_level=True)
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        devices = 0
    if devices == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b hold identical bits, signed zeros included, except
    that a NaN matches any NaN (IEEE leaves the sign and payload of a NaN
    result unspecified, and vector and scalar code may pick differently)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    a_nan, b_nan = np.isnan(a), np.isnan(b)
    a_bits = np.where(a_nan, 0, np.ascontiguousarray(a).view(uint))
    b_bits = np.where(b_nan, 0, np.ascontiguousarray(b).view(uint))
    return bool(np.array_equal(a_nan, b_nan) and np.array_equal(a_bits, b_bits))


def rounded_equal(actual: np.ndarray, expected64: np.ndarray) -> np.ndarray:
    """Where actual equals expected rounded to its dtype, signed zeros and
    NaN included."""
    with np.errstate(all="ignore"):
        e = np.asarray(expected64, dtype=np.float64).astype(actual.dtype)
    same = (actual == e) & (np.signbit(actual) == np.signbit(e))
    return same | (np.isnan(actual) & np.isnan(e))


def derivative_terms(name: str, params: dict, x: np.ndarray):
    """The two terms of f' that cancel at its negative root, in float64:
    gelu' = Phi(x) + x phi(x) (or s(2u) + x s(2u) s(-2u) 2u' for the tanh
    form), silu' = s(x) + x s(x) s(-x), mish' = tanh(sp) + x sech^2(sp) s(x)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        if name == "silu":
            s = ref.sigmoid(x)
            return s, x * s * ref.sigmoid(-x)
        if name == "mish":
            sp = ref.softplus(x)
            return np.tanh(sp), x * ref.sigmoid(x) / np.cosh(sp) ** 2
        if params.get("approximate", "none") == "tanh":
            c = math.sqrt(2.0 / math.pi)
            two_u = 2.0 * c * (x + 0.044715 * x ** 3)
            s = ref.sigmoid(two_u)
            return s, x * s * ref.sigmoid(-two_u) * 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x)
        return ref.normal_cdf(x), x * ref.normal_pdf(x)


def _cancellation_allowance(name, params, x, grad, expected, dtype):
    """The absolute allowance for a derivative whose terms cancel: the
    near-root floor where they cancel by CANCELLATION or more, and in
    float64 ULP_BOUND ulp scaled by the cancellation factor everywhere.
    float16 is computed in float32 and gets float32's floor."""
    if name not in ROOT_CANCELLING:
        return np.zeros(np.shape(x))
    precision = np.float32 if np.dtype(dtype) == np.float16 else dtype
    first, second = derivative_terms(name, params, x)
    with np.errstate(all="ignore"):
        magnitude = np.abs(first) + np.abs(second)
        factor = magnitude / np.abs(first + second)
        cancels = factor >= CANCELLATION
        floor = ROOT_FLOOR_UNITS * 2.0 ** -significand_bits(precision) * np.abs(
            grad.astype(np.float64))
        allowance = np.where(cancels, floor, 0.0)
        if np.dtype(dtype) == np.float64:
            allowance = np.maximum(allowance, _ulps_of(expected, dtype) * factor)
    return allowance


def _ulps_of(expected, dtype) -> np.ndarray:
    """ULP_BOUND ulp of each expected value as an absolute amount (0 where
    the value is not finite)."""
    with np.errstate(all="ignore"):
        amount = ULP_BOUND[np.dtype(dtype)] * np.spacing(np.abs(np.asarray(expected, np.float64)))
    return np.where(np.isfinite(amount), amount, 0.0)


def _conditioning(func, x: np.ndarray, dtype) -> np.ndarray:
    """How far func moves when x moves by CONDITIONED_STEPS ulp either way."""
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        step = CONDITIONED_STEPS * np.spacing(np.abs(x64.astype(dtype))).astype(np.float64)
        center = func(x64)
        spread = np.maximum(np.abs(func(x64 + step) - center), np.abs(func(x64 - step) - center))
    return np.where(np.isfinite(spread), spread, 0.0)


def assert_matches(actual, expected64, *, exact=False, ulps=None, abs_tol=None, inputs=None,
                   what=""):
    """Asserts that actual is within ulps of expected64 (or within abs_tol
    where that is larger), or equals it rounded when exact. The message
    names the worst element and the inputs there."""
    assert isinstance(actual, np.ndarray), f"{what}: result is {type(actual).__name__}"
    expected64 = np.broadcast_to(np.asarray(expected64, dtype=np.float64), actual.shape)
    if actual.size == 0:
        return
    if exact:
        bad = ~rounded_equal(actual, expected64)
        if bad.any():
            i = np.flatnonzero(bad.ravel())[0]
            raise AssertionError(
                f"{what}: {int(bad.sum())} of {actual.size} elements differ from the rounded "
                f"reference; first at {_describe(i, actual, expected64, inputs)}")
        return
    ulps = ULP_BOUND[actual.dtype] if ulps is None else ulps
    err = ulp_error(actual, expected64)
    if abs_tol is not None:
        with np.errstate(all="ignore"):
            abs_err = np.abs(actual.astype(np.float64) - expected64)
        within_abs = np.broadcast_to(abs_tol, actual.shape) >= abs_err
        err = np.where(within_abs & np.isfinite(abs_err), 0.0, err)
    worst = float(err.max())
    if worst > ulps:
        i = int(np.argmax(err.ravel()))
        raise AssertionError(
            f"{what}: max error {worst:.4g} ulp > {ulps} ulp ({int((err > ulps).sum())} of "
            f"{actual.size} elements); worst at {_describe(i, actual, expected64, inputs)}")


def assert_gelu_tail_exact(module):
    """module.gelu and module.activation_backward("gelu", ...) (the kernels
    or the reference) within 4 ulp of the exact float64 values GELU_TAIL."""
    x, value, slope = (np.array(column) for column in zip(*GELU_TAIL))
    assert_matches(module.gelu(x), value, ulps=4, inputs={"x": x}, what="gelu")
    assert_matches(module.activation_backward("gelu", np.ones_like(x), x=x), slope, ulps=4,
                   inputs={"x": x}, what="gelu'")


def _describe(i, actual, expected, inputs) -> str:
    parts = [f"index {i}"]
    for label, values in (inputs or {}).items():
        parts.append(f"{label}={np.asarray(values).ravel()[i]!r}")
    parts.append(f"got {actual.ravel()[i]!r}, reference {expected.ravel()[i]!r}")
    return ", ".join(parts)


def check_forward(name, params, x, y, what=""):
    """y = fn.activation(name, x) against the reference, to DESIGN's bound."""
    expected = ref.activation(name, x, **params)
    abs_tol = None
    if y.dtype == np.float64 and conditioned(name, params):
        abs_tol = _ulps_of(expected, y.dtype) + _conditioning(
            lambda v: ref.activation(name, v, **params), x, y.dtype)
    assert_matches(y, expected, exact=name in EXACT[y.dtype], abs_tol=abs_tol, inputs={"x": x},
                   what=what or f"{name}{params} forward")


def check_backward_x(name, params, g, x, gi, what=""):
    """gi = grad_output * f'(x) against the reference, to DESIGN's bound."""
    expected = ref.activation_backward(name, g, x=x, **params)
    abs_tol = _cancellation_allowance(name, params, x, g, expected, gi.dtype)
    if gi.dtype == np.float64 and conditioned(name, params):
        abs_tol = abs_tol + _ulps_of(expected, gi.dtype) + _conditioning(
            lambda v: ref.activation_backward(name, g, x=v, **params), x, gi.dtype)
    assert_matches(gi, expected, exact=name in EXACT[gi.dtype], abs_tol=abs_tol,
                   inputs={"x": x, "grad": g}, what=what or f"{name}{params} backward from x")


def check_backward_y(name, params, g, y, gi, what=""):
    """gi from the forward output y against the reference from the same y."""
    expected = ref.activation_backward(name, g, y=y, **params)
    assert_matches(gi, expected, exact=name in EXACT[gi.dtype], inputs={"y": y, "grad": g},
                   what=what or f"{name}{params} backward from y")


# ---- inputs --------------------------------------------------------------------


def special_values(dtype) -> np.ndarray:
    """+-0, subnormals, the smallest normal, +-inf, NaN, huge magnitudes,
    every kink and threshold of the activations and the exp/log range ends."""
    info = np.finfo(dtype)
    values = [0.0, -0.0, np.inf, -np.inf, np.nan, float(info.smallest_subnormal),
              -float(info.smallest_subnormal), 8 * float(info.smallest_subnormal),
              -8 * float(info.smallest_subnormal), float(info.smallest_normal),
              -float(info.smallest_normal), 3e38, -3e38, float(info.max), -float(info.max),
              1e-8, -1e-8, 1.0, -1.0, 3.0, -3.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3, 6.0, 10.0,
              20.0, -20.0, 40.0, -40.0, 88.7, -88.7, 104.0, -104.0, -0.75, -1.28, -1.19,
              1e10, -1e10]
    if dtype == np.float64:
        values += [1e-310, -1e-310, 709.7, -709.7, 745.2, -745.2, 1e154, 1e200, -1e200,
                   1e300, -1e300]
    with np.errstate(over="ignore"):  # float16: the float32-sized magnitudes become inf
        return np.array(values, dtype=np.float64).astype(dtype)


def dense_grid(dtype, n=40_001) -> np.ndarray:
    return np.linspace(-20.0, 20.0, n).astype(dtype)


def magnitudes(dtype, n=1_001) -> np.ndarray:
    """Log-spaced magnitudes over the dtype's whole finite range, both signs."""
    info = np.finfo(dtype)
    lo = math.log10(float(info.smallest_subnormal))
    hi = math.log10(float(info.max))
    with np.errstate(over="ignore"):  # the last power may round past the range
        mags = np.logspace(lo, hi, n).astype(dtype)
    mags = mags[np.isfinite(mags) & (mags > 0)]
    return np.concatenate([mags, -mags])


def random_normals(dtype, n=4_096, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.array([1.0, 4.0, 30.0]).repeat(n // 3 + 1)[:n]
    return (rng.standard_normal(n) * scales).astype(dtype)


INPUT_KINDS = ("special", "grid", "magnitudes", "normals")


def make_inputs(kind: str, dtype) -> np.ndarray:
    return {"special": special_values, "grid": dense_grid, "magnitudes": magnitudes,
            "normals": random_normals}[kind](dtype)


def grad_for(x: np.ndarray, seed=1) -> np.ndarray:
    """An upstream gradient of x's shape: magnitudes in [0.5, 2), both signs."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.5, 2.0, x.shape) * rng.choice([-1.0, 1.0], x.shape)
    return g.astype(x.dtype)


def run_at_once(count: int, work) -> list:
    """Calls work(i) for i in range(count) on as many Python threads,
    released together; returns the exceptions they raised."""
    start = threading.Barrier(count)
    errors = []

    def run(i):
        try:
            start.wait()
            work(i)
        except Exception as error:  # reported to the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# ---- fixtures ------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    """Restores the CPU thread count a test changes."""
    original = fn.get_num_threads()
    yield
    fn.set_num_threads(original)


@pytest.fixture
def restore_thread_pool():
    """Restores the thread-pool choice a test changes."""
    original = fn.get_thread_pool()
    yield
    fn.set_thread_pool(original)


@pytest.fixture
def openmp_team(restore_thread_pool, restore_threads):
    """Regions on the process's GNU OpenMP team, on 2 threads: PyTorch
    loaded (its CPU builds load libgomp), the choice "openmp"; skips where
    there is no such team."""
    torch = pytest.importorskip("torch")
    fn.set_thread_pool("openmp")
    fn.set_num_threads(2)
    if not _cpu.openmp_team_available():
        pytest.skip(f"no GNU OpenMP team in this process "
                    f"({torch.__config__.parallel_info().splitlines()[-1].strip()})")
    return torch


@pytest.fixture
def restore_simd():
    """Restores the SIMD path a test changes."""
    original = _cpu.simd()
    yield
    _cpu.set_simd(original)


@pytest.fixture
def restore_settings(restore_threads, restore_simd):
    """Restores both the thread count and the SIMD path."""
    yield


def numeric_gradient(loss, array: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """d loss / d array by central differences, perturbing array in place
    (and restoring it)."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        up = loss()
        flat[i] = saved - step
        down = loss()
        flat[i] = saved
        flat_grad[i] = (up - down) / (2 * step)
    return grad


# ---- every public function, on arrays of any library ------------------------------------

# Each entry calls one public function with its arrays made by `make` from
# numpy arrays (make = lambda a: a is the numpy call itself), so that the
# same draw runs in every library. `data` holds x (2-d, >= 2 rows), g (x's
# shape), bias (x.shape[1]), mask (dropout_mask of x) and, for batch norm,
# per-channel arrays of x.shape[1]. Training batch norm with running
# statistics is separate: JAX arrays are immutable, so they cannot be
# updated in place.
LIBRARY_CALLS = {
    "activation": lambda make, d: fn.activation("softplus", make(d["x"]), beta=2.0),
    "activation_backward[x]": lambda make, d: fn.activation_backward("gelu", make(d["g"]),
                                                                     x=make(d["x"])),
    "activation_backward[y]": lambda make, d: fn.activation_backward("tanh", make(d["g"]),
                                                                     y=make(d["x"])),
    "dropout": lambda make, d: fn.dropout(make(d["x"]), 0.3, seed=5, offset=2, return_mask=True),
    "dropout[eval]": lambda make, d: fn.dropout(make(d["x"]), 0.3, seed=5, training=False,
                                                return_mask=True),
    "dropout_backward[mask]": lambda make, d: fn.dropout_backward(make(d["g"]), 0.3,
                                                                  mask=make(d["mask"])),
    "dropout_backward[seed]": lambda make, d: fn.dropout_backward(make(d["g"]), 0.3, seed=5,
                                                                  offset=2),
    "bias_act_dropout": lambda make, d: fn.bias_act_dropout(
        make(d["x"]), make(d["bias"]), "silu", 0.2, seed=3, axis=1, return_mask=True),
    "bias_act_dropout_backward": lambda make, d: fn.bias_act_dropout_backward(
        make(d["g"]), make(d["x"]), make(d["bias"]), "silu", 0.2, mask=make(d["mask"]), axis=1),
    "batch_norm[train]": lambda make, d: fn.batch_norm(make(d["x"]), make(d["gamma"]),
                                                       make(d["beta"])),
    "batch_norm[eval]": lambda make, d: fn.batch_norm(
        make(d["x"]), make(d["gamma"]), make(d["beta"]), make(d["running_mean"]),
        make(d["running_var"]), training=False),
    "batch_norm_backward": lambda make, d: fn.batch_norm_backward(
        make(d["g"]), make(d["x"]), make(d["gamma"]), make(d["save_mean"]),
        make(d["save_invstd"])),
}


def library_call_data(x: np.ndarray, seed: int = 0) -> dict:
    """The arrays LIBRARY_CALLS read, for a 2-d x of at least two rows."""
    rng = np.random.default_rng(seed)
    channels = x.shape[1]
    per_channel = lambda: rng.standard_normal(channels).astype(x.dtype)  # noqa: E731
    forward = fn.batch_norm(x)
    return {"x": x, "g": rng.standard_normal(x.shape).astype(x.dtype), "bias": per_channel(),
            "mask": fn.dropout_mask(x.shape, 0.3, seed=5, offset=2),
            "gamma": per_channel(), "beta": per_channel(), "running_mean": per_channel(),
            "running_var": np.abs(per_channel()) + 0.5, "save_mean": forward.save_mean,
            "save_invstd": forward.save_invstd}


def flat_results(result) -> list:
    """A call's arrays, in order (tuples and named tuples flattened)."""
    return list(result) if isinstance(result, tuple) else [result]


def conv_bn_relu_blocks(strides=(1, 1, 1)) -> list:
    """Layers of a small CNN: three blocks of a 3x3 convolution (no bias,
    the block's stride), BatchNorm2d and ReLU, 3 -> 8 -> 16 -> 16 channels,
    drawn from torch's seeded generator."""
    import torch

    torch.manual_seed(0)
    layers = []
    for (n_in, n_out), stride in zip(((3, 8), (8, 16), (16, 16)), strides):
        layers += [torch.nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False),
                   torch.nn.BatchNorm2d(n_out), torch.nn.ReLU()]
    return layers


def compiled_training_step(model, x, *, dynamic=False) -> list:
    """One training step (loss: the output's sum of squares) of `model`
    eagerly and of a copy compiled by inductor, whose output and gradients
    must match eager's; returns the generated code, forward then backward."""
    import torch
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)

    def step(m):
        out = m(x)
        out.square().sum().backward()
        return out

    expected = step(model)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=dynamic)
    # A graph cached by a build with other registrations would hide what
    # the callers check.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got, code = run_and_get_code(lambda: step(compiled))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)
    return code
