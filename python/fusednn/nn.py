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

Around them: softmax cross-entropy and mean squared error, SGD with
momentum, Adam, L1/L2 penalties, magnitude pruning (masks kept through
training) and early stopping. And the lecture's other heuristics: growing
a hidden layer while training (``grow``, triggered by ``GrowOnPlateau``),
per-unit pretraining (``pretrain_units``), autoencoder pretraining
(``Autoencoder``, ``replace_head``) and pruning by the increase of the
loss (``prune``). Bad options raise when a layer is built; inputs of the
wrong shape, dtype or device raise on the call that receives them.
"""
from __future__ import annotations

import inspect
import math
import numbers

import numpy as np

from . import _arrays, _backend
from . import init as _init
from .activations import _check_name, _kernel_params, activation, activation_backward
from .batchnorm import batch_norm, batch_norm_backward
from .batchnorm_split import (_combine_rows, _stats_row, batch_norm_apply,
                              batch_norm_backward_apply, batch_norm_backward_reduce,
                              batch_norm_finalize, batch_norm_stats)
from .dropout import dropout, dropout_backward

__all__ = ["Activation", "Adam", "Autoencoder", "BatchNorm", "Dense", "Dropout", "EarlyStopping",
           "GROW_RULES", "GrowOnPlateau", "Layer", "Parameter", "Plateau", "SGD", "Sequential",
           "SyncBatchNorm",
           "accuracy", "grow", "mean_squared_error", "penalty", "pretrain_units", "prune",
           "prune_by_magnitude", "replace_head", "softmax", "softmax_cross_entropy",
           "sparsity"]

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
        fix = f"cast the input (x.astype('{like.dtype}'))"
        if x.dtype in _backend._SUPPORTED:
            fix += f" or build the layer with dtype='{x.dtype}'"
        raise TypeError(f"{where}: {what} has dtype {x.dtype} but the layer's parameters have "
                        f"dtype {like.dtype}; {fix}")


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
    """Where a layer's arrays live, from any device= that fn.init takes:
    'cpu', 'cuda', 'cuda:N', a torch.device, or an array to join. Layers
    hold numpy arrays on the CPU and CuPy arrays on a GPU, so the answer is
    'cpu' or 'cuda:N' (N resolved: 'cuda' is CuPy's current device); a
    torch.device or a torch or JAX array chooses the device, not the
    library."""
    if isinstance(device, str) and device == "cpu":  # the default, without a look-up
        return "cpu"
    place = _arrays.device_place(where.removeprefix("fusednn."), device, kernels=False)
    return "cpu" if place.kind == "cpu" else f"cuda:{place.device}"


def _on_device(a, device: str) -> bool:
    """Whether array a lives on `device` ('cpu' or 'cuda:N')."""
    if device == "cpu":
        return _device(a) == "cpu"
    return _device(a) == "cuda" and f"cuda:{a.device.id}" == device


def _full(value, shape, dtype, device: str):
    """An array of `value` on `device` ('cpu' or 'cuda:N', from _device_arg,
    which has made sure CuPy imports for a GPU)."""
    if device == "cpu":
        return np.full(shape, value, dtype=dtype)
    import cupy
    with cupy.cuda.Device(int(device[len("cuda:"):])):
        return cupy.full(shape, value, dtype=dtype)


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
    an ``fn.init`` initializer (default ``'glorot_uniform'``; any of
    ``fn.init.INITIALIZERS``) or a callable ``init(shape, *, seed, dtype,
    device)`` returning the weight; ``init_params`` are keyword options for
    it (``init='he_normal', init_params={'a': 0.1, 'mode': 'fan_out'}``,
    ``init='orthogonal', init_params={'gain': fn.init.calculate_gain('tanh')}``).
    The bias starts at ``bias_init`` (0 by default; PyTorch draws it at
    random).
    """

    def __init__(self, in_features, out_features, *, init="glorot_uniform", init_params=None,
                 bias=True, bias_init=0.0, seed=None, dtype="float32", device="cpu"):
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
        if init_params is None:
            init_params = {}
        if not isinstance(init_params, dict):
            raise TypeError(f"{where}: init_params must be a dict of keyword options, not "
                            f"{type(init_params).__name__}")
        self.init_name = init if isinstance(init, str) else getattr(init, "__name__", "custom")
        _check_init_params(initializer, init_params, self.init_name, where)
        if not isinstance(bias, bool):
            raise TypeError(f"{where}: bias must be True or False, not {bias!r}")
        bias_init = _real_in(bias_init, "bias_init", where, -math.inf, math.inf)
        self._initializer = initializer
        self.init_params = dict(init_params)
        shape = (self.out_features, self.in_features)
        weight = self._draw(shape, seed, dt.name, device, where)
        self.weight = Parameter(weight, "weight", is_weight=True)
        self.bias = (Parameter(_full(bias_init, (self.out_features,), dt, device), "bias")
                     if bias else None)
        self._x = None
        # Set by grow: the row and column boundaries of the blocks computed as
        # separate products until the next backward (see _product).
        self._blocks = None

    def _draw(self, shape, seed, dtype: str, device: str, where: str):
        weight = self._initializer(shape, seed=seed, dtype=dtype, device=device,
                                   **self.init_params)
        if (not _on_device(weight, device) or tuple(weight.shape) != shape
                or weight.dtype != np.dtype(dtype)):
            transposed = " (transposed: weights are (out, in))" if (
                tuple(weight.shape) == shape[::-1] and shape[0] != shape[1]) else ""
            raise ValueError(f"{where}: init returned a {_library(weight)} array of shape "
                             f"{tuple(weight.shape)}{transposed} and dtype {weight.dtype}; "
                             f"expected {shape}, {dtype}, on {device}")
        return weight

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
        y = self._product(x)
        if self.bias is not None:
            y += self.bias.value
        self._x = x
        return y

    def _product(self, x):
        """x @ weight.T. Right after grow, the units and inputs that existed
        before are kept in products of their old shapes: BLAS rounds a
        product differently once the matrix is wider (other tiles), and the
        model must compute exactly what it computed before it grew. The
        appended inputs add exact zeros (their weights are 0); the appended
        units are columns of their own."""
        w = self.weight.value
        if self._blocks is None:
            return x @ w.T
        rows, cols = self._blocks
        parts = []
        for r0, r1 in zip(rows[:-1], rows[1:]):
            part = x[:, cols[0]:cols[1]] @ w[r0:r1, cols[0]:cols[1]].T
            for c0, c1 in zip(cols[1:-1], cols[2:]):
                part += x[:, c0:c1] @ w[r0:r1, c0:c1].T
            parts.append(part)
        return parts[0] if len(parts) == 1 else _xp(x).concatenate(parts, axis=1)

    def backward(self, grad_output):
        x = self._saved("_x")
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        _check_matches(grad_output, self.weight.value, "grad_output", repr(self))
        if tuple(grad_output.shape) != (x.shape[0], self.out_features):
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"expected {(x.shape[0], self.out_features)}")
        # A training step follows, after which nothing is to be kept exact.
        self._blocks = None
        xp = _xp(x)
        xp.matmul(grad_output.T, x, out=self.weight.grad)
        if self.bias is not None:
            grad_output.sum(axis=0, out=self.bias.grad)
        return grad_output @ self.weight.value


