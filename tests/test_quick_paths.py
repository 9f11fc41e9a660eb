"""The compiled quick paths of batch_norm, batch_norm_backward and the
forward activations (csrc/bindings/quick_cpu.cpp): an ordinary call is
checked and run in one compiled call, everything else is declined (None,
nothing written) and takes the general Python path.

Checked here: the quick path is taken for ordinary calls and declined for
each kind of unusual one; where taken, its results (and the running
statistics it updates) have the general path's bits, on numpy arrays and
torch CPU tensors, over layouts, axes, dtypes and options; declined calls
write nothing.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu, activations, batchnorm

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _torch_registered():
    # The quick paths take torch tensors once the array layer has met one.
    fn.relu(torch.ones(2))


def _general(monkeypatch):
    """Makes every call take the general path."""
    monkeypatch.setattr(batchnorm, "_batch_norm_quick", lambda *args: None)
    monkeypatch.setattr(batchnorm, "_batch_norm_backward_quick", lambda *args: None)
    monkeypatch.setattr(activations, "_activation_quick", lambda *args: None)


def _numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else a


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    assert type(a) is type(b)
    a, b = _numpy(a), _numpy(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                                  np.ascontiguousarray(b).reshape(-1).view(np.uint8))


# (shape, axis, how x is laid out): C order, a channels-last view, a
# column slice (strided rows), a transposed view.
LAYOUTS = [((32, 64), 1, "c"), ((4, 3, 5, 6), 1, "c"), ((4, 3, 5, 6), 1, "channels_last"),
           ((6, 5, 7), -1, "c"), ((16, 24), 1, "sliced"), ((8, 5), 0, "c"),
           ((5, 7, 3), 1, "c")]


def _make_x(rng, shape, layout, dtype):
    if layout == "channels_last":
        n, c, h, w = shape
        return np.ascontiguousarray(
            rng.standard_normal((n, h, w, c)).astype(dtype)).transpose(0, 3, 1, 2)
    if layout == "sliced":
        return rng.standard_normal((shape[0], shape[1] * 2)).astype(dtype)[:, ::2]
    return rng.standard_normal(shape).astype(dtype) * 3 + 1


def _library(make, arrays):
    return [None if a is None else make(a) for a in arrays]


CASES = list(itertools.product(LAYOUTS, (np.float32, np.float64), (True, False),
                               ("numpy", "torch")))


@pytest.mark.parametrize("layout,dtype,training,library", CASES)
def test_batch_norm_forward_has_the_general_paths_bits(layout, dtype, training, library,
                                                       monkeypatch):
    shape, axis, kind = layout
    rng = np.random.default_rng(hash((shape, kind, training)) % 2**32)
    make = (lambda a: a) if library == "numpy" else torch.from_numpy
    for trial in range(4):
        x = _make_x(rng, shape, kind, dtype)
        channels = x.shape[axis]
        gamma = rng.standard_normal(channels).astype(dtype) if trial % 2 == 0 else None
        beta = rng.standard_normal(channels).astype(dtype) if trial < 2 else None
        stats_dtype = np.float64 if trial == 3 else dtype
        running = [rng.standard_normal(channels).astype(stats_dtype),
                   rng.random(channels).astype(stats_dtype) + 0.5]
        if training and trial == 2:
            running = [None, None]
        relu = "relu" if trial in (1, 3) else None
        with_out = trial >= 2
        results = []
        for quick in (True, False):
            arrays = [a if a is None else a.copy() for a in (x, gamma, beta, *running)]
            args = _library(make, arrays)
            out = make(np.full(x.shape, np.nan, dtype)) if with_out else None
            with monkeypatch.context() as patch:
                if quick:
                    taken = batchnorm._batch_norm_quick(
                        args[0], *args[1:], out, training, 0.1, 1e-5, axis, relu, False)
                    assert taken is not None, "an ordinary call was declined"
                    result = taken
                else:
                    _general(patch)
                    result = fn.batch_norm(*args, training=training, axis=axis,
                                           activation=relu, out=out)
            assert type(result) is fn.BatchNormResult
            if with_out:
                assert result.y is out
            results.append((result, args[3:]))
        (quick, quick_running), (general, general_running) = results
        for a, b in zip(quick, general):
            _same(a, b)
        for a, b in zip(quick_running, general_running):
            _same(a, b)


@pytest.mark.parametrize("layout,dtype,training,library", CASES)
def test_batch_norm_backward_has_the_general_paths_bits(layout, dtype, training, library,
                                                        monkeypatch):
    shape, axis, kind = layout
    rng = np.random.default_rng(hash((shape, kind, training, 1)) % 2**32)
    make = (lambda a: a) if library == "numpy" else torch.from_numpy
    for trial in range(4):
        x = _make_x(rng, shape, kind, dtype)
        grad = _make_x(rng, shape, kind if trial % 2 else "c", dtype)
        channels = x.shape[axis]
        gamma = rng.standard_normal(channels).astype(dtype) if trial != 1 else None
        mean = rng.standard_normal(channels).astype(np.float64 if trial == 3 else dtype)
        invstd = (rng.random(channels) + 0.5).astype(dtype)
        y = np.maximum(x, 0) if trial >= 2 else None
        results = []
        for quick in (True, False):
            args = _library(make, (grad, x, gamma, mean, invstd))
            relu_output = None if y is None else make(y)
            out = make(np.full(x.shape, np.nan, dtype)) if trial % 2 else None
            relu = None if y is None else "relu"
            with monkeypatch.context() as patch:
                if quick:
                    result = batchnorm._batch_norm_backward_quick(
                        *args, axis, training, relu, relu_output, out, False)
                    assert result is not None, "an ordinary call was declined"
                else:
                    _general(patch)
                    result = fn.batch_norm_backward(*args, axis=axis, training=training,
                                                    activation=relu, y=relu_output, out=out)
            if out is not None:
                assert result[0] is out
            results.append(result)
        for a, b in zip(*results):
            _same(a, b)


@pytest.mark.parametrize("layout,dtype,training,library", CASES)
def test_batch_norm_backward_over_grad_output(layout, dtype, training, library, monkeypatch):
    """out=grad_output (the very same view) is taken, writes over the
    gradient the bits the general path writes into a new array, and returns
    it; an out that overlaps the gradient otherwise is declined with nothing
    written."""
    shape, axis, kind = layout
    rng = np.random.default_rng(hash((shape, kind, training, 2)) % 2**32)
    make = (lambda a: a) if library == "numpy" else torch.from_numpy
    x = _make_x(rng, shape, kind, dtype)
    channels = x.shape[axis]
    gamma = rng.standard_normal(channels).astype(dtype)
    mean = rng.standard_normal(channels).astype(dtype)
    invstd = (rng.random(channels) + 0.5).astype(dtype)
    for relu in (None, "relu"):
        grad = rng.standard_normal(shape).astype(dtype)
        y = None if relu is None else np.maximum(x, 0)
        with monkeypatch.context() as patch:
            _general(patch)
            expected = fn.batch_norm_backward(make(grad.copy()), make(x), make(gamma), make(mean),
                                              make(invstd), axis=axis, training=training,
                                              activation=relu, y=None if y is None else make(y))
        written = make(grad.copy())
        result = batchnorm._batch_norm_backward_quick(
            written, make(x), make(gamma), make(mean), make(invstd), axis, training, relu,
            None if y is None else make(y), written, False)
        assert result is not None, "the in-place call was declined"
        assert result[0] is written
        for a, b in zip(result, expected):
            _same(a, b)
        # Overlapping, both C-contiguous, one element apart: declined.
        base = make(np.concatenate([grad.reshape(-1), np.zeros(1, dtype)]))
        before = _numpy(base).copy()
        shifted_in, shifted_out = base[:-1].reshape(shape), base[1:].reshape(shape)
        assert batchnorm._batch_norm_backward_quick(
            shifted_in, make(x), make(gamma), make(mean), make(invstd), axis, training, relu,
            None if y is None else make(y), shifted_out, False) is None
        _same(base, make(before))


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "leaky_relu", "softplus"])
def test_activation_has_the_general_paths_bits(name, library, monkeypatch):
    rng = np.random.default_rng(7)
    make = (lambda a: a) if library == "numpy" else torch.from_numpy
    params = {"leaky_relu": {"negative_slope": 0.2}, "softplus": {"beta": 2.0}}.get(name, {})
    kernel_params = activations._kernel_params(name, params, name)
    for dtype in (np.float32, np.float64):
        base = rng.standard_normal((9, 7)).astype(dtype) * 4
        for form in ("new", "out", "in place", "strided x", "0-d"):
            x = base[:, ::2] if form == "strided x" else np.array(base[0, 0]) \
                if form == "0-d" else base
            results = []
            for quick in (True, False):
                xs = make(x.copy() if form != "strided x" else base.copy()[:, ::2])
                out = None
                if form == "out":
                    out = make(np.empty(np.shape(x), dtype))
                elif form == "in place":
                    out = xs
                with monkeypatch.context() as patch:
                    if quick:
                        result = activations._activation_quick(activations._IDS[name], xs, out,
                                                               kernel_params)
                        assert result is not None, "an ordinary call was declined"
                    else:
                        _general(patch)
                        result = fn.activation(name, xs, out=out, **params)
                if out is not None:
                    assert result is out
                results.append(result)
            _same(*results)


class _Subclass(np.ndarray):
    pass


def test_declined_calls():
    """Each unusual kind of call is declined (the general path handles or
    refuses it), and the ordinary call it differs from is not."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    running = np.zeros(4, np.float32), np.ones(4, np.float32)
    out = np.empty_like(x)
    ordinary = dict(x=x, gamma=gamma, beta=beta, running_mean=running[0],
                    running_var=running[1], out=out, training=True, momentum=0.1, eps=1e-5,
                    axis=1, activation=None, channels_last=False)

    def quick(**changes):
        call = {**ordinary, **changes}
        return batchnorm._batch_norm_quick(*call.values())

    assert quick() is not None
    read_only = running[0].copy()
    read_only.flags.writeable = False
    wide = np.zeros((8, 8), np.float32)
    for changes in (
            dict(x=x.astype(np.float16), out=None, gamma=None, beta=None),  # half types
            dict(x=x.astype(">f4"), out=None),                              # byte order
            dict(x=x[:0], out=None),                                        # empty
            dict(x=np.float32(1.0), out=None),                              # not an array
            dict(x=x.T, out=None),                                          # channels
            dict(gamma=gamma.astype(np.float64)),                           # dtype
            dict(gamma=np.ones(5, np.float32)),                             # shape
            dict(running_mean=read_only),                                   # read-only
            dict(running_mean=np.lib.stride_tricks.as_strided(running[0], strides=(0,))),
            dict(running_mean=out[0]),                                      # meets out
            dict(out=x),                                                    # out is x
            dict(out=wide[:, ::2]),                                         # not contiguous
            dict(out=np.empty((8, 4), np.float64)),                         # dtype
            dict(training=1), dict(momentum=1), dict(momentum=1.5), dict(eps=0.0),
            dict(eps=float("inf")), dict(axis=True), dict(axis=2), dict(axis=1.0),
            dict(activation="gelu"), dict(training=False, running_var=None),
            dict(x=x[:1], out=None),                                        # one value
            dict(x=x.view(_Subclass), out=None),                            # subclass
            dict(gamma=torch.ones(4)),                                      # mixed
            dict(x=torch.from_numpy(x).to(torch.bfloat16), out=None, gamma=None,
                 beta=None, running_mean=None, running_var=None),
            dict(x=torch.from_numpy(x)._neg_view(), out=None, gamma=None, beta=None,
                 running_mean=None, running_var=None),
    ):
        assert quick(**changes) is None, changes
    # A 4-d x whose batch and spatial dimensions do not merge.
    x4 = rng.standard_normal((4, 3, 5, 6)).astype(np.float32).transpose(2, 1, 0, 3)
    assert quick(x=x4, out=None, gamma=None, beta=None, running_mean=None,
                 running_var=None) is None

    f = activations._activation_quick
    params = activations._DEFAULT_KERNEL_PARAMS["relu"]
    relu = activations._IDS["relu"]
    assert f(relu, x, out, params) is out
    assert f(relu, x, None, params) is not None
    for args in ((relu, x, x[::-1], params), (relu, x, wide[:, ::2], params),
                 (relu, x.astype(np.float16), None, params), (relu, x, None, (0, 0.0, False)),
                 (relu, x, None, (0.0, 0.0, 1)), (99, x, None, params), (-1, x, None, params),
                 (relu, [1.0], None, params), (relu, x[:0], None, params)):
        assert f(*args) is None


