"""The array layer: every array a public function receives becomes a
descriptor here, and results go back to the caller's library from here.

A call first finds its *place*: the library and device of its arrays
(``locate``), which must be one for all of them. The place then turns each
argument into a descriptor that carries the pointer, dtype, shape, byte
strides, device and stream, and keeps the caller's object alive:

- memory the CPU addresses (numpy arrays, torch CPU tensors, JAX CPU
  arrays, other DLPack CPU arrays) is described by a numpy array of that
  memory, without a copy; a plain numpy array is its own descriptor, so the
  common call builds nothing;
- device memory (CuPy arrays, torch CUDA tensors, JAX GPU and other DLPack
  CUDA arrays) is described by an ``Array``: the tuple the compiled modules
  read, ``(pointer, dtype code, shape, byte strides, device, stream)``,
  followed by the caller's object and the numpy dtype.

Both kinds answer ``.shape``, ``.dtype``, ``.strides``, ``.ndim`` and
``.size``, and the place's ``backend`` (``_cpu`` or ``_cuda``, which expose
the same functions with the same arguments) takes either. So each public
function validates once, on descriptors, and calls one backend function:
its body has no branch on the library or the device. Allocation, copies,
overlap tests and wrapping a result back (``place.result``) are the
place's.

Optional libraries (torch, JAX, CuPy) are imported only when their arrays
arrive. A torch tensor that requires grad is taken as data (no autograd
graph is built). JAX arrays are immutable: ``out=`` with JAX input is a
TypeError. CUDA work runs on the caller's current stream: torch's
``torch.cuda.current_stream()``, CuPy's current stream; JAX GPU arrays are
synchronized first and run on CuPy's current stream.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from . import _backend, _cpu

# Codes of the dtypes the compiled modules take (csrc/bindings/operand.h).
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
               np.dtype(np.uint8): 4}


def dtype_code(dtype) -> int:
    """The compiled modules' code of a numpy dtype: DTYPE_CODES, and 3 for
    ml_dtypes' bfloat16, known by name (ml_dtypes is not imported here: an
    array of it already was) and remembered."""
    code = DTYPE_CODES.get(dtype)
    if code is None:
        if dtype.name != "bfloat16":
            raise KeyError(dtype)
        code = DTYPE_CODES[dtype] = 3
    return code


SUPPORTED_DTYPES = ("float32", "float64")
SUPPORTED_CUDA_DTYPES = ("float32", "float64", "float16", "bfloat16")

# DLPack device types (dlpack.h): CPU, CUDA, CUDA host memory.
_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST = 1, 2, 3


class Array(tuple):
    """A device array as the compiled modules take it: (pointer, dtype
    code, shape, byte strides, device, stream, owner, numpy dtype). The
    owner is the caller's object (or the library array viewing it), kept
    alive for the call."""

    __slots__ = ()

    ptr = property(operator.itemgetter(0))
    shape = property(operator.itemgetter(2))
    strides = property(operator.itemgetter(3))
    device = property(operator.itemgetter(4))
    obj = property(operator.itemgetter(6))
    dtype = property(operator.itemgetter(7))

    @property
    def ndim(self) -> int:
        return len(self[2])

    @property
    def size(self) -> int:
        return math.prod(self[2])


# ---- layout facts shared by every descriptor ---------------------------------------


def is_c_contiguous(a) -> bool:
    """Whether a's elements lie in C order with no gaps (empty arrays and
    extents of 1 place no constraint on strides)."""
    if 0 in a.shape:
        return True
    expected = a.dtype.itemsize
    for n, s in zip(reversed(a.shape), reversed(a.strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def byte_span(ptr: int, shape, strides, itemsize: int) -> tuple:
    """[low, high) of the bytes a view touches (empty views touch none)."""
    if 0 in shape:
        return ptr, ptr
    low = high = ptr
    for n, s in zip(shape, strides):
        if s < 0:
            low += s * (n - 1)
        else:
            high += s * (n - 1)
    return low, high + itemsize


def extents_meet(a, b) -> bool:
    """Whether two byte extents ([low, high) pairs, None for no array)
    have a byte in common."""
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def meeting_masks(extents) -> tuple:
    """For each extent, the bit mask of the others it meets (bit j: extent
    j), as _cpu.meeting_extents computes them."""
    return tuple(sum(1 << j for j, other in enumerate(extents) if j != i and extents_meet(e, other))
                 for i, e in enumerate(extents))


# The work numpy's exact overlap solver may spend on one pair of views
# (np.shares_memory's max_work); views it cannot decide within that count
# as sharing memory.
_EXACT_OVERLAP_WORK = 1 << 16


def shares_memory_exactly(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two numpy views have an element's byte in common (not only
    interleaved extents), by numpy's exact solver."""
    try:
        return bool(np.shares_memory(a, b, max_work=_EXACT_OVERLAP_WORK))
    except np.exceptions.TooHardError:
        return True


