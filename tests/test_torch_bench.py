"""``python -m fusednn bench --kernels training``: which rows --kernels
selects, the options it refuses, and a small run of the MLP row (eager
only, one round) through the command line, its table and its JSON. The
times themselves are the bench's business, never a test's. Skips what
needs PyTorch when it is not installed.
"""
from __future__ import annotations

import json

import pytest

from fusednn.__main__ import main
from fusednn.bench import training
from fusednn.bench.cases import UsageError


@pytest.mark.parametrize("spec, rows", [
    ("training", ("mlp", "cnn[NCHW]", "cnn[NHWC]")),
    ("training:cnn", ("cnn[NCHW]", "cnn[NHWC]")),
    ("training:mlp, training:cnn[NHWC]", ("mlp", "cnn[NHWC]")),
    ("all", None), ("relu,batch_norm", None)])
def test_selection(spec, rows):
    assert training.selected(spec) == rows


@pytest.mark.parametrize("spec, message", [
    ("training,relu", "on their own"), ("training:resnet", "unknown training row 'resnet'")])
def test_bad_selection_is_a_usage_error(spec, message):
    with pytest.raises(UsageError, match=message):
        training.selected(spec)


def test_plot_is_refused_for_training(capsys):
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--kernels", "training", "--plot", "x.png"])
    assert exit_info.value.code == 2
    assert "--plot and --compare apply to kernels" in capsys.readouterr().err


def test_small_mlp_run_prints_and_writes_its_row(tmp_path, capsys):
    pytest.importorskip("torch")
    path = tmp_path / "training.json"
    status = main(["bench", "--kernels", "training:mlp", "--quick", "--peers", "none",
                   "--repeat", "1", "--json", str(path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "| mlp | 128x256 |" in out and "torch.compile: not timed" in out
    document = json.loads(path.read_text())
    (row,) = document["training"]
    assert row["replaced"] == {"BatchNorm1d": 2, "GELU": 2, "Dropout": 2}
    assert row["check_error"] < training.CHECK_TOLERANCE["float32"]
    assert row["x"] == pytest.approx(row["stock_ms"] / row["patched_ms"])
    assert row["compiled_stock_ms"] is None and len(row["patched_ms_samples"]) == 1
