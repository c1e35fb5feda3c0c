r"""The leading ``1/width`` correction to the NNGP of a deep fully-connected network.

The network (``infnets.stax`` conventions, NTK or standard parameterization alike at
initialisation) is ``z^1 = W_std W^1 x / sqrt(d) + b_std b^1`` and
``z^{l+1} = W_std W^{l+1} phi(z^l) / sqrt(n) + b_std b^{l+1}`` for ``l = 1..L`` (``L`` hidden
layers of width ``n``, ``depth = L``), ``f = z^{L+1}``. Write ``C_W = W_std^2``, ``C_b =
b_std^2`` and ``G^l_{ab} = C_b + C_W / n sum_j phi(z^{l-1}_{j;a}) phi(z^{l-1}_{j;b})`` for the
*empirical* kernel feeding layer ``l`` (``G^1 = K^1`` is deterministic). Given ``G^l`` the
``n`` neurons of layer ``l`` are i.i.d. ``N(0, G^l)``, so ``G^l`` is a Markov chain with

* ``E[G^{l+1} | G^l] = C_b + C_W <phi phi>_{G^l}`` (the infinite-width map ``F``);
* ``Cov[G^{l+1} | G^l] = C_W^2 Cov_{G^l}(phi_a phi_b, phi_c phi_d) / n``.

Expanding ``F`` around the infinite-width kernel ``K^l`` to second order (the deviations are
``O(n^{-1/2})``, their third moments ``O(n^{-2})``) gives, with ``E[G^l] = K^l + m^l / n`` and
``Cov[G^l] = V^l / n``, the recursions of Roberts, Yaida & Hanin 2022 ("The principles of
deep learning theory", ch. 4, eqs. 4.90 and 4.115: the four-point vertex ``V`` and the NLO
metric ``m = G^{{1}}``):

* ``V^{l+1} = C_W^2 Cov_{K^l}(phi phi, phi phi) + J^l V^l (J^l)^T``,
* ``m^{l+1} = J^l m^l + 1/2 H^l : V^l``,

with ``J = dF/dK`` and ``H = d^2 F/dK^2`` over the distinct entries of the kernel, and
``V^1 = m^1 = 0``. Then ``E[f(x_a) f(x_b)] = K^{L+1}_{ab} + m^{L+1}_{ab} / n + O(n^{-2})``.

Every entry ``(a, b)`` needs only the chain restricted to ``{x_a, x_b}`` (a marginal of a
Markov chain of Gaussian layers is one), so pairs are solved as batched two-input problems.
The Gaussian expectations use quadrature in ``z``-space with fixed nodes, and the
derivatives in ``K`` act on the density ratio ``p_K(z) / p_{K_0}(z)`` only (the score
functions), never on ``phi``: kinks (ReLU) and jumps are handled exactly. Rules: polar
coordinates for the ReLU family (``ABRelu``: Gauss-Laguerre in ``r^2 / 2``, exact for the
homogeneous integrands, and Gauss-Legendre on the arcs between the kinks) and tensor
Gauss-Hermite for other (smooth) nonlinearities.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.special import roots_genlaguerre
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

from infnets._src.elementwise.rectified import ABRelu

__all__ = ["FiniteWidthNNGP", "finite_width_nngp"]

F64 = torch.float64

#: pairs whose input correlation is within this of +-1 are treated as identical inputs
DEGENERATE = 1e-9


class FiniteWidthNNGP(NamedTuple):
    """The NNGP of a deep MLP with its leading finite-width correction.

    Attributes:
        nngp: ``(N1, N2)`` infinite-width NNGP ``K`` of the output.
        correction: ``(N1, N2)`` coefficient ``m`` with ``E[f(x_a) f(x_b)] = K + m / n +
            O(n^{-2})`` over random initialisations of width-``n`` networks.
        variance: ``(N1, N2)`` coefficient ``V_{(ab)(ab)}`` with ``Var[G_ab] = V / n +
            O(n^{-2})`` for the empirical output kernel ``G = C_b + C_W phi(z^L) . phi(z^L) / n``
            (the four-point vertex on the diagonal of entry pairs).
    """

    nngp: Tensor
    correction: Tensor
    variance: Tensor

    def at(self, width: float) -> Tensor:
        """``nngp + correction / width``: the expected kernel at a finite ``width``."""
        return self.nngp + self.correction / float(width)


# ---------------------------------------------------------------- quadrature rules
@functools.lru_cache(maxsize=8)
def _gauss_hermite(deg: int, dim: int) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.hermite_e.hermegauss(deg)
    w = w / w.sum()
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    weights = np.prod(np.meshgrid(*([w] * dim), indexing="ij"), axis=0)
    nodes = np.stack([g.reshape(-1) for g in grids], -1)
    return torch.as_tensor(nodes, dtype=F64), torch.as_tensor(weights.reshape(-1), dtype=F64)


@functools.lru_cache(maxsize=8)
def _laguerre(n: int, alpha: float) -> tuple[Tensor, Tensor]:
    s, w = roots_genlaguerre(n, alpha)
    return torch.as_tensor(s, dtype=F64), torch.as_tensor(w / w.sum(), dtype=F64)


def _polar_rule(chol: Tensor, n_radial: int, n_arc: int) -> tuple[Tensor, Tensor]:
    """Nodes ``(B, P, d)`` and weights ``(B, P)`` of ``N(0, I_d)`` for kinks along ``(L x)_a = 0``.

    ``d = 2``: ``x = sqrt(2 s) (cos t, sin t)``, ``s`` Gauss-Laguerre (``r dr = ds``), ``t``
    Gauss-Legendre on each arc between the four angles where ``L x`` has a zero coordinate.
    ``d = 1``: ``x = +-sqrt(2 s)`` with generalized Gauss-Laguerre (``alpha = -1/2``).
    """
    b, d = chol.shape[0], chol.shape[-1]
    if d == 1:
        s, ws = _laguerre(n_radial, -0.5)
        r = torch.sqrt(2 * s)
        nodes = torch.cat([r, -r])[None, :, None].expand(b, -1, 1)
        return nodes, (torch.cat([ws, ws]) / 2)[None].expand(b, -1)
    s, ws = _laguerre(n_radial, 0.0)
    r = torch.sqrt(2 * s)
    u_np, wu_np = np.polynomial.legendre.leggauss(n_arc)
    u, wu = torch.as_tensor(u_np, dtype=F64), torch.as_tensor(wu_np, dtype=F64)
    t1 = math.pi / 2 * torch.ones(b, dtype=F64)
    t2 = torch.atan2(-chol[:, 1, 0], chol[:, 1, 1])
    kinks = torch.stack([t1, t1 + math.pi, t2, t2 + math.pi], -1).remainder(2 * math.pi)
    kinks = kinks.sort(-1).values
    ends = torch.cat([kinks[:, 1:], kinks[:, :1] + 2 * math.pi], -1)
    width = ends - kinks  # (B, 4) arcs covering the circle
    theta = kinks[..., None] + width[..., None] * (u + 1) / 2  # (B, 4, m)
    w_theta = width[..., None] * wu / 2 / (2 * math.pi)
    theta, w_theta = theta.reshape(b, -1), w_theta.reshape(b, -1)
    dirs = torch.stack([torch.cos(theta), torch.sin(theta)], -1)  # (B, A, 2)
    nodes = (dirs[:, :, None, :] * r[None, None, :, None]).reshape(b, -1, 2)
    weights = (w_theta[:, :, None] * ws[None, None, :]).reshape(b, -1)
    return nodes, weights


# ---------------------------------------------------------------- one layer of the chain
def _matrix(k: Tensor, d: int) -> Tensor:
    """Symmetric ``(..., d, d)`` kernel from its distinct entries ``(k_00[, k_01, k_11])``."""
    if d == 1:
        return k[..., None]
    row0 = torch.stack([k[..., 0], k[..., 1]], -1)
    row1 = torch.stack([k[..., 1], k[..., 2]], -1)
    return torch.stack([row0, row1], -2)


def _entries(pa: Tensor, d: int) -> Tensor:
    """``phi_a phi_b`` for the distinct entries, from ``pa`` of shape ``(..., d)``."""
    if d == 1:
        return pa * pa
    return torch.stack([pa[..., 0] ** 2, pa[..., 0] * pa[..., 1], pa[..., 1] ** 2], -1)


def _weighted_mean(k: Tensor, z: Tensor, f: Tensor, w: Tensor, k0_inv: Tensor, logdet0: Tensor):
    """``E_{N(0, K(k))}[f]`` with nodes drawn for ``K_0``: weights times ``p_K / p_{K_0}``."""
    d = z.shape[-1]
    kmat = _matrix(k, d)
    if d == 1:
        inv, logdet = 1 / kmat, torch.log(kmat[..., 0, 0])
    else:
        det = kmat[0, 0] * kmat[1, 1] - kmat[0, 1] ** 2
        inv = (
            torch.stack(
                [torch.stack([kmat[1, 1], -kmat[0, 1]]), torch.stack([-kmat[0, 1], kmat[0, 0]])]
            )
            / det
        )
        logdet = torch.log(det)
    quad = torch.einsum("pi,ij,pj->p", z, inv - k0_inv, z)
    ratio = torch.exp(-0.5 * quad - 0.5 * (logdet - logdet0))
    return (w * ratio) @ f


class _Layer(NamedTuple):
    jac: Tensor  # (B, E, E)
    hess: Tensor  # (B, E, E, E)
    cov4: Tensor  # (B, E, E)


def _layer_terms(act: Any, k: Tensor, d: int, c_w: float, rule: tuple) -> _Layer:
    """``J``, ``H`` (times ``C_W``) and ``C_W^2 Cov(phi phi, phi phi)`` at kernels ``k (B, E)``."""
    kmat = _matrix(k, d)
    chol = torch.linalg.cholesky(kmat)
    if rule[0] == "polar":
        x, w = _polar_rule(chol, rule[1], rule[2])
    else:
        xg, wg = _gauss_hermite(rule[1], d)
        x, w = xg[None].expand(k.shape[0], -1, -1), wg[None].expand(k.shape[0], -1)
    z = torch.einsum("bij,bpj->bpi", chol, x)  # (B, P, d)
    with torch.no_grad():
        f = _entries(act.fn(z), d)  # (B, P, E)
    mean = torch.einsum("bp,bpe->be", w, f)
    second = torch.einsum("bp,bpe,bpf->bef", w, f, f)
    cov4 = c_w**2 * (second - mean[:, :, None] * mean[:, None, :])
    k0_inv = torch.linalg.inv(kmat)
    logdet0 = torch.logdet(kmat)
    jac = vmap(jacrev(_weighted_mean))(k, z, f, w, k0_inv, logdet0)
    hess = vmap(jacfwd(jacrev(_weighted_mean)))(k, z, f, w, k0_inv, logdet0)
    return _Layer(c_w * jac, c_w * hess, cov4)


def _next_kernel(act: Any, k: Tensor, d: int, c_w: float, c_b: float) -> Tensor:
    """The infinite-width map on distinct entries, by the layer's own (closed-form) map."""
    with torch.no_grad():
        if d == 1:
            return c_b + c_w * act.nngp_map(k, k, k)
        out = c_w * act.nngp_map(k[:, 1], k[:, 0], k[:, 2]) + c_b
        diag = c_w * act.nngp_map(k[:, [0, 2]], k[:, [0, 2]], k[:, [0, 2]]) + c_b
        return torch.stack([diag[:, 0], out, diag[:, 1]], -1)


