"""``infnets demo``: what infinite-width networks are, in four computed experiments.

1. **1-D regression.** A network prior with infinitely many hidden units is a Gaussian
   process with the NNGP kernel; its exact posterior, and the exact distribution of an
   infinite ensemble of networks trained by gradient descent (NTK), come with error
   bands (Lee et al. 2018; Lee et al. 2019).
2. **Training dynamics.** Finite networks of growing width, trained by full-batch
   gradient descent in PyTorch, approach the closed-form infinite-width curve
   (:func:`infnets.predict.gradient_descent_mse_ensemble`); each network is also
   compared with the infinite-width linear model started from its own initial
   function, a distance that shrinks like ``width^(-1/2)``.
3. **Digits classification.** NNGP and NTK accuracy of a fully-connected and a
   convolutional architecture beside the same architectures trained at finite width.
4. **Kernel heatmap.** The NTK of the digits, sorted by class: the block structure a
   kernel machine classifies with.

Everything printed and plotted is computed by the run; the numbers are also written
to ``results.json`` in the output folder beside the PNG figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import torch
from torch import Tensor

from infnets import plot, predict, stax
from infnets._src.app import demo_data, demo_train
from infnets._src.layers.base import Layer

__all__ = ["DemoConfig", "run_demo"]

W_STD, B_STD = 1.5, 0.05


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo's experiments (``quick`` shrinks them for the test suite).

    Attributes:
        quick: whether this is the sub-minute version.
        n_regression: 1-D training points.
        widths: finite widths of the dynamics experiment.
        dynamics_seeds: networks per width.
        dynamics_steps: gradient-descent steps.
        digits_train: training images.
        digits_test: test images.
        fc_width: hidden width of the finite fully-connected network.
        conv_channels: channels of the finite convolutional network.
        epochs: Adam epochs of the finite digit classifiers.
        finite_lr: Adam's step size for them.
        heatmap_size: images in the kernel heatmap.
    """

    quick: bool
    n_regression: int = 24
    widths: tuple[int, ...] = (64, 256, 1024, 4096)
    dynamics_seeds: int = 8
    dynamics_steps: int = 1000
    digits_train: int = 1000
    digits_test: int = 797
    fc_width: int = 512
    conv_channels: int = 32
    epochs: int = 20
    finite_lr: float = 1e-2
    heatmap_size: int = 400

    @classmethod
    def make(cls, quick: bool) -> DemoConfig:
        """The full configuration, or the quick one."""
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            dynamics_seeds=4,
            dynamics_steps=200,
            digits_train=300,
            digits_test=300,
            fc_width=256,
            conv_channels=16,
            epochs=10,
            heatmap_size=200,
        )


# ----------------------------------------------------------------- architectures
def regression_net(width: int = 512) -> Layer:
    """Two ReLU hidden layers (NTK parameterization) for the 1-D regression.

    A 1-D input needs large biases (``b_std = 1.5``) for the units' kinks to spread
    over the data range instead of all sitting at ``x = 0``.
    """
    return stax.serial(
        stax.Dense(width, W_std=2.5, b_std=1.5),
        stax.Relu(),
        stax.Dense(width, W_std=2.5, b_std=1.5),
        stax.Relu(),
        stax.Dense(1, W_std=2.5, b_std=1.5),
    )


def dynamics_net(width: int) -> Layer:
    """One Erf hidden layer of ``width`` units (NTK parameterization)."""
    return stax.serial(
        stax.Dense(width, W_std=W_STD, b_std=B_STD),
        stax.Erf(),
        stax.Dense(1, W_std=W_STD, b_std=B_STD),
    )


def fc_net(width: int) -> Layer:
    """Fully-connected classifier: two ReLU hidden layers, 10 outputs."""
    return stax.serial(
        stax.Dense(width, W_std=W_STD, b_std=B_STD),
        stax.Relu(),
        stax.Dense(width, W_std=W_STD, b_std=B_STD),
        stax.Relu(),
        stax.Dense(10, W_std=W_STD, b_std=B_STD),
    )


