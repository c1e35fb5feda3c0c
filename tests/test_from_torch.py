"""``stax.from_torch``: kernels of a user's ``nn.Module``, checked against independent oracles.

* Finite networks: ``apply_fn(params_from(net, model), x)`` must equal ``model(x)`` to
  rounding (float64) for every supported model, in both parameterizations.
* Kernels: the NNGP and NTK of ``from_torch(model)`` against Monte Carlo over
  re-initialisations of *that very module* (``reset_parameters`` under fresh seeds, here
  in the test, not through the library): per network, the NNGP estimate is ``Y Y^T / O``
  over its ``O`` readout units (i.i.d. given the hidden layers) and the NTK estimate the
  explicit Jacobian inner product of readout unit 0 (``torch.func.jacrev`` of
  ``functional_call``). Estimates are i.i.d. across networks, so their mean has standard
  error ``SE = std / sqrt(S)``; ``helpers.assert_mc_agrees`` asserts
  ``|mean - analytic| <= 5 SE + bias * scale`` entrywise and that ``SE < 4%`` of the scale
  (else the test would have no power). The bias allowance:

  - finite width: with hidden width ``n`` the hidden layers' kernel fluctuates by
    ``O(1/sqrt(n))``, which a nonlinearity turns into an ``O(1/n)`` bias, ``c ~ 2-4``
    times the kernel scale (``tests/test_stax_montecarlo.py``); we allow ``8 / n``;
  - PyTorch's weights are uniform, the kernel's Gaussian: the first layer's
    pre-activations sum only ``fan_in`` terms, with excess kurtosis
    ``gamma ~ -3.6 / fan_in``, and the following nonlinearity's kernel moves by about
    ``0.05 |gamma|`` (measured for ReLU with 2e6 samples: 1.7% at fan_in 8, 0.5% at 27,
    0.1% at 64). All first layers here have ``fan_in >= 27``: 0.5% allowed.
* Refusals: each unsupported operation raises ``FromTorchError`` naming it (and its source
  line when the model has a ``forward``), before any number is returned.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from attention_mc import as_pp
from helpers import assert_mc_agrees
from infnets import stax
from infnets.empirical import monte_carlo_kernel_fn

F64 = torch.float64
WIDTH = 384
BIAS = 8.0 / WIDTH + 0.005


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=F64)


# ---------------------------------------------------------------- models
class ResCNN(nn.Module):
    """torchvision-style residual CNN without BatchNorm/MaxPool (custom forward)."""

    def __init__(self, c_in: int = 3, width: int = 16, n_out: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c_in, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.short = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.fc = nn.Linear(2 * width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv2(F.relu(self.conv1(F.relu(x))))  # residual block
        x = self.down(F.relu(x)) + self.short(x)  # downsampling block with a shortcut
        x = x.mean(dim=(2, 3))  # global average pooling
        return self.fc(x)


class Branches(nn.Module):
    """Concatenation, products, scalar multiples, subtraction and a view of branches."""

    def __init__(self, d: int = 6, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, width)
        self.b = nn.Linear(d, 2 * width)
        self.c = nn.Linear(d, width)
        self.e = nn.Linear(d, width)
        self.f = nn.Linear(d, width)
        self.out1 = nn.Linear(3 * width, 2)
        self.out2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.tanh(self.a(x)), F.gelu(self.b(x), approximate="tanh")], dim=1)
        g = 0.5 * self.c(x) * torch.erf(self.e(x)) - self.f(x) / 4
        g = g.view(g.size(0), -1)
        return self.out1(h) + self.out2(-g)


def _zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    acts = [
        nn.ReLU(),
        nn.LeakyReLU(0.1),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.Tanh(),
        nn.Sigmoid(),
        nn.SiLU(),
        nn.ELU(0.7),
        nn.Softplus(2.0),
        nn.Hardtanh(-0.5, 1.5),
    ]
    mlp_layers: list[nn.Module] = [nn.Linear(5, 12)]
    for act in acts:
        mlp_layers += [act, nn.Linear(12, 12)]
    zoo = {
        "mlp_all_activations": (nn.Sequential(*mlp_layers, nn.Dropout(0.3)).eval(), (4, 5)),
        "cnn_flatten": (
            nn.Sequential(
                nn.Conv2d(2, 6, 3, padding="same", padding_mode="reflect"),
                nn.ReLU(),
                nn.Conv2d(6, 6, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="replicate"),
                nn.Identity(),
                nn.Tanh(),
                nn.AvgPool2d(2, padding=1),
                nn.Flatten(),
                nn.Linear(6 * 2 * 2, 3),
            ),
            (3, 2, 5, 4),
        ),
        "cnn_gap": (
            nn.Sequential(
                nn.Conv1d(2, 5, 3, padding=2, padding_mode="circular"),
                nn.GELU(),
                nn.Conv1d(5, 5, 3, stride=2),
                nn.AdaptiveAvgPool1d(1),
                nn.Flatten(),
                nn.Linear(5, 2),
            ),
            (3, 2, 9),
        ),
        "conv3d_adaptive": (
            nn.Sequential(
                nn.Conv3d(1, 4, 2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool3d(2),
                nn.Flatten(1),
                nn.Linear(32, 2),
            ),
            (2, 1, 3, 3, 3),
        ),
        "resnet": (ResCNN(3, 8, 4), (3, 3, 6, 6)),
        "branches": (Branches(), (4, 6)),
        "layernorm": (
            nn.Sequential(
                nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)
            ),
            (4, 6),
        ),
    }
    return {k: (m.double(), _x(s, i)) for i, (k, (m, s)) in enumerate(zoo.items())}


ZOO = _zoo()


@pytest.mark.parametrize("parameterization", ["standard", "ntk"])
@pytest.mark.parametrize("name", list(ZOO))
def test_apply_fn_reproduces_the_model(name, parameterization):
    model, x = ZOO[name]
    before = copy.deepcopy(model.state_dict())
    x_before = x.clone()
    net = stax.from_torch(model, x, parameterization=parameterization)
    params = stax.params_from(net, model)
    with torch.no_grad():
        want = model(x)
    got = net.apply_fn(params, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the finite twin has the model's shapes; the kernel is finite and symmetric
    twin = net.to_module((-1,) + tuple(x.shape[1:]), key=1, dtype=F64)
    assert twin(x).shape == want.shape
    k = net.kernel_fn(x, None, ("nngp", "ntk"))
    for t in k:
        assert torch.isfinite(t).all() and torch.allclose(t, t.T)
    # nothing of the user's was modified
    for key, v in model.state_dict().items():
        assert torch.equal(v, before[key]), key
    assert torch.equal(x, x_before)


def test_kernel_does_not_touch_inputs_with_inplace_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)).double()
    x = _x((3, 4))
    x0 = x.clone()
    net = stax.from_torch(model, x)
    net.apply_fn(stax.params_from(net, model), x)
    assert torch.equal(x, x0)


# ---------------------------------------------------------------- exact small cases
def test_single_linear_layer_by_hand():
    """One nn.Linear(d, o): K = W_std^2 x.x'/d + b_std^2 with W_std^2 = 1/3 and
    b_std^2 = 1/(3d) (PyTorch's uniform init); standard NTK = x.x' + 1 (gradients of W
    and b); NTK parameterization NTK = K (Jacot et al. 2018)."""
    d = 7
    x = _x((5, d))
    model = nn.Linear(d, 3).double()
    gram = x @ x.T
    k = stax.from_torch(model).kernel_fn(x, None, ("nngp", "ntk"))
    torch.testing.assert_close(k.nngp, gram / (3 * d) + 1 / (3 * d))
    torch.testing.assert_close(k.ntk, gram + 1)
    k_ntk = stax.from_torch(model, parameterization="ntk").kernel_fn(x, None, ("nngp", "ntk"))
    torch.testing.assert_close(k_ntk.nngp, k.nngp)
    torch.testing.assert_close(k_ntk.ntk, k.nngp)
    # overrides and the empirical variances of a custom initialisation
    k2 = stax.from_torch(model, W_std=2.0, b_std={"": 0.5}).kernel_fn(x, None, "nngp")
    torch.testing.assert_close(k2, 4 * gram / d + 0.25)
    custom = copy.deepcopy(model)
    with torch.no_grad():
        custom.weight.normal_(0.0, 0.3, generator=_gen(3))
        custom.bias.fill_(0.2)
    w2 = d * float((custom.weight.detach() ** 2).mean())
    k3 = stax.from_torch(custom, stds="weights").kernel_fn(x, None, "nngp")
    torch.testing.assert_close(k3, w2 * gram / d + 0.04)


# ---------------------------------------------------------------- Monte Carlo
def _reset(model: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _mc(model: nn.Module, x: torch.Tensor, n_nets: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-network NNGP (``Y Y^T / O``) and NTK (unit 0, explicit Jacobians) estimates."""
    m = copy.deepcopy(model)
    n = x.shape[0]
    ks, ts = [], []
    for s in range(n_nets):
        _reset(m, 1000 * seed + s)
        params = {k: v.detach() for k, v in m.named_parameters()}
        with torch.no_grad():
            y = functional_call(m, params, (x,))
        ks.append(y @ y.T / y.shape[1])
        jac = jacrev(lambda p: functional_call(m, p, (x,))[:, 0])(params)
        ts.append(sum(j.reshape(n, -1) @ j.reshape(n, -1).T for j in jac.values()))
    k_s, t_s = torch.stack(ks), torch.stack(ts)
    root = math.sqrt(n_nets)
    return {
        "nngp": k_s.mean(0),
        "nngp_se": k_s.std(0) / root,
        "ntk": t_s.mean(0),
        "ntk_se": t_s.std(0) / root,
    }


def _mc_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    w = WIDTH
    mlp = nn.Sequential(nn.Linear(32, w), nn.ReLU(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1024))
    cnn_flat = nn.Sequential(
        nn.Conv2d(3, 96, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(96, 96, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(96 * 9, 128),
    )

    class GapCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 96, 3)
            self.c2 = nn.Conv2d(96, 96, 2)
            self.fc = nn.Linear(96, 128)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.erf(self.c2(F.relu(self.c1(x)))).mean((-2, -1)))

    x_fc = _x((4, 32), 1)
    x_img = _x((4, 3, 5, 5), 2)
    x_img[1] = 0.8 * x_img[0] + 0.6 * x_img[1]  # a correlated pair
    return {
        "mlp": (mlp, x_fc),
        "cnn_flatten": (cnn_flat, x_img),
        "cnn_global_mean": (GapCNN(), x_img),
        "resnet": (ResCNN(3, 64, 256), x_img[:3]),
    }


MC_MODELS = _mc_models()


@pytest.mark.parametrize("name", list(MC_MODELS))
def test_kernels_match_monte_carlo_over_reinitialisations(name):
    model, x = MC_MODELS[name]
    model = model.double()
    # the residual CNN's pooled readout scatters more per network: twice the networks
    n_nets = 128 if name == "resnet" else 64
    mc = _mc(model, x, n_nets, seed=list(MC_MODELS).index(name))
    k = stax.from_torch(model, x).kernel_fn(x, None, ("nngp", "ntk"))
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k.nngp, BIAS, f"{name} NNGP")
    assert_mc_agrees(mc["ntk"], mc["ntk_se"], k.ntk, BIAS, f"{name} NTK")


