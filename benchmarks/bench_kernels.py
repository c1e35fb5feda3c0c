"""Fully-connected NNGP/NTK kernels: infnets versus Neural Tangents 0.6.5, side by side.

Problem (issue "Foundation", speed and memory): five ``Dense(512, W_std=1.4,
b_std=0.1) -> act`` blocks and a ``Dense(1, W_std=1.4, b_std=0.1)`` readout, with
``act`` ReLU or Erf, on N = 4000 inputs of dimension 64 (float64),
``kernel_fn(x, None, ('nngp', 'ntk'))``.

Each side runs in fresh subprocesses, so the *first call* includes everything a
new process pays (imports excluded, compilation included for Neural Tangents'
``jax.jit``); *steady* is the median of later calls. Peak memory is the
subprocess's peak RSS minus its RSS after imports, reported also in units of one
N x N float64 matrix. The kernels of both libraries are compared entrywise.

Run::

    python benchmarks/bench_kernels.py            # N = 4000, both activations
    python benchmarks/bench_kernels.py --n 1000   # quicker

Neural Tangents is installed on first use into ``benchmarks/.nt-venv`` (see ``_nt.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nt  # noqa: E402

INFNETS_SNIPPET = """
import json, resource, sys, time
import numpy as np
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import torch
from infnets import stax
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
act, save = sys.argv[1], sys.argv[5]
n, d, repeats = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
A = {"relu": stax.Relu, "erf": stax.Erf}[act]
layers = []
for _ in range(5):
    layers += [stax.Dense(512, W_std=1.4, b_std=0.1), A()]
layers.append(stax.Dense(1, W_std=1.4, b_std=0.1))
kernel_fn = stax.serial(*layers).kernel_fn
x = torch.from_numpy(np.random.default_rng(0).standard_normal((n, d)))
t0 = time.perf_counter()
k = kernel_fn(x, None, ("nngp", "ntk"))
first = time.perf_counter() - t0
rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    k = kernel_fn(x, None, ("nngp", "ntk"))
    times.append(time.perf_counter() - t0)
if save:
    np.savez(save, nngp=k.nngp.numpy(), ntk=k.ntk.numpy())
print(json.dumps({"first_s": first, "steady_s": float(np.median(times)),
                  "peak_mb": (rss_first - rss_import) / 1024, "threads": torch.get_num_threads()}))
"""


def infnets_timing(act: str, n: int, d: int, repeats: int, save: str) -> dict:
    """Time infnets in a fresh subprocess (first call and steady state)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(INFNETS_SNIPPET),
            act,
            str(n),
            str(d),
            str(repeats),
            save,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--acts", default="relu,erf")
    args = parser.parse_args()
    matrix_mb = args.n * args.n * 8 / 2**20
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"N={args.n}, d={args.d}, float64; one NxN matrix = {matrix_mb:.0f} MB"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for act in args.acts.split(","):
            ours_path, nt_path = f"{tmp}/ours_{act}.npz", f"{tmp}/nt_{act}.npz"
            ours = infnets_timing(act, args.n, args.d, args.repeats, ours_path)
            nt = _nt.nt_fc_kernel_timing(
                act=act, n=args.n, d=args.d, repeats=args.repeats, save_path=nt_path
            )
            a, b = np.load(ours_path), np.load(nt_path)
            err = max(
                float(np.max(np.abs(a[g] - b[g])) / np.max(np.abs(b[g]))) for g in ("nngp", "ntk")
            )
            nt_peak = nt["maxrss_mb"] - nt["rss_after_import_mb"]
            rows.append((act, ours, nt, nt_peak, err))
    print(
        f"\n{'act':5} {'':9} {'first (s)':>10} {'steady (s)':>11} {'peak (MB)':>10} {'peak/NxN':>9}"
    )
    for act, ours, nt, nt_peak, err in rows:
        print(
            f"{act:5} {'infnets':9} {ours['first_s']:10.3f} {ours['steady_s']:11.3f} "
            f"{ours['peak_mb']:10.0f} {ours['peak_mb'] / matrix_mb:9.1f}"
        )
        print(
            f"{'':5} {'NT 0.6.5':9} {nt['first_s']:10.3f} {nt['steady_s']:11.3f} "
            f"{nt_peak:10.0f} {nt_peak / matrix_mb:9.1f}"
        )
        print(
            f"{'':5} {'ratio':9} {nt['first_s'] / ours['first_s']:9.2f}x "
            f"{nt['steady_s'] / ours['steady_s']:10.2f}x   (NT time / infnets time); "
            f"max relative difference of the kernels {err:.1e}"
        )


if __name__ == "__main__":
    main()
