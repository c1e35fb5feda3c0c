"""Ensemble predictions at many training times: ``gradient_descent_mse_ensemble`` timings.

Problem (issue "infnets.predict", benchmark): the mean and covariance over
initialisations of an infinitely wide ``Dense(512) -> Relu -> Dense(512) -> Relu ->
Dense(1)`` network trained on MSE, with N_train = 5000, N_test = 1000, 10 outputs,
float64, at 20 training times, ``compute_cov=True``, for ``get=('nngp', 'ntk')``.

Reported:

* ``first_s``: the first time point, from a fresh ``predict_fn``: all kernels
  (train-train, test-train, test-test), the eigendecompositions, the NTK-basis
  NNGP, and the prediction itself;
* ``rest_s``: one call for the other 19 time points (same ``x_test`` object, so
  every kernel and factorization is reused), and ``rest_per_time_s = rest_s / 19``;
* ``kernel_s``: time spent inside ``kernel_fn`` (part of ``first_s``);
* ``maxrss_mb``: the process's peak resident memory.

The function :func:`bench_infnets` returns these as a dict, so a side-by-side
comparison can call it and a Neural Tangents counterpart (:func:`bench_nt`, run in
the NT virtual environment of ``_nt.py``) with the same arguments and inputs
(``make_inputs``: ``np.random.default_rng(seed).standard_normal``).

Run::

    python benchmarks/bench_predict.py                   # full size
    python benchmarks/bench_predict.py --n-train 1000 --n-test 200   # quick
    python benchmarks/bench_predict.py --nt              # also Neural Tangents (needs _nt.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infnets import predict, stax

WIDTH, W_STD, B_STD, DEPTH = 512, 1.4, 0.1, 2


def make_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """float64 standard normal inputs, identical to ``_nt.make_inputs``."""
    return np.random.default_rng(seed).standard_normal(tuple(int(s) for s in shape))


def problem(n_train: int, n_test: int, n_out: int, d: int, n_times: int, seed: int = 0):
    """Inputs ``(x_train, x_test, y_train)`` as numpy float64, and the times."""
    x_train = make_inputs((n_train, d), seed)
    x_test = make_inputs((n_test, d), seed + 1)
    y_train = make_inputs((n_train, n_out), seed + 2)
    times = np.concatenate([[0.0], np.logspace(-4, 2, n_times - 1)])
    return x_train, x_test, y_train, times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_infnets(
    n_train: int = 5000,
    n_test: int = 1000,
    n_out: int = 10,
    n_times: int = 20,
    d: int = 64,
    get: tuple[str, ...] = ("nngp", "ntk"),
    learning_rate: float = 1.0,
    diag_reg: float = 1e-4,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``gradient_descent_mse_ensemble`` on the benchmark problem.

    Args:
        n_train, n_test, n_out, n_times, d: problem sizes (inputs of dimension ``d``).
        get: which ensembles to predict.
        learning_rate, diag_reg: passed to the predictor (``diag_reg`` relative).
        device: torch device of the inputs (everything follows them).
        seed: input seed.

    Returns:
        dict with ``first_s``, ``rest_s``, ``rest_per_time_s``, ``kernel_s``,
        ``maxrss_mb``, the sizes, and a finiteness check of the outputs.
    """
    dev = torch.device(device)
    layers: list[Any] = []
    for _ in range(DEPTH):
        layers += [stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), stax.Relu()]
    layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD))
    kernel_fn = stax.serial(*layers).kernel_fn
    kernel_time = [0.0]

    def timed_kernel_fn(x1, x2=None, get=None):  # type: ignore[no-untyped-def]
        _sync(dev)
        t0 = time.perf_counter()
        out = kernel_fn(x1, x2, get)
        _sync(dev)
        kernel_time[0] += time.perf_counter() - t0
        return out

    x_train, x_test, y_train, times = problem(n_train, n_test, n_out, d, n_times, seed)
    x_train_t = torch.from_numpy(x_train).to(dev)
    x_test_t = torch.from_numpy(x_test).to(dev)
    y_t = torch.from_numpy(y_train).to(dev)
    t_all = torch.from_numpy(times)
    _sync(dev)

    t0 = time.perf_counter()
    predict_fn = predict.gradient_descent_mse_ensemble(
        timed_kernel_fn, x_train_t, y_t, learning_rate, diag_reg
    )
    first = predict_fn(t_all[:1], x_test_t, get, compute_cov=True)
    _sync(dev)
    first_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rest = predict_fn(t_all[1:], x_test_t, get, compute_cov=True)
    _sync(dev)
    rest_s = time.perf_counter() - t0

    finite = all(
        bool(torch.isfinite(g.mean).all() and torch.isfinite(g.covariance).all())
        for g in (*first, *rest)
    )
    return {
        "library": "infnets",
        "first_s": first_s,
        "rest_s": rest_s,
        "rest_per_time_s": rest_s / max(1, n_times - 1),
        "kernel_s": kernel_time[0],
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "n_train": n_train,
        "n_test": n_test,
        "n_out": n_out,
        "n_times": n_times,
        "d": d,
        "get": list(get),
        "dtype": str(rest[0].covariance.dtype),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "finite": finite,
        "mean_shape": list(rest[0].mean.shape),
        "cov_shape": list(rest[0].covariance.shape),
    }


