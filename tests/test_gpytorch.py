"""Tests of infnets.gpytorch: the kernel in an ExactGP, marginal likelihood, exactness."""

from __future__ import annotations

import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")

from infnets import predict, stax  # noqa: E402
from infnets.gpytorch import InfiniteWidthKernel  # noqa: E402

DT = torch.float64


def _net(w: float = 1.0, b: float = 0.1):
    return stax.serial(
        stax.Dense(512, W_std=w, b_std=b),
        stax.Erf(),
        stax.Dense(512, W_std=w, b_std=b),
        stax.Relu(),
        stax.Dense(1, W_std=w, b_std=b),
    )


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=DT) * 4 - 2
    y = torch.sin(2 * x[:, 0]) * x[:, 1] + 0.05 * torch.randn(n, generator=g, dtype=DT)
    return x, y


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_gp_trains_and_matches_gp_inference():
    x, y = _data(40)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DT)
    likelihood.noise = 1e-2
    model = _GP(x, y, likelihood, InfiniteWidthKernel(_net(), get="nngp")).to(DT)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    likelihood.train()
    values = []
    for _ in range(25):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
        values.append(-loss.detach().item())
    assert values[-1] > values[0] + 1.0
    kernel = model.covar_module
    assert kernel.W_var.detach().item() != pytest.approx(1.0)
    assert kernel.W_var > 0 and kernel.b_var > 0

    # the posterior mean is the NNGP posterior of predict.gp_inference
    model.eval()
    likelihood.eval()
    x_test, _ = _data(15, seed=1)
    with torch.no_grad():
        mean = model(x_test).mean
        layer = kernel.layer()
        noise = float(likelihood.noise)
        predict_fn = predict.gp_inference(
            layer.kernel_fn(x, None, "nngp"), y[:, None], diag_reg=noise,
            diag_reg_absolute_scale=True,
        )  # fmt: skip
        ref = predict_fn("nngp", layer.kernel_fn(x_test, x, "nngp"))[:, 0]
    torch.testing.assert_close(mean, ref, rtol=1e-8, atol=1e-10)
    # and the stds of the layer are the square roots of the learnt variances
    w = stax.Dense(1, W_std=kernel.W_var.detach().sqrt().item(), b_std=0.1)
    assert layer.layers[0].W_std == pytest.approx(w.W_std)


def test_kernel_values_diag_batch_and_setters():
    kernel = InfiniteWidthKernel(_net(1.3, 0.2), get="ntk").to(DT)
    assert kernel.W_var.detach().item() == pytest.approx(1.69)
    assert kernel.b_var.detach().item() == pytest.approx(0.04)
    x, _ = _data(9)
    ref = _net(1.3, 0.2).kernel_fn(x, None, "ntk")
    with torch.no_grad():
        torch.testing.assert_close(kernel(x).to_dense(), ref)
        torch.testing.assert_close(kernel(x, diag=True), ref.diagonal())
        torch.testing.assert_close(kernel(x[:4], x).to_dense(), ref[:4])
        torch.testing.assert_close(kernel(x[:4], x[4:8], diag=True), ref[:4, 4:8].diagonal())
        batched = kernel(x[:5].expand(3, 5, 2)).to_dense()
        assert batched.shape == (3, 5, 5)
        torch.testing.assert_close(batched[1], ref[:5, :5])
    kernel.W_var = 4.0
    kernel.b_var = 0.25
    assert kernel.W_var.detach().item() == pytest.approx(4.0)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x).to_dense(), _net(2.0, 0.5).kernel_fn(x, None, "ntk"))


def test_no_bias_factory_and_errors():
    net = stax.serial(stax.Dense(8, W_std=1.5), stax.Relu(), stax.Dense(1, W_std=1.5))
    kernel = InfiniteWidthKernel(net)
    assert kernel.b_var is None
    assert [n for n, _ in kernel.named_parameters()] == ["raw_W_var"]

    def layer_fn(W_std, b_std):  # noqa: N803
        return stax.serial(stax.Dense(8, W_std=W_std, b_std=b_std), stax.Erf(), stax.Dense(1))

    k2 = InfiniteWidthKernel(layer_fn, W_std=0.5, b_std=0.1).to(DT)
    x, _ = _data(5)
    with torch.no_grad():
        torch.testing.assert_close(k2(x).to_dense(), layer_fn(0.5, 0.1).kernel_fn(x, None, "nngp"))
    with pytest.raises(ValueError, match="pass W_std"):
        InfiniteWidthKernel(layer_fn)
    with pytest.raises(ValueError, match="get must be"):
        InfiniteWidthKernel(net, get="both")


def test_prior_registered():
    prior = gpytorch.priors.GammaPrior(2.0, 1.0)
    kernel = InfiniteWidthKernel(_net(), W_var_prior=prior)
    names = [name for name, *_ in kernel.named_priors()]
    assert names == ["W_var_prior"]