# Up to this many elements an output whose strides leave the quick test
# undecided is checked address by address.
_OVERLAP_ENUMERATION_LIMIT = 1 << 20


def has_internal_overlap(shape, strides, itemsize: int) -> bool:
    """Whether two elements of a view with these dimensions and byte
    strides share memory.

    Sorted by stride, each dimension must step past everything the smaller
    ones span; views that fail that test (rare interleavings, stride 0)
    are checked exactly when small enough, and counted as overlapping
    otherwise."""
    if len(shape) == 1:  # per-channel arrays, the common case
        return shape[0] > 1 and abs(strides[0]) < itemsize
    if 0 in shape:
        return False
    dims = sorted((abs(s), n) for n, s in zip(shape, strides) if n > 1)
    span = itemsize
    for stride, n in dims:
        if stride < span:
            break
        span += stride * (n - 1)
    else:
        return False
    if math.prod(n for _, n in dims) > _OVERLAP_ENUMERATION_LIMIT:
        return True
    offsets = np.zeros(1, dtype=np.int64)
    for stride, n in dims:
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * stride).reshape(-1)
    offsets.sort()
    return bool(np.any(np.diff(offsets) < itemsize))


def check_no_internal_overlap(a, name: str, function: str) -> None:
    """A ValueError for an array the kernels would write when two of its
    elements share memory (a stride-0 view, say): which write lands last
    would depend on thread timing."""
    if has_internal_overlap(a.shape, a.strides, a.dtype.itemsize):
        raise ValueError(f"fusednn.{function}: {name} has elements that share memory (strides "
                         f"{a.strides} for shape {a.shape}), so writes to it would collide; "
                         "pass an array without overlapping elements (e.g. a contiguous one)")


def _unsupported_dtype(dtype, name: str, function: str, supported: tuple, note: str = ""):
    return TypeError(f"fusednn.{function}: {name} has dtype {dtype}; supported dtypes are "
                     f"{', '.join(supported)}{note}")


# ---- places: one library on one device -----------------------------------------------


