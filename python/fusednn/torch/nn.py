"""Drop-in ``torch.nn`` modules on fusednn's operators.

Each class subclasses the ``torch.nn`` module of the same name and replaces
only ``forward``: constructor arguments, parameters, buffers, ``state_dict``
keys, ``repr`` and ``isinstance`` checks are torch's own, so state dicts
load both ways and code that looks for ``torch.nn.BatchNorm2d`` still finds
one. ``BiasActivationDropout`` is new: the fused epilogue
``dropout(act(h + bias))`` after a bias-free ``Linear`` or convolution.

A forward that fusednn has no kernel for (a dtype such as float8_e4m3fn, a
device fusednn was not built for, an in-place activation) runs torch's own
forward instead, so a module is never less capable than the one it
replaces; ``fusednn.torch.patch`` reports such configurations when it can
see them in advance. The check reads only dtype and device, which
``torch.compile`` specializes on, so it adds no graph break.

``BatchNormReLU1d/2d/3d`` are the batch norms with the following ReLU
fused in (one pass forward, one backward), and ``FoldedReLU`` the ReLU
such a batch norm took over: it returns its input. ``fusednn.torch.patch``
puts both in place of a BatchNorm and the ReLU right after it.

Dropout draws its ``[seed, offset]`` from a ``torch.Generator`` per call
(``generator=None``: torch's default generator), so ``torch.manual_seed``
reproduces the masks, as with ``torch.nn.Dropout``; the module itself
holds no random state.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

import fusednn as fn
from . import ops

__all__ = [
    "ELU", "GELU", "SELU", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d",
    "BatchNormReLU2d", "BatchNormReLU3d", "BiasActivationDropout", "Dropout", "FoldedReLU",
    "Hardsigmoid", "Hardswish", "Hardtanh", "LeakyReLU", "Mish", "ReLU", "SiLU", "Sigmoid",
    "Softplus", "SyncBatchNorm", "Tanh", "supports",
]

_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Read once: forward consults it under torch.compile, which would not
# trace into fn.info().
_CUDA_BUILT = bool(fn.info()["cuda_built"])


@functools.cache
def _bfloat16_readable() -> bool:
    """Whether ml_dtypes, which describes bfloat16 buffers to fusednn, is
    installed (looked up without importing it)."""
    return importlib.util.find_spec("ml_dtypes") is not None


def supports(dtype: torch.dtype, device: torch.device | str) -> Optional[str]:
    """None when fusednn has kernels for tensors of this dtype on this
    device, else the reason it has not."""
    device = torch.device(device)
    if dtype == torch.bfloat16 and not _bfloat16_readable():
        return f"dtype {dtype}: fusednn reads bfloat16 tensors through ml_dtypes (pip install ml_dtypes)"
    if device.type == "cpu":
        if dtype in _CPU_DTYPES:
            return None
        return (f"dtype {dtype}: fusednn's CPU kernels take float32, float64, float16 and "
                "bfloat16")
    if device.type == "cuda":
        if not _CUDA_BUILT:
            return "CUDA tensors: this fusednn build has no CUDA module"
        if dtype in _CUDA_DTYPES:
            return None
        return (f"dtype {dtype}: fusednn's CUDA kernels take float32, float64, float16 and "
                "bfloat16")
    return f"device {device}: fusednn runs on the CPU and on CUDA GPUs"


# ---- batch normalization ----------------------------------------------------------


class _BatchNorm:
    """The forward of ``torch.nn.modules.batchnorm._BatchNorm`` (the same
    decisions about running statistics, momentum=None and eval mode) on
    fusednn's kernel; ``_relu``: a ReLU fused after it."""

    _relu = False

    def _step_momentum(self) -> float:
        """The running statistics' update factor for this call, counting a
        training batch in num_batches_tracked: momentum, or with
        momentum=None the cumulative average's 1 / num_batches_tracked."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if supports(input.dtype, input.device) is not None:
            output = super().forward(input)
            return torch.relu(output) if self._relu else output
        factor = self._step_momentum()
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Eval mode reads the running statistics; training updates them only
        # when they are tracked.
        tracked = not self.training or self.track_running_stats
        return ops.batch_norm(input, self.weight, self.bias,
                              self.running_mean if tracked else None,
                              self.running_var if tracked else None,
                              bn_training, factor, self.eps, 1, self._relu)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fusednn's batch-norm kernels."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fusednn's batch-norm kernels (NCHW and
    channels_last inputs; the output keeps the input's memory format)."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fusednn's batch-norm kernels."""


