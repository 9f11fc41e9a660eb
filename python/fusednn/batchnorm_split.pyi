# Types of fusednn.batchnorm_split: the split phases of data-parallel batch
# normalization. Per-channel results are float64 arrays of x's library.
from typing import Any, NamedTuple, Sequence

from ._typing import Array, ArrayT

__all__ = ["BatchNormMoments", "BatchNormStats", "batch_norm_apply",
           "batch_norm_backward_apply", "batch_norm_backward_reduce", "batch_norm_combine",
           "batch_norm_finalize", "batch_norm_stats"]

# `count` shadows tuple.count on purpose: the field is what users read.
class BatchNormStats(NamedTuple):
    count: int  # type: ignore[assignment]
    mean: Any
    m2: Any

class BatchNormMoments(NamedTuple):
    count: int  # type: ignore[assignment]
    mean: Any
    var: Any

def batch_norm_stats(x: Array, *, axis: int = 1) -> BatchNormStats: ...
def batch_norm_combine(counts: Sequence[int] | Array, means: Array,
                       m2s: Array) -> BatchNormMoments: ...
def batch_norm_finalize(mean: ArrayT, var: Array, count: int, *, eps: float = 1e-5,
                        running_mean: Array | None = None, running_var: Array | None = None,
                        momentum: float = 0.1) -> ArrayT: ...
def batch_norm_apply(x: ArrayT, mean: Array, invstd: Array, gamma: Array | None = None,
                     beta: Array | None = None, *, axis: int = 1,
                     out: ArrayT | None = None) -> ArrayT: ...
def batch_norm_backward_reduce(grad_output: ArrayT, x: Array, mean: Array, invstd: Array, *,
                               axis: int = 1) -> tuple[ArrayT, ArrayT]: ...
def batch_norm_backward_apply(grad_output: ArrayT, x: Array, mean: Array, invstd: Array,
                              gamma: Array | None, sum_dy: Array, sum_dy_xhat: Array,
                              count: int, *, axis: int = 1,
                              out: ArrayT | None = None) -> ArrayT: ...
