"""float16 and bfloat16 on the CPU: the conversions to and from float32
(exact, round to nearest even, NaN, infinities and subnormals), and the
activations, forward and backward, over every one of the 65,536 inputs of
each type: each result within 1 ulp of the storage type of the float64
reference (relu, leaky_relu and hardtanh correctly rounded), and the
float32 kernel's result rounded once, except where the half types take a
cheaper float32 form of their own (the forward of sigmoid, tanh, elu,
selu, silu and gelu's exact form, the backward of silu and hardswish,
elu's and selu's backward from y), which the tests hold to
the bound over every input and, for the backward passes, every input with
128 gradients. Plus the array plumbing:
strides, out=, in place, torch and JAX tensors. Batch norm's half
precision is tested in test_batchnorm_half.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref

from conftest import param_id, same_bits

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# (mantissa bits, smallest normal exponent) of each storage type.
FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}
PARAMS = [(name, {}) for name in fn.ACTIVATIONS] + [
    # 0.3: float16's products in float round differently for 78 inputs,
    # so its kernels keep the product in double; bfloat16's round alike.
    ("leaky_relu", {"negative_slope": 0.2}), ("leaky_relu", {"negative_slope": 0.3}),
    ("elu", {"alpha": 0.5}),
    ("gelu", {"approximate": "tanh"}), ("softplus", {"beta": 2.5, "threshold": 15.0}),
    ("hardtanh", {"min_val": -2.0, "max_val": 0.5})]
EXACT = {"relu", "leaky_relu", "hardtanh"}
FROM_Y = {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "hardtanh"}
# The half types' own float32 forms (fusednn/activations.h: the
# forward_core_half cores, GeluErfHalf, SiluHalf,
# HardswishHalf, EluHalf, SeluHalf): within the bound, but not always the
# float32 kernel's result rounded, from which they may differ by one ulp.
OWN_FORWARD = {"sigmoid", "tanh", "elu", "selu", "silu", "gelu"}  # gelu: the exact form
OWN_FROM_X = {"gelu", "silu", "hardswish"}
OWN_FROM_Y = {"elu", "selu"}


def own_form(names, name, params) -> bool:
    """Whether the half types take a form of their own for these
    parameters: of gelu, the exact form only."""
    return name in names and params.get("approximate", "none") == "none"


def every_value(dtype) -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def assert_same_values(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit for bit, except that any NaN matches any NaN of the same sign."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    with np.errstate(invalid="ignore"):
        a, e = actual.astype(np.float64), expected.astype(np.float64)
    nan = np.isnan(a) & np.isnan(e) & (np.signbit(a) == np.signbit(e))
    bad = ~nan & (bits(actual) != bits(expected))
    assert not bad.any(), (f"{bad.sum()} differ, first at input {np.flatnonzero(bad)[:5]}: "
                           f"{actual.ravel()[bad.ravel()][:5]} vs {expected.ravel()[bad.ravel()][:5]}")


def assert_at_most_one_ulp_apart(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal or neighbours: the same sign and bit patterns one apart; a NaN
    matches any NaN (a different loop may give its sign differently, which
    IEEE leaves unspecified)."""
    with np.errstate(invalid="ignore"):
        a, e = actual.astype(np.float64), expected.astype(np.float64)
    nan = np.isnan(a) & np.isnan(e)
    ia, ie = bits(actual).astype(np.int64), bits(expected).astype(np.int64)
    close = (ia == ie) | ((np.abs(ia - ie) == 1) & (np.signbit(a) == np.signbit(e)) &
                          np.isfinite(a) & np.isfinite(e))
    bad = ~nan & ~close
    assert not bad.any(), (f"{bad.sum()} differ, first at input {np.flatnonzero(bad)[:5]}: "
                           f"{actual.ravel()[bad.ravel()][:5]} vs {expected.ravel()[bad.ravel()][:5]}")


def spacing(dtype_name: str, value: np.ndarray) -> np.ndarray:
    mantissa_bits, min_exponent = FORMATS[dtype_name]
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log2(np.abs(value)))
    exponent = np.where(np.isfinite(exponent), exponent, min_exponent)
    return np.exp2(np.maximum(exponent, min_exponent) - mantissa_bits)


