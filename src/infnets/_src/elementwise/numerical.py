r"""Kernels of arbitrary elementwise nonlinearities.

* :class:`ElementwiseNumerical` computes ``E[phi(u) phi(v)]`` and
  ``E[phi'(u) phi'(v)]`` by two-dimensional Gauss-Hermite quadrature, with
  ``phi'`` obtained by autograd. Writing ``u = sqrt(q1) x`` and
  ``v = sqrt(q2) (rho x + sqrt(1 - rho^2) y)`` with independent standard normal
  ``x, y``, ``E[g(u, v)] ~= sum_ij w_i w_j g(u(x_i), v(x_i, y_j))``, exact for
  polynomials of degree ``< 2 deg`` in each variable (Golub & Welsch 1969).
* :class:`Elementwise` takes the user's own closed-form ``nngp_fn`` and derives
  the NTK's derivative kernel by Price's theorem (autograd) when no ``d_nngp_fn``
  is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core import safe_math as sm
from infnets._src.elementwise.closed_forms import ElementwiseLayer, price_derivative

__all__ = ["ElementwiseNumerical", "Elementwise", "nngp_quad", "dot_quad"]

#: default nodes per dimension: even, so that no node sits at 0, where kinks
#: (ReLU) and jumps (sign) of the function or its autograd derivative are
DEFAULT_DEG = 24

#: evaluations of phi per chunk (bounds the quadrature's temporary memory)
_CHUNK_EVALS = 1 << 22


@functools.lru_cache(maxsize=16)
def _nodes(deg: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite_e.hermegauss(deg)
    return x, w / w.sum()


def _derivative(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def dfn(x: Tensor) -> Tensor:
        keep = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            xv = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            y = fn(xv)
            (g,) = torch.autograd.grad(
                y, xv, torch.ones_like(y), create_graph=keep, allow_unused=True
            )
        if g is None:
            return torch.zeros_like(x)
        return g if keep else g.detach()

    return dfn


def _quad(fn: Callable[[Tensor], Tensor], c: Tensor, q1: Tensor, q2: Tensor, deg: int) -> Tensor:
    shape = torch.broadcast_shapes(c.shape, q1.shape, q2.shape)
    c, q1, q2 = (t.expand(shape).reshape(-1) for t in (c, q1, q2))
    xs, ws = _nodes(deg)
    x = torch.as_tensor(xs, dtype=c.dtype, device=c.device)
    w = torch.as_tensor(ws, dtype=c.dtype, device=c.device)
    rho, _ = sm.correlation(c, q1, q2)
    sd1, sd2 = sm.safe_sqrt(q1), sm.safe_sqrt(q2)
    root = sm.sqrt1m(rho)
    step = max(1, _CHUNK_EVALS // (deg * deg))
    outs = []
    for start in range(
        0, c.numel(), step
    ):  # chunks of pairs (memory bound), not a loop over points
        sl = slice(start, start + step)
        u = sd1[sl, None] * x  # (B, deg)
        v = sd2[sl, None, None] * (rho[sl, None, None] * x[:, None] + root[sl, None, None] * x)
        fu = fn(u)  # (B, deg)
        fv = fn(v)  # (B, deg, deg)
        outs.append(torch.einsum("bi,bij,i,j->b", fu, fv, w, w))
    return torch.cat(outs).reshape(shape)


def nngp_quad(
    fn: Callable[[Tensor], Tensor], c: Tensor, q1: Tensor, q2: Tensor, deg: int = DEFAULT_DEG
) -> Tensor:
    """``E[fn(u) fn(v)]`` for the centred Gaussian pair with covariance ``[[q1, c], [c, q2]]``.

    The rule factorises the covariance from ``u``'s side; averaging it with the
    rule factorised from ``v``'s side makes the result symmetric in the pair.
    """
    return (_quad(fn, c, q1, q2, deg) + _quad(fn, c, q2, q1, deg)) / 2


def dot_quad(
    fn: Callable[[Tensor], Tensor], c: Tensor, q1: Tensor, q2: Tensor, deg: int = DEFAULT_DEG
) -> Tensor:
    """``E[fn'(u) fn'(v)]`` with ``fn'`` from autograd (symmetrised as :func:`nngp_quad`)."""
    return nngp_quad(_derivative(fn), c, q1, q2, deg)


