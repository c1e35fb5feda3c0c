"""Diagnostics of kernels: eigen-spectrum, effective rank, condition number, alignment, depth.

* :func:`eigenspectrum`, :func:`effective_rank` (entropy or participation ratio),
  :func:`condition_number`, :func:`kernel_target_alignment` (centred, Cortes, Mohri &
  Rostamizadeh 2012) of any kernel matrix or :class:`infnets.Kernel` record;
* :func:`depth_profile`: all of them for the kernels after each layer of a ``stax.serial``
  network, i.e. their evolution over depth.

Examples:
    >>> import torch
    >>> from infnets import diagnostics, stax
    >>> net = stax.serial(stax.Dense(1), stax.Relu(), stax.Dense(1))
    >>> k = net.kernel_fn(torch.randn(5, 3, dtype=torch.float64), None, "ntk")
    >>> bool(diagnostics.effective_rank(k) <= 5)
    True
"""

from __future__ import annotations

from infnets._src.research.diagnostics import (
    DepthProfile,
    condition_number,
    depth_profile,
    effective_rank,
    eigenspectrum,
    kernel_target_alignment,
)

__all__ = [
    "DepthProfile",
    "condition_number",
    "depth_profile",
    "effective_rank",
    "eigenspectrum",
    "kernel_target_alignment",
]
