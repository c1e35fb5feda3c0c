r"""Elementwise nonlinearities with closed-form NNGP and NTK transforms.

For a nonlinearity ``phi`` applied to a centred Gaussian pair ``(u, v)`` with
``Var u = q1``, ``Var v = q2`` and ``Cov(u, v) = c``, the infinite-width layer maps

* the NNGP: ``K' = E[phi(u) phi(v)]`` (Neal 1996; Lee et al. 2018);
* the NTK: ``Theta' = Theta * E[phi'(u) phi'(v)]`` (Jacot et al. 2018; Arora et al. 2019).

By Price's theorem ``E[phi'(u) phi'(v)] = d E[phi(u) phi(v)] / dc``, which is how
the derivative kernel is obtained by autograd where no closed form is written.
Each class below implements ``nngp_map(c, q1, q2)`` and ``dot_map(c, q1, q2)``
as batched tensor code; ``q1``/``q2`` broadcast against ``c``.

Nonlinearities need Gaussian inputs: they must follow an affine layer (``Dense``,
``Conv``) or a sum/concatenation of such branches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core import safe_math as sm
from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import FusedStep, PairMap, Params
from infnets._src.evaluate import compiled
from infnets._src.layers.base import Layer

__all__ = [
    "ElementwiseLayer",
    "ABRelu",
    "Relu",
    "LeakyRelu",
    "Abs",
    "Erf",
    "Sigmoid_like",
    "Gelu",
    "Sign",
    "Sin",
    "Cos",
    "Rbf",
    "Exp",
    "Gaussian",
    "Polynomial",
    "Monomial",
    "Hermite",
    "RectifiedMonomial",
    "price_derivative",
]

_TWO_PI = 2 * math.pi


def price_derivative(nngp_map: Any, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
    """``d nngp_map(c, q1, q2) / dc`` elementwise, by autograd (Price's theorem).

    The graph is kept when the caller differentiates through the kernel.
    """
    keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (c, q1, q2))
    with torch.enable_grad():
        c_var = c.view_as(c) if c.requires_grad else c.detach().requires_grad_(True)
        out = nngp_map(c_var, q1, q2)
        (grad,) = torch.autograd.grad(
            out, c_var, torch.ones_like(out), create_graph=keep_graph, allow_unused=True
        )
    if grad is None:
        return torch.zeros_like(out)
    return grad if keep_graph else grad.detach()


def _check_floats(layer: Layer, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(layer, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{type(layer).__name__}: {name} must be a finite float, got {v!r}.")


class ElementwiseLayer(Layer):
    """Base of elementwise nonlinearities: subclasses define ``fn``, ``nngp_map``, ``dot_map``."""

    def fn(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        raise NotImplementedError

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return price_derivative(self.nngp_map, c, q1, q2)

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        return self.fn(x)

    def maps(
        self, c: Tensor, q1: Tensor, q2: Tensor, need_dot: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``(nngp_map, dot_map if need_dot)``; subclasses fuse the two where they share work."""
        return self.nngp_map(c, q1, q2), self.dot_map(c, q1, q2) if need_dot else None

    def check_variances(self, k: Kernel) -> None:
        """Hook for maps valid only on some variances (e.g. ``Gaussian`` with b > 0)."""

    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        if not k.is_gaussian:
            raise ValueError(
                f"{self!r} needs Gaussian inputs, i.e. an affine layer (Dense/Conv) before it; "
                "the infinite-width kernel of a nonlinearity applied to raw inputs or to "
                "another nonlinearity's output has no exact form. Insert stax.Dense(...) "
                "before it, or use empirical.monte_carlo_kernel_fn for such architectures."
            )
        self.check_variances(k)
        dots: list[Tensor] = []
        pre = self._compiled_pairs(k)

        def nngp_map(c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
            if pre is not None and c is k.nngp:
                return pre[0]
            # the pair covariance comes first (Kernel.map_covariances); only it needs the
            # derivative kernel, computed together with the NNGP map
            need_dot = k.ntk is not None and c is k.nngp
            new, dot = self.maps(c, q1, q2, need_dot)
            if need_dot:
                dots.append(dot)  # type: ignore[arg-type]
            return new

        def ntk_map(ntk: Tensor, c: Tensor, q1: Tensor, q2: Tensor, new: Tensor) -> Tensor:
            if pre is not None and pre[1] is not None:
                return pre[1]
            dot = dots.pop() if dots else self.dot_map(c, q1, q2)
            if sm.needs_grad(dot, ntk):
                return ntk * dot
            return dot.mul_(ntk)  # dot is a fresh temporary: reuse its memory

        return k.map_covariances(nngp_map, ntk_map).replace(
            is_gaussian=False, centred=k.centred and self.is_odd
        )

    @property
    def is_odd(self) -> bool:
        """Whether ``fn`` is odd (then centred inputs give centred outputs)."""
        return False

    def _compiled_pairs(self, k: Kernel) -> tuple[Tensor, Tensor | None] | None:
        """The pair maps of large spatial covariances by a compiled kernel, if it applies."""
        if not (hasattr(self, "pair_maps") and k.is_spatial and compiled.enabled(k.nngp)):
            return None
        if sm.needs_grad(k.nngp, k.ntk, k.cov1, k.cov2):
            return None
        var1, var2 = k.pair_variances()
        f1 = self.pair_factors(var1)[0]  # type: ignore[attr-defined]
        f2 = self.pair_factors(var2)[1]  # type: ignore[attr-defined]
        return compiled.pair_map(self, k.nngp, f1, f2, k.ntk)


def _sqrt_one_minus_square(rho: Tensor) -> Tensor:
    """``sqrt(1 - rho^2)`` for ``|rho| <= 1``, as ``u rsqrt(u)`` (cheaper than ``sqrt`` on CPU)."""
    u = torch.addcmul(sm.scalar_like(1.0, rho), rho, rho, value=-1)  # >= 0 exactly when |rho| <= 1
    return torch.clamp(u, min=torch.finfo(rho.dtype).tiny).rsqrt_().mul_(u)


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
        _check_floats(self, ("a", "b"))

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
        ``(j, i)`` get the same value bit for bit. Zero variances are floored at
        ``sqrt(tiny)``, so zero-norm inputs get ``rho = 0``.
        """
        info = torch.finfo(q.dtype)
        root = q.clamp(min=info.tiny**0.5).sqrt_().mul_(1 - 3 * info.eps)
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
        root = _sqrt_one_minus_square(rho)
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


# ------------------------------------------------------------------------ Erf family
@dataclasses.dataclass(frozen=True, eq=False)
class Erf(ElementwiseLayer):
    r"""``phi(x) = a erf(b x) + c`` with Williams' (1997) closed form.

    ``K' = a^2 (2/pi) arcsin(2 b^2 k / sqrt((1 + 2 b^2 q1)(1 + 2 b^2 q2))) + c^2``,
    ``E[phi' phi'] = a^2 b^2 (4/pi) / sqrt((1 + 2 b^2 q1)(1 + 2 b^2 q2) - 4 b^4 k^2)``
    where ``k`` is the input covariance.

    Args:
        a: output scale. b: input scale. c: output shift.
    """

    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def __post_init__(self) -> None:
        _check_floats(self, ("a", "b", "c"))

    @property
    def is_odd(self) -> bool:
        return self.c == 0

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.erf(self.b * x) + self.c

    def maps(
        self, k: Tensor, q1: Tensor, q2: Tensor, need_dot: bool
    ) -> tuple[Tensor, Tensor | None]:
        if sm.needs_grad(k, q1, q2):
            return super().maps(k, q1, q2, need_dot)
        return self.pair_maps(k, self.pair_factors(q1)[0], self.pair_factors(q2)[1], need_dot)

    def fused_steps(self) -> list[FusedStep]:
        return [PairMap(self)]

    def pair_factors(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example factors of :meth:`pair_maps`: ``sqrt(2) |b| / sqrt(1 + 2 b^2 q)`` (twice).

        Their product is ``2 b^2 / sqrt((1 + 2b^2 q1)(1 + 2b^2 q2))``: one reciprocal
        square root per example instead of one per pair, and a commutative product,
        so pairs ``(i, j)`` and ``(j, i)`` get the same value bit for bit.
        """
        r = (q * (2 * self.b**2) + 1).rsqrt_().mul_(math.sqrt(2) * abs(self.b))
        return r, r

    def pair_maps(
        self, k: Tensor, f1: Tensor, f2: Tensor, need_dot: bool, w2: float = 1.0, b2: float = 0.0
    ) -> tuple[Tensor, Tensor | None]:
        """Fused no-grad maps followed by an affine layer: ``b2 + w2 K'`` and ``w2 E[phi' phi']``.

        With ``r = f1 f2 = 2 b^2 / sqrt((1 + 2b^2 q1)(1 + 2b^2 q2))`` and ``z = k r``:
        ``K' = (2a^2/pi) asin(z) + c^2`` and
        ``E[phi' phi'] = (4 a^2 b^2 / pi) / sqrt((1 + 2b^2 q1)(1 + 2b^2 q2) (1 - z^2))``,
        which is ``(2 a^2 / pi) r / sqrt(1 - z^2)``.
        """
        r = torch.mul(f1, f2)
        z = torch.mul(k, r)
        if not self._inside_unit_interval(f1, f2):
            z.clamp_(-1.0, 1.0)
        gain = w2 * 2 * self.a**2 / math.pi
        dot = None
        if need_dot:
            if 1e-100 < gain < 1e100:  # gain / sqrt(1 - z^2) = rsqrt((1 - z^2) / gain^2)
                inv = 1.0 / gain**2
                u = torch.addcmul(sm.scalar_like(inv, z), z, z, value=-inv)
                dot = u.rsqrt_().mul_(r)
            elif gain == 0:  # a = 0 or W_std = 0: no derivative (not 0 * inf at z = 1)
                dot = torch.zeros_like(z)
            else:
                dot = torch.addcmul(sm.scalar_like(1.0, z), z, z, value=-1).rsqrt_().mul_(r)
                dot.mul_(gain)
        shift = w2 * self.c**2 + b2
        z.asin_()
        new = torch.add(sm.scalar_like(shift, z), z, alpha=gain, out=z) if shift else z.mul_(gain)
        return new, dot

    def _inside_unit_interval(self, f1: Tensor, f2: Tensor) -> bool:
        """Whether ``|z| <= 1`` holds with a margin for every pair of these factors.

        ``|k| <= sqrt(q1 q2)`` (Cauchy-Schwarz) gives ``|z| <= s1 s2`` with
        ``s = sqrt(q) f = sqrt(1 - f^2 / (2 b^2)) < 1`` per example; when the largest
        bound stays ``sqrt(eps)`` below 1, rounding (a few ulps) cannot reach 1 and
        the clamp before ``asin`` is skipped (one pass fewer). Always ``False`` while
        tracing for ``torch.compile`` (no data-dependent branch there).
        """
        if torch.compiler.is_compiling() or self.b == 0 or f1.numel() == 0 or f2.numel() == 0:
            return False
        two_b2 = 2 * self.b**2
        s1 = 1 - float(f1.min()) ** 2 / two_b2
        s2 = 1 - float(f2.min()) ** 2 / two_b2
        margin = math.sqrt(torch.finfo(f1.dtype).eps)
        return max(s1, 0.0) * max(s2, 0.0) < (1 - margin) ** 2

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        b2 = 2 * self.b**2
        denom = torch.sqrt((1 + b2 * q1) * (1 + b2 * q2))
        arg = torch.clamp(b2 * k / denom, -1.0, 1.0)
        return sm.arcsin(arg) * (2 * self.a**2 / math.pi) + self.c**2

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        b2 = 2 * self.b**2
        det = (1 + b2 * q1) * (1 + b2 * q2) - (b2 * k) ** 2
        return torch.rsqrt(det) * (4 * self.a**2 * self.b**2 / math.pi)


def Sigmoid_like() -> Erf:  # noqa: N802 - Neural Tangents' name
    """A sigmoid-shaped ``0.5 erf(b x) + 0.5`` with an exact kernel.

    ``b = sqrt(pi) / 4`` matches the logistic sigmoid's slope ``1/4`` at zero.
    """
    return Erf(a=0.5, b=math.sqrt(math.pi) / 4, c=0.5)


# -------------------------------------------------------------------------- GELU
_SQRT_2 = math.sqrt(2.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Gelu(ElementwiseLayer):
    r"""Gaussian error linear unit ``phi(x) = x Phi(x)`` (Hendrycks & Gimpel 2016).

    Closed form: with ``Phi(x) = P(z <= x)``, ``E[u Phi(u) v Phi(v)] =
    E[u v 1{w >= 0}]`` for ``w = (u - z1, v - z2)``. Conditioning the Gaussian
    ``(u, v)`` on ``w`` (covariance ``S = [[1 + q1, c], [c, 1 + q2]]``, determinant
    ``D``) gives ``K' = (c / D) P + alpha M beta^T`` where ``P = P(w >= 0) =
    1/4 + arcsin(r) / (2 pi)``, ``r = c / sqrt((1 + q1)(1 + q2))``,
    ``M = E[w w^T 1{w >= 0}]`` (orthant moments of the bivariate normal) and
    ``alpha = (q1 (1 + q2) - c^2, c) / D``, ``beta = (c, q2 (1 + q1) - c^2) / D``.
    The derivative kernel follows by Price's theorem (autograd).

    ``approximate=True`` is the tanh approximation used by ``torch.nn.GELU(approximate='tanh')``;
    it has no closed form, so its kernel is computed by Gauss-Hermite quadrature
    (see ``ElementwiseNumerical``).

    Args:
        approximate: use the tanh approximation in the finite network.
    """

    approximate: bool = False

    def fn(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh" if self.approximate else "none")

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.approximate:
            return _quadrature().nngp_quad(self.fn, c, q1, q2)
        s1, s2 = 1 + q1, 1 + q2
        det = s1 * s2 - c * c
        r = torch.clamp(c * torch.rsqrt(s1 * s2), -1.0, 1.0)
        root = sm.sqrt1m(r)
        orth = 0.25 + sm.arcsin(r) / _TWO_PI
        m_xx = orth + r * root / _TWO_PI
        m_xy = r * orth + root / _TWO_PI
        a1, a2 = (q1 * s2 - c * c) / det, c / det
        b1, b2 = c / det, (q2 * s1 - c * c) / det
        sd1, sd2 = torch.sqrt(s1), torch.sqrt(s2)
        quad = a1 * b1 * s1 * m_xx + (a1 * b2 + a2 * b1) * sd1 * sd2 * m_xy + a2 * b2 * s2 * m_xx
        return c / det * orth + quad

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.approximate:
            return _quadrature().dot_quad(self.fn, c, q1, q2)
        return price_derivative(self.nngp_map, c, q1, q2)


def _quadrature():  # type: ignore[no-untyped-def]
    from infnets._src.elementwise import numerical as elementwise_numerical

    return elementwise_numerical


# ------------------------------------------------------------------- trigonometric
@dataclasses.dataclass(frozen=True, eq=False)
class Sin(ElementwiseLayer):
    r"""``phi(x) = a sin(b x + c)``.

    From ``sin x sin y = (cos(x - y) - cos(x + y)) / 2`` and the Gaussian
    characteristic function ``E cos(t) = exp(-Var t / 2)`` for centred ``t``:

    ``K' = a^2/2 (exp(-b^2 (q1 + q2 - 2k)/2) - cos(2c) exp(-b^2 (q1 + q2 + 2k)/2))``,
    ``E[phi' phi'] = a^2 b^2/2 (exp(-b^2 (q1 + q2 - 2k)/2) + cos(2c) exp(-b^2 (q1 + q2 + 2k)/2))``.
    """

    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def __post_init__(self) -> None:
        _check_floats(self, ("a", "b", "c"))

    @property
    def is_odd(self) -> bool:
        return math.sin(self.c) == 0.0 or self.a == 0

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.sin(self.b * x + self.c)

    def _terms(self, k: Tensor, q1: Tensor, q2: Tensor) -> tuple[Tensor, Tensor]:
        half_b2 = self.b**2 / 2
        total = q1 + q2
        return torch.exp((2 * k - total) * half_b2), torch.exp(-(total + 2 * k) * half_b2)

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        minus, plus = self._terms(k, q1, q2)
        return (minus - math.cos(2 * self.c) * plus) * (self.a**2 / 2)

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        minus, plus = self._terms(k, q1, q2)
        return (minus + math.cos(2 * self.c) * plus) * (self.a**2 * self.b**2 / 2)


class Cos(Sin):
    """``phi(x) = a cos(b x + c) = a sin(b x + c + pi/2)``; kernels as for :class:`Sin`."""

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        super().__init__(a=a, b=b, c=c + math.pi / 2)
        object.__setattr__(self, "_cos_c", c)

    def __repr__(self) -> str:
        return f"Cos(a={self.a}, b={self.b}, c={self._cos_c})"  # type: ignore[attr-defined]


class Rbf(Sin):
    """Random Fourier features ``sqrt(2) sin(sqrt(2 gamma) x + pi/4)`` (Rahimi & Recht 2007).

    The NNGP is the RBF kernel of the pre-activations:
    ``K' = exp(-gamma (q1 + q2 - 2k)) = exp(-gamma E[(u - v)^2])``.

    Args:
        gamma: inverse length scale, > 0.
    """

    def __init__(self, gamma: float = 1.0) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"Rbf: gamma must be a float > 0, got {gamma!r}.")
        super().__init__(a=math.sqrt(2.0), b=math.sqrt(2.0 * gamma), c=math.pi / 4)
        object.__setattr__(self, "gamma", float(gamma))

    def __repr__(self) -> str:
        return f"Rbf(gamma={self.gamma})"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ exponentials
@dataclasses.dataclass(frozen=True, eq=False)
class Exp(ElementwiseLayer):
    r"""``phi(x) = a exp(b x)``.

    ``K' = a^2 exp(b^2 (q1 + q2 + 2k) / 2)`` (the Gaussian moment generating
    function) and ``E[phi' phi'] = b^2 K'``.
    """

    a: float = 1.0
    b: float = 1.0

    def __post_init__(self) -> None:
        _check_floats(self, ("a", "b"))

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x)

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return torch.exp((q1 + q2 + 2 * k) * (self.b**2 / 2)) * self.a**2

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return self.nngp_map(k, q1, q2) * self.b**2


@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian(ElementwiseLayer):
    r"""``phi(x) = a exp(b x^2)``.

    With ``D = (1 - 2b q1)(1 - 2b q2) - 4 b^2 k^2`` (the determinant of
    ``I - 2b Sigma``): ``K' = a^2 / sqrt(D)`` and ``E[phi' phi'] = 4 a^2 b^2 k / D^{3/2}``.
    For ``b > 0`` the second moment is finite only while ``q < 1 / (4b)``; larger
    variances raise an error.
    """

    a: float = 1.0
    b: float = -1.0

    def __post_init__(self) -> None:
        _check_floats(self, ("a", "b"))

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x * x)

    def check_variances(self, k: Kernel) -> None:
        if self.b > 0:
            worst = (
                float(k.cov1.detach().max())
                if k.cov2 is None
                else float(torch.maximum(k.cov1.max(), k.cov2.max()).detach())
            )
            if worst >= 1 / (4 * self.b):
                raise ValueError(
                    f"{self!r}: E[phi(u)^2] is infinite for pre-activation variance {worst:.4g} "
                    f">= 1/(4b) = {1 / (4 * self.b):.4g}; lower W_std/b_std or use b <= 0."
                )

    def _det(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        b2 = 2 * self.b
        return (1 - b2 * q1) * (1 - b2 * q2) - (b2 * k) ** 2

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return torch.rsqrt(self._det(k, q1, q2)) * self.a**2

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return k * self._det(k, q1, q2) ** -1.5 * (4 * self.a**2 * self.b**2)


# ---------------------------------------------------------------------- polynomials
def _hermite_coupling(coef: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """For ``phi = sum_i coef_i x^i``, the polynomials ``P_m`` in the expansion
    ``E[phi(u) phi(v)] = sum_m m! k^m P_m(q1) P_m(q2)`` (Mehler's formula).

    ``x^i = sum_{j} i! / (m! 2^j j!) He_m(x)`` with ``m = i - 2j``, so for
    ``u = sqrt(q) X``, ``P_m(q) = sum_{i >= m, i - m even} coef_i i! / (m! 2^j j!) q^j``.
    Returns ``[(m, powers-of-q coefficients of P_m * sqrt(m!))]`` for nonzero ``P_m``.
    """
    deg = len(coef) - 1
    out = []
    for m in range(deg + 1):
        poly = np.zeros(deg // 2 + 1)
        for i in range(m, deg + 1, 2):
            j = (i - m) // 2
            poly[j] += coef[i] * math.factorial(i) / (math.factorial(m) * 2**j * math.factorial(j))
        if np.any(poly != 0):
            out.append((m, poly * math.sqrt(math.factorial(m))))
    return out


def _poly_eval(poly: np.ndarray, q: Tensor) -> Tensor:
    out = torch.full_like(q, float(poly[-1]))
    for a in poly[-2::-1]:
        out = out * q + float(a)
    return out


def _polynomial_kernel(coupling: list[tuple[int, np.ndarray]], k: Tensor, q1: Tensor, q2: Tensor):
    total = torch.zeros_like(k)
    for m, poly in coupling:
        total = total + k**m * _poly_eval(poly, q1) * _poly_eval(poly, q2)
    return total


class Polynomial(ElementwiseLayer):
    r"""``phi(x) = sum_i coef[i] x^i`` with an exact kernel for any input variance.

    Expanding ``x^i`` in probabilists' Hermite polynomials and using Mehler's
    formula ``E[He_m(X) He_n(Y)] = delta_mn m! rho^m`` gives
    ``K' = sum_m m! k^m P_m(q1) P_m(q2)``, a polynomial in ``(k, q1, q2)``;
    ``E[phi' phi']`` is the same formula for ``phi'``.

    Args:
        coef: coefficients, lowest degree first (at least one).
    """

    def __init__(self, coef: Sequence[float]) -> None:
        arr = np.asarray(list(coef), dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
            raise ValueError(
                f"Polynomial: coef must be a non-empty list of finite floats, got {coef!r}."
            )
        self.coef = tuple(float(a) for a in arr)
        self._coupling = _hermite_coupling(arr)
        deriv = arr[1:] * np.arange(1, arr.size) if arr.size > 1 else np.zeros(1)
        self._dcoupling = _hermite_coupling(deriv)

    def __repr__(self) -> str:
        return f"Polynomial(coef={list(self.coef)})"

    @property
    def is_odd(self) -> bool:
        return all(a == 0 for a in self.coef[0::2])

    def fn(self, x: Tensor) -> Tensor:
        out = torch.full_like(x, self.coef[-1])
        for a in self.coef[-2::-1]:
            out = out * x + a
        return out

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return _polynomial_kernel(self._coupling, k, q1, q2)

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return _polynomial_kernel(self._dcoupling, k, q1, q2)


class Monomial(Polynomial):
    """``phi(x) = x^degree`` (``Polynomial`` with a single coefficient).

    Args:
        degree: integer >= 0.
    """

    def __init__(self, degree: int) -> None:
        self.degree = _inputs.check_int(degree, "Monomial: degree", 0, 32)
        super().__init__([0.0] * self.degree + [1.0])

    def __repr__(self) -> str:
        return f"Monomial(degree={self.degree})"


class Hermite(Polynomial):
    r"""Normalised probabilists' Hermite polynomial ``phi(x) = He_n(x) / sqrt(n!)``.

    On unit-variance inputs (e.g. after ``LayerNorm``) ``K' = rho^n`` (Mehler); for
    other variances the exact polynomial kernel of :class:`Polynomial` is used.

    Args:
        degree: integer >= 0.
    """

    def __init__(self, degree: int) -> None:
        self.degree = _inputs.check_int(degree, "Hermite: degree", 0, 32)
        basis = np.zeros(self.degree + 1)
        basis[-1] = 1.0
        coef = np.polynomial.hermite_e.herme2poly(basis) / math.sqrt(math.factorial(self.degree))
        super().__init__(list(coef))

    def __repr__(self) -> str:
        return f"Hermite(degree={self.degree})"


# The arc-cosine kernel of order n (Cho & Saul 2009) written as
# J_n(t) = A_n(cos t) sin t + B_n(cos t) (pi - t); coefficients lowest power first,
# obtained from Price's recursion dJ_n/drho = n^2 J_{n-1} (checked against
# the definition J_n = (-1)^n sin^{2n+1} t (1/sin t d/dt)^n ((pi - t)/sin t)).
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
        a = _poly_eval(np.asarray(_ARCCOS_A[n], dtype=float), rho)
        b = _poly_eval(np.asarray(_ARCCOS_B[n], dtype=float), rho)
        j = a * sm.sqrt1m(rho) + b * (math.pi - sm.arccos(rho))
    factor = scale**n if n > 0 else torch.where(scale > 0, 1.0, 0.0).to(k.dtype)
    return factor * j / _TWO_PI


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
