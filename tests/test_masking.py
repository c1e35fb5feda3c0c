"""Masks of padded positions, and the residual transformer encoder block end to end.

Identities: an all-real mask is no mask; a padded sequence has the kernel (and, finite,
the outputs) of the unpadded one; tiles and explicit masks agree with ``mask_constant``.
Monte Carlo: the masked transformer block (see ``docs/attention.md``) against sampled
finite blocks, width 256, with the ``8 / width`` allowance of deep networks
(``test_stax_montecarlo.py``: fluctuating input kernels bias LayerNorm and attention by
``O(1 / width)``).
"""

from __future__ import annotations

import pytest
import torch

from attention_mc import as_pp, mc_spatial_kernels
from helpers import assert_mc_agrees
from infnets import stax

F64 = torch.float64
LENGTHS = (5, 3, 6, 2)


def _padded(length: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), 3, length, generator=g, dtype=F64)
    for i, n in enumerate(LENGTHS):
        x[i, :, n:] = 0.0
    return x


X = _padded()


def encoder_block(width: int, heads: int = 4, d_k: int = 512, **attn) -> stax.Layer:
    """attention -> + identity -> LayerNorm -> MLP (1x1 convs) -> + identity -> LayerNorm."""
    return stax.serial(
        stax.FanOut(2),
        stax.parallel(
            stax.GlobalSelfAttention(width, d_k, width // heads, heads, b_std=0.1, **attn),
            stax.Identity(),
        ),
        stax.FanInSum(),
        stax.LayerNorm(axis=1),
        stax.FanOut(2),
        stax.parallel(
            stax.serial(
                stax.Conv(width, (1,), b_std=0.1), stax.Relu(), stax.Conv(width, (1,), b_std=0.1)
            ),
            stax.Identity(),
        ),
        stax.FanInSum(),
        stax.LayerNorm(axis=1),
    )


def _net(readout: stax.Layer | None = None, **attn) -> stax.Layer:
    readout = stax.GlobalAvgPool() if readout is None else readout
    return stax.serial(
        stax.Conv(8, (1,), b_std=0.1),
        stax.GlobalSelfAttention(8, 8, 8, 2, **attn),
        stax.Relu(),
        readout,
        stax.Dense(1),
    )


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize("readout", [stax.GlobalAvgPool(), stax.GlobalSumPool()])
@pytest.mark.parametrize(
    "attn",
    [dict(), dict(pos_emb_type="SUM", pos_emb_decay_fn=lambda d: 0.5**d, val_pos_emb=True),
     dict(linear_scaling=False, attention_mechanism="IDENTITY")],
    ids=["plain", "pos_emb", "standard_identity"],
)  # fmt: skip
def test_padded_equals_unpadded(readout, attn):
    net = _net(readout, **attn)
    k = net.kernel_fn(X, None, mask_constant=0.0)
    longer = torch.cat([X, torch.zeros(4, 3, 3, dtype=F64)], dim=-1)
    k_long = net.kernel_fn(longer, None, mask_constant=0.0)
    torch.testing.assert_close(k_long.nngp, k.nngp)
    torch.testing.assert_close(k_long.ntk, k.ntk)
    _, params = net.init_fn(0, X.shape, dtype=F64)
    y = net.apply_fn(params, X, mask_constant=0.0)
    for i, n in enumerate(LENGTHS):
        ki = net.kernel_fn(X[i : i + 1, :, :n], None)
        torch.testing.assert_close(k.nngp[i, i], ki.nngp[0, 0])
        torch.testing.assert_close(k.ntk[i, i], ki.ntk[0, 0])
        if not attn:  # no positional embeddings: params do not depend on the length
            torch.testing.assert_close(y[i], net.apply_fn(params, X[i : i + 1, :, :n])[0])
    # cross pairs of different lengths: two sequences padded to a common length
    j = net.kernel_fn(X[1:2, :, :5], X[0:1, :, :5], mask_constant=0.0)
    torch.testing.assert_close(j.nngp[0, 0], k.nngp[1, 0])


def test_all_real_mask_is_no_mask():
    x = torch.randn(3, 3, 4, dtype=F64)
    net = _net(pos_emb_type="CONCAT")
    k0, k1 = net.kernel_fn(x, None), net.kernel_fn(x, None, mask_constant=123.0)
    torch.testing.assert_close(k1.nngp, k0.nngp)
    torch.testing.assert_close(k1.ntk, k0.ntk)
    _, p = net.init_fn(0, x.shape, dtype=F64)
    torch.testing.assert_close(net.apply_fn(p, x, mask_constant=123.0), net.apply_fn(p, x))


def test_explicit_masks_tiles_and_x2():
    net = _net(pos_emb_type="SUM")
    k = net.kernel_fn(X, None, mask_constant=0.0)
    m = torch.zeros(4, 6, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        m[i, n:] = True
    torch.testing.assert_close(net.kernel_fn(X, None, mask1=m).nngp, k.nngp)
    torch.testing.assert_close(net.kernel_fn(X, None, mask1=m[:, None]).nngp, k.nngp)
    torch.testing.assert_close(net.kernel_fn(X, None, mask_constant=0.0, batch_size=3).ntk, k.ntk)
    k12 = net.kernel_fn(X, X[:3], mask_constant=0.0)
    torch.testing.assert_close(k12.nngp, k.nngp[:, :3])
    big = torch.cat([X] * 5)  # 20 examples: packed pairs, then tiles
    kb = net.kernel_fn(big, None, "nngp", mask_constant=0.0)
    torch.testing.assert_close(kb[:4, :4], k.nngp)
    kt = net.kernel_fn(big, None, "nngp", mask_constant=0.0, batch_size=7)
    torch.testing.assert_close(kt, kb)
    _, p = net.init_fn(0, X.shape, dtype=F64)
    torch.testing.assert_close(net.apply_fn(p, X, mask=m), net.apply_fn(p, X, mask_constant=0.0))


def test_flatten_zeroes_padding():
    """``Flatten`` + ``Dense`` sees zeros at padded positions: the average over all ``L``
    positions of the real positions' covariances."""
    net = _net(stax.Flatten())
    k = net.kernel_fn(X, None, "nngp", mask_constant=0.0)
    inner = stax.serial(*net.layers[:3])
    kin = inner.kernel_fn(X, None, "nngp", mask_constant=0.0)  # (N, N, L, L), zero if padded
    want = kin.diagonal(dim1=2, dim2=3).mean(-1)
    torch.testing.assert_close(k, want)
    m = net.to_module(X.shape, key=1, dtype=F64, mask_constant=0.0)
    y = m(X)
    x2 = X.clone()
    x2[0, :, 5:] = 0.0  # unchanged padding
    torch.testing.assert_close(m(x2), y)


def test_to_module_and_layers_passing_masks():
    net = stax.serial(
        stax.Conv(8, (1,)), stax.LayerNorm(axis=1), stax.Gelu(), stax.Dropout(0.9, mode="test"),
        stax.GlobalSelfAttention(8, 8, 8, 2), stax.GlobalAvgPool(), stax.Dense(2),
    )  # fmt: skip
    m = net.to_module(X.shape, key=0, dtype=F64, mask_constant=0.0)
    torch.testing.assert_close(m(X), net.apply_fn(m.stax_params, X, mask_constant=0.0))
    torch.testing.assert_close(m(X[:1, :, :5], mask_constant=None), m(X[:1, :, :5]))
    assert net.kernel_fn(X, None, "ntk", mask_constant=0.0).shape == (4, 4)


# ------------------------------------------------------------------ bad inputs
def test_mask_errors():
    net = _net()
    with pytest.raises(ValueError, match="masking needs inputs with positions"):
        stax.serial(stax.Dense(3)).kernel_fn(torch.ones(2, 3, dtype=F64), None, mask_constant=0.0)
    with pytest.raises(ValueError, match="masking needs inputs with positions"):
        stax.Dense(3).apply_fn({"W": torch.ones(3, 3)}, torch.ones(2, 3), mask_constant=0.0)
    with pytest.raises(ValueError, match=r"mask has shape \(4, 5\).*shape \(4, 6\)"):
        net.kernel_fn(X, None, mask1=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        net.kernel_fn(X, None, mask1=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="either mask_constant or an explicit mask"):
        net.kernel_fn(X, None, mask_constant=0.0, mask1=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask_constant must be a number"):
        net.kernel_fn(X, None, mask_constant="0")
    with pytest.raises(ValueError, match="mask2 given but x2 is None"):
        net.kernel_fn(X, None, mask2=torch.zeros(4, 6, dtype=torch.bool))
    for layer in (stax.Conv(4, (3,), padding="SAME"), stax.AvgPool((2,))):
        bad = stax.serial(layer, stax.GlobalAvgPool())
        with pytest.raises(ValueError, match="cannot keep padded positions apart"):
            bad.kernel_fn(X, None, mask_constant=0.0)
        _, p = bad.init_fn(0, X.shape, dtype=F64)
        with pytest.raises(ValueError, match="cannot keep padded positions apart"):
            bad.apply_fn(p, X, mask_constant=0.0)


# ------------------------------------------------------------ transformer block
def test_transformer_block_monte_carlo():
    """Embedding, one masked encoder block, masked mean pooling, readout: width 256."""
    width = 256
    net = stax.serial(
        stax.Conv(width, (1,), b_std=0.1),
        encoder_block(width, pos_emb_type="SUM"),
        stax.GlobalAvgPool(),
        stax.Dense(256, b_std=0.1),
    )
    x = X[:3, :, :5].clone()
    x[2, :, 3:] = 0.0  # lengths 5, 3, 3
    mc = mc_spatial_kernels(net, x, n_nets=24, seed=7, mask_constant=0.0)
    k = net.kernel_fn(x, None, mask_constant=0.0)
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], as_pp(k.nngp), 8 / width, "NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], as_pp(k.ntk), 8 / width, "NTK")
    # power: ignoring the mask gives a different kernel, rejected by the same samples
    k_unmasked = net.kernel_fn(x, None)
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mc["nngp"], mc["nngp_se"], as_pp(k_unmasked.nngp), 8 / width, "NNGP")
