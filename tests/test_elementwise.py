"""Closed-form kernels of the elementwise nonlinearities against independent oracles.

Oracles: closed forms written here from the literature (arc-cosine kernels of Cho & Saul
2009, Williams 1997 for erf, trigonometric identities with the Gaussian characteristic
function, Isserlis' theorem for polynomial moments, Mehler's formula for Hermite
polynomials) and the polar-coordinate quadrature of ``helpers.gauss_pair_expect``
applied to activation functions and derivatives written by hand in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special

from helpers import gauss_pair_expect
from infnets import stax

F64 = torch.float64


def _t(v) -> torch.Tensor:
    return torch.as_tensor(np.asarray(v, dtype=np.float64))


# --------------------------------------------------------------- hand-written phi, phi'
def _step(x):  # derivative of relu; the value 1/2 at 0 never matters (measure zero)
    return np.heaviside(x, 0.5)


def _abrelu(a, b):
    return (lambda x: np.where(x > 0, b * x, a * x), lambda x: np.where(x > 0, b, a))


def _gelu_tanh(x):
    g = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(g))


def _gelu_tanh_d(x):
    g = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    dg = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x**2)
    t = np.tanh(g)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dg


def _norm_cdf(x):
    return 0.5 * (1 + special.erf(x / math.sqrt(2)))


def _norm_pdf(x):
    return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _hermite_e(n, x):
    """Probabilists' Hermite polynomial by its three-term recurrence."""
    h0, h1 = np.ones_like(x), x
    if n == 0:
        return h0
    for k in range(1, n):
        h0, h1 = h1, x * h1 - k * h0
    return h1


def _rect_mono(n):
    if n == 0:
        return (lambda x: (x > 0).astype(float)), None  # library: derivative kernel 0
    return (lambda x: np.maximum(x, 0) ** n), (
        lambda x: n * (np.maximum(x, 0) ** (n - 1) if n > 1 else _step(x))
    )


def _poly(coef):
    dcoef = [i * a for i, a in enumerate(coef)][1:] or [0.0]
    return (
        lambda x: sum(a * x**i for i, a in enumerate(coef)),
        lambda x: sum(a * x**i for i, a in enumerate(dcoef)) + 0 * x,
    )


_SIG_B = 1 / 2.4020563531719796  # Neural Tangents' Sigmoid_like: 0.5 erf(x / 2.402...) + 0.5
_RBF_G = 0.7

