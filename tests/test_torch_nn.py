"""``fusednn.torch.nn`` and ``patch``: every module against the ``torch.nn``
module it replaces (outputs, input and parameter gradients, running
statistics, train and eval mode; float32 within float32 tolerances,
float64 within 1e-10), state dicts that load both ways, dropout masks that
follow ``torch.manual_seed``, what ``patch`` replaces, leaves alone and
restores, 50 SGD steps of a patched MLP and CNN tracking the stock models'
losses, and patched models under ``torch.compile(fullgraph=True)``. Skips
when PyTorch is not installed.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fusednn as fn  # noqa: E402
import fusednn.torch as ft  # noqa: E402
from fusednn.torch import nn as fnn  # noqa: E402

F32, F64 = torch.float32, torch.float64
# float32: a few ulp of unit-scale values through a reduction; float64: the
# issue's bound.
TOLERANCE = {F32: {"rtol": 1e-5, "atol": 2e-5}, F64: {"rtol": 1e-10, "atol": 1e-10}}
TORCH_AUTOGRAD_FUNCTION_WARNING = "ignore:.*should not be instantiated:DeprecationWarning"


def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def normals(*shape, dtype=F32, scale=1.0, shift=0.0):
    return torch.randn(*shape, dtype=dtype) * scale + shift


def run_pair(stock, fused, x, dtype, *, steps=1):
    """Runs both modules `steps` times on x in their current mode and
    compares outputs, input gradients and parameter gradients."""
    for _ in range(steps):
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yf = stock(xs), fused(xf)
        close(yf, ys, dtype)
        g = normals(*ys.shape, dtype=dtype)
        ys.backward(g)
        yf.backward(g)
        close(xf.grad, xs.grad, dtype)
        for ps, pf in zip(stock.parameters(), fused.parameters()):
            close(pf.grad, ps.grad, dtype)
    return ys, yf


# ---- batch normalization ----------------------------------------------------------

BN_SHAPES = {1: [(16, 5), (8, 5, 7)], 2: [(6, 5, 4, 3)], 3: [(4, 5, 3, 2, 3)]}


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("dims, shape", [(d, s) for d, shapes in BN_SHAPES.items()
                                         for s in shapes])
@pytest.mark.parametrize("options", [
    {}, {"affine": False}, {"momentum": None}, {"track_running_stats": False},
    {"eps": 1e-3, "momentum": 0.3}, {"bias": False}])
def test_batch_norm_matches_torch(dims, shape, options, dtype):
    torch.manual_seed(1)
    stock = getattr(torch.nn, f"BatchNorm{dims}d")(5, dtype=dtype, **options)
    fused = getattr(fnn, f"BatchNorm{dims}d")(5, dtype=dtype, **options)
    with torch.no_grad():
        for ps, pf in zip(stock.parameters(), fused.parameters()):
            ps.uniform_(0.5, 1.5)
            pf.copy_(ps)
    x = normals(*shape, dtype=dtype, scale=2.0, shift=0.5)
    run_pair(stock, fused, x, dtype, steps=3)
    for key, value in stock.state_dict().items():
        close(fused.state_dict()[key], value, dtype) if value.is_floating_point() \
            else torch.testing.assert_close(fused.state_dict()[key], value)
    stock.eval()
    fused.eval()
    run_pair(stock, fused, x * 0.5, dtype)


@pytest.mark.parametrize("dims, memory_format", [(2, torch.channels_last),
                                                 (3, torch.channels_last_3d)])
def test_batch_norm_channels_last_matches_torch(dims, memory_format):
    stock = getattr(torch.nn, f"BatchNorm{dims}d")(6)
    fused = getattr(fnn, f"BatchNorm{dims}d")(6)
    x = normals(*(4, 6, 5, 3, 2)[:dims + 2]).contiguous(memory_format=memory_format)
    ys, yf = run_pair(stock, fused, x, F32, steps=2)
    assert yf.is_contiguous(memory_format=memory_format)
    close(fused.running_var, stock.running_var, F32)


def test_batch_norm_large_mean_is_accurate():
    # Channels whose mean is 1e4 times their spread: fusednn keeps the
    # shift accurate in float32 (DESIGN section 6).
    x = normals(256, 3) + 1e4
    expected = torch.nn.BatchNorm1d(3, dtype=F64)(x.double())
    y = fnn.BatchNorm1d(3)(x)
    assert (y.double() - expected).abs().max() < 1e-5


def test_batch_norm_state_dict_loads_both_ways():
    stock = torch.nn.BatchNorm2d(4)
    stock(normals(8, 4, 3, 3))
    fused = fnn.BatchNorm2d(4)
    assert list(fused.state_dict()) == list(stock.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    fused.load_state_dict(stock.state_dict())
    fused(normals(8, 4, 3, 3))
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(fused.state_dict())
    assert int(back.num_batches_tracked) == 2
    torch.testing.assert_close(back.running_mean, fused.running_mean)
    assert repr(fused) == repr(stock) and isinstance(fused, torch.nn.BatchNorm2d)


def test_batch_norm_errors_as_torch():
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fnn.BatchNorm1d(3)(normals(2, 3, 4, 5))
    with pytest.raises(ValueError, match="more than one value per channel"):
        fnn.BatchNorm1d(3)(normals(1, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", ["half", "float32"])
def test_batch_norm_runs_half_tensors_on_fusednn(dtype, weights, monkeypatch):
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    """float16 and bfloat16 input with weights of its dtype (module.to(dtype))
    or float32 ones (mixed precision): fusednn's kernel, whose results are
    the float32 kernel's rounded once, within torch's own half-precision
    module's rounding."""
    torch.manual_seed(2)
    weight_dtype = dtype if weights == "half" else F32
    stock = torch.nn.BatchNorm2d(5, dtype=weight_dtype)
    fused = fnn.BatchNorm2d(5, dtype=weight_dtype)
    with torch.no_grad():
        for ps, pf in zip(stock.parameters(), fused.parameters()):
            ps.uniform_(0.5, 1.5)
            pf.copy_(ps)
    calls = []
    real_batch_norm = fn.batch_norm
    monkeypatch.setattr(fn, "batch_norm",
                        lambda *a, **k: calls.append(1) or real_batch_norm(*a, **k))
    x = normals(6, 5, 4, 3, scale=2.0, shift=0.5).to(dtype)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = stock(xs), fused(xf)
    assert calls and yf.dtype == dtype
    y32 = real_batch_norm(x.float(), fused.weight.detach().float(), fused.bias.detach().float()).y
    assert torch.equal(yf, y32.to(dtype))
    # A few units in the last place of outputs of order one: torch rounds
    # its float32 result to the half type too, not always the same way.
    tolerance = ({"atol": 3e-2, "rtol": 2e-2} if dtype == torch.bfloat16
                 else {"atol": 4e-3, "rtol": 2e-3})
    torch.testing.assert_close(yf, ys, **tolerance)
    g = normals(*ys.shape).to(dtype)
    ys.backward(g)
    yf.backward(g)
    assert xf.grad.dtype == dtype and fused.weight.grad.dtype == weight_dtype
    torch.testing.assert_close(xf.grad, xs.grad, **tolerance)
    for ps, pf in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, ps.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(fused.running_mean, stock.running_mean, **tolerance)
    torch.testing.assert_close(fused.running_var, stock.running_var, **tolerance)


