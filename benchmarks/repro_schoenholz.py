"""Order-to-chaos critical line of tanh and erf (Schoenholz et al. 2017; Poole et al. 2016).

Prints, for a range of ``sigma_b^2``, the critical ``sigma_w^2`` (``chi_1 = 1``) of tanh (by
Gauss-Hermite quadrature, ``ElementwiseNumerical(torch.tanh, deg=100)``) and erf (closed form),
the erf line from its independent closed form
``sigma_w^2 = (pi/4) sqrt(1 + 4 q*)``, ``sigma_b^2 = q* - sigma_w^2 (2/pi) arcsin(2q*/(1+2q*))``,
and the correlation depth scale ``xi_c`` and the predicted maximal trainable depth
``6 xi_c`` of Schoenholz et al. at ``sigma_b^2 = 0.05`` for several ``sigma_w^2``; saves the
tanh phase diagram.

Run::

    python benchmarks/repro_schoenholz.py
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from infnets import criticality, plot, stax  # noqa: E402

TANH = stax.ElementwiseNumerical(torch.tanh, deg=100)


def erf_line(b2: np.ndarray) -> np.ndarray:
    """The erf critical sigma_w^2 at each sigma_b^2, from the parametric closed form."""
    qs = np.logspace(-8, 4, 200001)
    w2 = np.pi / 4 * np.sqrt(1 + 4 * qs)
    line_b2 = qs - w2 * (2 / np.pi) * np.arcsin(2 * qs / (1 + 2 * qs))
    return np.interp(b2, line_b2, w2)


def main() -> None:
    t0 = time.time()
    b2 = np.array([0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
    b = torch.tensor(np.sqrt(b2))
    w_tanh, q_tanh = criticality.critical_line(TANH, b)
    w_erf, q_erf = criticality.critical_line(stax.Erf(), b)
    print("Critical line chi_1 = 1 (sigma_w^2 at each sigma_b^2)")
    print("| sigma_b^2 | tanh sigma_w^2 | tanh q* | erf sigma_w^2 | erf closed form | erf q* |")
    print("|---|---|---|---|---|---|")
    ref = erf_line(b2)
    for i, bb in enumerate(b2):
        print(
            f"| {bb:g} | {float(w_tanh[i]) ** 2:.4f} | {float(q_tanh[i]):.4g} | "
            f"{float(w_erf[i]) ** 2:.4f} | {ref[i]:.4f} | {float(q_erf[i]):.4g} |"
        )
    print("\nDepth scales at sigma_b^2 = 0.05 (tanh); trainable depth ~ 6 xi_c (Schoenholz et al.)")
    print("| sigma_w^2 | q* | chi_1 | c* | xi_q | xi_c | 6 xi_c |")
    print("|---|---|---|---|---|---|---|")
    w2s = torch.tensor([1.0, 1.3, 1.5, 1.7, float(w_tanh[2]) ** 2, 2.0, 2.5, 3.0, 4.0])
    out = criticality.criticality(TANH, w2s.sqrt(), math.sqrt(0.05))
    for i, w2 in enumerate(w2s.tolist()):
        print(
            f"| {w2:.4f} | {float(out.q_star[i]):.4f} | {float(out.chi_1[i]):.4f} | "
            f"{float(out.c_star[i]):.4f} | {float(out.xi_q[i]):.2f} | {float(out.xi_c[i]):.1f} | "
            f"{6 * float(out.xi_c[i]):.0f} |"
        )
    fig, axes = plot.figure(ncols=2, size=(5.0, 4.0))
    grid_w = torch.linspace(0.5, 2.0, 31)
    grid_b = torch.linspace(0.0, 0.55, 23)
    coarse = stax.ElementwiseNumerical(torch.tanh, deg=32)  # plenty for a picture, 10x cheaper
    plot.phase_diagram(coarse, grid_w, grid_b, ax=axes[0], title="tanh: log10 xi_c")
    plot.phase_diagram(stax.Erf(), grid_w, grid_b, ax=axes[1], title="erf: log10 xi_c")
    out_dir = os.path.join(os.path.dirname(__file__), "figures")
    print("figure:", plot.save(fig, os.path.join(out_dir, "phase_diagram.png")))
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
