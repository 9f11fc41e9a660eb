"""Inputs a careful user would not send but a real one does: operands that
live inside ``out``, outputs whose elements share memory, shapes past int64,
float32 batch norm at magnitudes near the float32 limit, bounds and tails
where a derivative from y can go wrong, the backward of inference-mode
batch norm, direct calls into the private module, interpreter exit with a
kernel running, and arguments of the wrong kind.

Each test states the rule it checks; the expected values come from
``fusednn.reference`` on copies taken before the call, or from first
principles where the reference is itself under test.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import fusednn as fn
from fusednn import _arrays, _cpu
from fusednn import reference as ref

RNG = np.random.default_rng(20261206)


def normals(shape, dtype=np.float32, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


# ---- 1. an operand inside out --------------------------------------------------


def test_batch_norm_gamma_and_beta_inside_out():
    x = normals((64, 8))
    out = normals((64, 8))
    gamma, beta = out[3], out[5]  # views into out, read after out is written
    expected = ref.batch_norm(x, gamma.copy(), beta.copy())
    y, mean, invstd = fn.batch_norm(x, gamma, beta, out=out)
    assert y is out
    np.testing.assert_allclose(y, expected.y, rtol=0, atol=2e-6)
    np.testing.assert_allclose(invstd, expected.save_invstd, rtol=1e-6)


def test_batch_norm_inference_statistics_inside_out():
    x = normals((32, 4, 5))
    out = np.abs(normals((32, 4, 5))) + 0.5
    running_mean, running_var = out[0, :, 0], out[1, :, 0]
    expected = ref.batch_norm(x, None, None, running_mean.copy(), running_var.copy(),
                              training=False)
    y = fn.batch_norm(x, None, None, running_mean, running_var, training=False, out=out).y
    np.testing.assert_allclose(y, expected.y, rtol=0, atol=2e-6)


@pytest.mark.parametrize("where", ["out", "x", "gamma", "running_var"])
def test_batch_norm_running_statistics_sharing_memory_is_rejected(where):
    x = normals((16, 6))
    out = normals((16, 6))
    gamma = np.ones(12, np.float32)
    running_var = np.ones(6, np.float32)
    running_mean = {"out": out[2], "x": x[2], "gamma": gamma[3:9],
                    "running_var": running_var}[where]
    before = [a.copy() for a in (x, out, gamma, running_var)]
    with pytest.raises(ValueError, match="shares? memory"):
        fn.batch_norm(x, gamma[:6], None, running_mean, running_var, out=out)
    for a, b in zip((x, out, gamma, running_var), before):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_backward_operands_inside_grad_input():
    x = normals((50, 3, 4))
    g = normals((50, 3, 4))
    forward = fn.batch_norm(x, axis=1)
    out = normals((50, 3, 4))
    gamma, mean, invstd = out[0, :, 0], out[1, :, 0], out[2, :, 0]
    mean[...] = forward.save_mean
    invstd[...] = forward.save_invstd
    expected = ref.batch_norm_backward(g, x, gamma.copy(), mean.copy(), invstd.copy())
    gi, gg, gb = fn.batch_norm_backward(g, x, gamma, mean, invstd, out=out)
    assert gi is out
    np.testing.assert_allclose(gi, expected[0], rtol=0, atol=1e-5 * np.abs(expected[0]).max())
    np.testing.assert_allclose(gg, expected[1], rtol=1e-5, atol=1e-4)


def test_dropout_backward_mask_inside_out():
    n = 1 << 22
    g = normals(n)
    buffer = normals(n)
    mask = buffer.view(np.uint8)[:n // 8]
    mask[...] = fn.dropout_mask(n, 0.3, seed=5, offset=2)
    expected = ref.dropout_backward(g, 0.3, mask=mask.copy())
    result = fn.dropout_backward(g, 0.3, mask=mask, out=buffer)
    assert result is buffer
    # g * float(1 / keep): within one rounding of g / keep
    np.testing.assert_array_max_ulp(result, expected.astype(np.float32), maxulp=1)


def test_fused_bias_and_mask_inside_out():
    h = normals((256, 64))
    g = normals((256, 64))
    out = normals((256, 64))
    bias = out[7]
    bias_copy = bias.copy()
    expected = ref.bias_act_dropout(h, bias_copy, "gelu", 0.2, seed=1, offset=3)
    o = fn.bias_act_dropout(h, bias, "gelu", 0.2, seed=1, offset=3, out=out)
    np.testing.assert_allclose(o, expected, rtol=4e-6, atol=1e-30)

    grad_h = normals((256, 64))
    mask = grad_h.reshape(-1).view(np.uint8)[-(256 * 64 // 8):]
    mask[...] = fn.dropout_mask(h.shape, 0.2, seed=1, offset=3)
    bias = grad_h[0]
    bias[...] = bias_copy
    expected_h, expected_b = ref.bias_act_dropout_backward(g, h, bias_copy, "gelu", 0.2,
                                                           mask=mask.copy())
    gh, gb = fn.bias_act_dropout_backward(g, h, bias, "gelu", 0.2, mask=mask, out=grad_h)
    np.testing.assert_allclose(gh, expected_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gb, expected_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift", [1, 7, -3])
def test_activation_input_overlapping_out_by_a_shift(shift):
    buffer = normals(10_000 + abs(shift), np.float64)
    expected = ref.gelu(buffer)
    if shift > 0:
        x, out, expected = buffer[shift:], buffer[:-shift], expected[shift:]
    else:
        x, out, expected = buffer[:shift], buffer[-shift:], expected[:shift]
    fn.gelu(x, out=out)
    np.testing.assert_allclose(out, expected, rtol=1e-14)


def test_in_place_stays_in_place_and_uncopied():
    x = normals((300, 70))
    expected = ref.silu(x)
    y = fn.silu(x, out=x)
    assert y is x
    np.testing.assert_allclose(x, expected, rtol=4e-7)


# ---- 2. an out whose elements share memory ---------------------------------------


def overlapping_outs():
    buffer = np.zeros(64, np.float32)
    yield "stride 0", as_strided(buffer, shape=(4, 8), strides=(0, 4))
    yield "rows overlap", as_strided(buffer, shape=(4, 8), strides=(16, 4))
    yield "zero inner", as_strided(buffer, shape=(3, 2, 2), strides=(32, 8, 0))


@pytest.mark.parametrize("label", [label for label, _ in overlapping_outs()])
def test_internally_overlapping_out_is_rejected(label):
    out = dict(overlapping_outs())[label]
    base = out.base if out.base is not None else out
    x = normals(out.shape)
    calls = [
        lambda: fn.relu(x, out=out),
        lambda: fn.activation_backward("tanh", x, y=x, out=out),
        lambda: fn.dropout(x, 0.5, seed=0, out=out),
        lambda: fn.dropout_backward(x, 0.5, seed=0, out=out),
        lambda: fn.batch_norm(x, out=out),
        lambda: fn.bias_act_dropout(x, np.zeros(x.shape[-1], np.float32), "relu", 0.1, seed=0,
                                    out=out),
    ]
    for call in calls:
        before = np.array(base, copy=True)
        with pytest.raises(ValueError, match="share memory"):
            call()
        np.testing.assert_array_equal(np.asarray(base), before)


def test_running_statistics_with_stride_zero_are_rejected():
    x = normals((20, 5))
    shared = np.zeros(1, np.float32)
    running_mean = as_strided(shared, shape=(5,), strides=(0,))
    with pytest.raises(ValueError, match="share memory"):
        fn.batch_norm(x, running_mean=running_mean, running_var=np.ones(5, np.float32))


def test_interleaved_out_without_overlap_is_accepted():
    buffer = np.zeros(12, np.float32)
    out = as_strided(buffer, shape=(3, 3), strides=(8, 12))  # offsets 0, 12, ..., 40: distinct
    x = normals((3, 3))
    fn.relu(x, out=out)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def brute_force_overlap(shape, strides, itemsize):
    offsets = [sum(i * s for i, s in zip(index, strides)) for index in np.ndindex(*shape)]
    return len(set(offsets)) < len(offsets)


def test_internal_overlap_test_agrees_with_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(0, 5, ndim))
        strides = tuple(int(s) * 4 for s in rng.integers(-6, 7, ndim))
        assert _arrays.has_internal_overlap(shape, strides, 4) == \
            brute_force_overlap(shape, strides, 4), (shape, strides)


# ---- 2b. how overlap is decided: byte extents first, numpy's exact test where they meet --


def random_views(rng, buffer, count):
    """Views of one float32 buffer: strided, reversed, transposed, empty."""
    words = buffer.size
    for _ in range(count):
        ndim = int(rng.integers(1, 3))
        shape = tuple(int(n) for n in rng.integers(0, 5, ndim))
        strides = tuple(int(s) * 4 for s in rng.integers(-5, 6, ndim))
        low = sum(min(0, s) * (n - 1) for n, s in zip(shape, strides) if n) // 4
        high = sum(max(0, s) * (n - 1) for n, s in zip(shape, strides) if n) // 4
        if high - low >= words:
            continue
        start = int(rng.integers(-low, words - high))
        yield as_strided(buffer[start:], shape=shape, strides=strides)


def extent_of(a):
    return _arrays.byte_span(a.__array_interface__["data"][0], a.shape, a.strides, a.itemsize)


def test_byte_extents_match_the_array_interface():
    rng = np.random.default_rng(7)
    views = list(random_views(rng, np.zeros(64, np.float32), 400))
    views += [np.ones(()), np.zeros((3, 0)), np.zeros((5, 4))[:, ::-2].T]
    for a in views:
        assert _cpu.byte_extents(a)[0] == extent_of(a), (a.shape, a.strides)
    assert _cpu.byte_extents(None, views[0]) == (None, extent_of(views[0]))
    with pytest.raises(TypeError):
        _cpu.byte_extents([1.0])


def test_meeting_extents_mark_the_pairs_whose_extents_meet():
    """The compiled masks equal the pairwise extents_meet test on views of
    one buffer (meeting, apart, empty) and None, and the extents equal
    byte_extents'."""
    rng = np.random.default_rng(9)
    buffer = np.zeros(64, np.float32)
    views = list(random_views(rng, buffer, 300)) + [np.zeros(3, np.float32)]
    for _ in range(200):
        picked = [views[int(i)] for i in rng.integers(0, len(views), int(rng.integers(1, 8)))]
        if rng.random() < 0.3:
            picked.insert(int(rng.integers(0, len(picked) + 1)), None)
        extents, meets = _cpu.meeting_extents(*picked)
        assert extents == _cpu.byte_extents(*picked)
        assert meets == _arrays.meeting_masks(extents)
        for i, a in enumerate(extents):
            for j, b in enumerate(extents):
                assert bool(meets[i] >> j & 1) == (i != j and _arrays.extents_meet(a, b))
    a = np.zeros(8)
    assert _cpu.meeting_extents(a, a[4:], None, np.zeros(2))[1] == (0b10, 0b1, 0, 0)
    with pytest.raises(TypeError):
        _cpu.meeting_extents([1.0])


