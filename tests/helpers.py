"""Independent oracles shared by the stax tests.

* :func:`gauss_pair_expect`: ``E[f(u) g(v)]`` for a centred bivariate Gaussian by a
  polar-coordinate tensor Gauss-Legendre rule, with the angular integral split where
  ``u = 0`` or ``v = 0``. Every activation in the library is smooth away from those two
  lines through the origin (kinks and jumps of the ReLU family, ``sign``, the step), so
  each angular piece is smooth and the rule converges exponentially (~1e-13 relative
  for every activation tested). It shares no code with the library's Gauss-Hermite
  quadrature or its closed forms.
* :func:`monte_carlo_kernels`: NNGP and NTK estimates from independently sampled finite
  networks (the library's own ``init_fn``/``apply_fn`` twins), with standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.func import jacrev

from infnets import stax

Array = np.ndarray

_LEG_R = np.polynomial.legendre.leggauss(160)
_LEG_T = np.polynomial.legendre.leggauss(48)


def gauss_pair_expect(
    f: Callable[[Array], Array],
    g: Callable[[Array], Array],
    c: float,
    q1: float,
    q2: float,
    r_max: float = 14.0,
) -> float:
    """``E[f(u) g(v)]`` for centred Gaussians with ``Var u = q1``, ``Var v = q2``, ``Cov = c``.

    Writes ``u = sqrt(q1) r cos t`` and ``v = sqrt(q2) r cos(t - a)`` with ``cos a = rho``,
    ``(r, t)`` the polar coordinates of a standard 2-D normal (density
    ``r exp(-r^2 / 2) / (2 pi)``). The radial integral is truncated at ``r_max`` (the
    Gaussian tail beyond 14 is ``exp(-98)``).
    """
    s1, s2 = math.sqrt(q1), math.sqrt(q2)
    rho = 0.0 if s1 * s2 == 0 else max(-1.0, min(1.0, c / (s1 * s2)))
    a = math.atan2(math.sqrt(max(0.0, 1.0 - rho * rho)), rho)
    two_pi = 2 * math.pi
    # u = 0 at t = pi/2, 3pi/2; v = 0 at t = a +- pi/2
    cuts = {0.0, two_pi}
    for t0 in (math.pi / 2, 3 * math.pi / 2, a + math.pi / 2, a - math.pi / 2):
        cuts.add(t0 % two_pi)
    cuts_sorted = sorted(cuts)
    xr, wr = _LEG_R
    r = (xr + 1) * (r_max / 2)
    wr = wr * (r_max / 2)
    xt, wt = _LEG_T
    total = 0.0
    for lo, hi in zip(cuts_sorted[:-1], cuts_sorted[1:]):
        if hi - lo < 1e-14:
            continue
        t = lo + (xt + 1) * ((hi - lo) / 2)
        w = wt * ((hi - lo) / 2)
        rr, tt = np.meshgrid(r, t, indexing="ij")
        u = s1 * rr * np.cos(tt)
        v = s2 * rr * np.cos(tt - a)
        dens = rr * np.exp(-rr * rr / 2) / two_pi
        total += float(np.einsum("i,j,ij->", wr, w, f(u) * g(v) * dens))
    return total


# ----------------------------------------------------------------------- Monte Carlo
def tree_leaves(params: Any) -> list[torch.Tensor]:
    """The tensors of a nested dict/tuple/list of parameters, in order."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, dict):
        return [leaf for v in params.values() for leaf in tree_leaves(v)]
    if isinstance(params, (tuple, list)):
        return [leaf for v in params for leaf in tree_leaves(v)]
    return []


def empirical_ntk(apply_fn: Callable, params: Any, x: torch.Tensor, unit: int = 0) -> torch.Tensor:
    """``sum_p d f_unit(x_a) / d theta_p  d f_unit(x_b) / d theta_p`` for one output unit.

    The Jacobian of the finite network's output unit ``unit`` with respect to all its
    parameters comes from ``torch.func.jacrev`` on the functional ``apply_fn``.
    """
    jac = jacrev(lambda p: apply_fn(p, x)[:, unit])(params)  # leaves (N, *param_shape)
    n = x.shape[0]
    theta = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for j in tree_leaves(jac):
        jf = j.reshape(n, -1)
        theta += jf @ jf.T
    return theta


def monte_carlo_kernels(
    body: Sequence[stax.Layer],
    x: torch.Tensor,
    *,
    n_nets: int,
    n_out: int = 256,
    readout: tuple[float, float] = (1.0, 0.1),
    parameterization: str = "ntk",
    seed: int = 0,
) -> dict[str, Any]:
    """Sample ``n_nets`` independent finite networks ``serial(*body, Dense(n_out))``.

    NNGP: the ``n_out`` readout units are conditionally i.i.d. given the hidden layers;
    a network's estimate is ``Y Y^T / n_out``. NTK: the Jacobian inner product of its
    first readout unit (:func:`empirical_ntk`; every unit has the same NTK). The
    per-network estimates are i.i.d. across networks, so their mean has the entrywise
    standard error ``std / sqrt(n_nets)``.

    Returns:
        dict with ``nngp``/``ntk`` (means), ``nngp_se``/``ntk_se`` and the analytic
        ``kernel`` (a :class:`infnets.Kernel`) of the same architecture.
    """
    w_std, b_std = readout
    gen = torch.Generator().manual_seed(seed)
    net = stax.serial(*body, stax.Dense(n_out, w_std, b_std, parameterization))
    ks, ts = [], []
    for _ in range(n_nets):
        _, p = net.init_fn(gen, tuple(x.shape), dtype=x.dtype)
        y = net.apply_fn(p, x)
        ks.append(y @ y.T / n_out)
        ts.append(empirical_ntk(net.apply_fn, p, x))
    k_s, t_s = torch.stack(ks), torch.stack(ts)
    root = math.sqrt(n_nets)
    return {
        "nngp": k_s.mean(0),
        "nngp_se": k_s.std(0) / root,
        "ntk": t_s.mean(0),
        "ntk_se": t_s.std(0) / root,
        "kernel": net.kernel_fn(x, None),
    }


def assert_mc_agrees(
    mean: torch.Tensor,
    se: torch.Tensor,
    analytic: torch.Tensor,
    bias: float,
    what: str,
    n_sigma: float = 5.0,
) -> None:
    """``|mean - analytic| <= n_sigma * se + bias * scale`` entrywise.

    ``scale`` is the largest analytic diagonal entry, so ``bias`` is a relative
    finite-width allowance (``c / width``). With ~10 distinct entries per test and a few
    hundred tests, a 5-sigma bound keeps the false-alarm rate small even with the
    Student-t tails of an estimated standard error (seeds are fixed anyway).
    """
    scale = float(analytic.diagonal().abs().max())
    err = (mean - analytic).abs()
    tol = n_sigma * se + bias * scale
    worst = float((err - tol).max())
    z = float((err / se.clamp(min=1e-300)).max())
    assert worst <= 0, (
        f"{what}: Monte Carlo disagrees with the analytic kernel (max |z| = {z:.2f}).\n"
        f"analytic:\n{analytic}\nMonte Carlo mean:\n{mean}\nstandard error:\n{se}"
    )
    # power: the Monte Carlo resolves the kernel to a few percent (else the test is void)
    assert float(se.max()) < 0.04 * scale, f"{what}: Monte Carlo too noisy to be a test"