def _check_init_params(initializer, params: dict, name: str, where: str) -> None:
    """Unknown options fail when the layer is built, naming the ones the
    initializer takes."""
    try:
        signature = inspect.signature(initializer)
    except (TypeError, ValueError):  # builtins without a signature: left to the call
        return
    try:
        signature.bind((1, 1), seed=None, dtype="float32", device="cpu", **params)
    except TypeError:
        accepted = [p for p, v in signature.parameters.items()
                    if v.kind == v.KEYWORD_ONLY and p not in ("seed", "dtype", "device")]
        raise TypeError(f"{where}: init {name!r} does not take {sorted(params)}; its options "
                        f"are {accepted}") from None


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
    ``running_mean`` (zeros) and ``running_var`` (ones) updated in training
    and used in eval mode, as ``torch.nn.BatchNorm*d``:

    - ``momentum`` (0.1): ``running = (1 - momentum) * running + momentum *
      batch``; ``momentum=None`` is the cumulative moving average, the
      factor ``1 / num_batches_tracked``, so that after k training batches
      the running statistics are the plain means of the k batch statistics.
    - ``track_running_stats=False``: no running statistics (the attributes
      are None); eval mode normalizes with the batch statistics too.
    - ``num_batches_tracked`` counts the training batches (when tracking).
    """

    def __init__(self, num_features, *, axis=1, momentum=0.1, eps=1e-5, affine=True,
                 track_running_stats=True, dtype="float32", device="cpu"):
        where = "fusednn.nn.BatchNorm"
        self.num_features = _positive_int(num_features, "num_features", where)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"{where}: axis must be an integer, not {type(axis).__name__}")
        self.axis = int(axis)
        self.momentum = None if momentum is None else _real_in(momentum, "momentum", where,
                                                               0.0, 1.0)
        self.eps = _real_in(eps, "eps", where, 0.0, math.inf, open_low=True)
        if not isinstance(affine, bool):
            raise TypeError(f"{where}: affine must be True or False, not {affine!r}")
        if not isinstance(track_running_stats, bool):
            raise TypeError(f"{where}: track_running_stats must be True or False, "
                            f"not {track_running_stats!r}")
        self.track_running_stats = track_running_stats
        dt = _dtype(dtype, where)
        device = _device_arg(device, where)
        shape = (self.num_features,)
        self.gamma = Parameter(_full(1.0, shape, dt, device), "gamma") if affine else None
        self.beta = Parameter(_full(0.0, shape, dt, device), "beta") if affine else None
        self.running_mean = _full(0.0, shape, dt, device) if track_running_stats else None
        self.running_var = _full(1.0, shape, dt, device) if track_running_stats else None
        self.num_batches_tracked = 0
        self._saved_forward = None

    def __repr__(self) -> str:
        return f"BatchNorm({self.num_features}, axis={self.axis})"

    def parameters(self) -> list[Parameter]:
        return [] if self.gamma is None else [self.gamma, self.beta]

    def buffers(self) -> dict:
        if not self.track_running_stats:
            return {}
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def _checked_input(self, x):
        """x after the checks of every forward: an array of the layer's
        library, device and dtype with num_features channels on axis."""
        x = _check_array(x, "input", repr(self))
        if self.gamma is not None:
            _check_matches(x, self.gamma.value, "input", repr(self))
        elif self.running_mean is not None:
            _check_matches(x, self.running_mean, "input", repr(self))
        if not -x.ndim <= self.axis < x.ndim or x.shape[self.axis] != self.num_features:
            raise ValueError(f"{self!r}: expected {self.num_features} channels on axis "
                             f"{self.axis}, got input of shape {tuple(x.shape)}")
        return x

    def _checked_gradient(self, grad_output, x):
        """grad_output after the checks of every backward: x's library,
        device, dtype and shape."""
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        _check_matches(grad_output, x, "grad_output", repr(self))
        if grad_output.shape != x.shape:
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"expected {tuple(x.shape)}")
        return grad_output

    def _step_momentum(self) -> float:
        """The running statistics' update factor for this call, counting a
        training batch in num_batches_tracked: momentum, or with
        momentum=None the cumulative average's 1 / num_batches_tracked."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:
                momentum = 1.0 / self.num_batches_tracked
        return momentum

    def forward(self, x):
        x = self._checked_input(x)
        gamma = None if self.gamma is None else self.gamma.value
        beta = None if self.beta is None else self.beta.value
        # Batch statistics in training, and always without running ones.
        use_batch = self.training or not self.track_running_stats
        momentum = self._step_momentum()
        result = batch_norm(x, gamma, beta, self.running_mean, self.running_var,
                            training=use_batch, momentum=momentum, eps=self.eps,
                            axis=self.axis)
        self._saved_forward = (x, result.save_mean, result.save_invstd, use_batch)
        return result.y

    def backward(self, grad_output):
        x, mean, invstd, training = self._saved("_saved_forward")
        grad_output = self._checked_gradient(grad_output, x)
        gamma = None if self.gamma is None else self.gamma.value
        grad_input, grad_gamma, grad_beta = batch_norm_backward(
            grad_output, x, gamma, mean, invstd, axis=self.axis, training=training)
        if self.gamma is not None:
            self.gamma.grad[...] = grad_gamma
            self.beta.grad[...] = grad_beta
        return grad_input


