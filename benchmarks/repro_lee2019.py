"""Finite-to-infinite convergence exponents (Lee et al. 2019, "Wide neural networks of any depth
evolve as linear models under gradient descent", Figs. 1 and 4).

A ReLU MLP with 2 hidden layers of width n (NTK parameterization, ``W_std = 1.4``,
``b_std = 0.1``), 16 training and 16 test points (d = 8), trained by full-batch gradient
descent on ``1/2 sum (f - y)^2`` with ``lr = 0.5 / lambda_max(Theta)`` for 100 steps
(``infnets.train.gradient_descent_ensemble``, 4 seeds per width). Measured against width:

* ``|Theta_0 - Theta| / |Theta|``: empirical NTK at initialisation vs the analytic one;
* ``|Theta_T - Theta_0| / |Theta_0|``: the change of the empirical NTK during training;
* ``|f_T(x) - f_T^lin(x)|``: trained test outputs vs the infinite-width linearized model
  started from the same ``f_0`` (``predict.gradient_descent_mse(..., discrete=True)``),

and the exponent ``a`` of a least-squares fit ``~ n^a`` (the paper: ``a = -1/2`` for each).

Run::

    python benchmarks/repro_lee2019.py
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from infnets import empirical, plot, predict, stax, train  # noqa: E402

F64 = torch.float64
WIDTHS = (64, 128, 256, 512, 1024, 2048)
SEEDS = (0, 1, 2, 3)
STEPS = 100


def net(width: int) -> stax.Serial:
    return stax.serial(
        stax.Dense(width, 1.4, 0.1), stax.Relu(), stax.Dense(width, 1.4, 0.1), stax.Relu(),
        stax.Dense(1, 1.4, 0.1),
    )  # fmt: skip


def slope(widths, values) -> float:
    x = torch.tensor([math.log(w) for w in widths], dtype=F64)
    y = torch.tensor([math.log(v) for v in values], dtype=F64)
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=F64)
    xt = torch.randn(16, 8, generator=g, dtype=F64)
    y = torch.sin(x[:, :1] * 2) + 0.3 * x[:, 1:2]
    kernel_fn = net(1).kernel_fn
    ntk = kernel_fn(x, None, "ntk")
    ntk_test = kernel_fn(xt, x, "ntk")
    lr = 0.5 / float(torch.linalg.eigvalsh(ntk)[-1])
    rows = {"init": [], "change": [], "pred": []}
    print("| width | NTK at init rel. dev. | NTK change rel. | test-output gap | time |")
    print("|---|---|---|---|---|")
    for width in WIDTHS:
        t0 = time.time()
        layer = net(width)
        _, apply_fn, _ = layer
        run = train.gradient_descent_ensemble(layer, x, y, lr, [0, STEPS], SEEDS, xt)
        ntk_fn = empirical.empirical_ntk_fn(apply_fn)
        dev, change, gap = [], [], []
        for s, seed in enumerate(SEEDS):
            params0 = layer.init_fn(seed, (-1, 8), dtype=F64)[1]
            final = torch.utils._pytree.tree_map(lambda t, s=s: t[s], run.params)
            theta0 = ntk_fn(x, None, params0)
            theta_t = ntk_fn(x, None, final)
            dev.append(float(torch.linalg.norm(theta0 - ntk) / torch.linalg.norm(ntk)))
            change.append(float(torch.linalg.norm(theta_t - theta0) / torch.linalg.norm(theta0)))
            lin = predict.gradient_descent_mse(ntk, y, lr, discrete=True)(
                float(STEPS), run.fx_train[s, 0], run.fx_test[s, 0], ntk_test
            )[1]
            gap.append(float((run.fx_test[s, 1] - lin).pow(2).mean().sqrt()))
        for key, vals in zip(rows, (dev, change, gap)):
            rows[key].append(sum(vals) / len(vals))
        print(
            f"| {width} | {rows['init'][-1]:.4f} | {rows['change'][-1]:.4f} | "
            f"{rows['pred'][-1]:.4f} | {time.time() - t0:.0f} s |"
        )
    print("\nFitted exponents a (value ~ width^a); Lee et al. 2019: -0.5 for each")
    for key, label in (
        ("init", "NTK at init"),
        ("change", "NTK change"),
        ("pred", "test-output gap"),
    ):
        print(f"| {label} | {slope(WIDTHS, rows[key]):.3f} |")
    fig, ax = plot.figure()
    ax = ax[0]
    for key, label in (
        ("init", "|Θ0 - Θ|/|Θ|"),
        ("change", "|ΘT - Θ0|/|Θ0|"),
        ("pred", "RMS |fT - fT_lin|"),
    ):
        ax.loglog(WIDTHS, rows[key], "o-", label=f"{label} (slope {slope(WIDTHS, rows[key]):.2f})")
    ref = [rows["init"][0] * (w / WIDTHS[0]) ** -0.5 for w in WIDTHS]
    ax.loglog(WIDTHS, ref, "k:", label="width^-1/2")
    ax.set_xlabel("width")
    ax.legend(fontsize=8)
    path = plot.save(fig, os.path.join(os.path.dirname(__file__), "figures", "lee2019.png"))
    print("figure:", path)


if __name__ == "__main__":
    main()
