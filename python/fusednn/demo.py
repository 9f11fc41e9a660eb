"""``python -m fusednn demo``: the lecture's experiments on initialization,
batch normalization, dropout, growing, pretraining and pruning, run with
fusednn.nn on scikit-learn's handwritten digits
(``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels, 10 classes,
shipped inside scikit-learn).

1. Variance of the pre-activations layer by layer in a 10-layer net, for
   U[-1/sqrt(n), 1/sqrt(n)], Glorot and He initialization with sigmoid,
   tanh and ReLU, measured against Var(h') = n_in Var(w) E[f(h)^2].
2. Gradient norm per layer of a deep sigmoid net (vanishing gradients), and
   the fraction of dead ReLU units after a large negative bias init.
3. Learning curves: bad init against Glorot/He, without and with batch
   norm, with and without dropout.
4. The train/test gap with and without dropout.
5. Accuracy against the pruned fraction of weights, after fine-tuning.
6. Growing a hidden layer from 4 to 64 units by each of ``nn.grow``'s four
   rules against a net with 64 units from the start: time, epochs,
   accuracy, and the loss right before and after every growth step.
7. Pretraining with 10% of the labels: per-unit and autoencoder
   pretraining against the same net from scratch, over 5 seeds.
8. Pruning by the loss increase (the lecture's criterion) against
   magnitude, with and without restoring, after fine-tuning.

Everything is seeded from ``--seed`` (the split, every weight, every
dropout mask and batch order), so a run repeats exactly. Tables go to
stdout, progress to stderr, PNG plots to ``--out`` when matplotlib is
installed. Needs the ``demo`` extra: ``pip install 'fusednn[demo]'``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

import numpy as np

from . import init, nn
from ._backend import get_num_threads, set_num_threads

# The one number the demo promises: the reference network (3 layers, ReLU,
# He init, batch norm, dropout) reaches this test accuracy in --quick.
TARGET_ACCURACY = 0.95
# Per-layer tolerance of the variance table, in standard errors of the
# weight sampling (computed for each layer from its input, see
# variance_experiment).
VARIANCE_TOLERANCE_SE = 4.0
TEST_FRACTION = 0.25


class DemoError(Exception):
    """The demo cannot run (a missing optional dependency, a bad --out)."""


@dataclasses.dataclass
class Data:
    x_train: np.ndarray  # (n_train, 64) float32, standardized with the training statistics
    y_train: np.ndarray  # (n_train,) int64 in [0, 10)
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass
class Settings:
    """How long each experiment trains; --quick shortens, --epochs overrides."""
    curve_epochs: int = 30
    gap_epochs: int = 100
    reference_epochs: int = 40
    finetune_epochs: int = 10
    dead_epochs: int = 20
    repeats: int = 3  # weight draws averaged in the learning curves
    grow_units: int = 1  # units added per growth step (the lecture adds one)
    grow_epochs: int = 600  # a cap: the plateau at full width ends every run before it
    pretrain_epochs: int = 60  # fine-tuning on the 10% of labelled images
    autoencoder_epochs: int = 30
    prune_fractions: tuple = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)

    @classmethod
    def make(cls, quick: bool, epochs: int | None) -> Settings:
        settings = cls(curve_epochs=12, gap_epochs=25, reference_epochs=20, finetune_epochs=4,
                       dead_epochs=8, repeats=1, grow_units=4, grow_epochs=300,
                       pretrain_epochs=30, autoencoder_epochs=10,
                       prune_fractions=(0.5, 0.8, 0.9, 0.95, 0.98)) if quick else cls()
        if epochs is not None:
            for field in ("curve_epochs", "gap_epochs", "reference_epochs", "finetune_epochs",
                          "dead_epochs", "grow_epochs", "pretrain_epochs",
                          "autoencoder_epochs"):
                setattr(settings, field, epochs)
        return settings


class Progress:
    """One line per step on stderr, with the time since the demo started."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=self.stream,
              flush=True)


# ---- data and training -----------------------------------------------------------


def load_data(seed: int) -> Data:
    """The digits, split 75/25 by a permutation drawn from ``seed``, pixels
    standardized with the training set's mean and standard deviation
    (pixels constant over the training set are only centred)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DemoError("the demo needs scikit-learn for its data set: "
                        "pip install 'fusednn[demo]' (or pip install scikit-learn)") from None
    digits = load_digits()
    x = digits.data.astype(np.float64)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return Data(x[train].astype(np.float32), y[train], x[test].astype(np.float32), y[test])


def evaluate(model: nn.Layer, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) in eval mode; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    loss, _ = nn.softmax_cross_entropy(logits, y)
    return loss, nn.accuracy(logits, y)


@dataclasses.dataclass
class History:
    train_loss: list
    train_accuracy: list
    test_loss: list
    test_accuracy: list


def train_epoch(model: nn.Layer, optimizer, x: np.ndarray, y: np.ndarray,
                rng: np.random.Generator, batch_size: int = 64) -> None:
    """One pass over (x, y) in minibatches reshuffled from rng."""
    model.train()
    order = rng.permutation(len(y))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < 2:  # batch norm needs two samples per feature
            continue
        _, grad = nn.softmax_cross_entropy(model(x[batch]), y[batch])
        model.backward(grad)
        optimizer.step()


def train(model: nn.Layer, data: Data, optimizer, epochs: int, rng: np.random.Generator, *,
          batch_size: int = 64, x_train=None, y_train=None) -> History:
    """Minibatch training, the batches reshuffled each epoch from rng;
    evaluates on the training and test sets after every epoch."""
    x_train = data.x_train if x_train is None else x_train
    y_train = data.y_train if y_train is None else y_train
    history = History([], [], [], [])
    for _ in range(epochs):
        train_epoch(model, optimizer, x_train, y_train, rng, batch_size)
        for (loss, accuracy), losses, accuracies in (
                (evaluate(model, x_train, y_train), history.train_loss, history.train_accuracy),
                (evaluate(model, data.x_test, data.y_test), history.test_loss,
                 history.test_accuracy)):
            losses.append(loss)
            accuracies.append(accuracy)
    return history


def mlp(widths, *, init_rule, activation="relu", batch_norm=False, dropout=0.0, bias_init=0.0,
        rng: np.random.Generator, dtype="float32") -> nn.Sequential:
    """Dense layers of the given widths, each hidden one followed by
    [BatchNorm], the activation and [Dropout]."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Dense(n_in, n_out, init=init_rule, seed=rng, dtype=dtype,
                               bias_init=0.0 if last else bias_init))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm(n_out, dtype=dtype))
            layers.append(nn.Activation(activation))
            if dropout:
                layers.append(nn.Dropout(dropout, seed=int(rng.integers(2 ** 63))))
    return nn.Sequential(*layers)


