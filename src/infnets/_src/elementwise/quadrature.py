r"""Two-dimensional Gauss-Hermite quadrature of Gaussian expectations ``E[f(u) f(v)]``.

Writing ``u = sqrt(q1) x`` and ``v = sqrt(q2) (rho x + sqrt(1 - rho^2) y)`` with independent
standard normal ``x, y``, ``E[g(u, v)] ~= sum_ij w_i w_j g(u(x_i), v(x_i, y_j))``, exact for
polynomials of degree ``< 2 deg`` in each variable (Golub & Welsch 1969). Derivatives come from
autograd. Pure tensor functions: no layer lives here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import safe_math as sm

__all__ = ["nngp_quad", "dot_quad", "DEFAULT_DEG"]

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
