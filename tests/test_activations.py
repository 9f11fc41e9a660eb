"""The CPU activation kernels against the float64 reference.

Every activation and parameter set, in float32 and float64, forward and
backward (from x, and from y where the derivative allows it), on special
values, a dense grid, the whole magnitude range and random normals, to the
ulp bounds of DESIGN section 6. Then the array plumbing: shapes, strides,
``out=``, in-place and overlapping outputs, a large array that takes the
threaded streaming-store path, bit-identical results for every thread count
and SIMD path, and the errors raised on bad input before anything is
written.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import fusednn as fn
from conftest import (DTYPES, INPUT_KINDS, PARAM_IDS, PARAM_SETS, accepts_output,
                      assert_gelu_tail_exact, assert_matches, check_backward_x,
                      check_backward_y, check_forward, grad_for, make_inputs, magnitudes,
                      may_overflow, param_id, random_normals, same_bits, special_values)
from fusednn import _cpu
from fusednn import reference as ref

PYTORCH_DEFAULTS = {
    "leaky_relu": {"negative_slope": 0.01},
    "elu": {"alpha": 1.0},
    "gelu": {"approximate": "none"},
    "softplus": {"beta": 1.0, "threshold": 20.0},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
}

DEFAULT_SETS = [(name, {}) for name in fn.ACTIVATIONS] + [("gelu", {"approximate": "tanh"})]
DEFAULT_IDS = [name + ("-tanh" if params else "") for name, params in DEFAULT_SETS]
Y_SETS = [(n, p) for n, p in PARAM_SETS if accepts_output(n, p)]
Y_IDS = [i for (n, p), i in zip(PARAM_SETS, PARAM_IDS) if accepts_output(n, p)]
X_ONLY_SETS = [(n, p) for n, p in PARAM_SETS if not accepts_output(n, p)]
X_ONLY_IDS = [i for (n, p), i in zip(PARAM_SETS, PARAM_IDS) if not accepts_output(n, p)]

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
param_sets = pytest.mark.parametrize(("name", "params"), PARAM_SETS, ids=PARAM_IDS)
default_sets = pytest.mark.parametrize(("name", "params"), DEFAULT_SETS, ids=DEFAULT_IDS)
kinds = pytest.mark.parametrize("kind", INPUT_KINDS)


def forward_by_name(name, x, params, **kwargs):
    """The named public function, e.g. fn.elu(x, alpha=...)."""
    return getattr(fn, name)(x, **params, **kwargs)


# ---- accuracy ------------------------------------------------------------------


@param_sets
@dtypes
@kinds
def test_forward_matches_reference(name, params, dtype, kind):
    x = make_inputs(kind, dtype)
    y = fn.activation(name, x, **params)
    assert y.dtype == x.dtype and y.shape == x.shape
    check_forward(name, params, x, y)
    assert same_bits(forward_by_name(name, x, params), y)


@param_sets
@dtypes
@kinds
def test_backward_from_x_matches_reference(name, params, dtype, kind):
    x = make_inputs(kind, dtype)
    g = grad_for(x)
    gi = fn.activation_backward(name, g, x=x, **params)
    assert gi.dtype == x.dtype and gi.shape == x.shape
    check_backward_x(name, params, g, x, gi)


@pytest.mark.parametrize(("name", "params"), Y_SETS, ids=Y_IDS)
@dtypes
@kinds
def test_backward_from_y_matches_reference(name, params, dtype, kind):
    x = make_inputs(kind, dtype)
    y = fn.activation(name, x, **params)
    g = grad_for(x)
    gi = fn.activation_backward(name, g, y=y, **params)
    check_backward_y(name, params, g, y, gi)


@pytest.mark.parametrize(("name", "params"), X_ONLY_SETS, ids=X_ONLY_IDS)
def test_backward_from_y_alone_needs_x(name, params):
    x = random_normals(np.float32, 16)
    y = fn.activation(name, x, **params)
    with pytest.raises(ValueError, match="needs x"):
        fn.activation_backward(name, np.ones_like(x), y=y, **params)


@param_sets
@dtypes
def test_backward_with_both_uses_the_documented_one(name, params, dtype):
    x = random_normals(dtype, 257)
    y = fn.activation(name, x, **params)
    g = grad_for(x)
    both = fn.activation_backward(name, g, x=x, y=y, **params)
    if accepts_output(name, params):
        expected = fn.activation_backward(name, g, y=y, **params)
    else:
        expected = fn.activation_backward(name, g, x=x, **params)
    assert same_bits(both, expected)


@param_sets
@dtypes
def test_special_gradients_match_reference(name, params, dtype):
    """Infinite, NaN and zero upstream gradients: where the derivative is
    selected to be 0 the gradient is 0, otherwise the product's IEEE value."""
    xs = np.array([-np.inf, -4.0, -3.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, 4.0, np.inf, np.nan])
    gs = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1.5])
    x = np.repeat(xs, gs.size).astype(dtype)
    g = np.tile(gs, xs.size).astype(dtype)
    check_backward_x(name, params, g, x, fn.activation_backward(name, g, x=x, **params))
    if accepts_output(name, params):
        y = fn.activation(name, x, **params)
        check_backward_y(name, params, g, y, fn.activation_backward(name, g, y=y, **params))