def plain_uniform(shape, *, seed, dtype, device):
    """U[-1/sqrt(n), 1/sqrt(n)] with n = fan_in: the lecture's first rule."""
    bound = 1.0 / math.sqrt(init.fans(shape)[0])
    return init.uniform(shape, -bound, bound, seed=seed, dtype=dtype, device=device)


def tiny_normal(shape, *, seed, dtype, device):
    """N(0, 0.01^2): a bad init, too small for a deep net."""
    return init.normal(shape, 0.0, 0.01, seed=seed, dtype=dtype, device=device)


# ---- tables ----------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list], *, left: int = 1) -> str:
    """Columns separated by two spaces; the first `left` columns are
    left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for r, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def section(title: str, lines: list[str]) -> None:
    print(title)
    print("=" * len(title))
    for line in lines:
        print(line)
    print()


# ---- 1. variance -----------------------------------------------------------------

INITS = {  # name -> (initializer, Var(w) as a function of (fan_in, fan_out))
    "U(+-1/sqrt n)": (plain_uniform, lambda fi, fo: 1.0 / (3 * fi)),
    "Glorot": ("glorot_uniform", lambda fi, fo: 2.0 / (fi + fo)),
    "He": ("he_normal", lambda fi, fo: 2.0 / fi),
}
# Fourth moment of the weights over their variance squared.
KURTOSIS = {"U(+-1/sqrt n)": 9.0 / 5.0, "Glorot": 9.0 / 5.0, "He": 3.0}
# What the lecture's derivation gives per layer in the regime it assumes
# (zero-centred activations, f(h) ~ h for tanh, E[relu(h)^2] = Var(h) / 2),
# for square layers: n Var(w) times 1 (tanh) or 1/2 (ReLU).
SEED_FACTOR = {("U(+-1/sqrt n)", "tanh"): 1 / 3, ("U(+-1/sqrt n)", "relu"): 1 / 6,
               ("Glorot", "tanh"): 1.0, ("Glorot", "relu"): 0.5,
               ("He", "tanh"): 2.0, ("He", "relu"): 1.0}
DEPTH, WIDTH = 10, 256


def variance_experiment(data: Data, seed: int, progress) -> dict:
    """Runs the 10-layer nets on the training images and compares each
    layer's pre-activation variance with the derivation.

    Derived, one layer at a time from the layer's measured input a (the
    images, then f(h)): Var(h) = n_in Var(w) E[a^2] (E over samples and
    units; h is zero-mean because w is). Given a, the measured value
    differs from it only by the draw of the weights: for each output unit
    q = w^T M w with M = a^T a / batch, E q = Var(w) tr M and
    Var q = Var(w)^2 ((kurtosis - 3) sum M_ii^2 + 2 tr M^2); averaging the
    n_out units divides that variance by n_out. That standard error is the
    tolerance's unit.
    """
    results = {}
    x = data.x_train
    rng = np.random.default_rng([seed, 1])
    for init_name, (rule, weight_variance) in INITS.items():
        for act in ("sigmoid", "tanh", "relu"):
            progress(f"1/8 variance: {init_name} init, {act}")
            measured, derived, z_scores = [], [], []
            a = x
            for _ in range(DEPTH):
                dense = nn.Dense(a.shape[1], WIDTH, init=rule, seed=rng)
                h = dense(a)
                var_w = weight_variance(*init.fans(dense.weight.value.shape))
                second_moment = (a.T @ a).astype(np.float64) / a.shape[0]
                n_in = a.shape[1]
                mean_square = float(np.trace(second_moment)) / n_in
                expected = n_in * var_w * mean_square
                spread = var_w * math.sqrt(
                    ((KURTOSIS[init_name] - 3.0) * float((np.diag(second_moment) ** 2).sum())
                     + 2.0 * float((second_moment ** 2).sum())) / WIDTH)
                value = float((h.astype(np.float64) ** 2).mean())
                measured.append(value)
                derived.append(expected)
                z_scores.append((value - expected) / spread)
                a = nn.Activation(act)(h)
            results[(init_name, act)] = (measured, derived, z_scores)
    return results


def report_variance(results: dict, data: Data) -> list[str]:
    headers = ["init", "f", "row"] + [f"L{i + 1}" for i in range(DEPTH)] + [
        "factor/layer", "seed", "max|dev|/se"]
    rows = []
    for (init_name, act), (measured, derived, z_scores) in results.items():
        factor = (measured[-1] / measured[1]) ** (1.0 / (DEPTH - 2))
        seed_factor = SEED_FACTOR.get((init_name, act))
        worst = max(abs(z) for z in z_scores)
        verdict = "ok" if worst <= VARIANCE_TOLERANCE_SE else "OUT"
        rows.append([init_name, act, "measured"] + [f"{v:.3g}" for v in measured]
                    + [f"{factor:.3f}", "-" if seed_factor is None else f"{seed_factor:.3f}",
                       f"{worst:.2f} {verdict}"])
        rows.append(["", "", "derived"] + [f"{v:.3g}" for v in derived] + ["", "", ""])
    failures = sum(max(abs(z) for z in r[2]) > VARIANCE_TOLERANCE_SE for r in results.values())
    return [
        f"10 Dense layers of {WIDTH} units on the {len(data.y_train)} training images "
        f"({data.x_train.shape[1]} standardized pixels).",
        "measured: Var(h) of each layer's pre-activation h (mean of h^2 over samples and units).",
        "derived: Var(h) = n_in Var(w) E[a^2], a = the layer's input (the seed's "
        "Var(h) = n_in Var(w) Var(x)).",
        f"tolerance: |measured - derived| <= {VARIANCE_TOLERANCE_SE:g} standard errors of the "
        "weight draw at every layer (se computed from a; typically 1-10% of the value).",
        "factor/layer: (Var L10 / Var L2)^(1/8); seed: the derivation's factor for square "
        "layers in its regime (tanh(h) ~ h, E[relu(h)^2] = Var(h)/2; none for sigmoid, "
        "whose output is not zero-centred).",
        "",
        format_table(headers, rows, left=3),
        "",
        f"{len(results) - failures} of {len(results)} nets within tolerance at every layer.",
    ]


# ---- 2. gradients and dead units -------------------------------------------------


def gradient_experiment(data: Data, seed: int, progress) -> dict:
    """Norm of dLoss/dW per layer of 10-layer nets (64 units) at init, on
    one batch of 256 training images."""
    progress("2/8 gradient norms per layer")
    batch = slice(0, 256)
    nets = {"sigmoid, Glorot": ("sigmoid", "glorot_uniform"),
            "tanh, Glorot": ("tanh", "glorot_uniform"),
            "relu, He": ("relu", "he_normal")}
    norms = {}
    for label, (act, rule) in nets.items():
        rng = np.random.default_rng([seed, 2])
        model = mlp([64] + [64] * 9 + [10], init_rule=rule, activation=act, rng=rng,
                    dtype="float64")
        _, grad = nn.softmax_cross_entropy(model(data.x_train[batch].astype(np.float64)),
                                           data.y_train[batch])
        model.backward(grad)
        norms[label] = [float(np.linalg.norm(layer.weight.grad)) for layer in model
                        if isinstance(layer, nn.Dense)]
    return norms


def report_gradients(norms: dict) -> list[str]:
    depth = len(next(iter(norms.values())))
    headers = ["net"] + [f"L{i + 1}" for i in range(depth)] + ["L1/L10"]
    rows = [[label] + [f"{v:.2e}" for v in values] + [f"{values[0] / values[-1]:.2g}"]
            for label, values in norms.items()]
    return ["||dLoss/dW|| per Dense layer (L1 = input side) at initialization, one batch "
            "of 256 images; 10 layers of 64 units.",
            "sigmoid' <= 1/4, so the gradient shrinks on its way back to the first layers.",
            "", format_table(headers, rows)]


def dead_units(model: nn.Sequential, x: np.ndarray) -> list[float]:
    """Per ReLU layer, the fraction of units that output 0 for every input."""
    was_training = model.training
    model.eval()
    fractions = []
    a = x
    for layer in model:
        a = layer(a)
        if isinstance(layer, nn.Activation) and layer.name == "relu":
            fractions.append(float((a.max(axis=0) <= 0).mean()))
    model.train(was_training)
    return fractions


def dead_relu_experiment(data: Data, seed: int, settings: Settings, progress) -> list:
    """3 hidden ReLU layers of 128 units, He init, biases set to b: dead
    units at init and after training (a unit that is 0 on every input gets
    no gradient and stays dead)."""
    rows = []
    for bias in (0.0, -1.0, -2.0, -4.0):
        progress(f"2/8 dead ReLU units, bias init {bias:g}")
        rng = np.random.default_rng([seed, 3])
        model = mlp([64, 128, 128, 128, 10], init_rule="he_normal", bias_init=bias, rng=rng)
        before = dead_units(model, data.x_train)
        optimizer = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
        history = train(model, data, optimizer, settings.dead_epochs, rng)
        after = dead_units(model, data.x_train)
        rows.append((bias, before, after, history.test_accuracy[-1]))
    return rows


def report_dead(rows: list, settings: Settings) -> list[str]:
    headers = ["bias init", "dead at init (L1/L2/L3)", f"dead after {settings.dead_epochs} "
               "epochs", "test accuracy"]
    table = [[f"{bias:g}", " / ".join(percent(v) for v in before),
              " / ".join(percent(v) for v in after), percent(acc)]
             for bias, before, after, acc in rows]
    return ["Dead ReLU units (output 0 on all training images) in 3 hidden layers of 128, "
            "He init, every hidden bias set to the bias init; SGD lr 0.05, momentum 0.9.",
            "", format_table(headers, table)]


# ---- 3. learning curves ----------------------------------------------------------

CURVES = {  # label -> (init, batch norm, dropout)
    "N(0, 0.01^2)": (tiny_normal, False, 0.0),
    "N(0, 0.01^2) + BN": (tiny_normal, True, 0.0),
    "U(+-1/sqrt n)": (plain_uniform, False, 0.0),
    "Glorot": ("glorot_uniform", False, 0.0),
    "He": ("he_normal", False, 0.0),
    "He + BN": ("he_normal", True, 0.0),
    "He + BN + dropout 0.2": ("he_normal", True, 0.2),
}
CURVE_WIDTHS = [64] + [128] * 6 + [10]


def learning_curves(data: Data, seed: int, settings: Settings, progress) -> dict:
    """Test accuracy per epoch of a 6-hidden-layer ReLU net (128 units),
    SGD lr 0.02 with momentum 0.9, averaged over `repeats` weight draws."""
    curves = {}
    for label, (rule, batch_norm, dropout) in CURVES.items():
        progress(f"3/8 learning curve: {label}")
        runs = []
        for repeat in range(settings.repeats):
            rng = np.random.default_rng([seed, 4, repeat])
            model = mlp(CURVE_WIDTHS, init_rule=rule, batch_norm=batch_norm, dropout=dropout,
                        rng=rng)
            optimizer = nn.SGD(model.parameters(), lr=0.02, momentum=0.9)
            runs.append(train(model, data, optimizer, settings.curve_epochs, rng).test_accuracy)
        curves[label] = list(np.mean(runs, axis=0)) if runs[0] else []
    return curves


def report_curves(curves: dict, settings: Settings) -> list[str]:
    epochs = settings.curve_epochs
    shown = sorted({e for e in (1, 2, 3, 5, 8, 12, 20, 30, epochs) if e <= epochs})
    headers = ["init / layers"] + [f"ep {e}" for e in shown]
    rows = [[label] + [percent(curve[e - 1]) for e in shown] for label, curve in curves.items()]
    runs = f", mean of {settings.repeats} weight draws" if settings.repeats > 1 else ""
    return [f"Test accuracy by epoch: 6 hidden ReLU layers of 128 units, SGD lr 0.02, "
            f"momentum 0.9, batch 64{runs}.", "", format_table(headers, rows)]


# ---- 4. dropout and the train/test gap -------------------------------------------


def dropout_gap(data: Data, seed: int, settings: Settings, progress) -> list:
    """A wide net (2 hidden ReLU layers of 512, He init) trained with Adam
    until it fits the training set, with and without dropout."""
    rows = []
    for p in (0.0, 0.2, 0.5):
        progress(f"4/8 train/test gap, dropout {p:g}")
        rng = np.random.default_rng([seed, 6])
        model = mlp([64, 512, 512, 10], init_rule="he_normal", dropout=p, rng=rng)
        optimizer = nn.Adam(model.parameters(), lr=1e-3)
        history = train(model, data, optimizer, settings.gap_epochs, rng)
        rows.append((p, history))
    return rows


def report_gap(rows: list, settings: Settings) -> list[str]:
    headers = ["dropout p", "train acc", "test acc", "gap", "train loss", "test loss",
               "loss gap"]
    table = []
    for p, history in rows:
        train_acc, test_acc = history.train_accuracy[-1], history.test_accuracy[-1]
        train_loss, test_loss = history.train_loss[-1], history.test_loss[-1]
        table.append([f"{p:g}", percent(train_acc), percent(test_acc),
                      percent(train_acc - test_acc), f"{train_loss:.4f}", f"{test_loss:.3f}",
                      f"{test_loss - train_loss:.3f}"])
    return [f"2 hidden ReLU layers of 512, He init, Adam lr 1e-3, batch 64, "
            f"{settings.gap_epochs} epochs; accuracy and cross-entropy in eval mode.",
            "", format_table(headers, table)]


# ---- 5. the reference net and pruning --------------------------------------------


def reference_net(data: Data, seed: int, settings: Settings, progress):
    """The 3-layer net the demo promises >= 95% with: 64-256-128-10, ReLU,
    He init, batch norm and dropout 0.2 after each hidden layer, Adam."""
    progress("5/8 reference net: 3 layers, ReLU, He, batch norm, dropout")
    rng = np.random.default_rng([seed, 7])
    model = mlp([64, 256, 128, 10], init_rule="he_normal", batch_norm=True, dropout=0.2,
                rng=rng)
    optimizer = nn.Adam(model.parameters(), lr=2e-3)
    history = train(model, data, optimizer, settings.reference_epochs, rng)
    return model, history, rng


PRUNE_FRACTIONS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def pruning_experiment(model: nn.Sequential, data: Data, rng, settings: Settings,
                       progress) -> list:
    """From the trained reference net: prune each fraction of every weight
    matrix by magnitude, measure, fine-tune with the mask kept, measure."""
    trained = model.state()
    rows = []
    for fraction in PRUNE_FRACTIONS:
        progress(f"5/8 pruning {percent(fraction)} of the weights")
        model.load_state(trained)
        for p in model.parameters():
            p.mask = None
        nn.prune_by_magnitude(model, fraction)
        pruned = evaluate(model, data.x_test, data.y_test)[1]
        optimizer = nn.Adam(model.parameters(), lr=5e-4)
        train(model, data, optimizer, settings.finetune_epochs, rng)
        tuned = evaluate(model, data.x_test, data.y_test)[1]
        rows.append((fraction, nn.sparsity(model), pruned, tuned))
    model.load_state(trained)
    for p in model.parameters():
        p.mask = None
    return rows


def report_reference(history: History, settings: Settings) -> list[str]:
    accuracy = history.test_accuracy[-1]
    verdict = "reached" if accuracy >= TARGET_ACCURACY else "NOT reached"
    return [f"Reference net 64-256-128-10: ReLU, He init, batch norm, dropout 0.2, Adam lr 2e-3, "
            f"{settings.reference_epochs} epochs:",
            f"test accuracy {percent(accuracy)} (train {percent(history.train_accuracy[-1])}); "
            f"target >= {percent(TARGET_ACCURACY)}: {verdict}."]


def report_pruning(rows: list, settings: Settings) -> list[str]:
    headers = ["pruned", "weights zero", "test acc, pruned", f"after {settings.finetune_epochs} "
               "epochs fine-tuning"]
    table = [[percent(f), percent(s), percent(a), percent(b)] for f, s, a, b in rows]
    return ["Magnitude pruning of the reference net: the smallest |w| of each weight matrix "
            "zeroed and kept zero (mask applied after every Adam step, lr 5e-4).",
            "", format_table(headers, table)]


# ---- 6. growing a network --------------------------------------------------------

GROW_FROM, GROW_TO = 4, 64
# The plateau that triggers growth, and ends every run: the training loss
# (eval mode, all training images) improved by less than this for
# GROW_PATIENCE epochs in a row.
GROW_MIN_DELTA = 0.01
GROW_PATIENCE = 2


@dataclasses.dataclass
class GrowthRun:
    losses: list        # training loss after each epoch
    seconds: list       # time since the run started, after each epoch
    widths: list        # hidden units after each epoch
    steps: list         # (epoch, width before, width after, loss before, loss after)
    test_accuracy: float


def growth_run(data: Data, rule, seed: int, settings: Settings) -> GrowthRun:
    """A 64-H-10 ReLU net (He init, Adam lr 2e-3, batch 64) trained epoch by
    epoch. rule=None: H = 64 from the start. Otherwise H starts at 4 and
    grows by settings.grow_units (nn.GrowOnPlateau with that rule) at each
    plateau of the training loss until it is 64. Either way the run stops
    at the first plateau at H = 64 (or after settings.grow_epochs)."""
    rng = np.random.default_rng([seed, 8])
    width = GROW_TO if rule is None else GROW_FROM
    model = mlp([64, width, 10], init_rule="he_normal", rng=rng)
    optimizer = nn.Adam(model.parameters(), lr=2e-3)
    grower = None if rule is None else nn.GrowOnPlateau(
        model, model[0], GROW_TO, units=settings.grow_units, rule=rule, patience=GROW_PATIENCE,
        min_delta=GROW_MIN_DELTA, seed=rng)
    plateau = nn.Plateau(GROW_PATIENCE, min_delta=GROW_MIN_DELTA)
    run = GrowthRun([], [], [], [], 0.0)
    start = time.perf_counter()
    for epoch in range(1, settings.grow_epochs + 1):
        train_epoch(model, optimizer, data.x_train, data.y_train, rng)
        loss = evaluate(model, data.x_train, data.y_train)[0]
        stop = False
        if grower is not None and not grower.full:
            width = model[0].out_features
            if grower.update(loss, (data.x_train, data.y_train)):
                after = evaluate(model, data.x_train, data.y_train)[0]
                run.steps.append((epoch, width, model[0].out_features, loss, after))
        else:
            stop = plateau.update(loss)
        run.losses.append(loss)
        run.seconds.append(time.perf_counter() - start)
        run.widths.append(model[0].out_features)
        if stop:
            break
    run.test_accuracy = evaluate(model, data.x_test, data.y_test)[1]
    return run


def growth_experiment(data: Data, seed: int, settings: Settings, progress) -> dict:
    runs = {}
    progress(f"6/8 fixed H = {GROW_TO}")
    runs["fixed"] = growth_run(data, None, seed, settings)
    for rule in nn.GROW_RULES:
        progress(f"6/8 growing H from {GROW_FROM} to {GROW_TO}, rule {rule}")
        runs[rule] = growth_run(data, rule, seed, settings)
    return runs


def time_to_loss(run: GrowthRun, target: float):
    """(epochs, seconds) until run's training loss first reached target, or None."""
    for epoch, (loss, seconds) in enumerate(zip(run.losses, run.seconds), 1):
        if loss <= target:
            return epoch, seconds
    return None


