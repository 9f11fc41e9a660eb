"""Small neural-network building blocks on numpy (or CuPy) arrays, with
forward and backward passes written out, built on fusednn's kernels.

    model = nn.Sequential(
        nn.Dense(64, 256, init="he_normal", seed=0), nn.BatchNorm(256),
        nn.Activation("relu"), nn.Dropout(0.2, seed=1),
        nn.Dense(256, 10, seed=2))
    optimizer = nn.Adam(model.parameters(), lr=1e-3, l2=1e-4)
    logits = model(x)                                   # forward (training mode)
    loss, grad = nn.softmax_cross_entropy(logits, labels)
    model.backward(grad)                                # fills each Parameter.grad
    optimizer.step()

Layers: Dense (matrix product; numpy/CuPy BLAS), Activation
(``fn.activation`` / ``fn.activation_backward``), BatchNorm
(``fn.batch_norm`` / ``fn.batch_norm_backward``) and Dropout
(``fn.dropout`` / ``fn.dropout_backward``). A layer's ``backward`` takes
the gradient of the loss with respect to its last forward output, writes
(not accumulates) the gradients of its parameters and returns the gradient
with respect to its input. ``train()`` / ``eval()`` switch batch norm
between batch and running statistics and dropout between masking and the
identity.

Around them: softmax cross-entropy, SGD with momentum, Adam, L1/L2
penalties, magnitude pruning (masks kept through training) and early
stopping. Bad options raise when a layer is built; inputs of the wrong
shape, dtype or device raise on the call that receives them.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend
from . import init as _init
from .activations import _check_name, _kernel_params, activation, activation_backward
from .batchnorm import batch_norm, batch_norm_backward
from .dropout import dropout, dropout_backward

__all__ = ["Activation", "Adam", "BatchNorm", "Dense", "Dropout", "EarlyStopping", "Layer",
           "Parameter", "SGD", "Sequential", "accuracy", "penalty", "prune_by_magnitude",
           "softmax", "softmax_cross_entropy", "sparsity"]

_DTYPES = ("float32", "float64")


# ---- arrays ----------------------------------------------------------------------


def _device(a) -> str:
    return "cuda" if _backend.is_cupy_array(a) else "cpu"


def _library(a) -> str:
    return "CuPy" if _backend.is_cupy_array(a) else "numpy"


def _xp(a):
    """The array module of a: numpy, or cupy (imported only when a is one)."""
    if _backend.is_cupy_array(a):
        import cupy
        return cupy
    return np


def _check_array(x, what: str, where: str):
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray) and not _backend.is_cupy_array(x):
        raise TypeError(f"{where}: {what} must be a numpy or CuPy array, "
                        f"not {type(x).__name__}")
    return x


def _check_matches(x, like, what: str, where: str) -> None:
    """x must live where `like` (a parameter) lives and have its dtype."""
    if _device(x) != _device(like):
        raise TypeError(f"{where}: {what} is a {_library(x)} array but the layer's parameters "
                        f"are {_library(like)} arrays; a model and its inputs must be on one "
                        "device (convert with cupy.asarray or cupy.asnumpy)")
    if x.dtype != like.dtype:
        raise TypeError(f"{where}: {what} has dtype {x.dtype} but the layer's parameters have "
                        f"dtype {like.dtype}; cast the input (x.astype) or build the layer "
                        f"with dtype='{x.dtype}'")


def _positive_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _real_in(value, name: str, where: str, low: float, high: float, *,
             open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, not {type(value).__name__}")
    value = float(value)
    below = value <= low if open_low else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{where}: {name} must be in {bracket}{low}, {high}], got {value}")
    return value


def _dtype(dtype, where: str) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in _DTYPES:
        raise TypeError(f"{where}: dtype {dtype!r} is not supported; choose one of "
                        f"{', '.join(_DTYPES)}")
    return resolved


def _device_arg(device, where: str) -> str:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device must be 'cpu' or 'cuda', got {device!r}")
    return device


def _full(value, shape, dtype, device):
    if device == "cuda":
        try:
            import cupy
        except ImportError:
            raise RuntimeError("fusednn.nn: device='cuda' needs CuPy (pip install "
                               "cupy-cuda12x), which is not installed") from None
        return cupy.full(shape, value, dtype=dtype)
    return np.full(shape, value, dtype=dtype)


# ---- parameters and layers -------------------------------------------------------


class Parameter:
    """A trainable array, its gradient and, once pruned, its mask.

    ``is_weight`` marks the arrays that L1/L2 penalties and pruning act on
    (Dense weights); biases and batch-norm scale and shift are left alone,
    as is usual. ``mask`` (None, or an array of 0 and 1 of the value's
    dtype) is multiplied into the value after every optimizer step.
    """

    def __init__(self, value, name: str, *, is_weight: bool = False):
        self.value = value
        self.grad = _xp(value).zeros_like(value)
        self.name = name
        self.is_weight = is_weight
        self.mask = None

    def __repr__(self) -> str:
        return (f"Parameter({self.name}, shape={tuple(self.value.shape)}, "
                f"dtype={self.value.dtype}, device={_device(self.value)})")


class Layer:
    """Base class: ``forward`` (also ``layer(x)``), ``backward``,
    ``parameters``, ``train`` / ``eval``, and ``state`` / ``load_state``
    (copies of the parameters and running statistics)."""

    training = True

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def parameters(self) -> list[Parameter]:
        return []

    def buffers(self) -> dict:
        """Non-trained state that a snapshot must keep (running statistics)."""
        return {}

    def train(self, mode: bool = True) -> Layer:
        self.training = bool(mode)
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def arrays(self) -> dict:
        """The live parameter values and buffers, by name (what ``state``
        copies)."""
        arrays = {p.name: p.value for p in self.parameters()}
        arrays.update(self.buffers())
        return arrays

    def state(self) -> dict:
        """Copies of every parameter value and buffer, by name."""
        return {name: a.copy() for name, a in self.arrays().items()}

    def load_state(self, state: dict) -> None:
        """Copies a ``state()`` back in place. Everything is checked (names,
        shapes, dtypes, devices) before anything is written."""
        arrays = self.arrays()
        missing = sorted(set(arrays) - set(state))
        unknown = sorted(set(state) - set(arrays))
        if missing or unknown:
            raise ValueError(f"{self!r}.load_state: state does not fit this model "
                             f"(missing {missing}, unknown {unknown})")
        for name, target in arrays.items():
            source = state[name]
            if (_device(source) != _device(target) or source.shape != target.shape
                    or source.dtype != target.dtype):
                raise ValueError(f"{self!r}.load_state: {name} is a {_library(source)} array "
                                 f"of shape {source.shape} and dtype {source.dtype}; expected "
                                 f"{_library(target)}, {target.shape}, {target.dtype}")
        for name, target in arrays.items():
            target[...] = state[name]

    def _saved(self, name: str):
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        return value


class Dense(Layer):
    """``y = x @ weight.T + bias`` on (batch, in_features) inputs.

    ``weight`` has PyTorch's shape ``(out_features, in_features)``, so that
    ``fn.init`` computes its fans as PyTorch does. ``init`` is the name of
    an ``fn.init`` initializer (default ``'glorot_uniform'``) or a callable
    ``init(shape, *, seed, dtype, device)`` returning the weight. The bias
    starts at ``bias_init`` (0 by default; PyTorch draws it at random).
    """

    def __init__(self, in_features, out_features, *, init="glorot_uniform", bias=True,
                 bias_init=0.0, seed=None, dtype="float32", device="cpu"):
        where = "fusednn.nn.Dense"
        self.in_features = _positive_int(in_features, "in_features", where)
        self.out_features = _positive_int(out_features, "out_features", where)
        dt = _dtype(dtype, where)
        device = _device_arg(device, where)
        if isinstance(init, str):
            if init not in _init.INITIALIZERS:
                raise ValueError(f"{where}: unknown init {init!r}; choose one of "
                                 f"{', '.join(_init.INITIALIZERS)} or pass a callable")
            initializer = getattr(_init, init)
        elif callable(init):
            initializer = init
        else:
            raise TypeError(f"{where}: init must be an initializer name or a callable, "
                            f"not {type(init).__name__}")
        if not isinstance(bias, bool):
            raise TypeError(f"{where}: bias must be True or False, not {bias!r}")
        bias_init = _real_in(bias_init, "bias_init", where, -math.inf, math.inf)
        shape = (self.out_features, self.in_features)
        weight = initializer(shape, seed=seed, dtype=dt.name, device=device)
        if (_device(weight) != device or tuple(weight.shape) != shape
                or weight.dtype != dt):
            raise ValueError(f"{where}: init returned a {_library(weight)} array of shape "
                             f"{tuple(weight.shape)} and dtype {weight.dtype}; expected {shape}, "
                             f"{dt}, on {device}")
        self.init_name = init if isinstance(init, str) else getattr(init, "__name__", "custom")
        self.weight = Parameter(weight, "weight", is_weight=True)
        self.bias = (Parameter(_full(bias_init, (self.out_features,), dt, device), "bias")
                     if bias else None)
        self._x = None

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features}, init={self.init_name!r})"

    def parameters(self) -> list[Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def forward(self, x):
        x = _check_array(x, "input", repr(self))
        _check_matches(x, self.weight.value, "input", repr(self))
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self!r}: expected input of shape (batch, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        y = x @ self.weight.value.T
        if self.bias is not None:
            y += self.bias.value
        self._x = x
        return y

    def backward(self, grad_output):
        x = self._saved("_x")
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        _check_matches(grad_output, self.weight.value, "grad_output", repr(self))
        if tuple(grad_output.shape) != (x.shape[0], self.out_features):
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"expected {(x.shape[0], self.out_features)}")
        xp = _xp(x)
        xp.matmul(grad_output.T, x, out=self.weight.grad)
        if self.bias is not None:
            grad_output.sum(axis=0, out=self.bias.grad)
        return grad_output @ self.weight.value


class Activation(Layer):
    """``y = f(x)`` for any name in ``fn.ACTIVATIONS``, with that
    activation's keyword parameters (``Activation('leaky_relu',
    negative_slope=0.1)``)."""

    def __init__(self, name: str, **params):
        where = "nn.Activation"
        _check_name(name, where)
        _kernel_params(name, params, where)
        self.name = name
        self.params = dict(params)
        self._x = None

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Activation({self.name!r}{extra})"

    def forward(self, x):
        x = _check_array(x, "input", repr(self))
        y = activation(self.name, x, **self.params)
        self._x = x
        return y

    def backward(self, grad_output):
        x = self._saved("_x")
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        return activation_backward(self.name, grad_output, x=x, **self.params)


class BatchNorm(Layer):
    """Batch normalization over the channel axis ``axis`` (1: NC, NCHW, ...;
    -1: channels last), with a learned scale ``gamma`` (ones) and shift
    ``beta`` (zeros) when ``affine``, and running statistics
    ``running_mean`` (zeros) and ``running_var`` (ones) updated with
    ``momentum`` in training and used in eval mode."""

    def __init__(self, num_features, *, axis=1, momentum=0.1, eps=1e-5, affine=True,
                 dtype="float32", device="cpu"):
        where = "fusednn.nn.BatchNorm"
        self.num_features = _positive_int(num_features, "num_features", where)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"{where}: axis must be an integer, not {type(axis).__name__}")
        self.axis = int(axis)
        self.momentum = _real_in(momentum, "momentum", where, 0.0, 1.0)
        self.eps = _real_in(eps, "eps", where, 0.0, math.inf, open_low=True)
        if not isinstance(affine, bool):
            raise TypeError(f"{where}: affine must be True or False, not {affine!r}")
        dt = _dtype(dtype, where)
        device = _device_arg(device, where)
        shape = (self.num_features,)
        self.gamma = Parameter(_full(1.0, shape, dt, device), "gamma") if affine else None
        self.beta = Parameter(_full(0.0, shape, dt, device), "beta") if affine else None
        self.running_mean = _full(0.0, shape, dt, device)
        self.running_var = _full(1.0, shape, dt, device)
        self._saved_forward = None

    def __repr__(self) -> str:
        return f"BatchNorm({self.num_features}, axis={self.axis})"

    def parameters(self) -> list[Parameter]:
        return [] if self.gamma is None else [self.gamma, self.beta]

    def buffers(self) -> dict:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def forward(self, x):
        x = _check_array(x, "input", repr(self))
        _check_matches(x, self.running_mean, "input", repr(self))
        if not -x.ndim <= self.axis < x.ndim or x.shape[self.axis] != self.num_features:
            raise ValueError(f"{self!r}: expected {self.num_features} channels on axis "
                             f"{self.axis}, got input of shape {tuple(x.shape)}")
        gamma = None if self.gamma is None else self.gamma.value
        beta = None if self.beta is None else self.beta.value
        result = batch_norm(x, gamma, beta, self.running_mean, self.running_var,
                            training=self.training, momentum=self.momentum, eps=self.eps,
                            axis=self.axis)
        self._saved_forward = (x, result.save_mean, result.save_invstd, self.training)
        return result.y

    def backward(self, grad_output):
        x, mean, invstd, training = self._saved("_saved_forward")
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        _check_matches(grad_output, x, "grad_output", repr(self))
        if grad_output.shape != x.shape:
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"expected {tuple(x.shape)}")
        gamma = None if self.gamma is None else self.gamma.value
        if training:
            grad_input, grad_gamma, grad_beta = batch_norm_backward(
                grad_output, x, gamma, mean, invstd, axis=self.axis)
        else:
            # Inference normalizes with constants: y = gamma * invstd * (x - mean) + beta.
            shape = [1] * x.ndim
            shape[self.axis] = self.num_features
            others = tuple(d for d in range(x.ndim) if d != self.axis % x.ndim)
            scale = invstd if gamma is None else gamma * invstd
            grad_input = grad_output * scale.reshape(shape)
            xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
            grad_gamma = (grad_output * xhat).sum(axis=others)
            grad_beta = grad_output.sum(axis=others)
        if self.gamma is not None:
            self.gamma.grad[...] = grad_gamma
            self.beta.grad[...] = grad_beta
        return grad_input


class Dropout(Layer):
    """Inverted dropout with drop probability ``p`` (``fn.dropout``):
    training multiplies by a Bernoulli(1 - p) mask and divides by 1 - p;
    eval mode passes the input through unchanged.

    The masks follow fusednn's counter-based RNG: each training forward
    draws stream ``offset`` under ``seed`` and then advances ``offset`` by
    one, so every step gets a new mask and a run repeats exactly from the
    same seed and starting offset. ``seed=None`` draws a seed from fresh
    entropy. Backward regenerates the mask from (seed, offset) instead of
    storing it.
    """

    def __init__(self, p, *, seed=None, offset=0):
        where = "fusednn.nn.Dropout"
        self.p = _real_in(p, "p", where, 0.0, 1.0)
        if seed is None:
            seed = int(np.random.default_rng().integers(2 ** 63))
        for name, value in (("seed", seed), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{where}: {name} must be an integer, not {type(value).__name__}")
            if not 0 <= value < 2 ** 64:
                raise ValueError(f"{where}: {name} must be in [0, 2**64), got {value}")
        self.seed = int(seed)
        self.offset = int(offset)
        self._last = None  # ("eval",) or ("train", offset, shape) of the last forward

    def __repr__(self) -> str:
        return f"Dropout({self.p:g}, seed={self.seed})"

    def forward(self, x):
        x = _check_array(x, "input", repr(self))
        if not self.training:
            self._last = ("eval",)
            return x
        if self.offset >= 2 ** 64:
            raise ValueError(f"{self!r}: the 2**64 mask streams of this seed are used up")
        y = dropout(x, self.p, seed=self.seed, offset=self.offset)
        self._last = ("train", self.offset, tuple(x.shape))
        self.offset += 1
        return y

    def backward(self, grad_output):
        last = self._saved("_last")
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        if last[0] == "eval":
            return grad_output
        _, offset, shape = last
        if tuple(grad_output.shape) != shape:
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"expected {shape}")
        return dropout_backward(grad_output, self.p, seed=self.seed, offset=offset)


class Sequential(Layer):
    """Layers applied in order; ``backward`` runs them in reverse.

    Checked when built: every item is a Layer used once, all parameters
    share one device and dtype, and the feature counts chain (a Dense's
    in_features equals the previous Dense's out_features; a BatchNorm after
    a Dense normalizes its features, axis 1 or -1, and has as many).
    """

    def __init__(self, *layers):
        where = "fusednn.nn.Sequential"
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        seen = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"{where}: item {i} is a {type(layer).__name__}, not a "
                                "fusednn.nn layer")
            if id(layer) in seen:
                raise ValueError(f"{where}: {layer!r} appears twice; each position needs its "
                                 "own layer (it keeps its forward input for backward)")
            seen.add(id(layer))
        self.layers = list(layers)
        self._check_chain(where)
        arrays = [(layer, p.value) for layer in self.layers for p in layer.parameters()]
        arrays += [(layer, b) for layer in self.layers for b in layer.buffers().values()]
        for layer, a in arrays[1:]:
            first_layer, first = arrays[0]
            if _device(a) != _device(first):
                raise TypeError(f"{where}: mixed devices: {first_layer!r} holds {_library(first)} "
                                f"arrays but {layer!r} holds {_library(a)} arrays")
            if a.dtype != first.dtype:
                raise TypeError(f"{where}: mixed dtypes: {first_layer!r} is {first.dtype} but "
                                f"{layer!r} is {a.dtype}")

    def _check_chain(self, where: str) -> None:
        features, source = None, None
        for layer in self.layers:
            if isinstance(layer, Dense):
                if features is not None and layer.in_features != features:
                    raise ValueError(f"{where}: {layer!r} takes {layer.in_features} features "
                                     f"but {source!r} gives {features}")
                features, source = layer.out_features, layer
            elif isinstance(layer, BatchNorm) and isinstance(source, Dense):
                if layer.axis not in (1, -1):
                    raise ValueError(f"{where}: {layer!r} follows {source!r}, whose output is "
                                     "(batch, features); use axis=1 or axis=-1")
                if layer.num_features != features:
                    raise ValueError(f"{where}: {layer!r} normalizes {layer.num_features} "
                                     f"features but {source!r} gives {features}")
            elif isinstance(layer, Sequential):
                features, source = None, None

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(repr(layer) for layer in self.layers) + ")"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_output):
        for layer in reversed(self.layers):
            grad_output = layer.backward(grad_output)
        return grad_output

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def train(self, mode: bool = True) -> Sequential:
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def buffers(self) -> dict:
        return {f"{i}.{name}": a for i, layer in enumerate(self.layers)
                for name, a in layer.buffers().items()}

    def arrays(self) -> dict:
        return {f"{i}.{name}": a for i, layer in enumerate(self.layers)
                for name, a in layer.arrays().items()}


# ---- loss and metrics ------------------------------------------------------------


def _check_logits_labels(logits, labels, where: str):
    logits = _check_array(logits, "logits", where)
    labels = _check_array(labels, "labels", where)
    if logits.dtype.name not in _DTYPES:
        raise TypeError(f"{where}: logits have dtype {logits.dtype}; supported dtypes are "
                        f"{', '.join(_DTYPES)}")
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{where}: logits must be (batch, classes) with both non-zero, got "
                         f"{tuple(logits.shape)}")
    if _device(labels) != _device(logits):
        raise TypeError(f"{where}: logits are a {_library(logits)} array but labels a "
                        f"{_library(labels)} array; put both on one device")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{where}: labels must be integer class indices, got dtype "
                        f"{labels.dtype}")
    if tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(f"{where}: labels have shape {tuple(labels.shape)}, expected "
                         f"({logits.shape[0]},), one class index per row of logits")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"{where}: labels must lie in [0, {logits.shape[1]}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return logits, labels


def softmax(logits, axis=-1):
    """exp(z) / sum(exp(z)), computed from z - max(z) so that nothing
    overflows."""
    logits = _check_array(logits, "logits", "fusednn.nn.softmax")
    xp = _xp(logits)
    e = xp.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels, and its
    gradient with respect to the logits.

    Returns ``(loss, grad_logits)``: ``loss = mean_i(logsumexp(z_i) -
    z_i[label_i])`` as a Python float, ``grad = (softmax(z) - onehot) /
    batch``. Both come from ``z - max(z)`` per row, so large logits neither
    overflow nor lose the loss to rounding.
    """
    logits, labels = _check_logits_labels(logits, labels, "fusednn.nn.softmax_cross_entropy")
    xp = _xp(logits)
    rows = xp.arange(logits.shape[0])
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    log_likelihood = shifted[rows, labels] - xp.log(total[:, 0])
    loss = -float(log_likelihood.mean())
    grad = exp / total
    grad[rows, labels] -= 1.0
    grad /= logits.shape[0]
    return loss, grad


