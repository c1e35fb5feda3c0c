"""Output-unit chunks and layer streams of the structured empirical NTK (bounded memory).

When every output axis is traced or diagonal, the kernel is a sum (or a stack) of per-unit
terms: :class:`CotangentChunks` makes the cotangents of a chunk of output units at a time and
:func:`contract_chunked` contracts each chunk before the next is made; chains of per-example
layers stream one layer at a time (:class:`ChainCotangents`, :func:`contract_stream`).
:func:`output_chunks` sizes the chunks from :data:`OUTPUT_CHUNK_BYTES`,
:data:`OUTPUT_CHUNK_MIN_ROWS` and :data:`CHAIN_CHUNK_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import vmap

from infnets._src.empirical.axes import OutputAxes, make_axes
from infnets._src.empirical.chain import ChainSide, Factored, Step
from infnets._src.empirical.functorch import vjp_with_aux
from infnets._src.empirical.model import Bound, LayerTap, wrap_model_error
from infnets._src.empirical.structured import (
    Features,
    LayerShape,
    Probe,
    contract,
    layer_costs,
)

#: structured path: split the output units into chunks whose cotangents take at most this
#: many bytes (both sides of a kernel block together), see :func:`output_chunks`
OUTPUT_CHUNK_BYTES = 2**23
#: output chunks: never below this many rows (examples x output units) per backward pass, where
#: dense matrix products lose efficiency
OUTPUT_CHUNK_MIN_ROWS = 192
#: chains: bytes of cotangents one layer of the backward pass may hold (see
#: :func:`output_chunks`)
CHAIN_CHUNK_BYTES = 2**30


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

        def single(dl: dict[str, Tensor], xn: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            with tap.injecting(dl):
                out = bound.call(bound.values, xn.unsqueeze(0))
                seen = dict(tap.inputs)
            return out.squeeze(0), seen

        def batch(dl: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            return vmap(single)(dl, x)

        try:
            _, self._pullback, self.inputs = vjp_with_aux(batch, deltas)
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
    # a chain on one side is a chain on the other: both sides run the same model
    assert isinstance(s1, CotangentChunks) and isinstance(s2, CotangentChunks)
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

    def _entry(
        self, name: str, g: Tensor | Factored, out_shape: tuple[int, ...]
    ) -> tuple[LayerShape, Tensor, Tensor | Factored]:
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
