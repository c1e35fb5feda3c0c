"""Infinite-width kernels in scikit-learn: GPR fitting W_std/b_std, SVC, NTKClassifier.

Run: python examples/sklearn_kernels.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import WhiteKernel
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from infnets import stax
from infnets.sklearn import InfiniteWidthKernel, NTKClassifier


def net() -> stax.Layer:
    """Two Erf hidden layers; W_std and b_std are shared by the three Dense layers."""
    return stax.serial(
        stax.Dense(512, W_std=1.0, b_std=0.1), stax.Erf(),
        stax.Dense(512, W_std=1.0, b_std=0.1), stax.Erf(),
        stax.Dense(1, W_std=1.0, b_std=0.1),
    )  # fmt: skip


def gaussian_process_regression() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(80, 2))
    y = np.sin(2 * x[:, 0]) * x[:, 1] + 0.05 * rng.normal(size=80)
    kernel = InfiniteWidthKernel(net(), get="nngp") + WhiteKernel(1e-2)
    start = GaussianProcessRegressor(kernel, optimizer=None).fit(x[:60], y[:60])
    gpr = GaussianProcessRegressor(kernel, random_state=0).fit(x[:60], y[:60])
    print("GaussianProcessRegressor with the NNGP kernel")
    for name, model in (("initial", start), ("fitted ", gpr)):
        lml = model.log_marginal_likelihood_value_
        r2 = model.score(x[60:], y[60:])
        print(f"  {name} {model.kernel_}: log marginal likelihood {lml:.2f}, test R^2 {r2:.3f}")


def digits() -> None:
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / x.std()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=600, test_size=400, random_state=0)
    ntk = InfiniteWidthKernel(net(), get="ntk")
    svc = SVC(kernel="precomputed", C=10.0).fit(ntk(x_tr), y_tr)
    print("Digits, 600 training images")
    print(f"  SVC on the precomputed NTK: test accuracy {svc.score(ntk(x_te, x_tr), y_te):.3f}")
    clf = NTKClassifier(net(), diag_reg=1e-3).fit(x_tr, y_tr)
    print(f"  NTKClassifier (trained infinite ensemble): {clf.score(x_te, y_te):.3f}")
    proba = clf.predict_proba(x_te[:3])
    for p, label in zip(proba, y_te[:3]):
        print(f"  label {label}: P(class) = {np.round(p, 2)}")


if __name__ == "__main__":
    gaussian_process_regression()
    digits()