def test_overlap_agrees_with_numpys_exact_test():
    """Extents that do not meet decide at once; where they meet (shifted,
    interleaved, reversed views) the answer is numpy's exact one."""
    rng = np.random.default_rng(8)
    views = list(random_views(rng, np.zeros(48, np.float32), 200))
    place = _arrays.NUMPY
    for a, b in zip(views, views[1:] + views[:1]):
        expected = bool(np.shares_memory(a, b))
        assert place.may_share_memory(a, b) == expected, (a.strides, b.strides)
        assert place.may_share_memory(a, b, place.extents(a, b)) == expected


def test_device_descriptors_use_the_same_overlap_test():
    """The GPU's Array descriptors (pointer tuples) get the same answers,
    from the same addresses, with nothing read through them."""
    place = object.__new__(_arrays.DevicePlace)  # no device needed: addresses only
    rng = np.random.default_rng(9)
    views = list(random_views(rng, np.zeros(48, np.float32), 200))

    def descriptor(a):
        return _arrays.Array((a.__array_interface__["data"][0], 0, a.shape, a.strides, 0, 0,
                              a, a.dtype))
    for a, b in zip(views, views[1:] + views[:1]):
        da, db = descriptor(a), descriptor(b)
        assert place.may_share_memory(da, db) == bool(np.shares_memory(a, b))
        assert place.same_view(da, db) == (extent_of(a) == extent_of(b) and a.shape == b.shape
                                           and a.strides == b.strides)


