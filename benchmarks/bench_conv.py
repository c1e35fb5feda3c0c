"""Convolutional NNGP/NTK kernels (CNN-GP, CNTK): infnets versus Neural Tangents 0.6.5.

Problems (issue "Convolutional networks", speed and memory), float64,
``kernel_fn(x, None, ('nngp', 'ntk'))``, the network three
``Conv(64, (3, 3), padding='SAME', W_std=1.4, b_std=0.1) -> Relu`` blocks, a readout
and ``Dense(1, W_std=1.4, b_std=0.1)``:

1. ``gap``: ``GlobalAvgPool`` readout on 128 random 1x8x8 images (every pixel pair is
   kept: O(N^2 P^2)); target >= 10x faster than Neural Tangents in steady state, the
   first call in a fresh process (empty compile cache with ``--cold-cache``) no slower;
2. ``flatten``: ``Flatten`` readout on 1000 random images (per-position covariances
   only: O(N^2 P)); target >= 5x faster in steady state;
3. ``digits``: network 1 on the 1797 scikit-learn digits (8x8, pixels / 16); target
   under 3 minutes on 2 cores and under 4 GB peak memory (infnets only by default:
   Neural Tangents would need hours; ``--nt-digits`` runs it anyway).

Each side runs in fresh subprocesses, so the *first call* includes everything a new
process pays after imports (Neural Tangents' ``jax.jit`` compilation included). infnets
runs with its defaults: repeated convolutional kernel patterns are compiled by
TorchInductor in a background thread while calls go on eagerly; the warm-up calls
continue until that compiler is idle (the time and number of calls are printed), and
*steady* is the median of the calls after it (Neural Tangents: of the calls after the
first). ``--eager`` adds a run with ``INFNETS_COMPILE=0``. Neural Tangents gets the same
inputs in its own NHWC layout; the kernels of the two libraries are compared entrywise.
Peak memory is the subprocess's peak RSS minus its RSS after the imports.

Run::

    python benchmarks/bench_conv.py                    # all three problems
    python benchmarks/bench_conv.py --problems gap,flatten --repeats 5 --eager --cold-cache
    python benchmarks/bench_conv.py --threads 2        # torch.set_num_threads(2)

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

W_STD, B_STD, CHANNELS = 1.4, 0.1, 64
#: set by --cold-cache
COLD_CACHE = [False]
#: longest warm-up (seconds) waiting for the background compiler
WARMUP_BUDGET_S = 900

PROBLEMS = {
    # name: (readout, number of images or 'digits')
    "gap": ("GlobalAvgPool", 128),
    "flatten": ("Flatten", 1000),
    "digits": ("GlobalAvgPool", "digits"),
}


def nt_arch(readout: str) -> str:
    """The Neural Tangents stax code of the benchmark network (NHWC)."""
    conv = f"stax.Conv({CHANNELS}, (3, 3), padding='SAME', W_std={W_STD}, b_std={B_STD})"
    layers = [conv, "stax.Relu()"] * 3 + [
        f"stax.{readout}()",
        f"stax.Dense(1, W_std={W_STD}, b_std={B_STD})",
    ]
    return "stax.serial(" + ", ".join(layers) + ")"


INFNETS_SNIPPET = """
import json, os, resource, sys, time
import numpy as np
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import torch
from infnets import stax
from infnets._src.evaluate import compiled
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
readout, inputs, repeats, threads, save, w, b, ch, budget = sys.argv[1:10]
repeats, w, b, ch, budget = int(repeats), float(w), float(b), int(ch), float(budget)
if int(threads) > 0:
    torch.set_num_threads(int(threads))
layers = []
for _ in range(3):
    layers += [stax.Conv(ch, (3, 3), padding="SAME", W_std=w, b_std=b), stax.Relu()]
layers += [getattr(stax, readout)(), stax.Dense(1, W_std=w, b_std=b)]
kernel_fn = stax.serial(*layers).kernel_fn
x = torch.from_numpy(np.load(inputs))            # NHWC, as Neural Tangents gets it
x = x.permute(0, 3, 1, 2).contiguous()           # -> NCHW, PyTorch's layout
def call():
    t0 = time.perf_counter()
    k = kernel_fn(x, None, ("nngp", "ntk"), progress=False)
    return k, time.perf_counter() - t0
start = time.perf_counter()
k, first = call()
rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# warm-up: keep calling (as a user's loop would) until kernels have been compiled, the
# background compiler has nothing left to do and a call queued nothing new
warmup = []
compiling = os.environ.get("INFNETS_COMPILE", "auto") != "0"
while compiling and repeats and time.perf_counter() - start < budget:
    k, t = call()
    warmup.append(t)
    if compiled._CACHE and not compiled.pending():
        k, t = call()
        warmup.append(t)
        if not compiled.pending():
            break
compiled_after = time.perf_counter() - start
times = []
for _ in range(repeats):
    k, t = call()
    times.append(t)
if save:
    np.savez(save, nngp=k.nngp.numpy(), ntk=k.ntk.numpy())
print(json.dumps({"first_s": first, "steady_s": float(np.median(times)) if times else None,
                  "times_s": times, "warmup_s": warmup, "compiled_after_s": compiled_after,
                  "compiled_kernels": len(compiled._CACHE), "pending": compiled.pending(),
                  "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              - rss_import) / 1024,
                  "first_peak_mb": (rss_first - rss_import) / 1024,
                  "threads": torch.get_num_threads()}))