def round_once(dtype_name: str, value: np.ndarray) -> np.ndarray:
    """float64 value rounded once to the storage type (ml_dtypes rounds
    float64 through float32), as float64."""
    largest = float(np.finfo(DTYPES[dtype_name]).max)
    step = spacing(dtype_name, value)
    with np.errstate(all="ignore"):
        rounded = np.round(value / step) * step
    rounded = np.where(np.abs(rounded) > largest, np.copysign(np.inf, value), rounded)
    return np.where(np.isfinite(value), rounded, value)


def ulp_error(dtype_name: str, actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|actual - expected| in ulp of the storage type at expected; 0 for
    the correctly rounded value (the same infinity included) and for NaN
    meeting NaN; inf for NaN meeting a number."""
    a = actual.astype(np.float64)
    with np.errstate(all="ignore"):
        err = np.abs(a - expected) / spacing(dtype_name, expected)
    err = np.where((np.isnan(a) & np.isnan(expected)) | (a == round_once(dtype_name, expected)),
                   0.0, err)
    return np.where(np.isnan(err), np.inf, err)


# ---- conversions ---------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPES)
def test_every_half_value_widens_exactly(dtype_name):
    x = every_value(DTYPES[dtype_name])
    out = np.empty(x.shape, np.float32)
    _cpu.copy(x, out)
    assert_same_values(out, x.astype(np.float32))
    nan = np.isnan(out)
    assert nan.sum() == {"float16": 2046, "bfloat16": 254}[dtype_name]
    if dtype_name == "bfloat16":  # the upper half of a float32, NaNs and all
        np.testing.assert_array_equal(bits(out), bits(x).astype(np.uint32) << 16)
    else:  # NaNs keep their sign and payload and come out quiet, as from vcvtph2ps
        payload = (bits(x)[nan] & 0x3ff).astype(np.uint32) << 13
        np.testing.assert_array_equal(bits(out)[nan] & 0x003fe000, payload & 0x003fe000)
        assert np.all(bits(out)[nan] & 0x00400000)


def rounding_sweep() -> np.ndarray:
    """float32 bit patterns: every upper 16 bits (sign, exponent, top of
    the fraction) with lower 16 bits at and around each multiple of
    0x1000, so every tie, near-tie and round-up carry of both types (whose
    lowest kept bit is bit 13 for normal float16 and bit 16 for bfloat16)
    meets every exponent, plus random lower bits."""
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = sorted({(k * 0x1000 + d) & 0xffff for k in range(17) for d in (-1, 0, 1)})
    rng = np.random.default_rng(5)
    lows = np.array(lows + list(rng.integers(0, 1 << 16, 8)), dtype=np.uint32)
    return (upper[:, None] | lows[None, :]).ravel().view(np.float32)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_float32_rounds_once_to_nearest_even(dtype_name):
    x = rounding_sweep()
    out = np.empty(x.shape, DTYPES[dtype_name])
    _cpu.copy(x, out)
    with np.errstate(all="ignore"):
        expected = x.astype(DTYPES[dtype_name])  # numpy and ml_dtypes round once from float32
    assert_same_values(out, expected)
    # The cases that matter, by name: ties go to even, carries reach the
    # next exponent and infinity, subnormals round instead of flushing.
    for value, want in {"float16": [(1 + 2**-11, 1.0), (1 + 3 * 2**-11, 1 + 2**-9),
                                    (65520.0, np.inf), (65519.99, 65504.0),
                                    (2**-25, 0.0), (1.5 * 2**-25, 2**-24), (2**-24 * 2.5, 2**-23)],
                        "bfloat16": [(1 + 2**-8, 1.0), (1 + 3 * 2**-8, 1 + 2**-6),
                                     (float(np.finfo(np.float32).max), np.inf),
                                     (2**-140 + 2**-149, 2**-140), (1e-45, 1e-45)]}[dtype_name]:
        source = np.array([value, -value], np.float32)
        result = np.empty(2, DTYPES[dtype_name])
        _cpu.copy(source, result)
        np.testing.assert_array_equal(result.astype(np.float64),
                                      np.array([want, -want]).astype(np.float32).astype(
                                          DTYPES[dtype_name]).astype(np.float64))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_conversions_of_strided_views(dtype_name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 9)).astype(np.float32)[::2, ::-3]
    out = np.empty((3, 4), DTYPES[dtype_name]).T
    _cpu.copy(x, out)
    assert_same_values(out, x.astype(DTYPES[dtype_name]))
    back = np.empty((4, 3), np.float32)
    _cpu.copy(out, back)
    assert_same_values(back, out.astype(np.float32))


# ---- activations: every input --------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name,params", PARAMS, ids=[param_id(n, p) for n, p in PARAMS])
def test_every_input_rounds_the_float32_result_once(name, params, dtype_name):
    dtype = DTYPES[dtype_name]
    x = every_value(dtype)
    grad = np.random.default_rng(1).uniform(0.5, 2.0, x.shape).astype(dtype)
    x32, grad32 = x.astype(np.float32), grad.astype(np.float32)
    own_forward = own_form(OWN_FORWARD, name, params)
    with np.errstate(all="ignore"):
        y = fn.activation(name, x, **params)
        (assert_at_most_one_ulp_apart if own_forward else assert_same_values)(
            y, fn.activation(name, x32, **params).astype(dtype))
        gi = fn.activation_backward(name, grad, x=x, **params)
        own_backward = own_form(OWN_FROM_X, name, params)
        (assert_at_most_one_ulp_apart if own_backward else assert_same_values)(
            gi, fn.activation_backward(name, grad32, x=x32, **params).astype(dtype))
        if name in FROM_Y:
            gy = fn.activation_backward(name, grad, y=y, **params)
            expected = fn.activation_backward(name, grad32, y=y.astype(np.float32), **params)
            (assert_at_most_one_ulp_apart if name in OWN_FROM_Y else assert_same_values)(
                gy, expected.astype(dtype))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name,params", PARAMS, ids=[param_id(n, p) for n, p in PARAMS])
def test_every_input_within_one_ulp_of_float64(name, params, dtype_name):
    dtype = DTYPES[dtype_name]
    x = every_value(dtype)
    grad = np.random.default_rng(1).uniform(0.5, 2.0, x.shape).astype(dtype)
    bound = 0.0 if name in EXACT else 1.0
    y = fn.activation(name, x, **params)
    assert ulp_error(dtype_name, y, ref.activation(name, x, **params)).max() <= bound
    gi = fn.activation_backward(name, grad, x=x, **params)
    assert ulp_error(dtype_name, gi,
                     ref.activation_backward(name, grad, x=x, **params)).max() <= bound
    if name in FROM_Y:
        gy = fn.activation_backward(name, grad, y=y, **params)
        assert ulp_error(dtype_name, gy,
                         ref.activation_backward(name, grad, y=y, **params)).max() <= bound


def patterns_of(dtype) -> np.ndarray:
    """64 values, one in every 1024 bit patterns: every sign and exponent."""
    return (np.arange(64, dtype=np.uint32) * 1024 + 517).astype(np.uint16).view(dtype)


# (name, params, the saved input).
OWN_BACKWARD = [("elu", {}, "y"), ("elu", {"alpha": 0.5}, "y"), ("elu", {"alpha": 1.1}, "y"),
                ("elu", {"alpha": 3.0e-5}, "y"), ("elu", {"alpha": 1000.0 / 3.0}, "y"),
                ("selu", {}, "y"), ("silu", {}, "x"), ("hardswish", {}, "x"), ("gelu", {}, "x")]


def assert_every_input_times_gradients_within_one_ulp(name, params, saved, dtype_name, g):
    dtype = DTYPES[dtype_name]
    y = every_value(dtype)
    ys = np.repeat(y[None, :], g.size, axis=0)
    gs = np.repeat(g[:, None], y.size, axis=1)
    with np.errstate(all="ignore"):
        gy = fn.activation_backward(name, gs, **{saved: ys}, **params)
        expected = ref.activation_backward(name, gs, **{saved: ys}, **params)
    err = ulp_error(dtype_name, gy, expected)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= 1.0, (err.max(), ys[worst], gs[worst], gy[worst], expected[worst])


def every_exponent_gradients(dtype) -> np.ndarray:
    """The finite ones of patterns_of: every sign and exponent."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(patterns_of(dtype).astype(np.float32))
    return np.where(finite, patterns_of(dtype), np.asarray(1.0, dtype))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name,params,saved", OWN_BACKWARD,
                         ids=[param_id(n, p) + "-" + v for n, p, v in OWN_BACKWARD])
