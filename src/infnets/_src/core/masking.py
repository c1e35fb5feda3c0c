r"""Masks of padded positions: variable-length sequences and images with holes.

Sequences of different lengths are padded to a common length ``L`` and marked, as in
Neural Tangents, by a *mask constant*: a position ``p`` of example ``x`` is masked
(padding) when every channel equals it, ``x[:, p] == mask_constant``. Masks are
boolean ``(N, *spatial)`` tensors, ``True`` at padded positions (Neural Tangents'
convention); an explicit ``mask`` (``(N, *spatial)`` or ``(N, 1, *spatial)``) may be
given instead of ``mask_constant``.

Where masks act
---------------
* **Finite networks.** ``apply_fn(params, x, mask_constant=c)`` (or ``mask=m``) computes
  the mask once from the network's input and makes it visible to every layer for the
  duration of the call (a context variable). Layers that mix positions honour it:
  ``GlobalSelfAttention`` excludes padded keys from the attention (and returns zeros
  at padded queries), ``GlobalAvgPool``/``GlobalSumPool`` average/sum over the real
  positions only, ``Flatten`` zeroes the padded positions' features. Layers that act on
  each position separately (activations, ``LayerNorm``, ``Dropout``, ``Conv`` with a
  ``(1, ..., 1)`` filter and stride, the combinators) pass the mask through. Layers
  that move positions (``Conv`` with wider filters or strides, ``AvgPool``, ``SumPool``)
  cannot honour it and raise.
* **Kernels.** ``kernel_fn(x1, x2, get, mask_constant=c)`` (or ``mask1=``/``mask2=``)
  stores the masks in the :class:`~infnets.Kernel` record (``mask1``/``mask2``); the same
  layers use them in the same way, so padded positions never reach the kernel of a
  pooled readout and a padded sequence has exactly the kernel of the unpadded one
  (with positional embeddings: when the padding is at the end).

Masks survive ``to_module``: ``module(x, mask_constant=c)``, or a default given once by
``layer.to_module(shape, mask_constant=c)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel, _first, _second, gather_examples

__all__ = [
    "input_mask",
    "apply_context",
    "current_mask",
    "current_generator",
    "reject_mask",
    "reject_kernel_mask",
    "pair_keep",
    "own_keep",
    "remask",
]

_MASK: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("infnets_mask", default=None)
_RNG: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "infnets_rng", default=None
)


# ---------------------------------------------------------------- construction
def input_mask(
    x: Tensor, mask_constant: float | None = None, mask: Any = None, name: str = "x"
) -> Tensor | None:
    """The ``(N, *spatial)`` boolean mask of padded positions of inputs ``x``.

    Args:
        x: ``(N, C, *spatial)`` inputs (channels on axis 1).
        mask_constant: positions whose every channel equals it are masked; ``None``
            for none.
        mask: an explicit boolean mask, ``(N, *spatial)`` or ``(N, 1, *spatial)``,
            ``True`` at padded positions (instead of ``mask_constant``).
        name: the inputs' argument name, for error messages.

    Returns:
        The mask, or ``None`` when neither ``mask_constant`` nor ``mask`` is given.

    Raises:
        ValueError: inputs without positions (``(N, features)``), both arguments
            given, or a mask of the wrong shape.
        TypeError: a mask that is not boolean or a constant that is not a number.

    Examples:
        >>> x = torch.tensor([[[1.0, 2.0, 0.0]]])  # one sequence of length 3, padded once
        >>> input_mask(x, mask_constant=0.0)
        tensor([[False, False,  True]])
    """
    if mask_constant is None and mask is None:
        return None
    if not isinstance(x, Tensor) or x.ndim < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"masking needs inputs with positions, (N, C, *spatial) such as sequences "
            f"(N, C, L), but {name} has shape {shape}. Masks mark padded positions; "
            "fully-connected (N, features) inputs have none: drop mask_constant/mask."
        )
    if mask_constant is not None and mask is not None:
        raise ValueError("pass either mask_constant or an explicit mask, not both.")
    if mask_constant is not None:
        if isinstance(mask_constant, bool) or not isinstance(mask_constant, (int, float)):
            raise TypeError(
                f"mask_constant must be a number (the value filling padded positions), "
                f"got {mask_constant!r}."
            )
        return (x == mask_constant).all(dim=1)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a boolean tensor (True at padded positions), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}; build it with e.g. "
            "torch.arange(L) >= lengths[:, None]."
        )
    want = (x.shape[0],) + tuple(x.shape[2:])
    if mask.ndim == x.ndim and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(x.shape)}; a "
            f"mask has one entry per example and position: shape {want} (or "
            f"{(want[0], 1) + want[1:]})."
        )
    return mask.to(x.device)


# ------------------------------------------------------------ finite networks
@contextlib.contextmanager
def apply_context(x: Any, mask_constant: float | None, mask: Any, rng: Any) -> Iterator[None]:
    """Make the input mask (and a dropout generator) visible to every layer of one call.

    Args:
        x: the network's input (a tensor, or a list of branches: the first is used).
        mask_constant, mask: as in :func:`input_mask`.
        rng: ``None``, an int seed or a ``torch.Generator`` for ``Dropout``.
    """
    first = x[0] if isinstance(x, list) and x else x
    m = input_mask(first, mask_constant, mask)
    gen = None
    if rng is not None:
        from infnets._src.core.inputs import make_generator

        gen = make_generator(rng, getattr(first, "device", None))
    t1 = _MASK.set(m)
    t2 = _RNG.set(gen)
    try:
        yield
    finally:
        _MASK.reset(t1)
        _RNG.reset(t2)


def current_mask(x: Tensor, who: str) -> Tensor | None:
    """The active input mask if it applies to activations ``x`` (else ``None``).

    Raises:
        ValueError: ``x`` has positions that do not match the mask's (a layer before
            ``who`` moved positions without raising).
    """
    m = _MASK.get()
    if m is None or not isinstance(x, Tensor) or x.ndim < 3:
        return None
    if x.shape[0] != m.shape[0] or tuple(x.shape[2:]) != tuple(m.shape[1:]):
        raise ValueError(
            f"{who}: activations of shape {tuple(x.shape)} do not match the input mask of "
            f"shape {tuple(m.shape)} (examples, positions); masks need every layer before "
            "it to keep the positions."
        )
    return m


def current_generator() -> torch.Generator | None:
    """The generator passed as ``apply_fn(..., rng=...)``, if any."""
    return _RNG.get()


def reject_mask(who: str, what: str = "moves positions") -> None:
    """Raise when a mask is active (finite network) for a layer that cannot honour it."""
    if _MASK.get() is not None:
        raise ValueError(_reject_message(who, what))


def reject_kernel_mask(k: Kernel, who: str, what: str = "moves positions") -> None:
    """Raise when a record carries masks into a layer that cannot honour them."""
    if k.mask1 is not None or k.mask2 is not None:
        raise ValueError(_reject_message(who, what))


def _reject_message(who: str, what: str) -> str:
    return (
        f"{who} {what}, so it cannot keep padded positions apart from real ones and "
        "would mix padding into the result. With masks (mask_constant/mask), only layers "
        "acting on each position (activations, LayerNorm, Dropout, Conv with a (1,)*d "
        "filter and stride 1) and GlobalSelfAttention, GlobalAvgPool, GlobalSumPool, "
        "Flatten may follow the input; remove the mask or this layer."
    )


# ----------------------------------------------------------------- kernels
def _keep(mask: Tensor, like: Tensor) -> Tensor:
    return (~mask).to(like.dtype)


def own_keep(k: Kernel, which: int = 1) -> tuple[Tensor, Tensor] | None:
    """``(keep_a, keep_b)`` broadcastable to ``cov1`` (``which=1``) or ``cov2``.

    ``keep`` is 1 at real positions and 0 at padded ones; ``None`` without masks.
    """
    m = k.mask1 if which == 1 or k.mask2 is None else k.mask2
    if k.mask1 is None and k.mask2 is None:
        return None
    like = k.cov1
    if m is None:
        m = torch.zeros((k.n1 if which == 1 else k.n2,) + k.spatial_shape, dtype=torch.bool)
        m = m.to(like.device)
    keep = _keep(m, like)
    if k.is_full_spatial:
        return _first(keep), _second(keep)
    return keep, keep


def _masks(k: Kernel) -> tuple[Tensor, Tensor]:
    n2 = k.n2 if k.cov2 is not None else k.n1
    dev = k.nngp.device
    m1 = k.mask1
    if m1 is None:
        m1 = torch.zeros((k.n1,) + k.spatial_shape, dtype=torch.bool, device=dev)
    m2 = k.mask2 if k.cov2 is not None else m1
    if m2 is None:
        m2 = torch.zeros((n2,) + k.spatial_shape, dtype=torch.bool, device=dev)
    return m1, m2


def pair_keep(k: Kernel) -> tuple[Tensor, Tensor] | None:
    """``(keep1, keep2)`` broadcastable to ``k.nngp`` (either pair layout), or ``None``.

    ``keep1[i, j, p, ...]`` is 1 when position ``p`` of example ``i`` (first batch) is real.
    """
    if k.mask1 is None and k.mask2 is None:
        return None
    m1, m2 = _masks(k)
    keep1, keep2 = _keep(m1, k.nngp), _keep(m2, k.nngp)
    if k.is_full_spatial:
        keep1, keep2 = _first(keep1), _second(keep2)
    if k.pair_index is not None:
        return (
            gather_examples(keep1, k.pair_index[0]),
            gather_examples(keep2, k.pair_index[1]),
        )
    return keep1.unsqueeze(1), keep2.unsqueeze(0)


def remask(k: Kernel) -> Kernel:
    """Zero every covariance that involves a padded position (exact for zeroed outputs)."""
    keep = pair_keep(k)
    if keep is None:
        return k
    k1, k2 = keep
    scale = k1 * k2
    own1 = own_keep(k, 1)
    own2 = None if k.cov2 is None else own_keep(k, 2)
    return k.replace(
        nngp=k.nngp * scale,
        ntk=None if k.ntk is None else k.ntk * scale,
        cov1=k.cov1 * (own1[0] * own1[1]),  # type: ignore[index]
        cov2=None if k.cov2 is None else k.cov2 * (own2[0] * own2[1]),  # type: ignore[index]
    )