class BatchNormReLU1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` followed by a ReLU, fused: the forward
    writes relu(batch_norm(x)) in one pass, the backward masks the gradient
    by that output inside batch norm's own passes. Parameters, buffers and
    state_dict keys are BatchNorm1d's."""

    _relu = True


class BatchNormReLU2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` followed by a ReLU, fused (see
    BatchNormReLU1d); NCHW and channels_last."""

    _relu = True


class BatchNormReLU3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` followed by a ReLU, fused (see
    BatchNormReLU1d)."""

    _relu = True


class FoldedReLU(torch.nn.ReLU):
    """A ``torch.nn.ReLU`` whose work the batch norm before it does
    (``BatchNormReLU*d``): it returns its input, which is already
    relu(batch_norm(x)). Only ``fusednn.torch.patch`` makes one, for a
    ReLU that nothing else calls."""

    def forward(self, input: Tensor) -> Tensor:
        return input


# ---- activations ------------------------------------------------------------------


class _Activation:
    """Calls the fusednn operator ``_name`` with the module's parameters
    (attributes of the same names, as torch stores them)."""

    _name: str

    def forward(self, input: Tensor) -> Tensor:
        if getattr(self, "inplace", False) or \
                supports(input.dtype, input.device) is not None:
            return super().forward(input)
        params = {key: getattr(self, key) for key, _, _ in ops.ACTIVATION_PARAMETERS[self._name]}
        return ops.activation(self._name, input, **params)


def _activation_class(name: str, base: type, doc: str) -> type:
    return type(base.__name__, (_Activation, base),
                {"_name": name, "__doc__": doc, "__module__": __name__,
                 "__qualname__": base.__name__})


ReLU = _activation_class("relu", torch.nn.ReLU, "``torch.nn.ReLU`` on fusednn's kernels.")
LeakyReLU = _activation_class("leaky_relu", torch.nn.LeakyReLU,
                              "``torch.nn.LeakyReLU`` on fusednn's kernels.")
ELU = _activation_class("elu", torch.nn.ELU, "``torch.nn.ELU`` on fusednn's kernels.")
SELU = _activation_class("selu", torch.nn.SELU, "``torch.nn.SELU`` on fusednn's kernels.")
GELU = _activation_class("gelu", torch.nn.GELU,
                         "``torch.nn.GELU`` (approximate='none' or 'tanh') on fusednn's kernels.")
SiLU = _activation_class("silu", torch.nn.SiLU, "``torch.nn.SiLU`` on fusednn's kernels.")
Softplus = _activation_class("softplus", torch.nn.Softplus,
                             "``torch.nn.Softplus`` on fusednn's kernels.")
Mish = _activation_class("mish", torch.nn.Mish, "``torch.nn.Mish`` on fusednn's kernels.")
Hardsigmoid = _activation_class("hardsigmoid", torch.nn.Hardsigmoid,
                                "``torch.nn.Hardsigmoid`` on fusednn's kernels.")
Hardswish = _activation_class("hardswish", torch.nn.Hardswish,
                              "``torch.nn.Hardswish`` on fusednn's kernels.")
Hardtanh = _activation_class("hardtanh", torch.nn.Hardtanh,
                             "``torch.nn.Hardtanh`` on fusednn's kernels.")
Sigmoid = _activation_class("sigmoid", torch.nn.Sigmoid,
                            "``torch.nn.Sigmoid`` on fusednn's kernels.")
Tanh = _activation_class("tanh", torch.nn.Tanh, "``torch.nn.Tanh`` on fusednn's kernels.")


# ---- dropout ----------------------------------------------------------------------


