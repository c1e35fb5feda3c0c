r"""Mean-field signal propagation through deep fully-connected networks: order, chaos, criticality.

A deep network ``z^{l+1} = W^{l+1} phi(z^l) / sqrt(n) * W_std + b_std b^{l+1}`` of infinite
width propagates, for two inputs, a variance ``q^l`` and a correlation ``c^l`` (Poole,
Lahiri, Raghu, Sohl-Dickstein & Ganguli 2016, "Exponential expressivity in deep neural networks
through transient chaos"; Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, "Deep information
propagation"):

* the variance map ``q^{l+1} = V(q^l) = W_std^2 E[phi(sqrt(q) z)^2] + b_std^2`` with fixed
  point ``q*`` and slope ``chi_q = V'(q*)``;
* the correlation map
  ``c^{l+1} = C(c^l) = (W_std^2 E[phi(u) phi(v)] + b_std^2) / q*`` with ``(u, v)`` centred
  Gaussian of variances ``q*`` and covariance ``c q*``; ``c = 1`` is always fixed;
* ``chi_1 = W_std^2 E[phi'(sqrt(q*) z)^2] = C'(1)``: ``chi_1 < 1`` is the ordered phase (all
  inputs become correlated, ``c* = 1``), ``chi_1 > 1`` the chaotic phase (a stable
  ``c* < 1``), ``chi_1 = 1`` the critical line;
* ``chi_c = W_std^2 E[phi'(u) phi'(v)]`` at ``c*`` (``= C'(c*)``), and the depth scales
  ``xi_q = -1 / log chi_q``, ``xi_c = -1 / log chi_c`` over which ``q^l`` and ``c^l``
  approach their fixed points (``|c^l - c*| ~ exp(-l / xi_c)``); ``xi_c`` diverges on the
  critical line, and networks are trainable to depths of about ``6 xi_c`` (Schoenholz et al.).

The expectations are the activation layer's own kernel maps (``nngp_map``/``dot_map``: closed
forms, or Gauss-Hermite quadrature for :class:`~infnets.stax.ElementwiseNumerical`), so the
maps are exactly those ``kernel_fn`` iterates. All functions broadcast over tensors of
``W_std`` and ``b_std`` (phase diagrams in one call).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Criticality",
    "variance_map",
    "correlation_map",
    "variance_fixed_point",
    "correlation_fixed_points",
    "criticality",
    "critical_line",
]

F64 = torch.float64

#: largest variance searched for ``q*`` (beyond it ``q*`` is reported as ``inf``)
Q_MAX = 2.0**40
_BISECT = 110


class Criticality(NamedTuple):
    """Signal-propagation quantities, each a float64 tensor of the broadcast shape of the inputs.

    Attributes:
        q_star: the variance fixed point ``q*`` (``inf`` where the variance diverges).
        c_star: the stable correlation fixed point ``c*`` (1 in the ordered phase).
        chi_1: ``W_std^2 E[phi'(sqrt(q*) z)^2]``, the slope of the correlation map at ``c = 1``.
        chi_c: ``W_std^2 E[phi'(u) phi'(v)]`` at ``c*``, the slope at the stable fixed point.
        chi_q: the slope of the variance map at ``q*``.
        xi_q: ``-1 / log chi_q``, the depth scale of the variance (``inf`` where ``chi_q >= 1``).
        xi_c: ``-1 / log chi_c``, the depth scale of the correlation (``inf`` on the line).
    """

    q_star: Tensor
    c_star: Tensor
    chi_1: Tensor
    chi_c: Tensor
    chi_q: Tensor
    xi_q: Tensor
    xi_c: Tensor


def _check_activation(activation: Any) -> Any:
    if not (hasattr(activation, "nngp_map") and hasattr(activation, "dot_map")):
        raise TypeError(
            "activation must be an infnets elementwise layer (stax.Relu(), stax.Erf(), "
            "stax.ElementwiseNumerical(torch.tanh), ...) with nngp_map/dot_map; got "
            f"{type(activation).__name__}."
        )
    return activation


def _as(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=F64).detach()


def _diag(activation: Any, q: Tensor) -> Tensor:
    """``E[phi(sqrt(q) z)^2]``."""
    with torch.no_grad():
        return activation.nngp_map(q, q, q)


def variance_map(activation: Any, q: Any, W_std: Any = 1.0, b_std: Any = 0.0) -> Tensor:  # noqa: N803
    r"""One layer of the variance map ``V(q) = W_std^2 E[phi(sqrt(q) z)^2] + b_std^2``.

    Args:
        activation: an infnets elementwise layer (its ``nngp_map`` gives the expectation).
        q: pre-activation variance(s) ``>= 0`` (tensor or float; broadcasts).
        W_std: weight standard deviation(s).
        b_std: bias standard deviation(s).

    Returns:
        The next layer's variance, float64, of the broadcast shape.

    Examples:
        >>> from infnets import criticality, stax
        >>> float(criticality.variance_map(stax.Relu(), 2.0, W_std=1.0, b_std=0.5))
        1.25
    """
    act = _check_activation(activation)
    q, w, b = torch.broadcast_tensors(_as(q), _as(W_std), _as(b_std))
    return w * w * _diag(act, q) + b * b


def correlation_map(
    activation: Any,
    c: Any,
    q: Any,
    W_std: Any = 1.0,  # noqa: N803
    b_std: Any = 0.0,
) -> Tensor:
    r"""One layer of the correlation map of two inputs of equal variance ``q``.

    ``C(c) = (W_std^2 E[phi(u) phi(v)] + b_std^2) / V(q)`` with ``Var u = Var v = q`` and
    ``Cov(u, v) = c q``; at ``q = q*`` the denominator is ``q*`` (Poole et al. 2016, eq. 5).

    Args:
        activation: an infnets elementwise layer.
        c: correlation(s) in ``[-1, 1]``.
        q: the common variance(s) (``q*`` for the map of Schoenholz et al. 2017).
        W_std: weight standard deviation(s).
        b_std: bias standard deviation(s).

    Returns:
        The next layer's correlation, float64, of the broadcast shape.

    Examples:
        >>> from infnets import criticality, stax
        >>> float(criticality.correlation_map(stax.Relu(), 1.0, 3.0, W_std=1.3, b_std=0.2))
        1.0
    """
    act = _check_activation(activation)
    c, q, w, b = torch.broadcast_tensors(_as(c), _as(q), _as(W_std), _as(b_std))
    with torch.no_grad():
        num = w * w * act.nngp_map(c * q, q, q) + b * b
    return num / (w * w * _diag(act, q) + b * b)


def variance_fixed_point(activation: Any, W_std: Any = 1.0, b_std: Any = 0.0) -> Tensor:  # noqa: N803
    r"""The stable fixed point ``q*`` of the variance map, by bisection (batched).

    ``g(q) = V(q) - q`` is ``>= 0`` at ``q = 0`` (``V(0) = W_std^2 phi(0)^2 + b_std^2``); the
    result is the first crossing of ``g`` from non-negative to negative found by bisection
    on ``[0, q_hi]`` with ``q_hi`` the first power of two where ``g < 0``: the attracting
    fixed point reached from small variances. Where ``g`` stays ``>= 0`` up to ``2^40``
    (e.g. ReLU with ``W_std^2 >= 2``) the variance diverges and ``inf`` is returned.

    Args:
        activation: an infnets elementwise layer.
        W_std: weight standard deviation(s).
        b_std: bias standard deviation(s).

    Returns:
        ``q*`` (float64, broadcast shape of ``W_std`` and ``b_std``).

    Examples:
        >>> from infnets import criticality, stax
        >>> q = criticality.variance_fixed_point(stax.Relu(), 1.0, 0.5)  # b^2 / (1 - W^2 / 2)
        >>> round(float(q), 6)
        0.5
    """
    act = _check_activation(activation)
    w, b = torch.broadcast_tensors(_as(W_std), _as(b_std))

    def g(q: Tensor) -> Tensor:
        return w * w * _diag(act, q) + b * b - q

    hi = torch.ones_like(w)
    found = g(hi) < 0
    while not bool(found.all()) and float(hi[~found].min()) < Q_MAX:
        hi = torch.where(found, hi, 2 * hi)
        found = found | (g(hi) < 0)
    lo = torch.zeros_like(w)
    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        up = g(mid) >= 0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    q = 0.5 * (lo + hi)
    return torch.where(found, q, torch.full_like(q, math.inf))


def _finite_q(q: Tensor) -> Tensor:
    return torch.where(torch.isfinite(q), q, torch.full_like(q, Q_MAX))


def _slope_q(act: Any, q: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``dV/dq`` by a central difference (forward at ``q ~ 0``); ``O(h^2)``, ``h = 1e-5 q``."""
    h = 1e-5 * torch.clamp(q, min=1e-8)
    lo = torch.clamp(q - h, min=0.0)
    hi = lo + 2 * h
    return w * w * (_diag(act, hi) - _diag(act, lo)) / (hi - lo)


def _stable_c(act: Any, q: Tensor, w: Tensor, b: Tensor, chi_1: Tensor, grid: int) -> Tensor:
    """Largest root below 1 of ``C(c) - c`` where ``chi_1 > 1`` (else 1), by grid + bisection."""
    c_star = torch.ones_like(q)
    chaotic = chi_1 > 1
    if not bool(chaotic.any()):
        return c_star
    qc, wc, bc = q[chaotic], w[chaotic], b[chaotic]
    cs = torch.linspace(-1.0, 1.0, grid, dtype=F64)
    h = correlation_map(act, cs[:, None], qc, wc, bc) - cs[:, None]  # (G, B)
    nonneg = (h[:-1] >= 0).to(F64) * torch.arange(grid - 1, dtype=F64)[:, None]
    k = nonneg.argmax(0)  # largest index below 1 with h >= 0 (h(-1) >= 0 always)
    lo, hi = cs[k], cs[k + 1]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        up = correlation_map(act, mid, qc, wc, bc) - mid >= 0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    c_star[chaotic] = 0.5 * (lo + hi)
    return c_star


def correlation_fixed_points(
    activation: Any,
    W_std: float = 1.0,  # noqa: N803
    b_std: float = 0.0,
    grid: int = 2001,
) -> Tensor:
    r"""Every fixed point of the correlation map at ``q*`` in ``[-1, 1]`` (one ``W_std, b_std``).

    Roots of ``C(c) - c`` bracketed on a grid of ``grid`` points and refined by bisection;
    ``c = 1`` is always one. Stability is read from ``C'(c*)`` (:func:`criticality` gives the
    stable one and its slope ``chi_c``).

    Args:
        activation: an infnets elementwise layer.
        W_std: weight standard deviation.
        b_std: bias standard deviation.
        grid: number of grid points on ``[-1, 1]``.

    Returns:
        The sorted fixed points, a 1-D float64 tensor.

    Examples:
        >>> import torch
        >>> from infnets import criticality, stax
        >>> fps = criticality.correlation_fixed_points(stax.Erf(), W_std=2.5, b_std=0.0)
        >>> [round(float(c), 6) + 0.0 for c in fps]  # odd phi, no bias: -1, 0, 1
        [-1.0, 0.0, 1.0]
    """
    act = _check_activation(activation)
    q = _finite_q(variance_fixed_point(act, W_std, b_std))
    w, b = _as(W_std), _as(b_std)
    cs = torch.linspace(-1.0, 1.0, grid, dtype=F64)
    h = correlation_map(act, cs, q, w, b) - cs
    tol = 1e-12
    zero = h.abs() <= tol
    roots = [cs[zero]]
    change = (h[:-1] * h[1:] < 0) & ~zero[:-1] & ~zero[1:]
    idx = torch.nonzero(change).flatten()
    if idx.numel():
        lo, hi = cs[idx], cs[idx + 1]
        sign_lo = torch.sign(h[idx])
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            same = torch.sign(correlation_map(act, mid, q, w, b) - mid) == sign_lo
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        roots.append(0.5 * (lo + hi))
    out = torch.cat(roots + [torch.ones(1, dtype=F64)]).sort().values
    keep = torch.cat([torch.ones(1, dtype=torch.bool), out[1:] - out[:-1] > 1e-9])
    return out[keep]


def criticality(
    activation: Any,
    W_std: Any = 1.0,  # noqa: N803
    b_std: Any = 0.0,
    grid: int = 513,
) -> Criticality:
    r"""``q*``, ``c*``, ``chi_1``, ``chi_c``, ``chi_q`` and the depth scales, batched.

    See the module docstring for the definitions (Schoenholz et al. 2017, eqs. 3-9). ``c*``
    is 1 where ``chi_1 <= 1``, else the largest fixed point of the correlation map below 1
    (the one reached from any ``c < 1`` near 1). Where ``q*`` is infinite the slopes are
    evaluated at ``q = 2^40`` (exact for positively homogeneous ``phi`` such as ReLU).

    Args:
        activation: an infnets elementwise layer (closed form or quadrature).
        W_std: weight standard deviation(s) (tensor or float; broadcasts with ``b_std``).
        b_std: bias standard deviation(s).
        grid: points of the grid bracketing ``c*`` in the chaotic phase.

    Returns:
        A :class:`Criticality` of float64 tensors of the broadcast shape.

    Examples:
        >>> import torch
        >>> from infnets import criticality, stax
        >>> out = criticality.criticality(stax.Relu(), W_std=1.2, b_std=0.3)
        >>> round(float(out.chi_1), 6), round(float(out.q_star), 6)  # W^2/2, b^2/(1-W^2/2)
        (0.72, 0.321429)
        >>> grid = criticality.criticality(stax.Erf(), torch.linspace(0.5, 3, 6)[:, None],
        ...                                torch.linspace(0, 1, 4))
        >>> grid.xi_c.shape
        torch.Size([6, 4])
    """
    act = _check_activation(activation)
    w, b = torch.broadcast_tensors(_as(W_std), _as(b_std))
    shape = w.shape
    w, b = w.reshape(-1), b.reshape(-1)
    q_star = variance_fixed_point(act, w, b)
    q = _finite_q(q_star)
    with torch.no_grad():
        chi_1 = w * w * act.dot_map(q, q, q)
    c_star = _stable_c(act, q, w, b, chi_1, grid)
    with torch.no_grad():
        chi_c = torch.where(c_star < 1, w * w * act.dot_map(c_star * q, q, q), chi_1)
    chi_q = _slope_q(act, q, w, b)

    def depth(chi: Tensor) -> Tensor:
        safe = torch.where((chi > 0) & (chi < 1), chi, torch.full_like(chi, 0.5))
        xi = -1.0 / torch.log(safe)
        xi = torch.where(chi >= 1, torch.full_like(chi, math.inf), xi)
        return torch.where(chi <= 0, torch.zeros_like(chi), xi)

    fields = (q_star, c_star, chi_1, chi_c, chi_q, depth(chi_q), depth(chi_c))
    return Criticality(*(f.reshape(shape) for f in fields))


def critical_line(
    activation: Any,
    b_std: Any,
    q_range: tuple[float, float] = (1e-12, 1e8),
) -> tuple[Tensor, Tensor]:
    r"""The order-to-chaos line ``chi_1 = 1``: the critical ``W_std`` for each ``b_std``.

    On the line, ``W_std^2 = 1 / E[phi'(sqrt(q*) z)^2]`` and, from ``q* = V(q*)``,
    ``b_std^2 = q* - E[phi(sqrt(q*) z)^2] / E[phi'(sqrt(q*) z)^2]``: a curve parametrised
    by ``q*`` (Schoenholz et al. 2017, Fig. 1; Pennington, Schoenholz & Ganguli 2017). For
    each ``b_std`` its ``q*`` is found by bisection in ``log q*`` (``b_std^2(q*)`` increasing).
    For positively homogeneous ``phi`` (ReLU family) ``chi_1`` does not depend on ``q``, the
    line is ``W_std = 1 / sqrt(E[phi'^2])`` for every ``b_std`` (with ``q* = inf`` where
    ``b_std > 0``). Targets beyond ``q_range`` give NaN. Each target is bracketed by the first
    of 161 log-spaced probes of ``q`` where ``b_std^2(q)`` reaches it, then bisected.

    Args:
        activation: an infnets elementwise layer.
        b_std: bias standard deviation(s) (tensor or float).
        q_range: the ``(q_min, q_max)`` searched for ``q*``.

    Returns:
        ``(W_std, q_star)`` on the critical line, float64 tensors shaped like ``b_std``.

    Examples:
        >>> import torch
        >>> from infnets import criticality, stax
        >>> w, q = criticality.critical_line(stax.Relu(), torch.tensor([0.0, 0.5]))
        >>> [round(float(v), 6) for v in w]
        [1.414214, 1.414214]
        >>> import math
        >>> w, q = criticality.critical_line(stax.Erf(), 0.0)  # erf'(0)^2 = 4/pi
        >>> round(float(w) ** 2, 6) == round(math.pi / 4, 6)
        True
    """
    act = _check_activation(activation)
    target = _as(b_std) ** 2
    shape = target.shape
    target = target.reshape(-1)
    lo_q, hi_q = (float(v) for v in q_range)

    def curve(q: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            e1 = act.dot_map(q, q, q)
        return 1.0 / e1, q - _diag(act, q) / e1  # W^2, b^2

    probe = torch.logspace(math.log10(lo_q), math.log10(hi_q), 161, dtype=F64)
    w2_probe, b2_probe = curve(probe)
    homogeneous = bool((w2_probe - w2_probe[0]).abs().max() <= 1e-9 * w2_probe[0].abs())
    if homogeneous:
        w = torch.full_like(target, float(w2_probe[0]) ** 0.5)
        q = torch.where(target > 0, torch.full_like(target, math.inf), torch.zeros_like(target))
        return w.reshape(shape), q.reshape(shape)
    # the first probe at or above each target brackets it (robust to quadrature breaking
    # down at very large q, where b^2(q) computed by a fixed rule stops increasing)
    above = b2_probe[None, :] >= target[:, None]  # (B, P)
    reached = above.any(1)
    idx = torch.where(reached, above.to(torch.int64).argmax(1), torch.zeros_like(target).long())
    log_probe = probe.log()
    lo = log_probe[(idx - 1).clamp(min=0)]
    hi = log_probe[idx]
    for _ in range(_BISECT // 2):
        mid = 0.5 * (lo + hi)
        below = curve(mid.exp())[1] < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    q = torch.where(idx == 0, probe[0], (0.5 * (lo + hi)).exp())
    w2 = curve(q)[0]
    w = torch.where(reached, w2.sqrt(), torch.full_like(w2, math.nan))
    q = torch.where(reached, q, torch.full_like(q, math.nan))
    return w.reshape(shape), q.reshape(shape)
