"""``python -m fusednn demo``: a smoke run of every experiment with one
epoch of training, the reference network's accuracy target in the --quick
setting, determinism under --seed, and the errors without scikit-learn.

The tests that need the digits skip when scikit-learn is not installed
(it is the optional ``demo`` extra).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from fusednn import demo, nn
from fusednn.__main__ import main

try:
    import sklearn  # noqa: F401  (only tells whether the demo can run)
    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn is not installed")

SECTIONS = ["1. Variance of pre-activations", "2. Vanishing gradients and dead ReLU units",
            "3. Learning curves", "4. Dropout and the train/test gap",
            "5. The reference net, and accuracy against pruned fraction"]
PLOTS = ["variance.png", "gradients.png", "learning_curves.png", "dropout_gap.png",
         "pruning.png"]


@needs_sklearn
def test_smoke_run_prints_every_table(capsys, tmp_path):
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    for title in SECTIONS:
        assert title in captured.out
    assert "9 of 9 nets within tolerance at every layer" in captured.out
    assert "1/5 variance" in captured.err and "done" in captured.err
    assert "1/5" not in captured.out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plots" in captured.err
    else:
        for name in PLOTS:
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_sklearn
def test_reference_net_reaches_target_in_quick_setting():
    data = demo.load_data(0)
    with demo.single_threaded():
        _, history, _ = demo.reference_net(data, 0, demo.Settings.make(True, None),
                                           lambda message: None)
    assert history.test_accuracy[-1] >= demo.TARGET_ACCURACY


@needs_sklearn
def test_seed_makes_training_repeatable():
    data = demo.load_data(3)
    settings = demo.Settings.make(True, 1)
    states = []
    with demo.single_threaded():
        for _ in range(2):
            model, history, _ = demo.reference_net(data, 3, settings, lambda message: None)
            states.append(model.state())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert np.array_equal(states[0][name], states[1][name]), name


@needs_sklearn
def test_split_is_fixed_by_seed_and_standardized():
    a, b, c = demo.load_data(0), demo.load_data(0), demo.load_data(1)
    assert np.array_equal(a.x_test, b.x_test) and not np.array_equal(a.x_test, c.x_test)
    assert len(a.y_test) == 449 and len(a.y_train) == 1348
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0, atol=1e-5)


def test_missing_sklearn_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--quick"]) == 1
    assert "pip install 'fusednn[demo]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--seed", "-1"], "--seed"),
                                          (["--epochs", "0"], "--epochs")])
def test_bad_arguments(argv, message, capsys):
    assert main(["demo", *argv]) == 1
    assert message in capsys.readouterr().err


def test_table_format():
    table = demo.format_table(["name", "value"], [["a", "1.5"], ["long name", "10"]])
    assert table.splitlines() == ["name       value", "---------  -----",
                                  "a            1.5", "long name     10"]


def test_demo_helpers_build_the_described_nets():
    rng = np.random.default_rng(0)
    model = demo.mlp([64, 32, 10], init_rule="he_normal", batch_norm=True, dropout=0.5, rng=rng)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Dense", "BatchNorm", "Activation", "Dropout", "Dense"]
    weight = demo.plain_uniform((20, 50), seed=0, dtype="float64", device="cpu")
    assert np.abs(weight).max() <= 1 / np.sqrt(50)
    assert isinstance(model, nn.Sequential)