def _chain(act: Any, k1: Tensor, depth: int, c_w: float, c_b: float, rule: tuple) -> tuple:
    """Run ``K``, ``m``, ``V`` through ``depth`` hidden layers for a batch of sub-problems."""
    b, e = k1.shape
    d = 1 if e == 1 else 2
    k, m = k1, torch.zeros_like(k1)
    v = torch.zeros(b, e, e, dtype=F64)
    for _ in range(depth):
        terms = _layer_terms(act, k, d, c_w, rule)
        m = torch.einsum("bij,bj->bi", terms.jac, m) + 0.5 * torch.einsum(
            "bijk,bjk->bi", terms.hess, v
        )
        v = terms.cov4 + terms.jac @ v @ terms.jac.transpose(-1, -2)
        k = _next_kernel(act, k, d, c_w, c_b)
    return k, m, v


def finite_width_nngp(
    activation: Any,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    W_std: float = 1.0,  # noqa: N803
    b_std: float = 0.0,
    deg: int | None = None,
) -> FiniteWidthNNGP:
    r"""Infinite-width NNGP of a deep MLP and its leading ``1/width`` correction.

    For ``stax.serial(Dense(n, W_std, b_std), phi, ..., Dense(n, W_std, b_std), phi,
    Dense(k, W_std, b_std))`` with ``depth`` hidden layers of width ``n``, returns ``K`` and
    ``m`` with ``E[f(x_a) f(x_b)] = K_ab + m_ab / n + O(n^{-2})`` (the expectation over random
    initialisations of one output unit), by the four-point-vertex recursion of Roberts,
    Yaida & Hanin 2022, "The principles of deep learning theory", ch. 4-5 (see the module
    docstring), and the vertex ``V`` with ``Var[G_ab] = V_ab / n`` of the empirical kernel of
    the last hidden layer. ``m = 0`` for ``depth = 1`` (one hidden layer is exactly
    Gaussian-mean at any width).

    Covered: fully-connected networks of one width ``n`` in every hidden layer, any
    ``depth >= 1``, ``phi`` of the ReLU family (``Relu``, ``LeakyRelu``, ``ABRelu``, ``Abs``;
    exact quadrature) or any smooth elementwise layer (``Erf``, ``ElementwiseNumerical(tanh)``,
    ``Gelu``...; Gauss-Hermite, ``deg`` nodes per dimension). Pairs of identical inputs use the
    one-input chain; pairs with correlation ``-1`` (antipodal inputs without bias) give NaN.
    Not covered: the NTK's correction (it needs the ``1/n`` dynamics: the ``dNTK`` and
    ``ddNTK`` of ch. 11), convolutions, higher orders in ``1/n`` and fluctuations of a single
    network's kernel beyond ``V``.

    Args:
        activation: an infnets elementwise layer (its ``fn`` and ``nngp_map`` are used).
        x1: ``(N1, d)`` inputs.
        x2: ``(N2, d)`` inputs or ``None`` for ``x1``.
        depth: number of hidden layers ``L >= 1``.
        W_std: weight standard deviation of every ``Dense`` layer.
        b_std: bias standard deviation of every ``Dense`` layer.
        deg: quadrature nodes (Gauss-Hermite per dimension for smooth ``phi``, default 64;
            Gauss-Legendre per arc for the ReLU family, default 24).

    Returns:
        A :class:`FiniteWidthNNGP` of ``(N1, N2)`` float64 tensors; ``.at(n)`` is the corrected
        kernel at width ``n``.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> from infnets.finite_width import finite_width_nngp
        >>> x = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
        >>> out = finite_width_nngp(stax.Relu(), x, depth=3, W_std=1.4, b_std=0.1)
        >>> out.at(64).shape
        torch.Size([2, 2])
        >>> net = stax.serial(*[stax.Dense(1, 1.4, 0.1), stax.Relu()] * 3, stax.Dense(1, 1.4, 0.1))
        >>> torch.allclose(out.nngp, net.kernel_fn(x, None, "nngp"))
        True
    """
    if not (hasattr(activation, "fn") and hasattr(activation, "nngp_map")):
        raise TypeError("finite_width_nngp: activation must be an infnets elementwise layer.")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"finite_width_nngp: depth must be an int >= 1, got {depth!r}.")
    sym = x2 is None
    x1 = torch.as_tensor(x1, dtype=F64)
    x2 = x1 if x2 is None else torch.as_tensor(x2, dtype=F64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
        raise ValueError("finite_width_nngp: x1 and x2 must be (N, d) with the same d.")
    c_w, c_b = float(W_std) ** 2, float(b_std) ** 2
    homogeneous = isinstance(activation, ABRelu)
    rule = ("polar", 8, deg or 24) if homogeneous else ("gauss", deg or 64)
    dim = x1.shape[1]
    q1 = c_w * (x1 * x1).sum(-1) / dim + c_b
    q2 = c_w * (x2 * x2).sum(-1) / dim + c_b
    cross = c_w * x1 @ x2.T / dim + c_b
    n1, n2 = cross.shape
    # one-input chains: pairs of identical inputs (the diagonal when x2 is None)
    k_d, m_d, v_d = _chain(activation, q1[:, None], depth, c_w, c_b, rule)
    diag1 = (k_d[:, 0], m_d[:, 0], v_d[:, 0, 0])
    rho = cross / torch.sqrt(q1[:, None] * q2[None, :])
    same = rho > 1 - DEGENERATE
    anti = rho < -1 + DEGENERATE
    pairs = ~(same | anti)
    if sym:
        pairs &= torch.triu(torch.ones(n1, n2, dtype=torch.bool), 1)
    ia, ib = torch.nonzero(pairs, as_tuple=True)
    k_out = torch.full((n1, n2), math.nan, dtype=F64)
    m_out, v_out = k_out.clone(), k_out.clone()
    if ia.numel():
        k1 = torch.stack([q1[ia], cross[ia, ib], q2[ib]], -1)
        k, m, v = _chain(activation, k1, depth, c_w, c_b, rule)
        k_out[ia, ib], m_out[ia, ib], v_out[ia, ib] = k[:, 1], m[:, 1], v[:, 1, 1]
    si, sj = torch.nonzero(same, as_tuple=True)
    k_out[si, sj], m_out[si, sj], v_out[si, sj] = diag1[0][si], diag1[1][si], diag1[2][si]
    if sym:
        upper = torch.triu(torch.ones(n1, n1, dtype=torch.bool), 1)
        for t in (k_out, m_out, v_out):
            t[upper.T] = t.T[upper.T]
    return FiniteWidthNNGP(k_out, m_out, v_out)