@pytest.mark.parametrize("layout", ["interleaved", "reversed interleaved", "columns of x's buffer"])
def test_running_statistics_interleaved_without_sharing_are_accepted(layout):
    """Extents that meet are not enough to refuse: running statistics in
    alternate elements of one buffer share no memory and are updated."""
    x = normals((16, 6), np.float64)
    if layout == "interleaved":
        buffer = np.zeros(12)
        running_mean, running_var = buffer[0::2], buffer[1::2]
    elif layout == "reversed interleaved":
        buffer = np.zeros(12)
        running_mean, running_var = buffer[::-2], buffer[-2::-2]
    else:  # inside x's extent, in none of its elements
        buffer = np.zeros((16, 8))
        buffer[:, :6] = x
        x = buffer[:, :6]
        running_mean, running_var = buffer[8:14, 6], buffer[1:7, 7]
    running_var[...] = 1.0
    fn.batch_norm(x, None, None, running_mean, running_var)
    np.testing.assert_allclose(running_mean, 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("layout", ["shifted", "reversed over x", "strided over out"])
def test_running_statistics_that_share_an_element_are_rejected(layout):
    buffer = np.zeros(64, np.float32)
    x = normals((8, 6))
    out = np.zeros((8, 6), np.float32)
    running_var = np.ones(6, np.float32)
    if layout == "shifted":
        running_mean, running_var = buffer[0:6], buffer[5:11]
    elif layout == "reversed over x":
        running_mean = x.reshape(-1)[11::-2]
    else:
        running_mean = out.reshape(-1)[::8]
    before = [a.copy() for a in (x, out, buffer)]
    with pytest.raises(ValueError, match="shares memory"):
        fn.batch_norm(x, None, None, running_mean, running_var, out=out)
    for a, b in zip((x, out, buffer), before):
        np.testing.assert_array_equal(a, b)


def test_input_interleaved_with_out_is_read_correctly():
    """An input in the other half of out's buffer needs no copy; one that
    shares elements with out (shifted by one) is copied first."""
    buffer = normals(32)
    x, out = buffer[1::2], buffer[0::2]
    expected = np.maximum(x, 0)
    fn.relu(x, out=out)
    np.testing.assert_array_equal(out, expected)
    buffer = normals(17)
    x, out = buffer[1:], buffer[:16]
    expected = np.tanh(x)
    fn.tanh(x, out=out)
    np.testing.assert_allclose(out, expected, rtol=2e-7, atol=1e-7)


# ---- 3. shapes past int64 ----------------------------------------------------


@pytest.mark.parametrize("shape", [(2**32, 2**32), (2**63,), (3, 2**62), (2**64,)])
def test_shapes_that_overflow_int64_are_rejected(shape):
    with pytest.raises(ValueError, match="more than an array can index"):
        fn.dropout_mask(shape, 0.5, seed=0)


# ---- 4. float32 batch norm near the float32 limit ----------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e19, 1e20, 1e30, 1e37])
@pytest.mark.parametrize("axis, shape", [(1, (8, 3, 50)), (-1, (400, 3)), (-1, (40, 2, 300))])
def test_batch_norm_float32_at_any_magnitude(scale, axis, shape):
    x = normals(shape, scale=scale)
    g = normals(shape)
    y, mean, invstd = fn.batch_norm(x, axis=axis)
    expected = ref.batch_norm(x, axis=axis)
    assert np.all(np.isfinite(y)) and np.all(invstd > 0)
    np.testing.assert_allclose(y, expected.y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(invstd, expected.save_invstd, rtol=1e-6)
    gi, gg, gb = fn.batch_norm_backward(g, x, None, mean, invstd, axis=axis)
    ei, eg, eb = ref.batch_norm_backward(g, x, None, expected.save_mean, expected.save_invstd,
                                         axis=axis)
    assert np.all(np.isfinite(gi))
    np.testing.assert_allclose(gi, ei, rtol=0, atol=2e-5 * np.abs(ei).max())
    np.testing.assert_allclose(gg, eg, rtol=0, atol=2e-5 * max(1.0, np.abs(eg).max()))
    np.testing.assert_allclose(gb, eb, rtol=1e-5, atol=1e-4)


def test_batch_norm_float32_extremes_of_both_signs():
    x = np.array([3.0e38, -3.0e38, 1.0e38, -2.5e38, 0.0, 3.4e38], np.float32).reshape(3, 2)
    for axis in (0, -1):
        y = fn.batch_norm(x, axis=axis).y
        np.testing.assert_allclose(y, ref.batch_norm(x, axis=axis).y, rtol=0, atol=1e-5)


# ---- 5. hardtanh with bounds that float32 cannot hold ---------------------------------


def test_hardtanh_bounds_are_rounded_to_the_dtype_as_pytorch():
    x = np.array([-2, .05, .1, .4, .7, .9, 5], np.float32)
    g = np.ones_like(x)
    params = {"min_val": 0.1, "max_val": 0.7}
    expected = np.array([0, 0, 0, 1, 0, 0, 0], np.float32)  # torch.nn.functional.hardtanh's
    y = fn.hardtanh(x, **params)
    np.testing.assert_array_equal(y, np.clip(x, np.float32(0.1), np.float32(0.7)))
    np.testing.assert_array_equal(fn.activation_backward("hardtanh", g, x=x, **params), expected)
    np.testing.assert_array_equal(fn.activation_backward("hardtanh", g, y=y, **params), expected)
    np.testing.assert_array_equal(ref.activation_backward("hardtanh", g, x=x, **params), expected)
    np.testing.assert_array_equal(ref.activation_backward("hardtanh", g, y=y, **params), expected)
    np.testing.assert_array_equal(ref.hardtanh(x, **params), y)


def test_hardtanh_from_x_and_y_agree_on_a_sweep():
    x = np.linspace(-1.5, 1.5, 200_001).astype(np.float32)
    g = normals(x.shape)
    for lo, hi in [(0.1, 0.7), (-0.3, 0.3), (-1 / 3, 2 / 3)]:
        y = fn.hardtanh(x, lo, hi)
        from_x = fn.activation_backward("hardtanh", g, x=x, min_val=lo, max_val=hi)
        from_y = fn.activation_backward("hardtanh", g, y=y, min_val=lo, max_val=hi)
        np.testing.assert_array_equal(from_x, from_y)
        inside = (x > np.float32(lo)) & (x < np.float32(hi))
        np.testing.assert_array_equal(from_x, np.where(inside, g, 0))


# ---- 6. elu and selu from y in the far tail -----------------------------------------


@pytest.mark.parametrize("name, params, alpha", [
    ("elu", {"alpha": 7.3}, 7.3), ("elu", {}, 1.0),
    ("selu", {}, ref.SELU_SCALE * ref.SELU_ALPHA)])
def test_derivative_from_y_in_the_tail_is_never_negative(name, params, alpha):
    x = np.array([-17, -20, -40, -5, -1e-3, -88, -104], np.float32)
    g = np.ones_like(x)
    y = fn.activation(name, x, **params)
    truth = alpha * np.exp(x.astype(np.float64))  # f'(x) from first principles
    # y can only know alpha * e^x to within half an ulp of alpha (y's rounding
    # near -alpha): the best a from-y gradient can do.
    bound = np.spacing(np.float32(alpha))
    for module in (fn, ref):
        from_y = np.asarray(module.activation_backward(name, g, y=y, **params), np.float64)
        assert np.all(from_y >= 0), (module.__name__, from_y)
        assert np.all(np.abs(from_y - truth) <= bound), (module.__name__, from_y - truth)


# ---- 7. the backward of inference-mode batch norm --------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis, shape", [(1, (6, 4, 9)), (-1, (30, 5))])
def test_inference_backward_matches_reference(dtype, axis, shape):
    x, g = normals(shape, dtype), normals(shape, dtype)
    channels = shape[axis]
    gamma = normals(channels, dtype)
    running_mean = normals(channels, np.float32)
    running_var = np.abs(normals(channels, np.float32)) + 0.5
    forward = fn.batch_norm(x, gamma, None, running_mean, running_var, training=False, axis=axis)
    gi, gg, gb = fn.batch_norm_backward(g, x, gamma, forward.save_mean, forward.save_invstd,
                                        axis=axis, training=False)
    ei, eg, eb = ref.batch_norm_backward(g, x, gamma, forward.save_mean, forward.save_invstd,
                                         axis=axis, training=False)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(gi, ei, rtol=tol, atol=tol)
    np.testing.assert_allclose(gg, eg, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(gb, eb, rtol=tol * 10, atol=tol * 10)
    # grad_input of inference is gamma * invstd * dy, nothing else
    shape_c = [1] * len(shape)
    shape_c[axis] = channels
    scale = (gamma.astype(np.float64) * forward.save_invstd).reshape(shape_c)
    np.testing.assert_allclose(gi, g * scale, rtol=tol, atol=tol)


def test_inference_backward_reference_against_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 4))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    running_mean, running_var = rng.standard_normal(3), rng.random(3) + 0.5
    g = rng.standard_normal(x.shape)

    def loss(x_, gamma_, beta_):
        y = ref.batch_norm(x_, gamma_, beta_, running_mean, running_var, training=False).y
        return float(np.sum(g * y))

    forward = ref.batch_norm(x, gamma, beta, running_mean, running_var, training=False)
    gi, gg, gb = ref.batch_norm_backward(g, x, gamma, forward.save_mean, forward.save_invstd,
                                         training=False)
    h = 1e-6
    for array, grad, name in ((x, gi, "x"), (gamma, gg, "gamma"), (beta, gb, "beta")):
        for index in list(np.ndindex(array.shape))[:12]:
            args = {"x": x.copy(), "gamma": gamma.copy(), "beta": beta.copy()}
            args[name][index] += h
            up = loss(args["x"], args["gamma"], args["beta"])
            args[name][index] -= 2 * h
            down = loss(args["x"], args["gamma"], args["beta"])
            assert abs((up - down) / (2 * h) - grad[index]) < 1e-6, (name, index)


def test_inference_backward_ignores_infinite_x():
    x = np.array([[np.inf, 1.0], [-np.inf, 2.0]], np.float32)
    g = np.ones_like(x)
    gi = fn.batch_norm_backward(g, x, None, np.zeros(2, np.float32), np.full(2, 0.5, np.float32),
                                training=False, axis=1)[0]
    np.testing.assert_array_equal(gi, np.full_like(x, 0.5))


def test_backward_training_must_be_a_bool():
    x = normals((4, 3))
    with pytest.raises(TypeError, match="training must be a bool"):
        fn.batch_norm_backward(x, x, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                               training="no")


# ---- 9. the private module never crashes ---------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (0, 3, 0), (1, 1), (1, 2, 1)])
def test_private_forward_with_too_few_values_raises(shape):
    x = np.zeros(shape, np.float32)
    y = np.empty_like(x)
    save = np.empty(shape[1], np.float32)
    with pytest.raises(ValueError, match="more than one value per channel"):
        _cpu.batch_norm_forward(x, y, None, None, None, None, save, save.copy(), None, True, 0.1,
                                1e-5, 1)


def test_private_forward_inference_without_statistics_raises():
    x = np.zeros((4, 3), np.float32)
    save = np.empty(3, np.float32)
    with pytest.raises(ValueError, match="running"):
        _cpu.batch_norm_forward(x, np.empty_like(x), None, None, None, None, save, save.copy(),
                                None, False, 0.1, 1e-5, 1)


def test_private_forward_with_unmergeable_layout_raises():
    x = np.zeros((4, 5, 6), np.float32)[:, ::2, :]  # the axes before the channels do not merge
    save = np.empty(6, np.float32)
    with pytest.raises(ValueError, match="merge"):
        _cpu.batch_norm_forward(x, np.empty(x.shape, np.float32), None, None, None, None, save,
                                save.copy(), None, True, 0.1, 1e-5, 2)


# ---- 10. interpreter exit while a kernel runs -----------------------------------------


def test_exit_while_a_daemon_thread_is_inside_a_kernel():
    script = textwrap.dedent("""
        import threading, numpy as np, fusednn as fn
        x = np.ones(1 << 23, np.float32)
        def work():
            while True:
                fn.gelu(x, out=x)
        for _ in range(2):
            threading.Thread(target=work, daemon=True).start()
        import time; time.sleep(0.05)
    """)
    for _ in range(12):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert "terminate" not in result.stderr


# ---- 11. booleans and thread counts -------------------------------------------------


@pytest.mark.parametrize("keyword", ["training", "return_mask"])
@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_dropout_flags_must_be_bools(keyword, value):
    x = normals(10)
    with pytest.raises(TypeError, match=f"{keyword} must be a bool"):
        fn.dropout(x, 0.5, seed=0, **{keyword: value})


def test_fused_return_mask_must_be_a_bool():
    h = normals((3, 4))
    with pytest.raises(TypeError, match="return_mask must be a bool"):
        fn.bias_act_dropout(h, np.zeros(4, np.float32), "relu", 0.5, seed=0, return_mask="no")


@pytest.mark.parametrize("n", [2**40, 10**6, _cpu.max_num_threads + 1, 0, -3])
def test_thread_counts_out_of_range_name_the_range(n, restore_threads):
    before = fn.get_num_threads()
    with pytest.raises(ValueError, match=rf"\[1, {_cpu.max_num_threads}\]"):
        fn.set_num_threads(n)
    assert fn.get_num_threads() == before


def test_largest_thread_count_is_accepted(restore_threads):
    fn.set_num_threads(_cpu.max_num_threads)
    assert fn.get_num_threads() == _cpu.max_num_threads


# ---- 13. errors that say what to do ----------------------------------------------


def test_big_endian_out_says_what_to_do():
    x = normals(8).astype(">f4")
    with pytest.raises(ValueError, match="byte order"):
        fn.relu(x, out=x)
    np.testing.assert_array_equal(fn.relu(x), np.maximum(x, 0))


# ---- 7, 8. nn.BatchNorm: eval backward, momentum=None, track_running_stats ----------


def test_layer_eval_backward_is_the_inference_kernel():
    layer = fn.nn.BatchNorm(4, axis=1, dtype="float64")
    layer.running_mean[...] = [0.5, -1.0, 2.0, 0.0]
    layer.running_var[...] = [1.5, 0.25, 4.0, 1.0]
    layer.gamma.value[...] = [1.0, -2.0, 0.5, 3.0]
    layer.eval()
    x = np.random.default_rng(4).standard_normal((6, 4, 3))
    g = np.random.default_rng(5).standard_normal(x.shape)
    layer(x)
    grad_input = layer.backward(g)
    forward = ref.batch_norm(x, layer.gamma.value, None, layer.running_mean, layer.running_var,
                             training=False)
    expected = ref.batch_norm_backward(g, x, layer.gamma.value, forward.save_mean,
                                       forward.save_invstd, training=False)
    np.testing.assert_allclose(grad_input, expected[0], rtol=1e-14)
    np.testing.assert_allclose(layer.gamma.grad, expected[1], rtol=1e-12)
    np.testing.assert_allclose(layer.beta.grad, expected[2], rtol=1e-12)


def test_momentum_none_is_the_cumulative_average():
    layer = fn.nn.BatchNorm(3, momentum=None, dtype="float64")
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((8, 3)) * (k + 1) + k for k in range(5)]
    for batch in batches:
        layer(batch)
    assert layer.num_batches_tracked == 5
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(axis=0) for b in batches],
                                                           axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var,
                               np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0),
                               rtol=1e-13)