def test_every_input_with_many_gradients_within_one_ulp(name, params, saved, dtype_name):
    """The half types' own backward forms: within 1 ulp of the float64
    reference for every stored input times 128 finite gradients, 64 spread
    over every sign and exponent of the type (subnormals included) and 64
    uniform in [0.5, 2]. elu's and selu's g (y + alpha) in float from alpha
    as a float pair (y + alpha cancels near y = -alpha; alpha not a float
    for 1.1 and 1000 / 3); silu's derivative cancels around its root near
    -1.28, and gelu's around -0.75; beyond their core ranges both take the
    float32 kernel's tails, where for bfloat16 g f'(x) is a normal number
    with f'(x) alone subnormal or 0 (x down to -181)."""
    dtype = DTYPES[dtype_name]
    uniform = np.random.default_rng(3).uniform(0.5, 2.0, 64).astype(dtype)
    g = np.concatenate([every_exponent_gradients(dtype), uniform])
    assert_every_input_times_gradients_within_one_ulp(name, params, saved, dtype_name, g)


# The other activations whose derivative decays exponentially, from x.
EXPONENTIAL_FROM_X = [("sigmoid", {}), ("tanh", {}), ("elu", {}), ("elu", {"alpha": 0.5}),
                      ("selu", {}), ("softplus", {}), ("softplus", {"beta": 2.5, "threshold": 15.0}),
                      ("mish", {}), ("gelu", {"approximate": "tanh"})]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name,params", EXPONENTIAL_FROM_X,
                         ids=[param_id(n, p) for n, p in EXPONENTIAL_FROM_X])
