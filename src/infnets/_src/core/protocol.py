"""The layer protocol: what evaluation code may ask of a layer, and the raw-input kernel.

Every infnets layer is a finite network and its infinite-width kernel map side by side
(:class:`infnets.stax.Layer` implements this protocol). The evaluation engine
(:mod:`infnets._src.evaluate`) sees layers only through :class:`KernelLayer`, never through
concrete layer classes, so it sits *below* the layer families in the import graph:

* ``init(gen, in_shape, dtype, device) -> (out_shape, params)`` and ``apply(params, x)``:
  the finite network;
* ``kernel(k) -> k'``: the infinite-width map on :class:`~infnets._src.core.kernel.Kernel`
  records, and ``kernel_planned(k, out_full)`` the same knowing what later layers need;
* ``spatial_requirement(out_full)``: whether the layer needs the full pixel-pair covariance
  of its input (see :mod:`infnets._src.core.kernel`);
* ``fused_steps()``: the layer as steps of the fully-connected fast path
  (:class:`Affine`, :class:`PairMap`), or ``None`` when it has no fused form;
* ``sublayers()``, ``extra_records()`` and ``output_spatial(spatial)``: the children of
  containers, how many extra records a layer keeps alive at once (``FanOut``) and the
  spatial shape it outputs (layers that enlarge images), for memory planning.

The kernel of raw inputs (:func:`input_kernel`) lives here too: the first record every
evaluation path starts from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel, pack_index

__all__ = [
    "PACK_MIN_EXAMPLES",
    "Affine",
    "FusedStep",
    "KernelFn",
    "KernelTree",
    "KernelLayer",
    "PairMap",
    "PairMapActivation",
    "Params",
    "Shape",
    "ShapeTree",
    "input_kernel",
    "leaves",
    "single_shape",
]

#: a finite-width shape, batch axis first (``-1`` marks an unknown batch size)
Shape: TypeAlias = tuple[int, ...]
#: a shape, or a list of them for layers with several inputs or outputs
ShapeTree: TypeAlias = Shape | list["ShapeTree"]
#: the parameters of a finite layer: nested tuples, lists and dicts of tensors
Params: TypeAlias = Any
#: a kernel record, or a list of them for layers with several inputs or outputs
KernelTree: TypeAlias = Kernel | list[Kernel]

#: symmetric problems with at least this many examples use the packed pair layout
PACK_MIN_EXAMPLES = 16


class PairMapActivation(Protocol):
    """An activation with a fused pair map on the fully-connected fast path.

    ``pair_factors(q)`` gives per-example factors of the variances ``q``;
    ``pair_maps(c, f1, f2, need_dot, w2=1.0, b2=0.0)`` maps covariances ``c`` of pairs with
    factors ``f1``/``f2`` to ``(b2 + w2 E[phi phi], E[phi' phi'] or None)``.
    """

    def pair_factors(self, q: Tensor) -> tuple[Tensor, Tensor]: ...

    def pair_maps(
        self,
        c: Tensor,
        f1: Tensor,
        f2: Tensor,
        need_dot: bool,
        w2: float = 1.0,
        b2: float = 0.0,
    ) -> tuple[Tensor, Tensor | None]: ...


@dataclasses.dataclass(frozen=True)
class Affine:
    """A fused affine step (NTK parameterization).

    ``K' = b2 + w2 K`` and ``Theta' = K' + w2 Theta``.
    """

    w2: float
    b2: float


@dataclasses.dataclass(frozen=True)
class PairMap:
    """A fused activation step, evaluated by ``act.pair_factors``/``act.pair_maps``."""

    act: PairMapActivation


FusedStep: TypeAlias = Affine | PairMap


class KernelFn(Protocol):
    """A layer's ``kernel_fn(x1, x2=None, get=None, **options)``.

    ``x1``/``x2`` are input batches (``x2=None`` for ``x2 = x1``) or a :class:`Kernel`
    record (then alone); ``get`` names what to return: ``None`` for the :class:`Kernel`
    record, one name (``'nngp'``, ``'ntk'``, ...) for that tensor, a sequence of names for
    a named tuple of them. ``options`` are keyword-only evaluation settings
    (``diagonal_spatial``, ``memory_budget``, ``batch_size``, ``progress``, masks and
    side inputs; see :func:`infnets._src.evaluate.tiling.kernel_fn`).
    """

    def __call__(
        self,
        x1: Any,
        x2: Any = None,
        get: str | Sequence[str] | None = None,
        **options: Any,
    ) -> Any: ...


class KernelLayer(Protocol):
    """What evaluation code may ask of a layer (implemented by :class:`infnets.stax.Layer`)."""

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]: ...

    def apply(self, params: Params, x: Any) -> Any: ...

    def kernel(self, k: KernelTree) -> KernelTree: ...

    def kernel_planned(self, k: KernelTree, out_full: Any) -> KernelTree: ...

    def spatial_requirement(self, out_full: Any) -> Any: ...

    def fused_steps(self) -> Sequence[FusedStep] | None: ...

    def sublayers(self) -> Sequence[KernelLayer]: ...

    def extra_records(self) -> int: ...

    def output_spatial(self, spatial: Shape) -> Shape: ...


def single_shape(in_shape: ShapeTree, who: object) -> Shape:
    """``in_shape`` as the one shape of a single-input layer ``who``.

    Raises:
        ValueError: ``in_shape`` is a list of branch shapes.
    """
    if isinstance(in_shape, list):
        raise ValueError(f"{who!r} received {len(in_shape)} branches; join them first.")
    return in_shape


def leaves(layer: KernelLayer) -> list[KernelLayer]:
    """The layers of an architecture that have no children, in order."""
    kids = layer.sublayers()
    if not kids:
        return [layer]
    return [leaf for kid in kids for leaf in leaves(kid)]


def input_kernel(x1: Tensor, x2: Tensor | None, need_ntk: bool) -> Kernel:
    """The kernel of the raw inputs: ``x1 @ x2.T / d`` (d = number of features).

    Args:
        x1: ``(N1, d)`` inputs.
        x2: ``(N2, d)`` inputs or ``None`` for ``x2 = x1``.
        need_ntk: track the NTK (zero for the inputs, which have no parameters).

    Returns:
        The input :class:`Kernel`; symmetric problems of at least
        ``PACK_MIN_EXAMPLES`` examples use the packed layout.
    """
    if x1.ndim != 2:
        raise ValueError(
            f"x1 has shape {tuple(x1.shape)}; fully-connected networks take (N, features) "
            "inputs. Flatten with x.reshape(len(x), -1)."
        )
    d = x1.shape[-1]
    cov1 = (x1 * x1).sum(-1) / d
    n1 = x1.shape[0]
    if x2 is None:
        nngp = x1 @ x1.T
        nngp = nngp.add(nngp.T).mul_(0.5 / d)  # exactly symmetric
        # the variances are the Gram matrix's own diagonal, bit for bit: every kernel
        # map then sees correlation exactly 1 on diagonal pairs, where maps such as
        # sqrt(1 - rho^2) would turn a rounding error e into an error sqrt(e)
        cov1 = nngp.diagonal().clone()
        n2, cov2, index = n1, None, None
        if n1 >= PACK_MIN_EXAMPLES:
            index = pack_index(n1, x1.device)
            nngp = nngp[index[0], index[1]]
    else:
        nngp = x1 @ x2.T / d
        n2, cov2, index = x2.shape[0], (x2 * x2).sum(-1) / d, None
    return Kernel(
        nngp=nngp,
        ntk=torch.zeros_like(nngp) if need_ntk else None,
        cov1=cov1,
        cov2=cov2,
        shape1=tuple(x1.shape),
        shape2=(n2,) + tuple(x1.shape[1:]),
        is_gaussian=False,
        pair_index=index,
        n1=n1,
        n2=n2,
    )
