"""Closed-form gradient descent on MSE: single networks, ensembles, stable rates."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.predict import common as pc
from infnets._src.predict.types import EnsemblePredictFn, MSEPredictFn

ENSEMBLE_GETS: tuple[str, ...] = ("nngp", "ntk")

#: the ensemble batches times so that one (times, M, N) block holds at most this many numbers
_BLOCK_ELEMENTS = 2**25


def _train_kernel(k: Any, fn: str, arg: str = "k_train_train") -> Tensor:
    """The ``(N, N)`` train-train NTK of a tensor or a record (its ``.ntk``), checked square
    and symmetric (``arg`` names the argument in errors)."""
    k = pc.pick(k, "ntk", arg, fn)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"{fn}: {arg} must be a square (N, N) train-train kernel, got shape {tuple(k.shape)}."
        )
    _inputs.check_symmetric(k, arg, fn)
    return k


def gradient_descent_mse(
    k_train_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    *,
    diag_reg_absolute_scale: bool = False,
    jitter: pc.Jitter = None,
    discrete: bool = False,
) -> MSEPredictFn:
    r"""Exact outputs of a linearized network trained by gradient flow (or descent) on MSE.

    The loss is ``L = 1/2 sum_{i, c} (f_c(x_i) - y_{i, c})^2`` (a sum, not a mean;
    for a mean over the ``N k`` target entries use ``learning_rate / (N k)``) and
    the time ``t`` counts steps of size ``learning_rate``: continuous time is the
    limit of ``t`` small steps. In function space the linearized network obeys
    ``df/dt = -lr Θ(x, X) (f(X) - Y)``, whose solution (Lee et al. 2019, "Wide
    neural networks of any depth evolve as linear models under gradient
    descent", eq. 9-11) is

    ``f_t(x) = f_0(x) - Θ(x, X) Θ_r^{-1} (I - exp(-lr Θ_r t)) (f_0(X) - Y)``

    with ``Θ_r = Θ(X, X) + λ I``. A ridge ``λ > 0`` is gradient flow on
    ``L + λ/2 |θ - θ_0|^2`` (weight decay towards the initialisation); on the
    train set ``Θ(x, X) = Θ(X, X)`` is the unregularized kernel. The kernel acts as
    ``Θ (x) I`` on the output axes.

    With ``discrete=True`` the network takes ``t`` whole steps of gradient descent
    ``θ <- θ - lr dL/dθ`` with the finite learning rate ``lr`` instead, and

    ``f_t(x) = f_0(x) - Θ(x, X) Θ_r^{-1} (I - (I - lr Θ_r)^t) (f_0(X) - Y)``

    exactly, step for step, for the linearized network (``(I - lr Θ_r)^t`` replaces
    ``exp(-lr Θ_r t)``; Lee et al. 2019, sec. 2.4). ``t = inf`` then needs
    ``lr < 2 / w_max`` (:func:`max_learning_rate`); above it finite times are still
    exact but grow without bound.

    ``Θ_r = V diag(w) V^T`` is eigendecomposed once (float64); each time then costs
    ``O(N^2 k)`` on the train set and ``O(M N k)`` on a test set (``Θ(x, X) V`` is
    cached for the last test kernel). Results have the train kernel's dtype.

    Args:
        k_train_train: ``(N, N)`` NTK on the training inputs: a tensor/array, or a
            record (:class:`infnets.Kernel`, named tuple) whose ``.ntk`` is used
            (pass ``.nngp`` explicitly to train only the readout layer).
        y_train: ``(N, *O)`` targets.
        learning_rate: step size ``lr > 0`` (see :func:`max_learning_rate`).
        diag_reg: ridge ``>= 0``, relative to ``mean(diag(Θ))`` unless
            ``diag_reg_absolute_scale``.
        diag_reg_absolute_scale: treat ``diag_reg`` as an absolute ridge.
        jitter: ``'auto'`` adds (and reports) the smallest diagonal jitter making a
            singular kernel invertible; ``None`` raises at ``t = inf`` instead
            (finite times are exact even for a singular kernel).
        discrete: ``t`` counts whole steps of gradient descent with step ``lr``
            (``(I - lr Θ)^t``) instead of gradient-flow time (``exp(-lr Θ t)``).

    Returns:
        ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``:
        ``t`` a time ``>= 0``, ``inf`` or ``None`` (convergence), or a 1-D tensor of
        times (adds a leading time axis ``T``); ``fx_train_0`` the ``(N, *O)``
        initial train outputs (a number broadcasts); ``fx_test_0`` the ``(M, *O)``
        initial test outputs (default 0); ``k_test_train`` the ``(M, N)`` test-train
        NTK. It returns ``fx_train_t`` of shape ``([T,] N, *O)``, or the tuple
        ``(fx_train_t, fx_test_t)`` with ``fx_test_t`` of shape ``([T,] M, *O)``
        when ``k_test_train`` is given.

    Examples:
        >>> import torch
        >>> from infnets import predict
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> ntk = torch.exp(-torch.cdist(x, x) ** 2)  # positive definite
        >>> y = torch.randn(6, 1, dtype=torch.float64)
        >>> predict_fn = predict.gradient_descent_mse(ntk, y, learning_rate=0.1)
        >>> predict_fn(t=torch.tensor([0.0, 10.0, 100.0])).shape
        torch.Size([3, 6, 1])
        >>> torch.allclose(predict_fn(), y)  # converged: interpolates
        True
    """
    fn = "gradient_descent_mse"
    lr = pc.check_positive(learning_rate, "learning_rate", fn)
    diag_reg = pc.check_nonneg(diag_reg, "diag_reg", fn)
    if jitter not in (None, "auto"):
        raise ValueError(f"{fn}: jitter must be None or 'auto', got {jitter!r}.")
    k = _train_kernel(k_train_train, fn)
    device, out_dtype = k.device, k.dtype
    y = pc.as_targets(y_train, "y_train", fn, device)
    n = k.shape[0]
    if y.shape[0] != n:
        raise ValueError(
            f"{fn}: y_train has {y.shape[0]} examples (shape {tuple(y.shape)}) but "
            f"k_train_train is {n} x {n}; pass the targets of the kernel's training points."
        )
    out_shape = tuple(y.shape[1:])
    y_mat = y.reshape(n, -1)
    eig = pc.eigh(
        k.to(pc.SOLVE_DTYPE), fn, "k_train_train", diag_reg, diag_reg_absolute_scale, jitter
    )
    v = eig.v
    w_train = eig.w.clamp_min(0.0)  # eigenvalues of the unregularized train kernel
    vty = v.T @ y_mat
    test_cache = pc.IdentityCache()

    def predict_fn(
        t: Any = None,
        fx_train_0: Any = 0.0,
        fx_test_0: Any = None,
        k_test_train: Any = None,
    ) -> Any:  # Tensor, or (train, test): per call in the protocol's overloads
        """Outputs at time(s) ``t``; see :func:`gradient_descent_mse`."""
        times, has_axis = pc.parse_times(t, fn)
        if discrete:
            pc.check_step_times(times, fn)
        if bool(torch.isinf(times).any()):
            pc.require_converged(eig, fn, "k_train_train")
            if discrete:
                pc.require_stable_steps(eig, lr, fn, "k_train_train")
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError(
                f"{fn}: fx_test_0 was given without k_test_train; pass the (M, N) test-train "
                "kernel to predict test outputs."
            )
        f0 = pc.as_initial_outputs(fx_train_0, "fx_train_0", fn, tuple(y.shape), device)
        r = v.T @ f0.reshape(n, -1) - vty  # (N, k) residual in the eigenbasis
        phi = pc.decay(eig.w_reg, times, lr, discrete)  # (T, N)
        steps = phi[:, :, None] * r  # (T, N, k)
        fx_train = f0.reshape(n, -1) - v @ (w_train[None, :, None] * steps)
        fx_train = pc.check_finite_result(fx_train, fn, "train prediction")
        fx_train = pc.add_time_axis(fx_train.reshape((-1, n) + out_shape).to(out_dtype), has_axis)
        if k_test_train is None:
            return fx_train
        kx = pc.pick_test_train_ntk(k_test_train, n, fn, device)
        m = kx.shape[0]
        cache = test_cache.lookup(kx)
        if "kxv" not in cache:
            cache["kxv"] = kx.to(pc.SOLVE_DTYPE) @ v
        fx0 = pc.as_initial_outputs(fx_test_0, "fx_test_0", fn, (m,) + out_shape, device)
        fx_test = fx0.reshape(m, -1) - cache["kxv"] @ steps
        fx_test = pc.check_finite_result(fx_test, fn, "test prediction")
        fx_test = pc.add_time_axis(fx_test.reshape((-1, m) + out_shape).to(out_dtype), has_axis)
        return fx_train, fx_test

    return predict_fn


def gradient_descent_mse_ensemble(
    kernel_fn: Callable[..., Any],
    x_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    *,
    diag_reg_absolute_scale: bool = False,
    jitter: pc.Jitter = None,
    discrete: bool = False,
    **kernel_fn_kwargs: Any,
) -> EnsemblePredictFn:
    r"""Mean and covariance over initialisations of infinitely wide networks trained on MSE.

    At initialisation the outputs are a Gaussian process, ``f_0 ~ GP(0, K)`` with
    ``K`` the NNGP kernel; training by gradient flow on ``L = 1/2 |f(X) - Y|^2``
    for time ``t`` (in steps of size ``lr``) is the affine map of
    :func:`gradient_descent_mse`, so ``f_t`` stays Gaussian (Lee et al. 2019,
    "Wide neural networks of any depth evolve as linear models under gradient
    descent", eq. 15-16). With ``A_t = G(x, X) G_r^{-1} (I - exp(-lr G_r t))``:

    * ``'ntk'`` (all layers trained, ``G = Θ`` the NTK):
      ``μ_t = A_t Y``, ``Σ_t = K(x, x) - A_t K(X, x) - K(x, X) A_t^T + A_t K_r A_t^T``;
    * ``'nngp'`` (only the readout layer trained, ``G = K``; the readout's tangent
      kernel is the NNGP), the same formulas, which simplify with
      ``K_r = V diag(w) V^T`` to
      ``Σ_t = K(x, x) - K(x, X) V diag((1 - exp(-2 lr w t)) / w) V^T K(X, x)``.

    With ``discrete=True``, ``t`` counts whole steps of gradient descent with the
    finite step ``lr``: ``A_t = G(x, X) G_r^{-1} (I - (I - lr G_r)^t)`` and the NNGP
    covariance's factor becomes ``(1 - (1 - lr w)^{2t}) / w``; the ensemble of finite
    twins trained by :func:`infnets.train.gradient_descent_ensemble` approaches
    these step for step as the width grows.

    ``Σ_0 = K(x, x)`` is the prior; at ``t = inf`` these are the posteriors of
    :func:`gp_inference`. The ridge ``λ`` (``diag_reg``, relative to each
    kernel's mean diagonal unless ``diag_reg_absolute_scale``) is added to every
    train-train kernel, ``G_r = G + λ I`` and ``K_r = K + λ I``, as in
    :func:`gp_inference`.

    Kernels are computed once: the train-train kernels on first use, the test
    kernels once per ``x_test`` object (the last one is cached; an in-place edit
    of ``x_test`` invalidates it). Eigendecompositions are reused across times, so
    a new time costs ``O(M N k)`` for the mean, ``O(M^2 N)`` for the NNGP
    covariance and ``O(M N^2)`` for the NTK covariance. The NTK covariance's
    ``A_t K_r A_t^T`` is evaluated directly (``2 M N^2`` per time) until the
    times asked for reach ``2 N / M``; then the NNGP in the NTK eigenbasis,
    ``V^T K_r V`` (``2 N^3``, once), halves the cost of every later time. Results have the kernels'
    dtype; the algebra runs in float64.

    Args:
        kernel_fn: ``kernel_fn(x1, x2=None, get=None, **kernel_fn_kwargs)``, the
            analytic kernel function of an :mod:`infnets.stax` network (any function
            returning a record or named tuple with ``.nngp``/``.ntk`` for a tuple
            ``get`` works).
        x_train: ``(N, ...)`` training inputs.
        y_train: ``(N, *O)`` targets.
        learning_rate: step size ``lr > 0``.
        diag_reg: ridge ``>= 0``.
        diag_reg_absolute_scale: treat ``diag_reg`` as an absolute ridge.
        jitter: ``'auto'`` adds (and reports) the smallest jitter making a singular
            train kernel invertible; ``None`` raises at ``t = inf`` instead.
        discrete: ``t`` counts whole steps of gradient descent (``(I - lr G)^t``)
            instead of gradient-flow time (``exp(-lr G t)``).
        **kernel_fn_kwargs: passed to every ``kernel_fn`` call.

    Returns:
        ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``: ``t`` a
        time, ``None``/``inf`` (convergence) or a 1-D tensor of ``T`` times (leading
        axis); ``x_test`` the ``(M, ...)`` test inputs (``None``: the train set);
        ``get`` ``'nngp'``, ``'ntk'`` or a tuple (``None`` means ``('nngp', 'ntk')``).
        Per name it gives the ``([T,] M, *O)`` mean, or with ``compute_cov`` a
        :class:`Gaussian` whose covariance ``([T,] M, M)`` is shared by the outputs;
        a named tuple of these for a tuple ``get``.

    Examples:
        >>> import torch
        >>> from infnets import predict, stax
        >>> _, _, kernel_fn = stax.serial(stax.Dense(512), stax.Relu(), stax.Dense(1))
        >>> x_train = torch.randn(8, 3, dtype=torch.float64)
        >>> y_train = torch.randn(8, 2, dtype=torch.float64)
        >>> predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train)
        >>> x_test = torch.randn(4, 3, dtype=torch.float64)
        >>> out = predict_fn(t=torch.tensor([1.0, 10.0]), x_test=x_test, get='ntk',
        ...                  compute_cov=True)
        >>> out.mean.shape, out.covariance.shape
        (torch.Size([2, 4, 2]), torch.Size([2, 4, 4]))
    """
    fn = "gradient_descent_mse_ensemble"
    if not callable(kernel_fn):
        raise TypeError(f"{fn}: kernel_fn must be callable, got {type(kernel_fn).__name__}.")
    lr = pc.check_positive(learning_rate, "learning_rate", fn)
    diag_reg = pc.check_nonneg(diag_reg, "diag_reg", fn)
    if jitter not in (None, "auto"):
        raise ValueError(f"{fn}: jitter must be None or 'auto', got {jitter!r}.")
    if isinstance(x_train, np.ndarray):
        x_train = torch.as_tensor(x_train)
    if not isinstance(x_train, Tensor) or x_train.ndim < 1:
        raise TypeError(f"{fn}: x_train must be an (N, ...) tensor or array.")
    n = x_train.shape[0]
    y = pc.as_targets(y_train, "y_train", fn, x_train.device)
    if y.shape[0] != n:
        raise ValueError(
            f"{fn}: y_train has {y.shape[0]} examples (shape {tuple(y.shape)}) but x_train "
            f"has {n}; pass one target per training input."
        )
    out_shape = tuple(y.shape[1:])
    y_mat = y.reshape(n, -1)

    def call(x1: Tensor, x2: Tensor | None, names: tuple[str, ...], what: str) -> dict:
        out = kernel_fn(x1, x2, get=names, **kernel_fn_kwargs)
        got: dict[str, Tensor] = {}
        for name in names:
            if isinstance(out, Tensor) and len(names) == 1:
                value = out
            else:
                value = pc.pick(out, name, f"kernel_fn({what})", fn)
            got[name] = value
        return got

    train: dict[str, Tensor] = {}  # float64 unregularized train-train kernels
    state: dict[str | tuple[str, str], Any] = {}  # eigendecompositions, projections of Y, D

    def train_kernels(names: Sequence[str]) -> None:
        missing = tuple(nm for nm in names if nm not in train)
        if not missing:
            return
        for name, k in call(x_train, None, missing, "x_train, None").items():
            if tuple(k.shape) != (n, n):
                raise ValueError(
                    f"{fn}: kernel_fn(x_train, None).{name} has shape {tuple(k.shape)}, expected "
                    f"({n}, {n}); kernel_fn must return traced (N1, N2) kernels."
                )
            train[name] = k.to(pc.SOLVE_DTYPE)
            state.setdefault("dtype", k.dtype)
            state.setdefault("device", k.device)

    def eig(name: str) -> pc.Eig:
        if ("eig", name) not in state:
            train_kernels((name,))
            e = pc.eigh(
                train[name],
                fn,
                f"the train-train {name}",
                diag_reg,
                diag_reg_absolute_scale,
                jitter,
            )
            state["eig", name] = e
            state["vty", name] = e.v.T @ y_mat.to(e.v.device)
        return state["eig", name]

    def regularized_nngp() -> Tensor:
        """A fresh copy of ``K_r = K + λ I``, the regularized train-train NNGP."""
        train_kernels(("nngp",))
        k_r = train["nngp"].clone()
        reg, _ = pc.regularization(k_r, diag_reg, diag_reg_absolute_scale)
        k_r.diagonal().add_(reg)
        return k_r

    def middle() -> Tensor:
        """``D = V_Θ^T K_r V_Θ``: the regularized NNGP in the NTK's eigenbasis."""
        if "D" not in state:
            v = eig("ntk").v
            state["D"] = pc.symmetrize(v.T @ regularized_nngp() @ v)
        return state["D"]

    def trained_term(p: Tensor) -> Tensor:
        """``A_t K_r A_t^T`` for ``p = A_t V_Θ`` of shape ``(T, M, N)``.

        Two routes: ``(p V^T) K_r (p V^T)^T`` costs ``2 T M N^2`` per call;
        ``p D p^T`` with ``D = V^T K_r V`` costs ``T M N^2`` once ``D`` exists, and
        ``D`` costs ``2 N^3``. ``D`` is built (and kept) once the times answered
        so far, this call's included, reach ``2 N / M``, where it starts to pay;
        a single time point on a large train set takes the direct route.
        """
        t_count, m_rows = p.shape[0], p.shape[1]
        if "D" not in state:
            state["direct_times"] = state.get("direct_times", 0) + t_count
            if state["direct_times"] * m_rows < 2 * n:
                a = p @ eig("ntk").v.T  # (T, M, N) = A_t
                return (a @ regularized_nngp()) @ a.transpose(-1, -2)
        return (p @ middle()) @ p.transpose(-1, -2)

    train_key = object()
    test_cache = pc.IdentityCache()

    def test_kernels(x_test: Any, names: Sequence[str], cov: bool) -> tuple[dict, int]:
        """Cached ``kx_<name>`` (M, N) and ``kxx`` (M, M) float64 kernels."""
        cache = test_cache.lookup(train_key if x_test is None else x_test)
        if x_test is None:
            train_kernels(names)
            for name in names:
                cache.setdefault("kx_" + name, train[name])
            if cov:
                train_kernels(("nngp",))
                cache.setdefault("kxx", train["nngp"])
            return cache, n
        missing = tuple(nm for nm in names if "kx_" + nm not in cache)
        if missing:
            for name, k in call(x_test, x_train, missing, "x_test, x_train").items():
                if k.ndim != 2 or k.shape[1] != n:
                    raise ValueError(
                        f"{fn}: kernel_fn(x_test, x_train).{name} has shape {tuple(k.shape)}, "
                        f"expected (M, {n})."
                    )
                cache["kx_" + name] = k.to(pc.SOLVE_DTYPE)
        m = cache["kx_" + names[0]].shape[0]
        if cov and "kxx" not in cache:
            k = call(x_test, None, ("nngp",), "x_test, None")["nngp"]
            if tuple(k.shape) != (m, m):
                raise ValueError(
                    f"{fn}: kernel_fn(x_test, None).nngp has shape {tuple(k.shape)}, expected "
                    f"({m}, {m})."
                )
            cache["kxx"] = k.to(pc.SOLVE_DTYPE)
        return cache, m

    def projection(cache: dict, kx_name: str, basis: str) -> Tensor:
        """``K_kx(x, X) V_basis``, cached with the test kernels."""
        key = f"proj_{kx_name}_{basis}"
        if key not in cache:
            cache[key] = cache["kx_" + kx_name] @ eig(basis).v
        return cache[key]

    def predict_fn(
        t: Any = None, x_test: Any = None, get: Any = None, compute_cov: bool = False
    ) -> Any:
        """Ensemble mean (and covariance) at time(s) ``t``; see the factory's docstring."""
        names, is_tuple = pc.parse_get(ENSEMBLE_GETS if get is None else get, ENSEMBLE_GETS, fn)
        times, has_axis = pc.parse_times(t, fn)
        if discrete:
            pc.check_step_times(times, fn)
        if isinstance(x_test, np.ndarray):
            raise TypeError(
                f"{fn}: pass x_test as a torch.Tensor (its identity keys the kernel cache); "
                "convert once with torch.as_tensor(x_test)."
            )
        needed = set(names) | ({"nngp"} if compute_cov else set())
        train_kernels(tuple(sorted(needed)))
        cache, m = test_kernels(x_test, tuple(sorted(needed)), compute_cov)
        out_dtype = state["dtype"]
        results: dict[str, Any] = {}
        for g in names:
            e = eig(g)
            if bool(torch.isinf(times).any()):
                pc.require_converged(e, fn, f"the train-train {g}")
                if discrete:
                    pc.require_stable_steps(e, lr, fn, f"the train-train {g}")
            b = projection(cache, g, g)  # (M, N)
            phi = pc.decay(e.w_reg, times, lr, discrete)  # (T, N)
            mean = b @ (phi[:, :, None] * state["vty", g])  # (T, M, k)
            mean = pc.check_finite_result(mean, fn, f"{g!r} mean")
            mean = pc.add_time_axis(mean.reshape((-1, m) + out_shape).to(out_dtype), has_axis)
            if not compute_cov:
                results[g] = mean
                continue
            kxx = cache["kxx"]
            chunk = max(1, _BLOCK_ELEMENTS // max(1, m * e.v.shape[0]))
            covs = []
            for lo in range(0, times.numel(), chunk):  # loop over blocks of times only
                tb = times[lo : lo + chunk]
                if g == "nngp":
                    psi = pc.decay(e.w_reg, tb, lr, discrete, 2.0)  # (1 - e^{-2 lr w t}) / w
                    cov = kxx - (b[None] * psi[:, None, :]) @ b.T
                else:
                    p = b[None] * phi[lo : lo + chunk, None, :]  # (T, M, N) = A_t V
                    cross = p @ projection(cache, "nngp", "ntk").T  # A_t K(X, x)
                    cov = kxx - cross - cross.transpose(-1, -2) + trained_term(p)
                covs.append(pc.symmetrize(cov))
            cov = pc.check_finite_result(torch.cat(covs), fn, f"{g!r} covariance")
            results[g] = pc.Gaussian(mean, pc.add_time_axis(cov.to(out_dtype), has_axis))
        return pc.pack_results(names, is_tuple, results)

    return predict_fn


def max_learning_rate(
    ntk_train_train: Any, y_train_size: int | None = None, momentum: float = 0.0
) -> float:
    r"""Largest learning rate for which gradient descent on MSE converges.

    Discrete gradient descent ``f_{s+1} = f_s - lr Θ (f_s - Y)`` on
    ``L = 1/2 sum (f - y)^2`` contracts every eigen-direction of the NTK iff
    ``|1 - lr w| < 1``, i.e. ``lr < 2 / w_max``. Heavy-ball momentum ``m``
    (``f_{s+1} = f_s + m (f_s - f_{s-1}) - lr Θ (f_s - Y)``) converges iff
    ``lr < 2 (1 + m) / w_max`` (Polyak 1964). For a mean-normalised loss
    ``1 / (2 n) sum (f - y)^2`` over ``n = y_train_size`` target entries the bound
    is ``n`` times larger. Cf. Lee et al. 2019, "Wide neural networks of any depth
    evolve as linear models under gradient descent", sec. 2.4.

    Args:
        ntk_train_train: ``(N, N)`` train-train NTK (tensor, array, or a record whose
            ``.ntk`` is used).
        y_train_size: number of target entries ``N k`` a mean-normalised loss
            averages over; ``None`` for the summed loss used throughout
            :mod:`infnets.predict`.
        momentum: heavy-ball momentum in ``[0, 1)``.

    Returns:
        ``2 (1 + momentum) / w_max`` (times ``y_train_size`` when given), a float.

    Examples:
        >>> import torch
        >>> from infnets import predict
        >>> predict.max_learning_rate(torch.diag(torch.tensor([1.0, 4.0])))
        0.5
    """
    fn = "max_learning_rate"
    m = pc.check_momentum(momentum, fn)
    k = _train_kernel(ntk_train_train, fn, "ntk_train_train")
    size = 1
    if y_train_size is not None:
        if isinstance(y_train_size, bool) or not isinstance(y_train_size, (int, np.integer)):
            raise TypeError(
                f"{fn}: y_train_size must be an int, got {type(y_train_size).__name__}."
            )
        if y_train_size < 1:
            raise ValueError(f"{fn}: y_train_size must be >= 1, got {y_train_size}.")
        size = int(y_train_size)
    w_max = float(torch.linalg.eigvalsh(pc.symmetrize(k.to(pc.SOLVE_DTYPE)))[-1])
    if not w_max > 0 or not math.isfinite(w_max):
        raise ValueError(
            f"{fn}: the NTK's largest eigenvalue is {w_max:.3g}; a kernel must have a "
            "positive eigenvalue for a learning rate bound."
        )
    return 2.0 * (1.0 + m) * size / w_max
