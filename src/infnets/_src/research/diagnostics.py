r"""Kernel diagnostics: spectra, effective rank, conditioning, kernel-target alignment, over depth.

All functions take a kernel matrix ``(..., N, N)`` (leading batch axes allowed), a numpy array
or a kernel record (:class:`infnets.Kernel` or a named tuple; ``get`` picks ``nngp``/``ntk``),
and compute in float64.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DepthProfile",
    "condition_number",
    "depth_profile",
    "effective_rank",
    "eigenspectrum",
    "kernel_target_alignment",
]

F64 = torch.float64


def _matrix(k: Any, get: str, fn: str) -> Tensor:
    if not isinstance(k, (Tensor, np.ndarray)):
        if getattr(k, "is_packed", False):
            k = k.to_dense()
        value = getattr(k, get, None)
        if value is None:
            raise TypeError(f"{fn}: pass an (N, N) kernel matrix or a record with .{get}.")
        k = value
    k = torch.as_tensor(k).to(F64)
    if k.ndim < 2 or k.shape[-1] != k.shape[-2]:
        raise ValueError(f"{fn}: the kernel must be square (..., N, N), got {tuple(k.shape)}.")
    return 0.5 * (k + k.transpose(-1, -2))


def eigenspectrum(k: Any, get: str = "nngp") -> Tensor:
    r"""Eigenvalues of a symmetric kernel matrix, in decreasing order.

    Args:
        k: ``(..., N, N)`` kernel (tensor, array, or record whose ``get`` field is used).
        get: the record field, ``'nngp'`` or ``'ntk'``.

    Returns:
        ``(..., N)`` float64 eigenvalues, largest first.

    Examples:
        >>> import torch
        >>> eigenspectrum(torch.diag(torch.tensor([1.0, 3.0, 2.0]))).tolist()
        [3.0, 2.0, 1.0]
    """
    return torch.linalg.eigvalsh(_matrix(k, get, "eigenspectrum")).flip(-1)


def effective_rank(k: Any, kind: str = "entropy", get: str = "nngp") -> Tensor:
    r"""Effective rank of a positive semi-definite kernel from its normalized spectrum.

    With ``p_i = lambda_i / sum_j lambda_j`` (eigenvalues clipped at 0):

    * ``'entropy'``: ``exp(-sum_i p_i log p_i)`` (Roy & Vetterli 2007, "The effective rank: a
      measure of effective dimensionality");
    * ``'participation'``: ``(sum lambda)^2 / sum lambda^2``, the participation ratio.

    Both are 1 for a rank-one kernel and ``N`` for a multiple of the identity.

    Args:
        k: ``(..., N, N)`` kernel (tensor, array or record).
        kind: ``'entropy'`` or ``'participation'``.
        get: the record field.

    Returns:
        ``(...)`` float64 effective ranks.

    Examples:
        >>> import torch
        >>> float(effective_rank(torch.eye(4)))
        4.0
    """
    lam = eigenspectrum(k, get).clamp_min(0.0)
    total = lam.sum(-1, keepdim=True)
    if kind == "entropy":
        p = lam / total
        ent = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)
        return torch.exp(ent)
    if kind == "participation":
        return total[..., 0] ** 2 / (lam**2).sum(-1)
    raise ValueError(f"effective_rank: kind must be 'entropy' or 'participation', got {kind!r}.")


def condition_number(k: Any, get: str = "nngp") -> Tensor:
    r"""``lambda_max / lambda_min`` of a symmetric kernel (``inf`` when ``lambda_min <= 0``).

    Args:
        k: ``(..., N, N)`` kernel (tensor, array or record).
        get: the record field.

    Returns:
        ``(...)`` float64 condition numbers.

    Examples:
        >>> import torch
        >>> float(condition_number(torch.diag(torch.tensor([2.0, 8.0]))))
        4.0
    """
    lam = eigenspectrum(k, get)
    lo, hi = lam[..., -1], lam[..., 0]
    return torch.where(lo > 0, hi / torch.where(lo > 0, lo, 1.0), torch.full_like(hi, math.inf))


def kernel_target_alignment(k: Any, y: Any, centered: bool = True, get: str = "nngp") -> Tensor:
    r"""(Centred) kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012).

    ``A(K, Y) = <K_c, (Y Y^T)_c>_F / (|K_c|_F |(Y Y^T)_c|_F)`` with ``M_c = H M H``,
    ``H = I - 1 1^T / N`` ("Algorithms for learning kernels based on centered alignment",
    JMLR 13). ``centered=False`` gives the uncentred alignment of Cristianini et al. 2002.
    Targets ``(N,)`` or ``(N, k)`` (e.g. one-hot labels); integer class labels ``(N,)`` are
    one-hot encoded.

    Args:
        k: ``(..., N, N)`` kernel (tensor, array or record).
        y: ``(N,)`` or ``(N, k)`` targets, or ``(N,)`` integer labels.
        centered: centre both Gram matrices first.
        get: the record field.

    Returns:
        ``(...)`` float64 alignments in ``[-1, 1]``.

    Examples:
        >>> import torch
        >>> y = torch.tensor([1.0, -1.0, 1.0, -1.0])
        >>> round(float(kernel_target_alignment(torch.outer(y, y) + 1.0, y)), 6)
        1.0
    """
    km = _matrix(k, get, "kernel_target_alignment")
    yt = torch.as_tensor(y)
    if not yt.dtype.is_floating_point:
        yt = torch.nn.functional.one_hot(yt.long().reshape(-1)).to(F64)
    yt = yt.to(F64).reshape(yt.shape[0], -1)
    if yt.shape[0] != km.shape[-1]:
        raise ValueError(
            f"kernel_target_alignment: {yt.shape[0]} targets for an N = {km.shape[-1]} kernel."
        )
    target = yt @ yt.T
    if centered:
        km = km - km.mean(-1, keepdim=True) - km.mean(-2, keepdim=True) + km.mean((-1, -2), True)
        target = target - target.mean(-1, keepdim=True) - target.mean(0) + target.mean()
    num = (km * target).sum((-1, -2))
    return num / (torch.linalg.matrix_norm(km) * torch.linalg.matrix_norm(target))


class DepthProfile(NamedTuple):
    """Diagnostics of the kernels after each layer of a ``serial`` network.

    Attributes:
        layers: the ``D`` layer names (``repr``), one per prefix ``layers[:i+1]``.
        eigenvalues: ``{get: (D, N)}`` spectra, largest first.
        effective_rank: ``{get: (D,)}`` entropy effective ranks.
        condition_number: ``{get: (D,)}``.
        alignment: ``{get: (D,)}`` centred kernel-target alignments (``None`` without ``y``).
        kernels: ``{get: (D, N, N)}`` the kernels themselves.
    """

    layers: list[str]
    eigenvalues: dict[str, Tensor]
    effective_rank: dict[str, Tensor]
    condition_number: dict[str, Tensor]
    alignment: dict[str, Tensor] | None
    kernels: dict[str, Tensor]


def depth_profile(
    network: Any, x: Tensor, y: Any = None, get: tuple[str, ...] = ("nngp", "ntk")
) -> DepthProfile:
    r"""Spectra, effective ranks, conditioning and alignment of the kernel after each layer.

    The kernel after layer ``i`` of ``stax.serial(l_1, ..., l_D)`` is that of the prefix
    ``serial(l_1, ..., l_i)``, all from one pass (``kernel_fn(..., per_layer=True)``; prefix by
    prefix when the problem is too large for one tile). The
    collapse of the spectrum with depth (effective rank -> 1, condition number -> inf in the
    ordered phase) is the kernel view of the signal propagation of :mod:`infnets.criticality`
    (Schoenholz et al. 2017; Xiao, Pennington & Schoenholz 2020, "Disentangling trainability
    and generalization in deep neural networks").

    Args:
        network: an :func:`infnets.stax.serial` network (its ``sublayers()`` are the layers).
        x: ``(N, ...)`` inputs.
        y: optional ``(N,)``/``(N, k)`` targets or integer labels for the alignment.
        get: kernels to analyse, from ``('nngp', 'ntk')``.

    Returns:
        A :class:`DepthProfile`.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> net = stax.serial(*[stax.Dense(1), stax.Relu()] * 3, stax.Dense(1))
        >>> prof = depth_profile(net, torch.randn(6, 4, dtype=torch.float64), get=("nngp",))
        >>> len(prof.layers), prof.eigenvalues["nngp"].shape
        (7, torch.Size([7, 6]))
    """
    from infnets._src.layers.combinators import serial

    layers = tuple(network.sublayers()) if hasattr(network, "sublayers") else ()
    if not layers:
        raise TypeError("depth_profile: network must be a stax.serial(...) of layers.")
    names = tuple(get)
    kernels: dict[str, list[Tensor]] = {g: [] for g in names}
    try:  # one pass through the network (kernel_fn(..., per_layer=True))
        outs = network.kernel_fn(x, None, names, per_layer=True)
    except MemoryError:  # too large for one tile: prefix by prefix, each tiled
        outs = [serial(*layers[:i]).kernel_fn(x, None, names) for i in range(1, len(layers) + 1)]
    for out in outs:
        for g in names:
            kernels[g].append(getattr(out, g).to(F64))
    stacked = {g: torch.stack(v) for g, v in kernels.items()}
    return DepthProfile(
        layers=[repr(layer) for layer in layers],
        eigenvalues={g: eigenspectrum(k) for g, k in stacked.items()},
        effective_rank={g: effective_rank(k) for g, k in stacked.items()},
        condition_number={g: condition_number(k) for g, k in stacked.items()},
        alignment=None
        if y is None
        else {g: kernel_target_alignment(k, y) for g, k in stacked.items()},
        kernels=stacked,
    )
