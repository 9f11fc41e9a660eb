"""The package's public surface (DESIGN section 4a): the names it exports and
their signatures, ``info()``, the CPU thread setting, and kernels running
concurrently from several Python threads (the GIL is released while a
kernel runs, so they overlap and must not interfere).
"""
from __future__ import annotations

import inspect
import threading

import numpy as np
import pytest

import fusednn as fn
from conftest import random_normals, run_at_once, same_bits
from fusednn import _cpu
from fusednn import reference as ref

DESIGN_ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu",
                      "softplus", "mish", "hardsigmoid", "hardswish", "hardtanh")

# The signatures pinned by DESIGN section 4a.
SIGNATURES = {
    "relu": "(x, *, out=None)",
    "sigmoid": "(x, *, out=None)",
    "tanh": "(x, *, out=None)",
    "silu": "(x, *, out=None)",
    "mish": "(x, *, out=None)",
    "hardsigmoid": "(x, *, out=None)",
    "hardswish": "(x, *, out=None)",
    "selu": "(x, *, out=None)",
    "leaky_relu": "(x, negative_slope=0.01, *, out=None)",
    "elu": "(x, alpha=1.0, *, out=None)",
    "gelu": "(x, approximate='none', *, out=None)",
    "softplus": "(x, beta=1.0, threshold=20.0, *, out=None)",
    "hardtanh": "(x, min_val=-1.0, max_val=1.0, *, out=None)",
    "activation": "(name, x, *, out=None, **params)",
    "activation_backward": "(name, grad_output, *, x=None, y=None, out=None, **params)",
    # DESIGN's dropout signatures with start, the global index of the first
    # element (data-parallel slices of a batch).
    "dropout": "(x, p, *, seed, offset=0, start=0, training=True, return_mask=False, out=None)",
    "dropout_backward": "(grad_output, p, *, mask=None, seed=None, offset=0, start=0, out=None)",
    "dropout_mask": "(shape, p, *, seed, offset=0, start=0, device='cpu')",
    "bias_act_dropout": "(h, bias, act, p, *, seed, offset=0, start=0, axis=-1, return_mask=False, "
                        "out=None, **act_params)",
    "bias_act_dropout_backward": "(grad_output, h, bias, act, p, *, mask=None, seed=None, "
                                 "offset=0, start=0, axis=-1, out=None, **act_params)",
}


def test_activations_tuple_is_designs():
    assert fn.ACTIVATIONS == DESIGN_ACTIVATIONS
    assert isinstance(fn.ACTIVATIONS, tuple)
    assert ref.ACTIVATIONS == DESIGN_ACTIVATIONS


def _unannotated(signature: inspect.Signature) -> inspect.Signature:
    empty = inspect.Parameter.empty
    return signature.replace(
        parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_public_signature(name):
    function = getattr(fn, name)
    assert callable(function)
    assert str(_unannotated(inspect.signature(function))) == SIGNATURES[name]
    assert function.__doc__


@pytest.mark.parametrize("name", DESIGN_ACTIVATIONS)
def test_reference_has_every_activation(name):
    assert callable(getattr(ref, name))
    x = np.linspace(-2.0, 2.0, 9)
    np.testing.assert_array_equal(getattr(ref, name)(x), ref.activation(name, x))


def test_exported_names():
    from fusednn import (ACTIVATIONS, activation, activation_backward,  # noqa: F401
                         get_num_threads, info, reference, set_num_threads)
    for name in fn.__all__:
        assert hasattr(fn, name), name
    for name in ("ACTIVATIONS", "activation", "activation_backward", "reference", "info",
                 "set_num_threads", "get_num_threads", *DESIGN_ACTIVATIONS):
        assert name in fn.__all__, name
    assert fn.reference is ref


def test_info():
    info = fn.info()
    assert isinstance(info, dict)
    assert isinstance(info["version"], str) and info["version"]
    assert info["version"] == fn.__version__
    assert isinstance(info["cuda_built"], bool)
    archs = info["cuda_archs"]
    assert isinstance(archs, list) and all(type(a) is int and a > 0 for a in archs)
    assert bool(archs) == info["cuda_built"]
    # The PTX architecture: one of the SASS ones (the newest) or older.
    ptx = info["cuda_ptx"]
    if info["cuda_built"]:
        assert type(ptx) is int and 0 < ptx <= max(archs)
    else:
        assert ptx is None
    assert isinstance(info["simd"], str) and info["simd"] in _cpu.available_simd()
    assert type(info["threads"]) is int and info["threads"] == fn.get_num_threads() >= 1


def test_info_follows_the_settings(restore_threads, restore_simd):
    fn.set_num_threads(3)
    assert fn.info()["threads"] == 3
    _cpu.set_simd("generic")
    assert fn.info()["simd"] == "generic"


def test_num_threads_round_trip(restore_threads):
    for n in (1, 3, 2, np.int64(4)):
        fn.set_num_threads(n)
        assert fn.get_num_threads() == n
        assert type(fn.get_num_threads()) is int


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None], ids=repr)
def test_num_threads_rejects(bad, restore_threads):
    before = fn.get_num_threads()
    with pytest.raises(ValueError):
        fn.set_num_threads(bad)
    assert fn.get_num_threads() == before


def test_unknown_simd_path_is_rejected(restore_simd):
    before = _cpu.simd()
    with pytest.raises(ValueError):
        _cpu.set_simd("neon-512")
    assert _cpu.simd() == before


def test_concurrent_python_threads_get_correct_results():
    """Two Python threads run large kernels at once (the GIL is released
    while each runs); each must get exactly its single-threaded result."""
    inputs = [random_normals(np.float64, 1_500_000, seed=s) for s in (21, 22)]
    names = ["gelu", "mish"]
    expected = [(fn.activation(n, x), fn.activation_backward(n, x, x=x))
                for n, x in zip(names, inputs)]
    results = [None, None]

    def work(i):
        for _ in range(3):
            results[i] = (fn.activation(names[i], inputs[i]),
                          fn.activation_backward(names[i], inputs[i], x=inputs[i]))

    assert not run_at_once(2, work)
    for got, want in zip(results, expected):
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


def test_concurrent_threads_sharing_an_input():
    x = random_normals(np.float32, 2_000_000, seed=23)
    expected = fn.silu(x)
    outs = [np.empty_like(x) for _ in range(3)]
    threads = [threading.Thread(target=fn.silu, args=(x,), kwargs={"out": o}) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        assert same_bits(out, expected)
