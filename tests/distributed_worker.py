"""One rank of the multi-process tests in test_distributed.py, started by
mpiexec (engine "mpi") or once per rank by the test (engine "torch", gloo
over a file in the output directory). Every rank builds the same global
batch from a fixed seed, takes its slice (uneven; some ranks may be empty)
and writes what it computed to <out>/rank<r>.npz for the test to compare
with one process on the whole batch.

    python distributed_worker.py mpi   <case> <out>
    python distributed_worker.py torch <case> <out> <rank> <world_size>
"""
from __future__ import annotations

import sys

import numpy as np

import fusednn as fn
from fusednn import nn

CHANNELS = 5
DROPOUT_P = 0.3
DROPOUT_SEED = 1234


def slice_bounds(total: int, world: int, rank: int) -> tuple:
    """Uneven slices: rank r gets about (r + 1) parts; the last rank of three
    gets none, to cover empty ranks."""
    weights = [r + 1 for r in range(world)]
    if world == 3:
        weights[-1] = 0
    edges = np.concatenate([[0], np.cumsum(weights)]) * total // sum(weights)
    return int(edges[rank]), int(edges[rank + 1])


def batch(case: str):
    rng = np.random.default_rng(42)
    shape = (14, CHANNELS, 3, 4) if case == "nchw" else (14, CHANNELS)
    x = rng.standard_normal(shape) * 2.5 + rng.uniform(-3, 3, CHANNELS).reshape(
        (1, CHANNELS) + (1,) * (len(shape) - 2))
    dy = rng.standard_normal(shape)
    return x, dy


def training_data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 8))
    labels = rng.integers(0, 3, 24)
    return x, labels


def training_model(comm):
    return nn.Sequential(nn.Dense(8, 16, seed=1, dtype="float64"),
                         nn.SyncBatchNorm(16, comm, dtype="float64"), nn.Activation("tanh"),
                         nn.Dense(16, 3, seed=2, dtype="float64"))


def mpi_batch_norm(comm, case: str) -> dict:
    x, dy = batch(case)
    lo, hi = slice_bounds(x.shape[0], comm.Get_size(), comm.Get_rank())
    layer = nn.SyncBatchNorm(CHANNELS, comm, dtype="float64")
    layer.gamma.value[...] = np.linspace(0.5, 1.5, CHANNELS)
    layer.beta.value[...] = np.linspace(-1, 1, CHANNELS)
    y = layer(x[lo:hi])
    dx = layer.backward(dy[lo:hi])
    return {"lo": lo, "hi": hi, "y": y, "dx": dx, "dgamma": layer.gamma.grad,
            "dbeta": layer.beta.grad, "running_mean": layer.running_mean,
            "running_var": layer.running_var}


def mpi_dropout(comm) -> dict:
    x, dy = batch("nchw")
    lo, hi = slice_bounds(x.shape[0], comm.Get_size(), comm.Get_rank())
    layer = nn.Dropout(DROPOUT_P, seed=None if comm.Get_rank() else DROPOUT_SEED, comm=comm)
    outputs = {}
    for step in range(2):  # the offset advances alike on every rank
        outputs[f"y{step}"] = layer(x[lo:hi])
        outputs[f"dx{step}"] = layer.backward(dy[lo:hi])
    return {"lo": lo, "hi": hi, **outputs}


def mpi_training(comm) -> dict:
    """20 SGD steps on the whole batch, data-parallel: each rank's loss
    gradient is weighted by its share of the batch and every parameter
    gradient is summed over the ranks."""
    from mpi4py import MPI
    x, labels = training_data()
    lo, hi = slice_bounds(x.shape[0], comm.Get_size(), comm.Get_rank())
    model = training_model(comm)
    optimizer = nn.SGD(model.parameters(), lr=0.1)
    share = (hi - lo) / x.shape[0]
    losses = []
    for _ in range(20):
        loss, grad = nn.softmax_cross_entropy(model(x[lo:hi]), labels[lo:hi])
        model.backward(grad * share)
        for p in model.parameters():
            comm.Allreduce(MPI.IN_PLACE, p.grad, op=MPI.SUM)
        optimizer.step()
        losses.append(comm.allreduce(loss * share, op=MPI.SUM))
    return {"losses": np.array(losses)}


def torch_batch_norm(case: str, rank: int, world: int) -> dict:
    import torch
    from fusednn.torch import nn as tnn
    x, dy = batch(case)
    lo, hi = slice_bounds(x.shape[0], world, rank)
    cls = tnn.SyncBatchNorm
    layer = cls(CHANNELS, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        layer.bias.copy_(torch.linspace(-1, 1, CHANNELS))
    xs = torch.tensor(x[lo:hi], requires_grad=True)
    if case == "nchw":
        xs = xs.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(xs)
    y.backward(torch.tensor(dy[lo:hi]))
    return {"lo": lo, "hi": hi, "y": y.detach().numpy(), "dx": xs.grad.numpy(),
            "dgamma": layer.weight.grad.numpy(), "dbeta": layer.bias.grad.numpy(),
            "running_mean": layer.running_mean.numpy(), "running_var": layer.running_var.numpy()}


def torch_dropout(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from fusednn.torch import nn as tnn
    x, dy = batch("nchw")
    lo, hi = slice_bounds(x.shape[0], world, rank)
    torch.manual_seed(DROPOUT_SEED)  # every rank draws the same [seed, offset]
    layer = tnn.Dropout(DROPOUT_P, process_group=dist.group.WORLD)
    outputs = {}
    for step in range(2):
        xs = torch.tensor(x[lo:hi], requires_grad=True)
        y = layer(xs)
        y.backward(torch.tensor(dy[lo:hi]))
        outputs[f"y{step}"], outputs[f"dx{step}"] = y.detach().numpy(), xs.grad.numpy()
    return {"lo": lo, "hi": hi, **outputs}


def main() -> None:
    engine, case, out = sys.argv[1:4]
    if engine == "mpi":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        if case == "training":
            result = mpi_training(comm)
        elif case == "dropout":
            result = mpi_dropout(comm)
        else:
            result = mpi_batch_norm(comm, case)
    else:
        import torch.distributed as dist
        rank, world = int(sys.argv[4]), int(sys.argv[5])
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                                world_size=world)
        try:
            if case == "dropout":
                result = torch_dropout(rank, world)
            else:
                result = torch_batch_norm(case, rank, world)
        finally:
            dist.destroy_process_group()
    np.savez(f"{out}/rank{rank}.npz", **result)


if __name__ == "__main__":
    main()
