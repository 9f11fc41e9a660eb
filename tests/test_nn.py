"""fusednn.nn: every layer's backward against central finite differences in
float64 (relative error <= 1e-6 over the whole gradient), train/eval
behaviour, the loss, the optimizers (against PyTorch's when installed),
penalties, pruning, early stopping, snapshots and bad input.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import fusednn as fn
from fusednn import nn
from conftest import numeric_gradient

FD_TOLERANCE = 1e-6


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def check_gradients(layer, x: np.ndarray, seed=0):
    """Checks layer.backward for the loss sum(layer(x) * weights) against
    finite differences, for x and every parameter."""
    weights = np.random.default_rng(seed).standard_normal(layer.forward(x).shape)

    def loss():
        return float((layer.forward(x) * weights).sum())

    layer.forward(x)
    grad_x = layer.backward(weights.copy())
    analytic = {"x": grad_x, **{p.name: p.grad.copy() for p in layer.parameters()}}
    numeric = {"x": numeric_gradient(loss, x)}
    for p in layer.parameters():
        numeric[p.name] = numeric_gradient(loss, p.value)
    for name in analytic:
        error = relative_error(analytic[name], numeric[name])
        assert error <= FD_TOLERANCE, f"{layer!r}: d/d{name} relative error {error:.3g}"


def normals(*shape, seed=1, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


# ---- finite differences ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(bias):
    layer = nn.Dense(5, 3, seed=0, bias=bias, bias_init=0.3, dtype="float64")
    check_gradients(layer, normals(7, 5))


@pytest.mark.parametrize("name", fn.ACTIVATIONS)
def test_activation_gradients(name):
    # Values in [0.2, 2.5] of either sign stay clear of every kink
    # (0 and +-1 for hardtanh, +-3 for the hard ones) by more than the step.
    magnitudes = np.random.default_rng(2).uniform(0.2, 2.5, (4, 6))
    x = magnitudes * np.where(np.arange(24).reshape(4, 6) % 2, 1.0, -1.0)
    x[np.abs(np.abs(x) - 1.0) < 0.05] += 0.1
    check_gradients(nn.Activation(name), x)


def test_activation_with_parameters_gradients():
    check_gradients(nn.Activation("softplus", beta=2.0, threshold=5.0), normals(3, 8))
    check_gradients(nn.Activation("elu", alpha=0.5), normals(3, 8))


@pytest.mark.parametrize("shape,axis", [((8, 4), 1), ((4, 3, 5), 1), ((3, 2, 3, 4), 1),
                                        ((6, 5), -1), ((2, 3, 4), -1)])
def test_batchnorm_training_gradients(shape, axis):
    layer = nn.BatchNorm(shape[axis], axis=axis, dtype="float64")
    layer.gamma.value[...] = np.linspace(0.5, 1.5, shape[axis])
    layer.beta.value[...] = np.linspace(-1, 1, shape[axis])
    check_gradients(layer, normals(*shape, scale=2.0) + 3.0)


def test_batchnorm_without_affine_gradients():
    layer = nn.BatchNorm(4, affine=False, dtype="float64")
    assert layer.parameters() == []
    check_gradients(layer, normals(6, 4))


def test_batchnorm_eval_gradients():
    layer = nn.BatchNorm(4, dtype="float64")
    layer.forward(normals(10, 4, scale=3.0) + 1.0)   # moves the running statistics
    layer.gamma.value[...] = [0.5, 1.0, 1.5, 2.0]
    layer.eval()
    check_gradients(layer, normals(6, 4))


def test_sequential_gradients():
    model = nn.Sequential(
        nn.Dense(6, 8, init="he_normal", seed=0, dtype="float64"),
        nn.BatchNorm(8, dtype="float64"), nn.Activation("tanh"),
        nn.Dense(8, 5, init="glorot_normal", seed=1, dtype="float64"),
        nn.Activation("gelu"), nn.Dense(5, 3, seed=2, dtype="float64"))
    check_gradients(model, normals(9, 6))


def test_softmax_cross_entropy_gradient():
    logits = normals(6, 4, scale=3.0)
    labels = np.array([0, 3, 1, 1, 2, 0])
    _, grad = nn.softmax_cross_entropy(logits, labels)
    numeric = numeric_gradient(lambda: nn.softmax_cross_entropy(logits, labels)[0], logits)
    assert relative_error(grad, numeric) <= FD_TOLERANCE


def test_dropout_gradient():
    """Dropout is linear once its mask is drawn: the backward of the forward
    at stream k matches finite differences of fn.dropout at stream k."""
    layer = nn.Dropout(0.3, seed=17, offset=5)
    x = normals(6, 7)
    weights = normals(6, 7, seed=2)
    layer.forward(x)
    layer.forward(x)                      # the backward below is of this call, stream 6
    grad = layer.backward(weights.copy())
    numeric = numeric_gradient(
        lambda: float((fn.dropout(x, 0.3, seed=17, offset=6) * weights).sum()), x)
    assert relative_error(grad, numeric) <= FD_TOLERANCE


# ---- dropout ---------------------------------------------------------------------------


def test_dropout_streams_advance_and_reproduce():
    x = np.ones((50, 40), np.float32)
    layer, twin = nn.Dropout(0.25, seed=3, offset=10), nn.Dropout(0.25, seed=3, offset=10)
    outputs = [layer(x) for _ in range(3)]
    assert layer.offset == 13
    for k, y in enumerate(outputs):
        assert np.array_equal(y, fn.dropout(x, 0.25, seed=3, offset=10 + k))
        assert np.array_equal(y, twin(x))
    assert not np.array_equal(outputs[0], outputs[1])
    assert abs((outputs[0] == 0).mean() - 0.25) < 0.03
    assert set(np.unique(outputs[0])) == {0.0, np.float32(1 / 0.75)}


def test_dropout_eval_is_identity():
    layer = nn.Dropout(0.5, seed=0)
    x = normals(4, 4)
    layer.eval()
    assert layer(x) is x and layer.offset == 0
    g = normals(4, 4, seed=3)
    assert layer.backward(g) is g


def test_dropout_seed_none_draws_one():
    assert nn.Dropout(0.1).seed != nn.Dropout(0.1).seed


# ---- other layers ----------------------------------------------------------------------


def test_dense_forward_is_affine_map_in_pytorch_layout():
    layer = nn.Dense(3, 2, seed=0, bias_init=0.5, dtype="float64")
    assert layer.weight.value.shape == (2, 3) and layer.weight.is_weight
    x = normals(4, 3)
    np.testing.assert_allclose(layer(x), x @ layer.weight.value.T + 0.5, rtol=1e-15)
    assert layer(x.astype(np.float64)).dtype == np.float64


@pytest.mark.parametrize("init", fn.init.INITIALIZERS)
def test_dense_uses_named_initializer(init):
    layer = nn.Dense(40, 30, init=init, seed=4)
    assert np.array_equal(layer.weight.value, getattr(fn.init, init)((30, 40), seed=4))
    assert layer.weight.value.dtype == np.float32


def test_dense_accepts_callable_initializer():
    def small(shape, *, seed, dtype, device):
        return fn.init.normal(shape, 0.0, 0.01, seed=seed, dtype=dtype, device=device)
    layer = nn.Dense(10, 20, init=small, seed=0)
    assert layer.weight.value.std() < 0.02


def test_activation_matches_kernel():
    x = normals(5, 5).astype(np.float32)
    y = nn.Activation("leaky_relu", negative_slope=0.2)(x)
    assert np.array_equal(y, fn.leaky_relu(x, 0.2))


def test_batchnorm_train_and_eval():
    layer = nn.BatchNorm(3, momentum=0.5, dtype="float64")
    x = normals(50, 3, scale=2.0) + 4.0
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, 0.5 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.5 + 0.5 * x.var(axis=0, ddof=1), rtol=1e-12)
    layer.eval()
    running_mean = layer.running_mean.copy()
    y_eval = layer(x)
    assert np.array_equal(layer.running_mean, running_mean)
    np.testing.assert_allclose(
        y_eval, (x - running_mean) / np.sqrt(layer.running_var + layer.eps), rtol=1e-12)


def test_sequential_train_eval_propagates():
    model = nn.Sequential(nn.Dense(2, 2), nn.Sequential(nn.BatchNorm(2), nn.Activation("relu")))
    model.eval()
    assert not model.training and not model[1][0].training
    model.train()
    assert all(layer.training for layer in (model, model[0], model[1], model[1][0]))


def test_state_snapshot_round_trip():
    model = nn.Sequential(nn.Dense(3, 4, seed=0), nn.BatchNorm(4), nn.Dense(4, 2, seed=1))
    model(normals(8, 3).astype(np.float32))
    snapshot = model.state()
    assert set(snapshot) == {"0.weight", "0.bias", "1.gamma", "1.beta", "1.running_mean",
                             "1.running_var", "2.weight", "2.bias"}
    before = {name: a.copy() for name, a in snapshot.items()}
    for p in model.parameters():
        p.value += 1.0
    model[1].running_mean += 1.0
    model.load_state(snapshot)
    for name, a in model.state().items():
        assert np.array_equal(a, before[name]), name


def test_load_state_checks_before_writing():
    model = nn.Sequential(nn.Dense(3, 4, seed=0), nn.Dense(4, 2, seed=1))
    state = model.state()
    weight = model[0].weight.value.copy()
    bad = dict(state, **{"0.weight": state["0.weight"] + 1, "1.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="1.bias"):
        model.load_state(bad)
    assert np.array_equal(model[0].weight.value, weight)
    with pytest.raises(ValueError, match="missing"):
        model.load_state({"0.weight": state["0.weight"]})


# ---- loss ------------------------------------------------------------------------------


def test_softmax_cross_entropy_value():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    loss, _ = nn.softmax_cross_entropy(logits, np.array([2, 1]))
    expected = (-math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
                + math.log(3)) / 2
    assert loss == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_is_stable(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-5e3, 5e3, 5e3 - 1.0]], dtype=dtype)
    loss, grad = nn.softmax_cross_entropy(logits, np.array([1, 2]))
    assert math.isfinite(loss) and np.isfinite(grad).all()
    expected = (1e4 + (1.0 + math.log1p(math.exp(-1.0)))) / 2
    assert loss == pytest.approx(expected, rel=1e-6)
    assert grad.dtype == dtype
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-7)


def test_accuracy_and_softmax():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
    assert nn.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    np.testing.assert_allclose(nn.softmax(logits).sum(axis=1), 1.0, rtol=1e-15)


@pytest.mark.parametrize("labels,error,match", [
    (np.array([0, 3]), ValueError, r"\[0, 3\)"),
    (np.array([0, -1]), ValueError, "lie in"),
    (np.array([0.0, 1.0]), TypeError, "integer"),
    (np.array([0, 1, 2]), ValueError, "shape"),
])
def test_loss_rejects_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        nn.softmax_cross_entropy(np.zeros((2, 3)), labels)


# ---- optimizers and penalties ----------------------------------------------------------


def _torch_run(torch_optimizer, ours, steps=5, **kwargs):
    torch = pytest.importorskip("torch")
    start = normals(4, 3, seed=5)
    grads = [normals(4, 3, seed=10 + i) for i in range(steps)]
    p = nn.Parameter(start.copy(), "w", is_weight=True)
    optimizer = ours([p], **kwargs)
    t = torch.nn.Parameter(torch.tensor(start))
    reference = torch_optimizer(torch, t)
    for g in grads:
        p.grad[...] = g
        optimizer.step()
        t.grad = torch.tensor(g)
        reference.step()
    np.testing.assert_allclose(p.value, t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_momentum_matches_pytorch():
    _torch_run(lambda torch, t: torch.optim.SGD([t], lr=0.1, momentum=0.9, weight_decay=0.01),
               nn.SGD, lr=0.1, momentum=0.9, l2=0.01)


def test_adam_matches_pytorch():
    _torch_run(lambda torch, t: torch.optim.Adam([t], lr=0.01, betas=(0.8, 0.99), eps=1e-7,
                                                  weight_decay=0.05),
               nn.Adam, lr=0.01, betas=(0.8, 0.99), eps=1e-7, l2=0.05)


def test_sgd_plain_step_and_l1():
    w = nn.Parameter(np.array([1.0, -2.0, 0.0]), "w", is_weight=True)
    b = nn.Parameter(np.array([1.0, -2.0]), "b")
    w.grad[...] = [0.5, 0.5, 0.5]
    b.grad[...] = [0.5, 0.5]
    nn.SGD([w, b], lr=0.1, l1=0.2).step()
    np.testing.assert_allclose(w.value, [1.0 - 0.1 * 0.7, -2.0 - 0.1 * 0.3, -0.05])
    np.testing.assert_allclose(b.value, [0.95, -2.05])   # biases carry no penalty


def test_penalty_value():
    model = nn.Sequential(nn.Dense(2, 2, seed=0, dtype="float64"))
    model[0].weight.value[...] = [[1.0, -2.0], [0.5, 0.0]]
    model[0].bias.value[...] = 10.0
    assert nn.penalty(model, l1=0.1, l2=0.2) == pytest.approx(0.1 * 3.5 + 0.1 * 5.25)


def test_training_reduces_loss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    labels = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    model = nn.Sequential(nn.Dense(4, 16, init="he_normal", seed=0, dtype="float64"),
                          nn.BatchNorm(16, dtype="float64"), nn.Activation("relu"),
                          nn.Dense(16, 2, seed=1, dtype="float64"))
    optimizer = nn.SGD(model.parameters(), lr=0.5, momentum=0.9)
    first, _ = nn.softmax_cross_entropy(model(x), labels)
    for _ in range(50):
        loss, grad = nn.softmax_cross_entropy(model(x), labels)
        model.backward(grad)
        optimizer.step()
    assert loss < 0.2 * first
    assert nn.accuracy(model.eval()(x), labels) > 0.95


# ---- pruning and early stopping --------------------------------------------------------


def test_prune_layer_scope_zeros_smallest_and_keeps_them_zero():
    model = nn.Sequential(nn.Dense(10, 20, seed=0), nn.Dense(20, 5, seed=1))
    magnitudes = [np.abs(layer.weight.value).copy() for layer in model]
    assert nn.prune_by_magnitude(model, 0.75) == pytest.approx(0.75)
    for layer, before in zip(model, magnitudes):
        w = layer.weight.value
        zero = w == 0
        assert zero.sum() == round(0.75 * w.size)
        assert before[zero].max() <= before[~zero].min()
        assert np.array_equal(layer.weight.mask, (~zero).astype(np.float32))
        assert (layer.bias.value == 0).all() and layer.bias.mask is None
    optimizer = nn.Adam(model.parameters(), lr=0.1)
    for layer in model:
        layer.weight.grad[...] = 1.0
    optimizer.step()
    assert nn.sparsity(model) == pytest.approx(0.75)


def test_prune_global_scope_ranks_all_weights_together():
    small, large = nn.Dense(4, 4, seed=0), nn.Dense(4, 4, seed=1)
    small.weight.value *= 1e-3
    nn.prune_by_magnitude(nn.Sequential(small, large), 0.5, scope="global")
    assert (small.weight.value == 0).all() and (large.weight.value != 0).all()


def test_prune_more_keeps_earlier_zeros():
    layer = nn.Dense(8, 8, seed=0)
    nn.prune_by_magnitude([layer.weight], 0.25)
    first = layer.weight.value == 0
    nn.prune_by_magnitude([layer.weight], 0.5)
    assert (layer.weight.value[first] == 0).all() and nn.sparsity([layer.weight]) == 0.5


@pytest.mark.parametrize("kwargs,error", [({"fraction": 1.5}, ValueError),
                                          ({"fraction": 0.5, "scope": "net"}, ValueError)])
def test_prune_bad_arguments(kwargs, error):
    with pytest.raises(error):
        nn.prune_by_magnitude(nn.Dense(2, 2), **kwargs)


def test_early_stopping_counts_patience_and_restores_best():
    model = nn.Sequential(nn.Dense(2, 2, seed=0))
    stopper = nn.EarlyStopping(patience=2, min_delta=0.01)
    decisions = []
    for metric in [0.5, 0.7, 0.705, 0.69]:
        if metric == 0.7:
            best_weight = model[0].weight.value.copy()
        decisions.append(stopper.update(metric, model))
        model[0].weight.value += 1.0
    assert decisions == [False, False, False, True]
    assert stopper.best == 0.7 and stopper.best_check == 1
    stopper.restore(model)
    assert np.array_equal(model[0].weight.value, best_weight)


def test_early_stopping_min_mode():
    stopper = nn.EarlyStopping(patience=1, mode="min")
    model = nn.Dense(1, 1)
    assert not stopper.update(1.0, model) and not stopper.update(0.5, model)
    assert stopper.update(0.6, model)


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("build,error,match", [
    (lambda: nn.Activation("swish"), ValueError, "unknown activation"),
    (lambda: nn.Activation("relu", alpha=1.0), TypeError, "unexpected parameter"),
    (lambda: nn.Activation("gelu", approximate="fast"), ValueError, "approximate"),
    (lambda: nn.Dense(4, 0), ValueError, "out_features"),
    (lambda: nn.Dense(4, 2, init="xavier"), ValueError, "unknown init"),
    (lambda: nn.Dense(4, 2, dtype="int32"), TypeError, "dtype"),
    (lambda: nn.Dense(4, 2, device="tpu"), ValueError, "device"),
    (lambda: nn.BatchNorm(4, momentum=1.5), ValueError, "momentum"),
    (lambda: nn.BatchNorm(4, eps=0.0), ValueError, "eps"),
    (lambda: nn.Sequential(nn.Dense(4, 8), nn.Dense(9, 2)), ValueError, "takes 9 features"),
    (lambda: nn.Sequential(nn.Dense(4, 8), nn.Activation("relu"), nn.BatchNorm(7)),
     ValueError, "normalizes 7"),
    (lambda: nn.Sequential(nn.Dense(4, 8), nn.BatchNorm(8, axis=0)), ValueError, "axis"),
    (lambda: nn.Sequential(nn.Dense(4, 8), "relu"), TypeError, "not a fusednn.nn layer"),
    (lambda: nn.Sequential(nn.Dense(2, 2, dtype="float64"), nn.Dense(2, 2)), TypeError,
     "mixed dtypes"),
    (lambda: nn.SGD([], lr=0.1), ValueError, "no parameters"),
    (lambda: nn.SGD(nn.Dense(2, 2), lr=0.0), ValueError, "lr"),
    (lambda: nn.Adam(nn.Dense(2, 2), betas=(0.9, 1.0)), ValueError, "betas"),
    (lambda: nn.EarlyStopping(patience=0), ValueError, "patience"),
    (lambda: nn.Dropout(1.5), ValueError, "p must be"),
    (lambda: nn.Dropout(0.5, seed=-1), ValueError, "seed"),
    (lambda: nn.Dropout(0.5, seed=1.5), TypeError, "seed"),
    (lambda: nn.Dropout(0.5, seed=0, offset=2 ** 64), ValueError, "offset"),
])
def test_bad_options_raise_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_repeated_layer_is_rejected():
    act = nn.Activation("relu")
    with pytest.raises(ValueError, match="twice"):
        nn.Sequential(nn.Dense(2, 2), act, act)


def test_first_call_checks_shape_and_dtype():
    model = nn.Sequential(nn.Dense(4, 3), nn.Activation("relu"))
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        model(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="dtype float64"):
        model(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="numpy or CuPy array"):
        model([[0.0] * 4])
    with pytest.raises(ValueError, match="channels"):
        nn.BatchNorm(3)(np.zeros((4, 2), np.float32))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Dense(2, 2).backward(np.zeros((1, 2), np.float32))


class _FakeCupyArray:
    """Stands in for a CuPy array: fusednn recognises CuPy by the module of
    an array's type."""
    __module__ = "cupy._core.core"
    dtype = np.dtype(np.float32)
    shape = (2, 4)
    ndim = 2