def _rng_for_slice(rng: Tensor, input: Tensor, process_group) -> Tensor:
    """rng with the global index of input's first element appended when
    input is this rank's slice of a batch split over ``process_group`` (in
    rank order), so that the ranks' masks are the slices of the mask one
    process would draw for the whole batch (docs/distributed.md); rng
    itself without a group or without an initialized torch.distributed."""
    import torch.distributed as dist
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return rng
    sizes = [torch.zeros(1, dtype=torch.int64, device=input.device)
             for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(sizes, torch.tensor([input.numel()], dtype=torch.int64,
                                        device=input.device), group=process_group)
    rank = dist.get_rank(process_group)
    start = int(sum(size.item() for size in sizes[:rank]))
    return torch.cat([rng, torch.tensor([start], dtype=torch.int64)])


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout(p, inplace)`` on fusednn's dropout: the mask of a
    ``[seed, offset]`` drawn from ``generator`` (torch's default generator
    when None) at each training call; backward regenerates it from those
    two numbers instead of storing it. Eval mode returns the input.

    ``process_group``: in data-parallel training, the group whose ranks hold
    the slices of the batch in rank order (``torch.distributed.group.WORLD``
    for all of them). Every rank then draws the same ``[seed, offset]``
    (seed the generators alike) and the masks of the ranks' slices are the
    slices of the one-process mask of the whole batch, at the cost of an
    all-gather of one integer per call. None: this rank's mask as if its
    input were the whole batch."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *,
                 generator: Optional[torch.Generator] = None, process_group=None) -> None:
        super().__init__(p, inplace)
        self.generator = generator
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return input
        if self.inplace or supports(input.dtype, input.device) is not None:
            return super().forward(input)
        rng = ops.draw_rng(getattr(self, "generator", None))
        return ops.dropout(input, self.p,
                           _rng_for_slice(rng, input, getattr(self, "process_group", None)))


class BiasActivationDropout(torch.nn.Module):
    """The fused epilogue ``dropout(act(h + bias), p)`` in one pass, for the
    output of a bias-free ``Linear`` (``axis=-1``) or convolution
    (``axis=1``): a learned ``bias`` of ``num_features`` (zeros), then the
    activation ``activation`` (a name of ``fusednn.ACTIVATIONS``, with its
    PyTorch parameters as keywords, e.g. ``approximate='tanh'``), then
    inverted dropout with drop probability ``p`` in training (none in eval
    mode). The mask is drawn as ``Dropout`` draws it and regenerated in
    backward."""

    def __init__(self, num_features: int, activation: str = "relu", p: float = 0.0, *,
                 axis: int = -1, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None, **activation_params) -> None:
        super().__init__()
        if activation not in ops.ACTIVATION_PARAMETERS:
            raise ValueError(f"BiasActivationDropout: unknown activation {activation!r}; "
                             f"choose one of {', '.join(ops.ACTIVATION_PARAMETERS)}")
        allowed = {key: default for key, _, default in ops.ACTIVATION_PARAMETERS[activation]}
        unknown = sorted(set(activation_params) - set(allowed))
        if unknown:
            raise TypeError(f"BiasActivationDropout: {activation} takes "
                            f"{', '.join(allowed) or 'no parameters'}, not {', '.join(unknown)}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"BiasActivationDropout: p must lie in [0, 1], got {p}")
        self.num_features = num_features
        self.activation = activation
        self.activation_params = {**allowed, **activation_params}
        self.p = float(p)
        self.axis = axis
        self.generator = generator
        self.bias = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        params = "".join(f", {key}={value!r}" for key, value in self.activation_params.items())
        return (f"{self.num_features}, activation={self.activation!r}{params}, p={self.p}, "
                f"axis={self.axis}")

    def forward(self, input: Tensor) -> Tensor:
        if self.training and self.p > 0.0:
            p, rng = self.p, ops.draw_rng(self.generator)
        else:  # nothing is dropped, so no random numbers are drawn, as in torch
            p, rng = 0.0, torch.zeros(2, dtype=torch.int64)
        return ops.bias_act_dropout(input, self.bias, self.activation, p, rng, self.axis,
                                    **self.activation_params)


from .sync import SyncBatchNorm  # noqa: E402  (it builds on _BatchNorm above)