def test_momentum_counts_batches_only_in_training():
    layer = fn.nn.BatchNorm(2, momentum=0.3, dtype="float64")
    x = np.random.default_rng(7).standard_normal((5, 2))
    layer(x)
    layer.eval()
    layer(x)
    assert layer.num_batches_tracked == 1
    np.testing.assert_allclose(layer.running_mean, 0.3 * x.mean(axis=0), rtol=1e-14)


def test_without_running_statistics_eval_uses_the_batch():
    layer = fn.nn.BatchNorm(3, track_running_stats=False, dtype="float64")
    assert layer.running_mean is None and layer.running_var is None and layer.buffers() == {}
    x = np.random.default_rng(8).standard_normal((10, 3)) * 4 + 2
    train = layer(x)
    layer.eval()
    np.testing.assert_array_equal(layer(x), train)
    g = np.ones_like(x)
    np.testing.assert_allclose(layer.backward(g), ref.batch_norm_backward(
        g, x, layer.gamma.value, x.mean(axis=0), 1 / np.sqrt(x.var(axis=0) + 1e-5))[0],
        atol=1e-12)
    with pytest.raises(TypeError, match="track_running_stats"):
        fn.nn.BatchNorm(3, track_running_stats=1)


def test_layer_fed_integers_does_not_suggest_an_integer_layer():
    layer = fn.nn.Dense(3, 2, seed=0)
    with pytest.raises(TypeError) as raised:
        layer(np.ones((4, 3), np.int64))
    assert "float32" in str(raised.value) and "dtype='int64'" not in str(raised.value)


