"""The public ``infnets.stax`` surface: identities, conventions, gradients and errors.

Kernel values are checked against closed forms written in the tests (Dense recursions,
combinator algebra) and against other code paths of the library (``x2=None`` packed vs
dense, tiles, chunks, autograd vs in-place maps); the activations' own closed forms are
in ``test_elementwise.py`` and the finite-network agreement in ``test_stax_montecarlo.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infnets import Kernel, stax

F64 = torch.float64


def _x(n: int, d: int = 5, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64).to(dtype)


def _awkward(n: int, d: int = 5, seed: int = 0) -> torch.Tensor:
    """Inputs with an exact duplicate (rho = 1), an opposite (rho = -1) and a zero row."""
    x = _x(n, d, seed)
    x[1] = x[0]
    x[2] = -2.0 * x[0]
    x[3] = 0.0
    return x


# architectures covering every combinator, both parameterizations, LayerNorm and the
# numerical activations; each ends with one readout unit
ARCHS = {
    "mlp_relu": lambda: stax.serial(stax.Dense(32, 1.3, 0.2), stax.Relu(), stax.Dense(1, 0.9, 0.1)),
    "deep_standard": lambda: stax.serial(
        stax.Dense(16, 1.2, 0.1, "standard"),
        stax.Erf(),
        stax.Dense(8, 1.1, 0.0, "standard"),
        stax.Gelu(),
        stax.Dense(1, 1.0, None, "standard"),
    ),
    "residual": lambda: stax.serial(
        stax.Dense(16, 1.0, 0.1),
        stax.FanOut(2),
        stax.parallel(stax.serial(stax.Relu(), stax.Dense(16, 1.2, 0.1)), stax.Identity()),
        stax.FanInSum(),
        stax.Abs(),
        stax.Dense(1, 1.0, 0.05),
    ),
    "concat_prod": lambda: stax.serial(
        stax.Dense(8, 1.1, 0.2),
        stax.FanOut(3),
        stax.parallel(
            stax.serial(stax.Dense(4), stax.Relu()),
            stax.serial(stax.Dense(12, 1.5, 0.3), stax.Sin()),
            stax.Dense(6),
        ),
        stax.FanInConcat(),
        stax.Dense(5, 1.0, 0.1),
        stax.FanOut(2),
        stax.parallel(stax.Dense(5, 0.8, 0.2), stax.serial(stax.Dense(5), stax.Erf())),
        stax.FanInProd(),
        stax.Dense(1),
    ),
    "layernorm_hermite": lambda: stax.serial(
        stax.Dense(16, 1.5, 0.3), stax.LayerNorm(), stax.Hermite(3), stax.Dense(1, 1.0, 0.1)
    ),
    "numerical": lambda: stax.serial(
        stax.Dense(8, 1.2, 0.1),
        stax.ElementwiseNumerical(torch.tanh, deg=12),
        stax.Dense(8, 1.0, 0.1, "standard"),
        stax.Gelu(approximate=True),
        stax.Dense(1),
    ),
    "sign_rectified": lambda: stax.serial(
        stax.Dense(8, 1.0, 0.2),
        stax.Sign(),
        stax.Dense(8, 1.0, 0.2),
        stax.RectifiedMonomial(2),
        stax.Dense(1, 1.0, 0.1),
    ),
}

ACTIVATIONS = [
    stax.Relu(),
    stax.LeakyRelu(0.1),
    stax.Abs(),
    stax.ABRelu(-0.4, 1.3),
    stax.Erf(),
    stax.Sigmoid_like(),
    stax.Gelu(),
    stax.Gelu(approximate=True),
    stax.Sign(),
    stax.Sin(),
    stax.Cos(),
    stax.Rbf(0.5),
    stax.Exp(0.5, 0.3),
    stax.Gaussian(),
    stax.Gaussian(1.0, 0.05),
    stax.Monomial(3),
    stax.Polynomial([0.1, 1.0, -0.5]),
    stax.Hermite(3),
    *[stax.RectifiedMonomial(n) for n in range(5)],
    stax.ElementwiseNumerical(torch.tanh, deg=10),
]


def _act_id(layer) -> str:
    return repr(layer).replace(" ", "")


# ------------------------------------------------------------------ Dense identities
def _dense_nngp(x1, x2, w, b):
    return w**2 * x1 @ x2.T / x1.shape[1] + (0.0 if b is None else b**2)


@pytest.mark.parametrize("b_std", [None, 0.0, 0.7])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_dense_single_layer(b_std, parameterization):
    """K = W^2 x.x'/d + b^2 in both parameterizations; the NTK of one layer is K in the
    NTK parameterization and x.x' + [bias] in the standard one (the gradient of a
    standard weight is the input itself, that of a bias is 1)."""
    x1, x2 = _x(4), _x(3, seed=1)
    k = stax.Dense(7, 1.7, b_std, parameterization).kernel_fn(x1, x2)
    torch.testing.assert_close(k.nngp, _dense_nngp(x1, x2, 1.7, b_std), rtol=1e-13, atol=1e-14)
    if parameterization == "ntk":
        ntk = _dense_nngp(x1, x2, 1.7, b_std)
    else:
        ntk = x1 @ x2.T + (0.0 if b_std is None else 1.0)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_dense_two_layer_recursion(parameterization):
    """Theta_2 = K_2 + W2^2 Theta_1 (ntk) or n1 K_1 + 1 + W2^2 Theta_1 (standard)."""
    x1, x2 = _x(4), _x(3, seed=1)
    w1, b1, w2, b2, n1 = 1.4, 0.3, 0.8, 0.5, 13
    net = stax.serial(
        stax.Dense(n1, w1, b1, parameterization), stax.Dense(2, w2, b2, parameterization)
    )
    k = net.kernel_fn(x1, x2)
    k1 = _dense_nngp(x1, x2, w1, b1)
    k2 = w2**2 * k1 + b2**2
    if parameterization == "ntk":
        theta = k2 + w2**2 * k1
    else:
        theta = n1 * k1 + 1 + w2**2 * (x1 @ x2.T + 1)
    torch.testing.assert_close(k.nngp, k2, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(k.ntk, theta, rtol=1e-13, atol=1e-14)


def test_kernel_gradient_in_hyperparameters_closed_form():
    """dK/dW = 2 W x.x'/d and dK/db = 2 b for one Dense layer (W_std, b_std tensors)."""
    x1, x2 = _x(4), _x(3, seed=1)
    w = torch.tensor(1.3, dtype=F64, requires_grad=True)
    b = torch.tensor(0.4, dtype=F64, requires_grad=True)
    k = stax.Dense(3, w, b).kernel_fn(x1, x2, "nngp")
    gw, gb = torch.autograd.grad(k.sum(), (w, b))
    torch.testing.assert_close(gw, (2 * 1.3 * x1 @ x2.T / 5).sum(), rtol=1e-13, atol=0)
    torch.testing.assert_close(gb, torch.tensor(2 * 0.4 * 12, dtype=F64), rtol=1e-13, atol=0)