def test_mixed_devices_are_rejected_on_first_call():
    with pytest.raises(TypeError, match="CuPy array but the layer's parameters are numpy"):
        nn.Dense(4, 3)(_FakeCupyArray())
    labels = _FakeCupyArray()
    with pytest.raises(TypeError, match="one device"):
        nn.softmax_cross_entropy(np.zeros((2, 4), np.float32), labels)


def test_mixed_device_model_is_rejected_at_construction():
    gpu_layer = nn.Dense(4, 4)
    gpu_layer.weight.value = _FakeCupyArray()
    with pytest.raises(TypeError, match="mixed devices"):
        nn.Sequential(nn.Dense(2, 4), gpu_layer)


def test_cuda_layers_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match="CuPy"):
            nn.BatchNorm(4, device=device)
        with pytest.raises(RuntimeError, match="CuPy"):
            nn.Dense(4, 2, device=device)


def _cpu_devices():
    """Every CPU spelling of device= the initializers take, by name."""
    devices = {"numpy array": np.zeros(3, np.float32)}
    try:
        import torch
    except ImportError:
        pass
    else:
        devices["torch.device"] = torch.device("cpu")
        devices["torch tensor"] = torch.zeros(3)
    try:
        import jax.numpy as jnp
    except ImportError:
        pass
    else:
        devices["JAX array"] = jnp.zeros(3)
    return devices


