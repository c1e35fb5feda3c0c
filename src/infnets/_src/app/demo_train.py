"""Finite-width training for ``infnets demo``: the stax twins of the infinite networks.

Two protocols:

* :func:`gradient_descent_ensemble`: (a wrapper of the public
  :func:`infnets.train.gradient_descent_ensemble`) full-batch gradient descent on
  ``L = 1/2 sum (f(X) - Y)^2`` with step ``learning_rate``, the convention of
  :mod:`infnets.predict` (so step ``t`` matches time ``t`` of
  ``gradient_descent_mse_ensemble``), for many random initialisations at once
  (``torch.func.vmap`` over stacked parameters of ``init_fn``/``apply_fn``);
* :func:`train_classifier`: the ``nn.Module`` twin (``layer.to_module``) trained with
  Adam on minibatches of the same centred one-hot MSE targets, for classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.evaluate.chunks import single_threaded_ops as single_thread
from infnets._src.layers.base import Layer
from infnets._src.research.train import gradient_descent_ensemble as _public_trainer

__all__ = [
    "gradient_descent_ensemble",
    "linearized_gradient_descent",
    "linearized_expected_loss",
    "train_classifier",
    "accuracy",
    "single_thread",
]


def gradient_descent_ensemble(
    layer: Layer,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    learning_rate: float,
    record_steps: Sequence[int],
    seeds: Sequence[int],
    progress: Any = None,
) -> tuple[Tensor, Tensor]:
    r"""Outputs of finite networks trained by full-batch gradient descent on MSE.

    Each network ``f`` starts from ``init_fn(seed)`` (its own seed) and takes steps
    ``theta <- theta - lr dL/dtheta`` with ``L = 1/2 sum_{i,c} (f_c(x_i) - y_ic)^2``.
    In the NTK parameterization these networks follow, as the width grows, the
    linearized dynamics of Lee et al. 2019 whose ensemble average
    :func:`infnets.predict.gradient_descent_mse_ensemble` computes. The ``S``
    networks are trained together: ``vmap`` runs ``apply_fn`` on their stacked
    parameters and one backward pass of the summed losses gives every network's
    gradient (the networks share no parameter).

    Args:
        layer: the stax network (its finite twin is trained).
        x_train: ``(N, d)`` training inputs (their dtype is the networks' dtype).
        y_train: ``(N, k)`` targets.
        x_test: ``(M, d)`` test inputs.
        learning_rate: step size ``lr``.
        record_steps: step counts at which to record the test outputs (``0`` is the
            initialisation).
        seeds: one ``init_fn`` seed per network.
        progress: optional ``tqdm`` bar, advanced once per step.

    Returns:
        ``(fx_train_0, fx_test)``: the ``(S, N, k)`` initial train outputs and the
        ``(S, T, M, k)`` test outputs at the ``T`` sorted recorded steps.
    """
    asked = sorted({int(s) for s in record_steps})
    out = _public_trainer(
        layer, x_train, y_train, learning_rate, [0, *asked], seeds, x_test, progress=progress
    )
    assert out.fx_test is not None
    fx_test = out.fx_test if asked[0] == 0 else out.fx_test[:, 1:]
    return out.fx_train[:, 0], fx_test


def linearized_gradient_descent(
    ntk_train: Tensor,
    ntk_test_train: Tensor,
    y_train: Tensor,
    learning_rate: float,
    steps: Sequence[int],
    fx_train_0: Tensor,
    fx_test_0: Tensor,
) -> Tensor:
    r"""Test outputs of the linearized network after exactly ``s`` gradient-descent steps.

    The infinite-width network is its linearization with the constant NTK ``Θ``
    (Lee et al. 2019); discrete steps ``f_{s+1}(X) = f_s(X) - lr Θ (f_s(X) - Y)`` give
    train residuals ``(I - lr Θ)^s r_0`` and test outputs

    ``f_s(x) = f_0(x) - Θ(x, X) V diag((1 - (1 - lr w)^s) / w) V^T (f_0(X) - Y)``

    with ``Θ = V diag(w) V^T``. :func:`infnets.predict.gradient_descent_mse` is the
    gradient-flow limit (``(1 - lr w)^s -> exp(-lr w s)``); this discrete form lets a
    finite network be compared with its infinite-width twin step for step, started
    from the same initial function ``f_0``.

    Args:
        ntk_train: ``(N, N)`` train-train NTK.
        ntk_test_train: ``(M, N)`` test-train NTK.
        y_train: ``(N, k)`` targets.
        learning_rate: step size ``lr``.
        steps: ``T`` step counts.
        fx_train_0: ``(N, k)`` initial train outputs.
        fx_test_0: ``(M, k)`` initial test outputs.

    Returns:
        ``(T, M, k)`` test outputs (float64).
    """
    f64 = torch.float64
    w, v = torch.linalg.eigh(ntk_train.to(f64))
    w = w.clamp_min(0.0)
    r0 = v.T @ (fx_train_0.to(f64) - y_train.to(f64))
    kv = ntk_test_train.to(f64) @ v
    phis = _discrete_phi(w, learning_rate, steps)
    return torch.stack([fx_test_0.to(f64) - kv @ (phi[:, None] * r0) for phi in phis])


def _discrete_phi(w: Tensor, learning_rate: float, steps: Sequence[int]) -> Tensor:
    """``(T, N)``: ``lr sum_{j<s} (1 - lr w)^j = (1 - (1 - lr w)^s) / w`` (``lr s`` at w = 0)."""
    out = []
    for s in steps:
        decay = (1.0 - learning_rate * w) ** int(s)
        out.append(
            torch.where(w > 0, (1.0 - decay) / torch.where(w > 0, w, 1.0), learning_rate * s)
        )
    return torch.stack(out)


def linearized_expected_loss(
    ntk_train: Tensor,
    nngp_train: Tensor,
    ntk_test_train: Tensor,
    nngp_test_train: Tensor,
    nngp_test_diag: Tensor,
    y_train: Tensor,
    y_test: Tensor,
    learning_rate: float,
    steps: Sequence[int],
) -> Tensor:
    r"""Exact expected test loss of the linearized network after ``s`` discrete steps.

    With ``f_0 ~ GP(0, K)`` and ``A_s = Θ(x, X) V diag(phi_s) V^T`` (see
    :func:`linearized_gradient_descent`), ``f_s(x)`` is Gaussian with mean ``A_s Y`` and
    variance ``K(x, x) - 2 [A_s K(X, x)] + [A_s K(X, X) A_s^T]`` (diagonals), so

    ``E mean_x (f_s(x) - y(x))^2 = mean_x ((A_s Y - y)^2 + Var f_s(x))``.

    This is the discrete-time counterpart of the ensemble of
    :func:`infnets.predict.gradient_descent_mse_ensemble`, used as the expectation of a
    control variate.

    Args:
        ntk_train: ``(N, N)`` train-train NTK.
        nngp_train: ``(N, N)`` train-train NNGP.
        ntk_test_train: ``(M, N)`` test-train NTK.
        nngp_test_train: ``(M, N)`` test-train NNGP.
        nngp_test_diag: ``(M,)`` test variances ``K(x, x)``.
        y_train: ``(N, k)`` targets.
        y_test: ``(M, k)`` test targets.
        learning_rate: step size ``lr``.
        steps: ``T`` step counts.

    Returns:
        ``(T,)`` expected test losses (mean over test points and outputs).
    """
    f64 = torch.float64
    w, v = torch.linalg.eigh(ntk_train.to(f64))
    w = w.clamp_min(0.0)
    kv = ntk_test_train.to(f64) @ v  # (M, N)
    vty = v.T @ y_train.to(f64)
    vkv = v.T @ nngp_train.to(f64) @ v  # K(X, X) in the NTK's eigenbasis
    kxv = nngp_test_train.to(f64) @ v  # K(x, X) V
    out = []
    for phi in _discrete_phi(w, learning_rate, steps):
        b = kv * phi  # A_s V, (M, N)
        mean = b @ vty
        var = nngp_test_diag.to(f64) - 2 * (b * kxv).sum(-1) + ((b @ vkv) * b).sum(-1)
        out.append(((mean - y_test.to(f64)) ** 2).mean() + var.mean())
    return torch.stack(out)


def accuracy(outputs: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose largest output is the label."""
    return float((outputs.argmax(-1) == labels).double().mean())


def train_classifier(
    layer: Layer,
    x_train: Tensor,
    targets: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    epochs: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: Any = None,
    loss_name: str = "cross_entropy",
) -> float:
    """Train the finite twin with Adam on minibatches; return its test accuracy.

    Args:
        layer: the stax network; its ``to_module`` twin is trained in float32.
        x_train: ``(N, ...)`` training inputs.
        targets: ``(N, C)`` centred one-hot targets (as for the kernels); their argmax
            are the labels of the cross-entropy loss.
        x_test: ``(M, ...)`` test inputs.
        y_test: ``(M,)`` test labels.
        epochs: passes over the training set.
        batch_size: minibatch size.
        learning_rate: Adam's step size.
        seed: initialisation and shuffling seed.
        progress: optional ``tqdm`` bar, advanced once per epoch.
        loss_name: ``'cross_entropy'`` (softmax of the outputs, the usual way to train
            a classifier) or ``'mse'`` (``1/2 |f(x) - target|^2``, as the kernels).

    Returns:
        The test accuracy after training.
    """
    dtype = torch.float32
    model = layer.to_module((-1,) + tuple(x_train.shape[1:]), key=seed, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    x, t = x_train.to(dtype), targets.to(dtype)
    labels = targets.argmax(-1)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            out = model(x[idx])
            if loss_name == "cross_entropy":
                loss = torch.nn.functional.cross_entropy(out, labels[idx])
            else:
                loss = 0.5 * ((out - t[idx]) ** 2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        out = torch.cat([model(xb) for xb in x_test.to(dtype).split(512)])
    return accuracy(out, y_test)
