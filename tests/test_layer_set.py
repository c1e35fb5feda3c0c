"""The rest of the layer set (issue #14): Monte Carlo, exact identities, oracles, bad inputs.

Monte Carlo (``tests/helpers.py``): ``S`` independent finite networks (the layers'
``init_fn``/``apply_fn`` twins, float64, 256 channels or 1024 features) give i.i.d.
per-network NNGP/NTK estimates; ``|mean - analytic| <= 5 SE + bias`` entrywise, with
the power check ``SE < 4%`` of the kernel scale. Bodies with one hidden layer (one
affine layer before the readout) see exactly Gaussian pre-activations, so their estimate
is unbiased at any width (``bias = 0``); two hidden layers get the O(1/width) allowance
``8 / width`` (the second-order effect of the fluctuating hidden kernel, see
``tests/test_conv.py``).
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_mc_agrees, gauss_pair_expect, monte_carlo_kernels
from infnets import empirical, stax

F64 = torch.float64
C = 256
N_NETS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _mc(body, x, *, seed=0, par="ntk", bias=0.0, n_nets=N_NETS):
    mc = monte_carlo_kernels(body, x, n_nets=n_nets, n_out=512, parameterization=par, seed=seed)
    k = mc["kernel"]
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k.nngp, bias, "NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], k.ntk, bias, "NTK")


# ------------------------------------------------------------------ Monte Carlo
@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_mc_conv_transpose_same_global_pool(par):
    body = [
        stax.ConvTranspose(C, (3,), (2,), "SAME", 1.3, 0.2, par),
        stax.Relu(),
        stax.GlobalAvgPool(),
    ]
    _mc(body, _x((3, 2, 4)), seed=1, par=par)


def test_mc_conv_transpose_circular_2d_flatten():
    body = [stax.ConvTranspose(C, (2, 3), (2, 1), "CIRCULAR", 1.1, 0.3), stax.Erf(), stax.Flatten()]
    _mc(body, _x((3, 1, 3, 3), seed=4), seed=2)


def test_mc_conv_transpose_valid_then_conv_pool():
    body = [
        stax.ConvTranspose(C, (2,), (3,), "VALID", 1.2, 0.1),
        stax.Relu(),
        stax.Conv(C, (3,), padding="SAME", W_std=1.3, b_std=0.1),
        stax.Relu(),
        stax.GlobalAvgPool(),
    ]
    _mc(body, _x((3, 1, 3), seed=5), seed=3, bias=8.0 / C, n_nets=16)


@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_mc_conv_local_global_pool(par):
    body = [stax.ConvLocal(C, (3,), padding="SAME", W_std=1.4, b_std=0.2, parameterization=par)]
    body += [stax.Relu(), stax.GlobalAvgPool()]
    _mc(body, _x((3, 2, 5), seed=6), seed=4, par=par)


def test_mc_conv_local_2d_strided_flatten():
    body = [stax.ConvLocal(C, (2, 2), (2, 1), "VALID", 1.2, 0.1), stax.Gelu(), stax.Flatten()]
    _mc(body, _x((3, 1, 4, 3), seed=7), seed=5)


@pytest.mark.parametrize(
    "shape,method", [((-1, -1, 7), "linear"), ((-1, -1, 3), "cubic"), ((-1, -1, 9), "nearest")]
)
def test_mc_image_resize(shape, method):
    body = [
        stax.Conv(C, (3,), padding="SAME", W_std=1.3, b_std=0.1),
        stax.ImageResize(shape, method),
        stax.Relu(),
        stax.GlobalAvgPool(),
    ]
    _mc(body, _x((3, 1, 5), seed=8), seed=6)


def test_mc_index_positions_and_channels():
    body = [
        stax.Conv(C, (3, 3), padding="SAME", W_std=1.3, b_std=0.1),
        stax.Index(stax.Slice[:, : C // 2, 1:, ::2]),
        stax.Relu(),
        stax.Index(stax.Slice[..., 1]),  # an int removes the last spatial axis
        stax.GlobalAvgPool(),
    ]
    _mc(body, _x((3, 1, 4, 4), seed=9), seed=7)


def test_mc_dot_general_constant_rhs_and_lhs():
    mix = _x((5, 3), seed=10) / 2  # (positions in, positions out)
    lhs = _x((2, 5), seed=11) / 2
    body = [
        stax.Conv(C, (3,), padding="SAME", W_std=1.3, b_std=0.1),
        stax.Relu(),
        stax.DotGeneral(rhs=mix, dimension_numbers=(((2,), (0,)), ((), ()))),
        stax.Flatten(),
    ]
    _mc(body, _x((3, 1, 5), seed=12), seed=8)
    body[2] = stax.DotGeneral(lhs=lhs, dimension_numbers=(((1,), (2,)), ((), ())))
    _mc(body, _x((3, 1, 5), seed=12), seed=9)


def test_mc_gabor():
    x = _x((4, 6), seed=13)
    _mc([stax.Dense(1024, 1.0, 0.2), stax.Gabor()], x, seed=10, n_nets=48)


@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_mc_repeat(par):
    block = stax.serial(stax.Dense(512, 1.2, 0.1, par), stax.Erf())
    body = [stax.Dense(512, 1.0, 0.1, par), stax.Relu(), stax.repeat(block, 2)]
    _mc(body, _x((4, 6), seed=14), seed=11, par=par, bias=8.0 / 512, n_nets=16)


# -------------------------------------------------------- identities and oracles
@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_conv_transpose_stride_one_is_conv(padding, k, par):
    """Stride 1: the scatter offsets q - p are the window offsets of Conv (the filter
    flipped), so the kernels coincide (NNGP, NTK; full pixel pairs and Flatten)."""
    x = _x((4, 2, 5, 4))
    tail = [stax.Relu(), stax.Conv(3, (2, 2), padding="SAME")]
    for readout in ([], [stax.Flatten(), stax.Dense(1)]):
        a = stax.serial(
            stax.ConvTranspose(7, (k, k), None, padding, 1.2, 0.3, par), *tail, *readout
        )
        b = stax.serial(stax.Conv(7, (k, k), None, padding, 1.2, 0.3, par), *tail, *readout)
        ka, kb = a.kernel_fn(x, x[:3], ("nngp", "ntk")), b.kernel_fn(x, x[:3], ("nngp", "ntk"))
        torch.testing.assert_close(ka.nngp, kb.nngp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ka.ntk, kb.ntk, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "n,k,s,padding",
    [
        (4, 3, 2, "SAME"),
        (4, 4, 2, "SAME"),
        (4, 1, 3, "SAME"),
        (5, 3, 1, "VALID"),
        (3, 2, 3, "VALID"),
    ],
)
def test_conv_transpose_finite_twin_is_torch(n, k, s, padding):
    x = _x((2, 3, n, n))
    layer = stax.ConvTranspose(5, (k, k), (s, s), padding, W_std=1.3, b_std=0.4)
    out_shape, p = layer.init_fn(0, tuple(x.shape), dtype=F64)
    t = k - s
    if padding == "VALID":
        ref = torch.nn.ConvTranspose2d(3, 5, k, stride=s, dtype=F64)
    elif t >= 0:
        ref = torch.nn.ConvTranspose2d(3, 5, k, s, padding=-(-t // 2), output_padding=t % 2)
    else:
        ref = torch.nn.ConvTranspose2d(3, 5, k, stride=s, output_padding=-t)
    ref = ref.to(F64)
    with torch.no_grad():
        ref.weight.copy_(p["W"] * (1.3 / math.sqrt(3 * k * k)))
        ref.bias.copy_(0.4 * p["b"])
    y = layer.apply_fn(p, x)
    assert tuple(out_shape) == tuple(y.shape) == tuple(ref(x).shape)
    torch.testing.assert_close(y, ref(x))


@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_conv_local_flatten_equals_conv_diagonal_form(par):
    """Per-position kernels of ConvLocal and Conv coincide; Flatten reads only those."""
    x = _x((5, 2, 5, 4))

    def net(cls):
        return stax.serial(
            cls(6, (3, 2), (1, 2), "SAME", 1.2, 0.3, par),
            stax.Relu(),
            cls(4, (2, 1), None, "CIRCULAR", 0.9, 0.1, par),
            stax.Flatten(),
            stax.Dense(1),
        )

    a = net(stax.ConvLocal).kernel_fn(x, None, ("nngp", "ntk"))
    b = net(stax.Conv).kernel_fn(x, None, ("nngp", "ntk"), diagonal_spatial=True)
    torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-13, atol=1e-15)


def test_conv_local_full_output_is_diagonal():
    x = _x((3, 2, 5))
    k = stax.ConvLocal(4, (3,), padding="SAME", b_std=0.2).kernel_fn(x, None, None)
    assert k.nngp.shape == (3, 3, 5, 5)
    off = k.nngp - torch.diag_embed(k.nngp.diagonal(0, 2, 3))
    assert float(off.abs().max()) == 0.0
    d = stax.ConvLocal(4, (3,), padding="SAME", b_std=0.2).kernel_fn(
        x, None, None, diagonal_spatial=True
    )
    torch.testing.assert_close(d.nngp, k.nngp.diagonal(0, 2, 3))


def test_conv_local_finite_twin_by_loops():
    """An independent oracle: the unshared weights applied position by position."""
    x = _x((2, 3, 5))
    layer = stax.ConvLocal(4, (3,), (2,), "SAME", W_std=1.5, b_std=0.5)
    _, p = layer.init_fn(1, tuple(x.shape), dtype=F64)
    y = layer.apply_fn(p, x)
    xp = F.pad(x, (1, 1))
    for q in range(3):
        patch = xp[:, :, 2 * q : 2 * q + 3]  # (N, C, 3)
        ref = torch.einsum("ncf,ocf->no", patch, p["W"][..., q]) * 1.5 / 3 + 0.5 * p["b"][:, q]
        torch.testing.assert_close(y[:, :, q], ref)


@pytest.mark.parametrize("method", ["nearest", "linear", "cubic", "lanczos3"])
def test_image_resize_to_same_size_is_identity(method):
    x = _x((4, 2, 5, 6))
    body = [stax.Conv(3, (3, 3), padding="SAME", b_std=0.1), stax.Relu()]
    resize = stax.ImageResize((-1, -1, 5, 6), method)
    a = stax.serial(*body, resize, stax.GlobalAvgPool()).kernel_fn(x, None, ("nngp", "ntk"))
    b = stax.serial(*body, stax.GlobalAvgPool()).kernel_fn(x, None, ("nngp", "ntk"))
    torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(resize.apply_fn((), x), x)


@pytest.mark.parametrize(
    "method,mode,n,m",
    [
        ("linear", "bilinear", 5, 9),
        ("linear", "bilinear", 9, 4),
        ("cubic", "bicubic", 7, 3),
        ("cubic", "bicubic", 4, 8),
        ("nearest", "nearest-exact", 5, 8),
    ],
)
def test_image_resize_finite_twin_matches_torch(method, mode, n, m):
    """jax.image.resize's weights (half-pixel centres, antialiasing, normalised taps) are
    torch's interpolate with antialias=True (bilinear, bicubic) and nearest-exact."""
    x = _x((2, 3, n, n + 1))
    y = stax.ImageResize((-1, -1, m, m + 2), method).apply_fn((), x)
    kwargs = {} if mode == "nearest-exact" else {"antialias": True}
    torch.testing.assert_close(y, F.interpolate(x, size=(m, m + 2), mode=mode, **kwargs))


