"""Three exact algorithms for the empirical NTK, a cost model to pick one, and blocking.

Notation: ``N1, N2`` examples, ``O`` output units per example, ``P`` trainable scalars,
``F`` the FLOPs of one forward pass on one example (measured once per input shape with
``torch.utils.flop_counter``), ``w`` the output-unit pairs kept per pair of examples
(``O`` when the logit axis is traced, ``O^2`` when it is not).

* ``'jacobian_contraction'`` (JC): per-example Jacobians ``J (N, O, P)`` by ``vmap(jacrev)``,
  then ``K = J1 J2^T``. Cost ``~ (N1 + N2) O 2F + 2 N1 N2 w P``, memory ``N O P``.
* ``'ntk_vector_products'`` (NTVP): for each example of ``x2`` and each output unit, one
  vector-Jacobian product gives ``J2^T e``, one Jacobian-vector product on all of ``x1`` gives
  the NTK column ``J1 J2^T e``. Cost ``~ N2 O (2F + 2 N1 F)``, memory ``O P`` per example.
* ``'structured'``: for layers ``y = W u + b`` (``nn.Linear``; ``nn.ConvNd`` seen as a
  matrix product over image patches ``u_p``), ``dy_p / dW`` is a Kronecker product, so with
  ``g_p = d f_o / d y_p`` (the output cotangent at position ``p``)

      <d f_o(x1)/dW, d f_o'(x2)/dW> = sum_{p, q} (u1_p . u2_q) (g1_p . g2_q),
      <d f_o(x1)/db, d f_o'(x2)/db> = (sum_p g1_p) . (sum_q g2_q)

  (Novak, Sohl-Dickstein & Schoenholz 2022, "Fast Finite Width Neural Tangent Kernel",
  Sec. 3-4). Only the inputs ``u`` (read with forward hooks) and the cotangents ``g`` (one
  ``vmap(jacrev)`` w.r.t. zero perturbations added to the layer outputs: no weight
  gradients) are formed. Per layer the cheaper of two exact contractions is used: the *Gram*
  form above (``~ 2 N1 N2 P_pos^2 (D_in + w D_out)``) or the *materialized* per-example
  weight Jacobian ``sum_p g_p u_p^T`` (``~ 2 N O P_pos D_in D_out + 2 N1 N2 w D_in D_out``).
  Parameters of other layers (norms, custom modules, shared weights) fall back to JC, in the
  same backward pass.

``'auto'`` evaluates the three cost formulas for the actual shapes and picks the cheapest
(ties go to ``'structured'``, which equals JC when a model has no structured layers).

*Chains* (structured, speed and memory): when the module is an ``nn.Sequential`` of
per-example layers, :mod:`infnets._src.empirical.chain` makes the same cotangents with a
backward pass written out layer by layer (:class:`ChainCotangents`); :func:`contract_stream`
contracts each layer as soon as its cotangents exist, and a convolution behind global
average pooling and a linear head is contracted in factored form
(:func:`_contract_factored`).

*Output chunks* (structured, memory): the cotangents ``g`` of every structured layer for all
``O`` output units are ``N O sum_l |y_l|`` numbers (30 MiB for an MLP 3 x 2048 with N = 64,
O = 10 in float64), and the backward pass that makes them holds a few more of that size.
When every output axis is traced or diagonal, the kernel is a sum (or a stack) of per-unit
terms, so the units can be processed in chunks: :class:`CotangentChunks` runs the forward
pass once (vmapped over examples, then ``torch.func.vjp``) and one vmapped backward pass per
chunk, and :func:`contract_chunked` contracts each chunk before the next is made. This is
used when all trainable parameters belong to dense-like structured layers (``nn.Linear``:
nothing is recomputed per chunk) and the cotangents exceed :data:`OUTPUT_CHUNK_BYTES`;
chunks keep at least :data:`OUTPUT_CHUNK_MIN_ROWS` rows (examples x units) per backward
matrix product, so they cost little speed (:func:`output_chunks`; on the MLP above, 3 chunks
of 192-256 rows take ~5% more CPU time than one chunk and a third of its memory).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap
from torch.utils.flop_counter import FlopCounterMode

from infnets._src.core import inputs as _inputs
from infnets._src.empirical.axes import OutputAxes, check_axes_arg, make_axes
from infnets._src.empirical.chain import ChainSide, Factored, NotAChain, Step, chain_of
from infnets._src.empirical.model import Bound, LayerRule, LayerTap, Model, wrap_model_error

IMPLEMENTATIONS = ("auto", "jacobian_contraction", "ntk_vector_products", "structured")
#: NTVP evaluates this many (example, output unit) columns at once, at most, per parameter
NTVP_BUDGET = 2**26
#: structured path: split the output units into chunks whose cotangents take at most this
#: many bytes (both sides of a kernel block together), see :func:`output_chunks`
OUTPUT_CHUNK_BYTES = 2**23
#: ... but never below this many rows (examples x output units) per backward pass, where
#: dense matrix products lose efficiency
OUTPUT_CHUNK_MIN_ROWS = 192
#: structured path: use the hand-written backward pass of :mod:`empirical_chain` for models
#: that are chains of per-example layers (``False``: always ``vmap(jacrev)``)
CHAIN = True
#: chains: bytes of cotangents one layer of the backward pass may hold (see
#: :func:`output_chunks`)
CHAIN_CHUNK_BYTES = 2**30


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
    m = rule.module
    if rule.conv_dims == 0:
        return LayerShape(
            rule, shape, dtype, math.prod(shape[:-1]), 1, m.in_features, m.out_features
        )
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
    layers: dict[str, tuple[LayerShape, Tensor, Tensor]]
    n: int
    out_shape: tuple[int, ...]

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)


def _patches(ls: LayerShape, inp: Tensor) -> Tensor:
    """Layer inputs as ``(n, P, G, D_in)`` patches (the rows multiplied by ``W``)."""
    n = inp.shape[0]
    m = ls.rule.module
    if ls.rule.conv_dims == 0:
        return inp.reshape(n, -1, 1, ls.d_in)
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

    def single(dl: dict[str, Tensor], fbv: dict[str, Tensor], xn: Tensor):  # type: ignore[no-untyped-def]
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
    m = ls.rule.module
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
            out.update(_contract_factored((ls, in1, r1), (ls2, in2, r2), f1, f2, ax, same))
            continue
        g1 = _cotangents(ls, r1, f1.out_shape)
        g2 = g1 if same else _cotangents(ls2, r2, f2.out_shape)
        if ls.P == ls2.P == 1 and ls.G == 1:
            # y = W u + b on one position: the bias block is the cotangent Gram
            # kg = g1 . g2 (summed over traced units) and the weight block is kg * (u1 . u2).
            kg = _contract_jac(g1[..., 0, 0, :], g2[..., 0, 0, :], ax)
            if rule.weight is not None:
                a = in1.reshape(in1.shape[0], ls.d_in)
                b = a if same else in2.reshape(in2.shape[0], ls2.d_in)
                kx = (a * b).sum(-1) if ax.batch_diag else a @ b.T
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


# ------------------------------------------------------------------------ output chunks
def output_chunks(
    layers1: dict[str, LayerShape],
    layers2: dict[str, LayerShape],
    n1: int,
    n2: int,
    out_size: int,
    same: bool,
    ax: OutputAxes,
    chain: bool = False,
) -> int:
    """Number of output-unit chunks for one kernel block of the structured path (1: none).

    Chains (``chain=True``): the backward pass of a chain holds the cotangents of one layer
    and of the layer being made from them, on both sides in lockstep, about
    ``2 (n1 + n2) O |y_l|`` numbers for the largest layer output ``y_l``; chunks keep that
    under :data:`CHAIN_CHUNK_BYTES` (e.g. a CNN with 1000 logits). They cost no extra
    products, the backward pass being linear in the units (only Gram-form layers redo their
    patch products per chunk).

    Otherwise chunks are used only where they cost little: every output axis traced or diagonal (the
    kernel is a sum or a stack of per-unit terms), every layer dense-like (``nn.Linear`` on
    one position, or on several through its materialized weight Jacobian; convolutions and
    Gram-form layers would redo their patch products per chunk), cotangents of more than
    :data:`OUTPUT_CHUNK_BYTES`, and at least :data:`OUTPUT_CHUNK_MIN_ROWS` rows
    (``examples x units``) per chunk (the larger side's examples). Chunks are balanced
    (:func:`contract_chunked`), so each holds at least ``O // n_chunks`` units.

    Args:
        layers1, layers2: the structured layers as seen on each side.
        n1, n2: examples per block on each side.
        out_size: output units per example ``O``.
        same: whether both sides are the same block (its cotangents are made once).
        ax: the block's output axes.
        chain: whether the chain policy applies.
    """
    if out_size <= 1 or ax.work_pairs != out_size or not layers1:
        return 1
    if chain:
        per_layer = max(
            (
                n1 * math.prod(ls.delta_shape)
                + (0 if same else n2 * math.prod(layers2[k].delta_shape))
            )
            * ls.dtype.itemsize
            for k, ls in layers1.items()
        )
        return max(1, min(out_size, -(-2 * out_size * per_layer // CHAIN_CHUNK_BYTES)))
    b = n1 if ax.batch_diag else n1 * n2
    per_unit = 0
    for name, ls in layers1.items():
        ls2 = layers2[name]
        if ls.rule.conv_dims:
            return 1
        if ls.P * ls2.P != 1:
            rows2 = 0 if same else n2 * out_size
            gram, mat = layer_costs(ls, ls.P, ls2.P, n1 * out_size, rows2, b, ax)
            if gram <= mat:
                return 1
        per_unit += n1 * math.prod(ls.delta_shape) * ls.dtype.itemsize
        if not same:
            per_unit += n2 * math.prod(ls2.delta_shape) * ls2.dtype.itemsize
    wanted = -(-out_size * per_unit // OUTPUT_CHUNK_BYTES)  # ceil
    smallest = -(-OUTPUT_CHUNK_MIN_ROWS // max(n1, n2))  # units per chunk, at least
    return max(1, min(wanted, out_size // smallest))


class CotangentChunks:
    """Inputs and output cotangents of the structured layers of one batch, unit chunk by chunk.

    The forward pass runs once (vmapped over examples, so each example is evaluated alone as
    in :func:`features`) under ``torch.func.vjp`` with respect to zero perturbations of the
    layer outputs; :meth:`chunk` runs the backward pass for output units ``[start, stop)``
    only (vmapped over those units). Only valid when every trainable parameter belongs to a
    structured layer (there is no per-example Jacobian to collect).
    """

    def __init__(
        self, bound: Bound, probe_: Probe, layers: dict[str, LayerShape], x: Tensor, who: str
    ) -> None:
        self.layers = layers
        self.who = who
        self.n = x.shape[0]
        self.out_shape = probe_.out_shape
        self.out_size = math.prod(probe_.out_shape)
        self.dtype, self.device = probe_.out_dtype, x.device
        tap = LayerTap({name: ls.rule for name, ls in layers.items()})
        deltas = {  # zero perturbations, one per example (stride 0: no memory)
            name: torch.zeros((), dtype=ls.dtype, device=x.device).expand(
                (self.n,) + ls.delta_shape
            )
            for name, ls in layers.items()
        }

        def single(dl: dict[str, Tensor], xn: Tensor):  # type: ignore[no-untyped-def]
            with tap.injecting(dl):
                out = bound.call(bound.values, xn.unsqueeze(0))
                seen = dict(tap.inputs)
            return out.squeeze(0), seen

        def batch(dl: dict[str, Tensor]):  # type: ignore[no-untyped-def]
            return vmap(single)(dl, x)

        try:
            _, self._pullback, self.inputs = vjp(batch, deltas, has_aux=True)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise wrap_model_error(who, err) from err

    def chunk(self, start: int, stop: int) -> Features:
        """Features of output units ``[start, stop)`` (flattened), as ``out_shape (c,)``.

        The cotangents are ``(n, c, *delta_shape)`` views of unit-major tensors.
        """
        c, o = stop - start, self.out_size
        cot = torch.zeros((c, self.n, o), dtype=self.dtype, device=self.device)
        units = torch.arange(c, device=self.device)
        cot[units, :, start + units] = 1
        try:
            (grads,) = vmap(self._pullback)(cot.reshape((c, self.n) + self.out_shape))
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise wrap_model_error(self.who, err) from err
        layers = {
            name: (ls, self.inputs[name], grads[name].transpose(0, 1))
            for name, ls in self.layers.items()
        }
        return Features({}, layers, self.n, (c,))


def contract_chunked(
    s1: CotangentChunks | ChainCotangents,
    s2: CotangentChunks | ChainCotangents,
    ax: OutputAxes,
    same: bool,
    n_chunks: int,
) -> dict[str, Tensor]:
    """Per-parameter kernel blocks, contracting ``n_chunks`` chunks of output units in turn.

    Traced units are summed chunk by chunk; with diagonal output axes each chunk fills its
    units of a ``(pairs, O)`` block, reduced to ``ax.out`` at the end. Requires every output
    axis of ``ax`` to be traced or diagonal.
    """
    o, n1, n2 = s1.out_size, s1.n, s2.n
    keep = ax.out != ax.pair_letters  # diagonal output axes
    trace = () if keep else (1,)
    diag = ((0,) if ax.batch_diag else ()) + ((1,) if keep else ())
    edges = [round(i * o / n_chunks) for i in range(n_chunks + 1)]
    out: dict[str, Tensor] = {}
    for start, stop in zip(edges, edges[1:]):
        sub = make_axes((n1, stop - start), (n2, stop - start), trace, diag, s1.who)
        for f1, f2 in _chunk_pairs(s1, s2, start, stop, same):
            part = contract(f1, f2, sub, same)
            del f1, f2
            for name, v in part.items():
                if keep:
                    if name not in out:
                        out[name] = v.new_zeros(v.shape[:-1] + (o,))
                    out[name][..., start:stop] += v
                else:
                    out[name] = out[name] + v if name in out else v
    if keep:
        letters = ax.pair_letters + ax.a1[1:]
        for name, v in out.items():
            full = v.reshape(v.shape[:-1] + s1.out_shape)
            out[name] = torch.einsum(f"{letters}->{ax.out}", full)
    return out


def _chunk_pairs(
    s1: CotangentChunks | ChainCotangents,
    s2: CotangentChunks | ChainCotangents,
    start: int,
    stop: int | None,
    same: bool,
) -> Iterator[tuple[Features, Features]]:
    """The features of output units ``[start, stop)`` on both sides (``stop=None``: each
    side's units, in its own output shape; chains only): all layers at once, or for chains
    one layer at a time (both backward passes in lockstep)."""
    if isinstance(s1, ChainCotangents) and isinstance(s2, ChainCotangents):
        other = None if same else s2.stream(start, stop)
        for f1 in s1.stream(start, stop):
            yield f1, f1 if other is None else next(other)
        return
    assert stop is not None
    f1 = s1.chunk(start, stop)
    yield f1, f1 if same else s2.chunk(start, stop)


# ------------------------------------------------------------------------------- chains
class ChainCotangents:
    """:class:`CotangentChunks`' interface for a chain of per-example layers.

    The forward pass runs once (:class:`~infnets._src.empirical.chain.ChainSide`); each
    :meth:`stream` runs the hand-written backward pass (for all output units or a chunk).
    """

    def __init__(
        self, steps: list[Step], probe_: Probe, layers: dict[str, LayerShape], x: Tensor, who: str
    ) -> None:
        self.side = ChainSide(steps, x, probe_.out_shape)
        self.layers = layers
        self.who = who
        self.n = x.shape[0]
        self.out_shape = probe_.out_shape
        self.out_size = math.prod(probe_.out_shape)

    def _entry(self, name: str, g: Tensor | Factored, out_shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
        ls = self.layers[name]
        if isinstance(g, Factored):
            return ls, self.side.inputs(name), g
        return ls, self.side.inputs(name), g.reshape((self.n,) + out_shape + ls.delta_shape)

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[Features]:
        """One structured layer's features at a time, last layer first: all output units
        (``out_shape`` as the model's), or units ``[start, stop)`` (``out_shape (c,)``)."""
        whole = start == 0 and stop in (None, self.out_size)
        shape = self.out_shape if whole else (stop - start,)  # type: ignore[operator]
        for name, g in self.side.backward(start, stop):
            yield Features({}, {name: self._entry(name, g, shape)}, self.n, shape)


def contract_stream(
    s1: ChainCotangents, s2: ChainCotangents, ax: OutputAxes, same: bool
) -> dict[str, Tensor]:
    """Per-parameter kernel blocks, contracting each layer as the backward pass reaches it
    (both sides in lockstep), so that one layer's cotangents are alive at a time."""
    out: dict[str, Tensor] = {}
    for f1, f2 in _chunk_pairs(s1, s2, 0, None, same):
        out.update(contract(f1, f2, ax, same))
    return out


# ------------------------------------------------------------------------------- NTVP
def ntvp(
    bound: Bound,
    x1: Tensor,
    x2: Tensor,
    s2: tuple[int, ...],
    dtype: torch.dtype,
    ax: OutputAxes,
    per_param: bool,
    who: str,
) -> dict[str, Tensor]:
    """NTK columns ``J1 (J2^T e)`` for every example of ``x2`` and unit vector ``e``."""
    vals = bound.values
    o2 = math.prod(s2)
    basis = torch.eye(o2, dtype=dtype, device=x1.device).reshape((o2,) + s2)

    def f1(v: dict[str, Tensor]) -> Tensor:
        return bound.call(v, x1)

    def per_example(xn: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda v: bound.call(v, xn.unsqueeze(0)).squeeze(0), vals)

        def column(e: Tensor) -> dict[str, Tensor]:
            (ct,) = pullback(e)
            if not per_param:
                return {"": jvp(f1, (vals,), (ct,))[1]}
            return {
                name: jvp(lambda w, name=name: f1({**vals, name: w}), (vals[name],), (ct[name],))[1]
                for name in bound.names
            }

        return vmap(column)(basis)

    chunk = max(1, NTVP_BUDGET // max(1, o2 * bound.n_params))
    try:
        cols = vmap(per_example, chunk_size=min(chunk, x2.shape[0]))(x2)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise wrap_model_error(who, err) from err
    n1, n2 = x1.shape[0], x2.shape[0]
    out = {}
    for name, c in cols.items():
        full = c.reshape((n2,) + s2 + (n1,) + tuple(c.shape[3:]))
        out[name] = torch.einsum(f"{ax.a2}{ax.a1}->{ax.out}", full)
    return out


# ---------------------------------------------------------------------------- blocking
def _blocks(x: Tensor, chunk: int | None) -> list[Tensor]:
    if chunk is None or x.shape[0] <= chunk:
        return [x]
    return list(torch.split(x, chunk))


def blocked(
    feat: Callable[[Tensor], Any],
    pair: Callable[[Any, Any, bool], dict[str, Tensor]],
    x1: Tensor,
    x2: Tensor | None,
    chunk: int | None,
    ax: OutputAxes,
) -> dict[str, Tensor]:
    """Assemble the kernel from blocks of at most ``chunk`` examples of ``x1`` and ``x2``.

    ``feat(x_block)`` computes per-block features, ``pair(f1, f2, same)`` one kernel block.
    Symmetric problems (``x2 is None``) compute the upper block triangle and mirror it.
    """
    b1 = _blocks(x1, chunk)
    b2 = b1 if x2 is None else _blocks(x2, chunk)
    if ax.batch_diag:
        parts = []
        for c1, c2 in zip(b1, b2):
            f1 = feat(c1)
            parts.append(pair(f1, f1 if x2 is None else feat(c2), x2 is None))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    rows: list[list[dict[str, Tensor] | None]] = []
    for i, c1 in enumerate(b1):
        f1 = feat(c1)
        row: list[dict[str, Tensor] | None] = []
        for j, c2 in enumerate(b2):
            if x2 is None and j < i:
                row.append(None)
            elif x2 is None and j == i:
                row.append(pair(f1, f1, True))
            else:
                row.append(pair(f1, feat(c2), False))
        rows.append(row)
    first = rows[0][0]
    assert first is not None
    out = {}
    for k in first:
        cat_rows = []
        for i, row in enumerate(rows):
            parts = []
            for j, blk in enumerate(row):
                if blk is None:
                    other = rows[j][i]
                    assert other is not None
                    parts.append(other[k].permute(ax.mirror))
                else:
                    parts.append(blk[k])
            cat_rows.append(torch.cat(parts, dim=1))
        out[k] = torch.cat(cat_rows, dim=0)
    return out


# ------------------------------------------------------------------------------ driver
@dataclasses.dataclass(frozen=True)
class Plan:
    """The implementation chosen for one call and the FLOP estimates behind the choice.

    ``output_chunks`` is the number of chunks of output units the structured path makes
    per kernel block (1: all units at once; see :func:`output_chunks`). ``chain`` tells
    whether the structured path runs the hand-written backward pass of a chain of
    per-example layers (:mod:`infnets._src.empirical.chain`) instead of ``vmap(jacrev)``
    (decided from the module tree; should the forward pass find a reshape across the batch
    axis, the call uses ``vmap(jacrev)`` after all).
    """

    implementation: str
    costs: dict[str, float]
    output_chunks: int = 1
    chain: bool = False


def check_inputs(x1: Any, x2: Any, who: str) -> tuple[Tensor, Tensor | None]:
    """Convert ``x1``/``x2``; they must agree in dtype and device (shapes may differ)."""
    try:
        x1 = _inputs.as_tensor(x1, "x1")
        x2 = None if x2 is None else _inputs.as_tensor(x2, "x2")
    except (TypeError, ValueError) as err:
        raise type(err)(f"{who}: {err}") from None
    if x2 is not None:
        if x2.dtype != x1.dtype:
            raise TypeError(f"{who}: x1 has dtype {x1.dtype} but x2 has {x2.dtype}.")
        if x2.device != x1.device:
            raise ValueError(f"{who}: x1 is on {x1.device} but x2 is on {x2.device}.")
    return x1, x2


def group_names(names: list[str], per_layer: bool | str, who: str) -> dict[str, str]:
    """Map parameter names to contribution keys (``'module'``: drop the last dotted part)."""
    if per_layer in (True, "module"):
        return {n: n.rsplit(".", 1)[0] if "." in n else n for n in names}
    if per_layer == "parameter":
        return {n: n for n in names}
    raise ValueError(
        f"{who}: per_layer must be False, True, 'module' or 'parameter'; got {per_layer!r}."
    )


class EmpiricalKernelFn:
    """What every empirical kernel callable holds: the wrapped model, the checked
    ``trace_axes``/``diagonal_axes`` and ``chunk_size``, and the caller's name ``who``."""

    def __init__(
        self, model: Any, trace_axes: Any, diagonal_axes: Any, chunk_size: int | None, who: str
    ) -> None:
        self.who = who
        self.model = model if isinstance(model, Model) else Model(model, who)
        self.trace_axes = check_axes_arg(trace_axes, "trace_axes", who)
        self.diagonal_axes = check_axes_arg(diagonal_axes, "diagonal_axes", who)
        if chunk_size is not None:
            _inputs.check_int(chunk_size, "chunk_size", 1)
        self.chunk_size = chunk_size


class EmpiricalNTK(EmpiricalKernelFn):
    """The callable returned by ``empirical_ntk_fn`` (see its docstring)."""

    def __init__(
        self,
        model: Any,
        trace_axes: Any,
        diagonal_axes: Any,
        implementation: str,
        chunk_size: int | None,
        who: str = "empirical_ntk_fn",
    ) -> None:
        super().__init__(model, trace_axes, diagonal_axes, chunk_size, who)
        if set(self.trace_axes) & set(self.diagonal_axes):
            raise ValueError(
                f"{who}: trace_axes={self.trace_axes} and diagonal_axes="
                f"{self.diagonal_axes} share an axis."
            )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{who}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
            )
        self.implementation = implementation
        self._probes: dict[Any, Probe] = {}

    # ------------------------------------------------------------------ helpers
    def _probe(self, bound: Bound, x: Tensor, rules: dict[str, LayerRule]) -> Probe:
        key = (
            tuple(x.shape[1:]),
            x.dtype,
            x.device,
            tuple((n, tuple(v.shape), v.dtype) for n, v in bound.values.items()),
        )
        if key not in self._probes:
            self._probes[key] = probe(self.model, bound, rules, x, True, self.who)
        return self._probes[key]

    def _setup(self, x1: Any, x2: Any, params: Any):  # type: ignore[no-untyped-def]
        x1, x2 = check_inputs(x1, x2, self.who)
        self.model.check_mode()
        bound = self.model.bind(params)
        rules = self.model.structured_layers(bound.names)
        p1 = self._probe(bound, x1, rules)
        p2 = p1 if x2 is None else self._probe(bound, x2, rules)
        n2 = x1.shape[0] if x2 is None else x2.shape[0]
        ax = make_axes(
            (x1.shape[0],) + p1.out_shape,
            (n2,) + p2.out_shape,
            self.trace_axes,
            self.diagonal_axes,
            self.who,
        )
        return x1, x2, bound, p1, p2, ax

    def _costs(
        self, bound: Bound, p1: Probe, n1: int, n2: int, ax: OutputAxes, same: bool
    ) -> dict[str, float]:
        o = math.prod(p1.out_shape)
        f = max(p1.flops, 1.0)
        rows = n1 * o if same else (n1 + n2) * o
        b = n1 if ax.batch_diag else n1 * n2
        p = bound.n_params
        jc = rows * 2 * f + 2 * b * ax.work_pairs * p
        ntvp_cost = n2 * o * (2 * f + 2 * n1 * f)
        # structured: input cotangents everywhere (~F per row), weight gradients only for the
        # fallback layers (~F minus the structured layers' FLOPs), then each layer's rule.
        struct_params, struct_flops, struct = 0, 0.0, 0.0
        for ls in p1.layers.values():
            struct_params += sum(bound.values[n].numel() for n in ls.rule.param_names)
            struct_flops += 2.0 * ls.P * ls.G * ls.d_in * ls.d_out
            struct += min(layer_costs(ls, ls.P, ls.P, n1 * o, 0 if same else n2 * o, b, ax))
        struct += rows * (2 * f - min(struct_flops, f)) + 2 * b * ax.work_pairs * (
            p - struct_params
        )
        return {"structured": struct, "jacobian_contraction": jc, "ntk_vector_products": ntvp_cost}

    # ------------------------------------------------------------------ API
    def plan(self, x1: Any, x2: Any = None, params: Any = None) -> Plan:
        """The implementation ``__call__`` would use for these inputs, with FLOP estimates."""
        x1, x2, bound, p1, p2, ax = self._setup(x1, x2, params)
        return self._plan(bound, p1, p2, x1, x2, ax)

    def _plan(
        self,
        bound: Bound,
        p1: Probe,
        p2: Probe,
        x1: Tensor,
        x2: Tensor | None,
        ax: OutputAxes,
    ) -> Plan:
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        costs = self._costs(bound, p1, n1, n2, ax, x2 is None)
        impl = self.implementation
        if impl == "auto":
            order = ("structured", "jacobian_contraction", "ntk_vector_products")
            impl = min(order, key=lambda k: (costs[k], order.index(k)))
        names = set(p1.layers) & set(p2.layers)
        covered = {p for k in names for p in p1.layers[k].rule.param_names}
        chain = self._chain(bound, p1, p2, impl) is not None
        b1 = n1 if self.chunk_size is None else min(n1, self.chunk_size)
        b2 = n2 if self.chunk_size is None else min(n2, self.chunk_size)
        args = (
            {k: p1.layers[k] for k in names},
            {k: p2.layers[k] for k in names},
            b1,
            b2,
            math.prod(p1.out_shape),
            x2 is None and b1 == n1,
            ax,
        )
        chunks = 1
        if impl == "structured" and covered == set(bound.names):
            chunks = output_chunks(*args)
        if chain and chunks == 1:
            chunks = output_chunks(*args, chain=True)
        return Plan(impl, costs, chunks, chain)

    def _parts(
        self,
        bound: Bound,
        plan: Plan,
        p1: Probe,
        p2: Probe,
        x1: Tensor,
        x2: Tensor | None,
        ax: OutputAxes,
        per_param: bool,
    ) -> dict[str, Tensor]:
        """Per-parameter kernel blocks by the planned algorithm."""
        impl = plan.implementation
        names = set(p1.layers) & set(p2.layers) if impl == "structured" else set()

        def probe_of(x: Tensor) -> Probe:
            return p1 if x.shape[1:] == x1.shape[1:] else p2

        def layers_of(x: Tensor) -> dict[str, LayerShape]:
            return {k: probe_of(x).layers[k] for k in names}

        def pair(a: Any, b: Any, same: bool) -> dict[str, Tensor]:
            if plan.output_chunks > 1:
                return contract_chunked(a, b, ax, same, plan.output_chunks)
            if isinstance(a, ChainCotangents):
                return contract_stream(a, b, ax, same)
            if impl == "ntk_vector_products":
                return ntvp(bound, a, b, p2.out_shape, p2.out_dtype, ax, per_param, self.who)
            return contract(a, b, ax, same)

        def feat(x: Tensor) -> Any:
            if plan.output_chunks > 1:
                return CotangentChunks(bound, probe_of(x), layers_of(x), x, self.who)
            if impl == "ntk_vector_products":
                return x
            return features(bound, probe_of(x), layers_of(x), x, self.who)

        steps = self._chain(bound, p1, p2, impl) if plan.chain else None
        if steps is not None:
            try:
                return blocked(
                    lambda x: ChainCotangents(steps, probe_of(x), layers_of(x), x, self.who),
                    pair,
                    x1,
                    x2,
                    self.chunk_size,
                    ax,
                )
            except NotAChain:  # a layer reshapes across the batch axis: the general path
                pass
        return blocked(feat, pair, x1, x2, self.chunk_size, ax)

    def _chain(self, bound: Bound, p1: Probe, p2: Probe, impl: str) -> list[Step] | None:
        if impl != "structured" or not CHAIN:
            return None
        return chain_of(self.model.module, bound, set(p1.layers) & set(p2.layers))

    def __call__(
        self, x1: Any, x2: Any = None, params: Any = None, per_layer: bool | str = False
    ) -> Tensor | dict[str, Tensor]:
        x1, x2, bound, p1, p2, ax = self._setup(x1, x2, params)
        plan = self._plan(bound, p1, p2, x1, x2, ax)
        with torch.no_grad():
            parts = self._parts(bound, plan, p1, p2, x1, x2, ax, per_layer is not False)
        scale = 1.0 / ax.trace_size
        if per_layer is False:
            total = sum(parts.values())
            assert isinstance(total, Tensor)
            return total * scale if ax.trace_size != 1 else total
        groups = group_names(list(bound.names), per_layer, self.who)
        out: dict[str, Tensor] = {}
        for name in bound.names:
            value = parts[name] * scale
            key = groups[name]
            out[key] = out[key] + value if key in out else value
        return out
