"""The structured NTK of layer chains (``empirical_chain``): the hand-written backward pass.

Every kernel is checked against two independent oracles: the row-by-row autograd Jacobian
of ``test_empirical.reference_ntk`` and the general structured path (``vmap(jacrev)``
cotangents, ``empirical_ntk.CHAIN = False``). Both orders of float64 summation differ only
by round-off, hence ``rtol=1e-10, atol=1e-12`` (observed ~1e-15).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import infnets._src.empirical.chunking as C
import infnets._src.empirical.ntk as E
import infnets._src.empirical.structured as S
from infnets._src.empirical.chain import chain_of
from infnets.empirical import empirical_ntk_fn
from test_empirical import conv_variants, reference_ntk

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
AXES = [((-1,), ()), ((), ()), ((), (-1,)), ((-1,), (0,))]


def _frozen_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    bn.requires_grad_(False)
    return bn


def chain_models() -> dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor]]]:
    """Chains covering every step kind; each returns ``(model, x1, x2)`` in float64."""

    def dense() -> tuple[nn.Module, Tensor, Tensor]:
        m = nn.Sequential(
            nn.Linear(5, 7),
            nn.GELU(),
            nn.Sequential(nn.Dropout(0.3), nn.Linear(7, 6), nn.LeakyReLU(0.2)),
            nn.Identity(),
            nn.Linear(6, 6, bias=False),
            nn.Softplus(),
            nn.Linear(6, 3),
        )
        return m, torch.randn(4, 5), torch.randn(3, 5)

    def gap() -> tuple[nn.Module, Tensor, Tensor]:  # readout through global pooling
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.Tanh(),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
        return m, torch.randn(3, 2, 6, 6), torch.randn(2, 2, 6, 6)

    def gap1d() -> tuple[nn.Module, Tensor, Tensor]:  # no activation after the last conv
        m = nn.Sequential(
            nn.Conv1d(2, 3, 3),
            nn.Sigmoid(),
            nn.Conv1d(3, 4, 2, dilation=2),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )
        return m, torch.randn(3, 2, 9), torch.randn(2, 2, 7)

    def pools() -> tuple[nn.Module, Tensor, Tensor]:  # frozen BN, padding layers, max pool
        m = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(2, 3, 3),
            _frozen_bn(3),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.ZeroPad2d((1, 0, 0, 1)),
            nn.Conv2d(3, 4, 2, padding="same", dilation=1),
            nn.ELU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 6),
            nn.Unflatten(1, (2, 3)),
        )
        return m, torch.randn(3, 2, 8, 8), torch.randn(2, 2, 8, 8)

    def seq() -> tuple[nn.Module, Tensor, Tensor]:  # Linear over positions, frozen Linear
        frozen = nn.Linear(5, 5).requires_grad_(False)
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), frozen, nn.Hardswish(), nn.Linear(5, 3))
        return m, torch.randn(3, 2, 4), torch.randn(2, 2, 4)

    return {"dense": dense, "gap": gap, "gap1d": gap1d, "pools": pools, "seq": seq}


def _build(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    m, x1, x2 = chain_models()[name]()
    return m.double().eval(), x1.double(), x2.double()


def _general(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Tensor]) -> Tensor:
    with monkeypatch.context() as mp:
        mp.setattr(E, "CHAIN", False)
        return fn()


@pytest.mark.parametrize("name", list(chain_models()))
@pytest.mark.parametrize("trace,diag", AXES)
def test_chain_matches_reference_and_general_path(monkeypatch, name, trace, diag) -> None:
    model, x1, x2 = _build(name)
    if 0 in diag:
        x2 = x1 + 0.1 * torch.randn_like(x1)
    f = empirical_ntk_fn(model, trace, diag, implementation="structured")
    assert f.plan(x1, x2).chain
    for b in (x2, None):
        k = f(x1, b)
        ref = reference_ntk(model, x1, x1 if b is None else b, trace, diag)
        assert k.shape == ref.shape
        torch.testing.assert_close(k, ref, **TOL)
        torch.testing.assert_close(k, _general(monkeypatch, lambda b=b: f(x1, b)), **TOL)


@pytest.mark.parametrize("conv", conv_variants())
def test_chain_convolution_variants(monkeypatch, conv: nn.Module) -> None:
    """Strides, dilation, groups, reflect/replicate padding, 1-3 spatial dimensions."""
    torch.manual_seed(1)
    d = len(conv.kernel_size)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x1 = torch.randn((3, conv.in_channels) + (5,) * d, dtype=DT)
    x2 = torch.randn((2, conv.in_channels) + (5,) * d, dtype=DT)
    model(x1)  # materialize the lazy layer
    f = empirical_ntk_fn(model, (), (), implementation="structured")
    assert f.plan(x1, x2).chain
    k = f(x1, x2)
    torch.testing.assert_close(k, reference_ntk(model, x1, x2, (), ()), **TOL)
    torch.testing.assert_close(k, _general(monkeypatch, lambda: f(x1, x2)), **TOL)


@pytest.mark.parametrize("name", ["gap", "gap1d"])
@pytest.mark.parametrize("trace,diag", AXES)
def test_factored_readout(monkeypatch, name, trace, diag) -> None:
    """Convolutions read out through global pooling and a Linear head take the factored
    contraction (one weight gradient per example) and still match the references."""
    model, x1, x2 = _build(name)
    if 0 in diag:
        x2 = x1.flip(0)
    calls = []
    inner = S._contract_factored

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0][0].rule.name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(S, "_contract_factored", counted)
    k = empirical_ntk_fn(model, trace, diag, implementation="structured")(x1, x2)
    assert calls == ["2"]  # the last convolution only: the first one is reached mixed
    torch.testing.assert_close(k, reference_ntk(model, x1, x2, trace, diag), **TOL)


@pytest.mark.parametrize("trace,diag", [((-1,), ()), ((), (-1,))])
def test_factored_readout_in_output_chunks(monkeypatch, trace, diag) -> None:
    """Unit chunks give each chunk its rows of the unit factor."""
    model, x1, x2 = _build("gap")
    monkeypatch.setattr(E, "output_chunks", lambda *a, **kw: 2)
    f = empirical_ntk_fn(model, trace, diag, implementation="structured")
    parts = f(x1, x2, per_layer=True)
    ref = reference_ntk(model, x1, x2, trace, diag)
    torch.testing.assert_close(sum(parts.values()), ref, **TOL)
    general = _general(monkeypatch, lambda: f(x1, x2, per_layer=True))
    for key, v in parts.items():
        torch.testing.assert_close(v, general[key], **TOL)


def test_chain_blocks_output_chunks_and_per_layer(monkeypatch) -> None:
    """Example blocks (``chunk_size``), forced output-unit chunks and per-layer terms."""
    model, x1, x2 = _build("pools")
    axes = ((1,), (2,))  # every output axis traced or diagonal: chunks are valid
    ref = reference_ntk(model, x1, x2, *axes)
    general = _general(
        monkeypatch,
        lambda: empirical_ntk_fn(model, *axes, implementation="structured")(x1, x2, per_layer=True),
    )
    for k_chunks in (1, 4):
        with monkeypatch.context() as mp:
            mp.setattr(E, "output_chunks", lambda *a, k=k_chunks, **kw: k)
            f = empirical_ntk_fn(model, *axes, implementation="structured", chunk_size=2)
            assert f.plan(x1, x2).output_chunks == k_chunks
            parts = f(x1, x2, per_layer=True)
        assert set(parts) == set(general)
        for key, v in parts.items():
            torch.testing.assert_close(v, general[key], **TOL)
        torch.testing.assert_close(sum(parts.values()), ref, **TOL)


def test_chain_output_chunk_policy(monkeypatch) -> None:
    """Chains split the output units when one layer's cotangents exceed the budget (only
    where every output axis is traced or diagonal), and the chunked kernel is unchanged."""
    model, x1, x2 = _build("gap")
    f = empirical_ntk_fn(model, implementation="structured")
    assert f.plan(x1, x2).output_chunks == 1
    # largest layer output 4 x 6 x 6 doubles per example and unit, both sides: 3 + 2 examples
    per_unit = 2 * (3 + 2) * 4 * 36 * 8
    monkeypatch.setattr(C, "CHAIN_CHUNK_BYTES", per_unit)
    assert f.plan(x1, x2).output_chunks == 3  # one unit per chunk
    monkeypatch.setattr(C, "CHAIN_CHUNK_BYTES", 2 * per_unit)
    assert f.plan(x1, x2).output_chunks == 2
    torch.testing.assert_close(f(x1, x2), reference_ntk(model, x1, x2), **TOL)
    free = empirical_ntk_fn(model, trace_axes=(), implementation="structured")
    assert free.plan(x1, x2).output_chunks == 1
    torch.testing.assert_close(free(x1, x2), reference_ntk(model, x1, x2, ()), **TOL)


def test_chain_mixed_input_shapes() -> None:
    """x1 and x2 of different image sizes (global pooling accepts both)."""
    model, x1, _ = _build("gap")
    x2 = torch.randn(2, 2, 8, 8, dtype=DT)
    k = empirical_ntk_fn(model, implementation="structured")(x1, x2)
    torch.testing.assert_close(k, reference_ntk(model, x1, x2), **TOL)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).sin()


def test_what_is_not_a_chain() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=DT)
    shared = nn.Linear(4, 4)
    trainable_norm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    hooked[1].register_forward_hook(lambda m, a, out: out * 2)
    cases = {
        "custom forward": nn.Sequential(_Custom(), nn.Linear(3, 2)),
        "shared module": nn.Sequential(shared, nn.Tanh(), shared),
        "trainable norm": trainable_norm,
        "forward hook": hooked,
        "softmax": nn.Sequential(nn.Linear(4, 3), nn.Softmax(-1)),
    }
    for label, model in cases.items():
        model = model.double()
        f = empirical_ntk_fn(model, implementation="structured")
        assert not f.plan(x).chain, label
        torch.testing.assert_close(f(x), reference_ntk(model, x, x), **TOL, msg=label)


def test_batch_axis_reshapes_fall_back() -> None:
    """``Flatten(0)`` acts on the batch axis: the chain refuses it during its forward pass
    and the general path (which evaluates each example alone) gives the kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Flatten(0), nn.Unflatten(0, (-1, 6)), nn.Tanh(), nn.Linear(6, 2)
    ).double()
    x = torch.randn(3, 4, dtype=DT)
    f = empirical_ntk_fn(model, implementation="structured")
    torch.testing.assert_close(f(x), reference_ntk(model, x, x), **TOL)


@pytest.mark.parametrize("impl", ["structured", "jacobian_contraction", "ntk_vector_products"])
def test_in_place_layers_leave_inputs_intact(impl: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ELU(inplace=True), nn.Flatten(), nn.Linear(8, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)
    ).double()
    x = torch.randn(3, 2, 4, dtype=DT)
    x0 = x.clone()
    ref = reference_ntk(model, x0.clone(), x0.clone())
    k = empirical_ntk_fn(model, implementation=impl)(x)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    torch.testing.assert_close(k, ref, **TOL)


def test_chain_steps() -> None:
    model, x1, _ = _build("pools")
    f = empirical_ntk_fn(model, implementation="structured")
    bound = f.model.bind(None)
    steps = chain_of(model, bound, {"1", "6", "10"})
    assert steps is not None
    kinds = [(s.name, s.kind) for s in steps]
    assert kinds[:4] == [("0", "map"), ("1", "layer"), ("2", "map"), ("3", "act")]
    assert ("10", "layer") in kinds and ("11", "map") in kinds
    assert chain_of(model, bound, {"1", "6"}) is None  # layer 10's weights not covered
