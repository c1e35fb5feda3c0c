"""Monte Carlo oracle for layers whose outputs keep positions (attention, dropout).

``S`` independent finite networks (the layers' own ``init_fn``/``apply_fn``) give, per
network,

* NNGP: the output channels ``c`` of the last layer are i.i.d. given everything before
  its output weights, so ``sum_c y_c(x, p) y_c(x', q) / C_out`` estimates ``K(x, x')(p, q)``
  for every pair of positions;
* NTK: the Jacobian of output channel 0 at every position with respect to all the
  parameters (``torch.func.jacrev``), ``Theta = J J^T``.

The per-network estimates are i.i.d., so their mean has standard error ``std / sqrt(S)``;
:func:`helpers.assert_mc_agrees` compares entrywise with a ``5 SE`` band plus a stated
finite-width allowance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import jacrev

from helpers import tree_leaves
from infnets import stax


def mc_spatial_kernels(
    net: stax.Layer,
    x: torch.Tensor,
    *,
    n_nets: int,
    seed: int = 0,
    ntk: bool = True,
    **apply_kw: Any,
) -> dict[str, torch.Tensor]:
    """Per-position NNGP/NTK estimates ``(N, N, P, P)`` of ``net`` (output ``(N, C, *S)``
    or ``(N, C)``) with standard errors; ``apply_kw`` goes to ``apply_fn`` (masks, rng)."""
    gen = torch.Generator().manual_seed(seed)
    ks, ts = [], []
    n = x.shape[0]
    for s in range(n_nets):
        _, params = net.init_fn(gen, tuple(x.shape), dtype=x.dtype)
        kw = dict(apply_kw)
        if "rng" in kw:
            kw["rng"] = kw["rng"] + s  # a new dropout mask per network
        y = net.apply_fn(params, x, **kw)
        yf = y.reshape(n, y.shape[1], -1)
        c = yf.shape[1]
        ks.append(torch.einsum("ncp,mcq->nmpq", yf, yf) / c)
        if ntk:

            def unit0(p: Any, kw: dict = kw) -> torch.Tensor:
                return net.apply_fn(p, x, **kw)[:, 0].reshape(-1)

            jac = jacrev(unit0)(params)
            m = yf.shape[0] * yf.shape[2]
            theta = torch.zeros(m, m, dtype=x.dtype)
            for j in tree_leaves(jac):
                jf = j.reshape(m, -1)
                theta += jf @ jf.T
            p = yf.shape[2]
            ts.append(theta.reshape(n, p, n, p).permute(0, 2, 1, 3))
    root = math.sqrt(n_nets)
    k_s = torch.stack(ks)
    out = {"nngp": k_s.mean(0), "nngp_se": k_s.std(0) / root}
    if ntk:
        t_s = torch.stack(ts)
        out.update(ntk=t_s.mean(0), ntk_se=t_s.std(0) / root)
    return out


def as_pp(t: torch.Tensor) -> torch.Tensor:
    """Analytic ``(N, N, s_1, s_1', ..., s_d, s_d')`` (or ``(N, N)``) as ``(N, N, P, P)``."""
    n1, n2 = t.shape[:2]
    d = (t.ndim - 2) // 2
    if d == 0:
        return t.reshape(n1, n2, 1, 1)
    perm = [0, 1] + [2 + 2 * a for a in range(d)] + [3 + 2 * a for a in range(d)]
    p = math.prod(t.shape[2::2])
    return t.permute(perm).reshape(n1, n2, p, p)
