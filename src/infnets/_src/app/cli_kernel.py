"""``infnets kernel``: a kernel matrix of stored inputs, tiled, on Dask, resumable.

Example::

    infnets kernel --arch "serial(Dense(512, W_std=1.4), Relu(), Dense(1))" \\
        --x1 train.npy --get nngp,ntk --out K.zarr --tile 512

computes the NNGP and NTK of ``train.npy`` with itself into the zarr store
``K.zarr``; rerunning the same command after an interruption computes only the
missing tiles. See :func:`infnets.distributed.compute_kernel` for the store.

Testing aid: the environment variable ``INFNETS_TILE_DELAY`` (seconds, default 0)
makes every tile sleep that long before computing, so that tests can interrupt a
run between tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_parser", "run"]

#: environment variable: seconds every tile sleeps first (testing aid)
TILE_DELAY_ENV = "INFNETS_TILE_DELAY"

_DESCRIPTION = """\
Compute the NNGP and/or NTK matrix of an infinitely wide network on inputs stored
as .npy files, tile by tile, into a chunked zarr store. Finished tiles are recorded
atomically: rerun the same command after an interruption (Ctrl-C, a killed process,
a lost worker, a reboot) and only the missing tiles are computed; the result is
exactly that of an uninterrupted run. A store written for another architecture,
inputs, dtype, kernels or tile size is refused.

ARCH is the Python expression you would write with infnets.stax, e.g.
  "serial(Dense(512, W_std=1.4, b_std=0.05), Relu(), Dense(1))"
(names may carry a "stax." prefix). Only calls of infnets.stax layers with literal
arguments (numbers, strings, True/False/None, tuples and lists of them, keywords)
are accepted; the text is parsed, never evaluated. Layers taking Python functions
(Elementwise, ElementwiseNumerical) cannot be written this way: use
infnets.distributed.compute_kernel from Python for them.
"""

_EPILOG = """\
where it runs:
  default            an embedded local Dask cluster sized to the machine: one worker
                     per GPU, else one single-threaded worker per CPU core
  --workers N        a local Dask cluster of N single-threaded worker processes
  --workers 0        no Dask: this process, one thread per GPU (or the CPU)
  --scheduler ADDR   an existing Dask cluster (e.g. tcp://head:8786); the --out
                     path must then be on a filesystem shared by every worker

store layout (a zarr group, readable with zarr.open / dask.array.from_zarr):
  OUT/nngp, OUT/ntk  (N1, N2) arrays, chunks (tile, tile), NaN where not computed
  OUT/.infnets/      manifest (fingerprint), inputs, per-tile markers with checksums,
                     runs.jsonl (one record per finished run: tiles computed, reused)

examples:
  infnets kernel --arch "serial(Dense(512), Relu(), Dense(1))" --x1 x.npy --out K.zarr
  infnets kernel --arch @arch.txt --x1 train.npy --x2 test.npy --get ntk --out Kxt.zarr
  infnets kernel --arch arch.txt --x1 x.npy --out K.zarr --scheduler tcp://head:8786

exit status: 0 done, 1 a tile failed or the cluster went away (finished tiles are kept:
  rerun), 2 bad arguments (checked before any tile runs or any store is created: the
  options, --out/--summary writable, the inputs readable .npy files that the
  architecture accepts), or a store that belongs to another computation.
  --tile larger than the number of examples is capped at it.
testing aid: INFNETS_TILE_DELAY=SECONDS makes every tile sleep first.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``infnets kernel`` on the ``infnets`` command's subparsers."""
    p = subparsers.add_parser(
        "kernel",
        help="compute a kernel matrix into a resumable zarr store (tiled, on Dask)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arch",
        required=True,
        metavar="ARCH",
        help="the architecture: a stax expression, @FILE, or the path of a file holding one",
    )
    p.add_argument(
        "--x1",
        required=True,
        metavar="X1.npy",
        help="inputs as a .npy file: (N1, features), or (N1, C, H, W) for convolutions",
    )
    p.add_argument(
        "--x2",
        metavar="X2.npy",
        help="second inputs (N2, ...); omitted: x2 = x1 (symmetric, upper triangle mirrored)",
    )
    p.add_argument(
        "--get",
        default="nngp,ntk",
        metavar="NAMES",
        help="comma-separated kernels among nngp, ntk (default: nngp,ntk)",
    )
    p.add_argument("--out", required=True, metavar="K.zarr", help="the store directory")
    p.add_argument("--tile", type=int, default=512, help="tile edge in examples (default: 512)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local Dask cluster of N worker processes (0: no Dask, in this process)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float64",
        help="precision of the inputs and kernels (default: float64)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="'auto' (a GPU per worker if any, else CPU), 'cpu' or 'cuda:K' (default: auto)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        metavar="T",
        help="torch threads per tile (default: 1 on Dask workers, all in-process)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip re-reading and checksumming tiles finished by earlier runs",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (by default: tiles done, rate and time left, on stderr)",
    )
    p.add_argument(
        "--summary",
        metavar="FILE.json",
        help="also write this run's summary (tiles computed, reused, time) as JSON",
    )
    return p


def _error(message: str) -> int:
    print(f"infnets kernel: error: {message}", file=sys.stderr)
    return 2


def _load(path: str, name: str) -> np.ndarray:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{name}: file {path!r} does not exist.")
    with open(p, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":  # the .npy magic string: anything else is another format
        kind = "a text file (.csv?)" if head.isascii() else "not a .npy file"
        raise ValueError(
            f"{name}: {path!r} is {kind}; --x1/--x2 take NumPy .npy files. Convert it first, "
            "e.g. python -c \"import numpy as np; np.save('x.npy', np.loadtxt('x.csv', "
            "delimiter=','))\"."
        )
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode="r")
    except ValueError as err:
        raise ValueError(f"{name}: cannot read {path!r} as a .npy array ({err}).") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: {path!r} holds several arrays (.npz); pass a .npy file.")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: {path!r} has dtype {arr.dtype}; numbers are needed.")
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: {path!r} has shape {arr.shape}; inputs are (N, features) or "
            "(N, C, H, W) with the batch axis first."
        )
    return arr


