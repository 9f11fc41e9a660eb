"""Arrays of other libraries: PyTorch tensors, JAX arrays and any object
with the DLPack protocol (``__dlpack__``, ``__dlpack_device__``).

A public function that meets such an array hands the whole call to
``call``, which views every foreign array as the numpy (CPU) or CuPy (CUDA)
array the kernels take, without copying, runs the function on those views,
and gives the results back in the caller's library: an ``out=`` or running
statistic that was written in place is returned as the caller's own object,
new arrays are wrapped (torch: a tensor on the same device sharing the
buffer; JAX: an array made from it). numpy and CuPy calls never come here,
so their per-call cost is unchanged.

Torch tensors that require grad are taken as data (detached views: no
autograd graph is built). JAX arrays are immutable, so ``out=`` with JAX
input is a TypeError. CUDA tensors run on their library's current stream
(torch's ``torch.cuda.current_stream()``); JAX GPU arrays are synchronized
first and run on CuPy's current stream. Libraries are imported only when
their arrays arrive.
"""
from __future__ import annotations

import numpy as np

from . import _backend

# DLPack device types (dlpack.h): CPU, CUDA, CUDA host memory.
_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST = 1, 2, 3


def library_of(a) -> str | None:
    """'numpy', 'cupy', 'torch', 'jax', 'dlpack' (another DLPack
    exporter), or None for a non-array."""
    kind = type(a)
    if isinstance(a, (np.ndarray, np.generic)):
        return "numpy"
    module = kind.__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    if module == "torch" and kind.__name__ in ("Tensor", "Parameter"):
        return "torch"
    if module in ("jax", "jaxlib") and hasattr(a, "__dlpack__"):
        return "jax"
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        return "dlpack"
    return None


def is_foreign(a) -> bool:
    """Whether a is an array that numpy and CuPy code cannot take as is."""
    kind = type(a)
    if kind is np.ndarray or a is None:
        return False
    return library_of(a) in ("torch", "jax", "dlpack")


class _Origin:
    """Where a foreign argument came from: its object, library and device,
    and the native view the kernels see."""

    def __init__(self, obj, library: str, device: str, view):
        self.obj = obj
        self.library = library
        self.device = device
        self.view = view


def _device_of(obj, library: str) -> str:
    """'cpu' or 'cuda:N' for a foreign array."""
    if library == "torch":
        device = obj.device
        return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    kind, index = obj.__dlpack_device__()
    kind = int(kind)
    if kind in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        return "cpu"
    if kind == _DLPACK_CUDA:
        return f"cuda:{int(index)}"
    raise TypeError(f"fusednn: arrays on DLPack device type {kind} are not supported; "
                    "fusednn runs on the CPU and on CUDA GPUs")


def _native_view(obj, library: str, device: str, name: str, function: str):
    """The numpy or CuPy array sharing obj's memory."""
    if library == "torch":
        obj = obj.detach()
        if device == "cpu":
            return _torch_cpu_view(obj, name, function)
    elif library == "jax" and device != "cpu":
        obj.block_until_ready()
    if device == "cpu":
        if library == "jax" and str(obj.dtype) == "bfloat16":
            # DLPack has bfloat16 but numpy cannot import it; JAX hands
            # out an ml_dtypes array instead.
            return np.asarray(obj)
        return np.from_dlpack(obj)
    if _backend._cuda is None:
        raise _backend.cuda_unavailable(function)
    try:
        cupy = _backend._cupy()
    except ImportError:
        raise RuntimeError(f"fusednn.{function}: {name} is a CUDA array, which fusednn runs "
                           f"through CuPy; install it ({_backend.cupy_install_hint()})") from None
    return cupy.from_dlpack(obj)