@pytest.mark.parametrize("name", sorted(_cpu_devices()))
def test_layers_take_every_cpu_device_spelling(name):
    """A layer built with a torch.device or beside an array of any library
    on the CPU holds the numpy arrays of device='cpu', value for value, and
    trains the same."""
    device = _cpu_devices()[name]
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    models = [nn.Sequential(nn.Dense(4, 6, init="he_normal", seed=3, device=d),
                            nn.BatchNorm(6, device=d), nn.Activation("relu"),
                            nn.Dense(6, 2, seed=4, device=d))
              for d in ("cpu", device)]
    for reference, model in zip(*(m.parameters() for m in models)):
        assert type(model.value) is np.ndarray
        np.testing.assert_array_equal(model.value, reference.value)
    outputs = [m(x) for m in models]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    bn = models[1].layers[1]
    assert type(bn.running_mean) is np.ndarray and type(bn.running_var) is np.ndarray


@pytest.mark.parametrize("device,error", [("gpu", ValueError), ("cuda:x", ValueError),
                                          (0, TypeError), (None, TypeError)])
def test_layers_refuse_what_the_initializers_refuse(device, error):
    for build in (lambda: nn.Dense(4, 2, device=device),
                  lambda: nn.BatchNorm(4, device=device)):
        with pytest.raises(error, match="device"):
            build()


