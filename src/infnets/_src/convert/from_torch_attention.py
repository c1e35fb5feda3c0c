r"""Attention converters of :func:`infnets.stax.from_torch` (registered on import).

``nn.MultiheadAttention`` (self-attention: ``attn(x, x, x)``) becomes
:class:`TorchAttention` and ``nn.TransformerEncoderLayer`` :class:`TorchEncoderLayer`;
both compute exactly PyTorch's function in ``apply`` (in-projection biases included) and
take their kernels from :class:`~infnets._src.attention.layer.GlobalSelfAttention`
(``linear_scaling=False``, ``'SOFTMAX'``), ``LayerNorm``, ``Conv(n, (1,))`` and ``FanInSum``.

**Which limit.** ``nn.MultiheadAttention(E, H)`` has head dimension ``d = E / H`` and
logits ``q . k / sqrt(d)``. The kernel is the limit ``E -> infinity`` (so ``d -> infinity``)
of the *many-heads* Gaussian-process approximation of Hron et al. 2020 ("Infinite
attention", sec. 3): the logits ``G_h(p, p') = q_h(p) . k_h(p') / sqrt(d)`` are sums of
``d`` products and become Gaussian with covariance ``s_QK^2 K(p, q) K(p', q')``; the
output is Gaussian only when ``H -> infinity`` too. With the model's finite ``H`` the
output is a *mixture* of Gaussians (each head's attention matrix stays random), but its
second moment does not depend on ``H`` (it averages ``H`` i.i.d. heads): the NNGP of one
attention layer followed by linear maps is exact for every ``H`` as ``d -> infinity``; a
nonlinearity (or a second attention layer) after it sees a non-Gaussian input for finite
``H``, and the kernel is then the ``H -> infinity`` approximation. The Gaussian
expectation over the softmax is computed by quasi-Monte Carlo (``n_samples`` Sobol
points, about 1 % of the kernel's scale at 1024).

**Hyper-parameters** from PyTorch's initialisation (``_reset_parameters``):
``in_proj_weight`` (``(3E, E)``) is ``xavier_uniform_``, ``Var = 2 / (E + 3E)``, so
``W_query_std^2 = W_key_std^2 = W_value_std^2 = E Var = 1/2``; ``out_proj.weight`` keeps
``nn.Linear``'s ``Var = 1/(3E)``, ``W_out_std^2 = 1/3``; every bias starts at zero
(``b_std = 0``). ``stds='weights'``: ``E mean(W^2)`` per block and ``mean(b^2)`` per bias;
a key bias cancels in the softmax (it shifts a row of logits by a constant), a value bias
passes through the softmax rows (they sum to 1) and adds ``W_out_std^2 Var(b_v)`` to the
output bias variance, and a query bias with non-zero variance is refused.

**Parameterization.** ``GlobalSelfAttention`` has the NTK parameterization only. The
NNGP does not depend on it; ``parameterization='ntk'`` gives the NTK of the same network
with ``N(0, 1)`` weights scaled by ``W_std / sqrt(E)`` (biases by their ``b_std``, zero
at PyTorch's initialisation, so they add nothing), and ``params_from`` rescales the
weights accordingly. The standard-parameterization NTK of attention is not modelled:
``kernel_fn(..., 'ntk')`` raises for ``parameterization='standard'``.

**Layouts.** PyTorch holds sequences as ``(N, L, E)`` (``batch_first``) or ``(L, N, E)``;
infnets as ``(N, C, L)``. The converter tracks, for every value, the permutation from
infnets' order to the model's (``x.permute``/``x.transpose`` change it); attention
requires its module's order, ``nn.Linear``/``nn.LayerNorm`` on the last axis of such a
sequence act position-wise (``Conv(n, (1,))``, ``LayerNorm(axis=1)``), and ``x.mean(dim)``
over the positions is ``GlobalAvgPool``. A model whose input is itself a sequence
(a bare ``nn.TransformerEncoderLayer``, or ``input_layout='NLC'``/``'LNC'``) is run
permuted: ``apply_fn`` takes the model's input, ``kernel_fn`` the same tensors.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from infnets._src.attention.layer import GlobalSelfAttention
from infnets._src.convert import from_torch_ops  # noqa: F401 - its converters first
from infnets._src.convert.from_torch_layers import ChannelAffine, Scale
from infnets._src.convert.from_torch_registry import (
    CONVERTERS,
    Conversion,
    FromTorchError,
    NotYetSupportedError,
    Op,
    Relayout,
    first_input,
    register_converter,
)
from infnets._src.core.protocol import ShapeTree, single_shape
from infnets._src.elementwise import base as ew_base
from infnets._src.elementwise import rectified as ew_rect
from infnets._src.elementwise import smooth as ew_smooth
from infnets._src.layers import combinators as comb
from infnets._src.layers.base import Layer, Params
from infnets._src.layers.normalization import LayerNorm
from infnets._src.spatial.conv import Conv
from infnets._src.spatial.pooling import GlobalAvgPool

__all__ = ["SEQ_LAYOUTS", "TorchAttention", "TorchEncoderLayer", "common_layout", "input_layout"]

#: ``input_layout=`` names -> permutation from infnets' ``(N, C, L)`` to the model's order
SEQ_LAYOUTS: dict[str, tuple[int, ...] | None] = {"NCL": None, "NLC": (0, 2, 1), "LNC": (2, 0, 1)}
_TUPLE = "infnets_attention_tuple"
_NTK_STANDARD = (
    "the NTK of attention in PyTorch's standard parameterization is not modelled "
    "(GlobalSelfAttention has the NTK parameterization only). Ask for the NNGP, or convert "
    "with parameterization='ntk'."
)


def input_layout(model: nn.Module, name: str | None) -> tuple[int, ...] | None:
    """The model input's order: ``input_layout=`` or a bare attention module's own."""
    if name is not None:
        if name not in SEQ_LAYOUTS:
            raise ValueError(f"from_torch: input_layout must be one of {list(SEQ_LAYOUTS)}.")
        return SEQ_LAYOUTS[name]
    if type(model) in (nn.MultiheadAttention, nn.TransformerEncoderLayer):
        attn = getattr(model, "self_attn", model)
        return (0, 2, 1) if attn.batch_first else (2, 0, 1)
    return None


def _seq(layout: tuple[int, ...] | None) -> bool:
    """A rank-3 order whose last axis is infnets' channel axis (a sequence of features)."""
    return layout is not None and len(layout) == 3 and layout[2] == 1


