"""Grid searches over an SVM's ``C`` on the NTK: kernel evaluations and time per configuration.

Problem (issue #17, ecosystem): ``GridSearchCV`` over ``C`` (``N_C`` values, 3 folds) of a
support-vector classifier on the NTK of :func:`infnets.sklearn.default_layer`, on the
first ``N`` scikit-learn digits (features scaled to ``[-1, 1]``), float64, one torch thread.

Reported, per way of running it:

* ``uncached``: ``NTKSVC`` with the kernel cache off (``kernel_cache.max_bytes = 0``), i.e.
  how every configuration re-evaluated the train and test kernels before the cache;
* ``cached``: ``NTKSVC`` with the cache (kernels once per fold);
* ``pipeline``: ``make_pipeline(NTKTransformer(), SVC(kernel='precomputed'))``, cached;
* ``precomputed``: the kernel of all ``N`` digits computed once by hand, then
  ``GridSearchCV(SVC(kernel='precomputed'))`` (scikit-learn slices it per fold): the
  floor; its time includes that one kernel.

with ``total_s``, ``per_config_s = total_s / (N_C * 3)``, the number of kernel evaluations
(``Layer._kernel_fn`` calls) and ``best_score``.

Run::

    python benchmarks/bench_grid_search.py               # N = 1000, 8 values of C
    python benchmarks/bench_grid_search.py --n 300 --n-c 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

from infnets._src.layers.base import Layer
from infnets.sklearn import NTKSVC, NTKTransformer, default_layer, kernel_cache


def _counting() -> list[int]:
    calls: list[int] = []
    original = Layer._kernel_fn

    def counting(self: Layer, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    Layer._kernel_fn = counting  # type: ignore[method-assign]
    return calls


def run(n: int = 1000, n_c: int = 8) -> dict[str, Any]:
    """Time the four ways; returns ``{way: {total_s, per_config_s, kernel_calls, best_score}}``."""
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x, y = (x[:n] - 8.0) / 8.0, y[:n]
    grid = list(np.logspace(-2, 2, n_c))
    calls = _counting()
    out: dict[str, Any] = {}

    def timed(name: str, make: Any) -> None:
        kernel_cache.clear()
        calls.clear()
        t0 = time.perf_counter()
        score = make()
        total = time.perf_counter() - t0
        out[name] = {
            "total_s": round(total, 3),
            "per_config_s": round(total / (n_c * 3), 4),
            "kernel_calls": len(calls),
            "best_score": round(float(score), 4),
        }

    def uncached() -> float:
        kernel_cache.max_bytes = 0
        try:
            return GridSearchCV(NTKSVC(), {"C": grid}, cv=3).fit(x, y).best_score_
        finally:
            kernel_cache.max_bytes = 256 * 2**20

    def cached() -> float:
        return GridSearchCV(NTKSVC(), {"C": grid}, cv=3).fit(x, y).best_score_

    def pipeline() -> float:
        pipe = make_pipeline(NTKTransformer(), SVC(kernel="precomputed"))
        return GridSearchCV(pipe, {"svc__C": grid}, cv=3).fit(x, y).best_score_

    def precomputed() -> float:
        k = default_layer().kernel_fn(torch.as_tensor(x), None, "ntk").numpy()
        return GridSearchCV(SVC(kernel="precomputed"), {"C": grid}, cv=3).fit(k, y).best_score_

    for name, make in (
        ("uncached", uncached),
        ("cached", cached),
        ("pipeline", pipeline),
        ("precomputed", precomputed),
    ):
        timed(name, make)
    floor = out["precomputed"]["per_config_s"]
    for row in out.values():
        row["x_precomputed"] = round(row["per_config_s"] / floor, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-c", type=int, default=8)
    args = parser.parse_args()
    result = {"n": args.n, "n_c": args.n_c, "machine": platform.processor() or platform.machine()}
    result.update(run(args.n, args.n_c))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