@pytest.mark.parametrize("initializer", ["normal", "uniform", "glorot_uniform", "he_normal"])
def test_initializers_reject_shapes_past_int64(initializer):
    with pytest.raises(ValueError, match="more than an array can index"):
        getattr(fn.init, initializer)((2**32, 2**32, 4))


# ---- 12. the CLI validates every option before any work ----------------------------


@pytest.mark.parametrize("options", [
    ["--json", "{missing}/out.json"], ["--plot", "{tmp}"], ["--size", "2**40"],
    ["--size", "2^63"], ["--threads", "99999999999"], ["--threads", "0"], ["--size", "0"]])
def test_bench_rejects_bad_options_before_running(options, tmp_path, capsys):
    from fusednn.__main__ import main
    argv = ["bench", "--quick"] + [o.format(missing=tmp_path / "missing", tmp=tmp_path)
                                   for o in options]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "Traceback" not in captured.err
    assert "checking" not in captured.err  # nothing ran
    assert not (tmp_path / "missing").exists()


def test_bench_output_check_leaves_no_file_behind(tmp_path):
    from fusednn.bench import cli
    target = tmp_path / "new.json"
    cli._check_output_path(str(target), "--json")
    assert not target.exists()
    target.write_text("kept")
    cli._check_output_path(str(target), "--json")
    assert target.read_text() == "kept"
