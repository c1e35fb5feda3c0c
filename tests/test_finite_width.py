"""Finite-width NNGP correction against Monte Carlo over finite networks (standard errors)."""

from __future__ import annotations

import math

import pytest
import torch

from infnets import stax
from infnets._src.research import finite_width as fwm
from infnets.finite_width import finite_width_nngp

F64 = torch.float64
X = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.9]], dtype=F64) * math.sqrt(3)


def monte_carlo(act, x, depth, w, b, n, samples, seed=0, chunk=2500):
    """Samples of the empirical output kernel ``G = b^2 + w^2 phi(z^L) . phi(z^L) / n``.

    ``E[G] = E[f f^T]`` for one output unit (the readout is Gaussian given ``z^L``); ``G``
    has a smaller variance than ``f f^T``, so the standard errors are smaller.
    """
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    out = []
    for lo in range(0, samples, chunk):
        s = min(chunk, samples - lo)
        weights = torch.randn(s, n, d, generator=g, dtype=F64)
        bias = torch.randn(s, n, 1, generator=g, dtype=F64)
        z = w * torch.einsum("snd,pd->snp", weights, x) / math.sqrt(d) + b * bias
        for _ in range(depth - 1):
            weights = torch.randn(s, n, n, generator=g, dtype=F64)
            bias = torch.randn(s, n, 1, generator=g, dtype=F64)
            z = w * weights @ act.fn(z) / math.sqrt(n) + b * bias
        h = act.fn(z)
        out.append(b * b + w * w * torch.einsum("snp,snq->spq", h, h) / n)
    return torch.cat(out)


@pytest.mark.parametrize(
    ("act", "w", "b", "samples"),
    [(stax.Relu(), 1.4, 0.1, 20000), (stax.Erf(), 1.6, 0.2, 40000)],
)
def test_correction_against_monte_carlo(act, w, b, samples) -> None:
    depth, n = 3, 32
    fw = finite_width_nngp(act, X, depth=depth, W_std=w, b_std=b)
    net = stax.serial(*[stax.Dense(1, w, b), act] * depth, stax.Dense(1, w, b))
    torch.testing.assert_close(fw.nngp, net.kernel_fn(X, None, "nngp"))
    g = monte_carlo(act, X, depth, w, b, n, samples)
    mean, se = g.mean(0), g.std(0) / math.sqrt(samples)
    iu = torch.triu_indices(3, 3)
    z_inf = ((fw.nngp - mean) / se)[iu[0], iu[1]]
    z_cor = ((fw.at(n) - mean) / se)[iu[0], iu[1]]
    # 6 entries: |z| < 4.5 for all holds with probability > 0.9999 if the correction is right
    # (the O(1/n^2) remainder is below one standard error here, see benchmarks/finite_width.py)
    assert float(z_cor.abs().max()) < 4.5, z_cor
    assert float(z_inf.abs().max()) > 4.5, z_inf  # the infinite-width kernel is detectably off
    assert float((z_cor**2).sum()) < 0.25 * float((z_inf**2).sum())
    # the four-point vertex: Var[G] = V / n + O(1/n^2)
    ratio = (fw.variance / n / g.var(0))[iu[0], iu[1]]
    assert float((ratio - 1).abs().max()) < 0.2, ratio


def test_one_hidden_layer_has_no_mean_correction_and_relu_keeps_the_diagonal() -> None:
    fw = finite_width_nngp(stax.Erf(), X, depth=1, W_std=1.3, b_std=0.2)
    assert float(fw.correction.abs().max()) == 0.0
    assert float(fw.variance.min()) > 0
    relu = finite_width_nngp(stax.Relu(), X, X[:2], depth=4, W_std=1.2, b_std=0.0)
    # ReLU without bias: E[G_aa] = (W^2 / 2) E[G_aa] exactly, so no diagonal correction
    assert abs(float(relu.correction[0, 0])) < 1e-12 and abs(float(relu.correction[1, 1])) < 1e-12
    assert float(relu.correction[0, 1].abs()) > 1e-3
    sym = finite_width_nngp(stax.Relu(), X, depth=4, W_std=1.2, b_std=0.0)
    torch.testing.assert_close(sym.correction[:, :2], relu.correction)


@pytest.mark.parametrize("act", [stax.Relu(), stax.Erf(), stax.LeakyRelu(0.2)])
def test_jacobian_by_score_matches_finite_differences_of_the_closed_form(act) -> None:
    k = torch.tensor([[1.3, 0.4, 0.9], [0.7, -0.5, 1.1]], dtype=F64)
    rule = ("polar", 8, 24) if isinstance(act, stax.ABRelu) else ("gauss", 64)
    terms = fwm._layer_terms(act, k, 2, 1.0, rule)
    h = 1e-6
    fd = []
    for e in range(3):
        dk = torch.zeros(3, dtype=F64)
        dk[e] = h
        fd.append(
            (
                fwm._next_kernel(act, k + dk, 2, 1.0, 0.0)
                - fwm._next_kernel(act, k - dk, 2, 1.0, 0.0)
            )
            / (2 * h)
        )
    torch.testing.assert_close(terms.jac, torch.stack(fd, -1), rtol=1e-6, atol=1e-7)
    # Hessian: finite differences of the Jacobian
    dk = torch.tensor([0.0, 1e-4, 0.0], dtype=F64)
    jp = fwm._layer_terms(act, k + dk, 2, 1.0, rule).jac
    jm = fwm._layer_terms(act, k - dk, 2, 1.0, rule).jac
    torch.testing.assert_close(terms.hess[..., 1], (jp - jm) / 2e-4, rtol=1e-4, atol=1e-6)


def test_errors() -> None:
    with pytest.raises(ValueError, match="depth"):
        finite_width_nngp(stax.Relu(), X, depth=0)
    with pytest.raises(TypeError, match="elementwise"):
        finite_width_nngp(torch.tanh, X, depth=2)
