r"""Layer normalisation and its infinite-width kernel."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core.protocol import Params
from infnets._src.layers.base import Layer

__all__ = ["LayerNorm"]


@dataclasses.dataclass(frozen=True, eq=False)
class LayerNorm(Layer):
    r"""Normalise each example over its features: ``(x - mean) / sqrt(var + eps)``.

    At infinite width the features of an example after an affine layer are i.i.d.
    with mean zero and variance ``q(x)``, so the empirical mean vanishes and the
    empirical variance concentrates at ``q(x)``: the layer divides each example by
    ``sqrt(q(x) + eps)``. Hence ``K'(x, x') = K(x, x') / sqrt((q + eps)(q' + eps))``
    and likewise for the NTK (the rank-one projection of the normalisation's
    Jacobian vanishes as the width grows). No learnable gain or bias.

    The map is exact for centred features: after an affine layer, or after an
    odd nonlinearity of one. Features with non-zero means (raw inputs, ReLU
    outputs) raise a ``ValueError``, since the subtracted mean would not vanish.

    Args:
        axis: the feature axis (``-1`` for fully-connected inputs, ``1`` for the
            channels of convolutional inputs).
        eps: added to the variance, >= 0.
    """

    axis: int = -1
    eps: float = 1e-12

    def __post_init__(self) -> None:
        _inputs.check_std(self.eps, "LayerNorm: eps")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"LayerNorm: axis must be an int, got {self.axis!r}.")

    def _check_axis(self, ndim: int) -> int:
        if ndim > 2:
            if self.axis not in (1, -(ndim - 1)):
                raise ValueError(
                    f"LayerNorm(axis={self.axis}): convolutional inputs of rank {ndim} "
                    "(N, C, *spatial) are normalised over their channels; pass axis=1."
                )
            return 1
        if self.axis not in (-1, ndim - 1):
            raise ValueError(
                f"LayerNorm(axis={self.axis}): for rank-{ndim} inputs only the feature axis "
                "(-1) is supported."
            )
        return -1

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        dim = self._check_axis(x.ndim)
        mean = x.mean(dim=dim, keepdim=True)
        var = x.var(dim=dim, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps)

    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        self._check_axis(len(k.shape1))
        if not k.centred:
            raise ValueError(
                f"{self!r} needs zero-mean features (after an affine layer Dense/Conv, or an "
                "odd nonlinearity of one): the mean it subtracts is then zero at infinite "
                "width. Features with a non-zero mean (raw inputs, ReLU outputs) would need "
                "the mean itself; normalise raw inputs beforehand, or place LayerNorm before "
                "the nonlinearity."
            )
        var1, var2 = k.pair_variances()
        scale = torch.rsqrt((var1 + self.eps) * (var2 + self.eps))

        def own(cov: Tensor) -> Tensor:
            if k.is_full_spatial:  # pixel pairs of one example: its per-position variances
                va, vb = k.own_variances(cov)
                return cov * torch.rsqrt((va + self.eps) * (vb + self.eps))
            return cov / (cov + self.eps)

        return k.replace(
            nngp=k.nngp * scale,
            ntk=None if k.ntk is None else k.ntk * scale,
            cov1=own(k.cov1),
            cov2=None if k.cov2 is None else own(k.cov2),
        )
