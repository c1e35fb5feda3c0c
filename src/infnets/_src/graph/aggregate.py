r"""Aggregation of node features along graphs: the GNN layer of the graph NTK.

A batch of ``N`` graphs has node features ``x`` of shape ``(N, C, *nodes)`` (channels
first, the nodes on the spatial axes) and one adjacency pattern per graph. ``Aggregate``
sums the features of each node's neighbours,

``y[b, c, i] = sum_j A_b[i, j] x[b, c, j]``,

a fixed linear map of the nodes of graph ``b``. Channels stay i.i.d. Gaussian processes,
so (Du et al. 2019, "Graph neural tangent kernel: fusing graph neural networks with graph
kernels", eq. 4-5, the aggregation step of the GNTK) for graphs ``b`` and ``b'``

``K'_{b b'}(i, i') = sum_{j, j'} A_b[i, j] A_{b'}[i', j'] K_{b b'}(j, j')``,

i.e. ``A_b K A_{b'}^T``, and the same for the NTK (no parameters). Every pair of nodes
matters, so the layer needs the full node-pair covariance. Between aggregations a
per-node MLP is ``Conv(width, (1,))`` and a nonlinearity; the graph readout is
``GlobalSumPool`` (or ``GlobalAvgPool``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import Params, ShapeTree
from infnets._src.layers import side_inputs
from infnets._src.layers.base import Layer

__all__ = ["Aggregate", "edges_to_dense"]

IMPLEMENTATIONS = ("DENSE", "SPARSE")


def edges_to_dense(pattern: Tensor, n_nodes: int) -> Tensor:
    """A ``(N, P, P)`` dense adjacency from ``(N, n_edges, 2)`` edge lists.

    Edge ``(i, j)`` adds ``x[j]`` into node ``i`` (``A[b, i, j] += 1``); rows with a
    negative entry are padding and ignored, so graphs with fewer edges are padded.

    Examples:
        >>> edges_to_dense(torch.tensor([[[0, 1], [1, 0], [-1, -1]]]), 2)
        tensor([[[0., 1.],
                 [1., 0.]]])
    """
    n, e = pattern.shape[:2]
    valid = (pattern >= 0).all(-1)
    b = torch.arange(n, device=pattern.device)[:, None].expand(n, e)
    i, j = pattern[..., 0], pattern[..., 1]
    flat = (b * n_nodes + i) * n_nodes + j
    out = torch.zeros(n * n_nodes * n_nodes, device=pattern.device)
    out.index_add_(0, flat[valid], torch.ones(int(valid.sum()), device=pattern.device))
    return out.reshape(n, n_nodes, n_nodes)


@dataclasses.dataclass(frozen=True, eq=False)
class Aggregate(Layer):
    r"""Sum node features along each graph's adjacency (Neural Tangents' ``Aggregate``).

    ``y[b, c, i] = sum_j A_b[i, j] x[b, c, j]`` for node features ``(N, C, *nodes)``;
    kernel ``K'_{b b'} = A_b K_{b b'} A_{b'}^T`` over flattened nodes, NTK alike (module
    docstring; Du et al. 2019). The patterns come with each call:
    ``apply_fn(params, x, pattern=p)``, ``kernel_fn(x1, x2, get, pattern=(p1, p2))``
    (``p2`` is ignored, may be ``None``, when ``x2`` is ``None``) and
    ``module(x, pattern=p)``.

    Patterns: with ``implementation='DENSE'`` an adjacency ``(N, P, P)`` of float
    weights (``P`` the number of nodes, flattened over the node axes); with
    ``'SPARSE'`` an int edge list ``(N, n_edges, 2)`` of ``(i, j)`` pairs meaning
    ``A[i, j] += 1`` (rows with a negative entry are padding), which the finite twin
    scatters directly and the kernel turns into ``to_dense(pattern)``. Add self-loops
    to the pattern for the GNTK's ``x_i + sum_{j in N(i)} x_j``.

    Graph kernels are computed in one block of examples: raise ``memory_budget`` (or
    compute row blocks with the matching pattern blocks) if ``kernel_fn`` tiles.

    Args:
        aggregate_axis: the node axes, ``None`` (default) for every axis after the
            channel axis; only all of them together are supported.
        batch_axis: must be 0 (channels-first layout).
        channel_axis: must be 1 (channels-first layout).
        to_dense: ``to_dense(pattern, n_nodes) -> (N, P, P)`` for edge lists (default
            :func:`edges_to_dense`).
        implementation: ``'DENSE'`` or ``'SPARSE'`` (the form of ``pattern``).

    Examples:
        >>> from infnets import stax
        >>> a = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]] * 2)
        >>> net = stax.serial(stax.Conv(16, (1,)), stax.Relu(), stax.Aggregate(),
        ...                   stax.GlobalSumPool(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 4, 3), None, 'ntk', pattern=(a, None)).shape
        torch.Size([2, 2])
    """

    aggregate_axis: tuple[int, ...] | int | None = None
    batch_axis: int = 0
    channel_axis: int = 1
    to_dense: Callable[[Tensor, int], Tensor] | None = None
    implementation: str = "DENSE"

    def __post_init__(self) -> None:
        if self.batch_axis != 0 or self.channel_axis != 1:
            raise ValueError(
                f"Aggregate: infnets is channels-first, (N, C, *nodes): batch_axis must be 0 "
                f"and channel_axis 1, got batch_axis={self.batch_axis!r}, "
                f"channel_axis={self.channel_axis!r}. Move axes with x.movedim(...) first."
            )
        axes = self.aggregate_axis
        if axes is not None:
            axes = (axes,) if isinstance(axes, int) else tuple(axes)
            if not axes or any(isinstance(a, bool) or not isinstance(a, int) for a in axes):
                raise TypeError(f"Aggregate: aggregate_axis must be ints or None, got {axes!r}.")
            object.__setattr__(self, "aggregate_axis", axes)
        if not isinstance(self.implementation, str) or (
            self.implementation.upper() not in IMPLEMENTATIONS
        ):
            raise ValueError(
                f"Aggregate: implementation must be 'DENSE' or 'SPARSE', got "
                f"{self.implementation!r}."
            )
        object.__setattr__(self, "implementation", self.implementation.upper())
        if self.to_dense is not None and not callable(self.to_dense):
            raise TypeError("Aggregate: to_dense must be callable or None.")

    def _check_axes(self, shape: tuple[int, ...]) -> int:
        """The number of nodes ``P`` of activations of shape ``shape``."""
        if len(shape) < 3:
            raise ValueError(
                f"{self!r} takes node features (N, C, *nodes), got shape {tuple(shape)}; add "
                "a node axis (x[:, :, None] for one node per graph)."
            )
        nodes = tuple(range(2, len(shape)))
        if self.aggregate_axis is not None:
            axes = cast(tuple[int, ...], self.aggregate_axis)  # a tuple since __post_init__
            given = tuple(sorted(a % len(shape) for a in axes))
            if given != nodes:
                raise ValueError(
                    f"{self!r}: aggregate_axis={self.aggregate_axis} must name every node axis "
                    f"{nodes} of activations of shape {tuple(shape)} (partial aggregation is "
                    "not supported); use aggregate_axis=None."
                )
        return math.prod(shape[2:])

    def _dense(self, pattern: Any, n: int, p: int, like: Tensor, which: str) -> Tensor:
        if pattern is None:
            raise ValueError(
                f"{self!r} needs the graphs' adjacency: pass pattern= to apply_fn/module "
                "(a tensor) or kernel_fn (a pair (pattern1, pattern2))."
            )
        if not isinstance(pattern, Tensor):
            raise TypeError(f"{self!r}: {which} must be a torch.Tensor, got {type(pattern)}.")
        if self.implementation == "SPARSE":
            if pattern.ndim != 3 or pattern.shape[-1] != 2 or pattern.is_floating_point():
                raise ValueError(
                    f"{self!r}: {which} has shape {tuple(pattern.shape)}; with "
                    "implementation='SPARSE' it is an int edge list (N, n_edges, 2)."
                )
            if pattern.numel() and int(pattern.max()) >= p:
                raise ValueError(f"{self!r}: {which} names a node >= the {p} nodes per graph.")
            dense = (self.to_dense or edges_to_dense)(pattern, p)
        else:
            dense = pattern
        if dense.shape != (n, p, p):
            raise ValueError(
                f"{self!r}: {which} has shape {tuple(dense.shape)} but {n} graphs of {p} nodes "
                f"need ({n}, {p}, {p}) (implementation='DENSE'; or 'SPARSE' edge lists). "
                "kernel_fn computes graph kernels in one block: raise memory_budget if it tiles."
            )
        return dense.to(dtype=like.dtype, device=like.device)

    def spatial_requirement(self, out_full: Any) -> Any:
        return True

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        if isinstance(in_shape, list):
            raise ValueError(f"{self!r} received {len(in_shape)} branches; join them first.")
        self._check_axes(tuple(in_shape))
        return in_shape, ()

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        p = self._check_axes(tuple(x.shape))
        n, c = x.shape[:2]
        pattern = side_inputs.get("pattern")
        flat = x.reshape(n, c, p)
        if self.implementation == "SPARSE" and self.to_dense is None and pattern is not None:
            self._dense(pattern, n, p, x, "pattern")  # checks
            valid = (pattern >= 0).all(-1)  # (N, E)
            b = torch.arange(n, device=x.device)[:, None].expand_as(valid)
            src = (b * p + pattern[..., 1].clamp(min=0))[valid]
            dst = (b * p + pattern[..., 0].clamp(min=0))[valid]
            rows = flat.movedim(1, -1).reshape(n * p, c)
            out = torch.zeros_like(rows).index_add(0, dst, rows[src])
            return out.reshape(n, p, c).movedim(-1, 1).reshape(x.shape)
        a = self._dense(pattern, n, p, x, "pattern")
        return torch.einsum("bij,bcj->bci", a, flat).reshape(x.shape)

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        p = self._check_axes(tuple(k.shape1))
        if k.diagonal_spatial and p > 1:
            raise ValueError(
                f"{self!r} mixes nodes and needs the full node-pair covariance of its input; "
                "call kernel_fn with diagonal_spatial=None (automatic) or False."
            )
        given = side_inputs.get("pattern")
        if given is not None and not (isinstance(given, (tuple, list)) and len(given) == 2):
            raise ValueError(
                f"{self!r}: kernel_fn takes pattern=(pattern1, pattern2), one per batch of "
                "graphs (pattern2 may be None when x2 is None)."
            )
        p1, p2 = (None, None) if given is None else given
        a1 = self._dense(p1, k.n1, p, k.nngp, "pattern[0]")
        a2 = a1 if k.cov2 is None else self._dense(p2, k.n2, p, k.nngp, "pattern[1]")
        spatial = k.spatial_shape
        d = len(spatial)

        def flat(t: Tensor, lead: int) -> Tensor:
            order = list(range(lead)) + [lead + 2 * a for a in range(d)]
            order += [lead + 2 * a + 1 for a in range(d)]
            return t.permute(order).reshape(t.shape[:lead] + (p, p))

        def unflat(t: Tensor, lead: int) -> Tensor:
            t = t.reshape(t.shape[:lead] + spatial + spatial)
            inter = list(range(lead))
            for a in range(d):
                inter += [lead + a, lead + d + a]
            return t.permute(inter)

        def pairs(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if k.is_packed:
                i, j = k.pair_index
                out = torch.einsum("mij,mjk,mlk->mil", a1[i], flat(t, 1), a2[j])
                return unflat(out, 1)
            return unflat(torch.einsum("aij,abjk,blk->abil", a1, flat(t, 2), a2), 2)

        def own(t: Tensor | None, a: Tensor) -> Tensor | None:
            if t is None:
                return None
            return unflat(torch.einsum("aij,ajk,alk->ail", a, flat(t, 1), a), 1)

        return Kernel.replace(
            k,
            nngp=pairs(k.nngp),
            ntk=pairs(k.ntk),
            cov1=own(k.cov1, a1),
            cov2=own(k.cov2, a2),
        )
