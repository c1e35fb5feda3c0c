"""GlobalSelfAttention: sampled finite networks, closed forms, identities, bad inputs.

Monte Carlo (see ``attention_mc.py``): the analytic NNGP/NTK at every pair of positions
must lie within ``5 SE + bias * scale`` of the mean of per-network estimates. Attention
applied to the raw inputs sees their exact kernel, so the only finite-width effects are

* the logits' fluctuations around their limit. With ``linear_scaling=True`` the logits
  ``s / (C d_k) sum_j (x(p) . W_j)(x(p') . W_j)`` average ``d_k`` terms: their standard
  deviation is ``~ s sqrt(2 / d_k)`` (3 % at ``d_k = 2048``, ``s = 1.5``); smooth mechanisms
  (softmax, identity) see an ``O(1 / d_k)`` bias (0.1 %), the kinked ones (ReLU, abs) up
  to ``O(1 / sqrt(d_k))`` on logits near their kink; we allow ``1 / sqrt(d_k)`` (2.2 %) for
  those, nothing for the others. With ``linear_scaling=False`` the logits are sums of
  ``d_k`` products of Gaussians, Gaussian up to an ``O(1 / d_k)`` correction of their
  fourth cumulant: ``2 / d_k`` (1.6 % at ``d_k = 128``).
* the quasi-Monte Carlo error of the kernel itself (about 1 % of its scale at the default
  1024 points, checked below against 16384 points): within ``5 SE``, as the Monte Carlo
  standard errors of the standard-attention tests are 2-4 %.

Deeper networks (a ``Conv`` before, the transformer block) add the ``O(1 / C)`` bias of
fluctuating input kernels (see ``test_stax_montecarlo.py``): ``8 / C``.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention_mc import as_pp, mc_spatial_kernels
from helpers import assert_mc_agrees
from infnets import stax

F64 = torch.float64


def _seqs(n: int = 3, c: int = 4, length: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, length, generator=g, dtype=F64)


X = _seqs()
#: 256 channels: random positional embeddings of that many channels have an empirical
#: covariance within O(1 / 256) of R (SUM embeddings take the input's channels)
X_WIDE = _seqs(3, 256, 4, seed=2) / 2
DK_LIN = 2048
DK_STD = 128
BIAS_EMB = 8 / 256


def _check(net, x, *, n_nets, bias, seed=0, ntk=True, **apply_kw):
    mc = mc_spatial_kernels(net, x, n_nets=n_nets, seed=seed, ntk=ntk, **apply_kw)
    mask_kw = {k: v for k, v in apply_kw.items() if k in ("mask_constant",)}
    k = net.kernel_fn(x, None, ("nngp", "ntk") if ntk else "nngp", **mask_kw)
    nngp = as_pp(k.nngp if ntk else k)
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], nngp, bias, "NNGP")
    if ntk:
        assert_mc_agrees(mc["ntk"], mc["ntk_se"], as_pp(k.ntk), bias, "NTK")
    return mc, k


def _lin(mech="SOFTMAX", **kw):
    return stax.GlobalSelfAttention(
        256, DK_LIN, 16, 16, W_key_std=1.5, W_value_std=1.2, b_std=0.2,
        attention_mechanism=mech, **kw,
    )  # fmt: skip


def _lin_emb(**kw):
    """Four wide heads: the key weights (H, C_k, d_k) of 256-channel inputs stay small."""
    return stax.GlobalSelfAttention(
        256, 512, 64, 4, W_key_std=1.5, W_value_std=1.2, b_std=0.2, **kw
    )


def _std(mech="SOFTMAX", **kw):
    return stax.GlobalSelfAttention(
        256, DK_STD, 4, 64, linear_scaling=False, W_key_std=1.5, W_value_std=1.2, b_std=0.2,
        attention_mechanism=mech, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------ Monte Carlo
@pytest.mark.parametrize("mech", ["SOFTMAX", "IDENTITY", "ABS", "RELU"])
def test_linear_scaling_mechanisms(mech):
    bias = 1 / math.sqrt(DK_LIN) if mech in ("ABS", "RELU") else 0.0
    _check(stax.serial(_lin(mech)), X, n_nets=24, bias=bias, seed=11)


@pytest.mark.parametrize(
    "pos, x",
    [
        (dict(pos_emb_type="SUM"), X_WIDE),
        (dict(pos_emb_type="CONCAT", n_chan_pos_emb=256, W_pos_emb_std=0.8, val_pos_emb=True,
              pos_emb_decay_fn=lambda d: torch.exp(-d / 2)), X),
        (dict(pos_emb_type="SUM", pos_emb_decay_fn=lambda d: 0.6**d, pos_emb_p_norm=1,
              val_pos_emb=True), X_WIDE),
    ],
    ids=["sum", "concat_decay_val", "sum_decay_val"],
)  # fmt: skip
def test_linear_scaling_positional_embeddings(pos, x):
    _check(stax.serial(_lin_emb(**pos)), x, n_nets=32, bias=BIAS_EMB, seed=12)


def test_images_and_upstream_ntk():
    """``(N, C, H, W)`` images, ``Conv`` and ReLU before (their NTK reaches the values);
    hidden width 256."""
    x = torch.randn(3, 3, 2, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    net = stax.serial(stax.Conv(256, (1, 1), b_std=0.1), stax.Relu(), _lin_emb(pos_emb_type="SUM"))
    _check(net, x, n_nets=48, bias=8 / 256, seed=13)


def test_masked_sequences():
    """Padded keys get no attention, padded queries output zero (both sides)."""
    x = X.clone()
    x[0, :, 3:] = 0.0
    x[2, :, 2:] = 0.0
    net = stax.serial(_lin_emb(pos_emb_type="CONCAT", n_chan_pos_emb=256, val_pos_emb=True))
    mc, k = _check(net, x, n_nets=24, bias=BIAS_EMB, seed=14, mask_constant=0.0)
    assert float(as_pp(k.nngp)[2, :, 2:].abs().max()) == 0.0


@pytest.mark.parametrize("mech", ["SOFTMAX", "IDENTITY", "RELU"])
def test_standard_attention(mech):
    """``linear_scaling=False``: Gaussian logits (quasi-Monte Carlo or closed form)."""
    _check(stax.serial(_std(mech)), X, n_nets=96, bias=2 / DK_STD, seed=15)


def test_standard_attention_pos_emb_and_mask():
    x = X.clone()
    x[1, :, 3:] = 0.0
    net = stax.serial(
        stax.GlobalSelfAttention(
            256, DK_STD, 16, 16, linear_scaling=False, W_key_std=1.5, b_std=0.2,
            pos_emb_type="CONCAT", n_chan_pos_emb=64, pos_emb_decay_fn=lambda d: 0.5**d,
        )
    )  # fmt: skip
    _check(net, x, n_nets=96, bias=2 / DK_STD + 8 / 64, seed=16, mask_constant=0.0)


def test_monte_carlo_detects_a_wrong_kernel():
    """Power: the same samples reject the kernel of a 15 % larger ``W_key_std`` (logits)."""
    net = stax.serial(_lin("SOFTMAX"))
    mc = mc_spatial_kernels(net, X, n_nets=24, seed=17, ntk=False)
    wrong = stax.GlobalSelfAttention(256, DK_LIN, 16, 16, W_key_std=1.5 * 1.15,
                                     W_value_std=1.2, b_std=0.2)  # fmt: skip
    k_wrong = as_pp(wrong.kernel_fn(X, None, "nngp"))
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], as_pp(net.kernel_fn(X, None, "nngp")), 0, "ok")
    with pytest.raises(AssertionError, match="disagrees"):
        assert_mc_agrees(mc["nngp"], mc["nngp_se"], k_wrong, 0.0, "NNGP")


# ---------------------------------------------------------------- closed forms
def _gram(x: torch.Tensor) -> torch.Tensor:
    """``K[i, j, p, q] = x_i[:, p] . x_j[:, q] / C`` by explicit loops (independent code)."""
    n, c, length = x.shape
    k = torch.empty(n, n, length, length, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            for p in range(length):
                for q in range(length):
                    k[i, j, p, q] = float(x[i, :, p] @ x[j, :, q]) / c
    return k


def test_identity_linear_scaling_closed_form():
    """``K' = s_OV^2 (s_QK K_ii) K_ij (s_QK K_jj)^T + b^2``, ``Theta' = 2 K' - b^2`` for raw
    inputs (no parameters before: ``Theta = 0``)."""
    sqk, sov, b = 1.3 * 0.7, 1.1 * 0.9, 0.3
    layer = stax.GlobalSelfAttention(
        5, 5, 5, 2, W_key_std=1.3, W_query_std=0.7, W_out_std=1.1, W_value_std=0.9,
        b_std=b, attention_mechanism="IDENTITY",
    )  # fmt: skip
    k = layer.kernel_fn(X, None)
    g = _gram(X)
    want = torch.empty_like(g)
    for i in range(3):
        for j in range(3):
            a_i, a_j = sqk * g[i, i], sqk * g[j, j]
            want[i, j] = sov**2 * a_i @ g[i, j] @ a_j.T + b**2
    torch.testing.assert_close(k.nngp, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, 2 * want - b**2, rtol=1e-12, atol=1e-12)


def test_identity_standard_closed_form():
    """``K'(p, q) = s^2 K(p, q) sum_{p', q'} K(p', q')^2 + b^2`` (Hron et al. 2020, sec. 3.2)."""
    layer = stax.GlobalSelfAttention(
        5, 5, 5, 2, linear_scaling=False, W_key_std=1.3, W_out_std=0.8, b_std=0.1,
        attention_mechanism="IDENTITY",
    )  # fmt: skip
    g = _gram(X)
    want = (1.3 * 0.8) ** 2 * g * (g * g).sum((-1, -2), keepdim=True) + 0.01
    torch.testing.assert_close(layer.kernel_fn(X, None, "nngp"), want, rtol=1e-12, atol=1e-12)
    # Theta = 0 for raw inputs: Theta' = 4 (K' - b^2) + b^2
    torch.testing.assert_close(layer.kernel_fn(X, None, "ntk"), 4 * (want - 0.01) + 0.01)


