"""Combinators: composing layers in series and in parallel branches.

Branches created by :func:`FanOut` are independent at initialisation (their
weights are drawn independently), so in the infinite-width limit the covariance
of a sum of branches is the sum of their covariances, the covariance of a product
is the product of covariances, and a concatenation along the channel axis is the
width-weighted average (a following affine layer sums over all channels). See
Novak et al. 2020, "Neural Tangents: Fast and Easy Infinite Neural Networks in
Python" (arXiv 1912.02803), and Yang 2019 (arXiv 1902.04760) for the general
tensor-program argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import FusedStep, Params, ShapeTree
from infnets._src.layers.base import Layer, adapt_spatial, as_layer_list

__all__ = [
    "serial",
    "parallel",
    "FanOut",
    "FanInSum",
    "FanInConcat",
    "FanInProd",
    "Identity",
    "Serial",
    "Parallel",
]


class Serial(Layer):
    """Layers applied one after the other (see :func:`serial`)."""

    def __init__(self, *layers: Layer) -> None:
        self.layers = tuple(as_layer_list(layers, "serial"))

    def __repr__(self) -> str:
        return "serial(" + ", ".join(map(repr, self.layers)) + ")"

    def sublayers(self) -> tuple[Layer, ...]:
        return self.layers

    def fused_steps(self) -> list[FusedStep] | None:
        steps: list[FusedStep] = []
        for layer in self.layers:
            own = layer.fused_steps()
            if own is None:
                return None
            steps.extend(own)
        return steps

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        params = []
        shape = in_shape
        for layer in self.layers:
            shape, p = layer.init(gen, shape, dtype, device)
            params.append(p)
        return shape, tuple(params)

    def apply(self, params: Params, x: Any) -> Any:
        for layer, p in zip(self.layers, params):
            x = layer.apply(p, x)
        return x

    def kernel(self, k: Any) -> Any:
        return self.kernel_planned(k, True)

    def _needs(self, out_full: Any) -> list[Any]:
        """What the output of each layer must keep, from the last layer backwards."""
        outs = [out_full] * len(self.layers)
        for i in range(len(self.layers) - 1, 0, -1):
            outs[i - 1] = self.layers[i].spatial_requirement(outs[i])
        return outs

    def spatial_requirement(self, out_full: Any) -> Any:
        for layer in reversed(self.layers):
            out_full = layer.spatial_requirement(out_full)
        return out_full

    def kernel_planned(self, k: Any, out_full: Any) -> Any:
        out = k
        for out in self.kernel_steps(k, out_full):  # noqa: B007 - the last record is the output
            pass
        return out if out_full is None else adapt_spatial(out, out_full, self)

    def kernel_steps(self, k: Any, out_full: Any) -> Iterator[Any]:
        """The record after each layer in turn (``kernel_fn(..., per_layer=...)``).

        Each record is in the layout the next layer needs (``out_full`` as in
        :meth:`kernel_planned`); the last one before the final adaptation.
        """
        locate = _inputs.locating()  # re-running a pair that overflowed: check every layer
        if out_full is None:  # keep every layout as it comes (forced full covariances)
            for i, layer in enumerate(self.layers):
                k = _step(i, layer, k, None, locate)
                yield k
            return
        for i, (layer, out) in enumerate(zip(self.layers, self._needs(out_full))):
            k = adapt_spatial(k, layer.spatial_requirement(out), layer)
            k = _step(i, layer, k, out, locate)
            yield k


def _step(i: int, layer: Layer, k: Any, out: Any, locate: bool) -> Any:
    """``layer.kernel_planned(k, out)``; checked for overflow when ``locate``."""
    if not locate:
        return layer.kernel_planned(k, out)
    dtype = (k[0] if isinstance(k, list) else k).nngp.dtype
    return _inputs.located_step(i, layer, lambda: layer.kernel_planned(k, out), dtype)


def serial(*layers: Layer) -> Serial:
    """Compose layers in series: ``serial(a, b)(x) = b(a(x))``.

    The kernel of the composition is the composition of the kernel maps.

    Args:
        *layers: infnets layers.

    Returns:
        A layer unpacking into ``(init_fn, apply_fn, kernel_fn)``; its params are
        a tuple with one entry per layer.

    Examples:
        >>> from infnets import stax
        >>> init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
        >>> kernel_fn(torch.ones(2, 3), None, 'nngp').shape
        torch.Size([2, 2])
    """
    return Serial(*layers)


class Parallel(Layer):
    """Layers applied to corresponding branches (see :func:`parallel`)."""

    def __init__(self, *layers: Layer) -> None:
        self.layers = tuple(as_layer_list(layers, "parallel"))

    def __repr__(self) -> str:
        return "parallel(" + ", ".join(map(repr, self.layers)) + ")"

    def sublayers(self) -> tuple[Layer, ...]:
        return self.layers

    def _check(self, xs: Any, what: str) -> list[Any]:
        if not isinstance(xs, list):
            raise ValueError(
                f"parallel with {len(self.layers)} layers needs {len(self.layers)} branches, "
                f"but got a single {what}; put FanOut({len(self.layers)}) before it."
            )
        if len(xs) != len(self.layers):
            raise ValueError(
                f"parallel has {len(self.layers)} layers but received {len(xs)} branches; "
                "the FanOut before it must create exactly one branch per layer."
            )
        return xs

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        shapes = self._check(in_shape, "input shape")
        outs = [layer.init(gen, s, dtype, device) for layer, s in zip(self.layers, shapes)]
        return [o[0] for o in outs], tuple(o[1] for o in outs)

    def apply(self, params: Params, x: Any) -> Any:
        xs = self._check(x, "tensor")
        return [layer.apply(p, xi) for layer, p, xi in zip(self.layers, params, xs)]

    def kernel(self, k: Any) -> Any:
        return self.kernel_planned(k, True)

    def _per_branch(self, out_full: Any) -> list[Any]:
        if isinstance(out_full, list):
            return self._check(out_full, "requirement")
        return [out_full] * len(self.layers)

    def spatial_requirement(self, out_full: Any) -> Any:
        outs = self._per_branch(out_full)
        return [layer.spatial_requirement(o) for layer, o in zip(self.layers, outs)]

    def kernel_planned(self, k: Any, out_full: Any) -> Any:
        ks = self._check(k, "kernel")
        outs = self._per_branch(out_full)
        res = []
        for layer, ki, o in zip(self.layers, ks, outs):
            if o is not None:
                ki = adapt_spatial(ki, layer.spatial_requirement(o), layer)
            res.append(adapt_spatial(layer.kernel_planned(ki, o), o, layer))
        return res


def parallel(*layers: Layer) -> Parallel:
    """Apply ``layers[i]`` to branch ``i`` of a list of inputs (e.g. after ``FanOut``).

    Args:
        *layers: one layer per branch.

    Returns:
        A layer mapping a list of ``len(layers)`` inputs to a list of outputs.

    Examples:
        >>> from infnets import stax
        >>> block = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(8), stax.Identity()),
        ...                     stax.FanInSum())
        >>> block.kernel_fn(torch.ones(2, 8), None, 'nngp').shape
        torch.Size([2, 2])
    """
    return Parallel(*layers)


@dataclasses.dataclass(frozen=True, eq=False)
class FanOut(Layer):
    """Copy the input into ``n`` branches (identical kernels, independent weights after).

    Args:
        n: number of branches, >= 1.
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"FanOut: n must be an int >= 1, got {self.n!r}.")

    def extra_records(self) -> int:
        return self.n - 1

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        _single(in_shape, self, "input shape")
        return [in_shape] * self.n, ()

    def apply(self, params: Params, x: Any) -> Any:
        _single(x, self, "tensor")
        return [x] * self.n

    def kernel(self, k: Any) -> Any:
        _single(k, self, "kernel")
        return [k] * self.n

    def spatial_requirement(self, out_full: Any) -> Any:
        return _any_full(out_full)


