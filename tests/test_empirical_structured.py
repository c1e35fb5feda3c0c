"""The structured NTK path: output chunks (``empirical_ntk.CotangentChunks``) and both
per-layer contractions (Gram form and materialized weight Jacobians) forced on every layer.

The structured path splits the output units into chunks when every output axis is traced or
diagonal (``output_chunks``). Each chunk only reorders exact float64 sums of the same
products, so the kernels must match the row-by-row autograd reference to the same
tolerances as the other implementations (``rtol=1e-10, atol=1e-12``; observed ~1e-15).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import infnets._src.empirical.chunking as C
import infnets._src.empirical.ntk as E
import infnets._src.empirical.structured as S
from infnets.empirical import empirical_ntk_fn
from test_empirical import conv_variants, make_model, reference_ntk

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


class DenseHeads(nn.Module):
    """Output (N, 2, 3): Linear over 2 positions (P = 2) and two heads; all structured."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.heads = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 2, 4)
        return self.heads(torch.tanh(self.embed(x)))


def dense_heads() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(3)
    return DenseHeads().double(), torch.randn(4, 2, 4, dtype=DT), torch.randn(3, 2, 4, dtype=DT)


@pytest.fixture
def force_chunks(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``force_chunks(k)``: use ``k`` chunks (at most one per unit) wherever chunking is valid.

    Wraps the real policy so that its validity conditions (traced/diagonal axes only) still
    apply, but ignores its cost rules (which keep tiny test models, and convolutions and
    Gram-form layers, in one chunk).
    """

    def apply(k: int) -> None:
        def chunks(layers1, layers2, n1, n2, out_size, same, ax, chain=False):  # type: ignore[no-untyped-def]
            if out_size <= 1 or ax.work_pairs != out_size:
                return 1
            return min(k, out_size)

        monkeypatch.setattr(E, "output_chunks", chunks)

    return apply


# ------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("trace,diag", [((-1,), ()), ((), (-1,)), ((-1,), (0,)), ((), (0, 1))])
def test_chunked_matches_reference(force_chunks, name: str, k: int, trace, diag) -> None:
    force_chunks(k)
    model, x1, x2 = make_model(name)
    if 0 in diag:
        x2 = x1 + 0.1 * torch.randn_like(x1)
    fn = empirical_ntk_fn(model, trace, diag, implementation="structured")
    assert fn.plan(x1, x2).output_chunks == k
    ref = reference_ntk(model, x1, x2, trace, diag)
    torch.testing.assert_close(fn(x1, x2), ref, **TOL)
    if 0 not in diag:  # symmetric call: one backward per chunk, f2 = f1
        torch.testing.assert_close(fn(x1), reference_ntk(model, x1, x1, trace, diag), **TOL)


@pytest.mark.parametrize(
    "trace,diag",
    [((1, 2), ()), ((), (1, 2)), ((-1,), (1,)), ((1,), (2,)), ((-1,), (0, 1)), ((1, 2), (0,))],
)
def test_chunked_multi_axis_outputs(force_chunks, trace, diag) -> None:
    """Chunks of the flattened (2, 3) output: traced units summed, diagonal ones placed."""
    force_chunks(4)
    model, x1, x2 = dense_heads()
    if 0 in diag:
        x2 = x1.flip(0)
    fn = empirical_ntk_fn(model, trace, diag, implementation="structured")
    assert fn.plan(x1, x2).output_chunks == 4
    torch.testing.assert_close(fn(x1, x2), reference_ntk(model, x1, x2, trace, diag), **TOL)


def test_free_output_axes_are_not_chunked(force_chunks) -> None:
    """A free (neither traced nor diagonal) output axis pairs units across chunks."""
    force_chunks(3)
    model, x1, x2 = dense_heads()
    for trace in [(), (-1,), (1,)]:
        fn = empirical_ntk_fn(model, trace, implementation="structured")
        assert fn.plan(x1, x2).output_chunks == 1, trace
        torch.testing.assert_close(fn(x1, x2), reference_ntk(model, x1, x2, trace), **TOL)


@pytest.mark.parametrize("conv", conv_variants())
def test_chunked_convolution_variants(force_chunks, conv: nn.Module) -> None:
    force_chunks(2)
    torch.manual_seed(1)
    d = conv.weight.ndim - 2
    c_in = conv.in_channels
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(start_dim=1)).double()  # all traced
    x1 = torch.randn((3, c_in) + (5 - d,) * d, dtype=DT)
    x2 = torch.randn((2, c_in) + (5 - d,) * d, dtype=DT)
    fn = empirical_ntk_fn(model, trace_axes=(1,), implementation="structured")
    assert fn.plan(x1, x2).output_chunks == 2
    torch.testing.assert_close(fn(x1, x2), reference_ntk(model, x1, x2, trace=(1,)), **TOL)


def test_chunked_with_example_blocks_and_per_layer(force_chunks) -> None:
    force_chunks(2)
    model, x1, _ = make_model("mlp")
    x1 = torch.cat([x1, x1**2, -x1])  # 12 examples
    x2 = torch.randn(7, 5, dtype=DT)
    full = empirical_ntk_fn(model, implementation="jacobian_contraction")
    for diag in [(), (0,)]:
        fn = empirical_ntk_fn(model, diagonal_axes=diag, implementation="structured", chunk_size=5)
        assert fn.plan(x1).output_chunks == 2
        jc = empirical_ntk_fn(model, diagonal_axes=diag, implementation="jacobian_contraction")
        torch.testing.assert_close(fn(x1), jc(x1), rtol=1e-12, atol=1e-12)
    chunked = empirical_ntk_fn(model, implementation="structured", chunk_size=5)
    torch.testing.assert_close(chunked(x1, x2), full(x1, x2), rtol=1e-12, atol=1e-12)
    parts = chunked(x1, x2, per_layer="parameter")
    ref = full(x1, x2, per_layer="parameter")
    assert set(parts) == set(ref)
    for key in ref:
        torch.testing.assert_close(parts[key], ref[key], rtol=1e-12, atol=1e-12, msg=key)


def test_models_with_fallback_parameters_are_not_chunked(force_chunks) -> None:
    """A parameter outside the structured layers needs per-example Jacobians: one chunk."""
    force_chunks(3)
    model, x1, x2 = make_model("resnet")  # BatchNorm affine parameters
    fn = empirical_ntk_fn(model, implementation="structured")
    assert fn.plan(x1, x2).output_chunks == 1
    model, x1, x2 = make_model("mlp")
    fn = empirical_ntk_fn(model, implementation="jacobian_contraction")
    assert fn.plan(x1, x2).output_chunks == 1


# ---------------------------------------------------------------------------- policy
def _dense_layers(widths: list[int], n_out: int, dtype: torch.dtype) -> dict[str, S.LayerShape]:
    layers = {}
    dims = widths + [n_out]
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        rule = E.LayerRule(str(i), nn.Linear(1, 1), 0, f"{i}.weight", f"{i}.bias")
        layers[str(i)] = S.LayerShape(rule, (1, d_out), dtype, 1, 1, d_in, d_out)
    return layers


def test_output_chunk_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark MLP (3 x 2048, N = 64, 10 logits, float64) gets 3 chunks of >= 192 rows."""
    from infnets._src.empirical.axes import make_axes

    layers = _dense_layers([128, 2048, 2048, 2048], 10, DT)
    traced = make_axes((64, 10), (64, 10), (-1,), (), "t")
    # 30 MiB of cotangents / 8 MiB -> 4 chunks wanted, but >= 192 rows -> at most 3
    assert E.output_chunks(layers, layers, 64, 64, 10, True, traced) == 3
    # fewer examples: 7.5 MiB of cotangents fit at once
    ax16 = make_axes((16, 10), (16, 10), (-1,), (), "t")
    assert E.output_chunks(layers, layers, 16, 16, 10, True, ax16) == 1
    # two different blocks: both sides' cotangents count (15 MiB), but then 16 examples
    # need 12 units per chunk for 192 rows
    assert E.output_chunks(layers, layers, 16, 16, 10, False, ax16) == 1
    monkeypatch.setattr(C, "OUTPUT_CHUNK_MIN_ROWS", 32)
    assert E.output_chunks(layers, layers, 16, 16, 10, False, ax16) == 2
    monkeypatch.undo()
    # float32 halves the bytes
    l32 = _dense_layers([128, 2048, 2048, 2048], 10, torch.float32)
    assert E.output_chunks(l32, l32, 64, 64, 10, True, traced) == 2
    # a free output axis pairs units across chunks: never chunked
    free = make_axes((64, 10), (64, 10), (), (), "t")
    assert E.output_chunks(layers, layers, 64, 64, 10, True, free) == 1
    # diagonal output axis: chunked like the trace
    diag = make_axes((64, 10), (64, 10), (), (-1,), "t")
    assert E.output_chunks(layers, layers, 64, 64, 10, True, diag) == 3


def test_output_chunk_policy_on_a_real_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default policy end to end: chunks chosen by ``plan`` and the same kernel as one chunk."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).double()
    x = torch.randn(64, 8, dtype=DT)
    monkeypatch.setattr(C, "OUTPUT_CHUNK_BYTES", 2**18)  # 64 * 522 * 8 B per unit, 2.7 MB
    fn = empirical_ntk_fn(model)
    assert fn.plan(x).implementation == "structured"
    assert fn.plan(x).output_chunks == 3  # 11 wanted, >= 192 rows of 64 examples -> 3
    k = fn(x)
    monkeypatch.setattr(C, "OUTPUT_CHUNK_BYTES", 2**40)
    assert fn.plan(x).output_chunks == 1
    torch.testing.assert_close(k, fn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        k, empirical_ntk_fn(model, implementation="jacobian_contraction")(x), **TOL
    )


def test_convolutions_are_not_chunked_by_default() -> None:
    model, x1, x2 = make_model("cnn")
    assert empirical_ntk_fn(model, implementation="structured").plan(x1, x2).output_chunks == 1


# ------------------------------------------------------- Gram form vs weight Jacobians
@pytest.mark.parametrize("form", ["gram", "materialized"])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
        nn.Conv1d(4, 4, 2, groups=2, padding_mode="reflect", padding=1),
        nn.Conv2d(2, 4, (3, 2), stride=(1, 2), padding=(1, 0), groups=2, bias=False),
        nn.Conv2d(2, 3, 3, padding="same", dilation=2, padding_mode="circular"),
        nn.Conv3d(2, 3, 2, padding=1, padding_mode="replicate"),
    ],
)
@pytest.mark.parametrize("k", [1, 2])
def test_forced_contraction_forms(monkeypatch, force_chunks, form: str, conv, k: int) -> None:
    """Each structured layer's weight block by either exact form, in one or two chunks."""
    big = float("inf")
    monkeypatch.setattr(S, "layer_costs", lambda *a: (0.0, big) if form == "gram" else (big, 0.0))
    force_chunks(k)
    torch.manual_seed(5)
    d = conv.weight.ndim - 2
    c_in = conv.in_channels
    head = nn.Linear(conv.out_channels, 3)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(start_dim=2), _Last(), head).double()
    x1 = torch.randn((3, c_in) + (5 - d,) * d, dtype=DT)
    x2 = torch.randn((2, c_in) + (5 - d,) * d, dtype=DT)
    for trace, diag in [((-1,), ()), ((), ()), ((1, 2), ()), ((1,), (2,))]:
        fn = empirical_ntk_fn(model, trace, diag, implementation="structured")
        separable = len(trace) + len(diag) == 2
        assert fn.plan(x1, x2).output_chunks == (k if separable else 1)
        ref = reference_ntk(model, x1, x2, trace, diag)
        torch.testing.assert_close(fn(x1, x2), ref, **TOL)
        torch.testing.assert_close(fn(x1), reference_ntk(model, x1, x1, trace, diag), **TOL)


class _Last(nn.Module):
    """``(N, C, L) -> (N, L, C)``: positions become an output axis, channels the features."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)
