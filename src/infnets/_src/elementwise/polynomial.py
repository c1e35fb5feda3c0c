r"""Polynomial nonlinearities: exact kernels through the Hermite expansion.

A polynomial ``phi`` expanded in probabilists' Hermite polynomials gives ``E[phi(u) phi(v)]``
as a polynomial in the covariance (Mehler's formula), with variance-dependent coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.elementwise.base import (
    ElementwiseLayer,
    poly_eval,
)

__all__ = ["Polynomial", "Monomial", "Hermite"]


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


def _polynomial_kernel(coupling: list[tuple[int, np.ndarray]], k: Tensor, q1: Tensor, q2: Tensor):
    total = torch.zeros_like(k)
    for m, poly in coupling:
        total = total + k**m * poly_eval(poly, q1) * poly_eval(poly, q2)
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
