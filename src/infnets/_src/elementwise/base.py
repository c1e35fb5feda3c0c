r"""The base of elementwise nonlinearities and the helpers their closed forms share.

For a nonlinearity ``phi`` applied to a centred Gaussian pair ``(u, v)`` with
``Var u = q1``, ``Var v = q2`` and ``Cov(u, v) = c``, the infinite-width layer maps

* the NNGP: ``K' = E[phi(u) phi(v)]`` (Neal 1996; Lee et al. 2018);
* the NTK: ``Theta' = Theta * E[phi'(u) phi'(v)]`` (Jacot et al. 2018; Arora et al. 2019).

By Price's theorem ``E[phi'(u) phi'(v)] = d E[phi(u) phi(v)] / dc``, which is how
the derivative kernel is obtained by autograd where no closed form is written.
Each subclass (:mod:`.rectified`, :mod:`.smooth`, :mod:`.polynomial`,
:mod:`.numerical`) implements ``nngp_map(c, q1, q2)`` and ``dot_map(c, q1, q2)``
as batched tensor code; ``q1``/``q2`` broadcast against ``c``.

Nonlinearities need Gaussian inputs: they must follow an affine layer (``Dense``,
``Conv``) or a sum/concatenation of such branches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import safe_math as sm
from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import Params
from infnets._src.evaluate import compiled
from infnets._src.layers.base import Layer

__all__ = [
    "ElementwiseLayer",
    "price_derivative",
    "check_floats",
    "poly_eval",
    "sqrt_one_minus_square",
    "TWO_PI",
]


TWO_PI = 2 * math.pi


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


def check_floats(layer: Layer, names: tuple[str, ...]) -> None:
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
            if pre is not None and compiled.enabled(c, per_example=True):  # cov1 / cov2
                done = self._compiled_map(c, q1, q2, None)
                if done is not None:
                    return done[0]
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
        return self._compiled_map(k.nngp, *k.pair_variances(), k.ntk)

    def _compiled_map(
        self, c: Tensor, q1: Tensor, q2: Tensor, ntk: Tensor | None
    ) -> tuple[Tensor, Tensor | None] | None:
        """``compiled.pair_map`` of covariances ``c`` with the members' variances ``q1, q2``."""
        f1 = self.pair_factors(q1)[0]  # type: ignore[attr-defined]
        f2 = self.pair_factors(q2)[1]  # type: ignore[attr-defined]
        return compiled.pair_map(self, c, f1, f2, ntk)


def sqrt_one_minus_square(rho: Tensor) -> Tensor:
    """``sqrt(1 - rho^2)`` for ``|rho| <= 1``, as ``u rsqrt(u)`` (cheaper than ``sqrt`` on CPU)."""
    u = torch.addcmul(sm.scalar_like(1.0, rho), rho, rho, value=-1)  # >= 0 exactly when |rho| <= 1
    return torch.clamp(u, min=torch.finfo(rho.dtype).tiny).rsqrt_().mul_(u)


def poly_eval(poly: np.ndarray, q: Tensor) -> Tensor:
    out = torch.full_like(q, float(poly[-1]))
    for a in poly[-2::-1]:
        out = out * q + float(a)
    return out