def test_quasi_monte_carlo_converges():
    """1024 points agree with 16384 points to < 2 % of the kernel's scale."""
    x = _seqs(3, 3, 5, seed=4)
    layer = lambda n: stax.GlobalSelfAttention(  # noqa: E731
        1, 1, 1, 1, linear_scaling=False, W_key_std=1.5, n_samples=n
    )
    k1, k2 = layer(1024).kernel_fn(x, None), layer(16384).kernel_fn(x, None)
    for a, b in ((k1.nngp, k2.nngp), (k1.ntk, k2.ntk)):
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) < 2e-2 * scale
    # and the symmetric problem is exactly symmetric
    torch.testing.assert_close(k1.nngp, k1.nngp.permute(1, 0, 3, 2), rtol=0, atol=0)


def test_tiles_and_packed_pairs_agree():
    """Packed pairs (N >= 16), tiles and x2 given all compute the same kernel (exactly, up
    to rounding; within the quasi-Monte Carlo error, 5 % at 256 points, for standard
    attention, whose symmetric and cross estimates use different samples per pair)."""
    x = _seqs(17, 3, 4, seed=6)
    for lin in (True, False):
        net = stax.serial(
            stax.Conv(8, (1,)),
            stax.GlobalSelfAttention(
                8, 8, 8, 2, linear_scaling=lin, pos_emb_type="SUM", n_samples=256
            ),
            stax.Relu(),
            stax.GlobalAvgPool(),
        )
        full = net.kernel_fn(x, None)
        tiled = net.kernel_fn(x, None, batch_size=5)
        cross = net.kernel_fn(x, x)
        for other in (tiled, cross):
            for a, b in ((other.nngp, full.nngp), (other.ntk, full.ntk)):
                atol = 1e-12 if lin else 0.05 * float(b.abs().max())  # 256 points
                torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_dtype_and_float32():
    x = X.float()
    k = stax.GlobalSelfAttention(4, 4, 4, 2).kernel_fn(x, None, "ntk")
    assert k.dtype == torch.float32
    torch.testing.assert_close(
        k, stax.GlobalSelfAttention(4, 4, 4, 2).kernel_fn(X, None, "ntk").float(), rtol=1e-4,
        atol=1e-5,
    )  # fmt: skip