# ---- activations and dropout --------------------------------------------------------

ACTIVATION_MODULES = [
    ("ReLU", {}), ("LeakyReLU", {"negative_slope": 0.1}), ("ELU", {"alpha": 0.5}), ("SELU", {}),
    ("GELU", {}), ("GELU", {"approximate": "tanh"}), ("SiLU", {}),
    ("Softplus", {"beta": 2.0, "threshold": 5.0}), ("Mish", {}), ("Hardsigmoid", {}),
    ("Hardswish", {}), ("Hardtanh", {"min_val": -2.0, "max_val": 0.5}), ("Sigmoid", {}),
    ("Tanh", {}),
]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name, kwargs", ACTIVATION_MODULES,
                         ids=[f"{n}{k}" for n, k in ACTIVATION_MODULES])
def test_activation_matches_torch(name, kwargs, dtype):
    stock, fused = getattr(torch.nn, name)(**kwargs), getattr(fnn, name)(**kwargs)
    assert repr(fused) == repr(stock) and isinstance(fused, getattr(torch.nn, name))
    if name == "Hardsigmoid" and dtype == F64:
        stock = ExactHardsigmoid()
    run_pair(stock, fused, normals(37, 11, dtype=dtype, scale=4.0), dtype)


class ExactHardsigmoid(torch.nn.Module):
    """hardsigmoid written out: torch's float64 backward multiplies by 1/6
    rounded to float32 (5e-9 relative error), fusednn's by 1/6."""

    def forward(self, x):
        return ((x + 3) / 6).clamp(0, 1)


