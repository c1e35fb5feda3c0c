"""A resumable on-disk kernel store: tiles in zarr, finished tiles recorded atomically.

Layout of a store directory ``PATH`` (a zarr group, readable by any zarr tool)::

    PATH/nngp, PATH/ntk          zarr arrays (N1, N2), chunks (tile, tile), NaN fill
    PATH/.infnets/               a zarr group holding the bookkeeping:
        manifest.json            fingerprint of the computation (written first)
        x1.npy, x2.npy           the inputs, read by workers tile by tile
        tiles/I.J.json           marker of finished tile (I, J): sha256 of its blocks
        runs.jsonl               one record per finished run (tiles computed, reused)

Protocol for a tile ``(i, j)``: compute it, write its zarr chunk(s) (the mirror
block too for a symmetric problem), then create the marker with write-to-temp,
``fsync`` and ``os.replace``: a marker exists only once its chunks are written,
and it names their checksums. On every (re)run the driver

1. refuses a store whose manifest differs from this computation (architecture
   ``repr``, sha256 of the input bytes, dtype, kernels, tile; see
   :class:`StoreMismatchError`), never mixing results;
2. verifies every marked tile by re-reading its chunks and comparing checksums
   (a truncated or corrupted chunk, or a torn marker, is recomputed);
3. computes only the missing tiles, on a Dask cluster or a local thread pool.

The result is bit-for-bit the matrix of an uninterrupted run: each tile is a
pure function of its inputs, computed the same way whichever run computes it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infnets._src.core import inputs as _inputs
from infnets._src.scale.cluster import require_dask, require_zarr, resolve_client
from infnets._src.scale.tiles import (
    TileGrid,
    array_sha256,
    compute_tile,
    parse_kernel_get,
    resolve_kernel_fn,
)

__all__ = [
    "KernelStore",
    "RunReport",
    "StoreMismatchError",
    "compute_store",
    "open_kernel_store",
]

STORE_FORMAT = "infnets-kernel-store"
STORE_VERSION = 1
META = ".infnets"

#: manifest fields that must match for a store to be reused, with their meaning
_FINGERPRINT_FIELDS = {
    "arch": "architecture (repr of the layer)",
    "x1_sha256": "x1 (sha256 of its bytes)",
    "x1_shape": "x1 shape",
    "x2_sha256": "x2 (sha256 of its bytes; None for x2=None)",
    "x2_shape": "x2 shape",
    "dtype": "dtype",
    "get": "kernels (get)",
    "tile": "tile size",
}


class StoreMismatchError(ValueError):
    """A kernel store was written by a different computation; it is never mixed into."""


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What one :func:`compute_store` call did.

    Attributes:
        total_tiles: tiles of the problem (upper triangle when symmetric).
        computed: tiles computed by this run, ``(i, j)`` pairs.
        reused: finished tiles found, verified and kept.
        corrupt: tiles whose marker did not match their data (recomputed).
        elapsed_s: wall time of the run.
        executor: ``'dask'`` or ``'threads'``.
    """

    total_tiles: int
    computed: tuple[tuple[int, int], ...]
    reused: int
    corrupt: tuple[tuple[int, int], ...]
    elapsed_s: float
    executor: str

    def summary(self) -> str:
        """One line for logs and the command line."""
        rate = len(self.computed) / self.elapsed_s if self.elapsed_s > 0 else float("inf")
        extra = f", {len(self.corrupt)} corrupt tiles recomputed" if self.corrupt else ""
        return (
            f"{len(self.computed)} tiles computed, {self.reused} reused (verified){extra}; "
            f"{self.total_tiles} tiles in all; {self.elapsed_s:.1f} s "
            f"({rate:.2f} tiles/s, {self.executor})"
        )


# ---------------------------------------------------------------- file helpers
def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _marker_path(root: Path, i: int, j: int) -> Path:
    return root / META / "tiles" / f"{i}.{j}.json"


def _block_key(name: str, i: int, j: int) -> str:
    return f"{name}/{i}.{j}"