def test_image_resize_kernel_is_exact_linear_map():
    """K' = R K R^T: the kernel of resized raw inputs is the kernel of the resized inputs."""
    x = _x((3, 2, 5, 4))
    net = stax.serial(
        stax.ImageResize((-1, -1, 7, 3), "cubic"),
        stax.Conv(4, (2, 2)),
        stax.Relu(),
        stax.GlobalAvgPool(),
    )
    direct = stax.serial(*net.layers[1:])
    xr = net.layers[0].apply_fn((), x)
    torch.testing.assert_close(net.kernel_fn(x, None, "nngp"), direct.kernel_fn(xr, None, "nngp"))


def test_index_channel_slice_keeps_kernel_and_positions_index_pairs():
    x = _x((3, 2, 5, 4))
    conv = stax.Conv(6, (3, 3), padding="SAME", b_std=0.2)
    full = stax.serial(conv, stax.Relu()).kernel_fn(x, None, None)
    sliced = stax.serial(conv, stax.Index(stax.Slice[:, 1:4]), stax.Relu()).kernel_fn(x, None, None)
    torch.testing.assert_close(sliced.nngp, full.nngp)
    assert sliced.shape1 == (3, 3, 5, 4)
    pos = stax.serial(conv, stax.Relu(), stax.Index(stax.Slice[:, :, 1:4, 2])).kernel_fn(
        x, None, None
    )
    torch.testing.assert_close(pos.nngp, full.nngp[:, :, 1:4, 1:4, 2, 2])
    y = stax.Index(stax.Slice[:, 1:4, ::2]).apply_fn((), x)
    torch.testing.assert_close(y, x[:, 1:4, ::2])