def report_growth(runs: dict, settings: Settings) -> list[str]:
    fixed = runs["fixed"]
    target = fixed.losses[-1]
    headers = ["net", "final H", "epochs", "seconds", "train loss", "test acc",
               "x fixed time", "to fixed's loss: epochs", "seconds", "x fixed time",
               "growth steps", "max |loss after - before|"]
    rows = [[f"fixed H={GROW_TO}", GROW_TO, len(fixed.losses), f"{fixed.seconds[-1]:.2f}",
             f"{target:.2e}", percent(fixed.test_accuracy), "1.00", len(fixed.losses),
             f"{fixed.seconds[-1]:.2f}", "1.00", "-", "-"]]
    for rule in nn.GROW_RULES:
        run = runs[rule]
        reached = time_to_loss(run, target)
        jump = max((abs(after - before) for *_, before, after in run.steps), default=None)
        rows.append([f"grown, {rule}", run.widths[-1], len(run.losses),
                     f"{run.seconds[-1]:.2f}", f"{run.losses[-1]:.2e}",
                     percent(run.test_accuracy), f"{run.seconds[-1] / fixed.seconds[-1]:.2f}"]
                    + ([reached[0], f"{reached[1]:.2f}",
                        f"{reached[1] / fixed.seconds[-1]:.2f}"] if reached
                       else ["not reached", "-", "-"])
                    + [len(run.steps), "-" if jump is None else f"{jump:.1e}"])
    step_rows = []
    for index in range(max(len(runs[rule].steps) for rule in nn.GROW_RULES)):
        row = [index + 1]
        for rule in nn.GROW_RULES:
            steps = runs[rule].steps
            if index < len(steps):
                epoch, before_width, after_width, before, after = steps[index]
                row += [f"{epoch}", f"{before_width}->{after_width}", f"{before:.6f}",
                        f"{after:.6f}"]
            else:
                row += ["", "", "", ""]
        step_rows.append(row)
    step_headers = ["step"] + [f"{name} {rule}" if name == "ep" else name
                               for rule in nn.GROW_RULES
                               for name in ("ep", "H", "before", "after")]
    return [f"A 64-H-10 ReLU net, He init, Adam lr 2e-3, batch 64. Grown: H starts at "
            f"{GROW_FROM}; whenever the training loss (eval mode, all training images) has "
            f"improved by less than {GROW_MIN_DELTA} for {GROW_PATIENCE} epochs, nn.grow adds "
            f"{settings.grow_units} unit{'s' if settings.grow_units > 1 else ''} by the rule, "
            f"until H = {GROW_TO}. Every run, the fixed one too, ends at its first such plateau "
            f"at H = {GROW_TO}.",
            "Times include the growth steps and the per-epoch loss evaluation. x fixed time: "
            "over the fixed net's seconds to its plateau (the lecture's claim: 1.5-2x). To "
            "fixed's loss: when the grown net's training loss first reached the fixed net's "
            "final one.",
            "", format_table(headers, rows), "",
            "Training loss right before and right after each growth step (eval mode, all "
            "training images):", "",
            format_table(step_headers, step_rows) if step_rows else "(no growth step: too few "
            "epochs)"]


