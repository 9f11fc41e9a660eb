"""PyTorch stays optional: ``import fusednn`` never imports torch, and
``import fusednn.torch`` without torch raises an ImportError with the
install command. Runs in fresh interpreters, with torch hidden where the
test needs it absent, so it runs whether or not torch is installed.
"""
from __future__ import annotations

import subprocess
import sys


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_fusednn_does_not_import_torch():
    result = run("import sys, fusednn, fusednn.nn, fusednn.init\n"
                 "assert 'torch' not in sys.modules, 'torch was imported'")
    assert result.returncode == 0, result.stderr


def test_fusednn_torch_without_torch_names_the_install_command():
    # A None entry in sys.modules makes `import torch` raise ImportError.
    result = run("import sys\nsys.modules['torch'] = None\n"
                 "try:\n    import fusednn.torch\n"
                 "except ImportError as error:\n    print(error)\n"
                 "else:\n    raise SystemExit('no ImportError')")
    assert result.returncode == 0, result.stderr
    assert "pip install torch==2.13.0" in result.stdout
