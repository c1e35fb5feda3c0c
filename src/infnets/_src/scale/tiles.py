"""Tiles of a kernel matrix: the grid, the pure tile function, devices, fingerprints.

A kernel matrix ``K[a, b] = k(x1[a], x2[b])`` of ``N1 x N2`` examples is split
into a grid of ``ceil(N1 / t) x ceil(N2 / t)`` tiles of ``t x t`` examples (the
last row and column of tiles may be smaller). Every infnets kernel acts on each
pair of examples independently, so tile ``(i, j)`` is

    ``K[i t : (i + 1) t, j t : (j + 1) t] = kernel_fn(x1[i t : (i + 1) t], x2[j t : ...], get)``,

a pure function of (architecture, x1 tile, x2 tile, get). For a symmetric
problem (``x2 = None``) only the upper triangle ``i <= j`` is computed: diagonal
tiles with ``x2 = None`` (exactly symmetric) and tile ``(j, i)`` as the transpose
of tile ``(i, j)``, which nearly halves the work.

This module has no Dask dependency; the Dask graph, the resumable store and
the multi-device thread pool build on it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs

__all__ = [
    "TileGrid",
    "KERNEL_GETS",
    "resolve_kernel_fn",
    "compute_tile",
    "task_device",
    "multi_device_kernel",
    "fingerprint_inputs",
    "array_sha256",
]

#: the kernel matrices a tile can hold
KERNEL_GETS = ("nngp", "ntk")

KernelFn = Callable[..., Any]


# ------------------------------------------------------------------ the grid
@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiling of an ``(n1, n2)`` kernel matrix into ``tile x tile`` blocks.

    Attributes:
        n1: rows (examples of ``x1``).
        n2: columns (examples of ``x2``; ``n1`` when symmetric).
        tile: edge of a tile in examples (the last tiles may be smaller).
        symmetric: ``x2 is None``; only tiles ``i <= j`` are computed.

    Examples:
        >>> g = TileGrid(5, 5, 2, symmetric=True)
        >>> g.shape, g.chunks[0], g.tiles()
        ((3, 3), (2, 2, 1), [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)])
    """

    n1: int
    n2: int
    tile: int
    symmetric: bool

    def __post_init__(self) -> None:
        _inputs.check_int(self.tile, "tile", 1)
        if self.symmetric and self.n1 != self.n2:
            raise ValueError("TileGrid: a symmetric grid needs n1 == n2.")

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles along each axis."""
        return math.ceil(self.n1 / self.tile), math.ceil(self.n2 / self.tile)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask-style chunk sizes of each axis."""
        return _sizes(self.n1, self.tile), _sizes(self.n2, self.tile)

    def rows(self, i: int) -> slice:
        """Example range of tile row ``i``."""
        return slice(i * self.tile, min((i + 1) * self.tile, self.n1))

    def cols(self, j: int) -> slice:
        """Example range of tile column ``j``."""
        return slice(j * self.tile, min((j + 1) * self.tile, self.n2))

    def tiles(self) -> list[tuple[int, int]]:
        """Tiles to compute, row-major (upper triangle only when symmetric)."""
        t1, t2 = self.shape
        return [(i, j) for i in range(t1) for j in range(t2) if not self.symmetric or i <= j]

    def blocks(self, i: int, j: int) -> list[tuple[int, int]]:
        """Blocks of the full matrix that tile ``(i, j)`` fills: itself and its mirror."""
        if self.symmetric and i != j:
            return [(i, j), (j, i)]
        return [(i, j)]


def _sizes(n: int, t: int) -> tuple[int, ...]:
    return tuple(min(t, n - s) for s in range(0, n, t))


# ---------------------------------------------------------------- kernel fns
def resolve_kernel_fn(kernel_fn: Any, who: str) -> tuple[KernelFn, Any]:
    """``(callable, layer or None)`` for a Layer, a Layer's bound ``kernel_fn`` or a callable.

    The layer (when there is one) gives the architecture's stable ``repr`` used in
    fingerprints; a plain callable works for lazy computations but cannot be
    fingerprinted.
    """
    from infnets._src.layers.base import Layer

    if isinstance(kernel_fn, Layer):
        return kernel_fn.kernel_fn, kernel_fn
    owner = getattr(kernel_fn, "__self__", None)
    if isinstance(owner, Layer):
        return kernel_fn, owner
    if not callable(kernel_fn):
        raise TypeError(
            f"{who}: kernel_fn must be an infnets layer or its kernel_fn "
            f"(e.g. stax.serial(...).kernel_fn), got {type(kernel_fn).__name__}."
        )
    return kernel_fn, None


