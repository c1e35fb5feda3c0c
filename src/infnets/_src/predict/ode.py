"""Gradient flow (optionally with momentum) for any loss, by numerical integration."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.predict import common as pc
from infnets._src.predict.types import ODEPredictFn

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
) -> ODEPredictFn:
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
    integrated in float64, in the variable ``u`` with ``f(X) = f_0(X) + Θ(X, X) u``
    and ``f(x) = f_0(x) + Θ(x, X) u`` (``N k`` unknowns however many test points).
    The flow is *stiff*: an explicit solver needs ``~ lr w_max t`` steps, minutes for
    ``lr = 1``, ``t = 1e4``. The default solver is therefore ``scipy``'s LSODA, which
    switches to BDF where stiffness appears (Radau IIA with momentum, whose fast modes
    oscillate), with the analytic Jacobian
    ``-lr H (Θ ⊗ I)`` (``H`` the loss's Hessian, by ``torch.func.hessian``, for
    ``N k <= 2048``); ``'torchdiffeq'`` runs the explicit Dormand-Prince method on the
    kernel's device, for short, non-stiff flows. Both stop after
    :data:`MAX_STEPS` steps with an error instead of running on, show a ``tqdm``
    progress bar when an integration takes over 2 s, and a NaN/Inf loss or gradient
    raises a ``FloatingPointError`` giving the time it appeared. ``L`` is used as
    given: pass ``0.5 * ((fx - y) ** 2).sum()`` to match :func:`gradient_descent_mse`.

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
        solver: ``'auto'`` or ``'scipy'`` (LSODA or Radau, stiff-aware), or ``'torchdiffeq'``
            (explicit Dormand-Prince, ``pip install torchdiffeq``).

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
        solver = "scipy"
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

    def predict_fn(
        t: Any,
        fx_train_0: Any = 0.0,
        fx_test_0: Any = None,
        k_test_train: Any = None,
    ) -> Any:  # Tensor, or (train, test): per call in the protocol's overloads
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
        flow = _Flow(loss, y, k64, f0, lr, mom, fn)
        u = _integrate(flow, times, rtol, atol, solver)  # (T, N, k)
        f_train = f0.reshape(n, -1) + k64 @ u
        f_train = pc.check_finite_result(f_train, fn, "solution (the ODE blew up)")
        fx_train = pc.add_time_axis(f_train.reshape((-1,) + f0_shape).to(out_dtype), has_axis)
        if k_test_train is None:
            return fx_train
        kx = pc.pick_test_train_ntk(k_test_train, n, fn, device).to(pc.SOLVE_DTYPE)
        m = kx.shape[0]
        fx0 = pc.as_initial_outputs(fx_test_0, "fx_test_0", fn, (m,) + out_shape, device)
        f_test = pc.check_finite_result(
            fx0.reshape(m, -1) + kx @ u, fn, "solution (the ODE blew up)"
        )
        return fx_train, pc.add_time_axis(
            f_test.reshape((-1, m) + out_shape).to(out_dtype), has_axis
        )

    return predict_fn


#: at most this many solver steps per call: a flow that needs more is refused with a message
#: (the stiff solver takes tens to hundreds; an explicit one ``~ lr w_max t``)
MAX_STEPS = 20_000
#: the analytic Jacobian (a dense ``(N k)^2`` Hessian of the loss) is formed up to this
#: ``N k``; above it the stiff solver estimates it by finite differences
JAC_MAX = 2048
#: a progress bar appears when an integration runs longer than this (seconds)
PROGRESS_DELAY_S = 2.0


class _Flow:
    """The gradient flow written in ``u`` (``(N, k)``), with ``f = f0 + K u``.

    ``df/dt = -lr K grad L(f)`` is ``du/dt = -lr grad L(f0 + K u)``, ``u(0) = 0`` (with
    momentum ``u'' = -(1 - m) u' - lr grad L``), and the test outputs are
    ``f_x = f_x0 + K_x u``: the state has ``N k`` (``2 N k``) entries whatever the number of
    test points, and the Jacobian is ``-lr H (K (x) I_k)`` with ``H`` the loss's Hessian.
    """

    def __init__(
        self,
        loss: Callable[[Tensor, Tensor], Tensor],
        y: Tensor,
        k64: Tensor,
        f0: Tensor,
        lr: float,
        mom: float | None,
        fn: str,
    ) -> None:
        self.loss, self.y, self.k64, self.lr, self.mom, self.fn = loss, y, k64, lr, mom, fn
        self.f0_shape = tuple(f0.shape)
        self.n = f0.shape[0]
        self.f0 = f0.reshape(self.n, -1)
        self.units = self.f0.shape[1]
        self.shape = (self.n, self.units) if mom is None else (2, self.n, self.units)
        self.t = 0.0

    def _f(self, u: Tensor) -> Tensor:
        return (self.f0 + self.k64 @ u).reshape(self.f0_shape)

    def grad(self, u: Tensor) -> Tensor:
        """``grad_f L(f0 + K u)`` as ``(N, k)``; a non-finite value raises."""
        with torch.enable_grad():
            f = self._f(u).detach().requires_grad_(True)
            value = self.loss(f, self.y)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    f"{self.fn}: loss must return a scalar tensor, got "
                    f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}; "
                    "reduce with .sum() or .mean()."
                )
            (g,) = torch.autograd.grad(value.reshape(()), f)
        g = g.reshape(self.n, -1).to(pc.SOLVE_DTYPE)
        if not bool(torch.isfinite(value.detach())) or not bool(torch.isfinite(g).all()):
            raise FloatingPointError(
                f"{self.fn}: the loss or its gradient is NaN/Inf at t = {self.t:.6g} "
                f"(loss = {float(value.detach()):.6g}). The loss is not finite at these "
                "outputs (e.g. log of 0 or of a negative number, a division by 0); use a "
                "numerically stable form (torch.log_softmax, not log(softmax)), or a smaller "
                "learning_rate or t if the outputs diverged."
            )
        return g

    def rhs(self, t: float, s: Tensor) -> Tensor:
        """``ds/dt`` for the state ``u`` (or ``(u, u')`` with momentum)."""
        self.t = float(t)
        if self.mom is None:
            return -self.lr * self.grad(s)
        return torch.stack([s[1], -(1.0 - self.mom) * s[1] - self.lr * self.grad(s[0])])

    def jacobian(self, s: Tensor) -> Tensor:
        """``d rhs / d s`` as a dense matrix: ``-lr H (K (x) I_k)`` with the loss's Hessian
        ``H`` by vectorized double backward, or by forward differences of the gradient when
        the loss does not support that."""
        size = self.n * self.units
        u = s if self.mom is None else s[0]
        f = self._f(u).detach().reshape(-1)

        def flat_loss(v: Tensor) -> Tensor:
            return self.loss(v.reshape(self.f0_shape), self.y).reshape(())

        try:
            with torch.enable_grad():
                hess = torch.autograd.functional.hessian(flat_loss, f, vectorize=True)
            hess = hess.reshape(size, size)
        except Exception:  # noqa: BLE001 - e.g. .item() in the loss: differences instead
            hess = self._hessian_differences(f)
        eye_k = torch.eye(self.units, dtype=pc.SOLVE_DTYPE, device=f.device)
        a = -self.lr * (hess.to(pc.SOLVE_DTYPE) @ torch.kron(self.k64, eye_k))
        if self.mom is None:
            return a
        eye = torch.eye(size, dtype=pc.SOLVE_DTYPE, device=f.device)
        top = torch.cat([torch.zeros_like(a), eye], 1)
        return torch.cat([top, torch.cat([a, -(1.0 - self.mom) * eye], 1)])

    def _hessian_differences(self, f: Tensor) -> Tensor:
        """``H`` column by column from forward differences of the gradient."""
        size = f.numel()

        def grad(v: Tensor) -> Tensor:
            with torch.enable_grad():
                w = v.reshape(self.f0_shape).detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.loss(w, self.y).reshape(()), w)
            return g.reshape(-1).to(pc.SOLVE_DTYPE)

        g0 = grad(f)
        cols = []
        for j in range(size):
            h = math.sqrt(torch.finfo(pc.SOLVE_DTYPE).eps) * max(1.0, abs(float(f[j])))
            step = torch.zeros_like(f)
            step[j] = h
            cols.append((grad(f + step) - g0) / h)
        return torch.stack(cols, 1)


def _too_long(fn: str, t_end: float, reason: str) -> RuntimeError:
    return RuntimeError(
        f"{fn}: the ODE solver stopped before t = {t_end:.6g} ({reason}). The flow is too "
        "stiff or oscillatory for these settings: ask for a smaller t, loosen rtol/atol, use "
        "solver='scipy' (stiff-aware) if you chose 'torchdiffeq', or, for the MSE loss, the "
        "closed form predict.gradient_descent_mse."
    )


def _integrate(flow: _Flow, times: Tensor, rtol: float, atol: float, solver: str) -> Tensor:
    """``u`` at ``times``: ``(T, N, k)``.

    Times may come in any order and repeat: they are sorted and deduplicated, ``0``
    is prepended, and the solution is gathered back.
    """
    from tqdm import tqdm

    device = flow.k64.device
    uniq, inverse = torch.unique(times, sorted=True, return_inverse=True)
    grid = uniq if float(uniq[0]) == 0.0 else torch.cat([uniq.new_zeros(1), uniq])
    offset = grid.numel() - uniq.numel()
    state0 = torch.zeros(flow.shape, dtype=pc.SOLVE_DTYPE, device=device)
    t_end = float(grid[-1])
    if grid.numel() == 1:  # only t = 0
        sol = state0[None]
    else:
        with tqdm(total=t_end, desc=flow.fn, unit="t", delay=PROGRESS_DELAY_S, leave=False) as bar:

            def tick(t: float) -> None:
                if t > bar.n:
                    bar.update(t - bar.n)

            if solver == "torchdiffeq":
                sol = _torchdiffeq(flow, state0, grid.to(device), rtol, atol, tick)
            else:
                sol = _scipy(flow, state0, grid.numpy(), rtol, atol, tick)
    sol = sol[offset:][inverse.to(sol.device)]
    return sol if flow.mom is None else sol[:, 0]


def _torchdiffeq(
    flow: _Flow,
    state0: Tensor,
    grid: Tensor,
    rtol: float,
    atol: float,
    tick: Callable[[float], None],
) -> Tensor:
    """Explicit Dormand-Prince (``torchdiffeq``), at most :data:`MAX_STEPS` steps."""
    import torchdiffeq

    def rhs(t: Tensor, s: Tensor) -> Tensor:
        tick(float(t))
        return flow.rhs(float(t), s)

    try:
        with torch.no_grad():
            return torchdiffeq.odeint(
                rhs,
                state0,
                grid,
                rtol=rtol,
                atol=atol,
                method="dopri5",
                options={"max_num_steps": MAX_STEPS},
            )
    except AssertionError as err:  # torchdiffeq reports step limits and dt underflow so
        raise _too_long(flow.fn, float(grid[-1]), f"torchdiffeq: {err}") from None


def _scipy(
    flow: _Flow,
    state0: Tensor,
    grid: np.ndarray,
    rtol: float,
    atol: float,
    tick: Callable[[float], None],
) -> Tensor:
    """Implicit ``scipy`` solvers, step by step, at most :data:`MAX_STEPS` steps.

    Gradient flow: LSODA (switches between Adams and BDF as stiffness appears). With
    momentum the fast modes are lightly damped oscillations (eigenvalues
    ``-(1 - m)/2 +- i sqrt(lr w)``), close to the imaginary axis where BDF of order > 2 is
    unstable, so LSODA's steps stay small long after they decayed; Radau IIA (A- and
    L-stable) takes steps that grow with ``t`` there (measured on 10 points, ``w_max = 60``,
    ``m = 0.5``: the work is the same for ``t = 1e2`` and ``t = 1e6``).
    """
    from scipy.integrate import LSODA, Radau

    shape, device = state0.shape, state0.device

    def as_state(v: np.ndarray) -> Tensor:
        return torch.as_tensor(v, dtype=pc.SOLVE_DTYPE, device=device).reshape(shape)

    def fun(t: float, v: np.ndarray) -> np.ndarray:
        return flow.rhs(t, as_state(v)).reshape(-1).cpu().numpy()

    def jac(t: float, v: np.ndarray) -> np.ndarray:
        return flow.jacobian(as_state(v)).cpu().numpy()

    y0 = state0.reshape(-1).cpu().numpy()
    # the analytic Jacobian up to JAC_MAX unknowns; the solver differences ``fun`` above that
    small = flow.n * flow.units <= JAC_MAX
    method = LSODA if flow.mom is None else Radau
    ode = method(fun, 0.0, y0, float(grid[-1]), rtol=rtol, atol=atol, jac=jac if small else None)
    out = [y0]
    i, steps = 1, 0
    while i < grid.size:
        if ode.status != "running":
            reason = ode.status if ode.status == "failed" else "ended early"
            raise _too_long(flow.fn, float(grid[-1]), f"{method.__name__} {reason}")
        steps += 1
        if steps > MAX_STEPS:
            raise _too_long(flow.fn, float(grid[-1]), f"over {MAX_STEPS} steps")
        message = ode.step()
        if ode.status == "failed":
            raise _too_long(flow.fn, float(grid[-1]), f"{method.__name__}: {message}")
        tick(ode.t)
        if grid[i] <= ode.t:
            dense = ode.dense_output()
            while i < grid.size and grid[i] <= ode.t:
                out.append(dense(grid[i]) if grid[i] < ode.t else ode.y.copy())
                i += 1
    return torch.as_tensor(np.stack(out), device=device).reshape((-1, *shape))
