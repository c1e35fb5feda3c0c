"""Kernel matrices on Dask: scaling with workers and overhead over a plain tiled loop.

Problem (issue "Scale", speed): five ``Dense(512, W_std=1.4, b_std=0.1) -> Relu``
blocks and a ``Dense(1)`` readout, NNGP and NTK (``get=('nngp', 'ntk')``), float64,
``x1`` and ``x2`` of ``N = 8 * tile`` inputs of dimension 64 each, so the matrix is
8 x 8 = 64 tiles (``tile = 512``: N = 4096, a 4096 x 4096 matrix per kernel).

Measured, each the best and the median of ``--repeats`` runs after a warm-up:

* ``loop``: a plain in-process loop over the 64 tiles calling the same tile
  function (``infnets._src.scale.tiles.compute_tile``) and filling two
  preallocated ``(N, N)`` arrays, at 1 torch thread (and at ``--workers`` threads);
* ``dask-K``: :func:`infnets.distributed.kernel_matrix` on a ``LocalCluster`` of K
  single-threaded worker *processes* (one torch thread per task), either kept on
  the workers (``persist``: what Dask linear algebra / CG then uses) or gathered
  into the driver's memory (``gather``: adds moving 16 bytes per entry between
  processes and assembling the blocks);
* ``store-K``: :func:`infnets.distributed.compute_kernel` into a zarr store on
  local disk (workers compress and write their tiles, markers, checksums), and the
  same without Dask (``store in-process``: ``client='threads'``, one torch thread).

Figures reported: wall time, throughput in tiles/s and CPU time (this process plus
every worker process), the speed-up of 2 workers over 1, and the overhead of
``dask-1`` over ``loop`` at 1 thread (same work, same thread count) and of
``store-1`` over ``store in-process``.
The machine's load average is printed too: on a shared machine other processes
take cores and distort the scaling figure.

Run::

    python benchmarks/bench_distributed.py                 # tile 512, 1 and 2 workers
    python benchmarks/bench_distributed.py --tile 256 --repeats 2   # quicker

Multi-node clusters
-------------------
Any ``distributed.Client`` works: create it, then call the same functions (or pass
``--scheduler`` to ``infnets kernel``). The store must be on a filesystem every
worker mounts (NFS, Lustre, a shared volume), since workers write their tiles.

SLURM with dask-jobqueue (one single-GPU worker per job)::

    from dask_jobqueue import SLURMCluster
    from distributed import Client
    from infnets import distributed, stax

    cluster = SLURMCluster(cores=8, processes=1, memory="64GB", walltime="04:00:00",
                           job_extra_directives=["--gres=gpu:1"])
    cluster.scale(jobs=16)                       # 16 GPUs
    client = Client(cluster)
    net = stax.serial(stax.Dense(512, W_std=1.4), stax.Relu(), stax.Dense(1))
    distributed.compute_kernel(net, x, None, ("nngp", "ntk"),
                               store="/shared/K.zarr", tile=2048, client=client,
                               progress=True)    # rerun the same line to resume

Kubernetes with dask-kubernetes (image with ``pip install 'infnets[distributed]'``)::

    from dask_kubernetes.operator import KubeCluster
    cluster = KubeCluster(name="infnets", image="my-registry/infnets:latest",
                          resources={"limits": {"nvidia.com/gpu": "1"}}, n_workers=8)
    client = Client(cluster)                     # then as above, store on a shared PVC

Or by hand, from the command line::

    dask scheduler                                       # on the head node
    dask worker tcp://head:8786 --nthreads 1 --nworkers 1  # on each node, per GPU
    infnets kernel --arch @arch.txt --x1 x.npy --out /shared/K.zarr \\
        --tile 2048 --scheduler tcp://head:8786            # rerun to resume
    python benchmarks/bench_distributed.py --scheduler tcp://head:8786

With ``--scheduler`` this script times the remote cluster (all its workers) against
the local loop instead of starting local clusters.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infnets import distributed, stax
from infnets._src.scale.tiles import TileGrid, compute_tile

GET = ("nngp", "ntk")


def architecture() -> Any:
    layers: list[Any] = []
    for _ in range(5):
        layers += [stax.Dense(512, W_std=1.4, b_std=0.1), stax.Relu()]
    layers.append(stax.Dense(1, W_std=1.4, b_std=0.1))
    return stax.serial(*layers)


def _worker_cpu(client: Any) -> float:
    """CPU seconds used so far by every worker process of ``client`` (0 without one)."""
    if client is None:
        return 0.0
    return float(sum(client.run(time.process_time).values()))


def timed(fn: Callable[[], Any], repeats: int, client: Any = None) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds of each of ``repeats`` calls (after the caller's warm-up).

    ``cpu`` is the CPU time of this process (driver, scheduler, nannies) plus that
    of every worker process: the work done, whatever else runs on the machine.
    """
    out = []
    for _ in range(repeats):
        c0 = time.process_time() + _worker_cpu(client)
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        out.append((wall, time.process_time() + _worker_cpu(client) - c0))
    return out


