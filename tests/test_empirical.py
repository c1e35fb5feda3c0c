"""Tests of infnets.empirical: empirical NTK/NNGP, Monte Carlo kernels, Taylor models."""

from __future__ import annotations

import doctest
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import infnets.empirical as empirical
from infnets.empirical import (
    empirical_kernel_fn,
    empirical_nngp_fn,
    empirical_ntk_fn,
    linearize,
    monte_carlo_kernel_fn,
    taylor_expand,
)

IMPLS = ("jacobian_contraction", "ntk_vector_products", "structured", "auto")
DT = torch.float64


def conv_variants() -> list[nn.Module]:
    """Fresh convolutions covering strides, dilation, groups, padding modes, 1-3 dims."""
    return [
        nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
        nn.Conv1d(4, 4, 2, groups=2, padding_mode="reflect", padding=1),
        nn.Conv2d(2, 4, (3, 2), stride=(1, 2), padding=(1, 0), groups=2, bias=False),
        nn.Conv3d(2, 3, 2, padding=1, padding_mode="replicate"),
    ]


# ----------------------------------------------------------------------------- reference
def reference_jacobian(model: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Full Jacobian ``(N * O, P)`` assembled row by row with ``torch.autograd.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    flat = out.reshape(-1)
    rows = []
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows), tuple(out.shape)


def reduce_reference(
    full: Tensor,
    s1: tuple[int, ...],
    s2: tuple[int, ...],
    trace: tuple[int, ...],
    diag: tuple[int, ...],
) -> Tensor:
    """Reduce ``full (N1, *S1, N2, *S2)`` pair by pair with ``torch.diagonal``.

    The result has axes ``n1, n2`` (or one ``n`` if 0 is diagonal), then per output axis
    ``(s, s')`` (free), ``(s,)`` (diagonal) or nothing (traced: mean over the diagonal).
    """
    nd = len(s1)
    trace = tuple(a % nd for a in trace)
    diag = tuple(a % nd for a in diag)
    k = full.reshape(s1 + s2)
    k = k.permute([i for a in range(nd) for i in (a, nd + a)])  # pairs at (2a, 2a + 1)
    for a in reversed(range(nd)):  # from the last pair: earlier positions stay valid
        if a in trace:
            k = k.diagonal(dim1=2 * a, dim2=2 * a + 1).mean(-1)
        elif a in diag:
            k = k.diagonal(dim1=2 * a, dim2=2 * a + 1).movedim(-1, 2 * a)
    return k


def reference_ntk(model: nn.Module, x1: Tensor, x2: Tensor, trace=(-1,), diag=()) -> Tensor:
    j1, s1 = reference_jacobian(model, x1)
    j2, s2 = reference_jacobian(model, x2)
    return reduce_reference(j1 @ j2.T, s1, s2, trace, diag)


