r"""Pooling and readout of convolutional activations, and their infinite-width kernels.

Pooling mixes positions: the pooled activation at ``p`` averages a window ``w(p)``,
so its covariance involves every pair of positions of the two windows,

``K'(p, p') = 1 / (|w(p)| |w(p')|) sum_{u in w(p), v in w(p')} K(u, v)``,

a box filter applied independently to *each* position of the pair (Novak et al.
2019, "Bayesian deep convolutional networks with many channels are Gaussian
processes", section 3.2; Arora et al. 2019, "On exact computation with an
infinitely wide neural net", global average pooling in the CNTK). These layers
therefore need the full pixel-pair covariance of their input, which every layer
declares through :meth:`~infnets._src.layers.base.Layer.spatial_requirement`.

``Flatten`` is the other readout: a following ``Dense`` sees all ``C P`` features,
so the kernel is the average over positions of the per-position covariances, and
only those are needed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from infnets._src.core import masking
from infnets._src.core.kernel import Kernel, spatial_diagonal
from infnets._src.core.protocol import Params, ShapeTree, single_shape
from infnets._src.layers.base import Layer
from infnets._src.spatial.conv import (
    AxisGeometry,
    _ints,
    axis_geometry,
    check_padding,
    check_spatial_rank,
    pad_input,
    scale_shift,
    window_sum,
)

__all__ = ["AvgPool", "SumPool", "GlobalAvgPool", "GlobalSumPool", "Flatten"]

_AVG_FNS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _single(layer: Layer, x: Any) -> None:
    if isinstance(x, list):
        raise ValueError(f"{layer!r} received {len(x)} branches; join them first.")


def _spatial(layer: Layer, shape: tuple[int, ...]) -> None:
    if len(shape) < 3 or len(shape) > 5:
        raise ValueError(
            f"{layer!r} takes convolutional inputs (N, C, *spatial) with 1 to 3 spatial axes, "
            f"got shape {tuple(shape)}."
        )


def _needs_full(layer: Layer, k: Kernel) -> None:
    if k.diagonal_spatial and math.prod(k.spatial_shape) > 1:
        raise ValueError(
            f"{layer!r} mixes positions and needs the full spatial covariance (every pair of "
            "positions) of its input, but the record keeps only per-position covariances. "
            "Call kernel_fn with diagonal_spatial=None (automatic) or False."
        )


def _lead(k: Kernel) -> int:
    return 1 if k.is_packed else 2


@dataclasses.dataclass(frozen=True, eq=False)
class _Pool(Layer):
    window_shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: str = "VALID"

    _average = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        ws = _ints(self.window_shape, name, "window_shape", None)
        object.__setattr__(self, "window_shape", ws)
        if self.strides is not None:
            object.__setattr__(self, "strides", _ints(self.strides, name, "strides", len(ws)))
        object.__setattr__(self, "padding", check_padding(self.padding, name, ("VALID", "SAME")))

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.window_shape)

    def geometry(self, spatial: tuple[int, ...]) -> list[AxisGeometry]:
        """Window geometry per spatial axis (strides default to the window: PyTorch's rule)."""
        strides = self.strides or self.window_shape
        return [
            axis_geometry(n, k, s, self.padding, repr(self), a)
            for a, (n, k, s) in enumerate(zip(spatial, self.window_shape, strides))
        ]

    def _divisors(self, geoms: list[AxisGeometry], like: Tensor) -> list[Tensor] | None:
        """Per-axis window sizes ``|w(p)|``, or ``None`` when every window counts ``k``."""
        return None

    def spatial_requirement(self, out_full: Any) -> Any:
        return True

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        shape = single_shape(in_shape, self)
        check_spatial_rank(len(shape), self.ndim, repr(self), shape)
        geoms = self.geometry(tuple(shape[2:]))
        return tuple(shape[:2]) + tuple(g.out for g in geoms), ()

    def apply(self, params: Params, x: Any) -> Any:
        _single(self, x)
        check_spatial_rank(x.ndim, self.ndim, repr(self), x.shape)
        masking.reject_mask(repr(self))
        geoms = self.geometry(tuple(x.shape[2:]))
        strides = tuple(g.s for g in geoms)
        y = _AVG_FNS[self.ndim](pad_input(x, geoms), self.window_shape, strides)
        div = self._divisors(geoms, x)
        if div is not None:  # average over the real (unpadded) positions only
            size = math.prod(self.window_shape)
            for a, d in enumerate(div):
                shape = [1] * y.ndim
                shape[2 + a] = -1
                y = y / d.reshape(shape)
            y = y * size
        elif not self._average:
            y = y * math.prod(self.window_shape)
        return y

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        _single(self, k)
        check_spatial_rank(len(k.shape1), self.ndim, repr(self), k.shape1)
        _needs_full(self, k)
        masking.reject_kernel_mask(k, repr(self))
        geoms = self.geometry(k.spatial_shape)
        full = k.is_full_spatial
        div = self._divisors(geoms, k.nngp)
        scale = None
        if self._average and div is None:
            scale = 1.0 / math.prod(self.window_shape) ** (2 if full else 1)

        def pool(t: Tensor | None, lead: int) -> Tensor | None:
            if t is None:
                return None
            given = t
            for a, g in enumerate(geoms):
                dims = (lead + 2 * a, lead + 2 * a + 1) if full else (lead + a,)
                for dim in dims:  # each position of the pair has its own window
                    t = window_sum(t, (dim,), g)
                    if div is not None:
                        shape = [1] * t.ndim
                        shape[dim] = -1
                        t = t / div[a].reshape(shape)
            if scale is not None:
                t = scale_shift(t, scale, None, t is not given)  # never the input in place
            return t

        out_spatial = tuple(g.out for g in geoms)

        def shape(s: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(s[:2]) + out_spatial

        return k.replace(
            nngp=pool(k.nngp, _lead(k)),
            ntk=pool(k.ntk, _lead(k)),
            cov1=pool(k.cov1, 1),
            cov2=pool(k.cov2, 1),
            shape1=shape(k.shape1),
            shape2=shape(k.shape2),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class AvgPool(_Pool):
    r"""Average pooling over windows, like ``torch.nn.AvgPool1d/2d/3d``.

    ``y[c, p] = 1 / |w| sum_{u in w(p)} x_pad[c, u]`` with zero padding counted in the
    average (``count_include_pad=True``, PyTorch's default) unless
    ``count_include_pad=False``. Kernel: the box filter of both positions,
    ``K'(p, p') = 1 / (|w(p)| |w(p')|) sum_{u in w(p), v in w(p')} K(u, v)`` (Novak et
    al. 2019, section 3.2), which needs the full pixel-pair covariance.

    Args:
        window_shape: window size per spatial axis, e.g. ``(2, 2)``.
        strides: step per spatial axis; default the window (PyTorch's rule).
        padding: ``'VALID'`` or ``'SAME'`` (output ``ceil(n / s)``, TensorFlow's split).
        count_include_pad: divide by the full window size (``True``) or by the number
            of real positions in it (``False``).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (3,), padding='SAME'), stax.AvgPool((2,)),
        ...                   stax.Flatten(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(3, 1, 6), None, 'nngp').shape
        torch.Size([3, 3])
    """

    count_include_pad: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.count_include_pad, bool):
            raise TypeError(
                f"AvgPool: count_include_pad must be a bool, got {self.count_include_pad!r}."
            )

    def _divisors(self, geoms: list[AxisGeometry], like: Tensor) -> list[Tensor] | None:
        if self.count_include_pad or all(g.lo == 0 and g.hi == 0 for g in geoms):
            return None
        out = []
        for g in geoms:
            ones = torch.ones(g.n, dtype=like.dtype, device=like.device)
            out.append(window_sum(ones, (0,), g))
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class SumPool(_Pool):
    r"""Sum over windows: ``y[c, p] = sum_{u in w(p)} x_pad[c, u]``.

    Kernel: ``K'(p, p') = sum_{u in w(p), v in w(p')} K(u, v)``, the unnormalised box
    filter of both positions; needs the full pixel-pair covariance.

    Args:
        window_shape: window size per spatial axis.
        strides: step per spatial axis; default the window.
        padding: ``'VALID'`` or ``'SAME'``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (2, 2)), stax.SumPool((2, 2)), stax.Flatten())
        >>> net.kernel_fn(torch.ones(2, 1, 3, 3), None, 'nngp').shape
        torch.Size([2, 2])
    """

    _average = False


# ------------------------------------------------------------ global readouts
@overload
def _global_reduce(t: Tensor, lead: int, mean: bool) -> Tensor: ...
@overload
def _global_reduce(t: Tensor | None, lead: int, mean: bool) -> Tensor | None: ...
def _global_reduce(t: Tensor | None, lead: int, mean: bool) -> Tensor | None:
    if t is None:
        return None
    dims = tuple(range(lead, t.ndim))
    if not dims:
        return t
    return t.mean(dim=dims) if mean else t.sum(dim=dims)


@dataclasses.dataclass(frozen=True, eq=False)
class _GlobalPool(Layer):
    _mean = True

    def spatial_requirement(self, out_full: Any) -> Any:
        return True

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        shape = single_shape(in_shape, self)
        _spatial(self, shape)
        return tuple(shape[:2]), ()

    def apply(self, params: Params, x: Any) -> Any:
        _single(self, x)
        _spatial(self, x.shape)
        dims = tuple(range(2, x.ndim))
        mask = masking.current_mask(x, repr(self))
        if mask is not None:  # real positions only: sum, or mean over the example's count
            keep = (~mask).unsqueeze(1).to(x.dtype)
            total = (x * keep).sum(dim=dims)
            return total / keep.sum(dim=dims).clamp(min=1) if self._mean else total
        return x.mean(dim=dims) if self._mean else x.sum(dim=dims)

    def kernel(self, k: Any) -> Any:
        _single(self, k)
        _spatial(self, k.shape1)
        _needs_full(self, k)
        if k.mask1 is not None or k.mask2 is not None:
            return _masked_global(k, self._mean)
        lead = _lead(k)
        return k.replace(
            nngp=_global_reduce(k.nngp, lead, self._mean),
            ntk=_global_reduce(k.ntk, lead, self._mean),
            cov1=_global_reduce(k.cov1, 1, self._mean),
            cov2=_global_reduce(k.cov2, 1, self._mean),
            shape1=tuple(k.shape1[:2]),
            shape2=tuple(k.shape2[:2]),
            diagonal_spatial=False,
        )


def _masked_global(k: Kernel, mean: bool) -> Kernel:
    """Global pooling over the real positions: ``K' = sum_{p, p' real} K(p, p') / (n n')``
    with ``n``, ``n'`` the examples' real position counts (``1`` for sums)."""
    keeps = masking.pair_keep(k)
    assert keeps is not None  # only masked records come here
    keep1, keep2 = keeps
    own = masking.own_keep(k, 1)
    own2 = None if k.cov2 is None else masking.own_keep(k, 2)
    lead = _lead(k)

    def red(t: Tensor | None, ka: Tensor, kb: Tensor, n: int) -> Tensor | None:
        if t is None:
            return None
        total = _global_reduce(t * (ka * kb), n, False)
        if not mean:
            return total
        ca = _global_reduce(ka.expand(t.shape[:n] + ka.shape[n:]), n, False)
        cb = _global_reduce(kb.expand(t.shape[:n] + kb.shape[n:]), n, False)
        return total / (ca.clamp(min=1) * cb.clamp(min=1))

    return k.replace(
        nngp=red(k.nngp, keep1, keep2, lead),
        ntk=red(k.ntk, keep1, keep2, lead),
        cov1=red(k.cov1, own[0], own[1], 1),  # type: ignore[index]
        cov2=None if k.cov2 is None else red(k.cov2, own2[0], own2[1], 1),  # type: ignore[index]
        shape1=tuple(k.shape1[:2]),
        shape2=tuple(k.shape2[:2]),
        diagonal_spatial=False,
        mask1=None,
        mask2=None,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class GlobalAvgPool(_GlobalPool):
    r"""Average over every position: ``(N, C, *spatial) -> (N, C)``.

    ``K' = 1 / P^2 sum_{p, p'} K(p, p')`` for ``P`` positions (and the same for the
    NTK): the mean of the full pixel-pair covariance (Novak et al. 2019, eq. 15;
    Arora et al. 2019, CNTK with global average pooling).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (2, 2)), stax.Relu(), stax.GlobalAvgPool(),
        ...                   stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 3, 4, 4), None, 'ntk').shape
        torch.Size([2, 2])
    """


@dataclasses.dataclass(frozen=True, eq=False)
class GlobalSumPool(_GlobalPool):
    r"""Sum over every position: ``(N, C, *spatial) -> (N, C)``; ``K' = sum_{p, p'} K(p, p')``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (2,)), stax.GlobalSumPool())
        >>> net.kernel_fn(torch.ones(2, 1, 5), None, 'nngp').shape
        torch.Size([2, 2])
    """

    _mean = False


@dataclasses.dataclass(frozen=True, eq=False)
class Flatten(Layer):
    r"""Flatten ``(N, C, *spatial)`` to ``(N, C P)`` features (``x.reshape(N, -1)``).

    A following ``Dense`` layer weighs all ``C P`` features alike with variance
    ``W_std^2 / (C P)``, so the kernel it sees is the average over positions of the
    per-position covariances, ``K' = 1 / P sum_p K(p, p)`` (Novak et al. 2019,
    eq. 14): only the diagonal is needed, ``O(N1 N2 P)`` memory. The flattened
    features are not identically distributed, so a nonlinearity cannot follow
    ``Flatten`` directly (apply it before, or put a ``Dense`` in between).
    Fully-connected ``(N, features)`` inputs pass unchanged.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(),
        ...                   stax.Flatten(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 1, 4, 4), None, 'nngp').shape
        torch.Size([2, 2])
    """

    def spatial_requirement(self, out_full: Any) -> Any:
        return False

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        shape = single_shape(in_shape, self)
        if len(shape) <= 2:
            return tuple(shape), ()
        return (shape[0], math.prod(shape[1:])), ()

    def apply(self, params: Params, x: Any) -> Any:
        _single(self, x)
        mask = masking.current_mask(x, repr(self))
        if mask is not None:  # padded positions' features are zero
            x = x * (~mask).unsqueeze(1).to(x.dtype)
        return x if x.ndim <= 2 else x.reshape(x.shape[0], -1)

    def kernel(self, k: Any) -> Any:
        _single(self, k)
        if not k.is_spatial:
            return k
        lead = _lead(k)
        pair_keep = masking.pair_keep(k)
        if pair_keep is not None:  # zero every covariance of a padded position
            k = masking.remask(k)

        def flat(t: Tensor | None, n: int) -> Tensor | None:
            if t is None:
                return None
            if k.is_full_spatial:
                t = spatial_diagonal(t, n)
            return _global_reduce(t, n, True)

        positions = math.prod(k.spatial_shape)
        return k.replace(
            nngp=flat(k.nngp, lead),
            ntk=flat(k.ntk, lead),
            cov1=flat(k.cov1, 1),
            cov2=flat(k.cov2, 1),
            shape1=(k.shape1[0], math.prod(k.shape1[1:])),
            shape2=(k.shape2[0], math.prod(k.shape2[1:])),
            is_gaussian=k.is_gaussian and positions == 1,
            diagonal_spatial=False,
            mask1=None,
            mask2=None,
        )
