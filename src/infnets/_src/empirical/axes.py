"""Output-axis bookkeeping for empirical kernels: ``trace_axes`` and ``diagonal_axes``.

A model maps a batch ``x`` of ``N`` examples to ``f(x)`` of shape ``(N, S_1, ..., S_k)``.
The full empirical kernel between two batches has one pair of axes per output axis,

    K[n1, n2, s_1, s_1', ..., s_k, s_k'] = <d f(x1)[n1, s_1..s_k] / d theta,
                                            d f(x2)[n2, s_1'..s_k'] / d theta>,

stored with the pairs interleaved (``(N1, N2, S_1, S_1', ...)``). Two reductions shrink it:

* ``trace_axes``: the pair ``(s_i, s_i')`` is replaced by its normalized trace
  ``(1 / S_i) sum_s K[..., s, s, ...]`` -- the mean over the diagonal of that axis pair (this
  is Neural Tangents' convention: it divides the trace by the size of the traced axes), so
  the result estimates the kernel of one output unit;
* ``diagonal_axes``: only the diagonal ``s_i = s_i'`` is kept, as one axis. Axis 0 (the batch
  axis) may be diagonal: ``K[n, ...]`` between ``x1[n]`` and ``x2[n]`` (``N1 == N2``).

All contractions are written as ``torch.einsum`` strings built here: ``a1``/``a2`` name the
axes of ``f(x1)``/``f(x2)`` (a traced or diagonal axis gets the same letter in both) and
``out`` names the kernel's axes. Upper-case letters only, so callers can add lower-case
letters of their own.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_axes_arg(axes: Any, name: str, who: str) -> tuple[int, ...]:
    """Validate a ``trace_axes``/``diagonal_axes`` argument (ints, no duplicates)."""
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        axes = (int(axes),)
    if not isinstance(axes, Sequence) or isinstance(axes, str):
        raise TypeError(f"{who}: {name} must be a tuple of ints such as (-1,), got {axes!r}.")
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"{who}: {name} must contain ints, got {a!r} in {tuple(axes)!r}.")
        out.append(int(a))
    if len(set(out)) != len(out):
        raise ValueError(f"{who}: {name}={tuple(out)} names an axis twice.")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OutputAxes:
    """Einsum strings and shapes of one kernel evaluation.

    Attributes:
        a1: letters of the axes of ``f(x1)`` (batch first).
        a2: letters of the axes of ``f(x2)``.
        out: letters of the kernel's axes.
        shape: the kernel's shape.
        trace_size: product of the traced axes' sizes (the normalization).
        batch_diag: whether axis 0 is diagonal (``K[n]`` between ``x1[n]`` and ``x2[n]``).
        work_pairs: output-unit pairs contracted per pair of examples.
        mirror: permutation turning ``K(x2, x1)`` into ``K(x1, x2)``.
    """

    a1: str
    a2: str
    out: str
    shape: tuple[int, ...]
    trace_size: int
    batch_diag: bool
    work_pairs: int
    mirror: tuple[int, ...]

    @property
    def pair_letters(self) -> str:
        """Letters of the example axes in ``out`` (one when ``batch_diag``)."""
        return self.out[:1] if self.batch_diag else self.out[:2]


def make_axes(
    shape1: tuple[int, ...],
    shape2: tuple[int, ...],
    trace_axes: tuple[int, ...],
    diagonal_axes: tuple[int, ...],
    who: str,
) -> OutputAxes:
    """Resolve ``trace_axes``/``diagonal_axes`` against the output shapes.

    Args:
        shape1: shape of ``f(x1)``, batch first.
        shape2: shape of ``f(x2)``, batch first.
        trace_axes: axes of ``f(x)`` to trace (negative counts from the end).
        diagonal_axes: axes of ``f(x)`` to keep only the diagonal of.
        who: public function name for error messages.

    Returns:
        The :class:`OutputAxes`.
    """
    nd = len(shape1)
    if len(shape2) != nd:
        raise ValueError(
            f"{who}: the model's outputs have different shapes for x1 and x2: f(x1) has shape "
            f"{shape1} but f(x2) has shape {shape2}; they must have the same number of axes."
        )

    def canon(axes: tuple[int, ...], name: str) -> tuple[int, ...]:
        out = []
        for a in axes:
            if not -nd <= a < nd:
                raise ValueError(
                    f"{who}: {name}={axes} names axis {a}, but the model's output f(x1) has "
                    f"shape {shape1} ({nd} axes, batch first). Use axes in [{-nd}, {nd - 1}] "
                    "(e.g. -1 for the last, logit axis), or () to keep every output axis."
                )
            out.append(a % nd)
        if len(set(out)) != len(out):
            raise ValueError(f"{who}: {name}={axes} names the same axis twice.")
        return tuple(out)

    trace = canon(trace_axes, "trace_axes")
    diag = canon(diagonal_axes, "diagonal_axes")
    if 0 in trace:
        raise ValueError(
            f"{who}: trace_axes={trace_axes} includes the batch axis 0, which cannot be traced; "
            "use diagonal_axes=(0,) to get K(x1[n], x2[n]) only."
        )
    if set(trace) & set(diag):
        raise ValueError(
            f"{who}: trace_axes={trace_axes} and diagonal_axes={diagonal_axes} share an axis."
        )
    for a in trace + diag:
        if a and shape1[a] != shape2[a]:
            raise ValueError(
                f"{who}: the model's outputs have different shapes for x1 and x2: f(x1) has "
                f"shape {shape1}, f(x2) has shape {shape2}; traced or diagonal axis {a} must "
                "have the same size in both."
            )
    batch_diag = 0 in diag
    if batch_diag and shape1[0] != shape2[0]:
        raise ValueError(
            f"{who}: diagonal_axes includes the batch axis 0, so x1 and x2 must have the "
            f"same number of examples; got {shape1[0]} and {shape2[0]}."
        )
    letters = iter(string.ascii_uppercase)
    n = next(letters)
    m = n if batch_diag else next(letters)
    a1, a2 = n, m
    out = n if batch_diag else n + m
    shape: list[int] = [shape1[0]] if batch_diag else [shape1[0], shape2[0]]
    swap = {n: m, m: n}
    work = 1
    for a in range(1, nd):
        c = next(letters)
        if a in trace:
            a1, a2 = a1 + c, a2 + c
            work *= shape1[a]
        elif a in diag:
            a1, a2, out = a1 + c, a2 + c, out + c
            shape.append(shape1[a])
            work *= shape1[a]
        else:
            d = next(letters)
            a1, a2, out = a1 + c, a2 + d, out + c + d
            shape += [shape1[a], shape2[a]]
            swap.update({c: d, d: c})
            work *= shape1[a] * shape2[a]
    mirror = tuple(out.index(swap.get(ch, ch)) for ch in out)
    trace_size = math.prod(shape1[a] for a in trace)
    return OutputAxes(a1, a2, out, tuple(shape), trace_size, batch_diag, work, mirror)
