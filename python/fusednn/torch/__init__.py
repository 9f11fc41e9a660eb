"""fusednn as a PyTorch training backend.

    import fusednn.torch as ft
    result = ft.patch(model)        # torch.nn modules -> fusednn's, in place
    print(result.replaced)          # e.g. {'BatchNorm1d': 2, 'GELU': 2, 'Dropout': 1}
    ft.unpatch(model)               # back to torch's

Three layers, as in other framework integrations: ``fusednn.torch.ops``
registers the kernels as ``torch.ops.fusednn.*`` custom operators (fake
implementations for ``torch.compile``/``torch.export``, autograd on
fusednn's backward kernels); ``fusednn.torch.nn`` holds drop-in modules
with torch's names, arguments and state_dict keys, and the fused
``BiasActivationDropout``; ``patch``/``unpatch`` switch the modules of an
existing model. See docs/torch.md.

PyTorch is optional for fusednn: ``import fusednn`` never imports it, and
this package raises ImportError with the command that installs it.
"""
try:
    import torch
except ImportError as error:
    raise ImportError("fusednn.torch needs PyTorch, which is not installed: pip install "
                      "torch==2.13.0 (the version fusednn.torch is tested with)") from error

if not hasattr(torch.library, "register_autograd"):
    raise ImportError(f"fusednn.torch needs torch.library.register_autograd (PyTorch 2.4 or "
                      f"newer), but PyTorch {torch.__version__} is installed: "
                      "pip install torch==2.13.0")

from . import nn, ops  # noqa: E402  (after the checks above)
from .patch import PatchResult, patch, unpatch  # noqa: E402

__all__ = ["PatchResult", "nn", "ops", "patch", "unpatch"]
