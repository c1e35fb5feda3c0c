"""Discrete-time MSE dynamics (``discrete=True``) and the public ensemble trainer."""

from __future__ import annotations

import pytest
import torch

from infnets import empirical, predict, stax, train

F64 = torch.float64


def _linear_model(seed: int = 0, n: int = 7, m: int = 4, p: int = 12, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    jx = torch.randn(n, p, generator=g, dtype=F64)
    jt = torch.randn(m, p, generator=g, dtype=F64)
    y = torch.randn(n, k, generator=g, dtype=F64)
    f0 = torch.randn(n, k, generator=g, dtype=F64)
    ft0 = torch.randn(m, k, generator=g, dtype=F64)
    return jx, jt, y, f0, ft0


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_discrete_mse_matches_parameter_space_gradient_descent(ridge: float) -> None:
    """A linear model f = f0 + J theta trained by GD (with weight decay) step for step."""
    jx, jt, y, f0, ft0 = _linear_model()
    ntk = jx @ jx.T
    lr = 1.5 / float(torch.linalg.eigvalsh(ntk)[-1] + ridge)  # large steps: far from the flow
    predict_fn = predict.gradient_descent_mse(
        ntk, y, lr, ridge, diag_reg_absolute_scale=True, discrete=True
    )
    steps = [0, 1, 2, 5, 17]
    out_train, out_test = predict_fn(torch.tensor(steps), f0, ft0, jt @ jx.T)
    theta = torch.zeros(jx.shape[1], y.shape[1], dtype=F64)
    expected_train, expected_test = [], []
    for s in range(steps[-1] + 1):
        if s in steps:
            expected_train.append(f0 + jx @ theta)
            expected_test.append(ft0 + jt @ theta)
        grad = jx.T @ (f0 + jx @ theta - y) + ridge * theta
        theta = theta - lr * grad
    torch.testing.assert_close(out_train, torch.stack(expected_train), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_test, torch.stack(expected_test), rtol=1e-10, atol=1e-10)
    # with such a learning rate gradient flow is visibly different
    flow = predict.gradient_descent_mse(ntk, y, lr, ridge, diag_reg_absolute_scale=True)
    assert (flow(5.0, f0) - out_train[3]).abs().max() > 1e-2


def test_discrete_limits_and_errors() -> None:
    jx, jt, y, f0, _ = _linear_model(1)
    ntk = jx @ jx.T
    w_max = float(torch.linalg.eigvalsh(ntk)[-1])
    lr = 0.5 / w_max
    disc = predict.gradient_descent_mse(ntk, y, lr, discrete=True)
    flow = predict.gradient_descent_mse(ntk, y, lr)
    torch.testing.assert_close(disc(None, f0), flow(None, f0))  # same limit: interpolation
    small = predict.gradient_descent_mse(ntk, y, lr / 200, discrete=True)
    torch.testing.assert_close(small(2000.0, f0), flow(10.0, f0), rtol=5e-3, atol=5e-3)
    with pytest.raises(ValueError, match="whole"):
        disc(2.5, f0)
    unstable = predict.gradient_descent_mse(ntk, y, 2.5 / w_max, discrete=True)
    with pytest.raises(ValueError, match="diverges"):
        unstable(None, f0)
    assert unstable(40.0, f0).abs().max() > 1e3  # finite times: exact, and growing


@pytest.mark.parametrize("get", ["ntk", "nngp"])
def test_discrete_ensemble_matches_iterated_affine_maps(get: str) -> None:
    """Mean and covariance against explicitly iterated maps of the joint Gaussian ``f_0``."""
    net = stax.serial(stax.Dense(64, b_std=0.3), stax.Erf(), stax.Dense(1, b_std=0.3))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    xt = torch.randn(4, 3, generator=g, dtype=F64)
    y = torch.randn(6, 1, generator=g, dtype=F64)
    joint = net.kernel_fn(torch.cat([x, xt]), None, ("nngp", "ntk"))
    gk = getattr(joint, get)
    g_train, g_test = gk[:6, :6], gk[6:, :6]
    lr = 1.2 / float(torch.linalg.eigvalsh(g_train)[-1])
    ens = predict.gradient_descent_mse_ensemble(net.kernel_fn, x, y, lr, discrete=True)
    steps = [0, 1, 3, 10]
    out = ens(torch.tensor(steps), xt, get=get, compute_cov=True)
    # f_s = C_s f_0 + d_s with f_0 = (f_0(X), f_0(x)) ~ N(0, K_joint)
    c_train = torch.cat([torch.eye(6, dtype=F64), torch.zeros(6, 4, dtype=F64)], 1)
    c_test = torch.cat([torch.zeros(4, 6, dtype=F64), torch.eye(4, dtype=F64)], 1)
    d_train, d_test = torch.zeros(6, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    means, covs = [], []
    for s in range(steps[-1] + 1):
        if s in steps:
            means.append(d_test)
            covs.append(c_test @ joint.nngp @ c_test.T)
        c_test, d_test = c_test - lr * g_test @ c_train, d_test - lr * g_test @ (d_train - y)
        c_train, d_train = c_train - lr * g_train @ c_train, d_train - lr * g_train @ (d_train - y)
    torch.testing.assert_close(out.mean, torch.stack(means), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.covariance, torch.stack(covs), rtol=1e-8, atol=1e-9)


def _net() -> stax.Serial:
    return stax.serial(stax.Dense(48, b_std=0.1), stax.Relu(), stax.Dense(1, b_std=0.1))


def test_linearized_twin_trained_by_sgd_follows_discrete_predictions() -> None:
    """``empirical.linearize`` of a finite twin trained by plain SGD, against predict."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    xt = torch.randn(3, 2, generator=g, dtype=F64)
    y = torch.randn(8, 1, generator=g, dtype=F64)
    module = _net().to_module((-1, 2), key=4, dtype=F64)
    lin = empirical.linearize(module)
    ntk_fn = empirical.empirical_ntk_fn(module)
    ntk, ntk_test = ntk_fn(x, x), ntk_fn(xt, x)
    with torch.no_grad():
        f0, ft0 = module(x), module(xt)
    lr = 1.0 / float(torch.linalg.eigvalsh(ntk)[-1])
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    steps, seen = [0, 1, 4, 25], []
    for s in range(steps[-1] + 1):
        if s in steps:
            with torch.no_grad():
                seen.append(lin(xt))
        opt.zero_grad()
        (0.5 * ((lin(x) - y) ** 2).sum()).backward()
        opt.step()
    expected = predict.gradient_descent_mse(ntk, y, lr, discrete=True)(
        torch.tensor(steps, dtype=F64), f0, ft0, ntk_test
    )[1]
    torch.testing.assert_close(torch.stack(seen), expected, rtol=1e-9, atol=1e-9)


def test_trainer_matches_module_sgd_and_linear_models() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    xt = torch.randn(3, 2, generator=g, dtype=F64)
    y = torch.randn(8, 1, generator=g, dtype=F64)
    net = _net()
    lr, steps, seeds = 0.05, [0, 3, 12], [11, 12, 13]
    out = train.gradient_descent_ensemble(net, x, y, lr, steps, seeds, xt)
    assert out.fx_train.shape == (3, 3, 8, 1) and out.fx_test.shape == (3, 3, 3, 1)
    # seed 12 alone, as an nn.Module trained by torch.optim.SGD on the summed loss
    module = net.to_module((-1, 2), key=12, dtype=F64)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    for s in range(steps[-1]):
        if s == 3:
            with torch.no_grad():
                torch.testing.assert_close(module(xt), out.fx_test[1, 1])
                torch.testing.assert_close(module(x), out.fx_train[1, 1])
        opt.zero_grad()
        (0.5 * ((module(x) - y) ** 2).sum()).backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(module(xt), out.fx_test[1, 2])
    # a linear model (pure apply_fn, stacked params) follows the discrete predictions exactly
    w_feat = torch.randn(2, 20, generator=g, dtype=F64)

    def features(xs: torch.Tensor) -> torch.Tensor:
        return torch.cos(xs @ w_feat + 0.3)

    def apply_linear(params: dict, xs: torch.Tensor) -> torch.Tensor:
        return features(xs) @ params["theta"]

    thetas = torch.randn(3, 20, 1, generator=g, dtype=F64)
    lin_lr = 0.9 / float(torch.linalg.eigvalsh(features(x) @ features(x).T)[-1])
    run = train.gradient_descent_ensemble(
        (None, apply_linear), x, y, lin_lr, [0, 2, 9], x_test=xt, params={"theta": thetas}
    )
    phi, phit = features(x), features(xt)
    predict_fn = predict.gradient_descent_mse(phi @ phi.T, y, lin_lr, discrete=True)
    for s in range(3):
        exp_train, exp_test = predict_fn(
            torch.tensor([0.0, 2.0, 9.0]), phi @ thetas[s], phit @ thetas[s], phit @ phi.T
        )
        torch.testing.assert_close(run.fx_train[s], exp_train, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(run.fx_test[s], exp_test, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="seeds"):
        train.gradient_descent_ensemble((None, apply_linear), x, y, 0.1, [1])
