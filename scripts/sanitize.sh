#!/usr/bin/env bash
# Builds fusednn's CPU module with AddressSanitizer and
# UndefinedBehaviorSanitizer (FUSEDNN_SANITIZE=address,undefined) into a
# fresh virtual environment and runs the CPU test suite, the property-based
# suite included, under them.
#
# The sanitizer runtimes are preloaded because the host process, Python,
# is not built with them. Leak checking is off: CPython keeps interned
# objects alive until exit, which LeakSanitizer reports as leaks. Any
# sanitizer report aborts the run (halt_on_error) and fails the script.
#
# Usage: scripts/sanitize.sh [pytest arguments...]
#   e.g. scripts/sanitize.sh tests/test_hardening.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FUSEDNN_SANITIZE_VENV:-build/sanitize-venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet numpy pytest hypothesis
# The build's own requirements come from pyproject.toml (an isolated build
# environment); FUSEDNN_CPU_ISAS may trim the instruction sets for speed.
FUSEDNN_CUDA=OFF FUSEDNN_SANITIZE=address,undefined \
    "$venv/bin/python" -m pip install --no-deps -Cbuild-dir=build/sanitize .

runtimes="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$runtimes"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# The package source lives under python/, so the tests import the
# sanitized build installed in the venv.
if [ "$#" -eq 0 ]; then
  set -- tests --ignore=tests/gpu
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
