"""Kernel matrices at scale: tiled, on Dask (GPUs, machines), resumable on disk, solved there.

A kernel matrix is a grid of tiles of examples; each tile is a pure function of
(architecture, x1 tile, x2 tile, get), so tiles can be computed anywhere, in any
order, and more than once with the same result. Symmetric problems (``x2=None``)
compute only the upper triangle of tiles and mirror it. Four ways to run them:

* :func:`kernel_matrix`: lazy ``dask.array.Array`` (one per kernel) whose blocks
  are the tiles; composes with Dask's stores and linear algebra. Runs on the
  active ``distributed.Client``, else on an embedded ``LocalCluster`` sized to the
  machine (one worker per GPU, or one single-threaded worker per CPU core).
* :func:`compute_kernel`: writes tiles into a chunked on-disk zarr store and
  records every finished tile atomically; rerunning after any crash computes only
  the missing tiles and ends with exactly the matrix of an uninterrupted run.
  A store written for another architecture, input or dtype is refused.
* :func:`multi_device_kernel`: in memory, one thread per local GPU (no Dask).
* the command line: ``infnets kernel --arch ARCH --x1 X1.npy --out K.zarr``
  (``infnets kernel --help``).

Solving with stored kernels: :func:`solve_posterior_mean` gives the NNGP/NTK
posterior mean ``K(x, X) (K(X, X) + λ I)^{-1} Y`` from a store path, a zarr or
Dask array (or an in-memory matrix), by an in-memory Cholesky factorization when
the matrix fits (``method='cholesky'``) or by preconditioned conjugate gradients
with tiled matrix products otherwise (``method='cg'``, :func:`cg_solve`);
:func:`gp_inference` is the same as ``infnets.predict.gp_inference`` (means and
covariances for ``'nngp'``, ``'ntk'``, ``'ntkgp'``) on such kernels.

Dask and zarr are the optional ``distributed`` extra
(``pip install 'infnets[distributed]'``), imported only when used.

Examples:
    >>> import torch
    >>> from infnets import stax, distributed
    >>> net = stax.serial(stax.Dense(512, W_std=1.4), stax.Relu(), stax.Dense(1))
    >>> x = torch.randn(300, 10, dtype=torch.float64)
    >>> k = distributed.kernel_matrix(net, x, None, 'ntk', tile=128, client='threads')
    >>> k.numblocks, k.shape
    ((3, 3), (300, 300))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from infnets._src.app.arch_parser import ArchError, parse_arch, read_arch
from infnets._src.scale.cluster import (
    close_embedded_client,
    embedded_client,
    kernel_matrix,
    local_cluster,
)
from infnets._src.scale.solve import (
    CGResult,
    cg_solve,
    gp_inference,
    is_stored_kernel,
    solve_posterior_mean,
)
from infnets._src.scale.store import (
    KernelStore,
    RunReport,
    StoreMismatchError,
    compute_store,
    open_kernel_store,
)
from infnets._src.scale.tiles import TileGrid, multi_device_kernel

__all__ = [
    "ArchError",
    "CGResult",
    "KernelStore",
    "RunReport",
    "StoreMismatchError",
    "TileGrid",
    "cg_solve",
    "close_embedded_client",
    "compute_kernel",
    "embedded_client",
    "gp_inference",
    "is_stored_kernel",
    "kernel_matrix",
    "local_cluster",
    "multi_device_kernel",
    "open_kernel_store",
    "parse_arch",
    "read_arch",
    "solve_posterior_mean",
]


def compute_kernel(
    kernel_fn: Any,
    x1: Any,
    x2: Any = None,
    get: str | Sequence[str] = ("nngp", "ntk"),
    store: str | os.PathLike[str] = "kernel.zarr",
    tile: int = 1024,
    client: Any = None,
    *,
    arch_id: str | None = None,
    dtype: torch.dtype | None = None,
    device: str = "auto",
    torch_threads: int | None = None,
    verify: bool = True,
    progress: bool = False,
) -> KernelStore:
    """Compute kernel matrices into a resumable on-disk zarr store.

    Every tile is written into its zarr chunk(s), then recorded by an atomically
    created marker file holding the checksums of those chunks. Rerunning the same
    call after any interruption (the driver killed, a worker lost, the machine
    restarted) verifies the recorded tiles against their data, recomputes only
    missing or damaged tiles, and ends with bit-for-bit the matrix of an
    uninterrupted run. The store records a fingerprint (sha256 over the
    architecture's ``repr``, the input bytes, dtype, ``get`` and ``tile``); a store
    written for anything else raises :class:`StoreMismatchError`.

    "Exactly" holds tile by tile for the same kind of device: a tile computed on a
    GPU may differ in the last bits from the same tile computed on a CPU, and the
    device is deliberately not part of the fingerprint (a store started on GPUs
    can be finished on CPUs).

    Layout: ``store/nngp`` and ``store/ntk`` are ``(N1, N2)`` zarr arrays chunked
    ``(tile, tile)`` (NaN where not yet computed); bookkeeping lives in
    ``store/.infnets``. On a multi-machine cluster the store must be on a
    filesystem all workers share (workers write the tiles they compute).

    Args:
        kernel_fn: an infnets layer, or its ``kernel_fn`` (a bound method of the
            layer); a plain function needs ``arch_id``.
        x1: ``(N1, ...)`` inputs (tensor or numpy array).
        x2: ``(N2, ...)`` inputs or ``None`` (``x2 = x1``: upper triangle, mirrored).
        get: ``'nngp'``, ``'ntk'`` or a tuple of them.
        store: directory of the store (created if missing).
        tile: tile edge in examples.
        client: a ``distributed.Client`` or scheduler address; ``None``: the active
            client, else the embedded local cluster; ``'threads'``: no Dask, a thread
            pool in this process with one thread per GPU (or one on the CPU).
        arch_id: a stable name of the architecture for the fingerprint (default: the
            layer's ``repr``; needed when that ``repr`` does not describe it, e.g.
            ``Elementwise`` with your own function).
        dtype: cast the inputs to ``torch.float32``/``torch.float64`` first (default:
            their own dtype).
        device: ``'auto'`` (GPU if any), ``'cpu'`` or ``'cuda:k'``.
        torch_threads: torch threads per tile (default 1 on Dask, unchanged in-process).
        verify: re-read and checksum the tiles recorded by earlier runs.
        progress: show a tqdm progress bar (tiles done, rate, time left).

    Returns:
        The :class:`KernelStore` (``store['ntk']`` a zarr array, ``store.to_dask('ntk')``,
        ``store.to_numpy('ntk')``); ``store.last_run`` is this run's :class:`RunReport`.

    Raises:
        StoreMismatchError: the store holds another computation.
        FileExistsError: ``store`` exists and is not a kernel store.

    Examples:
        >>> import tempfile, torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(64), stax.Relu(), stax.Dense(1))
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> path = tempfile.mkdtemp() + '/K.zarr'
        >>> ks = compute_kernel(net, x, None, 'ntk', store=path, tile=4, client='threads')
        >>> len(ks.last_run.computed), ks.shape
        (6, (10, 10))
        >>> again = compute_kernel(net, x, None, 'ntk', store=path, tile=4, client='threads')
        >>> again.last_run.reused, again.last_run.computed
        (6, ())
    """
    return compute_store(
        kernel_fn,
        x1,
        x2,
        get,
        store,
        tile,
        client,
        arch_id=arch_id,
        dtype=dtype,
        device=device,
        torch_threads=torch_threads,
        verify=verify,
        progress=progress,
    )
