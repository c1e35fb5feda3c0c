"""Tests of infnets.gpytorch: the kernel in an ExactGP, marginal likelihood, exactness."""

from __future__ import annotations

import numpy as np
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


# ------------------------------------------------------------------------- batches
@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts every kernel evaluation of every infnets layer."""
    from infnets._src.layers.base import Layer

    calls = []
    original = Layer._kernel_fn

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Layer, "_kernel_fn", counting)
    return calls


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_shared_variances_batch_in_one_pass(get, kernel_calls):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 17, 2, generator=g, dtype=DT)  # 17 >= 16: packed layout per batch
    z = torch.randn(3, 5, 2, generator=g, dtype=DT)
    kernel = InfiniteWidthKernel(_net(1.3, 0.2), get=get).to(DT)
    # the oracle: unbatched kernel_fn of the layer with the kernel's (float32-initialised)
    # stds as Python floats, one input set at a time
    w, bias = kernel.W_var.sqrt().item(), kernel.b_var.sqrt().item()
    ref = _net(w, bias)
    with torch.no_grad():
        kernel_calls.clear()
        k = kernel(x).to_dense()
        assert len(kernel_calls) == 1  # six input sets, one evaluation
        kxz = kernel(x, z).to_dense()  # z broadcasts against the leading axis
        kd = kernel(x, diag=True)
        kd2 = kernel(x[..., :5, :], z, diag=True)
    assert k.shape == (2, 3, 17, 17) and kxz.shape == (2, 3, 17, 5) and kd.shape == (2, 3, 17)
    for i in range(2):
        for j in range(3):
            want = ref.kernel_fn(x[i, j], None, get)
            # the same kernel maps on the same pairs; only the order of the Gram's dot
            # products (bmm vs matmul) may differ: a few ulps
            torch.testing.assert_close(k[i, j], want, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(kxz[i, j], ref.kernel_fn(x[i, j], z[j], get),
                                       rtol=1e-12, atol=1e-14)  # fmt: skip
            torch.testing.assert_close(kd[i, j], want.diagonal(), rtol=1e-12, atol=1e-14)
            cross = ref.kernel_fn(x[i, j, :5], z[j], get).diagonal()
            torch.testing.assert_close(kd2[i, j], cross, rtol=1e-12, atol=1e-14)
    assert torch.equal(k, k.transpose(-1, -2))
    # gradients in the shared variances: the sum of the per-set gradients
    kernel.zero_grad()
    kernel(x).to_dense().sum().backward()
    batched_grad = kernel.raw_W_var.grad.clone()
    kernel.zero_grad()
    sum(kernel(x[i, j]).to_dense().sum() for i in range(2) for j in range(3)).backward()
    # values agree to ~1e-15; derivatives of the arc-cosine maps at correlation ~1 (the
    # diagonal pairs) scale rounding of the correlation by ~1/sqrt(eps): 1e-8 relative
    torch.testing.assert_close(batched_grad, kernel.raw_W_var.grad, rtol=1e-8, atol=0)


def test_per_batch_variances(kernel_calls):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 6, 2, generator=g, dtype=DT)  # 3 input sets for each of 2 GPs
    kernel = InfiniteWidthKernel(_net(), get="ntk", batch_shape=torch.Size([2])).to(DT)
    assert kernel.W_var.shape == (2,) and kernel.b_var.shape == (2,)
    kernel.W_var = torch.tensor([1.0, 2.25], dtype=DT)
    kernel.b_var = torch.tensor([0.01, 0.09], dtype=DT)
    # float64 parameters through the positivity constraint: the stds as the kernel holds them
    stds = list(zip(kernel.W_var.sqrt().tolist(), kernel.b_var.sqrt().tolist()))
    np.testing.assert_allclose(stds, [(1.0, 0.1), (1.5, 0.3)], rtol=1e-12)
    with torch.no_grad():
        kernel_calls.clear()
        k = kernel(x).to_dense()
        assert len(kernel_calls) == 2  # one pass per set of variances
        kd = kernel(x, diag=True)
        k2 = kernel(x[0]).to_dense()  # (2, 6, 2): one input set per GP
    assert k.shape == (3, 2, 6, 6) and kd.shape == (3, 2, 6) and k2.shape == (2, 6, 6)
    for i in range(3):
        for b, (w, bias) in enumerate(stds):
            want = _net(w, bias).kernel_fn(x[i, b], None, "ntk")
            torch.testing.assert_close(k[i, b], want, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(kd[i, b], want.diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(k2, k[0])
    assert kernel.layer(1).layers[0].W_std.item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="batch indices"):
        kernel.layer()
    # a batch of two exact GPs, one marginal likelihood each
    y = torch.sin(x[0, :, :, 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([2])).to(DT)
    model = _GP(x[0], y, likelihood, kernel).to(DT)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    loss = -mll(model(x[0]), y)
    assert loss.shape == (2,)
    loss.sum().backward()
    assert kernel.raw_W_var.grad.shape == (2,) and bool(torch.all(kernel.raw_W_var.grad != 0))
