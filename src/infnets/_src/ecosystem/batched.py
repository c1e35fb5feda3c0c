r"""Kernels of batches of input sets in one vectorised pass (GPyTorch's ``batch_shape``).

A fully-connected architecture acts on each pair of examples independently: its kernel
at ``(x, x')`` depends only on ``x.x'/d``, ``|x|^2/d`` and ``|x'|^2/d``. So the ``B``
kernels ``k(x1[b], x2[b])`` of a batch of input sets need no loop and no ``(B N1) x
(B N2)`` matrix: all examples go into one packed :class:`infnets.Kernel` record
(``pair_index`` naming exactly the ``B N1 N2`` wanted pairs, or the ``B N (N + 1) / 2``
upper-triangle pairs of symmetric problems, mirrored afterwards, or the ``B N`` diagonal
pairs) and the layers map it once, through ``layer.kernel_fn(record)``, the same kernel
maps (and autograd graph, for tensor hyper-parameters) as ``layer.kernel_fn(x1, x2)``.

Batches of hyper-parameters (GPyTorch's ``batch_shape``: ``G`` GPs, each with its own
``W_var``/``b_var``) need no loop either. Every one of the ``G`` groups holds the same
number of input sets, so the pairs of every group sit at the same places of the packed
layout: the record keeps one ``pair_index`` and a trailing axis of length ``G`` on every
covariance (``nngp (M, G)``, ``cov1 (N, G)``), and the layer's standard deviations are
``(G,)`` tensors (built and evaluated within :func:`infnets._src.core.inputs.hyper_batch`)
broadcasting against it: ``W_var * nngp + b_var`` is then each group's affine map, and every
nonlinearity is elementwise over pairs and groups alike. No pair is computed for a group
it does not belong to.

Images (:func:`batched_spatial_kernel`): convolutions and pooling mix positions, not
examples, so spatial layers act on each pair of examples independently too, and the same
packed layout works, with a spatial covariance per pair (``nngp (M, *S)``); its input kernel
is formed for the named pairs only. The trailing group axis does not carry over (the spatial
maps would read it as a position axis): images take one pass per set of hyper-parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infnets._src.core.kernel import Kernel, is_zero_ntk
from infnets._src.evaluate.input_kernels import spatial_input_kernel
from infnets._src.evaluate.tiling import default_memory_budget, pair_bytes, plan_spatial
from infnets._src.layers.base import Layer

__all__ = ["batched_kernel", "batched_spatial_kernel", "set_pairs"]


def _select(out: Kernel, get: str, ndim: int) -> Tensor:
    value = out.nngp if get == "nngp" else out.ntk
    assert value is not None
    if value.ndim != ndim:
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
        layer: a fully-connected infnets architecture (``(N, D)`` inputs). With grouped
            ``(G, B, N1, D)`` inputs its standard deviations may be ``(G,)`` tensors, one
            value per group (build and call it within
            :func:`infnets._src.core.inputs.hyper_batch` ``(G)``).
        x1: ``(B, N1, D)`` inputs, or ``(G, B, N1, D)``: ``G`` groups of ``B`` input sets.
        x2: ``(B, N2, D)`` (``(G, B, N2, D)``) inputs, or ``None`` for ``x2 = x1``
            (symmetric: the upper triangle of each matrix is computed and mirrored, exactly
            symmetric).
        get: ``'nngp'`` or ``'ntk'``.
        diag: return only ``k(x1[b, i], x2[b, i])`` (needs ``N1 == N2``).

    Returns:
        ``(B, N1, N2)`` kernels, or ``(B, N1)`` with ``diag`` (``(G, B, ...)`` for grouped
        inputs).

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))
        >>> x = torch.randn(3, 5, 2, dtype=torch.float64)
        >>> k = batched_kernel(net, x, None, 'ntk')
        >>> bool(torch.allclose(k[1], net.kernel_fn(x[1], None, 'ntk'), rtol=1e-12))
        True

        Two groups of three input sets, with ``W_std`` 1.0 and 2.0:

        >>> from infnets._src.core.inputs import hyper_batch
        >>> with hyper_batch(2):
        ...     two = stax.Dense(1, W_std=torch.tensor([1.0, 2.0], dtype=torch.float64))
        ...     k = batched_kernel(two, torch.stack([x, x]), None, 'nngp')
        >>> k.shape, bool(torch.allclose(k[1], 4 * k[0]))
        (torch.Size([2, 3, 5, 5]), True)
    """
    grouped = x1.ndim == 4
    rank = 4 if grouped else 3
    if (
        x1.ndim != rank
        or (x2 is not None and (x2.ndim != rank or x2.shape[-1] != x1.shape[-1]))
        or (x2 is not None and x2.shape[:-2] != x1.shape[:-2])
    ):
        raise ValueError(
            "batched_kernel: expected x1 (B, N1, D) and x2 (B, N2, D) or None (or both with "
            f"a leading group axis), got {tuple(x1.shape)} and "
            f"{None if x2 is None else tuple(x2.shape)}."
        )
    if not grouped:
        x1 = x1[None]
        x2 = None if x2 is None else x2[None]
    g, b, n1, d = x1.shape
    n2 = n1 if x2 is None else x2.shape[2]
    if diag and n1 != n2:
        raise ValueError("batched_kernel: diag=True needs x1 and x2 of equal size.")
    index, iu = set_pairs(b, n1, None if x2 is None else n2, diag, x1.device)
    # every (G, ...) tensor below holds the same packed layout for each of the G groups
    if diag:
        if x2 is None:
            z = x1.reshape(g, b * n1, d)
            cov = (z * z).sum(-1) / d
            nngp = cov[:, index[0]]
        else:
            z = torch.cat([x1.reshape(g, b * n1, d), x2.reshape(g, b * n2, d)], dim=1)
            cov = (z * z).sum(-1) / d
            nngp = (x1 * x2).sum(-1).reshape(g, -1) / d
    elif x2 is None:
        assert iu is not None
        flat = x1.reshape(g * b, n1, d)
        gram = torch.bmm(flat, flat.transpose(1, 2))
        gram = gram.add(gram.transpose(1, 2)).mul_(0.5 / d)  # exactly symmetric
        z = x1.reshape(g, b * n1, d)
        # variances are the Gram diagonal bit for bit (correlation exactly 1 on the diagonal)
        cov = gram.diagonal(dim1=1, dim2=2).reshape(g, -1).clone()
        nngp = gram[:, iu[0], iu[1]].reshape(g, -1)
    else:
        z = torch.cat([x1.reshape(g, b * n1, d), x2.reshape(g, b * n2, d)], dim=1)
        cov = (z * z).sum(-1) / d
        prod = torch.bmm(x1.reshape(g * b, n1, d), x2.reshape(g * b, n2, d).transpose(1, 2))
        nngp = (prod / d).reshape(g, -1)
    # ungrouped: the 1-D record of one group; grouped: the group axis last, (M, G) and (N, G)
    nngp = nngp.movedim(0, -1) if grouped else nngp[0]
    cov = cov.movedim(0, -1) if grouped else cov[0]
    n = z.shape[1]
    record = Kernel(
        nngp=nngp,
        ntk=torch.zeros_like(nngp) if get == "ntk" else None,
        cov1=cov,
        cov2=None,
        shape1=(n, d),
        shape2=(n, d),
        is_gaussian=False,
        pair_index=index,
        n1=n,
        n2=n,
    )
    out = layer.kernel_fn(record)
    if not isinstance(out, Kernel):
        raise ValueError(f"batched_kernel: {layer!r} does not end in a single kernel.")
    values = _select(out, get, 2 if grouped else 1)
    if grouped and values.shape != (index.shape[1], g):
        raise ValueError(
            f"batched_kernel: {layer!r} does not keep the hyper-parameter group axis "
            f"(expected ({index.shape[1]}, {g}), got {tuple(values.shape)})."
        )
    values = values.movedim(-1, 0) if grouped else values[None]
    out_t = _unpack_sets(values, b, n1, None if x2 is None else n2, diag, iu)
    return out_t if grouped else out_t[0]