class Place:
    """Where a call's arrays live. Subclasses supply the library's side:
    descriptors of its arrays, allocation, copies and results."""

    library = ""      # as messages name it: numpy, CuPy, torch, JAX, DLPack
    kind = "cpu"      # 'cpu' or 'cuda'
    backend = None    # the compiled module that runs the kernels

    def describe(self) -> str:
        return f"on the {'GPU' if self.kind == 'cuda' else 'CPU'} ({self.library})"

    def output(self, out, like, function: str):
        """out's descriptor after checking it against `like` (shape, dtype,
        library, device, writability, no overlapping elements), or a new
        array of like's shape and dtype when out is None."""
        if out is None:
            return self.empty(like.shape, like.dtype)
        if self.library == "JAX":
            raise TypeError(f"fusednn.{function}: JAX arrays are immutable, so out= cannot be "
                            "given with JAX input; call without out= and use the returned array")
        view = self.out_view(out, function)
        if view.shape != like.shape:
            raise ValueError(f"fusednn.{function}: out has shape {view.shape}, expected "
                             f"{like.shape}")
        if view.dtype != like.dtype:
            raise ValueError(f"fusednn.{function}: out has dtype {view.dtype}, expected "
                             f"{like.dtype}")
        if not self.c_contiguous(view):  # contiguous views never overlap themselves
            check_no_internal_overlap(view, "out", function)
        return view

    def foreign_out(self, out, function: str):
        key = _identify(out)
        what = "a non-array" if key is None else f"{_describe_key(key)}"
        return ValueError(f"fusednn.{function}: out is {what} but the inputs are arrays "
                          f"{self.describe()}; out must be an array of the inputs' library on "
                          "the inputs' device")

    def detach(self, a, out, *, elementwise: bool = True, extents=None):
        """a itself, or a copy of it when it shares memory with out (None
        passes through); `extents`, when the caller has them, are a's and
        out's (see extents).

        Kernels write out while they read their inputs, so an input that
        overlaps out in any other way would be read after parts of it were
        overwritten. The exception is the documented in-place form: an
        `elementwise` operand (one read at the element it writes) that is
        the very same view as out."""
        if a is None or (elementwise and a is out):
            return a
        if extents is None:
            extents = self.extents(a, out)
        (low, high), (out_low, out_high) = extents
        # Apart (the common case, tested inline: every call with out= asks),
        # or in no element in common.
        if high <= out_low or out_high <= low or not self.may_share_memory(a, out, extents):
            return a
        if elementwise and self.same_view(a, out, extents):
            return a
        return self.copy_of(a)

    def extents(self, *arrays) -> tuple:
        """The bytes [low, high) each descriptor spans (None for None), for
        may_share_memory and same_view."""
        return tuple(None if a is None else byte_span(a.ptr, a.shape, a.strides, a.dtype.itemsize)
                     for a in arrays)

    def meeting_extents(self, *arrays) -> tuple:
        """(extents, meets): the arrays' extents, and for each the bit mask
        of the others whose extents meet it (meeting_masks)."""
        extents = self.extents(*arrays)
        return extents, meeting_masks(extents)

    def may_share_memory(self, a, b, extents=None) -> bool:
        """Whether two descriptors have a byte in common: their extents
        (`extents`, when the caller has them) decide when they are apart,
        numpy's exact test when they meet (interleaved views may share
        none)."""
        if extents is None:
            extents = self.extents(a, b)
        return extents_meet(*extents) and shares_memory_exactly(self.addresses(a),
                                                                self.addresses(b))

    def same_view(self, a, b, extents=None) -> bool:
        """Whether two descriptors are the same elements at the same
        addresses: with equal shapes and strides, equal extents mean equal
        start pointers."""
        if a.shape != b.shape or a.strides != b.strides:
            return False
        if extents is None:
            extents = self.extents(a, b)
        return extents[0] == extents[1]

    def c_contiguous(self, a) -> bool:
        return is_c_contiguous(a)

    def contiguous(self, a):
        return a if is_c_contiguous(a) else self.copy_of(a)

    def check_result_dtype(self, dtype, function: str) -> None:
        """Raises TypeError, before anything runs, where this place's library
        cannot hold results of `dtype`: JAX keeps float64 only in its x64
        mode, and would otherwise truncate to float32."""
        if self.library != "JAX" or np.dtype(dtype) != np.float64:
            return
        import jax
        if not jax.config.jax_enable_x64:
            raise TypeError(f"fusednn.{function}: its results are float64, which JAX holds "
                            "only in x64 mode: call jax.config.update('jax_enable_x64', True) "
                            "first (or pass numpy arrays)")

    # Whether the backend's kernels take scratch memory from the caller (the
    # CUDA ones; the CPU kernels keep their own).
    has_workspaces = True

    def workspace(self, nbytes: int):
        """Scratch device memory of nbytes for one call, or None for 0."""
        return self.empty((nbytes,), np.dtype(np.uint8)) if nbytes else None


