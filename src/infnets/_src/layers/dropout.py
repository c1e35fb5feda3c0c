r"""Dropout and its infinite-width kernel.

Neural Tangents' convention, kept here so ported code gives the same kernels: ``rate``
is the probability of **keeping** a unit (``rate=1`` keeps everything), i.e.
``rate = 1 - p`` for ``torch.nn.Dropout(p)``. The finite layer is inverted dropout,
``y = m x / rate`` with ``m ~ Bernoulli(rate)`` independently per example, channel and
position, exactly ``nn.Dropout(p=1 - rate)`` in training mode.

Kernel (train mode): the masks of two different activations are independent, so
``E[m m'] / rate^2 = 1`` and covariances are unchanged, except for an activation with
itself, where ``E[m^2] / rate^2 = 1 / rate``. Hence every *same example, same position*
entry is multiplied by ``1 / rate``: the variances ``cov1``/``cov2`` at ``p = p'``, and,
when ``x2 is None`` (one batch, one mask per example), the diagonal ``i = j, p = p'`` of the
NNGP and of the NTK (the gradient ``m / rate dx/dtheta`` carries the same mask).
Different batches (``x2`` given) are different forward passes with independent masks,
so their cross-covariance is unchanged (Neural Tangents' rule). The result is not
Gaussian. Test mode is the identity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import masking
from infnets._src.core.kernel import Kernel
from infnets._src.layers.base import Layer, Params

__all__ = ["Dropout"]


@dataclasses.dataclass(frozen=True, eq=False)
class Dropout(Layer):
    r"""Inverted dropout with Neural Tangents' ``rate`` (the probability of *keeping*).

    ``y = m x / rate``, ``m ~ Bernoulli(rate)`` per example, channel and position, in
    ``mode='train'``; the identity in ``mode='test'``. ``Dropout(rate)`` is
    ``torch.nn.Dropout(p=1 - rate)`` in training mode. Train-mode kernel: every
    covariance of an activation with itself (same example, same position) is multiplied
    by ``1 / rate`` (see :mod:`infnets._src.layers.dropout`); across the batches ``x1`` and ``x2``
    nothing changes. Randomness: ``apply_fn(params, x, rng=seed_or_generator)``, else
    torch's global generator (like ``nn.Dropout``).

    Args:
        rate: keep probability, ``0 < rate <= 1``.
        mode: ``'train'`` or ``'test'``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dropout(0.5), stax.Dense(1))
        >>> k = net.kernel_fn(torch.eye(2, dtype=torch.float64), None, 'nngp')
        >>> k0 = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1)).kernel_fn(
        ...     torch.eye(2, dtype=torch.float64), None, 'nngp')
        >>> bool(torch.allclose(k.diagonal(), 2 * k0.diagonal())), bool(k[0, 1] == k0[0, 1])
        (True, True)
    """

    rate: float
    mode: str = "train"

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)):
            raise TypeError(f"Dropout: rate must be a number in (0, 1], got {self.rate!r}.")
        if not 0 < self.rate <= 1 or not math.isfinite(self.rate):
            raise ValueError(
                f"Dropout: rate is the probability of keeping a unit (Neural Tangents' "
                f"convention, 1 - p of torch.nn.Dropout) and must lie in (0, 1], got "
                f"{self.rate}."
            )
        if self.mode not in ("train", "test"):
            raise ValueError(f"Dropout: mode must be 'train' or 'test', got {self.mode!r}.")

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        if self.mode == "test" or self.rate == 1:
            return x
        gen = masking.current_generator()
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        return x * (u < self.rate).to(x.dtype) / self.rate

    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        if self.mode == "test" or self.rate == 1:
            return k
        extra = 1.0 / self.rate - 1.0

        def own(cov: Tensor) -> Tensor:
            same = _same_positions(k, cov, 1)
            return cov + cov * same * extra

        nngp, ntk = k.nngp, k.ntk
        if k.is_symmetric:  # one forward pass: example i meets its own mask on the diagonal
            same = _same_pairs(k, nngp)
            nngp = nngp + nngp * same * extra
            ntk = None if ntk is None else ntk + ntk * same * extra
        return k.replace(
            nngp=nngp,
            ntk=ntk,
            cov1=own(k.cov1),
            cov2=None if k.cov2 is None else own(k.cov2),
            is_gaussian=False,
        )


def _position_eye(k: Kernel, like: Tensor) -> Tensor:
    """``(s_1, s_1', ..., s_d, s_d')`` indicator of ``p = p'`` (interleaved)."""
    eye = like.new_ones(())
    d = len(k.spatial_shape)
    for a, n in enumerate(k.spatial_shape):
        shape = [1] * (2 * d)
        shape[2 * a] = shape[2 * a + 1] = n
        eye = eye * torch.eye(n, dtype=like.dtype, device=like.device).reshape(shape)
    return eye


def _same_positions(k: Kernel, cov: Tensor, lead: int) -> Tensor:
    """Broadcastable indicator of same-position entries of a covariance with ``lead``
    example axes (all of them for per-position layouts)."""
    if not k.is_full_spatial:
        return cov.new_ones(())
    return _position_eye(k, cov)


def _same_pairs(k: Kernel, nngp: Tensor) -> Tensor:
    """Indicator of ``i = j`` (and ``p = p'``) entries of a symmetric record's pairs."""
    n_spatial = nngp.ndim - (1 if k.is_packed else 2)
    if k.is_packed:
        same = (k.pair_index[0] == k.pair_index[1]).to(nngp.dtype)  # type: ignore[index]
    else:
        same = torch.eye(k.n1, dtype=nngp.dtype, device=nngp.device)
    same = same.reshape(same.shape + (1,) * n_spatial)
    return same * _same_positions(k, nngp, 0)
