# Types shared by fusednn's stubs. Stub-only: nothing here exists at run
# time, so user code names these only under typing.TYPE_CHECKING.
from typing import Any, Protocol, TypeVar

class Array(Protocol):
    """An array fusednn accepts: numpy, CuPy, a torch tensor, a JAX array or
    any DLPack exporter (float32, float64, float16, bfloat16). Anything
    with a shape and a dtype matches the type; the functions check the rest
    at run time."""
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> Any: ...

# The primary input's array type, which the result shares.
ArrayT = TypeVar("ArrayT", bound=Array)
