r"""Indexing activations: ``Index`` and its ``Slice`` helper (Neural Tangents' ``stax.Index``).

Activations are ``(N, C, *spatial)`` (or ``(N, C)``). Selecting positions of a Gaussian
process selects the same entries of its covariance: for every spatial axis the index is
applied to *both* positions of the interleaved pair (``K'[q, q'] = K[idx[q], idx[q']]``),
or to the single axis of per-position covariances, so it never needs pixel pairs that
its output does not. Selecting channels keeps the kernel unchanged (the channels of an
infinitely wide layer are i.i.d.; Neal 1996, Lee et al. 2018), only the width changes.
The batch axis is never indexed inside a network: select examples from the inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from infnets._src.core.protocol import Params, ShapeTree
from infnets._src.layers.base import Layer

__all__ = ["Index", "Slice"]


class _SliceMaker:
    """``Slice[...]`` returns its key: ``stax.Slice[:, ::2, 1:-1]`` is
    ``(slice(None), slice(None, None, 2), slice(1, -1))``."""

    def __getitem__(self, idx: Any) -> Any:
        return idx

    def __repr__(self) -> str:
        return "Slice"


Slice = _SliceMaker()
"""Builds index tuples with NumPy syntax: ``stax.Index(stax.Slice[:, :, 2:6])``."""


def _check_entry(e: Any) -> Any:
    if isinstance(e, bool) or not isinstance(e, (int, slice)):
        raise TypeError(
            f"Index: index entries must be ints, slices or one Ellipsis (build them with "
            f"stax.Slice[...]), got {e!r}; tensors, lists and None (new axes) are not supported."
        )
    if isinstance(e, slice):
        for part in (e.start, e.stop, e.step):
            if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                raise TypeError(f"Index: slice {e} must have int or None bounds.")
        if e.step is not None and e.step <= 0:
            raise ValueError(
                f"Index: slice {e} has step {e.step}; only positive steps are supported "
                "(torch has no negative strides). Reverse axes before the network instead."
            )
    return e


class Index(Layer):
    r"""Select positions or channels: ``y = x[idx]`` on ``(N, C, *spatial)`` activations.

    Kernels (module docstring): spatial entries index both positions of each pixel pair,
    ``K'[q, q'] = K[idx[q], idx[q']]`` (an int removes that spatial axis); a channel
    slice leaves the kernel as it is (the width changes). Refused, with the fix in the
    message: indexing the batch axis 0, an int on the channel axis 1 (it would remove
    the infinite axis), empty selections. Caveat: after ``Flatten`` the features mix
    positions and are not i.i.d., so slicing them is not a channel slice; index before
    flattening.

    Args:
        idx: an int, a slice, or a tuple of them with at most one ``...``, in the
            ``(N, C, *spatial)`` layout; ``stax.Slice[...]`` builds one with NumPy syntax.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(8, (3, 3), padding='SAME'),
        ...                   stax.Index(stax.Slice[:, :4, 1:3, ::2]), stax.Relu(),
        ...                   stax.GlobalAvgPool(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 1, 4, 4), None, 'nngp').shape
        torch.Size([2, 2])
    """

    def __init__(self, idx: Any) -> None:
        entries = idx if isinstance(idx, tuple) else (idx,)
        if sum(e is Ellipsis for e in entries) > 1:
            raise ValueError(f"Index: at most one Ellipsis (...) allowed, got {idx!r}.")
        for e in entries:
            if e is not Ellipsis:
                _check_entry(e)
        self.idx = idx
        self._entries = entries

    def __repr__(self) -> str:
        return f"Index({self.idx!r})"

    def full_index(self, shape: tuple[int, ...]) -> tuple[Any, ...]:
        """The index with one entry per axis of ``shape`` (``...`` expanded), checked."""
        ndim = len(shape)
        given = [e for e in self._entries if e is not Ellipsis]
        if len(given) > ndim:
            raise ValueError(
                f"{self!r}: {len(given)} index entries for activations of shape {shape}."
            )
        if Ellipsis in self._entries:
            at = self._entries.index(Ellipsis)
            fill = [slice(None)] * (ndim - len(given))
            entries = list(self._entries[:at]) + fill + list(self._entries[at + 1 :])
        else:
            entries = given + [slice(None)] * (ndim - len(given))
        if entries[0] != slice(None):
            raise ValueError(
                f"{self!r} indexes the batch axis 0 (entry {entries[0]!r}); examples are not "
                "selected inside a network. Index the inputs instead (x[idx]) and keep ':' "
                "first, e.g. stax.Slice[:, :, 2:5]."
            )
        if ndim < 2:
            raise ValueError(f"{self!r}: activations of shape {shape} have no channel axis.")
        if isinstance(entries[1], int):
            raise ValueError(
                f"{self!r}: an int on the channel axis 1 ({entries[1]}) removes the infinite "
                "axis, which has no infinite-width kernel; keep it with a slice, e.g. "
                f"{entries[1]}:{entries[1] + 1}."
            )
        for axis, (e, n) in enumerate(zip(entries, shape)):
            if axis == 0:
                continue
            if isinstance(e, int):
                if not -n <= e < n:
                    raise IndexError(
                        f"{self!r}: index {e} is out of range for axis {axis} of size {n}."
                    )
            elif len(range(n)[e]) == 0:
                raise ValueError(f"{self!r}: {e} selects nothing from axis {axis} of size {n}.")
        return tuple(entries)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``x[idx]`` for activations of shape ``shape`` (batch kept)."""
        entries = self.full_index(shape)
        out = [shape[0]]
        for e, n in zip(entries[1:], shape[1:]):
            if isinstance(e, slice):
                out.append(len(range(n)[e]))
        return tuple(out)

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        if isinstance(in_shape, list):
            raise ValueError(f"{self!r} received {len(in_shape)} branches; join them first.")
        return self.out_shape(tuple(in_shape)), ()

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        return x[self.full_index(tuple(x.shape))]

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        entries = self.full_index(tuple(k.shape1))
        spatial = entries[2:]
        full = k.is_full_spatial
        lead = 1 if k.is_packed else 2

        def pick(t: Any, n: int) -> Any:
            if t is None or not spatial:
                return t
            ix = [e for e in spatial for _ in range(2)] if full else list(spatial)
            return t[(slice(None),) * n + tuple(ix)]

        shape1 = self.out_shape(tuple(k.shape1))
        shape2 = (k.shape2[0],) + shape1[1:]
        return k.replace(
            nngp=pick(k.nngp, lead),
            ntk=pick(k.ntk, lead),
            cov1=pick(k.cov1, 1),
            cov2=pick(k.cov2, 1),
            shape1=shape1,
            shape2=shape2,
            diagonal_spatial=k.diagonal_spatial and len(shape1) > 2,
        )