def common_layout(op: Op, res: Conversion) -> tuple[int, ...] | None:
    """The output order of a converter that ignores layouts (see ``Conversion``)."""
    lays = {op.layout(a) for a in res.inputs}
    if lays == {None}:
        return None
    pres = res.pre or (None,) * len(res.inputs)
    positionwise = (ew_base.ElementwiseLayer, comb.FanInSum, comb.FanInProd, Scale)
    if (
        len(lays) == 1
        and isinstance(res.layer, positionwise)
        and all(p is None or isinstance(p, Scale) for p in pres)
    ):
        return lays.pop()
    raise op.refuse(
        "its input is a sequence held in PyTorch's order (permuted from infnets' (N, C, L)); "
        "on such tensors only position-wise operations, nn.Linear/nn.LayerNorm on the last "
        "axis, attention, a mean over the positions and permutations are converted."
    )


# ------------------------------------------------------------------ stds
def _overridden(op: Op) -> None:
    for name in ("W_std", "b_std"):
        given = getattr(op.options, name)
        name_ = op.module_name or ""
        if given is not None and (
            not isinstance(given, Mapping)
            or any(k == name_ or k.startswith(name_ + ".") or not name_ for k in given)
        ):
            raise op.refuse(
                f"{name}= overrides are not applied to attention modules; convert without "
                "them (the stds are read from the module, see stds=).",
                NotYetSupportedError,
            )


def _ms(t: Tensor | None) -> float:
    return 0.0 if t is None else float(t.detach().double().pow(2).mean())