@param_sets
@dtypes
def test_finite_inputs_give_finite_results(name, params, dtype):
    """A finite x gives a finite f(x) unless the true value overflows the
    dtype, and a finite gradient: every derivative here is bounded."""
    x = np.concatenate([special_values(dtype), magnitudes(dtype)])
    x = x[np.isfinite(x)]
    y = fn.activation(name, x, **params)
    bad = ~np.isfinite(y) & ~may_overflow(name, params, x, dtype)
    assert not bad.any(), f"{name}{params}: non-finite f(x) at x={x[bad][:8]}: {y[bad][:8]}"
    g = grad_for(x)
    gi = fn.activation_backward(name, g, x=x, **params)
    bad = ~np.isfinite(gi)
    assert not bad.any(), f"{name}{params}: non-finite gradient at x={x[bad][:8]}: {gi[bad][:8]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", fn.ACTIVATIONS)
def test_nan_in_gives_nan_out(name, dtype):
    x = np.array([np.nan, -np.nan], dtype=dtype)
    assert np.isnan(fn.activation(name, x)).all()


def test_infinities_follow_pytorch():
    """The reference defines every value; these are the cases where PyTorch's
    choice is not the limit (x * 0 at an infinity is NaN)."""
    x = np.array([-np.inf, np.inf], dtype=np.float32)
    for name in ("silu", "gelu", "mish", "hardswish"):
        assert np.isnan(fn.activation(name, x)[0]), name
        assert fn.activation(name, x)[1] == np.inf, name
    assert np.isnan(fn.gelu(x, approximate="tanh")[0])
    assert fn.elu(x)[0] == -1.0 and fn.selu(x)[0] == np.float32(-ref.SELU_SCALE * ref.SELU_ALPHA)
    assert fn.softplus(x)[0] == 0.0 and fn.sigmoid(x)[0] == 0.0 and fn.tanh(x)[0] == -1.0
    one = np.ones(2, dtype=np.float32)
    assert np.isnan(fn.activation_backward("silu", one, x=x)[0])
    assert np.isnan(fn.activation_backward("gelu", one, x=x)).all()
    kinks = np.array([-3.0, 3.0], dtype=np.float32)
    assert fn.activation_backward("hardswish", np.ones(2, np.float32), x=kinks).tolist() == [0, 1]
    # At hardswish's root, inside its active range, the derivative is a
    # product (x / 3 + 1/2 = 0), not a selected 0: an infinite or NaN
    # gradient gives NaN, in the kernel and the reference alike.
    root = np.full(3, -1.5, np.float32)
    bad = np.array([np.inf, -np.inf, np.nan], np.float32)
    assert np.isnan(fn.activation_backward("hardswish", bad, x=root)).all()
    assert np.isnan(ref.activation_backward("hardswish", bad, x=root)).all()


# ---- parameters ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PYTORCH_DEFAULTS))
def test_defaults_are_pytorchs(name):
    signature = inspect.signature(getattr(fn, name))
    for parameter, default in PYTORCH_DEFAULTS[name].items():
        assert signature.parameters[parameter].default == default
    assert signature.parameters["out"].kind is inspect.Parameter.KEYWORD_ONLY
    x = np.concatenate([special_values(np.float32), random_normals(np.float32)])
    explicit = fn.activation(name, x, **PYTORCH_DEFAULTS[name])
    assert same_bits(fn.activation(name, x), explicit)
    assert same_bits(getattr(fn, name)(x), explicit)
    g = grad_for(x)
    assert same_bits(fn.activation_backward(name, g, x=x),
                     fn.activation_backward(name, g, x=x, **PYTORCH_DEFAULTS[name]))


def test_float64_gelu_tail_is_within_4_ulp_of_exact_values():
    assert_gelu_tail_exact(fn)


def test_float64_gelu_tail_matches_reference_closely():
    # Both within 4 ulp of the exact values, so within 8 of each other, down
    # to the band where the results are subnormal (ulp 2^-1074 there).
    x = np.concatenate([np.linspace(-38.7, -37.3, 14001), np.linspace(-30.0, -7.0, 23001)])
    g = grad_for(x)
    assert_matches(fn.gelu(x), ref.gelu(x), ulps=8, inputs={"x": x}, what="gelu")
    assert_matches(fn.activation_backward("gelu", g, x=x), ref.activation_backward("gelu", g, x=x),
                   ulps=8, inputs={"x": x, "grad": g}, what="gelu'")


