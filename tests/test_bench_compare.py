"""``fusednn bench --compare OLD.json`` and ``--fail-on-regression PCT``:
the comparison of a run with an earlier one, judged against the noise of
the two runs' repeats, on synthetic JSON files and end to end through the
command. No test here depends on how fast anything runs: the end-to-end
ones move the old file's times by a factor of 1000.
"""
from __future__ import annotations

import json

import pytest

from fusednn.__main__ import main
from fusednn.bench import output

TINY = ["bench", "--quick", "--size", "4096", "--repeat", "3", "--peers", "none"]
HEADER = {"date": "2026-12-01T00:00:00+00:00", "machine": "test machine", "device": "cpu",
          "dtype": "float32", "size": 4096, "threads": 2, "simd": "avx2"}


def row(kernel, direction, samples, elements=4096):
    ordered = sorted(samples)
    return {"family": "activations", "kernel": kernel, "direction": direction,
            "elements": elements, "time_ms": ordered[len(ordered) // 2],
            "time_ms_samples": samples}


def write(path, rows, **header):
    path.write_text(json.dumps({"header": {**HEADER, **header}, "results": rows}))
    return str(path)


@pytest.fixture
def old_and_new(tmp_path):
    """Two synthetic runs: relu forward 30% slower with repeats within 1%
    of each other (a regression), gelu forward 2% slower with repeats
    spread by 8% (noise)."""
    old = write(tmp_path / "old.json", [
        row("relu", "forward", [9.95, 10.0, 10.05, 10.0, 9.98]),
        row("gelu", "forward", [19.6, 20.0, 20.4, 20.1, 19.9])])
    new = write(tmp_path / "new.json", [
        row("relu", "forward", [12.9, 13.0, 13.1, 13.05, 12.95]),
        row("gelu", "forward", [19.6, 20.4, 21.2, 20.5, 20.0])])
    return output.load_previous(old), output.load_previous(new)


def test_a_regression_and_a_noise_level_change(old_and_new):
    old, new = old_and_new
    changes, differs = output.compare_runs(old, new)
    assert differs == []
    relu, gelu = changes
    assert (relu.kernel, relu.direction, relu.then_ms, relu.now_ms) == ("relu", "forward",
                                                                        10.0, 13.0)
    assert relu.ratio == pytest.approx(1.3)
    assert relu.noise == pytest.approx(0.1 / 13.0)   # quartiles 12.95 and 13.05
    assert relu.change == "slower"
    assert relu.regressed(10) and relu.regressed(29) and not relu.regressed(31)
    assert gelu.ratio == pytest.approx(20.4 / 20.0)
    assert gelu.noise == pytest.approx(0.5 / 20.4)   # quartiles 20.0 and 20.5
    assert gelu.change == "" and not gelu.regressed(0)
    assert output.regression_message(changes, 10) == (
        "1 row slower than the old file by more than 10% and the noise: "
        "relu forward (1.30x)")
    assert output.regression_message(changes, 50) is None


def test_comparison_table(old_and_new, tmp_path):
    old, new = old_and_new
    changes, differs = output.compare_runs(old, new)
    text = output.comparison_text("old.json", old, new, changes, differs, 10)
    lines = text.splitlines()
    assert lines[0].startswith("compared with old.json (2026-12-01T00:00:00+00:00)")
    assert lines[1].split() == ["kernel", "direction", "then", "(ms)", "now", "(ms)",
                                "now/then", "noise", "change"]
    assert lines[2].split() == ["relu", "forward", "10.000", "13.000", "1.300", "0.8%", "slower"]
    assert lines[3].split() == ["gelu", "forward", "20.000", "20.400", "1.020", "2.5%"]
    assert lines[4] == ("1 slower and 0 faster beyond the noise, of 2 compared; "
                        "--fail-on-regression 10: 1 slower by more than 10%")


def test_faster_rows_and_rows_without_a_counterpart(tmp_path):
    old = output.load_previous(write(tmp_path / "old.json", [
        row("relu", "forward", [10.0, 10.1, 9.9]),
        row("tanh", "forward", [5.0, 5.0, 5.0], elements=1024)], threads=1))
    new = output.load_previous(write(tmp_path / "new.json", [
        row("relu", "forward", [7.0, 7.1, 6.9]),
        row("tanh", "forward", [5.0, 5.1, 4.9]),
        row("sigmoid", "forward", [1.0, 1.0, 1.0])]))
    changes, differs = output.compare_runs(old, new)
    assert differs == ["threads"]
    assert [(c.kernel, c.change, c.note) for c in changes] == [
        ("relu", "faster", ""), ("tanh", "", "1024 elements then, not compared"),
        ("sigmoid", "", "not in the old file")]
    assert output.regression_message(changes, 0) is None
    text = output.comparison_text("old.json", old, new, changes, differs, None)
    assert "  differs: threads 2 now, 1 then; the ratios mix in that change" in text
    assert text.endswith("\n0 slower and 1 faster beyond the noise, of 1 compared")


def test_spread_is_the_interquartile_range_over_the_median():
    assert output.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)
    assert output.spread([2.0, 2.0, 2.0]) == 0.0
    assert output.spread([1.0, 2.0]) is None and output.spread(None) is None