def test_inplace_activation_is_torchs_own():
    x = normals(5, 4)
    fnn.ReLU(inplace=True)(x)
    assert (x >= 0).all()


def test_dropout_follows_manual_seed_and_generator():
    drop = fnn.Dropout(0.3)
    x = torch.ones(50, 40)
    torch.manual_seed(7)
    first = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), first)
    assert not torch.equal(drop(x), first)
    kept = (first != 0).double().mean().item()
    assert abs(kept - 0.7) < 0.05 and torch.allclose(first[first != 0], torch.tensor(1 / 0.7))
    seeded = [fnn.Dropout(0.3, generator=torch.Generator().manual_seed(2))(x) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])


def test_dropout_mask_is_fusednns_for_the_drawn_pair():
    torch.manual_seed(11)
    rng = ft.ops.draw_rng()
    torch.manual_seed(11)
    x = normals(9, 7)
    torch.manual_seed(11)
    y = fnn.Dropout(0.4)(x)
    seed, offset = (v % (1 << 64) for v in rng.tolist())
    torch.testing.assert_close(y, fn.dropout(x, 0.4, seed=seed, offset=offset), rtol=0, atol=0)


def test_dropout_eval_and_extremes():
    x = normals(6, 5, dtype=F64)
    drop = fnn.Dropout(0.5).eval()
    assert drop(x) is x
    assert torch.equal(fnn.Dropout(0.0)(x), x)
    assert torch.equal(fnn.Dropout(1.0)(x), torch.zeros_like(x))
    x.requires_grad_()
    y = fnn.Dropout(0.5)(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y != 0).double() * 2)


def test_dropout_state_dict_and_repr_are_torchs():
    assert repr(fnn.Dropout(0.2)) == repr(torch.nn.Dropout(0.2))
    assert fnn.Dropout(0.2).state_dict() == {}


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("activation, params, axis, shape", [
    ("gelu", {}, -1, (12, 6)), ("relu", {}, 1, (4, 6, 3, 3)),
    ("leaky_relu", {"negative_slope": 0.2}, 1, (5, 6, 7)), ("silu", {}, -1, (3, 4, 6))])
def test_bias_activation_dropout_matches_torch(activation, params, axis, shape, dtype):
    fused = fnn.BiasActivationDropout(6, activation, p=0.0, axis=axis, dtype=dtype, **params)
    with torch.no_grad():
        fused.bias.normal_()
    bias = fused.bias.detach().clone().requires_grad_()
    view = [1] * len(shape)
    view[axis] = 6
    function = getattr(torch.nn.functional, activation)
    x = normals(*shape, dtype=dtype, scale=2.0)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys = function(xs + bias.view(view), **params)
    yf = fused(xf)
    close(yf, ys, dtype)
    g = normals(*shape, dtype=dtype)
    ys.backward(g)
    yf.backward(g)
    close(xf.grad, xs.grad, dtype)
    close(fused.bias.grad, bias.grad, dtype)


def test_bias_activation_dropout_drops_in_training_only():
    fused = fnn.BiasActivationDropout(8, "relu", p=0.5)
    x = normals(64, 8).abs() + 1
    torch.manual_seed(4)
    y = fused(x)
    assert 0.3 < (y == 0).double().mean().item() < 0.7
    assert torch.equal(fused.eval()(x), x)
    assert "activation='relu'" in repr(fused)


def test_bias_activation_dropout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        fnn.BiasActivationDropout(3, "swish")
    with pytest.raises(TypeError, match="gelu takes approximate, not alpha"):
        fnn.BiasActivationDropout(3, "gelu", alpha=1.0)
    with pytest.raises(ValueError, match="p must lie in"):
        fnn.BiasActivationDropout(3, "relu", p=1.5)


# ---- patch ---------------------------------------------------------------------------


class Residual(torch.nn.Sequential):
    """A torch.nn subclass of a supported class elsewhere: patch must not
    touch subclasses it does not know."""


class MyReLU(torch.nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


def mixed_model():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.GELU(),
        torch.nn.Dropout(0.1), Residual(torch.nn.Linear(16, 16), torch.nn.ReLU(inplace=True)),
        MyReLU(), torch.nn.Tanh(), torch.nn.BatchNorm1d(16).to(torch.float8_e4m3fn))