def accuracy(logits, labels) -> float:
    """Fraction of rows whose largest logit is at the label."""
    logits, labels = _check_logits_labels(logits, labels, "fusednn.nn.accuracy")
    return float((logits.argmax(axis=1) == labels).mean())


# ---- penalties, optimizers, pruning ----------------------------------------------


def _parameter_list(parameters, where: str) -> list[Parameter]:
    if isinstance(parameters, Layer):
        parameters = parameters.parameters()
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(f"{where}: expected a model or an iterable of Parameters, not "
                        f"{type(parameters).__name__}") from None
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"{where}: expected Parameters, got a {type(p).__name__}")
    if len({id(p) for p in params}) != len(params):
        raise ValueError(f"{where}: a Parameter is listed twice")
    return params


def penalty(parameters, *, l1=0.0, l2=0.0) -> float:
    """The penalty term ``l1 * sum|w| + l2 / 2 * sum w^2`` over the weights
    (``Parameter.is_weight``) of a model or a list of Parameters; its
    gradient ``l1 * sign(w) + l2 * w`` is what an optimizer built with the
    same l1 and l2 adds."""
    where = "fusednn.nn.penalty"
    l1 = _real_in(l1, "l1", where, 0.0, math.inf)
    l2 = _real_in(l2, "l2", where, 0.0, math.inf)
    total = 0.0
    for p in _parameter_list(parameters, where):
        if p.is_weight:
            xp = _xp(p.value)
            total += l1 * float(xp.abs(p.value).sum()) + 0.5 * l2 * float((p.value ** 2).sum())
    return total