# ---- 7. pretraining --------------------------------------------------------------

PRETRAIN_WIDTHS = [64, 32, 10]
LABELED_FRACTION = 0.1
PRETRAIN_SEEDS = 5
PRETRAIN_METHODS = ("from scratch", "per-unit pretraining", "autoencoder pretraining")


def pretraining_experiment(data: Data, seed: int, settings: Settings, progress) -> dict:
    """64-32-10 tanh nets fine-tuned on a random 10% of the training labels
    (Adam lr 2e-3, batch 32), test accuracy per method and seed. Per-unit
    pretraining sees the labelled 10% (each unit its own half of it); the
    autoencoder all training images without labels, as pretraining on
    unlabelled data does."""
    results = {method: [] for method in PRETRAIN_METHODS}
    n_labeled = round(LABELED_FRACTION * len(data.y_train))
    for repeat in range(PRETRAIN_SEEDS):
        progress(f"7/8 pretraining with {percent(LABELED_FRACTION)} of the labels, seed "
                 f"{repeat + 1}/{PRETRAIN_SEEDS}")
        labeled = np.random.default_rng([seed, 9, repeat]).choice(len(data.y_train), n_labeled,
                                                                  replace=False)
        x, y = data.x_train[labeled], data.y_train[labeled]
        for method in PRETRAIN_METHODS:
            rng = np.random.default_rng([seed, 10, repeat])  # the same net for every method
            model = mlp(PRETRAIN_WIDTHS, init_rule="glorot_uniform", activation="tanh", rng=rng)
            if method == "per-unit pretraining":
                nn.pretrain_units(model, model[0], (x, y), seed=rng)
            elif method == "autoencoder pretraining":
                autoencoder = nn.Autoencoder(model, 2, seed=rng)
                autoencoder.fit(data.x_train, epochs=settings.autoencoder_epochs, lr=2e-3,
                                seed=rng)
                model = nn.replace_head(autoencoder, nn.Dense(PRETRAIN_WIDTHS[1],
                                                              PRETRAIN_WIDTHS[2], seed=rng))
            optimizer = nn.Adam(model.parameters(), lr=2e-3)
            for _ in range(settings.pretrain_epochs):
                train_epoch(model, optimizer, x, y, rng, batch_size=32)
            results[method].append(evaluate(model, data.x_test, data.y_test)[1])
    return results


