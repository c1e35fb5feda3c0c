"""Convolutional layers: finite twins, Monte Carlo, exact identities and bad inputs.

Monte Carlo: ``S`` independent finite networks (``init_fn``/``apply_fn``, 256 channels,
float64) on tiny images; NNGP from ``n_out`` i.i.d. readout units, NTK from the Jacobian
(``torch.func.jacrev``) of one readout unit. The per-network estimates are i.i.d., so
``|mean - analytic| <= 5 SE + c / channels`` entrywise (``tests/helpers.py``). The bias
allowance: every hidden layer after the first sees a fluctuating, non-Gaussian kernel,
whose second-order effect is O(1/channels) (``c = 8`` times the kernel scale, 3% at 256).
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

from helpers import assert_mc_agrees, monte_carlo_kernels
from infnets import stax
from infnets._src.spatial import conv as conv_module
from infnets._src.spatial import pooling as pooling_module

F64 = torch.float64
C = 256
BIAS = 8.0 / C
N_NETS = 24


def _images(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64)


def _mc(body, x, *, seed=0, n_nets=N_NETS, parameterization="ntk", bias=BIAS):
    """Sampled networks ``serial(*body, Dense(512))`` against the analytic kernels."""
    mc = monte_carlo_kernels(
        body, x, n_nets=n_nets, n_out=512, parameterization=parameterization, seed=seed
    )
    k = mc["kernel"]
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k.nngp, bias, "NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], k.ntk, bias, "NTK")


# ----------------------------------------------------------------- finite twins
@pytest.mark.parametrize(
    "nd,filt,strides,padding",
    [
        (1, (3,), (1,), "SAME"),
        (1, (4,), (2,), "VALID"),
        (2, (3, 3), (1, 1), "SAME"),
        (2, (2, 4), (1, 1), "SAME"),
        (2, (3, 2), (2, 1), "VALID"),
        (2, (3, 3), (1, 1), "CIRCULAR"),
        (3, (3, 3, 3), (1, 1, 1), "SAME"),
    ],
)
def test_conv_finite_twin_matches_torch(nd, filt, strides, padding):
    """apply_fn is nn.ConvNd with N(0, 1) weights scaled by W_std / sqrt(C |F|)."""
    x = _images((2, 3) + (7,) * nd)
    layer = stax.Conv(5, filt, strides, padding, W_std=1.3, b_std=0.4)
    out_shape, p = layer.init_fn(0, tuple(x.shape), dtype=F64)
    y = layer.apply_fn(p, x)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    if padding == "VALID":
        ref = cls(3, 5, filt, stride=strides, dtype=F64)
    elif padding == "SAME":
        ref = cls(3, 5, filt, stride=strides, padding="same", dtype=F64)
    else:
        ref = cls(
            3, 5, filt, padding=[(k - 1) // 2 for k in filt], padding_mode="circular", dtype=F64
        )
    with torch.no_grad():
        ref.weight.copy_(p["W"] * (1.3 / math.sqrt(3 * math.prod(filt))))
        ref.bias.copy_(0.4 * p["b"])
    expected = ref(x)
    assert y.shape == expected.shape and tuple(out_shape) == tuple(expected.shape)
    torch.testing.assert_close(y, expected)


def test_same_padding_with_strides_follows_tensorflow_rule():
    """SAME with stride s: output ceil(n / s), padding split with the extra zero after."""
    g = conv_module.axis_geometry(8, 3, 2, "SAME", "t", 0)
    assert (g.out, g.lo, g.hi) == (4, 0, 1)
    g = conv_module.axis_geometry(7, 4, 1, "SAME", "t", 0)
    assert (g.out, g.lo, g.hi) == (7, 1, 2)


def test_pool_finite_twins_match_torch():
    x = _images((2, 3, 6, 5))
    y = stax.AvgPool((2, 2)).apply_fn((), x)
    torch.testing.assert_close(y, nn.AvgPool2d(2)(x))
    y = stax.AvgPool((3, 2), strides=(1, 1)).apply_fn((), x)
    torch.testing.assert_close(y, nn.AvgPool2d((3, 2), stride=1)(x))
    y = stax.SumPool((2, 2)).apply_fn((), x)
    torch.testing.assert_close(y, 4 * nn.AvgPool2d(2)(x))
    # SAME, padding not counted: the mean over the real positions of each window
    y = stax.AvgPool((3, 3), (1, 1), "SAME", count_include_pad=False).apply_fn((), x)
    ref = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(stax.GlobalAvgPool().apply_fn((), x), x.mean((2, 3)))
    torch.testing.assert_close(stax.GlobalSumPool().apply_fn((), x), x.sum((2, 3)))
    torch.testing.assert_close(stax.Flatten().apply_fn((), x), x.reshape(2, -1))


def test_to_module_and_output_shapes():
    net = stax.serial(
        stax.Conv(4, (3, 3), (2, 2), "SAME"),
        stax.Relu(),
        stax.AvgPool((2, 2)),
        stax.Flatten(),
        stax.Dense(3),
    )
    m = net.to_module((-1, 2, 8, 8), key=1, dtype=F64)
    assert m.output_shape == (-1, 3)
    assert m(_images((5, 2, 8, 8))).shape == (5, 3)


# ------------------------------------------------------------------ Monte Carlo
def _conv(padding="SAME", filt=(3, 3), strides=None, par="ntk", w=1.4, b=0.1):
    return stax.Conv(C, filt, strides, padding, W_std=w, b_std=b, parameterization=par)


@pytest.mark.parametrize("padding", ["VALID", "SAME", "CIRCULAR"])
def test_monte_carlo_paddings_global_avg_pool(padding):
    x = _images((3, 1, 4, 4))
    body = [_conv(padding), stax.Relu(), _conv(padding, (2, 2)), stax.Relu(), stax.GlobalAvgPool()]
    _mc(body, x, seed=["VALID", "SAME", "CIRCULAR"].index(padding))


def test_monte_carlo_strides_erf_flatten():
    x = _images((3, 1, 5, 5), seed=4)
    body = [
        _conv("VALID", (2, 3), (2, 1)),
        stax.Erf(),
        _conv("SAME", (2, 2), (1, 2)),
        stax.Relu(),
        stax.Flatten(),
    ]
    _mc(body, x, seed=5)


def test_monte_carlo_avg_pool_then_conv_flatten():
    """Pixel pairs before AvgPool, per-position covariances after it."""
    x = _images((3, 1, 4, 4), seed=6)
    body = [
        _conv("SAME"),
        stax.Relu(),
        stax.AvgPool((2, 2), (1, 1), "SAME"),
        _conv("VALID"),
        stax.Relu(),
        stax.Flatten(),
    ]
    _mc(body, x, seed=6)


def test_monte_carlo_sequences_sum_pools():
    x = _images((3, 2, 5), seed=7)
    body = [
        _conv("SAME", (3,)),
        stax.Relu(),
        stax.SumPool((2,), (1,), "SAME"),
        _conv("CIRCULAR", (3,), w=0.8),
        stax.Erf(),
        stax.GlobalSumPool(),
    ]
    _mc(body, x, seed=7)


def test_monte_carlo_residual_block():
    x = _images((3, 1, 4, 4), seed=8)
    block = stax.serial(
        stax.FanOut(2),
        stax.parallel(stax.serial(_conv(), stax.Relu(), _conv(w=1.0)), stax.Identity()),
        stax.FanInSum(),
    )
    # the skip branch carries a convolution's Gaussian output, so the sum is Gaussian
    body = [_conv(), block, stax.Relu(), stax.GlobalAvgPool()]
    _mc(body, x, seed=8, n_nets=16)


def test_monte_carlo_standard_parameterization():
    x = _images((3, 1, 4, 4), seed=9)
    body = [
        _conv("SAME", par="standard"),
        stax.Relu(),
        _conv("VALID", par="standard"),
        stax.Relu(),
        stax.GlobalAvgPool(),
    ]
    _mc(body, x, seed=9, parameterization="standard")


def test_monte_carlo_volumes_concat_layernorm():
    x = _images((3, 1, 2, 3, 3), seed=10)
    branches = stax.parallel(
        stax.serial(
            stax.Conv(C // 2, (2, 2, 2), padding="SAME", W_std=1.2, b_std=0.1), stax.Relu()
        ),
        stax.serial(stax.Conv(C, (1, 1, 1), W_std=1.0, b_std=0.2), stax.Erf()),
    )
    body = [
        _conv("SAME", (2, 2, 2)),
        stax.LayerNorm(axis=1),
        stax.FanOut(2),
        branches,
        stax.FanInConcat(axis=1),
        stax.GlobalAvgPool(),
    ]
    _mc(body, x, seed=10, n_nets=16)


# -------------------------------------------------------------- exact identities
@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_one_by_one_conv_on_one_pixel_is_dense(par):
    x = _images((5, 7))
    conv = stax.serial(
        stax.Conv(9, (1, 1), W_std=1.3, b_std=0.2, parameterization=par),
        stax.Relu(),
        stax.Conv(4, (1, 1), W_std=0.7, b_std=0.3, parameterization=par),
        stax.Flatten(),
    )
    dense = stax.serial(stax.Dense(9, 1.3, 0.2, par), stax.Relu(), stax.Dense(4, 0.7, 0.3, par))
    kc = conv.kernel_fn(x[:, :, None, None], None, ("nngp", "ntk"))
    kd = dense.kernel_fn(x, None, ("nngp", "ntk"))
    # the two input kernels sum the channels in different orders (last bits only)
    torch.testing.assert_close(kc.nngp, kd.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kc.ntk, kd.ntk, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_layers_before_the_first_conv_keep_a_zero_ntk(par):
    """Raw inputs have a zero NTK (stored without memory); pooling before the first
    Conv keeps it zero, a parameter-free network returns real zeros, and the NTK after
    pooling then a Conv equals the one of the same Conv on pre-pooled inputs."""
    x = _images((6, 2, 6, 6))
    free = stax.serial(stax.AvgPool((1, 1)), stax.AvgPool((2, 2)), stax.Flatten())
    k = free.kernel_fn(x, None, ("nngp", "ntk"))
    assert torch.equal(k.ntk, torch.zeros_like(k.nngp)) and k.ntk.is_contiguous()
    k.ntk.add_(1.0)  # a real tensor the user may write
    conv = stax.Conv(3, (3, 3), padding="SAME", W_std=1.2, b_std=0.3, parameterization=par)
    tail = [stax.Relu(), stax.Flatten(), stax.Dense(1, 0.8, 0.1, par)]
    pooled = stax.serial(stax.AvgPool((2, 2)), conv, *tail).kernel_fn(x, None, ("nngp", "ntk"))
    # 2x2 average pooling of the inputs is a finite map of x; the input kernel of the
    # pooled images is the pooled input kernel, so the two must agree to round-off
    xp = torch.nn.functional.avg_pool2d(x, 2)
    direct = stax.serial(conv, *tail).kernel_fn(xp, None, ("nngp", "ntk"))
    torch.testing.assert_close(pooled.nngp, direct.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pooled.ntk, direct.ntk, rtol=1e-12, atol=1e-14)


def _body():
    return [
        stax.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
        stax.Relu(),
        stax.Conv(8, (2, 3), (1, 2), "VALID", W_std=1.2, b_std=0.2),
        stax.Erf(),
    ]


def test_global_avg_pool_is_mean_of_pixel_pair_covariance():
    x = _images((4, 2, 5, 6))
    spatial = stax.serial(*_body()).kernel_fn(x, x[:3], None)  # full (N1, N2, H, H, W, W)
    assert spatial.nngp.shape == (4, 3, 4, 4, 2, 2)
    pooled = stax.serial(*_body(), stax.GlobalAvgPool()).kernel_fn(x, x[:3], None)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(
            getattr(pooled, name),
            getattr(spatial, name).mean((2, 3, 4, 5)),
            rtol=1e-13,
            atol=1e-15,
        )
    torch.testing.assert_close(pooled.cov1, spatial.cov1.mean((1, 2, 3, 4)))


@pytest.mark.parametrize(
    "readout",
    [stax.Flatten(), stax.serial(stax.Conv(3, (2, 2), padding="CIRCULAR"), stax.Flatten())],
)
@pytest.mark.parametrize("n", [5, 18])  # dense and packed pair layouts
def test_diagonal_path_equals_full_path(readout, n):
    x = _images((n, 1, 5, 6))
    net = stax.serial(*_body(), stax.LayerNorm(axis=1), readout, stax.Dense(1))
    auto = net.kernel_fn(x, None, None)
    diag = net.kernel_fn(x, None, None, diagonal_spatial=True)
    full = net.kernel_fn(x, None, None, diagonal_spatial=False)
    for name in ("nngp", "ntk", "cov1"):
        torch.testing.assert_close(getattr(auto, name), getattr(diag, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(diag, name), getattr(full, name), rtol=1e-13, atol=1e-15)


def test_spatial_output_diagonal_matches_full():
    x = _images((3, 2, 5, 5))
    net = stax.serial(*_body())
    full = net.kernel_fn(x, x[:2], None)
    diag = net.kernel_fn(x, x[:2], None, diagonal_spatial=True)
    assert full.nngp.shape == (3, 2, 4, 4, 2, 2) and diag.nngp.shape == (3, 2, 4, 2)
    torch.testing.assert_close(diag.nngp, full.nngp.diagonal(0, 2, 3).diagonal(0, 2, 3))
    torch.testing.assert_close(diag.ntk, full.ntk.diagonal(0, 2, 3).diagonal(0, 2, 3))


def test_symmetric_packed_equals_explicit_second_batch():
    x = _images((17, 1, 4, 4))
    net = stax.serial(*_body(), stax.AvgPool((2, 2), (1, 1), "SAME"), stax.Relu())
    net = stax.serial(
        stax.Conv(4, (3, 3), padding="SAME"), stax.Relu(), stax.AvgPool((2, 2), (1, 1))
    )
    a = net.kernel_fn(x, None, None)
    b = net.kernel_fn(x, x, None)
    torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-14, atol=1e-15)
    # the full covariance of a pair (j, i) is that of (i, j) with positions swapped
    torch.testing.assert_close(a.nngp, a.nngp.transpose(0, 1).permute(0, 1, 3, 2, 5, 4))


@pytest.mark.parametrize("readout", [stax.GlobalAvgPool(), stax.Flatten()])
def test_circular_padding_is_translation_equivariant(readout):
    x = _images((3, 1, 5, 6))
    net = stax.serial(
        stax.Conv(8, (3, 2), padding="CIRCULAR", W_std=1.3, b_std=0.1),
        stax.Relu(),
        stax.Conv(8, (2, 3), padding="CIRCULAR", W_std=1.1),
        stax.Erf(),
        readout,
        stax.Dense(1),
    )
    k = net.kernel_fn(x, None, ("nngp", "ntk"))
    rolled = torch.roll(x, shifts=(2, -3), dims=(2, 3))
    kr = net.kernel_fn(rolled, None, ("nngp", "ntk"))
    torch.testing.assert_close(kr.nngp, k.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kr.ntk, k.ntk, rtol=1e-12, atol=1e-14)
    k12 = net.kernel_fn(x, rolled, "nngp")
    if isinstance(readout, stax.GlobalAvgPool):  # invariant even to rolling one image
        torch.testing.assert_close(k12, k.nngp, rtol=1e-12, atol=1e-14)
    else:  # Flatten compares aligned positions: the test has power
        assert (k12 - k.nngp).abs().max() > 1e-3


def test_input_kernel_is_channel_mean():
    x = _images((3, 4, 2, 3))
    k = stax.Identity().kernel_fn(x, x[:2], None)
    expected = torch.einsum("icab,jcde->ijadbe", x, x[:2]) / 4
    torch.testing.assert_close(k.nngp, expected)


def test_kernel_differentiable_in_hyperparameters():
    x = _images((3, 1, 4, 4))
    w = torch.tensor(1.3, dtype=F64, requires_grad=True)

    def f(w_std):
        net = stax.serial(
            stax.Conv(4, (3, 3), padding="SAME", W_std=w_std, b_std=0.1),
            stax.Relu(),
            stax.GlobalAvgPool(),
            stax.Dense(1),
        )
        return net.kernel_fn(x, None, "ntk").sum()

    (g,) = torch.autograd.grad(f(w), w)
    eps = 1e-6
    fd = (f(1.3 + eps) - f(1.3 - eps)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_float32_close_to_float64():
    x = _images((4, 1, 5, 5))
    net = stax.serial(*_body(), stax.GlobalAvgPool(), stax.Dense(1))
    k64 = net.kernel_fn(x, None, "ntk")
    k32 = net.kernel_fn(x.float(), None, "ntk")
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32.double(), k64, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- bad inputs
def test_wrong_rank_for_spatial_layer():
    with pytest.raises(ValueError, match="2 spatial axes"):
        stax.Conv(4, (3, 3)).kernel_fn(_images((2, 1, 5)))
    with pytest.raises(ValueError, match="spatial axes"):
        stax.Conv(4, (3,)).kernel_fn(_images((2, 5)))
    with pytest.raises(ValueError, match="2 spatial axes"):
        stax.Conv(4, (3, 3)).init_fn(0, (-1, 1, 5))
    with pytest.raises(ValueError, match="convolutional inputs"):
        stax.GlobalAvgPool().kernel_fn(_images((2, 5)))
    with pytest.raises(ValueError, match="Flatten"):
        stax.serial(stax.Conv(4, (3,)), stax.Dense(1)).kernel_fn(_images((2, 1, 5)))
    with pytest.raises(ValueError, match="1 to 3 spatial axes"):
        stax.Identity().kernel_fn(_images((2, 1, 2, 2, 2, 2)))


def test_filter_larger_than_valid_input():
    with pytest.raises(ValueError, match="larger than the input"):
        stax.Conv(4, (3, 6)).kernel_fn(_images((2, 1, 5, 5)))
    with pytest.raises(ValueError, match="larger than the input"):
        stax.Conv(4, (6,)).apply_fn({"W": torch.ones(4, 1, 6)}, _images((2, 1, 5)))


def test_mismatched_spatial_shapes():
    net = stax.serial(stax.Conv(4, (2, 2)), stax.Flatten())
    with pytest.raises(ValueError, match="agree in every axis"):
        net.kernel_fn(_images((2, 1, 5, 5)), _images((2, 1, 5, 4)))


def test_pooling_reducing_a_dimension_to_zero():
    with pytest.raises(ValueError, match="zero positions"):
        stax.serial(stax.Conv(4, (2, 2)), stax.AvgPool((5, 2))).kernel_fn(_images((2, 1, 5, 5)))
    with pytest.raises(ValueError, match="zero positions"):
        stax.SumPool((3,)).init_fn(0, (-1, 1, 2))


def test_diagonal_spatial_refused_where_wrong():
    x = _images((2, 1, 4, 4))
    net = stax.serial(stax.Conv(4, (3, 3)), stax.Relu(), stax.AvgPool((2, 2)), stax.Flatten())
    with pytest.raises(ValueError, match=r"AvgPool.*diagonal_spatial=None"):
        net.kernel_fn(x, None, "nngp", diagonal_spatial=True)
    with pytest.raises(TypeError, match="diagonal_spatial"):
        net.kernel_fn(x, None, "nngp", diagonal_spatial="yes")
    # a record that kept only per-position covariances cannot be pooled
    k = stax.Conv(4, (3, 3)).kernel_fn(x, None, None, diagonal_spatial=True)
    with pytest.raises(ValueError, match="full spatial covariance"):
        stax.GlobalAvgPool().kernel_fn(k)


def test_misc_bad_arguments():
    with pytest.raises(TypeError, match="tuple of ints"):
        stax.Conv(4, 3)
    with pytest.raises(ValueError, match="padding"):
        stax.Conv(4, (3,), padding="FULL")
    with pytest.raises(ValueError, match="padding"):
        stax.AvgPool((2,), padding="CIRCULAR")
    with pytest.raises(ValueError, match="entries"):
        stax.Conv(4, (3, 3), strides=(1,))
    with pytest.raises(ValueError, match=">= 1"):
        stax.Conv(4, (0, 3))
    x = _images((2, 3, 4, 4))
    with pytest.raises(ValueError, match="axis=1"):
        stax.serial(stax.Conv(4, (3, 3)), stax.LayerNorm()).kernel_fn(x)
    cat = stax.serial(
        stax.FanOut(2), stax.parallel(stax.Conv(4, (1, 1)), stax.Identity()), stax.FanInConcat()
    )
    with pytest.raises(ValueError, match="axis=1"):
        cat.kernel_fn(x)
    with pytest.raises(ValueError, match="Gaussian"):
        stax.serial(stax.Conv(4, (3, 3)), stax.Flatten(), stax.Relu()).kernel_fn(x)


def test_docstring_examples():
    for module in (conv_module, pooling_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, extraglobs={"torch": torch})
        assert result.failed == 0 and result.attempted > 0
