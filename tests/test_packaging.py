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

import importlib.util
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
    return set(re.findall(r"^set\((FUSEDNN_\w+) [^\n]*?CACHE ", text, re.M))


# ---- build switches ---------------------------------------------------------------


def test_every_switch_is_read_from_the_environment(pyproject, readme):
    # The README lists the switches users need (testing-only ones may be
    # left to their scripts); every CMake switch is mapped from the
    # environment variable of its name.
    switches = readme_switches(readme)
    assert switches, "README.md has no build-switch table"
    defines = pyproject["tool"]["scikit-build"]["cmake"]["define"]
    assert set(switches) <= set(defines)
    assert set(defines) == cmake_cache_switches()
    for name, entry in defines.items():
        assert entry["env"] == name, f"{name} is read from ${entry['env']}"


def read_defines(pyproject: dict, config_settings: dict) -> dict:
    reader = pytest.importorskip("scikit_build_core.settings.skbuild_read_settings")
    settings = reader.SettingsReader(pyproject, config_settings, state="wheel").settings
    return dict(settings.cmake.define)


@pytest.mark.parametrize("name", ["FUSEDNN_CUDA", "FUSEDNN_CUDA_ARCHS", "FUSEDNN_CPU_ISAS",
                                  "FUSEDNN_SANITIZE"])
def test_switch_from_environment_and_config_settings(pyproject, readme, monkeypatch, name):
    assert name in readme_switches(readme)
    value = {"FUSEDNN_CUDA": "OFF", "FUSEDNN_CUDA_ARCHS": "80;90",
             "FUSEDNN_CPU_ISAS": "avx2", "FUSEDNN_SANITIZE": "address,undefined"}[name]
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
        fusednn_cuda_arch_list("${{REQUESTED}}" "${{VISIBLE}}" sass ptx cmake_archs)
        message("sass=${{sass}}")
        message("ptx=${{ptx}}")
        message("cmake=${{cmake_archs}}")
        """))
    return subprocess.run([cmake, f"-DREQUESTED={requested}", f"-DVISIBLE={visible}", "-P",
                           str(script)], capture_output=True, text=True)


@pytest.mark.parametrize("requested, visible, sass, ptx, cmake_archs", [
    # No GPU visible: SASS for the 8.x GPUs and PTX for every other one.
    ("auto", "", "80", "75", "80-real;75-virtual"),
    ("", "", "80", "75", "80-real;75-virtual"),
    ("auto", "86;86", "86", "86", "86-real;86-virtual"),
    ("auto", "90;80", "80;90", "90", "80-real;90-real;90-virtual"),
    ("90", "86", "90", "90", "90-real;90-virtual"),
    ("90,80", "", "80;90", "90", "80-real;90-real;90-virtual"),
    ("75;90;86", "", "75;86;90", "90", "75-real;86-real;90-real;90-virtual"),
    ("75,80,86,89,90", "", "75;80;86;89;90", "90",
     "75-real;80-real;86-real;89-real;90-real;90-virtual"),
])
def test_cuda_arch_rule(tmp_path, requested, visible, sass, ptx, cmake_archs):
    run = cuda_arch_rule(tmp_path, requested, visible)
    assert run.returncode == 0, run.stderr
    assert f"sass={sass}\n" in run.stderr
    assert f"ptx={ptx}\n" in run.stderr
    assert f"cmake={cmake_archs}\n" in run.stderr


def test_release_builds_list_their_cuda_archs(pyproject):
    # Release wheels and scripts/build_wheel.sh name every architecture,
    # the same list, instead of a source build's portable default.
    release = pyproject["tool"]["cibuildwheel"]["linux"]["environment"]["FUSEDNN_CUDA_ARCHS"]
    assert re.fullmatch(r"\d+(,\d+)+", release), release
    script = (ROOT / "scripts" / "build_wheel.sh").read_text()
    assert f'FUSEDNN_CUDA_ARCHS="${{FUSEDNN_CUDA_ARCHS:-{release}}}"' in script


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


def test_the_cuda_extra_matches_the_release_toolkit(pyproject):
    # One CUDA major version: the toolkit the release wheels are compiled
    # with, the CuPy the [cuda] extra installs, the classifier, and the one
    # the error messages name (a source build with another toolkit is told
    # its own cupy-cudaNNx).
    from fusednn import _backend

    major = _backend.EXTRA_CUDA_MAJOR
    assert pyproject["project"]["optional-dependencies"]["cuda"] == [f"cupy-cuda{major}x"]
    assert f"Environment :: GPU :: NVIDIA CUDA :: {major}" in pyproject["project"]["classifiers"]
    toolkit = " ".join(pyproject["tool"]["cibuildwheel"]["linux"]["before-all"])
    assert re.findall(r"cuda-nvcc-(\d+)-", toolkit) == [str(major)]


def test_the_cupy_hint_follows_the_cuda_module(monkeypatch):
    from fusednn import _backend

    class Built:
        def __init__(self, version):
            self.runtime_version = lambda: version

    major = _backend.EXTRA_CUDA_MAJOR
    monkeypatch.setattr(_backend, "_cuda", Built(major * 1000 + 20))
    assert _backend.cupy_install_hint() == (
        f"pip install 'fusednn[cuda]': cupy-cuda{major}x, for CUDA {major} like this build")
    monkeypatch.setattr(_backend, "_cuda", None)
    assert _backend.cupy_install_hint().startswith("pip install 'fusednn[cuda]'")
    monkeypatch.setattr(_backend, "_cuda", Built(12080))
    assert _backend.cupy_install_hint() == (
        f"pip install cupy-cuda12x: this build's CUDA module is compiled with CUDA 12, and the "
        f"[cuda] extra's cupy-cuda{major}x is for CUDA {major}")
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the message needs it missing")
    import fusednn as fn
    with pytest.raises(RuntimeError, match=r"needs CuPy, which is not installed \(pip install "
                                           r"cupy-cuda12x: "):
        fn.init.uniform((4,), device="cuda")


def test_scripts_exist(pyproject, readme):
    for name, target in pyproject["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
        assert f"`{name} " in readme, f"README.md does not mention the {name} command"


# ---- types ------------------------------------------------------------------------

# Every public function called as a user would, with the types the stubs
# promise; mypy must accept all of it.
TYPED_SCRIPT = """\
import numpy as np
import numpy.typing as npt
import fusednn as fn

