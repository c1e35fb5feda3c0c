r"""Gaussian expectations over random attention logits by quasi-Monte Carlo.

Standard attention (``1 / sqrt(d_k)`` scaling, independent queries and keys) keeps random
logits at infinite width: for two query rows ``(x, p)`` and ``(y, q)`` the logits
``g_x = G_x(p, :)`` and ``g_y = G_y(q, :)`` are jointly Gaussian with

``Cov(g_x[p'], g_y[q']) = s^2 K(x, y)(p, q) K(x, y)(p', q')``

(Hron et al. 2020, arXiv 2006.10540, sec. 3.2; ``K`` the key covariance, ``s = s_QK``).
The covariance is a Schur product of the ``2 x 2`` query covariance
``Q = [[a, c], [c, b]]`` (``a = K(x, x)(p, p)``, ``c = K(x, y)(p, q)``, ``b = K(y, y)(q, q)``)
with the joint key covariance ``J = [[K_xx, K_xy], [K_yx, K_yy]]`` of the pair. Writing
``Q = l_1 l_1^T + l_2 l_2^T`` (Cholesky: ``l_1 = (sqrt a, c / sqrt a)``,
``l_2 = (0, sqrt(b - c^2 / a))``) gives the exact representation

``g_x = s sqrt(a) xi_x``,  ``g_y = s (c / sqrt(a) xi_y + sqrt(b - c^2 / a) zeta_y)``

with ``(xi_x, xi_y) ~ N(0, J)`` and ``zeta_y ~ N(0, K_yy)`` independent. ``J`` depends only
on the pair of *examples*, so one factorisation per pair and one set of ``3 P``-dimensional
normal points serve every pair of positions. The points are a scrambled Sobol sequence
(fixed seed) mapped through the inverse normal CDF: the estimate is deterministic and
smooth in the inputs; its error, measured against 65536 points, is about 1 % of the
kernel's scale at 1024 points, 0.5 % at 4096 and 0.1 % at 16384 (faster than the
``1 / sqrt(n)`` of plain Monte Carlo).

With ``alpha = m(g)`` the attention weights, :func:`logit_expectations` returns

* ``E[alpha_x^T V alpha_y]`` (NNGP part), and, for the NTK,
* ``E[alpha_x^T Theta_v alpha_y] + s^2 [(2 K(p, q) + Theta_k(p, q)) E Phi(V, K) + K(p, q)
  E Phi(V, Theta_k)]`` with ``Phi(V, M) = sum J_x[p', p''] V[p', q'] J_y[q', q''] M[p'', q'']``
  and ``J`` the Jacobians of the mechanism (softmax: ``diag(alpha) - alpha alpha^T``;
  elementwise: ``diag(m'(g))``): the query/key weights and the layers before the keys
  act through the logits.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from infnets._src.attention.maps import mechanism_fn, sqrt_psd

__all__ = ["normal_points", "logit_expectations"]

#: entries of the largest (pairs x positions x samples x positions) temporary per chunk
CHUNK_ENTRIES = 1 << 22


@functools.lru_cache(maxsize=16)
def _points(n: int, dim: int, seed: int) -> Tensor:
    eng = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    u = eng.draw(n, dtype=torch.float64)
    eps = 0.5 / n
    return torch.special.ndtri(u.clamp(eps, 1 - eps))


def normal_points(n: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, dim)`` quasi-random standard normal points (scrambled Sobol, inverse CDF).

    Examples:
        >>> z = normal_points(1024, 2, 0, torch.float64, torch.device('cpu'))
        >>> bool(abs(z.mean()) < 0.01), bool(abs(z.var() - 1) < 0.02)
        (True, True)
    """
    return _points(int(n), int(dim), int(seed)).to(dtype=dtype, device=device)


def _derivative(mech: str, g: Tensor, keep: Tensor | None) -> Tensor:
    d = g.sign() if mech == "ABS" else (g > 0).to(g.dtype)
    return d if keep is None else d * keep


