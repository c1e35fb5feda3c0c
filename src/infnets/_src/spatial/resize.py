r"""Resizing images: a fixed linear map of positions, and its exact kernel.

Every resize method (nearest, linear, cubic, Lanczos) computes each output position as a
fixed weighted sum of input positions along each axis, ``y[q] = sum_p R[q, p] x[p]``,
with the weights of ``jax.image.resize`` (Neural Tangents' ``ImageResize``): half-pixel
centres, sample position ``(q + 1/2) n / m - 1/2`` for ``n`` input and ``m`` output
positions, the method's filter stretched by ``n / m`` when downsampling with
``antialias=True``, and weights normalised to sum to one. A linear map ``R`` of a
Gaussian process is a Gaussian process with covariance ``R K R^T``; per spatial axis,

``K'(q, q') = sum_{p, p'} R[q, p] R[q', p'] K(p, p')``,

exact for every method (channels are untouched). Only nearest-neighbour resizing (one
input per output) maps per-position covariances among themselves; the other methods
need the full pixel-pair covariance of their input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.core.protocol import Params, ShapeTree
from infnets._src.layers.base import Layer
from infnets._src.spatial.axis_maps import apply_axis, diagonal_map, pair_map

__all__ = ["ImageResize", "resize_matrix", "METHODS"]

#: method names (Neural Tangents / ``jax.image.resize``) and the filter each one uses
METHODS = {
    "nearest": "nearest",
    "linear": "linear",
    "bilinear": "linear",
    "trilinear": "linear",
    "triangle": "linear",
    "cubic": "cubic",
    "bicubic": "cubic",
    "tricubic": "cubic",
    "lanczos3": "lanczos3",
    "lanczos5": "lanczos5",
}


def _filter(name: str, x: Tensor) -> tuple[Tensor, float]:
    """The filter's values at ``x`` and its support radius."""
    ax = x.abs()
    if name == "linear":
        return torch.clamp(1 - ax, min=0.0), 1.0
    if name == "cubic":  # Keys (1981) with a = -0.5
        a = -0.5
        inner = ((a + 2) * ax - (a + 3)) * ax * ax + 1
        outer = ((a * ax - 5 * a) * ax + 8 * a) * ax - 4 * a
        return torch.where(ax < 1, inner, torch.where(ax < 2, outer, torch.zeros_like(ax))), 2.0
    radius = 3.0 if name == "lanczos3" else 5.0
    val = torch.sinc(x) * torch.sinc(x / radius)
    return torch.where(ax < radius, val, torch.zeros_like(ax)), radius


