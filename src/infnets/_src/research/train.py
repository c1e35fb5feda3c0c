r"""Full-batch gradient descent of finite networks, many initialisations at once.

The finite twins of :mod:`infnets.stax` networks trained with the conventions of
:mod:`infnets.predict`: loss ``L = 1/2 sum_{i, c} (f_c(x_i) - y_{ic})^2`` and step ``t`` of size
``learning_rate``, so step ``t`` here is time ``t`` of
``predict.gradient_descent_mse(..., discrete=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vmap

__all__ = ["Trajectory", "gradient_descent_ensemble", "stack_params"]


class Trajectory(NamedTuple):
    """Outputs of an ensemble of networks along gradient descent.

    Attributes:
        steps: the ``T`` recorded step counts, sorted (``0`` is the initialisation).
        fx_train: ``(S, T, N, *O)`` train outputs of the ``S`` networks at those steps.
        fx_test: ``(S, T, M, *O)`` test outputs, or ``None`` without ``x_test``.
        params: the final parameters, stacked (a leading axis of size ``S`` on every leaf).
    """

    steps: tuple[int, ...]
    fx_train: Tensor
    fx_test: Tensor | None
    params: Any


def stack_params(trees: Sequence[Any]) -> Any:
    """Stack parameter pytrees of identical structure along a new leading axis.

    Args:
        trees: ``S`` pytrees (nested tuples/lists/dicts of tensors) of the same structure.

    Returns:
        One pytree whose leaves have a leading axis of size ``S``.

    Examples:
        >>> import torch
        >>> stack_params([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"].shape
        torch.Size([2, 2])
    """
    leaves = [pytree.tree_flatten(t)[0] for t in trees]
    spec = pytree.tree_flatten(trees[0])[1]
    return pytree.tree_unflatten([torch.stack(xs) for xs in zip(*leaves)], spec)


def _check(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise TypeError(f"gradient_descent_ensemble: {name} must be an (N, ...) tensor.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"gradient_descent_ensemble: {name} must be floating point, got {x.dtype}.")
    return x


def gradient_descent_ensemble(
    network: Any,
    x_train: Tensor,
    y_train: Tensor,
    learning_rate: float,
    steps: Sequence[int],
    seeds: Sequence[int] = (0,),
    x_test: Tensor | None = None,
    *,
    params: Any = None,
    progress: Any = None,
) -> Trajectory:
    r"""Train ``S`` finite networks by full-batch gradient descent on MSE, together.

    Each network starts from ``init_fn(seed)`` (or the given stacked ``params``) and takes
    steps ``theta <- theta - lr dL/dtheta`` with ``L = 1/2 sum_{i,c} (f_c(x_i) - y_ic)^2``, the
    loss and time convention of :mod:`infnets.predict`. In the NTK parameterization these
    networks follow, as the width grows, the linearized dynamics of Lee et al. 2019 ("Wide
    neural networks of any depth evolve as linear models under gradient descent") that
    ``predict.gradient_descent_mse(..., discrete=True)`` and
    ``predict.gradient_descent_mse_ensemble(..., discrete=True)`` compute. ``torch.func.vmap``
    runs ``apply_fn`` on the stacked parameters, and one backward pass of the summed losses
    gives every network's gradient (the networks share no parameter).

    Args:
        network: a stax layer (anything unpacking to ``(init_fn, apply_fn, kernel_fn)``) or a
            pair ``(init_fn, apply_fn)``; ``init_fn`` may be ``None`` when ``params`` is given.
            ``apply_fn(params, x)`` must be a pure function of one network's parameters.
        x_train: ``(N, ...)`` training inputs; their dtype and device are the networks'.
        y_train: ``(N, *O)`` targets.
        learning_rate: step size ``lr``.
        steps: step counts at which to record outputs (``0``: the initialisation).
        seeds: one ``init_fn`` seed per network (ignored when ``params`` is given).
        x_test: optional ``(M, ...)`` test inputs.
        params: optional stacked initial parameters (leading axis ``S``), e.g. from
            :func:`stack_params`; for models other than stax layers.
        progress: optional ``tqdm``-like bar, advanced once per step.

    Returns:
        A :class:`Trajectory` with ``(S, T, N, *O)`` train and ``(S, T, M, *O)`` test outputs
        at the ``T`` sorted recorded steps, and the final stacked parameters.

    Examples:
        >>> import torch
        >>> from infnets import stax, train
        >>> net = stax.serial(stax.Dense(64), stax.Relu(), stax.Dense(1))
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> out = train.gradient_descent_ensemble(net, x, y, 0.1, [0, 10], seeds=[0, 1, 2])
        >>> out.fx_train.shape
        torch.Size([3, 2, 5, 1])
        >>> bool(((out.fx_train[:, 1] - y) ** 2).sum() < ((out.fx_train[:, 0] - y) ** 2).sum())
        True
    """
    x_train, y_train = _check(x_train, "x_train"), _check(y_train, "y_train")
    if x_test is not None:
        x_test = _check(x_test, "x_test")
    if y_train.shape[0] != x_train.shape[0]:
        raise ValueError(
            f"gradient_descent_ensemble: y_train has {y_train.shape[0]} rows, x_train "
            f"{x_train.shape[0]}."
        )
    record = sorted({int(s) for s in steps})
    if not record or record[0] < 0:
        raise ValueError("gradient_descent_ensemble: steps must be non-empty and >= 0.")
    parts = tuple(network)
    init_fn: Callable[..., Any] | None = parts[0]
    apply_fn: Callable[..., Any] = parts[1]
    if params is None:
        if init_fn is None or not list(seeds):
            raise ValueError("gradient_descent_ensemble: pass seeds and an init_fn, or params.")
        in_shape = (-1,) + tuple(x_train.shape[1:])
        dtype, device = x_train.dtype, x_train.device
        params = stack_params(
            [init_fn(int(s), in_shape, dtype=dtype, device=device)[1] for s in seeds]
        )
    leaves, spec = pytree.tree_flatten(params)
    leaves = [leaf.detach().requires_grad_(True) for leaf in leaves]
    batched = vmap(apply_fn, in_dims=(0, None))
    train_out: list[Tensor] = []
    test_out: list[Tensor] = []
    lr = float(learning_rate)
    for step in range(record[-1] + 1):
        last = step == record[-1]
        if step in record and x_test is not None:
            with torch.no_grad():
                test_out.append(batched(pytree.tree_unflatten(leaves, spec), x_test))
        if last:
            if step in record:
                with torch.no_grad():
                    train_out.append(batched(pytree.tree_unflatten(leaves, spec), x_train))
            break
        with torch.enable_grad():
            out = batched(pytree.tree_unflatten(leaves, spec), x_train)
            loss = 0.5 * ((out - y_train) ** 2).sum()
            grads = torch.autograd.grad(loss, leaves)
        if step in record:
            train_out.append(out.detach())
        with torch.no_grad():
            leaves = [(leaf - lr * g).requires_grad_(True) for leaf, g in zip(leaves, grads)]
        if progress is not None:
            progress.update(1)
    final = pytree.tree_unflatten([leaf.detach() for leaf in leaves], spec)
    fx_test = torch.stack(test_out, dim=1) if x_test is not None else None
    return Trajectory(tuple(record), torch.stack(train_out, dim=1), fx_test, final)