def report_pretraining(results: dict, settings: Settings, data: Data) -> list[str]:
    scratch = np.array(results["from scratch"])
    headers = ["net", "mean test acc", "sd", "min", "max", "gain over scratch (paired)",
               "seeds better"] + [f"seed {i + 1}" for i in range(PRETRAIN_SEEDS)]
    rows = []
    for method, accuracies in results.items():
        a = np.array(accuracies)
        gain = a - scratch
        rows.append([method, percent(a.mean()), percent(a.std(ddof=1)), percent(a.min()),
                     percent(a.max()),
                     "-" if method == "from scratch" else
                     f"{100 * gain.mean():+.1f} +- {100 * gain.std(ddof=1):.1f} points",
                     "-" if method == "from scratch" else f"{int((gain > 0).sum())}/{len(a)}"]
                    + [percent(v) for v in a])
    n_labeled = round(LABELED_FRACTION * len(data.y_train))
    return [f"64-32-10 tanh nets, Glorot init, fine-tuned on {n_labeled} labelled training "
            f"images ({percent(LABELED_FRACTION)}) for {settings.pretrain_epochs} epochs "
            f"(Adam lr 2e-3, batch 32); {PRETRAIN_SEEDS} seeds (labelled subset and weights).",
            "per-unit: nn.pretrain_units, each of the 32 units on its own random half of the "
            "labelled images, then joined; autoencoder: 64-32-64 (nn.Autoencoder) on all "
            f"{len(data.y_train)} training images without labels, "
            f"{settings.autoencoder_epochs} epochs, decoder replaced by a new Dense(32, 10).",
            "sd: over seeds; gain: mean and sd of the per-seed difference to the net from "
            "scratch on the same labels.", "", format_table(headers, rows)]