class SyncBatchNorm(BatchNorm):
    """BatchNorm over the whole batch of a data-parallel run: every process
    of the mpi4py communicator ``comm`` holds a slice of the batch, and in
    training the statistics are those of all the slices together (the split
    phases of ``fusednn.batchnorm_split``). ``comm=None`` is one process:
    then it is ``BatchNorm``. Eval mode uses the running statistics, which
    every process updates identically.

    Per step and layer it sends one all-gather of ``2C + 1`` float64 values
    per process (count, mean and M2) in the forward pass and one all-reduce
    of ``2C`` values in the backward pass. ``gamma.grad`` and ``beta.grad``
    are this process's share of the batch's gradients: summing them over
    the processes, as the all-reduce of every other gradient does, gives
    the one-process gradients.

    CuPy arrays are sent as device buffers when ``cuda_aware=True`` (an MPI
    built with CUDA support); otherwise they are copied to the host and
    back around each exchange.
    """

    def __init__(self, num_features, comm=None, *, axis=1, momentum=0.1, eps=1e-5,
                 affine=True, track_running_stats=True, dtype="float32", device="cpu",
                 cuda_aware=False):
        super().__init__(num_features, axis=axis, momentum=momentum, eps=eps, affine=affine,
                         track_running_stats=track_running_stats, dtype=dtype, device=device)
        where = "fusednn.nn.SyncBatchNorm"
        if comm is not None and not all(hasattr(comm, name) for name in
                                        ("Allgather", "Allreduce", "Get_size")):
            raise TypeError(f"{where}: comm must be an mpi4py communicator (or None for one "
                            f"process), not {type(comm).__name__}")
        if not isinstance(cuda_aware, bool):
            raise TypeError(f"{where}: cuda_aware must be True or False, not {cuda_aware!r}")
        self.comm = comm
        self.cuda_aware = cuda_aware
        self._sync_saved = None

    def __repr__(self) -> str:
        size = 1 if self.comm is None else self.comm.Get_size()
        return f"SyncBatchNorm({self.num_features}, axis={self.axis}, processes={size})"

    def _exchange(self, local, gathered: bool):
        """All-gathers (gathered: one row per process) or all-reduces (sums)
        the 1-D float64 array `local` over comm. CuPy arrays go through the
        host unless the MPI is CUDA-aware."""
        from mpi4py import MPI
        xp = _xp(local)
        if xp is not np:
            if not self.cuda_aware:
                return xp.asarray(self._exchange(xp.asnumpy(local), gathered))
            xp.cuda.get_current_stream().synchronize()  # MPI reads outside the stream
        if gathered:
            received = xp.empty((self.comm.Get_size(), local.shape[0]), np.float64)
            self.comm.Allgather(local, received)
        else:
            received = xp.empty_like(local)
            self.comm.Allreduce(local, received, op=MPI.SUM)
        return received

    def forward(self, x):
        if self.comm is None or not self.training:
            self._sync_saved = None
            return super().forward(x)
        x = self._checked_input(x)
        local = _stats_row(batch_norm_stats(x, axis=self.axis),
                           _xp(x).empty(2 * self.num_features + 1, np.float64))
        merged = _combine_rows(self._exchange(local, gathered=True))
        momentum = self._step_momentum()
        tracked = self.track_running_stats
        invstd = batch_norm_finalize(merged.mean, merged.var, merged.count, eps=self.eps,
                                     running_mean=self.running_mean if tracked else None,
                                     running_var=self.running_var if tracked else None,
                                     momentum=momentum)
        gamma = None if self.gamma is None else self.gamma.value
        beta = None if self.beta is None else self.beta.value
        y = batch_norm_apply(x, merged.mean, invstd, gamma, beta, axis=self.axis)
        self._saved_forward = None
        self._sync_saved = (x, merged.mean, invstd, merged.count)
        return y

    def backward(self, grad_output):
        if self._sync_saved is None:
            return super().backward(grad_output)
        x, mean, invstd, count = self._sync_saved
        grad_output = self._checked_gradient(grad_output, x)
        sum_dy, sum_dy_xhat = batch_norm_backward_reduce(grad_output, x, mean, invstd,
                                                         axis=self.axis)
        if self.gamma is not None:
            self.gamma.grad[...] = sum_dy_xhat
            self.beta.grad[...] = sum_dy
        channels = self.num_features
        total = self._exchange(_xp(x).concatenate([sum_dy, sum_dy_xhat]), gathered=False)
        gamma = None if self.gamma is None else self.gamma.value
        return batch_norm_backward_apply(grad_output, x, mean, invstd, gamma, total[:channels],
                                         total[channels:], count, axis=self.axis)


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

    ``comm``: in data-parallel training, the mpi4py communicator whose
    ranks hold the slices of the batch in rank order. The seed is then rank
    0's (``seed=None`` draws it there and broadcasts it), and each training
    call finds where its slice starts in the whole batch (an exclusive scan
    of the element counts), so that the ranks' masks are the slices of the
    one-process mask of the whole batch (docs/distributed.md).
    """

    def __init__(self, p, *, seed=None, offset=0, comm=None):
        where = "fusednn.nn.Dropout"
        self.p = _real_in(p, "p", where, 0.0, 1.0)
        if comm is not None and not all(hasattr(comm, name) for name in ("bcast", "exscan")):
            raise TypeError(f"{where}: comm must be an mpi4py communicator (or None for one "
                            f"process), not {type(comm).__name__}")
        self.comm = comm
        if seed is None:
            seed = int(np.random.default_rng().integers(2 ** 63))
        if comm is not None:
            seed = comm.bcast(seed, root=0)
        for name, value in (("seed", seed), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{where}: {name} must be an integer, not {type(value).__name__}")
            if not 0 <= value < 2 ** 64:
                raise ValueError(f"{where}: {name} must be in [0, 2**64), got {value}")
        self.seed = int(seed)
        self.offset = int(offset)
        self._last = None  # ("eval",) or ("train", offset, shape, start) of the last forward

    def __repr__(self) -> str:
        return f"Dropout({self.p:g}, seed={self.seed})"

    def forward(self, x):
        x = _check_array(x, "input", repr(self))
        if not self.training:
            self._last = ("eval",)
            return x
        if self.offset >= 2 ** 64:
            raise ValueError(f"{self!r}: the 2**64 mask streams of this seed are used up")
        start = 0
        if self.comm is not None:
            start = self.comm.exscan(int(x.size)) or 0  # None on rank 0
        y = dropout(x, self.p, seed=self.seed, offset=self.offset, start=start)
        self._last = ("train", self.offset, tuple(x.shape), start)
        self.offset += 1
        return y

    def backward(self, grad_output):
        last = self._saved("_last")
        grad_output = _check_array(grad_output, "grad_output", repr(self))
        if last[0] == "eval":
            return grad_output
        _, offset, shape, start = last
        if tuple(grad_output.shape) != shape:
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"expected {shape}")
        return dropout_backward(grad_output, self.p, seed=self.seed, offset=offset, start=start)


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


def _resized(state, shape):
    """An optimizer's state for a parameter that ``grow`` widened: grow only
    appends (units at the end of axis 0, inputs at the end of axis 1), so
    the old state goes in the leading corner and the new entries start at
    zero, as for a parameter never updated."""
    if tuple(state.shape) == tuple(shape):
        return state
    wider = _xp(state).zeros(shape, dtype=state.dtype)
    wider[tuple(slice(0, d) for d in state.shape)] = state
    return wider


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
                v = self._velocity[index] = _resized(v, p.value.shape)
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
        m, v = (_resized(a, p.value.shape) for a in self._moments[index])
        self._moments[index] = (m, v)
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


class Plateau:
    """Tells when a metric has stopped improving: ``update(metric)`` records
    one check and returns True once ``patience`` checks in a row brought no
    improvement, where an improvement is ``metric < best - min_delta`` for
    ``mode='min'`` (a loss, the default) and ``metric > best + min_delta``
    for ``'max'`` (accuracy). ``reset()`` forgets the best value, e.g.
    after the model changed (``GrowOnPlateau`` grows it)."""

    def __init__(self, patience=5, *, mode="min", min_delta=0.0):
        where = f"fusednn.nn.{type(self).__name__}"
        self.patience = _positive_int(patience, "patience", where)
        if mode not in ("max", "min"):
            raise ValueError(f"{where}: mode must be 'max' or 'min', got {mode!r}")
        self.mode = mode
        self.min_delta = _real_in(min_delta, "min_delta", where, 0.0, math.inf)
        self.checks = 0
        self.reset()

    def reset(self) -> None:
        self.best = None
        self.best_check = None
        self._since_best = 0

    def _record(self, metric) -> bool:
        """Records one check; returns whether it improved on the best."""
        metric = _real_in(metric, "metric", f"fusednn.nn.{type(self).__name__}.update",
                          -math.inf, math.inf)
        improved = (self.best is None
                    or (metric > self.best + self.min_delta if self.mode == "max"
                        else metric < self.best - self.min_delta))
        if improved:
            self.best, self.best_check, self._since_best = metric, self.checks, 0
        else:
            self._since_best += 1
        self.checks += 1
        return improved

    def update(self, metric) -> bool:
        self._record(metric)
        return self._since_best >= self.patience


class EarlyStopping(Plateau):
    """Stops training when a validation metric has not improved for
    ``patience`` checks (``Plateau``'s rule), keeping a copy of the best
    model.

    ``update(metric, model)`` records one check and returns True when
    training should stop; ``mode`` defaults to ``'max'`` (accuracy).
    ``restore(model)`` loads the best state back.
    """

    def __init__(self, patience=5, *, mode="max", min_delta=0.0):
        super().__init__(patience, mode=mode, min_delta=min_delta)
        self.best_state = None

    def update(self, metric, model: Layer) -> bool:
        if not isinstance(model, Layer):
            raise TypeError("fusednn.nn.EarlyStopping.update: model must be a fusednn.nn layer")
        if self._record(metric):
            self.best_state = model.state()
        return self._since_best >= self.patience

    def restore(self, model: Layer) -> None:
        if self.best_state is None:
            raise RuntimeError("fusednn.nn.EarlyStopping.restore: no check recorded yet")
        model.load_state(self.best_state)


# ---- helpers for whole-model procedures ------------------------------------------


def _flat_layers(model, where: str) -> list[Layer]:
    """The layers a Sequential applies, nested Sequentials expanded in place."""
    if not isinstance(model, Sequential):
        raise TypeError(f"{where}: model must be a fusednn.nn.Sequential, not "
                        f"{type(model).__name__}")
    flat = []
    for layer in model.layers:
        flat.extend(_flat_layers(layer, where) if isinstance(layer, Sequential) else [layer])
    return flat


def _position(layers: list[Layer], layer, where: str) -> int:
    for i, candidate in enumerate(layers):
        if candidate is layer:
            if not isinstance(layer, Dense):
                raise TypeError(f"{where}: {layer!r} is not a Dense layer")
            return i
    raise ValueError(f"{where}: {layer!r} is not a layer of the model")


def _check_data(data, like, where: str):
    """data=(x, labels): x (n, features) on like's device and of its dtype,
    labels n integer class indices."""
    if data is None:
        raise ValueError(f"{where}: needs data=(x, labels) to evaluate the loss on")
    try:
        x, labels = data
    except (TypeError, ValueError):
        raise TypeError(f"{where}: data must be a pair (x, labels), got "
                        f"{type(data).__name__}") from None
    x = _check_array(x, "data's x", where)
    labels = _check_array(labels, "data's labels", where)
    _check_matches(x, like, "data's x", where)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{where}: data's x must be (samples, features) with samples > 0, "
                         f"got {tuple(x.shape)}")
    if _device(labels) != _device(x) or labels.dtype.kind not in "iu" or (
            tuple(labels.shape) != (x.shape[0],)):
        raise ValueError(f"{where}: data's labels must be {x.shape[0]} integer class indices "
                         f"on x's device, got {_library(labels)} {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    return x, labels


def _generator(seed, where: str) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or seed < 0):
        raise ValueError(f"{where}: seed must be a non-negative int, None or a "
                         f"numpy.random.Generator, got {seed!r}")
    return np.random.default_rng(seed)


def _per_sample_loss(logits, labels):
    """softmax_cross_entropy of each row, in float64 so that differences of
    mean losses keep the digits they are ranked by."""
    logits, labels = _check_logits_labels(logits, labels, "fusednn.nn")
    xp = _xp(logits)
    # Classes first: numpy reduces a few long rows many times faster than
    # many rows of ten.
    z = xp.ascontiguousarray(logits.T, dtype=np.float64)
    shifted = z - z.max(axis=0)
    return xp.log(xp.exp(shifted).sum(axis=0)) - shifted[labels, xp.arange(z.shape[1])]


def _forward(layers: list[Layer], x):
    for layer in layers:
        x = layer.forward(x)
    return x


class _Evaluating:
    """Runs a block with the model in eval mode and every Dense's pending
    growth blocks kept, whatever the block's forward and backward calls do."""

    def __init__(self, model: Layer, layers: list[Layer]):
        self.model, self.layers = model, layers

    def __enter__(self):
        self.was_training = self.model.training
        self.blocks = [(layer, layer._blocks) for layer in self.layers
                       if isinstance(layer, Dense)]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        for layer, blocks in self.blocks:
            layer._blocks = blocks
        return False


def mean_squared_error(output, target):
    """``mean((output - target)^2)`` over all elements (PyTorch's MSELoss)
    and its gradient ``2 (output - target) / size``; returns ``(loss,
    grad)`` like ``softmax_cross_entropy``."""
    where = "fusednn.nn.mean_squared_error"
    output = _check_array(output, "output", where)
    target = _check_array(target, "target", where)
    if output.shape != target.shape or output.size == 0:
        raise ValueError(f"{where}: output {tuple(output.shape)} and target "
                         f"{tuple(target.shape)} must have one non-empty shape")
    _check_matches(target, output, "target", where)
    diff = output - target
    return float((diff * diff).mean()), diff * (2.0 / diff.size)


# ---- growing a network -----------------------------------------------------------

GROW_RULES = ("subsample", "hardest", "input_subset", "restarts")
# How the rules train a new unit (full-batch Adam on the rule's data):
GROW_SUBSAMPLE = 0.5   # "subsample": this fraction of the samples, drawn at random
GROW_HARDEST = 0.25    # "hardest": this fraction of the samples, those of largest loss
GROW_INPUTS = 0.5      # "input_subset": each new unit sees this fraction of the inputs
GROW_RESTARTS = 5      # "restarts": this many random starts, the best one kept
GROW_STEPS = 100
GROW_LR = 0.01


def grow(model, layer, *, units=1, rule="subsample", data=None, seed=None) -> int:
    """Adds ``units`` units to the Dense ``layer`` of ``model`` in place and
    returns its new width; right after the call the model computes exactly
    what it computed before.

    The layer's outputs widen, and with them the inputs of the next Dense
    and any BatchNorm between the two (Activation and Dropout layers there
    are elementwise and need nothing). The new units' outgoing weights (the
    next Dense's new columns) are zero, so they add nothing yet, and the
    existing products keep their old shapes until the next backward (see
    Dense), so the outputs match bit for bit. In training mode a Dropout
    between the layers draws its masks over the wider array, so its random
    draw differs; the function it draws from does not.

    The new units' incoming weights and bias are not random: they are
    trained, as the lecture has it, to fit the error the network makes
    now. With everything else fixed, the units, followed by copies of the
    layers between and a linear readout, are fitted by least squares to
    the residual ``-dLoss/dz`` (per sample) at the next Dense's output z,
    the direction in which a new column of that Dense would lower the loss
    fastest: once backpropagation resumes, the zero outgoing weights get a
    large gradient at once. Which data the fit sees is the ``rule``:

    - ``'subsample'``: a random ``GROW_SUBSAMPLE`` of the samples;
    - ``'hardest'``: the ``GROW_HARDEST`` of the samples with the largest loss;
    - ``'input_subset'``: all samples, each new unit connected to a random
      ``GROW_INPUTS`` of the layer's inputs (its other weights stay zero);
    - ``'restarts'``: all samples, from ``GROW_RESTARTS`` random starts,
      keeping the fit of least error.

    ``data=(x, labels)``: the model's inputs and class labels; the loss is
    ``softmax_cross_entropy`` of the model's output, computed in eval mode.
    ``seed``: int, None or a numpy Generator, for the draws of the rule and
    the new units' starting weights (the layer's own ``init``). Optimizer
    state (momentum, Adam's moments) and pruning masks widen with the
    parameters: the new entries start at zero, and unpruned.
    """
    where = "fusednn.nn.grow"
    layers = _flat_layers(model, where)
    position = _position(layers, layer, where)
    units = _positive_int(units, "units", where)
    if rule not in GROW_RULES:
        raise ValueError(f"{where}: rule must be one of {', '.join(GROW_RULES)}, got {rule!r}")
    between, following = [], None
    for candidate in layers[position + 1:]:
        if isinstance(candidate, Dense):
            following = candidate
            break
        if not isinstance(candidate, (Activation, BatchNorm, Dropout)):
            raise ValueError(f"{where}: {candidate!r} follows {layer!r}; only Activation, "
                             "BatchNorm and Dropout layers may stand before the next Dense")
        between.append(candidate)
    if following is None:
        raise ValueError(f"{where}: {layer!r} is the model's last Dense; its outputs are the "
                         "model's outputs, grow a hidden layer")
    x, labels = _check_data(data, layer.weight.value, where)
    if x.shape[0] < 2:
        raise ValueError(f"{where}: data must hold at least 2 samples")
    rng = _generator(seed, where)
    end = layers.index(following)

    with _Evaluating(model, layers):
        inputs = _forward(layers[:position], x)
        z = _forward(layers[position:end + 1], inputs)
        logits = _forward(layers[end + 1:], z)
        losses = _per_sample_loss(logits, labels)
        _, grad = softmax_cross_entropy(logits, labels)
        for later in reversed(layers[end + 1:]):
            grad = later.backward(grad)
    residual = grad * (-float(x.shape[0]))

    xp = _xp(x)
    n, k = inputs.shape
    rows, mask = None, None
    if rule == "subsample":
        rows = xp.asarray(rng.choice(n, max(2, round(GROW_SUBSAMPLE * n)), replace=False))
    elif rule == "hardest":
        order = np.argsort(-_to_numpy(losses), kind="stable")
        rows = xp.asarray(order[:max(2, round(GROW_HARDEST * n))])
    elif rule == "input_subset":
        chosen = max(1, round(GROW_INPUTS * k))
        mask = np.zeros((units, k), dtype=inputs.dtype)
        for row in mask:
            row[rng.choice(k, chosen, replace=False)] = 1
        mask = xp.asarray(mask)
    fit_inputs = inputs if rows is None else inputs[rows]
    fit_target = residual if rows is None else residual[rows]
    starts = GROW_RESTARTS if rule == "restarts" else 1
    candidate = min((_fit_units(layer, between, following, fit_inputs, fit_target, units,
                                rng, mask) for _ in range(starts)),
                    key=lambda fitted: fitted[0])[1]
    _install_units(layer, between, following, candidate, inputs, units)
    return layer.out_features


def _to_numpy(a):
    return a.get() if _backend.is_cupy_array(a) else np.asarray(a)


def _fit_units(layer: Dense, between, following: Dense, inputs, target, units, rng, mask):
    """Trains new units (with copies of the layers between and a readout) to
    fit the residual; returns (final mean squared error, the small model)."""
    dtype, device = layer.weight.value.dtype.name, layer.weight.value
    wide = (layer.out_features + units, layer.in_features)
    dense = Dense(layer.in_features, units, init=_rows_of(layer, wide),
                  bias=layer.bias is not None, seed=rng, dtype=dtype, device=device)
    if mask is not None:
        dense.weight.mask = mask
        dense.weight.value *= mask
    copies = []
    for b in between:
        if isinstance(b, Activation):
            copies.append(Activation(b.name, **b.params))
        elif isinstance(b, BatchNorm):
            copies.append(BatchNorm(units, axis=b.axis, momentum=b.momentum, eps=b.eps,
                                    affine=b.gamma is not None,
                                    track_running_stats=b.track_running_stats, dtype=dtype,
                                    device=device))
    readout = Dense(units, following.out_features, bias=False, seed=rng, dtype=dtype,
                    device=device)
    model = Sequential(dense, *copies, readout)
    optimizer = Adam(model.parameters(), lr=GROW_LR)
    for _ in range(GROW_STEPS):
        _, grad = mean_squared_error(model(inputs), target)
        model.backward(grad)
        optimizer.step()
    error, _ = mean_squared_error(model(inputs), target)
    return error, model


def _rows_of(layer: Dense, wide: tuple[int, int]):
    """An initializer drawing the last rows of the layer's own initializer at
    its grown shape, so new units start as the layer's units did."""
    def initializer(shape, *, seed, dtype, device):
        return layer._initializer(wide, seed=seed, dtype=dtype, device=device,
                                  **layer.init_params)[wide[0] - shape[0]:]
    initializer.__name__ = layer.init_name
    return initializer


def _install_units(layer: Dense, between, following: Dense, candidate: Sequential, inputs,
                   units: int) -> None:
    """Appends the trained units to the layer, their channels to any
    BatchNorm between, and zero columns to the next Dense."""
    xp = _xp(inputs)
    dense = candidate.layers[0]
    old_out, old_in = layer.out_features, following.in_features

    def widen(p: Parameter, extra, axis: int, mask_value=1.0):
        p.value = xp.concatenate([p.value, extra.astype(p.value.dtype)], axis=axis)
        p.grad = xp.zeros_like(p.value)
        if p.mask is not None:
            p.mask = xp.concatenate([p.mask, xp.full(extra.shape, mask_value, p.mask.dtype)],
                                    axis=axis)

    widen(layer.weight, dense.weight.value, 0)
    if layer.bias is not None:
        widen(layer.bias, dense.bias.value, 0)
    pre = dense.forward(inputs)  # the new units' pre-activations on all the data
    copies = iter(c for c in candidate.layers[1:-1] if isinstance(c, BatchNorm))
    for b in between:
        if isinstance(b, BatchNorm):
            trained = next(copies)
            if b.gamma is not None:
                widen(b.gamma, trained.gamma.value, 0)
                widen(b.beta, trained.beta.value, 0)
            if b.track_running_stats:
                var = (pre.var(axis=0, ddof=1) if pre.shape[0] > 1
                       else xp.ones(units, pre.dtype))
                b.running_mean = xp.concatenate([b.running_mean, pre.mean(axis=0)])
                b.running_var = xp.concatenate([b.running_var, var.astype(pre.dtype)])
            b.num_features += units
    widen(following.weight, xp.zeros((following.out_features, units), inputs.dtype), 1)
    layer.out_features += units
    following.in_features += units
    rows, cols = layer._blocks or ((0, old_out), (0, layer.in_features))
    layer._blocks = (rows + (layer.out_features,), cols)
    rows, cols = following._blocks or ((0, following.out_features), (0, old_in))
    following._blocks = (rows, cols + (following.in_features,))


class GrowOnPlateau:
    """Grows ``layer`` of ``model`` by ``units`` (``grow`` with ``rule``)
    each time the training loss stalls, until it is ``max_width`` wide.

    ``update(loss, data)``, once per epoch with that epoch's training loss,
    feeds a ``Plateau(patience, min_delta=min_delta)`` (EarlyStopping's rule
    on a loss) and grows when it reports a plateau; it returns True when it
    grew. ``history`` lists (check, width) after each growth.
    """

    def __init__(self, model, layer, max_width, *, units=1, rule="subsample", patience=3,
                 min_delta=0.0, seed=None):
        where = "fusednn.nn.GrowOnPlateau"
        _position(_flat_layers(model, where), layer, where)
        self.model, self.layer = model, layer
        self.max_width = _positive_int(max_width, "max_width", where)
        self.units = _positive_int(units, "units", where)
        if rule not in GROW_RULES:
            raise ValueError(f"{where}: rule must be one of {', '.join(GROW_RULES)}, got "
                             f"{rule!r}")
        self.rule = rule
        self.plateau = Plateau(patience, min_delta=min_delta)
        self.rng = _generator(seed, where)
        self.history = []

    @property
    def full(self) -> bool:
        return self.layer.out_features >= self.max_width

    def update(self, loss, data) -> bool:
        if not self.plateau.update(loss) or self.full:
            return False
        width = grow(self.model, self.layer, units=min(self.units,
                                                       self.max_width - self.layer.out_features),
                     rule=self.rule, data=data, seed=self.rng)
        self.history.append((self.plateau.checks, width))
        self.plateau.reset()
        return True


# ---- pretraining -----------------------------------------------------------------


def pretrain_units(model, layer, data, *, fraction=0.5, steps=200, lr=0.01, seed=None):
    """The lecture's per-unit pretraining: each unit of the Dense ``layer``
    is trained on its own random ``fraction`` of ``data=(x, labels)``, as a
    one-unit network with its own readout, so that each picks up features
    of its own sample; the units are then joined, and training continues
    on all the data (the caller's loop).

    ``layer`` must feed the model's last Dense (the readout) through
    Activation and Dropout layers only (Dropout is left out while units
    train). Unit j computes ``f(x . w_j + c_j)`` from the layer's inputs
    (the earlier layers run in eval mode) and class scores
    ``a_j * v_j + b_j``; all units train at once, each by full-batch Adam
    (``steps``, ``lr``) on the softmax cross-entropy over its own sample.
    They start from the layer's and the readout's current weights. Joined,
    the readout's column j is ``v_j / H`` and its bias the mean of the
    ``b_j``: the model's scores are the mean of the H units' scores, an
    ensemble of one-unit networks, which backpropagation then refines.
    Returns each unit's final loss on its own sample (float64, length H).
    """
    where = "fusednn.nn.pretrain_units"
    layers = _flat_layers(model, where)
    position = _position(layers, layer, where)
    fraction = _real_in(fraction, "fraction", where, 0.0, 1.0, open_low=True)
    steps = _positive_int(steps, "steps", where)
    lr = _real_in(lr, "lr", where, 0.0, math.inf, open_low=True)
    rest = layers[position + 1:]
    if not rest or not isinstance(rest[-1], Dense) or not all(
            isinstance(b, (Activation, Dropout)) for b in rest[:-1]):
        raise ValueError(f"{where}: {layer!r} must be followed by Activation and Dropout "
                         "layers only, then the model's last Dense")
    readout = rest[-1]
    activations = [b for b in rest[:-1] if isinstance(b, Activation)]
    x, labels = _check_data(data, layer.weight.value, where)
    rng = _generator(seed, where)
    with _Evaluating(model, layers):
        inputs = _forward(layers[:position], x)
    xp = _xp(inputs)
    n, units, classes = inputs.shape[0], layer.out_features, readout.out_features
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"{where}: labels must lie in [0, {classes})")
    size = max(1, round(fraction * n))
    sample = np.zeros((n, units))
    for j in range(units):
        sample[rng.choice(n, size, replace=False), j] = 1.0 / size
    sample = xp.asarray(sample.astype(inputs.dtype))  # (n, H): each unit's weights over rows

    w = Parameter(layer.weight.value.copy(), "w")
    v = Parameter(xp.ascontiguousarray(readout.weight.value.T), "v")       # (H, classes)
    params = [w, v]
    c = b = None
    if layer.bias is not None:
        c = Parameter(layer.bias.value.copy(), "c")
        params.append(c)
    if readout.bias is not None:
        b = Parameter(xp.tile(readout.bias.value, (units, 1)), "b")       # (H, classes)
        params.append(b)
    onehot = xp.zeros((n, 1, classes), dtype=inputs.dtype)
    onehot[xp.arange(n), 0, labels] = 1
    optimizer = Adam(params, lr=lr)
    for step in range(steps + 1):
        pre = inputs @ w.value.T                                           # (n, H)
        if c is not None:
            pre += c.value
        saved, a = [], pre
        for act in activations:
            saved.append(a)
            a = activation(act.name, a, **act.params)
        scores = a[:, :, None] * v.value                                   # (n, H, classes)
        if b is not None:
            scores += b.value
        shifted = scores - scores.max(axis=2, keepdims=True)
        exp = xp.exp(shifted)
        total = exp.sum(axis=2, keepdims=True)
        if step == steps:
            per_row = xp.log(total[:, :, 0]) - (shifted * onehot).sum(axis=2)
            losses = (per_row.astype(np.float64) * sample).sum(axis=0)
            break
        grad_scores = (exp / total - onehot) * sample[:, :, None]
        v.grad[...] = (a[:, :, None] * grad_scores).sum(axis=0)
        if b is not None:
            b.grad[...] = grad_scores.sum(axis=0)
        grad = (grad_scores * v.value).sum(axis=2)                         # (n, H)
        for act, act_input in zip(reversed(activations), reversed(saved)):
            grad = activation_backward(act.name, grad, x=act_input, **act.params)
        xp.matmul(grad.T, inputs, out=w.grad)
        if c is not None:
            c.grad[...] = grad.sum(axis=0)
        optimizer.step()
    layer.weight.value[...] = w.value
    if c is not None:
        layer.bias.value[...] = c.value
    readout.weight.value[...] = v.value.T / units
    if b is not None:
        readout.bias.value[...] = b.value.mean(axis=0)
    return _to_numpy(losses)