def parse_kernel_get(get: str | Sequence[str], who: str) -> tuple[tuple[str, ...], bool]:
    """Validate ``get`` for kernel matrices: ``(names, is_tuple)``; names in ``nngp``/``ntk``."""
    if get is None:
        raise ValueError(f"{who}: get must be 'nngp', 'ntk' or a tuple of them, got None.")
    names = _inputs.parse_get(get)
    for n in names:
        if n not in KERNEL_GETS:
            raise ValueError(
                f"{who}: get={n!r} is not a kernel matrix; choose 'nngp' and/or 'ntk' "
                "(per-example variances are the matrix diagonal)."
            )
    return names, not isinstance(get, str)


# ------------------------------------------------------------------- devices
def task_device(device: str | torch.device | None) -> torch.device:
    """The device a tile runs on: ``device`` itself, or for ``'auto'``/``None`` a GPU if any.

    On a Dask worker with several visible GPUs, worker ``w`` (its integer name, as
    ``LocalCluster`` numbers them) uses ``cuda:(w mod count)``; clusters that pin
    one GPU per worker (``CUDA_VISIBLE_DEVICES``, dask-cuda) see ``cuda:0``.
    """
    if device not in (None, "auto"):
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    index = 0
    if count > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
            index = int(name) % count if isinstance(name, int) or str(name).isdigit() else 0
        except (ImportError, ValueError):
            index = 0
    return torch.device("cuda", index)


class _Threads:
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""

    _lock = threading.Lock()

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.saved: int | None = None

    def __enter__(self) -> None:
        if self.n is not None and self.n != torch.get_num_threads():
            with self._lock:
                self.saved = torch.get_num_threads()
                torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            with self._lock:
                torch.set_num_threads(self.saved)


# ----------------------------------------------------------------- the tile
def compute_tile(
    kernel_fn: KernelFn,
    x1: np.ndarray | Tensor,
    x2: np.ndarray | Tensor | None,
    names: tuple[str, ...],
    device: str | torch.device | None = "auto",
    torch_threads: int | None = None,
    delay: float = 0.0,
) -> dict[str, np.ndarray]:
    """One tile of kernel matrices: a pure function of (architecture, x1 tile, x2 tile, get).

    Args:
        kernel_fn: the analytic ``kernel_fn(x1, x2, get)`` (or a layer).
        x1: ``(t1, ...)`` examples of the tile's rows.
        x2: ``(t2, ...)`` examples of its columns, or ``None`` for a diagonal tile of
            a symmetric problem (``x2 = x1``, exactly symmetric result).
        names: kernels to compute, a tuple of ``'nngp'``/``'ntk'``.
        device: where to compute (``'auto'``: a GPU if any, see :func:`task_device`).
        torch_threads: torch intra-op threads during the tile (``None``: unchanged).
        delay: seconds to sleep first (a testing aid for interruption tests).

    Returns:
        ``{name: (t1, t2) numpy array}`` in the inputs' dtype, on the CPU; exactly
        symmetric (upper triangle mirrored) when ``x2`` is ``None``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(4), stax.Relu())
        >>> t = compute_tile(net.kernel_fn, np.ones((2, 3)), np.ones((5, 3)), ('nngp',))
        >>> t['nngp'].shape
        (2, 5)
    """
    if delay > 0:
        time.sleep(delay)
    dev = task_device(device)
    fn, _ = resolve_kernel_fn(kernel_fn, "compute_tile")
    a = _as_torch(x1).to(dev)
    b = None if x2 is None else _as_torch(x2).to(dev)
    with _Threads(torch_threads), torch.no_grad():
        out = fn(a, b, tuple(names))
    tiles = {n: getattr(out, n).detach().cpu().numpy() for n in names}
    if b is None:  # mirror the upper triangle: exactly symmetric whatever the layout
        tiles = {n: _mirror_upper(t) for n, t in tiles.items()}
    return tiles


def _mirror_upper(t: np.ndarray) -> np.ndarray:
    """The symmetric matrix with ``t``'s upper triangle (rounding can break symmetry)."""
    out = np.triu(t)
    low = np.tril_indices(t.shape[0], -1)
    out[low] = t.T[low]
    return out


def _as_torch(x: np.ndarray | Tensor) -> Tensor:
    """A fresh, contiguous copy: every path then feeds BLAS identically aligned memory.

    Matrix products may round differently for differently aligned operands, so a
    view into a larger array (a Dask block, a slice of a memory map) and a fresh
    copy of it could give tiles that differ in the last bit.
    """
    if isinstance(x, Tensor):
        return x.detach().clone(memory_format=torch.contiguous_format)
    arr = np.asarray(x)
    out = torch.empty(arr.shape, dtype=torch.from_numpy(np.empty(0, arr.dtype)).dtype)
    out.numpy()[...] = arr
    return out