NT_SNIPPET = """
N_TRAIN, N_TEST, N_OUT, N_TIMES, D, SEED = {n_train}, {n_test}, {n_out}, {n_times}, {d}, {seed}
GET, LR, REG = {get!r}, {learning_rate!r}, {diag_reg!r}
layers = []
for _ in range({depth}):
    layers += [stax.Dense({width}, W_std={w_std}, b_std={b_std}), stax.Relu()]
layers.append(stax.Dense(1, W_std={w_std}, b_std={b_std}))
_, _, kernel_fn = stax.serial(*layers)
kernel_fn = jax.jit(kernel_fn, static_argnames=("get",))
x_train = jnp.asarray(make_inputs((N_TRAIN, D), SEED))
x_test = jnp.asarray(make_inputs((N_TEST, D), SEED + 1))
y_train = jnp.asarray(make_inputs((N_TRAIN, N_OUT), SEED + 2))
ts = jnp.concatenate([jnp.zeros(1), jnp.logspace(-4, 2, N_TIMES - 1)])
t0 = time.perf_counter()
predict_fn = nt.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train,
                                                      learning_rate=LR, diag_reg=REG)
first = jax.block_until_ready(predict_fn(t=ts[:1], x_test=x_test, get=GET, compute_cov=True))
first_s = time.perf_counter() - t0
t0 = time.perf_counter()
rest = jax.block_until_ready(predict_fn(t=ts[1:], x_test=x_test, get=GET, compute_cov=True))
rest_s = time.perf_counter() - t0
emit(dict(library="neural_tangents", first_s=first_s, rest_s=rest_s,
          rest_per_time_s=rest_s / max(1, N_TIMES - 1),
          dtype=str(rest[0].covariance.dtype)))
"""


def bench_nt(
    n_train: int = 5000,
    n_test: int = 1000,
    n_out: int = 10,
    n_times: int = 20,
    d: int = 64,
    get: tuple[str, ...] = ("nngp", "ntk"),
    learning_rate: float = 1.0,
    diag_reg: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """The same measurement with Neural Tangents, in its venv (see ``_nt.py``).

    Note: Neural Tangents normalises the MSE loss by the number of target entries,
    so its ``learning_rate`` is ``N * n_out`` times smaller in effect; the timings
    do not depend on it.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _nt  # noqa: PLC0415

    code = NT_SNIPPET.format(
        n_train=n_train,
        n_test=n_test,
        n_out=n_out,
        n_times=n_times,
        d=d,
        seed=seed,
        get=tuple(get),
        learning_rate=learning_rate,
        diag_reg=diag_reg,
        depth=DEPTH,
        width=WIDTH,
        w_std=W_STD,
        b_std=B_STD,
    )
    return _nt.run_nt(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-out", type=int, default=10)
    parser.add_argument("--n-times", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nt", action="store_true", help="also time Neural Tangents")
    args = parser.parse_args()
    sizes = dict(n_train=args.n_train, n_test=args.n_test, n_out=args.n_out, n_times=args.n_times)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = [bench_infnets(**sizes, device=args.device)]
    if args.nt:
        results.append(bench_nt(**sizes))
    for r in results:
        print(
            f"{r['library']:>16}: first time point {r['first_s']:.2f} s "
            f"(kernels {r.get('kernel_s', float('nan')):.2f} s), other "
            f"{args.n_times - 1} time points {r['rest_s']:.2f} s "
            f"({r['rest_per_time_s']:.3f} s each)"
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
