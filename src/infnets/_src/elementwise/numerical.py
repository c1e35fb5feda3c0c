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

from collections.abc import Callable

from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.elementwise.base import ElementwiseLayer, price_derivative
from infnets._src.elementwise.quadrature import DEFAULT_DEG, dot_quad, nngp_quad

__all__ = ["ElementwiseNumerical", "Elementwise"]


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

    For a centred Gaussian pair ``(u, v)`` the NNGP map is ``nngp_fn(c, q1, q2) =
    E[fn(u) fn(v)]`` and the NTK map ``Theta' = Theta E[fn'(u) fn'(v)]`` (Jacot et al.
    2018), where by Price's theorem ``E[fn'(u) fn'(v)] = d nngp_fn / dc`` (Han et al.
    2022, "Fast neural kernel embeddings for general activations"): the NTK follows from
    ``nngp_fn`` alone, by autograd, unless ``d_nngp_fn`` is given.

    Either side may be left out, as in Neural Tangents: ``fn=None`` gives a kernel-only
    layer (its finite twin raises when applied), ``nngp_fn=None`` a finite-only layer
    (its ``kernel_fn`` raises).

    Args:
        fn: the elementwise function of the finite network, or ``None``.
        nngp_fn: ``nngp_fn(cov12, var1, var2) -> E[fn(u) fn(v)]`` for a centred
            Gaussian pair, written with torch ops (broadcasting), or ``None``.
        d_nngp_fn: ``E[fn'(u) fn'(v)]`` with the same signature; when ``None`` it
            is ``d nngp_fn / d cov12`` by autograd (Price's theorem, valid for
            ``fn`` with a weak derivative).

    Raises:
        ValueError: neither ``fn`` nor ``nngp_fn`` is given.

    Examples:
        >>> from infnets import stax
        >>> square = stax.Elementwise(lambda x: x**2, lambda c, a, b: a * b + 2 * c**2)
        >>> net = stax.serial(stax.Dense(1), square)
        >>> net.kernel_fn(torch.ones(1, 3), None, 'nngp')
        tensor([[3.]])
        >>> kernel_only = stax.Elementwise(nngp_fn=lambda c, a, b: a * b + 2 * c**2)
        >>> stax.serial(stax.Dense(1), kernel_only).kernel_fn(torch.ones(1, 3), None, 'ntk')
        tensor([[4.]])
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor] | None = None,
        nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        d_nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if fn is None and nngp_fn is None:
            raise ValueError(
                "Elementwise: give fn (the finite network's function), nngp_fn (its "
                "kernel map E[fn(u) fn(v)]) or both; with neither the layer does nothing."
            )
        for name, f in (("fn", fn), ("nngp_fn", nngp_fn), ("d_nngp_fn", d_nngp_fn)):
            if f is not None and not callable(f):
                raise TypeError(
                    f"Elementwise: {name} must be callable or None, got {type(f).__name__}."
                )
        self.fn_, self.nngp_fn, self.d_nngp_fn = fn, nngp_fn, d_nngp_fn

    def __repr__(self) -> str:
        name = getattr(self.fn_ if self.fn_ is not None else self.nngp_fn, "__name__", "fn")
        return f"Elementwise({name})"

    def fn(self, x: Tensor) -> Tensor:
        if self.fn_ is None:
            raise NotImplementedError(
                f"{self!r} is kernel-only (fn=None): its finite network is undefined. Pass "
                "fn= to use apply_fn/to_module, or use only kernel_fn."
            )
        return self.fn_(x)

    def nngp_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.nngp_fn is None:
            raise NotImplementedError(
                f"{self!r} has no kernel map (nngp_fn=None). Pass nngp_fn=, or use "
                "stax.ElementwiseNumerical(fn) for kernels by quadrature."
            )
        return self.nngp_fn(c, q1, q2)

    def dot_map(self, c: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        if self.d_nngp_fn is not None:
            return self.d_nngp_fn(c, q1, q2)
        return price_derivative(self.nngp_map, c, q1, q2)
