"""Kernel matrices as lazy Dask arrays, and the Dask clients they run on.

Dask and zarr are optional (the ``distributed`` extra): everything here imports
them inside functions, so ``import infnets`` never imports Dask.

The graph of :func:`kernel_matrix` has one task per tile of the upper triangle
(all tiles when ``x2`` is given), each a call of the pure tile function
:func:`infnets._src.scale.tiles.compute_tile` on one block of rows of
``x1`` and one of ``x2``; every requested kernel is a Dask array whose block
``(i, j)`` reads tile ``(i, j)`` (or transposes tile ``(j, i)`` below the
diagonal of a symmetric problem). Several kernels share the tile tasks, so
``dask.compute(k.nngp, k.ntk)`` runs each tile once.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infnets._src.core import inputs as _inputs
from infnets._src.scale.tiles import (
    TileGrid,
    compute_tile,
    parse_kernel_get,
    resolve_kernel_fn,
)

if TYPE_CHECKING:  # pragma: no cover
    import distributed

__all__ = [
    "require_dask",
    "require_zarr",
    "resolve_client",
    "local_cluster",
    "embedded_client",
    "close_embedded_client",
    "kernel_matrix",
]

_INSTALL_HINT = (
    "pip install 'infnets[distributed]' (or: pip install 'dask[array,distributed]' zarr)"
)

_EMBEDDED: distributed.Client | None = None
_EMBEDDED_LOCK = threading.Lock()


def require_dask(who: str) -> Any:
    """Import ``dask.array`` or raise an ``ImportError`` with the install command."""
    try:
        import dask.array as da
    except ImportError as err:  # pragma: no cover - exercised without the extra
        raise ImportError(f"{who} needs Dask: {_INSTALL_HINT}.") from err
    return da


def require_zarr(who: str) -> Any:
    """Import ``zarr`` or raise an ``ImportError`` with the install command."""
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - exercised without the extra
        raise ImportError(f"{who} needs zarr: {_INSTALL_HINT}.") from err
    return zarr


def _require_distributed(who: str) -> Any:
    try:
        import distributed
    except ImportError as err:  # pragma: no cover - exercised without the extra
        raise ImportError(f"{who} needs dask.distributed: {_INSTALL_HINT}.") from err
    return distributed


# ------------------------------------------------------------------ clients
def _local_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def local_cluster(
    n_workers: int | None = None, processes: bool = True, **kwargs: Any
) -> distributed.LocalCluster:
    """A ``LocalCluster`` of single-threaded workers, tuned for kernel tiles.

    Sized to the machine by default (one worker per GPU, else per CPU core). Dask
    starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` (return freed
    memory to the OS at once); kernel tiles allocate and free large temporaries
    in every layer, and that setting costs about 40 % more CPU per tile (measured
    on fully-connected tiles of 512 x 512), so these workers keep glibc's default.
    The scheduler also sends every ready tile to the workers at once
    (``worker-saturation: inf``), the workers' task profiler is off and the
    housekeeping timers tick less often. For your own clusters, set the same in
    the Dask configuration (see the source of this function).

    Args:
        n_workers: number of workers (default: GPUs, else CPU cores).
        processes: worker processes (``True``) or threads of this process.
        **kwargs: passed to ``distributed.LocalCluster``.

    Returns:
        The running cluster (connect with ``distributed.Client(cluster)``).
    """
    import dask

    dist = _require_distributed("local_cluster")
    n = n_workers or _local_gpu_count() or _local_cpu_count()
    options: dict[str, Any] = dict(
        n_workers=n,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    options.update(kwargs)
    key = "distributed.nanny.pre-spawn-environ"
    environ = {
        k: v for k, v in (dask.config.get(key, None) or {}).items() if k != "MALLOC_TRIM_THRESHOLD_"
    }
    settings = {
        key: environ,
        # tiles are long, independent tasks: hand every ready tile to a worker at once
        # (no scheduler round trip between tiles) and skip the 100 Hz task profiler
        "distributed.scheduler.worker-saturation": float("inf"),
        "distributed.worker.profile.enabled": False,
        # fewer housekeeping wake-ups: they cost ~5 % of a core per process on 2 cores
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.worker.memory.monitor-interval": "500ms",
    }
    with dask.config.set(settings):
        return dist.LocalCluster(**options)


def embedded_client(n_workers: int | None = None, processes: bool = True) -> distributed.Client:
    """The embedded local Dask cluster, started on first use and reused afterwards.

    Sized to the machine (see :func:`local_cluster`): one single-threaded worker
    per GPU when GPUs exist (worker ``w`` uses ``cuda:w``), else one
    single-threaded worker per CPU core (each tile then runs with one torch
    thread). The client is made the default, so ``dask_array.compute()`` runs
    there, and it is closed at interpreter exit. Worker processes are spawned:
    scripts that start it need the usual ``if __name__ == '__main__':`` guard (or
    pass ``client='threads'``).

    Args:
        n_workers: number of workers (default: GPUs, else CPU cores).
        processes: worker processes (``True``) or threads of this process.

    Returns:
        A ``distributed.Client`` connected to the embedded ``LocalCluster``.
    """
    global _EMBEDDED
    dist = _require_distributed("embedded_client")
    with _EMBEDDED_LOCK:
        if _EMBEDDED is not None and _EMBEDDED.status == "running":
            return _EMBEDDED
        cluster = local_cluster(n_workers, processes)
        _EMBEDDED = dist.Client(cluster, set_as_default=True)
        return _EMBEDDED


def close_embedded_client() -> None:
    """Shut down the embedded cluster if one was started (also run at exit)."""
    global _EMBEDDED
    with _EMBEDDED_LOCK:
        if _EMBEDDED is not None:
            client, _EMBEDDED = _EMBEDDED, None
            cluster = client.cluster
            try:
                client.close()
                if cluster is not None:
                    cluster.close()
            except Exception:  # pragma: no cover - best effort at exit
                pass


atexit.register(close_embedded_client)


def active_client() -> distributed.Client | None:
    """The current default ``distributed.Client``, or ``None`` (without importing it twice)."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover
        return None
    try:
        return default_client()
    except ValueError:
        return None


def resolve_client(client: Any, who: str) -> distributed.Client | None:
    """Interpret a ``client`` argument.

    * a ``distributed.Client``: used as is;
    * ``None``: the active client, else the embedded local cluster;
    * ``'threads'``: no cluster (``None``): run in this process;
    * any other string: the address of a scheduler to connect to.
    """
    if client is None:
        return active_client() or embedded_client()
    if isinstance(client, str):
        if client == "threads":
            return None
        dist = _require_distributed(who)
        return dist.Client(client)
    if type(client).__name__ != "Client" or not hasattr(client, "submit"):
        raise TypeError(
            f"{who}: client must be a distributed.Client, a scheduler address, None "
            f"(active or embedded cluster) or 'threads', got {type(client).__name__}."
        )
    return client


# ------------------------------------------------------------- lazy arrays
def _as_dask_input(x: Any, name: str, tile: int, da: Any, client: Any = None) -> Any:
    """``x`` as a Dask array of row blocks of ``tile`` examples.

    In-memory inputs are scattered to ``client``'s workers once and referenced by key
    (the graph holds the future, not the data); without a client (``'threads'``) they
    are wrapped by ``from_array`` (nothing is sent anywhere).
    """
    if isinstance(x, da.Array):
        if np.dtype(x.dtype) not in (np.float32, np.float64):
            raise TypeError(f"{name} has dtype {x.dtype}; pass float32 or float64 inputs.")
        if x.ndim < 2:
            raise ValueError(f"{name} must have rank >= 2 (batch first), got {x.shape}.")
        return x.rechunk((tile,) + tuple(-1 for _ in x.shape[1:]))
    t = _inputs.as_tensor(x, name)
    arr = t.detach().cpu().numpy()
    if client is None:
        return da.from_array(arr, chunks=(tile,) + arr.shape[1:], name=False)
    # a key of its own (hash=False): content-addressed keys are shared by every call that
    # scatters equal data, and the release of an earlier call's future could then drop the
    # data under this one ("lost dependencies")
    future = client.scatter(arr, hash=False)
    meta = np.empty((0,) * arr.ndim, arr.dtype)
    whole = da.from_delayed(future, arr.shape, dtype=arr.dtype, meta=meta)
    return whole.rechunk((tile,) + arr.shape[1:])


def _graph_tile(
    kfn: Any, a: np.ndarray, b: np.ndarray | None, names: str, device: str, threads: int | None
) -> dict[str, np.ndarray]:
    return compute_tile(kfn, a, b, tuple(names.split(",")), device, threads)


def _pick(tile: dict[str, np.ndarray], name: str) -> np.ndarray:
    return tile[name]


def _pick_transposed(tile: dict[str, np.ndarray], name: str) -> np.ndarray:
    return tile[name].T


def kernel_matrix(
    kernel_fn: Any,
    x1: Any,
    x2: Any = None,
    get: str | Sequence[str] = "ntk",
    tile: int = 1024,
    *,
    client: Any = None,
    device: str = "auto",
    torch_threads: int | None = 1,
) -> Any:
    """Kernel matrices as lazy Dask arrays whose blocks are tiles.

    Tile ``(i, j)`` is ``kernel_fn(x1[rows_i], x2[cols_j], get)``; with ``x2=None``
    only tiles ``i <= j`` are tasks (diagonal tiles computed with ``x2=None``), and
    block ``(j, i)`` is the transpose of tile ``(i, j)``. Several kernels of a tuple
    ``get`` share the tile tasks: compute them together
    (``dask.compute(k.nngp, k.ntk)``) to run every tile once.

    Inputs given in memory (tensors, numpy arrays) are scattered to the cluster's workers
    once per call (``client.scatter``) and the graph refers to them by key, so
    the graph stays small whatever the data (no "Sending large graph" warning for, e.g.,
    20,000 x 100 float64 inputs); the arrays returned are then tied to that client
    (compute them there, e.g. ``.compute()`` with it the default client). Dask arrays
    are used as they are, and with ``client='threads'`` nothing is scattered.

    With ``client=None`` and no active ``distributed.Client``, this call **starts a
    local Dask cluster** (:func:`embedded_client`: worker processes, one per GPU or
    else per CPU core, made the default client, shut down at interpreter exit);
    scripts then need the ``if __name__ == '__main__':`` guard. Pass
    ``client='threads'`` to run in this process without Dask's distributed scheduler.

    Args:
        kernel_fn: an infnets layer or its ``kernel_fn`` (any ``f(x1, x2, get)``
            returning a named tuple with ``.nngp``/``.ntk`` also works).
        x1: ``(N1, ...)`` inputs: tensor, numpy or Dask array.
        x2: ``(N2, ...)`` inputs, or ``None`` for ``x2 = x1``.
        get: ``'nngp'``, ``'ntk'`` or a tuple of them.
        tile: tile edge in examples (the block size; last blocks may be smaller).
        client: a ``distributed.Client`` or scheduler address; ``None`` (default):
            the active client, else the embedded local cluster (started once, made
            the default); ``'threads'``: no cluster, Dask's default scheduler. The
            arrays are computed by whatever computes them (``.compute()`` uses the
            default client, ``client.compute(...)`` a given one).
        device: ``'auto'`` (a GPU of the worker if any, else CPU), ``'cpu'``, ``'cuda:0'``.
        torch_threads: torch intra-op threads per tile (1: Dask parallelizes over tiles).

    Returns:
        An ``(N1, N2)`` ``dask.array.Array`` in the inputs' dtype, chunks ``(tile, tile)``;
        for a tuple ``get``, a named tuple of them (like ``kernel_fn``).

    Examples:
        >>> import dask, torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(64), stax.Relu(), stax.Dense(1))
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> k = kernel_matrix(net, x, None, ('nngp', 'ntk'), tile=4, client='threads')
        >>> nngp, ntk = dask.compute(k.nngp, k.ntk)
        >>> bool(abs(nngp - net.kernel_fn(x, None, 'nngp').numpy()).max() < 1e-12)
        True
    """
    who = "kernel_matrix"
    da = require_dask(who)
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    fn, layer = resolve_kernel_fn(kernel_fn, who)
    names, is_tuple = parse_kernel_get(get, who)
    _inputs.check_int(tile, f"{who}: tile", 1)
    # starts the embedded cluster when none is active (client=None)
    target = resolve_client(client, who)
    a = _as_dask_input(x1, "x1", tile, da, target)
    b = None if x2 is None else _as_dask_input(x2, "x2", tile, da, target)
    if b is not None:
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"{who}: x1 and x2 must agree in every axis but the batch axis: "
                f"{a.shape} vs {b.shape}."
            )
        if a.dtype != b.dtype:
            raise TypeError(f"{who}: x1 has dtype {a.dtype} but x2 has {b.dtype}.")
    grid = TileGrid(a.shape[0], a.shape[0] if b is None else b.shape[0], tile, b is None)
    dtype = np.dtype(a.dtype)
    arch = repr(layer) if layer is not None else fn
    token = tokenize(
        arch, a.name, None if b is None else b.name, names, tile, device, torch_threads
    )
    tname = f"infnets-tile-{token}"
    zeros = (0,) * (a.ndim - 1)
    col_src = a if b is None else b
    tiles: dict[Any, Any] = {}
    for i, j in grid.tiles():
        rows = (a.name, i) + zeros
        cols = None if (grid.symmetric and i == j) else (col_src.name, j) + zeros
        tiles[(tname, i, j)] = (_graph_tile, fn, rows, cols, ",".join(names), device, torch_threads)
    layers: dict[str, Any] = {}
    deps: dict[str, set[str]] = {}
    for src in (a, b):
        if src is not None:
            layers.update(src.dask.layers)
            deps.update(src.dask.dependencies)
    layers[tname] = tiles
    deps[tname] = set(a.__dask_layers__()) | (set() if b is None else set(b.__dask_layers__()))
    t1, t2 = grid.shape
    out: dict[str, Any] = {}
    for n in names:
        oname = f"infnets-{n}-{token}"
        blocks: dict[Any, Any] = {}
        for i in range(t1):
            for j in range(t2):
                if grid.symmetric and i > j:
                    blocks[(oname, i, j)] = (_pick_transposed, (tname, j, i), n)
                else:
                    blocks[(oname, i, j)] = (_pick, (tname, i, j), n)
        graph = HighLevelGraph({**layers, oname: blocks}, {**deps, oname: {tname}})
        out[n] = da.Array(
            graph, oname, chunks=grid.chunks, dtype=dtype, meta=np.empty((0, 0), dtype)
        )
    if not is_tuple:
        return out[names[0]]
    return _inputs.kernel_tuple_type(names)(*(out[n] for n in names))
