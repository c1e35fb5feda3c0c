r"""``DotGeneral`` with a constant operand: a fixed linear map of positions.

``lax.dot_general(lhs, rhs, (contracting, batch))`` contracts and batches axes of two
arrays (Neural Tangents' ``stax.DotGeneral``). When one operand is a constant and the
other the activations ``x`` of shape ``(N, C, *spatial)``, and neither the batch axis 0
nor the channel axis 1 of ``x`` is contracted or batched, every output unit is a fixed
linear combination of the same channel at several positions,
``y[n, c, q] = sum_p M[q, p] x[n, c, p]``, so the Gaussian process maps to one with
covariance (and NTK, the constant having no parameters)

``K'(q, q') = sum_{p, p'} M[q, p] M[q', p'] K(p, p')``

over flattened positions. Contracting the channel axis mixes infinitely many channels
with fixed weights, and two inputs (``lhs = rhs = None``) multiply features; neither has
an infinite-width kernel here, so both are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.core.protocol import Params, ShapeTree
from infnets._src.layers.base import Layer

__all__ = ["DotGeneral"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _axes(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, Sequence) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"DotGeneral: {what} must be a tuple of ints, got {value!r}.")
    return tuple(value)


def _dimension_numbers(value: Any) -> tuple[tuple[tuple[int, ...], ...], ...]:
    try:
        (lc, rc), (lb, rb) = value
    except (TypeError, ValueError):
        raise ValueError(
            "DotGeneral: dimension_numbers must be ((lhs_contracting, rhs_contracting), "
            f"(lhs_batch, rhs_batch)) as in jax.lax.dot_general, got {value!r}."
        ) from None
    out = (
        (_axes(lc, "lhs_contracting"), _axes(rc, "rhs_contracting")),
        (_axes(lb, "lhs_batch"), _axes(rb, "rhs_batch")),
    )
    for a, b, what in ((out[0][0], out[0][1], "contracting"), (out[1][0], out[1][1], "batch")):
        if len(a) != len(b):
            raise ValueError(f"DotGeneral: {what} axes {a} and {b} must pair up one to one.")
    return out


class DotGeneral(Layer):
    r"""``lax.dot_general`` of the activations with a constant ``lhs`` or ``rhs``.

    ``y = dot_general(x, rhs)`` (or ``dot_general(lhs, x)``) with the output axes in
    ``jax.lax.dot_general`` order (batch axes, then ``lhs``'s free axes, then ``rhs``'s),
    after which the activations' batch and channel axes are moved to the front, so the
    result is again ``(N, C, *spatial)``. Axis numbers of the activations refer to the
    ``(N, C, *spatial)`` layout; 0 and 1 must stay free. Kernel: ``K' = M K M^T`` over
    flattened positions (module docstring), for the NNGP and the NTK alike. It needs
    the full pixel-pair covariance of its input.

    Args:
        lhs: a constant tensor, or ``None`` for the activations.
        rhs: a constant tensor, or ``None`` for the activations (exactly one of the two
            must be ``None``).
        dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch,
            rhs_batch))`` as in ``jax.lax.dot_general``.

    Examples:
        >>> from infnets import stax
        >>> avg = torch.full((4, 2), 0.25)  # (positions in, positions out)
        >>> net = stax.serial(stax.Conv(8, (3,), padding='SAME'), stax.Relu(),
        ...                   stax.DotGeneral(rhs=avg, dimension_numbers=(((2,), (0,)), ((), ()))),
        ...                   stax.Flatten(), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(3, 1, 4), None, 'nngp').shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        lhs: Tensor | None = None,
        rhs: Tensor | None = None,
        dimension_numbers: Any = (((), ()), ((), ())),
    ) -> None:
        if (lhs is None) == (rhs is None):
            raise ValueError(
                "DotGeneral: exactly one of lhs and rhs must be a constant tensor (the other, "
                "None, is the activations). Products of two activations have no "
                "infinite-width kernel here; use stax.FanInProd for elementwise products."
                if lhs is None
                else "DotGeneral: one of lhs and rhs must be None (the activations)."
            )
        const = lhs if lhs is not None else rhs
        if not isinstance(const, Tensor):
            raise TypeError(
                f"DotGeneral: the constant operand must be a torch.Tensor, got "
                f"{type(const).__name__}."
            )
        self.lhs, self.rhs = lhs, rhs
        self.dimension_numbers = _dimension_numbers(dimension_numbers)
        self._x_is_lhs = lhs is None
        (lc, rc), (lb, rb) = self.dimension_numbers
        c_axes, b_axes = (rc, rb) if self._x_is_lhs else (lc, lb)
        for a in c_axes + b_axes:
            if not -const.ndim <= a < const.ndim:
                raise ValueError(
                    f"DotGeneral: axis {a} is out of range for the constant of shape "
                    f"{tuple(const.shape)}."
                )

    @property
    def constant(self) -> Tensor:
        """The constant operand."""
        const = self.lhs if self.lhs is not None else self.rhs
        assert const is not None  # __init__ requires exactly one of the two
        return const

    def __repr__(self) -> str:
        side = "rhs" if self._x_is_lhs else "lhs"
        return (
            f"DotGeneral({side}=<{tuple(self.constant.shape)}>, "
            f"dimension_numbers={self.dimension_numbers})"
        )

    def spatial_requirement(self, out_full: Any) -> Any:
        return True

    # -------------------------------------------------------------- the map
    def _equation(self, x_ndim: int, shape: Sequence[int]) -> tuple[str, list[int]]:
        """The einsum equation ``x, const -> out`` and where ``N``/``C`` land in ``out``."""
        const = self.constant
        (lc, rc), (lb, rb) = self.dimension_numbers
        x_c, k_c, x_b, k_b = (lc, rc, lb, rb) if self._x_is_lhs else (rc, lc, rb, lb)

        def norm(axes: Sequence[int], n: int) -> tuple[int, ...]:
            return tuple(a % n for a in axes)

        x_c, x_b = norm(x_c, x_ndim), norm(x_b, x_ndim)
        k_c, k_b = norm(k_c, const.ndim), norm(k_b, const.ndim)
        if any(a < 0 or a >= x_ndim for a in x_c + x_b):
            raise ValueError(f"{self!r}: an axis is out of range for activations of rank {x_ndim}.")
        if {0, 1} & set(x_c + x_b):
            raise ValueError(
                f"{self!r} contracts or batches the activations' batch axis 0 or channel axis "
                "1, which has no infinite-width kernel; contract spatial axes (2, 3, ...) only."
            )
        for xa, ka in zip(x_c + x_b, k_c + k_b):
            if shape[xa] != const.shape[ka]:
                raise ValueError(
                    f"{self!r}: axis {xa} of the activations (size {shape[xa]}) is paired with "
                    f"axis {ka} of the constant (size {const.shape[ka]}); sizes must match."
                )
        letters = iter(_LETTERS)
        x_sub = [next(letters) for _ in range(x_ndim)]
        k_sub = [next(letters) for _ in range(const.ndim)]
        for xa, ka in zip(x_c + x_b, k_c + k_b):
            k_sub[ka] = x_sub[xa]
        batch = [x_sub[a] for a in x_b]
        x_free = [x_sub[a] for a in range(x_ndim) if a not in x_c + x_b]
        k_free = [k_sub[a] for a in range(const.ndim) if a not in k_c + k_b]
        out = batch + (x_free + k_free if self._x_is_lhs else k_free + x_free)
        lhs_sub, rhs_sub = (x_sub, k_sub) if self._x_is_lhs else (k_sub, x_sub)
        eq = f"{''.join(lhs_sub)},{''.join(rhs_sub)}->{''.join(out)}"
        return eq, [out.index(x_sub[0]), out.index(x_sub[1])]

    def _run(self, x: Tensor) -> Tensor:
        eq, (n_at, c_at) = self._equation(x.ndim, tuple(x.shape))
        const = self.constant.to(dtype=x.dtype, device=x.device)
        lhs, rhs = (x, const) if self._x_is_lhs else (const, x)
        return torch.einsum(eq, lhs, rhs).movedim((n_at, c_at), (0, 1))

    def position_map(self, spatial: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, tuple]:
        """``(M, out_spatial)``: the ``(Q, P)`` map of flattened positions and its output shape."""
        p = math.prod(spatial)
        basis = torch.eye(p, dtype=dtype).reshape((p, 1) + tuple(spatial))
        out = self._run(basis)  # (P, 1, *out_spatial)
        return out.reshape(p, -1).T, tuple(out.shape[2:])

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        if isinstance(in_shape, list):
            raise ValueError(f"{self!r} received {len(in_shape)} branches; join them first.")
        probe = torch.zeros((1,) + tuple(in_shape[1:]), device="meta")
        out = self._run(probe)
        return (in_shape[0],) + tuple(out.shape[1:]), ()

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        return self._run(x)

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        self._equation(len(k.shape1), tuple(k.shape1))
        if not k.is_spatial:
            raise ValueError(
                f"{self!r}: fully-connected activations (N, C) have no spatial axis to contract."
            )
        if k.diagonal_spatial and math.prod(k.spatial_shape) > 1:
            raise ValueError(
                f"{self!r} mixes positions and needs the full spatial covariance of its input; "
                "call kernel_fn with diagonal_spatial=None (automatic) or False."
            )
        spatial = k.spatial_shape
        m, out_spatial = self.position_map(spatial, k.nngp.dtype)
        m = m.to(device=k.nngp.device)
        d = len(spatial)

        def mapped(t: Tensor | None, lead: int) -> Tensor | None:
            if t is None:
                return None
            order = list(range(lead)) + [lead + 2 * a for a in range(d)]
            order += [lead + 2 * a + 1 for a in range(d)]
            flat = t.permute(order).reshape(t.shape[:lead] + (m.shape[1], m.shape[1]))
            out = m @ flat @ m.T
            if not out_spatial:
                return out.reshape(t.shape[:lead])
            out = out.reshape(t.shape[:lead] + out_spatial + out_spatial)
            e = len(out_spatial)
            inter = list(range(lead))
            for a in range(e):
                inter += [lead + a, lead + e + a]
            return out.permute(inter)

        lead = 1 if k.is_packed else 2

        def shape(s: tuple[int, ...]) -> tuple[int, ...]:
            return (s[0], s[1]) + out_spatial

        return k.replace(
            nngp=mapped(k.nngp, lead),
            ntk=mapped(k.ntk, lead),
            cov1=mapped(k.cov1, 1),
            cov2=mapped(k.cov2, 1),
            shape1=shape(k.shape1),
            shape2=shape(k.shape2),
            diagonal_spatial=False,
        )
