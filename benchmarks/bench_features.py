"""Random-feature NTK regression at N = 200,000 against the exact kernel on a subset.

Task: inputs ``x ~ N(0, I_16)``, a binary label from a fixed random two-layer teacher
(``y = sign(v . tanh(W x))``), targets +-1; 10,000 test points. Each measurement runs in its
own subprocess so its peak resident memory (``ru_maxrss``) is its own:

* ``exact``: ``kernel_fn`` NTK (train x train, test x train) of a 3-layer ReLU MLP on an
  ``n_exact`` subset and ``predict.gp_inference(..., 'ntk')`` (the infinite ensemble at t = inf);
* ``features``: ``features.random_features(net, x, D, get='ntk')`` (float32) on the same subset
  and on all ``N`` points, then ``features.feature_regression`` (a D x D solve, no N x N matrix).

Prints time, peak memory and test accuracy of each, and the ratio. Usage::

    python benchmarks/bench_features.py [--n 200000] [--n-exact 5000] [--features 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {src!r})
from infnets import features, predict, stax
torch.set_num_threads({threads})
cfg = json.loads({cfg!r})
g = torch.Generator().manual_seed(0)
d = 16
teacher_w = torch.randn(d, 64, generator=g)
teacher_v = torch.randn(64, generator=g)
def data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.sign(torch.tanh(x @ teacher_w) @ teacher_v)
    return x, y[:, None]
x, y = data(cfg["n"], 1)
xt, yt = data(10000, 2)
hidden = [stax.Dense(1, W_std=1.4, b_std=0.1), stax.Relu()] * 3
net = stax.serial(*hidden, stax.Dense(1, W_std=1.4, b_std=0.1))
start = time.perf_counter()
if cfg["mode"] == "exact":
    x64, xt64 = x.double(), xt.double()
    k_tt = net.kernel_fn(x64, None, "ntk")
    k_st = net.kernel_fn(xt64, x64, "ntk")
    mean = predict.gp_inference(k_tt, y.double(), diag_reg=1e-4)("ntk", k_st)
else:
    f = features.random_features(net, torch.cat([x, xt]), cfg["D"], get="ntk", key=0).ntk
    reg = 1e-4 * float((f[: len(x)] ** 2).sum(1).mean())  # the relative ridge of gp_inference
    _, mean = features.feature_regression(f[: len(x)], y, f[len(x):], diag_reg=reg)
seconds = time.perf_counter() - start
acc = float((torch.sign(mean) == yt).double().mean())
print(json.dumps(dict(seconds=seconds, accuracy=acc,
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def run(mode: str, n: int, features_d: int, threads: int) -> dict[str, float]:
    cfg = json.dumps({"mode": mode, "n": n, "D": features_d})
    code = CHILD.format(src=str(ROOT / "src"), threads=threads, cfg=cfg)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--n-exact", type=int, default=5000)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [
        ("exact NTK", args.n_exact, run("exact", args.n_exact, 0, args.threads)),
        ("features", args.n_exact, run("features", args.n_exact, args.features, args.threads)),
        ("features", args.n, run("features", args.n, args.features, args.threads)),
    ]
    print(f"random features D = {args.features}, 3-layer ReLU NTK, 10,000 test points")
    print(f"{'method':<12} {'N':>8} {'time (s)':>9} {'peak (MB)':>10} {'accuracy':>9}")
    for name, n, r in rows:
        print(f"{name:<12} {n:>8} {r['seconds']:>9.1f} {r['peak_mb']:>10.0f} {r['accuracy']:>9.4f}")
    exact, small = rows[0][2], rows[1][2]
    print(
        f"features / exact on N = {args.n_exact}: time {small['seconds'] / exact['seconds']:.2f}x,"
        f" accuracy {small['accuracy'] - exact['accuracy']:+.4f}"
    )


if __name__ == "__main__":
    main()