# id -> (layer factory, phi, phi' or None when the library defines E[phi' phi'] = 0)
ACTIVATIONS = {
    "ABRelu": (lambda: stax.ABRelu(-0.3, 1.2), *_abrelu(-0.3, 1.2)),
    "LeakyRelu": (lambda: stax.LeakyRelu(0.1), *_abrelu(0.1, 1.0)),
    "Relu": (stax.Relu, lambda x: np.maximum(x, 0), _step),
    "Abs": (stax.Abs, np.abs, np.sign),
    "Erf": (
        lambda: stax.Erf(a=1.3, b=0.7, c=0.2),
        lambda x: 1.3 * special.erf(0.7 * x) + 0.2,
        lambda x: 1.3 * 0.7 * 2 / math.sqrt(math.pi) * np.exp(-((0.7 * x) ** 2)),
    ),
    "Sigmoid_like": (
        stax.Sigmoid_like,
        lambda x: 0.5 * special.erf(_SIG_B * x) + 0.5,
        lambda x: 0.5 * _SIG_B * 2 / math.sqrt(math.pi) * np.exp(-((_SIG_B * x) ** 2)),
    ),
    "Gelu": (
        stax.Gelu,
        lambda x: x * _norm_cdf(x),
        lambda x: _norm_cdf(x) + x * _norm_pdf(x),
    ),
    "Gelu_tanh": (lambda: stax.Gelu(approximate=True), _gelu_tanh, _gelu_tanh_d),
    "Sign": (stax.Sign, np.sign, None),
    "Sin": (
        lambda: stax.Sin(a=1.1, b=0.8, c=0.3),
        lambda x: 1.1 * np.sin(0.8 * x + 0.3),
        lambda x: 1.1 * 0.8 * np.cos(0.8 * x + 0.3),
    ),
    "Cos": (
        lambda: stax.Cos(a=0.9, b=1.2, c=-0.4),
        lambda x: 0.9 * np.cos(1.2 * x - 0.4),
        lambda x: -0.9 * 1.2 * np.sin(1.2 * x - 0.4),
    ),
    "Rbf": (
        lambda: stax.Rbf(gamma=_RBF_G),
        lambda x: math.sqrt(2) * np.sin(math.sqrt(2 * _RBF_G) * x + math.pi / 4),
        lambda x: 2 * math.sqrt(_RBF_G) * np.cos(math.sqrt(2 * _RBF_G) * x + math.pi / 4),
    ),
    "Exp": (
        lambda: stax.Exp(a=0.8, b=0.6),
        lambda x: 0.8 * np.exp(0.6 * x),
        lambda x: 0.48 * np.exp(0.6 * x),
    ),
    "Gaussian_neg": (
        lambda: stax.Gaussian(a=1.2, b=-0.7),
        lambda x: 1.2 * np.exp(-0.7 * x * x),
        lambda x: -2 * 0.7 * 1.2 * x * np.exp(-0.7 * x * x),
    ),
    "Gaussian_pos": (
        lambda: stax.Gaussian(a=1.0, b=0.05),
        lambda x: np.exp(0.05 * x * x),
        lambda x: 0.1 * x * np.exp(0.05 * x * x),
    ),
    **{f"Monomial{n}": (lambda n=n: stax.Monomial(n), *_poly([0.0] * n + [1.0])) for n in range(5)},
    **{
        f"RectifiedMonomial{n}": (lambda n=n: stax.RectifiedMonomial(n), *_rect_mono(n))
        for n in range(5)
    },
    "Polynomial": (lambda: stax.Polynomial([0.3, -1.0, 0.5, 0.2]), *_poly([0.3, -1.0, 0.5, 0.2])),
    **{
        f"Hermite{n}": (
            lambda n=n: stax.Hermite(n),
            lambda x, n=n: _hermite_e(n, x) / math.sqrt(math.factorial(n)),
            lambda x, n=n: n * _hermite_e(n - 1, x) / math.sqrt(math.factorial(n)) + 0 * x,
        )
        for n in range(5)
    },
}

# (q1, q2, rho): generic, unequal variances, strong anti-correlation, nearly and exactly
# identical inputs, exactly opposite inputs, a zero-variance unit
POINTS = [
    (1.0, 1.0, 0.0),
    (0.7, 1.3, 0.45),
    (1.5, 0.6, -0.8),
    (0.9, 1.1, 0.995),
    (1.2, 1.2, 1.0),
    (0.5, 2.0, -1.0),
    (0.0, 1.3, 0.0),
]


def _cqq(points):
    q1 = np.array([p[0] for p in points])
    q2 = np.array([p[1] for p in points])
    c = np.array([p[2] for p in points]) * np.sqrt(q1 * q2)
    return c, q1, q2


