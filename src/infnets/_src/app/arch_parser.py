"""A safe parser for architectures written as Python expressions (``infnets kernel --arch``).

The command line takes the architecture in the very syntax a user writes in
Python, e.g. ``"serial(Dense(512, W_std=1.4), Relu(), Dense(1))"`` or the same
with ``stax.``-prefixed names. The text is parsed with :mod:`ast` and the tree
is interpreted by a small whitelist interpreter; nothing is ever passed to
``eval``/``exec`` or unpickled.

Grammar accepted (everything else is refused with the offending position)::

    arch    := call
    call    := NAME "(" [args] ")"            NAME a layer constructor of infnets.stax.__all__
             | "stax." NAME "(" [args] ")"     (also "infnets.stax." NAME)
    args    := value ("," value)* ("," NAME "=" value)*
    value   := call | literal
    literal := number | "-" number | "+" number | string | True | False | None
             | "(" literal, ... ")" | "[" literal, ... "]"

No attribute access other than the ``stax.`` / ``infnets.stax.`` prefix, no
subscripts, operators (besides a sign on a number), lambdas, comprehensions,
starred or ``**`` arguments, f-strings, names outside ``infnets.stax.__all__``
(and none of its non-layer names such as ``Kernel``).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

__all__ = ["ArchError", "layer_names", "parse_arch", "read_arch"]

#: longest architecture text accepted (characters)
MAX_SOURCE_CHARS = 100_000
#: deepest nesting of calls and literals accepted
MAX_DEPTH = 64

#: names of ``infnets.stax.__all__`` that are not layer constructors
_NOT_LAYERS = frozenset(
    {
        "Kernel",
        "Layer",
        "StaxModule",
        "ElementwiseLayer",
        "TorchGraph",
        "FromTorchError",
        "NotYetSupportedError",
        "from_torch",
        "params_from",
        "reinit_fns",
    }
)


class ArchError(ValueError):
    """An architecture string that is not a call of infnets layers with literal arguments."""


def _layer_table() -> dict[str, Any]:
    from infnets import stax

    return {
        name: getattr(stax, name)
        for name in stax.__all__
        if name not in _NOT_LAYERS and callable(getattr(stax, name))
    }


def layer_names() -> tuple[str, ...]:
    """The layer constructors an ARCH expression may call (``infnets.stax.__all__`` layers)."""
    return tuple(sorted(_layer_table()))


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    col = getattr(node, "col_offset", None)
    if line is None:
        return ""
    return f" (line {line}, column {int(col or 0) + 1})"


class _Interpreter:
    """Evaluates a whitelisted expression tree into infnets layers."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.layers = _layer_table()

    def fail(self, node: ast.AST, message: str) -> ArchError:
        snippet = ast.get_source_segment(self.source, node) or type(node).__name__
        if len(snippet) > 60:
            snippet = snippet[:57] + "..."
        return ArchError(f"ARCH: {message}{_where(node)}: {snippet!r}")

    # ----------------------------------------------------------------- values
    def value(self, node: ast.AST, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        return self.literal(node, depth)

    def literal(self, node: ast.AST, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, ast.Constant):
            v = node.value
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            raise self.fail(node, f"literal of type {type(v).__name__} is not allowed")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = node.operand
            if (
                isinstance(operand, ast.Constant)
                and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)
            ):
                return -operand.value if isinstance(node.op, ast.USub) else +operand.value
            raise self.fail(node, "a sign is allowed only directly before a number")
        if isinstance(node, (ast.Tuple, ast.List)):
            items = []
            for elt in node.elts:
                if isinstance(elt, ast.Starred):
                    raise self.fail(elt, "starred expressions are not allowed")
                items.append(self.literal(elt, depth + 1))
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Name):
            if node.id in self.layers:
                raise self.fail(node, f"{node.id} must be called, e.g. {node.id}()")
            raise self.fail(node, f"unknown name {node.id!r}; only literals and layer calls")
        kinds = {
            ast.Attribute: "attribute access",
            ast.Lambda: "lambdas",
            ast.ListComp: "comprehensions",
            ast.SetComp: "comprehensions",
            ast.DictComp: "comprehensions",
            ast.GeneratorExp: "generator expressions",
            ast.Subscript: "subscripts",
            ast.BinOp: "arithmetic",
            ast.BoolOp: "boolean operators",
            ast.Compare: "comparisons",
            ast.IfExp: "conditional expressions",
            ast.JoinedStr: "f-strings",
            ast.Dict: "dict literals",
            ast.Set: "set literals",
            ast.NamedExpr: "assignment expressions",
            ast.Starred: "starred expressions",
        }
        what = kinds.get(type(node), f"{type(node).__name__} expressions")
        raise self.fail(node, f"{what} are not allowed; use literal arguments only")

    # ------------------------------------------------------------------ calls
    def callee(self, func: ast.AST) -> tuple[str, Any]:
        parts: list[str] = []
        node = func
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            raise self.fail(func, "only layer names of infnets.stax can be called")
        parts.append(node.id)
        parts.reverse()
        *prefix, name = parts
        if prefix not in ([], ["stax"], ["infnets", "stax"]):
            raise self.fail(
                func,
                "attribute access is not allowed (only the 'stax.' or 'infnets.stax.' prefix)",
            )
        if name not in self.layers:
            known = ", ".join(sorted(self.layers))
            raise self.fail(func, f"{name!r} is not a layer of infnets.stax (known: {known})")
        return name, self.layers[name]

    def call(self, node: ast.Call, depth: int) -> Any:
        name, ctor = self.callee(node.func)
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.fail(arg, "starred arguments (*args) are not allowed")
            args.append(self.value(arg, depth + 1))
        kwargs: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(kw.value, "** keyword unpacking is not allowed")
            if kw.arg in kwargs:
                raise self.fail(kw.value, f"keyword {kw.arg!r} given twice")
            kwargs[kw.arg] = self.value(kw.value, depth + 1)
        try:
            return ctor(*args, **kwargs)
        except (TypeError, ValueError) as err:
            raise self.fail(node, f"{name}(...) rejected its arguments: {err}") from None


