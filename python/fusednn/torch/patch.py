"""One call that puts fusednn under an existing PyTorch model, and one that
takes it out.

``patch`` walks a model's modules and turns every module whose type is
exactly one of the supported ``torch.nn`` classes into fusednn's subclass
of it by switching its class: the module keeps its own parameters,
buffers, hooks and attributes (the very same objects, so an optimizer made
before the patch still updates them). Subclasses of those classes are left
alone, since their forward may differ. ``unpatch`` switches the classes
back.

Configurations fusednn has no kernel for are left as they are and listed
with the reason: in-place activations and dropout (fusednn writes a new
tensor) and batch norms whose parameters have a dtype or device without a
kernel.

With ``fuse=True`` (the default) a BatchNorm followed directly by a ReLU
inside an ``nn.Sequential`` becomes one fused module: the batch norm turns
into ``BatchNormReLU*d`` and the ReLU into ``FoldedReLU``, which returns
its input (an in-place ReLU qualifies: the fused module writes a new
tensor). Only the order of a Sequential says that one module feeds the
next, so pairs that a custom ``forward`` calls in turn (a ResNet block's
``self.bn1`` then ``self.relu``) are not fused, and neither is a ReLU
module that appears more than once in the model (one ReLU object reused
after the residual addition, as torchvision's blocks do), nor a pair with
hooks on either module (they would see other tensors).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from . import nn

__all__ = ["PatchResult", "patch", "unpatch"]

_REPLACEMENTS: dict[type, type] = {
    torch.nn.BatchNorm1d: nn.BatchNorm1d,
    torch.nn.BatchNorm2d: nn.BatchNorm2d,
    torch.nn.BatchNorm3d: nn.BatchNorm3d,
    torch.nn.SyncBatchNorm: nn.SyncBatchNorm,
    torch.nn.ReLU: nn.ReLU,
    torch.nn.LeakyReLU: nn.LeakyReLU,
    torch.nn.ELU: nn.ELU,
    torch.nn.SELU: nn.SELU,
    torch.nn.GELU: nn.GELU,
    torch.nn.SiLU: nn.SiLU,
    torch.nn.Softplus: nn.Softplus,
    torch.nn.Mish: nn.Mish,
    torch.nn.Hardsigmoid: nn.Hardsigmoid,
    torch.nn.Hardswish: nn.Hardswish,
    torch.nn.Hardtanh: nn.Hardtanh,
    torch.nn.Sigmoid: nn.Sigmoid,
    torch.nn.Tanh: nn.Tanh,
    torch.nn.Dropout: nn.Dropout,
}
# A BatchNorm and the ReLU after it, fused.
_FUSED_BATCH_NORMS: dict[type, type] = {
    torch.nn.BatchNorm1d: nn.BatchNormReLU1d,
    torch.nn.BatchNorm2d: nn.BatchNormReLU2d,
    torch.nn.BatchNorm3d: nn.BatchNormReLU3d,
}
_ORIGINALS = {fused: original for original, fused in _REPLACEMENTS.items()}
_ORIGINALS.update({fused: original for original, fused in _FUSED_BATCH_NORMS.items()})
_ORIGINALS[nn.FoldedReLU] = torch.nn.ReLU


@dataclasses.dataclass
class PatchResult:
    """What ``patch`` or ``unpatch`` did: the model (the one passed, or its
    copy with ``inplace=False``), how many modules of each ``torch.nn``
    class it switched, and the supported modules it left alone as
    (qualified name, reason)."""

    model: torch.nn.Module
    replaced: dict[str, int]
    skipped: list[tuple[str, str]]


def _reason_to_skip(module: torch.nn.Module) -> str | None:
    if getattr(module, "inplace", False):
        return "inplace=True: fusednn writes a new tensor, so torch's in-place form is kept"
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return nn.supports(tensor.dtype, tensor.device)
    return None


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _fusable_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(batch norm, relu) pairs to fuse: adjacent in an nn.Sequential, of
    exactly torch's classes, the batch norm on a dtype and device fusednn
    has kernels for, the relu used nowhere else, no hooks on either."""
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    pairs = []
    for module in model.modules():
        if type(module) is not torch.nn.Sequential:
            continue
        children = list(module.children())
        for bn, relu in zip(children, children[1:]):
            if (type(bn) in _FUSED_BATCH_NORMS and type(relu) is torch.nn.ReLU
                    and uses[id(relu)] == 1 and uses[id(bn)] == 1
                    and not _has_hooks(bn) and not _has_hooks(relu)
                    and _reason_to_skip(bn) is None):
                pairs.append((bn, relu))
    return pairs


def _model_to_change(model, inplace: bool, function: str) -> torch.nn.Module:
    """model itself, or its deep copy with inplace=False."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusednn.torch.{function}: model must be a torch.nn.Module, "
                        f"not {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def _label(name: str) -> str:
    return name or "(the model itself)"


def patch(model: torch.nn.Module, *, inplace: bool = True, fuse: bool = True) -> PatchResult:
    """Switches every supported ``torch.nn`` module inside ``model`` (the
    model itself included) to fusednn's: BatchNorm1d/2d/3d, SyncBatchNorm, ReLU,
    LeakyReLU, ELU, SELU, GELU, SiLU, Softplus, Mish, Hardsigmoid,
    Hardswish, Hardtanh, Sigmoid, Tanh and Dropout. ``fuse=True`` first
    fuses each BatchNorm that a ReLU follows in an nn.Sequential (counted
    as BatchNormReLU*d and FoldedReLU). ``inplace=False`` patches a deep
    copy and leaves ``model`` untouched. Returns a PatchResult; ``unpatch``
    undoes it."""
    model = _model_to_change(model, inplace, "patch")
    replaced: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    fused: set[int] = set()
    for bn, relu in _fusable_pairs(model) if fuse else ():
        for module, target in ((bn, _FUSED_BATCH_NORMS[type(bn)]), (relu, nn.FoldedReLU)):
            module.__class__ = target
            fused.add(id(module))
            replaced[target.__name__] = replaced.get(target.__name__, 0) + 1
    for name, module in model.named_modules():
        if id(module) in fused:
            continue
        target = _REPLACEMENTS.get(type(module))
        if target is None:
            continue
        reason = _reason_to_skip(module)
        if reason is not None:
            skipped.append((_label(name), reason))
            continue
        module.__class__ = target
        replaced[target.__name__] = replaced.get(target.__name__, 0) + 1
    return PatchResult(model, replaced, skipped)


def unpatch(model: torch.nn.Module, *, inplace: bool = True) -> PatchResult:
    """Switches fusednn's modules inside ``model`` back to the ``torch.nn``
    classes they replaced, fused pairs included (``BiasActivationDropout``,
    which has no torch counterpart, stays)."""
    model = _model_to_change(model, inplace, "unpatch")
    restored: dict[str, int] = {}
    for _, module in model.named_modules():
        original = _ORIGINALS.get(type(module))
        if original is None:
            continue
        module.__class__ = original
        restored[original.__name__] = restored.get(original.__name__, 0) + 1
    return PatchResult(model, restored, [])
