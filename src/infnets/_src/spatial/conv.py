r"""Convolutions of infinitely many channels: the CNN-GP and CNTK layer.

Activations have PyTorch's layout ``(N, C, *spatial)`` with ``d = 1, 2, 3`` spatial
axes; the channels ``C`` are the axis taken to infinity. A convolution with
i.i.d. weights ``W[o, c, f] ~ N(0, 1)`` over a filter ``F`` of ``|F|`` offsets,

``y[o, p] = W_std / sqrt(C |F|) sum_{c, f} W[o, c, f] x_pad[c, s p + f] + b_std b[o]``,

gives, for every pair of positions ``(p, p')`` (Novak et al. 2019, "Bayesian deep
convolutional networks with many channels are Gaussian processes", eq. 7;
Garriga-Alonso et al. 2019, "Deep convolutional networks as shallow Gaussian
processes"):

``K'(p, p') = W_std^2 / |F| sum_{f in F} K(s p + f, s p' + f) + b_std^2``,

a sum along the *diagonal* of each ``(s_a, s_a')`` pair of axes (the same offset
``f`` on both positions, since the weights are shared and independent across
offsets). It is separable over spatial axes, so it is computed one axis pair at a
time as ``k_a`` shifted, strided slices added in place (no padded copy). On
per-position covariances (``p = p'``) it is the ``|F|``-window average of the
variances: the diagonal maps to the diagonal exactly. The NTK follows Arora et
al. 2019 ("On exact computation with an infinitely wide neural net", eq. 7-8):
``Theta' = K' + W_std^2 / |F| sum_f Theta(s p + f, s p' + f)`` in the NTK
parameterization.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core import safe_math as sm
from infnets._src.core.kernel import Kernel, alloc_like, is_zero_ntk
from infnets._src.core.protocol import Params, ShapeTree
from infnets._src.evaluate import compiled
from infnets._src.layers.base import Layer
from infnets._src.layers.dense import check_parameterization

__all__ = [
    "Conv",
    "AxisGeometry",
    "axis_geometry",
    "window_sum",
    "conv_covariance",
    "pad_input",
    "PADDINGS",
]

PADDINGS = ("VALID", "SAME", "CIRCULAR")

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ------------------------------------------------------------------ geometry
@dataclasses.dataclass(frozen=True)
class AxisGeometry:
    """A window sliding along one spatial axis.

    Attributes:
        n: input size. k: window (filter) size. s: stride.
        lo, hi: zeros (or wrapped values) added before / after the input.
        out: output size ``(n + lo + hi - k) // s + 1``.
        circular: wrap around instead of zero padding.
    """

    n: int
    k: int
    s: int
    lo: int
    hi: int
    out: int
    circular: bool

    @property
    def is_identity(self) -> bool:
        """A 1-wide window with stride 1 and no padding leaves the axis unchanged."""
        return self.k == 1 and self.s == 1 and self.lo == 0 and self.hi == 0


def axis_geometry(n: int, k: int, s: int, padding: str, who: str, axis: int) -> AxisGeometry:
    """The window geometry of one axis; PyTorch's output sizes for each padding.

    * ``'VALID'``: no padding, ``out = (n - k) // s + 1`` (``nn.Conv2d(padding=0)``);
    * ``'SAME'``: ``out = ceil(n / s)``, padding ``max((out - 1) s + k - n, 0)`` split
      as ``lo = total // 2`` before and the rest after (``nn.Conv2d(padding='same')``
      for stride 1, TensorFlow's rule for larger strides);
    * ``'CIRCULAR'``: the ``'SAME'`` sizes with wrapped values
      (``padding_mode='circular'``).

    Args:
        n, k, s: input size, window size, stride (positive).
        padding: one of :data:`PADDINGS`.
        who: layer name for errors.
        axis: spatial axis index (0-based) for errors.

    Returns:
        The :class:`AxisGeometry`.

    Raises:
        ValueError: the window does not fit a ``'VALID'`` input (empty output).

    Examples:
        >>> g = axis_geometry(8, 3, 2, 'SAME', 'Conv', 0)
        >>> g.out, g.lo, g.hi
        (4, 0, 1)
    """
    if padding == "VALID":
        if n < k:
            raise ValueError(
                f"{who}: the window of size {k} is larger than the input (size {n}) along "
                f"spatial axis {axis} with padding='VALID', which would reduce that axis to "
                "zero positions; use padding='SAME' or a smaller window."
            )
        return AxisGeometry(n, k, s, 0, 0, (n - k) // s + 1, False)
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    lo = total // 2
    return AxisGeometry(n, k, s, lo, total - lo, out, padding == "CIRCULAR")


def _ints(value: Any, who: str, name: str, nd: int | None) -> tuple[int, ...]:
    if isinstance(value, (int, bool)) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(
            f"{who}: {name} must be a tuple of ints, one per spatial axis (e.g. (3, 3)), "
            f"got {value!r}."
        )
    out = tuple(_inputs.check_int(v, f"{who}: {name}", 1) for v in value)
    if nd is not None and len(out) != nd:
        raise ValueError(
            f"{who}: {name} {out} has {len(out)} entries but the window has {nd} spatial axes."
        )
    if len(out) > 3:
        raise ValueError(f"{who}: {name} {out}: only 1, 2 or 3 spatial axes are supported.")
    return out


def check_padding(padding: Any, who: str, allowed: Sequence[str] = PADDINGS) -> str:
    """Normalise a padding name (case-insensitive) and check it is one of ``allowed``."""
    if not isinstance(padding, str) or padding.upper() not in allowed:
        raise ValueError(f"{who}: padding must be one of {tuple(allowed)}, got {padding!r}.")
    return padding.upper()


def check_spatial_rank(ndim: int, nd: int, who: str, shape: Any) -> None:
    """Require ``(N, C, *spatial)`` with exactly ``nd`` spatial axes."""
    if ndim != nd + 2:
        names = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[nd]
        raise ValueError(
            f"{who} takes inputs of shape {names} ({nd} spatial axes, channels on axis 1), "
            f"got shape {tuple(shape)}."
        )


# ------------------------------------------------------- covariance windows
def _range(g: AxisGeometry, f: int) -> tuple[int, int]:
    """Outputs ``[o0, o1)`` whose window offset ``f`` lands inside the (unpadded) input."""
    o0 = max(0, -((f - g.lo) // g.s)) if f < g.lo else 0
    o1 = min(g.out, (g.n - 1 + g.lo - f) // g.s + 1)
    return o0, max(o0, o1)


def window_sum(
    t: Tensor,
    dims: Sequence[int],
    g: AxisGeometry,
    scale: float | None = None,
    shift: float | Tensor | None = None,
) -> Tensor:
    r"""Window sums along ``dims``, all shifted by the same offset.

    ``out[.., o, .., o', ..] = shift + scale sum_{f < k} t_pad[.., s o + f, .., s o' + f, ..]``
    where ``t_pad`` is ``t`` padded by ``(lo, hi)`` zeros (or wrapped) on each of
    ``dims``. With two dims (an interleaved ``(s_a, s_a')`` pair) this is the
    convolution of a full spatial covariance; with one dim the box sum of pooling
    or of per-position variances. Each offset is one pass over the output (an
    in-place add of a shifted, strided slice, no padded copy); ``scale`` and
    ``shift`` (a number, or a tensor of the output's shape) are fused into them.

    Args:
        t: tensor whose ``dims`` have size ``g.n``.
        dims: the axes to slide along together.
        g: the window geometry.
        scale: a number multiplying the sum (``None``: 1).
        shift: added to the result (``None``: nothing).

    Returns:
        A new tensor with ``dims`` of size ``g.out``, stored in ``t``'s memory order
        (``t`` itself for an identity window without scale and shift).

    Examples:
        >>> g = axis_geometry(3, 2, 1, 'VALID', 'Conv', 0)
        >>> window_sum(torch.arange(9.0).reshape(3, 3), (0, 1), g)  # t[o, o'] + t[o+1, o'+1]
        tensor([[ 4.,  6.],
                [10., 12.]])
    """
    dims = tuple(d % t.ndim for d in dims)
    alpha = 1.0 if scale is None else scale
    shape = list(t.shape)
    for dim in dims:
        shape[dim] = g.out

    def start(first: Tensor | None) -> Tensor:
        """The output initialised with ``shift + scale * first`` (or ``shift``)."""
        out = alloc_like(t, shape)
        if first is None:
            if isinstance(shift, Tensor):
                return out.copy_(shift)
            return out.fill_(0.0 if shift is None else shift)
        if shift is None:
            return torch.mul(first, alpha, out=out) if scale is not None else out.copy_(first)
        base = shift if isinstance(shift, Tensor) else first.new_tensor(shift)
        return torch.add(base, first, alpha=alpha, out=out)

    if g.is_identity:
        return t if scale is None and shift is None else start(t)
    if g.circular:
        base = torch.arange(g.out, device=t.device) * g.s - g.lo
        out = None
        for f in range(g.k):
            idx = torch.remainder(base + f, g.n)
            v = t
            for dim in dims:
                v = v.index_select(dim, idx)
            out = start(v) if out is None else out.add_(v, alpha=alpha)
        return out  # type: ignore[return-value]

    def box(bounds: Sequence[tuple[int, int]], f: int) -> tuple[tuple[slice, ...], ...]:
        """Output slices of the box ``bounds`` (one range per dim) and offset ``f``'s source."""
        dst = [slice(None)] * t.ndim
        src = [slice(None)] * t.ndim
        for dim, (o0, o1) in zip(dims, bounds):
            begin = g.s * o0 + f - g.lo
            dst[dim] = slice(o0, o1)
            src[dim] = slice(begin, begin + g.s * (o1 - o0 - 1) + 1, g.s)
        return tuple(dst), tuple(src)

    def sl(o0: int, o1: int, f: int) -> tuple[tuple[slice, ...], ...]:
        return box([(o0, o1)] * len(dims), f)

    ranges = [_range(g, f) for f in range(g.k)]
    full = [f for f, (o0, o1) in enumerate(ranges) if o0 == 0 and o1 == g.out]
    first = full[0] if full else -1
    others = [f for f, (o0, o1) in enumerate(ranges) if f != first and o1 > o0]
    if full and others and scale is None and shift is None and not sm.needs_grad(t):
        # plain sums: the first two offsets in one pass, out = t_first + t_second on the
        # second's range, t_first alone on the rest (thin slabs at the borders)
        out = alloc_like(t, shape)
        second, others = others[0], others[1:]
        o0, o1 = ranges[second]
        dst, src = sl(o0, o1, second)
        torch.add(t[sl(o0, o1, first)[1]], t[src], out=out[dst])
        for i in range(len(dims)):
            for lo_hi in ((0, o0), (o1, g.out)):
                if lo_hi[0] >= lo_hi[1]:
                    continue
                bounds = [(o0, o1)] * i + [lo_hi] + [(0, g.out)] * (len(dims) - i - 1)
                slab_dst, slab_src = box(bounds, first)
                out[slab_dst] = t[slab_src]
    else:
        out = start(t[sl(0, g.out, first)[1]] if full else None)
    for f in others:
        dst, src = sl(*ranges[f], f)
        out[dst].add_(t[src], alpha=alpha)
    return out


def conv_covariance(
    t: Tensor,
    lead: int,
    full: bool,
    geoms: Sequence[AxisGeometry],
    scale: float | None = None,
    shift: float | Tensor | None = None,
) -> Tensor:
    """``shift + scale sum_f t(s p + f, s p' + f)`` over a filter, full or per-position.

    Args:
        t: ``(*B, s_1, s_1', ..., s_d, s_d')`` (``full``) or ``(*B, s_1, ..., s_d)``.
        lead: ``len(B)`` (2 for dense pairs, 1 for packed pairs or variances).
        full: interleaved pixel-pair layout.
        geoms: one :class:`AxisGeometry` per spatial axis.
        scale: a number multiplying the sum (``None``: 1), fused into the last axis.
        shift: a number or a tensor of the output's shape added to the result.

    Returns:
        The convolved covariance in the same layout and memory order.

    Examples:
        >>> g = axis_geometry(4, 3, 1, 'SAME', 'Conv', 0)
        >>> conv_covariance(torch.ones(1, 4, 4), 1, True, [g], scale=1 / 3)[0, 0]
        tensor([0.6667, 0.6667, 0.6667, 0.3333])
    """
    active = [a for a, g in enumerate(geoms) if not g.is_identity] or [len(geoms) - 1]
    last = active[-1]
    for a, g in enumerate(geoms):
        if a not in active:
            continue
        dims = (lead + 2 * a, lead + 2 * a + 1) if full else (lead + a,)
        if a == last:
            t = window_sum(t, dims, g, scale, shift)
        else:
            t = window_sum(t, dims, g)
    return t


def pad_input(x: Tensor, geoms: Sequence[AxisGeometry]) -> Tensor:
    """Pad the spatial axes of activations as ``geoms`` say (the finite networks).

    Args:
        x: ``(N, C, *spatial)`` activations.
        geoms: one :class:`AxisGeometry` per spatial axis.

    Returns:
        ``(N, C, *padded)``: zeros, or wrapped values for ``'CIRCULAR'``.

    Examples:
        >>> g = axis_geometry(3, 3, 1, 'CIRCULAR', 'Conv', 0)
        >>> pad_input(torch.tensor([[[1.0, 2.0, 3.0]]]), [g])
        tensor([[[3., 1., 2., 3., 1.]]])
    """
    nd = len(geoms)
    if any(g.circular and (g.lo or g.hi) for g in geoms):
        for a, g in enumerate(geoms):
            if g.lo or g.hi:
                idx = torch.remainder(torch.arange(-g.lo, g.n + g.hi, device=x.device), g.n)
                x = x.index_select(2 + a, idx)
        return x
    pads: list[int] = []
    for g in reversed(geoms):
        pads += [g.lo, g.hi]
    if any(pads):
        x = F.pad(x, pads)
    assert x.ndim == nd + 2
    return x


def scale_shift(t: Tensor, scale: Any, shift: Any, fresh: bool) -> Tensor:
    """``t * scale + shift`` (``shift`` may be ``None``), in place when ``t`` is a temporary.

    Args:
        t: a tensor. scale, shift: numbers or broadcastable tensors.
        fresh: ``t`` is a temporary that may be overwritten (ignored under autograd).

    Returns:
        The result (``t`` itself when computed in place).
    """
    if fresh and not sm.needs_grad(t, scale, shift):
        t = t.mul_(scale)
        return t if shift is None else t.add_(shift)
    t = t * scale
    return t if shift is None else t + shift


# ---------------------------------------------------------------------- Conv
@dataclasses.dataclass(frozen=True, eq=False)
class ConvFields(Layer):
    """The arguments ``Conv``, ``ConvTranspose`` and ``ConvLocal`` share, checked once.

    Error messages name the concrete layer (``Conv: out_chan ...``).
    """

    out_chan: int
    filter_shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: str = "VALID"
    W_std: float = 1.0
    b_std: float | None = None
    parameterization: str = "ntk"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _inputs.check_int(self.out_chan, f"{name}: out_chan", 1)
        fs = _ints(self.filter_shape, name, "filter_shape", None)
        object.__setattr__(self, "filter_shape", fs)
        if self.strides is not None:
            object.__setattr__(self, "strides", _ints(self.strides, name, "strides", len(fs)))
        object.__setattr__(self, "padding", check_padding(self.padding, name))
        object.__setattr__(self, "W_std", _inputs.check_std(self.W_std, f"{name}: W_std"))
        object.__setattr__(
            self, "b_std", _inputs.check_std(self.b_std, f"{name}: b_std", allow_none=True)
        )
        check_parameterization(self.parameterization, name)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.filter_shape)

    def input_channels(self, in_shape: ShapeTree) -> tuple[int, int, tuple[int, ...]]:
        """``(N, C_in, spatial)`` of a finite input shape ``(N, C_in, *spatial)``, checked."""
        if isinstance(in_shape, list):
            raise ValueError(f"{self!r} received {len(in_shape)} branches; join them first.")
        check_spatial_rank(len(in_shape), self.ndim, repr(self), in_shape)
        c_in = in_shape[1]
        if c_in <= 0:
            raise ValueError(f"{self!r}: input shape {in_shape} needs a positive channel axis.")
        return in_shape[0], c_in, tuple(in_shape[2:])

    def affine_covariances(
        self, k: Kernel, lin: Callable[[Tensor, int], Tensor]
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(nngp, ntk, cov1, cov2)`` after this layer, given its position map.

        ``lin(t, n)`` applies the layer's (linear) map of positions, a sum over the ``|F|``
        filter offsets, to a covariance with ``n`` leading example axes. With
        ``w = W_std^2 / |F|`` and ``b = b_std^2``: ``K' = w lin(K) + b`` and, in the NTK
        parameterization, ``Theta' = K' + w lin(Theta)``; in the standard one
        ``Theta' = lin(n_in K + w Theta) + [bias]`` (Jacot et al. 2018; Park et al. 2019).
        """
        lead = 1 if k.is_packed else 2
        w2 = float(self.W_std) ** 2 / math.prod(self.filter_shape)
        b2 = None if self.b_std is None else float(self.b_std) ** 2

        def affine(t: Tensor, n: int) -> Tensor:
            out = lin(t, n) * w2
            return out if b2 is None else out + b2

        nngp = affine(k.nngp, lead)
        ntk = k.ntk
        if ntk is not None:
            if self.parameterization == "ntk":
                ntk = nngp + w2 * lin(ntk, lead)
            else:
                ntk = lin(k.width * k.nngp + w2 * ntk, lead)
                if self.b_std is not None:
                    ntk = ntk + 1.0
        cov2 = None if k.cov2 is None else affine(k.cov2, 1)
        return nngp, ntk, affine(k.cov1, 1), cov2

    def affine_output(
        self,
        k: Kernel,
        out_spatial: Sequence[int],
        covariances: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
        **changes: Any,
    ) -> Kernel:
        """The record after this layer: new covariances, ``out_chan`` channels on the new
        positions, Gaussian and centred (an affine layer's output), plus ``changes``."""
        nngp, ntk, cov1, cov2 = covariances

        def shape(s: tuple[int, ...]) -> tuple[int, ...]:
            return (s[0], self.out_chan) + tuple(out_spatial)

        return k.replace(
            nngp=nngp,
            ntk=ntk,
            cov1=cov1,
            cov2=cov2,
            shape1=shape(k.shape1),
            shape2=shape(k.shape2),
            is_gaussian=True,
            last_affine=object(),
            centred=True,
            **changes,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Conv(ConvFields):
    r"""Convolution over 1, 2 or 3 spatial axes, like ``torch.nn.Conv1d/2d/3d``.

    With ``C`` input channels and fan-in ``n = C prod(filter_shape)``:

    * ``'ntk'`` parameterization: ``y = W_std / sqrt(n) conv(x, W) + b_std b`` with
      ``W[o, c, *f], b[o] ~ N(0, 1)``;
    * ``'standard'``: ``y = conv(x, W) + b`` with ``W ~ N(0, W_std^2 / n)``,
      ``b ~ N(0, b_std^2)``.

    Infinite-width kernels (channels to infinity; Novak et al. 2019; Garriga-Alonso
    et al. 2019; Arora et al. 2019), with ``A(K)(p, p') = sum_f K(s p + f, s p' + f)``
    over the ``|F|`` filter offsets on the padded input:

    * NNGP: ``K' = W_std^2 / |F| A(K) + b_std^2``;
    * NTK, ``'ntk'``: ``Theta' = W_std^2 / |F| A(K + Theta) + b_std^2``;
    * NTK, ``'standard'``: ``Theta' = A(C K + W_std^2 / |F| Theta) + [b_std is not None]``.

    On per-position covariances ``A`` is a window sum of the variances, so stacks
    of ``Conv`` and nonlinearities ending in ``Flatten`` never need pixel pairs.

    Args:
        out_chan: output channels (the width of this layer).
        filter_shape: filter size per spatial axis, e.g. ``(3, 3)``; its length is
            the number of spatial axes (1, 2 or 3).
        strides: stride per spatial axis (default all 1).
        padding: ``'VALID'`` (no padding), ``'SAME'`` (output size ``ceil(n / s)``, zero
            padding split as ``nn.Conv2d(padding='same')``) or ``'CIRCULAR'`` (same
            sizes, wrapped values).
        W_std: weight standard deviation, >= 0.
        b_std: bias standard deviation, >= 0; ``None`` for no bias.
        parameterization: ``'ntk'`` or ``'standard'``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(8, (3, 3), padding='SAME'), stax.Relu(),
        ...                   stax.GlobalAvgPool(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 1, 4, 4), None, 'ntk').shape
        torch.Size([2, 2])
    """

    # --------------------------------------------------------------- helpers
    def geometry(self, spatial: Sequence[int]) -> list[AxisGeometry]:
        """Window geometry of each spatial axis for inputs of spatial shape ``spatial``."""
        strides = self.strides or (1,) * self.ndim
        return [
            axis_geometry(n, k, s, self.padding, repr(self), a)
            for a, (n, k, s) in enumerate(zip(spatial, self.filter_shape, strides))
        ]

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        n, c_in, spatial = self.input_channels(in_shape)
        geoms = self.geometry(spatial)
        n_in = c_in * math.prod(self.filter_shape)
        w = torch.randn(
            (self.out_chan, c_in) + self.filter_shape, generator=gen, dtype=dtype, device=device
        )
        params: dict[str, Tensor] = {}
        if self.parameterization == "standard":
            w = w * (float(self.W_std) / math.sqrt(n_in))
        params["W"] = w
        if self.b_std is not None:
            b = torch.randn((self.out_chan,), generator=gen, dtype=dtype, device=device)
            if self.parameterization == "standard":
                b = b * float(self.b_std)
            params["b"] = b
        out = (n, self.out_chan) + tuple(g.out for g in geoms)
        return out, params

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        _inputs.recheck_stds(self, ("W_std", "b_std"), "Conv")
        check_spatial_rank(x.ndim, self.ndim, repr(self), x.shape)
        geoms = self.geometry(x.shape[2:])
        if not all(g.is_identity for g in geoms):  # padded positions would leak
            from infnets._src.core.masking import reject_mask

            reject_mask(repr(self), "mixes neighbouring positions (filter or stride > 1)")
        w = params["W"]
        y = _CONV_FNS[self.ndim](pad_input(x, geoms), w, stride=self.strides or 1)
        bias_shape = (1, -1) + (1,) * self.ndim
        if self.parameterization == "ntk":
            y = y * (self.W_std / math.sqrt(w[0].numel()))
            if "b" in params:
                y = y + self.b_std * params["b"].reshape(bias_shape)
        elif "b" in params:
            y = y + params["b"].reshape(bias_shape)
        return y

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        _inputs.recheck_stds(self, ("W_std", "b_std"), "Conv")
        check_spatial_rank(len(k.shape1), self.ndim, repr(self), k.shape1)
        geoms = self.geometry(k.spatial_shape)
        if not all(g.is_identity for g in geoms):
            from infnets._src.core.masking import reject_kernel_mask

            reject_kernel_mask(k, repr(self), "mixes neighbouring positions (filter or stride > 1)")
        full = k.is_full_spatial
        lead = 1 if k.is_packed else 2
        size = math.prod(self.filter_shape)
        w2 = self.W_std**2
        b2 = None if self.b_std is None else self.b_std**2
        w2f = w2 / size
        one = None if self.b_std is None else 1.0
        c_in = k.width
        standard = self.parameterization == "standard"
        fused = not (
            sm.needs_grad(k.nngp, k.ntk, k.cov1, k.cov2)
            or isinstance(self.W_std, Tensor)
            or isinstance(self.b_std, Tensor)
        )

        def a(t: Tensor, n: int = lead, scale: Any = None, shift: Any = None) -> Tensor:
            if fused:  # scale and shift folded into the window sums, memory order kept
                return conv_covariance(t, n, full, geoms, scale, shift)
            t = conv_covariance(t, n, full, geoms)
            t = t if scale is None else t * scale
            return t if shift is None else t + shift

        # raw inputs (or layers without parameters before this one): Theta = 0, so the
        # NTK is K' (NTK parameterization) or A(C K) + [bias] (standard), no A(Theta)
        zero = is_zero_ntk(k.ntk)
        done = None
        if fused and not standard and compiled.supports(geoms) and compiled.enabled(k.nngp):
            done = compiled.conv_pair(k.nngp, None if zero else k.ntk, lead, full, geoms, w2f, b2)
        if done is not None:
            nngp, ntk = done
            if zero:
                ntk = nngp  # Theta' = K' (layers never write their inputs in place)
        else:
            nngp = a(k.nngp, scale=w2f, shift=b2)
            ntk = k.ntk
        if ntk is not None and done is None:
            if standard:  # A(C K + W^2/|F| Theta) + [bias]
                base = a(k.nngp, scale=float(c_in), shift=one)
                ntk = base if zero else a(ntk, scale=w2f, shift=base)
            else:  # K' + W^2/|F| A(Theta)
                ntk = nngp if zero else a(ntk, scale=w2f, shift=nngp)

        def own(t: Tensor) -> Tensor:  # per-example covariances
            if done is not None and compiled.enabled(t, per_example=True):
                out = compiled.conv_pair(t, None, 1, full, geoms, w2f, b2)
                if out is not None:
                    return out[0]
            return a(t, 1, w2f, b2)

        cov1 = own(k.cov1)
        cov2 = None if k.cov2 is None else own(k.cov2)
        return self.affine_output(k, [g.out for g in geoms], (nngp, ntk, cov1, cov2))