def test_repeat_equals_serial():
    x = _x((5, 2, 6))
    block = stax.serial(stax.Conv(4, (3,), padding="SAME", b_std=0.1), stax.Relu())
    r = stax.serial(stax.repeat(block, 3), stax.GlobalAvgPool(), stax.Dense(1))
    s = stax.serial(block, block, block, stax.GlobalAvgPool(), stax.Dense(1))
    kr, ks = r.kernel_fn(x, None, ("nngp", "ntk")), s.kernel_fn(x, None, ("nngp", "ntk"))
    assert torch.equal(kr.nngp, ks.nngp) and torch.equal(kr.ntk, ks.ntk)
    (_, pr), (_, ps) = r.init_fn(0, x.shape, F64), s.init_fn(0, x.shape, F64)
    assert torch.equal(r.apply_fn(pr, x), s.apply_fn(ps, x))
    fc = stax.serial(stax.Dense(8), stax.repeat(stax.serial(stax.Relu(), stax.Dense(8)), 4))
    fcs = stax.serial(stax.Dense(8), *[stax.Relu(), stax.Dense(8)] * 4)
    xf = _x((4, 3))
    torch.testing.assert_close(fc.kernel_fn(xf, None, "ntk"), fcs.kernel_fn(xf, None, "ntk"))