class Autoencoder(Sequential):
    """An autoencoder whose encoder is the first ``layers`` layers of
    ``model`` (the same layer objects: training the autoencoder trains
    them in place) and whose decoder mirrors it: one Dense per encoder
    Dense in reverse order, ``Dense(out, in)`` with the encoder Dense's
    init, each but the last followed by the activation the encoder applies
    at that width. The last decoder layer is linear, reconstructing real
    inputs. BatchNorm and Dropout are not mirrored.

    ``fit(x, ...)`` trains it to reconstruct x (mean squared error, Adam);
    ``replace_head(autoencoder, *head)`` then cuts the decoder off and puts
    the task's layers in its place. ``encoder`` and ``decoder`` are the two
    halves as Sequentials.
    """

    def __init__(self, model, layers, *, seed=None):
        where = "fusednn.nn.Autoencoder"
        if not isinstance(model, Sequential):
            raise TypeError(f"{where}: model must be a fusednn.nn.Sequential, not "
                            f"{type(model).__name__}")
        layers = _positive_int(layers, "layers", where)
        if layers > len(model.layers):
            raise ValueError(f"{where}: the model has only {len(model.layers)} layers")
        encoder = list(model.layers[:layers])
        denses = [e for e in encoder if isinstance(e, Dense)]
        if not denses:
            raise ValueError(f"{where}: the encoder (the first {layers} layers) holds no Dense")
        rng = _generator(seed, where)
        after = {}  # id of an encoder Dense -> the first Activation after it
        current = None
        for e in encoder:
            if isinstance(e, Dense):
                current = e
            elif isinstance(e, Activation) and id(current) not in after:
                after[id(current)] = e
        decoder = []
        for i in range(len(denses) - 1, -1, -1):
            source = denses[i]
            value = source.weight.value
            decoder.append(Dense(source.out_features, source.in_features,
                                 init=source._initializer, init_params=source.init_params,
                                 bias=source.bias is not None, seed=rng,
                                 dtype=value.dtype.name, device=value))
            act = after.get(id(denses[i - 1])) if i > 0 else None
            if act is not None:
                decoder.append(Activation(act.name, **act.params))
        super().__init__(*encoder, *decoder)
        self.encoder = Sequential(*encoder)
        self.decoder = Sequential(*decoder)

    def __repr__(self) -> str:
        return f"Autoencoder(encoder={self.encoder!r}, decoder={self.decoder!r})"

    def fit(self, x, *, epochs=10, batch_size=64, lr=1e-3, seed=None) -> list[float]:
        """Minibatch Adam on the reconstruction error of x, the batches
        reshuffled every epoch; returns the error on all of x (eval mode)
        after each epoch."""
        where = "fusednn.nn.Autoencoder.fit"
        x = _check_array(x, "x", where)
        epochs = _positive_int(epochs, "epochs", where)
        batch_size = _positive_int(batch_size, "batch_size", where)
        rng = _generator(seed, where)
        optimizer = Adam(self.parameters(), lr=lr)
        history = []
        xp = _xp(x)
        for _ in range(epochs):
            self.train()
            order = xp.asarray(rng.permutation(x.shape[0]))
            for start in range(0, x.shape[0], batch_size):
                batch = x[order[start:start + batch_size]]
                if batch.shape[0] < 2:  # batch norm needs two samples per feature
                    continue
                _, grad = mean_squared_error(self(batch), batch)
                self.backward(grad)
                optimizer.step()
            self.eval()
            history.append(mean_squared_error(self(x), x)[0])
        self.train()
        return history


