"""Order, chaos and criticality of deep networks at infinite width (mean-field signal propagation).

For an elementwise nonlinearity (any :mod:`infnets.stax` activation layer: closed form or
quadrature) and weight/bias scales ``W_std``, ``b_std``: the variance map and its fixed point
``q*``, the correlation map and its fixed points, ``chi_1``, ``chi_c``, the depth scales
``xi_q``, ``xi_c`` and the order-to-chaos critical line ``chi_1 = 1`` (Poole et al. 2016,
"Exponential expressivity in deep neural networks through transient chaos"; Schoenholz,
Gilmer, Ganguli & Sohl-Dickstein 2017, "Deep information propagation").
:func:`infnets.plot.phase_diagram` draws the phase diagram.

Examples:
    >>> from infnets import criticality, stax
    >>> out = criticality.criticality(stax.Erf(), W_std=1.5, b_std=0.1)
    >>> bool(out.chi_1 > 1)  # chaotic
    True
"""

from __future__ import annotations

from infnets._src.research.criticality import (
    Criticality,
    correlation_fixed_points,
    correlation_map,
    critical_line,
    criticality,
    variance_fixed_point,
    variance_map,
)

__all__ = [
    "Criticality",
    "correlation_fixed_points",
    "correlation_map",
    "critical_line",
    "criticality",
    "variance_fixed_point",
    "variance_map",
]