def test_layers_refuse_a_torch_device_that_is_neither_cpu_nor_cuda():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch device meta"):
        nn.Dense(4, 2, device=torch.device("meta"))


# ---- Dense's init options ----------------------------------------------------------------


def test_dense_passes_init_params():
    layer = nn.Dense(40, 30, init="he_normal", init_params={"a": 0.1, "mode": "fan_out"}, seed=4)
    assert np.array_equal(layer.weight.value,
                          fn.init.he_normal((30, 40), a=0.1, mode="fan_out", seed=4))
    gain = fn.init.calculate_gain("tanh")
    layer = nn.Dense(20, 10, init="orthogonal", init_params={"gain": gain}, seed=0,
                     dtype="float64")
    np.testing.assert_allclose(layer.weight.value @ layer.weight.value.T / gain ** 2,
                               np.eye(10), atol=1e-13)


def test_dense_rejects_unknown_init_params():
    with pytest.raises(TypeError, match=r"does not take \['alpha'\].*'gain'"):
        nn.Dense(4, 3, init="glorot_uniform", init_params={"alpha": 1.0})
    with pytest.raises(TypeError, match="dict"):
        nn.Dense(4, 3, init_params=[("a", 1.0)])


def test_dense_names_a_transposed_init():
    def keras_layout(shape, *, seed, dtype, device):
        return fn.init.glorot_uniform(shape[::-1], seed=seed, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=r"\(4, 3\) \(transposed: weights are \(out, in\)\)"):
        nn.Dense(4, 3, init=keras_layout)


