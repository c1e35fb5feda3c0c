"""The package layout: import directions between families, no cycles, bounded sizes.

Reads the sources with ``ast`` (function-level imports included, ``TYPE_CHECKING`` blocks
excluded) and checks what each subpackage's docstring promises (``docs/architecture.md``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PRIVATE = SRC / "infnets" / "_src"

#: what each family may import (besides itself); ``*`` = anything
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "evaluate": {"core"},
    "layers": {"core", "evaluate"},
    "spatial": {"core", "evaluate", "layers"},
    "elementwise": {"core", "evaluate", "layers"},
    "graph": {"core", "evaluate", "layers"},
    "attention": {"core", "evaluate", "layers", "spatial", "elementwise"},
    "convert": {"core", "evaluate", "layers", "spatial", "elementwise", "attention", "empirical"},
    "features": {"core", "layers", "elementwise"},
    "predict": {"core"},
    "empirical": {"core"},
    "scale": {"core", "evaluate", "layers", "predict"},
    "ecosystem": {"core", "evaluate", "layers", "elementwise", "predict", "app"},
    "research": {"core", "evaluate", "layers", "elementwise", "predict"},
    "app": {"*"},
}
#: deliberate call-time imports of public modules (module -> public module)
CALL_TIME = {
    ("infnets._src.predict.gp", "infnets.distributed"),
    ("infnets._src.predict.gp", "infnets._src.scale.solve"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "infnets").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for sub in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name and m != "infnets"}


MODULES = _modules()
GRAPH = {m: _imports(m, p, set(MODULES)) for m, p in MODULES.items()}


def _family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 and parts[1] == "_src" else None


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(v: str, stack: list[str]) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w) :] + [w])
            elif w not in state:
                visit(w, stack)
        stack.pop()
        state[v] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_families_import_only_downwards() -> None:
    bad = []
    for module, targets in GRAPH.items():
        family = _family(module)
        if family is None:
            continue
        allowed = ALLOWED.get(family)
        assert allowed is not None, f"{module}: family {family!r} missing from ALLOWED"
        if "*" in allowed:
            continue
        for target in targets:
            if (module, target) in CALL_TIME:
                continue
            other = _family(target)
            if other is None and target.startswith("infnets._src"):
                bad.append(f"{module} -> {target} (modules belong in a family)")
            elif other is None:
                bad.append(f"{module} -> {target} (a public module)")
            elif other != family and other not in allowed:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_sizes_and_docstrings() -> None:
    assert not [p for p in PRIVATE.glob("*.py") if p.name != "__init__.py"], (
        "modules of _src belong in a family subpackage"
    )
    for folder in [PRIVATE, *[d for d in PRIVATE.iterdir() if d.is_dir()]]:
        if folder.name == "__pycache__":
            continue
        assert len(list(folder.glob("*.py"))) <= 16, f"{folder} holds too many modules"
        init = folder / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring"
    for module, path in MODULES.items():
        assert len(path.read_text().splitlines()) <= 800, f"{module} is over 800 lines"


@pytest.mark.parametrize(
    "protocol_method", ["init", "apply", "kernel", "kernel_planned", "spatial_requirement"]
)
def test_layer_protocol_is_typed(protocol_method: str) -> None:
    """The protocol and the base class declare every method with annotations, no ignores."""
    for path in (PRIVATE / "core" / "protocol.py", PRIVATE / "layers" / "base.py"):
        source = path.read_text()
        tree = ast.parse(source)
        (fn,) = [
            n
            for cls in tree.body
            if isinstance(cls, ast.ClassDef) and cls.name in ("KernelLayer", "Layer")
            for n in cls.body
            if isinstance(n, ast.FunctionDef) and n.name == protocol_method
        ]
        assert fn.returns is not None
        assert all(a.annotation is not None for a in fn.args.args[1:])
        lines = source.splitlines()[fn.lineno - 1 : fn.body[0].lineno]
        assert not any("type: ignore" in line for line in lines)
