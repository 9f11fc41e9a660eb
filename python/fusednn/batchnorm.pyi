# Types of fusednn.batchnorm. BatchNormResult is the named tuple
# (y, save_mean, save_invstd) of fusednn.reference.
from .reference import BatchNormResult as BatchNormResult
from typing import Literal

from ._typing import Array, ArrayT

__all__ = ["BatchNormResult", "batch_norm", "batch_norm_backward"]

def batch_norm(x: Array, gamma: Array | None = None, beta: Array | None = None,
               running_mean: Array | None = None, running_var: Array | None = None, *,
               training: bool = True, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
               activation: Literal["relu"] | None = None,
               out: Array | None = None) -> BatchNormResult: ...
def batch_norm_backward(grad_output: ArrayT, x: Array, gamma: Array | None, save_mean: Array,
                        save_invstd: Array, *, axis: int = 1, training: bool = True,
                        activation: Literal["relu"] | None = None, y: Array | None = None,
                        out: ArrayT | None = None) -> tuple[ArrayT, ArrayT, ArrayT]: ...