def test_declined_calls_write_nothing():
    """Bad input still raises the general path's errors with out and the
    running statistics untouched."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    out = np.full_like(x, 7.0)
    running_mean, running_var = np.full(4, 3.0, np.float32), np.full(4, 5.0, np.float32)
    with pytest.raises(ValueError, match="gamma has shape"):
        fn.batch_norm(x, np.ones(5, np.float32), None, running_mean, running_var, out=out)
    with pytest.raises(ValueError, match="momentum must be in"):
        fn.batch_norm(x, None, None, running_mean, running_var, momentum=1.5, out=out)
    with pytest.raises(ValueError, match="shares memory"):
        fn.batch_norm(x, None, None, out[0], running_var, out=out)
    assert (out == 7.0).all() and (running_mean == 3.0).all() and (running_var == 5.0).all()
    with pytest.raises(ValueError, match="out has shape"):
        fn.relu(x, out=out[:2])
    assert (out == 7.0).all()


def test_torch_results_are_tensors_over_fresh_memory():
    x = torch.randn(16, 8)
    weight = torch.nn.Parameter(torch.ones(8))
    bias = torch.nn.Parameter(torch.zeros(8))
    result = fn.batch_norm(x, weight, bias)
    for t in result:
        assert type(t) is torch.Tensor and not t.requires_grad
    assert result.save_mean.data_ptr() != result.save_invstd.data_ptr()
    y = fn.relu(x)
    assert type(y) is torch.Tensor and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)
    assert _cpu.activation_quick(activations._IDS["relu"], x, None,
                                 activations._DEFAULT_KERNEL_PARAMS["relu"]) is not None


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (2, 5, 3, 4, 2)])
def test_operators_read_channels_last_tensors_as_the_moved_views(shape, relu, monkeypatch):
    """fusednn.torch's batch-norm kernels hand a channels_last x to the
    quick paths, which read it with the channels last: the bits of the
    general path's movedim views, and the quick paths are taken."""
    from fusednn.torch import ops

    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=layout)
    grad = torch.randn(shape, generator=generator).contiguous(memory_format=layout)
    channels = shape[1]
    weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels)
    results = []
    for quick in (True, False):
        running = [torch.zeros(channels), torch.ones(channels)]
        with monkeypatch.context() as patch:
            if quick:
                taken = []
                for name in ("_batch_norm_quick", "_batch_norm_backward_quick"):
                    def record(*args, _run=getattr(ops, name)):
                        result = _run(*args)
                        taken.append(result is not None)
                        return result
                    patch.setattr(ops, name, record)
            else:
                patch.setattr(ops, "_batch_norm_quick", lambda *args: None)
                patch.setattr(ops, "_batch_norm_backward_quick", lambda *args: None)
            y, mean, invstd = ops._batch_norm_kernel(x, weight, bias, *running, True, 0.1, 1e-5,
                                                     1, relu)
            grads = ops._batch_norm_backward_kernel(grad, x, weight, mean, invstd, True, 1,
                                                    y if relu else None)
        if quick:
            assert taken == [True, True]
        assert y.is_contiguous(memory_format=layout) and grads[0].shape == x.shape
        results.append((y, mean, invstd, *running, *grads))
    for a, b in zip(*results):
        _same(a, b)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("name,which", [("relu", "y"), ("gelu", "x"), ("elu", "y"),
                                        ("softplus", "x"), ("tanh", "y")])
