r"""Locally connected layers: convolutions with unshared weights per output position.

A locally connected layer (LCN) slides a window like ``Conv`` but draws independent
weights ``W[o, c, f, p]`` and biases ``b[o, p]`` for every output position ``p``. Two
different output positions then depend on independent weights, so in the limit of
infinitely many channels their covariance vanishes, and the same output position sees
the window average of the input's per-position variances (Novak et al. 2019, "Bayesian
deep convolutional networks with many channels are Gaussian processes", section 3.3:
the LCN-GP is the CNN-GP without pooling's pixel pairs):

``K'(p, p') = [p = p'] (W_std^2 / |F| sum_f K(s p + f, s p + f) + b_std^2)``.

Only per-position covariances of the input are needed, whatever follows; when a later
layer mixes positions (pooling), the output's pixel pairs are zero off the diagonal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.core.kernel import spatial_diagonal
from infnets._src.core.protocol import KernelTree, Params, ShapeTree
from infnets._src.spatial.conv import (
    AxisGeometry,
    ConvFields,
    axis_geometry,
    check_spatial_rank,
    conv_covariance,
    pad_input,
)

__all__ = ["ConvLocal", "embed_diagonal"]

_POS, _OFF = "PQR", "FGH"


def embed_diagonal(t: Tensor, lead: int) -> Tensor:
    """``(*B, s_1, ..., s_d)`` per-position values as a full ``(*B, s_1, s_1, ...)`` covariance
    that is zero off the diagonal."""
    spatial = t.shape[lead:]
    shape = list(t.shape[:lead]) + [s for s in spatial for _ in range(2)]
    out = t.new_zeros(shape)
    spatial_diagonal(out, lead).copy_(t)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class ConvLocal(ConvFields):
    r"""Locally connected layer: a ``Conv`` whose weights differ at every output position.

    With ``C`` input channels, fan-in ``n = C |F|`` and ``W[o, c, *f, *p], b[o, *p] ~
    N(0, 1)``: ``'ntk'``: ``y[o, p] = W_std / sqrt(n) sum_{c, f} W[o, c, f, p] x_pad[c, s p
    + f] + b_std b[o, p]``; ``'standard'``: ``W ~ N(0, W_std^2 / n)``, ``b ~ N(0, b_std^2)``.
    Kernels (module docstring), with ``D(K)(p) = sum_f K(s p + f, s p + f)``:

    * NNGP: ``K'(p, p) = W_std^2 / |F| D(K)(p) + b_std^2``, zero for ``p != p'``;
    * NTK, ``'ntk'``: ``Theta'(p, p) = W_std^2 / |F| D(K + Theta)(p) + b_std^2``;
    * NTK, ``'standard'``: ``Theta'(p, p) = D(C K + W_std^2 / |F| Theta)(p) +
      [b_std is not None]``.

    The per-position kernel equals ``Conv``'s, so ``ConvLocal`` and ``Conv`` stacks read
    out by ``Flatten`` have the same kernel; they differ under pooling.

    Args:
        out_chan: output channels (the width of this layer).
        filter_shape: window size per spatial axis (1 to 3 axes).
        strides: stride per spatial axis (default all 1).
        padding: ``'VALID'``, ``'SAME'`` or ``'CIRCULAR'`` (as for ``Conv``).
        W_std: weight standard deviation, >= 0.
        b_std: bias standard deviation, >= 0; ``None`` for no bias.
        parameterization: ``'ntk'`` or ``'standard'``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.ConvLocal(8, (3,), padding='SAME'), stax.Relu(),
        ...                   stax.GlobalAvgPool(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 1, 5), None, 'nngp').shape
        torch.Size([2, 2])
    """

    def geometry(self, spatial: Sequence[int]) -> list[AxisGeometry]:
        """Window geometry per spatial axis (as ``Conv``)."""
        strides = self.strides or (1,) * self.ndim
        return [
            axis_geometry(n, k, s, self.padding, repr(self), a)
            for a, (n, k, s) in enumerate(zip(spatial, self.filter_shape, strides))
        ]

    def spatial_requirement(self, out_full: Any) -> Any:
        return False  # only per-position covariances of the input matter

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        n, c_in, spatial = self.input_channels(in_shape)
        out_spatial = tuple(g.out for g in self.geometry(spatial))
        w = torch.randn(
            (self.out_chan, c_in) + self.filter_shape + out_spatial,
            generator=gen,
            dtype=dtype,
            device=device,
        )
        params: dict[str, Tensor] = {}
        if self.parameterization == "standard":
            w = w * (float(self.W_std) / math.sqrt(c_in * math.prod(self.filter_shape)))
        params["W"] = w
        if self.b_std is not None:
            b_shape = (self.out_chan,) + out_spatial
            b = torch.randn(b_shape, generator=gen, dtype=dtype, device=device)
            params["b"] = b * float(self.b_std) if self.parameterization == "standard" else b
        return (n, self.out_chan) + out_spatial, params

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        check_spatial_rank(x.ndim, self.ndim, repr(self), x.shape)
        geoms = self.geometry(x.shape[2:])
        patches = pad_input(x, geoms)
        for a, g in enumerate(geoms):  # (N, C, o_1, .., o_d, k_1, .., k_d)
            patches = patches.unfold(2 + a, g.k, g.s)
        d = self.ndim
        pos, off = _POS[:d], _OFF[:d]
        w = params["W"]
        y = torch.einsum(f"nc{pos}{off},oc{off}{pos}->no{pos}", patches, w)
        if self.parameterization == "ntk":
            y = y * (self.W_std / math.sqrt(w.shape[1] * math.prod(self.filter_shape)))
            if "b" in params:
                y = y + self.b_std * params["b"]
        elif "b" in params:
            y = y + params["b"]
        return y

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        return self.kernel_planned(k, k.is_full_spatial)

    def kernel_planned(self, k: KernelTree, out_full: Any) -> KernelTree:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        check_spatial_rank(len(k.shape1), self.ndim, repr(self), k.shape1)
        full_out = k.is_full_spatial if out_full is None else _any_true(out_full)
        k = k.to_diagonal_spatial()
        geoms = self.geometry(k.spatial_shape)
        lead = 1 if k.is_packed else 2

        def d(t: Tensor, n: int) -> Tensor:
            return conv_covariance(t, n, False, geoms)

        nngp, ntk, cov1, cov2 = self.affine_covariances(k, d)
        if full_out:
            nngp, cov1 = embed_diagonal(nngp, lead), embed_diagonal(cov1, 1)
            ntk = None if ntk is None else embed_diagonal(ntk, lead)
            cov2 = None if cov2 is None else embed_diagonal(cov2, 1)
        return self.affine_output(
            k,
            [g.out for g in geoms],
            (nngp, ntk, cov1, cov2),
            diagonal_spatial=not full_out,
        )


def _any_true(need: Any) -> bool:
    if isinstance(need, list):
        return any(_any_true(n) for n in need)
    return bool(need)