def _canonical(manifest: dict[str, Any]) -> bytes:
    core = {k: manifest[k] for k in _FINGERPRINT_FIELDS}
    return json.dumps(core, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- task spec
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything a worker needs for one tile (small and picklable)."""

    path: str
    kernel_fn: Any
    names: tuple[str, ...]
    n1: int
    n2: int
    tile: int
    symmetric: bool
    device: str
    torch_threads: int | None
    delay: float

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.n1, self.n2, self.tile, self.symmetric)


def _open_array(path: str, name: str, mode: str = "r+") -> Any:
    zarr = require_zarr("kernel store")
    try:
        return zarr.open_array(store=os.path.join(path, name), mode=mode)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"kernel store {path!r}: array {name!r} not found; a store must be on a "
            "filesystem that the driver and every worker share."
        ) from err


def _inputs_of(path: str, which: str) -> np.ndarray:
    return np.load(os.path.join(path, META, f"{which}.npy"), mmap_mode="r", allow_pickle=False)


def _store_tile(spec: _Spec, i: int, j: int, device: str | None = None) -> dict[str, Any]:
    """Compute tile ``(i, j)``, write its chunk(s), then its marker (on a worker)."""
    start = time.perf_counter()
    grid = spec.grid
    rows, cols = grid.rows(i), grid.cols(j)
    x1 = _inputs_of(spec.path, "x1")
    if spec.symmetric:
        other = None if i == j else x1[cols]
    else:
        other = _inputs_of(spec.path, "x2")[cols]
    tile = compute_tile(
        spec.kernel_fn,
        x1[rows],
        other,
        spec.names,
        device or spec.device,
        spec.torch_threads,
        spec.delay,
    )
    sums: dict[str, str] = {}
    for name in spec.names:
        arr = _open_array(spec.path, name)
        block = np.ascontiguousarray(tile[name])
        arr[rows, cols] = block
        sums[_block_key(name, i, j)] = array_sha256(block)
        if spec.symmetric and i != j:
            mirror = np.ascontiguousarray(block.T)
            arr[cols, rows] = mirror
            sums[_block_key(name, j, i)] = array_sha256(mirror)
    seconds = time.perf_counter() - start
    marker = {"tile": [i, j], "sha256": sums, "seconds": round(seconds, 6)}
    _atomic_write(_marker_path(Path(spec.path), i, j), json.dumps(marker).encode())
    return {"tile": (i, j), "seconds": seconds}


def _verify_tile(spec: _Spec, i: int, j: int) -> bool:
    """Whether tile ``(i, j)``'s marker is intact and matches the stored chunks."""
    grid = spec.grid
    try:
        marker = json.loads(_marker_path(Path(spec.path), i, j).read_bytes())
        sums = marker["sha256"]
        expected = {_block_key(n, bi, bj) for n in spec.names for bi, bj in grid.blocks(i, j)}
        if marker.get("tile") != [i, j] or set(sums) != expected:
            return False
        for name in spec.names:
            arr = _open_array(spec.path, name, mode="r")
            for bi, bj in grid.blocks(i, j):
                block = np.asarray(arr[grid.rows(bi), grid.cols(bj)])
                if array_sha256(np.ascontiguousarray(block)) != sums[_block_key(name, bi, bj)]:
                    return False
    except Exception:  # unreadable marker or chunk (truncated, corrupted): not done
        return False
    return True


# ---------------------------------------------------------------- executors
class _ThreadExecutor:
    """In-process executor: one thread per device (``torch.cuda.device_count()`` GPUs or CPU)."""

    name = "threads"

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)
        pool: queue.SimpleQueue[str] = queue.SimpleQueue()
        for d in self.devices:
            pool.put(d)
        local = threading.local()
        self._local = local

        def init() -> None:
            local.device = pool.get()

        self._tiles = concurrent.futures.ThreadPoolExecutor(len(self.devices), initializer=init)
        self._io = concurrent.futures.ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2))

    def submit_tile(self, spec: _Spec, i: int, j: int) -> concurrent.futures.Future[Any]:
        return self._tiles.submit(lambda: _store_tile(spec, i, j, self._local.device))

    def submit_verify(self, spec: _Spec, i: int, j: int) -> concurrent.futures.Future[Any]:
        return self._io.submit(_verify_tile, spec, i, j)

    def as_completed(self, futures: Iterable[Any]) -> Iterable[Any]:
        return concurrent.futures.as_completed(list(futures))

    def cancel(self, futures: Iterable[Any]) -> None:
        for f in futures:
            f.cancel()

    def close(self) -> None:
        self._tiles.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)