x: npt.NDArray[np.float32] = np.zeros((4, 8), np.float32)
bias = np.zeros(8, np.float32)
gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
y: npt.NDArray[np.float32] = fn.relu(x)
for f in (fn.sigmoid, fn.tanh, fn.relu, fn.selu, fn.silu, fn.mish, fn.hardsigmoid,
          fn.hardswish):
    y = f(x, out=y)
y = fn.leaky_relu(x, 0.1) + fn.elu(x, alpha=0.5) + fn.gelu(x, "tanh")
y = fn.softplus(x, beta=2.0, threshold=10.0) + fn.hardtanh(x, -2.0, 2.0)
y = fn.activation("gelu", x, approximate="tanh")
y = fn.activation_backward("gelu", x, x=x, out=y)
names: tuple[str, ...] = fn.ACTIVATIONS
result = fn.batch_norm(x, gamma, beta, training=True, axis=1)
dx, dgamma, dbeta = fn.batch_norm_backward(x, x, gamma, result.save_mean, result.save_invstd)
y = fn.dropout(x, 0.1, seed=1)
y, mask = fn.dropout(x, 0.1, seed=1, offset=2, return_mask=True)
y = fn.dropout_backward(x, 0.1, mask=mask)
packed = fn.dropout_mask((4, 8), 0.1, seed=1)
o = fn.bias_act_dropout(x, bias, "relu", 0.1, seed=3)
o, mask = fn.bias_act_dropout(x, bias, "gelu", 0.1, seed=3, return_mask=True)
grad_h, grad_bias = fn.bias_act_dropout_backward(x, x, bias, "relu", 0.1, seed=3)
stats = fn.batch_norm_stats(x)
merged = fn.batch_norm_combine([stats.count], stats.mean[None], stats.m2[None])
invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count, eps=1e-5)
y = fn.batch_norm_apply(x, merged.mean, invstd, gamma, beta, out=y)
sum_dy, sum_dy_xhat = fn.batch_norm_backward_reduce(x, x, merged.mean, invstd)
y = fn.batch_norm_backward_apply(x, x, merged.mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                 merged.count)
build: dict = fn.info()
fn.set_num_threads(fn.get_num_threads())
w = fn.init.he_normal((8, 4), seed=0)
"""

# One wrong call per line; mypy must report every one.
WRONG_SCRIPT = """\
import numpy as np
import fusednn as fn

x = np.zeros(3, np.float32)
fn.relu([1.0, 2.0])
fn.gelu(x, approximate="exact")
fn.dropout(x, 0.5)
fn.elu(x, alpha="big")
label: str = fn.sigmoid(x)
fn.batch_norm(x, momentum=None)
"""


def run_mypy(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Runs mypy (or a mypy tool such as stubtest) against the fusednn that
    the tests import: an installed one through this interpreter's
    site-packages, a source checkout's through MYPYPATH."""
    pytest.importorskip("mypy")
    import os

    import fusednn

    env = dict(os.environ)
    package_root = pathlib.Path(fusednn.__file__).resolve().parents[1]
    if package_root.name not in ("site-packages", "dist-packages"):
        env["MYPYPATH"] = str(package_root)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env)


def test_mypy_accepts_typed_use_and_reports_wrong_calls(tmp_path):
    (tmp_path / "typed_use.py").write_text(TYPED_SCRIPT)
    (tmp_path / "wrong_use.py").write_text(WRONG_SCRIPT)
    run = run_mypy(tmp_path, "mypy", "--follow-imports=silent", "--no-error-summary",
                   "--cache-dir", str(tmp_path / "cache"), "--python-executable",
                   sys.executable, "typed_use.py", "wrong_use.py")
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("typed_use.py")], run.stdout
    reported = {int(e.split(":")[1]) for e in errors if e.startswith("wrong_use.py")}
    wrong_lines = set(range(5, WRONG_SCRIPT.count("\n") + 1))
    assert reported == wrong_lines, run.stdout


def test_stubs_match_the_modules(tmp_path):
    import fusednn

    modules = ["fusednn.activations", "fusednn.dropout", "fusednn.batchnorm",
               "fusednn.batchnorm_split", "fusednn._cpu"]
    if fusednn.info()["cuda_built"]:
        modules.append("fusednn._cuda")
    run = run_mypy(tmp_path, "mypy.stubtest", *modules)
    assert run.returncode == 0, run.stdout + run.stderr


# ---- the CUDA runtime as info() reports it ---------------------------------------------


def test_info_names_why_there_is_no_device():
    import fusednn as fn

    build = fn.info()
    if not build["cuda_built"]:
        pytest.skip("fusednn was built without the CUDA module")
    if build["cuda_devices"] > 0:
        assert build["cuda_error"] is None
    else:
        # e.g. cudaErrorNoDevice, or cudaErrorInsufficientDriver for a driver
        # older than the runtime (or none: cuda_driver is then 0)
        assert re.fullmatch(r"cudaError\w+", build["cuda_error"]), build["cuda_error"]
    assert build["cuda_driver"] >= 0