# ---- 8. pruning by loss increase -------------------------------------------------

PRUNE_WIDTHS = [64, 64, 10]  # 4096 and 640 weights: the exact criterion for both
RESTORE_DROP = 0.02
HELD_OUT_FRACTION = 0.2


def loss_increase_experiment(data: Data, seed: int, settings: Settings, progress) -> dict:
    """A 64-64-10 ReLU net trained on 80% of the training images (the rest
    is a held-out batch), pruned as the lecture prunes: remove the least
    significant weights, backpropagate again, repeat; here up through
    settings.prune_fractions, fine-tuning (masks kept) after each. The
    criteria: the exact loss increase evaluated on the training images or
    on the held-out batch, and magnitude; each without and with restoring
    (restore_if_drop on the same images; magnitude's on the training
    images). Returns the trained net's test accuracy and rows (criterion,
    images, restore, fraction, weights zero, test accuracy pruned,
    fine-tuned)."""
    rng = np.random.default_rng([seed, 13])
    order = rng.permutation(len(data.y_train))
    n_held = round(HELD_OUT_FRACTION * len(order))
    held, fit = order[:n_held], order[n_held:]
    x_fit, y_fit = data.x_train[fit], data.y_train[fit]
    images = {"training images": (x_fit, y_fit),
              "held-out batch": (data.x_train[held], data.y_train[held])}
    progress("8/8 pruning: training the 64-64-10 net")
    model = mlp(PRUNE_WIDTHS, init_rule="he_normal", rng=rng)
    optimizer = nn.Adam(model.parameters(), lr=2e-3)
    for _ in range(settings.reference_epochs):
        train_epoch(model, optimizer, x_fit, y_fit, rng)
    trained = model.state()
    variants = [("loss increase", "training images"), ("loss increase", "held-out batch"),
                ("magnitude", "training images")]
    rows = []
    for criterion, source in variants:
        for restore in (None, RESTORE_DROP):
            progress(f"8/8 pruning by {criterion} ({source}), "
                     f"{'restoring' if restore else 'no restoring'}")
            model.load_state(trained)
            for p in model.parameters():
                p.mask = None
            for fraction in settings.prune_fractions:
                reached = nn.prune(model, fraction, criterion=criterion.replace(" ", "_"),
                                   data=images[source], restore_if_drop=restore)
                pruned = evaluate(model, data.x_test, data.y_test)[1]
                optimizer = nn.Adam(model.parameters(), lr=5e-4)
                for _ in range(settings.finetune_epochs):
                    train_epoch(model, optimizer, x_fit, y_fit, rng)
                tuned = evaluate(model, data.x_test, data.y_test)[1]
                rows.append((criterion, source, restore, fraction, reached, pruned, tuned))
    model.load_state(trained)
    for p in model.parameters():
        p.mask = None
    return {"trained": evaluate(model, data.x_test, data.y_test)[1], "rows": rows,
            "held_out": n_held, "fit": len(fit)}