def replace_head(model, *head, keep=None) -> Sequential:
    """A new Sequential of the kept layers of ``model`` (the same objects)
    followed by ``head``: for an Autoencoder, its encoder (the decoder is
    cut off); for another Sequential, its first ``keep`` layers."""
    where = "fusednn.nn.replace_head"
    if isinstance(model, Autoencoder) and keep is None:
        kept = model.encoder.layers
    elif isinstance(model, Sequential):
        if keep is None:
            raise ValueError(f"{where}: say how many of the model's layers to keep (keep=)")
        keep = _positive_int(keep, "keep", where)
        kept = model.layers[:keep]
    else:
        raise TypeError(f"{where}: model must be a fusednn.nn.Sequential, not "
                        f"{type(model).__name__}")
    return Sequential(*kept, *head)


# ---- pruning by loss increase ----------------------------------------------------

# Layers with at most this many weights get the exact criterion; larger
# ones the second-order estimate.
PRUNE_EXACT_LIMIT = 4096
# Elements of the stacked batch the exact criterion evaluates at once.
_EXACT_CHUNK = 1 << 21


def prune(model, fraction, *, criterion="loss_increase", data=None, layers=None,
          restore_if_drop=None) -> float:
    """Zeroes ``fraction`` of the weights of each Dense in ``layers`` (all
    of the model's by default), the least significant by ``criterion``,
    sets their masks so that optimizers keep them zero, and returns the
    fraction of those layers' weights now zero.

    ``criterion='loss_increase'`` is the lecture's: how much the loss
    (``softmax_cross_entropy`` on ``data=(x, labels)``, a held-out batch,
    eval mode) grows when that one weight is set to zero. For a layer of at
    most ``PRUNE_EXACT_LIMIT`` weights it is computed exactly, weight by
    weight (all the zeroed variants of the layer's output go through the
    rest of the model as one stacked batch). For larger layers it is the
    standard second-order estimate ``-g w + h w^2 / 2`` (optimal brain
    damage, LeCun et al. 1990, with the gradient term kept since a trained
    net is not exactly at a minimum): g the gradient, h the diagonal of the
    Gauss-Newton approximation of the Hessian, computed exactly from the
    Jacobian of the logits. ``'magnitude'`` ranks by |w| (as
    ``prune_by_magnitude``).

    Weights pruned before stay pruned and count among the least
    significant. ``restore_if_drop``: the largest acceptable fall of
    accuracy on ``data`` (e.g. 0.01); when pruning ``fraction`` costs more,
    the last removed weights (the most significant of those removed, the
    same share in every layer) are put back, with their values, until the
    fall is within it (bisection on the share), so the returned sparsity
    may be below ``fraction``.
    """
    where = "fusednn.nn.prune"
    flat = _flat_layers(model, where)
    fraction = _real_in(fraction, "fraction", where, 0.0, 1.0)
    if criterion not in ("loss_increase", "magnitude"):
        raise ValueError(f"{where}: criterion must be 'loss_increase' or 'magnitude', got "
                         f"{criterion!r}")
    if layers is None:
        layers = [d for d in flat if isinstance(d, Dense)]
    else:
        layers = list(layers)
        for d in layers:
            _position(flat, d, where)
        if len({id(d) for d in layers}) != len(layers):
            raise ValueError(f"{where}: a layer is listed twice")
    if not layers:
        raise ValueError(f"{where}: no Dense layers to prune")
    if restore_if_drop is not None:
        restore_if_drop = _real_in(restore_if_drop, "restore_if_drop", where, 0.0, 1.0)
    needs_data = criterion == "loss_increase" or restore_if_drop is not None
    x, labels = _check_data(data, layers[0].weight.value, where) if needs_data else (None, None)

    if criterion == "magnitude":
        scores = {id(d): _xp(d.weight.value).abs(d.weight.value).astype(np.float64)
                  for d in layers}
    else:
        with _Evaluating(model, flat):
            scores = _loss_increase(flat, layers, x, labels)
    orders, saved, already = [], [], []
    for d in layers:
        p = d.weight
        xp = _xp(p.value)
        score = scores[id(d)].ravel().copy()
        pruned = xp.zeros(p.value.size, dtype=bool) if p.mask is None else p.mask.ravel() == 0
        score[pruned] = -np.inf  # earlier pruning stays, first in line
        orders.append(xp.argsort(score, kind="stable"))
        saved.append(p.value.copy())
        already.append(int(pruned.sum()))

    def apply(share: float) -> None:
        for d, order, value, before in zip(layers, orders, saved, already):
            p = d.weight
            xp = _xp(p.value)
            keep = xp.ones(p.value.size, dtype=p.value.dtype)
            keep[order[:max(before, int(round(share * p.value.size)))]] = 0
            p.mask = keep.reshape(p.value.shape)
            p.value[...] = value * p.mask

    def accuracy_on_data() -> float:
        with _Evaluating(model, flat):
            return accuracy(_forward(flat, x), labels)

    baseline = accuracy_on_data() if restore_if_drop is not None else None
    apply(fraction)
    if restore_if_drop is not None and baseline - accuracy_on_data() > restore_if_drop:
        low, high = 0.0, fraction  # low keeps the fall within bounds, high does not
        for _ in range(12):
            middle = (low + high) / 2
            apply(middle)
            if baseline - accuracy_on_data() <= restore_if_drop:
                low = middle
            else:
                high = middle
        apply(low)
    return sparsity([d.weight for d in layers])


