"""Structured and Jacobian-contraction features of the empirical NTK, and their contraction.

Per-example Jacobians ``J (N, O, P)`` by ``vmap(jacrev)`` (JC), or, for layers ``y = W u + b``
(``nn.Linear``; ``nn.ConvNd`` as a matrix product over patches), only the layer inputs ``u`` and
output cotangents ``g``, contracted by the Kronecker identity
``<d f_o(x1)/dW, d f_o'(x2)/dW> = sum_{p, q} (u1_p . u2_q) (g1_p . g2_q)`` in the cheaper of the
Gram or materialized forms (Novak, Sohl-Dickstein & Schoenholz 2022, "Fast Finite Width Neural
Tangent Kernel", Sec. 3-4). The driver is :mod:`infnets._src.empirical.ntk`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacrev, vmap
from torch.utils.flop_counter import FlopCounterMode

from infnets._src.empirical.axes import OutputAxes
from infnets._src.empirical.chain import Factored
from infnets._src.empirical.model import Bound, LayerRule, LayerTap, Model, wrap_model_error


# ---------------------------------------------------------------------------------- probing
@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A structured layer as a matrix product: ``P`` positions, ``G`` groups of
    ``(D_out, D_in)`` blocks; ``delta_shape`` is its per-example output shape."""

    rule: LayerRule
    delta_shape: tuple[int, ...]
    dtype: torch.dtype
    P: int
    G: int
    d_in: int
    d_out: int


@dataclasses.dataclass(frozen=True)
class Probe:
    """What one forward pass on one example tells: output shape/dtype, layers, FLOPs."""

    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    layers: dict[str, LayerShape]
    flops: float


def _layer_shape(rule: LayerRule, shape: tuple[int, ...], dtype: torch.dtype) -> LayerShape:
    if rule.conv_dims == 0:
        lin = rule.linear
        return LayerShape(
            rule, shape, dtype, math.prod(shape[:-1]), 1, lin.in_features, lin.out_features
        )
    m = rule.conv
    d = rule.conv_dims
    batch = shape[0] if len(shape) == d + 2 else 1
    groups = m.groups
    return LayerShape(
        rule,
        shape,
        dtype,
        batch * math.prod(shape[-d:]),
        groups,
        m.in_channels // groups * math.prod(m.kernel_size),
        m.out_channels // groups,
    )


def probe(
    model: Model, bound: Bound, rules: dict[str, LayerRule], x: Tensor, flops: bool, who: str
) -> Probe:
    """Run the model on ``x[:1]``; find structured layers called exactly once."""
    tap = LayerTap(rules)
    try:
        with torch.no_grad(), tap.probing():
            if flops:
                with FlopCounterMode(display=False) as counter:
                    out = bound.call(bound.values, x[:1])
                total = float(counter.get_total_flops())
            else:
                out, total = bound.call(bound.values, x[:1]), 0.0
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise wrap_model_error(who, err) from err
    if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{who}: the model must return one tensor with the batch axis first; on a batch of "
            f"1 example it returned {shape}."
        )
    layers = {
        name: _layer_shape(rules[name], *tap.out_shapes[name])
        for name, count in tap.calls.items()
        if count == 1
    }
    return Probe(tuple(out.shape[1:]), out.dtype, layers, total)


# ------------------------------------------------------------------- JC / structured
@dataclasses.dataclass(frozen=True)
class Features:
    """Per-example quantities of one batch for JC/structured contraction.

    Attributes:
        jac: ``name -> (n, *S, D)`` flattened Jacobians of fallback parameters.
        layers: ``layer -> (shape, u, g)``: the layer's :class:`LayerShape`, its per-example
            inputs ``u (n, *in_shape)`` and output cotangents ``g (n, *S, *out_shape)``, as
            the forward pass saw them (reshaped only when contracted, one layer at a time),
            or a :class:`~infnets._src.empirical.chain.Factored` ``g`` (chains only).
        n: number of examples.
        out_size: ``prod(S)``.
    """

    jac: dict[str, Tensor]
    layers: dict[str, tuple[LayerShape, Tensor, Tensor | Factored]]
    n: int
    out_shape: tuple[int, ...]

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)


def _patches(ls: LayerShape, inp: Tensor) -> Tensor:
    """Layer inputs as ``(n, P, G, D_in)`` patches (the rows multiplied by ``W``)."""
    n = inp.shape[0]
    if ls.rule.conv_dims == 0:
        return inp.reshape(n, -1, 1, ls.d_in)
    m = ls.rule.conv
    d = ls.rule.conv_dims
    xx = inp.reshape((-1,) + tuple(inp.shape[-d - 1 :]))
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    pads = list(m._reversed_padding_repeated_twice)
    if any(pads):
        xx = F.pad(xx, pads, mode=mode)
    for i in range(d):
        span = m.dilation[i] * (m.kernel_size[i] - 1) + 1
        xx = xx.unfold(2 + i, span, m.stride[i])
    if any(dl > 1 for dl in m.dilation):
        xx = xx[(Ellipsis,) + tuple(slice(None, None, dl) for dl in m.dilation)]
    perm = (0,) + tuple(range(2, 2 + d)) + (1,) + tuple(range(2 + d, 2 + 2 * d))
    return xx.permute(perm).reshape(n, ls.P, ls.G, ls.d_in)