def resize_matrix(n: int, m: int, method: str, antialias: bool = True) -> Tensor:
    r"""The ``(m, n)`` float64 matrix of a 1-D resize from ``n`` to ``m`` positions.

    Nearest: ``R[q, p] = 1`` for ``p = min(floor((q + 1/2) n / m), n - 1)``. Other
    methods: the filter ``h`` at ``(p - x_q) / r`` with ``x_q = (q + 1/2) n / m - 1/2``
    and ``r = max(n / m, 1)`` if ``antialias`` else 1, each row normalised to sum to 1
    (so taps falling outside the image are dropped and the rest reweighted).

    Args:
        n: input size. m: output size. method: a key of :data:`METHODS`.
        antialias: widen the filter when downsampling (no effect when upsampling).

    Returns:
        ``R`` of shape ``(m, n)``.

    Examples:
        >>> resize_matrix(2, 4, 'linear')
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500],
                [0.2500, 0.7500],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    kind = METHODS[method]
    q = torch.arange(m, dtype=torch.float64)
    if kind == "nearest":
        idx = torch.clamp(torch.floor((q + 0.5) * (n / m)).long(), max=n - 1)
        out = torch.zeros(m, n, dtype=torch.float64)
        out[torch.arange(m), idx] = 1.0
        return out
    centre = (q + 0.5) * (n / m) - 0.5
    stretch = max(n / m, 1.0) if antialias else 1.0
    p = torch.arange(n, dtype=torch.float64)
    w, _ = _filter(kind, (p[None, :] - centre[:, None]) / stretch)
    total = w.sum(1, keepdim=True)
    return torch.where(total.abs() > 1e-12, w / total, torch.zeros_like(w))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResize(Layer):
    r"""Resize the spatial axes of ``(N, C, *spatial)`` activations (``jax.image.resize``).

    ``y = R_1 ... R_d x`` with one :func:`resize_matrix` per spatial axis; the kernel is
    ``K' = R K R^T`` on each interleaved pair of axes (module docstring; the NTK alike),
    exact for every method. ``'nearest'`` keeps per-position covariances cheap; the
    other methods need every pixel pair of their input (chosen automatically).

    Args:
        shape: the output shape in the ``(N, C, *spatial)`` layout (Neural Tangents'
            meaning, channels-first): ``-1`` keeps an axis; the batch and channel entries
            must be ``-1`` (or equal to the input's), as resizing them has no
            infinite-width kernel.
        method: ``'nearest'``, ``'linear'`` (``'bilinear'``, ``'trilinear'``,
            ``'triangle'``), ``'cubic'`` (``'bicubic'``, ``'tricubic'``), ``'lanczos3'``
            or ``'lanczos5'``.
        antialias: widen the filter when downsampling (as ``jax.image.resize``).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (3, 3), padding='SAME'),
        ...                   stax.ImageResize((-1, -1, 8, 8), 'linear'), stax.Relu(),
        ...                   stax.GlobalAvgPool(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 1, 4, 4), None, 'nngp').shape
        torch.Size([2, 2])
    """

    shape: tuple[int, ...]
    method: str = "linear"
    antialias: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.shape, (str, bytes))
            or not isinstance(self.shape, Sequence)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.shape)
        ):
            raise TypeError(
                f"ImageResize: shape must be a tuple of ints in the (N, C, *spatial) layout, "
                f"-1 to keep an axis (e.g. (-1, -1, 64, 64)), got {self.shape!r}."
            )
        shape = tuple(self.shape)
        if not 3 <= len(shape) <= 5:
            raise ValueError(
                f"ImageResize: shape {shape} must have 3 to 5 entries (N, C, *spatial) with "
                "1 to 3 spatial axes."
            )
        if any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"ImageResize: shape {shape} entries must be positive or -1.")
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.method, str) or self.method.lower() not in METHODS:
            raise ValueError(
                f"ImageResize: method must be one of {tuple(METHODS)}, got {self.method!r}."
            )
        object.__setattr__(self, "method", self.method.lower())
        if not isinstance(self.antialias, bool):
            raise TypeError(f"ImageResize: antialias must be a bool, got {self.antialias!r}.")

    def output_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if len(spatial) + 2 != len(self.shape):
            return spatial  # the kernel map reports the mismatch
        return tuple(n if m == -1 else m for n, m in zip(spatial, self.shape[2:]))

    def _out_spatial(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        if len(in_shape) != len(self.shape):
            raise ValueError(
                f"{self!r}: shape has {len(self.shape)} entries but the input has shape "
                f"{tuple(in_shape)}; give one entry per input axis, -1 to keep it."
            )
        for axis, name in ((0, "batch"), (1, "channel")):
            if self.shape[axis] not in (-1, in_shape[axis]):
                raise ValueError(
                    f"{self!r}: resizing the {name} axis (axis {axis}, size {in_shape[axis]} "
                    f"-> {self.shape[axis]}) has no infinite-width kernel; set shape[{axis}] "
                    "= -1."
                )
        return tuple(n if m == -1 else m for n, m in zip(in_shape[2:], self.shape[2:]))

    def matrices(self, spatial: Sequence[int]) -> list[Tensor | None]:
        """One resize matrix per spatial axis (``None`` where the size is kept: identity)."""
        out = self._out_spatial((-1, -1) + tuple(spatial))
        return [
            None if n == m else resize_matrix(n, m, self.method, self.antialias)
            for n, m in zip(spatial, out)
        ]

    def spatial_requirement(self, out_full: Any) -> Any:
        return out_full if self.method == "nearest" else True

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        if isinstance(in_shape, list):
            raise ValueError(f"{self!r} received {len(in_shape)} branches; join them first.")
        return tuple(in_shape[:2]) + self._out_spatial(in_shape), ()

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        self._out_spatial(x.shape)
        for a, mat in enumerate(self.matrices(x.shape[2:])):
            if mat is not None:
                x = apply_axis(x, 2 + a, mat)
        return x

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        out_spatial = self._out_spatial(k.shape1)
        mats = self.matrices(k.spatial_shape)
        full = k.is_full_spatial
        if not full and self.method != "nearest" and any(m is not None for m in mats):
            raise ValueError(
                f"{self!r} mixes neighbouring positions and needs the full spatial covariance "
                "of its input, but only per-position covariances were kept. Call kernel_fn "
                "with diagonal_spatial=None (automatic) or False, or use method='nearest'."
            )
        lead = 1 if k.is_packed else 2

        def resize(t: Tensor | None, n: int) -> Tensor | None:
            if t is None:
                return None
            for axis, mat in enumerate(mats):
                if mat is not None:
                    fn = pair_map if full else diagonal_map
                    t = fn(t, n, axis, mat[None])
            return t

        def shape(s: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(s[:2]) + out_spatial

        return k.replace(
            nngp=resize(k.nngp, lead),
            ntk=resize(k.ntk, lead),
            cov1=resize(k.cov1, 1),
            cov2=resize(k.cov2, 1),
            shape1=shape(k.shape1),
            shape2=shape(k.shape2),
        )