def test_patch_counts_replacements_and_explains_what_it_skips():
    model = mixed_model()
    optimizer_params = list(model.parameters())
    result = ft.patch(model)
    assert result.model is model
    assert result.replaced == {"BatchNorm1d": 1, "GELU": 1, "Dropout": 1, "Tanh": 1}
    reasons = dict(result.skipped)
    assert set(reasons) == {"4.1", "7"}
    assert "inplace" in reasons["4.1"] and "float8_e4m3fn" in reasons["7"]
    assert type(model[1]) is fnn.BatchNorm1d and type(model[5]) is MyReLU
    assert type(model[4][1]) is torch.nn.ReLU
    assert list(model.parameters()) == optimizer_params  # the same objects
    restored = ft.unpatch(model)
    assert restored.replaced == {"BatchNorm1d": 1, "GELU": 1, "Dropout": 1, "Tanh": 1}
    assert type(model[1]) is torch.nn.BatchNorm1d and type(model[2]) is torch.nn.GELU


def test_patch_copy_leaves_the_model_alone():
    model = mixed_model()
    result = ft.patch(model, inplace=False)
    assert result.model is not model and type(model[1]) is torch.nn.BatchNorm1d
    assert type(result.model[1]) is fnn.BatchNorm1d
    back = ft.unpatch(result.model, inplace=False).model
    assert type(back[1]) is torch.nn.BatchNorm1d and type(result.model[1]) is fnn.BatchNorm1d


def test_patch_the_model_itself_and_reject_non_modules():
    result = ft.patch(torch.nn.BatchNorm2d(3))
    assert type(result.model) is fnn.BatchNorm2d and result.replaced == {"BatchNorm2d": 1}
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ft.patch([torch.nn.ReLU()])


def test_patched_model_keeps_its_state_dict_keys():
    model = mixed_model()
    keys = list(model.state_dict())
    ft.patch(model)
    assert list(model.state_dict()) == keys


# ---- training ------------------------------------------------------------------------


def mlp(dtype):
    return torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.GELU(), torch.nn.Dropout(0.0),
        torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32, momentum=None), torch.nn.GELU(),
        torch.nn.Linear(32, 4)).to(dtype)


def cnn(dtype):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).to(dtype)


def train(model, inputs, targets, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        x, t = inputs[step % len(inputs)], targets[step % len(targets)]
        loss = torch.nn.functional.cross_entropy(model(x), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make, shape", [(mlp, (32, 20)), (cnn, (8, 3, 8, 8))],
                         ids=["mlp", "cnn"])
def test_fifty_training_steps_track_the_stock_model(make, shape):
    torch.manual_seed(0)
    stock = make(F64)
    result = ft.patch(stock, inplace=False)
    patched = result.model
    assert sum(result.replaced.values()) >= 4
    inputs = [normals(*shape, dtype=F64) for _ in range(5)]
    targets = [torch.randint(0, 4, (shape[0],)) for _ in range(5)]
    expected = train(stock, inputs, targets, 50)
    losses = train(patched, inputs, targets, 50)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert expected[-1] < expected[0]
    stock.eval()
    patched.eval()
    close(patched(inputs[0]), stock(inputs[0]), F64)


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
def test_compiled_patched_model_has_no_graph_break():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.GELU(), torch.nn.Dropout(0.2),
        fnn.BiasActivationDropout(16, "silu", p=0.1), torch.nn.Linear(16, 3))
    ft.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = normals(10, 12)
    y = compiled(x)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert int(model[1].num_batches_tracked) == 1
    model.eval()
    close(compiled(x), model(x), F32)


def test_readme_example_runs():
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not next to the tests")
    block = re.search(r"### PyTorch\n.*?```python\n(.*?)```", readme.read_text(), re.S)
    assert block is not None, "README.md has no PyTorch example"
    namespace: dict = {}
    exec(compile(block.group(1), str(readme), "exec"), namespace)
    assert namespace["result"].replaced == {"BatchNorm1d": 1, "GELU": 1, "Dropout": 1}
    assert type(namespace["model"][1]) is torch.nn.BatchNorm1d  # unpatched at the end
    assert torch.isfinite(namespace["loss"])


def test_bfloat16_needs_ml_dtypes_and_says_so(monkeypatch):
    monkeypatch.setattr(fnn, "_bfloat16_readable", lambda: False)
    assert "pip install ml_dtypes" in fnn.supports(torch.bfloat16, "cpu")
    assert fnn.supports(torch.float16, "cpu") is None
