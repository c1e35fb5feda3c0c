r"""The kernel map of :class:`~infnets._src.attention.layer.GlobalSelfAttention` on a record.

Every covariance is handled as a batch of ``P x P`` matrices over flattened positions:
``(B, P, P)`` with ``B = N1 N2`` (dense pairs) or ``B = N (N + 1) / 2`` (packed pairs of a
symmetric problem, so only one triangle of example pairs is computed). The formulas are
those of Hron et al. 2020 (arXiv 2006.10540), listed in :mod:`infnets._src.attention.layer`:

* linear scaling: per example the attention matrix ``A_x = m(s_QK K_k(x, x))`` (``N``
  small ``P x P`` maps), then two batched matrix products per pair,
  ``A_x V A_y^T`` (NNGP) and ``A_x (Theta_v + 2 V) A_y^T`` (NTK);
* ``linear_scaling=False``, identity: ``s^2 K_k(p, q) <K_k, V>`` and its NTK, one
  reduction per pair;
* ``linear_scaling=False``, other mechanisms: quasi-Monte Carlo
  (:mod:`infnets._src.attention.qmc`).
"""

from __future__ import annotations

import math
from typing import Any, overload

import torch
from torch import Tensor

from infnets._src.attention.maps import from_pp, mechanism_fn, pos_emb_covariance, to_pp
from infnets._src.core.kernel import Kernel, is_zero_ntk

__all__ = ["attention_kernel"]


def _keeps(k: Kernel, p: int) -> tuple[Tensor | None, Tensor | None]:
    """``(N1, P)`` and ``(N2, P)`` keep-vectors (1 real, 0 padded), or ``None``."""
    if k.mask1 is None and k.mask2 is None:
        return None, None
    dt, dev = k.nngp.dtype, k.nngp.device
    n2 = k.n1 if k.cov2 is None else k.n2

    def keep(m: Tensor | None, n: int) -> Tensor:
        if m is None:
            return torch.ones((n, p), dtype=dt, device=dev)
        return (~m).reshape(n, p).to(dt)

    k1 = keep(k.mask1, k.n1)
    k2 = k1 if k.cov2 is None else keep(k.mask2, n2)
    return k1, k2


class _Pairs:
    """Gathers per-example quantities onto the record's pairs (dense or packed)."""

    def __init__(self, k: Kernel) -> None:
        self.index = k.pair_index
        self.symmetric = k.cov2 is None

    def first(self, t: Tensor) -> Tensor:
        """``(N1, ...)`` -> ``(M, ...)`` packed, ``(N1, 1, ...)`` dense."""
        return t[self.index[0]] if self.index is not None else t.unsqueeze(1)

    def second(self, t: Tensor) -> Tensor:
        """``(N2, ...)`` -> ``(M, ...)`` packed, ``(1, N2, ...)`` dense."""
        return t[self.index[1]] if self.index is not None else t.unsqueeze(0)