def test_inputs_not_mutated():
    x = X.clone()
    before = x.clone()
    net = stax.serial(stax.GlobalSelfAttention(4, 4, 4, 2, pos_emb_type="SUM"), stax.Relu())
    net.kernel_fn(x, None)
    _, p = net.init_fn(0, x.shape, dtype=F64)
    net.apply_fn(p, x, mask_constant=0.0)
    assert torch.equal(x, before)


def test_to_module_matches_apply_fn():
    layer = stax.serial(
        stax.Conv(6, (1,)), stax.GlobalSelfAttention(6, 4, 4, 3, pos_emb_type="SUM")
    )
    m = layer.to_module(X.shape, key=3, dtype=F64, mask_constant=0.0)
    x = X.clone()
    x[0, :, 2:] = 0.0
    torch.testing.assert_close(m(x), layer.apply_fn(m.stax_params, x, mask_constant=0.0))
    assert not torch.allclose(m(x), layer.apply_fn(m.stax_params, x))  # the mask matters


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_mechanism="TANH"), "attention_mechanism must be one of"),
        (dict(pos_emb_type="ADD"), "pos_emb_type must be one of"),
        (dict(pos_emb_type="SUM", n_chan_pos_emb=4), "n_chan_pos_emb=4 with pos_emb_type='SUM'"),
        (dict(n_heads=0), "n_heads must be >= 1"),
        (dict(linear_scaling=1), "linear_scaling must be True or False"),
        (dict(pos_emb_p_norm=0), "pos_emb_p_norm must be a number > 0"),
        (dict(W_key_std=-1.0), "W_key_std must be finite and >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    base = dict(n_chan_out=4, n_chan_key=4, n_chan_val=4, n_heads=2)
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        stax.GlobalSelfAttention(**base)


def test_inputs_without_positions():
    layer = stax.GlobalSelfAttention(4, 4, 4, 2)
    with pytest.raises(ValueError, match="without positions"):
        layer.kernel_fn(torch.randn(3, 4, dtype=F64), None)
    with pytest.raises(ValueError, match="without positions"):
        layer.init_fn(0, (3, 4))


def test_diagonal_spatial_refused():
    with pytest.raises(ValueError, match="mixes positions"):
        stax.GlobalSelfAttention(4, 4, 4, 2).kernel_fn(X, None, diagonal_spatial=True)


@pytest.mark.parametrize(
    "name",
    ["attention.layer", "attention.maps", "attention.qmc", "attention.kernel"]
    + ["core.masking", "layers.dropout"],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"infnets._src.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, extraglobs={"torch": torch})
    assert result.failed == 0 and (
        result.attempted > 0 or name in ("attention.kernel", "attention.maps")
    )
