"""The research modules' docstring examples run (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    [
        "infnets._src.research.criticality",
        "infnets._src.research.diagnostics",
        "infnets._src.research.finite_width",
        "infnets._src.research.train",
        "infnets.criticality",
        "infnets.diagnostics",
    ],
)
def test_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