class _Optimizer:
    """Updates each Parameter in place from its ``grad`` plus the L1/L2
    penalty gradient on weights, then re-applies pruning masks so that
    pruned weights stay exactly zero."""

    def __init__(self, parameters, lr, l1, l2, where):
        self.parameters = _parameter_list(parameters, where)
        if not self.parameters:
            raise ValueError(f"{where}: got no parameters to optimize")
        first = self.parameters[0].value
        for p in self.parameters[1:]:
            if _device(p.value) != _device(first):
                raise TypeError(f"{where}: parameters are on mixed devices ({_library(first)} "
                                f"and {_library(p.value)})")
        self.lr = _real_in(lr, "lr", where, 0.0, math.inf, open_low=True)
        self.l1 = _real_in(l1, "l1", where, 0.0, math.inf)
        self.l2 = _real_in(l2, "l2", where, 0.0, math.inf)

    def _gradient(self, p: Parameter):
        if not p.is_weight or (self.l1 == 0.0 and self.l2 == 0.0):
            return p.grad
        grad = p.grad.copy()
        if self.l1:
            grad += self.l1 * _xp(p.value).sign(p.value)
        if self.l2:
            grad += self.l2 * p.value
        return grad

    def step(self) -> None:
        for i, p in enumerate(self.parameters):
            self._update(i, p, self._gradient(p))
            if p.mask is not None:
                p.value *= p.mask

    def _update(self, index: int, p: Parameter, grad) -> None:
        raise NotImplementedError