def conv_net(channels: int) -> Layer | None:
    """Convolutional classifier (two 3x3 ``SAME`` convolutions, ReLU, flatten, dense).

    Returns ``None`` when this build of infnets has no ``stax.Conv``.
    """
    if not all(hasattr(stax, name) for name in ("Conv", "Flatten")):
        return None
    return stax.serial(
        stax.Conv(channels, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD),
        stax.Relu(),
        stax.Conv(channels, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD),
        stax.Relu(),
        stax.Flatten(),
        stax.Dense(10, W_std=W_STD, b_std=B_STD),
    )


# ------------------------------------------------------------------ utilities
class _Progress:
    """tqdm bars that can be switched off (a no-op object then)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, total: int, desc: str) -> Any:
        if not self.enabled:
            return _NullBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _blocked_kernels(
    layer: Layer, x_test: Tensor, x_train: Tensor, bar: Any, block: int = 256
) -> Any:
    """``kernel_fn(x_test, x_train, ('nngp', 'ntk'))`` in row blocks, one bar tick each."""
    parts = []
    for lo in range(0, x_test.shape[0], block):
        parts.append(
            layer.kernel_fn(x_test[lo : lo + block], x_train, ("nngp", "ntk"), progress=False)
        )
        bar.update(1)
    return type(parts[0])(*(torch.cat([getattr(p, f) for p in parts]) for f in parts[0]._fields))


def _log_steps(last: int, n: int = 30) -> list[int]:
    """0 and about ``n`` integer steps log-spaced in ``[1, last]``."""
    raw = torch.logspace(0, math.log10(last), n, dtype=torch.float64)
    return sorted({0, last} | {int(round(float(v))) for v in raw})


# ------------------------------------------------------------- 1. regression
def regression(
    cfg: DemoConfig, data: demo_data.Regression1D, out: str, bars: _Progress, draw: bool
) -> dict:
    """NNGP posterior and NTK ensemble with +/- 2 sigma bands on the 1-D problem."""
    net = regression_net()
    with bars(3, "1/4 regression kernels") as bar:
        k_tt = net.kernel_fn(data.x_train, None, ("nngp", "ntk"))
        bar.update(1)
        k_xt = net.kernel_fn(data.x_test, data.x_train, ("nngp", "ntk"))
        bar.update(1)
        k_xx = net.kernel_fn(data.x_test, None, ("nngp", "ntk"))
        bar.update(1)
    noise = data.noise_std**2
    predict_fn = predict.gp_inference(
        k_tt, data.y_train, diag_reg=noise, diag_reg_absolute_scale=True
    )
    post = predict_fn(("nngp", "ntk"), k_xt, k_xx)
    inside = (data.x_test.abs() <= math.pi)[:, 0]
    metrics: dict[str, Any] = {}
    bands = {}
    for name, label in (("nngp", "NNGP posterior"), ("ntk", "NTK ensemble (trained, t = inf)")):
        g = getattr(post, name)
        mean = g.mean[:, 0]
        std = g.covariance.diagonal().clamp_min(0).sqrt()
        err = mean - data.y_test[:, 0]
        metrics[name] = {
            "rmse_in_range": float(err[inside].pow(2).mean().sqrt()),
            "rmse_all": float(err.pow(2).mean().sqrt()),
            "mean_std_in_range": float(std[inside].mean()),
            "mean_std_outside": float(std[~inside].mean()),
            "coverage_2sigma": float((err.abs() <= 2 * std).double().mean()),
        }
        bands[label] = (mean, std)
    result = {"metrics": metrics, "n_train": int(data.x_train.shape[0]), "figure": None}
    if not draw:
        return result
    fig, axes = plot.figure(ncols=2, size=(6.0, 4.2))
    for ax, (label, band) in zip(axes, bands.items()):
        plot.posterior_bands(
            data.x_train, data.y_train, data.x_test, {label: band}, y_test=data.y_test, ax=ax,
            title=label,
        )  # fmt: skip
    fig.suptitle(
        f"Infinitely wide ReLU network (2 hidden layers), {len(data.x_train)} noisy points"
    )
    result["figure"] = plot.save(fig, os.path.join(out, "regression.png"))
    return result


# -------------------------------------------------------------- 2. dynamics
def dynamics(
    cfg: DemoConfig, data: demo_data.Regression1D, out: str, bars: _Progress, draw: bool
) -> dict:
    """Test loss vs gradient-descent steps: widths 64..4096 against infinite width."""
    x_train, y_train = data.x_train, data.y_train
    x_test = torch.linspace(-math.pi, math.pi, 100, dtype=torch.float64)[:, None]
    y_test = demo_data.target_function(x_test)
    kernel_fn = dynamics_net(1).kernel_fn
    ntk_train = kernel_fn(x_train, None, "ntk")
    # lr = 0.1 / (largest NTK eigenvalue): gradient descent then follows gradient flow,
    # the time convention of infnets.predict, to a few percent at every step
    lr = 0.05 * predict.max_learning_rate(ntk_train)
    steps = _log_steps(cfg.dynamics_steps)
    times = torch.tensor(steps, dtype=torch.float64)
    ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, lr)
    inf = ensemble(t=times, x_test=x_test, get="ntk", compute_cov=True)
    var = inf.covariance.diagonal(dim1=-2, dim2=-1)  # (T, M)
    inf_loss = ((inf.mean - y_test) ** 2).mean(dim=(1, 2)) + var.mean(-1)

    # Each finite network is compared with the infinite-width linear model started from
    # its own initial function f_0 (same data, same steps). Their loss difference is also
    # a control variate: mean(L_finite - L_linear) + E[L_linear] estimates the expected
    # finite-width loss without the large spread of random initial functions (for one
    # hidden layer f_0 has exactly the NNGP covariance, so the estimate is unbiased).
    seeds = list(range(cfg.dynamics_seeds))
    k_test = kernel_fn(x_test, x_train, ("nngp", "ntk"))
    k_train = kernel_fn(x_train, None, ("nngp", "ntk"))
    expected_linear = demo_train.linearized_expected_loss(
        k_train.ntk, k_train.nngp, k_test.ntk, k_test.nngp, kernel_fn(x_test, None, "cov1"),
        y_train, y_test, lr, steps,
    )  # fmt: skip
    y_scale = float(y_test.pow(2).mean().sqrt())
    curves, errors, distances, table = {}, {}, {}, []
    f32 = torch.float32
    total = cfg.dynamics_steps * len(cfg.widths)
    with bars(total, "2/4 training finite networks") as bar, demo_train.single_thread():
        for width in cfg.widths:
            fx0, fx = demo_train.gradient_descent_ensemble(
                dynamics_net(width), x_train.to(f32), y_train.to(f32), x_test.to(f32), lr,
                steps, [1000 * width + s for s in seeds], progress=bar,
            )  # fmt: skip
            fx, fx0 = fx.double(), fx0.double()  # (S, T, M, 1), (S, N, 1)
            losses = ((fx - y_test) ** 2).mean(dim=(2, 3))  # (S, T)
            f_lin = demo_train.linearized_gradient_descent(
                ntk_train, k_test.ntk, y_train.repeat(1, len(seeds)), lr, steps,
                fx0[..., 0].T, fx[:, 0, :, 0].T,
            )  # fmt: skip  # (T, M, S)
            lin_losses = ((f_lin - y_test[None]) ** 2).mean(1).T  # (S, T)
            dist = (fx[..., 0].permute(1, 2, 0) - f_lin).pow(2).mean(1).sqrt() / y_scale
            label = f"width {width}"
            gap = losses - lin_losses
            curves[label] = gap.mean(0) + expected_linear
            errors[label] = gap.std(0) / math.sqrt(len(seeds))
            distances[label] = dist.mean(-1)
            table.append(
                {
                    "width": width,
                    "final_loss_mean": float(curves[label][-1]),
                    "final_loss_sem": float(errors[label][-1]),
                    "final_loss_raw_mean": float(losses[:, -1].mean()),
                    "distance_to_infinite_final": float(dist[-1].mean()),
                    "distance_to_infinite_max": float(dist.mean(-1).max()),
                }
            )
    ws = torch.tensor([float(r["width"]) for r in table], dtype=torch.float64).log()
    ds = torch.tensor([r["distance_to_infinite_max"] for r in table], dtype=torch.float64).log()
    slope = float(((ws - ws.mean()) * (ds - ds.mean())).sum() / ((ws - ws.mean()) ** 2).sum())
    result = {
        "learning_rate": lr,
        "steps": steps,
        "infinite_loss": inf_loss.tolist(),
        "finite_loss": {k: v.tolist() for k, v in curves.items()},
        "distance": {k: v.tolist() for k, v in distances.items()},
        "widths": table,
        "infinite_final_loss": float(inf_loss[-1]),
        "distance_slope": slope,
        "figure": None,
    }
    if not draw:
        return result
    fig, axes = plot.figure(ncols=2, size=(6.0, 4.5))
    plot.dynamics_curves(
        times, curves, reference=("infinite width (exact)", inf_loss), bands=errors,
        ax=axes[0], title=f"expected test loss ({len(seeds)} networks per width, control variate)",
    )  # fmt: skip
    plot.dynamics_curves(
        times[1:], {k: v[1:] for k, v in distances.items()}, ax=axes[1],
        ylabel="|f_width - f_infinite| / |y|",
        title="distance to the infinite-width model from the same f_0",
    )  # fmt: skip
    fig.suptitle(
        f"Gradient descent (lr = {lr:.3g}, loss 1/2 sum (f - y)^2): finite width -> infinite width"
    )
    result["figure"] = plot.save(fig, os.path.join(out, "dynamics.png"))
    return result


# ---------------------------------------------------------------- 3. digits
def digits(cfg: DemoConfig, data: demo_data.Digits, bars: _Progress, seed: int) -> dict:
    """NNGP/NTK accuracy beside finite networks, fully-connected and convolutional."""
    targets = data.targets(data.y_train)
    archs: list[tuple[str, str, Callable[[int], Layer | None], int, bool]] = [
        ("FC", "Dense-ReLU x2, Dense", fc_net, cfg.fc_width, False),
        ("CNN", "Conv3x3-ReLU x2, Flatten, Dense", conv_net, cfg.conv_channels, True),
    ]
    rows, kernels = [], {}
    for name, desc, make, width, spatial in archs:
        layer = make(width)
        if layer is None:
            rows.append({"architecture": name, "description": desc, "available": False})
            continue
        x_tr = data.x_train if spatial else data.flat(data.x_train)
        x_te = data.x_test if spatial else data.flat(data.x_test)
        n_blocks = -(-x_te.shape[0] // 256)
        with bars(1 + n_blocks, f"3/4 {name} kernels") as bar:
            k_tt = layer.kernel_fn(x_tr, None, ("nngp", "ntk"), progress=False)
            bar.update(1)
            k_xt = _blocked_kernels(layer, x_te, x_tr, bar)
        predict_fn = predict.gp_inference(k_tt, targets, diag_reg=1e-4)
        means = predict_fn(("nngp", "ntk"), k_xt)
        acc = {g: demo_train.accuracy(getattr(means, g), data.y_test) for g in ("nngp", "ntk")}
        with bars(cfg.epochs, f"3/4 {name} finite width {width}") as bar:
            with demo_train.single_thread():
                finite = demo_train.train_classifier(
                    layer, x_tr, targets, x_te, data.y_test, epochs=cfg.epochs,
                    learning_rate=cfg.finite_lr, seed=seed, progress=bar,
                )  # fmt: skip
        kernels[name] = k_tt.ntk
        rows.append(
            {
                "architecture": name,
                "description": desc,
                "available": True,
                "nngp": acc["nngp"],
                "ntk": acc["ntk"],
                "finite": finite,
                "finite_width": width,
                "finite_training": f"Adam (lr {cfg.finite_lr:g}, batch 64), {cfg.epochs} epochs, "
                "cross-entropy",
            }
        )
    return {
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "chance": float(torch.bincount(data.y_test).max()) / data.y_test.shape[0],
        "rows": rows,
        "_kernels": kernels,
    }


# --------------------------------------------------------------- 4. heatmap
def heatmap(cfg: DemoConfig, data: demo_data.Digits, kernels: dict, out: str, draw: bool) -> dict:
    """The train-train NTK of a subset of digits, sorted by class."""
    n = min(cfg.heatmap_size, data.y_train.shape[0])
    labels = data.y_train[:n]
    stats = {}
    for name, k in kernels.items():
        sub = k[:n, :n]
        d = sub.diagonal().sqrt()
        corr = sub / d[:, None] / d[None, :]
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(n, dtype=torch.bool)
        stats[name] = {
            "within_class_correlation": float(corr[same & off].mean()),
            "between_class_correlation": float(corr[~same].mean()),
        }
    result = {"n": n, "correlations": stats, "figure": None}
    if not draw:
        return result
    fig, axes = plot.figure(ncols=len(kernels), size=(5.5, 5.0))
    for ax, (name, k) in zip(axes, kernels.items()):
        plot.kernel_heatmap(
            k[:n, :n], labels, ax=ax, title=f"{name} NTK, {n} digits sorted by class"
        )
    result["figure"] = plot.save(fig, os.path.join(out, "kernel_heatmap.png"))
    return result


# -------------------------------------------------------------------- driver
def _report_lines(res: dict) -> list[str]:
    """The printed report, one string per line (every number from ``res``)."""
    lines: list[str] = []
    add = lines.append
    reg = res["regression"]
    add(f"1. 1-D regression, {reg['n_train']} noisy points, 2-hidden-layer ReLU network of "
        "infinite width")  # fmt: skip
    add(f"   {'':26s}{'RMSE |x|<=pi':>13s}{'RMSE all':>10s}{'mean sd in/out':>16s}"
        f"{'2sd coverage':>14s}")  # fmt: skip
    for g, label in (("nngp", "NNGP posterior"), ("ntk", "NTK ensemble (t = inf)")):
        m = reg["metrics"][g]
        sd = f"{m['mean_std_in_range']:.3f}/{m['mean_std_outside']:.3f}"
        add(f"   {label:26s}{m['rmse_in_range']:13.3f}{m['rmse_all']:10.3f}{sd:>16s}"
            f"{m['coverage_2sigma']:14.2f}")  # fmt: skip
    add("")
    dyn = res["dynamics"]
    add(f"2. Training dynamics, 1-hidden-layer Erf network, full-batch gradient descent, "
        f"lr = {dyn['learning_rate']:.4g}, {dyn['steps'][-1]} steps")  # fmt: skip
    add(f"   {'width':>10s}{'expected test loss at end':>28s}{'max |f_w - f_inf| / |y|':>26s}")
    for r in dyn["widths"]:
        loss = f"{r['final_loss_mean']:.4f} +/- {r['final_loss_sem']:.4f}"
        add(f"   {r['width']:>10d}{loss:>28s}{r['distance_to_infinite_max']:>26.4f}")
    add(f"   {'infinite':>10s}{dyn['infinite_final_loss']:>28.4f}{0.0:>26.4f}")
    add(f"   distance ~ width^{dyn['distance_slope']:.2f} (theory: width^-0.5)")
    add("")
    dg = res["digits"]
    add(f"3. Digits classification: test accuracy ({dg['n_train']} train / {dg['n_test']} "
        f"test images; most frequent class {dg['chance']:.3f})")  # fmt: skip
    head = f"   {'architecture':42s}{'NNGP (inf)':>11s}{'NTK (inf)':>11s}{'finite, trained':>22s}"
    add(head)
    add("   " + "-" * (len(head) - 3))
    for r in dg["rows"]:
        arch = f"{r['architecture']} ({r['description']})"
        if not r["available"]:
            add(f"   {arch:42s}   (stax.Conv is not available in this build)")
            continue
        finite = f"{r['finite']:.3f} (width {r['finite_width']})"
        add(f"   {arch:42s}{r['nngp']:11.3f}{r['ntk']:11.3f}{finite:>22s}")
    trained = [r for r in dg["rows"] if r["available"]]
    if trained:
        add(f"   finite: the same stax networks (NTK parameterization), "
            f"{trained[0]['finite_training']}")  # fmt: skip
    add("")
    hm = res["heatmap"]
    add(f"4. NTK of {hm['n']} training digits sorted by class: mean correlation")
    for name, st in hm["correlations"].items():
        add(f"   {name}: within a class {st['within_class_correlation']:.3f}, "
            f"between classes {st['between_class_correlation']:.3f}")  # fmt: skip
    add("")
    return lines


def run_demo(
    out: str = "infnets-demo",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
) -> dict:
    """Run the four experiments, write the figures and ``results.json``, print a report.

    Args:
        out: output folder (created).
        quick: the sub-minute version (smaller sizes, fewer steps).
        seed: seed of the data splits and finite networks.
        progress: show tqdm progress bars on stderr.
        stream: where to print the report (default ``sys.stdout``).

    Returns:
        The results (as written to ``out/results.json``).
    """
    stream = sys.stdout if stream is None else stream
    draw = importlib.util.find_spec("matplotlib") is not None
    if not draw:
        print(
            "matplotlib is not installed: computing without figures "
            "(pip install matplotlib, or pip install 'infnets[plot]').",
            file=stream,
        )
    cfg = DemoConfig.make(quick)
    os.makedirs(out, exist_ok=True)
    bars = _Progress(progress)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), time.process_time()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        cpu[name] = round(time.process_time() - c0, 2)
        return value

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reg_data = demo_data.regression_1d(cfg.n_regression, seed=seed)
        res: dict[str, Any] = {"quick": quick, "seed": seed, "config": dataclasses.asdict(cfg)}
        res["regression"] = timed("regression", lambda: regression(cfg, reg_data, out, bars, draw))
        res["dynamics"] = timed("dynamics", lambda: dynamics(cfg, reg_data, out, bars, draw))
        dig = demo_data.digits(cfg.digits_train, cfg.digits_test, seed=seed)
        res["digits"] = timed("digits", lambda: digits(cfg, dig, bars, seed))
        kernels = res["digits"].pop("_kernels")
        res["heatmap"] = timed("heatmap", lambda: heatmap(cfg, dig, kernels, out, draw))
    timings["total"] = round(time.perf_counter() - start, 2)
    cpu["total"] = round(time.process_time() - cpu_start, 2)
    res["timings_s"] = timings
    res["cpu_seconds"] = cpu  # all threads; wall time is lower on idle cores
    res["figures"] = [
        f for f in (res[k]["figure"] for k in ("regression", "dynamics", "heatmap")) if f
    ]
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    for line in _report_lines(res):
        print(line, file=stream)
    print(f"Figures and results.json written to {os.path.abspath(out)}:", file=stream)
    for f in res["figures"]:
        print(f"   {f}", file=stream)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total")
    print(f"Total time {timings['total']:.1f} s ({parts}).", file=stream)
    return res
