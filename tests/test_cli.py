"""The ``fusednn`` command: ``info``, and ``bench``'s check stage, table,
JSON and plot outputs and its errors.

The benchmarks here run on a few thousand elements with one repeat, in
process through ``main(argv)``: they check what the command reports and how
it fails, never how fast anything is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import fusednn as fn
from fusednn.__main__ import main
from fusednn.bench import activations as bench_activations
from fusednn.bench import batchnorm as bench_batchnorm
from fusednn.bench import cases, checks, cli, output, peers, timing

TINY = ["bench", "--quick", "--size", "4096", "--repeat", "1"]
HEADINGS = ["kernel", "direction", "bytes/elem", "time (ms)", "GB/s", "% roof", "x numpy-ref",
            "x torch", "x torch.compile", "x jax.jit"]


def prose(report: str) -> str:
    """The report's text with its wrapped lines joined (and runs of spaces
    as one), for looking up sentences that may wrap anywhere."""
    return " ".join(report.split())


@pytest.fixture
def no_peers(monkeypatch):
    """Runs the test as if neither PyTorch nor JAX were installed."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "jax", None)


def table_rows(out: str) -> list[list[str]]:
    """The benchmark table's rows, split into cells (cells are separated by
    two or more spaces; the bytes/elem cell holds one)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    rows = []
    for line in lines[start:]:
        if not line.strip() or line[0] in "*!~-^":
            break
        rows.append([cell.strip() for cell in line.split("  ") if cell.strip()])
    return rows


# ---- info ----------------------------------------------------------------------


def test_info_prints_one_key_per_line(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    build = fn.info()
    assert [line.split(": ", 1)[0] for line in lines] == list(build)
    printed = dict(line.split(": ", 1) for line in lines)
    assert printed["version"] == fn.__version__
    assert printed["simd"] == build["simd"]
    assert printed["threads"] == str(fn.get_num_threads())
    assert printed["cuda_built"] == str(build["cuda_built"])
    assert printed["simd_available"] == ", ".join(build["simd_available"])


def test_info_json_is_fusednn_info(capsys):
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == fn.info()


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fusednn")
    assert "bench" in prose(out) and "info" in prose(out)


def test_module_runs_as_a_command():
    done = subprocess.run([sys.executable, "-m", "fusednn", "--version"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fusednn {fn.__version__}"


# ---- bench: the table and the JSON --------------------------------------------


def test_bench_prints_table_and_writes_json(tmp_path, capsys, no_peers):
    path = tmp_path / "bench.json"
    assert main(TINY + ["--kernels", "relu,sigmoid:backward,gelu_tanh", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "checking 5 kernels against fusednn.reference (float32)" in captured.err
    assert "[5/5] timing gelu_tanh backward" in captured.err

    out = captured.out
    build = fn.info()
    assert out.startswith("fusednn bench  ")
    assert f"fusednn {build['version']}, simd {build['simd']}" in prose(out)
    assert f"threads {fn.get_num_threads()}" in prose(out)
    assert "4096 (2^12) float32 elements; median of 1 repeat" in prose(out)
    assert "check: all 5 agree with fusednn.reference within 4 ulp (relu exact)" in prose(out)
    assert "x torch: skipped (not importable" in prose(out)
    assert "x torch.compile: skipped (needs torch, not importable" in prose(out)
    assert "x jax.jit: skipped (not importable" in prose(out)

    rows = table_rows(out)
    assert rows[0] == HEADINGS
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("sigmoid", "backward"), ("relu", "forward"), ("relu", "backward"),
        ("gelu_tanh", "forward"), ("gelu_tanh", "backward")]
    for row in rows[1:]:
        assert row[2] == ("8 (1r+1w)" if row[1] == "forward" else "12 (2r+1w)")
        # Printed rounded: on a busy machine a tiny case may show 0.0 GB/s, so
        # the table is only parsed here and positivity is checked in the JSON.
        assert all(float(row[k]) >= 0 for k in (3, 4, 6))
        assert row[5].rstrip("^").endswith("%")
        assert row[7:] == ["-", "-", "-"]

    document = json.loads(path.read_text())
    assert set(document) == {"header", "roofs", "checks", "results"}
    header = document["header"]
    assert (header["dtype"], header["size"], header["repeat"]) == ("float32", 4096, 1)
    assert header["torch_version"] is None
    assert header["simd"] == build["simd"]
    assert [r["bytes_per_element"] for r in document["roofs"]] == [8, 12]
    for roof in document["roofs"]:
        assert roof["source"] in ("fusednn._cpu.copy", "np.copyto")
        assert roof["gb_per_s"][roof["source"]] == max(roof["gb_per_s"].values())
    checks = document["checks"]
    assert len(checks) == 5 and all(c["passed"] and c["inputs"] > 4096 for c in checks)
    assert {c["unit"] for c in checks} == {"ulp"}
    assert {c["tolerance"] for c in checks if c["kernel"] == "relu"} == {0.0}
    results = document["results"]
    assert [(r["kernel"], r["direction"]) for r in results] == [
        (r[0], r[1]) for r in rows[1:]]
    for r in results:
        assert r["family"] == "activations"
        assert (r["shape"], r["elements"]) == ([4096], 4096)
        assert r["bytes_moved"] == 4096 * r["bytes_per_element"]
        assert r["check_unit"] == "ulp" and r["check_error"] <= 4
        assert r["time_ms"] > 0 and r["x_numpy_reference"] > 0
        assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / r["time_ms"] / 1e6)
        assert r["percent_of_roof"] == pytest.approx(100 * r["gb_per_s"] / r["roof_gb_per_s"])
        assert r["reference_elements"] == 4096
        assert r["x_torch"] is None and r["torch_op"] is None
        assert r["peers"] == {}
        assert len(r["time_ms_samples"]) == 1 and r["time_ms_samples"][0] == r["time_ms"]


def test_bench_float64_counts_eight_byte_elements(capsys, no_peers):
    assert main(TINY + ["--dtype", "float64", "--kernels", "tanh"]) == 0
    out = capsys.readouterr().out
    assert "float64 elements" in prose(out)
    rows = table_rows(out)
    assert [r[2] for r in rows[1:]] == ["16 (1r+1w)", "24 (2r+1w)"]


def test_bench_threads_option_is_restored(capsys, no_peers):
    before = fn.get_num_threads()
    assert main(TINY + ["--threads", "1", "--kernels", "relu:forward"]) == 0
    assert "threads 1" in capsys.readouterr().out
    assert fn.get_num_threads() == before


def test_bench_times_pytorch_into_preallocated_outputs(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch_threads = torch.get_num_threads()
    path = tmp_path / "bench.json"
    assert main(TINY + ["--threads", "1", "--kernels", "sigmoid,hardswish:backward",
                        "--peers", "torch", "--json", str(path)]) == 0
    assert torch.get_num_threads() == torch_threads
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in prose(out)
    assert "allocates" not in prose(out)
    results = json.loads(path.read_text())["results"]
    assert [(r["torch_op"], r["torch_allocates"]) for r in results] == [
        ("sigmoid.out", False), ("sigmoid_backward.grad_input", False),
        ("hardswish_backward.out", False)]
    assert all(r["x_torch"] > 0 and r["x_torch"] == r["peers"]["torch"]["x"] for r in results)
    assert all(set(r["peers"]) == {"torch"} for r in results)
    assert all(float(row[7].rstrip("!~")) > 0 for row in table_rows(out)[1:])


def test_a_torch_peer_without_out_overload_is_marked(monkeypatch, capsys):
    pytest.importorskip("torch")
    # As mish_backward, which has no out= overload.
    allocating = bench_activations.TorchPeer(
        "sigmoid_backward", lambda a, p, g, y, o: a.sigmoid_backward(g, y), allocates=True)
    kernels = tuple(dataclasses.replace(k, torch_backward=allocating) if k.name == "sigmoid" else k
                    for k in bench_activations.ACTIVATION_KERNELS)
    monkeypatch.setattr(bench_activations, "ACTIVATION_KERNELS", kernels)
    assert main(TINY + ["--kernels", "sigmoid,relu:backward", "--peers", "torch"]) == 0
    out = capsys.readouterr().out
    assert "* torch allocates its result: sigmoid_backward (no out= overload)" in prose(out)
    assert [row[7].rstrip("!~").endswith("*") for row in table_rows(out)[1:]] == [
        False, True, False]


# ---- bench: batch norm -----------------------------------------------------------


@pytest.mark.parametrize(("dtype", "item"), [("float32", 4), ("float64", 8), ("float16", 2),
                                             ("bfloat16", 2)])
def test_bench_batchnorm_rows_count_its_traffic(dtype, item, tmp_path, capsys, no_peers):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    path = tmp_path / "bench.json"
    assert main(TINY + ["--dtype", dtype, "--kernels", "batchnorm", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "checking 4 kernels against fusednn.reference" in captured.err
    out = captured.out
    # --size 4096 gives 32x128xHxW with H = W = sqrt(4096 / (32 * 128)) = 1.
    parameters = ", gamma, beta and running statistics float32" if item == 2 else ""
    assert (f"batch_norm x 32x128x1x1 (NCHW, axis=1) and 32x1x1x128 (NHWC, axis=-1), "
            f"4096 {dtype} elements{parameters}; median of 1 repeat") in prose(out)
    assert "check: all 4 agree with fusednn.reference within per-value bounds" in prose(out)
    assert "x numpy-ref: fusednn.reference (float64) timed on the whole batch" in prose(out)

    reads_writes = {"forward": (2, 1), "backward": (4, 1)}
    rows = table_rows(out)
    assert rows[0] == HEADINGS
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("batch_norm[NCHW]", "forward"), ("batch_norm[NCHW]", "backward"),
        ("batch_norm[NHWC]", "forward"), ("batch_norm[NHWC]", "backward")]
    for row in rows[1:]:
        reads, writes = reads_writes[row[1]]
        assert row[2] == f"{(reads + writes) * item} ({reads}r+{writes}w)"
        # Printed rounded: on a busy machine a tiny case may show 0.0 GB/s, so
        # the table is only parsed here and positivity is checked in the JSON.
        assert all(float(row[k]) >= 0 for k in (3, 4, 6))
        assert row[7:] == ["-", "-", "-"]

    document = json.loads(path.read_text())
    assert [(r["bytes_per_element"], r["elements"]) for r in document["roofs"]] == [
        (3 * item, 4096), (5 * item, 4096)]
    checks = document["checks"]
    assert len(checks) == 4
    for check in checks:
        assert check["family"] == "batchnorm" and check["unit"] == "bound"
        assert check["passed"] and check["error"] <= check["tolerance"] == 1.0
        assert check["inputs"] == 24 * 20 * 50 * 57
    shapes = {"batch_norm[NCHW]": [32, 128, 1, 1], "batch_norm[NHWC]": [32, 1, 1, 128]}
    for r in document["results"]:
        reads, writes = reads_writes[r["direction"]]
        assert r["family"] == "batchnorm"
        assert (r["shape"], r["elements"]) == (shapes[r["kernel"]], 4096)
        assert r["traffic"] == f"{reads}r+{writes}w"
        assert r["bytes_moved"] == 4096 * (reads + writes) * item
        assert r["time_ms"] > 0 and r["x_numpy_reference"] > 0
        assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / r["time_ms"] / 1e6)
        assert r["reference_elements"] == 4096
        assert r["check_unit"] == "bound" and 0 <= r["check_error"] <= 1


def test_bench_batchnorm_times_pytorch_on_the_same_memory(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch_threads = torch.get_num_threads()
    path = tmp_path / "bench.json"
    assert main(TINY + ["--threads", "1", "--kernels", "batch_norm", "--peers", "torch",
                        "--json", str(path)]) == 0
    assert torch.get_num_threads() == torch_threads
    out = capsys.readouterr().out
    assert "native_batch_norm.out writing preallocated outputs" in prose(out)
    assert "NHWC as channels_last views of the same memory; torch threads 1" in prose(out)
    assert ("* torch allocates its result: native_batch_norm_backward "
            "(its .out overload fills a new tensor and copies it, which is slower)") in prose(out)
    results = json.loads(path.read_text())["results"]
    assert [(r["torch_op"], r["torch_allocates"]) for r in results] == [
        ("native_batch_norm.out", False), ("native_batch_norm_backward", True)] * 2
    assert all(r["x_torch"] > 0 for r in results)
    assert [row[7].rstrip("!~").endswith("*") for row in table_rows(out)[1:]] == [False, True] * 2


def test_bench_with_two_families_reports_each(tmp_path, capsys, no_peers):
    path = tmp_path / "bench.json"
    assert main(TINY + ["--kernels", "relu:forward,batch_norm[NHWC]:backward",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("activations: 4096 (2^12) float32 elements; batchnorm: batch_norm x 32x1x1x128 "
            "(NHWC, axis=-1), 4096 float32 elements; median of 1 repeat") in prose(out)
    lines = out.splitlines()
    start = lines.index("check: all 2 agree with fusednn.reference:")
    assert lines[start + 1].startswith("  activations: within 4 ulp (relu exact) on ")
    # Each family's line, its continuations indented further.
    batchnorm = next(i for i, line in enumerate(lines) if line.startswith("  batchnorm: "))
    assert lines[batchnorm].startswith("  batchnorm: within per-value bounds ")
    assert all(line.startswith("    ") for line in lines[start + 2:batchnorm])
    assert [(r[0], r[1], r[2]) for r in table_rows(out)[1:]] == [
        ("relu", "forward", "8 (1r+1w)"), ("batch_norm[NHWC]", "backward", "20 (4r+1w)")]
    roofs = json.loads(path.read_text())["roofs"]
    assert [(r["bytes_per_element"], r["elements"]) for r in roofs] == [(8, 4096), (20, 4096)]


def _plan(**options) -> cases.Plan:
    return cases.Plan(device="cpu", dtype=np.dtype(np.float32), size=cli.DEFAULT_SIZE,
                      repeat=1, threads=1, reference_elements=cli.REFERENCE_ELEMENTS,
                      torch=None, torch_note="", **options)


def test_batchnorm_shapes():
    assert bench_batchnorm.batch_norm_shape(_plan()) == (32, 128, 56, 56)
    assert bench_batchnorm.batch_norm_shape(_plan(quick=True)) == (32, 128, 32, 32)
    assert math.prod(bench_batchnorm.BATCH_NORM_QUICK_SHAPE) == cli.QUICK_SIZE
    sized = {size: bench_batchnorm.batch_norm_shape(
                 dataclasses.replace(_plan(quick=True), size=size, size_given=True))
             for size in (1, 4096, 2**22, 2**25)}
    assert sized == {1: (32, 128, 1, 1), 4096: (32, 128, 1, 1), 2**22: (32, 128, 32, 32),
                     2**25: (32, 128, 91, 91)}
    nhwc = [c.shape for c in bench_batchnorm.batch_norm_cases(_plan())
            if c.name == "batch_norm[NHWC]"]
    assert nhwc == [(32, 56, 56, 128)] * 2


# ---- bench: the check stage ----------------------------------------------------


def test_a_wrong_kernel_stops_the_bench(monkeypatch, capsys, no_peers):
    correct = bench_activations.activation

    def sigmoid_off_by_32_ulp(name, x, **kwargs):
        y = correct(name, x, **kwargs)
        if name == "sigmoid":
            y *= np.float32(1 + 2**-18)
        return y

    monkeypatch.setattr(bench_activations, "activation", sigmoid_off_by_32_ulp)
    assert main(TINY + ["--kernels", "sigmoid:forward,relu:forward"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing timed
    assert "check failed: sigmoid forward (float32):" in captured.err
    assert "ulp from fusednn.reference at x=" in captured.err
    assert "(allowed: 4 ulp)" in captured.err
    assert "relu forward" not in captured.err
    assert "1 of 2 kernels disagree with fusednn.reference; not timing them" in captured.err
    assert "] timing" not in captured.err


def test_exact_kernels_may_not_be_off_by_one_ulp(monkeypatch, capsys, no_peers):
    correct = bench_activations.activation_backward

    def one_ulp_up(name, grad_output, **kwargs):
        gi = correct(name, grad_output, **kwargs)
        return np.nextafter(gi, np.inf, out=gi)

    monkeypatch.setattr(bench_activations, "activation_backward", one_ulp_up)
    assert main(TINY + ["--kernels", "sigmoid:backward,relu:backward"]) == 1
    err = capsys.readouterr().err
    assert "check failed: relu backward (float32): 1 ulp" in err
    assert "(allowed: exact)" in err
    assert "sigmoid" not in err


def _breaks_y(correct):
    def y_off_by_2e_5(x, *args, **kwargs):
        result = correct(x, *args, **kwargs)
        result.y[...] += np.float32(2e-5)
        return result
    return "batch_norm", y_off_by_2e_5


def _forgets_running_statistics(correct):
    def no_update(x, gamma=None, beta=None, running_mean=None, running_var=None, **kwargs):
        return correct(x, gamma, beta, **kwargs)
    return "batch_norm", no_update


def _divides_by_m_minus_1(correct):
    def grad_input_times_m_over_m_minus_1(grad_output, x, *args, axis=1, **kwargs):
        grad_input, grad_gamma, grad_beta = correct(grad_output, x, *args, axis=axis, **kwargs)
        m = x.size // x.shape[axis]
        return grad_input * np.float32(m / (m - 1)), grad_gamma, grad_beta
    return "batch_norm_backward", grad_input_times_m_over_m_minus_1


@pytest.mark.parametrize(("breakage", "direction", "where"), [
    (_breaks_y, "forward", "in y[n="),
    (_forgets_running_statistics, "forward", "in running_"),
    (_divides_by_m_minus_1, "backward", "in grad_input[n="),
])
def test_a_wrong_batchnorm_kernel_stops_the_bench(breakage, direction, where, monkeypatch,
                                                  capsys, no_peers):
    wrapped = {"forward": "batch_norm", "backward": "batch_norm_backward"}[direction]
    name, broken = breakage(getattr(bench_batchnorm, wrapped))
    monkeypatch.setattr(bench_batchnorm, name, broken)
    assert main(TINY + ["--kernels", f"batchnorm:{direction},relu:forward"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    for layout in ("NCHW", "NHWC"):
        assert f"check failed: batch_norm[{layout}] {direction} (float32): " in captured.err
    assert "times the allowed error from fusednn.reference " + where in captured.err
    assert "relu forward" not in captured.err
    assert "2 of 3 kernels disagree with fusednn.reference; not timing them" in captured.err
    assert "] timing" not in captured.err


def test_bounded_errors():
    ours = np.array([1.5, np.nan, np.inf, 2.0, np.nan, 0.0], dtype=np.float32)
    expected = np.array([1.0, np.nan, np.inf, np.nan, 1.0, 0.0])
    bound = np.array([0.25, 1.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(checks.bounded_errors(ours, expected, bound),
                                  [2.0, 0.0, 0.0, np.inf, np.inf, 0.0])
    result = checks.compare_bounded({"a": (ours[:1], expected[:1], 0.25),
                                    "b": (ours[3:4], expected[3:4], 1.0)}, 2)
    assert not result.passed and result.unit == "bound"
    assert result.worst.startswith("in b[0]: got 2.0, reference nan")
    named = checks.compare_bounded({"a": (ours[:1], expected[:1], 0.25)}, 1, {1: "c"})
    assert named.worst == "in a[c=0]: got 1.5, reference 1.0 (|error| 0.5, allowed 0.25)"
    assert named.describe() == ("2 times the allowed error from fusednn.reference in a[c=0]: "
                                "got 1.5, reference 1.0 (|error| 0.5, allowed 0.25)")


def test_ulp_errors():
    f32 = np.float32
    ours = np.array([1 + 3 * 2**-23, 2**-149, 0.0, np.inf, np.nan, 1.0, np.inf, -0.0], dtype=f32)
    expected = np.array([1.0, 0.0, 0.0, np.inf, 1.0, np.nan, 1e39, 0.0])
    np.testing.assert_array_equal(checks.ulp_errors(ours, expected),
                                  [3.0, 1.0, 0.0, 0.0, np.inf, np.inf, 0.0, 0.0])
    # Below a power of two the ulp is half the one above it.
    assert checks.ulp_errors(np.array([1.0], f32), [1 - 2**-24])[0] == pytest.approx(1.0)


def test_cancelling_derivative_terms_get_the_absolute_bound():
    x = np.array([-0.75, -1.0], dtype=np.float32)
    grad = np.ones(2, dtype=np.float32)
    expected = np.array([1e-3, 1e-3])
    ours = (expected + 4 * 2**-24).astype(np.float32)  # hundreds of ulp, 4 * 2^-24 absolute
    terms = (np.array([0.25, 0.25]), np.array([-0.2490, -0.05]))  # cancel by 499x and 1.5x
    result = checks.compare(ours, expected, 4.0, {"x": x}, grad=grad, terms=terms)
    assert not result.passed and "x=-1.0" in result.worst
    terms = (np.array([0.25, 0.25]), np.array([-0.2490, -0.2490]))
    assert checks.compare(ours, expected, 4.0, {"x": x}, grad=grad, terms=terms).passed


# ---- bench: options ------------------------------------------------------------


def test_kernel_selection():
    forward = cli.parse_selection("activations:forward")["activations"]
    assert forward == {(k.name, "forward") for k in bench_activations.ACTIVATION_KERNELS}
    assert cli.parse_selection("all") == {**cli.parse_selection("activations"),
                                            **cli.parse_selection("batchnorm"),
                                            **cli.parse_selection("dropout")}
    assert cli.parse_selection("dropout:backward") == {
        "dropout": {(k.name, "backward") for k in cli.DROPOUT_KERNELS}}
    assert cli.parse_selection(" gelu , gelu:backward") == {
        "activations": {("gelu", "forward"), ("gelu", "backward")}}
    both = {(k, d) for k in ("batch_norm[NCHW]", "batch_norm[NHWC]")
            for d in ("forward", "backward")}
    assert cli.parse_selection("batchnorm") == cli.parse_selection("batch_norm") == {
        "batchnorm": both}
    assert cli.parse_selection("batchnorm:forward") == {
        "batchnorm": {(k, "forward") for k in ("batch_norm[NCHW]", "batch_norm[NHWC]")}}
    assert cli.parse_selection("batch_norm[NHWC]:backward,relu:forward") == {
        "batchnorm": {("batch_norm[NHWC]", "backward")}, "activations": {("relu", "forward")}}


@pytest.mark.parametrize(("argv", "message"), [
    (["--kernels", "nosuch"], "unknown kernel or family 'nosuch'"),
    (["--kernels", "gelu:sideways"], "unknown direction 'sideways'"),
    (["--kernels", "batch_norm[NDHWC]"], "unknown kernel or family 'batch_norm[NDHWC]'"),
    (["--kernels", ","], "no kernel named"),
    (["--size", "0"], "argument --size: must be at least 1"),
    (["--size", "many"], "argument --size: expected an integer or 2^k"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--threads", "0"], "argument --threads: must be at least 1"),
    (["--repeat", "two"], "argument --repeat: expected an integer"),
    (["--device", "tpu"], "argument --device: invalid choice"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fusednn bench")
    assert message in err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_size_accepts_powers_of_two():
    assert cli._size("2^25") == cli._size("2**25") == 2**25
    assert cli._size("4096") == 4096


@pytest.mark.parametrize(("cuda_built", "cupy", "kernels", "message"), [
    (False, None, "all", "this fusednn was built without CUDA"),
    (True, None, "all", "needs CuPy, which is not importable (no cupy here)"),
])
def test_cuda_device_says_why_it_cannot_run(cuda_built, cupy, kernels, message, monkeypatch,
                                            capsys):
    # A GPU the CUDA module can run, whatever this machine has.
    monkeypatch.setattr(cli, "info", lambda: {**fn.info(), "cuda_built": cuda_built,
                                              "cuda_error": None, "cuda_devices": 1})
    monkeypatch.setattr(peers, "import_cupy",
                        lambda: (cupy, "13.0") if cupy else (None, "not importable (no cupy here)"))
    assert main(TINY + ["--device", "cuda", "--kernels", kernels]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fusednn bench: --device cuda: ")
    assert message in captured.err


@pytest.mark.parametrize(("build", "message"), [
    ({"cuda_error": "cudaErrorInsufficientDriver", "cuda_driver": 0, "cuda_runtime": 13000},
     "finds no GPU: cudaErrorInsufficientDriver: no NVIDIA driver is loaded, and this build's "
     "CUDA runtime is 13.0; install or update the driver to one for CUDA 13.0 or newer"),
    ({"cuda_error": "cudaErrorInsufficientDriver", "cuda_driver": 12040, "cuda_runtime": 13000},
     "cudaErrorInsufficientDriver: the NVIDIA driver supports CUDA 12.4 only, and this build's "
     "CUDA runtime is 13.0"),
    ({"cuda_error": "cudaErrorNoDevice", "cuda_driver": 13000, "cuda_runtime": 13000},
     "finds no GPU: cudaErrorNoDevice: the NVIDIA driver finds no GPU"),
])
def test_cuda_device_names_the_drivers_error(build, message, monkeypatch, capsys):
    # The CUDA module's own error comes first: CuPy, installed or not, would
    # fail for the same reason, and installing it would not help.
    monkeypatch.setattr(cli, "info", lambda: {**fn.info(), "cuda_built": True, **build})
    monkeypatch.setattr(peers, "import_cupy", lambda: (None, "not importable (no cupy here)"))
    assert main(TINY + ["--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "CuPy" not in err and "pip install" not in err


def test_cuda_device_with_a_cupy_that_sees_no_gpu_names_the_cupy_to_install(monkeypatch,
                                                                             capsys):
    monkeypatch.setattr(cli, "info", lambda: {**fn.info(), "cuda_built": True,
                                              "cuda_error": None, "cuda_devices": 1})
    monkeypatch.setattr(peers, "import_cupy", lambda: (
        None, "installed but sees no CUDA device (cudaErrorInsufficientDriver)"))
    assert main(TINY + ["--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert ("CuPy is installed but sees no CUDA device (cudaErrorInsufficientDriver), while "
            "fusednn's CUDA module sees 1 GPU(s): this CuPy is likely built for another CUDA "
            "version (pip install ") in err
    assert fn._backend.cupy_install_hint() in err


def test_plot_without_matplotlib_fails_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "bench.png"
    assert main(TINY + ["--plot", str(path)]) == 1
    captured = capsys.readouterr()
    assert "--plot needs matplotlib, which is not installed" in captured.err
    assert captured.out == "" and "checking" not in captured.err
    assert not path.exists()


def test_plot_writes_a_png(tmp_path, capsys, no_peers):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert main(TINY + ["--kernels", "relu", "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {path}" in capsys.readouterr().err


def test_a_rows_roof_comes_from_the_copies_of_its_own_rounds():
    # 8 GB per copy: 1, 2 and 4 s are 8, 4 and 2 GB/s, median 4; np.copyto
    # at 5 and 2.5 GB/s has median 3.75. The slower rounds of other rows do
    # not enter.
    rounds = timing.Timing(case=None, runners=None, copy_bytes=8 * 10**9,
                           copies=("fusednn._cpu.copy", "np.copyto"),
                           samples={"ours": [1.0], "fusednn._cpu.copy": [1.0, 2.0, 4.0],
                                    "np.copyto": [1.6, 3.2]}, peer_checks={})
    source, rate = timing.row_roof(rounds)
    assert source == "fusednn._cpu.copy"
    assert rate == pytest.approx(4.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("elements", [0, 1, 37, 4099, (16 << 20) // 4 + 37])
def test_the_roofs_copy_copies_every_bit(dtype, elements):
    # The bench's roof, and dropout's identity, use fusednn._cpu.copy: every
    # bit (NaN payloads and -0 included) at every alignment, with the
    # output streamed (from 16 MiB) or not.
    itemsize = np.dtype(dtype).itemsize
    bits = np.random.default_rng(elements).integers(0, 256, (elements + 8) * itemsize,
                                                    dtype=np.uint8)
    source = bits.view(dtype)
    for start, target_start in [(0, 0), (1, 0), (0, 3), (5, 2)]:
        n = min(elements, source.size - start)
        target = np.zeros(n + target_start, dtype=dtype)
        fn._cpu.copy(source[start:start + n], target[target_start:])
        assert target[target_start:].tobytes() == source[start:start + n].tobytes()
        assert not target[:target_start].any()
    strided = np.zeros(2 * min(elements, 4099), dtype=dtype)
    fn._cpu.copy(source[:strided.size // 2], strided[::2])
    assert strided[::2].tobytes() == source[:strided.size // 2].tobytes()


def test_the_report_fits_100_columns_and_footnotes_rows_above_the_roof(monkeypatch, capsys,
                                                                       no_peers):
    # A roof at a thousandth of the copy's rate puts every row far above
    # 110%, and each family's rows must then say why.
    monkeypatch.setattr(timing, "row_roof",
                        lambda t: (t.copies[0], min(t.copy_bytes / s for s in
                                                    t.samples[t.copies[0]]) / 1e12))
    assert main(TINY + ["--kernels", "relu:forward,batch_norm[NCHW]:forward"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = lines.index("") + 1
    assert all(len(line) <= 100 for line in lines[:table] if " " in line.strip())
    rows = table_rows(out)
    assert all(row[5].endswith("%^") for row in rows[1:])
    footnotes = prose("\n".join(lines[table + len(rows):]))
    assert ("^ above 110% of the roof (relu forward): the kernel moves the bytes its roof "
            "copies, no fewer") in footnotes
    assert ("^ above 110% of the roof (batch_norm[NCHW] forward): its traffic counts x (and "
            "the backward's grad_output) as read twice") in footnotes


def test_rows_within_the_roof_have_no_marker_or_footnote(monkeypatch, capsys, no_peers):
    monkeypatch.setattr(timing, "row_roof", lambda t: (t.copies[0], 1e30))
    assert main(TINY + ["--kernels", "relu:forward"]) == 0
    out = capsys.readouterr().out
    assert table_rows(out)[1][5] == "0%"
    assert "above 110%" not in out


def test_the_cache_line_says_whether_the_rows_fit(monkeypatch):
    results = [dataclasses.make_dataclass("Row", ["bytes_moved"])(n)  # all it reads
               for n in (32 << 20, 80 << 20)]
    monkeypatch.setattr(output, "last_level_cache", lambda: (3, 300 << 20))
    line = output.cache_line(results)
    assert line.startswith("cache: each row moves 32 MiB to 80 MiB (its roof copies as much); "
                           "the L3 cache holds 300 MiB, so kernel and copy alike may find")
    assert "in-cache copy" in line
    monkeypatch.setattr(output, "last_level_cache", lambda: (3, 16 << 20))
    assert "stream from memory: the roof is memory's copy rate" in output.cache_line(results)
    monkeypatch.setattr(output, "last_level_cache", lambda: (3, 64 << 20))
    assert "the smaller rows may find their inputs" in output.cache_line(results)
    monkeypatch.setattr(output, "last_level_cache", lambda: None)
    assert output.cache_line(results) is None


def test_last_level_cache_reads_sysfs(tmp_path):
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "300M")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "type").write_text(f"{kind}\n")
        (entry / "size").write_text(f"{size}\n")
    assert timing.last_level_cache(str(tmp_path)) == (3, 300 << 20)
    assert timing.last_level_cache(str(tmp_path / "missing")) is None


def test_bench_overhead_table(monkeypatch, capsys, tmp_path):
    """--kernels overhead times every call on numpy (and torch, when
    installed) and writes the same numbers as JSON; it runs on its own."""
    from fusednn.bench import overhead
    monkeypatch.setattr(overhead, "QUICK_CALLS_PER_REPEAT", 3)
    path = tmp_path / "overhead.json"
    assert main(["bench", "--kernels", "overhead", "--quick", "--repeat", "1",
                 "--json", str(path)]) == 0
    report = capsys.readouterr().out
    document = json.loads(path.read_text())
    assert set(document["calls"]) == set(overhead.calls(lambda a: a))
    for label, row in document["calls"].items():
        assert label in report
        assert all(math.isfinite(us) and us > 0 for us in row.values())
    with pytest.raises(SystemExit):
        main(["bench", "--kernels", "overhead,relu"])


def test_bench_split_table(monkeypatch, capsys, tmp_path):
    """--kernels split times the split phases beside the fused kernels on
    the same arrays, and the two write the same outputs; it runs on its
    own."""
    from fusednn.bench import split
    monkeypatch.setattr(split, "QUICK_SHAPES", [("NC (8, 3)", (8, 3), 1),
                                                ("NHWC (2, 3, 3, 4)", (2, 3, 3, 4), -1)])
    path = tmp_path / "split.json"
    assert main(["bench", "--kernels", "split", "--quick", "--repeat", "1",
                 "--json", str(path)]) == 0
    report = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert [row["shape"] for row in rows] == ["NC (8, 3)", "NHWC (2, 3, 3, 4)"]
    for row in rows:
        assert row["shape"] in report
        assert row["bytes_per_rank"] == (4 * row["channels"] + 1) * 8
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert all(len(line) <= 100 for line in report.splitlines())
    with pytest.raises(SystemExit):
        main(["bench", "--kernels", "split,relu"])
