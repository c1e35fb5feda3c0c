r"""Small layers that :func:`infnets.stax.from_torch` needs besides the ``stax`` ones.

* :class:`Scale`: multiplication by a constant, ``y = c x``: ``K' = c^2 K``,
  ``Theta' = c^2 Theta``; Gaussian and centred inputs stay so, and the units are the
  same random features (``last_affine`` kept).
* :class:`Pad`: explicit padding of the spatial axes (zeros, circular, reflect,
  replicate) before a ``VALID`` convolution or pooling. Every mode re-indexes the
  positions, ``y[p] = x[r(p)]`` (or ``0``), so the covariance is re-indexed on both
  positions of each pair: ``K'(p, p') = K(r(p), r(p'))`` (``0`` where either is a
  zero), exact.
* :class:`ChannelAffine`: the learnable per-unit gain and bias of ``nn.LayerNorm``,
  ``y_c = g_c x_c + h_c`` initialised at ``g = 1``, ``h = 0``: the NNGP is unchanged;
  in the standard parameterization each unit's gain and bias add ``x_c x'_c`` and
  ``1`` to its tangent kernel, which a following *linear* layer averages over units
  into ``K + 1`` (Jacot et al. 2018): ``Theta' = Theta + K + [bias]``.
* :class:`NoNTK`: wraps a layer whose NTK would be wrong after a ``ChannelAffine``
  (a nonlinearity weighs each unit's ``x_c x'_c`` by ``phi'(x_c) phi'(x'_c)``, which
  does not factor): the NNGP passes, asking for the NTK raises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from infnets._src.core.kernel import alloc_like, is_zero_ntk, zero_ntk
from infnets._src.core.protocol import ShapeTree, single_shape
from infnets._src.layers.base import Layer, Params, Wrapper

__all__ = ["Scale", "Pad", "ChannelAffine", "NoNTK", "PAD_MODES"]

PAD_MODES = ("zeros", "circular", "reflect", "replicate")


def _single(layer: Layer, x: Any) -> None:
    if isinstance(x, list):
        raise ValueError(f"{layer!r} received {len(x)} branches; join them first.")


@dataclasses.dataclass(frozen=True, eq=False)
class Scale(Layer):
    r"""Multiply by a constant: ``y = c x``, ``K' = c^2 K``, ``Theta' = c^2 Theta``.

    Args:
        c: the constant (a finite float).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(1), Scale(2.0))
        >>> net.kernel_fn(torch.eye(2), None, 'nngp')
        tensor([[2., 0.],
                [0., 2.]])
    """

    c: float

    def __post_init__(self) -> None:
        if isinstance(self.c, bool) or not isinstance(self.c, (int, float)):
            raise TypeError(f"Scale: c must be a float, got {self.c!r}.")
        if not math.isfinite(self.c):
            raise ValueError(f"Scale: c must be finite, got {self.c!r}.")

    def apply(self, params: Params, x: Any) -> Any:
        _single(self, x)
        return x * self.c

    def kernel(self, k: Any) -> Any:
        _single(self, k)
        c2 = float(self.c) ** 2

        def sc(t: Tensor | None) -> Tensor | None:
            return None if t is None else t * c2

        ntk = k.ntk if is_zero_ntk(k.ntk) else sc(k.ntk)
        return k.replace(nngp=sc(k.nngp), ntk=ntk, cov1=sc(k.cov1), cov2=sc(k.cov2))


@dataclasses.dataclass(frozen=True, eq=False)
class Pad(Layer):
    r"""Pad the spatial axes of ``(N, C, *spatial)`` activations, like ``F.pad``.

    ``K'(p, p') = K(r(p), r(p'))`` with ``r`` the padding's index map (zero where a
    position is a padded zero); exact for every mode, on full pixel-pair and
    per-position records alike.

    Args:
        pads: ``(lo, hi)`` per spatial axis, in axis order (not ``F.pad``'s reversed order).
        mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``.
    """

    pads: tuple[tuple[int, int], ...]
    mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.mode not in PAD_MODES:
            raise ValueError(f"Pad: mode must be one of {PAD_MODES}, got {self.mode!r}.")
        pads = tuple((int(lo), int(hi)) for lo, hi in self.pads)
        if any(lo < 0 or hi < 0 for lo, hi in pads) or not 1 <= len(pads) <= 3:
            raise ValueError(f"Pad: pads must be 1 to 3 pairs of ints >= 0, got {self.pads!r}.")
        object.__setattr__(self, "pads", pads)

    def _check(self, shape: Any) -> None:
        _single(self, shape)
        if len(shape) != len(self.pads) + 2:
            raise ValueError(
                f"{self!r} pads {len(self.pads)} spatial axes but received shape {tuple(shape)}."
            )

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        self._check(in_shape)
        shape = single_shape(in_shape, self)
        spatial = tuple(n + lo + hi for n, (lo, hi) in zip(shape[2:], self.pads))
        return tuple(shape[:2]) + spatial, ()

    def apply(self, params: Params, x: Any) -> Any:
        self._check(x.shape)
        flat = [v for lo_hi in reversed(self.pads) for v in lo_hi]
        return F.pad(x, flat, mode="constant" if self.mode == "zeros" else self.mode)

    def index(self, n: int, lo: int, hi: int, device: torch.device) -> Tensor:
        """Source position of each padded position along one axis (``n``: a zero)."""
        pos = torch.arange(-lo, n + hi, device=device)
        if self.mode == "zeros":
            return torch.where((pos >= 0) & (pos < n), pos, n)
        if self.mode == "circular":
            return torch.remainder(pos, n)
        if self.mode == "replicate":
            return pos.clamp(0, n - 1)
        period = 2 * (n - 1)  # reflect without repeating the edge
        r = torch.remainder(pos, period) if period else torch.zeros_like(pos)
        return torch.where(r < n, r, period - r)

    def kernel(self, k: Any) -> Any:
        _single(self, k)
        self._check(k.shape1)
        full = k.is_full_spatial
        spatial = k.spatial_shape

        @overload
        def pad(t: Tensor, lead: int) -> Tensor: ...
        @overload
        def pad(t: Tensor | None, lead: int) -> Tensor | None: ...
        def pad(t: Tensor | None, lead: int) -> Tensor | None:
            if t is None:
                return None
            src = t
            for a, (n, (lo, hi)) in enumerate(zip(spatial, self.pads)):
                idx = self.index(n, lo, hi, t.device)
                dims = (lead + 2 * a, lead + 2 * a + 1) if full else (lead + a,)
                for dim in dims:
                    if self.mode == "zeros":  # one zero slice at index n
                        shape = list(t.shape)
                        shape[dim] = 1
                        t = torch.cat([t, t.new_zeros(shape)], dim)
                    t = t.index_select(dim, idx)
            out = alloc_like(src, t.shape)  # keep the record's memory order
            return out.copy_(t)

        lead = 1 if k.is_packed else 2
        ntk = k.ntk
        if ntk is not None:
            ntk = None if is_zero_ntk(ntk) else pad(ntk, lead)
        nngp = pad(k.nngp, lead)
        out_spatial = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, self.pads))

        def shape(s: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(s[:2]) + out_spatial

        return k.replace(
            nngp=nngp,
            ntk=zero_ntk(nngp) if k.ntk is not None and ntk is None else ntk,
            cov1=pad(k.cov1, 1),
            cov2=pad(k.cov2, 1),
            shape1=shape(k.shape1),
            shape2=shape(k.shape2),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelAffine(Layer):
    r"""Per-unit gain and bias ``y_c = g_c x_c + h_c`` of ``nn.LayerNorm(elementwise_affine)``.

    Initialised at ``g = 1``, ``h = 0`` (PyTorch's ``reset_parameters``), so the NNGP is
    unchanged. The gains and biases are trained like any parameter (standard
    parameterization: no width factor): unit ``c`` gains the tangent kernel
    ``x_c(x) x_c(x') + 1``. A following linear layer averages it over units, hence
    ``Theta' = Theta + K + [bias]`` (exact when a linear layer -- ``Dense``, ``Conv``,
    pooling, sums -- consumes the output; see :class:`NoNTK` otherwise).

    Args:
        axis: the unit axis (``-1`` for ``(N, features)``).
        bias: whether there is a bias ``h``.
    """

    axis: int = -1
    bias: bool = True

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        n = single_shape(in_shape, self)[self.axis]
        params = {"g": torch.ones(n, dtype=dtype, device=device)}
        if self.bias:
            params["h"] = torch.zeros(n, dtype=dtype, device=device)
        return in_shape, params

    def apply(self, params: Params, x: Any) -> Any:
        _single(self, x)
        y = x * params["g"]
        return y + params["h"] if "h" in params else y

    def kernel(self, k: Any) -> Any:
        _single(self, k)
        if k.ntk is None:
            return k
        ntk = k.nngp if is_zero_ntk(k.ntk) else k.ntk + k.nngp
        return k.replace(ntk=ntk + 1.0 if self.bias else ntk)


class NoNTK(Wrapper):
    """``layer`` whose NTK is refused (its NNGP passes): see the module docstring.

    Args:
        layer: the wrapped layer.
        reason: the error message when the NTK is asked for.
    """

    def __init__(self, layer: Layer, reason: str) -> None:
        self.layer, self.reason = layer, reason

    def __repr__(self) -> str:
        return repr(self.layer)

    def kernel(self, k: Any) -> Any:
        if k.ntk is not None:
            from infnets._src.convert.from_torch_registry import FromTorchError

            raise FromTorchError(self.reason)
        return self.layer.kernel(k)
