"""The fused epilogue o = mask * act(h + bias) / keep and its backward:
against the float64 reference for every activation, the reference's
gradients against finite differences, the same mask as dropout, grad_bias
identical for every thread count and SIMD path, and bad input."""
import math

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref

CASES = [(name, {}) for name in fn.ACTIVATIONS] + [
    ("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.5}),
    ("gelu", {"approximate": "tanh"}), ("softplus", {"beta": 2.0, "threshold": 5.0}),
    ("hardtanh", {"min_val": -0.5, "max_val": 2.0}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]


def exact_sum_inputs(shape, axis, dtype, seed=0):
    """h and bias whose float32 sum is exact (few significant bits), so that
    float32 errors come from the kernel alone."""
    rng = np.random.default_rng(seed)
    h = np.round(rng.uniform(-6, 6, shape) * 2**10) / 2**10
    bias = np.round(rng.uniform(-2, 2, shape[axis]) * 2**6) / 2**6
    return h.astype(dtype), bias.astype(dtype)


def ulp_error(got, want):
    want32 = want.astype(np.float32)
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want32)).astype(np.float64)


@pytest.mark.parametrize("act,params", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_reference(act, params, dtype):
    h, bias = exact_sum_inputs((64, 33), 1, dtype)
    out, mask = fn.bias_act_dropout(h, bias, act, 0.3, seed=5, offset=2**33, return_mask=True,
                                    **params)
    want, mask_ref = ref.bias_act_dropout(h, bias, act, 0.3, seed=5, offset=2**33,
                                          return_mask=True, **params)
    np.testing.assert_array_equal(mask, mask_ref)
    assert out.dtype == dtype and np.all(np.isfinite(out))
    # h + bias is exact here, so the fused kernel must give the bits of the
    # separate kernels.
    separate = fn.dropout(fn.activation(act, h + bias, **params), 0.3, seed=5, offset=2**33)
    np.testing.assert_array_equal(out, separate)
    if dtype == np.float32:
        # act within 4 ulp, then one rounding for the scale and one for the product.
        assert np.all((ulp_error(out, want) <= 6) | (np.abs(out - want) < 2.0**-140))
    else:
        # The float64 activations' own accuracy (erfc tails): a few dozen ulp.
        np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("act,params", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_matches_reference(act, params, dtype):
    h, bias = exact_sum_inputs((96, 17), 1, dtype, seed=1)
    g = np.random.default_rng(2).standard_normal(h.shape).astype(dtype)
    grad_h, grad_bias = fn.bias_act_dropout_backward(g, h, bias, act, 0.25, seed=9, offset=4,
                                                     **params)
    want_h, want_bias = ref.bias_act_dropout_backward(g, h, bias, act, 0.25, seed=9, offset=4,
                                                      **params)
    assert grad_h.dtype == dtype and grad_bias.dtype == dtype and grad_bias.shape == (17,)
    assert np.all(np.isfinite(grad_h))
    separate = fn.activation_backward(act, fn.dropout_backward(g, 0.25, seed=9, offset=4),
                                      x=h + bias, **params)
    np.testing.assert_array_equal(grad_h, separate)
    eps = np.finfo(dtype).eps * (8 if dtype == np.float32 else 64)
    scale = np.abs(g) / 0.75
    # Few ulp of the result, or (near a root of the derivative) a few eps of
    # |grad_output| / keep.
    np.testing.assert_array_less(np.abs(grad_h - want_h), eps * (np.abs(want_h) + scale) + 1e-300)
    row_scale = np.sum(np.abs(want_h), axis=0) + np.sum(scale, axis=0)
    np.testing.assert_array_less(np.abs(grad_bias - want_bias), eps * row_scale + 1e-300)


@pytest.mark.parametrize("shape,axis", [((7, 5, 3, 4), 1), ((7, 5, 3, 4), -1), ((7, 5, 3, 4), 0),
                                        ((9, 130), -1), ((130,), 0), ((3, 1, 1), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axes(shape, axis, dtype):
    h, bias = exact_sum_inputs(shape, axis, dtype, seed=3)
    g = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    out = fn.bias_act_dropout(h, bias, "silu", 0.4, seed=1, axis=axis)
    tol = 8 * np.finfo(dtype).eps
    np.testing.assert_allclose(out, ref.bias_act_dropout(h, bias, "silu", 0.4, seed=1, axis=axis),
                               rtol=tol, atol=tol)
    grad_h, grad_bias = fn.bias_act_dropout_backward(g, h, bias, "silu", 0.4, seed=1, axis=axis)
    want_h, want_bias = ref.bias_act_dropout_backward(g, h, bias, "silu", 0.4, seed=1, axis=axis)
    np.testing.assert_allclose(grad_h, want_h, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad_bias, want_bias, rtol=tol, atol=tol * h.size / bias.size)


def test_strided_inputs_and_out():
    rng = np.random.default_rng(5)
    h = rng.standard_normal((30, 8, 20))[:, ::2, ::3]
    bias = rng.standard_normal(30 * 2)[::2]
    g = rng.standard_normal((30, 4, 7))[::-1]
    holder = np.zeros((30, 4, 14))
    out = holder[:, :, ::2]
    assert fn.bias_act_dropout(h, bias, "tanh", 0.5, seed=2, axis=0, out=out) is out
    np.testing.assert_allclose(out, ref.bias_act_dropout(h, bias, "tanh", 0.5, seed=2, axis=0),
                               rtol=1e-15, atol=1e-300)
    assert not np.any(holder[:, :, 1::2])
    grad_h, grad_bias = fn.bias_act_dropout_backward(g, h, bias, "tanh", 0.5, seed=2, axis=0)
    want_h, want_bias = ref.bias_act_dropout_backward(g, h, bias, "tanh", 0.5, seed=2, axis=0)
    np.testing.assert_allclose(grad_h, want_h, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(grad_bias, want_bias, rtol=1e-13)


def test_same_mask_as_dropout_and_backward_sources_agree():
    h, bias = exact_sum_inputs((33, 65), 1, np.float32, seed=6)
    g = np.random.default_rng(7).standard_normal(h.shape).astype(np.float32)
    out, mask = fn.bias_act_dropout(h, bias, "relu", 0.6, seed=3, offset=2**50,
                                    return_mask=True)
    np.testing.assert_array_equal(mask, fn.dropout_mask(h.shape, 0.6, seed=3, offset=2**50))
    from_mask = fn.bias_act_dropout_backward(g, h, bias, "relu", 0.6, mask=mask)
    from_seed = fn.bias_act_dropout_backward(g, h, bias, "relu", 0.6, seed=3, offset=2**50)
    for a, b in zip(from_mask, from_seed):
        np.testing.assert_array_equal(a, b)
    # relu(h + b) * mask / keep is dropout of relu(h + b): the same bits.
    np.testing.assert_array_equal(
        out, fn.dropout(fn.relu(h + bias), 0.6, seed=3, offset=2**50))


@pytest.mark.parametrize("channels", [128, 130, 200, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_over_rows_gives_the_bits_of_the_separate_kernels(channels, dtype):
    # Contiguous h and out with the bias along a last axis of 128 or more
    # take a loop that draws the keep bits between pieces of the output and
    # splits pieces where rows end; over many chunks, at an unaligned out
    # and in place, for every thread count and SIMD path, it must give the
    # bits and the mask of dropout(act(h + bias)).
    h, bias = exact_sum_inputs(((3 << 18) // channels, channels), 1, dtype, seed=channels)
    cases = [("relu", {}), ("gelu", {}), ("elu", {"alpha": 0.5})]
    expected = {act: fn.dropout(fn.activation(act, h + bias, **params), 0.2, seed=9,
                                offset=77, return_mask=True) for act, params in cases}
    threads_before, simd_before = fn.get_num_threads(), _cpu.simd()
    buffer = np.empty(h.size + 1, dtype)
    try:
        for path in _cpu.available_simd():
            _cpu.set_simd(path)
            for threads in (1, 2, 3):
                fn.set_num_threads(threads)
                for act, params in cases:
                    for where in ("new", "unaligned", "in place"):
                        out = {"new": np.empty_like(h), "unaligned": buffer[1:].reshape(h.shape),
                               "in place": h.copy()}[where]
                        source = out if where == "in place" else h
                        _, mask = fn.bias_act_dropout(source, bias, act, 0.2, seed=9, offset=77,
                                                      return_mask=True, out=out, **params)
                        np.testing.assert_array_equal(out, expected[act][0], err_msg=where)
                        np.testing.assert_array_equal(mask, expected[act][1], err_msg=where)
    finally:
        fn.set_num_threads(threads_before)
        _cpu.set_simd(simd_before)


@pytest.mark.parametrize("channels", [130, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_forward_over_rows_gives_the_bits_of_the_separate_kernels(channels, dtype):
    # Outputs of 16 MiB and more leave through non-temporal stores.
    h, bias = exact_sum_inputs(((5 << 20) // channels, channels), 1, dtype, seed=channels)
    buffer = np.empty(h.size + 1, dtype)
    threads_before = fn.get_num_threads()
    try:
        for act in ("relu", "gelu"):
            expected, expected_mask = fn.dropout(fn.activation(act, h + bias), 0.3, seed=4,
                                                 return_mask=True)
            for threads in (1, 2):
                fn.set_num_threads(threads)
                for out in (np.empty_like(h), buffer[1:].reshape(h.shape)):
                    _, mask = fn.bias_act_dropout(h, bias, act, 0.3, seed=4, return_mask=True,
                                                  out=out)
                    np.testing.assert_array_equal(out, expected, err_msg=act)
                    np.testing.assert_array_equal(mask, expected_mask, err_msg=act)
    finally:
        fn.set_num_threads(threads_before)


def test_p_zero_and_one():
    h, bias = exact_sum_inputs((10, 3), 1, np.float64, seed=8)
    np.testing.assert_allclose(fn.bias_act_dropout(h, bias, "sigmoid", 0.0, seed=1),
                               ref.sigmoid(h + bias), rtol=1e-15)
    assert not np.any(fn.bias_act_dropout(h, bias, "sigmoid", 1.0, seed=1))
    grad_h, grad_bias = fn.bias_act_dropout_backward(np.ones_like(h), h, bias, "sigmoid", 1.0,
                                                     seed=1)
    assert not np.any(grad_h) and not np.any(grad_bias)


def test_zero_size_and_in_place():
    h = np.zeros((0, 4), np.float32)
    assert fn.bias_act_dropout(h, np.ones(4, np.float32), "relu", 0.5, seed=1).shape == (0, 4)
    grad_h, grad_bias = fn.bias_act_dropout_backward(h, h, np.ones(4, np.float32), "relu", 0.5,
                                                     seed=1)
    assert grad_h.shape == (0, 4) and np.array_equal(grad_bias, np.zeros(4, np.float32))
    h, bias = exact_sum_inputs((20, 6), 1, np.float32, seed=9)
    expected = fn.bias_act_dropout(h, bias, "elu", 0.2, seed=4)
    assert fn.bias_act_dropout(h, bias, "elu", 0.2, seed=4, out=h) is h
    np.testing.assert_array_equal(h, expected)


def test_grad_bias_same_bits_for_every_thread_count_and_simd_path():
    rng = np.random.default_rng(10)
    cases = [(rng.standard_normal((3000, 100)).astype(np.float32), -1),
             (rng.standard_normal((40, 16, 30, 30)).astype(np.float32), 1),
             (rng.standard_normal((2001, 37)), -1)]
    threads_before, simd_before = fn.get_num_threads(), _cpu.simd()
    results = []
    try:
        for path in _cpu.available_simd():
            _cpu.set_simd(path)
            for threads in (1, 2, 5):
                fn.set_num_threads(threads)
                results.append([fn.bias_act_dropout_backward(
                    h, h, np.linspace(-1, 1, h.shape[axis], dtype=h.dtype), "gelu", 0.3,
                    seed=7, axis=axis) for h, axis in cases])
    finally:
        fn.set_num_threads(threads_before)
        _cpu.set_simd(simd_before)
    for other in results[1:]:
        for (gh0, gb0), (gh1, gb1) in zip(results[0], other):
            np.testing.assert_array_equal(gh0, gh1)
            np.testing.assert_array_equal(gb0, gb1)


@pytest.mark.parametrize("shape", [(2001, 37), (300, 4, 130), (50, 3, 64), (7, 5), (300, 1),
                                   (6, 70, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_bias_summed_during_the_pass_equals_the_separate_reduction(shape, dtype):
    # Along the last axis of contiguous arrays grad_bias is summed from
    # grad_h as it is produced; a strided bias takes the second pass over
    # grad_h. Both use the same row groups and orders.
    rng = np.random.default_rng(sum(shape))
    h = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[-1]).astype(dtype)
    spaced = np.zeros(2 * shape[-1], dtype)
    spaced[::2] = bias
    during = fn.bias_act_dropout_backward(g, h, bias, "silu", 0.4, seed=11, offset=3)
    separate = fn.bias_act_dropout_backward(g, h, spaced[::2], "silu", 0.4, seed=11, offset=3)
    for a, b in zip(during, separate):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    # Sums in double: within rounding of the exact sums.
    rows = during[0].astype(np.float64).reshape(-1, shape[-1])
    exact = np.array([math.fsum(column) for column in rows.T])
    bound = np.finfo(dtype).eps * np.abs(exact) + 64 * 2.0**-53 * np.abs(rows).sum(axis=0)
    assert np.all(np.abs(during[1] - exact) <= bound)


@pytest.mark.parametrize("act,params", [("tanh", {}), ("gelu", {}), ("silu", {}),
                                        ("softplus", {"beta": 1.5}), ("elu", {"alpha": 0.7}),
                                        ("mish", {}), ("sigmoid", {}), ("selu", {})])
def test_reference_gradients_match_finite_differences(act, params):
    rng = np.random.default_rng(11)
    h = rng.standard_normal((6, 4, 3))
    bias = rng.standard_normal(4)
    g = rng.standard_normal(h.shape)
    kw = dict(seed=3, offset=1, axis=1, **params)

    def loss(hh, bb):
        return np.sum(g * ref.bias_act_dropout(hh, bb, act, 0.3, **kw))

    grad_h, grad_bias = ref.bias_act_dropout_backward(g, h, bias, act, 0.3, **kw)
    step = 1e-6
    numeric_h = np.zeros_like(h)
    for idx in np.ndindex(h.shape):
        e = np.zeros_like(h)
        e[idx] = step
        numeric_h[idx] = (loss(h + e, bias) - loss(h - e, bias)) / (2 * step)
    numeric_bias = np.array([(loss(h, bias + step * np.eye(4)[c]) - loss(h, bias - step * np.eye(4)[c]))
                             / (2 * step) for c in range(4)])
    np.testing.assert_allclose(grad_h, numeric_h, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_bias, numeric_bias, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("target", ["fresh", "grad_output", "h", "overlapping"])
def test_backward_out(target):
    rng = np.random.default_rng(11)
    base = rng.standard_normal((7, 9)).astype(np.float32)
    bias = rng.standard_normal(9).astype(np.float32)
    h = base[:6].copy()
    g = rng.standard_normal((6, 9)).astype(np.float32)
    want_h, want_bias = fn.bias_act_dropout_backward(g, h, bias, "gelu", 0.3, seed=5)
    if target == "fresh":
        out = np.full(h.shape, np.nan, np.float32)
    elif target == "grad_output":
        out = g
    elif target == "h":
        out = h
    else:
        h = base[:6]
        out = base[1:]
    grad_h, grad_bias = fn.bias_act_dropout_backward(g, h, bias, "gelu", 0.3, seed=5, out=out)
    assert grad_h is out
    np.testing.assert_array_equal(grad_h, want_h)
    np.testing.assert_array_equal(grad_bias, want_bias)


def test_bad_backward_out_raises_and_writes_nothing():
    h = np.ones((4, 5), np.float32)
    bias = np.ones(5, np.float32)
    read_only = np.full((4, 5), 42.0, np.float32)
    read_only.flags.writeable = False
    strided = np.full((4, 5, 2), 42.0, np.float32)[..., 0]
    for out in (np.full((4, 6), 42.0, np.float32), np.full((4, 5), 42.0, np.float64),
                read_only, strided, [[0.0] * 5] * 4):
        with pytest.raises(ValueError):
            fn.bias_act_dropout_backward(h, h, bias, "relu", 0.5, seed=1, out=out)
        if isinstance(out, np.ndarray):
            assert np.all(out == 42.0)


# ---- bad input ----------------------------------------------------------------

def test_bad_bias_axis_and_activation():
    h = np.ones((4, 5), np.float32)
    out = np.full((4, 5), 42.0, np.float32)
    bad = [
        (dict(bias=np.ones(4, np.float32)), ValueError),  # wrong length for axis -1
        (dict(bias=np.ones((1, 5), np.float32)), ValueError),
        (dict(bias=np.ones(5, np.float64)), TypeError),
        (dict(bias=np.ones(5, np.float32), axis=2), ValueError),
        (dict(bias=np.ones(5, np.float32), axis=1.0), TypeError),
        (dict(bias=np.ones(5, np.float32), act="swish"), ValueError),
        (dict(bias=np.ones(5, np.float32), act="relu", alpha=1.0), TypeError),
        (dict(bias=np.ones(5, np.float32), p=2.0), ValueError),
        (dict(bias=np.ones(5, np.float32), seed=-3), ValueError),
    ]
    for changes, error in bad:
        kwargs = dict(bias=np.ones(5, np.float32), act="relu", p=0.5, seed=1)
        kwargs.update(changes)
        bias, act, p = kwargs.pop("bias"), kwargs.pop("act"), kwargs.pop("p")
        with pytest.raises(error):
            fn.bias_act_dropout(h, bias, act, p, out=out, **kwargs)
        backward_kwargs = {k: v for k, v in kwargs.items()}
        with pytest.raises(error):
            fn.bias_act_dropout_backward(h, h, bias, act, p, **backward_kwargs)
    assert np.all(out == 42.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        fn.bias_act_dropout(np.float32(1.0), np.ones(1, np.float32), "relu", 0.5, seed=1)
    with pytest.raises(ValueError, match="mask, or the seed"):
        fn.bias_act_dropout_backward(h, h, np.ones(5, np.float32), "relu", 0.5)
    with pytest.raises(ValueError, match="bytes"):
        fn.bias_act_dropout_backward(h, h, np.ones(5, np.float32), "relu", 0.5,
                                     mask=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        fn.bias_act_dropout_backward(np.ones((4, 6), np.float32), h, np.ones(5, np.float32),
                                     "relu", 0.5, seed=1)
