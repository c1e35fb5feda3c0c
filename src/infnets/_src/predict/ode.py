"""Gradient flow (optionally with momentum) for any loss, by numerical integration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.predict import common as pc

Solver = Literal["auto", "torchdiffeq", "scipy"]


def _have_torchdiffeq() -> bool:
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        return False
    return True


def gradient_descent(
    loss: Callable[[Tensor, Tensor], Tensor],
    k_train_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    momentum: float | None = None,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    solver: Solver = "auto",
) -> Callable[..., Any]:
    r"""Outputs of a linearized network trained by gradient flow on any differentiable loss.

    In function space the linearized network (Lee et al. 2019, "Wide neural
    networks of any depth evolve as linear models under gradient descent",
    eq. 5-6) follows

    ``df(X)/dt = -lr Θ(X, X) ∇_f L(f(X), Y)``,  ``df(x)/dt = -lr Θ(x, X) ∇_f L(f(X), Y)``

    with ``t`` counted in steps of size ``lr``. With heavy-ball momentum ``m``
    (``f_{s+1} = f_s + m (f_s - f_{s-1}) - lr Θ ∇L``), reading differences as
    derivatives gives the damped second-order flow

    ``df/dt = v``,  ``dv/dt = -(1 - m) v - lr Θ ∇_f L``,  ``v(0) = 0``,

    It tracks discrete heavy-ball up to errors of order ``lr w_max / (1 - m)``
    (``sqrt(lr w_max)`` as ``m -> 1``), under 1 % of the residual for
    ``lr w_max = 1e-3``, ``m = 0.9``; plain gradient flow tracks gradient descent
    up to ``O(lr w_max)`` (``w_max`` the largest NTK eigenvalue). Unlike
    MSE (:func:`gradient_descent_mse`) there is no closed form: the ODE is
    integrated in float64 with the adaptive Dormand-Prince solver of
    ``torchdiffeq`` (``pip install torchdiffeq``), or ``scipy.integrate.solve_ivp``
    (RK45) when it is not installed. ``L`` is used as given: pass
    ``0.5 * ((fx - y) ** 2).sum()`` to match :func:`gradient_descent_mse`.

    Args:
        loss: ``loss(fx_train, y_train) -> scalar`` differentiable in ``fx_train``
            (shape ``(N, *O)``, float64), e.g.
            ``lambda f, y: -(y * torch.log_softmax(f, -1)).sum()``.
        k_train_train: ``(N, N)`` NTK (tensor, array or a record whose ``.ntk`` is used).
        y_train: ``(N, ...)`` targets, passed to ``loss`` as float64 (integer class
            labels are kept as integers).
        learning_rate: ``lr > 0``.
        momentum: ``None`` for gradient flow, or a heavy-ball momentum in ``[0, 1)``.
        rtol: relative tolerance of the ODE solver.
        atol: absolute tolerance of the ODE solver.
        solver: ``'auto'`` (torchdiffeq if installed, else scipy), ``'torchdiffeq'``
            or ``'scipy'``.

    Returns:
        ``predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)``: ``t`` a
        finite time ``>= 0`` or a 1-D tensor of times (leading axis ``T``);
        ``fx_train_0`` the ``(N, *O)`` initial outputs (a number broadcasts to
        ``y_train``'s shape; give a tensor when ``O`` differs from the targets', e.g.
        integer labels); ``fx_test_0`` the ``(M, *O)`` initial test outputs (default
        0); ``k_test_train`` the ``(M, N)`` test-train NTK. It returns ``fx_train_t``
        ``([T,] N, *O)``, or ``(fx_train_t, fx_test_t)`` when ``k_test_train`` is given,
        in the kernel's dtype.

    Examples:
        >>> import torch
        >>> from infnets import predict
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> ntk = x @ x.T + 1.0
        >>> y = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).double()
        >>> xent = lambda f, y: -(y * torch.log_softmax(f, dim=-1)).sum()
        >>> predict_fn = predict.gradient_descent(xent, ntk, y, learning_rate=0.5)
        >>> predict_fn(torch.tensor([0.0, 1.0, 5.0]), fx_train_0=0.0).shape
        torch.Size([3, 6, 3])
    """
    fn = "gradient_descent"
    if not callable(loss):
        raise TypeError(f"{fn}: loss must be a callable loss(fx, y) -> scalar.")
    lr = pc.check_positive(learning_rate, "learning_rate", fn)
    mom = None if momentum is None else pc.check_momentum(momentum, fn)
    rtol = pc.check_positive(rtol, "rtol", fn)
    atol = pc.check_positive(atol, "atol", fn)
    if solver not in ("auto", "torchdiffeq", "scipy"):
        raise ValueError(f"{fn}: solver must be 'auto', 'torchdiffeq' or 'scipy', got {solver!r}.")
    if solver == "auto":
        solver = "torchdiffeq" if _have_torchdiffeq() else "scipy"
    elif solver == "torchdiffeq" and not _have_torchdiffeq():
        raise ImportError(f"{fn}: solver='torchdiffeq' needs `pip install torchdiffeq`.")
    k = pc.pick(k_train_train, "ntk", "k_train_train", fn)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"{fn}: k_train_train must be a square (N, N) train-train kernel, got shape "
            f"{tuple(k.shape)}."
        )
    _inputs.check_symmetric(k, "k_train_train", fn)
    device, out_dtype = k.device, k.dtype
    n = k.shape[0]
    y = pc.as_targets(y_train, "y_train", fn, device, keep_int=True)
    if y.shape[0] != n:
        raise ValueError(
            f"{fn}: y_train has {y.shape[0]} examples (shape {tuple(y.shape)}) but "
            f"k_train_train is {n} x {n}; pass the targets of the kernel's training points."
        )
    k64 = k.to(pc.SOLVE_DTYPE)

    def loss_grad(f_train: Tensor) -> Tensor:
        with torch.enable_grad():
            f = f_train.detach().requires_grad_(True)
            value = loss(f, y)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    f"{fn}: loss must return a scalar tensor, got "
                    f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}; "
                    "reduce with .sum() or .mean()."
                )
            (grad,) = torch.autograd.grad(value.reshape(()), f)
        return grad

    def predict_fn(
        t: Any,
        fx_train_0: Any = 0.0,
        fx_test_0: Any = None,
        k_test_train: Any = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Outputs at time(s) ``t``; see :func:`gradient_descent`."""
        times, has_axis = pc.parse_times(t, fn, allow_inf=False)
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError(
                f"{fn}: fx_test_0 was given without k_test_train; pass the (M, N) test-train "
                "kernel to predict test outputs."
            )
        if isinstance(fx_train_0, (Tensor, np.ndarray)) and np.ndim(fx_train_0) >= 1:
            f0_shape = tuple(fx_train_0.shape)
            if f0_shape[0] != n:
                raise ValueError(
                    f"{fn}: fx_train_0 has shape {f0_shape}; its first axis must be the {n} "
                    "training points."
                )
        else:
            f0_shape = tuple(y.shape)
        out_shape = f0_shape[1:]
        f0 = pc.as_initial_outputs(fx_train_0, "fx_train_0", fn, f0_shape, device)
        kstack, m = k64, 0
        parts = [f0.reshape(n, -1)]
        if k_test_train is not None:
            kx = pc.pick_test_train_ntk(k_test_train, n, fn, device)
            m = kx.shape[0]
            kstack = torch.cat([k64, kx.to(pc.SOLVE_DTYPE)])  # (N + M, N)
            fx0 = pc.as_initial_outputs(fx_test_0, "fx_test_0", fn, (m,) + out_shape, device)
            parts.append(fx0.reshape(m, -1))
        state0 = torch.cat(parts)  # (N + M, k): train rows first
        if mom is not None:
            state0 = torch.stack([state0, torch.zeros_like(state0)])  # (2, N + M, k)

        def rhs(_t: Any, s: Tensor) -> Tensor:
            f = s if mom is None else s[0]
            g = loss_grad(f[:n].reshape(f0_shape)).reshape(n, -1).to(pc.SOLVE_DTYPE)
            drive = -lr * (kstack @ g)
            if mom is None:
                return drive
            return torch.stack([s[1], drive - (1.0 - mom) * s[1]])

        sol = _integrate(rhs, state0, times, rtol, atol, solver)  # (T, *state)
        if mom is not None:
            sol = sol[:, 0]
        sol = pc.check_finite_result(sol, fn, "solution (the ODE blew up)")
        fx_train = sol[:, :n].reshape((-1,) + f0_shape).to(out_dtype)
        fx_train = pc.add_time_axis(fx_train, has_axis)
        if k_test_train is None:
            return fx_train
        fx_test = sol[:, n:].reshape((-1, m) + out_shape).to(out_dtype)
        return fx_train, pc.add_time_axis(fx_test, has_axis)

    return predict_fn