class ElementwiseNumerical(ElementwiseLayer):
    """Any elementwise torch function, its kernels by Gauss-Hermite quadrature.

    Accurate to quadrature error: smooth functions (``tanh``, ``softplus``,
    ``silu``) converge exponentially in ``deg``; kinks (ReLU) and jumps (sign)
    converge slowly, so prefer the closed forms there.

    Args:
        fn: an elementwise function of a tensor (e.g. ``torch.tanh``).
        deg: number of Gauss-Hermite nodes per dimension (``2 deg^2`` evaluations
            of ``fn`` per pair of inputs), in ``[1, 200]``. The default, 24, is even so
            that no node sits at 0, where the kinks of ReLU-like functions are.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(1), stax.ElementwiseNumerical(torch.tanh, deg=24))
        >>> k = net.kernel_fn(torch.eye(2, dtype=torch.float64), None, 'nngp')
        >>> k.shape
        torch.Size([2, 2])
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], deg: int = DEFAULT_DEG) -> None:
        if not callable(fn):
            raise TypeError(f"ElementwiseNumerical: fn must be callable, got {type(fn).__name__}.")
        self.fn_ = fn
        self.deg = _inputs.check_int(deg, "ElementwiseNumerical: deg", 1, 200)

    def __repr__(self) -> str:
        name = getattr(self.fn_, "__name__", type(self.fn_).__name__)
        return f"ElementwiseNumerical({name}, deg={self.deg})"

    def fn(self, x: Tensor) -> Tensor:
        return self.fn_(x)

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return nngp_quad(self.fn_, c, q1, q2, self.deg)

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return dot_quad(self.fn_, c, q1, q2, self.deg)


class Elementwise(ElementwiseLayer):
    """An elementwise nonlinearity with the user's closed-form NNGP map.

    Args:
        fn: the elementwise function of the finite network.
        nngp_fn: ``nngp_fn(cov12, var1, var2) -> E[fn(u) fn(v)]`` for a centred
            Gaussian pair, written with torch ops (broadcasting).
        d_nngp_fn: ``E[fn'(u) fn'(v)]`` with the same signature; when ``None`` it
            is ``d nngp_fn / d cov12`` by autograd (Price's theorem, valid for
            ``fn`` with a weak derivative).

    Examples:
        >>> from infnets import stax
        >>> square = stax.Elementwise(lambda x: x**2, lambda c, a, b: a * b + 2 * c**2)
        >>> net = stax.serial(stax.Dense(1), square)
        >>> net.kernel_fn(torch.ones(1, 3), None, 'nngp')
        tensor([[3.]])
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
        d_nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        for name, f in (("fn", fn), ("nngp_fn", nngp_fn)):
            if not callable(f):
                raise TypeError(f"Elementwise: {name} must be callable, got {type(f).__name__}.")
        if d_nngp_fn is not None and not callable(d_nngp_fn):
            raise TypeError("Elementwise: d_nngp_fn must be callable or None.")
        self.fn_, self.nngp_fn, self.d_nngp_fn = fn, nngp_fn, d_nngp_fn

    def __repr__(self) -> str:
        return f"Elementwise({getattr(self.fn_, '__name__', 'fn')})"

    def fn(self, x: Tensor) -> Tensor:
        return self.fn_(x)

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        return self.nngp_fn(c, q1, q2)

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.d_nngp_fn is not None:
            return self.d_nngp_fn(c, q1, q2)
        return price_derivative(self.nngp_fn, c, q1, q2)