def test_monte_carlo_has_power():
    """The same samples reject the likeliest slips: hidden biases with the variance 1/3
    instead of 1/(3 fan_in), and the NTK parameterization's NTK for PyTorch's."""
    model, x = MC_MODELS["mlp"]
    model = model.double()
    mc = _mc(model, x, 64, seed=0)
    wrong_b = stax.from_torch(model, x, b_std=1 / math.sqrt(3)).kernel_fn(x, None, "nngp")
    with pytest.raises(AssertionError):
        assert_mc_agrees(mc["nngp"], mc["nngp_se"], wrong_b, BIAS, "NNGP")
    wrong_par = stax.from_torch(model, x, parameterization="ntk").kernel_fn(x, None, "ntk")
    with pytest.raises(AssertionError):
        assert_mc_agrees(mc["ntk"], mc["ntk_se"], wrong_par, BIAS, "NTK")
    # ... and a kernel 8% off (e.g. a wrong constant): the NNGP's SE is ~1% here
    scaled = stax.from_torch(model, x).kernel_fn(x, None, "nngp") * 1.08
    with pytest.raises(AssertionError):
        assert_mc_agrees(mc["nngp"], mc["nngp_se"], scaled, 0.0, "NNGP")


def test_reinit_fns_feed_monte_carlo_kernel_fn():
    """stax.reinit_fns (the refusal messages' fallback) samples the model's own init."""
    model = nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 1)).double()
    x = _x((3, 32), 5)
    before = copy.deepcopy(model.state_dict())
    kernel_fn = monte_carlo_kernel_fn(*stax.reinit_fns(model), key=0, n_samples=48)
    est = kernel_fn(x, None, "nngp")
    exact = stax.from_torch(model).kernel_fn(x, None, "nngp")
    # one readout unit per network: relative SE ~ sqrt(2 / 48) = 20% off the diagonal scale
    assert float((est - exact).abs().max()) < 0.6 * float(exact.diagonal().max())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- refusals
class ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent
            return self.fc(x)
        return x


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


class Functional(nn.Module):
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.conv(x))


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.fc(x)


IMG = torch.randn(2, 2, 4, 4)
VEC = torch.randn(2, 4)
REFUSALS = {
    "maxpool": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2)), IMG, "MaxPool2d"),
    "max_pool_functional": (Functional(lambda h: F.max_pool2d(h, 2)), IMG, "max_pool2d"),
    "batchnorm_train": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), IMG, "BatchNorm2d"),
    "batchnorm_eval": (
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval(),
        IMG,
        "BatchNorm2d",
    ),
    "softmax": (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1)), VEC, "Softmax"),
    "softmax_functional": (Functional(lambda h: F.softmax(h, dim=1)), IMG, "softmax"),
    "dropout_train": (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)), VEC, "Dropout"),
    "control_flow": (ControlFlow(), VEC, "if x.sum() > 0"),
    "shared_weights": (Shared(), VEC, "called a second time"),
    "parameter_in_forward": (Scalar(), VEC, "alpha"),
    "channel_slice": (Functional(lambda h: h[:, :2]), IMG, "slicing"),
    "mean_over_channels": (Functional(lambda h: h.mean(1)), IMG, "mean over dims [1]"),
    "add_constant": (Functional(lambda h: h + 1.0), IMG, "constant"),
    "dilation": (
        nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2)),
        torch.randn(2, 2, 6, 6),
        "dilation",
    ),
    "groups": (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), IMG, "groups"),
    "sum_of_relus": (Functional(lambda h: F.relu(h) + F.relu(-h)), IMG, "non-zero means"),
    "lstm": (nn.Sequential(nn.LSTM(4, 4)), VEC, "LSTM"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_name_the_operation(name):
    model, x, needle = REFUSALS[name]
    with pytest.raises(stax.FromTorchError) as info:
        stax.from_torch(model, x).kernel_fn(x, None, ("nngp", "ntk"))
    msg = str(info.value)
    assert needle in msg, msg
    assert isinstance(info.value, ValueError)
    if isinstance(model, (ControlFlow, Shared, Functional, Scalar)):
        assert "test_from_torch.py:" in msg, msg  # the model's source line
    if name != "sum_of_relus":  # refused while converting: the fallback is named
        assert "monte_carlo_kernel_fn" in msg, msg


def test_decoder_attention_is_not_yet_supported():
    model = nn.TransformerDecoderLayer(4, 2, dim_feedforward=8)
    with pytest.raises(stax.NotYetSupportedError, match="attention") as info:
        stax.from_torch(model, torch.randn(3, 2, 4))
    assert isinstance(info.value, NotImplementedError)


def test_layernorm_gain_before_a_nonlinearity_refuses_only_the_ntk():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1)).double()
    x = _x((3, 4))
    net = stax.from_torch(model, x)
    assert torch.isfinite(net.kernel_fn(x, None, "nngp")).all()
    with pytest.raises(stax.FromTorchError, match="LayerNorm"):
        net.kernel_fn(x, None, "ntk")