class SGD(_Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum, in PyTorch's
    form: ``v = momentum * v + g; w -= lr * v`` (v starts at g)."""

    def __init__(self, parameters, lr=0.01, *, momentum=0.0, l1=0.0, l2=0.0):
        where = "fusednn.nn.SGD"
        super().__init__(parameters, lr, l1, l2, where)
        self.momentum = _real_in(momentum, "momentum", where, 0.0, 1.0)
        self._velocity = [None] * len(self.parameters)

    def _update(self, index, p, grad):
        if self.momentum:
            v = self._velocity[index]
            if v is None:
                v = self._velocity[index] = grad.copy()
            else:
                v *= self.momentum
                v += grad
            grad = v
        p.value -= self.lr * grad


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction, as PyTorch's:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``. The L2
    penalty enters the gradient (classic Adam with weight decay, not
    AdamW)."""

    def __init__(self, parameters, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, l1=0.0, l2=0.0):
        where = "fusednn.nn.Adam"
        super().__init__(parameters, lr, l1, l2, where)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"{where}: betas must be a pair of numbers, got {betas!r}") from None
        self.betas = (_real_in(b1, "betas[0]", where, 0.0, 1.0),
                      _real_in(b2, "betas[1]", where, 0.0, 1.0))
        if self.betas[0] == 1.0 or self.betas[1] == 1.0:
            raise ValueError(f"{where}: betas must be below 1, got {betas!r}")
        self.eps = _real_in(eps, "eps", where, 0.0, math.inf, open_low=True)
        self._moments = [None] * len(self.parameters)
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        super().step()

    def _update(self, index, p, grad):
        b1, b2 = self.betas
        if self._moments[index] is None:
            xp = _xp(p.value)
            self._moments[index] = (xp.zeros_like(p.value), xp.zeros_like(p.value))
        m, v = self._moments[index]
        m *= b1
        m += (1.0 - b1) * grad
        v *= b2
        v += (1.0 - b2) * grad * grad
        xp = _xp(p.value)
        step_size = self.lr / (1.0 - b1 ** self.steps)
        denominator = xp.sqrt(v / (1.0 - b2 ** self.steps)) + self.eps
        p.value -= step_size * m / denominator


