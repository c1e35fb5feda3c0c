"""Kernel diagnostics against numpy, and their evolution over depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infnets import diagnostics as dg
from infnets import stax
from infnets.criticality import criticality


def _psd(seed: int, n: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    return a @ a.T + 0.1 * np.eye(n)


def _alignment_numpy(k: np.ndarray, y: np.ndarray, centered: bool) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n if centered else np.eye(n)
    kc, yc = h @ k @ h, h @ (y @ y.T) @ h
    return float(np.sum(kc * yc) / np.linalg.norm(kc) / np.linalg.norm(yc))


def test_against_numpy() -> None:
    k = _psd(0)
    lam = np.sort(np.linalg.eigvalsh(k))[::-1]
    np.testing.assert_allclose(dg.eigenspectrum(k).numpy(), lam, rtol=1e-12)
    p = lam / lam.sum()
    np.testing.assert_allclose(float(dg.effective_rank(k)), np.exp(-(p * np.log(p)).sum()))
    np.testing.assert_allclose(
        float(dg.effective_rank(k, "participation")), lam.sum() ** 2 / (lam**2).sum()
    )
    np.testing.assert_allclose(float(dg.condition_number(k)), np.linalg.cond(k), rtol=1e-8)
    rng = np.random.default_rng(1)
    y = rng.normal(size=(7, 2))
    for centered in (True, False):
        np.testing.assert_allclose(
            float(dg.kernel_target_alignment(k, y, centered)), _alignment_numpy(k, y, centered)
        )
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    np.testing.assert_allclose(
        float(dg.kernel_target_alignment(k, torch.tensor(labels))),
        _alignment_numpy(k, np.eye(3)[labels], True),
    )
    batch = np.stack([_psd(2), _psd(3)])
    np.testing.assert_allclose(
        dg.condition_number(batch).numpy(), [np.linalg.cond(b) for b in batch], rtol=1e-8
    )
    assert float(dg.condition_number(np.ones((3, 3)))) == float("inf")
    with pytest.raises(ValueError, match="kind"):
        dg.effective_rank(k, "nope")
    with pytest.raises(ValueError, match="targets"):
        dg.kernel_target_alignment(k, y[:3])


def test_depth_profile_matches_prefix_kernels_and_collapses_in_the_ordered_phase() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.sign(x[:, 0])
    # ordered phase (erf, W_std = 1, b_std = 0.5: chi_1 < 1): correlations -> 1 with depth
    layers = [stax.Dense(1, 1.0, 0.5), stax.Erf()] * 10 + [stax.Dense(1, 1.0, 0.5)]
    prof = dg.depth_profile(stax.serial(*layers), x, y)
    assert len(prof.layers) == 21 and prof.eigenvalues["ntk"].shape == (21, 6)
    k5 = stax.serial(*layers[:5]).kernel_fn(x, None, ("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        kk = getattr(k5, name).numpy()
        lam = np.sort(np.linalg.eigvalsh(kk))[::-1]
        np.testing.assert_allclose(prof.eigenvalues[name][4].numpy(), lam, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            float(prof.alignment[name][4]), _alignment_numpy(kk, y.numpy()[:, None], True)
        )
    er = prof.effective_rank["nngp"]
    assert float(er[-1]) < 1.1 < 2 < float(er[0])  # rank collapses towards one
    assert bool((er[4::2] < er[2:-2:2]).all())  # monotonically, layer after layer
    cond = prof.condition_number["nngp"]  # (the raw 4-feature Gram of 6 points is singular)
    # lambda_min ~ (1 - c^l) q* shrinks by chi_1 per layer: cond grows by 1 / chi_1 per block
    chi_1 = float(criticality(stax.Erf(), 1.0, 0.5).chi_1)
    np.testing.assert_allclose(float(cond[-1] / cond[-3]), 1 / chi_1, rtol=0.03)
    with pytest.raises(TypeError, match="serial"):
        dg.depth_profile(stax.Relu(), x)