# ------------------------------------------------------------- fingerprints
def array_sha256(a: np.ndarray, h: Any = None) -> str:
    """sha256 of an array's dtype, shape and C-order bytes (streamed, no full copy).

    Examples:
        >>> array_sha256(np.zeros(3)) == array_sha256(np.zeros(3))
        True
    """
    h = hashlib.sha256() if h is None else h
    h.update(f"{np.dtype(a.dtype).str}{tuple(a.shape)}".encode())
    a = np.asarray(a)
    if a.ndim == 0:
        h.update(a.tobytes())
        return h.hexdigest()
    flat = a.reshape(a.shape[0], -1) if a.flags.c_contiguous else None
    rows = max(1, (1 << 24) // max(1, a[0].nbytes))  # ~16 MiB at a time
    for s in range(0, a.shape[0], rows):
        part = flat[s : s + rows] if flat is not None else np.ascontiguousarray(a[s : s + rows])
        h.update(part.data.cast("B"))
    return h.hexdigest()


def fingerprint_inputs(x: np.ndarray | None) -> str | None:
    """sha256 of an input array (``None`` for ``x2 = None``)."""
    return None if x is None else array_sha256(x)


# ---------------------------------------------------- in-process, many devices
def multi_device_kernel(
    kernel_fn: Any,
    x1: Any,
    x2: Any = None,
    get: str | Sequence[str] = "ntk",
    tile: int = 1024,
    devices: Sequence[str | torch.device] | None = None,
    torch_threads: int | None = None,
    progress: bool = False,
) -> Any:
    """A kernel matrix tiled over every local device by a thread pool (no Dask).

    Tiles (upper triangle only when ``x2 is None``, mirrored) are handed to one
    worker thread per device; PyTorch releases the GIL inside its kernels, so
    ``k`` GPUs work concurrently. The result is identical to the Dask and store
    paths with the same ``tile``.

    Args:
        kernel_fn: an infnets layer or its ``kernel_fn``.
        x1: ``(N1, ...)`` inputs (tensor or array).
        x2: ``(N2, ...)`` inputs or ``None`` (``x2 = x1``).
        get: ``'nngp'``, ``'ntk'`` or a tuple of them.
        tile: tile edge in examples.
        devices: devices to use; default every CUDA device
            (``torch.cuda.device_count()``), else ``['cpu']``.
        torch_threads: torch threads per tile (``None``: torch's default).
        progress: show a tqdm progress bar.

    Returns:
        An ``(N1, N2)`` CPU tensor in the inputs' dtype for a str ``get``; a named
        tuple of them for a tuple ``get`` (as ``kernel_fn`` returns).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
        >>> x = torch.randn(7, 3, dtype=torch.float64)
        >>> k = multi_device_kernel(net, x, None, 'nngp', tile=3)
        >>> torch.allclose(k, net.kernel_fn(x, None, 'nngp'))
        True
    """
    who = "multi_device_kernel"
    fn, _ = resolve_kernel_fn(kernel_fn, who)
    names, is_tuple = parse_kernel_get(get, who)
    a, b = _inputs.check_pair(x1, x2)
    a = a.detach().cpu()
    b = None if b is None else b.detach().cpu()
    grid = TileGrid(a.shape[0], a.shape[0] if b is None else b.shape[0], tile, b is None)
    if devices is None:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n_gpu)] or ["cpu"]
    devs = [torch.device(d) for d in devices]
    if not devs:
        raise ValueError(f"{who}: devices is empty.")
    out = {n: torch.empty((grid.n1, grid.n2), dtype=a.dtype) for n in names}
    pool: queue.SimpleQueue[torch.device] = queue.SimpleQueue()
    for d in devs:
        pool.put(d)
    local = threading.local()

    def init() -> None:
        local.device = pool.get()

    def run(i: int, j: int) -> None:
        rows, cols = grid.rows(i), grid.cols(j)
        other = None if (grid.symmetric and i == j) else (b if b is not None else a)[cols]
        t = compute_tile(fn, a[rows], other, names, local.device, torch_threads)
        for n in names:
            blk = torch.from_numpy(t[n])
            out[n][rows, cols] = blk
            if grid.symmetric and i != j:
                out[n][cols, rows] = blk.T

    from tqdm.auto import tqdm

    tiles = grid.tiles()
    with concurrent.futures.ThreadPoolExecutor(len(devs), initializer=init) as ex:
        futs = [ex.submit(run, i, j) for i, j in tiles]
        with tqdm(total=len(futs), unit="tile", disable=not progress, desc=who) as bar:
            for f in concurrent.futures.as_completed(futs):
                f.result()
                bar.update(1)
    return _pack(out, names, is_tuple)


def _pack(values: dict[str, Any], names: tuple[str, ...], is_tuple: bool) -> Any:
    if not is_tuple:
        return values[names[0]]
    return _inputs.kernel_tuple_type(names)(*(values[n] for n in names))


def iter_blocks(grid: TileGrid) -> Iterator[tuple[int, int]]:
    """Every block ``(i, j)`` of the full matrix, row-major."""
    t1, t2 = grid.shape
    for i in range(t1):
        for j in range(t2):
            yield i, j
