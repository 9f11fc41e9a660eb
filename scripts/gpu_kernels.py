"""Runs each CUDA kernel family of fusednn once, for a profiler to measure.

    ncu --clock-control none --csv --page raw --metrics ... python3 scripts/gpu_kernels.py

launches, on CuPy arrays, the activations whose speed depends most on their
arithmetic (relu as the memory-bound baseline), dropout with its mask, the
fused bias + gelu + dropout, and batch norm forward (training) and backward
in the NCHW and NHWC layouts of the benchmark, each after one warm-up call
that the profiler also records; then PyTorch's batch norm on the same data,
for comparison. `scripts/gpu_check.sh` runs it under Nsight Compute where
that is installed and prints one line per kernel launch: its duration, its
DRAM traffic and throughput, its SM throughput, its registers and its
achieved occupancy, which say where each kernel's time goes.
"""
import cupy as cp

import fusednn as fn

ELEMENTWISE = 2**26
BATCH_NORM_NCHW = (32, 128, 56, 56)


def twice(call):
    """The warm-up call and the measured one."""
    call()
    call()


def main():
    rng = cp.random.default_rng(0)
    x = rng.standard_normal(ELEMENTWISE, dtype=cp.float32)
    out = cp.empty_like(x)
    for name in ("relu", "sigmoid", "tanh", "gelu", "silu", "softplus", "mish"):
        twice(lambda: fn.activation(name, x, out=out))
    twice(lambda: fn.activation("gelu", x, approximate="tanh", out=out))
    twice(lambda: fn.dropout(x, 0.1, seed=1, offset=0, return_mask=True))
    h = x.reshape(-1, 4096)
    bias = rng.standard_normal(4096, dtype=cp.float32)
    twice(lambda: fn.bias_act_dropout(h, bias, "gelu", 0.1, seed=1, offset=0))

    c = BATCH_NORM_NCHW[1]
    nchw = rng.standard_normal(BATCH_NORM_NCHW, dtype=cp.float32)
    nhwc = cp.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    gamma = rng.standard_normal(c, dtype=cp.float32)
    beta = rng.standard_normal(c, dtype=cp.float32)
    for data, axis in ((nchw, 1), (nhwc, -1)):
        running_mean = cp.zeros(c, cp.float32)
        running_var = cp.ones(c, cp.float32)
        result = fn.batch_norm(data, gamma, beta, running_mean, running_var, training=True,
                               axis=axis)
        twice(lambda: fn.batch_norm(data, gamma, beta, running_mean, running_var,
                                    training=True, axis=axis))
        grad = rng.standard_normal(data.shape, dtype=cp.float32)
        twice(lambda: fn.batch_norm_backward(grad, data, gamma, result.save_mean,
                                             result.save_invstd, axis=axis))

    import torch
    for data in (torch.from_dlpack(nchw),
                 torch.from_dlpack(nchw).contiguous(memory_format=torch.channels_last)):
        twice(lambda: torch.ops.aten.native_batch_norm(
            data, torch.from_dlpack(gamma), torch.from_dlpack(beta), torch.zeros(c, device="cuda"),
            torch.ones(c, device="cuda"), True, 0.1, 1e-5))
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