def every_float32(low: float, high: float) -> np.ndarray:
    """Every float32 value in [low, high], for 0 <= low < high."""
    first, last = np.array([low, high], dtype=np.float32).view(np.uint32)
    return np.arange(first, last + 1, dtype=np.uint32).view(np.float32)


# Every float32 input, both signs, around the bounds of the core ranges
# (where a kernel's cheaper float32 evaluation hands over to the full one),
# the hand-overs inside them (the tanh form's central polynomial, the
# softplus threshold, e^x - 1 rounding to -1, gelu's s = |x| - 2 turning
# exact at 1, the gelu forward's first, middle and last joins of its core
# pieces at |x| = 0.125, 2.125 and 3.625), and each kernel's worst
# point in scripts/exhaustive_f32.cpp (the gelu forward's was 4.2 ulp near
# -1.834 before its product was rounded once).
TANH_GELU = {"approximate": "tanh"}
CORE_WINDOWS = [("gelu", {}, [(1.82, 1.87), (3.99, 4.01), (3.87, 3.88), (0.74, 0.76),
                             (0.99, 1.01), (0.3349, 0.3351), (0.00179, 0.00181),
                             (0.1245, 0.1255), (2.124, 2.126), (3.624, 3.626)]),
                ("gelu", TANH_GELU, [(8.99, 9.01), (0.74, 0.76), (1.37, 1.39), (3.14, 3.142),
                                   (1.217, 1.2172)]),
                ("silu", {}, [(4.99, 5.01), (63.9, 64.1), (1.27, 1.29)]),
                ("sigmoid", {}, [(63.9, 64.1), (4.15, 4.17), (5.538, 5.5385)]),
                ("tanh", {}, [(39.99, 40.01), (9.0, 9.02), (0.23, 0.24), (2.769, 2.7695)]),
                ("elu", {}, [(79.99, 80.01), (16.5, 17.5), (0.287, 0.2872), (1e-3, 1.01e-3),
                            (5.89, 5.891)]),
                ("selu", {}, [(79.99, 80.01), (0.15, 0.151), (1e-3, 1.01e-3)]),
                ("softplus", {}, [(79.99, 80.01), (19.99, 20.01), (3.89e-4, 3.9e-4), (4.15, 4.16)]),
                ("mish", {}, [(63.99, 64.01), (0.01310, 0.01311), (0.1575, 0.15755), (1.19, 1.2)])]
CORE_IDS = [name + ("_tanh" if params else "") for name, params, _ in CORE_WINDOWS]


@pytest.mark.parametrize(("name", "params", "windows"), CORE_WINDOWS, ids=CORE_IDS)
def test_float32_every_input_around_the_core_bounds(name, params, windows):
    x = np.concatenate([every_float32(low, high) for low, high in windows])
    x = np.concatenate([x, -x])
    check_forward(name, params, x, fn.activation(name, x, **params))
    g = grad_for(x)
    check_backward_x(name, params, g, x, fn.activation_backward(name, g, x=x, **params))


@pytest.mark.parametrize(("name", "params"), [(name, params) for name, params, _ in CORE_WINDOWS],
                         ids=CORE_IDS)
def test_core_blocks_give_the_bits_of_single_elements(name, params):
    # Blocks of inputs inside the core range take a cheaper loop; a block
    # with one input outside evaluates both forms and selects. Either way an
    # element's bits depend on its input alone.
    x = random_normals(np.float32, 4096)
    x = x[np.abs(x) < 3.5]
    g = grad_for(x)
    forward = lambda v: fn.activation(name, v, **params)  # noqa: E731
    backward = lambda dy, v: fn.activation_backward(name, dy, x=v, **params)  # noqa: E731
    plain = [forward(x), backward(g, x)]
    spoiled_x = x.copy()
    spoiled_x[5::64] = 100.0  # every 64th input outside the core
    spoiled = [forward(spoiled_x), backward(g, spoiled_x)]
    single = [np.array([forward(x[i:i + 1])[0] for i in range(0, x.size, 7)]),
              np.array([backward(g[i:i + 1], x[i:i + 1])[0] for i in range(0, x.size, 7)])]
    keep = np.ones(x.size, dtype=bool)
    keep[5::64] = False
    for whole, mixed, alone in zip(plain, spoiled, single):
        assert same_bits(whole[keep], mixed[keep])
        assert same_bits(whole[::7], alone)


@pytest.mark.parametrize(("name", "params"), [(name, params) for name, params, _ in CORE_WINDOWS],
                         ids=CORE_IDS)
