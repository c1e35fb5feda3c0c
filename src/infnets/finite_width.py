"""Finite-width corrections to infinite-width kernels.

:func:`finite_width_nngp` gives the NNGP of a deep fully-connected network together with its
leading ``1/width`` correction, ``E[f(x) f(x')] = K + m / n + O(n^{-2})`` over random
initialisations at width ``n``, and the four-point vertex ``V`` (``Var[G] = V / n`` for the
empirical kernel), by the recursions of Roberts, Yaida & Hanin 2022, "The principles of deep
learning theory" (ch. 4-5). ``benchmarks/finite_width.py`` compares it with Monte Carlo over
finite networks at widths 32-256.
"""

from __future__ import annotations

from infnets._src.research.finite_width import FiniteWidthNNGP, finite_width_nngp

__all__ = ["FiniteWidthNNGP", "finite_width_nngp"]
