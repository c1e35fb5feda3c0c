r"""Linear maps of positions applied to spatial covariances, one axis at a time.

A layer whose output at position ``q`` along an axis is a fixed linear combination of
its input positions, ``y[q] = sum_p M[q, p] x[p]`` (resizing, the scatter of a
transposed convolution), maps the covariance of each interleaved ``(s_a, s_a')`` pair of
axes to ``M K M^T``. Layers with independent weights per filter offset ``f`` sum such
maps, ``sum_f M_f K M_f^T``. When every row of every ``M_f`` has at most one non-zero
entry the per-position covariances map among themselves,
``K'(q, q) = sum_{f, p} M_f[q, p]^2 K(p, p)``, and the layer needs no pixel pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pair_map", "diagonal_map", "apply_axis", "one_per_row"]


def pair_map(t: Tensor, lead: int, axis: int, mats: Tensor) -> Tensor:
    """``sum_f M_f K M_f^T`` on the interleaved pair of spatial axis ``axis``.

    Args:
        t: ``(*B, s_1, s_1', ..., s_d, s_d')`` full spatial covariance, ``len(B) = lead``.
        lead: number of leading (example) axes.
        axis: the spatial axis (0-based).
        mats: ``(F, m, n)`` maps from ``n`` input to ``m`` output positions.

    Returns:
        The covariance with that pair of axes of size ``(m, m)``.
    """
    d1 = lead + 2 * axis
    moved = t.movedim((d1, d1 + 1), (-2, -1))
    mats = mats.to(dtype=t.dtype, device=t.device)
    out = torch.einsum("fqp,...pr,fsr->...qs", mats, moved, mats)
    return out.movedim((-2, -1), (d1, d1 + 1))


def diagonal_map(t: Tensor, lead: int, axis: int, mats: Tensor) -> Tensor:
    """``K'(q, q) = sum_{f, p} M_f[q, p]^2 K(p, p)`` on per-position covariances.

    Exact only for maps with at most one non-zero per row (:func:`one_per_row`).

    Args:
        t: ``(*B, s_1, ..., s_d)``; lead, axis, mats: as for :func:`pair_map`.

    Returns:
        The per-position covariance with axis ``axis`` of size ``m``.
    """
    d = lead + axis
    weights = (mats * mats).sum(0).to(dtype=t.dtype, device=t.device)  # (m, n)
    out = torch.tensordot(t.movedim(d, -1), weights, dims=([-1], [1]))
    return out.movedim(-1, d)


def apply_axis(x: Tensor, axis: int, mat: Tensor) -> Tensor:
    """``y[..., q, ...] = sum_p M[q, p] x[..., p, ...]`` along dimension ``axis`` of ``x``."""
    out = torch.tensordot(x.movedim(axis, -1), mat.to(dtype=x.dtype, device=x.device), ([-1], [1]))
    return out.movedim(-1, axis)


def one_per_row(mats: Sequence[Tensor]) -> bool:
    """Whether every row of every map has at most one non-zero entry."""
    return all(bool(((m != 0).sum(-1) <= 1).all()) for m in mats)
