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

Spatial layouts
---------------
Convolutional activations have shape ``(N, C, *spatial)`` (PyTorch layout, ``d``
spatial axes, channels the infinite axis). Their record keeps either

* the *full* pixel-pair covariance, ``S = (s_1, s_1, s_2, s_2, ..., s_d, s_d)``
  with the two positions of each spatial axis interleaved (``nngp[i, j, h, h', w, w']``
  is ``Cov(f(x1_i)[h, w], f(x2_j)[h', w'])``), needed by layers that mix positions
  (pooling); ``O(N1 N2 P^2)`` memory for ``P`` positions; or
* only the *diagonal* (``diagonal_spatial=True``), ``S = (s_1, ..., s_d)``: one
  covariance per position, ``O(N1 N2 P)``, enough for convolutions, nonlinearities
  and a ``Flatten`` readout (Novak et al. 2019, "Bayesian deep convolutional
  networks with many channels are Gaussian processes", section 3.1).

``cov1``/``cov2`` use the same spatial layout with one batch axis. In the packed
layout a full-spatial pair ``(j, i)`` is pair ``(i, j)`` with every ``(s_a, s_a)``
pair of axes transposed (``K[j, i, p, p'] = K[i, j, p', p]``).

Spatial covariances are *stored* with the example axes innermost (their strides
are the smallest; the logical shapes above are unchanged): window sums over
positions then slice outer axes and run over long contiguous rows. Elementwise
torch ops preserve that memory order; :func:`alloc_like` allocates in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
        diagonal_spatial: for spatial activations (``len(shape1) > 2``), whether only
            the per-position covariances are kept (see the module docstring).
        last_affine: a token identifying the affine layer (``Dense``/``Conv``) whose
            weights each unit of these activations depends on individually (``None``
            for raw inputs and after joining branches). Two branches with different
            tokens are independent unit by unit in the infinite-width limit.
        centred: whether each unit has mean zero given everything but the weights of
            ``last_affine`` (true after an affine layer, kept by odd nonlinearities,
            pooling and normalisation). Sums and normalisation need it to be exact.
        mask1: ``(N1, *spatial)`` booleans, ``True`` at padded (masked) positions of the
            first batch, or ``None`` (no masking; see :mod:`infnets._src.core.masking`).
        mask2: the same for the second batch (``None`` when ``x2 is x1`` or unmasked).
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
    diagonal_spatial: bool = False
    last_affine: object | None = None
    centred: bool = False
    mask1: Tensor | None = None
    mask2: Tensor | None = None

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> Kernel:
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
        """Finite width (features, or channels for spatial activations: axis 1)."""
        return int(self.shape1[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial extent ``(s_1, ..., s_d)`` of ``(N, C, *spatial)`` activations, else ``()``."""
        return tuple(self.shape1[2:])

    @property
    def is_spatial(self) -> bool:
        """True for convolutional ``(N, C, *spatial)`` activations."""
        return len(self.shape1) > 2

    @property
    def is_full_spatial(self) -> bool:
        """True when the full pixel-pair covariance is kept (spatial, not diagonal)."""
        return len(self.shape1) > 2 and not self.diagonal_spatial

    def pair_variances(self) -> tuple[Tensor, Tensor]:
        """Variances of the two members of each pair, broadcastable to ``nngp``.

        Returns:
            ``(var1, var2)``: in the dense layout ``cov1[:, None]`` and
            ``cov2[None, :]`` (views, no copy); in the packed layout the gathered
            ``(M,)`` vectors. For full spatial covariances the per-position
            variances broadcast over the interleaved axes: ``(N1, 1, s_1, 1, ...)``
            and ``(1, N2, 1, s_1, ...)`` (packed: ``(M, s_1, 1, ...)``, ``(M, 1, s_1, ...)``).
        """
        cov2 = self.cov1 if self.cov2 is None else self.cov2
        if self.is_full_spatial:
            d1 = spatial_diagonal(self.cov1)
            d2 = d1 if self.cov2 is None else spatial_diagonal(cov2)
            if self.pair_index is not None:
                return (
                    _first(gather_examples(d1, self.pair_index[0])),
                    _second(gather_examples(d2, self.pair_index[1])),
                )
            return _first(d1).unsqueeze(1), _second(d2).unsqueeze(0)
        if self.pair_index is not None:
            if self.is_spatial:
                return (
                    gather_examples(self.cov1, self.pair_index[0]),
                    gather_examples(cov2, self.pair_index[1]),
                )
            return self.cov1[self.pair_index[0]], cov2[self.pair_index[1]]
        return self.cov1.unsqueeze(1), cov2.unsqueeze(0)

    def own_variances(self, cov: Tensor) -> tuple[Tensor, Tensor]:
        """Variances ``(var_a, var_b)`` broadcastable to ``cov1`` (or ``cov2``) itself.

        Args:
            cov: ``cov1`` or ``cov2`` of this record.

        Returns:
            ``(cov, cov)`` for non-spatial and diagonal layouts; for full spatial
            ``(N, s_1, s_1, ...)`` covariances the per-position variances shaped
            ``(N, s_1, 1, ...)`` and ``(N, 1, s_1, ...)``.
        """
        if not self.is_full_spatial:
            return cov, cov
        d = spatial_diagonal(cov)
        return _first(d), _second(d)

    def to_diagonal_spatial(self) -> Kernel:
        """The record keeping only per-position covariances (exact, drops pixel pairs).

        Returns:
            ``self`` when not spatial or already diagonal; else a record whose
            ``nngp``/``ntk``/``cov1``/``cov2`` are the spatial diagonals.
        """
        if not self.is_full_spatial:
            return self
        lead = 1 if self.pair_index is not None else 2

        def diag(t: Tensor, n: int) -> Tensor:
            view = spatial_diagonal(t, n)
            return alloc_like(view, view.shape).copy_(view)  # a copy: frees the pixel pairs

        return self.replace(
            nngp=diag(self.nngp, lead),
            ntk=None if self.ntk is None else diag(self.ntk, lead),
            cov1=diag(self.cov1, 1),
            cov2=None if self.cov2 is None else diag(self.cov2, 1),
            diagonal_spatial=True,
        )

    def map_covariances(
        self,
        fn: Callable[[Tensor, Tensor, Tensor], Tensor],
        ntk_fn: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> Kernel:
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
        if self.is_full_spatial:
            cov1 = fn(self.cov1, *self.own_variances(self.cov1))
            cov2 = None if self.cov2 is None else fn(self.cov2, *self.own_variances(self.cov2))
        else:
            cov1 = fn(self.cov1, self.cov1, self.cov1)
            cov2 = None if self.cov2 is None else fn(self.cov2, self.cov2, self.cov2)
        return self.replace(nngp=new_nngp, ntk=ntk, cov1=cov1, cov2=cov2)

    def to_dense(self) -> Kernel:
        """The record in the dense ``(N1, N2)`` layout (unpacks a packed one)."""
        if self.pair_index is None:
            return self
        full = self.is_full_spatial
        return self.replace(
            nngp=_unpack(self.nngp, self.pair_index, self.n1, full),
            ntk=None if self.ntk is None else _unpack(self.ntk, self.pair_index, self.n1, full),
            pair_index=None,
        )

    def __iter__(self) -> Iterator[Tensor | None]:
        """Iterate as ``(nngp, ntk)`` so ``nngp, ntk = kernel`` works."""
        return iter((self.nngp, self.ntk))


def pack_index(n: int, device: torch.device) -> Tensor:
    """``(2, n (n + 1) / 2)`` row/column indices of the upper triangle."""
    return torch.triu_indices(n, n, device=device)


def _unpack(packed: Tensor, index: Tensor, n: int, full_spatial: bool = False) -> Tensor:
    """Fill a symmetric ``(n, n, *S)`` tensor from its packed upper triangle.

    With ``full_spatial`` the mirrored entries get their interleaved position
    pairs transposed (``K[j, i, p, p'] = K[i, j, p', p]``).
    """
    out = packed.new_empty((n, n) + tuple(packed.shape[1:]))
    out[index[0], index[1]] = packed
    out[index[1], index[0]] = swap_spatial_pairs(packed, 1) if full_spatial else packed
    return out


def spatial_diagonal(cov: Tensor, lead: int = 1) -> Tensor:
    """Per-position entries of an interleaved full spatial covariance.

    Args:
        cov: ``(*B, s_1, s_1, ..., s_d, s_d)`` with ``lead = len(B)`` batch axes.
        lead: number of leading (example) axes.

    Returns:
        ``(*B, s_1, ..., s_d)`` with ``out[..., p] = cov[..., p_1, p_1, ..., p_d, p_d]``.
    """
    d = (cov.ndim - lead) // 2
    for _ in range(d):
        # takes the first remaining pair and appends its diagonal as the last axis
        cov = cov.diagonal(dim1=lead, dim2=lead + 1)
    return cov


def swap_spatial_pairs(cov: Tensor, lead: int) -> Tensor:
    """Transpose every interleaved ``(s_a, s_a)`` pair: ``K[p, p'] -> K[p', p]`` (a view)."""
    d = (cov.ndim - lead) // 2
    perm = list(range(lead))
    for a in range(d):
        perm += [lead + 2 * a + 1, lead + 2 * a]
    return cov.permute(perm)


def _first(v: Tensor) -> Tensor:
    """``(B, s_1, ..., s_d) -> (B, s_1, 1, ..., s_d, 1)``: the first position of a pair."""
    for a in range(v.ndim - 1):
        v = v.unsqueeze(2 + 2 * a)
    return v


def _second(v: Tensor) -> Tensor:
    """``(B, s_1, ..., s_d) -> (B, 1, s_1, ..., 1, s_d)``: the second position of a pair."""
    for a in range(v.ndim - 1):
        v = v.unsqueeze(1 + 2 * a)
    return v


def gather_examples(v: Tensor, index: Tensor) -> Tensor:
    """``v[index]`` along the example axis 0, keeping that axis innermost in memory.

    Args:
        v: ``(N, *S)`` per-example covariances.
        index: ``(M,)`` example indices.

    Returns:
        ``(M, *S)``, stored with the example axis innermost (a view of a new tensor).
    """
    return v.movedim(0, -1).index_select(-1, index).movedim(-1, 0)


def zero_ntk(like: Tensor) -> Tensor:
    """The NTK of raw inputs: zeros shaped like ``like``, without memory.

    A stride-0 view of one zero: layers read it like any tensor (an in-place
    write would raise, never corrupt), ``Conv`` skips its window sums
    (:func:`is_zero_ntk`), and results still holding it are materialised
    before they reach the user.
    """
    return like.new_zeros(()).expand(like.shape)


def is_zero_ntk(t: Tensor | None) -> bool:
    """Whether ``t`` is a :func:`zero_ntk` view (every stride 0, one zero stored).

    Tensors of ``torch.func`` transforms (``grad``, ``vmap``) hide their storage; they are
    treated as ordinary tensors (exact, without the shortcut).
    """
    if t is None or t.numel() <= 1 or any(t.stride()):
        return False
    try:
        stored = t.untyped_storage().nbytes()
    except NotImplementedError:  # a functorch wrapper
        return False
    return stored == t.element_size() and not bool(t[(0,) * t.ndim])


def alloc_like(like: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised tensor of ``shape`` whose axes lie in memory in ``like``'s order.

    Axes are ordered by ``like``'s strides (largest outermost), so a result built
    from ``like`` (e.g. a window sum of a covariance stored examples-innermost)
    keeps its memory order.

    Args:
        like: tensor whose axis order to copy (same number of axes as ``shape``).
        shape: the logical shape.

    Returns:
        A permuted view of a new contiguous tensor.
    """
    order, inverse = memory_order(like)
    return like.new_empty([shape[i] for i in order]).permute(inverse)


def memory_order(t: Tensor) -> tuple[list[int], list[int]]:
    """Axes of ``t`` from the largest stride to the smallest, and the inverse permutation."""
    strides = t.stride()
    order = sorted(range(t.ndim), key=lambda i: (-strides[i], i))
    inverse = [0] * len(order)
    for pos, dim in enumerate(order):
        inverse[dim] = pos
    return order, inverse


def select(kernel: Kernel, get: str | Sequence[str] | None) -> Any:
    """Return what ``get`` asks for from a finished (dense) kernel record.

    The record itself for ``get=None``, one field for a name, a named tuple for a sequence.
    """
    from infnets._src.core.inputs import GET_NAMES, kernel_tuple_type

    if get is None:
        return kernel
    if isinstance(get, str):
        return getattr(kernel, get)
    names = tuple(get)
    values = {name: getattr(kernel, name) for name in GET_NAMES}
    return kernel_tuple_type(names)(*(values[name] for name in names))
