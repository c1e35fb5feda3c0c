"""NTK-SVM vs random forest on small UCI data sets (Arora et al. 2020, "Harnessing the power of
infinitely wide deep nets on small-data tasks", ICLR, sec. 4 and Table 1).

Protocol (the paper's, scaled to the UCI sets that ship with scikit-learn): nested
cross-validation, an outer stratified 4-fold split (test accuracy) and an inner stratified
3-fold split on each outer training set (model selection). Features are standardised with the
outer training set's statistics.

* NTK-SVM: ``sklearn.svm.SVC(kernel='precomputed')`` on the NTK of a fully-connected ReLU
  network with ``L`` hidden layers (``stax.Dense(., W_std=sqrt(2), b_std=0)``, ``L`` in 1..5),
  ``C`` in ``10^-2 .. 10^4``; ``(L, C)`` chosen by inner CV accuracy.
* Random forest: 500 trees, ``max_features`` in ``{sqrt, 0.25, 0.5, 1.0}`` by inner CV.

Run::

    python benchmarks/repro_arora2020.py
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sklearn import datasets  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from infnets import stax  # noqa: E402

DEPTHS = (1, 2, 3, 4, 5)
CS = tuple(10.0**e for e in range(-2, 5))
SETS = {
    "iris": datasets.load_iris,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
    "digits": datasets.load_digits,
}


def ntk(x: np.ndarray, depth: int) -> np.ndarray:
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(1, W_std=2**0.5, b_std=0.0), stax.Relu()]
    layers.append(stax.Dense(1, W_std=2**0.5, b_std=0.0))
    k = stax.serial(*layers).kernel_fn(torch.as_tensor(x, dtype=torch.float64), None, "ntk")
    return k.numpy()


def ntk_svm_fold(x_tr, y_tr, x_te, y_te, inner) -> tuple[float, tuple[int, float]]:
    x_all = np.concatenate([x_tr, x_te])
    n = len(x_tr)
    best = (-1.0, None, None)
    kernels = {}
    for depth in DEPTHS:
        k = ntk(x_all, depth)
        kernels[depth] = k
        search = GridSearchCV(SVC(kernel="precomputed"), {"C": CS}, cv=inner)
        search.fit(k[:n, :n], y_tr)
        if search.best_score_ > best[0]:
            best = (search.best_score_, depth, search.best_params_["C"])
    _, depth, c = best
    k = kernels[depth]
    svm = SVC(kernel="precomputed", C=c).fit(k[:n, :n], y_tr)
    return float((svm.predict(k[n:, :n]) == y_te).mean()), (depth, c)


def main() -> None:
    print("| data set | N | d | classes | NTK-SVM acc. | RF acc. | chosen (L, C) |")
    print("|---|---|---|---|---|---|---|")
    totals = {"ntk": [], "rf": []}
    for name, loader in SETS.items():
        t0 = time.time()
        x, y = loader(return_X_y=True)
        outer = StratifiedKFold(4, shuffle=True, random_state=0)
        accs_ntk, accs_rf, chosen = [], [], []
        for tr, te in outer.split(x, y):
            scaler = StandardScaler().fit(x[tr])
            x_tr, x_te = scaler.transform(x[tr]), scaler.transform(x[te])
            inner = StratifiedKFold(3, shuffle=True, random_state=1)
            acc, pick = ntk_svm_fold(x_tr, y[tr], x_te, y[te], inner)
            accs_ntk.append(acc)
            chosen.append(pick)
            rf = GridSearchCV(
                RandomForestClassifier(n_estimators=500, random_state=0, n_jobs=1),
                {"max_features": ["sqrt", 0.25, 0.5, 1.0]},
                cv=inner,
            ).fit(x_tr, y[tr])
            accs_rf.append(float((rf.predict(x_te) == y[te]).mean()))
        totals["ntk"].append(np.mean(accs_ntk))
        totals["rf"].append(np.mean(accs_rf))
        print(
            f"| {name} | {len(y)} | {x.shape[1]} | {len(set(y))} | "
            f"{100 * np.mean(accs_ntk):.2f} +- {100 * np.std(accs_ntk):.2f} | "
            f"{100 * np.mean(accs_rf):.2f} +- {100 * np.std(accs_rf):.2f} | "
            f"{chosen} | ({time.time() - t0:.0f} s)"
        )
    print(
        f"| **average** | | | | {100 * np.mean(totals['ntk']):.2f} | "
        f"{100 * np.mean(totals['rf']):.2f} | |"
    )


if __name__ == "__main__":
    main()