def _tolerance(name: str) -> float:
    # Gelu(approximate=True) has no closed form: the library integrates it by 25-node
    # Gauss-Hermite quadrature, accurate to ~1e-7 relative for variances <= 2 (the tanh
    # saturation is resolved by the nodes at this scale). Everything else is a closed
    # form evaluated in float64: arcsin/arccos at |rho| -> 1 lose sqrt(eps) ~ 1e-8 of
    # accuracy in rho = c / sqrt(q1 q2) (the step and sign kernels are sqrt-singular
    # there), so 1e-7 relative to the natural scale sqrt(E phi(u)^2 E phi(v)^2).
    return 2e-6 if name == "Gelu_tanh" else 1e-7


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_finite_function_matches_reference(name):
    """The finite network's phi is the function whose kernel the oracle integrates."""
    make, phi, _ = ACTIVATIONS[name]
    x = np.linspace(-3, 3, 61)
    got = make().fn(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, phi(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_nngp_map_matches_quadrature(name):
    make, phi, _ = ACTIVATIONS[name]
    layer = make()
    c, q1, q2 = _cqq(POINTS)
    got = layer.nngp_map(_t(c), _t(q1), _t(q2)).numpy()  # batched over the points
    for i, (ci, a, b) in enumerate(zip(c, q1, q2)):
        ref = gauss_pair_expect(phi, phi, ci, a, b)
        scale = math.sqrt(
            gauss_pair_expect(phi, phi, a, a, a) * gauss_pair_expect(phi, phi, b, b, b)
        )
        assert abs(got[i] - ref) <= _tolerance(name) * (abs(ref) + scale), (POINTS[i], got[i], ref)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_dot_map_matches_quadrature(name):
    """``dot_map = E[phi'(u) phi'(v)]`` with phi' written by hand (not by Price's theorem)."""
    make, _, dphi = ACTIVATIONS[name]
    layer = make()
    # the zero-variance point is left out: phi'(0) is a convention for kinked functions
    points = POINTS[:-1]
    c, q1, q2 = _cqq(points)
    got = layer.dot_map(_t(c), _t(q1), _t(q2)).numpy()
    if dphi is None:  # sign and the step: zero almost everywhere, no gradient flows
        assert np.array_equal(got, np.zeros_like(got))
        return
    for i, (ci, a, b) in enumerate(zip(c, q1, q2)):
        ref = gauss_pair_expect(dphi, dphi, ci, a, b)
        scale = math.sqrt(
            gauss_pair_expect(dphi, dphi, a, a, a) * gauss_pair_expect(dphi, dphi, b, b, b)
        )
        assert abs(got[i] - ref) <= _tolerance(name) * (abs(ref) + scale), (points[i], got[i], ref)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_dot_map_is_price_derivative(name):
    """Price's theorem: dE[phi(u) phi(v)]/dc = E[phi' phi'], by central finite differences."""
    make, _, dphi = ACTIVATIONS[name]
    if dphi is None:
        pytest.skip("derivative kernel defined as 0 (the distributional derivative is a delta)")
    layer = make()
    # keep |rho| <= 0.8 so c +- h stays inside the domain and away from the sqrt singularity
    c, q1, q2 = _cqq([(1.0, 1.0, 0.0), (0.7, 1.3, 0.45), (1.5, 0.6, -0.8)])
    h = 1e-5
    fd = (layer.nngp_map(_t(c + h), _t(q1), _t(q2)) - layer.nngp_map(_t(c - h), _t(q1), _t(q2))) / (
        2 * h
    )
    # central differences: O(h^2 K''') truncation + O(eps K / h) rounding ~ 1e-10 here
    torch.testing.assert_close(layer.dot_map(_t(c), _t(q1), _t(q2)), fd, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ end-to-end closed forms
W_STD, B_STD = 1.3, 0.4


def _inputs(n1=4, n2=3, d=5, seed=0, unit_variance=False):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, d, generator=g, dtype=F64)
    x2 = torch.randn(n2, d, generator=g, dtype=F64)
    x2[0] = x1[1]  # identical inputs: rho = 1
    x2[1] = -0.5 * x1[0]  # opposite direction
    if unit_variance:  # W^2 |x|^2 / d + b^2 = 1 for every row
        for x in (x1, x2):
            x *= torch.sqrt(d * (1 - B_STD**2) / W_STD**2 / (x * x).sum(1, keepdim=True))
    return x1, x2


def _dense_cov(x1, x2):
    """Covariances of the Dense(W_STD, B_STD) outputs, written out: W^2 x.x'/d + b^2."""
    a, b = x1.numpy(), x2.numpy()
    d = a.shape[1]
    c = W_STD**2 * a @ b.T / d + B_STD**2
    q1 = W_STD**2 * (a * a).sum(1)[:, None] / d + B_STD**2
    q2 = W_STD**2 * (b * b).sum(1)[None, :] / d + B_STD**2
    return c, q1, q2


def _arccos_j(n, theta):
    if n == 0:
        return math.pi - theta
    if n == 1:
        return np.sin(theta) + (math.pi - theta) * np.cos(theta)
    assert n == 2
    return 3 * np.sin(theta) * np.cos(theta) + (math.pi - theta) * (1 + 2 * np.cos(theta) ** 2)


def _theta(c, q1, q2):
    return np.arccos(np.clip(c / np.sqrt(q1 * q2), -1, 1))


def _arccos_kernel(n, c, q1, q2):
    """Cho & Saul: E[relu(u)^n relu(v)^n] = (q1 q2)^(n/2) J_n(theta) / (2 pi)."""
    return (q1 * q2) ** (n / 2) * _arccos_j(n, _theta(c, q1, q2)) / (2 * math.pi)


def _erf_kernel(c, q1, q2, a=1.0, b=1.0):
    """Williams (1997) for a erf(b x): (2 a^2 / pi) asin(2 b^2 c / sqrt((1+2b^2q1)(1+2b^2q2)))."""
    s = 2 * b * b
    return 2 * a * a / math.pi * np.arcsin(s * c / np.sqrt((1 + s * q1) * (1 + s * q2)))


def _erf_dot(c, q1, q2, a=1.0, b=1.0):
    s = 2 * b * b
    return 4 * a * a * b * b / math.pi / np.sqrt((1 + s * q1) * (1 + s * q2) - (s * c) ** 2)


@pytest.mark.parametrize("scale", [1.0, 1e15])
def test_erf_pair_maps_match_williams_small_and_huge_variances(scale):
    """The fused Erf maps (which skip the clamp of ``z`` when the variances bound
    ``|z|`` away from 1) against Williams' closed form, for moderate variances and
    for variances so large that ``|z|`` rounds to 1 at correlation one (the clamp
    must then act: no NaN)."""
    gen = np.random.default_rng(5)
    x = gen.standard_normal((6, 4)) * np.sqrt(scale)
    x[3] = x[1]  # correlation exactly one
    g = x @ x.T / 4
    q = np.diag(g).copy()
    erf = stax.Erf(a=1.3, b=0.7, c=0.2)
    qt = torch.from_numpy(q)
    f = erf.pair_factors(qt)[0]
    new, dot = erf.pair_maps(torch.from_numpy(g), f[:, None], f[None, :], True, 1.5, 0.1)
    assert torch.isfinite(new).all()
    ref = 1.5 * (_erf_kernel(g, q[:, None], q[None, :], 1.3, 0.7) + 0.2**2) + 0.1
    # near |z| = 1, asin turns a rounding error d of z into sqrt(2 d): 1e-15 -> 4.5e-8
    atol = 1e-12 if scale == 1.0 else 1.5 * 2 * 1.3**2 / math.pi * math.sqrt(2 * 1e-15)
    np.testing.assert_allclose(new.numpy(), ref, rtol=1e-12, atol=atol)
    if scale == 1.0:
        ref_dot = 1.5 * _erf_dot(g, q[:, None], q[None, :], 1.3, 0.7)
        np.testing.assert_allclose(dot.numpy(), ref_dot, rtol=1e-10)


def _closed_forms():
    sq2 = math.sqrt(2)
    # name -> (layer, nngp(c, q1, q2), dot(c, q1, q2))
    return {
        "Sign": (
            stax.Sign(),
            lambda c, q1, q2: 2 / math.pi * np.arcsin(np.clip(c / np.sqrt(q1 * q2), -1, 1)),
            lambda c, q1, q2: 0 * c,
        ),
        "Step": (
            stax.RectifiedMonomial(0),
            lambda c, q1, q2: _arccos_kernel(0, c, q1, q2),
            lambda c, q1, q2: 0 * c,
        ),
        "Relu": (
            stax.Relu(),
            lambda c, q1, q2: _arccos_kernel(1, c, q1, q2),
            lambda c, q1, q2: _arccos_kernel(0, c, q1, q2),
        ),
        "RectifiedMonomial1": (
            stax.RectifiedMonomial(1),
            lambda c, q1, q2: _arccos_kernel(1, c, q1, q2),
            lambda c, q1, q2: _arccos_kernel(0, c, q1, q2),
        ),
        "RectifiedMonomial2": (
            stax.RectifiedMonomial(2),
            lambda c, q1, q2: _arccos_kernel(2, c, q1, q2),
            lambda c, q1, q2: 4 * _arccos_kernel(1, c, q1, q2),
        ),
        "Erf": (stax.Erf(), _erf_kernel, _erf_dot),
        "Erf_scaled": (
            stax.Erf(a=0.7, b=1.9, c=-0.3),
            lambda c, q1, q2: _erf_kernel(c, q1, q2, 0.7, 1.9) + 0.09,
            lambda c, q1, q2: _erf_dot(c, q1, q2, 0.7, 1.9),
        ),
        # E[sin u sin v] = (E cos(u - v) - E cos(u + v)) / 2, E cos t = exp(-Var t / 2)
        "Sin": (
            stax.Sin(),
            lambda c, q1, q2: (
                0.5 * (np.exp(-(q1 + q2 - 2 * c) / 2) - np.exp(-(q1 + q2 + 2 * c) / 2))
            ),
            lambda c, q1, q2: (
                0.5 * (np.exp(-(q1 + q2 - 2 * c) / 2) + np.exp(-(q1 + q2 + 2 * c) / 2))
            ),
        ),
        "Cos": (
            stax.Cos(),
            lambda c, q1, q2: (
                0.5 * (np.exp(-(q1 + q2 - 2 * c) / 2) + np.exp(-(q1 + q2 + 2 * c) / 2))
            ),
            lambda c, q1, q2: (
                0.5 * (np.exp(-(q1 + q2 - 2 * c) / 2) - np.exp(-(q1 + q2 + 2 * c) / 2))
            ),
        ),
        # sqrt2 sin(sqrt(2 gamma) x + pi/4): exp(-gamma E(u - v)^2); the cos(u + v + pi/2)
        # term vanishes, the derivative kernel is 2 gamma exp(-gamma E(u - v)^2)
        "Rbf": (
            stax.Rbf(gamma=0.35),
            lambda c, q1, q2: np.exp(-0.35 * (q1 + q2 - 2 * c)),
            lambda c, q1, q2: 0.7 * np.exp(-0.35 * (q1 + q2 - 2 * c)),
        ),
        "Exp": (  # Gaussian moment generating function
            stax.Exp(a=1.0, b=0.5),
            lambda c, q1, q2: np.exp(0.125 * (q1 + q2 + 2 * c)),
            lambda c, q1, q2: 0.25 * np.exp(0.125 * (q1 + q2 + 2 * c)),
        ),
        "Gaussian": (  # E exp(-(u^2 + v^2)/2) = det(I + Sigma)^(-1/2)
            stax.Gaussian(a=1.0, b=-0.5),
            lambda c, q1, q2: ((1 + q1) * (1 + q2) - c * c) ** -0.5,
            lambda c, q1, q2: c * ((1 + q1) * (1 + q2) - c * c) ** -1.5,
        ),
        # Isserlis' theorem
        "Monomial2": (
            stax.Monomial(2),
            lambda c, q1, q2: q1 * q2 + 2 * c * c,
            lambda c, q1, q2: 4 * c,
        ),
        "Monomial3": (
            stax.Monomial(3),
            lambda c, q1, q2: 9 * c * q1 * q2 + 6 * c**3,
            lambda c, q1, q2: 9 * (q1 * q2 + 2 * c * c),
        ),
        "Monomial4": (
            stax.Monomial(4),
            lambda c, q1, q2: 9 * q1**2 * q2**2 + 72 * c * c * q1 * q2 + 24 * c**4,
            lambda c, q1, q2: 16 * (9 * c * q1 * q2 + 6 * c**3),
        ),
        # (1 + u)^2 = 1 + 2u + u^2: E = 1 + q1 + q2 + q1 q2 + 4c + 2c^2
        "Polynomial": (
            stax.Polynomial([1.0, 2.0, 1.0]),
            lambda c, q1, q2: 1 + q1 + q2 + q1 * q2 + 4 * c + 2 * c * c,
            lambda c, q1, q2: 4 * (1 + c),
        ),
        "Abs": (
            stax.Abs(),
            lambda c, q1, q2: 4 * _arccos_kernel(1, c, q1, q2) - c,  # |x| = 2 relu(x) - x
            lambda c, q1, q2: 2 / math.pi * np.arcsin(np.clip(c / np.sqrt(q1 * q2), -1, 1)),
        ),
        "Sqrt2_scaled_ABRelu": (
            stax.ABRelu(-sq2, sq2),  # sqrt2 |x|
            lambda c, q1, q2: 2 * (4 * _arccos_kernel(1, c, q1, q2) - c),
            lambda c, q1, q2: 4 / math.pi * np.arcsin(np.clip(c / np.sqrt(q1 * q2), -1, 1)),
        ),
    }


CLOSED = _closed_forms()


@pytest.mark.parametrize("name", list(CLOSED))
@pytest.mark.parametrize("symmetric", [False, True])
def test_closed_form_end_to_end(name, symmetric):
    """serial(Dense(1, W, b), act): NNGP = E[phi phi], NTK = Theta_dense * E[phi' phi'].

    After one Dense layer in the NTK parameterization the NTK equals the NNGP of the
    Dense layer, so the closed forms give both kernels. ``symmetric`` runs the
    ``x2=None`` path (fused in-place maps, no autograd).
    """
    layer, nngp_ref, dot_ref = CLOSED[name]
    x1, x2 = _inputs()
    if symmetric:
        x2 = x1
    net = stax.serial(stax.Dense(1, W_STD, B_STD), layer)
    k = net.kernel_fn(x1, None if symmetric else x2)
    c, q1, q2 = _dense_cov(x1, x2)
    ref = nngp_ref(c, q1, q2)
    # float64 closed forms; |rho| = 1 pairs (identical inputs, the diagonal) may lose
    # sqrt(eps) ~ 1e-8 (arcsin is sqrt-singular there); the precision of the diagonal is
    # tested separately in test_stax.py
    np.testing.assert_allclose(k.nngp.numpy(), ref, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(k.ntk.numpy(), c * dot_ref(c, q1, q2), rtol=1e-7, atol=1e-7)
    cov1_ref = np.diag(nngp_ref(*_dense_cov(x1, x1)))
    np.testing.assert_allclose(k.cov1.numpy(), cov1_ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("n", range(6))
def test_hermite_unit_variance_gives_rho_power(n):
    """Mehler: normalised He_n of unit-variance inputs has kernel rho^n, derivative n rho^(n-1)."""
    x1, x2 = _inputs(unit_variance=True)
    k = stax.serial(stax.Dense(1, W_STD, B_STD), stax.Hermite(n)).kernel_fn(x1, x2)
    rho, _, _ = _dense_cov(x1, x2)  # unit variances: the covariance is the correlation
    np.testing.assert_allclose(k.nngp.numpy(), rho**n, rtol=1e-9, atol=1e-12)
    dot = n * rho ** max(n - 1, 0) if n > 0 else 0 * rho
    np.testing.assert_allclose(k.ntk.numpy(), rho * dot, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(k.cov1.numpy(), np.ones(4), rtol=1e-12)


def test_sign_and_step_block_the_ntk():
    """No gradient flows through sign/step: only the readout contributes to the NTK."""
    x1, x2 = _inputs()
    for act in (stax.Sign(), stax.RectifiedMonomial(0)):
        net = stax.serial(stax.Dense(1, W_STD, B_STD), act, stax.Dense(1, 0.9, 0.2))
        k = net.kernel_fn(x1, x2)
        torch.testing.assert_close(k.ntk, k.nngp, rtol=1e-12, atol=0)  # ntk param: Theta = K


@pytest.mark.parametrize(
    "a, b",
    [
        (stax.Relu(), stax.RectifiedMonomial(1)),
        (stax.Relu(), stax.ABRelu(0.0, 1.0)),
        (stax.LeakyRelu(0.0), stax.Relu()),
        (stax.Abs(), stax.ABRelu(-1.0, 1.0)),
        (stax.Sign(), stax.Erf(a=1.0, b=1e8)),  # erf(b x) -> sign(x) as b -> inf
        (stax.Sigmoid_like(), stax.Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)),
        (stax.Cos(a=0.9, b=1.2, c=-0.4), stax.Sin(a=0.9, b=1.2, c=-0.4 + math.pi / 2)),
        (stax.Monomial(3), stax.Polynomial([0, 0, 0, 1])),
        (stax.Hermite(2), stax.Polynomial([-1 / math.sqrt(2), 0, 1 / math.sqrt(2)])),
        (stax.Gaussian(a=1.0, b=0.0), stax.Monomial(0)),
    ],
    ids=lambda layer: repr(layer).split("(")[0],
)
def test_equivalent_activations_agree(a, b):
    """Different classes (and code paths) describing the same function give the same kernels."""
    x1, x2 = _inputs()
    # Erf(b=1e8)'s derivative kernel cancels to 1 - z^2 = 0 at z = 1 in float64 and is
    # refused (KernelOverflowError); only its NNGP is compared with Sign's
    get = ("nngp",) if isinstance(a, stax.Sign) else None
    ka = stax.serial(stax.Dense(1, W_STD, B_STD), a).kernel_fn(x1, x2, get)
    kb = stax.serial(stax.Dense(1, W_STD, B_STD), b).kernel_fn(x1, x2, get)
    # the erf -> sign limit converges like 1/b (Sign/Erf); the rest are identities
    torch.testing.assert_close(ka.nngp, kb.nngp, rtol=1e-7, atol=1e-7)
    if not isinstance(a, stax.Sign):
        torch.testing.assert_close(ka.ntk, kb.ntk, rtol=1e-7, atol=1e-7)


def test_sigmoid_like_is_the_least_squares_fit_of_the_sigmoid():
    """Neural Tangents' constant: 0.5 erf(x / s) + 0.5 with s = 2.4020563531719796 is the
    least-squares fit of the logistic sigmoid on [-5, 5] (a scan of s finds its minimum
    there), with value 1/2 at 0."""
    x = torch.linspace(-5, 5, 20001, dtype=F64)
    assert float(stax.Sigmoid_like().fn(torch.zeros(1, dtype=F64))) == 0.5

    def loss(s: float) -> float:
        return float(((0.5 * torch.erf(x / s) + 0.5 - torch.sigmoid(x)) ** 2).mean())

    scan = [2.4020563531719796 + d for d in (-0.01, -0.001, 0.0, 0.001, 0.01)]
    losses = [loss(s) for s in scan]
    assert min(range(5), key=losses.__getitem__) == 2
    y = stax.Sigmoid_like().fn(x)
    torch.testing.assert_close(y, 0.5 * torch.erf(x / scan[2]) + 0.5)


# ------------------------------------------------------------------ numerical activations
def _numerical_pair(closed, fn, deg=25):
    body = (stax.Dense(16, 1.1, 0.3),)
    head = (stax.Dense(1, 0.9, 0.2),)
    return (
        stax.serial(*body, closed, *head),
        stax.serial(*body, stax.ElementwiseNumerical(fn, deg=deg), *head),
    )


def _unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(d)  # Dense variances ~ 1.3


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "closed, fn",
    [(stax.Erf(), torch.erf), (stax.Gelu(), F.gelu), (stax.Sin(), torch.sin)],
    ids=["erf", "gelu", "sin"],
)
def test_elementwise_numerical_smooth_matches_closed_form(closed, fn):
    """Gauss-Hermite quadrature (deg 25) converges exponentially for smooth functions.

    At pre-activation variances ~1.3 the measured end-to-end errors (relative to the
    largest entry) are 4e-5 / 3e-4 (erf NNGP / NTK: erf' is a narrow Gaussian), 1e-6
    (gelu), 1e-16 (sin, whose product is a trigonometric polynomial in the nodes). 1e-3
    bounds them; an error in the quadrature's change of variables would be O(1).
    """
    x = _unit_rows(5, 4, seed=1)
    x2 = _unit_rows(3, 4, seed=2)
    x2[0] = x[0]
    a, b = _numerical_pair(closed, fn)
    ka, kb = a.kernel_fn(x, x2), b.kernel_fn(x, x2)
    assert _rel_err(kb.nngp, ka.nngp) < 1e-3
    assert _rel_err(kb.ntk, ka.ntk) < 1e-3
    assert _rel_err(kb.cov1, ka.cov1) < 1e-3


def test_elementwise_numerical_relu_converges():
    """ReLU's kink makes Gauss-Hermite converge only algebraically: measured NNGP errors
    (relative to the largest entry) 1.5e-2 at deg 25 and 2e-3 at deg 100. The bounds
    (3e-2, 5e-3) are what the method can do -- not 1e-3 at deg 25 (a kink-aware rule,
    splitting the integral on the lines u = 0 and v = 0, would be needed for that)."""
    x = _unit_rows(5, 4, seed=1)
    x2 = _unit_rows(3, 4, seed=2)
    x2[0] = x[0]
    for deg, tol in ((25, 3e-2), (100, 5e-3)):
        a, b = _numerical_pair(stax.Relu(), torch.relu, deg)
        ka, kb = a.kernel_fn(x, x2), b.kernel_fn(x, x2)
        assert _rel_err(kb.nngp, ka.nngp) < tol, deg
    # even deg: no node on the kink; the derivative kernel converges like the NNGP
    assert _rel_err(kb.ntk, ka.ntk) < tol


def test_elementwise_numerical_relu_derivative_kernel_on_the_diagonal():
    """E[step(u)^2] = 1/2 for every variance. Any quadrature rule symmetric about 0 gets
    this exactly -- unless a node sits at the kink x = 0, where autograd's convention
    relu'(0) = 0 drops that node's weight (~25% of the mass for 25 nodes). The default
    deg must not put a node on the kink."""
    layer = stax.ElementwiseNumerical(torch.relu)
    q = _t([0.5, 1.0, 2.0])
    torch.testing.assert_close(layer.dot_map(q, q, q), torch.full_like(q, 0.5), rtol=1e-10, atol=0)


def test_elementwise_autograd_derivative_kernel():
    """Elementwise(x^2, q1 q2 + 2c^2): the derivative kernel 4c comes from autograd."""
    square = stax.Elementwise(lambda x: x**2, lambda c, q1, q2: q1 * q2 + 2 * c**2)
    c, q1, q2 = _t([0.3, -0.2, 1.0]), _t([1.0, 0.5, 1.0]), _t([0.8, 0.9, 1.0])
    torch.testing.assert_close(square.dot_map(c, q1, q2), 4 * c, rtol=1e-14, atol=0)
    x1, x2 = _inputs()
    k = stax.serial(stax.Dense(1, W_STD, B_STD), square).kernel_fn(x1, x2)
    cc, a, b = _dense_cov(x1, x2)
    np.testing.assert_allclose(k.nngp.numpy(), a * b + 2 * cc**2, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), cc * 4 * cc, rtol=1e-12)


def test_elementwise_explicit_derivative_is_used():
    calls = []

    def d_nngp(c, q1, q2):
        calls.append(1)
        return 4 * c

    square = stax.Elementwise(lambda x: x**2, lambda c, q1, q2: q1 * q2 + 2 * c**2, d_nngp)
    x1, x2 = _inputs()
    net = stax.serial(stax.Dense(1, W_STD, B_STD), square)
    k = net.kernel_fn(x1, x2)
    cc, _, _ = _dense_cov(x1, x2)
    np.testing.assert_allclose(k.ntk.numpy(), 4 * cc**2, rtol=1e-12)
    assert calls
    # only-what-get-asks: the derivative kernel is not evaluated for the NNGP alone
    calls.clear()
    net.kernel_fn(x1, x2, "nngp")
    assert not calls


# ------------------------------------------------------------------ bad hyper-parameters
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: stax.Monomial(-1), ValueError, "degree"),
        (lambda: stax.Monomial(1.5), TypeError, "degree"),
        (lambda: stax.RectifiedMonomial(99), ValueError, "degree"),
        (lambda: stax.Hermite(-2), ValueError, "degree"),
        (lambda: stax.Rbf(gamma=0), ValueError, "gamma"),
        (lambda: stax.Rbf(gamma=-1.0), ValueError, "gamma"),
        (lambda: stax.ElementwiseNumerical(torch.tanh, deg=0), ValueError, "deg"),
        (lambda: stax.ElementwiseNumerical("tanh"), TypeError, "fn"),
        (lambda: stax.Elementwise(torch.tanh, 3), TypeError, "nngp_fn"),
        (lambda: stax.Polynomial([]), ValueError, "coef"),
        (lambda: stax.Polynomial([1.0, float("nan")]), ValueError, "coef"),
        (lambda: stax.Erf(a=float("inf")), ValueError, "a"),
        (lambda: stax.ABRelu(a=0.0, b=float("nan")), ValueError, "b"),
        (lambda: stax.Sin(b="1"), ValueError, "b"),
        (lambda: stax.Gaussian(b=float("nan")), ValueError, "b"),
    ],
)
def test_invalid_hyperparameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_gaussian_positive_b_needs_small_variance():
    x = torch.ones(2, 3, dtype=F64)
    ok = stax.serial(stax.Dense(1, 1.0), stax.Gaussian(b=0.2))  # q = 1 < 1/(4b) = 1.25
    assert torch.isfinite(ok.kernel_fn(x, None, "nngp")).all()
    bad = stax.serial(stax.Dense(1, 1.5), stax.Gaussian(b=0.2))  # q = 2.25 >= 1.25
    with pytest.raises(ValueError, match="variance"):
        bad.kernel_fn(x, None, "nngp")
    with pytest.raises(ValueError, match="variance"):
        bad.kernel_fn(torch.zeros(2, 3, dtype=F64), x, "nngp")  # caught on x2's variances
