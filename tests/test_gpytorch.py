"""Tests of infnets.gpytorch: the kernel in an ExactGP, marginal likelihood, exactness."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")

from infnets import predict, stax  # noqa: E402
from infnets._src.layers import hyper as lh  # noqa: E402
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
        assert len(kernel_calls) == 1  # both sets of variances in one pass
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


def _archs():
    d = stax.Dense
    return {
        "erf-relu": _net(),
        "standard-gelu": stax.serial(
            d(8, 1.0, 0.1, parameterization="standard"), stax.Gelu(),
            d(1, 1.0, 0.1, parameterization="standard"),
        ),
        "no-bias": stax.serial(d(8, 1.5), stax.ABRelu(-0.5, 1.0), d(1, 1.5)),
        "branches-dropout": stax.serial(
            stax.FanOut(2),
            stax.parallel(stax.serial(d(8, 1.1, 0.1), stax.Relu()), d(8, 1.1, 0.1)),
            stax.FanInSum(), stax.Dropout(0.8), d(8, 1.1, 0.1), stax.Sin(), d(1, 1.1, 0.1),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("arch", ["erf-relu", "standard-gelu", "no-bias", "branches-dropout"])
def test_per_batch_variances_are_one_pass_and_match_each_entry(arch, get, kernel_calls):
    """batch_shape (2, 3): six sets of variances, two input sets each, one kernel pass;
    values and the gradients of the raw variances equal each entry computed alone."""
    g = torch.Generator().manual_seed(3)
    shape = torch.Size([2, 3])
    kernel = InfiniteWidthKernel(_archs()[arch], get=get, batch_shape=shape).to(DT)
    kernel.W_var = 0.5 + 2 * torch.rand(shape, generator=g, dtype=DT)
    if kernel.has_bias:
        kernel.b_var = 0.3 * torch.rand(shape, generator=g, dtype=DT)
    x = torch.randn(2, *shape, 17, 3, generator=g, dtype=DT)  # 17: packed per input set
    z = torch.randn(*shape, 5, 3, generator=g, dtype=DT)
    weights = [torch.randn(2, *shape, 17, n, generator=g, dtype=DT) for n in (17, 5)]
    raw = [p for _, p in kernel.named_parameters()]

    kernel_calls.clear()
    k = kernel(x).to_dense()
    assert len(kernel_calls) == 1  # not one per set of variances (or per input set)
    kxz = kernel(x, z).to_dense()
    kd = kernel(x, diag=True)
    kd2 = kernel(x[..., :5, :], z, diag=True)
    assert len(kernel_calls) == 4
    assert k.shape == (2, 2, 3, 17, 17) and kxz.shape == (2, 2, 3, 17, 5)
    assert kd.shape == (2, 2, 3, 17) and kd2.shape == (2, 2, 3, 5)
    loss = (k * weights[0]).sum() + (kxz * weights[1]).sum() + kd.sum() + kd2.sum()
    grads = torch.autograd.grad(loss, raw)

    ref_loss = 0.0
    for i in range(2):
        for b in itertools.product(range(2), range(3)):
            layer = kernel.layer(*b)  # this entry's variances, differentiable
            want = layer.kernel_fn(x[(i, *b)], None, get)
            cross = layer.kernel_fn(x[(i, *b)], z[b], get)
            got = (k[(i, *b)], kxz[(i, *b)], kd[(i, *b)], kd2[(i, *b)])
            wanted = (want, cross, want.diagonal(), cross[:5].diagonal())
            for u, v in zip(got, wanted):
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
            ref_loss = ref_loss + (want * weights[0][(i, *b)]).sum()
            ref_loss = ref_loss + (cross * weights[1][(i, *b)]).sum()
            ref_loss = ref_loss + want.diagonal().sum() + cross[:5].diagonal().sum()
    ref_grads = torch.autograd.grad(ref_loss, raw)
    for grad, ref in zip(grads, ref_grads):
        assert grad.shape == shape and bool(torch.all(grad != 0))
        # summed gradients: a sum of large terms of both signs (arc-cosine derivatives at
        # correlations near 1), whose order of summation alone (even a permutation of the
        # points of one set) moves the NTK's by ~1e-10 relative; elementwise below
        torch.testing.assert_close(grad, ref, rtol=1e-8, atol=0)

    # every kernel value's derivative in every raw variance: batched vs each entry alone
    names = [n for n, _ in kernel.named_parameters()]
    flat = torch.cat([q.detach().reshape(-1) for q in raw])

    def with_raw(fn):
        def call(p):
            values = dict(zip(names, p.reshape(len(names), *shape)))
            return torch.func.functional_call(
                _Eval(kernel, fn), {f"kernel.{n}": v for n, v in values.items()}, ()
            )

        return call  # fmt: skip

    sym = lambda kern: kern.forward(x[0], x[0])
    crs = lambda kern: kern.forward(x[1], z)
    for fn, data in ((sym, x[0]), (crs, x[1])):
        _, jac = lh.kernel_jacobian(with_raw(fn), flat)  # (2, 3, 17, N2, P)
        jac = jac.reshape(*jac.shape[:-1], len(names), *shape)
        for b in itertools.product(range(2), range(3)):
            other = z[b] if fn is crs else None
            xb = data[b]
            one = with_raw(lambda kern, b=b, xb=xb, o=other: kern.layer(*b).kernel_fn(xb, o, get))
            _, ref = lh.kernel_jacobian(one, flat)
            ref = ref.reshape(*ref.shape[:-1], len(names), *shape)
            # entry b depends on its own variances only
            torch.testing.assert_close(jac[b], ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())


class _Eval(torch.nn.Module):
    def __init__(self, kernel, fn):
        super().__init__()
        self.kernel, self.fn = kernel, fn

    def forward(self):
        return self.fn(self.kernel)


def test_per_batch_variances_images_and_checks(kernel_calls):
    """Images (input_shape) with a batch_shape: each entry with its own variances, one pass
    per set of variances over all its input sets; gradients as each entry alone."""
    net = stax.serial(stax.Conv(4, (3, 3), W_std=1.2, b_std=0.1, padding="SAME"), stax.Relu(),
                      stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1))  # fmt: skip
    kernel = InfiniteWidthKernel(net, input_shape=(1, 4, 4), batch_shape=torch.Size([2])).to(DT)
    kernel.W_var = torch.tensor([1.0, 2.0], dtype=DT)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 5, 16, generator=g, dtype=DT)  # 3 input sets for each of 2 GPs
    weights = torch.randn(3, 2, 5, 5, generator=g, dtype=DT)
    kernel_calls.clear()
    k = kernel(x).to_dense()
    assert len(kernel_calls) == 2  # one per set of variances, not one per input set
    assert k.shape == (3, 2, 5, 5)
    raw = [kernel.raw_W_var, kernel.raw_b_var]
    grads = torch.autograd.grad((k * weights).sum(), raw)
    ref_loss = 0.0
    for i in range(3):
        for b in range(2):
            want = kernel.layer(b).kernel_fn(x[i, b].reshape(5, 1, 4, 4), None, "nngp")
            torch.testing.assert_close(k[i, b], want, rtol=1e-12, atol=1e-14)
            ref_loss = ref_loss + (want * weights[i, b]).sum()
    for grad, want in zip(grads, torch.autograd.grad(ref_loss, raw)):
        assert grad.shape == (2,) and bool(torch.all(grad != 0))
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=0)
    # (G,) standard deviations are accepted only inside hyper_batch (G)
    with pytest.raises(ValueError, match="must be a scalar"):
        stax.Dense(1, W_std=torch.tensor([1.0, 2.0]))


# -------------------------------------------------------------------------- images
def _image_net(head: str, w: float = 1.3, b: float = 0.2):
    pool = stax.GlobalAvgPool() if head == "pool" else stax.Flatten()
    return stax.serial(stax.Conv(3, (3, 3), W_std=w, b_std=b, padding="SAME"), stax.Relu(),
                       pool, stax.Dense(1, W_std=w, b_std=b))  # fmt: skip


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("head", ["pool", "flat"])
def test_image_batches_in_one_pass(head, get, kernel_calls):
    """Six input sets of images: one kernel evaluation (not one per set), each set's
    kernel (symmetric, cross, diagonals) and the raw variances' gradients as per set."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 17, 16, generator=g, dtype=DT)  # 17: packed per input set
    z = torch.randn(3, 5, 16, generator=g, dtype=DT)
    kernel = InfiniteWidthKernel(_image_net(head), get=get, input_shape=(1, 4, 4)).to(DT)
    ref = kernel.layer()  # the kernel's stds, differentiable

    def img(t):
        return t.reshape(-1, 1, 4, 4)

    kernel_calls.clear()
    k = kernel(x).to_dense()
    assert len(kernel_calls) == 1  # six input sets, one evaluation
    kxz = kernel(x, z).to_dense()
    kd = kernel(x, diag=True)
    kd2 = kernel(x[..., :5, :], z, diag=True)
    kd1 = kernel(x[0, 0, :5], z[0], diag=True)  # one set: the 5 pairs (i, i) alone
    assert len(kernel_calls) == 5
    assert k.shape == (2, 3, 17, 17) and kxz.shape == (2, 3, 17, 5)
    assert kd.shape == (2, 3, 17) and kd2.shape == (2, 3, 5) and kd1.shape == (5,)
    assert torch.equal(k, k.transpose(-1, -2))
    weights = [torch.randn(2, 3, 17, n, generator=g, dtype=DT) for n in (17, 5)]
    loss = (k * weights[0]).sum() + (kxz * weights[1]).sum() + kd.sum() + kd2.sum()
    ref_loss = 0.0
    for i, j in itertools.product(range(2), range(3)):
        want = ref.kernel_fn(img(x[i, j]), None, get)
        cross = ref.kernel_fn(img(x[i, j]), img(z[j]), get)
        got = (k[i, j], kxz[i, j], kd[i, j], kd2[i, j])
        for u, v in zip(got, (want, cross, want.diagonal(), cross[:5].diagonal())):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
        ref_loss = ref_loss + (want * weights[0][i, j]).sum() + (cross * weights[1][i, j]).sum()
        ref_loss = ref_loss + want.diagonal().sum() + cross[:5].diagonal().sum()
    cross = ref.kernel_fn(img(x[0, 0, :5]), img(z[0]), get).diagonal()
    torch.testing.assert_close(kd1, cross, rtol=1e-12, atol=1e-14)
    raw = [kernel.raw_W_var, kernel.raw_b_var]
    for i, j in ((0, 0), (1, 2)):  # one set's kernel: its own gradient, as computed alone
        one = torch.autograd.grad((k[i, j] * weights[0][i, j]).sum(), raw, retain_graph=True)
        alone = (ref.kernel_fn(img(x[i, j]), None, get) * weights[0][i, j]).sum()
        for grad, want in zip(one, torch.autograd.grad(alone, raw, retain_graph=True)):
            torch.testing.assert_close(grad, want, rtol=1e-8, atol=0)
    grads = torch.autograd.grad(loss, raw)
    ref_grads = torch.autograd.grad(ref_loss, raw)
    for grad, want in zip(grads, ref_grads):
        assert bool(grad != 0)
        # as in the fully-connected test: the arc-cosine derivatives at correlation ~1 scale
        # the input kernels' last-bit differences (bmm over pairs vs one matmul) by ~1e7
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=0)