def test_shape_dependent_conversions_ask_for_an_example():
    model = Functional(lambda h: h.mean((2, 3)))
    with pytest.raises(TypeError, match="example_input"):
        stax.from_torch(model)
    net = stax.from_torch(model, IMG)
    with pytest.raises(ValueError, match="example"):
        net.kernel_fn(torch.randn(2, 2, 5, 5), None, "nngp")


@pytest.mark.parametrize(
    "name",
    [
        "infnets._src.convert.from_torch",
        "infnets._src.convert.from_torch_layers",
        "infnets._src.convert.from_torch_registry",
        "infnets._src.convert.from_torch_attention",
    ],
)
def test_docstring_examples_run(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------- attention (issue #15)
class SeqModel(nn.Module):
    """Embedding Conv1d on (N, C, L), PyTorch's sequence order, attention, back to (N, E, L)."""

    def __init__(self, e=16, h=4, kind="mha", batch_first=True, act="relu", head=False, res=True):
        super().__init__()
        self.res = res
        self.emb = nn.Conv1d(4, e, 1)
        self.bf, self.kind = batch_first, kind
        if kind == "mha":
            self.attn = nn.MultiheadAttention(e, h, batch_first=batch_first)
        else:
            self.attn = nn.TransformerEncoderLayer(
                e, h, 2 * e, dropout=0.1, activation=act, batch_first=batch_first,
                norm_first=kind == "pre",
            )  # fmt: skip
        self.head = nn.Linear(e, 3) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h.permute(0, 2, 1) if self.bf else h.permute(2, 0, 1)
        if self.kind == "mha":
            a = self.attn(h, h, h, need_weights=False)[0]
            h = h + a if self.res else a
        else:
            h = self.attn(h)
        if self.head is not None:  # mean over the positions, a linear readout
            return self.head(h.mean(1 if self.bf else 0))
        return h.transpose(1, 2) if self.bf else h.permute(1, 2, 0)


SEQ = _x((3, 4, 5), 7)


@pytest.mark.parametrize("parameterization", ["standard", "ntk"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind, act", [("mha", "relu"), ("post", "relu"), ("pre", "gelu")])
def test_attention_apply_fn_reproduces_the_model(kind, act, batch_first, parameterization):
    torch.manual_seed(0)
    for head in (False, True):
        model = SeqModel(16, 4, kind, batch_first, act, head).double().eval()
        if parameterization == "standard":  # trained-looking biases: in_proj, out_proj, norms
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "bias" in name:
                        p.normal_(0, 0.1)
        net = stax.from_torch(model, SEQ, parameterization=parameterization)
        got = net.apply_fn(stax.params_from(net, model), SEQ)
        with torch.no_grad():
            torch.testing.assert_close(got, model(SEQ), rtol=1e-12, atol=1e-12)
        k = net.kernel_fn(SEQ, None, "nngp")
        assert torch.isfinite(k).all()
        twin = net.to_module((-1, 4, 5), key=1, dtype=F64)
        assert twin(SEQ).shape == got.shape


def test_bare_encoder_layer_takes_the_models_own_layout():
    """A bare TransformerEncoderLayer: apply_fn on (L, N, E); its kernel needs centred inputs."""
    tel = nn.TransformerEncoderLayer(8, 2, 16).double().eval()
    x = _x((5, 3, 8), 3)  # (L, N, E)
    net = stax.from_torch(tel, x)
    with torch.no_grad():
        torch.testing.assert_close(net.apply_fn(stax.params_from(net, tel), x), tel(x))
    with pytest.raises(ValueError, match="zero-mean"):  # LayerNorm of raw inputs
        net.kernel_fn(x, None, "nngp")
    per_position = nn.Sequential(nn.Linear(8, 8)).double()  # input_layout: (N, L, C) inputs
    xb = x.transpose(0, 1)
    net = stax.from_torch(per_position, xb, input_layout="NLC")
    with torch.no_grad():
        torch.testing.assert_close(net.apply_fn(stax.params_from(net, per_position), xb),
                                   per_position(xb))  # fmt: skip
    assert net.kernel_fn(xb, None, "nngp").shape == (3, 3, 5, 5)


def _mc_seq(kind: str, e: int, h: int, x: torch.Tensor, n_nets: int) -> dict[str, torch.Tensor]:
    """NNGP per pair of positions: each network is a fresh construction of the module
    (PyTorch's own initialisation, including MHA's xavier in-projection and zero biases);
    its E output channels are i.i.d. given everything before out_proj/linear2."""
    ks = []
    for s in range(n_nets):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + s)
            model = SeqModel(e, h, kind, res=False).double().eval()
        with torch.no_grad():
            y = model(x)
        ks.append(torch.einsum("ncp,mcq->nmpq", y, y) / y.shape[1])
    k_s = torch.stack(ks)
    return {"nngp": k_s.mean(0), "nngp_se": k_s.std(0) / math.sqrt(n_nets)}


def _seq_x() -> torch.Tensor:
    x = _x((3, 4, 4), 11)
    x[1] = 0.8 * x[0] + 0.6 * x[1]
    return 2.5 * x  # logits of variance ~ 1: the softmax is far from uniform


E_MC, H_MC = 256, 4
#: finite width: the logits sum d = 64 products (excess kurtosis ~ 6/d), allowance 2/d;
#: plus the quasi-Monte Carlo error of the softmax expectation (~1% at 1024 points)
ATTN_BIAS = 2 / (E_MC // H_MC) + 0.01


@pytest.mark.parametrize("kind, n_nets", [("mha", 150), ("post", 80)])
def test_attention_nngp_matches_monte_carlo_over_reinitialisations(kind, n_nets):
    x = _seq_x()
    mc = _mc_seq(kind, E_MC, H_MC, x, n_nets)
    model = SeqModel(E_MC, H_MC, kind, res=False).double().eval()
    k = as_pp(stax.from_torch(model, x).kernel_fn(x, None, "nngp"))
    assert_mc_agrees(mc["nngp"], mc["nngp_se"], k, ATTN_BIAS, f"{kind} NNGP")
    if kind == "mha":  # an independent hand-built network gives the same kernel, and power
        from infnets._src.attention.layer import GlobalSelfAttention

        def hand(s_qk: float, linear_scaling: bool = False) -> torch.Tensor:
            d = E_MC // H_MC
            attn = GlobalSelfAttention(
                E_MC, d, d, H_MC, linear_scaling=linear_scaling, W_key_std=s_qk,
                W_query_std=s_qk, W_value_std=math.sqrt(0.5), W_out_std=1 / math.sqrt(3),
            )  # fmt: skip
            emb = stax.Conv(E_MC, (1,), W_std=3**-0.5, b_std=12**-0.5, parameterization="standard")
            return as_pp(stax.serial(emb, attn).kernel_fn(x, None, "nngp"))

        torch.testing.assert_close(hand(math.sqrt(0.5)), k)
        for wrong in (hand(1 / math.sqrt(3)), hand(math.sqrt(0.5), True)):
            with pytest.raises(AssertionError):  # nn.Linear's 1/3 for xavier; 1/d logits
                assert_mc_agrees(mc["nngp"], mc["nngp_se"], wrong, ATTN_BIAS, "wrong")


def test_attention_ntk_needs_the_ntk_parameterization():
    model = SeqModel(16, 4, "mha").double().eval()
    net = stax.from_torch(model, SEQ)
    with pytest.raises(stax.FromTorchError, match="standard parameterization"):
        net.kernel_fn(SEQ, None, "ntk")
    ntk = stax.from_torch(model, SEQ, parameterization="ntk").kernel_fn(SEQ, None, "ntk")
    assert torch.isfinite(ntk).all()
    pre = stax.from_torch(SeqModel(16, 4, "pre").double().eval(), SEQ, parameterization="ntk")
    with pytest.raises(stax.FromTorchError, match="pre-norm"):
        pre.kernel_fn(SEQ, None, "ntk")


class _Attn(nn.Module):
    def __init__(self, call, **kw):  # type: ignore[no-untyped-def]
        super().__init__()
        self.emb = nn.Conv1d(4, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).permute(0, 2, 1)
        return self.call(self.attn, h).permute(0, 2, 1)


_MASK = torch.zeros(5, 5, dtype=torch.bool)
_KPM = torch.zeros(3, 5, dtype=torch.bool)
ATTN_REFUSALS = {
    "cross_attention": (lambda a, h: a(h, 2 * h, 2 * h)[0], {}, "cross-attention"),
    "attn_mask": (lambda a, h: a(h, h, h, attn_mask=_MASK)[0], {}, "attn_mask"),
    "key_padding_mask": (
        lambda a, h: a(h, h, h, key_padding_mask=_KPM)[0], {}, "key_padding_mask"
    ),
    "add_bias_kv": (lambda a, h: a(h, h, h)[0], {"add_bias_kv": True}, "add_bias_kv"),
    "add_zero_attn": (lambda a, h: a(h, h, h)[0], {"add_zero_attn": True}, "add_zero_attn"),
    "kdim": (lambda a, h: a(h, h, h)[0], {"kdim": 4, "vdim": 4}, "kdim"),
    "weights_used": (lambda a, h: a(h, h, h)[0] * a(h, h, h)[1].sum(), {}, "weights"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ATTN_REFUSALS))
def test_attention_refusals_name_the_module_and_reason(name):
    call, kw, needle = ATTN_REFUSALS[name]
    model = _Attn(call, **kw).double().eval()
    with pytest.raises(stax.FromTorchError) as info:
        stax.from_torch(model, SEQ).kernel_fn(SEQ, None, "nngp")
    msg = str(info.value)
    assert needle in msg and ("MultiheadAttention" in msg or "getitem" in msg), msg


def test_attention_dropout_in_training_mode_is_refused():
    for model in (SeqModel(8, 2, "post").double(), _Attn(lambda a, h: a(h, h, h)[0], dropout=0.1)):
        with pytest.raises(stax.FromTorchError, match="training mode"):
            stax.from_torch(model.train(), SEQ)
