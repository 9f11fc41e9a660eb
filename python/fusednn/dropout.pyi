# Types of fusednn.dropout. Masks are bit-packed uint8 arrays of the
# input's library; return_mask=True adds one to the result.
from typing import Any, Literal, overload

from ._typing import Array, ArrayT

@overload
def dropout(x: ArrayT, p: float, *, seed: int, offset: int = 0, start: int = 0,
            training: bool = True, return_mask: Literal[False] = False,
            out: ArrayT | None = None) -> ArrayT: ...
@overload
def dropout(x: ArrayT, p: float, *, seed: int, offset: int = 0, start: int = 0,
            training: bool = True, return_mask: Literal[True],
            out: ArrayT | None = None) -> tuple[ArrayT, Any]: ...
def dropout_backward(grad_output: ArrayT, p: float, *, mask: Array | None = None,
                     seed: int | None = None, offset: int = 0, start: int = 0,
                     out: ArrayT | None = None) -> ArrayT: ...
def dropout_mask(shape: int | tuple[int, ...], p: float, *, seed: int, offset: int = 0,
                 start: int = 0, device: str = "cpu") -> Any: ...
@overload
def bias_act_dropout(h: ArrayT, bias: Array, act: str, p: float, *, seed: int, offset: int = 0,
                     start: int = 0, axis: int = -1, return_mask: Literal[False] = False,
                     out: ArrayT | None = None, **act_params: float | str) -> ArrayT: ...
@overload
def bias_act_dropout(h: ArrayT, bias: Array, act: str, p: float, *, seed: int, offset: int = 0,
                     start: int = 0, axis: int = -1, return_mask: Literal[True],
                     out: ArrayT | None = None,
                     **act_params: float | str) -> tuple[ArrayT, Any]: ...
def bias_act_dropout_backward(grad_output: ArrayT, h: Array, bias: Array, act: str, p: float, *,
                              mask: Array | None = None, seed: int | None = None,
                              offset: int = 0, start: int = 0, axis: int = -1,
                              out: ArrayT | None = None,
                              **act_params: float | str) -> tuple[ArrayT, ArrayT]: ...
