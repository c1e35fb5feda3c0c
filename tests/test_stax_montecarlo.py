"""Sampled wide finite networks reproduce the analytic NNGP and NTK.

For each architecture, ``S`` independent finite networks (the library's ``init_fn`` and
``apply_fn``, hidden width >= 1024, float64) give per-network estimates:

* NNGP: a readout ``Dense(n_out)`` whose ``n_out`` units are i.i.d. given the hidden
  layers; the estimate is ``Y Y^T / n_out``;
* NTK: the Jacobian of a one-unit readout network with respect to all its parameters
  (``torch.func.jacrev``), ``Theta = J J^T``.

The per-network estimates are i.i.d., so their mean has standard error ``SE = std /
sqrt(S)`` and we assert ``|mean - analytic| <= 5 SE + c / width`` entrywise. The bias
term: with one hidden layer the hidden pre-activations are exactly Gaussian and every
unit's contribution is an unbiased estimate of its expectation, so the Monte Carlo is
unbiased at any width (``c = 0``). Deeper networks (and LayerNorm, whose empirical mean
and variance fluctuate) see a non-Gaussian, fluctuating input kernel; a second-order
expansion of the kernel map in those O(1/sqrt(n)) fluctuations gives an O(1/n) bias,
``c ~ 2-4`` times the kernel scale (we allow ``c = 8``, i.e. 0.8% at n = 1024).
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_mc_agrees, monte_carlo_kernels
from infnets import stax

F64 = torch.float64
WIDTH = 1024
BIAS_DEEP = 8.0 / WIDTH


def _inputs() -> torch.Tensor:
    """Four points in 6 dimensions: unequal norms (|x|^2 / d = 0.5 .. 1.5), a nearly
    parallel pair (rho ~ 0.95), an anti-correlated pair and a near-orthogonal one."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(4, 6, generator=g, dtype=F64)
    z[1] = 0.95 * z[0] + 0.3 * z[1] / z[1].norm() * z[0].norm()
    z[3] = -0.6 * z[2] + 0.8 * z[3]
    norms = torch.tensor([0.5, 1.0, 1.5, 0.8], dtype=F64)
    return z / z.norm(dim=1, keepdim=True) * torch.sqrt(norms * 6)[:, None]


X = _inputs()

# pre-activation variances after Dense(WIDTH, 1.0, 0.2) are 0.54 .. 1.54
ACTIVATIONS = {
    "Relu": stax.Relu(),
    "LeakyRelu": stax.LeakyRelu(0.2),
    "Abs": stax.Abs(),
    "ABRelu": stax.ABRelu(-0.5, 1.5),
    "Erf": stax.Erf(a=1.2, b=0.8, c=0.1),
    "Sigmoid_like": stax.Sigmoid_like(),
    "Gelu": stax.Gelu(),
    "Gelu_tanh": stax.Gelu(approximate=True),
    "Sign": stax.Sign(),
    "Sin": stax.Sin(a=1.0, b=1.3, c=0.4),
    "Cos": stax.Cos(),
    "Rbf": stax.Rbf(gamma=0.8),
    "Exp": stax.Exp(a=1.0, b=0.5),
    "Gaussian_neg": stax.Gaussian(a=1.0, b=-0.6),
    "Gaussian_pos": stax.Gaussian(a=1.0, b=0.05),  # 4th moment finite: q < 1/(8b) = 2.5
    "Monomial2": stax.Monomial(2),
    "Monomial3": stax.Monomial(3),
    "RectifiedMonomial0": stax.RectifiedMonomial(0),
    "RectifiedMonomial2": stax.RectifiedMonomial(2),
    "RectifiedMonomial3": stax.RectifiedMonomial(3),
    "Polynomial": stax.Polynomial([0.2, 1.0, -0.4]),
    "Hermite3": stax.Hermite(3),
    "Numerical_tanh": stax.ElementwiseNumerical(torch.tanh),
    "Elementwise_square": stax.Elementwise(lambda x: x**2, lambda c, a, b: a * b + 2 * c**2),
}

