"""The kernel record that infinite-width layers transform.

A layer's ``kernel_fn`` maps a :class:`Kernel` describing the joint Gaussian
process of its inputs to the one describing its outputs. The record carries the
NNGP covariance, the NTK, the per-example variances and the finite-width shapes
(the standard parameterization's NTK depends on the widths).

Internal pair layouts
---------------------
Every fully-connected layer acts independently on each pair of examples, so the
pair axes can be stored in one of two layouts:

* ``'dense'``: ``nngp`` has shape ``(N1, N2, *S)`` and the variances broadcast as
  ``cov1[:, None]`` and ``cov2[None, :]``;
* ``'packed'`` (only when ``x2 is None``): the symmetric matrix is stored as its
  upper triangle, ``nngp`` of shape ``(M, *S)`` with ``M = N (N + 1) / 2`` and
  ``pair_index`` of shape ``(2, M)`` naming the two examples of each entry. This
  halves the work of every elementwise layer.

Users only ever see the dense layout: :func:`Kernel.to_dense` unpacks.
``S`` are trailing spatial axes (empty for fully-connected inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Kernel"]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Covariances of an infinite-width network's activations on two batches.

    Attributes:
        nngp: ``(N1, N2)`` NNGP covariance ``E[f(x1) f(x2)]`` (per output unit).
        ntk: ``(N1, N2)`` neural tangent kernel, or ``None`` when not requested.
        cov1: ``(N1,)`` variances ``E[f(x1)^2]``.
        cov2: ``(N2,)`` variances of the second batch, ``None`` when ``x2 is x1``.
        shape1: shape of the finite network's activations on ``x1`` (batch first).
        shape2: shape of the finite network's activations on ``x2``.
        is_gaussian: whether the activations are Gaussian (true after an affine
            layer, false after a nonlinearity); nonlinearities require it.
        pair_index: ``(2, M)`` example indices in the packed layout, else ``None``.
        n1: number of examples in the first batch.
        n2: number of examples in the second batch.
    """

    nngp: Tensor
    ntk: Tensor | None
    cov1: Tensor
    cov2: Tensor | None
    shape1: tuple[int, ...]
    shape2: tuple[int, ...]
    is_gaussian: bool = False
    pair_index: Tensor | None = None
    n1: int = 0
    n2: int = 0

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: object) -> Kernel:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_symmetric(self) -> bool:
        """True when the second batch is the first one (``x2=None``)."""
        return self.cov2 is None

    @property
    def is_packed(self) -> bool:
        """True in the packed upper-triangle layout."""
        return self.pair_index is not None

    @property
    def width(self) -> int:
        """Finite width (last axis) of the activations this record describes."""
        return int(self.shape1[-1])

    def pair_variances(self) -> tuple[Tensor, Tensor]:
        """Variances of the two members of each pair, broadcastable to ``nngp``.

        Returns:
            ``(var1, var2)``: in the dense layout ``cov1[:, None]`` and
            ``cov2[None, :]`` (views, no copy); in the packed layout the gathered
            ``(M,)`` vectors.
        """
        cov2 = self.cov1 if self.cov2 is None else self.cov2
        if self.pair_index is not None:
            return self.cov1[self.pair_index[0]], cov2[self.pair_index[1]]
        return self.cov1.unsqueeze(1), cov2.unsqueeze(0)

    def map_covariances(self, fn, ntk_fn=None) -> Kernel:  # type: ignore[no-untyped-def]
        """Apply an elementwise covariance map to every covariance in the record.

        Args:
            fn: ``fn(cov, var_a, var_b) -> new_cov`` applied to ``nngp`` with the
                pair variances and to ``cov1``/``cov2`` with themselves.
            ntk_fn: optional ``ntk_fn(ntk, nngp_old, var1, var2, nngp_new) -> ntk``;
                called only when the NTK is tracked.

        Returns:
            The updated record (``is_gaussian`` unchanged; callers set it).
        """
        var1, var2 = self.pair_variances()
        new_nngp = fn(self.nngp, var1, var2)
        ntk = self.ntk
        if ntk is not None and ntk_fn is not None:
            ntk = ntk_fn(ntk, self.nngp, var1, var2, new_nngp)
        cov1 = fn(self.cov1, self.cov1, self.cov1)
        cov2 = None if self.cov2 is None else fn(self.cov2, self.cov2, self.cov2)
        return self.replace(nngp=new_nngp, ntk=ntk, cov1=cov1, cov2=cov2)

    def to_dense(self) -> Kernel:
        """The record in the dense ``(N1, N2)`` layout (unpacks a packed one)."""
        if self.pair_index is None:
            return self
        return self.replace(
            nngp=_unpack(self.nngp, self.pair_index, self.n1),
            ntk=None if self.ntk is None else _unpack(self.ntk, self.pair_index, self.n1),
            pair_index=None,
        )

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Iterate as ``(nngp, ntk)`` so ``nngp, ntk = kernel`` works."""
        return iter((self.nngp, self.ntk))


def pack_index(n: int, device: torch.device) -> Tensor:
    """``(2, n (n + 1) / 2)`` row/column indices of the upper triangle."""
    return torch.triu_indices(n, n, device=device)


def _unpack(packed: Tensor, index: Tensor, n: int) -> Tensor:
    """Fill a symmetric ``(n, n, *S)`` tensor from its packed upper triangle."""
    out = packed.new_empty((n, n) + tuple(packed.shape[1:]))
    out[index[0], index[1]] = packed
    out[index[1], index[0]] = packed
    return out


def select(kernel: Kernel, get: str | Sequence[str] | None):  # type: ignore[no-untyped-def]
    """Return what ``get`` asks for from a finished (dense) kernel record."""
    from infnets._src.inputs import GET_NAMES, kernel_tuple_type

    if get is None:
        return kernel
    if isinstance(get, str):
        return getattr(kernel, get)
    names = tuple(get)
    values = {name: getattr(kernel, name) for name in GET_NAMES}
    return kernel_tuple_type(names)(*(values[name] for name in names))
