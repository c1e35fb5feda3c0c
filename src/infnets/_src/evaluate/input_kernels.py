"""The kernels of raw inputs: the first record of every evaluation.

* fully-connected inputs ``(N, d)``: :func:`~infnets._src.core.protocol.input_kernel`;
* convolutional inputs ``(N, C, *spatial)``: :func:`spatial_input_kernel`, the per-position
  channel averages ``K(x, x')[p, p'] = 1/C sum_c x[c, p] x'[c, p']`` (Novak et al. 2019),
  with every pixel pair or only the diagonal, in the examples-innermost storage order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel, pack_index, zero_ntk
from infnets._src.core.protocol import PACK_MIN_EXAMPLES

__all__ = ["SMALL_CHANNELS", "spatial_input_kernel"]

#: per-position covariances of inputs with at most this many channels use elementwise
#: products; full pixel-pair covariances always use batched matrix products (an order of
#: magnitude faster for P^2 pairs of positions; identical examples still get their own
#: variances bit for bit, the same product computing both)
SMALL_CHANNELS = 8


def _interleave(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [x for pair in zip(a, b) for x in pair]


def spatial_input_kernel(
    x1: Tensor,
    x2: Tensor | None,
    need_ntk: bool,
    full: bool = True,
    index: Tensor | None = None,
) -> Kernel:
    r"""The kernel of raw convolutional inputs: per-position channel inner products.

    ``K(x, x')[p, p'] = 1 / C sum_c x[c, p] x'[c, p']`` (Novak et al. 2019, eq. 6):
    the channels are the axis taken to infinity, so the input covariance of a
    position pair is the channel average.

    Args:
        x1: ``(N1, C, *spatial)`` with 1 to 3 spatial axes.
        x2: ``(N2, C, *spatial)`` or ``None`` for ``x2 = x1``.
        need_ntk: track the NTK (zero for the inputs).
        full: keep every pair of positions (interleaved layout
            ``(N1, N2, s_1, s_1', ..., s_d, s_d')``); else only ``p = p'``
            (``(N1, N2, *spatial)``, ``diagonal_spatial=True``).
        index: with ``x2=None``, an explicit ``(2, M)`` packed ``pair_index``: only these
            ``M`` pairs of examples of ``x1`` are formed (e.g. the pairs within each of
            several input sets, :mod:`infnets._src.ecosystem.batched`); ``None`` picks the
            layout as below.

    Returns:
        The input :class:`Kernel`; symmetric problems of at least
        ``PACK_MIN_EXAMPLES`` examples (or given an ``index``) use the packed pair layout.

    Examples:
        >>> k = spatial_input_kernel(torch.ones(2, 3, 4, 4), None, False, full=False)
        >>> k.nngp.shape, k.cov1.shape
        (torch.Size([2, 2, 4, 4]), torch.Size([2, 4, 4]))
    """
    if not 3 <= x1.ndim <= 5:
        raise ValueError(
            f"x1 has shape {tuple(x1.shape)}; convolutional inputs are (N, C, *spatial) with "
            "1 to 3 spatial axes (channels on axis 1, PyTorch layout)."
        )
    n1, c = x1.shape[0], x1.shape[1]
    symmetric = x2 is None
    xb = x1 if x2 is None else x2
    n2 = xb.shape[0]
    if index is not None:
        if not symmetric or index.ndim != 2 or index.shape[0] != 2:
            raise ValueError(
                "spatial_input_kernel: an explicit index needs x2=None and shape (2, M), got "
                f"{tuple(index.shape)}{'' if symmetric else ' with x2'}."
            )
    explicit = index is not None
    if index is None and symmetric and n1 >= PACK_MIN_EXAMPLES:
        index = pack_index(n1, x1.device)
    if c <= SMALL_CHANNELS and not full:
        nngp, cov1, cov2 = _products(x1, xb, index, symmetric, full)
    else:
        nngp, cov1, cov2 = _matmuls(x1, xb, index, symmetric, full, pairwise=explicit)
    return Kernel(
        nngp=nngp,
        ntk=zero_ntk(nngp) if need_ntk else None,  # no parameters yet
        cov1=cov1,
        cov2=cov2,
        shape1=tuple(x1.shape),
        shape2=(n2,) + tuple(x1.shape[1:]),
        is_gaussian=False,
        pair_index=index,
        n1=n1,
        n2=n2,
        diagonal_spatial=not full,
    )


def _products(
    x1: Tensor, x2: Tensor, index: Tensor | None, symmetric: bool, full: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Channel sums as a fixed sequence of elementwise products (few channels).

    Every entry, in either layout and in ``cov1``, is the same sequence of
    roundings, so the per-position and the full layouts agree bit for bit and a
    pair of identical examples has correlation exactly one. Results are stored
    with the example axes innermost (see :mod:`infnets._src.core.kernel`).
    """
    c = x1.shape[1]
    d = x1.ndim - 2

    def plane(x: Tensor, ch: int) -> Tensor:
        return x[:, ch].movedim(0, -1).contiguous()  # (*S, N): examples innermost

    def outer(a: Tensor, b: Tensor, pairs: bool) -> Tensor:
        """``(*S, B1)``, ``(*S, B2)`` -> ``(*S_pairs, B1, B2)`` (rowwise: ``(*S_pairs, B)``)."""
        if full:  # interleave: a on the first position of each pair, b on the second
            a = a.reshape(tuple(x for n in a.shape[:d] for x in (n, 1)) + a.shape[d:])
            b = b.reshape(tuple(x for n in b.shape[:d] for x in (1, n)) + b.shape[d:])
        return a.unsqueeze(-1) * b.unsqueeze(-2) if pairs else a * b

    def channel_sum(term: Any, batch: int) -> Tensor:
        acc = term(0)
        for ch in range(1, c):
            acc.add_(term(ch))
        if c > 1:
            acc.div_(c)
        spatial = acc.ndim - batch
        return acc.permute(tuple(range(spatial, acc.ndim)) + tuple(range(spatial)))

    p1 = [plane(x1, ch) for ch in range(c)]
    p2 = p1 if x2 is x1 else [plane(x2, ch) for ch in range(c)]
    if index is not None:
        nngp = channel_sum(lambda ch: outer(p1[ch][..., index[0]], p1[ch][..., index[1]], False), 1)
    else:
        nngp = channel_sum(lambda ch: outer(p1[ch], p2[ch], True), 2)
    cov1 = channel_sum(lambda ch: outer(p1[ch], p1[ch], False), 1)
    cov2 = None if symmetric else channel_sum(lambda ch: outer(p2[ch], p2[ch], False), 1)
    return nngp, cov1, cov2


