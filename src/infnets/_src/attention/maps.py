"""Shared maps of attention: mechanisms, positional-embedding covariances, position-pair layouts.

Pure tensor functions used by the finite layer (:mod:`.layer`), its exact kernel (:mod:`.kernel`)
and the quasi-Monte Carlo kernel (:mod:`.qmc`) alike (Hron, Bahri, Sohl-Dickstein & Novak 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["mechanism_fn", "pos_emb_covariance", "sqrt_psd", "to_pp", "from_pp"]


def mechanism_fn(name: str, g: Tensor, keep: Tensor | None) -> Tensor:
    """The attention mechanism applied to logits ``g`` (``(..., P_query, P_key)``).

    Padded keys (``keep == 0``, broadcastable to ``g``) get zero weight: ``-inf``
    logits for the softmax (a row of padding only is uniform, as in Neural Tangents),
    zero logits for the others.
    """
    if name == "SOFTMAX":
        if keep is not None:
            g = g.masked_fill(keep == 0, torch.finfo(g.dtype).min)
        return torch.softmax(g, dim=-1)
    if keep is not None:
        g = g * keep
    if name == "IDENTITY":
        return g
    if name == "ABS":
        return g.abs()
    return torch.relu(g)


def pos_emb_covariance(
    spatial: tuple[int, ...],
    p_norm: float,
    decay_fn: Callable[[Any], Any] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``(P, P)`` covariance of the positional embeddings over flattened positions.

    ``R(p, p') = decay_fn(sum_a |p_a - p'_a|^p_norm)`` (row-major flattening of the spatial
    axes), or the identity when ``decay_fn`` is ``None`` (independent embeddings).

    Examples:
        >>> pos_emb_covariance((3,), 1, lambda d: 0.5**d, torch.float64, torch.device('cpu'))
        tensor([[1.0000, 0.5000, 0.2500],
                [0.5000, 1.0000, 0.5000],
                [0.2500, 0.5000, 1.0000]], dtype=torch.float64)
    """
    p = math.prod(spatial)
    if decay_fn is None:
        return torch.eye(p, dtype=dtype, device=device)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], dim=-1)  # (P, d)
    dist = ((coords[:, None, :] - coords[None, :, :]).abs() ** p_norm).sum(-1)
    r = decay_fn(dist)
    if not isinstance(r, Tensor):
        r = torch.as_tensor(np.asarray(r))
    if tuple(r.shape) != (p, p):
        raise ValueError(
            f"GlobalSelfAttention: pos_emb_decay_fn must map the ({p}, {p}) distance matrix "
            f"elementwise, but returned shape {tuple(r.shape)}."
        )
    return r.to(dtype=dtype, device=device)


def sqrt_psd(m: Tensor) -> Tensor:
    """Batched ``F`` with ``F F^T = M`` for symmetric PSD ``M`` (eigenvalues clipped at 0).

    Columns run from the largest eigenvalue down: in quasi-Monte Carlo the leading (best
    distributed) Sobol coordinates then drive the directions of largest variance (the
    principal-component construction).
    """
    lam, u = torch.linalg.eigh((m + m.transpose(-1, -2)) / 2)
    return (u * lam.clamp(min=0).sqrt().unsqueeze(-2)).flip(-1)


def to_pp(t: Tensor, lead: int, d: int) -> Tensor:
    """Interleaved ``(*B, s_1, s_1', ..., s_d, s_d')`` -> ``(*B, P, P')`` (contiguous)."""
    if d > 1:
        perm = list(range(lead)) + [lead + 2 * a for a in range(d)]
        perm += [lead + 2 * a + 1 for a in range(d)]
        t = t.permute(perm)
    b = tuple(t.shape[:lead])
    p = math.prod(t.shape[lead : lead + d])
    return t.reshape(b + (p, p)).contiguous()


def from_pp(t: Tensor, lead: int, spatial: tuple[int, ...]) -> Tensor:
    """``(*B, P, P')`` -> interleaved ``(*B, s_1, s_1', ..., s_d, s_d')`` (a view)."""
    d = len(spatial)
    b = tuple(t.shape[:lead])
    t = t.reshape(b + spatial + spatial)
    if d > 1:
        perm = list(range(lead))
        for a in range(d):
            perm += [lead + a, lead + d + a]
        t = t.permute(perm)
    return t