def test_repeat_kernel_does_not_unroll_layers():
    block = stax.serial(stax.Dense(8), stax.Erf())
    r = stax.repeat(block, 1000)
    assert all(kid is block for kid in r.sublayers())
    k = r.kernel_fn(_x((2, 8)), None, "nngp")
    assert torch.isfinite(k).all()


def test_frozen_first_layer_ntk_is_readout_nngp():
    """Only the readout trains: its NTK is the kernel of its inputs' features, K."""
    x = _x((4, 5))
    net = stax.serial(stax.Frozen(stax.Dense(8, 1.5, 0.2)), stax.Relu(), stax.Dense(1, 1.0, 0.0))
    k = net.kernel_fn(x, None, ("nngp", "ntk"))
    torch.testing.assert_close(k.ntk, k.nngp)
    assert [p.requires_grad for p in net.to_module((-1, 5)).parameters()] == [
        False,
        False,
        True,
        True,
    ]


@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_frozen_middle_layer_against_empirical_ntk(par):
    """The empirical NTK of the finite twin (to_module: requires_grad=False on the frozen
    layer), averaged over independent networks, agrees with the frozen kernel and not with
    the unfrozen one."""
    x = _x((4, 6), seed=15)
    w = 512
    frozen = stax.Frozen(stax.Dense(w, 1.3, 0.2, par))
    net = stax.serial(
        stax.Dense(w, 1.2, 0.1, par), stax.Relu(), frozen, stax.Erf(), stax.Dense(1, 1.0, 0.1, par)
    )
    plain = stax.serial(*net.layers[:2], frozen.layer, *net.layers[3:])
    thetas = []
    for seed in range(16):
        module = net.to_module((-1, 6), key=seed, dtype=F64)
        assert sum(not p.requires_grad for p in module.parameters()) == 2
        thetas.append(empirical.empirical_ntk_fn(module)(x, None))
    t = torch.stack(thetas)
    mean, se = t.mean(0), t.std(0) / math.sqrt(len(thetas))
    k_frozen = net.kernel_fn(x, None, "ntk")
    assert_mc_agrees(mean, se, k_frozen, 8.0 / w, "frozen NTK")
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mean, se, plain.kernel_fn(x, None, "ntk"), 8.0 / w, "unfrozen NTK")