N_NETS = 64
HEAVY_TAILED = {"Monomial3", "RectifiedMonomial3", "Hermite3"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny matmuls: intra-op threads only add overhead (3-10x on 2 busy
    cores); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(body, *, bias: float, parameterization: str = "ntk", seed: int = 0, n_nets=N_NETS):
    mc = monte_carlo_kernels(
        body, X, n_nets=n_nets, n_out=256, parameterization=parameterization, seed=seed
    )
    k = mc["kernel"]
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k.nngp, bias, "NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], k.ntk, bias, "NTK")


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_one_hidden_layer(name):
    """serial(Dense(1024), act, Dense(readout)): unbiased at any width (see module doc)."""
    body = [stax.Dense(WIDTH, 1.0, 0.2), ACTIVATIONS[name]]
    # cubic activations: phi(u) phi(v) has heavy tails (E u^12 / (E u^6)^2 = 46), so
    # per-network estimates scatter 4x more; twice the networks keep the SE < 4%
    n_nets = 2 * N_NETS if name in HEAVY_TAILED else N_NETS
    _check(body, bias=0.0, seed=list(ACTIVATIONS).index(name), n_nets=n_nets)


@pytest.mark.parametrize("name", ["Relu", "Erf", "Sign", "RectifiedMonomial2", "Gelu"])
def test_activation_standard_parameterization(name):
    """Standard parameterization: the NTK grows with the widths (1024 and the input's 6);
    the kernel is computed for exactly the widths sampled here."""
    body = [stax.Dense(WIDTH, 1.0, 0.2, "standard"), ACTIVATIONS[name]]
    _check(body, bias=0.0, parameterization="standard", seed=7)


def _residual(par):
    return [
        stax.Dense(WIDTH, 1.2, 0.1, par),
        stax.Relu(),
        stax.FanOut(2),
        stax.parallel(stax.Dense(WIDTH, 1.1, 0.2, par), stax.Identity()),
        stax.FanInSum(),
    ]


def _concat(par):
    # unequal branch widths: the kernel weights the branches 1/4 and 3/4
    return [
        stax.FanOut(2),
        stax.parallel(
            stax.serial(stax.Dense(512, 1.3, 0.1, par), stax.Relu()),
            stax.serial(stax.Dense(1536, 1.0, 0.3, par), stax.Erf()),
        ),
        stax.FanInConcat(),
    ]


def _prod(par):
    return [
        stax.FanOut(2),
        stax.parallel(
            stax.serial(stax.Dense(WIDTH, 1.0, 0.2, par), stax.Relu()),
            stax.serial(stax.Dense(WIDTH, 1.2, 0.1, par), stax.Sin()),
        ),
        stax.FanInProd(),
    ]


def _gauss_prod(par):
    return [
        stax.FanOut(2),
        stax.parallel(stax.Dense(WIDTH, 1.0, 0.2, par), stax.Dense(WIDTH, 0.8, 0.5, par)),
        stax.FanInProd(),
    ]


def _deep(par):
    return [
        stax.Dense(WIDTH, 1.3, 0.1, par),
        stax.Identity(),
        stax.Erf(),
        stax.Dense(WIDTH, 1.5, 0.2, par),
        stax.Relu(),
    ]


def _layernorm(par):
    return [stax.Dense(WIDTH, 1.4, 0.3, par), stax.LayerNorm(), stax.Gelu()]


def _layernorm_readout(par):
    return [stax.Dense(WIDTH, 1.4, 0.3, par), stax.LayerNorm()]


# name -> (body factory, finite-width bias allowance)
ARCHS = {
    "residual_identity": (_residual, BIAS_DEEP),  # two hidden layers
    "concat_unequal_widths": (_concat, 0.0),  # one hidden layer per branch
    "prod_of_nonlinear_branches": (_prod, 0.0),
    "prod_of_gaussian_branches": (_gauss_prod, 0.0),
    "deep_serial_identity": (_deep, BIAS_DEEP),
    "layernorm_gelu": (_layernorm, BIAS_DEEP),
    "layernorm_readout": (_layernorm_readout, BIAS_DEEP),
}


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture(arch, parameterization):
    make, bias = ARCHS[arch]
    # two hidden 1024 x 1024 layers cost 4x more per network: fewer networks there
    n_nets = 40 if bias else N_NETS
    _check(
        make(parameterization), bias=bias, parameterization=parameterization, seed=3, n_nets=n_nets
    )


def test_monte_carlo_detects_a_wrong_kernel():
    """The bounds have power: a kernel 3% off (a plausible formula slip, e.g. a wrong
    constant) is rejected by the same test, on the same samples."""
    body = [stax.Dense(WIDTH, 1.0, 0.2), stax.Erf()]
    mc = monte_carlo_kernels(body, X, n_nets=N_NETS, n_out=256, seed=5)
    k = mc["kernel"]
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k.nngp, 0.0, "NNGP")
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mc["nngp"], mc["nngp_se"], 1.03 * k.nngp, 0.0, "NNGP")
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mc["ntk"], mc["ntk_se"], 1.03 * k.ntk, 0.0, "NTK")


def test_standard_ntk_depends_on_the_sampled_width():
    """The standard-parameterization NTK of a narrower network is smaller, by the
    width ratio in its n K term: the Monte Carlo at width 1024 rejects the kernel
    computed for width 512, while agreeing with its own (the test above)."""
    wide = stax.serial(stax.Dense(WIDTH, 1.0, 0.2, "standard"), stax.Relu())
    narrow = stax.serial(stax.Dense(512, 1.0, 0.2, "standard"), stax.Relu())
    mc = monte_carlo_kernels([wide], X, n_nets=24, n_out=8, parameterization="standard", seed=9)
    readout = stax.Dense(1, 1.0, 0.1, "standard")
    k_narrow = stax.serial(narrow, readout).kernel_fn(X, None, "ntk")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], mc["kernel"].ntk, 0.0, "NTK")
    assert float((k_narrow / mc["kernel"].ntk).max()) < 0.6
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mc["ntk"], mc["ntk_se"], k_narrow, 0.0, "NTK")
