"""NTK-vector products and example blocking of the empirical NTK.

``'ntk_vector_products'`` (NTVP): per example of ``x2`` and output unit, one vector-Jacobian
product gives ``J2^T e`` and one Jacobian-vector product on all of ``x1`` the NTK column
``J1 J2^T e`` (Novak, Sohl-Dickstein & Schoenholz 2022). :func:`blocked` evaluates any of the
algorithms on blocks of examples (``chunk_size``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from infnets._src.empirical.axes import OutputAxes
from infnets._src.empirical.functorch import jvp, vjp
from infnets._src.empirical.model import Bound, wrap_model_error

#: NTVP evaluates this many (example, output unit) columns at once, at most, per parameter
NTVP_BUDGET = 2**26


# ------------------------------------------------------------------------------- NTVP
def ntvp(
    bound: Bound,
    x1: Tensor,
    x2: Tensor,
    s2: tuple[int, ...],
    dtype: torch.dtype,
    ax: OutputAxes,
    per_param: bool,
    who: str,
) -> dict[str, Tensor]:
    """NTK columns ``J1 (J2^T e)`` for every example of ``x2`` and unit vector ``e``."""
    vals = bound.values
    o2 = math.prod(s2)
    basis = torch.eye(o2, dtype=dtype, device=x1.device).reshape((o2,) + s2)

    def f1(v: dict[str, Tensor]) -> Tensor:
        return bound.call(v, x1)

    def per_example(xn: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda v: bound.call(v, xn.unsqueeze(0)).squeeze(0), vals)

        def column(e: Tensor) -> dict[str, Tensor]:
            (ct,) = pullback(e)
            if not per_param:
                return {"": jvp(f1, (vals,), (ct,))[1]}
            return {
                name: jvp(lambda w, name=name: f1({**vals, name: w}), (vals[name],), (ct[name],))[1]
                for name in bound.names
            }

        return vmap(column)(basis)

    chunk = max(1, NTVP_BUDGET // max(1, o2 * bound.n_params))
    try:
        cols = vmap(per_example, chunk_size=min(chunk, x2.shape[0]))(x2)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise wrap_model_error(who, err) from err
    n1, n2 = x1.shape[0], x2.shape[0]
    out = {}
    for name, c in cols.items():
        full = c.reshape((n2,) + s2 + (n1,) + tuple(c.shape[3:]))
        out[name] = torch.einsum(f"{ax.a2}{ax.a1}->{ax.out}", full)
    return out


# ---------------------------------------------------------------------------- blocking
def _blocks(x: Tensor, chunk: int | None) -> list[Tensor]:
    if chunk is None or x.shape[0] <= chunk:
        return [x]
    return list(torch.split(x, chunk))


def blocked(
    feat: Callable[[Tensor], Any],
    pair: Callable[[Any, Any, bool], dict[str, Tensor]],
    x1: Tensor,
    x2: Tensor | None,
    chunk: int | None,
    ax: OutputAxes,
) -> dict[str, Tensor]:
    """Assemble the kernel from blocks of at most ``chunk`` examples of ``x1`` and ``x2``.

    ``feat(x_block)`` computes per-block features, ``pair(f1, f2, same)`` one kernel block.
    Symmetric problems (``x2 is None``) compute the upper block triangle and mirror it.
    """
    b1 = _blocks(x1, chunk)
    b2 = b1 if x2 is None else _blocks(x2, chunk)
    if ax.batch_diag:
        parts = []
        for c1, c2 in zip(b1, b2):
            f1 = feat(c1)
            parts.append(pair(f1, f1 if x2 is None else feat(c2), x2 is None))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    rows: list[list[dict[str, Tensor] | None]] = []
    for i, c1 in enumerate(b1):
        f1 = feat(c1)
        row: list[dict[str, Tensor] | None] = []
        for j, c2 in enumerate(b2):
            if x2 is None and j < i:
                row.append(None)
            elif x2 is None and j == i:
                row.append(pair(f1, f1, True))
            else:
                row.append(pair(f1, feat(c2), False))
        rows.append(row)
    first = rows[0][0]
    assert first is not None
    out = {}
    for k in first:
        cat_rows = []
        for i, row in enumerate(rows):
            blocks: list[Tensor] = []
            for j, blk in enumerate(row):
                if blk is None:
                    other = rows[j][i]
                    assert other is not None
                    blocks.append(other[k].permute(ax.mirror))
                else:
                    blocks.append(blk[k])
            cat_rows.append(torch.cat(blocks, dim=1))
        out[k] = torch.cat(cat_rows, dim=0)
    return out
