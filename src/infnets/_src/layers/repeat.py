r"""``repeat(layer, n)``: the same layer applied ``n`` times (Neural Tangents' ``stax.repeat``).

The finite network draws independent parameters for each of the ``n`` applications, so
it is ``serial(layer, ..., layer)``; its kernel applies the layer's kernel map ``n``
times in a loop, without building ``n`` layer objects (the kernel of a composition is the
composition of the kernel maps; Lee et al. 2018, "Deep neural networks as Gaussian
processes", eq. 4). From its second application on, the layer must keep the shape of its
input (the first may change it, e.g. the width).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from infnets._src.core import inputs as _inputs
from infnets._src.core.protocol import FusedStep, KernelTree, Params, ShapeTree
from infnets._src.layers.base import Layer, adapt_spatial, as_layer_list

__all__ = ["Repeat", "repeat"]


class Repeat(Layer):
    """``layer`` applied ``n`` times with independent parameters (see :func:`repeat`)."""

    def __init__(self, layer: Layer, n: int) -> None:
        (self.layer,) = as_layer_list([layer], "repeat")
        self.n = _inputs.check_int(n, "repeat: n", 1)

    def __repr__(self) -> str:
        return f"repeat({self.layer!r}, {self.n})"

    def sublayers(self) -> Sequence[Layer]:
        return (self.layer,) * self.n  # n references to one object

    def fused_steps(self) -> Sequence[FusedStep] | None:
        own = self.layer.fused_steps()
        return None if own is None else list(own) * self.n

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        params = []
        shape = in_shape
        for i in range(self.n):
            out, p = self.layer.init(gen, shape, dtype, device)
            if i and out != shape:
                raise ValueError(
                    f"{self!r}: the layer maps shape {shape} to {out}, but repeat needs a "
                    "layer that keeps its input's shape (from its second application on); "
                    "use serial(...) for layers that change it."
                )
            shape = out
            params.append(p)
        return shape, tuple(params)

    def apply(self, params: Params, x: Any) -> Any:
        if len(params) != self.n:
            raise ValueError(f"{self!r} needs {self.n} parameter sets, got {len(params)}.")
        for p in params:
            x = self.layer.apply(p, x)
        return x

    # --------------------------------------------------------------- infinite
    def kernel(self, k: KernelTree) -> KernelTree:
        return self.kernel_planned(k, True)

    def _needs(self, out_full: Any) -> list[Any]:
        """What the output of each application must keep, last first, to a fixed point."""
        outs = [out_full] * self.n
        for i in range(self.n - 1, 0, -1):
            outs[i - 1] = self.layer.spatial_requirement(outs[i])
            if outs[i - 1] == outs[i]:
                outs[: i - 1] = [outs[i - 1]] * (i - 1)  # the same map from here on
                break
        return outs

    def spatial_requirement(self, out_full: Any) -> Any:
        return self.layer.spatial_requirement(self._needs(out_full)[0])

    def kernel_planned(self, k: KernelTree, out_full: Any) -> KernelTree:
        if out_full is None:
            for _ in range(self.n):
                k = self.layer.kernel_planned(k, None)
            return k
        for out in self._needs(out_full):
            k = adapt_spatial(k, self.layer.spatial_requirement(out), self.layer)
            k = self.layer.kernel_planned(k, out)
        return adapt_spatial(k, out_full, self)


def repeat(layer: Layer, n: int) -> Repeat:
    """Apply ``layer`` ``n`` times: ``serial(layer, ..., layer)`` with ``n`` copies.

    Each application has its own parameters (params: a tuple of ``n`` of the layer's);
    the kernel loops over one layer object instead of unrolling ``n`` of them.

    Args:
        layer: an infnets layer whose output shape is a fixed point (e.g. a residual
            block, or ``serial(Conv(64, (3,), padding='SAME'), Relu())``).
        n: number of applications, >= 1.

    Returns:
        A layer unpacking into ``(init_fn, apply_fn, kernel_fn)``.

    Raises:
        ValueError: (at ``init_fn``) the layer changes the shape of its input.

    Examples:
        >>> from infnets import stax
        >>> block = stax.serial(stax.Dense(64, 1.5, 0.1), stax.Erf())
        >>> net = stax.serial(stax.Dense(64), stax.repeat(block, 5), stax.Dense(1))
        >>> net.kernel_fn(torch.ones(2, 3), None, 'ntk').shape
        torch.Size([2, 2])
    """
    return Repeat(layer, n)
