"""The bench's peer columns: PyTorch eager, torch.compile and jax.jit. How
they are chosen (--peers), skipped when missing, checked against
fusednn.reference by the bounds fusednn is held to (a wrong peer is
flagged, not silently timed), and how compilation and allocation are
reported. Tests that need a peer library skip without it; the check of
dropout peers, whose masks come from generators of their own, is tested
on numpy arrays alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest

from fusednn.__main__ import main
from fusednn.bench import activations as bench_activations
from fusednn.bench import checks, cli
from fusednn.bench import dropout as bench_dropout
from fusednn.bench.cases import PEERS, PeerResult, UsageError

TINY = ["bench", "--quick", "--size", "4096", "--repeat", "1"]


def prose(report: str) -> str:
    """The report's text with its wrapped lines joined (and runs of spaces
    as one), for looking up sentences that may wrap anywhere."""
    return " ".join(report.split())


def table_rows(out: str) -> dict:
    """{(kernel, direction): {column heading: cell}} of the benchmark table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    headings = [cell.strip() for cell in lines[start].split("  ") if cell.strip()]
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip() or line[0] in "*!~-^":
            break
        cells = [cell.strip() for cell in line.split("  ") if cell.strip()]
        rows[cells[0], cells[1]] = dict(zip(headings, cells))
    return rows


# ---- choosing peers ------------------------------------------------------------


def test_peer_selection():
    assert cli.parse_peers("all") == frozenset(PEERS)
    assert cli.parse_peers("none") == frozenset()
    assert cli.parse_peers(" torch , jax.jit") == {"torch", "jax.jit"}
    assert cli.parse_peers("all,torch") == frozenset(PEERS)
    for spec in ("tensorflow", "torch,numba", ",", "none,torch"):
        with pytest.raises(UsageError, match="--peers: unknown peer"):
            cli.parse_peers(spec)


def test_bad_peers_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--peers", "numba"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fusednn bench")
    assert ("--peers: unknown peer 'numba'; use all, none or some of torch, torch.compile, "
            "jax.jit") in err


def test_unselected_peers_are_skipped_columns(capsys):
    assert main(TINY + ["--kernels", "relu:forward", "--peers", "none"]) == 0
    out = capsys.readouterr().out
    for label in PEERS:
        assert f"x {label}: skipped (not selected (--peers))" in prose(out)
    row = table_rows(out)["relu", "forward"]
    assert [row[f"x {label}"] for label in PEERS] == ["-", "-", "-"]


def test_missing_libraries_are_skipped_columns(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "jax", None)
    assert main(TINY + ["--kernels", "dropout:forward"]) == 0
    out = capsys.readouterr().out
    assert "x torch: skipped (not importable" in prose(out)
    assert "x torch.compile: skipped (needs torch, not importable" in prose(out)
    assert "x jax.jit: skipped (not importable" in prose(out)
    assert "compile time" not in prose(out)
    assert [row[f"x {label}"] for row in table_rows(out).values() for label in PEERS] == ["-"] * 9


# ---- the check of dropout peers (numpy only) ------------------------------------------


def _peer_dropout(data, keep, scale=1 / (1 - bench_dropout.DROPOUT_P)):
    """What a peer with the keep mask given outputs for plain dropout's
    forward, in float32."""
    with np.errstate(all="ignore"):
        return np.where(keep, data.x * np.float32(scale), np.float32(0) * data.x)


def test_a_dropout_peer_is_judged_with_its_own_mask():
    kernel = bench_dropout.DROPOUT_KERNELS[0]
    data = bench_dropout._dropout_check_data(kernel, "forward", np.float32)
    keep = np.random.default_rng(1).random(data.x.size) >= bench_dropout.DROPOUT_P
    result = data.judge(_peer_dropout(data, keep), keep)
    assert result.passed and result.unit == "ulp" and result.inputs == data.x.size
    # The same output judged with another mask disagrees where they differ.
    assert not data.judge(_peer_dropout(data, keep), ~keep).passed
    wrong_scale = data.judge(_peer_dropout(data, keep, scale=1 / 0.8), keep)
    assert not wrong_scale.passed and wrong_scale.worst.startswith("at x=")