def _torch_cpu_view(tensor, name: str, function: str) -> np.ndarray:
    import torch
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: the same bits as an ml_dtypes array.
        return tensor.view(torch.int16).numpy().view(_ml_dtypes().bfloat16)
    try:
        return tensor.numpy()
    except TypeError as error:  # a dtype numpy has no equivalent for
        supported = _backend.SUPPORTED_DTYPES + _backend.HALF_DTYPES
        raise TypeError(f"fusednn.{function}: {name} has dtype {tensor.dtype}; supported "
                        f"dtypes are {', '.join(supported)}") from error


def _ml_dtypes():
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("fusednn: bfloat16 arrays on the CPU need ml_dtypes "
                        "(pip install ml_dtypes)") from None
    return ml_dtypes


def _describe(origin: _Origin) -> str:
    return f"{origin.library} ({origin.device})"


def call(function, arguments: dict, function_name: str, primary: str):
    """Runs function(**arguments) with every foreign array replaced by its
    numpy or CuPy view, and returns the results in the library and device
    of the argument named `primary` (the first foreign one if primary is
    not foreign)."""
    origins: dict[str, _Origin] = {}
    natives = []
    for name, value in arguments.items():
        library = library_of(value)
        if library is None:
            continue
        if library in ("numpy", "cupy"):
            natives.append((name, library))
            continue
        device = _device_of(value, library)
        view = _native_view(value, library, device, name, function_name)
        origins[name] = _Origin(value, library, device, view)
    if not origins:
        return function(**arguments)
    lead_name = primary if primary in origins else next(iter(origins))
    lead = origins[lead_name]
    strangers = [f"{name} is {_describe(o)}" for name, o in origins.items()
                 if (o.library, o.device) != (lead.library, lead.device)]
    strangers += [f"{name} is a {library} array" for name, library in natives]
    if strangers:
        raise TypeError(
            f"fusednn.{function_name}: {lead_name} is {_describe(lead)} but "
            f"{'; '.join(strangers)}; pass every array from one library on one device "
            f"(e.g. torch.from_numpy(a), torch.as_tensor(a, device=...), or .cpu())")
    if lead.library == "jax" and "out" in origins:
        raise TypeError(f"fusednn.{function_name}: JAX arrays are immutable, so out= cannot "
                        "be a JAX array; call without out= and use the returned array")
    converted = dict(arguments)
    for name, origin in origins.items():
        converted[name] = origin.view
    if lead.device == "cpu":
        result = function(**converted)
    else:
        result = _on_callers_stream(lead, lambda: function(**converted))
    written = {id(o.view): o.obj for o in origins.values()}
    return _wrap(result, lead, written)


def _on_callers_stream(lead: _Origin, run):
    """Runs a CUDA call on the stream of the caller's library: torch's
    current stream for torch tensors, CuPy's for the others."""
    if lead.library != "torch":
        return run()
    import torch
    cupy = _backend._cupy()
    device = lead.obj.device
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index or 0), \
            cupy.cuda.ExternalStream(stream.cuda_stream, device.index or 0):
        return run()


def _wrap(result, lead: _Origin, written: dict):
    if isinstance(result, tuple):
        wrapped = [_wrap(r, lead, written) for r in result]
        return type(result)(*wrapped) if hasattr(result, "_fields") else tuple(wrapped)
    if id(result) in written:
        return written[id(result)]
    if not (isinstance(result, np.ndarray) or _backend.is_cupy_array(result)):
        return result
    return _to_library(result, lead)


def _to_library(array, lead: _Origin):
    """A new array of the kernels' in the caller's library, sharing memory
    where the library can (torch), else copied once (JAX)."""
    if lead.library == "torch":
        import torch
        if isinstance(array, np.ndarray):
            if array.dtype.name == "bfloat16":
                return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(array)
        return torch.from_dlpack(array)
    if lead.library == "jax":
        import jax
        return jax.numpy.asarray(array) if isinstance(array, np.ndarray) else \
            jax.dlpack.from_dlpack(array)
    return array  # another DLPack exporter: its data as numpy or CuPy