def _integrate(
    rhs: Callable[[Any, Tensor], Tensor],
    state0: Tensor,
    times: Tensor,
    rtol: float,
    atol: float,
    solver: str,
) -> Tensor:
    """Solve ``ds/dt = rhs(t, s)`` from ``s(0) = state0``; ``(T, *state0.shape)`` at ``times``.

    Times may come in any order and repeat: they are sorted and deduplicated, ``0``
    is prepended, and the solution is gathered back.
    """
    uniq, inverse = torch.unique(times, sorted=True, return_inverse=True)
    grid = uniq if float(uniq[0]) == 0.0 else torch.cat([uniq.new_zeros(1), uniq])
    offset = grid.numel() - uniq.numel()
    if grid.numel() == 1:  # only t = 0
        sol = state0[None]
    elif solver == "torchdiffeq":
        import torchdiffeq

        with torch.no_grad():
            sol = torchdiffeq.odeint(
                rhs, state0, grid.to(state0.device), rtol=rtol, atol=atol, method="dopri5"
            )
    else:
        from scipy.integrate import solve_ivp

        shape = state0.shape

        def rhs_np(t: float, s: np.ndarray) -> np.ndarray:
            st = torch.as_tensor(s, dtype=pc.SOLVE_DTYPE, device=state0.device).reshape(shape)
            return rhs(t, st).reshape(-1).cpu().numpy()

        grid_np = grid.numpy()
        res = solve_ivp(
            rhs_np,
            (0.0, float(grid_np[-1])),
            state0.reshape(-1).cpu().numpy(),
            method="RK45",
            t_eval=grid_np,
            rtol=rtol,
            atol=atol,
        )
        if not res.success:
            raise RuntimeError(f"gradient_descent: scipy solve_ivp failed: {res.message}")
        sol = torch.as_tensor(res.y.T.copy(), device=state0.device).reshape((-1, *shape))
    return sol[offset:][inverse.to(sol.device)]
