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

exit status: 0 done, 1 a tile failed (finished tiles are kept: rerun), 2 bad arguments,
  unreadable inputs or a store that belongs to another computation.
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
    except ValueError as err:
        return _error(str(err))

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