# ---- growing ---------------------------------------------------------------------------


def toy_data(n=120, features=6, classes=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features))
    labels = (np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.5, 0.5]) % classes).astype(np.int64)
    return x.astype(dtype), labels


def growable(kind: str, dtype="float64") -> nn.Sequential:
    """Small nets with every kind of layer grow may find between two Dense."""
    d = dict(dtype=dtype)
    if kind == "relu":
        return nn.Sequential(nn.Dense(6, 3, init="he_normal", seed=1, **d), nn.Activation("relu"),
                             nn.Dense(3, 3, seed=2, **d))
    if kind == "batchnorm+dropout":
        return nn.Sequential(nn.Dense(6, 4, seed=1, **d), nn.BatchNorm(4, **d),
                             nn.Activation("tanh"), nn.Dropout(0.3, seed=5),
                             nn.Dense(4, 3, seed=2, **d))
    return nn.Sequential(nn.Dense(6, 5, seed=1, **d), nn.Activation("gelu"),
                         nn.Sequential(nn.Dense(5, 4, seed=2, **d), nn.BatchNorm(4, **d),
                                       nn.Activation("elu")),
                         nn.Dense(4, 3, seed=3, **d))


@pytest.mark.parametrize("rule", nn.GROW_RULES)
@pytest.mark.parametrize("kind", ["relu", "batchnorm+dropout", "deep"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grow_keeps_outputs_bit_for_bit(rule, kind, dtype):
    x, labels = toy_data(dtype=dtype)
    model = growable(kind, dtype)
    optimizer = nn.Adam(model.parameters(), lr=0.01)
    for _ in range(3):  # a trained, not a freshly drawn, net
        model.backward(nn.softmax_cross_entropy(model(x), labels)[1])
        optimizer.step()
    dense = [layer for layer in nn._flat_layers(model, "") if isinstance(layer, nn.Dense)]
    before_training_mode = model(x)  # batch statistics: independent of the running ones
    model.eval()
    before = model(x)
    for layer, units in ((dense[0], 2), (dense[-2], 1), (dense[0], 3)):
        width = layer.out_features
        assert nn.grow(model, layer, units=units, rule=rule, data=(x, labels), seed=7) == (
            width + units)
        assert np.array_equal(model(x), before)
    if kind != "batchnorm+dropout":  # dropout's masks are drawn over the wider array
        model.train()
        assert np.array_equal(model(x), before_training_mode)


def test_grow_widens_everything_in_between():
    x, labels = toy_data()
    model = growable("batchnorm+dropout")
    dense, bn, _, _, head = model.layers
    model(x)
    nn.prune_by_magnitude(model, 0.25)
    running_mean = bn.running_mean.copy()
    assert nn.grow(model, dense, units=3, data=(x, labels), seed=0) == 7
    assert dense.weight.value.shape == dense.weight.grad.shape == dense.weight.mask.shape == (7, 6)
    assert dense.bias.value.shape == (7,) and repr(dense) == "Dense(6, 7, init='glorot_uniform')"
    assert head.in_features == 7 and head.weight.value.shape == head.weight.mask.shape == (3, 7)
    assert (head.weight.value[:, 4:] == 0).all() and (head.weight.mask[:, 4:] == 1).all()
    assert (dense.weight.mask[4:] == 1).all() and (dense.weight.value[4:] != 0).all()
    assert bn.num_features == 7 and bn.gamma.value.shape == bn.beta.value.shape == (7,)
    assert np.array_equal(bn.running_mean[:4], running_mean)
    new = (x @ dense.weight.value[4:].T + dense.bias.value[4:])
    np.testing.assert_allclose(bn.running_mean[4:], new.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var[4:], new.var(axis=0, ddof=1), rtol=1e-12)
    nn.Sequential(*model.layers)  # the chain checks pass on the grown model


def test_grow_widens_optimizer_state_and_training_goes_on():
    x, labels = toy_data()
    model = growable("relu")
    sgd = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    adam = nn.Adam(model.parameters(), lr=0.01)
    for optimizer in (sgd, adam):
        model.backward(nn.softmax_cross_entropy(model(x), labels)[1])
        optimizer.step()
    first_moment = adam._moments[0][0].copy()
    nn.grow(model, model[0], units=2, data=(x, labels), seed=0)
    start, _ = nn.softmax_cross_entropy(model(x), labels)
    model.backward(nn.softmax_cross_entropy(model(x), labels)[1])
    gradient = model[0].weight.grad.copy()
    assert np.abs(model[2].weight.grad[:, 3:]).max() > 0  # the new columns learn at once
    adam.step()
    m = adam._moments[0][0]
    assert m.shape == (5, 6)
    np.testing.assert_allclose(m[:3], 0.9 * first_moment + 0.1 * gradient[:3], rtol=1e-12)
    np.testing.assert_allclose(m[3:], 0.1 * gradient[3:], rtol=1e-12)
    sgd.step()
    assert sgd._velocity[0].shape == (5, 6)
    for _ in range(30):
        loss, grad = nn.softmax_cross_entropy(model(x), labels)
        model.backward(grad)
        adam.step()
    assert loss < start


def _explained(model, x, labels, first):
    """How much of the residual at the output (one-hot minus softmax) the
    new units' outputs explain by least squares, with an intercept: what
    grow trains them to maximize."""
    model.eval()
    residual = -nn.softmax_cross_entropy(model(x), labels)[1]
    a = np.maximum(x @ model[0].weight.value[first:].T + model[0].bias.value[first:], 0)
    a = np.c_[a, np.ones(len(a))]
    fit = a @ np.linalg.lstsq(a, residual, rcond=None)[0]
    return np.linalg.norm(fit) / np.linalg.norm(residual)


def test_grow_trains_the_new_units_on_the_residual(monkeypatch):
    x, labels = toy_data(n=300)
    explained = {}
    trained = nn.GROW_STEPS
    for steps in (0, trained):
        monkeypatch.setattr(nn, "GROW_STEPS", steps)
        model = growable("relu")
        optimizer = nn.Adam(model.parameters(), lr=0.01)
        for _ in range(20):
            model.backward(nn.softmax_cross_entropy(model(x), labels)[1])
            optimizer.step()
        nn.grow(model, model[0], units=4, rule="restarts", data=(x, labels), seed=3)
        explained[steps] = _explained(model, x, labels, 3)
    assert explained[trained] > explained[0] + 0.1


def test_grow_rules_train_on_their_data(monkeypatch):
    x, labels = toy_data(n=200)
    seen = []
    real = nn._fit_units

    def spy(layer, between, following, inputs, target, units, rng, mask):
        result = real(layer, between, following, inputs, target, units, rng, mask)
        seen.append((inputs, mask, result[0]))
        return result

    monkeypatch.setattr(nn, "_fit_units", spy)
    model = growable("relu")
    model.eval()
    losses = nn._per_sample_loss(model(x), labels)
    model.train()
    for rule in nn.GROW_RULES:
        seen.clear()
        nn.grow(model, model[0], units=2, rule=rule, data=(x, labels), seed=1)
        if rule == "subsample":
            assert len(seen) == 1 and len(seen[0][0]) == round(nn.GROW_SUBSAMPLE * 200)
        elif rule == "hardest":
            hardest = np.sort(np.argsort(-losses, kind="stable")[:round(nn.GROW_HARDEST * 200)])
            rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in seen[0][0]]
            assert sorted(rows) == hardest.tolist()
        elif rule == "input_subset":
            mask = seen[0][1]
            assert np.array_equal(mask.sum(axis=1), [round(nn.GROW_INPUTS * 6)] * 2)
            assert (model[0].weight.value[-2:][mask == 0] == 0).all()
            assert len(seen[0][0]) == 200
        else:
            assert len(seen) == nn.GROW_RESTARTS
            assert len({float(error) for _, _, error in seen}) == nn.GROW_RESTARTS
        if rule != "hardest":
            model.eval()
            losses = nn._per_sample_loss(model(x), labels)
            model.train()


def test_grow_repeats_from_a_seed():
    x, labels = toy_data()
    weights = []
    for _ in range(2):
        model = growable("relu")
        nn.grow(model, model[0], units=2, rule="subsample", data=(x, labels), seed=11)
        weights.append(model[0].weight.value.copy())
    assert np.array_equal(*weights)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, d: nn.grow(m, m[2], data=d), ValueError, "last Dense"),
    (lambda m, d: nn.grow(m, m[1], data=d), TypeError, "not a Dense"),
    (lambda m, d: nn.grow(m, nn.Dense(6, 3), data=d), ValueError, "not a layer of the model"),
    (lambda m, d: nn.grow(m, m[0], rule="random", data=d), ValueError, "rule must be"),
    (lambda m, d: nn.grow(m, m[0], units=0, data=d), ValueError, "units"),
    (lambda m, d: nn.grow(m, m[0]), ValueError, "needs data"),
    (lambda m, d: nn.grow(m, m[0], data=(d[0][:1], d[1][:1])), ValueError, "at least 2"),
    (lambda m, d: nn.grow(m, m[0], data=(d[0], d[1][:5])), ValueError, "labels"),
    (lambda m, d: nn.grow(m, m[0], data=(d[0].astype(np.float32), d[1])), TypeError, "dtype"),
    (lambda m, d: nn.grow(m[0], m[0], data=d), TypeError, "Sequential"),
    (lambda m, d: nn.grow(m, m[0], data=d, seed=-1), ValueError, "seed"),
])
def test_grow_bad_input_changes_nothing(call, error, match):
    model = growable("relu")
    state = model.state()
    with pytest.raises(error, match=match):
        call(model, toy_data())
    assert model[0].out_features == 3
    for name, a in model.state().items():
        assert np.array_equal(a, state[name])


