r"""Transposed convolutions of infinitely many channels.

A transposed convolution scatters each input position ``p`` through the filter: along
every spatial axis the full output ``j = s p + f`` (stride ``s``, offset ``f < k``) has
length ``(n - 1) s + k``, then ``padding`` crops (or wraps) it to the output size. With
i.i.d. weights ``W[c, o, f] ~ N(0, 1)`` and fan-in ``C |F|`` (as for ``Conv``; Neural
Tangents' ``ConvTranspose``),

``y[o, q] = W_std / sqrt(C |F|) sum_{c, f, p: q = pi(s p + f)} W[c, o, f] x[c, p] + b_std b[o]``,

and, the weights being independent across offsets, the kernel of every pair of output
positions is (Novak et al. 2019, "Bayesian deep convolutional networks with many
channels are Gaussian processes", eq. 7, with the scatter in place of the window)

``K'(q, q') = W_std^2 / |F| sum_f (S_f K S_f^T)(q, q') + b_std^2``,

with ``S_f[q, p] = 1`` iff ``q = pi(s p + f)``. Each ``S_f`` has at most one non-zero per
row, so per-position covariances map among themselves: like ``Conv``, the layer never
needs pixel pairs itself. The NTK follows as for ``Conv`` (Arora et al. 2019, "On exact
computation with an infinitely wide neural net").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from infnets._src.core.protocol import Params, ShapeTree
from infnets._src.spatial.axis_maps import apply_axis, diagonal_map, pair_map
from infnets._src.spatial.conv import ConvFields, check_spatial_rank

__all__ = ["ConvTranspose", "TransposeGeometry", "transpose_geometry"]

_CONV_T_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclasses.dataclass(frozen=True)
class TransposeGeometry:
    """The scatter of one spatial axis.

    Attributes:
        n: input size. k: filter size. s: stride.
        full: length ``(n - 1) s + k`` of the uncropped scatter.
        out: output size. lo: positions cropped at the front.
        circular: wrap the full output around ``out`` instead of cropping.
    """

    n: int
    k: int
    s: int
    full: int
    out: int
    lo: int
    circular: bool

    def placement(self) -> Tensor:
        """``(out, full)`` 0/1 matrix taking the full scatter to the output positions."""
        j = torch.arange(self.full)
        q = j - self.lo
        if self.circular:
            q = torch.remainder(q, self.out)
        keep = (q >= 0) & (q < self.out)
        mat = torch.zeros(self.out, self.full, dtype=torch.float64)
        mat[q[keep], j[keep]] = 1.0
        return mat

    def scatters(self) -> Tensor:
        """``(k, out, n)`` maps ``S_f``: ``S_f[q, p] = 1`` iff input ``p`` lands on ``q``."""
        f = torch.arange(self.k)[:, None]
        p = torch.arange(self.n)[None, :]
        j = (self.s * p + f).expand(self.k, self.n)
        place = self.placement()
        # S_f = P E_f with E_f[j, p] = 1 iff j = s p + f
        return place[:, j].permute(1, 0, 2)  # (k, out, n)


def transpose_geometry(n: int, k: int, s: int, padding: str) -> TransposeGeometry:
    """The output size and crop of one axis, as ``torch.nn.ConvTranspose*d`` has them.

    * ``'VALID'``: ``out = (n - 1) s + k``, no crop: ``nn.ConvTranspose2d(padding=0)``;
    * ``'SAME'``: ``out = n s``; the ``t = k - s`` extra positions (if ``k > s``) are
      cropped ``ceil(t / 2)`` in front and ``floor(t / 2)`` behind, which is
      ``nn.ConvTranspose2d(padding=ceil(t / 2), output_padding=t % 2)``; for ``k < s``
      zeros are appended: ``padding=0, output_padding=s - k``;
    * ``'CIRCULAR'``: the ``'SAME'`` size, the cropped positions wrapped around
      (periodic images, the adjoint of a circular convolution).

    Examples:
        >>> g = transpose_geometry(4, 3, 2, 'SAME')
        >>> g.full, g.out, g.lo
        (9, 8, 1)
    """
    full = (n - 1) * s + k
    if padding == "VALID":
        return TransposeGeometry(n, k, s, full, full, 0, False)
    out = n * s
    extra = max(full - out, 0)
    return TransposeGeometry(n, k, s, full, out, -(-extra // 2), padding == "CIRCULAR")


@dataclasses.dataclass(frozen=True, eq=False)
class ConvTranspose(ConvFields):
    r"""Transposed convolution, like ``torch.nn.ConvTranspose1d/2d/3d``.

    With ``C`` input channels, fan-in ``n = C prod(filter_shape)`` and ``W[c, o, *f],
    b[o] ~ N(0, 1)``: ``'ntk'``: ``y = W_std / sqrt(n) conv_transpose(x, W) + b_std b``;
    ``'standard'``: ``W ~ N(0, W_std^2 / n)``, ``b ~ N(0, b_std^2)``. Kernels, with
    ``A(K) = sum_f S_f K S_f^T`` over the filter offsets (module docstring):

    * NNGP: ``K' = W_std^2 / |F| A(K) + b_std^2``;
    * NTK, ``'ntk'``: ``Theta' = W_std^2 / |F| A(K + Theta) + b_std^2``;
    * NTK, ``'standard'``: ``Theta' = A(C K + W_std^2 / |F| Theta) + [b_std is not None]``.

    Output sizes per padding (:func:`transpose_geometry`): ``'VALID'`` ``(n - 1) s + k``
    (``padding=0`` in PyTorch), ``'SAME'`` and ``'CIRCULAR'`` ``n s``
    (``padding=ceil((k - s) / 2), output_padding=(k - s) % 2`` for ``k >= s``). With
    stride 1 and ``'CIRCULAR'`` padding and an odd filter it is a circular ``Conv``
    with the flipped filter, which has the same kernel.

    Args:
        out_chan: output channels (the width of this layer).
        filter_shape: filter size per spatial axis (1 to 3 axes).
        strides: upsampling stride per spatial axis (default all 1).
        padding: ``'VALID'``, ``'SAME'`` or ``'CIRCULAR'``.
        W_std: weight standard deviation, >= 0.
        b_std: bias standard deviation, >= 0; ``None`` for no bias.
        parameterization: ``'ntk'`` or ``'standard'``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.ConvTranspose(8, (3, 3), (2, 2), 'SAME'), stax.Relu(),
        ...                   stax.Flatten(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 1, 3, 3), None, 'ntk').shape
        torch.Size([2, 2])
    """

    def output_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if len(spatial) != self.ndim:
            return spatial  # the kernel map reports the mismatch
        return tuple(g.out for g in self.geometry(spatial))

    def geometry(self, spatial: Sequence[int]) -> list[TransposeGeometry]:
        """The scatter of each spatial axis for inputs of spatial shape ``spatial``."""
        strides = self.strides or (1,) * self.ndim
        return [
            transpose_geometry(n, k, s, self.padding)
            for n, k, s in zip(spatial, self.filter_shape, strides)
        ]

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        n, c_in, spatial = self.input_channels(in_shape)
        geoms = self.geometry(spatial)
        w = torch.randn(
            (c_in, self.out_chan) + self.filter_shape, generator=gen, dtype=dtype, device=device
        )
        params: dict[str, Tensor] = {}
        if self.parameterization == "standard":
            w = w * (float(self.W_std) / math.sqrt(c_in * math.prod(self.filter_shape)))
        params["W"] = w
        if self.b_std is not None:
            b = torch.randn((self.out_chan,), generator=gen, dtype=dtype, device=device)
            params["b"] = b * float(self.b_std) if self.parameterization == "standard" else b
        return (n, self.out_chan) + tuple(g.out for g in geoms), params

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        check_spatial_rank(x.ndim, self.ndim, repr(self), x.shape)
        geoms = self.geometry(x.shape[2:])
        w = params["W"]
        y = _CONV_T_FNS[self.ndim](x, w, stride=self.strides or 1)
        for a, g in enumerate(geoms):
            if g.lo or g.out != g.full:
                y = apply_axis(y, 2 + a, g.placement())
        bias_shape = (1, -1) + (1,) * self.ndim
        if self.parameterization == "ntk":
            y = y * (self.W_std / math.sqrt(w.shape[0] * math.prod(self.filter_shape)))
            if "b" in params:
                y = y + self.b_std * params["b"].reshape(bias_shape)
        elif "b" in params:
            y = y + params["b"].reshape(bias_shape)
        return y

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        check_spatial_rank(len(k.shape1), self.ndim, repr(self), k.shape1)
        geoms = self.geometry(k.spatial_shape)
        mats = [g.scatters() for g in geoms]
        full = k.is_full_spatial

        def a(t: Tensor, n: int) -> Tensor:
            for axis, m in enumerate(mats):
                t = pair_map(t, n, axis, m) if full else diagonal_map(t, n, axis, m)
            return t

        return self.affine_output(k, [g.out for g in geoms], self.affine_covariances(k, a))