class HostPlace(Place):
    """Memory the CPU addresses, described by numpy arrays."""

    kind = "cpu"
    backend = _cpu
    has_workspaces = False

    def numpy_view(self, a, name: str, function: str) -> np.ndarray:
        raise NotImplementedError

    def view(self, a, name: str, function: str, *, writable: bool = False,
             dtypes=None) -> np.ndarray:
        """The numpy array the kernels read for a (a float array of a
        supported dtype, or of `dtypes` when given), in native byte order
        and aligned: copied once if it is not, unless it is `writable`
        (updated in place), which makes that a ValueError."""
        x = a if type(a) is np.ndarray else self.numpy_view(a, name, function)
        dtype = x.dtype
        if dtypes is None:
            if dtype not in _HOST_DTYPES and dtype.newbyteorder("=") not in _HOST_DTYPES \
                    and not (function in _backend._HALF_CPU_FUNCTIONS and _backend.is_half(dtype)):
                raise _unsupported_dtype(dtype, name, function, host_dtypes(function))
        elif dtype not in dtypes and dtype.newbyteorder("=") not in dtypes:
            raise TypeError(f"fusednn.{function}: {name} must have dtype "
                            f"{' or '.join(d.name for d in dtypes)}, got {dtype}")
        flags = x.flags
        if writable:
            if not flags.writeable:
                raise ValueError(f"fusednn.{function}: {name} is read-only but is updated in "
                                 "place")
            if not dtype.isnative or not flags.aligned:
                raise ValueError(f"fusednn.{function}: {name} is updated in place and must be "
                                 "aligned and in native byte order")
            return x
        if not dtype.isnative:
            x = x.astype(dtype.newbyteorder("="))
        elif not flags.aligned:
            x = x.copy()
        return x

    def out_view(self, out, function: str) -> np.ndarray:
        if type(out) is np.ndarray and self is NUMPY:
            view = out
        elif self is TORCH_CPU and _LIBRARY_OF_TYPE.get(type(out)) == "torch" and out.is_cpu:
            view = self.numpy_view(out, "out", function)
        elif _identify(out) != self.key:
            raise self.foreign_out(out, function)
        else:
            view = self.numpy_view(out, "out", function)
        flags = view.flags
        if view.dtype not in _HOST_DTYPES and view.dtype.newbyteorder("=") in _HOST_DTYPES:
            raise ValueError(
                f"fusednn.{function}: out has dtype {view.dtype.str}, "
                f"{view.dtype.newbyteorder('=')} in the other byte order; kernels write native "
                "byte order only. Pass out=None (or a native array) and byte-swap the result "
                "if you need it: y.astype(y.dtype.newbyteorder())")
        if not flags.writeable:
            raise ValueError(f"fusednn.{function}: out is read-only")
        if not flags.aligned:
            raise ValueError(f"fusednn.{function}: out is not aligned to its item size")
        return view

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def c_contiguous(self, a: np.ndarray) -> bool:
        return a.flags.c_contiguous

    def contiguous(self, a: np.ndarray) -> np.ndarray:
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)

    def copy_of(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        _cpu.copy(src, dst)

    # One compiled call for all the arrays: a numpy array's address costs
    # more to read from Python than that call.
    extents = staticmethod(_cpu.byte_extents)
    meeting_extents = staticmethod(_cpu.meeting_extents)

    @staticmethod
    def addresses(a: np.ndarray) -> np.ndarray:
        return a

    def result(self, view, given=None):
        """What the caller gets for `view`: `given` (the caller's out,
        written in place) when there is one, else view in its library."""
        return view if given is None else given

    def from_host(self, values: np.ndarray):
        """values (a numpy array) as an array of this place."""
        return self.result(values)


_HOST_DTYPES = tuple(np.dtype(d) for d in SUPPORTED_DTYPES)


def host_dtypes(function: str) -> tuple:
    """The dtype names `function` takes on the CPU: float32 and float64,
    and float16 and bfloat16 (stored half, computed in float32) where it
    has half-precision kernels."""
    if function in _backend._HALF_CPU_FUNCTIONS:
        return SUPPORTED_DTYPES + _backend.HALF_DTYPES
    return SUPPORTED_DTYPES


def _ml_dtypes():
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("fusednn: bfloat16 arrays need ml_dtypes "
                        "(pip install ml_dtypes)") from None
    return ml_dtypes


class NumpyPlace(HostPlace):
    library = "numpy"
    key = ("numpy", "cpu")

    def numpy_view(self, a, name: str, function: str) -> np.ndarray:
        if isinstance(a, (np.ndarray, np.generic)):
            return np.asarray(a)
        raise TypeError(f"fusednn.{function}: {name} must be an array (numpy, CuPy, torch, "
                        f"JAX or DLPack), not {type(a).__name__}")


class TorchHostPlace(HostPlace):
    library = "torch"
    key = ("torch", "cpu")

    def numpy_view(self, a, name: str, function: str) -> np.ndarray:
        # The tensor's DLPack export read in the compiled module: about half
        # of what Tensor.numpy() costs. None for what it does not cover
        # (bfloat16 and other dtypes, negative views, empty tensors).
        view = _cpu.torch_view(a, _torch_to_dlpack())
        if view is not None:
            return view
        if a.requires_grad:
            a = a.detach()
        try:
            return a.numpy()
        except TypeError as error:  # a dtype numpy has no equivalent for
            import torch
            # The same bits as an ml_dtypes array, for the functions with
            # half-precision kernels; the others name the dtypes they take
            # rather than asking for ml_dtypes.
            if a.dtype == torch.bfloat16 and function in _backend._HALF_CPU_FUNCTIONS:
                return a.view(torch.int16).numpy().view(_ml_dtypes().bfloat16)
            raise _unsupported_dtype(a.dtype, name, function, host_dtypes(function)) from error

    def result(self, view, given=None):
        if given is not None:
            return given
        # dtype.name takes microseconds; kind 'V' first rules out the float types
        if view.dtype.kind == "V" and view.dtype.name == "bfloat16":
            import torch
            return torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
        return _torch_from_numpy(view)


def _torch_to_dlpack():
    """torch._C._to_dlpack (a torch tensor's DLPack capsule, for
    _cpu.torch_view), found once: a torch place exists only once torch has
    been imported by the caller."""
    global _torch_to_dlpack
    import torch
    to_dlpack = torch._C._to_dlpack
    # The compiled quick paths take torch CPU tensors from now on.
    _cpu.register_torch(torch.Tensor, torch.nn.Parameter, to_dlpack, torch._C._from_dlpack)
    _torch_to_dlpack = lambda: to_dlpack  # noqa: E731
    return to_dlpack


def _torch_from_numpy(view: np.ndarray):
    """torch.from_numpy, found once (a torch place exists only once torch
    has been imported by the caller)."""
    global _torch_from_numpy
    import torch
    _torch_from_numpy = torch.from_numpy
    return torch.from_numpy(view)


class DLPackHostPlace(HostPlace):
    """JAX CPU arrays and other DLPack exporters in CPU memory."""

    def __init__(self, library: str):
        self.library = library
        self.key = (library, "cpu")

    def numpy_view(self, a, name: str, function: str) -> np.ndarray:
        if self.library == "JAX" and str(a.dtype) == "bfloat16":
            # DLPack has bfloat16 but numpy cannot import it; JAX hands out
            # an ml_dtypes array of the same memory instead.
            return np.asarray(a)
        return np.from_dlpack(a)

    def result(self, view, given=None):
        if given is not None:
            return given
        if self.library == "JAX":
            import jax
            return jax.numpy.asarray(view)
        return view  # another DLPack exporter: its data as numpy


NUMPY = NumpyPlace()
TORCH_CPU = TorchHostPlace()
JAX_CPU = DLPackHostPlace("JAX")
DLPACK_CPU = DLPackHostPlace("DLPack")


class DevicePlace(Place):
    """CUDA memory on one device, described by Array tuples; launches go
    to `stream`."""

    kind = "cuda"
    supported = SUPPORTED_CUDA_DTYPES

    def __init__(self, device: int, stream: int):
        self.device = device
        self.stream = stream
        self.backend = _backend._cuda

    def describe(self) -> str:
        return f"on GPU {self.device} ({self.library})"

    def wrap(self, obj, ptr: int, dtype, shape, strides) -> Array:
        return Array((ptr, dtype_code(dtype), shape, strides, self.device, self.stream, obj,
                      dtype))

    def view(self, a, name: str, function: str, *, writable: bool = False, dtypes=None) -> Array:
        x = self.array_view(a, name, function)
        if dtypes is None:
            if x.dtype not in _CUDA_DTYPES and x.dtype.name != "bfloat16":
                raise _unsupported_dtype(x.dtype, name, function, self.supported)
        elif x.dtype not in dtypes:
            raise TypeError(f"fusednn.{function}: {name} must have dtype "
                            f"{' or '.join(d.name for d in dtypes)}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"fusednn.{function}: {name} is on GPU {x.device} but the call runs "
                             f"on GPU {self.device}; put every array on one device (e.g. inside "
                             f"`with cupy.cuda.Device({x.device}):` for CuPy)")
        itemsize = x.dtype.itemsize
        if x.ptr % itemsize or any(s % itemsize for s in x.strides):
            if writable:
                raise ValueError(f"fusednn.{function}: {name} is updated in place and must be "
                                 "aligned to its item size")
            x = self.copy_of(x)
        return x

    def out_view(self, out, function: str) -> Array:
        if _identify(out) != self.key:
            raise self.foreign_out(out, function)
        return self.view(out, "out", function, writable=True)

    @staticmethod
    def addresses(a: Array) -> np.ndarray:
        """A numpy array at a's device addresses, for numpy's exact overlap
        test, which reads addresses, never the memory."""
        return np.asarray(_Addresses(a))

    def result(self, view: Array, given=None):
        return view.obj if given is None else given


# bfloat16 is ml_dtypes' numpy dtype, known by name (see dtype_code).
_CUDA_DTYPES = tuple(np.dtype(d) for d in SUPPORTED_CUDA_DTYPES if d != "bfloat16")


class _Addresses:
    """A device view's pointer, shape and strides in numpy's array
    interface (read-only: nothing may write through it)."""

    __slots__ = ("__array_interface__",)

    def __init__(self, a: Array):
        self.__array_interface__ = {"shape": a.shape, "typestr": a.dtype.str,
                                    "data": (a.ptr, True), "strides": a.strides, "version": 3}


def _cupy(function: str):
    try:
        import cupy
    except ImportError:
        raise RuntimeError(f"fusednn.{function}: CUDA arrays other than torch tensors run "
                           "through CuPy, which is not installed "
                           f"({_backend.cupy_install_hint()})") from None
    return cupy


class CupyPlace(DevicePlace):
    """CuPy arrays, and JAX GPU and other DLPack CUDA arrays viewed as CuPy
    arrays; CuPy's current device and stream. CuPy has no bfloat16: JAX's
    bfloat16 arrays are read at their buffer's address, and bfloat16 results
    are allocated as CuPy uint16 arrays of the same bits, handed to JAX
    through DLPack and bitcast back to bfloat16 there."""

    def __init__(self, library: str, function: str, device=None):
        cupy = _cupy(function)
        self.cupy = cupy
        self.library = library
        self.key = (library, "cuda")
        with cupy.cuda.Device(device):  # None: the current device
            super().__init__(cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)

    def array_view(self, a, name: str, function: str) -> Array:
        cupy = self.cupy
        if self.library == "JAX":
            a.block_until_ready()
            if str(a.dtype) == "bfloat16":
                # A JAX array on one GPU is dense and in C order; its dtype is
                # ml_dtypes' bfloat16 numpy dtype.
                dtype = np.dtype(a.dtype)
                strides, step = [], dtype.itemsize
                for n in reversed(a.shape):
                    strides.append(step)
                    step *= max(n, 1)
                device = int(a.__dlpack_device__()[1])
                view = self.wrap(a, a.unsafe_buffer_pointer(), dtype, tuple(a.shape),
                                 tuple(reversed(strides)))
                return view if device == self.device else Array(view[:4] + (device,) + view[5:])
        if not isinstance(a, cupy.ndarray):
            a = cupy.from_dlpack(a)
        return self.wrap(a, a.data.ptr, a.dtype, a.shape, a.strides)

    def empty(self, shape, dtype) -> Array:
        dtype = np.dtype(dtype)
        # bfloat16: its bits in a uint16 array (see the class docstring).
        storage = np.uint16 if dtype.name == "bfloat16" else dtype
        with self.cupy.cuda.Device(self.device):
            a = self.cupy.empty(shape, dtype=storage)
        return self.wrap(a, a.data.ptr, dtype, a.shape, a.strides)

    def from_host(self, values: np.ndarray):
        with self.cupy.cuda.Device(self.device):
            a = self.cupy.asarray(values)
        return self.result(self.wrap(a, a.data.ptr, a.dtype, a.shape, a.strides))

    def copy_of(self, a: Array) -> Array:
        c = self.cupy.ascontiguousarray(a.obj)
        if c is a.obj:
            c = a.obj.copy()
        return self.wrap(c, c.data.ptr, c.dtype, c.shape, c.strides)

    def copy(self, src: Array, dst: Array) -> None:
        self.cupy.copyto(dst.obj, src.obj)

    def result(self, view: Array, given=None):
        if given is not None:
            return given
        if self.library == "JAX":
            import jax
            result = jax.dlpack.from_dlpack(view.obj)
            if view.dtype.name == "bfloat16":
                result = jax.lax.bitcast_convert_type(result, jax.numpy.bfloat16)
            return result
        return view.obj


_TORCH_DTYPES = {}


def _torch_dtype(dtype, name: str, function: str):
    """The numpy dtype of a torch dtype the CUDA kernels take."""
    if not _TORCH_DTYPES:
        import torch
        _TORCH_DTYPES.update({torch.float32: np.dtype(np.float32),
                              torch.float64: np.dtype(np.float64),
                              torch.float16: np.dtype(np.float16),
                              torch.uint8: np.dtype(np.uint8)})
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        if str(dtype) == "torch.bfloat16":
            # Described by ml_dtypes' bfloat16, imported now that one arrived.
            _TORCH_DTYPES[dtype] = np.dtype(_ml_dtypes().bfloat16)
            return _TORCH_DTYPES[dtype]
        raise _unsupported_dtype(dtype, name, function, SUPPORTED_CUDA_DTYPES) from None


class TorchCudaPlace(DevicePlace):
    """torch CUDA tensors: read and written through their data pointers,
    results allocated by torch (its caching allocator), launches on
    torch.cuda.current_stream() of the tensors' device. CuPy is not used."""

    library = "torch"
    key = ("torch", "cuda")

    def __init__(self, device: int):
        import torch
        self.torch = torch
        self.torch_dtypes = {np.dtype(np.float32): torch.float32,
                             np.dtype(np.float64): torch.float64,
                             np.dtype(np.float16): torch.float16,
                             np.dtype(np.uint8): torch.uint8}
        super().__init__(device, torch.cuda.current_stream(device).cuda_stream)

    def describe(self) -> str:
        return f"on cuda:{self.device} (torch)"

    def _wrap_tensor(self, t, name: str = "out", function: str = "") -> Array:
        dtype = _torch_dtype(t.dtype, name, function)
        item = dtype.itemsize
        strides = tuple(s * item for s in t.stride())
        return self.wrap(t, t.data_ptr(), dtype, tuple(t.shape), strides)

    def array_view(self, a, name: str, function: str) -> Array:
        if a.requires_grad:
            a = a.detach()
        view = self._wrap_tensor(a, name, function)
        index = a.device.index
        return view if index == self.device else Array(view[:4] + (index,) + view[5:])

    def empty(self, shape, dtype) -> Array:
        dtype = np.dtype(dtype)
        torch_dtype = self.torch.bfloat16 if dtype.name == "bfloat16" else self.torch_dtypes[dtype]
        t = self.torch.empty(shape, dtype=torch_dtype, device=f"cuda:{self.device}")
        return self._wrap_tensor(t)

    def copy_of(self, a: Array) -> Array:
        return self._wrap_tensor(a.obj.clone(memory_format=self.torch.contiguous_format))

    def copy(self, src: Array, dst: Array) -> None:
        dst.obj.copy_(src.obj)

    def from_host(self, values: np.ndarray):
        return TORCH_CPU.from_host(values).to(f"cuda:{self.device}")


# ---- finding a call's place ---------------------------------------------------------------


# The library of each array type met so far ('numpy', 'CuPy', 'torch', or
# a DLPack exporter's 'JAX'/'DLPack'), or None for types that are not arrays.
_LIBRARY_OF_TYPE: dict = {np.ndarray: "numpy"}


def _library_of_type(kind, a):
    library = _LIBRARY_OF_TYPE.get(kind, False)
    if library is not False:
        return library
    module = kind.__module__.split(".")[0]
    if issubclass(kind, (np.ndarray, np.generic)):
        library = "numpy"
    elif module == "cupy":
        library = "CuPy"
    elif module == "torch" and hasattr(a, "data_ptr"):
        library = "torch"
    elif hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        library = "JAX" if module in ("jax", "jaxlib") else "DLPack"
    else:
        library = None
    _LIBRARY_OF_TYPE[kind] = library
    return library


def _identify(a):
    """(library, kind) of an array, kind 'cpu' or 'cuda'; None for a
    non-array."""
    library = _library_of_type(type(a), a)
    if library is None:
        return None
    if library == "numpy":
        return ("numpy", "cpu")
    if library == "CuPy":
        return ("CuPy", "cuda")
    if library == "torch":
        if a.is_cpu:
            return ("torch", "cpu")
        if a.is_cuda:
            return ("torch", "cuda")
        raise TypeError(f"fusednn: torch tensors on {a.device.type} are not supported; fusednn "
                        "runs on the CPU and on CUDA GPUs")
    device_type = int(a.__dlpack_device__()[0])
    if device_type in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        return (library, "cpu")
    if device_type == _DLPACK_CUDA:
        return (library, "cuda")
    raise TypeError(f"fusednn: arrays on DLPack device type {device_type} are not "
                    "supported; fusednn runs on the CPU and on CUDA GPUs")


def _describe_key(key) -> str:
    library, kind = key
    return f"a {library} array on the {'GPU' if kind == 'cuda' else 'CPU'}"


_FIXES = {
    "CuPy": "cupy.asarray(a) moves a numpy array to the GPU, cupy.asnumpy(a) brings a CuPy "
            "array back",
    "torch": "torch.from_numpy(a), torch.as_tensor(a, device=...) or t.cpu() convert to and "
             "between torch tensors",
    "JAX": "jax.numpy.asarray(a) and jax.device_put(a, ...) convert to JAX arrays",
}

_HOST_PLACES = {("numpy", "cpu"): NUMPY, ("torch", "cpu"): TORCH_CPU, ("JAX", "cpu"): JAX_CPU,
                ("DLPack", "cpu"): DLPACK_CPU}


def locate(function: str, names: tuple, *arrays) -> Place:
    """The place of a call's arrays (`names` name them, the primary one
    first; None entries are skipped). Arrays of different libraries or
    devices are a TypeError naming them and the fix; CUDA arrays without
    the CUDA module a RuntimeError."""
    for a in arrays:
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return NUMPY
    # The next most common call: torch CPU tensors (and Parameters), told
    # apart by type and is_cpu alone.
    for a in arrays:
        if a is not None and (_LIBRARY_OF_TYPE.get(type(a)) != "torch" or not a.is_cpu):
            break
    else:
        return TORCH_CPU
    keys = []
    for name, a in zip(names, arrays):
        if a is None:
            continue
        key = _identify(a)
        if key is None:
            raise TypeError(f"fusednn.{function}: {name} must be an array (numpy, CuPy, torch, "
                            f"JAX or DLPack), not {type(a).__name__}")
        keys.append((name, key, a))
    lead_name, lead, lead_array = keys[0]
    strangers = [(name, key) for name, key, _ in keys if key != lead]
    if strangers:
        libraries = {lead[0]} | {key[0] for _, key in strangers}
        fixes = [_FIXES[library] for library in ("CuPy", "torch", "JAX") if library in libraries]
        where = "; ".join(f"{name} {_where(key)}" for name, key in strangers)
        raise TypeError(f"fusednn.{function}: {lead_name} {_where(lead)} but {where}; pass every "
                        f"array from one library on one device"
                        + (f" ({'; '.join(fixes)})" if fixes else ""))
    place = _HOST_PLACES.get(lead)
    if place is not None:
        return place
    return cuda_place(function, lead[0], lead_array)


def _where(key) -> str:
    library, kind = key
    return f"on the {'GPU' if kind == 'cuda' else 'CPU'} ({library})"


def cuda_place(function: str, library: str = "CuPy", lead=None) -> DevicePlace:
    """The place of a CUDA call: `library`'s current device and stream
    (the device of `lead`, a torch tensor, for torch)."""
    if _backend._cuda is None:
        raise _backend.cuda_unavailable(function)
    if library == "torch":
        return TorchCudaPlace(lead.device.index or 0)
    return CupyPlace(library, function)


def device_place(function: str, device, *, kernels: bool = True) -> Place:
    """The place of a result that no array argument decides (dropout_mask's
    mask, the initializers' values). `device` is 'cpu' (numpy), 'cuda'
    (CuPy, its current device), 'cuda:N' (CuPy, device N), a
    torch.device (torch tensors there), or an array of any library the
    functions take (its library, on its device; CuPy's current device for
    JAX and other DLPack GPU arrays). `kernels`: the result is computed
    there, so a GPU place needs the CUDA module (the initializers only copy
    host values and need CuPy or torch alone)."""

    def gpu(make, *args):
        if kernels and _backend._cuda is None:
            raise _backend.cuda_unavailable(function)
        return make(*args)

    if isinstance(device, str):
        if device == "cpu":
            return NUMPY
        if device == "cuda":
            return gpu(CupyPlace, "CuPy", function)
        index = device[5:] if device.startswith("cuda:") else ""
        if index.isdigit():
            return gpu(CupyPlace, "CuPy", function, int(index))
        raise ValueError(f"fusednn.{function}: device must be 'cpu', 'cuda', 'cuda:N', a "
                         f"torch.device or an array, got {device!r}")
    kind = type(device)
    if kind.__module__ == "torch" and kind.__name__ == "device":
        if device.type == "cpu":
            return TORCH_CPU
        if device.type == "cuda":
            return gpu(_torch_cuda_place, function, device.index)
        raise TypeError(f"fusednn.{function}: torch device {device} is not supported; fusednn "
                        "runs on the CPU and on CUDA GPUs")
    key = _identify(device)
    if key is None:
        raise TypeError(f"fusednn.{function}: device must be 'cpu', 'cuda', 'cuda:N', a "
                        f"torch.device or an array, not {kind.__name__}")
    if key in _HOST_PLACES:
        return _HOST_PLACES[key]
    if key == ("torch", "cuda"):
        return gpu(_torch_cuda_place, function, device.device.index)
    if key == ("CuPy", "cuda"):
        return gpu(CupyPlace, "CuPy", function, device.device.id)
    return gpu(CupyPlace, key[0], function)


def _torch_cuda_place(function: str, index) -> TorchCudaPlace:
    """torch's place on CUDA device `index` (None: torch's current one)."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(f"fusednn.{function}: this torch has no CUDA device (torch "
                           f"{torch.__version__}); pass device='cpu' or torch.device('cpu')")
    return TorchCudaPlace(torch.cuda.current_device() if index is None else index)