def test_plateau_and_grow_on_plateau():
    plateau = nn.Plateau(patience=2, min_delta=0.05)
    assert [plateau.update(v) for v in [1.0, 0.9, 0.88, 0.87, 0.5]] == [False, False, False,
                                                                       True, False]
    x, labels = toy_data()
    model = growable("relu")
    grower = nn.GrowOnPlateau(model, model[0], 6, units=2, patience=1, seed=0)
    grew = [grower.update(loss, (x, labels)) for loss in [1.0, 0.5, 0.6, 0.4, 0.4, 0.4, 0.4]]
    assert grew == [False, False, True, False, True, False, False]
    assert grower.history == [(3, 5), (5, 6)] and grower.full and model[0].out_features == 6
    with pytest.raises(ValueError, match="rule"):
        nn.GrowOnPlateau(model, model[0], 8, rule="grow")


# ---- pretraining -----------------------------------------------------------------------


def test_pretrain_units_is_one_unit_networks_on_their_own_samples():
    """The vectorized per-unit training against training each unit alone,
    as a Dense(6, 1), relu, Dense(1, 3) net, on the sample drawn for it."""
    x, labels = toy_data(n=80)
    model = growable("relu")
    start = {name: a.copy() for name, a in model.state().items()}
    steps, lr, fraction = 40, 0.02, 0.4
    losses = nn.pretrain_units(model, model[0], (x, labels), fraction=fraction, steps=steps,
                               lr=lr, seed=5)
    rng = np.random.default_rng(5)
    samples = [rng.choice(80, 32, replace=False) for _ in range(3)]
    for j, rows in enumerate(samples):
        unit = nn.Sequential(nn.Dense(6, 1, dtype="float64"), nn.Activation("relu"),
                             nn.Dense(1, 3, dtype="float64"))
        unit[0].weight.value[...] = start["0.weight"][j]
        unit[0].bias.value[...] = start["0.bias"][j]
        unit[2].weight.value[...] = start["2.weight"][:, j:j + 1]
        unit[2].bias.value[...] = start["2.bias"]
        optimizer = nn.Adam(unit.parameters(), lr=lr)
        for _ in range(steps):
            loss, grad = nn.softmax_cross_entropy(unit(x[rows]), labels[rows])
            unit.backward(grad)
            optimizer.step()
        loss, _ = nn.softmax_cross_entropy(unit(x[rows]), labels[rows])
        assert losses[j] == pytest.approx(loss, rel=1e-9)
        np.testing.assert_allclose(model[0].weight.value[j], unit[0].weight.value[0], rtol=1e-9)
        np.testing.assert_allclose(model[2].weight.value[:, j], unit[2].weight.value[:, 0] / 3,
                                   rtol=1e-9)