def prune_by_magnitude(parameters, fraction, *, scope="layer") -> float:
    """Zeroes the ``fraction`` of weights with the smallest magnitude and
    sets each weight's ``mask`` so that optimizers keep them zero.

    Acts on the weights (``Parameter.is_weight``) of a model or a list of
    Parameters. ``scope='layer'`` prunes that fraction of every weight
    array; ``'global'`` ranks all weights together. Exactly
    ``round(fraction * n)`` are zeroed (ties by position); weights pruned
    before count among the smallest, so pruning more later only adds to
    them. Returns the fraction of weights now zero.
    """
    where = "fusednn.nn.prune_by_magnitude"
    fraction = _real_in(fraction, "fraction", where, 0.0, 1.0)
    if scope not in ("layer", "global"):
        raise ValueError(f"{where}: scope must be 'layer' or 'global', got {scope!r}")
    weights = [p for p in _parameter_list(parameters, where) if p.is_weight]
    if not weights:
        raise ValueError(f"{where}: no weights to prune (biases and batch-norm parameters "
                         "are never pruned)")
    groups = [[p] for p in weights] if scope == "layer" else [weights]
    for group in groups:
        xp = _xp(group[0].value)
        magnitudes = xp.concatenate([xp.abs(p.value).ravel() for p in group])
        keep = xp.ones(magnitudes.shape, dtype=group[0].value.dtype)
        count = int(round(fraction * magnitudes.size))
        keep[xp.argsort(magnitudes, kind="stable")[:count]] = 0
        start = 0
        for p in group:
            p.mask = keep[start:start + p.value.size].reshape(p.value.shape).astype(p.value.dtype)
            p.value *= p.mask
            start += p.value.size
    return sparsity(weights)