def batched_spatial_kernel(
    layer: Layer,
    x1: Tensor,
    x2: Tensor | None,
    get: str,
    diag: bool = False,
    memory_budget: int | None = None,
) -> Tensor:
    """``k(x1[b], x2[b])`` for every batch index ``b`` of images, without a loop over sets.

    The spatial counterpart of :func:`batched_kernel`: the ``B`` sets' images are numbered
    one after the other, the packed ``pair_index`` names only the pairs within each set
    (:func:`set_pairs`), and the input kernel of exactly those pairs
    (:func:`~infnets._src.evaluate.input_kernels.spatial_input_kernel` with an explicit
    ``index``) goes through ``layer.kernel_fn(record)``: the same kernel maps, on the same
    pairs, as ``layer.kernel_fn(x1[b], x2[b])``, with the input layout (pixel pairs or
    per-position covariances) that :func:`~infnets._src.evaluate.tiling.plan_spatial` picks.
    The work is that of ``B`` separate calls, no cross-set pair; the pairs are evaluated in
    blocks whose estimated peak memory fits ``memory_budget``.

    Args:
        layer: an architecture of ``(N, C, *spatial)`` inputs whose output is one value per
            pair (e.g. ending in ``Flatten``/``GlobalAvgPool`` and ``Dense``).
        x1: ``(B, N1, C, *spatial)`` images.
        x2: ``(B, N2, C, *spatial)`` images, or ``None`` for ``x2 = x1`` (symmetric: the
            upper triangle of each set, mirrored: exactly symmetric).
        get: ``'nngp'`` or ``'ntk'``.
        diag: return only ``k(x1[b, i], x2[b, i])`` (needs ``N1 == N2``): ``B N1`` pairs.
        memory_budget: peak bytes per block of pairs (default
            :func:`~infnets._src.evaluate.tiling.default_memory_budget`).

    Returns:
        ``(B, N1, N2)`` kernels, or ``(B, N1)`` with ``diag``.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(4, (3, 3), W_std=1.5, b_std=0.1, padding='SAME'),
        ...                   stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
        >>> x = torch.randn(3, 5, 1, 4, 4, dtype=torch.float64)
        >>> k = batched_spatial_kernel(net, x, None, 'ntk')
        >>> bool(torch.allclose(k[1], net.kernel_fn(x[1], None, 'ntk'), rtol=1e-12))
        True
    """
    if x1.ndim < 4 or (x2 is not None and (x2.ndim != x1.ndim or x2.shape[0] != x1.shape[0]
                                           or x2.shape[2:] != x1.shape[2:])):  # fmt: skip
        raise ValueError(
            "batched_spatial_kernel: expected x1 (B, N1, C, *spatial) and x2 (B, N2, C, "
            f"*spatial) or None, got {tuple(x1.shape)} and "
            f"{None if x2 is None else tuple(x2.shape)}."
        )
    b, n1 = x1.shape[:2]
    n2 = None if x2 is None else x2.shape[1]
    if diag and n2 is not None and n1 != n2:
        raise ValueError("batched_spatial_kernel: diag=True needs x1 and x2 of equal size.")
    example = tuple(x1.shape[2:])
    z = x1.reshape((b * n1,) + example)
    if x2 is not None:
        z = torch.cat([z, x2.reshape((-1,) + example)])
    index, iu = set_pairs(b, n1, n2, diag, x1.device)
    values = _packed_values(layer, z, index, get, memory_budget)
    return _unpack_sets(values[None], b, n1, n2, diag, iu)[0]


