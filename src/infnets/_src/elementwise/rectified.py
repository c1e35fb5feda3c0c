r"""Piecewise-linear and rectified nonlinearities: arc-cosine kernels in closed form.

The ReLU family (``ABRelu``, ``Relu``, ``LeakyRelu``, ``Abs``), ``Sign`` and the rectified
monomials ``max(x, 0)^n`` have the arc-cosine kernels of Cho & Saul 2009 ("Kernel methods for
deep learning") as their NNGP maps; the derivative kernels follow by Price's theorem.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core import safe_math as sm
from infnets._src.core.protocol import FusedStep, PairMap
from infnets._src.elementwise.base import (
    TWO_PI,
    ElementwiseLayer,
    check_floats,
    poly_eval,
    sqrt_one_minus_square,
)

__all__ = ["ABRelu", "Relu", "LeakyRelu", "Abs", "Sign", "RectifiedMonomial"]


# --------------------------------------------------------------------- ReLU family
@dataclasses.dataclass(frozen=True, eq=False)
class ABRelu(ElementwiseLayer):
    r"""Piecewise-linear ``phi(x) = a min(x, 0) + b max(x, 0)``.

    Writing ``phi(x) = s x + d |x|`` with ``s = (a + b)/2``, ``d = (b - a)/2`` and
    ``rho = c / sqrt(q1 q2)``, the arc-cosine kernels (Cho & Saul 2009) give

    ``K' = s^2 c + d^2 (2/pi) sqrt(q1 q2) (sqrt(1 - rho^2) + rho arcsin rho)`` and
    ``E[phi' phi'] = s^2 + d^2 (2/pi) arcsin rho``.

    Args:
        a: slope for negative inputs.
        b: slope for positive inputs.
    """

    a: float
    b: float

    def __post_init__(self) -> None:
        check_floats(self, ("a", "b"))

    @property
    def is_odd(self) -> bool:
        return self.a == self.b

    def fn(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, self.b * x, self.a * x)

    def maps(
        self, c: Tensor, q1: Tensor, q2: Tensor, need_dot: bool
    ) -> tuple[Tensor, Tensor | None]:
        if sm.needs_grad(c, q1, q2):
            return super().maps(c, q1, q2, need_dot)
        return self.pair_maps(c, self.pair_factors(q1)[0], self.pair_factors(q2)[1], need_dot)

    def fused_steps(self) -> list[FusedStep]:
        return [PairMap(self)]

    def pair_factors(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example factors of :meth:`pair_maps`: ``sqrt(q)`` shrunk by 3 ulps (twice).

        The scale ``sqrt(q1 q2)`` of a pair is the product of per-example roots
        (one square root per example, not per pair). Rounding leaves that product
        and the division ``c / scale`` an ulp or two off, so each root is shrunk
        by 3 ulps: a pair with ``c = sqrt(q1 q2)`` up to rounding (every diagonal
        pair) gets ``rho`` exactly 1 after clamping, where ``sqrt(1 - rho^2)``
        would turn one ulp into an error of ``1e-8``; elsewhere ``rho`` moves by
        ``7e-16`` relative. The product is commutative, so pairs ``(i, j)`` and
        ``(j, i)`` get the same value bit for bit. Zero variances are floored at the
        smallest normal number ``tiny`` (so zero-norm inputs get ``rho = 0`` and the
        product of two roots never underflows); any normal variance is used as it is
        (a floor at ``sqrt(tiny)``, 1e-19 in float32, made every pair of small inputs
        look uncorrelated: issue #16).
        """
        info = torch.finfo(q.dtype)
        root = q.clamp(min=info.tiny).sqrt_().mul_(1 - 3 * info.eps)
        return root, root

    def pair_maps(
        self, c: Tensor, f1: Tensor, f2: Tensor, need_dot: bool, w2: float = 1.0, b2: float = 0.0
    ) -> tuple[Tensor, Tensor | None]:
        """Fused no-grad maps followed by an affine layer: ``b2 + w2 K'`` and ``w2 E[phi' phi']``.

        With ``rho = c / (f1 f2)`` (``f1``, ``f2``: the two examples' roots from
        :meth:`pair_factors`):
        ``sqrt(q1 q2) (sqrt(1 - rho^2) + rho asin rho) = sqrt(q1 q2) sqrt(1 - rho^2) + c asin rho``,
        so ``K' = g sqrt(q1 q2) sqrt(1 - rho^2) + c E[phi' phi']`` with
        ``E[phi' phi'] = s^2 + g asin rho`` and ``g = 2 d^2 / pi``.
        """
        s2, g = ((self.a + self.b) / 2) ** 2, 2 * ((self.b - self.a) / 2) ** 2 / math.pi
        scale = torch.mul(f1, f2)
        rho = torch.div(c, scale).clamp_(-1.0, 1.0)
        root = sqrt_one_minus_square(rho)
        dot = rho.asin_().mul_(w2 * g).add_(w2 * s2)
        new = torch.mul(c, dot) if b2 == 0 else torch.addcmul(sm.scalar_like(b2, c), c, dot)
        new.addcmul_(root, scale, value=w2 * g)
        return new, dot if need_dot else None

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        s, d = (self.a + self.b) / 2, (self.b - self.a) / 2
        rho, scale = sm.correlation(c, q1, q2)
        out = (d * d * 2 / math.pi) * scale * sm.arccos_j1(rho)
        return out + (s * s) * c if s != 0 else out

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        s, d = (self.a + self.b) / 2, (self.b - self.a) / 2
        rho, _ = sm.correlation(c, q1, q2)
        return sm.arcsin(rho) * (d * d * 2 / math.pi) + s * s