@dataclasses.dataclass(frozen=True, eq=False)
class Identity(Layer):
    """The identity layer: no parameters, the kernel passes through unchanged."""

    def apply(self, params: Params, x: Any) -> Any:
        return x

    def kernel(self, k: Any) -> Any:
        return k


def _any_full(need: Any) -> Any:
    """A branch list of requirements folded into one: full if any branch needs it."""
    if isinstance(need, list):
        folded = [_any_full(n) for n in need]
        return True if any(f is True for f in folded) else (None if None in folded else False)
    return need


def _single(x: Any, layer: Layer, what: str) -> None:
    if isinstance(x, list):
        raise ValueError(
            f"{layer!r} takes a single input but received {len(x)} branches; "
            "join branches with a FanIn layer first."
        )


def _branches(xs: Any, layer: Layer, what: str) -> list[Any]:
    if not isinstance(xs, list):
        raise ValueError(
            f"{layer!r} joins branches and needs a list of them, but received a single {what}; "
            "create branches with FanOut(n) and parallel(...)."
        )
    if len(xs) < 2:
        raise ValueError(f"{layer!r} needs at least 2 branches, received {len(xs)}.")
    return xs


def _same_shapes(shapes: list[tuple[int, ...]], layer: Layer) -> None:
    ref = [tuple(s[1:]) for s in shapes]
    if any(s != ref[0] for s in ref):
        raise ValueError(
            f"{layer!r}: branch shapes differ (non-batch axes {ref}); they must match."
        )