def test_a_dropout_peer_dropping_too_much_fails():
    kernel = bench_dropout.DROPOUT_KERNELS[0]
    data = bench_dropout._dropout_check_data(kernel, "forward", np.float32)
    keep = np.random.default_rng(2).random(data.x.size) >= 0.2   # p = 0.2, not 0.1
    result = data.judge(_peer_dropout(data, keep), keep)
    assert result.error == math.inf and not result.passed
    assert result.worst.startswith("in the dropped fraction: 0.2")


def test_dropped_fraction_bounds():
    def fraction_check(dropped: int, n: int = 10000):
        keep = np.ones(n, dtype=bool)
        keep[:dropped] = False
        result = checks.CheckResult(0.0, 4.0, "ulp", n, "")
        return checks.check_dropped_fraction(result, keep, 0.1)

    # 6 standard deviations of the fraction of 10000 at p = 0.1: 0.018.
    assert fraction_check(1000).passed and fraction_check(1170).passed
    assert fraction_check(830).passed
    assert not fraction_check(1190).passed and not fraction_check(810).passed


def test_a_peer_off_on_special_values_only_is_marked_apart():
    x, _ = checks.check_inputs(np.float32)
    expected = x.astype(np.float64)
    flushed = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)
    result = checks.compare(flushed, expected, 4.0, {"x": x}, ordinary=checks.ORDINARY)
    assert not result.passed and result.ordinary_error == 0
    assert result.worst == "at x=2.938736e-39: got 0.0, reference 2.938735877055719e-39"
    peer = PeerResult(op="flushing", ms=1.0, x=1.0, allocates=False, allocates_why=None,
                      compile_seconds=None, check_error=result.error, check_unit="ulp",
                      check_tolerance=4.0, check_passed=False,
                      check_ordinary_error=result.ordinary_error, check_worst=result.worst)
    assert peer.marker == "~"
    off = flushed.copy()
    off[-1:] = (off[-1:].view(np.int32) + 8).view(np.float32)   # 8 ulp on an ordinary value
    result = checks.compare(off, expected, 4.0, {"x": x}, ordinary=checks.ORDINARY)
    assert result.ordinary_error == 8
    peer = dataclasses.replace(peer, check_ordinary_error=result.ordinary_error)
    assert peer.marker == "!"
    assert dataclasses.replace(peer, check_passed=True).marker == ""


# ---- PyTorch ------------------------------------------------------------------------