def test_pretrained_model_scores_are_the_units_mean():
    x, labels = toy_data(n=100)
    model = growable("relu")
    nn.pretrain_units(model, model[0], (x, labels), steps=30, seed=0)
    a = np.maximum(x @ model[0].weight.value.T + model[0].bias.value, 0)
    np.testing.assert_allclose(model(x), a @ model[2].weight.value.T + model[2].bias.value,
                               rtol=1e-12)
    assert nn.accuracy(model(x), labels) > 0.6


@pytest.mark.parametrize("kind,index,match", [("batchnorm+dropout", 0, "followed by"),
                                              ("deep", 0, "followed by"),
                                              ("relu", 2, "followed by")])
def test_pretrain_units_needs_a_layer_before_the_readout(kind, index, match):
    model = growable(kind)
    with pytest.raises(ValueError, match=match):
        nn.pretrain_units(model, nn._flat_layers(model, "")[index], toy_data())


# ---- autoencoder -----------------------------------------------------------------------


def test_mean_squared_error():
    output, target = normals(4, 3), normals(4, 3, seed=2)
    loss, grad = nn.mean_squared_error(output, target)
    assert loss == pytest.approx(((output - target) ** 2).mean(), rel=1e-15)
    numeric = numeric_gradient(lambda: nn.mean_squared_error(output, target)[0], output)
    assert relative_error(grad, numeric) <= FD_TOLERANCE
    with pytest.raises(ValueError, match="one non-empty shape"):
        nn.mean_squared_error(output, target[:2])


def test_autoencoder_mirrors_the_encoder_and_shares_its_layers():
    model = nn.Sequential(nn.Dense(8, 6, init="he_normal", seed=0), nn.BatchNorm(6),
                          nn.Activation("leaky_relu", negative_slope=0.1), nn.Dropout(0.1),
                          nn.Dense(6, 3, seed=1), nn.Activation("tanh"), nn.Dense(3, 2, seed=2))
    auto = nn.Autoencoder(model, 6, seed=0)
    assert auto.encoder.layers == model.layers[:6]
    kinds = [(type(layer).__name__, getattr(layer, "in_features", None),
              getattr(layer, "out_features", None), getattr(layer, "name", None))
             for layer in auto.decoder]
    assert kinds == [("Dense", 3, 6, None), ("Activation", None, None, "leaky_relu"),
                     ("Dense", 6, 8, None)]
    assert auto.decoder[0].init_name == "glorot_uniform"
    assert auto.decoder[2].init_name == "he_normal"
    assert auto.decoder[1].params == {"negative_slope": 0.1}
    assert auto(np.zeros((5, 8), np.float32)).shape == (5, 8)
    assert repr(auto).startswith("Autoencoder(encoder=Sequential(Dense(8, 6")


def test_autoencoder_fit_trains_the_model_layers_and_head_replaces_decoder():
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((200, 2))
    x = (codes @ rng.standard_normal((2, 8))).astype(np.float32)  # rank-2 data
    model = nn.Sequential(nn.Dense(8, 4, seed=0), nn.Activation("tanh"), nn.Dense(4, 3, seed=1))
    first = model[0].weight.value.copy()
    auto = nn.Autoencoder(model, 2, seed=0)
    history = auto.fit(x, epochs=30, lr=0.01, seed=0)
    assert len(history) == 30 and history[-1] < 0.2 * history[0]
    assert not np.array_equal(model[0].weight.value, first)  # trained in place
    task = nn.replace_head(auto, nn.Dense(4, 3, seed=2))
    assert task.layers[:2] == model.layers[:2] and task[2].out_features == 3
    assert nn.replace_head(model, nn.Dense(4, 5), keep=2).layers[:2] == model.layers[:2]
    with pytest.raises(ValueError, match="keep"):
        nn.replace_head(model, nn.Dense(4, 5))
    with pytest.raises(ValueError, match="no Dense"):
        nn.Autoencoder(nn.Sequential(nn.Activation("relu"), nn.Dense(2, 2)), 1)


# ---- pruning by loss increase ----------------------------------------------------------


def trained_net(seed=0, n=150):
    x, labels = toy_data(n=n, seed=seed)
    model = nn.Sequential(nn.Dense(6, 10, init="he_normal", seed=1, dtype="float64"),
                          nn.BatchNorm(10, dtype="float64"), nn.Activation("relu"),
                          nn.Dropout(0.1, seed=3), nn.Dense(10, 8, seed=2, dtype="float64"),
                          nn.Activation("tanh"), nn.Dense(8, 3, seed=4, dtype="float64"))
    optimizer = nn.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        model.backward(nn.softmax_cross_entropy(model(x), labels)[1])
        optimizer.step()
    return model, (x, labels)