def _outer(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a[..., :, None] * b[..., None, :]``: the keep-matrix of a pair."""
    if a is None or b is None:
        return None
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _mul(t: Tensor, m: Tensor | None) -> Tensor:
    return t if m is None else t * m


def attention_kernel(layer: Any, k: Kernel) -> Kernel:
    """Map the input record ``k`` (full spatial covariances) through ``layer``."""
    spatial = k.spatial_shape
    d = len(spatial)
    p = math.prod(spatial)
    lead = 1 if k.is_packed else 2
    dt, dev = k.nngp.dtype, k.nngp.device
    pairs = _Pairs(k)
    keep1, keep2 = _keeps(k, p)
    keep_a = None if keep1 is None else pairs.first(keep1)
    keep_b = None if keep2 is None else pairs.second(keep2)
    pair_keep = _outer(keep_a, keep_b)

    nngp = to_pp(k.nngp, lead, d)
    zero_ntk = k.ntk is not None and is_zero_ntk(k.ntk)
    ntk = None if k.ntk is None or zero_ntk else to_pp(k.ntk, lead, d)
    if k.ntk is k.nngp and ntk is not None:  # Conv after raw inputs returns ntk is nngp
        ntk = nngp
    cov1 = to_pp(k.cov1, 1, d)
    cov2 = None if k.cov2 is None else to_pp(k.cov2, 1, d)

    # key (and value) covariances: inputs interpolated with the positional embeddings
    w_x, w_e = layer._weights(k.width)
    r = None
    if layer.pos_emb_type != "NONE":
        r = pos_emb_covariance(spatial, layer.pos_emb_p_norm, layer.pos_emb_decay_fn, dt, dev)

    @overload
    def interp(t: Tensor, keep_outer: Tensor | None) -> Tensor: ...
    @overload
    def interp(t: Tensor | None, keep_outer: Tensor | None) -> Tensor | None: ...
    def interp(t: Tensor | None, keep_outer: Tensor | None) -> Tensor | None:
        """``w_x t + w_e R`` with ``R`` masked; ``t=None`` reads as a zero NTK."""
        if r is None:
            return t
        rr = _mul(r * w_e, keep_outer)
        if t is None:
            return rr.expand(nngp.shape)
        return t * w_x + rr if w_x != 1.0 else t + rr

    own_keep1 = _outer(keep1, keep1)
    own_keep2 = own_keep1 if k.cov2 is None else _outer(keep2, keep2)
    kk_pair = interp(nngp, pair_keep)
    kk_own1 = interp(cov1, own_keep1)
    kk_own2 = None if cov2 is None else interp(cov2, own_keep2)
    vpe = layer.val_pos_emb
    v_pair = kk_pair if vpe else nngp
    v_own1 = kk_own1 if vpe else cov1
    v_own2 = None if cov2 is None else (kk_own2 if vpe else cov2)
    need_ntk = k.ntk is not None
    th_k: Tensor | None = None
    th_v: Tensor | None = None
    if need_ntk:
        th_k = interp(ntk, pair_keep)
        th_v = th_k if vpe else ntk
        if th_k is None:
            th_k = torch.zeros_like(nngp)
        if th_v is None:
            th_v = torch.zeros_like(nngp)

    s_qk = float(layer.W_key_std) * float(layer.W_query_std)
    s_ov2 = (float(layer.W_out_std) * float(layer.W_value_std)) ** 2
    b2 = 0.0 if layer.b_std is None else float(layer.b_std) ** 2
    mech = layer.attention_mechanism

    if layer.linear_scaling:
        a1 = mechanism_fn(mech, kk_own1 * s_qk, None if keep1 is None else keep1.unsqueeze(1))
        a2 = a1
        if kk_own2 is not None:  # None exactly when cov2 is
            a2 = mechanism_fn(mech, kk_own2 * s_qk, None if keep2 is None else keep2.unsqueeze(1))
        new_ntk = None
        if th_v is not None and th_v is not v_pair:  # th_v is None exactly without the NTK
            new_nngp, new_ntk = _sandwich_pair(pairs, a1, a2, v_pair, th_v, s_ov2)
        else:
            right = torch.matmul(v_pair, pairs.second(a2).transpose(-1, -2))
            new_nngp = _scale(torch.matmul(pairs.first(a1), right), s_ov2)
            del right
            if need_ntk:  # Theta_v = V (Conv on raw inputs): Theta' = 3 A V A^T
                new_ntk = new_nngp * 3.0
        new_cov1 = _scale(a1 @ v_own1 @ a1.transpose(-1, -2), s_ov2)
        new_cov2 = None if v_own2 is None else _scale(a2 @ v_own2 @ a2.transpose(-1, -2), s_ov2)
    elif mech == "IDENTITY":
        s2 = s_qk * s_qk * s_ov2

        def dot(x: Tensor, y: Tensor, keep: Tensor | None) -> Tensor:
            return _mul(x * y, keep).sum((-2, -1), keepdim=True)

        dot12 = dot(kk_pair, v_pair, pair_keep)
        new_nngp = kk_pair * dot12 * s2
        new_ntk = None
        if th_k is not None and th_v is not None:  # both set exactly with the NTK
            ntk_dot = dot(kk_pair, th_v, pair_keep) + dot(th_k, v_pair, pair_keep)
            new_ntk = (kk_pair * ntk_dot + dot12 * (th_k + 4 * kk_pair)) * s2
        new_cov1 = kk_own1 * dot(kk_own1, v_own1, own_keep1) * s2
        new_cov2 = None
        if kk_own2 is not None and v_own2 is not None:  # None exactly when cov2 is
            new_cov2 = kk_own2 * dot(kk_own2, v_own2, own_keep2) * s2
    else:
        new_nngp, new_ntk, new_cov1, new_cov2 = _qmc(
            layer, k, pairs, kk_pair, kk_own1, kk_own2, v_pair, v_own1, v_own2,
            keep1, keep2, th_v, th_k, s_qk, s_ov2,
        )  # fmt: skip

    if b2:
        new_nngp = new_nngp + b2
        new_cov1 = new_cov1 + b2
        new_cov2 = None if new_cov2 is None else new_cov2 + b2
        new_ntk = None if new_ntk is None else new_ntk + b2

    # The results stay in the (pairs, P, P) order the matrix products produce (a view in
    # the interleaved layout): the next attention layer, elementwise maps and global
    # pooling read it as it is, where converting to the examples-innermost order would
    # cost two passes per covariance (kernel.alloc_like documents that order).
    return k.replace(
        nngp=from_pp(new_nngp, lead, spatial),
        ntk=None if new_ntk is None else from_pp(new_ntk, lead, spatial),
        cov1=from_pp(new_cov1, 1, spatial),
        cov2=None if new_cov2 is None else from_pp(new_cov2, 1, spatial),
    )


def _scale(t: Tensor, scale: float) -> Tensor:
    return t if scale == 1.0 else t.mul_(scale)


def _sandwich_pair(
    pairs: _Pairs, a1: Tensor, a2: Tensor, v: Tensor, th_v: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``scale A_x V A_y^T`` and ``scale A_x (Theta_v + 2 V) A_y^T`` (batched products).

    Two separate sandwiches of ``(B, P, P)`` products measured faster than one product of
    stacked ``(B, 2P, P)`` operands (the strided halves cost copies); the gathered
    attention matrices are shared, temporaries released as soon as they are used.
    """
    aa = pairs.first(a1)
    ab_t = pairs.second(a2).transpose(-1, -2)
    nngp = _scale(torch.matmul(torch.matmul(aa, v), ab_t), scale)
    both = torch.add(th_v, v, alpha=2.0)
    left = torch.matmul(aa, both)
    del both, aa
    return nngp, _scale(torch.matmul(left, ab_t), scale)


def _qmc(
    layer: Any,
    k: Kernel,
    pairs: _Pairs,
    kk_pair: Tensor,
    kk_own1: Tensor,
    kk_own2: Tensor | None,
    v_pair: Tensor,
    v_own1: Tensor,
    v_own2: Tensor | None,
    keep1: Tensor | None,
    keep2: Tensor | None,
    th_v: Tensor | None,
    th_k: Tensor | None,
    s_qk: float,
    s_ov2: float,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``linear_scaling=False`` with a softmax/abs/ReLU mechanism (quasi-Monte Carlo)."""
    from infnets._src.attention.qmc import logit_expectations

    mech, n_s, seed = layer.attention_mechanism, layer.n_samples, layer.seed
    p = kk_pair.shape[-1]
    kk_own2_ = kk_own1 if kk_own2 is None else kk_own2
    keep2_ = keep1 if keep2 is None else keep2

    @overload
    def flat(t: Tensor) -> Tensor: ...
    @overload
    def flat(t: Tensor | None) -> Tensor | None: ...
    def flat(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.expand(kk_pair.shape).reshape(-1, p, p)

    def flat_keep(t: Tensor | None, first: bool) -> Tensor | None:
        if t is None:
            return None
        g = pairs.first(t) if first else pairs.second(t)
        shape = kk_pair.shape[:-2] + (p,)
        return g.expand(shape).reshape(-1, p)

    batch = kk_pair.shape[:-2]
    e_n, e_t = logit_expectations(
        mech,
        s_qk,
        flat(kk_pair),
        flat(pairs.first(kk_own1)),
        flat(pairs.second(kk_own2_)),
        flat(v_pair),
        flat_keep(keep1, True),
        flat_keep(keep2_, False),
        flat(th_v),
        flat(th_k),
        n_s,
        seed,
    )
    e_n = e_n.reshape(batch + (p, p))
    e_t = None if e_t is None else e_t.reshape(batch + (p, p))

    def own(kk: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        c, _ = logit_expectations(mech, s_qk, kk, kk, kk, v, keep, keep, None, None, n_s, seed)
        return (c + c.transpose(-1, -2)) * (0.5 * s_ov2)

    new_cov1 = own(kk_own1, v_own1, keep1)
    new_cov2 = None if kk_own2 is None or v_own2 is None else own(kk_own2, v_own2, keep2)
    new_nngp = e_n * s_ov2
    new_ntk = None if e_t is None else (e_t * s_ov2 + 2 * new_nngp)
    if pairs.symmetric:  # estimates of (x, p; y, q) and (y, q; x, p) differ: average them
        new_nngp = _symmetrise(new_nngp, pairs, k)
        new_ntk = None if new_ntk is None else _symmetrise(new_ntk, pairs, k)
    return new_nngp, new_ntk, new_cov1, new_cov2


def _symmetrise(t: Tensor, pairs: _Pairs, k: Kernel) -> Tensor:
    """Average a symmetric problem's estimate with its mirror ``K[j, i, q, p]``."""
    if pairs.index is None:  # dense (N, N, P, P)
        return (t + t.transpose(0, 1).transpose(-1, -2)) * 0.5
    diag = pairs.index[0] == pairs.index[1]  # packed: only (i, i) pairs are their own mirror
    t = t.clone()
    t[diag] = (t[diag] + t[diag].transpose(-1, -2)) * 0.5
    return t