def test_a_wrong_torch_peer_is_flagged_and_still_timed(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch")
    # A sigmoid peer that computes tanh.
    wrong = bench_activations.TorchPeer("tanh.out", lambda a, p, x, o: a.tanh.out(x, out=o))
    kernels = tuple(dataclasses.replace(k, torch_forward=wrong) if k.name == "sigmoid" else k
                    for k in bench_activations.ACTIVATION_KERNELS)
    monkeypatch.setattr(bench_activations, "ACTIVATION_KERNELS", kernels)
    path = tmp_path / "bench.json"
    assert main(TINY + ["--kernels", "sigmoid:forward,relu:forward", "--peers", "torch",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["sigmoid", "forward"]["x torch"].endswith("!")
    assert float(rows["sigmoid", "forward"]["x torch"].rstrip("!~")) > 0
    assert rows["relu", "forward"]["x torch"] == rows["relu", "forward"]["x torch"].rstrip("!~")
    assert "! torch sigmoid forward is off on ordinary inputs (" in prose(out)
    assert "ulp, allowed 4); the largest error: " in prose(out)
    results = {r["kernel"]: r["peers"]["torch"] for r in json.loads(path.read_text())["results"]}
    assert not results["sigmoid"]["check_passed"] and results["sigmoid"]["check_error"] > 4
    assert results["sigmoid"]["op"] == "tanh.out" and results["sigmoid"]["ms"] > 0
    assert results["relu"]["check_passed"] and results["relu"]["check_error"] == 0
    assert results["relu"]["check_unit"] == "ulp" and results["relu"]["check_tolerance"] == 0


def test_torch_compile_writes_the_preallocated_output(tmp_path, capsys):
    pytest.importorskip("torch")
    path = tmp_path / "bench.json"
    assert main(TINY + ["--kernels", "hardtanh:forward,mish:backward",
                        "--peers", "torch.compile", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x torch: skipped (not selected (--peers))" in prose(out)
    assert "x torch.compile: the same PyTorch functions through torch.compile" in prose(out)
    assert "compile time, once per function and excluded from the timings: torch.compile " in prose(out)
    assert "allocates" not in prose(out)
    peers = [r["peers"] for r in json.loads(path.read_text())["results"]]
    assert [set(p) for p in peers] == [{"torch.compile"}] * 2
    compiled = [p["torch.compile"] for p in peers]
    # mish_backward has no out= overload; compiled, its result is stored into the output.
    assert [c["op"] for c in compiled] == ["torch.compile(mish_backward)",
                                           "torch.compile(hardtanh.out)"]
    assert all(not c["allocates"] and c["compile_seconds"] > 0 and c["x"] > 0 for c in compiled)
    assert compiled[1]["check_passed"] and compiled[1]["check_error"] == 0


def test_a_peer_that_fails_to_compile_leaves_its_cell_empty(monkeypatch, capsys):
    torch = pytest.importorskip("torch")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert main(TINY + ["--kernels", "relu:forward", "--peers", "torch,torch.compile"]) == 0
    out = capsys.readouterr().out
    row = table_rows(out)["relu", "forward"]
    assert row["x torch.compile"] == "-" and float(row["x torch"]) > 0
    assert ("- torch.compile relu forward: torch.compile failed: RuntimeError: no C++ compiler "
            "here") in prose(out)


# ---- JAX --------------------------------------------------------------------------


def test_jax_peers_allocate_and_are_checked(tmp_path, capsys):
    jax = pytest.importorskip("jax")
    path = tmp_path / "bench.json"
    assert main(TINY + ["--kernels", "relu:forward,batch_norm[NCHW],dropout:backward",
                        "--peers", "jax.jit", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"x jax.jit: jax {jax.__version__} (XLA:CPU): " in prose(out)
    assert "* jax.jit allocates its result: every row (JAX arrays are immutable)" in prose(out)
    assert "compile time, once per function and excluded from the timings: jax.jit " in prose(out)
    rows = table_rows(out)
    # "dropout" names the family too: all three of its backward passes.
    assert list(rows) == [("relu", "forward"), ("batch_norm[NCHW]", "forward"),
                          ("batch_norm[NCHW]", "backward"), ("dropout", "backward"),
                          ("bias_relu_dropout", "backward"), ("bias_gelu_dropout", "backward")]
    assert all(float(row["x jax.jit"].rstrip("*!~")) > 0 for row in rows.values())
    results = json.loads(path.read_text())["results"]
    for r in results:
        peer = r["peers"]["jax.jit"]
        assert peer["allocates"] and peer["compile_seconds"] > 0 and peer["ms"] > 0
        assert peer["check_passed"] == (peer["check_error"] <= peer["check_tolerance"])
    assert [r["peers"]["jax.jit"]["check_unit"] for r in results] == [
        "ulp", "bound", "bound", "ulp", "ulp", "ulp"]
    # Dropout from jax.random masks, judged with the mask regenerated from the key.
    assert results[3]["peers"]["jax.jit"]["check_passed"]


def test_jax_float64_restores_the_x64_setting(capsys):
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    assert main(TINY + ["--dtype", "float64", "--kernels", "tanh:forward",
                        "--peers", "jax.jit"]) == 0
    assert jax.config.jax_enable_x64 == before
    row = table_rows(capsys.readouterr().out)["tanh", "forward"]
    assert float(row["x jax.jit"].rstrip("*!~")) > 0