def report_loss_increase(results: dict, settings: Settings) -> list[str]:
    headers = ["criterion", "evaluated on", "restore", "asked", "weights zero",
               "test acc, pruned", f"after {settings.finetune_epochs} epochs fine-tuning"]
    table = [[criterion, source, "-" if restore is None else f"<= {percent(restore)} drop",
              percent(fraction), percent(reached), percent(pruned), percent(tuned)]
             for criterion, source, restore, fraction, reached, pruned, tuned
             in results["rows"]]
    return [f"A 64-64-10 ReLU net (He init, Adam lr 2e-3, {settings.reference_epochs} epochs) "
            f"trained on {results['fit']} training images: test accuracy "
            f"{percent(results['trained'])}. Pruned in rounds, to each asked fraction in turn "
            "(nn.prune per layer, earlier zeros kept), fine-tuned after each round (Adam lr "
            "5e-4, masks kept). Loss increase: the exact criterion (each weight zeroed alone, "
            f"the change of the mean loss) on the {results['fit']} training images or on the "
            f"{results['held_out']} held-out ones. Restore: the last removed weights of a "
            f"round put back until accuracy on those images is within {percent(RESTORE_DROP)} "
            "of what it was before the round.",
            "", format_table(headers, table)]


# ---- plots -----------------------------------------------------------------------


