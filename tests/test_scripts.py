"""The measurement programs under scripts/ still build against the library's
headers with the command each one's opening comment gives, so that the
figures the docs quote from them can be taken again. Compiled only, not
run: their timings belong to the machine, not to a test.

They read the source tree and need g++ on x86-64; they skip elsewhere.
"""
from __future__ import annotations

import pathlib
import platform
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PROGRAMS = ["compute_floor.cpp", "overlap_bound.cpp", "exhaustive_f32.cpp",
            "exhaustive_half.cpp"]

pytestmark = [
    pytest.mark.skipif(not SCRIPTS.is_dir(), reason="needs the source tree"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                       reason="the programs are built for x86-64"),
]


def build_command(source: pathlib.Path) -> list[str]:
    """The g++ command of the file's opening comment: its first line that
    starts with g++, joined with the continuation lines after it, up to
    the output (-o) and any `&&` that runs the program."""
    lines = [line[2:].strip() for line in source.read_text().splitlines()
             if line.startswith("//")]
    start = next(i for i, line in enumerate(lines) if line.startswith("g++ "))
    command = ""
    for line in lines[start:]:
        command += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            break
    return shlex.split(command.split("&&")[0])


@pytest.mark.parametrize("name", PROGRAMS)
def test_script_builds_with_its_documented_command(name, tmp_path):
    argv = build_command(SCRIPTS / name)
    assert argv[0] == "g++" and "-o" in argv
    argv[argv.index("-o") + 1] = str(tmp_path / "program")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "program").is_file()