class _DaskExecutor:
    """Tiles as tasks of a ``distributed.Client`` (retried elsewhere if a worker dies)."""

    name = "dask"

    def __init__(self, client: Any, tag: str) -> None:
        self.client = client
        self.tag = tag

    def submit_tile(self, spec: _Spec, i: int, j: int) -> Any:
        key = f"infnets-tile-{self.tag}-{i}-{j}"
        return self.client.submit(_store_tile, spec, i, j, key=key, pure=False)

    def submit_verify(self, spec: _Spec, i: int, j: int) -> Any:
        key = f"infnets-verify-{self.tag}-{i}-{j}"
        return self.client.submit(_verify_tile, spec, i, j, key=key, pure=False)

    def as_completed(self, futures: Iterable[Any]) -> Iterable[Any]:
        from distributed import as_completed

        futures = list(futures)
        return as_completed(futures, loop=self.client.loop) if futures else []

    def cancel(self, futures: Iterable[Any]) -> None:
        self.client.cancel(list(futures))

    def close(self) -> None:
        pass


def _thread_devices(device: str) -> list[str]:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device == "auto":
        return ["cpu"]
    return [device]


# ---------------------------------------------------------------- the store
class KernelStore:
    """A kernel store on disk (see the module docstring for the layout).

    Attributes:
        path: the store directory.
        manifest: the recorded fingerprint and shapes.
        names: kernels held, e.g. ``('nngp', 'ntk')``.
        shape: ``(N1, N2)``.
        tile: tile edge (the zarr chunk edge).
        dtype: numpy dtype of the kernels.
        symmetric: whether it was computed with ``x2 = None``.
        last_run: the :class:`RunReport` of the call that returned this object, if any.

    Examples:
        >>> store = open_kernel_store('K.zarr')           # doctest: +SKIP
        >>> store.is_complete(), store['ntk'].shape        # doctest: +SKIP
        (True, (50000, 50000))
        >>> k = store.to_dask('ntk')  # lazy, chunked by tiles      # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], last_run: RunReport | None = None) -> None:
        self.path = Path(path)
        meta = self.path / META / "manifest.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{str(self.path)!r} is not an infnets kernel store (no {META}/manifest.json); "
                "create one with infnets.distributed.compute_kernel or `infnets kernel`."
            )
        self.manifest: dict[str, Any] = json.loads(meta.read_text())
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{str(self.path)!r}: unknown store format {self.manifest!r}.")
        self.names: tuple[str, ...] = tuple(self.manifest["get"])
        self.shape: tuple[int, int] = (int(self.manifest["n1"]), int(self.manifest["n2"]))
        self.tile: int = int(self.manifest["tile"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.symmetric: bool = bool(self.manifest["symmetric"])
        self.last_run = last_run

    def __repr__(self) -> str:
        done = len(self.finished_tiles())
        return (
            f"KernelStore({str(self.path)!r}, names={self.names}, shape={self.shape}, "
            f"tile={self.tile}, tiles done {done}/{len(self.grid.tiles())})"
        )

    @property
    def grid(self) -> TileGrid:
        """The tile grid of the store."""
        return TileGrid(self.shape[0], self.shape[1], self.tile, self.symmetric)

    def _check_name(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(f"kernel store {str(self.path)!r} holds {self.names}, not {name!r}.")
        return name

    def __getitem__(self, name: str) -> Any:
        """The zarr array of kernel ``name`` (``'nngp'`` or ``'ntk'``), read-only."""
        return _open_array(str(self.path), self._check_name(name), mode="r")

    def to_dask(self, name: str) -> Any:
        """Kernel ``name`` as a Dask array chunked by tiles (``dask.array.from_zarr``)."""
        da = require_dask("KernelStore.to_dask")
        return da.from_zarr(self[name])

    def to_numpy(self, name: str) -> np.ndarray:
        """Kernel ``name`` loaded into memory, ``(N1, N2)``."""
        self._require_complete()
        return np.asarray(self[name][...])

    def to_torch(self, name: str) -> torch.Tensor:
        """Kernel ``name`` loaded into memory as a tensor."""
        return torch.from_numpy(self.to_numpy(name))

    def finished_tiles(self) -> set[tuple[int, int]]:
        """Tiles with a marker (not re-verified; see :meth:`verify`)."""
        out: set[tuple[int, int]] = set()
        tiles_dir = self.path / META / "tiles"
        if not tiles_dir.is_dir():
            return out
        for entry in os.scandir(tiles_dir):
            parts = entry.name.split(".")
            if len(parts) == 3 and parts[2] == "json" and parts[0].isdigit() and parts[1].isdigit():
                out.add((int(parts[0]), int(parts[1])))
        return out & set(self.grid.tiles())

    def missing_tiles(self) -> list[tuple[int, int]]:
        """Tiles without a marker."""
        done = self.finished_tiles()
        return [t for t in self.grid.tiles() if t not in done]

    def is_complete(self) -> bool:
        """Whether every tile has a marker."""
        return not self.missing_tiles()

    def verify(self) -> list[tuple[int, int]]:
        """Re-read every finished tile; return those whose data no longer match their marker."""
        spec = _spec_for(self, None, "cpu", None, 0.0)
        return [t for t in sorted(self.finished_tiles()) if not _verify_tile(spec, *t)]

    def runs(self) -> list[dict[str, Any]]:
        """Records of the finished runs, oldest first."""
        log = self.path / META / "runs.jsonl"
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def _require_complete(self) -> None:
        missing = self.missing_tiles()
        if missing:
            raise ValueError(
                f"kernel store {str(self.path)!r} is incomplete: {len(missing)} of "
                f"{len(self.grid.tiles())} tiles missing (e.g. {missing[:3]}); rerun the "
                "same compute_kernel / `infnets kernel` command to finish it."
            )


def _spec_for(
    store: KernelStore, kernel_fn: Any, device: str, threads: int | None, delay: float
) -> _Spec:
    return _Spec(
        path=str(store.path),
        kernel_fn=kernel_fn,
        names=store.names,
        n1=store.shape[0],
        n2=store.shape[1],
        tile=store.tile,
        symmetric=store.symmetric,
        device=device,
        torch_threads=threads,
        delay=delay,
    )


def open_kernel_store(path: str | os.PathLike[str]) -> KernelStore:
    """Open an existing kernel store (read access; see :class:`KernelStore`)."""
    return KernelStore(path)


# ---------------------------------------------------------------- creation
def _manifest(
    arch: str, x1: np.ndarray, x2: np.ndarray | None, names: tuple[str, ...], tile: int
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "arch": arch,
        "x1_sha256": array_sha256(x1),
        "x1_shape": list(x1.shape),
        "x2_sha256": None if x2 is None else array_sha256(x2),
        "x2_shape": None if x2 is None else list(x2.shape),
        "dtype": np.dtype(x1.dtype).name,
        "get": sorted(names),
        "tile": tile,
        "n1": int(x1.shape[0]),
        "n2": int(x1.shape[0] if x2 is None else x2.shape[0]),
        "symmetric": x2 is None,
    }
    m["fingerprint"] = hashlib.sha256(_canonical(m)).hexdigest()
    return m


def _mismatch(path: Path, old: dict[str, Any], new: dict[str, Any]) -> StoreMismatchError:
    diffs = []
    for key, what in _FINGERPRINT_FIELDS.items():
        if old.get(key) != new.get(key):
            a, b = str(old.get(key)), str(new.get(key))
            if len(a) > 80:
                a = a[:77] + "..."
            if len(b) > 80:
                b = b[:77] + "..."
            diffs.append(f"{what}: store has {a!r}, this run has {b!r}")
    detail = "; ".join(diffs) or "fingerprint differs"
    return StoreMismatchError(
        f"kernel store {str(path)!r} was written for a different computation ({detail}). "
        "Refusing to mix results: pass another store path, or delete this one to start over."
    )


def _ensure_store(path: Path, manifest: dict[str, Any], x1: np.ndarray, x2: np.ndarray | None):
    """Create or reopen the store; refuse one written for another computation."""
    zarr = require_zarr("compute_kernel")
    meta_dir = path / META
    meta = meta_dir / "manifest.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except ValueError as err:
            raise StoreMismatchError(
                f"kernel store {str(path)!r}: unreadable manifest ({err}); delete the store."
            ) from None
        if old.get("format") != STORE_FORMAT or old.get("version") != STORE_VERSION:
            raise StoreMismatchError(
                f"{str(path)!r} is a {old.get('format')} v{old.get('version')} store; this "
                f"infnets writes {STORE_FORMAT} v{STORE_VERSION}."
            )
        if old.get("fingerprint") != manifest["fingerprint"]:
            raise _mismatch(path, old, manifest)
    else:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(
                f"{str(path)!r} exists and is not an infnets kernel store; choose a new path "
                "(compute_kernel creates it)."
            )
        (meta_dir / "tiles").mkdir(parents=True, exist_ok=True)
        _atomic_write(meta, json.dumps(manifest, indent=1).encode())
    # idempotent set-up (a crash may have interrupted it)
    (meta_dir / "tiles").mkdir(parents=True, exist_ok=True)
    if not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
        zarr.open_group(str(path), mode="a")
    if not (meta_dir / "zarr.json").exists() and not (meta_dir / ".zgroup").exists():
        zarr.open_group(str(meta_dir), mode="a")
    for which, x, key in (("x1", x1, "x1_sha256"), ("x2", x2, "x2_sha256")):
        if x is None:
            continue
        f = meta_dir / f"{which}.npy"
        ok = False
        if f.is_file():
            with contextlib.suppress(Exception):
                ok = array_sha256(np.load(f, mmap_mode="r", allow_pickle=False)) == manifest[key]
        if not ok:
            tmp = meta_dir / f".{which}.{uuid.uuid4().hex}.npy"
            np.save(tmp, x, allow_pickle=False)
            os.replace(tmp, f)
    shape = (manifest["n1"], manifest["n2"])
    tile = manifest["tile"]
    for name in manifest["get"]:
        try:
            arr = zarr.open_array(store=str(path / name), mode="r")
            if (
                tuple(arr.shape) != shape
                or tuple(arr.chunks) != (tile, tile)
                or (np.dtype(arr.dtype) != np.dtype(manifest["dtype"]))
            ):
                raise StoreMismatchError(
                    f"kernel store {str(path)!r}: array {name!r} has shape {arr.shape}, "
                    f"chunks {arr.chunks}, dtype {arr.dtype}; expected {shape}, "
                    f"{(tile, tile)}, {manifest['dtype']}. Delete the store to start over."
                )
        except FileNotFoundError:
            zarr.open_array(
                store=str(path / name),
                mode="w",
                shape=shape,
                chunks=(tile, tile),
                dtype=manifest["dtype"],
                fill_value=np.nan,
            )


def _as_numpy(x: Any, name: str, dtype: torch.dtype | None) -> np.ndarray:
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = np.array(x)  # e.g. a memory map: torch refuses read-only arrays
    t = _inputs.as_tensor(x, name).detach()
    if dtype is not None:
        t = t.to(dtype)
    return np.ascontiguousarray(t.cpu().numpy())


def _arch_id(layer: Any, arch_id: str | None, who: str) -> str:
    if arch_id is not None:
        if not isinstance(arch_id, str) or not arch_id:
            raise TypeError(f"{who}: arch_id must be a non-empty str.")
        return arch_id
    if layer is None:
        raise TypeError(
            f"{who}: cannot fingerprint a plain function; pass an infnets layer (or its "
            "kernel_fn, a bound method of the layer), or name the architecture with arch_id=."
        )
    text = repr(layer)
    if " at 0x" in text:
        raise ValueError(
            f"{who}: the architecture's repr contains a memory address ({text[:120]!r}), so "
            "it would differ between runs and the store could never be resumed; pass a "
            "stable description with arch_id=."
        )
    return text


def compute_store(
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
    delay: float = 0.0,
    on_tile: Callable[[tuple[int, int]], None] | None = None,
) -> KernelStore:
    """Implementation of :func:`infnets.distributed.compute_kernel` (plus testing aids).

    ``delay`` (seconds slept before every tile) and ``on_tile`` (called in the
    driver after each finished tile) exist for interruption tests and progress
    reporting; see the public function for everything else.
    """
    who = "compute_kernel"
    started = time.perf_counter()
    fn, layer = resolve_kernel_fn(kernel_fn, who)
    arch = _arch_id(layer, arch_id, who)
    names, _ = parse_kernel_get(get, who)
    _inputs.check_int(tile, f"{who}: tile", 1)
    if dtype is not None and dtype not in _inputs.FLOAT_DTYPES:
        raise TypeError(f"{who}: dtype must be torch.float32 or torch.float64, got {dtype}.")
    a = _as_numpy(x1, "x1", dtype)
    b = None if x2 is None else _as_numpy(x2, "x2", dtype)
    _inputs.check_pair(torch.from_numpy(a[:1]), None if b is None else torch.from_numpy(b[:1]))
    root = Path(store).expanduser().absolute()
    manifest = _manifest(arch, a, b, names, tile)
    _ensure_store(root, manifest, a, b)
    ks = KernelStore(root)
    executor_client = resolve_client(client, who)
    threads = torch_threads
    if executor_client is not None:
        executor: Any = _DaskExecutor(executor_client, uuid.uuid4().hex[:8])
        if threads is None:
            threads = 1  # Dask runs one task per worker thread: one torch thread each
    else:
        executor = _ThreadExecutor(_thread_devices(device))
    spec = _spec_for(ks, layer if layer is not None else fn, device, threads, delay)
    all_tiles = ks.grid.tiles()
    marked = sorted(ks.finished_tiles())
    corrupt: list[tuple[int, int]] = []
    computed: list[tuple[int, int]] = []
    failed = False
    try:
        _run_tiles(
            executor, spec, ks, marked, verify, corrupt, computed, root, progress, on_tile, who
        )
    except BaseException:
        failed = True
        raise
    finally:
        try:
            executor.close()
            if isinstance(client, str) and client != "threads" and executor_client is not None:
                executor_client.close()
        except Exception:  # a cluster that went away cannot close cleanly: keep the cause
            if not failed:
                raise
    report = RunReport(
        total_tiles=len(all_tiles),
        computed=tuple(computed),
        reused=len(marked) - len(corrupt),
        corrupt=tuple(corrupt),
        elapsed_s=time.perf_counter() - started,
        executor=executor.name,
    )
    record = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "computed": [list(t) for t in report.computed],
        "reused": report.reused,
        "corrupt": [list(t) for t in report.corrupt],
        "elapsed_s": round(report.elapsed_s, 3),
        "executor": report.executor,
    }
    with open(root / META / "runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    missing = ks.missing_tiles()
    if missing:  # pragma: no cover - every tile either succeeded or raised
        warnings.warn(f"{who}: {len(missing)} tiles still missing.", stacklevel=2)
    ks.last_run = report
    return ks


class _TileFailed(RuntimeError):
    """A tile raised: the message already says that finished tiles are kept."""


@contextlib.contextmanager
def _kept_on_failure(
    executor: Any, futs: dict[Any, tuple[int, int]], computed: list[tuple[int, int]], who: str
) -> Iterator[None]:
    """Turn any failure but a tile's own into "finished tiles are kept, rerun to resume"."""
    try:
        yield
    except _TileFailed:
        raise
    except Exception as err:
        with contextlib.suppress(Exception):
            executor.cancel(futs)
        raise RuntimeError(
            f"{who}: the run stopped ({type(err).__name__}: {err}); the {len(computed)} tiles "
            "finished by this run are kept, rerun to resume."
        ) from err


