"""Offline data sets of ``infnets demo``: a 1-D regression problem and scikit-learn's digits.

Both are generated or shipped with an installed package, so the demo needs no network.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["Regression1D", "Digits", "regression_1d", "digits"]


@dataclasses.dataclass(frozen=True)
class Regression1D:
    """A noisy 1-D regression problem with a gap in the training inputs.

    Attributes:
        x_train: ``(N, 1)`` training inputs.
        y_train: ``(N, 1)`` noisy targets ``f(x) + noise``.
        x_test: ``(M, 1)`` sorted test inputs (wider than the training range).
        y_test: ``(M, 1)`` noiseless ``f(x)`` on the test inputs.
        noise_std: standard deviation of the target noise.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    noise_std: float


def target_function(x: Tensor) -> Tensor:
    """``f(x) = sin(x) + 0.3 sin(3 x)``, the function to learn."""
    return torch.sin(x) + 0.3 * torch.sin(3 * x)


def regression_1d(
    n_train: int = 24, n_test: int = 200, noise_std: float = 0.1, seed: int = 0
) -> Regression1D:
    """Sample the 1-D problem: training inputs in ``[-pi, -0.6] U [0.6, pi]``.

    Args:
        n_train: number of training points.
        n_test: number of test points on ``[-1.5 pi, 1.5 pi]``.
        noise_std: standard deviation of the Gaussian target noise.
        seed: numpy seed.

    Returns:
        A :class:`Regression1D` of float64 tensors.
    """
    rng = np.random.default_rng(seed)
    left = rng.uniform(-math.pi, -0.6, n_train // 2)
    right = rng.uniform(0.6, math.pi, n_train - n_train // 2)
    x_train = torch.tensor(np.sort(np.concatenate([left, right])), dtype=torch.float64)[:, None]
    y_train = target_function(x_train) + noise_std * torch.tensor(
        rng.normal(size=(n_train, 1)), dtype=torch.float64
    )
    x_test = torch.linspace(-1.5 * math.pi, 1.5 * math.pi, n_test, dtype=torch.float64)[:, None]
    return Regression1D(x_train, y_train, x_test, target_function(x_test), noise_std)


@dataclasses.dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits, standardised, as images in PyTorch layout.

    Attributes:
        x_train: ``(N, 1, 8, 8)`` training images.
        y_train: ``(N,)`` labels in ``0..9``.
        x_test: ``(M, 1, 8, 8)`` test images.
        y_test: ``(M,)`` labels.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_classes(self) -> int:
        """Number of classes (10)."""
        return 10

    def flat(self, x: Tensor) -> Tensor:
        """Images ``(N, 1, 8, 8)`` as rows ``(N, 64)``."""
        return x.reshape(x.shape[0], -1)

    def targets(self, y: Tensor) -> Tensor:
        """Centred one-hot targets ``e_y - 1/10``, shape ``(N, 10)``."""
        t = torch.full((y.shape[0], self.n_classes), -1.0 / self.n_classes, dtype=torch.float64)
        t[torch.arange(y.shape[0]), y] += 1.0
        return t


def digits(n_train: int, n_test: int, seed: int = 0) -> Digits:
    """A stratified random train/test split of the 1797 digits.

    Pixels are divided by 16, centred by the training set's mean image and scaled by
    the training set's overall pixel standard deviation (one number, so relative
    pixel intensities are kept), giving input kernels ``x . x' / 64`` of order one.

    Args:
        n_train: training images (at most 1797 - n_test).
        n_test: test images.
        seed: numpy seed of the split.

    Returns:
        A :class:`Digits` of float64 tensors.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    y = data.target.astype(np.int64)
    if n_train + n_test > len(y):
        raise ValueError(f"digits: {n_train} + {n_test} exceeds the {len(y)} images.")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=n_train, test_size=n_test, stratify=y, random_state=seed
    )
    mean = x_tr.mean(0)
    scale = (x_tr - mean).std()
    x_tr = (x_tr - mean) / scale
    x_te = (x_te - mean) / scale

    def images(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.float64).reshape(-1, 1, 8, 8)

    return Digits(images(x_tr), torch.tensor(y_tr), images(x_te), torch.tensor(y_te))