def parse_arch(source: str) -> Any:
    """Build an infnets layer from the text of a ``stax`` expression, safely.

    The text is parsed with :func:`ast.parse` in ``'eval'`` mode and interpreted by
    a whitelist: calls to layer constructors in ``infnets.stax.__all__`` (bare or
    ``stax.``/``infnets.stax.``-prefixed) whose arguments are literals (numbers,
    strings, ``None``/``True``/``False``, a sign before a number, tuples and lists
    of literals) or further layer calls, positional or by keyword. Nothing is
    evaluated by Python itself, so ``__import__('os')``, ``os.system``, lambdas,
    comprehensions, subscripts and operators are all refused. Layers whose
    arguments are functions (``Elementwise``, ``ElementwiseNumerical``) cannot be
    written this way.

    Args:
        source: the expression, e.g. ``"serial(Dense(512, W_std=1.4), Relu(), Dense(1))"``.
            Newlines and ``#`` comments are allowed.

    Returns:
        The :class:`infnets.stax.Layer` the expression describes.

    Raises:
        ArchError: (a ``ValueError``) naming the offending construct and its position.

    Examples:
        >>> net = parse_arch("stax.serial(stax.Dense(8, W_std=1.5), stax.Relu(), Dense(1))")
        >>> net.layers[0]
        Dense(out_dim=8, W_std=1.5, b_std=None, parameterization='ntk')
    """
    from infnets._src.layers.base import Layer

    if not isinstance(source, str):
        raise TypeError(f"parse_arch: source must be a str, got {type(source).__name__}.")
    if len(source) > MAX_SOURCE_CHARS:
        raise ArchError(f"ARCH: text is longer than {MAX_SOURCE_CHARS} characters.")
    text = source.strip()
    if not text:
        raise ArchError(
            "ARCH: empty architecture; write e.g. 'serial(Dense(512), Relu(), Dense(1))'."
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ArchError(
            f"ARCH: not a Python expression ({err.msg}, line {err.lineno}, column {err.offset})."
        ) from None
    except (RecursionError, MemoryError, ValueError):
        raise ArchError("ARCH: expression too deeply nested or malformed.") from None
    body = tree.body
    interp = _Interpreter(text)
    if not isinstance(body, ast.Call):
        raise interp.fail(body, "the architecture must be a layer call such as serial(...)")
    layer = interp.value(body, 0)
    if not isinstance(layer, Layer):  # pragma: no cover - every whitelisted name is a layer
        raise ArchError(f"ARCH: the expression builds a {type(layer).__name__}, not a layer.")
    return layer


def read_arch(spec: str) -> Any:
    """The layer named by a ``--arch`` argument: an expression, ``@FILE`` or a file path.

    Args:
        spec: ``"@path"`` reads the expression from ``path``; a string naming an
            existing file reads that file; anything else is the expression itself.

    Returns:
        The layer built by :func:`parse_arch`.

    Examples:
        >>> read_arch("serial(Dense(4), Relu())")
        serial(Dense(out_dim=4, W_std=1.0, b_std=None, parameterization='ntk'), Relu())
    """
    if not isinstance(spec, str):
        raise TypeError(f"read_arch: spec must be a str, got {type(spec).__name__}.")
    path: Path | None = None
    if spec.startswith("@"):
        path = Path(spec[1:]).expanduser()
        if not path.is_file():
            raise ArchError(f"ARCH: file {str(path)!r} (from {spec!r}) does not exist.")
    elif "(" not in spec and len(spec) < 4096 and os.path.isfile(spec):
        path = Path(spec)
    if path is not None:
        size = path.stat().st_size
        if size > MAX_SOURCE_CHARS:
            raise ArchError(f"ARCH: file {str(path)!r} is larger than {MAX_SOURCE_CHARS} bytes.")
        return parse_arch(path.read_text(encoding="utf-8"))
    return parse_arch(spec)