def test_frozen_conv_block_on_spatial_inputs():
    x = _x((3, 1, 5, 5))
    conv = stax.Conv(4, (3, 3), padding="SAME", W_std=1.2, b_std=0.1)
    net = stax.serial(
        stax.Conv(4, (3, 3), padding="SAME"),
        stax.Relu(),
        stax.Frozen(conv),
        stax.Relu(),
        stax.GlobalAvgPool(),
    )
    plain = stax.serial(*net.layers[:2], conv, *net.layers[3:])
    kf, kp = net.kernel_fn(x, None, None), plain.kernel_fn(x, None, None)
    torch.testing.assert_close(kf.nngp, kp.nngp)
    assert (kf.ntk < kp.ntk).all()


def test_gabor_against_polar_quadrature():
    layer = stax.Gabor()
    f = lambda v: torch.exp(-v * v) * torch.sin(v)  # noqa: E731
    df = lambda v: torch.exp(-v * v) * (torch.cos(v) - 2 * v * torch.sin(v))  # noqa: E731
    for c, q1, q2 in [(0.3, 0.5, 0.9), (-0.7, 1.0, 1.2), (0.99, 1.0, 1.0), (2.0, 1.5, 3.0)]:
        args = [torch.tensor(v, dtype=F64) for v in (c, q1, q2)]
        n = lambda a: f(torch.from_numpy(a)).numpy()  # noqa: E731
        d = lambda a: df(torch.from_numpy(a)).numpy()  # noqa: E731
        assert float(layer.nngp_map(*args)) == pytest.approx(
            gauss_pair_expect(n, n, c, q1, q2), rel=1e-10, abs=1e-13
        )
        assert float(layer.dot_map(*args)) == pytest.approx(
            gauss_pair_expect(d, d, c, q1, q2), rel=1e-10, abs=1e-13
        )


def test_exp_normalized_on_unit_variances_is_rbf():
    """With unit pre-activation variances exp(gamma (rho - 1)) = exp(-gamma/2 E(u - v)^2),
    the Rbf(gamma / 2) kernel, NNGP and NTK alike."""
    x = _x((5, 4))
    x = x / x.norm(dim=1, keepdim=True) * 2.0  # |x|^2 / d = 1
    for gamma in (0.5, 2.0):
        a = stax.serial(stax.Dense(1), stax.ExpNormalized(gamma, -1.0)).kernel_fn(x, None, None)
        b = stax.serial(stax.Dense(1), stax.Rbf(gamma / 2)).kernel_fn(x, None, None)
        torch.testing.assert_close(a.nngp, b.nngp)
        torch.testing.assert_close(a.ntk, b.ntk)
    with pytest.raises(NotImplementedError, match="no finite-network"):
        stax.ExpNormalized().apply_fn((), x)


def test_elementwise_kernel_only_derives_ntk():
    """nngp_fn of erf alone: the NTK map by autograd equals Erf's closed form."""

    def nngp_fn(c, q1, q2):
        return torch.asin(2 * c / torch.sqrt((1 + 2 * q1) * (1 + 2 * q2))) * 2 / math.pi

    x = _x((4, 3))
    a = stax.serial(stax.Dense(1, 1.3, 0.2), stax.Elementwise(nngp_fn=nngp_fn))
    b = stax.serial(stax.Dense(1, 1.3, 0.2), stax.Erf())
    ka, kb = a.kernel_fn(x, None, None), b.kernel_fn(x, None, None)
    torch.testing.assert_close(ka.nngp, kb.nngp)
    torch.testing.assert_close(ka.ntk, kb.ntk)
    with pytest.raises(NotImplementedError, match="kernel-only"):
        a.apply_fn(a.init_fn(0, (-1, 3))[1], x.float())