def _join_meta(ks: list[Kernel], layer: Layer) -> list[Kernel]:
    if any(k.pair_index is not ks[0].pair_index and k.is_packed != ks[0].is_packed for k in ks):
        raise ValueError(f"{layer!r}: branches come from different inputs.")
    if any((k.ntk is None) != (ks[0].ntk is None) for k in ks):
        raise ValueError(f"{layer!r}: some branches track the NTK and some do not.")
    if any(k.diagonal_spatial for k in ks) and any(k.is_full_spatial for k in ks):
        # a branch kept only per-position covariances, so nothing after needs pixel pairs
        ks = [k.to_diagonal_spatial() for k in ks]
    return ks


def _sum(ts: list[Tensor | None]) -> Tensor | None:
    if ts[0] is None:
        return None
    out = ts[0]
    for t in ts[1:]:
        out = out + t  # type: ignore[operator]
    return out


def _tracked(ts: list[Tensor | None]) -> list[Tensor]:
    """Per-branch NTKs or second-batch variances when the first branch has them.

    :func:`_join_meta` has checked that all branches track the NTK and see the same
    inputs, so none is ``None`` then.
    """
    out = [t for t in ts if t is not None]
    assert len(out) == len(ts)
    return out


def _check_exact(ks: list[Kernel], layer: Layer, centred: bool) -> None:
    """Refuse joins whose cross-branch terms do not vanish in the infinite-width limit.

    Unit ``i`` of two branches ending in different affine layers depends on
    different weight rows, so the branches are independent unit by unit as the
    width grows (the features they share concentrate). Cross covariances
    ``E[a_i(x) b_i(x')] = E[a_i(x)] E[b_i(x')]`` then vanish when one branch is
    centred, and cross NTK terms vanish because the weight rows are independent.
    """
    for i in range(len(ks)):
        for j in range(i + 1, len(ks)):
            a, b = ks[i], ks[j]
            if a.last_affine is b.last_affine:
                raise ValueError(
                    f"{layer!r}: branches {i} and {j} are the same random features unit by "
                    "unit (neither passed through its own Dense/Conv after the FanOut), so "
                    "their joint kernel is not a function of the branch kernels. Give at "
                    "least one of them its own affine layer."
                )
            if centred and not (a.centred or b.centred):
                raise ValueError(
                    f"{layer!r}: branches {i} and {j} both have non-zero means (e.g. both end "
                    "in a ReLU), so their sum has cross terms E[a] E[b] that this kernel does "
                    "not track. End at least one branch in an affine layer (Dense/Conv) or "
                    "an odd nonlinearity."
                )


def _same_shape_init(in_shape: Any, layer: Layer) -> tuple[tuple[int, ...], tuple[()]]:
    """``init`` of an elementwise join: the branches' common shape, no parameters."""
    shapes = _branches(in_shape, layer, "input shape")
    _same_shapes(shapes, layer)
    return shapes[0], ()


def _exact_branch_kernels(k: Any, layer: Layer, centred: bool) -> list[Kernel]:
    """The branch kernels of an elementwise join, checked to combine exactly.

    Same shapes, the same inputs and NTK tracking (:func:`_join_meta`), and no
    cross-branch terms (:func:`_check_exact`).
    """
    ks: list[Kernel] = _branches(k, layer, "kernel")
    _same_shapes([kk.shape1 for kk in ks], layer)
    ks = _join_meta(ks, layer)
    _check_exact(ks, layer, centred=centred)
    return ks