@pytest.mark.parametrize("outsider", [100.0, np.inf, -np.inf, np.nan])
def test_an_input_outside_the_core_anywhere_in_a_block_is_seen(name, params, outsider):
    # The blocks are tested a line at a time: block k has its outsider at
    # lane k, so that every position of a 64-element block (and each of its
    # lines) holds one somewhere, and every element must still have the
    # bits of its own single-element call, the outsiders included.
    blocks = 64
    x = random_normals(np.float32, blocks * 64)
    x = np.clip(x, -3.5, 3.5).astype(np.float32)
    at = np.arange(blocks) * 64 + np.arange(blocks)
    x[at] = outsider
    g = grad_for(x)
    forward = fn.activation(name, x, **params)
    backward = fn.activation_backward(name, g, x=x, **params)
    picks = np.concatenate([at, at + 1 - 2 * (at % 64 == 63)])
    alone_forward = np.array([fn.activation(name, x[i:i + 1], **params)[0] for i in picks])
    alone_backward = np.array([fn.activation_backward(name, g[i:i + 1], x=x[i:i + 1],
                                                      **params)[0] for i in picks])
    assert same_bits(forward[picks], alone_forward)
    assert same_bits(backward[picks], alone_backward)


# The activations whose derivative decays exponentially, with every
# parameter set, for the large gradients below.
EXPONENTIAL = [(n, p) for n, p in PARAM_SETS
               if n in {"sigmoid", "tanh", "elu", "selu", "gelu", "silu", "softplus", "mish"}]
LARGE_GRADIENTS = [2.0 ** 40, 2.0 ** 100, 1.7e38, 3.4e38]
LARGE_GRADIENTS_F64 = [2.0 ** 300, 2.0 ** 900, 1.7e308]


def tail_inputs(dtype) -> np.ndarray:
    """Both signs over [0, 200] (float32: past every |x| where g f'(x) can
    be a normal number) and [0, 760] (float64), dense in the tails."""
    if dtype == np.float32:
        x = np.concatenate([np.linspace(0.0, 200.0, 40_001), np.linspace(60.0, 120.0, 20_001)])
    else:
        x = np.concatenate([np.linspace(0.0, 760.0, 40_001), np.linspace(700.0, 760.0, 20_001)])
    return np.concatenate([x, -x]).astype(dtype)


@pytest.mark.parametrize("name,params", EXPONENTIAL,
                         ids=[param_id(n, p) for n, p in EXPONENTIAL])
@dtypes
def test_large_gradients_over_the_tails(name, params, dtype, restore_simd):
    """g f'(x) for g up to the dtype's largest value, where f'(x) alone is
    subnormal or 0 while g f'(x) is a normal number (the exponential
    activations' tails, past |x| = 87 in float32), and where a product of g
    with a constant factor of f' would overflow first (selu's 1.76, the
    scaled exponentials): within the bound wherever the true result is
    finite, and infinite only where it overflows, on every SIMD path.
    float64's derivatives are themselves subnormal past |x| = 708, where
    the reference forms g f' from them as the kernels do (docs: the
    remaining region): checked where f' is normal."""
    x = tail_inputs(dtype)
    derivative = ref.activation_backward(name, np.ones(x.shape), x=x, **params)
    if dtype == np.float64:
        with np.errstate(invalid="ignore"):
            x = x[~(np.abs(derivative) < np.finfo(np.float64).smallest_normal)]
    grads = LARGE_GRADIENTS if dtype == np.float32 else LARGE_GRADIENTS_F64
    g = np.concatenate([np.full(x.size, sign * value) for value in grads for sign in (1, -1)])
    g = g.astype(dtype)
    x = np.tile(x, 2 * len(grads))
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        gi = fn.activation_backward(name, g, x=x, **params)
        check_backward_x(name, params, g, x, gi, what=f"{name}{params} large g, {path}")


@pytest.mark.parametrize(("name", "params"), [
    ("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.5}),
    ("gelu", {"approximate": "tanh"}), ("softplus", {"beta": 2.5, "threshold": 15.0}),
    ("hardtanh", {"min_val": -2.0, "max_val": 0.5})])
def test_parameters_change_the_result(name, params):
    x = np.linspace(-4, 4, 81, dtype=np.float64)
    assert not np.array_equal(fn.activation(name, x), fn.activation(name, x, **params))
    positional = getattr(fn, name)(x, *params.values())
    assert same_bits(positional, fn.activation(name, x, **params))


@pytest.mark.parametrize(("low", "high"), [(-0.7, 0.7), (-0.1, 0.3), (-1e-40, 1e-45), (-1e39, 3.5e38),
                                           (-1e300, 1e-300), (0.7, 0.7)])
def test_hardtanh_bounds_between_floats_compare_exactly(low, high):
    """float32 inputs are compared with float bounds derived from the double
    parameters; next to a bound that float32 cannot hold, every float32
    neighbour must land on the side the exact comparison gives."""
    # Bounds past the float32 range round to +-inf, as the kernel's result does.
    with np.errstate(over="ignore"):
        near = np.array([low, high]).astype(np.float32)
        x = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                            np.nextafter(near, np.float32(-np.inf)),
                            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38],
                                     np.float32)])
        expected = ref.hardtanh(x, low, high).astype(np.float32)
        g = np.linspace(1, 2, x.size, dtype=np.float32)
        expected_grad = ref.activation_backward("hardtanh", g, x=x, min_val=low,
                                                max_val=high).astype(np.float32)
    assert same_bits(fn.hardtanh(x, low, high), expected)
    assert same_bits(fn.activation_backward("hardtanh", g, x=x, min_val=low, max_val=high),
                     expected_grad)


