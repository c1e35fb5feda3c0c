"""Linearized and quadratic networks, and stax finite twins: training-step cost on CPU.

Problem (issue #18, "fast by default"): the MLP ``Linear(64, 512) -> ReLU -> Linear(512, 10)``
on 128 random inputs. One *step* is ``loss = f(x).square().sum(); loss.backward()`` with the
gradients of the trainable parameters of ``f`` (set to ``None`` before each step). Methods:

* ``model``: the ``nn.Sequential`` itself (the reference of every ratio);
* ``linearize``: ``infnets.empirical.linearize(model)``;
* ``taylor 2``: ``infnets.empirical.taylor_expand(model, None, 2)``;
* ``torch.func lin`` / ``torch.func taylor 2``: the hand-written torch.func recipe, the peer
  of the two: ``torch.func.jvp`` of ``torch.func.functional_call`` at the expansion point
  with tangent ``theta - theta_0`` (nested once more for degree 2), trainable parameters
  held in a dict of ``nn.Parameter`` s.

The expansions are evaluated away from their expansion point (every parameter moved by
``0.01 * N(0, 1)``) and compared with the torch.func recipe (max abs difference printed).
Targets: linearize within 3x of the model, degree 2 within 6x, in float32 and float64.

Second table: the stax finite twin ``serial(Dense(512), Relu(), Dense(10)).to_module((-1,
64))`` against the ``nn.Sequential`` of the same shapes (target: within 1.3x); the twin
also applies the NTK scaling ``W_std / sqrt(fan_in)``, one more elementwise product per layer.

The methods are timed round-robin (one step of each, repeated) so that load from other
processes hits all of them alike; each figure is the median over ``--repeats`` rounds after
``--warmup`` rounds. Run::

    python benchmarks/bench_linearize.py                      # both dtypes, 2 threads
    python benchmarks/bench_linearize.py --repeats 400 --dtypes float64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from infnets import empirical, stax

N, D, WIDTH, OUT = 128, 64, 512, 10


def mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, WIDTH), nn.ReLU(), nn.Linear(WIDTH, OUT)).to(dtype)


class TorchFuncTaylor(nn.Module):
    """The torch.func recipe: ``f(theta_0) + J delta (+ 1/2 D^2 f[delta, delta])``."""

    def __init__(self, model: nn.Module, degree: int) -> None:
        super().__init__()
        self.model = [model]  # a list: not a submodule (its parameters are not trained)
        self.degree = degree
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.theta0 = theta0
        self.theta = nn.ParameterDict({n.replace(".", "_"): v.clone() for n, v in theta0.items()})
        self.keys = {n: n.replace(".", "_") for n in theta0}

    def forward(self, x: Tensor) -> Tensor:
        model = self.model[0]
        delta = {n: self.theta[k] - self.theta0[n] for n, k in self.keys.items()}

        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, p, (x,))

        if self.degree == 1:
            primal, tangent = jvp(f, (self.theta0,), (delta,))
            return primal + tangent

        def first(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return jvp(f, (p,), (delta,))

        (primal, tangent), (_, second) = jvp(first, (self.theta0,), (delta,))
        return primal + tangent + 0.5 * second


def perturb(module: nn.Module, model: nn.Module, scale: float = 0.01) -> None:
    """Move every trainable parameter of an expansion of ``model`` by the same
    ``scale * N(0, 1)`` draw, whatever its name in the expansion."""
    g = torch.Generator().manual_seed(1)
    moves = {
        n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
    }
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = name.removeprefix("params.").removeprefix("theta.").replace("_", ".")
            p.add_(moves[key])


def step_fn(f: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        f(x).square().sum().backward()

    return step


def round_robin(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def expansions(dtype: torch.dtype, repeats: int, warmup: int) -> dict[str, Any]:
    model = mlp(dtype)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    methods: dict[str, nn.Module] = {
        "model": model,
        "linearize": empirical.linearize(model),
        "taylor 2": empirical.taylor_expand(model, None, 2),
        "torch.func lin": TorchFuncTaylor(model, 1),
        "torch.func taylor 2": TorchFuncTaylor(model, 2),
    }
    for name, m in methods.items():
        if name != "model":
            perturb(m, model)  # the same theta for ours and the recipe
    with torch.no_grad():
        diff = {
            "linearize": (methods["linearize"](x) - methods["torch.func lin"](x)).abs().max(),
            "taylor 2": (methods["taylor 2"](x) - methods["torch.func taylor 2"](x)).abs().max(),
        }
    steps = {k: step_fn(m, list(m.parameters()), x) for k, m in methods.items()}
    ms = round_robin(steps, repeats, warmup)
    return {"ms": ms, "diff": {k: float(v) for k, v in diff.items()}}


def twins(dtype: torch.dtype, repeats: int, warmup: int) -> dict[str, float]:
    twin = stax.serial(stax.Dense(WIDTH), stax.Relu(), stax.Dense(OUT)).to_module(
        (-1, D), key=0, dtype=dtype
    )
    seq = mlp(dtype)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    steps = {
        "nn.Sequential": step_fn(seq, list(seq.parameters()), x),
        "stax twin": step_fn(twin, list(twin.parameters()), x),
    }
    return round_robin(steps, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: default)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; MLP {D}-{WIDTH}-{OUT}, N={N}; "
        f"median of {args.repeats} forward+backward steps after {args.warmup}"
    )
    for name in args.dtypes:
        dtype = getattr(torch, name)
        res = expansions(dtype, args.repeats, args.warmup)
        ms = res["ms"]
        base = ms["model"]
        print(f"\n{name}: step time (ms) and ratio to the model")
        for k, v in ms.items():
            print(f"  {k:20s} {v:8.3f}  {v / base:5.2f}x")
        print(
            "  max |infnets - torch.func|: "
            + ", ".join(f"{k} {v:.1e}" for k, v in res["diff"].items())
        )
        tw = twins(dtype, args.repeats, args.warmup)
        ratio = tw["stax twin"] / tw["nn.Sequential"]
        print(
            f"  stax twin {tw['stax twin']:.3f} ms / nn.Sequential {tw['nn.Sequential']:.3f} ms"
            f" = {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