# --------------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = ResBlock(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class MultiHead(nn.Module):
    """Output (N, 2, 3): two heads of 3 logits, on a sequence input (Linear over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.heads = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 2, 4)
        return self.heads(torch.tanh(self.ln(self.embed(x))))


def make_model(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
        x1, x2 = torch.randn(4, 5), torch.randn(3, 5)
    elif name == "cnn":
        m = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="circular"),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3),
        )
        x1, x2 = torch.randn(3, 2, 8, 8), torch.randn(2, 2, 8, 8)
    elif name == "resnet":
        m = ResNet()
        for mod in m.modules():  # non-trivial running statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(mod.weight, 0.5, 1.5)
                nn.init.uniform_(mod.bias, -0.2, 0.2)
        m.eval()
        x1, x2 = torch.randn(3, 2, 5, 5), torch.randn(2, 2, 5, 5)
    elif name == "multihead":
        m = MultiHead()
        x1, x2 = torch.randn(3, 2, 4), torch.randn(2, 2, 4)
    else:
        raise KeyError(name)
    return m.double(), x1.double(), x2.double()


# ------------------------------------------------------------------ exactness, all impls
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("trace,diag", [((-1,), ()), ((), ()), ((), (-1,)), ((-1,), (0,))])
def test_implementations_match_reference(name: str, trace, diag) -> None:
    model, x1, x2 = make_model(name)
    if 0 in diag:
        x2 = x1 + 0.1 * torch.randn_like(x1)
    ref = reference_ntk(model, x1, x2, trace, diag)
    for impl in IMPLS:
        k = empirical_ntk_fn(model, trace, diag, implementation=impl)(x1, x2)
        assert k.shape == ref.shape, impl
        torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-12, msg=impl)


@pytest.mark.parametrize(
    "trace,diag",
    [
        ((-1,), ()),
        ((), ()),
        ((1,), ()),
        ((1, 2), ()),
        ((), (1,)),
        ((-1,), (1,)),
        ((-1,), (0, 1)),
        ((), (0,)),
    ],
)
def test_multi_output_head_axes(trace, diag) -> None:
    model, x1, x2 = make_model("multihead")
    if 0 in diag:
        x2 = x1.flip(0)
    ref = reference_ntk(model, x1, x2, trace, diag)
    for impl in IMPLS:
        k = empirical_ntk_fn(model, trace, diag, implementation=impl)(x1, x2)
        torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-12, msg=impl)


def test_symmetric_call_equals_explicit_x2() -> None:
    model, x1, _ = make_model("cnn")
    for impl in IMPLS:
        fn = empirical_ntk_fn(model, (), implementation=impl)
        torch.testing.assert_close(fn(x1), fn(x1, x1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", conv_variants())
def test_structured_convolution_variants(conv: nn.Module) -> None:
    torch.manual_seed(1)
    d = conv.weight.ndim - 2
    c_in = conv.in_channels
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(start_dim=2)).double()
    x1 = torch.randn((3, c_in) + (5 - d,) * d, dtype=DT)
    x2 = torch.randn((2, c_in) + (5 - d,) * d, dtype=DT)
    ref = reference_ntk(model, x1, x2, trace=(1,))
    for impl in ("structured", "jacobian_contraction"):
        k = empirical_ntk_fn(model, trace_axes=(1,), implementation=impl)(x1, x2)
        torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-12)


def test_shared_and_tied_weights_fall_back_correctly() -> None:
    torch.manual_seed(2)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4, bias=False)
            self.c = nn.Linear(4, 4, bias=False)
            self.c.weight = self.b.weight  # tied across modules

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.a(torch.tanh(self.a(x))))  # `a` called twice
            return self.c(torch.sin(self.b(h)))

    model = Shared().double()
    x1, x2 = torch.randn(3, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    ref = reference_ntk(model, x1, x2, ())
    k = empirical_ntk_fn(model, (), implementation="structured")(x1, x2)
    torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_module_is_left_intact(impl: str) -> None:
    """A module that appears twice in the tree (``Sequential(lin, act, lin)``): evaluating
    the model functionally must not leave replacement tensors in it (torch's
    ``functional_call(tie_weights=True)`` swaps such a module twice and restores the wrong
    one), so every later call, ``linearize`` included, still sees its parameters."""
    torch.manual_seed(4)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=DT)
    ref = reference_ntk(model, x, x)
    f = empirical_ntk_fn(model, implementation=impl)
    f.plan(x)
    for _ in range(2):
        torch.testing.assert_close(f(x), ref, rtol=1e-10, atol=1e-12)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())
    lin_model = linearize(model)
    torch.testing.assert_close(lin_model(x), model(x), rtol=1e-12, atol=1e-12)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_frozen_parameters_are_constants() -> None:
    model, x1, x2 = make_model("mlp")
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    ref = reference_ntk(model, x1, x2)
    for impl in IMPLS:
        k = empirical_ntk_fn(model, implementation=impl)(x1, x2)
        torch.testing.assert_close(k, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("diag", [(), (0,)])
def test_chunking_matches_unchunked(impl: str, diag) -> None:
    model, x1, _ = make_model("mlp")
    x1 = torch.cat([x1, x1**2, -x1])  # 12 examples
    x2 = torch.randn(12 if diag else 7, 5, dtype=DT)
    full = empirical_ntk_fn(model, (), diag, implementation=impl)
    chunked = empirical_ntk_fn(model, (), diag, implementation=impl, chunk_size=5)
    torch.testing.assert_close(chunked(x1, x2), full(x1, x2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked(x1), full(x1), rtol=1e-12, atol=1e-12)


def test_float32_matches_float64() -> None:
    model, x1, x2 = make_model("cnn")
    k64 = empirical_ntk_fn(model)(x1, x2)
    k32 = empirical_ntk_fn(model.float())(x1.float(), x2.float())
    assert k32.dtype == torch.float32
    torch.testing.assert_close(k32.double(), k64, rtol=1e-4, atol=1e-5)


def test_pure_function_with_pytree_params_matches_module() -> None:
    from infnets import stax

    net = stax.serial(stax.Dense(7, W_std=1.3, b_std=0.2), stax.Erf(), stax.Dense(2))
    module = net.to_module((-1, 3), key=3, dtype=DT)
    x1, x2 = torch.randn(4, 3, dtype=DT), torch.randn(3, 3, dtype=DT)
    ref = reference_ntk(module, x1, x2)
    for impl in IMPLS:
        k_fn = empirical_ntk_fn(net.apply_fn, implementation=impl)(
            x1, x2, params=module.stax_params
        )
        k_mod = empirical_ntk_fn(module, implementation=impl)(x1, x2)
        torch.testing.assert_close(k_fn, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(k_mod, ref, rtol=1e-10, atol=1e-12)


def test_params_override_for_modules() -> None:
    model, x1, x2 = make_model("mlp")
    new = {k: v.detach() * 1.5 for k, v in model.named_parameters()}
    k = empirical_ntk_fn(model)(x1, x2, params=new)
    with torch.no_grad():
        for k_, p in model.named_parameters():
            p.copy_(new[k_])
    torch.testing.assert_close(k, reference_ntk(model, x1, x2), rtol=1e-10, atol=1e-12)


def test_auto_plan_reports_costs() -> None:
    model, x1, x2 = make_model("mlp")
    plan = empirical_ntk_fn(model).plan(x1, x2)
    assert plan.implementation in IMPLS
    assert set(plan.costs) == {"structured", "jacobian_contraction", "ntk_vector_products"}
    assert plan.implementation == min(plan.costs, key=plan.costs.get)


# ------------------------------------------------------------------ per-layer, identities
@pytest.mark.parametrize("impl", IMPLS)
def test_per_layer_contributions_sum_to_total(impl: str) -> None:
    model, x1, x2 = make_model("resnet")
    fn = empirical_ntk_fn(model, implementation=impl)
    parts = fn(x1, x2, per_layer=True)
    assert set(parts) == {"stem", "block.conv1", "block.bn1", "block.conv2", "block.bn2", "head"}
    torch.testing.assert_close(sum(parts.values()), fn(x1, x2), rtol=1e-10, atol=1e-12)
    per_param = fn(x1, x2, per_layer="parameter")
    assert "block.conv2.weight" in per_param and "block.conv2.bias" not in per_param
    torch.testing.assert_close(
        per_param["head.weight"] + per_param["head.bias"], parts["head"], rtol=1e-12, atol=1e-12
    )


class NTKLinear(nn.Module):
    """NTK-parameterized dense layer ``y = W_std / sqrt(n) x w^T + b_std beta``."""

    def __init__(self, lin: nn.Linear, w_std: float, b_std: float) -> None:
        super().__init__()
        n = lin.in_features
        self.scale_w, self.scale_b = w_std / math.sqrt(n), b_std
        self.w = nn.Parameter(lin.weight.detach() / self.scale_w)
        self.beta = nn.Parameter(lin.bias.detach() / self.scale_b)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w * self.scale_w, self.beta * self.scale_b)


def test_ntk_parameterization_identity() -> None:
    """NTK-param NTK = sum_l (W_std^2 / n_l) J_W J_W^T + b_std^2 J_b J_b^T (standard param)."""
    torch.manual_seed(4)
    widths, w_stds, b_stds = [5, 9, 7, 2], [1.3, 1.7, 0.9], [0.1, 0.4, 0.25]
    layers: list[nn.Module] = []
    for i in range(3):
        lin = nn.Linear(widths[i], widths[i + 1])
        nn.init.normal_(lin.weight, std=w_stds[i] / math.sqrt(widths[i]))
        nn.init.normal_(lin.bias, std=b_stds[i])
        layers += [lin, nn.ReLU()] if i < 2 else [lin]
    standard = nn.Sequential(*layers).double()
    ntk_param = nn.Sequential(
        *[
            NTKLinear(m, w_stds[i // 2], b_stds[i // 2]) if isinstance(m, nn.Linear) else m
            for i, m in enumerate(standard)
        ]
    ).double()
    x1, x2 = torch.randn(4, 5, dtype=DT), torch.randn(3, 5, dtype=DT)
    torch.testing.assert_close(ntk_param(x1), standard(x1))
    parts = empirical_ntk_fn(standard, ())(x1, x2, per_layer="parameter")
    weighted = sum(
        (w_stds[l] ** 2 / widths[l]) * parts[f"{2 * l}.weight"]
        + b_stds[l] ** 2 * parts[f"{2 * l}.bias"]
        for l in range(3)
    )
    for impl in IMPLS:
        k = empirical_ntk_fn(ntk_param, (), implementation=impl)(x1, x2)
        torch.testing.assert_close(k, weighted, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- NNGP
def test_nngp_is_output_outer_product() -> None:
    model, x1, x2 = make_model("multihead")
    f1, f2 = model(x1).detach(), model(x2).detach()
    k = empirical_nngp_fn(model)(x1, x2)
    torch.testing.assert_close(k, torch.einsum("nab,mcb->nmac", f1, f2) / 3)
    full = empirical_nngp_fn(model, ())(x1, x2)
    torch.testing.assert_close(full, torch.einsum("nab,mcd->nmacbd", f1, f2))
    diag = empirical_nngp_fn(model, (-1,), (0, 1))(x1, x1)
    torch.testing.assert_close(diag, (f1 * f1).mean(-1))


def test_kernel_fn_get_convention() -> None:
    model, x1, x2 = make_model("mlp")
    kernel_fn = empirical_kernel_fn(model)
    both = kernel_fn(x1, x2)
    nngp, ntk = both
    torch.testing.assert_close(ntk, empirical_ntk_fn(model)(x1, x2))
    torch.testing.assert_close(nngp, empirical_nngp_fn(model)(x1, x2))
    torch.testing.assert_close(kernel_fn(x1, x2, "ntk"), ntk)
    sel = kernel_fn(x1, x2, ("ntk", "cov1", "cov2"))
    assert sel._fields == ("ntk", "cov1", "cov2")
    torch.testing.assert_close(sel.cov1, empirical_nngp_fn(model)(x1).diagonal())
    assert kernel_fn(x1, None, "cov2") is None
    with pytest.raises(ValueError, match="get"):
        kernel_fn(x1, x2, "bogus")


# ------------------------------------------------------------------------ Monte Carlo
def stax_one_hidden_layer():  # type: ignore[no-untyped-def]
    from infnets import stax

    return stax.serial(
        stax.Dense(64, W_std=1.5, b_std=0.3), stax.Relu(), stax.Dense(3, W_std=1.2, b_std=0.2)
    )


def test_monte_carlo_converges_to_analytic_kernels() -> None:
    """Monte Carlo estimates stay within a 1/sqrt(S) error envelope of the analytic kernels.

    With one hidden layer, E[empirical kernel] equals the analytic kernel at any width, so
    the error of the S-sample mean is pure Monte Carlo noise with standard deviation
    sigma / sqrt(S) per entry (sigma: per-sample standard deviation, estimated from the 64
    samples). We check |K_S - K| < 4.5 sigma / sqrt(S) for S = 4, 16, 64, every entry, both
    kernels: under the null each ratio is ~N(0, 1) (t with 63 dof), and the Bonferroni bound
    over 2 x 3 x 6 = 36 tests gives a false-failure probability < 36 * 7e-6 = 3e-4 (the
    seeds are fixed, so the test is deterministic anyway). A biased estimator, or one whose
    error does not shrink with S, fails at S = 64, where the envelope is 4x tighter than at
    S = 4.
    """
    init_fn, apply_fn, kernel_fn = stax_one_hidden_layer()
    torch.manual_seed(5)
    x1, x2 = torch.randn(3, 6, dtype=DT), torch.randn(2, 6, dtype=DT)
    exact = kernel_fn(x1, x2, ("nngp", "ntk"))
    ns = [4, 16, 64]
    mc = monte_carlo_kernel_fn(init_fn, apply_fn, 7, ns, implementation="jacobian_contraction")
    curve = list(mc(x1, x2))
    assert [type(c).__name__ for c in curve] == ["Kernels"] * 3

    # the same samples, one by one: seed 7, init_fn called in sequence on one generator
    per_sample = empirical_kernel_fn(apply_fn, implementation="jacobian_contraction")
    gen = torch.Generator().manual_seed(7)
    samples: dict[str, list[Tensor]] = {"nngp": [], "ntk": []}
    for _ in range(ns[-1]):
        _, params = init_fn(gen, (-1, 6), dtype=DT)
        k = per_sample(x1, x2, params=params)
        samples["nngp"].append(k.nngp)
        samples["ntk"].append(k.ntk)
    for name in ("nngp", "ntk"):
        ks = torch.stack(samples[name])
        sigma = ks.std(0)
        target = getattr(exact, name)
        for n, est in zip(ns, curve):
            torch.testing.assert_close(getattr(est, name), ks[:n].mean(0))
            z = (getattr(est, name) - target) / (sigma / math.sqrt(n))
            assert z.abs().max() < 4.5, (name, n, z)

    last = monte_carlo_kernel_fn(init_fn, apply_fn, 7, 16)(x1, x2, "ntk")
    torch.testing.assert_close(last, curve[1].ntk)
    mc16 = monte_carlo_kernel_fn(init_fn, apply_fn, 7, 16)
    torch.testing.assert_close(mc16(x1, None, "ntk")[:, :2], mc16(x1, x1[:2], "ntk"))


@pytest.mark.parametrize("readout", ["Flatten", "GlobalAvgPool"])
def test_monte_carlo_converges_to_analytic_conv_kernels(readout: str) -> None:
    """The same 1/sqrt(S) envelope for a one-hidden-layer convolutional network.

    ``Conv -> Relu -> (Flatten | GlobalAvgPool) -> Dense``: the hidden pre-activations are
    exactly Gaussian at any width and the readout weights are independent of them, so the
    expected empirical NNGP and NTK equal the analytic convolutional kernels (Novak et al.
    2019, "Bayesian Deep Convolutional Networks with Many Channels are Gaussian Processes";
    Arora et al. 2019, "On Exact Computation with an Infinitely Wide Neural Net"). The
    running estimates ``K_s`` for every ``s <= 64`` give the samples back
    (``s K_s - (s - 1) K_{s-1}``); as in the dense test, ``|K_S - K| < 4.5 sigma / sqrt(S)``
    for S = 4, 16, 64 on every entry. Power: 16 channels and 16 logits keep the per-sample
    spread small enough that the other readout's kernel is rejected (|z| 5-7 for the NNGP,
    > 30 for the NTK at S = 64).
    """
    from infnets import stax

    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Conv(16, (3, 3), padding="SAME", W_std=1.4, b_std=0.2),
        stax.Relu(),
        getattr(stax, readout)(),
        stax.Dense(16, W_std=1.1, b_std=0.3),
    )
    torch.manual_seed(6)
    x1, x2 = torch.randn(3, 2, 4, 4, dtype=DT), torch.randn(2, 2, 4, 4, dtype=DT)
    exact = kernel_fn(x1, x2, ("nngp", "ntk"))
    ns = list(range(1, 65))
    mc = monte_carlo_kernel_fn(init_fn, apply_fn, 11, ns, implementation="structured")
    curve = list(mc(x1, x2))
    for name in ("nngp", "ntk"):
        est = torch.stack([getattr(c, name) for c in curve])  # est[s - 1] = K_s
        s = torch.arange(1, 65, dtype=DT).reshape(-1, 1, 1)
        ks = s * est - torch.cat([torch.zeros_like(est[:1]), (s[:-1]) * est[:-1]])
        sigma = ks.std(0)
        target = getattr(exact, name)
        for n in (4, 16, 64):
            torch.testing.assert_close(est[n - 1], ks[:n].mean(0))
            z = (est[n - 1] - target) / (sigma / math.sqrt(n))
            assert z.abs().max() < 4.5, (name, n, z)


def test_monte_carlo_reproducible_with_generator() -> None:
    init_fn, apply_fn, _ = stax_one_hidden_layer()
    x = torch.randn(3, 6, dtype=DT)
    g = torch.Generator().manual_seed(3)
    mc = monte_carlo_kernel_fn(init_fn, apply_fn, g, 3)
    torch.testing.assert_close(mc(x, get="nngp"), mc(x, get="nngp"))
    with pytest.raises(ValueError, match="strictly increasing"):
        monte_carlo_kernel_fn(init_fn, apply_fn, 0, [4, 2])
    with pytest.raises(TypeError, match="key"):
        monte_carlo_kernel_fn(init_fn, apply_fn, "seed", 2)


# --------------------------------------------------------------------------- Taylor
def test_linearize_is_first_order() -> None:
    model, x1, _ = make_model("resnet")
    lin = linearize(model)
    torch.testing.assert_close(lin(x1), model(x1))
    names = [n for n, _ in model.named_parameters()]
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def errors(eps: float) -> tuple[float, float]:
        theta = {n: theta0[n] + eps * direction[n] for n in names}
        with torch.no_grad():
            for n, p in lin.named_parameters():
                p.copy_(theta[n.removeprefix("params.")])
            f = torch.func.functional_call(model, theta, (x1,))
            e_lin = (lin(x1) - f).abs().max().item()
            e_const = (model(x1) - f).abs().max().item()
        return e_lin, e_const

    (e1, c1), (e2, c2) = errors(1e-3), errors(5e-4)
    assert 3.0 < e1 / e2 < 5.0  # O(eps^2): halving eps divides the error by 4
    assert e1 < 0.05 * c1  # far better than the zeroth order
    assert 1.5 < c1 / c2 < 2.5


def test_taylor_expand_orders() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model = model.double()  # smooth, so the remainder of degree 2 is O(eps^3)
    x1 = torch.randn(4, 5, dtype=DT)
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    quad = taylor_expand(model, None, 2)
    const = taylor_expand(model, None, 0)

    def err(eps: float) -> float:
        theta = {n: theta0[n] + eps * direction[n] for n in theta0}
        with torch.no_grad():
            for n, p in quad.named_parameters():
                p.copy_(theta[n.removeprefix("params.")])
            return (quad(x1) - torch.func.functional_call(model, theta, (x1,))).abs().max().item()

    assert 6.0 < err(2e-2) / err(1e-2) < 10.0  # O(eps^3)
    torch.testing.assert_close(const(x1), model(x1))
    assert quad.current_params.keys() == theta0.keys()


def test_linearized_training_matches_predict() -> None:
    """Full-batch GD on L = 1/2 sum (f - y)^2 of the linearized net is kernel regression.

    Exact discrete dynamics: f_T = y + (I - lr Theta)^T (f_0 - y) (checked to round-off).
    ``predict.gradient_descent_mse`` solves the gradient flow; for lr * lambda_max = 0.02
    the per-mode gap |(1 - a)^T - exp(-a T)| <= a / e^2 * ... is below 0.3 a (max over T),
    so 0.01 * |f_0 - y| bounds it.
    """
    from infnets import predict

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    x, xt = torch.randn(6, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    y = torch.randn(6, 1, dtype=DT)
    ntk_fn = empirical_ntk_fn(model)
    k, kt = ntk_fn(x), ntk_fn(xt, x)
    lr = 0.02 / torch.linalg.eigvalsh(k).max().item()
    steps = 300
    lin = linearize(model)
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    f0, ft0 = lin(x).detach(), lin(xt).detach()
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (lin(x) - y).pow(2).sum()
        loss.backward()
        opt.step()
    f_gd, ft_gd = lin(x).detach(), lin(xt).detach()
    # exact discrete closed form
    m = torch.eye(6, dtype=DT) - lr * k
    f_exact = y + torch.linalg.matrix_power(m, steps) @ (f0 - y)
    torch.testing.assert_close(f_gd, f_exact, rtol=1e-9, atol=1e-10)
    # infnets.predict (gradient flow)
    predict_fn = predict.gradient_descent_mse(k, y, learning_rate=lr)
    f_pred, ft_pred = predict_fn(steps, f0, ft0, kt)
    scale = (f0 - y).abs().max().item()
    assert (f_pred - f_gd).abs().max() < 0.01 * scale
    assert (ft_pred - ft_gd).abs().max() < 0.01 * scale
    assert (f_gd - y).abs().max() < 0.9 * scale  # it did train


def test_linearize_pure_function_and_ntk_invariance() -> None:
    from infnets import stax

    net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(2))
    _, params = net.init_fn(0, (-1, 3), dtype=DT)
    lin = linearize(net.apply_fn, params)
    x = torch.randn(5, 3, dtype=DT)
    torch.testing.assert_close(lin(x), net.apply_fn(params, x))
    # the linearized model has the same NTK (at the expansion point)
    torch.testing.assert_close(
        empirical_ntk_fn(lin)(x), empirical_ntk_fn(net.apply_fn)(x, params=params)
    )
    assert isinstance(lin.current_params, tuple)


# ---------------------------------------------------------------------------- errors
def test_error_no_trainable_parameters() -> None:
    model = nn.Linear(3, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*requires_grad"):
        empirical_ntk_fn(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk_fn(lambda p, x: x)(torch.randn(2, 3), params={"n": torch.tensor(3)})
    with pytest.raises(ValueError, match="no trainable parameters"):
        linearize(model)


def test_error_outputs_of_different_shapes() -> None:
    model = nn.Conv1d(2, 3, 3).double()  # output length follows input length
    x1, x2 = torch.randn(2, 2, 8, dtype=DT), torch.randn(2, 2, 6, dtype=DT)
    with pytest.raises(
        ValueError, match=r"different shapes for x1 and x2.*\(2, 3, 6\).*\(2, 3, 4\)"
    ):
        empirical_ntk_fn(model, trace_axes=(-1,))(x1, x2)
    # free (untraced, non-diagonal) axes may differ
    k = empirical_ntk_fn(model, trace_axes=(1,))(x1, x2)
    assert k.shape == (2, 2, 6, 4)
    torch.testing.assert_close(k, reference_ntk(model, x1, x2, trace=(1,)))


def test_error_trace_axes_out_of_range() -> None:
    model, x1, _ = make_model("mlp")
    with pytest.raises(ValueError, match=r"trace_axes=\(3,\) names axis 3.*shape \(4, 3\)"):
        empirical_ntk_fn(model, trace_axes=(3,))(x1)
    with pytest.raises(ValueError, match="batch axis 0"):
        empirical_ntk_fn(model, trace_axes=(0,))(x1)
    with pytest.raises(ValueError, match="diagonal_axes"):
        empirical_nngp_fn(model, diagonal_axes=(-3,))(x1)
    with pytest.raises(ValueError, match="share an axis"):
        empirical_ntk_fn(model, trace_axes=(-1,), diagonal_axes=(1,))(x1)  # same axis
    with pytest.raises(ValueError, match="share an axis"):
        empirical_ntk_fn(model, trace_axes=(-1,), diagonal_axes=(-1,))
    with pytest.raises(TypeError, match="trace_axes must contain ints"):
        empirical_ntk_fn(model, trace_axes=("last",))
    with pytest.raises(ValueError, match="same number of examples"):
        empirical_ntk_fn(model, diagonal_axes=(0,))(x1, x1[:2])


def test_error_not_functional_callable() -> None:
    class LeavesTorch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            # leaving torch (.item(), .numpy()) breaks the transforms; per example, so that
            # the per-example check (which x.abs().max() over the batch fails) passes
            return self.lin(torch.as_tensor(x.detach().numpy()))

    x = torch.randn(3, 3)
    for impl in ("jacobian_contraction", "ntk_vector_products", "structured"):
        with pytest.raises(RuntimeError, match=r"empirical_ntk_fn: evaluating `model`.*item"):
            empirical_ntk_fn(LeavesTorch(), implementation=impl)(x)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or a function"):
        empirical_ntk_fn(42)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="TorchScript"):
        empirical_ntk_fn(scripted)
    with pytest.raises(ValueError, match=r"pass its parameters"):
        empirical_ntk_fn(lambda p, x: x)(x)


def test_error_batchnorm_training_mode_and_misc_arguments() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        empirical_ntk_fn(model)(torch.randn(4, 3))
    model.eval()
    assert empirical_ntk_fn(model)(torch.randn(4, 3)).shape == (4, 4)
    with pytest.raises(ValueError, match="implementation must be one of"):
        empirical_ntk_fn(model, implementation="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_ntk_fn(model, chunk_size=0)
    with pytest.raises(ValueError, match="per_layer"):
        empirical_ntk_fn(model)(torch.randn(4, 3), per_layer="everything")
    with pytest.raises(KeyError, match="not a parameter"):
        empirical_ntk_fn(model)(torch.randn(4, 3), params={"nope": torch.zeros(1)})
    with pytest.raises(TypeError, match="x2 has"):
        empirical_ntk_fn(model)(torch.randn(4, 3), torch.randn(4, 3, dtype=DT))


def test_docstring_examples() -> None:
    torch.manual_seed(0)
    result = doctest.testmod(empirical, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model, x1, x2 = make_model("resnet")
    k_cpu = empirical_ntk_fn(model, ())(x1, x2)
    model = model.cuda()
    for impl in IMPLS:
        k = empirical_ntk_fn(model, (), implementation=impl)(x1.cuda(), x2.cuda())
        torch.testing.assert_close(k.cpu(), k_cpu, rtol=1e-9, atol=1e-11)
    init_fn, apply_fn, _ = stax_one_hidden_layer()
    mc = monte_carlo_kernel_fn(init_fn, apply_fn, 0, 2)(x1.flatten(1).cuda(), get="ntk")
    assert mc.device.type == "cuda"
    lin = linearize(model)
    torch.testing.assert_close(lin(x1.cuda()), model(x1.cuda()))