def _writable_path(path: str, name: str, is_dir: bool) -> str | None:
    """Why ``path`` cannot be written (``None`` when it can), checked before any work.

    The nearest existing ancestor must be a writable directory (the missing levels are
    created); an existing ``path`` must be a directory for a store and a file (or absent)
    for a summary.
    """
    p = Path(path).expanduser().absolute()
    if p.exists():
        if is_dir and not p.is_dir():
            return f"{name} {path!r} exists and is a file; pass a directory path for the store."
        if not is_dir and p.is_dir():
            return f"{name} {path!r} is a directory; pass a file path such as run.json."
        target = p if is_dir else p.parent
        if not os.access(target, os.W_OK):
            return f"{name} {path!r} is not writable (permission denied); choose another path."
        return None
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{name} {path!r}: {str(parent)!r} is a file, not a directory."
    if not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"{name} {path!r} cannot be created: {str(parent)!r} is not writable "
            "(permission denied); choose another path."
        )
    return None


def _check_device(device: str) -> str | None:
    """Why ``--device`` is unusable (``None`` when fine)."""
    import torch

    if device in ("auto", "cpu"):
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:K'; got {device!r}."
    if dev.type != "cuda":
        return f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:K'; got {device!r}."
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"--device {device}: no CUDA device is available here; use --device cpu or auto."
    if dev.index is not None and dev.index >= count:
        return f"--device {device}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})."
    return None


