"""``python -m fusednn demo``: a smoke run of every experiment with one
epoch of training, the reference network's accuracy target in the --quick
setting, the claims docs/nn.md makes about growing, pretraining and
pruning (each experiment rerun in the --quick setting, against bounds a
regression would break), determinism under --seed, and the errors without
scikit-learn.

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
            "5. The reference net, and accuracy against pruned fraction",
            "6. Growing a network: grow H from 4 to 64", "7. Layer pretraining: pretrain with",
            "8. Pruning by loss increase against magnitude"]
PLOTS = ["variance.png", "gradients.png", "learning_curves.png", "dropout_gap.png",
         "pruning.png", "growth.png", "pretraining.png", "pruning_criteria.png"]
QUICK = demo.Settings.make(True, None)


def silent(message):
    """A progress callback that prints nothing."""


@needs_sklearn
def test_smoke_run_prints_every_table(capsys, tmp_path):
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    for title in SECTIONS:
        assert title in captured.out
    assert "9 of 9 nets within tolerance at every layer" in captured.out
    assert "1/8 variance" in captured.err and "done" in captured.err
    assert "1/8 variance" not in captured.out
    assert "(no growth step: too few epochs)" in captured.out
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


# ---- the claims of docs/nn.md on sections 6-8 -------------------------------------


@needs_sklearn
def test_growth_loses_nothing_and_matches_the_fixed_net():
    """Every growth step leaves the training loss exactly where it was; every
    rule reaches 64 units, the fixed net's training loss and its test
    accuracy (within 2 points); and it takes more than the lecture's 2x:
    over 4x the fixed net's epochs to reach the fixed net's loss."""
    data = demo.load_data(0)
    with demo.single_threaded():
        runs = demo.growth_experiment(data, 0, QUICK, silent)
    fixed = runs["fixed"]
    expected_steps = (demo.GROW_TO - demo.GROW_FROM) // QUICK.grow_units
    for rule in nn.GROW_RULES:
        run = runs[rule]
        assert run.widths[-1] == demo.GROW_TO and len(run.steps) == expected_steps
        for epoch, before_width, after_width, before, after in run.steps:
            assert after == before and after_width == before_width + QUICK.grow_units
        assert run.test_accuracy >= fixed.test_accuracy - 0.02
        reached = demo.time_to_loss(run, fixed.losses[-1])
        assert reached is not None and reached[0] > 4 * len(fixed.losses)


@needs_sklearn
def test_pretraining_gain_is_within_the_spread():
    """With 10% of the labels every net reaches 80% on average, and neither
    pretraining differs from training from scratch significantly (paired
    t statistic below 2.78, the 5% level for 4 degrees of freedom)."""
    data = demo.load_data(0)
    with demo.single_threaded():
        results = demo.pretraining_experiment(data, 0, QUICK, silent)
    scratch = np.array(results["from scratch"])
    for method, accuracies in results.items():
        assert len(accuracies) == demo.PRETRAIN_SEEDS and np.mean(accuracies) >= 0.80, method
        if method != "from scratch":
            gain = np.array(accuracies) - scratch
            t = abs(gain.mean()) / (gain.std(ddof=1) / np.sqrt(len(gain)))
            assert t < 2.78, method


@needs_sklearn
def test_pruning_by_loss_increase_claims():
    """On the training images the lecture's criterion keeps at least 10
    points more test accuracy than magnitude from 90% pruned on; on the
    held-out batch it loses 15 points against itself at 50%; restoring
    keeps every net within 6 points of the unpruned one and never prunes
    more than asked."""
    data = demo.load_data(0)
    with demo.single_threaded():
        results = demo.loss_increase_experiment(data, 0, QUICK, silent)
    tuned = {(criterion, source, restore, fraction): (reached, after)
             for criterion, source, restore, fraction, reached, _, after in results["rows"]}
    for fraction in QUICK.prune_fractions:
        exact = tuned[("loss increase", "training images", None, fraction)]
        magnitude = tuned[("magnitude", "training images", None, fraction)]
        assert exact[0] == pytest.approx(fraction, abs=0.01)
        if fraction >= 0.9:
            assert exact[1] >= magnitude[1] + 0.10, fraction
        for criterion, source in (("loss increase", "training images"),
                                  ("loss increase", "held-out batch"),
                                  ("magnitude", "training images")):
            reached, after = tuned[(criterion, source, demo.RESTORE_DROP, fraction)]
            assert reached <= fraction + 1e-9 and after >= results["trained"] - 0.06
    assert (tuned[("loss increase", "held-out batch", None, 0.5)][1]
            <= tuned[("loss increase", "training images", None, 0.5)][1] - 0.15)
