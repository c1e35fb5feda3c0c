""":mod:`torch.func` transforms with the result arity fixed by the call.

torch annotates ``vjp`` and ``jvp`` as returning a 2- or a 3-tuple whatever ``has_aux``
is; these thin wrappers call them unchanged and type the result for their one use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

__all__ = ["jvp", "vjp", "vjp_with_aux"]

#: the pullback of :func:`vjp`: cotangents of the outputs -> a tuple, one per primal
Pullback = Callable[..., tuple[Any, ...]]


def vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Pullback]:
    """``torch.func.vjp(fn, *primals)``: ``(fn(*primals), pullback)``."""
    return cast(tuple[Any, Pullback], _vjp(fn, *primals))


def vjp_with_aux(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Pullback, Any]:
    """``torch.func.vjp(fn, *primals, has_aux=True)``: ``(output, pullback, aux)``."""
    return cast(tuple[Any, Pullback, Any], _vjp(fn, *primals, has_aux=True))


def jvp(
    fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Any, Any]:
    """``torch.func.jvp(fn, primals, tangents)``: ``(fn(*primals), tangent output)``."""
    return cast(tuple[Any, Any], _jvp(fn, primals, tangents))