"""


def make_images(which: int | str, seed: int = 0) -> np.ndarray:
    """NHWC float64 images: ``n`` standard normal 8x8 images, or the digits / 16."""
    if which == "digits":
        from sklearn.datasets import load_digits

        return (load_digits().images / 16.0)[..., None].astype(np.float64)
    return _nt.make_inputs((int(which), 8, 8, 1), seed)


def infnets_timing(
    readout: str, inputs: str, repeats: int, threads: int, save: str, mode: str = "auto"
) -> dict:
    """Time infnets in a fresh subprocess: first call, warm-up, steady state.

    ``mode`` is ``INFNETS_COMPILE``: ``auto`` (the default: kernels that repeat are
    compiled by TorchInductor in a background thread while eager calls go on; cached
    on disk) or ``0`` (eager only). The warm-up calls go on until the background
    compiler is idle (at most :data:`WARMUP_BUDGET_S`); *steady* is measured after.
    """
    env = dict(os.environ)
    env["INFNETS_COMPILE"] = mode
    if COLD_CACHE[0]:  # TorchInductor's on-disk cache starts empty: compilation from scratch
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INFNETS_SNIPPET), readout, inputs,
         str(repeats), str(threads), save, str(W_STD), str(B_STD), str(CHANNELS),
         str(WARMUP_BUDGET_S)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def nt_timing(readout: str, inputs: str, repeats: int, save: str) -> dict:
    """Time Neural Tangents (jax.jit, float64, CPU) on the same NHWC inputs."""
    code = f"""
    x = jax.block_until_ready(jnp.asarray(np.load({inputs!r})))
    _, _, kernel_fn = {nt_arch(readout)}
    kfn = jax.jit(kernel_fn, static_argnames=("get",))
    out, first, times = time_calls(lambda: kfn(x, None, get=("nngp", "ntk")), {int(repeats)})
    np.savez({save!r}, nngp=np.asarray(out.nngp), ntk=np.asarray(out.ntk))
    emit(dict(first_s=first, steady_times=times, dtype=str(out.nngp.dtype)))
    """
    res = _nt.run_nt(code, timeout=6 * 3600)
    times = res.get("steady_times") or []
    res["steady_s"] = float(np.median(times)) if times else None
    res["peak_mb"] = res["maxrss_mb"] - res["rss_after_import_mb"]
    return res


def _fmt(v: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="gap,flatten,digits")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--nt-digits", action="store_true", help="run Neural Tangents on digits")
    parser.add_argument("--no-nt", action="store_true", help="infnets only")
    parser.add_argument("--json", default="", help="write the results to this file")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="also time infnets with INFNETS_COMPILE=0 (the eager code, nothing compiled)",
    )
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="give every infnets subprocess an empty TorchInductor cache (worst-case compile)",
    )
    args = parser.parse_args()
    COLD_CACHE[0] = args.cold_cache
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; float64; kernel_fn(x, None, ('nngp', 'ntk'))"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.problems.split(","):
            readout, which = PROBLEMS[name]
            x = make_images(which)
            inputs = f"{tmp}/{name}_x.npy"
            np.save(inputs, x)
            # the digits run once: its first call is the measurement (3 minutes target)
            repeats = 0 if name == "digits" else args.repeats
            ours_path, nt_path = f"{tmp}/ours_{name}.npz", f"{tmp}/nt_{name}.npz"
            ours = infnets_timing(readout, inputs, repeats, args.threads, ours_path)
            row = {"n": int(x.shape[0]), "readout": readout, "infnets": ours}
            if args.eager and name != "digits":
                row["infnets_eager"] = infnets_timing(
                    readout, inputs, repeats, args.threads, "", mode="0"
                )
            if not args.no_nt and (name != "digits" or args.nt_digits):
                nt = nt_timing(readout, inputs, repeats, nt_path)
                a, b = np.load(ours_path), np.load(nt_path)
                row["nt"] = {k: nt[k] for k in ("first_s", "steady_s", "peak_mb")}
                row["max_rel_diff"] = max(
                    float(np.max(np.abs(a[g] - b[g])) / np.max(np.abs(b[g])))
                    for g in ("nngp", "ntk")
                )
            results[name] = row
            print(f"\n{name}: N={row['n']}, 3 x [Conv(64, 3x3, SAME), Relu], {readout}, Dense(1)")
            print(f"  {'':9} {'first (s)':>10} {'steady (s)':>11} {'peak (MB)':>10}")
            print(
                f"  {'infnets':9} {_fmt(ours['first_s'], 10, '.2f')} "
                f"{_fmt(ours['steady_s'], 11, '.2f')} {_fmt(ours['peak_mb'], 10, '.0f')}"
                f"   ({ours['threads']} torch threads; {ours['compiled_kernels']} kernels "
                f"compiled in the background, idle after {ours['compiled_after_s']:.1f} s / "
                f"{len(ours['warmup_s']) + 1} calls)"
            )
            eager = row.get("infnets_eager")
            if eager:
                print(
                    f"  {'eager':9} {_fmt(eager['first_s'], 10, '.2f')} "
                    f"{_fmt(eager['steady_s'], 11, '.2f')} {_fmt(eager['peak_mb'], 10, '.0f')}"
                    "   (INFNETS_COMPILE=0)"
                )
            if "nt" in row:
                nt = row["nt"]
                print(
                    f"  {'NT 0.6.5':9} {_fmt(nt['first_s'], 10, '.2f')} "
                    f"{_fmt(nt['steady_s'], 11, '.2f')} {_fmt(nt['peak_mb'], 10, '.0f')}"
                )
                for label, r in (("infnets", ours), ("eager", eager)):
                    if not r:
                        continue
                    speed = None
                    if nt["steady_s"] and r["steady_s"]:
                        speed = nt["steady_s"] / r["steady_s"]
                    print(
                        f"  speed-up {label} (NT time / infnets time): first "
                        f"{nt['first_s'] / r['first_s']:.1f}x, steady {_fmt(speed, 0, '.1f')}x"
                    )
                print(f"  max relative difference {row['max_rel_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
