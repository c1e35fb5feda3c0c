"""Packaging: a light core, optional extras imported lazily with an install hint."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("sklearn", "matplotlib", "gpytorch", "dask", "zarr", "torchdiffeq", "distributed")


def test_core_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, torch, infnets\n"
        "from infnets import stax, predict, empirical\n"
        "net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))\n"
        "net.kernel_fn(torch.ones(20, 3), None, 'ntk')\n"
        "from infnets._src.evaluate import chunks\n"
        "assert not chunks._HEAP_TUNED[0], 'process-wide malloc tuning without tiled work'\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module,missing,extra",
    [
        ("infnets.sklearn", "sklearn", "infnets[sklearn]"),
        ("infnets.gpytorch", "gpytorch", "infnets[gpytorch]"),
    ],
)
def test_missing_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, module: str, missing: str, extra: str
) -> None:
    for name in list(sys.modules):
        if name == module or name == missing or name.startswith(missing + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)


def test_plot_and_distributed_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    from infnets import plot
    from infnets._src.scale.cluster import require_dask

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"infnets\[plot\]"):
        plot._matplotlib()
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r"infnets\[distributed\]"):
        require_dask("kernel_matrix")


def test_metadata() -> None:
    tomllib = pytest.importorskip("tomllib")
    version = pytest.importorskip("packaging.version").Version
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].strip() for d in meta["dependencies"]}
    assert core == {"torch", "numpy", "scipy", "tqdm"}
    extras = meta["optional-dependencies"]
    for name in ("plot", "sklearn", "gpytorch", "distributed", "ode", "demo", "all", "test"):
        assert name in extras
    skip = ("all", "docs", "test", "demo")
    everything = {d for k, v in extras.items() if k not in skip for d in v}
    assert everything == set(extras["all"])
    assert meta["classifiers"] and meta["keywords"]
    # the floors declared are the versions the minimum-version CI run installs
    pins = dict(
        line.split("==")
        for line in (ROOT / ".ci" / "min-requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for dep in meta["dependencies"] + extras["all"]:
        name, floor = dep.split(";")[0].split(">=")
        name = name.split("[")[0]
        assert name in pins and version(pins[name]) == version(floor.strip()), dep
    assert (ROOT / "CHANGELOG.md").is_file()


#: what the test suite reads besides the package (see MANIFEST.in)
SDIST_NEEDS = (
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "pyproject.toml",
    "mkdocs.yml",
    ".ci/run",
    ".ci/min-requirements.txt",
    "benchmarks/README.md",
    "benchmarks/RESULTS.md",
    "tests/conftest.py",
    "tests/helpers.py",
    "tests/attention_mc.py",
    "src/infnets/py.typed",
)
#: never worth shipping
SDIST_SKIP = {".git", ".venv", "build", "dist", "site", "__pycache__", ".mypy_cache",
              ".ruff_cache", ".pytest_cache", "notes"}  # fmt: skip


def test_sdist_contains_what_the_tests_read(tmp_path: Path) -> None:
    """``python -m build --sdist`` (no isolation: the installed setuptools, no download)
    ships the tests, their helpers and every repository file they read."""
    pytest.importorskip("build")
    setuptools = pytest.importorskip("setuptools")
    version = pytest.importorskip("packaging.version").Version
    if version(setuptools.__version__) < version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} < 77, the build-system floor")
    import shutil
    import tarfile

    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT,
        tree,
        ignore=lambda d, names: [
            n for n in names if n in SDIST_SKIP or n.endswith((".egg-info", ".zarr", ".nt-venv"))
        ],
        symlinks=True,
    )
    cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation",
           "--skip-dependency-check", "-o", str(tmp_path / "dist"), str(tree)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [n for n in SDIST_NEEDS if n not in names]
    for folder in ("tests", "docs", "examples"):
        present = {
            str(p.relative_to(ROOT))
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        }
        missing += sorted(present - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not any(n.startswith(("notes/", ".git/")) for n in names)