def _run_tiles(
    executor: Any,
    spec: _Spec,
    ks: KernelStore,
    marked: list[tuple[int, int]],
    verify: bool,
    corrupt: list[tuple[int, int]],
    computed: list[tuple[int, int]],
    root: Path,
    progress: bool,
    on_tile: Callable[[tuple[int, int]], None] | None,
    who: str,
) -> None:
    """Verify earlier tiles, then compute the missing ones (filling ``corrupt``/``computed``).

    Any failure other than an interrupt, a tile's own error or the cluster going away
    (closed scheduler, lost connection) alike, becomes a ``RuntimeError`` saying that the
    finished tiles are kept and a rerun resumes.
    """
    futs: dict[Any, tuple[int, int]] = {}  # futures in flight (cancelled on failure)
    with _kept_on_failure(executor, futs, computed, who):
        all_tiles = ks.grid.tiles()
        if marked and verify:
            futs.update({executor.submit_verify(spec, i, j): (i, j) for i, j in marked})
            for f in executor.as_completed(list(futs)):
                if not f.result():
                    corrupt.append(futs[f])
            futs.clear()
            for t in corrupt:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(_marker_path(root, *t))
        done = set(marked) - set(corrupt)
        todo = [t for t in all_tiles if t not in done]
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(all_tiles),
            initial=len(done),
            unit="tile",
            desc=f"kernel {root.name}",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            futs.update({executor.submit_tile(spec, i, j): (i, j) for i, j in todo})
            for f in executor.as_completed(list(futs)):
                t = futs[f]
                try:
                    f.result()
                except Exception as err:
                    executor.cancel(futs)
                    raise _TileFailed(
                        f"{who}: tile {t} failed ({type(err).__name__}: {err}); the "
                        f"{len(computed)} tiles finished by this run are kept, rerun to resume."
                    ) from err
                computed.append(t)
                bar.update(1)
                if on_tile is not None:
                    on_tile(t)
        except BaseException:
            with contextlib.suppress(Exception):
                executor.cancel(futs)
            raise
        finally:
            bar.close()
