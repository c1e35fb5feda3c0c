"""Dropout: Neural Tangents' keep-rate semantics, finite twin, Monte Carlo, bad inputs.

Monte Carlo bias: one hidden layer before the dropout and a readout after it, so every
per-network estimate is unbiased (``test_stax_montecarlo.py``); the dropout masks are
fresh for each network (``rng``) and shared by the examples of one forward pass.
"""

from __future__ import annotations

import pytest
import torch

from attention_mc import as_pp, mc_spatial_kernels
from helpers import assert_mc_agrees, monte_carlo_kernels
from infnets import stax

F64 = torch.float64
X_FC = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
X_SEQ = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)


def test_fully_connected_monte_carlo():
    torch.manual_seed(0)  # apply_fn without rng: torch's global generator, like nn.Dropout
    body = [stax.Dense(1024, 1.0, 0.2), stax.Relu(), stax.Dropout(0.6)]
    mc = monte_carlo_kernels(body, X_FC, n_nets=48, n_out=256, seed=1)
    k = mc["kernel"]
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k.nngp, 0.0, "NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], k.ntk, 0.0, "NTK")
    # power: the kernel without dropout is rejected on the diagonal
    k0 = stax.serial(*body[:2], stax.Dense(256, 1.0, 0.1)).kernel_fn(X_FC, None)
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mc["nngp"], mc["nngp_se"], k0.nngp, 0.0, "NNGP")


def test_sequences_monte_carlo():
    """Per position: same example and position entries grow by 1 / rate, others not."""
    net = stax.serial(
        stax.Conv(512, (1,), b_std=0.1), stax.Relu(), stax.Dropout(0.7), stax.Conv(256, (1,))
    )
    mc = mc_spatial_kernels(net, X_SEQ, n_nets=32, seed=2, rng=100)
    k = net.kernel_fn(X_SEQ, None)
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], as_pp(k.nngp), 0.0, "NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], as_pp(k.ntk), 0.0, "NTK")


def test_kernel_rule():
    base = stax.serial(stax.Conv(8, (1,)), stax.Relu())
    drop = stax.serial(base, stax.Dropout(0.25))
    k0, k = base.kernel_fn(X_SEQ, None), drop.kernel_fn(X_SEQ, None)
    same = torch.einsum("ij,pq->ijpq", torch.eye(3, dtype=F64), torch.eye(4, dtype=F64))
    torch.testing.assert_close(k.nngp, k0.nngp * (1 + 3 * same))
    torch.testing.assert_close(k.ntk, k0.ntk * (1 + 3 * same))
    # two batches are two forward passes: cross-covariances unchanged, variances scaled
    k12, k12_0 = drop.kernel_fn(X_SEQ, X_SEQ[:2]), base.kernel_fn(X_SEQ, X_SEQ[:2])
    torch.testing.assert_close(k12.nngp, k12_0.nngp)
    eye = torch.eye(4, dtype=F64)
    torch.testing.assert_close(k12.cov2, k12_0.cov2 * (1 + 3 * eye))
    # packed pairs (N >= 16) and tiles
    x = torch.randn(17, 4, 3, dtype=F64)
    kp = drop.kernel_fn(x, None, "nngp")
    kt = drop.kernel_fn(x, None, "nngp", batch_size=5)
    torch.testing.assert_close(kp, kt)
    same = torch.einsum("ij,pq->ijpq", torch.eye(17, dtype=F64), torch.eye(3, dtype=F64))
    torch.testing.assert_close(kp, base.kernel_fn(x, None, "nngp") * (1 + 3 * same))


def test_test_mode_and_rate_one_are_identity():
    base = stax.serial(stax.Dense(8), stax.Relu())
    for layer in (stax.Dropout(0.3, mode="test"), stax.Dropout(1.0)):
        net = stax.serial(base, layer)
        torch.testing.assert_close(
            net.kernel_fn(X_FC, None, "nngp"), base.kernel_fn(X_FC, None, "nngp")
        )
        _, p = net.init_fn(0, X_FC.shape, dtype=F64)
        torch.testing.assert_close(net.apply_fn(p, X_FC), base.apply_fn(p[0], X_FC))


def test_finite_twin_is_inverted_dropout():
    """``Dropout(rate)`` keeps a fraction ``rate`` and scales by ``1 / rate``, like
    ``nn.Dropout(p=1 - rate)``; ``rng`` makes it reproducible."""
    layer = stax.Dropout(0.8)
    x = torch.ones(200, 50, dtype=F64)
    y = layer.apply_fn((), x, rng=0)
    assert set(torch.unique(y).tolist()) == {0.0, 1.25}
    frac = float((y > 0).double().mean())
    assert abs(frac - 0.8) < 5 * (0.8 * 0.2 / x.numel()) ** 0.5
    torch.testing.assert_close(y, layer.apply_fn((), x, rng=0))
    assert not torch.equal(y, layer.apply_fn((), x, rng=1))
    torch.manual_seed(5)
    ours = layer.apply_fn((), x)
    torch.manual_seed(5)
    theirs = torch.nn.functional.dropout(x, p=0.2)
    assert set(torch.unique(theirs).tolist()) == set(torch.unique(ours).tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rate=0.0), r"must lie in \(0, 1\]"),
        (dict(rate=1.5), r"must lie in \(0, 1\]"),
        (dict(rate=True), "must be a number"),
        (dict(rate=0.5, mode="eval"), "mode must be 'train' or 'test'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        stax.Dropout(**kwargs)
