"""The documentation stays true: its code runs, its names exist, its pages are built.

Every ```python block of ``docs/*.md`` is executed (the blocks of one page in order, in
one namespace), every ``infnets.`` name of the Neural Tangents page must resolve, every
page is in the MkDocs navigation, and, when MkDocs and mkdocstrings are installed, the
site (with the API reference generated from the docstrings) is built.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS = {"gpytorch.md": "gpytorch", "demo.md": None}


def python_blocks(path: Path) -> list[str]:
    """The ```python code blocks of a Markdown file, in order."""
    return CODE_BLOCK.findall(path.read_text())


def resolve(name: str) -> object:
    """Import ``a.b.c`` as a module or as an attribute of the longest importable prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"index.md", "quickstart.md", "kernel_shapes.md", "neural_tangents.md"} <= names
    quick = "\n".join(python_blocks(DOCS / "quickstart.md"))
    assert "stax.serial(" in quick and 'predict_fn("ntk", k_test_train, k_test_test)' in quick


@pytest.mark.parametrize("page", [p.name for p in PAGES if python_blocks(p)])
def test_docs_code_runs(page, tmp_path, monkeypatch):
    module = NEEDS.get(page)
    if module:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # anything a page writes lands in a temporary folder
    namespace: dict[str, object] = {"__name__": f"docs_{page[:-3]}"}
    for i, block in enumerate(python_blocks(DOCS / page)):
        code = compile(block, f"{page} [block {i + 1}]", "exec")
        exec(code, namespace)  # noqa: S102 - our own documentation


#: every public name of Neural Tangents 0.6.5 the migration page must map or mark unsupported
NT_TOP = (
    "stax predict batch empirical_kernel_fn empirical_nngp_fn empirical_ntk_fn "
    "empirical_ntk_vp_fn linearize taylor_expand monte_carlo_kernel_fn Kernel "
    "NtkImplementation experimental"
).split()
NT_STAX = (
    "serial parallel repeat FanInConcat FanInProd FanInSum FanOut Conv ConvLocal "
    "ConvTranspose Dense GlobalSelfAttention Aggregate AvgPool DotGeneral Dropout Flatten "
    "GlobalAvgPool GlobalSumPool Identity ImageResize Index LayerNorm SumPool Slice ABRelu "
    "Abs Cos Elementwise ElementwiseNumerical Erf Exp ExpNormalized Gabor Gaussian Gelu "
    "Hermite LeakyRelu Monomial Polynomial Rbf RectifiedMonomial Relu Sigmoid_like Sign Sin "
    "AggregateImplementation AttentionMechanism Padding PositionalEmbedding Bool Diagonal "
    "MaskedArray layer requires supports_masking unmask_fn"
).split()
NT_PREDICT = (
    "gradient_descent_mse gradient_descent_mse_ensemble gradient_descent gp_inference "
    "max_learning_rate ODEState Gaussian"
).split()
NT_KERNEL = (
    "nngp ntk cov1 cov2 shape1 shape2 is_gaussian diagonal_spatial mask1 mask2 replace "
    "x1_is_x2 diagonal_batch is_reversed is_input batch_axis channel_axis"
).split()


def name_rows() -> list[list[str]]:
    """The cells of the table rows of the page's "Names" section."""
    text = (DOCS / "neural_tangents.md").read_text()
    section = text[text.index("## Names") : text.index("## Differences")]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("Neural Tangents", "") or set(cells[0]) <= {"-", " "}:
            continue
        rows.append(cells)
    return rows


def resolve_documented(name: str) -> None:
    """``resolve`` that also accepts fields of a dataclass (``infnets.Kernel.nngp``)."""
    import dataclasses

    head, _, attr = name.rpartition(".")
    try:
        resolve(name)
    except AttributeError:
        owner = resolve(head)
        assert dataclasses.is_dataclass(owner), name
        assert attr in {f.name for f in dataclasses.fields(owner)}, name


def test_neural_tangents_names_resolve():
    rows = name_rows()
    names = set()
    for cells in rows:
        names.update(re.findall(r"`(infnets(?:\.\w+)+)`", cells[1]))
    assert len(names) > 60
    for name in sorted(names):
        resolve_documented(name)


def test_neural_tangents_names_cover_nt():
    """The Neural Tangents column lists every public name of NT 0.6.5, and every name
    without an infnets counterpart says why."""
    documented = set()
    for cells in name_rows():
        for token in re.findall(r"`([^`]+)`", cells[0]):
            m = re.fullmatch(r"(?:nt\.|neural_tangents\.)?(stax|predict|Kernel)\.(\w+)", token)
            if m:
                documented.add(f"{m[1]}.{m[2]}")
            m = re.fullmatch(r"nt\.(\w+)", token)
            if m:
                documented.add(f"nt.{m[1]}")
        if cells[1].startswith("unsupported"):
            reason = cells[1].removeprefix("unsupported").strip(" :") + cells[2]
            assert len(reason) > 20, f"no reason given for {cells[0]}"
    expected = (
        {f"nt.{n}" for n in NT_TOP}
        | {f"stax.{n}" for n in NT_STAX}
        | {f"predict.{n}" for n in NT_PREDICT}
        | {f"Kernel.{n}" for n in NT_KERNEL}
    )
    assert not expected - documented, sorted(expected - documented)


def test_navigation_and_links():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w/]+\.md)\s*$", config, re.M))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == on_disk
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_api_pages_name_public_modules_with_docstrings():
    for page in sorted((DOCS / "api").glob("*.md")):
        (target,) = re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)
        if target.endswith("gpytorch") and importlib.util.find_spec("gpytorch") is None:
            continue
        module = importlib.import_module(target)
        assert module.__doc__, target
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj):
                assert obj.__doc__, f"{target}.{name} has no docstring"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed (pip install mkdocs 'mkdocstrings[python]')",
)
def test_mkdocs_site_builds(tmp_path):
    """The site builds with --strict, and every name of every public module's ``__all__`` is
    rendered (an anchor ``id="infnets.<module>.<name>"`` on its API page)."""
    site = tmp_path / "site"
    cmd = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "-q",
        "-f",
        str(ROOT / "mkdocs.yml"),
    ]
    proc = subprocess.run(
        [*cmd, "-d", str(site)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    missing = []
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        for target in re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M):
            html = (site / "api" / page.stem / "index.html").read_text()
            module = importlib.import_module(target)
            for name in getattr(module, "__all__", []):
                if name.startswith("__"):
                    continue
                if f'id="{target}.{name}"' not in html:
                    missing.append(f"{target}.{name}")
    assert not missing, f"not rendered in the API reference: {missing}"


@pytest.mark.parametrize(
    "name",
    [
        "infnets.sklearn",
        "infnets.plot",
        "infnets.gpytorch",
        "infnets._src.layers.hyper",
        "infnets._src.ecosystem.sk_svm",
        "infnets._src.ecosystem.cache",
        "infnets._src.ecosystem.architectures",
        "infnets._src.ecosystem.batched",
    ],
)
def test_docstring_examples_run(name):
    import doctest
    import warnings

    for dependency in {"infnets.gpytorch": "gpytorch", "infnets.plot": "matplotlib"}.get(
        name, ""
    ).split():
        pytest.importorskip(dependency)
    module = importlib.import_module(name)  # imports may warn (third-party deprecations)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
