"""Random features against the exact kernels (``kernel_fn``), with statistical tolerances.

Oracles: the exact NNGP/NTK of the same architecture, and the push-through identity for
regression on features (the ``N x N`` ridge solve on ``Phi Phi^T``).
"""

from __future__ import annotations

import math

import pytest
import torch

from infnets import features, predict, stax

DT = torch.float64


def _x(n: int = 12, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _one_hidden(act: stax.Layer) -> stax.Layer:
    return stax.serial(
        stax.Dense(1, W_std=1.4, b_std=0.3), act, stax.Dense(1, W_std=1.1, b_std=0.2)
    )


@pytest.mark.parametrize("act", [stax.Relu(), stax.Erf(), stax.Gelu(), stax.LeakyRelu(0.2)])
def test_one_activation_is_unbiased(act: stax.Layer) -> None:
    """With one activation, each seed's ``phi phi^T`` is an unbiased estimate of the kernel:
    the mean over S seeds lies within 5 standard errors (estimated from the seeds) of the
    exact NNGP and NTK, entry by entry; the standard error itself shrinks as 1/sqrt(D S)."""
    net, x = _one_hidden(act), _x()
    exact = net.kernel_fn(x, None, ("nngp", "ntk"))
    seeds, d = 48, 256
    fs = [features.random_features(net, x, d, key=s) for s in range(seeds)]
    for name, target in (("nngp", exact.nngp), ("ntk", exact.ntk)):
        samples = torch.stack([getattr(f, name) @ getattr(f, name).T for f in fs])
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(seeds)
        z = (mean - target).abs() / (se + 1e-12 * target.abs().max())
        assert z.max() < 5.5, (name, z.max())
        # a wrong map (e.g. the NTK without its derivative term) is far outside the band
        assert ((mean - 0.9 * target).abs() / se).max() > 5.5


def test_error_shrinks_with_features() -> None:
    """Deep network: the relative error falls like 1/sqrt(D) (16x D: about 4x less)."""
    net = stax.serial(
        *[layer for _ in range(3) for layer in (stax.Dense(1, W_std=1.4, b_std=0.1), stax.Relu())],
        stax.Dense(1),
    )
    x = _x(20)
    exact = net.kernel_fn(x, None, ("nngp", "ntk"))

    def err(d: int) -> dict[str, float]:
        errs: dict[str, float] = {"nngp": 0.0, "ntk": 0.0}
        for s in range(4):
            f = features.random_features(net, x, d, key=s)
            for name in errs:
                phi, ref = getattr(f, name), getattr(exact, name)
                errs[name] += float((phi @ phi.T - ref).norm() / ref.norm()) / 4
        return errs

    small, large = err(64), err(1024)
    for name in ("nngp", "ntk"):
        assert large[name] < 0.5 * small[name], (name, small, large)  # 1/sqrt(16) expected
        assert large[name] < 3 * math.sqrt(3 / 1024), (name, large)  # sqrt(depth / D) scale


def test_same_key_same_kernel_across_calls() -> None:
    """Train and test features from separate calls with one key are features of one kernel."""
    net, x = _one_hidden(stax.Relu()), _x(10)
    both = features.random_features(net, x, 64, key=3)
    a = features.random_features(net, x[:4], 64, key=3)
    b = features.random_features(net, x[4:], 64, key=3)
    torch.testing.assert_close(torch.cat([a.ntk, b.ntk]), both.ntk, rtol=1e-13, atol=1e-13)
    assert features.random_features(net, x, 64, key=4).ntk.ne(both.ntk).any()


def test_blocks_do_not_change_features(monkeypatch: pytest.MonkeyPatch) -> None:
    from infnets._src.features import random as rf

    net, x = _one_hidden(stax.Erf()), _x(11)
    whole = features.random_features(net, x, 32, key=1)
    monkeypatch.setattr(rf, "BLOCK_ROWS", 4)
    blocked = features.random_features(net, x, 32, key=1)
    torch.testing.assert_close(blocked.nngp, whole.nngp, rtol=0, atol=0)
    torch.testing.assert_close(blocked.ntk, whole.ntk, rtol=0, atol=0)


def test_feature_regression_is_the_kernel_posterior_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Push-through identity: the D x D solve equals gp_inference on the feature kernel
    (accumulated over blocks of 7 rows here)."""
    from infnets._src.features import random as rf

    monkeypatch.setattr(rf, "BLOCK_ROWS", 7)
    net, x = _one_hidden(stax.Relu()), _x(30)
    xt = _x(7, seed=1)
    y = torch.sin(x[:, :2])
    f = features.random_features(net, torch.cat([x, xt]), 16, get="ntk", key=0).ntk
    ftr, fte = f[:30], f[30:]
    _, mean = features.feature_regression(ftr, y, fte, diag_reg=1e-2)
    k_train = ftr @ ftr.T
    fn = predict.gp_inference(k_train, y, diag_reg=1e-2, diag_reg_absolute_scale=True)
    ref = fn("nngp", fte @ ftr.T)  # the feature kernel as the prior: posterior mean
    torch.testing.assert_close(mean, ref, rtol=1e-8, atol=1e-10)


def test_bad_input() -> None:
    x = _x()
    with pytest.raises(ValueError, match="NTK parameterization"):
        features.random_features(stax.Dense(1, parameterization="standard"), x)
    features.random_features(stax.Dense(1, parameterization="standard"), x, get="nngp")
    with pytest.raises(ValueError, match="not supported"):
        net = stax.serial(stax.Conv(2, (3,)), stax.Relu())
        features.random_features(net, x)
    with pytest.raises(ValueError, match="must follow a Dense"):
        features.random_features(stax.serial(stax.Dense(1), stax.Relu(), stax.Relu()), x)
    with pytest.raises(ValueError, match="get must be"):
        features.random_features(stax.Dense(1), x, get="cov")
    with pytest.raises(ValueError, match="n_features"):
        features.random_features(stax.Dense(1), x, n_features=0)
    with pytest.raises(ValueError, match=r"\(N, features\)"):
        features.random_features(stax.Dense(1), x[None])
    with pytest.raises(ValueError, match="diag_reg"):
        features.feature_regression(x, x[:, 0], diag_reg=-1.0)