class Relu(ABRelu):
    """Rectified linear unit ``max(x, 0)``: the arc-cosine kernel of order 1 (Cho & Saul 2009).

    ``K' = sqrt(q1 q2) / (2 pi) (sin t + (pi - t) cos t)`` and
    ``E[phi' phi'] = (pi - t) / (2 pi)`` with ``t = arccos(rho)``.

    Examples:
        >>> from infnets import stax
        >>> _, _, kernel_fn = stax.serial(stax.Dense(1), stax.Relu())
        >>> float(kernel_fn(torch.ones(1, 4), None, 'nngp'))  # E[relu(u)^2] = q / 2
        0.5
    """

    def __init__(self) -> None:
        super().__init__(a=0.0, b=1.0)

    def __repr__(self) -> str:
        return "Relu()"

    def fn(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class LeakyRelu(ABRelu):
    """Leaky ReLU ``max(x, 0) + alpha min(x, 0)``.

    Args:
        alpha: slope for negative inputs.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__(a=alpha, b=1.0)

    def __repr__(self) -> str:
        return f"LeakyRelu(alpha={self.a})"


class Abs(ABRelu):
    """Absolute value ``|x|`` (``ABRelu(-1, 1)``)."""

    def __init__(self) -> None:
        super().__init__(a=-1.0, b=1.0)

    def __repr__(self) -> str:
        return "Abs()"

    def fn(self, x: Tensor) -> Tensor:
        return torch.abs(x)


@dataclasses.dataclass(frozen=True, eq=False)
class Sign(ElementwiseLayer):
    r"""Sign function: ``K' = (2 / pi) arcsin(rho)`` (arc-cosine kernel of order 0).

    The derivative of ``sign`` is zero almost everywhere, so, as for a finite
    network trained by backpropagation, no gradient flows through this layer:
    ``E[phi' phi'] = 0`` and the NTK of the layers before it is discarded.
    """

    @property
    def is_odd(self) -> bool:
        return True

    def fn(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        rho, scale = sm.correlation(c, q1, q2)
        out = sm.arcsin(rho) * (2 / math.pi)
        # sign(0) = 0: a zero-variance unit is exactly zero
        return torch.where(scale > 0, out, torch.zeros_like(out))

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return torch.zeros_like(c)


_ARCCOS_A: tuple[tuple[int, ...], ...] = (
    (0,),
    (1,),
    (0, 3),
    (4, 0, 11),
    (0, 55, 0, 50),
    (64, 0, 607, 0, 274),
    (0, 2079, 0, 6552, 0, 1764),
    (2304, 0, 46575, 0, 73188, 0, 13068),
    (0, 136431, 0, 917802, 0, 863208, 0, 109584),
)
_ARCCOS_B: tuple[tuple[int, ...], ...] = (
    (1,),
    (0, 1),
    (1, 0, 2),
    (0, 9, 0, 6),
    (9, 0, 72, 0, 24),
    (0, 225, 0, 600, 0, 120),
    (225, 0, 4050, 0, 5400, 0, 720),
    (0, 11025, 0, 66150, 0, 52920, 0, 5040),
    (11025, 0, 352800, 0, 1058400, 0, 564480, 0, 40320),
)


def _arccos_kernel(n: int, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
    """``E[relu(u)^n relu(v)^n] = (q1 q2)^{n/2} J_n(arccos rho) / (2 pi)``."""
    rho, scale = sm.correlation(k, q1, q2)
    if n == 1:
        # J_1 = sqrt(1 - rho^2) + rho (pi - arccos rho); stable gradient form
        j = sm.arccos_j1(rho) + rho * (math.pi / 2)
    else:
        a = poly_eval(np.asarray(_ARCCOS_A[n], dtype=float), rho)
        b = poly_eval(np.asarray(_ARCCOS_B[n], dtype=float), rho)
        j = a * sm.sqrt1m(rho) + b * (math.pi - sm.arccos(rho))
    factor = scale**n if n > 0 else torch.where(scale > 0, 1.0, 0.0).to(k.dtype)
    return factor * j / TWO_PI


class RectifiedMonomial(ElementwiseLayer):
    r"""``phi(x) = max(x, 0)^degree``: the arc-cosine kernel of order ``degree``.

    ``K' = (q1 q2)^{n/2} J_n(t) / (2 pi)`` with ``t = arccos(rho)`` (Cho & Saul
    2009) and ``E[phi' phi'] = n^2 (q1 q2)^{(n-1)/2} J_{n-1}(t) / (2 pi)``. For
    ``degree = 0`` (the step function) the derivative is zero almost everywhere,
    so no gradient flows through the layer, as in a finite network.

    Args:
        degree: integer in ``[0, 8]``.
    """

    def __init__(self, degree: int) -> None:
        self.degree = _inputs.check_int(degree, "RectifiedMonomial: degree", 0, len(_ARCCOS_A) - 1)

    def __repr__(self) -> str:
        return f"RectifiedMonomial(degree={self.degree})"

    def fn(self, x: Tensor) -> Tensor:
        if self.degree == 0:
            return (x > 0).to(x.dtype)
        return torch.relu(x) ** self.degree

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return _arccos_kernel(self.degree, k, q1, q2)

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.degree == 0:
            return torch.zeros_like(k)
        return _arccos_kernel(self.degree - 1, k, q1, q2) * self.degree**2