@dataclasses.dataclass(frozen=True, eq=False)
class FanInSum(Layer):
    """Sum of branches: covariances of independent branches add.

    ``K = sum_i K_i`` and ``Theta = sum_i Theta_i``; Gaussian iff every branch is.
    Exact when every pair of branches ends in different affine layers and one of
    the two is centred (e.g. a residual block ``x + Dense(Relu(Dense(x)))``);
    other sums raise a ``ValueError`` rather than return a wrong kernel.
    """

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        return _same_shape_init(in_shape, self)

    def apply(self, params: Params, x: Any) -> Any:
        xs = _branches(x, self, "tensor")
        return _sum(xs)

    def kernel(self, k: Any) -> Any:
        ks = _exact_branch_kernels(k, self, centred=True)
        return ks[0].replace(
            nngp=_sum([kk.nngp for kk in ks]),
            ntk=_sum([kk.ntk for kk in ks]),
            cov1=_sum([kk.cov1 for kk in ks]),
            cov2=_sum([kk.cov2 for kk in ks]),
            is_gaussian=all(kk.is_gaussian for kk in ks),
            last_affine=None,
            centred=all(kk.centred for kk in ks),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class FanInProd(Layer):
    """Elementwise product of branches.

    For branches ending in different affine layers (independent unit by unit at
    infinite width) ``E[prod_i f_i(x) prod_i f_i(x')] = prod_i K_i(x, x')``, and
    by the product rule ``Theta = sum_i Theta_i prod_{j != i} K_j``. Products of
    branches sharing their last affine layer raise a ``ValueError``. The product
    of Gaussians is not Gaussian, so a nonlinearity may not follow it directly.
    """

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        return _same_shape_init(in_shape, self)

    def apply(self, params: Params, x: Any) -> Any:
        xs = _branches(x, self, "tensor")
        return math.prod(xs[1:], start=xs[0])

    def kernel(self, k: Any) -> Any:
        ks = _exact_branch_kernels(k, self, centred=False)
        nngps = [kk.nngp for kk in ks]
        nngp = math.prod(nngps[1:], start=nngps[0])
        ntk = None
        if ks[0].ntk is not None:
            terms: list[Tensor | None] = []
            for i, kk_ntk in enumerate(_tracked([kk.ntk for kk in ks])):
                others = [n for j, n in enumerate(nngps) if j != i]
                terms.append(math.prod(others, start=kk_ntk))
            ntk = _sum(terms)
        cov1 = math.prod([kk.cov1 for kk in ks[1:]], start=ks[0].cov1)
        cov2 = None
        if ks[0].cov2 is not None:
            cov2s = _tracked([kk.cov2 for kk in ks])
            cov2 = math.prod(cov2s[1:], start=cov2s[0])
        return ks[0].replace(
            nngp=nngp,
            ntk=ntk,
            cov1=cov1,
            cov2=cov2,
            is_gaussian=False,
            last_affine=None,
            centred=any(kk.centred for kk in ks),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class FanInConcat(Layer):
    """Concatenate branches along the channel (feature) axis.

    A following affine layer sums over all ``n = sum_i n_i`` channels with
    weights of variance ``W_std^2 / n``, so the joint kernel is the
    width-weighted average ``K = sum_i (n_i / n) K_i`` (same for the NTK).

    Args:
        axis: the axis to concatenate; for fully-connected inputs the feature axis
            (``-1``), for convolutional ``(N, C, *spatial)`` inputs the channel axis
            ``1`` (``axis=1`` names the features/channels of both kinds of input).
            The batch axis cannot be concatenated.
    """

    axis: int = -1

    def _axis(self, ndim: int) -> int:
        axis = self.axis % ndim if -ndim <= self.axis < ndim else None
        if axis is None or axis == 0:
            raise ValueError(
                f"FanInConcat(axis={self.axis}): for inputs of rank {ndim} the axis must name "
                "the channel axis (-1 for fully-connected inputs), not the batch axis."
            )
        if ndim > 2:
            if axis != 1:
                raise ValueError(
                    f"FanInConcat(axis={self.axis}): convolutional inputs of rank {ndim} "
                    "(N, C, *spatial) are concatenated along their channel axis; pass axis=1 "
                    "(a spatial axis has no exact infinite-width kernel here)."
                )
            return axis
        if axis != ndim - 1:
            raise ValueError(
                f"FanInConcat(axis={self.axis}): only the channel axis (-1) has an exact "
                f"infinite-width kernel for rank-{ndim} inputs."
            )
        return axis

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        shapes = _branches(in_shape, self, "input shape")
        axis = self._axis(len(shapes[0]))
        _same_shapes([s[:axis] + s[axis + 1 :] for s in shapes], self)
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        return tuple(out), ()

    def apply(self, params: Params, x: Any) -> Any:
        xs = _branches(x, self, "tensor")
        return torch.cat(xs, dim=self.axis)

    def kernel(self, k: Any) -> Any:
        ks: list[Kernel] = _branches(k, self, "kernel")
        axis = self._axis(len(ks[0].shape1))
        ks = _join_meta(ks, self)
        widths = [kk.shape1[axis] for kk in ks]
        total = sum(widths)

        def avg(ts: list[Tensor | None]) -> Tensor | None:
            return _sum([None if t is None else t * (w / total) for t, w in zip(ts, widths)])

        shape1 = list(ks[0].shape1)
        shape1[axis] = total
        shape2 = list(ks[0].shape2)
        shape2[axis] = total
        return ks[0].replace(
            nngp=avg([kk.nngp for kk in ks]),
            ntk=avg([kk.ntk for kk in ks]),
            cov1=avg([kk.cov1 for kk in ks]),
            cov2=avg([kk.cov2 for kk in ks]),
            shape1=tuple(shape1),
            shape2=tuple(shape2),
            is_gaussian=all(kk.is_gaussian for kk in ks),
            last_affine=None,
            centred=all(kk.centred for kk in ks),
        )