# ------------------------------------------------------------------ combinator algebra
def test_fan_in_sum_of_independent_branches():
    x1, x2 = _x(4), _x(3, seed=1)
    net = stax.serial(
        stax.FanOut(2),
        stax.parallel(stax.Dense(3, 1.2, 0.1), stax.Dense(3, 0.5, 0.6)),
        stax.FanInSum(),
    )
    k = net.kernel_fn(x1, x2)
    ref = _dense_nngp(x1, x2, 1.2, 0.1) + _dense_nngp(x1, x2, 0.5, 0.6)
    torch.testing.assert_close(k.nngp, ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(k.ntk, ref, rtol=1e-13, atol=1e-14)  # ntk param: Theta = K


def test_fan_in_concat_weights_by_width():
    """A Dense after a concatenation sums over all n1 + n2 channels: K = (n1 K1 + n2 K2)/n."""
    x1, x2 = _x(4), _x(3, seed=1)
    for par in ("ntk", "standard"):
        net = stax.serial(
            stax.FanOut(2),
            stax.parallel(stax.Dense(4, 1.2, 0.1, par), stax.Dense(12, 0.5, 0.6, par)),
            stax.FanInConcat(),
            stax.Dense(1, 0.9, 0.2, par),
        )
        k = net.kernel_fn(x1, x2)
        ka, kb = _dense_nngp(x1, x2, 1.2, 0.1), _dense_nngp(x1, x2, 0.5, 0.6)
        kc = (4 * ka + 12 * kb) / 16
        torch.testing.assert_close(k.nngp, 0.81 * kc + 0.04, rtol=1e-13, atol=1e-14)
        if par == "ntk":
            theta = 0.81 * kc + 0.04 + 0.81 * kc  # branch NTKs equal their NNGPs
        else:  # readout: n K + 1 + W^2 Theta; branch NTK x.x' + 1 each
            theta = 16 * kc + 1 + 0.81 * (x1 @ x2.T + 1)
        torch.testing.assert_close(k.ntk, theta, rtol=1e-13, atol=1e-14)
    out_shape, _ = net.init_fn(0, (-1, 5))
    assert out_shape == (-1, 1)


def test_fan_in_prod_product_rule():
    x1, x2 = _x(4), _x(3, seed=1)
    net = stax.serial(
        stax.FanOut(2),
        stax.parallel(stax.Dense(3, 1.2, 0.1), stax.Dense(3, 0.5, 0.6)),
        stax.FanInProd(),
    )
    k = net.kernel_fn(x1, x2)
    ka, kb = _dense_nngp(x1, x2, 1.2, 0.1), _dense_nngp(x1, x2, 0.5, 0.6)
    torch.testing.assert_close(k.nngp, ka * kb, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(k.ntk, ka * kb + kb * ka, rtol=1e-13, atol=1e-14)
    assert not k.is_gaussian
    with pytest.raises(ValueError, match="Gaussian"):
        stax.serial(net, stax.Relu()).kernel_fn(x1, x2)


def _relu_moments(x1, x2, w, b):
    """Closed forms for relu(u), u the Dense(w, b) output: second moments (arc-cosine,
    order 1), the means E relu(u) = sqrt(q / 2 pi), the pre-activation covariance."""
    c = _dense_nngp(x1, x2, w, b)
    q1 = w**2 * (x1 * x1).sum(1) / x1.shape[1] + b**2
    q2 = w**2 * (x2 * x2).sum(1) / x2.shape[1] + b**2
    s = torch.sqrt(q1[:, None] * q2[None, :])
    t = torch.arccos(torch.clamp(c / s, -1, 1))
    k = s * (torch.sin(t) + (math.pi - t) * torch.cos(t)) / (2 * math.pi)
    return k, torch.sqrt(q1 / (2 * math.pi)), torch.sqrt(q2 / (2 * math.pi)), c, q1, q2


def _exact_or_refused(net, x1, x2, expected, what):
    """Either a clear ValueError, or the exact kernel -- never a silently wrong one."""
    try:
        got = net.kernel_fn(x1, x2, "nngp")
    except ValueError:
        return
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=what)


def test_fan_in_sum_of_non_centred_branches():
    """Independent branches relu(u1), relu(u2) have nonzero means: the second moment of
    the sum has cross terms E relu(u1) E relu(u2') (the covariances add, the NNGP's second
    moments do not)."""
    x1, x2 = _x(4), _x(3, seed=1)
    net = stax.serial(
        stax.FanOut(2),
        stax.parallel(
            stax.serial(stax.Dense(1, 1.0, 0.2), stax.Relu()),
            stax.serial(stax.Dense(1, 1.5, 0.1), stax.Relu()),
        ),
        stax.FanInSum(),
    )
    ka, ma1, ma2, *_ = _relu_moments(x1, x2, 1.0, 0.2)
    kb, mb1, mb2, *_ = _relu_moments(x1, x2, 1.5, 0.1)
    exact = ka + kb + ma1[:, None] * mb2[None, :] + mb1[:, None] * ma2[None, :]
    _exact_or_refused(net, x1, x2, exact, "relu + relu")


def test_fan_in_of_correlated_branches():
    """Branches without fresh weights after FanOut are correlated: h + h has kernel 4K,
    relu(h) + h has K_relu + 2c (Stein: E relu(u) v = c / 2), h * h has q q' + 2c^2
    (Isserlis), not K_relu + c or c^2."""
    x1, x2 = _x(4), _x(3, seed=1)
    k_relu, _, _, c, q1, q2 = _relu_moments(x1, x2, 1.3, 0.2)

    def branches(a, b, join):
        return stax.serial(stax.Dense(1, 1.3, 0.2), stax.FanOut(2), stax.parallel(a, b), join)

    ident = stax.Identity
    _exact_or_refused(branches(ident(), ident(), stax.FanInSum()), x1, x2, 4 * c, "h + h")
    _exact_or_refused(
        branches(stax.Relu(), ident(), stax.FanInSum()), x1, x2, k_relu + 2 * c, "relu(h) + h"
    )
    _exact_or_refused(
        branches(ident(), ident(), stax.FanInProd()),
        x1,
        x2,
        q1[:, None] * q2[None, :] + 2 * c**2,
        "h * h",
    )


def test_layernorm_after_a_non_centred_nonlinearity():
    """LayerNorm subtracts the feature mean: after relu(u) the kernel is
    (K_relu - m m') / sqrt(v v') with m = E relu(u), v = E relu(u)^2 - m^2."""
    x1, x2 = _x(4), _x(3, seed=1)
    net = stax.serial(stax.Dense(1, 1.3, 0.2), stax.Relu(), stax.LayerNorm())
    k, m1, m2, _, q1, q2 = _relu_moments(x1, x2, 1.3, 0.2)
    v1, v2 = q1 / 2 - m1**2, q2 / 2 - m2**2
    exact = (k - m1[:, None] * m2[None, :]) / torch.sqrt(v1[:, None] * v2[None, :])
    _exact_or_refused(net, x1, x2, exact, "relu -> LayerNorm")


def test_identity_and_nested_serial():
    x1, x2 = _x(4), _x(3, seed=1)
    a = stax.serial(stax.Dense(3, 1.2, 0.1), stax.Identity(), stax.Relu(), stax.Dense(1))
    b = stax.serial(stax.serial(stax.Dense(3, 1.2, 0.1)), stax.serial(stax.Relu(), stax.Dense(1)))
    ka, kb = a.kernel_fn(x1, x2), b.kernel_fn(x1, x2)
    torch.testing.assert_close(ka.nngp, kb.nngp, rtol=0, atol=0)
    torch.testing.assert_close(ka.ntk, kb.ntk, rtol=0, atol=0)


def test_layernorm_normalises_the_dense_kernel():
    x1, x2 = _x(4), _x(3, seed=1)
    k = stax.serial(stax.Dense(3, 1.3, 0.4), stax.LayerNorm()).kernel_fn(x1, x2)
    kd = _dense_nngp(x1, x2, 1.3, 0.4)
    q1 = 1.69 * (x1 * x1).sum(1) / 5 + 0.16
    q2 = 1.69 * (x2 * x2).sum(1) / 5 + 0.16
    # LayerNorm's eps = 1e-12 shifts the variances by 1e-12 relative
    torch.testing.assert_close(k.nngp, kd / torch.sqrt(q1[:, None] * q2), rtol=1e-10, atol=0)
    torch.testing.assert_close(k.ntk, k.nngp, rtol=1e-12, atol=0)  # Theta_dense = K_dense
    torch.testing.assert_close(k.cov1, torch.ones(4, dtype=F64), rtol=1e-10, atol=0)


# ------------------------------------------------------------------ symmetry, PSD, paths
@pytest.mark.parametrize("arch", list(ARCHS))
def test_symmetric_and_psd(arch):
    net = ARCHS[arch]()
    x = _x(20)  # N >= 16: the packed upper-triangle layout
    k = net.kernel_fn(x, None)
    for name, mat in (("nngp", k.nngp), ("ntk", k.ntk)):
        torch.testing.assert_close(mat, mat.T, rtol=0, atol=0, msg=name)
        eig = torch.linalg.eigvalsh(mat)
        # Gram matrices of feature maps: PSD up to float64 rounding of the largest entry
        assert float(eig.min()) >= -1e-10 * float(eig.max()), (name, eig[:3])
    torch.testing.assert_close(k.cov1, k.nngp.diagonal(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [5, 20], ids=["dense", "packed"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_x2_none_equals_x2_is_x(arch, n):
    """The symmetric path (packed for N >= 16) equals the general two-batch path."""
    net = ARCHS[arch]()
    x = _awkward(n)
    a, b = net.kernel_fn(x, None), net.kernel_fn(x, x.clone())
    # rho = +-1 pairs: arcsin-type maps are sqrt-singular there, so the two paths'
    # different roundings of rho may show as sqrt(eps) ~ 1e-8 (the well-conditioned
    # ReLU diagonal's precision is tested by test_piecewise_linear_diagonal_is_exact)
    torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a.cov1, b.cov1, rtol=1e-7, atol=0)
    torch.testing.assert_close(b.cov2, b.cov1, rtol=0, atol=0)
    assert a.cov2 is None
    assert a.nngp.shape == a.ntk.shape == (n, n)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swapping_the_batches_transposes_the_kernel(arch):
    """K(x, x') = K(x', x): every map is symmetric in its two examples (for quadrature
    maps too, which must not favour one variable of the Gaussian pair)."""
    net = ARCHS[arch]()
    x1, x2 = _awkward(6), _x(4, seed=2)
    a, b = net.kernel_fn(x1, x2), net.kernel_fn(x2, x1)
    # sqrt(eps) ~ 1e-8 at rho = +-1 as in test_x2_none_equals_x2_is_x
    torch.testing.assert_close(a.nngp, b.nngp.T, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(a.ntk, b.ntk.T, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(a.cov1, b.cov2, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pairs_are_independent_of_the_batch(arch):
    """Each entry depends only on its two examples: sub-batches give the same entries,
    and cov1/cov2 are the diagonals of the symmetric kernels."""
    net = ARCHS[arch]()
    x1, x2 = _awkward(6), _x(4, seed=3)
    k = net.kernel_fn(x1, x2)
    sub = net.kernel_fn(x1[2:5], x2[1:3])
    torch.testing.assert_close(sub.nngp, k.nngp[2:5, 1:3], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sub.ntk, k.ntk[2:5, 1:3], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        k.cov1, net.kernel_fn(x1, None, "nngp").diagonal(), rtol=1e-7, atol=1e-12
    )
    torch.testing.assert_close(
        k.cov2, net.kernel_fn(x2, None, "nngp").diagonal(), rtol=1e-7, atol=1e-12
    )


@pytest.mark.parametrize("arch", ["mlp_relu", "concat_prod", "numerical"])
def test_tiled_equals_untiled(arch):
    net = ARCHS[arch]()
    x1, x2 = _x(11), _x(7, seed=1)
    # tiles are the same computation on sub-batches: equal up to rounding, except that
    # sqrt(eps) ~ 1e-8 amplification at rho = 1 (see test_x2_none_equals_x2_is_x)
    for other in (None, x2):
        ref = net.kernel_fn(x1, other)
        tiled = net.kernel_fn(x1, other, batch_size=3, progress=False)
        torch.testing.assert_close(tiled.nngp, ref.nngp, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(tiled.ntk, ref.ntk, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(tiled.cov1, ref.cov1, rtol=1e-7, atol=1e-12)


def test_chunked_packed_path_equals_rows():
    """N = 400 symmetric: 80,200 packed pairs, evaluated in chunks of pairs; compare with
    row blocks computed on the dense (unchunked) path."""
    net = ARCHS["concat_prod"]()
    x = _x(400, d=3)
    full = net.kernel_fn(x, None)
    for rows in (slice(0, 7), slice(391, 400)):
        part = net.kernel_fn(x[rows], x)
        # as in test_tiled_equals_untiled
        torch.testing.assert_close(full.nngp[rows], part.nngp, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(full.ntk[rows], part.ntk, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(full.nngp, full.nngp.T, rtol=0, atol=0)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=_act_id)
def test_inplace_and_autograd_paths_agree(act):
    """Without autograd some maps run fused in-place kernels; with inputs that require
    grad the autograd-safe maps run. Both must give the same kernel."""
    net = stax.serial(stax.Dense(6, 1.1, 0.2), act, stax.Dense(1, 0.9, 0.1))
    x1, x2 = 0.5 * _awkward(6), 0.5 * _x(4, seed=2)  # Gaussian(b > 0) needs q < 1/(4b)
    plain = net.kernel_fn(x1, x2)
    graded = net.kernel_fn(x1.clone().requires_grad_(True), x2)
    # identical/opposite inputs: sqrt(eps) ~ 1e-8 near rho = +-1 (see test below)
    torch.testing.assert_close(plain.nngp, graded.nngp.detach(), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(plain.ntk, graded.ntk.detach(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "act, factor", [(stax.Relu(), 0.5), (stax.Abs(), 1.0)], ids=["relu", "abs"]
)
def test_piecewise_linear_diagonal_is_exact(act, factor, dtype):
    """E[phi(u)^2] = (a^2 + b^2) q / 2 for phi = ABRelu(a, b): the diagonal is well
    conditioned (J_1'(rho) = arcsin rho is finite at rho = 1), so it must be exact to a few
    ulps in either precision -- the autograd path is (measured 2e-16 / 2e-7 relative)."""
    x = _x(50, d=10, seed=4, dtype=dtype)
    k = stax.serial(stax.Dense(1, 1.3), act).kernel_fn(x, None)
    ref = factor * 1.69 * (x.double() ** 2).sum(1) / 10
    eps = torch.finfo(dtype).eps
    for name, val in (("cov1", k.cov1), ("diagonal", k.nngp.diagonal())):
        rel = float(((val.double() - ref) / ref).abs().max())
        assert rel <= 50 * eps, f"{name}: relative error {rel:.2e} = {rel / eps:.0f} ulps"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32_matches_float64(arch):
    net = ARCHS[arch]()
    x1, x2 = _awkward(6), _x(4, seed=2)
    k64 = net.kernel_fn(x1, x2)
    k32 = net.kernel_fn(x1.float(), x2.float())
    assert k32.nngp.dtype == k32.ntk.dtype == k32.cov1.dtype == torch.float32
    # float32 eps 6e-8; sign/step/arcsin maps are sqrt-singular at rho = +-1, where the
    # error becomes sqrt(eps) ~ 2.4e-4 of the kernel's scale
    for name in ("nngp", "ntk"):
        a, b = getattr(k32, name).double(), getattr(k64, name)
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 1e-3, (name, err)


# ------------------------------------------------------------------ dtype / device / get
def test_dtype_follows_input_and_numpy_accepted():
    net = ARCHS["concat_prod"]()
    x = _x(5)
    k_np = net.kernel_fn(x.numpy(), None)
    assert isinstance(k_np.nngp, torch.Tensor) and k_np.nngp.dtype == F64
    torch.testing.assert_close(k_np.nngp, net.kernel_fn(x, None).nngp, rtol=0, atol=0)
    k32 = net.kernel_fn(x.numpy().astype(np.float32), x.numpy()[:2].astype(np.float32))
    assert k32.nngp.dtype == k32.ntk.dtype == k32.cov2.dtype == torch.float32
    for get in ("nngp", "ntk", "cov1"):
        assert net.kernel_fn(x.float(), None, get).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = ARCHS["concat_prod"]()
    x = _x(20)
    kc = net.kernel_fn(x.cuda(), None)
    assert kc.nngp.device.type == "cuda" and kc.ntk.device.type == "cuda"
    torch.testing.assert_close(kc.nngp.cpu(), net.kernel_fn(x, None).nngp, rtol=1e-10, atol=0)
    _, params = net.init_fn(0, (-1, 5), dtype=F64, device="cuda")
    assert all(p.device.type == "cuda" for p in _leaves(params))


def test_get_conventions():
    net = ARCHS["mlp_relu"]()
    x1, x2 = _x(4), _x(3, seed=1)
    full = net.kernel_fn(x1, x2)
    assert isinstance(full, Kernel)
    assert full.nngp.shape == full.ntk.shape == (4, 3)
    nngp, ntk = full  # a record unpacks as (nngp, ntk)
    assert nngp is full.nngp and ntk is full.ntk
    t = net.kernel_fn(x1, x2, "nngp")
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(t, full.nngp, rtol=0, atol=0)
    pair = net.kernel_fn(x1, x2, ("ntk", "nngp"))
    assert pair._fields == ("ntk", "nngp")
    torch.testing.assert_close(pair[0], full.ntk, rtol=0, atol=0)
    torch.testing.assert_close(pair.nngp, full.nngp, rtol=0, atol=0)
    covs = net.kernel_fn(x1, x2, ["cov2", "cov1"])
    assert covs._fields == ("cov2", "cov1")
    torch.testing.assert_close(covs.cov1, full.cov1, rtol=0, atol=0)
    assert net.kernel_fn(x1, None, "cov2") is None
    torch.testing.assert_close(net.kernel_fn(x1, None, "ntk"), net.kernel_fn(x1, x1, "ntk"))
    init_fn, apply_fn, kernel_fn = net  # the NT-style triple
    torch.testing.assert_close(kernel_fn(x1, x2, "nngp"), t, rtol=0, atol=0)
    torch.testing.assert_close(net(x1, x2, "nngp"), t, rtol=0, atol=0)


def test_only_what_get_asks_is_computed():
    """get='nngp' never evaluates the derivative kernel; the NTK does."""
    calls = []

    def d_nngp(c, q1, q2):
        calls.append(c.shape)
        return torch.ones_like(c)

    act = stax.Elementwise(
        torch.tanh, lambda c, q1, q2: c / (1 + q1) ** 0.5 / (1 + q2) ** 0.5, d_nngp
    )
    net = stax.serial(stax.Dense(4, 1.0, 0.1), act, stax.Dense(1))
    x = _x(20)
    for get in ("nngp", ("nngp", "cov1"), "cov1"):
        net.kernel_fn(x, None, get)
        net.kernel_fn(x, x, get)
    assert not calls
    net.kernel_fn(x, None, "ntk")
    assert calls


def _input_record(x: torch.Tensor) -> Kernel:
    """The raw-input kernel built by hand, without an NTK: x x^T / d."""
    n, d = x.shape
    return Kernel(
        nngp=x @ x.T / d,
        ntk=None,
        cov1=(x * x).sum(1) / d,
        cov2=None,
        shape1=tuple(x.shape),
        shape2=tuple(x.shape),
        n1=n,
        n2=n,
    )


def test_kernel_record_is_transformed():
    net = ARCHS["residual"]()
    x = _awkward(6)
    # a hand-built input record without an NTK: only the NNGP is propagated
    out = net.kernel_fn(_input_record(x))
    assert isinstance(out, Kernel) and out.ntk is None
    torch.testing.assert_close(out.nngp, net.kernel_fn(x, None, "nngp"), rtol=1e-12, atol=1e-14)
    # a record from the first layers continues through the rest
    first, rest = stax.Dense(16, 1.0, 0.1), stax.serial(*net.layers[1:])
    whole = net.kernel_fn(x, None)
    cont = rest.kernel_fn(first.kernel_fn(x, None))
    torch.testing.assert_close(cont.nngp, whole.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cont.ntk, whole.ntk, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="alone"):
        rest.kernel_fn(first.kernel_fn(x, None), x)


# ------------------------------------------------------------------ finite networks
def _leaves(params):
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, dict):
        return [leaf for v in params.values() for leaf in _leaves(v)]
    if isinstance(params, (tuple, list)):
        return [leaf for v in params for leaf in _leaves(v)]
    return []


def _same_params(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(torch.equal(u, v) for u, v in zip(la, lb))


def test_init_fn_seeds_and_generators_are_reproducible():
    net = ARCHS["concat_prod"]()
    s1, p1 = net.init_fn(3, (-1, 5))
    s2, p2 = net.init_fn(3, (-1, 5))
    assert s1 == s2 == (-1, 1)
    assert _same_params(p1, p2)
    assert not _same_params(p1, net.init_fn(4, (-1, 5))[1])
    _, g1 = net.init_fn(torch.Generator().manual_seed(7), (-1, 5))
    _, g2 = net.init_fn(torch.Generator().manual_seed(7), (-1, 5))
    assert _same_params(g1, g2)
    gen = torch.Generator().manual_seed(7)
    _, first = net.init_fn(gen, (-1, 5))
    _, second = net.init_fn(gen, (-1, 5))  # the generator advances: fresh draws
    assert not _same_params(first, second)
    _, p64 = net.init_fn(0, (2, 5), dtype=F64, device="cpu")
    assert all(p.dtype == F64 and p.device.type == "cpu" for p in _leaves(p64))
    assert all(p.dtype == torch.get_default_dtype() for p in _leaves(p1))


def test_dense_params_layout_and_distribution():
    """ntk: W, b ~ N(0, 1); standard: W ~ N(0, W_std^2 / n_in), b ~ N(0, b_std^2)."""
    _, p = stax.Dense(512, 2.0, 0.5).init_fn(0, (-1, 256), dtype=F64)
    assert set(p) == {"W", "b"} and p["W"].shape == (512, 256) and p["b"].shape == (512,)
    # 131,072 draws: the sample std has relative standard error 1/sqrt(2 n) = 0.2%
    assert float(p["W"].std()) == pytest.approx(1.0, rel=0.01)
    _, p = stax.Dense(512, 2.0, 0.5, "standard").init_fn(0, (-1, 256), dtype=F64)
    assert float(p["W"].std()) == pytest.approx(2.0 / 16, rel=0.01)
    # 512 draws: relative standard error 3.1%, so 15% is a 5-sigma bound
    assert float(p["b"].std()) == pytest.approx(0.5, rel=0.15)
    _, p = stax.Dense(3, 1.0, None).init_fn(0, (-1, 4))
    assert set(p) == {"W"}


def test_apply_fn_shapes_and_branches():
    x = _x(6)
    net = ARCHS["concat_prod"]()
    out_shape, params = net.init_fn(0, (-1, 5), dtype=F64)
    assert net.apply_fn(params, x).shape == (6, 1)
    branches = stax.serial(
        stax.Dense(8), stax.FanOut(3), stax.parallel(stax.Dense(4), stax.Relu(), stax.Identity())
    )
    shapes, params = branches.init_fn(0, (-1, 5), dtype=F64)
    assert shapes == [(-1, 4), (-1, 8), (-1, 8)]
    ys = branches.apply_fn(params, x)
    assert isinstance(ys, list) and [tuple(y.shape) for y in ys] == [(6, 4), (6, 8), (6, 8)]
    torch.testing.assert_close(ys[1], torch.relu(ys[2]), rtol=0, atol=0)
    cat = stax.serial(branches, stax.FanInConcat())
    shape, params = cat.init_fn(0, (-1, 5), dtype=F64)
    assert shape == (-1, 20) and cat.apply_fn(params, x).shape == (6, 20)


def test_apply_fn_is_the_documented_network():
    """Dense in ntk parameterization computes W_std / sqrt(n) x W^T + b_std b."""
    x = _x(4)
    layer = stax.Dense(3, 1.7, 0.3)
    _, p = layer.init_fn(0, (-1, 5), dtype=F64)
    ref = 1.7 / math.sqrt(5) * x @ p["W"].T + 0.3 * p["b"]
    torch.testing.assert_close(layer.apply_fn(p, x), ref, rtol=1e-14, atol=1e-14)
    std = stax.Dense(3, 1.7, 0.3, "standard")
    _, p = std.init_fn(0, (-1, 5), dtype=F64)
    torch.testing.assert_close(std.apply_fn(p, x), x @ p["W"].T + p["b"], rtol=0, atol=0)


def test_to_module_matches_apply_fn_and_trains():
    net = ARCHS["residual"]()
    x, y = _x(16), torch.sin(_x(16, d=1, seed=9))
    module = net.to_module((-1, 5), key=2, dtype=F64)
    _, params = net.init_fn(2, (-1, 5), dtype=F64)
    torch.testing.assert_close(module(x), net.apply_fn(params, x), rtol=0, atol=0)
    assert _same_params(module.stax_params, params)
    registered = list(module.parameters())
    assert len(registered) == len(_leaves(params))
    assert sum(p.numel() for p in registered) == sum(p.numel() for p in _leaves(params))
    out = torch.func.functional_call(module, dict(module.named_parameters()), (x,))
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ((module(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # gradient descent with a small step decreases the loss
    assert not _same_params(module.stax_params, params)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("n", [6, 16], ids=["dense", "packed"])
@pytest.mark.parametrize("b_std", [None, 0.3])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=_act_id)
def test_input_gradients_finite(act, b_std, n):
    """Identical rows (rho = 1), opposite rows (rho = -1) and zero rows (zero variance
    without bias) are where arcsin/sqrt have infinite derivatives."""
    net = stax.serial(stax.Dense(4, 1.0, b_std), act, stax.Dense(4, 0.9, b_std), act, stax.Dense(1))
    x = (0.5 * _awkward(n, d=3)).requires_grad_(True)
    for x2 in (None, x):
        k = net.kernel_fn(x, x2)
        assert torch.isfinite(k.nngp).all() and torch.isfinite(k.ntk).all()
        for what in (k.nngp, k.ntk):
            (g,) = torch.autograd.grad(what.sum(), x, retain_graph=True)
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize(
    "act",
    [stax.Relu(), stax.Erf(), stax.Gelu(), stax.Sign(), stax.RectifiedMonomial(2)],
    ids=_act_id,
)
def test_hyperparameter_gradients_finite(act, parameterization):
    x = _awkward(6)
    w = torch.tensor(1.3, dtype=F64, requires_grad=True)
    b = torch.tensor(0.2, dtype=F64, requires_grad=True)
    net = stax.serial(
        stax.Dense(8, w, b, parameterization), act, stax.Dense(1, w, b, parameterization)
    )
    k = net.kernel_fn(x, None)
    grads = torch.autograd.grad(k.nngp.sum() + k.ntk.sum(), (w, b))
    assert all(torch.isfinite(g) and g != 0 for g in grads)


def test_gradcheck_erf_inputs_and_hyperparameters():
    """Smooth case: autograd equals finite differences (float64), also for NTK entries."""
    x1 = _x(3, d=4).requires_grad_(True)
    x2 = _x(2, d=4, seed=1).requires_grad_(True)
    w = torch.tensor(1.2, dtype=F64, requires_grad=True)
    b = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def kernels(x1, x2, w, b):
        net = stax.serial(stax.Dense(8, w, b), stax.Erf(), stax.Dense(1, w, b))
        k = net.kernel_fn(x1, x2)
        return k.nngp, k.ntk

    assert torch.autograd.gradcheck(kernels, (x1, x2, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_relu_away_from_rho_one():
    x1 = _x(3, d=4).requires_grad_(True)
    x2 = _x(2, d=4, seed=1).requires_grad_(True)

    def kernels(x1, x2):
        net = stax.serial(stax.Dense(8, 1.3, 0.1), stax.Relu(), stax.Dense(1, 1.0, 0.1))
        k = net.kernel_fn(x1, x2)
        return k.nngp, k.ntk

    assert torch.autograd.gradcheck(kernels, (x1, x2), eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ bad input
NET = stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(1))


BAD_INPUTS = {
    "feature_mismatch": (_x(3, 5), _x(2, 4), ValueError, "x2"),
    "rank1": (torch.ones(5, dtype=F64), None, ValueError, "rank"),
    "rank0": (torch.tensor(1.0, dtype=F64), None, ValueError, "x1"),
    "rank6": (torch.ones(2, 3, 1, 1, 1, 1, dtype=F64), None, ValueError, "shape"),
    "empty_batch": (torch.ones(0, 5, dtype=F64), None, ValueError, "empty"),
    "empty_x2": (_x(3), torch.ones(0, 5, dtype=F64), ValueError, "x2 is empty"),
    "no_features": (torch.ones(3, 0, dtype=F64), None, ValueError, "x1"),
    "nan": (torch.tensor([[1.0, float("nan")]], dtype=F64), None, ValueError, "NaN"),
    "inf_x2": (_x(2), torch.tensor([[float("inf")] * 5], dtype=F64), ValueError, "x2 contains"),
    "int": (torch.ones(2, 5, dtype=torch.int64), None, TypeError, "dtype"),
    "bool": (torch.ones(2, 5, dtype=torch.bool), None, TypeError, "dtype"),
    "complex": (torch.ones(2, 5, dtype=torch.complex128), None, TypeError, "dtype"),
    "half": (torch.ones(2, 5, dtype=torch.float16), None, TypeError, "dtype"),
    "dtype_mismatch": (_x(2), _x(2).float(), TypeError, "dtype"),
    "list": ([[1.0, 2.0]], None, TypeError, "x1"),
    "object_array": (np.ones((2, 5), dtype=object), None, TypeError, "x1"),
}


@pytest.mark.parametrize("x1, x2, exc, match", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_inputs(x1, x2, exc, match):
    with pytest.raises(exc, match=match):
        NET.kernel_fn(x1, x2)


@pytest.mark.parametrize("get", ["nngpp", ("nngp", "foo"), (), ("nngp", "nngp"), 3, ("nngp", 1)])
def test_bad_get(get):
    with pytest.raises((ValueError, TypeError), match="get"):
        NET.kernel_fn(_x(2), None, get)


@pytest.mark.parametrize(
    "net",
    [
        stax.Relu(),
        stax.serial(stax.Erf(), stax.Dense(1)),
        stax.serial(stax.Dense(3), stax.Relu(), stax.Relu()),
        stax.serial(stax.Dense(3), stax.Sin(), stax.ElementwiseNumerical(torch.tanh)),
        stax.serial(stax.Dense(3), stax.LayerNorm(), stax.Relu(), stax.Identity(), stax.Erf()),
    ],
    ids=["raw_input", "raw_input_serial", "two_in_a_row", "numerical", "through_identity"],
)
def test_nonlinearity_needs_gaussian_input(net):
    with pytest.raises(ValueError, match="Gaussian"):
        net.kernel_fn(_x(3), None)


BRANCH_ERRORS = {
    "sum_single": (stax.serial(stax.Dense(3), stax.FanInSum()), "branches"),
    "concat_single": (stax.serial(stax.Dense(3), stax.FanInConcat()), "branches"),
    "prod_single": (stax.serial(stax.Dense(3), stax.FanInProd()), "branches"),
    "one_branch": (stax.serial(stax.FanOut(1), stax.FanInSum()), "at least 2"),
    "parallel_too_few_layers": (
        stax.serial(stax.FanOut(3), stax.parallel(stax.Dense(2), stax.Dense(2)), stax.FanInSum()),
        "parallel",
    ),
    "parallel_too_many_layers": (
        stax.serial(
            stax.FanOut(2),
            stax.parallel(stax.Dense(2), stax.Dense(2), stax.Dense(2)),
            stax.FanInSum(),
        ),
        "parallel",
    ),
    "parallel_single": (
        stax.serial(stax.Dense(3), stax.parallel(stax.Dense(2), stax.Dense(2))),
        "parallel",
    ),
    "dense_on_branches": (stax.serial(stax.FanOut(2), stax.Dense(2)), "branches"),
    "shapes_differ": (
        stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(2), stax.Dense(3)), stax.FanInSum()),
        "shapes differ",
    ),
}


@pytest.mark.parametrize("net, match", list(BRANCH_ERRORS.values()), ids=list(BRANCH_ERRORS))
def test_branch_count_errors(net, match):
    """The kernel and the finite network refuse the same miswired architectures."""
    with pytest.raises(ValueError, match=match):
        net.kernel_fn(_x(3), None)
    with pytest.raises(ValueError, match=match):
        _, params = net.init_fn(0, (-1, 5))
        net.apply_fn(params, _x(3).float())


def test_kernel_of_unjoined_branches_is_refused():
    net = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(2), stax.Dense(3)))
    with pytest.raises(ValueError, match="FanIn"):
        net.kernel_fn(_x(3), None)
    shapes, params = net.init_fn(0, (-1, 5))  # the finite network may end with branches
    assert shapes == [(-1, 2), (-1, 3)]


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: stax.Dense(3, W_std=-1.0), ValueError, "W_std"),
        (lambda: stax.Dense(3, b_std=-0.1), ValueError, "b_std"),
        (lambda: stax.Dense(3, W_std=float("nan")), ValueError, "W_std"),
        (lambda: stax.Dense(3, W_std="1"), TypeError, "W_std"),
        (lambda: stax.Dense(3, W_std=torch.tensor(-1.0)), ValueError, "W_std"),
        (lambda: stax.Dense(3, W_std=torch.ones(2)), ValueError, "W_std"),
        (lambda: stax.Dense(0), ValueError, "out_dim"),
        (lambda: stax.Dense(2.5), TypeError, "out_dim"),
        (lambda: stax.Dense(3, parameterization="std"), ValueError, "parameterization"),
        (lambda: stax.FanOut(0), ValueError, "n"),
        (lambda: stax.LayerNorm(eps=-1.0), ValueError, "eps"),
        (lambda: stax.serial(stax.Dense(2), torch.nn.ReLU()), TypeError, "argument 1"),
        (lambda: stax.parallel(stax.Dense(2), "relu"), TypeError, "argument 1"),
    ],
)
def test_invalid_layer_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_init_fn_bad_key_and_shape():
    with pytest.raises(TypeError, match="key"):
        NET.init_fn("0", (-1, 5))
    with pytest.raises(TypeError, match="input_shape"):
        NET.init_fn(0, [-1, 5.0])


FUSED_NETS = {
    "relu-erf": lambda: stax.serial(
        stax.Dense(64, W_std=1.4, b_std=0.1),
        stax.Relu(),
        stax.Dense(64, W_std=1.4, b_std=0.1),
        stax.Erf(),
        stax.Dense(1, W_std=1.4, b_std=0.1),
    ),
    "leaky-abs-nobias": lambda: stax.serial(
        stax.Dense(64, W_std=1.2),
        stax.LeakyRelu(0.2),
        stax.serial(stax.Dense(64, W_std=0.9), stax.Abs()),
        stax.Dense(3, W_std=1.1),
    ),
    "erf-abc-trailing": lambda: stax.serial(
        stax.Dense(64, W_std=1.0, b_std=0.3),
        stax.Dense(64, W_std=1.3, b_std=0.2),  # two affine layers in a row
        stax.Erf(a=1.5, b=0.7, c=0.2),
        stax.Dense(64, W_std=1.4, b_std=0.1),
        stax.ABRelu(-0.5, 2.0),  # ends with an activation: no readout
    ),
}


@pytest.mark.parametrize("name", sorted(FUSED_NETS))
@pytest.mark.parametrize("need_ntk", [True, False])
def test_threaded_blocks_equal_one_block(name: str, need_ntk: bool) -> None:
    """The fully-connected path splits the pair grid into blocks (torch using 2 threads)
    and runs the fused plan (per-example variance chains, activations fused with the
    next Dense); assembled and mirrored for x2=None, the blocks equal the layer-by-layer
    evaluation of the whole grid, an independent code path."""
    from infnets._src.evaluate.chunks import evaluate_fc, fc_plan

    net = FUSED_NETS[name]()
    assert fc_plan(net) is not None
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(97, 5, dtype=torch.float64, generator=gen)
    x1[7] = x1[3]  # a duplicated example: correlation 1 off the diagonal
    x1[11] = 0.0  # a zero-norm example
    x2 = torch.randn(41, 5, dtype=torch.float64, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for a, b in ((x1, None), (x1, x2)):
            blocks = evaluate_fc(net, a, b, need_ntk=need_ntk, chunk=300)
            whole = evaluate_fc(net, a, b, need_ntk=need_ntk, chunk=10**9)
            torch.testing.assert_close(blocks.nngp, whole.nngp, rtol=1e-12, atol=1e-12)
            if need_ntk:
                torch.testing.assert_close(blocks.ntk, whole.ntk, rtol=1e-12, atol=1e-12)
            else:
                assert blocks.ntk is None and whole.ntk is None
            torch.testing.assert_close(blocks.cov1, whole.cov1, rtol=1e-12, atol=1e-12)
            assert blocks.shape1 == whole.shape1 and blocks.shape2 == whole.shape2
            assert blocks.is_gaussian == whole.is_gaussian
            if b is None:
                assert torch.equal(blocks.nngp, blocks.nngp.T)
                if need_ntk:
                    assert torch.equal(blocks.ntk, blocks.ntk.T)
                # diagonal pairs see correlation exactly 1: the diagonal is the variance
                torch.testing.assert_close(blocks.nngp.diagonal(), blocks.cov1, rtol=1e-14, atol=0)
                # the duplicated example's pair equals the diagonal to round-off, not 1e-8
                torch.testing.assert_close(blocks.nngp[3, 7], blocks.nngp[3, 3], rtol=1e-13, atol=0)
            else:
                torch.testing.assert_close(blocks.cov2, whole.cov2, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(before)


def test_erf_with_zero_gain_is_constant_without_nan() -> None:
    """``Erf(a=0)`` is the constant ``c``: the kernel after the readout is
    ``W^2 c^2 + b^2`` and the NTK equals it (the derivative term vanishes, no
    ``0 * inf`` at correlation 1), on the fused block path and layer by layer."""
    from infnets._src.evaluate.chunks import evaluate_fc

    net = stax.serial(
        stax.Dense(16, W_std=1.3, b_std=0.2), stax.Erf(a=0.0, c=0.5), stax.Dense(1, 1.1, 0.3)
    )
    x = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[5] = x[2]
    expected = 1.1**2 * 0.5**2 + 0.3**2
    for chunk in (100, 10**9):
        k = evaluate_fc(net, x, None, need_ntk=True, chunk=chunk)
        torch.testing.assert_close(k.nngp, torch.full_like(k.nngp, expected), rtol=1e-14, atol=0)
        torch.testing.assert_close(k.ntk, k.nngp, rtol=1e-14, atol=0)


def test_fc_plan_falls_back_where_it_does_not_apply() -> None:
    """Only Dense (NTK parameterization, float hyper-parameters) and fused activations
    after a Dense form a plan; everything else is evaluated layer by layer."""
    from infnets._src.evaluate.chunks import fc_plan

    assert fc_plan(stax.serial(stax.Dense(8, parameterization="standard"), stax.Relu())) is None
    assert fc_plan(stax.serial(stax.Dense(8), stax.Gelu())) is None
    assert fc_plan(stax.serial(stax.Relu(), stax.Dense(8))) is None
    assert fc_plan(stax.serial(stax.Dense(8), stax.Relu(), stax.Relu())) is None
    w = torch.tensor(1.5, dtype=torch.float64)
    assert fc_plan(stax.serial(stax.Dense(8, W_std=w), stax.Relu())) is None
    plan = fc_plan(stax.serial(stax.Dense(8, W_std=2.0, b_std=0.5), stax.Relu(), stax.Dense(1)))
    assert plan is not None and len(plan) == 2
    assert plan[0].act is None and (plan[0].w2, plan[0].b2) == (4.0, 0.25)
    assert plan[1].dense and (plan[1].w2, plan[1].b2) == (1.0, 0.0)