def test_rows_of_files_without_samples_take_this_runs_noise(tmp_path):
    old = {"header": HEADER, "results": [{"kernel": "relu", "direction": "forward",
                                          "elements": 4096, "time_ms": 10.0}]}
    new = {"header": HEADER, "results": [row("relu", "forward", [10.4, 10.5, 10.6])]}
    (change,), _ = output.compare_runs(old, new)
    assert change.noise == pytest.approx(0.1 / 10.5)
    assert change.change == "slower" and not change.regressed(10)
    few = {"header": HEADER, "results": [row("relu", "forward", [10.5])]}
    (change,), _ = output.compare_runs(old, few)
    assert change.noise is None and change.change == "slower"


def _scaled(document: dict, factor: float) -> dict:
    for r in document["results"]:
        r["time_ms"] *= factor
        r["time_ms_samples"] = [t * factor for t in r["time_ms_samples"]]
    return document


@pytest.mark.parametrize(("factor", "status", "change"), [(1e-3, 1, "slower"),
                                                          (1e3, 0, "faster")])
def test_compare_through_the_command(factor, status, change, tmp_path, capsys):
    first = tmp_path / "first.json"
    assert main(TINY + ["--kernels", "relu,tanh:forward", "--json", str(first)]) == 0
    capsys.readouterr()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_scaled(json.loads(first.read_text()), factor)))
    assert main(TINY + ["--kernels", "relu,tanh:forward", "--compare", str(old),
                        "--fail-on-regression", "10"]) == status
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"compared with {old}"))
    table = [line.split() for line in lines[start + 2:start + 5]]
    assert [(cells[0], cells[1], cells[-1]) for cells in table] == [
        ("tanh", "forward", change), ("relu", "forward", change), ("relu", "backward", change)]
    if status:
        assert ("fusednn bench: 3 rows slower than the old file by more than 10% and the "
                "noise: tanh forward (") in captured.err
    else:
        assert "slower than the old file" not in captured.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--fail-on-regression", "10"], "--fail-on-regression needs --compare OLD.json"),
    (["--compare", "{missing}"], "--compare: cannot read {missing}"),
    (["--compare", "{not_bench}"], "is not a JSON file of fusednn bench --json"),
    (["--compare", "{broken}"], "--compare: cannot read {broken}"),
    (["--compare", "{not_bench}", "--fail-on-regression", "-5"],
     "argument --fail-on-regression: must be a percentage >= 0"),
    (["--fail-on-regression", "ten"], "argument --fail-on-regression: expected a number"),
])
def test_bad_comparison_options_are_usage_errors(argv, message, tmp_path, capsys):
    files = {"missing": tmp_path / "missing.json", "not_bench": tmp_path / "other.json",
             "broken": tmp_path / "broken.json"}
    files["not_bench"].write_text('{"results": 3}')
    files["broken"].write_text('{"header": ')
    argv = [a.format(**files) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fusednn bench")
    assert message.format(**files) in err
    assert "checking" not in err