def _check_architecture(layer: Any, x1: np.ndarray, x2: np.ndarray | None, names: Any) -> None:
    """Run the architecture on the first example(s): a shape that does not fit (a Dense on
    images, a Conv on vectors) or an overflow is refused before any store exists."""
    import torch

    a = torch.from_numpy(x1[:1])
    b = None if x2 is None else torch.from_numpy(x2[:1])
    try:
        layer.kernel_fn(a, b, tuple(names))
    except (ValueError, TypeError, FloatingPointError, MemoryError) as err:
        raise ValueError(
            f"--arch does not accept inputs of shape {tuple(x1.shape[1:])} (per example): {err}"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Run ``infnets kernel``; returns the exit status."""
    import torch

    from infnets._src.app.arch_parser import ArchError, read_arch

    try:
        layer = read_arch(args.arch)
    except ArchError as err:
        return _error(str(err))
    names = tuple(n.strip() for n in args.get.split(",") if n.strip())
    if not names or any(n not in ("nngp", "ntk") for n in names) or len(set(names)) != len(names):
        return _error(f"--get must list nngp and/or ntk, comma-separated; got {args.get!r}.")
    if args.tile < 1:
        return _error(f"--tile must be >= 1, got {args.tile}.")
    if args.torch_threads is not None and args.torch_threads < 1:
        return _error(f"--torch-threads must be >= 1, got {args.torch_threads}.")
    reason = _check_device(args.device)
    if reason:
        return _error(reason)
    reason = _writable_path(args.out, "--out", is_dir=True) or (
        _writable_path(args.summary, "--summary", is_dir=False) if args.summary else None
    )
    if reason:
        return _error(reason)
    if args.workers is not None and args.workers < 0:
        return _error(f"--workers must be >= 0, got {args.workers}.")
    if args.workers is not None and args.scheduler:
        return _error("pass either --workers or --scheduler, not both.")
    try:
        delay = float(os.environ.get(TILE_DELAY_ENV, "0") or 0)
    except ValueError:
        return _error(f"{TILE_DELAY_ENV} must be a number of seconds.")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    np_dtype = np.float64 if args.dtype == "float64" else np.float32
    try:
        x1 = np.array(_load(args.x1, "--x1"), dtype=np_dtype, order="C")
        x2 = None
        if args.x2 is not None:
            x2 = np.array(_load(args.x2, "--x2"), dtype=np_dtype, order="C")
        _check_architecture(layer, x1, x2, names)
    except ValueError as err:
        return _error(str(err))
    n_max = max(x1.shape[0], 0 if x2 is None else x2.shape[0])
    if args.tile > n_max:  # one tile holds everything: a larger edge only wastes memory
        print(f"infnets kernel: --tile {args.tile} > {n_max} examples; using --tile {n_max}.")
        args.tile = n_max

    from infnets._src.scale.store import StoreMismatchError, compute_store

    cluster = None
    client: Any
    if args.scheduler:
        client = args.scheduler
    elif args.workers == 0:
        client = "threads"
    elif args.workers is not None:
        from distributed import Client

        from infnets._src.scale.cluster import local_cluster

        cluster = local_cluster(args.workers, processes=True)
        client = Client(cluster)
    else:
        client = None  # embedded cluster sized to the machine
    try:
        store = compute_store(
            layer,
            x1,
            x2,
            names,
            args.out,
            args.tile,
            client,
            dtype=dtype,
            device=args.device,
            torch_threads=args.torch_threads,
            verify=not args.no_verify,
            progress=not args.no_progress,
            delay=delay,
        )
    except (StoreMismatchError, FileExistsError, TypeError, ValueError) as err:
        return _error(str(err))
    except RuntimeError as err:
        print(f"infnets kernel: {err}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            client.close()
            cluster.close()
    report = store.last_run
    assert report is not None
    print(f"infnets kernel: {args.out}: {', '.join(names)} {store.shape}: {report.summary()}")
    if args.summary:
        summary = {
            "out": str(store.path),
            "get": list(names),
            "shape": list(store.shape),
            "tile": store.tile,
            "total_tiles": report.total_tiles,
            "computed": [list(t) for t in report.computed],
            "reused": report.reused,
            "corrupt": [list(t) for t in report.corrupt],
            "elapsed_s": report.elapsed_s,
            "executor": report.executor,
        }
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    return 0
