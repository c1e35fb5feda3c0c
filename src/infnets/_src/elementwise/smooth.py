r"""Smooth nonlinearities with closed-form kernels: Erf, GELU, trigonometric, exponential.

Gaussian integrals of ``erf`` (Williams 1997), of ``x Phi(x)`` (GELU), of sines and cosines
(the Gaussian characteristic function) and of exponentials give the NNGP maps in closed form;
the tanh-approximated GELU falls back to quadrature (:mod:`.quadrature`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from infnets._src.core import safe_math as sm
from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import FusedStep, PairMap
from infnets._src.elementwise.base import (
    TWO_PI,
    ElementwiseLayer,
    check_floats,
    price_derivative,
)
from infnets._src.elementwise.quadrature import dot_quad, nngp_quad

__all__ = ["Erf", "Sigmoid_like", "Gelu", "Sin", "Cos", "Rbf", "Exp", "Gaussian", "Gabor"]


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
        check_floats(self, ("a", "b", "c"))

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
    """Neural Tangents' sigmoid-shaped ``0.5 erf(x / 2.4020563531719796) + 0.5``, exact kernel.

    The same function as ``neural_tangents.stax.Sigmoid_like``: the constant
    ``2.4020563531719796`` makes it the least-squares fit of the logistic sigmoid on
    ``[-5, 5]``. (infnets before 0.x used ``b = sqrt(pi) / 4``, matching only the slope
    at zero; see ``docs/neural_tangents.md``.) Its kernels are those of
    :class:`Erf` with ``a = 0.5``, ``b = 1 / 2.4020563531719796``, ``c = 0.5``
    (Williams 1997).

    Returns:
        An :class:`Erf` layer.

    Examples:
        >>> from infnets import stax
        >>> layer = stax.Sigmoid_like()
        >>> y = layer.apply_fn((), torch.tensor([2.4020563531719796]))  # 0.5 erf(1) + 0.5
        >>> round(float(y[0]), 4)
        0.9214
    """
    return Erf(a=0.5, b=1 / SIGMOID_LIKE_SCALE, c=0.5)


#: the input scale of Neural Tangents' ``Sigmoid_like``: ``0.5 erf(x / s) + 0.5``
SIGMOID_LIKE_SCALE = 2.4020563531719796


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

    ``approximate='tanh'`` (or ``True``) is the tanh approximation of
    ``torch.nn.GELU(approximate='tanh')``; it has no closed form, so its kernel is computed by
    Gauss-Hermite quadrature (see ``ElementwiseNumerical``).

    Args:
        approximate: PyTorch's names, ``'none'`` (exact, the default) or ``'tanh'``; the
            booleans ``False``/``True`` mean the same. Anything else is refused (a
            non-empty string such as ``'exact'`` used to be taken as true).
    """

    approximate: bool | str = False

    def __post_init__(self) -> None:
        value = self.approximate
        names = {"none": False, "tanh": True}
        if isinstance(value, bool):
            return
        if isinstance(value, str) and value in names:
            object.__setattr__(self, "approximate", names[value])
            return
        raise ValueError(
            f"Gelu: approximate must be 'none' or 'tanh' (as in torch.nn.GELU), or a bool; "
            f"got {value!r}."
        )

    def fn(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh" if self.approximate else "none")

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.approximate:
            return nngp_quad(self.fn, c, q1, q2)
        s1, s2 = 1 + q1, 1 + q2
        det = s1 * s2 - c * c
        r = torch.clamp(c * torch.rsqrt(s1 * s2), -1.0, 1.0)
        root = sm.sqrt1m(r)
        orth = 0.25 + sm.arcsin(r) / TWO_PI
        m_xx = orth + r * root / TWO_PI
        m_xy = r * orth + root / TWO_PI
        a1, a2 = (q1 * s2 - c * c) / det, c / det
        b1, b2 = c / det, (q2 * s1 - c * c) / det
        sd1, sd2 = torch.sqrt(s1), torch.sqrt(s2)
        quad = a1 * b1 * s1 * m_xx + (a1 * b2 + a2 * b1) * sd1 * sd2 * m_xy + a2 * b2 * s2 * m_xx
        return c / det * orth + quad

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.approximate:
            return dot_quad(self.fn, c, q1, q2)
        return price_derivative(self.nngp_map, c, q1, q2)


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
        check_floats(self, ("a", "b", "c"))

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
        check_floats(self, ("a", "b"))

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
        check_floats(self, ("a", "b"))

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


@dataclasses.dataclass(frozen=True, eq=False)
class Gabor(ElementwiseLayer):
    r"""The Gabor function ``phi(x) = exp(-x^2) sin(x)`` (Neural Tangents' ``Gabor``).

    Closed form, derived from the Gaussian integral
    ``E[exp(-z^T z + i t^T z)] = det(I + 2 S)^{-1/2} exp(-t^T M t / 2)`` with
    ``M = S (I + 2 S)^{-1}`` for a centred pair ``z = (u, v)`` of covariance ``S``, and
    ``sin u sin v = (cos(u - v) - cos(u + v)) / 2``: with
    ``D = (1 + 2 q1)(1 + 2 q2) - 4 k^2`` and ``M_11 + M_22 = (q1 + q2 + 4 q1 q2 - 4 k^2) / D``,
    ``M_12 = k / D``,

    ``K' = D^{-1/2} exp(-(M_11 + M_22) / 2) sinh(k / D)``.

    The derivative kernel ``E[phi'(u) phi'(v)] = dK'/dk`` follows by Price's theorem
    (autograd). The function is odd, so centred inputs give centred outputs.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(1), stax.Gabor())
        >>> net.kernel_fn(torch.eye(2, dtype=torch.float64), None, 'nngp').shape
        torch.Size([2, 2])
    """

    @property
    def is_odd(self) -> bool:
        return True

    def fn(self, x: Tensor) -> Tensor:
        return torch.exp(-x * x) * torch.sin(x)

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        det = (1 + 2 * q1) * (1 + 2 * q2) - 4 * k * k
        trace = (q1 + q2 + 4 * (q1 * q2 - k * k)) / det
        return torch.exp(-trace / 2) * torch.sinh(k / det) * torch.rsqrt(det)