def write_plots(out_dir: str, results: dict, progress) -> list[str]:
    """PNG figures of every experiment; returns the paths written."""
    from matplotlib.figure import Figure

    written = []

    def save(figure, name):
        path = os.path.join(out_dir, name)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        written.append(path)

    figure = Figure(figsize=(12, 4))
    for column, act in enumerate(("sigmoid", "tanh", "relu")):
        axes = figure.add_subplot(1, 3, column + 1)
        for init_name in INITS:
            measured, derived, _ = results["variance"][(init_name, act)]
            layers = np.arange(1, len(measured) + 1)
            line, = axes.semilogy(layers, measured, "o-", label=f"{init_name} measured")
            axes.semilogy(layers, derived, "x--", color=line.get_color(), label="derived")
        axes.set(title=f"{act}: Var(pre-activation)", xlabel="layer")
        axes.legend(fontsize=7)
    save(figure, "variance.png")

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for label, values in results["gradients"].items():
        axes.semilogy(np.arange(1, len(values) + 1), values, "o-", label=label)
    axes.set(title="||dLoss/dW|| per layer at init", xlabel="layer (1 = input side)")
    axes.legend()
    save(figure, "gradients.png")

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for label, curve in results["curves"].items():
        axes.plot(np.arange(1, len(curve) + 1), curve, label=label)
    axes.set(title="test accuracy by epoch", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    axes.legend(fontsize=8)
    save(figure, "learning_curves.png")

    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for p, history in results["gap"]:
        epochs = np.arange(1, len(history.train_loss) + 1)
        line, = axes.plot(epochs, history.train_loss, label=f"p={p:g} train")
        axes.plot(epochs, history.test_loss, "--", color=line.get_color(), label=f"p={p:g} test")
    axes.set(title="loss with and without dropout", xlabel="epoch", ylabel="cross-entropy",
             yscale="log")
    axes.legend(fontsize=8)
    save(figure, "dropout_gap.png")

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    fractions = [row[0] for row in results["pruning"]]
    axes.plot(fractions, [row[2] for row in results["pruning"]], "o-", label="pruned")
    axes.plot(fractions, [row[3] for row in results["pruning"]], "o-", label="fine-tuned")
    axes.set(title="accuracy against pruned fraction", xlabel="fraction of weights zeroed",
             ylabel="test accuracy")
    axes.legend()
    save(figure, "pruning.png")

    runs = results["growth"]
    figure = Figure(figsize=(12, 4))
    loss_axes, width_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for label, run in runs.items():
        seconds = np.array(run.seconds)
        line, = loss_axes.semilogy(seconds, run.losses, label=label)
        steps = [epoch - 1 for epoch, *_ in run.steps]
        loss_axes.semilogy(seconds[steps], [run.losses[i] for i in steps], ".",
                           color=line.get_color())
        width_axes.plot(np.arange(1, len(run.widths) + 1), run.widths, label=label)
    loss_axes.set(title="training loss (dots: growth steps)", xlabel="seconds",
                  ylabel="cross-entropy")
    width_axes.set(title="hidden units", xlabel="epoch", ylabel="H")
    loss_axes.legend(fontsize=8)
    save(figure, "growth.png")

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for position, (method, accuracies) in enumerate(results["pretraining"].items()):
        axes.plot([position] * len(accuracies), accuracies, "o", alpha=0.6)
        axes.errorbar(position + 0.15, np.mean(accuracies), yerr=np.std(accuracies, ddof=1),
                      fmt="s", color="black", capsize=4)
    axes.set_xticks(range(len(results["pretraining"])), list(results["pretraining"]),
                    fontsize=8)
    axes.set(title="test accuracy with 10% of the labels (mean +- sd)", ylabel="accuracy")
    save(figure, "pretraining.png")

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    variants = {}
    for criterion, source, restore, _, reached, _, tuned in results["loss_increase"]["rows"]:
        variants.setdefault((criterion, source, restore), []).append((reached, tuned))
    for (criterion, source, restore), points in variants.items():
        reached, tuned = zip(*points)
        axes.plot(reached, tuned, "o--" if restore else "o-",
                  label=f"{criterion}, {source}{', restoring' if restore else ''}")
    axes.set(title="test accuracy after fine-tuning", xlabel="fraction of weights zero",
             ylabel="test accuracy", ylim=(0, 1))
    axes.legend(fontsize=7)
    save(figure, "pruning_criteria.png")
    for path in written:
        progress(f"wrote {path}")
    return written


# ---- command line ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="shorter training (under a minute on two cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the weights, dropout and batch order "
                             "(default 0)")
    parser.add_argument("--out", metavar="DIR",
                        help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help="train every model for N epochs instead (a smoke test)")


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise DemoError(f"--seed must be non-negative, got {args.seed}")
    if args.epochs is not None and args.epochs < 1:
        raise DemoError(f"--epochs must be at least 1, got {args.epochs}")
    plots = args.out is not None
    if plots:
        try:
            import matplotlib  # noqa: F401  (only checks that plots can be drawn)
        except ImportError:
            print("fusednn demo: matplotlib is not installed; no plots "
                  "(pip install 'fusednn[demo]')", file=sys.stderr)
            plots = False
        else:
            os.makedirs(args.out, exist_ok=True)
    settings = Settings.make(args.quick, args.epochs)
    with single_threaded():
        return _run_experiments(args, settings, plots)


@contextlib.contextmanager
def single_threaded():
    """Runs fusednn's kernels and BLAS on one thread, restoring both after.

    The demo's matrices are small (a batch of 64 by a few hundred units):
    threaded BLAS and threaded kernels spend more time handing out work
    than computing (ten times more on a loaded two-core machine).
    threadpoolctl comes with scikit-learn."""
    threads = get_num_threads()
    set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1, user_api="blas")
    try:
        with limits:
            yield
    finally:
        set_num_threads(threads)


def _run_experiments(args: argparse.Namespace, settings: Settings, plots: bool) -> int:
    progress = Progress()
    data = load_data(args.seed)
    progress(f"digits: {len(data.y_train)} training and {len(data.y_test)} test images, "
             f"seed {args.seed}")
    results = {}

    results["variance"] = variance_experiment(data, args.seed, progress)
    section("1. Variance of pre-activations, layer by layer",
            report_variance(results["variance"], data))

    results["gradients"] = gradient_experiment(data, args.seed, progress)
    results["dead"] = dead_relu_experiment(data, args.seed, settings, progress)
    section("2. Vanishing gradients and dead ReLU units",
            report_gradients(results["gradients"]) + [""] + report_dead(results["dead"],
                                                                       settings))

    results["curves"] = learning_curves(data, args.seed, settings, progress)
    section("3. Learning curves: initialization, batch norm, dropout",
            report_curves(results["curves"], settings))

    results["gap"] = dropout_gap(data, args.seed, settings, progress)
    section("4. Dropout and the train/test gap", report_gap(results["gap"], settings))

    model, history, rng = reference_net(data, args.seed, settings, progress)
    results["pruning"] = pruning_experiment(model, data, rng, settings, progress)
    section("5. The reference net, and accuracy against pruned fraction",
            report_reference(history, settings) + [""] + report_pruning(results["pruning"],
                                                                       settings))

    results["growth"] = growth_experiment(data, args.seed, settings, progress)
    section(f"6. Growing a network: grow H from {GROW_FROM} to {GROW_TO} by each rule",
            report_growth(results["growth"], settings))

    results["pretraining"] = pretraining_experiment(data, args.seed, settings, progress)
    section(f"7. Layer pretraining: pretrain with {percent(LABELED_FRACTION)} of the labels",
            report_pretraining(results["pretraining"], settings, data))

    results["loss_increase"] = loss_increase_experiment(data, args.seed, settings, progress)
    section("8. Pruning by loss increase against magnitude",
            report_loss_increase(results["loss_increase"], settings))
    if plots:
        write_plots(args.out, results, progress)
    progress("done")
    return 0