def test_softplus_threshold_switches_to_identity():
    x = np.array([7.9, 8.0, 8.1, 30.0], dtype=np.float64)
    y = fn.softplus(x, beta=2.0, threshold=16.0)
    assert y[2] == 8.1 and y[3] == 30.0
    assert y[0] != 7.9 and y[1] != 8.0


# ---- shapes and strides --------------------------------------------------------

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (1023,), (65537,), (3, 5, 7), (2, 1, 3, 1, 4)]


@default_sets
@dtypes
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(name, params, dtype, shape):
    n = int(np.prod(shape))
    x = random_normals(dtype, max(n, 1))[:n].reshape(shape)
    y = fn.activation(name, x, **params)
    assert type(y) is np.ndarray and y.shape == shape and y.dtype == dtype
    check_forward(name, params, x, y)
    g = grad_for(x)
    gi = fn.activation_backward(name, g, x=x, **params)
    assert type(gi) is np.ndarray and gi.shape == shape and gi.dtype == dtype
    check_backward_x(name, params, g, x, gi)
    if accepts_output(name, params):
        gy = fn.activation_backward(name, g, y=y, **params)
        assert gy.shape == shape
        check_backward_y(name, params, g, y, gy)


def _views(dtype):
    """(label, non-contiguous view) pairs over fresh arrays."""
    base3 = random_normals(dtype, 6 * 10 * 14).reshape(6, 10, 14)
    base2 = random_normals(dtype, 37 * 29, seed=3).reshape(37, 29)
    flat = random_normals(dtype, 3001, seed=4)
    return [
        ("step3", flat[::3]),
        ("reversed", flat[::-1]),
        ("transpose", base2.T),
        ("column", base2[:, 5]),
        ("mixed", base3[::-2, 1:, ::3]),
        ("swapped", base3.transpose(2, 0, 1)[:, ::-1]),
        ("broadcast", np.broadcast_to(flat[:29], (37, 29))),
    ]


@default_sets
@dtypes
def test_non_contiguous_inputs(name, params, dtype):
    for label, x in _views(dtype):
        assert not x.flags.c_contiguous
        x_before = x.copy()
        contiguous = np.ascontiguousarray(x)
        y = fn.activation(name, x, **params)
        assert y.shape == x.shape
        assert same_bits(y, fn.activation(name, contiguous, **params)), label
        g = grad_for(contiguous)[..., ::-1].copy()[..., ::-1]  # also strided
        expected = fn.activation_backward(name, np.ascontiguousarray(g), x=contiguous, **params)
        assert same_bits(fn.activation_backward(name, g, x=x, **params), expected), label
        if accepts_output(name, params):
            y_strided = np.empty(y.shape[::-1], dtype).T
            y_strided[...] = y
            expected = fn.activation_backward(name, np.ascontiguousarray(g), y=y, **params)
            assert same_bits(fn.activation_backward(name, g, y=y_strided, **params), expected)
        assert same_bits(x, x_before), f"{label}: input was modified"


def test_non_native_and_unaligned_inputs():
    x = random_normals(np.float32, 1001)
    expected = fn.gelu(x)
    assert same_bits(fn.gelu(x.astype(">f4")).astype(np.float32), expected)
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float32)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    assert same_bits(fn.gelu(unaligned), expected)
    assert same_bits(fn.activation_backward("gelu", unaligned, x=unaligned),
                     fn.activation_backward("gelu", x, x=x))


# ---- out=, in place, overlap ---------------------------------------------------


@default_sets
@dtypes
def test_out_is_written_and_returned(name, params, dtype):
    x = random_normals(dtype, 1025)
    expected = fn.activation(name, x, **params)
    out = np.full_like(x, np.nan)
    assert fn.activation(name, x, out=out, **params) is out
    assert same_bits(out, expected)
    out2 = np.full_like(x, np.nan)
    assert forward_by_name(name, x, params, out=out2) is out2
    assert same_bits(out2, expected)
    g = grad_for(x)
    gout = np.full_like(x, np.nan)
    assert fn.activation_backward(name, g, x=x, out=gout, **params) is gout
    assert same_bits(gout, fn.activation_backward(name, g, x=x, **params))


@default_sets
@dtypes
def test_non_contiguous_out(name, params, dtype):
    x = random_normals(dtype, 15 * 17).reshape(15, 17)
    expected = fn.activation(name, x, **params)
    holder = np.full((17, 2, 15), 7.0, dtype=dtype)
    out = holder[:, 0, :].T
    assert fn.activation(name, x, out=out, **params) is out
    assert same_bits(np.ascontiguousarray(out), expected)
    assert (holder[:, 1, :] == 7.0).all(), "wrote outside out"
    g = grad_for(x)
    holder[...] = 7.0
    assert fn.activation_backward(name, g, x=x, out=out, **params) is out
    assert same_bits(np.ascontiguousarray(out), fn.activation_backward(name, g, x=x, **params))
    assert (holder[:, 1, :] == 7.0).all(), "wrote outside out"