def _lin_stds(stds: str, lin: nn.Linear) -> tuple[float, float | None]:
    n = lin.in_features
    if stds == "weights":
        return math.sqrt(n * _ms(lin.weight)), (
            None if lin.bias is None else math.sqrt(_ms(lin.bias))
        )
    return 1 / math.sqrt(3), (None if lin.bias is None else 1 / math.sqrt(3 * n))


def _scaled(t: Tensor, std: float, ntk: bool, what: str) -> Tensor:
    """A module tensor in the NTK parameterization's units (``t / std``)."""
    t = t.detach().clone()
    if not ntk:
        return t
    if std == 0:
        if torch.count_nonzero(t):
            raise FromTorchError(
                f"params_from: {what} is non-zero but its std is 0 in the NTK parameterization; "
                "use parameterization='standard' or stds='weights'."
            )
        return t
    return t / std


# ------------------------------------------------------------------ attention layer
@dataclasses.dataclass(frozen=True, eq=False)
class TorchAttention(Layer):
    r"""PyTorch's ``nn.MultiheadAttention`` self-attention on ``(N, E, L)`` activations.

    ``y = out_proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h)`` with ``q, k, v`` the
    three blocks of ``x in_proj_weight^T + in_proj_bias``. Kernel: ``GlobalSelfAttention(
    E, d, d, H, linear_scaling=False, 'SOFTMAX')`` with the stds below (see the module
    docstring for the limit and the parameterization).

    Args:
        embed_dim, n_heads: ``E`` and ``H``.
        stds: ``(W_query, W_key, W_value, W_out)`` standard deviations (``fan_in Var``).
        b_stds: ``(b_query, b_key, b_value, b_out)`` or ``None`` without biases.
        parameterization: ``'standard'`` (parameters are the module tensors) or ``'ntk'``.
        n_samples: quasi-Monte Carlo points of the softmax expectation.

    Examples:
        >>> from infnets import stax
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = nn.Conv1d(3, 16, 1)
        ...         self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        ...     def forward(self, x):  # x: (N, C, L)
        ...         h = self.emb(x).permute(0, 2, 1)  # (N, L, E)
        ...         return (h + self.attn(h, h, h, need_weights=False)[0]).mean(1)
        >>> model = Block().double().eval()
        >>> x = torch.randn(2, 3, 5, dtype=torch.float64)
        >>> net = stax.from_torch(model, x)
        >>> net.kernel_fn(x, None, 'nngp').shape
        torch.Size([2, 2])
        >>> torch.allclose(net.apply_fn(stax.params_from(net, model), x), model(x))
        True
    """

    embed_dim: int
    n_heads: int
    stds: tuple[float, float, float, float]
    b_stds: tuple[float, float, float, float] | None
    parameterization: str = "standard"
    n_samples: int = 1024

    nonlinear_input = True  # its logits are nonlinear in the input (see from_torch)

    def __repr__(self) -> str:
        return f"TorchAttention({self.embed_dim}, heads={self.n_heads})"

    @property
    def kernel_layer(self) -> GlobalSelfAttention:
        wq, wk, wv, wo = self.stds
        b = None
        if self.b_stds is not None:
            b = math.sqrt(self.b_stds[3] ** 2 + (wo * self.b_stds[2]) ** 2)
        d = self.embed_dim // self.n_heads
        return GlobalSelfAttention(
            self.embed_dim, d, d, self.n_heads, linear_scaling=False, W_key_std=wk,
            W_query_std=wq, W_value_std=wv, W_out_std=wo, b_std=b,
            attention_mechanism="SOFTMAX", n_samples=self.n_samples,
        )  # fmt: skip

    def _scales(self) -> tuple[list[float], list[float]]:
        """Per-block multipliers of the weights and biases in ``apply``."""
        if self.parameterization == "standard":
            return [1.0] * 4, [1.0] * 4
        n = math.sqrt(self.embed_dim)
        return [s / n for s in self.stds], list(self.b_stds or (0.0,) * 4)

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        in_shape = single_shape(in_shape, self)
        e = self.embed_dim
        if len(in_shape) != 3 or in_shape[1] != e:
            raise ValueError(f"{self!r} takes (N, {e}, L) activations, got {tuple(in_shape)}.")
        std = self.parameterization == "standard"
        ws = [s / math.sqrt(e) if std else 1.0 for s in self.stds]
        bs = [s if std else 1.0 for s in (self.b_stds or (0.0,) * 4)]

        def rand(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=dtype, device=device)

        params = {"in_w": torch.cat([rand(e, e) * w for w in ws[:3]]), "out_w": rand(e, e) * ws[3]}
        if self.b_stds is not None:
            params["in_b"] = torch.cat([rand(e) * b for b in bs[:3]])
            params["out_b"] = rand(e) * bs[3]
        return tuple(in_shape), params

    def apply(self, params: Params, x: Any) -> Any:
        e, h = self.embed_dim, self.n_heads
        n, _, length = x.shape
        w, b = self._scales()
        rows = torch.tensor(w[:3], dtype=x.dtype, device=x.device).repeat_interleave(e)
        in_b = None
        if "in_b" in params:
            brow = torch.tensor(b[:3], dtype=x.dtype, device=x.device).repeat_interleave(e)
            in_b = params["in_b"] * brow
        qkv = F.linear(x.transpose(1, 2), params["in_w"] * rows[:, None], in_b)
        q, k, v = (t.reshape(n, length, h, e // h).transpose(1, 2) for t in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // h), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(n, length, e)
        out_b = params["out_b"] * b[3] if "out_b" in params else None
        return F.linear(o, params["out_w"] * w[3], out_b).transpose(1, 2)

    def spatial_requirement(self, out_full: Any) -> Any:
        return True

    def kernel(self, k: Any) -> Any:
        if self.parameterization == "standard" and k.ntk is not None:
            raise FromTorchError(f"from_torch: {self!r}: {_NTK_STANDARD}")
        return self.kernel_layer.kernel(k)

    def read(self, m: nn.MultiheadAttention) -> dict[str, Tensor]:
        """``params`` of module ``m`` in this layer's parameterization."""
        e, ntk = self.embed_dim, self.parameterization == "ntk"
        w = m.in_proj_weight
        out = {
            "in_w": torch.cat(
                [_scaled(w[i * e : (i + 1) * e], s / math.sqrt(e), ntk, "in_proj_weight")
                 for i, s in enumerate(self.stds[:3])]
            ),
            "out_w": _scaled(m.out_proj.weight, self.stds[3] / math.sqrt(e), ntk, "out_proj"),
        }  # fmt: skip
        if self.b_stds is not None:
            b = m.in_proj_bias
            out["in_b"] = torch.cat(
                [_scaled(b[i * e : (i + 1) * e], s, ntk, "in_proj_bias")
                 for i, s in enumerate(self.b_stds[:3])]
            )  # fmt: skip
            out["out_b"] = _scaled(m.out_proj.bias, self.b_stds[3], ntk, "out_proj.bias")
        return out


def _check_mha(op: Op, m: nn.MultiheadAttention, what: str = "") -> None:
    """Refuse configurations without a defined limit (needs no shapes)."""
    if not m._qkv_same_embed_dim or m.kdim != m.embed_dim or m.vdim != m.embed_dim:
        raise op.refuse(f"{what}kdim/vdim different from embed_dim (cross-attention inputs "
                        "of other widths): only self-attention is converted.")  # fmt: skip
    if m.bias_k is not None or m.add_zero_attn:
        raise op.refuse(f"{what}add_bias_kv/add_zero_attn add a learned or zero key/value "
                        "position shared by all examples; its kernel is not modelled.",
                        NotYetSupportedError)  # fmt: skip
    if m.training and m.dropout > 0:
        raise op.refuse(f"{what}attention dropout (p={m.dropout}) in training mode has no "
                        "deterministic kernel here; call model.eval().")  # fmt: skip
    _overridden(op)


def attention_layer(op: Op, m: nn.MultiheadAttention) -> TorchAttention:
    """The :class:`TorchAttention` of module ``m`` (stds per ``op.options.stds``)."""
    e = m.embed_dim
    has_b = m.in_proj_bias is not None
    if op.options.stds == "weights":
        w, b = m.in_proj_weight, m.in_proj_bias
        blocks = [w[i * e : (i + 1) * e] for i in range(3)] + [m.out_proj.weight]
        stds = tuple(math.sqrt(e * _ms(t)) for t in blocks)
        b_stds = None
        if has_b:
            parts = [b[i * e : (i + 1) * e] for i in range(3)] + [m.out_proj.bias]
            b_stds = tuple(math.sqrt(_ms(t)) for t in parts)
            if b_stds[0] > 0:
                raise op.refuse(
                    "a query bias with non-zero variance shifts the logits by a random "
                    "key-dependent term that the kernel does not model (stds='weights').",
                    NotYetSupportedError,
                )
    else:
        stds = (math.sqrt(0.5),) * 3 + (1 / math.sqrt(3),)
        b_stds = (0.0,) * 4 if has_b else None
    return TorchAttention(e, m.num_heads, stds, b_stds, op.options.parameterization)  # type: ignore[arg-type]


@register_converter(nn.MultiheadAttention)
def _mha(op: Op) -> Conversion:
    m = op.target
    _mha_early(op)
    q, k, v = op.arg(0, "query"), op.arg(1, "key"), op.arg(2, "value")
    if not (op.is_tensor(q) and k is q and v is q):
        raise op.refuse(
            "only self-attention attn(x, x, x) is converted: cross-attention (different "
            "key/value tensors) is not a layer of one input here."
        )
    want = (0, 2, 1) if m.batch_first else (2, 0, 1)
    if op.layout(q) != want:
        raise op.refuse(
            f"its input must be the model's sequence in {'NLE' if m.batch_first else 'LNE'} "
            f"order, obtained from infnets' (N, C, L) by x.permute{want} in the model (or "
            "input_layout= for a model whose input is already a sequence)."
        )
    layer = attention_layer(op, m)
    op.node.meta[_TUPLE] = True
    return Conversion(layer, (q,), reader=layer.read, out_layout=want, layout_aware=True)


def _mha_early(op: Op) -> None:
    _check_mha(op, op.target)
    for name, i in (("key_padding_mask", 4), ("attn_mask", 6)):
        if op.arg(i, name) is not None:
            raise op.refuse(f"{name} is not converted (use infnets masks: mask_constant=).",
                            NotYetSupportedError)  # fmt: skip
    if op.arg(8, "is_causal", False):
        raise op.refuse("causal attention is not converted.", NotYetSupportedError)


_mha.early = _mha_early  # type: ignore[attr-defined]


# ------------------------------------------------------------------ encoder layer
@dataclasses.dataclass(frozen=True, eq=False)
class TorchEncoderLayer(Layer):
    r"""PyTorch's ``nn.TransformerEncoderLayer`` (eval mode) on ``(N, E, L)`` activations.

    Post-norm: ``x = LN1(x + SA(x)); x = LN2(x + FF(x))``; pre-norm (``norm_first``):
    ``x = x + SA(LN1(x)); x = x + FF(LN2(x))``, with ``FF = linear2(act(linear1(.)))``.
    Kernel: the same graph of ``TorchAttention``, ``LayerNorm(axis=1)`` with its gain and
    bias (:class:`ChannelAffine`), ``Conv(n, (1,))`` and ``FanInSum``.

    Args:
        attn: the self-attention layer.
        ff_width: ``dim_feedforward``.
        ff_stds: ``(W1, b1, W2, b2)`` of ``linear1``/``linear2`` (biases ``None`` if absent).
        act: ``'relu'`` or ``'gelu'``.
        norm_first: pre-norm.
        eps: LayerNorm's eps.
        norm_bias: whether the LayerNorms have a bias.
    """

    attn: TorchAttention
    ff_width: int
    ff_stds: tuple[float, float | None, float, float | None]
    act: str
    norm_first: bool
    eps: float
    norm_bias: bool

    def __repr__(self) -> str:
        kind = "pre-norm" if self.norm_first else "post-norm"
        return f"TorchEncoderLayer({self.attn.embed_dim}, heads={self.attn.n_heads}, {kind})"

    @property
    def ends_in_gain(self) -> bool:
        return not self.norm_first

    @property
    def net(self) -> Layer:
        """The infnets network of the kernel (the same function as :meth:`apply`)."""
        e, par = self.attn.embed_dim, self.attn.parameterization
        w1, b1, w2, b2 = self.ff_stds
        act = ew_rect.Relu() if self.act == "relu" else ew_smooth.Gelu()
        ff = comb.serial(
            Conv(self.ff_width, (1,), W_std=w1, b_std=b1, parameterization=par),
            act,
            Conv(e, (1,), W_std=w2, b_std=b2, parameterization=par),
        )

        def ln() -> Layer:
            return comb.serial(LayerNorm(axis=1, eps=self.eps), ChannelAffine(1, self.norm_bias))

        def res(branch: Layer) -> list[Layer]:
            return [comb.FanOut(2), comb.parallel(branch, comb.Identity()), comb.FanInSum()]

        if self.norm_first:
            return comb.serial(*res(comb.serial(ln(), self.attn)), *res(comb.serial(ln(), ff)))
        return comb.serial(*res(self.attn), ln(), *res(ff), ln())

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        _, attn = self.attn.init(gen, in_shape, dtype, device)
        e, f, std = self.attn.embed_dim, self.ff_width, self.attn.parameterization == "standard"
        w1, b1, w2, b2 = self.ff_stds
        params: dict[str, Any] = {"attn": attn}
        for name, (n_in, n_out, w, b) in (("linear1", (e, f, w1, b1)), ("linear2", (f, e, w2, b2))):
            p = {"W": torch.randn(n_out, n_in, generator=gen, dtype=dtype, device=device)}
            p["W"] = p["W"] * (w / math.sqrt(n_in) if std else 1.0)
            if b is not None:
                p["b"] = torch.randn(n_out, generator=gen, dtype=dtype, device=device)
                p["b"] = p["b"] * (b if std else 1.0)
            params[name] = p
        for name in ("norm1", "norm2"):
            params[name] = {"g": torch.ones(e, dtype=dtype, device=device)}
            if self.norm_bias:
                params[name]["h"] = torch.zeros(e, dtype=dtype, device=device)
        return tuple(single_shape(in_shape, self)), params

    def apply(self, params: Params, x: Any) -> Any:
        e, std = self.attn.embed_dim, self.attn.parameterization == "standard"
        w1, b1, w2, b2 = self.ff_stds

        def ln(p: dict[str, Tensor], t: Tensor) -> Tensor:
            y = F.layer_norm(t.transpose(1, 2), (e,), p["g"], p.get("h"), self.eps)
            return y.transpose(1, 2)

        def lin(p: dict[str, Tensor], t: Tensor, w: float, b: float | None, n: int) -> Tensor:
            wm = p["W"] * (1.0 if std else w / math.sqrt(n))
            bm = None if "b" not in p else p["b"] * (1.0 if std or b is None else b)
            return F.linear(t.transpose(1, 2), wm, bm).transpose(1, 2)

        def ff(t: Tensor) -> Tensor:
            h = lin(params["linear1"], t, w1, b1, e)
            h = F.relu(h) if self.act == "relu" else F.gelu(h)
            return lin(params["linear2"], h, w2, b2, self.ff_width)

        def sa(t: Tensor) -> Tensor:
            return self.attn.apply(params["attn"], t)

        if self.norm_first:
            x = x + sa(ln(params["norm1"], x))
            return x + ff(ln(params["norm2"], x))
        x = ln(params["norm1"], x + sa(x))
        return ln(params["norm2"], x + ff(x))

    def spatial_requirement(self, out_full: Any) -> Any:
        return self.net.spatial_requirement(out_full)

    def kernel(self, k: Any) -> Any:
        return self.kernel_planned(k, None)

    def kernel_planned(self, k: Any, out_full: Any) -> Any:
        if self.norm_first and k.ntk is not None:
            raise FromTorchError(
                f"from_torch: {self!r}: the NTK of a pre-norm layer (attention applied to the "
                "output of LayerNorm's gain and bias) is not modelled; ask for the NNGP."
            )
        return self.net.kernel_planned(k, out_full)

    def read(self, m: nn.TransformerEncoderLayer) -> dict[str, Any]:
        """``params`` of module ``m`` in this layer's parameterization."""
        ntk = self.attn.parameterization == "ntk"
        w1, b1, w2, b2 = self.ff_stds
        out: dict[str, Any] = {"attn": self.attn.read(m.self_attn)}
        for name, w, b in (("linear1", w1, b1), ("linear2", w2, b2)):
            lin = getattr(m, name)
            p = {"W": _scaled(lin.weight, w / math.sqrt(lin.in_features), ntk, name)}
            if b is not None:
                p["b"] = _scaled(lin.bias, b, ntk, name + ".bias")
            out[name] = p
        for name in ("norm1", "norm2"):
            norm = getattr(m, name)
            out[name] = {"g": norm.weight.detach().clone()}
            if self.norm_bias:
                out[name]["h"] = norm.bias.detach().clone()
        return out


def _check_encoder(op: Op) -> str:
    """Refusals of ``nn.TransformerEncoderLayer`` (needs no shapes); the activation."""
    m = op.target
    _check_mha(op, m.self_attn, "its self_attn: ")
    p = max(m.dropout.p, m.dropout1.p, m.dropout2.p)
    if m.training and p > 0:
        raise op.refuse(f"dropout (p={p}) in training mode has no deterministic kernel here; "
                        "call model.eval().")  # fmt: skip
    if not m.norm1.elementwise_affine or not m.norm2.elementwise_affine:
        raise op.refuse("LayerNorms without elementwise_affine are not converted.",
                        NotYetSupportedError)  # fmt: skip
    kind = {1: "relu", 2: "gelu"}.get(getattr(m, "activation_relu_or_gelu", 0))
    if kind == "gelu" and getattr(m.activation, "approximate", "none") != "none":
        kind = None
    if kind is None:
        raise op.refuse("only activation='relu' or 'gelu' is converted.", NotYetSupportedError)
    return kind


@register_converter(nn.TransformerEncoderLayer)
def _encoder(op: Op) -> Conversion:
    m = op.target
    act = _check_encoder(op)
    x = first_input(op)
    for name, i in (("src_mask", 1), ("src_key_padding_mask", 2)):
        if op.arg(i, name) is not None:
            raise op.refuse(f"{name} is not converted (use infnets masks: mask_constant=).",
                            NotYetSupportedError)  # fmt: skip
    if op.arg(3, "is_causal", False):
        raise op.refuse("causal attention is not converted.", NotYetSupportedError)
    want = (0, 2, 1) if m.self_attn.batch_first else (2, 0, 1)
    if op.layout(x) != want:
        raise op.refuse(
            "its input must be the model's sequence in PyTorch's order, obtained from "
            f"infnets' (N, C, L) by x.permute{want} in the model (or input_layout=)."
        )
    attn = attention_layer(op, m.self_attn)
    stds = op.options.stds
    w1, b1 = _lin_stds(stds, m.linear1)
    w2, b2 = _lin_stds(stds, m.linear2)
    layer = TorchEncoderLayer(
        attn, m.linear1.out_features, (w1, b1, w2, b2), act, bool(m.norm_first),
        float(m.norm1.eps), m.norm1.bias is not None,
    )  # fmt: skip
    return Conversion(layer, (x,), reader=layer.read, out_layout=want, layout_aware=True)


def _encoder_early(op: Op) -> None:
    _check_encoder(op)


_encoder.early = _encoder_early  # type: ignore[attr-defined]


# ------------------------------------------------------------------ sequences in torch order
_PREV = {k: CONVERTERS[k] for k in (operator.getitem, nn.Linear, nn.LayerNorm, "mean", torch.mean)}


@register_converter(operator.getitem)
def _getitem(op: Op) -> Any:
    src = op.args[0]
    if isinstance(src, fx.Node) and src.meta.get(_TUPLE):
        if op.args[1] != 0 and op.node.users:
            raise op.refuse(
                "the attention weights (output 1 of nn.MultiheadAttention) are used; they "
                "have no infinite-width Gaussian limit. Pass need_weights=False."
            )
        return Relayout(src, op.layout(src))
    return _PREV[operator.getitem](op)


@register_converter("permute", torch.permute, "transpose", torch.transpose)
def _permute(op: Op) -> Relayout:
    x = first_input(op)
    cur = op.layout(x)
    if op.target in ("permute", torch.permute):
        dims = op.args[1:] if op.target == "permute" else (op.arg(1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        perm = [int(op.constant(d, "dims")) for d in dims]
        nd = len(perm)
    else:
        nd = len(cur) if cur is not None else len(op.need_shape(x))
        d0, d1 = (int(op.constant(op.arg(i, n), n)) % nd for i, n in ((1, "dim0"), (2, "dim1")))
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    base = cur or tuple(range(nd))
    new = tuple(base[d % nd] for d in perm)
    if new == tuple(range(nd)):
        return Relayout(x, None)
    if nd != 3 or new[0] == 1:
        raise op.refuse(
            f"permuting axes to {new} (from infnets' channels-first order): only rank-3 "
            "sequences (N, L, C) / (L, N, C) / (N, C, L) are converted."
        )
    return Relayout(x, new)


@register_converter(nn.Linear)
def _linear(op: Op) -> Any:
    x = first_input(op)
    lay = op.layout(x)
    if lay is None:
        return _PREV[nn.Linear](op)
    if not _seq(lay):
        raise op.refuse("nn.Linear must act on the channel (last) axis of a sequence.")
    m = op.target
    res = _PREV[nn.Linear](dataclasses.replace(op, shapes={}))  # stds, reader
    w, b = res.layer.W_std, res.layer.b_std
    conv = Conv(m.out_features, (1,), W_std=w, b_std=b, parameterization=res.layer.parameterization)

    def read(mod: nn.Module) -> Any:
        p = dict(res.reader(mod))
        p["W"] = p["W"][..., None]
        return p

    return Conversion(conv, (x,), reader=read, out_layout=lay, layout_aware=True)


@register_converter(nn.LayerNorm)
def _layer_norm(op: Op) -> Any:
    x = first_input(op)
    lay = op.layout(x)
    if lay is None:
        return _PREV[nn.LayerNorm](op)
    m = op.target
    if not _seq(lay) or len(m.normalized_shape) != 1:
        raise op.refuse("nn.LayerNorm must normalise the channel (last) axis of a sequence.")
    if not m.elementwise_affine:
        return Conversion(LayerNorm(axis=1, eps=float(m.eps)), (x,), out_layout=lay,
                          layout_aware=True)  # fmt: skip
    has_bias = m.bias is not None
    layer = comb.serial(LayerNorm(axis=1, eps=float(m.eps)), ChannelAffine(1, has_bias))

    def read(mod: nn.Module) -> Any:
        p = {"g": cast(Tensor, mod.weight).detach().clone()}
        if has_bias:
            p["h"] = cast(Tensor, mod.bias).detach().clone()
        return ((), p)

    return Conversion(layer, (x,), reader=read, out_layout=lay, layout_aware=True)


@register_converter("mean", torch.mean)
def _mean(op: Op) -> Any:
    x = first_input(op)
    lay = op.layout(x)
    if lay is None:
        return _PREV[op.target](op)
    dims = op.constant(op.arg(1, "dim"), "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keep = op.constant(op.arg(2, "keepdim", False), "keepdim")
    if [lay[d % 3] for d in dims] != [2] or keep or op.kwargs.get("dtype") is not None:
        raise op.refuse(
            f"mean over dims {dims} of a sequence: only the mean over the positions "
            "(keepdim=False) is converted (global average pooling)."
        )
    out = None if lay.index(0) < lay.index(1) else (1, 0)
    return Conversion(GlobalAvgPool(), (x,), out_layout=out, layout_aware=True)