def _loss_increase(flat: list[Layer], layers: list[Dense], x, labels) -> dict:
    """Per Dense in layers, an array of the weight's shape: the increase of
    the mean loss on (x, labels) when that weight alone is zeroed. The model
    is in eval mode, where every layer acts on each row by itself."""
    for layer in flat:
        if not isinstance(layer, (Dense, Activation, BatchNorm, Dropout)):
            raise ValueError(f"fusednn.nn.prune: the loss-increase criterion knows Dense, "
                             f"Activation, BatchNorm and Dropout layers, not {layer!r}")
    inputs = []
    a = x
    for layer in flat:
        inputs.append(a)
        a = layer.forward(a)
    scores = {}
    large = [d for d in layers if d.weight.value.size > PRUNE_EXACT_LIMIT]
    if large:
        scores.update(_second_order_estimate(flat, inputs, a, labels, large))
    for d in layers:
        if d.weight.value.size <= PRUNE_EXACT_LIMIT:
            i = flat.index(d)
            scores[id(d)] = _exact_increase(d, inputs[i], flat[i + 1:], labels)
    return scores


def _exact_increase(dense: Dense, x, rest: list[Layer], labels):
    """Zeroing w[o, i] changes only output column o, by -w[o, i] * x[:, i].
    Up to the next Dense that column stays a column (every layer between
    acts elementwise per unit), and the next Dense's output changes by the
    column's change times its weights to unit o; from there each zeroed
    variant goes through the rest of the model as a block of one stacked
    batch. Without a next Dense the zeroed variants of the whole output are
    stacked."""
    xp = _xp(x)
    z = dense.forward(x)
    n, m = z.shape
    w = dense.weight.value
    following = next((i for i, layer in enumerate(rest) if isinstance(layer, Dense)), None)
    if following is None:
        return _stacked_increase(z, w, x, rest, labels)
    between, nxt, after = rest[:following], rest[following], rest[following + 1:]
    a = _forward(between, z)
    y = nxt.forward(a)
    base = float(_per_sample_loss(_forward(after, y), labels).mean())
    widest = max([nxt.out_features] + [d.out_features for d in after if isinstance(d, Dense)])
    chunk = max(1, _EXACT_CHUNK // (n * widest))
    increase = np.empty(w.shape)
    for o in range(m):
        for start in range(0, w.shape[1], chunk):
            inputs = slice(start, min(start + chunk, w.shape[1]))
            count = inputs.stop - inputs.start
            column = z[:, o] - w[o, inputs][:, None] * x[:, inputs].T          # (count, n)
            change = _unit_forward(between, column, o) - a[:, o]
            stacked = y + change[:, :, None] * nxt.weight.value[:, o]          # (count, n, out)
            logits = _forward(after, stacked.reshape(count * n, nxt.out_features))
            losses = _per_sample_loss(logits, xp.tile(labels, count)).reshape(count, n)
            increase[o, inputs] = _to_numpy(losses.mean(axis=1)) - base
    return xp.asarray(increase)


def _unit_forward(layers: list[Layer], column, unit: int):
    """Unit `unit`'s values through elementwise layers in eval mode."""
    for layer in layers:
        if isinstance(layer, Activation):
            column = activation(layer.name, column, **layer.params)
        elif isinstance(layer, BatchNorm):
            scale = 1.0 / math.sqrt(float(layer.running_var[unit]) + layer.eps)
            shift = float(layer.running_mean[unit])
            if layer.gamma is None:
                column = (column - shift) * scale
            else:
                column = ((column - shift) * (scale * float(layer.gamma.value[unit]))
                          + float(layer.beta.value[unit]))
    return column


def _stacked_increase(z, w, x, rest: list[Layer], labels):
    xp = _xp(x)
    n, m = z.shape
    base = float(_per_sample_loss(_forward(rest, z), labels).mean())
    count = w.size
    chunk = max(1, _EXACT_CHUNK // (n * m))
    increase = np.empty(count)
    for start in range(0, count, chunk):
        index = np.arange(start, min(start + chunk, count))
        o, i = (xp.asarray(a) for a in np.divmod(index, w.shape[1]))
        stacked = xp.broadcast_to(z, (len(index), n, m)).copy()
        stacked[xp.arange(len(index)), :, o] -= w[o, i][:, None] * x[:, i].T
        logits = _forward(rest, stacked.reshape(len(index) * n, m))
        losses = _per_sample_loss(logits, xp.tile(labels, len(index)))
        increase[index] = _to_numpy(losses.reshape(len(index), n).mean(axis=1)) - base
    return xp.asarray(increase.reshape(w.shape))


def _second_order_estimate(flat: list[Layer], inputs: list, logits, labels,
                           wanted: list[Dense]) -> dict:
    """-g w + h w^2 / 2 for the weights of the Dense layers in wanted: g the
    gradient, h the diagonal of the Gauss-Newton matrix, sum over samples
    of J^T (diag(p) - p p^T) J / n with J the derivative of the sample's
    logits by the weight. One backward pass carries the gradient and the
    full Jacobian of the logits (one row per class), so h is exact for the
    Gauss-Newton matrix; OBD's cheaper recursion, which also drops the
    softmax's off-diagonal curvature, ranked hidden weights poorly."""
    xp = _xp(logits)
    n, classes = logits.shape
    z = logits.astype(np.float64)
    p = xp.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grad = p.copy()
    grad[xp.arange(n), labels] -= 1.0
    grad /= n
    # jacobian[c, i, j]: d logits[i, c] / d (input of the layers above)[i, j]
    jacobian = xp.broadcast_to(xp.eye(classes)[:, None, :], (classes, n, classes)).copy()
    weights = p.T[:, :, None]  # (classes, n, 1)
    deepest = min(flat.index(d) for d in wanted)
    scores = {}
    for layer, a in zip(reversed(flat[deepest:]), reversed(inputs[deepest:])):
        a64 = a.astype(np.float64)
        if isinstance(layer, Dense):
            w = layer.weight.value.astype(np.float64)
            if any(layer is d for d in wanted):
                mean = (weights * jacobian).sum(axis=0)
                curvature = (weights * jacobian * jacobian).sum(axis=0) - mean * mean
                g = grad.T @ a64
                h = curvature.T @ (a64 * a64) / n
                scores[id(layer)] = xp.asarray(-g * w + 0.5 * h * w * w)
            grad = grad @ w
            jacobian = jacobian @ w
        elif isinstance(layer, Activation):
            slope = activation_backward(layer.name, xp.ones_like(a), x=a,
                                        **layer.params).astype(np.float64)
            grad = grad * slope
            jacobian = jacobian * slope
        elif isinstance(layer, BatchNorm):
            shape = [1] * a.ndim
            shape[layer.axis] = layer.num_features
            scale = 1.0 / xp.sqrt(layer.running_var.astype(np.float64) + layer.eps)
            if layer.gamma is not None:
                scale = scale * layer.gamma.value
            grad = grad * scale.reshape(shape)
            jacobian = jacobian * scale.reshape(shape)
    return scores