@default_sets
@dtypes
def test_in_place(name, params, dtype):
    x = random_normals(dtype, 4099)
    expected = fn.activation(name, x, **params)
    work = x.copy()
    assert fn.activation(name, work, out=work, **params) is work
    assert same_bits(work, expected)
    g = grad_for(x)
    expected = fn.activation_backward(name, g, x=x, **params)
    gw = g.copy()
    assert fn.activation_backward(name, gw, x=x, out=gw, **params) is gw
    assert same_bits(gw, expected)
    xw = x.copy()
    assert fn.activation_backward(name, g, x=xw, out=xw, **params) is xw
    assert same_bits(xw, expected)
    if accepts_output(name, params):
        y = fn.activation(name, x, **params)
        expected = fn.activation_backward(name, g, y=y, **params)
        assert same_bits(fn.activation_backward(name, g, y=y, out=y, **params), expected)


@default_sets
@pytest.mark.parametrize("shift", [1, 3, -1, -8])
def test_partially_overlapping_out(name, params, shift):
    """out and the input share memory shifted by a few elements: the result
    must be the one computed from the unmodified input."""
    n = 3000
    buffer = random_normals(np.float64, n + abs(shift))
    x_at, out_at = (0, shift) if shift > 0 else (-shift, 0)
    x = buffer[x_at:x_at + n]
    out = buffer[out_at:out_at + n]
    x_copy = x.copy()
    expected = fn.activation(name, x_copy, **params)
    fn.activation(name, x, out=out, **params)
    assert same_bits(out, expected)

    buffer = random_normals(np.float64, n + abs(shift), seed=7)
    g = grad_for(x_copy)
    saved = buffer[x_at:x_at + n]
    out = buffer[out_at:out_at + n]
    saved_copy = saved.copy()
    expected = fn.activation_backward(name, g, x=saved_copy, **params)
    fn.activation_backward(name, g, x=saved, out=out, **params)
    assert same_bits(out, expected)


def test_reversed_view_as_out_of_its_own_base():
    x = random_normals(np.float32, 1001)
    expected = fn.tanh(x)[::-1]
    work = x.copy()
    fn.tanh(work, out=work[::-1])
    assert same_bits(work, expected)


# ---- large arrays and determinism ----------------------------------------------

LARGE_SHAPE = (2_000, 2_500)  # 5e6 float32: a 20 MB output, past L2 and the stream threshold


@pytest.fixture(scope="module")
def large_input():
    rng = np.random.default_rng(11)
    return (rng.standard_normal(LARGE_SHAPE) * 4).astype(np.float32)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "silu"])
def test_large_array(name, large_input, restore_threads):
    x = large_input
    y = fn.activation(name, x)
    check_forward(name, {}, x, y)
    rows = 100  # 1 MB blocks: neither threaded nor streamed
    blocks = np.concatenate([fn.activation(name, x[i:i + rows]) for i in range(0, x.shape[0], rows)])
    assert same_bits(y, blocks)
    g = grad_for(x[:1]).repeat(x.shape[0], axis=0)
    gi = fn.activation_backward(name, g, x=x)
    check_backward_x(name, {}, g, x, gi)
    fn.set_num_threads(1)
    assert same_bits(fn.activation(name, x), y)
    assert same_bits(fn.activation_backward(name, g, x=x), gi)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid"])