def test_sigmoid_like_is_neural_tangents_function():
    v = torch.linspace(-4, 4, 9, dtype=F64)
    y = stax.Sigmoid_like().apply_fn((), v)
    torch.testing.assert_close(y, 0.5 * torch.erf(v / 2.4020563531719796) + 0.5)


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: stax.ConvTranspose(0, (3,)), ValueError, "out_chan"),
        (lambda: stax.ConvTranspose(4, 3), TypeError, "filter_shape"),
        (lambda: stax.ConvTranspose(4, (3,), padding="FULL"), ValueError, "padding"),
        (lambda: stax.ConvTranspose(4, (3,), (1, 1)), ValueError, "strides"),
        (lambda: stax.ConvTranspose(4, (3,), W_std=-1.0), ValueError, "W_std"),
        (lambda: stax.ConvLocal(4, (3,), parameterization="mup"), ValueError, "parameterization"),
        (lambda: stax.ImageResize((8, 8), "linear"), ValueError, "3 to 5"),
        (lambda: stax.ImageResize((-1, -1, 8), "area"), ValueError, "method"),
        (lambda: stax.ImageResize((-1, -1, 0), "linear"), ValueError, "positive"),
        (lambda: stax.Index(stax.Slice[:, ::-1]), ValueError, "positive steps"),
        (lambda: stax.Index([0, 1]), TypeError, "Slice"),
        (lambda: stax.Index(stax.Slice[..., 1, ...]), ValueError, "Ellipsis"),
        (lambda: stax.repeat(stax.Dense(3), 0), ValueError, "n"),
        (lambda: stax.repeat("Dense", 2), TypeError, "infnets layer"),
        (lambda: stax.Frozen(3), TypeError, "infnets layer"),
        (lambda: stax.DotGeneral(), ValueError, "FanInProd"),
        (lambda: stax.DotGeneral(rhs=[[1.0]]), TypeError, "torch.Tensor"),
        (
            lambda: stax.DotGeneral(rhs=torch.ones(2), dimension_numbers=((0,), ())),
            ValueError,
            "dimension_numbers",
        ),
        (lambda: stax.Elementwise(), ValueError, "fn"),
        (lambda: stax.ExpNormalized(gamma=float("nan")), ValueError, "gamma"),
        (lambda: stax.Aggregate(channel_axis=-1), ValueError, "channel_axis"),
        (lambda: stax.Aggregate(implementation="COO"), ValueError, "implementation"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_shapes():
    x = _x((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        stax.ConvTranspose(4, (3,)).kernel_fn(x, None, "nngp")
    with pytest.raises(ValueError, match="channel axis"):
        stax.serial(stax.ImageResize((-1, 5, 8, 8)), stax.Flatten()).kernel_fn(x)
    with pytest.raises(ValueError, match="one entry per input axis"):
        stax.ImageResize((-1, -1, 8)).init_fn(0, x.shape)
    with pytest.raises(ValueError, match="batch axis 0"):
        stax.Index(stax.Slice[:1]).kernel_fn(x)
    with pytest.raises(ValueError, match="removes the infinite"):
        stax.Index(stax.Slice[:, 0]).kernel_fn(x)
    with pytest.raises(ValueError, match="selects nothing"):
        stax.Index(stax.Slice[:, :, 9:]).kernel_fn(x)
    with pytest.raises(ValueError, match="keeps its input's shape"):
        stax.repeat(stax.Conv(3, (2,)), 2).init_fn(0, (-1, 1, 5))
    with pytest.raises(ValueError, match="channel axis 1"):
        stax.DotGeneral(rhs=torch.ones(3), dimension_numbers=(((1,), (0,)), ((), ()))).kernel_fn(x)
    with pytest.raises(ValueError, match="sizes must match"):
        stax.DotGeneral(rhs=torch.ones(3), dimension_numbers=(((2,), (0,)), ((), ()))).kernel_fn(x)
    with pytest.raises(ValueError, match="diagonal_spatial"):
        stax.serial(stax.ImageResize((-1, -1, 6, 6)), stax.Flatten()).kernel_fn(
            x, None, "nngp", diagonal_spatial=True
        )


def test_docstring_examples():
    from infnets._src.elementwise import normalized, numerical, smooth
    from infnets._src.graph import aggregate
    from infnets._src.layers import dot_general, frozen, index, repeat
    from infnets._src.spatial import conv_transpose, local, resize

    for module in (
        normalized,
        numerical,
        smooth,
        aggregate,
        dot_general,
        frozen,
        index,
        repeat,
        conv_transpose,
        local,
        resize,
    ):
        result = doctest.testmod(module, extraglobs={"torch": torch, "math": math})
        assert result.failed == 0, module.__name__
