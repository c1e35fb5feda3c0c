"""Numerically safe elementary functions for kernel maps.

Kernel maps evaluate ``arcsin``, ``arccos`` and ``sqrt(1 - rho^2)`` at
correlations ``rho`` that are exactly ``+-1`` on the diagonal (identical inputs).
There the true derivatives are infinite or of the form ``inf - inf``, so plain
autograd would return NaN. These functions compute exact values and clamp only
the *derivatives* (by ``1 / sqrt(max(1 - rho^2, eps))``), so gradients of kernels
with respect to inputs and hyper-parameters stay finite everywhere. Backward
formulas are written with differentiable torch ops, so double backward works.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "scalar_like",
    "needs_grad",
    "safe_sqrt",
    "correlation",
    "arcsin",
    "arccos",
    "sqrt1m",
    "arccos_j1",
]


def scalar_like(value: float, like: Tensor) -> Tensor:
    """A 0-d ``value`` of ``like``'s dtype and device (broadcasts in fused ops: ``addcmul``)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def needs_grad(*ts: Tensor | None) -> bool:
    """True when autograd is on and any tensor requires a gradient."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def _inv_sqrt1m(x: Tensor) -> Tensor:
    eps = torch.finfo(x.dtype).eps
    return torch.rsqrt(torch.clamp(1 - x * x, min=eps))


class _ElementwiseFn(torch.autograd.Function):
    """Base of the elementwise functions below: the backward pass needs the input only."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])


class _ArcSin(_ElementwiseFn):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.asin(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * _inv_sqrt1m(x)


class _Sqrt1m(_ElementwiseFn):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(1 - x * x, min=0))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return -g * x * _inv_sqrt1m(x)


class _ArccosJ1(_ElementwiseFn):
    """``sqrt(1 - x^2) + x arcsin(x)``, whose derivative is exactly ``arcsin(x)``."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(1 - x * x, min=0)) + x * torch.asin(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * arcsin(x)


def arcsin(x: Tensor) -> Tensor:
    """``arcsin(x)`` for ``x`` in ``[-1, 1]`` with a derivative clamped at ``+-1``."""
    return _ArcSin.apply(x) if needs_grad(x) else torch.asin(x)


def arccos(x: Tensor) -> Tensor:
    """``arccos(x)`` for ``x`` in ``[-1, 1]`` with a derivative clamped at ``+-1``."""
    return math.pi / 2 - arcsin(x)


def sqrt1m(x: Tensor) -> Tensor:
    """``sqrt(1 - x^2)`` with a derivative clamped at ``x = +-1``."""
    if needs_grad(x):
        return _Sqrt1m.apply(x)
    return torch.sqrt(torch.clamp(1 - x * x, min=0))


def arccos_j1(x: Tensor) -> Tensor:
    """``sqrt(1 - x^2) + x arcsin(x)``; its gradient ``arcsin(x)`` is finite on ``[-1, 1]``."""
    if needs_grad(x):
        return _ArccosJ1.apply(x)
    return torch.sqrt(torch.clamp(1 - x * x, min=0)) + x * torch.asin(x)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` whose gradient is zero (not infinite) where ``x <= 0``."""
    if not needs_grad(x):
        return torch.sqrt(torch.clamp(x, min=0))
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def correlation(cov: Tensor, var1: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """Correlation ``rho = cov / sqrt(var1 var2)`` clamped to ``[-1, 1]``, and ``sqrt(var1 var2)``.

    Zero variances (e.g. zero-norm inputs without bias) give ``rho = 0`` and a
    zero scale, so every homogeneous kernel map returns exactly zero there.

    ``sqrt(var1 var2)`` keeps ``rho`` exactly 1 on diagonal pairs, but the product
    underflows when the variances are below ``sqrt(tiny)`` (1e-19 in float32): those
    pairs (found from the per-example minima, an ``O(N)`` test) use
    ``sqrt(var1) sqrt(var2)`` instead, which is exact up to rounding for any normal
    variances (issue #16).
    """
    scale = safe_sqrt(var1 * var2)
    tiny = torch.finfo(scale.dtype).tiny
    if var1.numel() and var2.numel():
        low = float(var1.detach().amin()) * float(var2.detach().amin())
        if low < tiny:  # some product is subnormal or zero (rare: zero or tiny inputs)
            apart = safe_sqrt(var1) * safe_sqrt(var2)
            scale = torch.where(var1 * var2 >= tiny, scale, apart)
    if needs_grad(cov, scale):
        positive = scale > 0
        rho = torch.where(positive, cov / torch.where(positive, scale, torch.ones_like(scale)), 0.0)
    else:
        rho = cov / scale
        rho = torch.nan_to_num(rho, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.clamp(rho, -1.0, 1.0), scale
