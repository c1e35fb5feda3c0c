"""Three exact algorithms for the empirical NTK and the cost model that picks one (the driver).

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
(:func:`.structured._contract_factored`).

*Output chunks* (structured, memory): the cotangents ``g`` of every structured layer for all
``O`` output units are ``N O sum_l |y_l|`` numbers (30 MiB for an MLP 3 x 2048 with N = 64,
O = 10 in float64), and the backward pass that makes them holds a few more of that size.
When every output axis is traced or diagonal, the kernel is a sum (or a stack) of per-unit
terms, so the units can be processed in chunks: :class:`CotangentChunks` runs the forward
pass once (vmapped over examples, then ``torch.func.vjp``) and one vmapped backward pass per
chunk, and :func:`contract_chunked` contracts each chunk before the next is made. This is
used when all trainable parameters belong to dense-like structured layers (``nn.Linear``:
nothing is recomputed per chunk) and the cotangents exceed :data:`.chunking.OUTPUT_CHUNK_BYTES`;
chunks keep at least :data:`.chunking.OUTPUT_CHUNK_MIN_ROWS` rows (examples x units) per backward
matrix product, so they cost little speed (:func:`output_chunks`; on the MLP above, 3 chunks
of 192-256 rows take ~5% more CPU time than one chunk and a third of its memory).

The algorithms live beside this driver: :mod:`.structured` (JC and structured features),
:mod:`.chunking` (output-unit chunks, chain streams), :mod:`.ntvp` (NTVP, example blocks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.empirical.axes import OutputAxes, check_axes_arg, make_axes
from infnets._src.empirical.chain import NotAChain, Step, chain_of
from infnets._src.empirical.chunking import (
    ChainCotangents,
    CotangentChunks,
    contract_chunked,
    contract_stream,
    output_chunks,
)
from infnets._src.empirical.model import Bound, LayerRule, Model, locked
from infnets._src.empirical.ntvp import blocked, ntvp
from infnets._src.empirical.structured import (
    LayerShape,
    Probe,
    contract,
    features,
    layer_costs,
    probe,
)

IMPLEMENTATIONS = ("auto", "jacobian_contraction", "ntk_vector_products", "structured")
"""The values of ``implementation``: ``'auto'`` picks the cheapest of the three exact
algorithms for the actual shapes (see the module docstring of :mod:`infnets.empirical`)."""
#: structured path: use the hand-written backward pass of :mod:`empirical_chain` for models
#: that are chains of per-example layers (``False``: always ``vmap(jacrev)``)
CHAIN = True


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
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.requires_grad:
            raise ValueError(
                f"{who}: {name} requires grad, but empirical kernels are computed under "
                "torch.no_grad() (they are not differentiable with respect to the inputs, and "
                f"torch.func cannot nest the input's graph); pass {name}.detach()."
            )
    if x2 is not None:
        if x2.dtype != x1.dtype:
            raise TypeError(f"{who}: x1 has dtype {x1.dtype} but x2 has {x2.dtype}.")
        if x2.device != x1.device:
            raise ValueError(f"{who}: x1 is on {x1.device} but x2 is on {x2.device}.")
    return x1, x2


def check_per_example(bound: Bound, x: Tensor, who: str) -> None:
    """Refuse a model whose outputs are not one per example, computed independently.

    The empirical NTK is a kernel between examples, ``J(x_i) J(x_j)^T``; it is computed per
    example (``vmap`` over examples, or batched passes that assume independence). A model
    that changes the batch size, or mixes the examples of a batch (``x - x.mean(0)``,
    attention across the batch axis), has no per-example Jacobian: the kernel would be
    wrong (often silently all equal or zero). Two examples are evaluated together and
    one by one (three small forward passes, once per input shape); the outputs must
    agree to ``sqrt(eps)`` (batched and single passes differ only by rounding).
    """
    if x.shape[0] < 2:
        return
    try:
        with torch.no_grad():
            both = bound.call(bound.values, x[:2])
            one = [bound.call(bound.values, x[i : i + 1]) for i in (0, 1)]
    except Exception:  # noqa: BLE001 - the probe reported evaluation errors already
        return
    if not isinstance(both, Tensor) or both.ndim == 0 or both.shape[0] != 2:
        shape = tuple(both.shape) if isinstance(both, Tensor) else type(both).__name__
        raise ValueError(
            f"{who}: the model changes the batch size: on a batch of 2 examples it returned "
            f"{shape}. The empirical NTK needs one output per example (batch axis first); "
            "do not reduce or reshape across the batch axis (e.g. .sum(0), .view(-1))."
        )
    single = torch.cat(one)
    if single.shape != both.shape or not single.is_floating_point():
        return
    eps = torch.finfo(single.dtype).eps
    scale = float(single.abs().max()) if single.numel() else 0.0
    if not torch.allclose(both, single, rtol=eps**0.5, atol=eps**0.5 * max(scale, 1e-30)):
        gap = float((both - single).abs().max())
        raise ValueError(
            f"{who}: the model mixes the examples of a batch: its output for an example "
            f"depends on the other examples (a batch of 2 and the 2 examples alone differ "
            f"by {gap:.3g}). Its per-example NTK is undefined. Remove operations across the "
            "batch axis (x - x.mean(0), normalization with batch statistics, attention over "
            "the batch axis), or put such layers in eval mode."
        )


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
            found = probe(self.model, bound, rules, x, True, self.who)
            check_per_example(bound, x, self.who)
            self._probes[key] = found
        return self._probes[key]

    def _setup(
        self, x1: Any, x2: Any, params: Any
    ) -> tuple[Tensor, Tensor | None, Bound, Probe, Probe, OutputAxes]:
        x1, x2 = check_inputs(x1, x2, self.who)
        self.model.check_mode()
        self.model.check_transformable()
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
    @locked
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

    @locked
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