def test_every_input_with_gradients_of_every_exponent(name, params, dtype_name, restore_simd):
    """Every stored input times 64 gradients over every sign and exponent,
    on every SIMD path, within 1 ulp: for bfloat16, whose range is float32's,
    g f'(x) is a normal number far into the tails where f'(x) alone is
    subnormal or 0 (|x| up to 176), and selu's g times its constant 1.76
    would overflow for the largest g."""
    g = every_exponent_gradients(DTYPES[dtype_name])
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        assert_every_input_times_gradients_within_one_ulp(name, params, "x", dtype_name, g)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "elu", "selu", "silu"])
def test_own_cores_give_the_same_bits_in_every_block(name, dtype_name):
    """A block with an input beyond the core range (a NaN every 61 inputs
    here) takes the full evaluation, which must give the half core's
    values wherever the input lies inside the bound: the blocking may
    decide speed, never bits."""
    x = every_value(DTYPES[dtype_name])
    spoiled = x.copy()
    spoiled[::61] = np.nan
    with np.errstate(all="ignore"):
        clean, mixed = fn.activation(name, x), fn.activation(name, spoiled)
    kept = np.ones(x.shape, bool)
    kept[::61] = False
    assert_same_values(mixed[kept], clean[kept])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", ["hardsigmoid", "leaky_relu"])
def test_every_gradient_rounds_the_float32_result_once(name, dtype_name):
    """The half kernels multiply hardsigmoid's g by the float nearest 1/6
    (and leaky_relu's by the slope in float where that rounds alike): the
    same stored results as the float32 kernel's g / 6 for every g."""
    dtype = DTYPES[dtype_name]
    grad = every_value(dtype)
    for x_value in (-1.0, 0.5):
        x = np.full(grad.shape, x_value, dtype)
        with np.errstate(all="ignore"):
            gi = fn.activation_backward(name, grad, x=x)
            expected = fn.activation_backward(name, grad.astype(np.float32),
                                              x=x.astype(np.float32)).astype(dtype)
        assert_same_values(gi, expected)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_every_simd_path_gives_the_same_bits(dtype_name, restore_simd):
    x = every_value(DTYPES[dtype_name])
    grad = x[::-1].copy()
    results = {}
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        with np.errstate(all="ignore"):
            results[path] = [fn.activation(n, x) for n in fn.ACTIVATIONS] + \
                [fn.activation_backward(n, grad, x=x) for n in fn.ACTIVATIONS]
        converted = np.empty(x.shape, np.float32)
        _cpu.copy(x, converted)
        narrowed = np.empty(x.shape, x.dtype)
        _cpu.copy(rounding_sweep()[:x.size], narrowed)
        results[path] += [converted, narrowed]
    first = results[_cpu.available_simd()[0]]
    for path, arrays in results.items():
        for a, b in zip(arrays, first):
            assert same_bits(a, b), path


