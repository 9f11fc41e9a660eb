#!/usr/bin/env bash
# The one-command check of fusednn's CUDA backend on a machine with a GPU
# and no internet access (python3 with numpy, cupy, torch, pybind11,
# scikit-build-core, cmake and ninja preinstalled):
#
#   scripts/gpu_check.sh [LOGDIR]      (LOGDIR defaults to gpu-check-logs)
#
# builds and installs the package for this GPU's architecture only (a full
# build compiles five), runs tests/gpu and the float64 GELU accuracy sweep
# against mpmath, then the GPU benchmark (every CUDA
# kernel against a device-to-device copy of the same bytes and PyTorch
# CUDA, timed with CUDA events): the activations, dropout and the fused
# epilogue at 2^28 elements, batch norm at its default 32x128x56x56 (51 MB
# in float32, larger than an H100's L2).
# Where Nsight Compute is installed, it then times every kernel launch of
# scripts/gpu_kernels.py with its DRAM and SM throughput. Full logs and the
# benchmarks' JSON go to LOGDIR; a short summary table is printed last. The
# exit status is that of the first step that failed.
# On an H200 the first run took 3.5 minutes, 131 s of it the build.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR="${1:-gpu-check-logs}"
mkdir -p "$LOGDIR"
LOGDIR="$(cd "$LOGDIR" && pwd)"

arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
if [[ -z "$arch" ]]; then
  echo "gpu_check: nvidia-smi reports no GPU; building for the default architectures" >&2
  arch_flag=()
else
  arch_flag=("-Ccmake.define.FUSEDNN_CUDA_ARCHS=$arch")
fi

# A step that hangs (a kernel that never returns, say) is stopped so that
# the steps after it still run inside a short lease.
STEP_TIMEOUT_S="${STEP_TIMEOUT_S:-240}"
status=0
summary=()
# run_step NAME COMMAND...: runs COMMAND with its output in LOGDIR/NAME.log
# and records its status and duration for the summary.
run_step() {
  local name="$1"
  shift
  local start end rc
  start="$(date +%s)"
  echo "gpu_check: $name: $*" >&2
  timeout "$STEP_TIMEOUT_S" "$@" >"$LOGDIR/$name.log" 2>&1
  rc=$?
  end="$(date +%s)"
  summary+=("$(printf '%-6s %-6s %5ss  %s' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAIL($rc)")" \
                "$((end - start))" "$LOGDIR/$name.log")")
  if [[ $rc != 0 && $status == 0 ]]; then status=$rc; fi
  return $rc
}

# A fresh CMake configure: a reused build directory may remember a missing
# CUDA compiler. FUSEDNN_CUDA=ON makes a build without nvcc fail loudly.
if run_step build env FUSEDNN_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v . \
    -Ccmake.fresh=true "${arch_flag[@]}"; then
  run_step info python3 -m fusednn info
  run_step tests python3 -m pytest tests/gpu -ra -q -p no:cacheprovider
  run_step gelu64 python3 scripts/accuracy_gelu64.py --quick --cuda
  run_step bench python3 -m fusednn bench --device cuda --kernels activations,dropout \
    --json "$LOGDIR/bench.json"
  run_step bench_bn python3 -m fusednn bench --device cuda --kernels batchnorm \
    --json "$LOGDIR/bench_batchnorm.json"
  # Per-kernel counters, where Nsight Compute is installed (and the GPU's
  # counters are readable): the clocks are left as the card runs them.
  ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)"
  if [[ -n "$ncu" ]]; then
    run_step kernels "$ncu" --clock-control none --target-processes all --csv --page raw --print-units base \
      --metrics gpu__time_duration.sum,dram__bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size \
      python3 scripts/gpu_kernels.py
  fi
fi

echo
echo "== fusednn GPU check: ${gpu:-unknown GPU} (sm_${arch:-?}) =="
printf '%s\n' "${summary[@]}"
if [[ -f "$LOGDIR/tests.log" ]]; then
  echo "tests: $(tail -n 1 "$LOGDIR/tests.log")"
fi
if [[ -f "$LOGDIR/gelu64.log" ]]; then
  echo "float64 gelu against mpmath (scripts/accuracy_gelu64.py --quick --cuda):"
  tail -n 4 "$LOGDIR/gelu64.log"
fi
for name in bench bench_bn; do
  json="$LOGDIR/$name.json"
  [[ $name == bench_bn ]] && json="$LOGDIR/bench_batchnorm.json"
  if [[ -f "$json" ]]; then
    python3 - "$json" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    document = json.load(f)
head = document["header"]
shapes = sorted({"x".join(map(str, r["shape"])) for r in document["results"]})
print(f"bench: {', '.join(shapes)} {head['dtype']}, median of {head['repeat']}; "
      "roof = device-to-device copy of the same bytes")
for roof in document["roofs"]:
    print(f"  roof {roof['bytes_per_element']:g} bytes/elem: "
          + ", ".join(f"{k} {v:.0f} GB/s" for k, v in roof["gb_per_s"].items()))
print(f"  {'kernel':<16} {'direction':<9} {'GB/s':>7} {'% roof':>7} {'x torch':>8}")
for r in document["results"]:
    torch = f"{r['x_torch']:.2f}" if r.get("x_torch") is not None else "-"
    print(f"  {r['kernel']:<16} {r['direction']:<9} {r['gb_per_s']:7.0f} "
          f"{r['percent_of_roof']:6.0f}% {torch:>8}")
PY
  elif [[ -f "$LOGDIR/$name.log" ]]; then
    echo "$name: no results; last lines of $LOGDIR/$name.log:"
    tail -n 5 "$LOGDIR/$name.log"
  fi
done
if [[ -f "$LOGDIR/kernels.log" ]]; then
  python3 - "$LOGDIR/kernels.log" <<'PY'
import csv
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    lines = [line for line in f if line.startswith('"')]
rows = list(csv.DictReader(lines))
if len(rows) < 2:
    print("kernels: no counters; see the log")
    sys.exit()
print("kernels (Nsight Compute, one line per launch; warm-up launches included):")
print(f"  {'us':>8} {'DRAM MB':>8} {'DRAM %':>6} {'SM %':>5} {'regs':>4} {'occ %':>5} {'grid':>7}  kernel")
for row in rows[1:]:  # the first row holds the units
    if "gpu__time_duration.sum" not in row or not row["gpu__time_duration.sum"]:
        continue
    name = row["Kernel Name"].replace("(anonymous namespace)::", "").replace("fusednn::", "")
    name = name.removeprefix("void ")
    if name.endswith(")"):
        name = name[:name.rindex("(")]  # the parameter list
    name = name[:100]
    print(f"  {float(row['gpu__time_duration.sum']) / 1e3:8.1f} "
          f"{float(row['dram__bytes.sum']) / 1e6:8.1f} "
          f"{float(row['dram__throughput.avg.pct_of_peak_sustained_elapsed']):6.1f} "
          f"{float(row['sm__throughput.avg.pct_of_peak_sustained_elapsed']):5.1f} "
          f"{row['launch__registers_per_thread']:>4} "
          f"{float(row['sm__warps_active.avg.pct_of_peak_sustained_active']):5.1f} "
          f"{row['launch__grid_size']:>7}  {name}")
PY
fi
exit "$status"