def _batch_last(t: Tensor, lead: int) -> Tensor:
    """The same logical tensor stored with its ``lead`` example axes innermost."""
    perm = tuple(range(lead, t.ndim)) + tuple(range(lead))
    inverse = tuple(range(t.ndim - lead, t.ndim)) + tuple(range(t.ndim - lead))
    return t.permute(perm).contiguous().permute(inverse)


def _matmuls(
    x1: Tensor,
    x2: Tensor,
    index: Tensor | None,
    symmetric: bool,
    full: bool,
    pairwise: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Channel sums as (batched) matrix products (many channels).

    ``pairwise`` (an explicit, possibly sparse ``index``): per-position covariances are
    formed for the indexed pairs only, ``O(M C P)``, not from all ``N^2`` pairs."""
    n1, c = x1.shape[0], x1.shape[1]
    spatial = tuple(x1.shape[2:])
    p = math.prod(spatial)
    a1 = x1.reshape(n1, c, p)
    a2 = x2.reshape(x2.shape[0], c, p)
    n2 = a2.shape[0]

    def own(a: Tensor) -> Tensor:
        if not full:
            return _batch_last(((a * a).sum(1) / c).reshape((a.shape[0],) + spatial), 1)
        return _to_pairs(torch.bmm(a.transpose(1, 2), a) / c, 1, spatial)

    if full:
        if index is not None:
            g = torch.bmm(a1[index[0]].transpose(1, 2), a1[index[1]]) / c  # (M, P, P)
            nngp = _to_pairs(g, 1, spatial)
        else:
            g = a1.transpose(1, 2).reshape(n1 * p, c) @ a2.transpose(1, 2).reshape(n2 * p, c).T
            g = (g / c).reshape(n1, p, n2, p).transpose(1, 2)  # (N1, N2, P, P)
            nngp = _to_pairs(g, 2, spatial)
    elif pairwise and index is not None:
        nngp = (a1[index[0]] * a1[index[1]]).sum(1) / c  # (M, P): the indexed pairs only
        nngp = _batch_last(nngp.reshape((nngp.shape[0],) + spatial), 1)
    else:
        # (P, N1, C) @ (P, C, N2) -> (P, N1, N2): a batched matmul over positions
        g = torch.bmm(a1.permute(2, 0, 1), a2.permute(2, 1, 0)) / c
        nngp = g.permute(1, 2, 0)
        if index is not None:
            nngp = nngp[index[0], index[1]]
        nngp = nngp.reshape(nngp.shape[: nngp.ndim - 1] + spatial)
        nngp = _batch_last(nngp, 1 if index is not None else 2)
    cov2 = None if symmetric else own(a2)
    return nngp, own(a1), cov2


def _to_pairs(g: Tensor, lead: int, spatial: tuple[int, ...]) -> Tensor:
    """``(*B, P, P') -> (*B, s_1, s_1', ..., s_d, s_d')`` with the examples innermost.

    One copy, written directly in the memory order the covariance maps keep (the
    ``lead`` example axes innermost, see :func:`_batch_last`).
    """
    d = len(spatial)
    g = g.reshape(tuple(g.shape[:lead]) + spatial + spatial)
    pairs = _interleave(range(lead, lead + d), range(lead + d, lead + 2 * d))
    stored = g.permute(pairs + list(range(lead))).contiguous()  # (s_1, s_1', ..., *B)
    return stored.permute(list(range(2 * d, 2 * d + lead)) + list(range(2 * d)))


# ------------------------------------------------------------------- plan
