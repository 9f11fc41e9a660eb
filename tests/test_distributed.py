"""Data-parallel batch normalization across processes on one machine:
fusednn.nn.SyncBatchNorm over MPI (mpiexec -n 2 and -n 3) and
fusednn.torch.nn.SyncBatchNorm over torch.distributed with gloo (2 and 3
processes), each rank on an uneven slice of one batch (one rank empty with
three), against the one-process kernels on the whole batch; dropout masks
of the ranks' slices against the one-process mask, bit for bit; and a
20-step data-parallel training run against the same run on one process.

The ranks run tests/distributed_worker.py; these tests need mpi4py with an
MPI (the `mpi` extra) or torch, and are skipped without them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fusednn as fn
from fusednn import nn

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = str(Path(__file__).parent / "distributed_worker.py")
TIMEOUT = 120  # seconds per multi-process run


def _mpiexec():
    pytest.importorskip("mpi4py")
    # The mpich wheel puts mpiexec beside the interpreter, which a venv that
    # is not activated leaves off PATH.
    beside = Path(sys.executable).parent / "mpiexec"
    path = str(beside) if beside.exists() else shutil.which("mpiexec")
    if path is None:
        pytest.skip("mpiexec is not on PATH")
    return path


def _environment():
    env = dict(os.environ)
    package = str(Path(fn.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package, env.get("PYTHONPATH")) if p)
    env["FUSEDNN_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_mpi(ranks: int, case: str, out: Path) -> list:
    command = [_mpiexec(), "-n", str(ranks), sys.executable, WORKER, "mpi", case, str(out)]
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(ranks)]


def _run_torch(ranks: int, case: str, out: Path) -> list:
    pytest.importorskip("torch")
    procs = [subprocess.Popen([sys.executable, WORKER, "torch", case, str(out), str(r),
                               str(ranks)], env=_environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(ranks)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(ranks)]


def _check_batch_norm(results: list, case: str) -> None:
    x, dy = worker.batch(case)
    gamma = np.linspace(0.5, 1.5, worker.CHANNELS)
    beta = np.linspace(-1, 1, worker.CHANNELS)
    running_mean, running_var = np.zeros(worker.CHANNELS), np.ones(worker.CHANNELS)
    one = fn.batch_norm(x, gamma, beta, running_mean, running_var)
    dx, dgamma, dbeta = fn.batch_norm_backward(dy, x, gamma, one.save_mean, one.save_invstd)
    assert [int(r["lo"]) for r in results] == sorted(int(r["lo"]) for r in results)
    np.testing.assert_allclose(np.concatenate([r["y"] for r in results]), one.y,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r["dx"] for r in results]), dx,
                               rtol=1e-12, atol=1e-12)
    # Each rank holds its own share of the parameter gradients.
    np.testing.assert_allclose(sum(r["dgamma"] for r in results), dgamma, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(sum(r["dbeta"] for r in results), dbeta, rtol=1e-12, atol=1e-12)
    for r in results:
        np.testing.assert_allclose(r["running_mean"], running_mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(r["running_var"], running_var, rtol=1e-12)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", ["nc", "nchw"])
def test_mpi_sync_batch_norm_matches_one_process(ranks, case, tmp_path):
    _check_batch_norm(_run_mpi(ranks, case, tmp_path), case)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", ["nc", "nchw"])
def test_torch_sync_batch_norm_matches_one_process(ranks, case, tmp_path):
    _check_batch_norm(_run_torch(ranks, case, tmp_path), case)


def _check_dropout(results: list, one_process: list) -> None:
    """Each rank's masks are the slices of the one-process masks, bit for
    bit, step after step."""
    for step, (y, dx) in enumerate(one_process):
        np.testing.assert_array_equal(np.concatenate([r[f"y{step}"] for r in results]), y)
        np.testing.assert_array_equal(np.concatenate([r[f"dx{step}"] for r in results]), dx)


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_dropout_masks_are_slices_of_the_one_process_masks(ranks, tmp_path):
    results = _run_mpi(ranks, "dropout", tmp_path)
    x, dy = worker.batch("nchw")
    layer = nn.Dropout(worker.DROPOUT_P, seed=worker.DROPOUT_SEED)
    one = [(layer(x), layer.backward(dy)) for _ in range(2)]
    assert np.count_nonzero(one[0][0] == 0) > 0  # something was dropped
    _check_dropout(results, one)


@pytest.mark.parametrize("ranks", [2, 3])
def test_torch_dropout_masks_are_slices_of_the_one_process_masks(ranks, tmp_path):
    torch = pytest.importorskip("torch")
    from fusednn.torch import nn as tnn
    results = _run_torch(ranks, "dropout", tmp_path)
    x, dy = worker.batch("nchw")
    torch.manual_seed(worker.DROPOUT_SEED)
    layer = tnn.Dropout(worker.DROPOUT_P)
    one = []
    for _ in range(2):
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        y.backward(torch.tensor(dy))
        one.append((y.detach().numpy(), xt.grad.numpy()))
    _check_dropout(results, one)


def test_mpi_training_tracks_one_process(tmp_path):
    results = _run_mpi(2, "training", tmp_path)
    x, labels = worker.training_data()
    model = worker.training_model(None)
    optimizer = nn.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        loss, grad = nn.softmax_cross_entropy(model(x), labels)
        model.backward(grad)
        optimizer.step()
        losses.append(loss)
    for r in results:
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-10)
    assert losses[-1] < losses[0]  # it trains


def test_sync_batch_norm_without_comm_is_batch_norm():
    x, dy = worker.batch("nc")
    sync, plain = nn.SyncBatchNorm(worker.CHANNELS, dtype="float64"), nn.BatchNorm(
        worker.CHANNELS, dtype="float64")
    np.testing.assert_array_equal(sync(x), plain(x))
    np.testing.assert_array_equal(sync.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(sync.running_var, plain.running_var)
    with pytest.raises(TypeError, match="mpi4py communicator"):
        nn.SyncBatchNorm(3, comm=object())


def test_torch_convert_sync_batchnorm_keeps_state():
    torch = pytest.importorskip("torch")
    from fusednn.torch import nn as tnn
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    model[1].running_mean.fill_(0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = tnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], tnn.SyncBatchNorm)
    assert isinstance(converted[3][0], tnn.SyncBatchNorm)
    assert set(converted.state_dict()) == set(state)
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, state[key])
    # Without an initialized process group it is the one-process batch norm.
    x = torch.randn(6, 4, 5, 5)
    converted[1].train()
    reference = torch.nn.BatchNorm2d(4)
    reference.load_state_dict(converted[1].state_dict())
    torch.testing.assert_close(converted[1](x), reference(x), rtol=1e-5, atol=1e-5)


def test_torch_patch_switches_sync_batch_norm():
    torch = pytest.importorskip("torch")
    import fusednn.torch as ft
    from fusednn.torch import nn as tnn
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.SyncBatchNorm(6))
    result = ft.patch(model)
    assert result.replaced == {"SyncBatchNorm": 1}
    assert type(model[1]) is tnn.SyncBatchNorm
    x = torch.randn(8, 6)
    reference = torch.nn.BatchNorm1d(6)
    torch.testing.assert_close(model[1](x), reference(x), rtol=1e-5, atol=1e-5)
    ft.unpatch(model)
    assert type(model[1]) is torch.nn.SyncBatchNorm


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_mlp.py"


def _example(launcher: list, *options: str) -> str:
    """The accuracy line examples/ddp_mlp.py prints after one epoch."""
    if not EXAMPLE.exists():
        pytest.skip("examples/ is not next to the tests")
    pytest.importorskip("sklearn")
    done = subprocess.run([*launcher, str(EXAMPLE), "--epochs", "1", *options],
                          env=_environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "test accuracy" in line][-1]


def test_example_under_mpiexec_prints_the_one_process_accuracy():
    mpiexec = _mpiexec()
    one = _example([sys.executable])
    assert _example([mpiexec, "-n", "2", sys.executable]) == one


def test_example_under_torchrun_prints_the_one_process_accuracy():
    pytest.importorskip("torch")
    one = _example([sys.executable], "--engine", "torch")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert _example(torchrun) == one
