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
_ORIGINALS = {fused: original for original, fused in _REPLACEMENTS.items()}


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


def _model_to_change(model, inplace: bool, function: str) -> torch.nn.Module:
    """model itself, or its deep copy with inplace=False."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusednn.torch.{function}: model must be a torch.nn.Module, "
                        f"not {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def _label(name: str) -> str:
    return name or "(the model itself)"


def patch(model: torch.nn.Module, *, inplace: bool = True) -> PatchResult:
    """Switches every supported ``torch.nn`` module inside ``model`` (the
    model itself included) to fusednn's: BatchNorm1d/2d/3d, ReLU,
    LeakyReLU, ELU, SELU, GELU, SiLU, Softplus, Mish, Hardsigmoid,
    Hardswish, Hardtanh, Sigmoid, Tanh and Dropout. ``inplace=False``
    patches a deep copy and leaves ``model`` untouched. Returns a
    PatchResult; ``unpatch`` undoes it."""
    model = _model_to_change(model, inplace, "patch")
    replaced: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    for name, module in model.named_modules():
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
    classes they replaced (``BiasActivationDropout``, which has no torch
    counterpart, stays)."""
    model = _model_to_change(model, inplace, "unpatch")
    restored: dict[str, int] = {}
    for _, module in model.named_modules():
        original = _ORIGINALS.get(type(module))
        if original is None:
            continue
        module.__class__ = original
        restored[original.__name__] = restored.get(original.__name__, 0) + 1
    return PatchResult(model, restored, [])