def logit_expectations(
    mech: str,
    s_qk: float,
    k_pair: Tensor,
    k_own_a: Tensor,
    k_own_b: Tensor,
    v: Tensor,
    keep_a: Tensor | None,
    keep_b: Tensor | None,
    theta_v: Tensor | None,
    theta_k: Tensor | None,
    n_samples: int,
    seed: int,
) -> tuple[Tensor, Tensor | None]:
    """Expectations over Gaussian logits for a batch of example pairs.

    Args:
        mech: ``'SOFTMAX'``, ``'ABS'`` or ``'RELU'``.
        s_qk: ``W_query_std * W_key_std``.
        k_pair: ``(B, P, P)`` key covariance ``K(x, y)`` of each pair.
        k_own_a, k_own_b: ``(B, P, P)`` key covariances ``K(x, x)``, ``K(y, y)``.
        v: ``(B, P, P)`` value covariance ``V(x, y)``.
        keep_a, keep_b: ``(B, P)``: 1 at real positions, 0 at padded keys (or ``None``).
        theta_v, theta_k: ``(B, P, P)`` value and key NTKs (``None``: NNGP only).
        n_samples: quasi-Monte Carlo points.
        seed: scrambling seed.

    Returns:
        ``(E_nngp, E_ntk)``, each ``(B, P, P)`` indexed by the query positions ``(p, q)``
        (``E_ntk`` is ``None`` without ``theta_v``); see the module docstring.
    """
    b, p = k_pair.shape[0], k_pair.shape[-1]
    z = normal_points(n_samples, 3 * p, seed, k_pair.dtype, k_pair.device)
    z1, z2 = z[:, : 2 * p], z[:, 2 * p :]
    out_n = k_pair.new_empty((b, p, p))
    out_t = None if theta_v is None else k_pair.new_empty((b, p, p))
    step = max(1, CHUNK_ENTRIES // (p * p * n_samples))
    for lo in range(0, b, step):
        sl = slice(lo, min(b, lo + step))
        ka, kb = k_own_a[sl], k_own_b[sl]
        kp = k_pair[sl]
        joint = torch.cat(
            [torch.cat([ka, kp], dim=-1), torch.cat([kp.transpose(-1, -2), kb], dim=-1)], dim=-2
        )
        xi = torch.matmul(z1, sqrt_psd(joint).transpose(-1, -2))  # (b, S, 2P)
        zeta = torch.matmul(z2, sqrt_psd(kb).transpose(-1, -2))  # (b, S, P)
        n_chunk, t_chunk = _chunk(
            mech,
            s_qk,
            kp,
            ka.diagonal(dim1=-2, dim2=-1),
            kb.diagonal(dim1=-2, dim2=-1),
            xi[..., :p],
            xi[..., p:],
            zeta,
            v[sl],
            None if keep_a is None else keep_a[sl],
            None if keep_b is None else keep_b[sl],
            None if theta_v is None else theta_v[sl],
            None if theta_k is None else theta_k[sl],
        )
        out_n[sl] = n_chunk
        if out_t is not None:
            assert t_chunk is not None  # both exist exactly when theta_v does
            out_t[sl] = t_chunk
    return out_n, out_t


def _chunk(
    mech: str,
    s: float,
    kp: Tensor,
    a: Tensor,
    bdiag: Tensor,
    xa: Tensor,
    xb: Tensor,
    zeta: Tensor,
    v: Tensor,
    keep_a: Tensor | None,
    keep_b: Tensor | None,
    theta_v: Tensor | None,
    theta_k: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`logit_expectations` for one chunk of pairs, one query position at a time."""
    b, n, p = xa.shape
    ka_keep = None if keep_a is None else keep_a[:, None, :]  # (b, 1, P)
    kb_keep = None if keep_b is None else keep_b[:, None, None, :]  # (b, 1, 1, P)
    out_n = kp.new_empty((b, p, p))
    out_t = None if theta_v is None else kp.new_empty((b, p, p))
    vt = v.transpose(-1, -2).unsqueeze(1)  # (b, 1, P, P): alpha_b @ V^T = V alpha_b
    softmax = mech == "SOFTMAX"
    if theta_v is not None:
        tvt = theta_v.transpose(-1, -2).unsqueeze(1)
        mats = [kp, theta_k]  # M of Phi(V, M)
        vm_t = [(v * m).transpose(-1, -2).unsqueeze(1) for m in mats]  # type: ignore[operator]
        m_t = [m.transpose(-1, -2).unsqueeze(1) for m in mats]  # type: ignore[union-attr]
    for i in range(p):
        ai = a[:, i].clamp(min=0)
        sa = ai.sqrt()
        ga = (s * sa)[:, None, None] * xa  # (b, S, P)
        r = torch.where((ai > 0)[:, None], kp[:, i, :] / sa.clamp(min=1e-300)[:, None], 0.0)
        res = (bdiag - r * r).clamp(min=0).sqrt()
        gb = s * (r[:, :, None, None] * xb[:, None] + res[:, :, None, None] * zeta[:, None])
        alpha_a = mechanism_fn(mech, ga, ka_keep)  # (b, S, P)
        alpha_b = mechanism_fn(mech, gb, kb_keep)  # (b, Pq, S, P)
        aa = alpha_a.unsqueeze(1)  # (b, 1, S, P)
        v_ab = alpha_b @ vt  # (b, Pq, S, P): (V alpha_b)[p']
        vals = (aa * v_ab).sum(-1)  # (b, Pq, S): alpha_a^T V alpha_b
        out_n[:, i, :] = vals.mean(-1)
        if out_t is None:
            continue
        tv = ((alpha_b @ tvt) * aa).sum(-1).mean(-1)
        phis = []
        if softmax:
            vt_aa = (alpha_a @ v).unsqueeze(1)  # (b, 1, S, P): (V^T alpha_a)[q']
            for vm, mt, m in zip(vm_t, m_t, mats):
                m_ab = alpha_b @ mt  # (M alpha_b)
                t1 = ((alpha_b @ vm) * aa).sum(-1)
                t2 = (aa * v_ab * m_ab).sum(-1)
                mt_aa = (alpha_a @ m).unsqueeze(1)  # type: ignore[operator]
                t3 = (alpha_b * vt_aa * mt_aa).sum(-1)
                t4 = vals * (aa * m_ab).sum(-1)
                phis.append((t1 - t2 - t3 + t4).mean(-1))
        else:
            da = _derivative(mech, ga, ka_keep).unsqueeze(1)
            db = _derivative(mech, gb, kb_keep)
            for vm in vm_t:
                phis.append(((db @ vm) * da).sum(-1).mean(-1))
        kpi = kp[:, i, :]
        coef1 = 2 * kpi + theta_k[:, i, :]  # type: ignore[index]
        out_t[:, i, :] = tv + (s * s) * (coef1 * phis[0] + kpi * phis[1])
    return out_n, out_t