def _packed_values(
    layer: Layer, z: Tensor, index: Tensor, get: str, memory_budget: int | None
) -> Tensor:
    """The ``(M,)`` kernel values of the pairs ``index`` of the images ``z``."""
    need_ntk = get == "ntk"
    full_in, _ = plan_spatial(layer, True, None)
    # a pair's covariances and its gathered input images; a block's examples (at most two
    # per pair) carry variances as large as a pair's covariances: 3 pairs' worth per pair
    per_pair = pair_bytes(layer, z[:1], full_in, need_ntk) + 2 * z[0].numel() * z.element_size()
    budget = default_memory_budget(z.device) if memory_budget is None else int(memory_budget)
    block = max(1, budget // (3 * per_pair))
    m = index.shape[1]
    parts = []
    # A chunking loop over blocks of pairs, bounded by memory (one block when the whole
    # problem fits the budget): not a loop over input sets, a block holds pairs of as many
    # sets as fit. With autograd on, each block's graph lives until backward, as the
    # graphs of separate per-set calls would.
    for lo in range(0, m, block):
        used, local = torch.unique(index[:, lo : lo + block], return_inverse=True)
        record = spatial_input_kernel(z[used], None, need_ntk, full=full_in, index=local)
        out = layer.kernel_fn(record)
        if not isinstance(out, Kernel):
            raise ValueError(f"batched_spatial_kernel: {layer!r} does not end in a single kernel.")
        value = out.nngp if get == "nngp" else out.ntk
        assert value is not None
        if is_zero_ntk(value):  # no parameter anywhere: a real tensor of zeros
            value = torch.zeros_like(out.nngp)
        if value.ndim != 1:
            raise ValueError(
                "batched_spatial_kernel: the architecture's outputs are not one value per "
                f"pair (got {tuple(value.shape)}); flatten or pool spatial outputs before the "
                "readout."
            )
        parts.append(value)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def set_pairs(
    b: int, n1: int, n2: int | None, diag: bool, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """The packed ``pair_index`` of ``b`` input sets: only the pairs within each set.

    The examples are numbered set by set: ``x1``'s ``b n1`` first, then (``n2`` given, two
    batches) ``x2``'s ``b n2``. The pairs are listed set-major: the ``n1 (n1 + 1) / 2``
    upper-triangle pairs of each set (``n2 is None``), its ``n1 n2`` pairs row-major, or
    with ``diag`` its ``n1`` pairs ``(i, i)`` (``x2``'s ``i``-th example with ``n2``).

    Returns:
        ``(index, iu)``: the ``(2, M)`` index and, for the upper triangles, the
        ``(2, n1 (n1 + 1) / 2)`` triangle of one set (else ``None``).
    """
    batch = torch.arange(b, device=device)
    if diag:
        rows = (batch[:, None] * n1 + torch.arange(n1, device=device)).reshape(-1)
        return torch.stack([rows, rows if n2 is None else rows + b * n1]), None
    if n2 is None:
        iu = torch.triu_indices(n1, n1, device=device)
        offset = (batch * n1)[:, None]
        return torch.stack([(offset + iu[0]).reshape(-1), (offset + iu[1]).reshape(-1)]), iu
    rows = batch[:, None, None] * n1 + torch.arange(n1, device=device)[None, :, None]
    cols = b * n1 + batch[:, None, None] * n2 + torch.arange(n2, device=device)[None, None, :]
    shape = (b, n1, n2)
    return torch.stack([rows.expand(shape).reshape(-1), cols.expand(shape).reshape(-1)]), None


def _unpack_sets(
    values: Tensor, b: int, n1: int, n2: int | None, diag: bool, iu: Tensor | None
) -> Tensor:
    """``(G, M)`` values in :func:`set_pairs`' order to ``(G, b, n1[, n2])`` (mirrored)."""
    g = values.shape[0]
    if diag:
        return values.reshape(g, b, n1)
    if n2 is not None:
        return values.reshape(g, b, n1, n2)
    assert iu is not None
    full = values.new_empty(g * b, n1, n1)
    upper = values.reshape(g * b, -1)
    full[:, iu[0], iu[1]] = upper
    full[:, iu[1], iu[0]] = upper
    return full.reshape(g, b, n1, n1)
