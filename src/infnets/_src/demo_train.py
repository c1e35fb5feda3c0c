"""Finite-width training for ``infnets demo``: the stax twins of the infinite networks.

Two protocols:

* :func:`gradient_descent_ensemble`: full-batch gradient descent on
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
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import grad, vmap

from infnets._src.layer import Layer

__all__ = ["gradient_descent_ensemble", "train_classifier", "accuracy"]


def _stack(trees: list[Any]) -> Any:
    leaves = [pytree.tree_flatten(t)[0] for t in trees]
    spec = pytree.tree_flatten(trees[0])[1]
    return pytree.tree_unflatten([torch.stack(xs) for xs in zip(*leaves)], spec)


def gradient_descent_ensemble(
    layer: Layer,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    learning_rate: float,
    record_steps: Sequence[int],
    seeds: Sequence[int],
    progress: Any = None,
) -> Tensor:
    r"""Test losses of finite networks trained by full-batch gradient descent.

    Each network ``f`` starts from ``init_fn(seed)`` (its own seed) and takes steps
    ``theta <- theta - lr dL/dtheta`` with ``L = 1/2 sum_{i,c} (f_c(x_i) - y_ic)^2``;
    the test loss is ``mean_{x, c} (f_c(x) - y_c(x))^2``. In the NTK
    parameterization these networks follow, as the width grows, the linearized
    dynamics of Lee et al. 2019 whose ensemble average
    :func:`infnets.predict.gradient_descent_mse_ensemble` computes.

    Args:
        layer: the stax network (its finite twin is trained).
        x_train: ``(N, d)`` training inputs.
        y_train: ``(N, k)`` targets.
        x_test: ``(M, d)`` test inputs.
        y_test: ``(M, k)`` test targets.
        learning_rate: step size ``lr``.
        record_steps: increasing step counts at which to record the test loss
            (``0`` is the initialisation).
        seeds: one ``init_fn`` seed per network.
        progress: optional ``tqdm`` bar, advanced once per step.

    Returns:
        ``(S, T)`` test losses, one row per seed, one column per recorded step.
    """
    init_fn, apply_fn, _ = layer
    in_shape = (-1,) + tuple(x_train.shape[1:])
    params = _stack(
        [init_fn(int(s), in_shape, dtype=x_train.dtype, device=x_train.device)[1] for s in seeds]
    )

    def loss(p: Any) -> Tensor:
        return 0.5 * ((apply_fn(p, x_train) - y_train) ** 2).sum()

    grad_fn = vmap(grad(loss))
    test_fn = vmap(apply_fn, in_dims=(0, None))
    steps = sorted(int(s) for s in record_steps)
    out = torch.empty(len(seeds), len(steps), dtype=x_train.dtype)
    j = 0
    with torch.no_grad():
        for step in range(steps[-1] + 1):
            while j < len(steps) and steps[j] == step:
                out[:, j] = ((test_fn(params, x_test) - y_test) ** 2).mean(dim=(1, 2))
                j += 1
            if step == steps[-1]:
                break
            with torch.enable_grad():
                g = grad_fn(params)
            params = pytree.tree_map(lambda p, d: p - learning_rate * d, params, g)
            if progress is not None:
                progress.update(1)
    return out


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
) -> float:
    """Train the finite twin with Adam on MSE to the one-hot targets; test accuracy.

    Args:
        layer: the stax network; its ``to_module`` twin is trained in float32.
        x_train: ``(N, ...)`` training inputs.
        targets: ``(N, C)`` centred one-hot targets (as for the kernels).
        x_test: ``(M, ...)`` test inputs.
        y_test: ``(M,)`` test labels.
        epochs: passes over the training set.
        batch_size: minibatch size.
        learning_rate: Adam's step size.
        seed: initialisation and shuffling seed.
        progress: optional ``tqdm`` bar, advanced once per epoch.

    Returns:
        The test accuracy after training.
    """
    dtype = torch.float32
    model = layer.to_module((-1,) + tuple(x_train.shape[1:]), key=seed, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    x, t = x_train.to(dtype), targets.to(dtype)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            loss = 0.5 * ((model(x[idx]) - t[idx]) ** 2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        out = torch.cat([model(xb) for xb in x_test.to(dtype).split(512)])
    return accuracy(out, y_test)
