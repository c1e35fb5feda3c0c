"""Elementwise nonlinearities, by family of closed form.

* :mod:`.base`: :class:`~.base.ElementwiseLayer` and the helpers its subclasses share;
* :mod:`.rectified` (ReLU family, sign, rectified monomials: arc-cosine kernels),
  :mod:`.smooth` (Erf, GELU, trigonometric, exponential), :mod:`.polynomial` (Hermite expansion);
* :mod:`.quadrature` (Gauss-Hermite expectations) and :mod:`.numerical` (``Elementwise``,
  ``ElementwiseNumerical``: any ``phi`` by quadrature or a user's ``nngp_fn``).

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`.
"""
