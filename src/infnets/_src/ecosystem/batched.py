r"""Kernels of batches of input sets in one vectorised pass (GPyTorch's ``batch_shape``).

A fully-connected architecture acts on each pair of examples independently: its kernel
at ``(x, x')`` depends only on ``x.x'/d``, ``|x|^2/d`` and ``|x'|^2/d``. So the ``B``
kernels ``k(x1[b], x2[b])`` of a batch of input sets need no loop and no ``(B N1) x
(B N2)`` matrix: all examples go into one packed :class:`infnets.Kernel` record
(``pair_index`` naming exactly the ``B N1 N2`` wanted pairs, or the ``B N (N + 1) / 2``
upper-triangle pairs of symmetric problems, mirrored afterwards, or the ``B N`` diagonal
pairs) and the layers map it once, through ``layer.kernel_fn(record)``, the same kernel
maps (and autograd graph, for tensor hyper-parameters) as ``layer.kernel_fn(x1, x2)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel
from infnets._src.layers.base import Layer

__all__ = ["batched_kernel"]


def _select(out: Kernel, get: str) -> Tensor:
    value = out.nngp if get == "nngp" else out.ntk
    assert value is not None
    if value.ndim != 1:
        raise ValueError(
            "batched_kernel: the architecture's outputs are not one value per pair "
            f"(got {tuple(value.shape)}); flatten spatial outputs before the readout."
        )
    return value


def batched_kernel(
    layer: Layer, x1: Tensor, x2: Tensor | None, get: str, diag: bool = False
) -> Tensor:
    """``k(x1[b], x2[b])`` for every batch index ``b``, in one pass of the kernel maps.

    Args:
        layer: a fully-connected infnets architecture (``(N, D)`` inputs).
        x1: ``(B, N1, D)`` inputs.
        x2: ``(B, N2, D)`` inputs, or ``None`` for ``x2 = x1`` (symmetric: the upper
            triangle of each matrix is computed and mirrored, exactly symmetric).
        get: ``'nngp'`` or ``'ntk'``.
        diag: return only ``k(x1[b, i], x2[b, i])`` (needs ``N1 == N2``).

    Returns:
        ``(B, N1, N2)`` kernels, or ``(B, N1)`` with ``diag``.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))
        >>> x = torch.randn(3, 5, 2, dtype=torch.float64)
        >>> k = batched_kernel(net, x, None, 'ntk')
        >>> bool(torch.allclose(k[1], net.kernel_fn(x[1], None, 'ntk'), rtol=1e-12))
        True
    """
    if x1.ndim != 3 or (x2 is not None and (x2.ndim != 3 or x2.shape[::2] != x1.shape[::2])):
        raise ValueError(
            "batched_kernel: expected x1 (B, N1, D) and x2 (B, N2, D) or None, got "
            f"{tuple(x1.shape)} and {None if x2 is None else tuple(x2.shape)}."
        )
    b, n1, d = x1.shape
    n2 = n1 if x2 is None else x2.shape[1]
    dev = x1.device
    batch = torch.arange(b, device=dev)
    if diag:
        if n1 != n2:
            raise ValueError("batched_kernel: diag=True needs x1 and x2 of equal size.")
        rows = (batch[:, None] * n1 + torch.arange(n1, device=dev)).reshape(-1)
        if x2 is None:
            z, cols = x1.reshape(b * n1, d), rows
            cov = (z * z).sum(-1) / d
            nngp = cov[rows]
        else:
            z = torch.cat([x1.reshape(b * n1, d), x2.reshape(b * n2, d)])
            cols = rows + b * n1
            cov = (z * z).sum(-1) / d
            nngp = (x1 * x2).sum(-1).reshape(-1) / d
        index = torch.stack([rows, cols])
    elif x2 is None:
        gram = torch.bmm(x1, x1.transpose(1, 2))
        gram = gram.add(gram.transpose(1, 2)).mul_(0.5 / d)  # exactly symmetric
        z = x1.reshape(b * n1, d)
        # variances are the Gram diagonal bit for bit (correlation exactly 1 on the diagonal)
        cov = gram.diagonal(dim1=1, dim2=2).reshape(-1).clone()
        iu = torch.triu_indices(n1, n1, device=dev)
        nngp = gram[:, iu[0], iu[1]].reshape(-1)
        offset = (batch * n1)[:, None]
        index = torch.stack([(offset + iu[0]).reshape(-1), (offset + iu[1]).reshape(-1)])
    else:
        z = torch.cat([x1.reshape(b * n1, d), x2.reshape(b * n2, d)])
        cov = (z * z).sum(-1) / d
        nngp = (torch.bmm(x1, x2.transpose(1, 2)) / d).reshape(-1)
        rows = (batch[:, None, None] * n1 + torch.arange(n1, device=dev)[None, :, None]).expand(
            b, n1, n2
        )
        cols = (
            b * n1 + batch[:, None, None] * n2 + torch.arange(n2, device=dev)[None, None, :]
        ).expand(b, n1, n2)
        index = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    record = Kernel(
        nngp=nngp,
        ntk=torch.zeros_like(nngp) if get == "ntk" else None,
        cov1=cov,
        cov2=None,
        shape1=tuple(z.shape),
        shape2=tuple(z.shape),
        is_gaussian=False,
        pair_index=index,
        n1=z.shape[0],
        n2=z.shape[0],
    )
    out = layer.kernel_fn(record)
    if not isinstance(out, Kernel):
        raise ValueError(f"batched_kernel: {layer!r} does not end in a single kernel.")
    values = _select(out, get)
    if diag:
        return values.reshape(b, n1)
    if x2 is not None:
        return values.reshape(b, n1, n2)
    full = values.new_empty(b, n1, n1)
    upper = values.reshape(b, -1)
    full[:, iu[0], iu[1]] = upper
    full[:, iu[1], iu[0]] = upper
    return full
