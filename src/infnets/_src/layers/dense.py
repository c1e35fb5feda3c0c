"""The fully-connected (affine) layer and its infinite-width kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core.protocol import Affine, FusedStep, Params, ShapeTree
from infnets._src.layers.base import Layer

__all__ = ["Dense"]

PARAMETERIZATIONS = ("ntk", "standard")


def check_parameterization(value: str, who: str) -> str:
    if value not in PARAMETERIZATIONS:
        raise ValueError(f"{who}: parameterization must be 'ntk' or 'standard', got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class Dense(Layer):
    r"""Fully-connected layer acting on the last axis, like ``torch.nn.Linear``.

    Its kernel is defined for ``(N, features)`` activations; convolutional
    ``(N, C, *spatial)`` activations are read out first (``Flatten``,
    ``GlobalAvgPool``), and ``Conv(out, (1,) * d)`` is the dense layer over the
    channels of each position.

    With ``n`` input features, the two parameterizations are

    * ``'ntk'`` (Jacot et al. 2018): ``y = W_std / sqrt(n) * x W^T + b_std * b``
      with ``W_ij, b_j ~ N(0, 1)``;
    * ``'standard'``: ``y = x W^T + b`` with ``W_ij ~ N(0, W_std^2 / n)``,
      ``b_j ~ N(0, b_std^2)``.

    Both give the same NNGP, ``K' = W_std^2 K + b_std^2`` (Neal 1996; Lee et al.
    2018). The NTKs differ (Sohl-Dickstein et al. 2020, arXiv 2001.07301):

    * NTK parameterization: ``Theta' = K' + W_std^2 Theta``;
    * standard parameterization: ``Theta' = n K + [b_std is not None] + W_std^2 Theta``,
      which grows with the width ``n`` of the layer's input (the gradient of a
      standard weight is not scaled by ``1 / sqrt(n)``).

    Args:
        out_dim: number of output features (the width of this layer).
        W_std: weight standard deviation, >= 0.
        b_std: bias standard deviation, >= 0; ``None`` for no bias parameter.
        parameterization: ``'ntk'`` or ``'standard'``.

    Examples:
        >>> from infnets import stax
        >>> k = stax.Dense(1, W_std=2.0, b_std=0.5).kernel_fn(torch.eye(3), None, 'nngp')
        >>> torch.allclose(k, 4.0 * torch.eye(3) / 3 + 0.25)
        True
    """

    out_dim: int
    W_std: float = 1.0
    b_std: float | None = None
    parameterization: str = "ntk"

    def __post_init__(self) -> None:
        _inputs.check_int(self.out_dim, "Dense: out_dim", 1)
        object.__setattr__(self, "W_std", _inputs.check_std(self.W_std, "Dense: W_std"))
        object.__setattr__(
            self, "b_std", _inputs.check_std(self.b_std, "Dense: b_std", allow_none=True)
        )
        check_parameterization(self.parameterization, "Dense")

    def fused_steps(self) -> list[FusedStep] | None:
        """One :class:`~infnets._src.core.protocol.Affine` step in the NTK parameterization
        with float hyper-parameters (tensor hyper-parameters keep the layer-by-layer path)."""
        w, b = self.W_std, self.b_std
        if self.parameterization != "ntk" or not isinstance(w, (int, float)):
            return None
        if b is not None and not isinstance(b, (int, float)):
            return None
        return [Affine(float(w) ** 2, 0.0 if b is None else float(b) ** 2)]

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        if isinstance(in_shape, list):
            raise ValueError(f"{self!r} received {len(in_shape)} branches; join them first.")
        n_in = in_shape[-1]
        if n_in <= 0:
            raise ValueError(f"{self!r}: input shape {in_shape} needs a positive last axis.")
        w = torch.randn((self.out_dim, n_in), generator=gen, dtype=dtype, device=device)
        params: dict[str, Tensor] = {}
        if self.parameterization == "standard":
            w = w * (float(self.W_std) / math.sqrt(n_in))
        params["W"] = w
        if self.b_std is not None:
            b = torch.randn((self.out_dim,), generator=gen, dtype=dtype, device=device)
            if self.parameterization == "standard":
                b = b * float(self.b_std)
            params["b"] = b
        return tuple(in_shape[:-1]) + (self.out_dim,), params

    def apply(self, params: Params, x: Any) -> Any:
        if isinstance(x, list):
            raise ValueError(f"{self!r} received {len(x)} branches; join them first.")
        _inputs.recheck_stds(self, ("W_std", "b_std"), "Dense")
        w = params["W"]
        if self.parameterization == "ntk":
            y = (x @ w.T) * (self.W_std / math.sqrt(w.shape[1]))
            if "b" in params:
                y = y + self.b_std * params["b"]
        else:
            y = x @ w.T
            if "b" in params:
                y = y + params["b"]
        return y

    # --------------------------------------------------------------- infinite
    def kernel(self, k: Any) -> Any:
        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        _inputs.recheck_stds(self, ("W_std", "b_std"), "Dense")
        if k.is_spatial:
            d = len(k.shape1) - 2
            raise ValueError(
                f"{self!r} acts on the last axis like torch.nn.Linear, but received "
                f"convolutional activations of shape {tuple(k.shape1)} = (N, C, *spatial), whose "
                "infinite axis is the channel axis 1. Read out with stax.Flatten() or "
                f"stax.GlobalAvgPool() first, or use stax.Conv(out_chan, {(1,) * d}) for a "
                "dense layer over the channels of each position."
            )
        w2 = self.W_std**2
        b2 = 0.0 if self.b_std is None else self.b_std**2

        def affine(cov: Tensor) -> Tensor:
            out = cov * w2
            return out.add_(b2) if self.b_std is not None else out

        nngp = affine(k.nngp)
        ntk = k.ntk
        if ntk is not None:
            if self.parameterization == "ntk":
                if isinstance(w2, float):
                    ntk = torch.add(nngp, ntk, alpha=w2)
                else:
                    ntk = (ntk * w2).add_(nngp)
            else:
                n_in = k.width
                ntk = n_in * k.nngp + w2 * ntk
                if self.b_std is not None:
                    ntk = ntk + 1.0
        out = lambda s: tuple(s[:-1]) + (self.out_dim,)
        return k.replace(
            nngp=nngp,
            ntk=ntk,
            cov1=affine(k.cov1),
            cov2=None if k.cov2 is None else affine(k.cov2),
            shape1=out(k.shape1),
            shape2=out(k.shape2),
            is_gaussian=True,
            last_affine=object(),
            centred=True,
        )
