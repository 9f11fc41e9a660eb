"""fusednn: fused training kernels for numpy (CPU) and CuPy (GPU) arrays.

    import fusednn as fn
    y = fn.gelu(x)
    gx = fn.activation_backward("gelu", gy, x=x)
    y, mask = fn.dropout(x, 0.1, seed=1234, offset=step, return_mask=True)

``fusednn.init`` holds the weight initializers (Glorot, He, LeCun) and
``fusednn.nn`` small layers, losses and optimizers built on the kernels.
``fusednn.reference`` holds a float64 numpy implementation of every kernel,
used to check them. ``python -m fusednn bench`` times the kernels against a
memory copy, the reference and PyTorch; ``python -m fusednn info`` prints
the build configuration.
"""
from . import reference
from ._backend import get_num_threads, get_thread_pool, info, set_num_threads, set_thread_pool
from .batchnorm import BatchNormResult, batch_norm, batch_norm_backward
from .batchnorm_split import (BatchNormMoments, BatchNormStats, batch_norm_apply,
                              batch_norm_backward_apply, batch_norm_backward_reduce,
                              batch_norm_combine, batch_norm_finalize, batch_norm_stats)
from .activations import (ACTIVATIONS, activation, activation_backward, elu, gelu,
                          hardsigmoid, hardswish, hardtanh, leaky_relu, mish, relu, selu,
                          sigmoid, silu, softplus, tanh)
from .dropout import (bias_act_dropout, bias_act_dropout_backward, dropout, dropout_backward,
                      dropout_mask)
from . import init, nn

__version__ = info()["version"]

__all__ = [
    "ACTIVATIONS", "BatchNormMoments", "BatchNormResult", "BatchNormStats", "activation",
    "activation_backward", "batch_norm", "batch_norm_apply", "batch_norm_backward",
    "batch_norm_backward_apply", "batch_norm_backward_reduce", "batch_norm_combine",
    "batch_norm_finalize", "batch_norm_stats", "bias_act_dropout", "bias_act_dropout_backward", "dropout",
    "dropout_backward", "dropout_mask", "elu", "gelu", "get_num_threads", "get_thread_pool",
    "hardsigmoid", "hardswish", "hardtanh", "info", "init", "leaky_relu", "mish", "nn",
    "reference", "relu", "selu", "set_num_threads", "set_thread_pool", "sigmoid", "silu", "softplus", "tanh",
]