# ---- array plumbing -------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5, 7), (1 << 15,)])
def test_shapes_strides_out_and_in_place(dtype_name, shape):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(2)
    x = np.asarray(rng.standard_normal(shape) * 3).astype(dtype)
    expected = fn.gelu(x)
    assert_at_most_one_ulp_apart(expected, fn.gelu(x.astype(np.float32)).astype(dtype))
    out = np.empty_like(x)
    assert fn.gelu(x, out=out) is out
    assert_same_values(out, expected)
    inplace = x.copy()
    fn.gelu(inplace, out=inplace)
    assert_same_values(inplace, expected)
    if x.ndim == 3:
        view = x[:, ::2, ::-1]
        assert_same_values(fn.silu(view), fn.silu(view.astype(np.float32)).astype(dtype))
        assert_same_values(fn.gelu(view), fn.gelu(np.ascontiguousarray(view)))
        g = np.ones_like(view)
        strided_out = np.empty((7, 3, 3), dtype).transpose(1, 2, 0)
        fn.activation_backward("silu", g, x=view, out=strided_out)
        assert_same_values(strided_out, fn.activation_backward(
            "silu", np.ascontiguousarray(g), x=np.ascontiguousarray(view)))
        assert_at_most_one_ulp_apart(strided_out, fn.activation_backward(
            "silu", g.astype(np.float32), x=view.astype(np.float32)).astype(dtype))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_large_arrays_take_the_streaming_path(dtype_name):
    # Every value, in outputs of over 16 MB (streamed past the cache, a
    # line at a time) that start off a line.
    dtype = DTYPES[dtype_name]
    x = np.tile(every_value(dtype), 129)[1:]
    g = np.roll(x, 12345)
    with np.errstate(all="ignore"):
        x32, g32 = x.astype(np.float32), g.astype(np.float32)
        assert_same_values(fn.mish(x), fn.mish(x32).astype(dtype))
        assert_same_values(fn.relu(x), fn.relu(x32).astype(dtype))
        # tanh's forward is the half types' own form: streamed, the bits of
        # cached runs.
        step = 1 << 20
        streamed = fn.tanh(x)
        assert_same_values(streamed, np.concatenate([fn.tanh(x[i:i + step])
                                                     for i in range(0, x.size, step)]))
        assert_at_most_one_ulp_apart(streamed, fn.tanh(x32).astype(dtype))
        assert_same_values(fn.activation_backward("hardsigmoid", g, x=x),
                           fn.activation_backward("hardsigmoid", g32, x=x32).astype(dtype))
        # hardswish's backward is the half types' own form: the streamed
        # run gives the bits of cached runs (pieces of 2^20 elements).
        streamed = fn.activation_backward("hardswish", g, x=x)
        pieces = [fn.activation_backward("hardswish", g[i:i + step], x=x[i:i + step])
                  for i in range(0, x.size, step)]
        assert_same_values(streamed, np.concatenate(pieces))
        assert_at_most_one_ulp_apart(
            streamed, fn.activation_backward("hardswish", g32, x=x32).astype(dtype))


