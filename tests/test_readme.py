"""The README stays true: its opening commands, its code, its links, its names."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL_AND_DEMO = 'pip install torch==2.13.0 && pip install -e ".[demo]" && infnets demo'
INSTALL_AND_TEST = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.splitlines() if line.strip()]
    assert lines[0].startswith("# ")
    assert lines[1].startswith("```")
    assert lines[2:5] == [INSTALL_AND_DEMO, INSTALL_AND_TEST, "```"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and '-e ".[test]"' in ci and "pytest" in ci


def test_console_script_and_demo_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'infnets = "infnets.cli:main"' in pyproject
    from infnets.cli import build_parser

    assert "demo" in build_parser().format_help()


def test_readme_python_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
    assert blocks, "the README has a quick start"
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md [block {i + 1}]", "exec"), namespace)  # noqa: S102


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_readme_names_exist():
    from infnets import empirical, predict, stax

    features = README.split("## Features")[1].split("## Documentation")[0]
    stax_part = features.split("**Predictions**")[0]
    for name in re.findall(r"`(\w+)`", stax_part):
        if name[0].isupper() or name in ("serial", "parallel"):
            assert hasattr(stax, name), f"stax.{name} in the README does not exist"
    for name in ("gp_inference", "gradient_descent_mse", "gradient_descent_mse_ensemble",
                 "gradient_descent", "max_learning_rate"):  # fmt: skip
        assert hasattr(predict, name)
    for name in ("linearize", "taylor_expand", "empirical_ntk_fn", "monte_carlo_kernel_fn"):
        assert hasattr(empirical, name)
    assert importlib.util.find_spec("infnets.distributed") is not None
    sk = importlib.import_module("infnets.sklearn")
    for name in ("InfiniteWidthKernel", "NTKRegressor", "NNGPRegressor", "NTKClassifier"):
        assert hasattr(sk, name)
    plot = importlib.import_module("infnets.plot")
    for name in ("posterior_bands", "dynamics_curves", "kernel_heatmap"):
        assert hasattr(plot, name)
    if importlib.util.find_spec("gpytorch") is not None:
        assert hasattr(importlib.import_module("infnets.gpytorch"), "InfiniteWidthKernel")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script, capsys, monkeypatch):
    if "gpytorch" in script:
        pytest.importorskip("gpytorch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", [script])
    spec = importlib.util.spec_from_file_location(
        f"example_{script[:-3]}", ROOT / "examples" / script
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if script == "gpytorch_exact_gp.py":
            module.main(steps=10)
        elif script == "transformer_sequences.py":
            module.main(steps=20)
        elif script == "sklearn_kernels.py":
            module.gaussian_process_regression()
            module.digits()
        else:
            module.main()
    finally:
        torch.set_num_threads(before)
    assert capsys.readouterr().out.strip()
