"""Per-call side inputs of layers (graph ``pattern``), passed by ``apply_fn``/``kernel_fn``.

Some layers need data that travels with the inputs but is not an activation: the
adjacency ``pattern`` of graph networks (``stax.Aggregate``), given as
``apply_fn(params, x, pattern=p)`` and ``kernel_fn(x1, x2, get, pattern=(p1, p2))`` as in
Neural Tangents. :func:`using` makes them visible to the layers of one call (a
``contextvars`` context, so threads and nested calls stay separate); layers read them
with :func:`get`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["NAMES", "using", "get"]

#: the side inputs layers may receive
NAMES = ("pattern",)

_CURRENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "infnets_side_inputs", default=None
)


def check_names(names: Any, who: str) -> None:
    """Refuse unknown keyword arguments with the list of known ones."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise TypeError(
            f"{who} got unexpected keyword argument(s) {unknown}; the per-call side inputs "
            f"are {list(NAMES)} (graph networks: pattern=...)."
        )


@contextlib.contextmanager
def using(**side: Any) -> Iterator[None]:
    """Make ``side`` (e.g. ``pattern=...``) visible to layers inside the ``with`` block."""
    check_names(side, "side inputs")
    token = _CURRENT.set({**(_CURRENT.get() or {}), **side})
    try:
        yield
    finally:
        _CURRENT.reset(token)


def get(name: str) -> Any:
    """The side input ``name`` of the current call, or ``None``."""
    return (_CURRENT.get() or {}).get(name)
