"""Fused CPU kernels (``torch.compile``) for the largest convolutional covariances.

Layers that mix positions (pooling) need the covariance of every pair of pixels
of every pair of examples: ``P^2`` entries per pair for ``P`` positions. Eager
torch evaluates an activation's covariance map (~12 elementwise ops) and a
convolution's window sums (one pass per filter offset) as separate passes over
tensors far larger than the CPU caches, so those passes are memory-bound. Here
the two hot spots are compiled by TorchInductor into one loop nest each:

* :func:`pair_map`: an activation's fused pair maps (``pair_factors`` /
  ``pair_maps`` of the ReLU family and Erf) and the NTK update
  ``Theta' = E[phi' phi'] Theta``;
* :func:`conv_pair`: a ``Conv`` layer's NNGP and NTK window sums,
  ``K' = b^2 + W^2/|F| sum_f K(s p + f, s p' + f)`` and
  ``Theta' = K' + W^2/|F| sum_f Theta(s p + f, s p' + f)`` (NTK parameterization).

They are kept separate on purpose: fusing the activation into the convolution's
stencil would recompute it once per filter offset.

Used only where it pays and is safe: tiled problems of at least
:data:`MIN_TOTAL` covariance entries per layer (e.g. the 1797 8x8 digits with
pooling: 6.6e9), CPU tensors of at least :data:`MIN_ENTRIES` entries, no
autograd, zero padding, and ``torch.compile`` working on this machine (a C++
compiler). The first use of each shape pattern
compiles (seconds; cached on disk by TorchInductor across processes). Any failure
disables the path for the process with a warning, and the eager code runs with
the same results. ``INFNETS_COMPILE=0`` disables it; ``INFNETS_COMPILE=1`` also
allows it below the size threshold, like ``jax.jit`` (for many calls on smaller
problems: 128 8x8 images with pooling, 1.57 s eager, 0.74 s per call once compiled).
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from infnets._src.core.kernel import memory_order

__all__ = ["MIN_ENTRIES", "MIN_TOTAL", "conv_pair", "enabled", "large_problem", "pair_map"]

#: smallest covariance (entries of one tensor) worth a compiled kernel
MIN_ENTRIES = 1 << 18
#: smallest problem (covariance entries per layer over all tiles) worth compiling
MIN_TOTAL = 1 << 30
_LARGE = [0]

_LOCK = threading.Lock()
_COMPILING = threading.Lock()
#: most shape patterns compiled per process (each costs seconds the first time)
MAX_VARIANTS = 32
#: uses of a shape pattern that run eager before it is compiled
COMPILE_AFTER = 1
_CACHE: dict[Any, Callable[..., Any]] = {}
_SEEN: dict[Any, int] = {}
_BROKEN: list[str] = []


def enabled(t: Tensor) -> bool:
    """Whether the compiled kernels should handle covariance ``t``.

    Automatically only inside :func:`large_problem` (a tiled computation big
    enough to repay seconds of compilation) and for tensors of at least
    :data:`MIN_ENTRIES` entries.
    """
    setting = os.environ.get("INFNETS_COMPILE", "auto")
    if setting == "0" or _BROKEN or t.device.type != "cpu" or t.requires_grad:
        return False
    return setting == "1" or (_LARGE[0] > 0 and t.numel() >= MIN_ENTRIES)


@contextlib.contextmanager
def large_problem(entries: int) -> Iterator[None]:
    """Allow the compiled kernels while computing ``entries`` covariance entries per layer.

    Below :data:`MIN_TOTAL` entries the eager code is used: compiling would cost
    more than it saves.
    """
    on = entries >= MIN_TOTAL
    with _LOCK:
        _LARGE[0] += on
    try:
        yield
    finally:
        with _LOCK:
            _LARGE[0] -= on


def _signature(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, Tensor))


def _own_code(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``fn`` with a code object of its own, so each variant is a separate dynamo entry.

    TorchDynamo caches compiled graphs per code object and stops (here: raises,
    under ``fullgraph``) after ``recompile_limit`` variants of one; the variants
    of a kernel built by one factory share its inner function's code.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{n}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _call(key: Any, build: Callable[[], Callable[..., Any]], *args: Any) -> Any:
    """Run the compiled function ``key`` for these argument shapes; ``None`` to run eager.

    Every shape pattern gets its own static compilation (tiles repeat a few
    shapes; static shapes vectorise best). A pattern is compiled once it has been
    seen :data:`COMPILE_AFTER` times, so one-off shapes (edge tiles, probes) stay
    eager, and at most :data:`MAX_VARIANTS` patterns are compiled per process.
    """
    full_key = (key, _signature(args))
    fn = _CACHE.get(full_key)
    if fn is None:
        with _LOCK:
            seen = _SEEN.get(full_key, 0)
            _SEEN[full_key] = seen + 1
            if seen < COMPILE_AFTER or len(_CACHE) >= MAX_VARIANTS:
                return None
    try:
        if fn is None:
            # one compilation at a time; meanwhile other tile threads run eager
            # instead of waiting for it (seconds per kernel)
            if not _COMPILING.acquire(blocking=False):
                return None
            try:
                fn = _CACHE.get(full_key)
                if fn is None:
                    # cpp_wrapper: the generated C++ entry point releases the GIL, so
                    # tiles on several threads run compiled kernels side by side (the
                    # default Python wrapper holds it for the whole kernel)
                    fn = torch.compile(
                        _own_code(build(), len(_CACHE)),
                        dynamic=False,
                        fullgraph=True,
                        options={"cpp_wrapper": True},
                    )
                    out = fn(*args)  # compiles here
                    _CACHE[full_key] = fn
                    return out
            finally:
                _COMPILING.release()
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _BROKEN.append(repr(err))
        warnings.warn(
            "infnets: torch.compile failed for a convolutional covariance kernel; using the "
            f"eager implementation from now on (same results, slower). Cause: {err!r:.300}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _in_order(x: Tensor, order: list[int], inverse: list[int]) -> Tensor:
    """``x`` stored in the memory order ``order`` (the compiler writes it so directly)."""
    return x.permute(order).contiguous().permute(inverse)


# ------------------------------------------------------------------- activations
def pair_map(
    act: Any, c: Tensor, f1: Tensor, f2: Tensor, ntk: Tensor | None
) -> tuple[Tensor, Tensor | None] | None:
    """``(E[phi phi], E[phi' phi'] Theta)`` by ``act.pair_maps``, compiled (any spatial layout).

    Args:
        act: an activation defining ``pair_maps`` (its hyper-parameters are floats).
        c: pair covariances ``(*B, *S)``.
        f1, f2: the two members' factors from ``act.pair_factors``, broadcastable to ``c``.
        ntk: the NTK (same shape as ``c``) or ``None``.

    Returns:
        The new covariance and NTK, or ``None`` when the compiled path is unavailable.
    """
    order, inverse = memory_order(c)
    key = ("map", type(act), tuple(sorted(vars(act).items())), ntk is None, tuple(order))

    def build() -> Callable[..., Any]:
        if ntk is None:

            def fn(c: Tensor, f1: Tensor, f2: Tensor) -> Tensor:
                return _in_order(act.pair_maps(c, f1, f2, False)[0], order, inverse)

            return fn

        def fn_ntk(c: Tensor, f1: Tensor, f2: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            new, dot = act.pair_maps(c, f1, f2, True)
            return _in_order(new, order, inverse), _in_order(dot * t, order, inverse)

        return fn_ntk

    if ntk is None:
        out = _call(key, build, c, f1, f2)
        return None if out is None else (out, None)
    return _call(key, build, c, f1, f2, ntk)


# ------------------------------------------------------------------ convolutions
def supports(geoms: Sequence[Any]) -> bool:
    """Zero-padded (or unpadded) windows; circular padding stays eager."""
    return not any(g.circular for g in geoms)


def _window_sums(t: Tensor, lead: int, full: bool, geoms: Sequence[Any]) -> Tensor:
    """``sum_f t_pad(s p + f, s p' + f)`` (or ``t_pad(s p + f)`` per position), all offsets."""
    nd = len(geoms)
    per = 2 if full else 1
    pads: list[int] = []
    for g in reversed(geoms):
        pads += [g.lo, g.hi] * per
    p = F.pad(t, pads) if any(pads) else t
    offsets: list[tuple[int, ...]] = [()]
    for g in geoms:
        offsets = [o + (f,) for o in offsets for f in range(g.k)]
    out: Tensor | None = None
    for off in offsets:
        idx: list[slice] = [slice(None)] * lead
        for a in range(nd):
            g, f = geoms[a], off[a]
            sl = slice(f, f + g.s * (g.out - 1) + 1, g.s)
            idx += [sl] * per
        v = p[tuple(idx)]
        out = v if out is None else out + v
    assert out is not None
    return out


def conv_pair(
    nngp: Tensor,
    ntk: Tensor | None,
    lead: int,
    full: bool,
    geoms: Sequence[Any],
    w2f: float,
    b2: float | None,
) -> tuple[Tensor, Tensor | None] | None:
    """A ``Conv`` layer (NTK parameterization) on spatial covariances, compiled.

    Args:
        nngp: ``(*B, s_1, s_1', ..., s_d, s_d')`` covariances (``full``) or
            ``(*B, s_1, ..., s_d)`` per-position ones; ``lead`` example axes.
        ntk: the NTK in the same layout, or ``None``.
        lead: number of example axes.
        full: the interleaved pixel-pair layout.
        geoms: one window geometry per spatial axis (no circular padding).
        w2f: ``W_std^2 / |filter|``.
        b2: ``b_std^2`` or ``None``.

    Returns:
        ``(K', Theta')`` in the input's memory order (example axes innermost), or
        ``None`` when the compiled path is unavailable.
    """
    order, inverse = memory_order(nngp)
    key = ("conv", tuple(geoms), lead, full, w2f, b2, ntk is None, tuple(order))

    def build() -> Callable[..., Any]:
        def fn(k: Tensor, t: Tensor | None = None) -> Any:
            new = _window_sums(k, lead, full, geoms) * w2f
            if b2 is not None:
                new = new + b2
            if t is None:
                return _in_order(new, order, inverse)
            theta = _window_sums(t, lead, full, geoms) * w2f + new
            return _in_order(new, order, inverse), _in_order(theta, order, inverse)

        return fn

    if ntk is None:
        out = _call(key, build, nngp)
        return None if out is None else (out, None)
    return _call(key, build, nngp, ntk)