def brute_force_increase(model, data):
    """Zero each weight, evaluate the loss, put it back."""
    x, labels = data
    model.eval()
    base, _ = nn.softmax_cross_entropy(model(x), labels)
    result = {}
    for layer in model:
        if isinstance(layer, nn.Dense):
            w = layer.weight.value
            increase = np.zeros_like(w)
            for index in np.ndindex(w.shape):
                saved, w[index] = w[index], 0.0
                increase[index] = nn.softmax_cross_entropy(model(x), labels)[0] - base
                w[index] = saved
            result[id(layer)] = increase
    model.train()
    return result


def test_exact_loss_increase_matches_brute_force():
    model, data = trained_net()
    reference = brute_force_increase(model, data)
    flat = nn._flat_layers(model, "")
    dense = [layer for layer in flat if isinstance(layer, nn.Dense)]
    with nn._Evaluating(model, flat):
        ours = nn._loss_increase(flat, dense, *data)
    for layer in dense:
        np.testing.assert_allclose(ours[id(layer)], reference[id(layer)], rtol=0, atol=1e-13)
    assert model.training and max(np.abs(r).max() for r in reference.values()) > 1e-2


def test_second_order_estimate(monkeypatch):
    """For the last Dense the estimate is the exact second-order Taylor
    expansion (the logits are linear in its weights and p (1 - p) is the
    cross-entropy's exact diagonal), so it agrees with the exact increase
    up to third-order terms; for hidden layers (the Gauss-Newton diagonal)
    it ranks weights nearly as the exact criterion does."""
    model, data = trained_net()
    reference = brute_force_increase(model, data)
    monkeypatch.setattr(nn, "PRUNE_EXACT_LIMIT", 0)
    flat = nn._flat_layers(model, "")
    dense = [layer for layer in flat if isinstance(layer, nn.Dense)]
    with nn._Evaluating(model, flat):
        estimate = nn._loss_increase(flat, dense, *data)
    last_w = dense[-1].weight.value
    error = np.abs(estimate[id(dense[-1])] - reference[id(dense[-1])])
    assert (error <= 0.1 * np.abs(last_w) ** 3 + 1e-12).all()
    for layer in dense:
        ranks = [np.argsort(np.argsort(a.ravel())) for a in (estimate[id(layer)],
                                                              reference[id(layer)])]
        assert np.corrcoef(*ranks)[0, 1] > 0.85, repr(layer)


def test_prune_removes_the_least_significant_per_layer():
    model, data = trained_net()
    reference = brute_force_increase(model, data)
    sparsity = nn.prune(model, 0.5, data=data)
    assert sparsity == pytest.approx(0.5, abs=0.01)
    for layer in model:
        if isinstance(layer, nn.Dense):
            w = layer.weight.value
            zero = w == 0
            assert zero.sum() == round(0.5 * w.size)
            assert reference[id(layer)][zero].max() <= reference[id(layer)][~zero].min() + 1e-13
            assert np.array_equal(layer.weight.mask, (~zero).astype(w.dtype))


def test_prune_magnitude_matches_prune_by_magnitude():
    a, _ = trained_net()
    b, _ = trained_net()
    nn.prune(a, 0.7, criterion="magnitude")
    nn.prune_by_magnitude(b, 0.7)
    for name, value in a.state().items():
        assert np.array_equal(value, b.state()[name]), name


def test_prune_more_keeps_earlier_zeros_and_layers_selects():
    model, data = trained_net()
    nn.prune(model, 0.3, data=data, layers=[model[4]])
    first = model[4].weight.value == 0
    assert (model[0].weight.value != 0).all() and (model[6].weight.value != 0).all()
    assert nn.prune(model, 0.5, data=data, layers=[model[4]]) == pytest.approx(0.5)
    assert (model[4].weight.value[first] == 0).all()


def test_restore_if_drop_puts_the_last_removed_back():
    model, (x, labels) = trained_net()
    original = [layer.weight.value.copy() for layer in model if isinstance(layer, nn.Dense)]
    model.eval()
    baseline = nn.accuracy(model(x), labels)
    model.train()
    probe, _ = trained_net()
    nn.prune(probe, 0.9, data=(x, labels))
    probe.eval()
    assert baseline - nn.accuracy(probe(x), labels) > 0.05  # pruning 90% costs too much
    reached = nn.prune(model, 0.9, data=(x, labels), restore_if_drop=0.05)
    model.eval()
    assert baseline - nn.accuracy(model(x), labels) <= 0.05
    assert 0 < reached < 0.9
    for layer, before in zip([lay for lay in model if isinstance(lay, nn.Dense)], original):
        kept = layer.weight.mask == 1
        assert np.array_equal(layer.weight.value[kept], before[kept])  # back with their values
        assert (layer.weight.value[~kept] == 0).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda m, d: nn.prune(m, 1.5, data=d), ValueError, "fraction"),
    (lambda m, d: nn.prune(m, 0.5, criterion="saliency", data=d), ValueError, "criterion"),
    (lambda m, d: nn.prune(m, 0.5), ValueError, "needs data"),
    (lambda m, d: nn.prune(m, 0.5, criterion="magnitude", restore_if_drop=0.1), ValueError,
     "needs data"),
    (lambda m, d: nn.prune(m, 0.5, data=d, layers=[nn.Dense(2, 2)]), ValueError,
     "not a layer"),
    (lambda m, d: nn.prune(m, 0.5, data=d, layers=[m[0], m[0]]), ValueError, "twice"),
    (lambda m, d: nn.prune(m, 0.5, data=d, restore_if_drop=2.0), ValueError, "restore_if_drop"),
])
def test_prune_bad_input_changes_nothing(call, error, match):
    model = growable("batchnorm+dropout")
    state = model.state()
    with pytest.raises(error, match=match):
        call(model, toy_data())
    for name, a in model.state().items():
        assert np.array_equal(a, state[name])
