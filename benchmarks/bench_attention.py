"""Attention NNGP/NTK kernels: infnets versus Neural Tangents 0.6.5.

Problem (issue #13, attention and sequence models), float64,
``kernel_fn(x, None, ('nngp', 'ntk'))`` on 128 random sequences of length 16 with 8
channels::

    Conv(64, (1,)) -> GlobalSelfAttention(64, 64, 64, 4, 'SOFTMAX') -> Relu
        -> GlobalSelfAttention(64, 64, 64, 4, 'SOFTMAX') -> GlobalAvgPool -> Dense(1)

(linear scaling, Neural Tangents' default). Targets: >= 3x faster than Neural Tangents on
CPU, peak memory no higher. Each side runs in a fresh subprocess: the *first call*
includes everything a new process pays after its imports (Neural Tangents' ``jax.jit``
compilation included); *steady* is the median of the later calls. Neural Tangents gets
the same inputs in its ``(N, L, C)`` layout; the two kernels are compared entrywise.
Peak memory is the subprocess's peak RSS minus its RSS after the imports.

Run::

    python benchmarks/bench_attention.py                 # one run, prints the ratios
    python benchmarks/bench_attention.py --repeats 5 --threads 2
    python benchmarks/bench_attention.py --cpus 0 --threads 1   # both sides on one core

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

N, LENGTH, CHANNELS, WIDTH, HEADS = 128, 16, 8, 64, 4

NT_ARCH = (
    f"stax.serial(stax.Conv({WIDTH}, (1,)), "
    f"stax.GlobalSelfAttention({WIDTH}, {WIDTH}, {WIDTH}, {HEADS}, "
    "attention_mechanism='SOFTMAX'), stax.Relu(), "
    f"stax.GlobalSelfAttention({WIDTH}, {WIDTH}, {WIDTH}, {HEADS}, "
    "attention_mechanism='SOFTMAX'), stax.GlobalAvgPool(), stax.Dense(1))"
)

INFNETS_SNIPPET = """
import json, resource, sys, time
import numpy as np
import torch
from infnets import stax
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inputs, repeats, threads, save, width, heads = sys.argv[1:7]
repeats, width, heads = int(repeats), int(width), int(heads)
if int(threads) > 0:
    torch.set_num_threads(int(threads))
attn = lambda: stax.GlobalSelfAttention(width, width, width, heads,
                                        attention_mechanism="SOFTMAX")
kernel_fn = stax.serial(stax.Conv(width, (1,)), attn(), stax.Relu(), attn(),
                        stax.GlobalAvgPool(), stax.Dense(1)).kernel_fn
x = torch.from_numpy(np.load(inputs))            # (N, L, C), as Neural Tangents gets it
x = x.permute(0, 2, 1).contiguous()              # -> (N, C, L), PyTorch's layout
t0 = time.perf_counter()
k = kernel_fn(x, None, ("nngp", "ntk"))
first = time.perf_counter() - t0
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    k = kernel_fn(x, None, ("nngp", "ntk"))
    times.append(time.perf_counter() - t0)
if save:
    np.savez(save, nngp=k.nngp.numpy(), ntk=k.ntk.numpy())
print(json.dumps({"first_s": first, "steady_s": float(np.median(times)) if times else None,
                  "times_s": times,
                  "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              - rss_import) / 1024,
                  "threads": torch.get_num_threads()}))
"""


def infnets_timing(inputs: str, repeats: int, threads: int, save: str) -> dict:
    """Time infnets in a fresh subprocess (first call and steady state)."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INFNETS_SNIPPET), inputs, str(repeats),
         str(threads), save, str(WIDTH), str(HEADS)],
        check=True, capture_output=True, text=True, env=dict(os.environ),
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def nt_timing(inputs: str, repeats: int, save: str) -> dict:
    """Time Neural Tangents (jax.jit, float64, CPU) on the same ``(N, L, C)`` inputs."""
    code = f"""
    import warnings
    warnings.filterwarnings("ignore")  # NT warns that linear scaling ties the query weights
    x = jax.block_until_ready(jnp.asarray(np.load({inputs!r})))
    _, _, kernel_fn = {NT_ARCH}
    kfn = jax.jit(kernel_fn, static_argnames=("get",))
    out, first, times = time_calls(lambda: kfn(x, None, get=("nngp", "ntk")), {int(repeats)})
    np.savez({save!r}, nngp=np.asarray(out.nngp), ntk=np.asarray(out.ntk))
    emit(dict(first_s=first, steady_times=times, dtype=str(out.nngp.dtype)))
    """
    res = _nt.run_nt(code, timeout=3600)
    times = res.get("steady_times") or []
    res["steady_s"] = float(np.median(times)) if times else None
    res["peak_mb"] = res["maxrss_mb"] - res["rss_after_import_mb"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-nt", action="store_true", help="infnets only")
    parser.add_argument("--json", default="", help="write the results to this file")
    parser.add_argument(
        "--cpus",
        default="",
        help="pin both sides (subprocesses inherit it) to these CPUs, e.g. '0' or '0,1': "
        "a fair comparison on a shared machine",
    )
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; float64; kernel_fn(x, None, ('nngp', 'ntk'))"
        + (f"; pinned to CPUs {args.cpus}" if args.cpus else "")
    )
    print(f"problem: N={N} sequences, L={LENGTH}, C={CHANNELS}; {NT_ARCH}")
    with tempfile.TemporaryDirectory() as tmp:
        x = _nt.make_inputs((N, LENGTH, CHANNELS), 0)
        inputs = f"{tmp}/x.npy"
        np.save(inputs, x)
        ours = infnets_timing(inputs, args.repeats, args.threads, f"{tmp}/ours.npz")
        result: dict = {"infnets": ours}
        rows = [("infnets", ours)]
        if not args.no_nt:
            nt = nt_timing(inputs, args.repeats, f"{tmp}/nt.npz")
            a, b = np.load(f"{tmp}/ours.npz"), np.load(f"{tmp}/nt.npz")
            result["nt"] = {k: nt[k] for k in ("first_s", "steady_s", "peak_mb")}
            result["max_rel_diff"] = max(
                float(np.max(np.abs(a[g] - b[g])) / np.max(np.abs(b[g]))) for g in ("nngp", "ntk")
            )
            rows.append(("NT 0.6.5", result["nt"]))
    print(f"  {'':9} {'first (s)':>10} {'steady (s)':>11} {'peak (MB)':>10}")
    for name, r in rows:
        steady = "-" if r["steady_s"] is None else f"{r['steady_s']:.3f}"
        print(f"  {name:9} {r['first_s']:10.3f} {steady:>11} {r['peak_mb']:10.0f}")
    if "nt" in result:
        nt = result["nt"]
        first = nt["first_s"] / ours["first_s"]
        steady = nt["steady_s"] / ours["steady_s"] if nt["steady_s"] and ours["steady_s"] else None
        print(
            f"  speed-up (NT time / infnets time): first {first:.1f}x, steady "
            f"{'-' if steady is None else f'{steady:.1f}'}x; peak memory "
            f"{ours['peak_mb']:.0f} vs {nt['peak_mb']:.0f} MB; max relative difference "
            f"{result['max_rel_diff']:.1e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