def plain_loop(net: Any, x1: np.ndarray, x2: np.ndarray, tile: int, threads: int) -> None:
    """The reference: a Python loop over tiles, no Dask, ``threads`` torch threads."""
    grid = TileGrid(len(x1), len(x2), tile, symmetric=False)
    out = {n: np.empty((grid.n1, grid.n2)) for n in GET}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, j in grid.tiles():
            t = compute_tile(net, x1[grid.rows(i)], x2[grid.cols(j)], GET, "cpu", threads)
            for n in GET:
                out[n][grid.rows(i), grid.cols(j)] = t[n]
    finally:
        torch.set_num_threads(saved)


def dask_run(client: Any, net: Any, x1: np.ndarray, x2: np.ndarray, tile: int, mode: str) -> None:
    k = distributed.kernel_matrix(net, x1, x2, GET, tile=tile, client=client, torch_threads=1)
    if mode == "persist":
        from distributed import futures_of, wait

        arrays = client.persist([k.nngp, k.ntk])
        wait(futures_of(arrays))
        del arrays
    else:
        client.compute([k.nngp, k.ntk], sync=True)


def store_run(client: Any, net: Any, x1: np.ndarray, x2: np.ndarray, tile: int) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        distributed.compute_kernel(
            net, x1, x2, GET, store=Path(d) / "K.zarr", tile=tile, client=client, torch_threads=1
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tiles-per-axis", type=int, default=8, help="8: 64 tiles")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="largest local cluster timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scheduler", help="time this remote cluster instead of local ones")
    p.add_argument("--no-store", action="store_true", help="skip the zarr store runs")
    args = p.parse_args()

    from distributed import Client

    net = architecture()
    n = args.tile * args.tiles_per_axis
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((n, args.dim))
    x2 = rng.standard_normal((n, args.dim))
    tiles = args.tiles_per_axis**2
    print(
        f"# bench_distributed: {platform.platform()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"# problem: N1 = N2 = {n}, d = {args.dim}, tile {args.tile}, {tiles} tiles, "
        f"get {GET}, float64; best / median of {args.repeats}"
    )
    results: dict[str, tuple[float, float, float, float]] = {}

    def report(name: str, runs: list[tuple[float, float]]) -> None:
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        best, median = min(walls), statistics.median(walls)
        cpu_best, cpu_median = min(cpus), statistics.median(cpus)
        results[name] = (best, median, cpu_best, cpu_median)
        print(
            f"{name:<20} {best:7.2f} {median:7.2f}   {tiles / best:6.2f}   "
            f"{cpu_best:7.2f} {cpu_median:7.2f}",
            flush=True,
        )

    print(f"{'path':<20} {'wall s (best, median)':>15}  tiles/s   {'CPU s (best, median)':>15}")
    loop_threads = sorted({1, args.workers})
    for th in loop_threads:
        plain_loop(net, x1[: args.tile], x2[: args.tile], args.tile, th)  # warm-up
        report(
            f"loop {th} thread" + ("s" if th > 1 else ""),
            timed(lambda th=th: plain_loop(net, x1, x2, args.tile, th), args.repeats),
        )

    if not args.no_store:
        store_run("threads", net, x1[: args.tile], x2[: args.tile], args.tile)  # warm-up
        report(
            "store in-process",
            timed(lambda: store_run("threads", net, x1, x2, args.tile), args.repeats),
        )

    def clusters() -> Any:
        if args.scheduler:
            yield "remote", Client(args.scheduler), None
            return
        for k in sorted({1, args.workers}):
            cluster = distributed.local_cluster(k, processes=True)
            yield str(k), Client(cluster), cluster

    for label, client, cluster in clusters():
        try:
            # warm-up: imports and first tiles on every worker
            dask_run(client, net, x1[: 2 * args.tile], x2[: 2 * args.tile], args.tile, "persist")
            for mode in ("persist", "gather"):
                report(
                    f"dask-{label} {mode}",
                    timed(
                        lambda c=client, m=mode: dask_run(c, net, x1, x2, args.tile, m),
                        args.repeats,
                        client,
                    ),
                )
            if not args.no_store:
                report(
                    f"store-{label}",
                    timed(
                        lambda c=client: store_run(c, net, x1, x2, args.tile),
                        args.repeats,
                        client,
                    ),
                )
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    print("# load average after:", f"{os.getloadavg()[0]:.1f}")
    k = args.workers
    for name, ref in (
        ("dask-1 persist", "loop 1 thread"),
        ("dask-1 gather", "loop 1 thread"),
        ("store-1", "loop 1 thread"),
        ("store-1", "store in-process"),
    ):
        if name in results and ref in results:
            wall = 100 * (results[name][0] / results[ref][0] - 1)
            cpu = 100 * (results[name][2] / results[ref][2] - 1)
            print(f"overhead {name} over {ref}: wall {wall:+.1f} %, CPU {cpu:+.1f} %")
    for one, many in (
        ("dask-1 persist", f"dask-{k} persist"),
        ("dask-1 gather", f"dask-{k} gather"),
        ("store-1", f"store-{k}"),
    ):
        if k > 1 and one in results and many in results:
            print(f"speed-up {many} / {one}: {results[one][0] / results[many][0]:.2f}x wall")
    if k > 1 and f"dask-{k} persist" in results:
        ratio = results[f"loop {k} threads"][0] / results[f"dask-{k} persist"][0]
        print(f"dask-{k} persist vs loop at {k} torch threads: {ratio:.2f}x wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