def _cotangents(ls: LayerShape, g: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """Output cotangents ``(n, *S, *delta_shape)`` as ``(n, *S, P, G, D_out)``."""
    n = g.shape[0]
    if ls.rule.conv_dims:
        d = ls.rule.conv_dims
        c_out = ls.G * ls.d_out
        g = g.reshape((n,) + out_shape + (-1, c_out, math.prod(ls.delta_shape[-d:])))
        g = g.transpose(-1, -2)
    return g.reshape((n,) + out_shape + (ls.P, ls.G, ls.d_out))


def features(
    bound: Bound, probe_: Probe, layers: dict[str, LayerShape], x: Tensor, who: str
) -> Features:
    """Fallback Jacobians and structured-layer inputs/cotangents of the batch ``x``."""
    struct = {p for ls in layers.values() for p in ls.rule.param_names}
    fb = {n: v for n, v in bound.values.items() if n not in struct}
    const = {n: v for n, v in bound.values.items() if n in struct}
    deltas = {
        name: torch.zeros(ls.delta_shape, dtype=ls.dtype, device=x.device)
        for name, ls in layers.items()
    }
    tap = LayerTap({name: ls.rule for name, ls in layers.items()})

    def single(
        dl: dict[str, Tensor], fbv: dict[str, Tensor], xn: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with tap.injecting(dl):
            out = bound.call({**const, **fbv}, xn.unsqueeze(0))
            seen = dict(tap.inputs)
        return out.squeeze(0), seen

    argnums = (0, 1) if deltas and fb else ((0,) if deltas else (1,))
    try:
        jacs, seen = vmap(jacrev(single, argnums=argnums, has_aux=True), in_dims=(None, None, 0))(
            deltas, fb, x
        )
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise wrap_model_error(who, err) from err
    jd = jacs[0] if deltas else {}
    jp = jacs[-1] if fb else {}
    n, s = x.shape[0], probe_.out_shape
    jac = {name: jp[name].reshape((n,) + s + (-1,)) for name in fb}
    feats = {name: (ls, seen[name], jd[name]) for name, ls in layers.items()}
    return Features(jac, feats, n, s)


def _contract_jac(j1: Tensor, j2: Tensor, ax: OutputAxes) -> Tensor:
    """``sum_z j1[a1, z] j2[a2, z]`` for ``j (n, *S, z)``, reduced as ``ax`` says."""
    if (
        j1.ndim == 3
        and not ax.batch_diag
        and ax.a1[1] == ax.a2[1]
        and ax.out == ax.pair_letters
        and j1.transpose(0, 1).is_contiguous()
        and j2.transpose(0, 1).is_contiguous()
    ):
        # One traced output axis stored unit-major (output chunks): one matrix product per
        # unit, summed -- einsum would first copy both operands to example-major order.
        a, b = j1.transpose(0, 1), j2.transpose(0, 1)
        return torch.bmm(a, b.transpose(1, 2)).sum(0)
    return torch.einsum(f"{ax.a1}z,{ax.a2}z->{ax.out}", j1, j2)


def _bias_jacobian(ls: LayerShape, raw: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """``d f / d b``: output cotangents summed over positions, ``(n, *S, G D_out)``.

    Reduces the cotangents in the layout the backward pass made them (contiguous positions
    for convolutions), not through the strided ``(.., P, G, D_out)`` view.
    """
    n, c_out = raw.shape[0], ls.G * ls.d_out
    if ls.rule.conv_dims:
        d = ls.rule.conv_dims
        g = raw.reshape((n,) + out_shape + (-1, c_out, math.prod(raw.shape[-d:])))
        return g.sum((-3, -1))
    return raw.reshape((n,) + out_shape + (-1, c_out)).sum(-2)


def _layer_weight_jacobian(
    ls: LayerShape, inp: Tensor, raw: Tensor, g: Tensor, out_shape: tuple[int, ...]
) -> Tensor:
    """Per-example weight Jacobians ``(n, *S, D)`` of a structured layer."""
    if ls.rule.conv_dims:
        return _conv_weight_jacobian(ls, inp, raw, out_shape)
    return _weight_jacobian(_patches(ls, inp), g)


def _weight_jacobian(u: Tensor, g: Tensor) -> Tensor:
    """Per-example weight Jacobian ``sum_p g_p u_p^T`` flattened: ``(n, *S, G D_out D_in)``."""
    n, lead = g.shape[0], g.shape[:-3]
    gg = g.reshape(n, -1, *g.shape[-3:])
    return torch.einsum("nspgo,npgi->nsgoi", gg, u).reshape(lead + (-1,))


def _conv_weight_jacobian(ls: LayerShape, inp: Tensor, g: Tensor, out_shape: tuple[int, ...]):
    """Per-example weight Jacobians of a convolution, ``(n, *S, G D_out D_in)``.

    One weight-gradient convolution per example (``groups = G``) whose "output channels" are
    the example's ``O x C_out`` cotangent maps: ``sum_p g_p u_p^T`` for all its output units
    at once, without unfolding the input into patches. (A single grouped call over all
    examples, ``groups = n G``, runs the same products but then concatenates its groups and
    copies the result once more: ~7% slower.)
    """
    m = ls.rule.conv
    d = ls.rule.conv_dims
    n, o = inp.shape[0], math.prod(out_shape)
    x = inp if inp.ndim == d + 3 else inp.unsqueeze(1)  # (n, B, C_in, *spatial)
    b = x.shape[1]
    pads = list(m._reversed_padding_repeated_twice)
    if any(pads):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x.flatten(0, 1), pads, mode=mode)
        x = x.reshape((n, b) + tuple(x.shape[1:]))
    spatial = tuple(g.shape[-d:])
    gg = g.reshape((n, o, b, ls.G, ls.d_out) + spatial)
    gg = gg.permute((0, 2, 3, 1, 4) + tuple(range(5, 5 + d)))  # (n, B, G, O, D_out, ...)
    c_in = m.in_channels // ls.G
    weight = x.new_zeros(()).expand((ls.G * o * ls.d_out, c_in) + tuple(m.kernel_size))
    per_example = []
    for i in range(n):
        _, gw, _ = torch.ops.aten.convolution_backward(
            gg[i].reshape((b, -1) + spatial),
            x[i],
            weight,
            None,
            list(m.stride),
            [0] * d,
            list(m.dilation),
            False,
            [0] * d,
            ls.G,
            [False, True, False],
        )
        per_example.append(gw.reshape(ls.G, o, -1).transpose(0, 1).reshape(o, -1))
    return torch.stack(per_example).reshape((n,) + out_shape + (-1,))


def _gram(u1: Tensor, g1: Tensor, u2: Tensor, g2: Tensor, ax: OutputAxes) -> Tensor:
    """``sum_{p,q} (u1_p . u2_q)(g1_p . g2_q)`` without forming the weight Jacobian.

    (Layers with one position and one group take a shortcut in :func:`contract`.)
    """
    nm = ax.pair_letters
    n, m = ax.a1[0], ax.a2[0]
    kx = torch.einsum(f"{n}pgi,{m}qgi->{nm}pqg", u1, u2)
    kg = torch.einsum(f"{ax.a1}pgo,{ax.a2}qgo->{ax.out}pqg", g1, g2)
    return torch.einsum(f"{ax.out}pqg,{nm}pqg->{ax.out}", kg, kx)


def _factored_terms(ls: LayerShape, inp: Tensor, fac: Factored) -> tuple[Tensor, Tensor]:
    """``(A (n, K, D), s (n, K))``: the weight gradient ``A_i = sum_p h_i[:, p] u_{i,p}^T`` of
    the example factor of a :class:`Factored` convolution cotangent, and ``h_i`` summed over
    positions (the bias gradient); ``K`` output channels, ``D`` weights per channel."""
    n, k = fac.n, ls.G * ls.d_out
    h = fac.h if fac.h is not None else fac.e.new_ones(())
    h = h.expand((n,) + fac.shape)
    a = _conv_weight_jacobian(ls, inp, h.reshape((n, 1) + ls.delta_shape), (1,))
    return a.reshape(n, k, -1), h.reshape(n, k, -1).sum(-1)


def _contract_factored(
    side1: tuple[LayerShape, Tensor, Factored],
    side2: tuple[LayerShape, Tensor, Factored],
    f1: Features,
    f2: Features,
    ax: OutputAxes,
    same: bool,
) -> dict[str, Tensor]:
    """Weight and bias blocks of a convolution whose cotangents are :class:`Factored`.

    With ``g[i, u, k, p] = e[u, k] h_i[k, p]`` the weight Jacobian of unit ``u`` is
    ``e[u, k] A_i[k]`` (:func:`_factored_terms`), so

        K[i, u, j, u'] = sum_k e[u, k] e[u', k] <A_i[k], A_j[k]>

    (and the same with the position sums of ``h`` for the bias): a per-channel Gram matrix
    of the examples, then one contraction with the unit factors.
    """
    (ls, in1, r1), (ls2, in2, r2) = side1, side2
    rule = ls.rule
    k = ls.G * ls.d_out
    a1, s1 = _factored_terms(ls, in1, r1)
    a2, s2 = (a1, s1) if same else _factored_terms(ls2, in2, r2)
    e1 = r1.e.reshape(f1.out_shape + (k,))
    e2 = r2.e.reshape(f2.out_shape + (k,))
    i, j = ax.a1[0], ax.a2[0]
    pair = i if ax.batch_diag else i + j
    mix = f"{pair}k,{ax.a1[1:]}k,{ax.a2[1:]}k->{ax.out}"
    out = {}
    if rule.weight is not None:
        kk = torch.einsum(f"{i}kd,{j}kd->{pair}k", a1, a2)
        out[rule.weight] = torch.einsum(mix, kk, e1, e2)
    if rule.bias is not None:
        kk = torch.einsum(f"{i}k,{j}k->{pair}k", s1, s2)
        out[rule.bias] = torch.einsum(mix, kk, e1, e2)
    return out


def layer_costs(
    ls: LayerShape, p1: int, p2: int, rows1: int, rows2: int, b: int, ax: OutputAxes
) -> tuple[float, float]:
    """``(gram, materialized)`` FLOP estimates of one structured layer's weight term.

    Args:
        ls: the layer (groups and block sizes).
        p1, p2: positions per example on each side.
        rows1, rows2: ``examples * output units`` on each side (``rows2 = 0`` when shared).
        b: example pairs.
        ax: the output axes (``work_pairs``).
    """
    w, pp, g = ax.work_pairs, p1 * p2, ls.G
    gram = 2.0 * b * pp * g * (ls.d_in + w * ls.d_out) + b * w * pp * g
    mat = 2.0 * (rows1 * p1 + rows2 * p2) * g * ls.d_in * ls.d_out
    return gram, mat + 2.0 * b * w * g * ls.d_in * ls.d_out


def contract(f1: Features, f2: Features, ax: OutputAxes, same: bool) -> dict[str, Tensor]:
    """Per-parameter kernel blocks between two feature sets."""
    out = {name: _contract_jac(j1, f2.jac[name], ax) for name, j1 in f1.jac.items()}
    for name, (ls, in1, r1) in f1.layers.items():
        ls2, in2, r2 = f2.layers[name]
        rule = ls.rule
        if isinstance(r1, Factored):
            # both sides run the same chain steps, so they factor the same layers
            assert isinstance(r2, Factored)
            out.update(_contract_factored((ls, in1, r1), (ls2, in2, r2), f1, f2, ax, same))
            continue
        assert not isinstance(r2, Factored)
        g1 = _cotangents(ls, r1, f1.out_shape)
        g2 = g1 if same else _cotangents(ls2, r2, f2.out_shape)
        if ls.P == ls2.P == 1 and ls.G == 1:
            # y = W u + b on one position: the bias block is the cotangent Gram
            # kg = g1 . g2 (summed over traced units) and the weight block is kg * (u1 . u2).
            kg = _contract_jac(g1[..., 0, 0, :], g2[..., 0, 0, :], ax)
            if rule.weight is not None:
                ua = in1.reshape(in1.shape[0], ls.d_in)
                ub = ua if same else in2.reshape(in2.shape[0], ls2.d_in)
                kx = (ua * ub).sum(-1) if ax.batch_diag else ua @ ub.T
                out[rule.weight] = kg * kx.reshape(kx.shape + (1,) * (kg.ndim - kx.ndim))
            if rule.bias is not None:
                out[rule.bias] = kg
            continue
        if rule.weight is not None:
            b = f1.n if ax.batch_diag else f1.n * f2.n
            rows2 = 0 if same else f2.n * f2.out_size
            gram, mat = layer_costs(ls, ls.P, ls2.P, f1.n * f1.out_size, rows2, b, ax)
            if gram <= mat:
                u1 = _patches(ls, in1)
                u2 = u1 if same else _patches(ls2, in2)
                out[rule.weight] = _gram(u1, g1, u2, g2, ax)
                del u1, u2
            else:
                jw1 = _layer_weight_jacobian(ls, in1, r1, g1, f1.out_shape)
                jw2 = jw1 if same else _layer_weight_jacobian(ls2, in2, r2, g2, f2.out_shape)
                out[rule.weight] = _contract_jac(jw1, jw2, ax)
                del jw1, jw2
        if rule.bias is not None:
            jb1 = _bias_jacobian(ls, r1, f1.out_shape)
            jb2 = jb1 if same else _bias_jacobian(ls2, r2, f2.out_shape)
            out[rule.bias] = _contract_jac(jb1, jb2, ax)
    return out
