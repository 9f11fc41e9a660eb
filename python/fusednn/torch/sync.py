"""``SyncBatchNorm`` over ``torch.distributed`` on fusednn's split-phase
batch-norm kernels, on CPU tensors (gloo) as on CUDA tensors (NCCL).

Each rank reduces its slice of the batch (``fn.batch_norm_stats``), the
ranks all-gather ``[count, mean, M2]`` (``2C + 1`` float64 values each),
every rank merges the rows in rank order (``fn.batch_norm_combine``: the
same bits on every rank) and normalizes its slice; backward all-reduces
``[sum(dy), sum(dy * xhat)]`` (``2C`` values). As in
``torch.nn.SyncBatchNorm``, each rank's ``weight.grad``/``bias.grad`` is its
own share, which DDP's gradient all-reduce then sums.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import fusednn as fn
from ..batchnorm_split import _combine_rows, _stats_row
from .nn import _BatchNorm, supports

__all__ = ["SyncBatchNorm"]


def _all_gather_rows(local: Tensor, process_group, world_size: int) -> Tensor:
    rows = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(rows, local, group=process_group)
    return torch.stack(rows)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum,
                process_group, world_size):
        x = input.detach()
        channels = x.shape[1]
        local = _stats_row(fn.batch_norm_stats(x, axis=1),
                           torch.empty(2 * channels + 1, dtype=torch.float64, device=x.device))
        merged = _combine_rows(_all_gather_rows(local, process_group, world_size))
        invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count, eps=eps,
                                        running_mean=running_mean, running_var=running_var,
                                        momentum=momentum)
        weight_data = None if weight is None else weight.detach()
        bias_data = None if bias is None else bias.detach()
        y = fn.batch_norm_apply(x, merged.mean, invstd, weight_data, bias_data, axis=1,
                                out=torch.empty_like(x))
        ctx.save_for_backward(x, weight_data, merged.mean, invstd)
        ctx.count = merged.count
        ctx.process_group = process_group
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        sum_dy, sum_dy_xhat = fn.batch_norm_backward_reduce(grad_output, x, mean, invstd, axis=1)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = sum_dy_xhat.to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total, group=ctx.process_group)
        grad_input = fn.batch_norm_backward_apply(
            grad_output, x, mean, invstd, weight, total[:channels], total[channels:], ctx.count,
            axis=1, out=torch.empty_like(x))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` (same constructor, parameters, buffers and
    ``state_dict``) on fusednn's kernels: in training with more than one
    rank in ``process_group`` (the default group when None), the statistics
    are those of every rank's slice together; otherwise it is fusednn's
    one-process ``BatchNorm``. Unlike torch's, it also runs on CPU tensors
    (gloo). Input of shape (N, C, ...), channels_last included.

    It is not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel
    refuses modules holding that class on the CPU. A tensor fusednn has no
    kernel for (e.g. float8_e4m3fn) goes to torch's SyncBatchNorm forward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[object] = None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = world_size = None
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size is None or world_size == 1:
            return _BatchNorm.forward(self, input)
        if supports(input.dtype, input.device) is not None:
            return torch.nn.SyncBatchNorm.forward(self, input)
        factor = self._step_momentum()
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                            running_var, self.eps, factor, group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: Optional[object] = None) -> torch.nn.Module:
        """``module`` with every ``torch.nn`` batch-norm layer (fusednn's
        included) replaced by this class, weights and buffers carried over,
        as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
                type(module) is not cls:
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
