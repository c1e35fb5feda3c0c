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