def test_out_must_have_the_inputs_dtype():
    x = np.ones(4, np.float16)
    with pytest.raises(ValueError, match="dtype"):
        fn.relu(x, out=np.empty(4, ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        fn.relu(x, out=np.empty(4, np.float32))
    with pytest.raises(TypeError, match="same dtype"):
        fn.activation_backward("relu", np.ones(4, np.float32), x=x)


def test_torch_half_tensors():
    torch = pytest.importorskip("torch")
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        t = torch.linspace(-6, 6, 301, dtype=dtype)[::2]
        # The same bits as the numpy array of the same values (gelu and
        # silu take the half types' own forms, not float32's rounded).
        stored = t.float().numpy().astype(DTYPES[name])

        def same_as_numpy(result, numpy_result):
            return torch.equal(result.view(torch.int16),
                               torch.from_numpy(numpy_result.view(np.int16)))

        y = fn.gelu(t)
        assert isinstance(y, torch.Tensor) and y.dtype == dtype
        assert same_as_numpy(y, fn.gelu(stored))
        gi = fn.activation_backward("sigmoid", torch.ones_like(t), y=fn.sigmoid(t))
        assert gi.dtype == dtype
        out = torch.empty_like(t)
        assert fn.silu(t, out=out) is out
        assert same_as_numpy(out, fn.silu(stored))


def test_jax_bfloat16_arrays():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.linspace(-4, 4, 33, dtype=jnp.bfloat16)
    y = fn.silu(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), fn.silu(np.asarray(x)))


# ---- initializers ----------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPES)
def test_initializers_round_float64_once(dtype_name):
    w = fn.init.he_normal((64, 33), seed=4, dtype=dtype_name)
    assert w.dtype == DTYPES[dtype_name]
    w64 = fn.init.he_normal((64, 33), seed=4, dtype="float64")
    np.testing.assert_array_equal(w.astype(np.float64), round_once(dtype_name, w64))
    u = fn.init.uniform((1 << 16,), -1e-38, 1e-38, seed=2, dtype=dtype_name)  # subnormals
    np.testing.assert_array_equal(
        u.astype(np.float64),
        round_once(dtype_name, fn.init.uniform((1 << 16,), -1e-38, 1e-38, seed=2, dtype="float64")))


def test_bfloat16_device_descriptors():
    """torch CUDA bfloat16 tensors are described by ml_dtypes' bfloat16 and
    dtype code 3 (the GPU itself is tested in tests/gpu)."""
    torch = pytest.importorskip("torch")
    from fusednn import _arrays
    assert _arrays._torch_dtype(torch.bfloat16, "x", "relu") == DTYPES["bfloat16"]
    assert _arrays.dtype_code(DTYPES["bfloat16"]) == 3
    assert "bfloat16" in _arrays.SUPPORTED_CUDA_DTYPES
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16"):
        _arrays._torch_dtype(torch.int32, "x", "relu")
    with pytest.raises(KeyError):
        _arrays.dtype_code(np.dtype(np.int16))


def test_bfloat16_initializers_are_not_on_cupy():
    with pytest.raises(TypeError, match="CuPy has no bfloat16"):
        fn.init.glorot_uniform((3, 3), dtype="bfloat16", device="cuda")


# ---- dropout and the fused epilogue ------------------------------------------------

@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_dropout_masks_and_one_rounding_of_x_times_scale(dtype_name, p):
    dtype = DTYPES[dtype_name]
    x = every_value(dtype)
    x32 = x.astype(np.float32)
    with np.errstate(all="ignore"):
        y, mask = fn.dropout(x, p, seed=7, offset=3, return_mask=True)
        y32, mask32 = fn.dropout(x32, p, seed=7, offset=3, return_mask=True)
    np.testing.assert_array_equal(mask, mask32)  # the same bits for every dtype
    keep = np.unpackbits(mask, bitorder="little")[:x.size].astype(bool)
    scale = np.float64(np.float32(1.0 / (1.0 - p))) if p < 1 else 0.0
    with np.errstate(all="ignore"):
        expected = round_once(dtype_name, x.astype(np.float64) * np.where(keep, scale, 0.0))
    assert_same_values(y, expected.astype(dtype))
    # Backward from the mask and from (seed, offset): the same function of grad.
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(bits(fn.dropout_backward(x, p, mask=mask)), bits(y))
        np.testing.assert_array_equal(bits(fn.dropout_backward(x, p, seed=7, offset=3)), bits(y))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_dropout_strided_and_out(dtype_name):
    dtype = DTYPES[dtype_name]
    x = np.random.default_rng(6).standard_normal((5, 40, 3)).astype(dtype)[:, ::3, ::-1]
    expected = fn.dropout(np.ascontiguousarray(x), 0.3, seed=2)
    out = np.empty((3, 14, 5), dtype).transpose(2, 1, 0)
    assert fn.dropout(x, 0.3, seed=2, out=out) is out
    assert_same_values(out, expected)
    big = np.tile(every_value(dtype), 129)[1:]  # the streaming path, unaligned
    with np.errstate(all="ignore"):
        y, mask = fn.dropout(big, 0.25, seed=9, return_mask=True)
        keep = np.unpackbits(mask, bitorder="little")[:big.size].astype(bool)
        scale = np.float64(np.float32(1 / 0.75))
        expected = round_once(dtype_name, big.astype(np.float64) * np.where(keep, scale, 0.0))
        assert_same_values(y, expected.astype(dtype))
        assert_same_values(fn.dropout_backward(big, 0.25, mask=mask), y)


FUSED = [("relu", {}), ("gelu", {}), ("silu", {}), ("leaky_relu", {"negative_slope": 0.2})]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("act,params", FUSED, ids=[param_id(n, p) for n, p in FUSED])
@pytest.mark.parametrize("axis,shape", [(-1, (33, 70)), (1, (4, 9, 65)), (0, (5, 3))])
def test_fused_epilogue_rounds_the_float32_result_once(dtype_name, act, params, axis, shape):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(8)
    h = (rng.standard_normal(shape) * 2).astype(dtype)
    bias = rng.standard_normal(shape[axis]).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    h32, bias32, g32 = (a.astype(np.float32) for a in (h, bias, g))
    o, mask = fn.bias_act_dropout(h, bias, act, 0.2, seed=4, axis=axis, return_mask=True, **params)
    o32, mask32 = fn.bias_act_dropout(h32, bias32, act, 0.2, seed=4, axis=axis, return_mask=True,
                                      **params)
    np.testing.assert_array_equal(mask, mask32)
    assert_same_values(o, o32.astype(dtype))
    gh, gb = fn.bias_act_dropout_backward(g, h, bias, act, 0.2, mask=mask, axis=axis, **params)
    gh32, _ = fn.bias_act_dropout_backward(g32, h32, bias32, act, 0.2, mask=mask, axis=axis,
                                           **params)
    assert_same_values(gh, gh32.astype(dtype))
    assert gb.dtype == dtype
    axes = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    # The sum of the stored grad_h (exact in float64 at these sizes), rounded once.
    expected = round_once(dtype_name, gh.astype(np.float64).sum(axis=axes))
    np.testing.assert_array_equal(gb.astype(np.float64), expected)
    # Strided operands take the element-by-element loop: the same bits.
    hs = np.asfortranarray(h)
    assert_same_values(fn.bias_act_dropout(hs, bias, act, 0.2, seed=4, axis=axis, **params), o)
    gh_strided, _ = fn.bias_act_dropout_backward(np.asfortranarray(g), hs, bias, act, 0.2,
                                                 mask=mask, axis=axis, **params)
    assert_same_values(gh_strided, gh)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("axis", [-1, 1])
def test_fused_epilogue_streamed(dtype_name, axis):
    # Every finite value as h, in outputs of over 16 MB (streamed a line
    # at a time) that start off a line: rows with the bias along them, and
    # runs with a broadcast bias. (A NaN's sign may differ between the
    # float32 and half loops' grad_h, as between other layouts.)
    dtype = DTYPES[dtype_name]
    shape = (8193, 1031) if axis == -1 else (8, 1031, 1024)
    values = every_value(dtype)
    values = np.where(np.isfinite(values.astype(np.float32)), values, 0).astype(dtype)
    h = np.tile(values, 129)[37:37 + int(np.prod(shape))].reshape(shape)
    bias = np.random.default_rng(5).standard_normal(1031).astype(dtype)
    g = np.roll(h, 777)
    h32, bias32, g32 = (a.astype(np.float32) for a in (h, bias, g))
    with np.errstate(all="ignore"):
        o, mask = fn.bias_act_dropout(h, bias, "silu", 0.3, seed=6, axis=axis, return_mask=True)
        o32 = fn.bias_act_dropout(h32, bias32, "silu", 0.3, seed=6, axis=axis)
        assert_same_values(o, o32.astype(dtype))
        gh, _ = fn.bias_act_dropout_backward(g, h, bias, "silu", 0.3, mask=mask, axis=axis)
        gh32, _ = fn.bias_act_dropout_backward(g32, h32, bias32, "silu", 0.3, mask=mask,
                                               axis=axis)
        assert_same_values(gh, gh32.astype(dtype))


def test_torch_modules_run_half_tensors_on_fusednn():
    torch = pytest.importorskip("torch")
    fnn = pytest.importorskip("fusednn.torch.nn")
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.linspace(-5, 5, 257, dtype=dtype).requires_grad_()
        y = fnn.GELU()(x)
        assert y.dtype == dtype
        assert torch.equal(y.detach(), fn.gelu(x.detach()))
        y.backward(torch.ones_like(y))
        expected = fn.activation_backward("gelu", torch.ones_like(x.detach()), x=x.detach())
        assert torch.equal(x.grad, expected)
        dropped = fnn.Dropout(0.5)(x.detach())
        assert dropped.dtype == dtype
        kept = dropped != 0
        assert torch.equal(dropped[kept], (x.detach()[kept].float() * 2).to(dtype))