def sparsity(parameters) -> float:
    """Fraction of the weights (``Parameter.is_weight``) that are exactly zero."""
    weights = [p for p in _parameter_list(parameters, "fusednn.nn.sparsity") if p.is_weight]
    total = sum(p.value.size for p in weights)
    zeros = sum(int((p.value == 0).sum()) for p in weights)
    return zeros / total if total else 0.0


class EarlyStopping:
    """Stops training when a validation metric has not improved for
    ``patience`` checks, keeping a copy of the best model.

    ``update(metric, model)`` records one check and returns True when
    training should stop; an improvement is ``metric > best + min_delta``
    for ``mode='max'`` (accuracy), ``metric < best - min_delta`` for
    ``'min'`` (loss). ``restore(model)`` loads the best state back.
    """

    def __init__(self, patience=5, *, mode="max", min_delta=0.0):
        where = "fusednn.nn.EarlyStopping"
        self.patience = _positive_int(patience, "patience", where)
        if mode not in ("max", "min"):
            raise ValueError(f"{where}: mode must be 'max' or 'min', got {mode!r}")
        self.mode = mode
        self.min_delta = _real_in(min_delta, "min_delta", where, 0.0, math.inf)
        self.best = None
        self.best_check = None
        self.checks = 0
        self.best_state = None
        self._since_best = 0

    def update(self, metric, model: Layer) -> bool:
        if not isinstance(model, Layer):
            raise TypeError("fusednn.nn.EarlyStopping.update: model must be a fusednn.nn layer")
        metric = _real_in(metric, "metric", "fusednn.nn.EarlyStopping.update",
                          -math.inf, math.inf)
        improved = (self.best is None
                    or (metric > self.best + self.min_delta if self.mode == "max"
                        else metric < self.best - self.min_delta))
        if improved:
            self.best, self.best_check, self._since_best = metric, self.checks, 0
            self.best_state = model.state()
        else:
            self._since_best += 1
        self.checks += 1
        return self._since_best >= self.patience

    def restore(self, model: Layer) -> None:
        if self.best_state is None:
            raise RuntimeError("fusednn.nn.EarlyStopping.restore: no check recorded yet")
        model.load_state(self.best_state)
