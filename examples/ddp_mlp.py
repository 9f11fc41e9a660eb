"""Data-parallel training of the digits demo's reference net (64-256-128-10,
batch norm, ReLU, dropout 0.2, Adam) on fusednn, with the same result on
any number of processes as on one.

    python examples/ddp_mlp.py                                  # one process
    mpiexec -n 2 python examples/ddp_mlp.py                     # MPI: fusednn.nn
    python examples/ddp_mlp.py --engine torch                   # one process, PyTorch
    torchrun --nproc_per_node 2 examples/ddp_mlp.py             # torch.distributed (gloo)

Every process draws the same shuffles and initial weights, takes its slice
of each minibatch (in rank order), and runs the layers that make the slices
behave as one batch: SyncBatchNorm (statistics over all the slices) and
dropout whose masks are the slices of the one-process mask. The MPI engine
weights each rank's loss gradient by its share of the batch and sums every
gradient over the ranks; the torch engine uses DistributedDataParallel,
which averages gradients, with equal slices (the batch size must divide
by the process count). Both train in float64, so the runs agree to
rounding and print the same accuracy. Needs scikit-learn for the data
(pip install scikit-learn), and mpi4py with an MPI (pip install mpi4py
mpich) or torch.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from fusednn import demo, nn

SEED = 0
WIDTHS = (64, 256, 128, 10)
DROPOUT = 0.2


def slice_of(batch: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This rank's contiguous share of a minibatch's indices, in rank order."""
    bounds = np.linspace(0, len(batch), size + 1).astype(int)
    return batch[bounds[rank]:bounds[rank + 1]]


def train_mpi(data, epochs: int, batch_size: int) -> float:
    comm = None
    rank, size = 0, 1
    try:
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_size() > 1:
            comm = MPI.COMM_WORLD
            rank, size = comm.Get_rank(), comm.Get_size()
    except ImportError:
        pass
    rng = np.random.default_rng(SEED)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(nn.Dense(n_in, n_out, init="he_normal", seed=rng, dtype="float64"))
        if i < len(WIDTHS) - 2:
            layers += [nn.SyncBatchNorm(n_out, comm, dtype="float64"), nn.Activation("relu"),
                       nn.Dropout(DROPOUT, seed=int(rng.integers(2 ** 63)), comm=comm)]
    model = nn.Sequential(*layers)
    optimizer = nn.Adam(model.parameters(), lr=2e-3)
    x_train, y_train = data.x_train.astype(np.float64), data.y_train
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(y_train))
        for begin in range(0, len(order), batch_size):
            batch = order[begin:begin + batch_size]
            if len(batch) < 2:  # batch norm needs two samples per feature
                continue
            mine = slice_of(batch, rank, size)
            _, grad = nn.softmax_cross_entropy(model(x_train[mine]), y_train[mine])
            model.backward(grad * (len(mine) / len(batch)))
            if comm is not None:
                for p in model.parameters():
                    comm.Allreduce(MPI.IN_PLACE, p.grad, op=MPI.SUM)
            optimizer.step()
    return demo.evaluate(model, data.x_test.astype(np.float64), data.y_test)[1]


def train_torch(data, epochs: int, batch_size: int) -> float:
    import torch
    import torch.distributed as dist
    from fusednn.torch import nn as tnn

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank, size, group = 0, 1, None
    if distributed:
        dist.init_process_group("gloo")
        rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
        if batch_size % size:
            raise SystemExit(f"--batch-size {batch_size} must divide by the {size} processes")
    torch.manual_seed(SEED)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(torch.nn.Linear(n_in, n_out, dtype=torch.float64))
        if i < len(WIDTHS) - 2:
            layers += [tnn.SyncBatchNorm(n_out, dtype=torch.float64), tnn.ReLU(),
                       tnn.Dropout(DROPOUT, process_group=group)]
    model = torch.nn.Sequential(*layers)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_train = torch.tensor(data.x_train, dtype=torch.float64)
    y_train = torch.tensor(data.y_train)
    order_rng = np.random.default_rng(SEED)
    for _ in range(epochs):
        model.train()
        order = order_rng.permutation(len(y_train))
        for begin in range(0, len(order) - batch_size + 1, batch_size):  # whole batches only
            mine = torch.as_tensor(slice_of(order[begin:begin + batch_size], rank, size))
            loss = torch.nn.functional.cross_entropy(model(x_train[mine]), y_train[mine])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(data.x_test, dtype=torch.float64))
    accuracy = float((logits.argmax(1).numpy() == data.y_test).mean())
    if distributed:
        dist.destroy_process_group()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("mpi", "torch"),
                        default="torch" if "TORCHELASTIC_RUN_ID" in os.environ else "mpi",
                        help="fusednn.nn over MPI, or fusednn.torch over torch.distributed "
                             "(the default under torchrun)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    data = demo.load_data(SEED)
    train = train_torch if args.engine == "torch" else train_mpi
    accuracy = train(data, args.epochs, args.batch_size)
    rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0")))
    if rank == 0:
        print(f"{args.engine}: test accuracy {accuracy:.4f} after {args.epochs} epochs")


if __name__ == "__main__":
    main()
