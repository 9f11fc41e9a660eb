"""The package as it is built and shipped: every build switch the README
lists reaches CMake both from the environment and from
``-Ccmake.define``, the CUDA architecture rule, the README's commands
matching what CI runs, the release metadata, and the type information
(stubs that match the modules, and mypy accepting a user script and
rejecting wrong calls).

These tests read the source tree (pyproject.toml, README.md, CMake files);
they skip where the tests run without it, e.g. from an unpacked wheel.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - depends on the interpreter
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    if not PYPROJECT.exists():
        pytest.skip("the source tree is not next to the tests")
    return tomllib.loads(PYPROJECT.read_text())


@pytest.fixture(scope="module")
def readme() -> str:
    if not README.exists():
        pytest.skip("the source tree is not next to the tests")
    return README.read_text()


def readme_switches(readme: str) -> list[str]:
    """The FUSEDNN_* names in the first column of the README's build-switch
    table."""
    return re.findall(r"^\| `(FUSEDNN_\w+)` \|", readme, re.M)


def cmake_cache_switches() -> set[str]:
    """The FUSEDNN_* cache variables CMakeLists.txt declares."""
    text = (ROOT / "CMakeLists.txt").read_text()
    return set(re.findall(r"^set\((FUSEDNN_\w+) .*?CACHE ", text, re.M | re.S))


# ---- build switches ---------------------------------------------------------------


def test_readme_switches_are_the_build_switches(pyproject, readme):
    switches = readme_switches(readme)
    assert switches, "README.md has no build-switch table"
    defines = pyproject["tool"]["scikit-build"]["cmake"]["define"]
    assert sorted(switches) == sorted(defines)
    assert set(switches) == cmake_cache_switches()
    for name, entry in defines.items():
        assert entry["env"] == name, f"{name} is read from ${entry['env']}"


def read_defines(pyproject: dict, config_settings: dict) -> dict:
    reader = pytest.importorskip("scikit_build_core.settings.skbuild_read_settings")
    settings = reader.SettingsReader(pyproject, config_settings, state="wheel").settings
    return dict(settings.cmake.define)


@pytest.mark.parametrize("name", ["FUSEDNN_CUDA", "FUSEDNN_CUDA_ARCHS", "FUSEDNN_CPU_ISAS"])
def test_switch_from_environment_and_config_settings(pyproject, readme, monkeypatch, name):
    assert name in readme_switches(readme)
    value = {"FUSEDNN_CUDA": "OFF", "FUSEDNN_CUDA_ARCHS": "80;90",
             "FUSEDNN_CPU_ISAS": "avx2"}[name]
    monkeypatch.setenv(name, value)
    assert read_defines(pyproject, {})[name] == value
    # -Ccmake.define wins over the environment.
    assert read_defines(pyproject, {f"cmake.define.{name}": "ON"})[name] == "ON"
    monkeypatch.delenv(name)
    unset = read_defines(pyproject, {})
    default = pyproject["tool"]["scikit-build"]["cmake"]["define"][name].get("default")
    assert unset.get(name) == default


def cuda_arch_rule(tmp_path, requested: str, visible: str) -> subprocess.CompletedProcess:
    """Runs cmake/fusednn_cuda_archs.cmake's rule in script mode."""
    cmake = shutil.which("cmake")
    if cmake is None or not (ROOT / "cmake").is_dir():
        pytest.skip("needs cmake and the source tree")
    script = tmp_path / "archs.cmake"
    script.write_text(textwrap.dedent(f"""\
        include("{(ROOT / 'cmake' / 'fusednn_cuda_archs.cmake').as_posix()}")
        fusednn_cuda_arch_list("${{REQUESTED}}" "${{VISIBLE}}" archs cmake_archs)
        message("archs=${{archs}}")
        message("cmake=${{cmake_archs}}")
        """))
    return subprocess.run([cmake, f"-DREQUESTED={requested}", f"-DVISIBLE={visible}", "-P",
                           str(script)], capture_output=True, text=True)


@pytest.mark.parametrize("requested, visible, archs, cmake_archs", [
    ("auto", "", "75;80;86;89;90", "75-real;80-real;86-real;89-real;90-real;90-virtual"),
    ("", "", "75;80;86;89;90", "75-real;80-real;86-real;89-real;90-real;90-virtual"),
    ("auto", "86;86", "86", "86-real;86-virtual"),
    ("90", "86", "90", "90-real;90-virtual"),
    ("90,80", "", "80;90", "80-real;90-real;90-virtual"),
    ("75;90;86", "", "75;86;90", "75-real;86-real;90-real;90-virtual"),
])
def test_cuda_arch_rule(tmp_path, requested, visible, archs, cmake_archs):
    run = cuda_arch_rule(tmp_path, requested, visible)
    assert run.returncode == 0, run.stderr
    assert f"archs={archs}\n" in run.stderr
    assert f"cmake={cmake_archs}\n" in run.stderr


def test_cuda_arch_rule_rejects_names(tmp_path):
    run = cuda_arch_rule(tmp_path, "sm_90", "")
    assert run.returncode != 0
    assert "'sm_90' is not an architecture number" in run.stderr


# ---- the README's commands and CI -------------------------------------------------


def readme_command(readme: str, heading: str) -> str:
    """The bash block that follows the paragraph starting with heading."""
    match = re.search(re.escape(heading) + r".*?```bash\n(.*?)\n```", readme, re.S)
    assert match, f"README.md has no command after '{heading}'"
    return match.group(1)


def test_ci_runs_the_readme_commands(readme):
    ci = (ROOT / ".ci" / "run").read_text()
    install = readme_command(readme, "The main job").split(" && ")[0]
    tests = readme_command(readme, "The tests")
    assert re.search(rf"^python3? -m {re.escape(install)}$", ci, re.M), install
    assert re.search(rf"^python3? -m {re.escape(tests.removeprefix('python -m '))}$", ci, re.M)


def test_test_command_does_not_build(readme):
    # The main job's install brings the test extra, so running the tests
    # needs no second build.
    install = readme_command(readme, "The main job")
    assert re.match(r'pip install "\.\[[^]]*\btest\b[^]]*\]"', install), install
    assert "pip install" not in readme_command(readme, "The tests")


def test_demo_command_installs_the_demo_extra(pyproject, readme):
    install = readme_command(readme, "The demo").split(" && ")[0]
    names = install.removeprefix("pip install ").split()
    extra = pyproject["project"]["optional-dependencies"]["demo"]
    assert names == [re.match(r"[\w.-]+", requirement).group(0) for requirement in extra]


# ---- metadata -------------------------------------------------------------------


def test_release_metadata(pyproject):
    project = pyproject["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert not any(c.startswith("License ::") for c in project["classifiers"])
    low = int(re.fullmatch(r">=3\.(\d+)", project["requires-python"]).group(1))
    minors = {int(m) for m in re.findall(r"Python :: 3\.(\d+)$", "\n".join(project["classifiers"]),
                                         re.M)}
    assert min(minors) == low
    wheels = pyproject["tool"]["cibuildwheel"]["build"]
    assert {int(re.fullmatch(r"cp3(\d+)-\*", w).group(1)) for w in wheels} == minors
    for url in project["urls"].values():
        assert url.startswith("https://")


def test_scripts_exist(pyproject, readme):
    for name, target in pyproject["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
        assert f"`{name} " in readme, f"README.md does not mention the {name} command"
