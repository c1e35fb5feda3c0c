r"""Kernel-only maps of normalised covariances: ``ExpNormalized``.

Shankar et al. 2020 ("Neural kernels without tangents", section 3, page 6) compose
convolutional kernels with the *Gaussian normalised* map of the correlation
``rho = k / sqrt(q1 q2)``,

``K' = sqrt(q1 q2) exp(gamma (rho + shift))``,

which is a valid kernel map (the exponential of a positive definite kernel, rescaled by
``sqrt(q1 q2)``) but not the kernel of any elementwise nonlinearity of a finite network:
the layer has no finite twin, as in Neural Tangents.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel
from infnets._src.elementwise.base import ElementwiseLayer

__all__ = ["ExpNormalized"]

#: variances below this count as zero (their correlation is taken as 0, not 0/0)
_TINY = 1e-30


@dataclasses.dataclass(frozen=True, eq=False)
class ExpNormalized(ElementwiseLayer):
    r"""The Gaussian normalised kernel map (kernel-only; Shankar et al. 2020, page 6).

    With ``s = sqrt(q1 q2)`` and ``rho = k / s``:

    * NNGP: ``K' = s exp(gamma (rho + shift))``;
    * NTK: ``Theta' = Theta dK'/dk = Theta gamma exp(gamma (rho + shift))``.

    The variances map to ``q exp(gamma (1 + shift))``. Unlike a nonlinearity of a
    finite network it does not require Gaussian inputs (it is a map of kernels, not an
    expectation), so it may follow another nonlinearity. Calling its finite twin
    raises ``NotImplementedError``.

    Args:
        gamma: the exponent's scale (finite float).
        shift: added to the correlation before exponentiating (default ``-1``, so
            ``K' = s`` for perfectly correlated pairs).
        do_clip: clip ``rho`` to ``[-1, 1]`` (rounding can push it slightly outside).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(1), stax.ExpNormalized(gamma=2.0))
        >>> k = net.kernel_fn(torch.eye(2, dtype=torch.float64), None, 'nngp')
        >>> torch.allclose(k, torch.tensor([[0.5, 0.5 * math.exp(-2)], [0.5 * math.exp(-2), 0.5]],
        ...                                dtype=torch.float64))
        True
    """

    gamma: float = 1.0
    shift: float = -1.0
    do_clip: bool = False

    def __post_init__(self) -> None:
        for name in ("gamma", "shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"ExpNormalized: {name} must be a finite float, got {v!r}.")
        if not isinstance(self.do_clip, bool):
            raise TypeError(f"ExpNormalized: do_clip must be a bool, got {self.do_clip!r}.")

    def fn(self, x: Tensor) -> Tensor:
        raise NotImplementedError(
            "ExpNormalized is a kernel map with no finite-network counterpart (as in Neural "
            "Tangents): use it in kernel_fn only, or pick an activation such as stax.Exp "
            "for a finite network."
        )

    def _rho_scale(self, k: Tensor, q1: Tensor, q2: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sqrt(torch.clamp(q1 * q2, min=_TINY))
        rho = k / s
        if self.do_clip:
            rho = torch.clamp(rho, -1.0, 1.0)
        return rho, s

    def nngp_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        rho, s = self._rho_scale(k, q1, q2)
        return s * torch.exp(self.gamma * (rho + self.shift))

    def dot_map(self, k: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
        rho, _ = self._rho_scale(k, q1, q2)
        return self.gamma * torch.exp(self.gamma * (rho + self.shift))

    def kernel(self, k: Any) -> Any:
        if isinstance(k, Kernel):  # a map of kernels: no Gaussian inputs needed
            return super().kernel(k.replace(is_gaussian=True)).replace(centred=False)
        return super().kernel(k)