def test_image_batches_blocks_under_a_memory_budget(kernel_calls):
    """A small budget splits the pairs into blocks across set boundaries: same kernels."""
    from infnets._src.ecosystem.batched import batched_spatial_kernel

    g = torch.Generator().manual_seed(5)
    net = _image_net("pool")
    x = torch.randn(3, 7, 2, 4, 4, generator=g, dtype=DT)
    z = torch.randn(3, 4, 2, 4, 4, generator=g, dtype=DT)
    kernel_calls.clear()
    whole = batched_spatial_kernel(net, x, None, "ntk")
    assert len(kernel_calls) == 1
    kernel_calls.clear()
    # 16 positions, every pixel pair: ~1e4 bytes a pair, blocks of 2 pairs
    small = batched_spatial_kernel(net, x, None, "ntk", memory_budget=100_000)
    assert len(kernel_calls) > 3 * 7  # more blocks than sets: set boundaries inside blocks
    torch.testing.assert_close(small, whole, rtol=1e-13, atol=0)
    blocks = batched_spatial_kernel(net, x, z, "nngp", memory_budget=300_000)
    for i in range(3):
        torch.testing.assert_close(whole[i], net.kernel_fn(x[i], None, "ntk"), rtol=1e-12, atol=0)
        want = net.kernel_fn(x[i], z[i], "nngp")
        torch.testing.assert_close(blocks[i], want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="one value per pair"):
        batched_spatial_kernel(stax.Conv(1, (3, 3)), x, None, "nngp")