def test_activation_backward_has_the_general_paths_bits(name, which, library, monkeypatch):
    rng = np.random.default_rng(11)
    make = (lambda a: a) if library == "numpy" else torch.from_numpy
    params = {"elu": {"alpha": 0.5}, "softplus": {"threshold": 2.0}}.get(name, {})
    kernel_params = activations._kernel_params(name, params, name)
    for dtype in (np.float32, np.float64):
        base_x = rng.standard_normal((6, 10)).astype(dtype) * 3
        base_g = rng.standard_normal((6, 10)).astype(dtype)
        saved = base_x if which == "x" else fn.activation(name, base_x, **params)
        for form in ("new", "out", "out is grad", "out is saved", "strided grad"):
            results = []
            for quick in (True, False):
                g = make(base_g.copy()[:, ::2] if form == "strided grad" else base_g.copy())
                s = make(saved.copy()[:, ::2] if form == "strided grad" else saved.copy())
                out = {"out": make(np.empty(np.shape(g), dtype)), "out is grad": g,
                       "out is saved": s}.get(form)
                with monkeypatch.context() as patch:
                    if quick:
                        result = activations._activation_backward_quick(
                            activations._IDS[name], which == "y", g, s, out, kernel_params)
                        assert result is not None, "an ordinary call was declined"
                    else:
                        _general(patch)
                        result = fn.activation_backward(name, g, out=out, **{which: s},
                                                        **params)
                if out is not None:
                    assert result is out
                results.append(result)
            _same(*results)


def test_activation_backward_declines():
    rng = np.random.default_rng(12)
    g, x = (rng.standard_normal((8, 4)).astype(np.float32) for _ in range(2))
    f = activations._activation_backward_quick
    relu = activations._IDS["relu"]
    params = activations._DEFAULT_KERNEL_PARAMS["relu"]
    wide = np.zeros((8, 8), np.float32)
    assert f(relu, True, g, x, None, params) is not None
    for args in ((relu, 1, g, x, None, params),                   # from_output not a bool
                 (relu, True, g, x[:4], None, params),             # shapes differ
                 (relu, True, g, x.astype(np.float64), None, params),
                 (relu, True, g, torch.from_numpy(x), None, params),  # mixed libraries
                 (relu, True, g, x, g[::-1], params),              # out overlaps g
                 (relu, True, g, x, wide[:, ::2], params),         # out strided
                 (relu, True, g, x, np.empty((8, 4), np.float64), params),
                 (relu, True, g.astype(np.float16), x.astype(np.float16), None, params)):
        assert f(*args) is None
    out = np.full_like(g, 7.0)
    with pytest.raises(ValueError, match="same shape"):
        fn.activation_backward("relu", g, y=x[:4], out=out)
    assert (out == 7.0).all()