def test_streamed_lines_at_any_alignment(name, dtype, restore_simd):
    """Outputs past the stream threshold leave a line at a time from
    registers once their start is 64-byte aligned: an output view that
    starts one element past a line, and a length that ends mid-line, give
    the bits of small, unstreamed calls on every SIMD path (relu: no core
    form; gelu: core blocks; sigmoid: its derivative also from y)."""
    n = (17 << 20) // np.dtype(dtype).itemsize + 3
    x = random_normals(dtype, n, seed=21)
    x[::4097] = 8.5  # some blocks outside the core ranges
    g = grad_for(x)
    buffer = np.empty(n + 64 // x.itemsize, dtype)
    start = (-(buffer.ctypes.data // x.itemsize) + 1) % (64 // x.itemsize)
    out = buffer[start:start + n]
    assert out.ctypes.data % 64 == x.itemsize
    pieces = range(0, n, 1 << 16)
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        y = np.concatenate([fn.activation(name, x[i:i + (1 << 16)]) for i in pieces])
        assert same_bits(fn.activation(name, x, out=out), y), path
        dx = np.concatenate([fn.activation_backward(name, g[i:i + (1 << 16)], x=x[i:i + (1 << 16)])
                             for i in pieces])
        assert same_bits(fn.activation_backward(name, g, x=x, out=out), dx), path
        if accepts_output(name, {}):
            dy = np.concatenate([fn.activation_backward(name, g[i:i + (1 << 16)], y=y[i:i + (1 << 16)])
                                 for i in pieces])
            assert same_bits(fn.activation_backward(name, g, y=y, out=out), dy), path


def _determinism_input(dtype, n=200_003):
    """Larger than three threads' grains, not a multiple of any vector width,
    with every kind of special value spread through it."""
    x = random_normals(dtype, n, seed=5)
    specials = special_values(dtype)
    x[:: n // specials.size][: specials.size] = specials
    return x


def _all_results(name, params, x, g):
    results = [fn.activation(name, x, **params), fn.activation_backward(name, g, x=x, **params)]
    if accepts_output(name, params):
        results.append(fn.activation_backward(name, g, y=results[0], **params))
    return results


@default_sets
@dtypes
def test_same_bits_for_any_thread_count(name, params, dtype, restore_threads):
    x = _determinism_input(dtype)
    g = grad_for(x)
    fn.set_num_threads(1)
    baseline = _all_results(name, params, x, g)
    for threads in (2, 3):
        fn.set_num_threads(threads)
        for got, want in zip(_all_results(name, params, x, g), baseline):
            assert same_bits(got, want), f"{threads} threads"


@default_sets
@dtypes
def test_same_bits_for_every_simd_path(name, params, dtype, restore_simd):
    x = _determinism_input(dtype)
    g = grad_for(x)
    paths = list(_cpu.available_simd())
    assert "generic" in paths
    _cpu.set_simd("generic")
    baseline = _all_results(name, params, x, g)
    for path in paths[1:]:
        _cpu.set_simd(path)
        assert _cpu.simd() == path
        for got, want in zip(_all_results(name, params, x, g), baseline):
            assert same_bits(got, want), f"{path} differs from generic"


# ---- bad input -----------------------------------------------------------------

# float16 and bfloat16 are supported: tests/test_half.py.
UNSUPPORTED = [np.int32, np.int64, np.complex64, np.bool_, object]


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=lambda d: np.dtype(d).name)
def test_unsupported_dtype_is_a_type_error(dtype):
    bad = np.zeros(5, dtype=dtype)
    good = np.zeros(5, dtype=np.float32)
    calls = [lambda: fn.relu(bad), lambda: fn.activation("gelu", bad),
             lambda: fn.activation_backward("sigmoid", bad, x=good),
             lambda: fn.activation_backward("sigmoid", good, x=bad),
             lambda: fn.activation_backward("sigmoid", good, y=bad)]
    for call in calls:
        with pytest.raises(TypeError, match="float32.*float64"):
            call()


@pytest.mark.parametrize("value", [[0.5, 1.0], 1.5, 2, None, "x"], ids=repr)
def test_non_array_input_is_a_type_error(value):
    good = np.zeros(2, dtype=np.float64)
    with pytest.raises(TypeError, match="array"):
        fn.sigmoid(value)
    with pytest.raises(TypeError, match="array"):
        fn.activation("relu", value)
    with pytest.raises(TypeError, match="array"):
        fn.activation_backward("relu", value, x=good)
    if value is not None:  # x=None means that x was not given
        with pytest.raises(TypeError, match="array"):
            fn.activation_backward("relu", good, x=value)


@pytest.mark.parametrize("name", ["gelu2", "Relu", "", "swish"])
def test_unknown_activation_lists_the_known_ones(name):
    x = np.zeros(3, dtype=np.float32)
    for call in (lambda: fn.activation(name, x),
                 lambda: fn.activation_backward(name, x, x=x)):
        with pytest.raises(ValueError) as excinfo:
            call()
        for known in fn.ACTIVATIONS:
            assert known in str(excinfo.value)


@pytest.mark.parametrize(("name", "params", "unknown"), [
    ("relu", {"negative_slope": 0.1}, "negative_slope"), ("elu", {"slope": 1.0}, "slope"),
    ("gelu", {"approx": "tanh"}, "approx"), ("softplus", {"beta": 1.0, "limit": 5.0}, "limit"),
    ("sigmoid", {"alpha": 1.0}, "alpha"), ("hardtanh", {"min": -1.0}, "min")])
def test_unknown_parameter_is_a_type_error(name, params, unknown):
    x = np.zeros(3, dtype=np.float32)
    with pytest.raises(TypeError, match=rf"\b{unknown}\b"):
        fn.activation(name, x, **params)
    with pytest.raises(TypeError, match=rf"\b{unknown}\b"):
        fn.activation_backward(name, x, x=x, **params)


BAD_PARAMETERS = [
    ("leaky_relu", {"negative_slope": float("nan")}, ValueError),
    ("elu", {"alpha": float("nan")}, ValueError),
    ("softplus", {"beta": float("nan")}, ValueError),
    ("softplus", {"threshold": float("nan")}, ValueError),
    ("hardtanh", {"min_val": float("nan")}, ValueError),
    ("hardtanh", {"max_val": float("nan")}, ValueError),
    ("softplus", {"beta": 0.0}, ValueError),
    ("softplus", {"beta": -1.0}, ValueError),
    ("hardtanh", {"min_val": 1.0, "max_val": -1.0}, ValueError),
    ("gelu", {"approximate": "erf"}, ValueError),
    ("leaky_relu", {"negative_slope": "0.1"}, TypeError),
    ("elu", {"alpha": True}, TypeError),
    ("softplus", {"beta": None}, TypeError),
]


@pytest.mark.parametrize(("name", "params", "error"), BAD_PARAMETERS,
                         ids=[f"{n}-{p}" for n, p, _ in BAD_PARAMETERS])
def test_bad_parameter_raises_before_writing(name, params, error):
    x = random_normals(np.float32, 9)
    out = np.full_like(x, 42.0)
    with pytest.raises(error):
        fn.activation(name, x, out=out, **params)
    with pytest.raises(error):
        getattr(fn, name)(x, out=out, **params)
    with pytest.raises(error):
        fn.activation_backward(name, x, x=x, out=out, **params)
    assert (out == 42.0).all()


def _bad_outs():
    x = np.zeros((4, 5), dtype=np.float32)
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    return [
        ("shape", np.zeros((5, 4), np.float32)),
        ("size", np.zeros((4, 6), np.float32)),
        ("0-d", np.zeros((), np.float32)),
        ("dtype", np.zeros((4, 5), np.float64)),
        ("int dtype", np.zeros((4, 5), np.int32)),
        ("read-only", read_only),
        ("list", [[0.0] * 5] * 4),
        ("memoryview", memoryview(np.zeros((4, 5), np.float32))),
    ]


@pytest.mark.parametrize("label", [label for label, _ in _bad_outs()])
def test_bad_out_is_a_value_error_and_untouched(label):
    out = dict(_bad_outs())[label]
    x = random_normals(np.float32, 20).reshape(4, 5)
    before = np.array(out).tobytes()
    with pytest.raises(ValueError, match="out"):
        fn.relu(x, out=out)
    with pytest.raises(ValueError, match="out"):
        fn.activation("hardtanh", x, out=out, min_val=-0.5)
    with pytest.raises(ValueError, match="out"):
        fn.activation_backward("tanh", x, x=x, out=out)
    with pytest.raises(ValueError, match="out"):
        fn.activation_backward("tanh", x, y=x, out=out)
    assert np.array(out).tobytes() == before


def test_backward_needs_x_or_y():
    g = np.ones(3, dtype=np.float32)
    out = np.full_like(g, 5.0)
    for name in ("sigmoid", "gelu"):
        with pytest.raises(ValueError, match="x.*y"):
            fn.activation_backward(name, g, out=out)
    assert (out == 5.0).all()


@pytest.mark.parametrize("saved", ["x", "y"])
def test_backward_mismatched_arguments(saved):
    g = np.ones((3, 4), dtype=np.float32)
    out = np.full_like(g, 5.0)
    for value, error in [(np.ones((4, 3), np.float32), ValueError),
                         (np.ones((12,), np.float32), ValueError),
                         (np.ones((3, 4), np.float64), TypeError)]:
        with pytest.raises(error):
            fn.activation_backward("tanh", g, out=out, **{saved: value})
    assert (out == 5.0).all()


class _FakeCupyArray:
    """Stands for a CuPy array: the package recognizes those by their type's
    module, so this exercises the path a real one takes."""
    shape = (3,)
    dtype = np.dtype(np.float32)


_FakeCupyArray.__module__ = "cupy._core.core"


def test_cupy_like_input_without_cuda_module_names_the_fix(monkeypatch):
    from fusednn import _backend
    monkeypatch.setattr(_backend, "_cuda", None)
    with pytest.raises((RuntimeError, TypeError), match="CUDA"):
        fn.relu(_FakeCupyArray())
    with pytest.raises((RuntimeError, TypeError), match="CUDA"):
        fn.activation_backward("relu", _FakeCupyArray(), x=_FakeCupyArray())


def test_cupy_like_out_for_numpy_input_is_a_value_error():
    x = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="device"):
        fn.relu(x, out=_FakeCupyArray())


def test_cupy_array_is_rejected_clearly_without_a_cuda_kernel():
    cp = pytest.importorskip("cupy")
    try:
        x = cp.zeros(3, dtype=cp.float32)
    except cp.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    try:
        y = fn.relu(x)
    except RuntimeError as error:  # no CUDA module, or no CUDA kernel for it (NotImplementedError)
        assert "CUDA" in str(error) and "numpy" in str(error)
    else:  # the CUDA kernel ran; tests/gpu checks its results
        assert isinstance(y, cp.ndarray)
