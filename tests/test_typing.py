"""Static types of the public predictors: mypy checks ``assert_type`` on their results.

The snippet below is type-checked, not run: each ``assert_type`` states what a call of a
``predict`` closure returns (``Tensor``, ``Gaussian``, ``(train, test)``, or named tuples
of those), by the overloads of the protocols in ``infnets._src.predict.types``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
from typing_extensions import assert_type

import torch
from torch import Tensor

from infnets import predict, stax
from infnets.predict import Gaussian

k = torch.eye(3)
y = torch.zeros(3, 1)
gp = predict.gp_inference(k, y)
assert_type(gp, predict.GPPredictFn)
assert_type(gp("nngp"), Tensor)
assert_type(gp("nngp", k, k), Gaussian)
assert_type(gp("ntk", k_test_train=k, k_test_test=k), Gaussian)
assert_type(gp(("nngp", "ntk"), k), tuple[Tensor, ...])
assert_type(gp(["nngp", "ntk"], k, k), tuple[Gaussian, ...])

mse = predict.gradient_descent_mse(k, y)
assert_type(mse(), Tensor)
assert_type(mse(1.0, 0.0, None, k), tuple[Tensor, Tensor])
assert_type(mse(1.0, k_test_train=k), tuple[Tensor, Tensor])

ode = predict.gradient_descent(lambda f, t: ((f - t) ** 2).sum(), k, y)
assert_type(ode(1.0), Tensor)
assert_type(ode(1.0, k_test_train=k), tuple[Tensor, Tensor])

net = stax.serial(stax.Dense(1), stax.Relu(), stax.Dense(1))
ens = predict.gradient_descent_mse_ensemble(net.kernel_fn, k, y)
assert_type(ens(), tuple[Tensor, ...])
assert_type(ens(compute_cov=True), tuple[Gaussian, ...])
assert_type(ens(None, k, "nngp"), Tensor)
assert_type(ens(1.0, k, "ntk", True), Gaussian)
assert_type(ens(1.0, k, get="ntk", compute_cov=True), Gaussian)
assert_type(ens(1.0, k, ("nngp", "ntk")), tuple[Tensor, ...])
assert_type(predict.max_learning_rate(k), float)
"""


def test_predict_return_types(tmp_path):
    pytest.importorskip("mypy")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    cmd = [
        sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "cache"), "--follow-imports=silent",
        "--no-error-summary", str(snippet),
    ]  # fmt: skip
    env = {"MYPYPATH": str(ROOT / "src"), "PATH": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
