"""Exact Bayesian inference with NNGP / NTK kernels (``infnets.predict.gp_inference``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.predict import common as pc
from infnets._src.predict.types import GPPredictFn

_FN = "gp_inference"
GP_GETS: tuple[str, ...] = ("nngp", "ntk", "ntkgp")


class OutputLayout:
    """How targets ``(N, *O)`` and kernels map to matrices for the linear algebra.

    Output axes listed in ``trace_axes`` are ones the kernel acts on as the
    identity (``K (x) I``); every other output axis ``u`` is *untraced*: the
    kernel carries it twice, interleaved, as ``(N1, N2, u1, u1, u2, u2, ...)``
    (entry ``[i, j, a, b]`` is the covariance of output ``a`` at ``x_i`` and
    output ``b`` at ``x_j``). Untraced axes fold into the example axis
    (``N * prod(u)`` rows); traced axes become the ``k`` right-hand sides.
    """

    def __init__(self, y_shape: tuple[int, ...], trace_axes: Sequence[int], fn: str) -> None:
        ndim = len(y_shape)
        if isinstance(trace_axes, int) or not isinstance(trace_axes, Sequence):
            raise TypeError(f"{fn}: trace_axes must be a tuple of ints, got {trace_axes!r}.")
        traced: set[int] = set()
        for a in trace_axes:
            if isinstance(a, bool) or not isinstance(a, int):
                raise TypeError(f"{fn}: trace_axes must be a tuple of ints, got {trace_axes!r}.")
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"{fn}: trace_axes {tuple(trace_axes)} out of range for y_train of shape "
                    f"{y_shape}."
                )
            a %= ndim
            if a == 0 and ndim > 1:
                raise ValueError(
                    f"{fn}: trace_axes may not include the batch axis 0 of y_train "
                    f"(shape {y_shape}); list output axes only, e.g. (-1,)."
                )
            if a:
                traced.add(a)
        self.y_shape = y_shape
        self.out_shape = y_shape[1:]
        self.untraced = [a for a in range(1, ndim) if a not in traced]
        self.traced = sorted(traced)
        self.u_sizes = tuple(y_shape[a] for a in self.untraced)
        self.u = math.prod(self.u_sizes)
        self.k = math.prod(y_shape[a] for a in self.traced)
        # y (N, *O) -> (N, *U, *T)
        self._perm = [0, *self.untraced, *self.traced]
        self._inv = [self._perm.index(i) for i in range(ndim)]

    def kernel_shape(self, n1: int, n2: int) -> tuple[int, ...]:
        """Expected kernel shape for ``n1 x n2`` examples."""
        return (n1, n2) + tuple(s for s in self.u_sizes for _ in range(2))

    def kernel_matrix(self, k: Tensor, n1: int, n2: int, name: str, hint: str) -> Tensor:
        """``(n1 * u, n2 * u)`` float64 matrix of a kernel of shape ``kernel_shape``."""
        pc.check_kernel_shape(k, self.kernel_shape(n1, n2), name, _FN, hint)
        k = k.to(pc.SOLVE_DTYPE)
        if not self.untraced:
            return k
        r = len(self.u_sizes)
        perm = [0, *(2 + 2 * i for i in range(r)), 1, *(3 + 2 * i for i in range(r))]
        return k.permute(perm).reshape(n1 * self.u, n2 * self.u)

    def y_matrix(self, y: Tensor) -> Tensor:
        """Targets ``(N, *O)`` as an ``(N * u, k)`` matrix."""
        return y.permute(self._perm).reshape(y.shape[0] * self.u, self.k)

    def mean_from_matrix(self, m: Tensor, n: int) -> Tensor:
        """Inverse of :meth:`y_matrix` for ``n`` examples."""
        shape = (n, *self.u_sizes, *(self.y_shape[a] for a in self.traced))
        return m.reshape(shape).permute(self._inv)

    def cov_from_matrix(self, c: Tensor, n: int) -> Tensor:
        """``(n u, n u)`` covariance to ``(n, n, u1, u1, ...)`` (interleaved)."""
        if not self.untraced:
            return c
        r = len(self.u_sizes)
        c = c.reshape((n, *self.u_sizes, n, *self.u_sizes))
        perm = [0, r + 1]
        for i in range(r):
            perm += [1 + i, r + 2 + i]
        return c.permute(perm)


def gp_inference(
    k_train_train: Any,
    y_train: Any,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Sequence[int] = (-1,),
    *,
    jitter: pc.Jitter = None,
) -> GPPredictFn:
    r"""Exact posterior of an infinitely wide network: Bayesian (NNGP) or NTK-trained.

    With train inputs ``X``, targets ``Y``, test inputs ``x``, NNGP kernel ``K``
    and NTK ``Θ`` (``K_r = K(X, X) + λ_K I``, ``Θ_r = Θ(X, X) + λ_Θ I``):

    * ``'nngp'`` — the Gaussian-process posterior of the NNGP
      (Lee et al. 2018, "Deep neural networks as Gaussian processes"):
      ``μ = K(x, X) K_r^{-1} Y``, ``Σ = K(x, x) - K(x, X) K_r^{-1} K(X, x)``.
    * ``'ntk'`` — the ensemble of infinitely wide networks trained to convergence
      by gradient descent on MSE from random initialisation
      (Lee et al. 2019, "Wide neural networks of any depth evolve as linear
      models under gradient descent", eq. 16 at ``t = inf``):
      ``μ = Θ(x, X) Θ_r^{-1} Y`` and, with ``A = Θ(x, X) Θ_r^{-1}``,
      ``Σ = K(x, x) - A K(X, x) - K(x, X) A^T + A K_r A^T`` (needs both kernels).
    * ``'ntkgp'`` — the GP posterior with the NTK as prior covariance, the
      infinite ensemble of He, Lakshminarayanan & Teh 2020, "Bayesian deep
      ensembles via the neural tangent kernel":
      ``μ = Θ(x, X) Θ_r^{-1} Y``, ``Σ = Θ(x, x) - Θ(x, X) Θ_r^{-1} Θ(X, x)``.

    ``diag_reg`` is the ridge ``λ = diag_reg * mean(diag(K(X, X)))`` (relative,
    per kernel) or ``λ = diag_reg`` with ``diag_reg_absolute_scale``. It is added
    to every train-train kernel wherever it appears (observation noise of
    variance ``λ`` on the training outputs), so ``'ntk'`` equals ``'nngp'`` when
    ``Θ = K``.

    Solves use a float64 Cholesky factorization, computed once per kernel and
    reused across calls; results are cast back to the train kernel's dtype.

    Args:
        k_train_train: ``(N, N)`` train-train kernel: a tensor/array (used for
            every ``get``), or a record with ``.nngp``/``.ntk`` attributes
            (:class:`infnets.Kernel`, a named tuple from ``kernel_fn(..., get=(...))``).
            With untraced output axes (see ``trace_axes``) the shape is
            ``(N, N, u1, u1, ...)``.
        y_train: ``(N, *O)`` targets (tensor or array; integer labels are cast).
        diag_reg: ridge ``>= 0`` added to the train-train kernels' diagonal.
        diag_reg_absolute_scale: if true ``diag_reg`` is absolute, else relative
            to the mean diagonal of each kernel.
        trace_axes: output axes of ``y_train`` on which the kernel acts as the
            identity (the kernel was traced over them); other output axes must
            appear, interleaved, in the kernels (NT convention).
        jitter: ``'auto'`` adds the smallest diagonal jitter (``1e-10`` to ``1e-2``
            times the mean diagonal) that makes a singular train kernel factorizable,
            with a warning; ``None`` (default) raises a ``ValueError`` instead.

    Returns:
        ``predict_fn(get, k_test_train=None, k_test_test=None)``: ``get`` is one of
        ``'nngp'``, ``'ntk'``, ``'ntkgp'`` or a tuple of them; ``k_test_train`` is the
        ``(M, N)`` test-train kernel(s) (``None``: predict on the train set);
        ``k_test_test`` the ``(M, M)`` test-test kernel(s) (NNGP for ``'nngp'`` and
        ``'ntk'``, NTK for ``'ntkgp'``). It returns the ``(M, *O)`` posterior mean,
        or with ``k_test_test`` a :class:`Gaussian` ``(mean, covariance)`` with an
        ``(M, M)`` covariance (symmetric; ``(M, M, u1, u1, ...)`` with untraced
        axes); for a tuple ``get``, a named tuple of these, one field per name.

    Examples:
        >>> import torch
        >>> from infnets import predict
        >>> x = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None]
        >>> k = torch.exp(-(x - x.T) ** 2)
        >>> predict_fn = predict.gp_inference(k[:5, :5], torch.sin(x[:5]), diag_reg=1e-4)
        >>> mean, cov = predict_fn('nngp', k[5:, :5], k[5:, 5:])
        >>> mean.shape, cov.shape
        (torch.Size([2, 1]), torch.Size([2, 2]))

    Kernels too large for memory: pass a kernel store written by
    :func:`infnets.distributed.compute_kernel` (its path or the store), a zarr or a Dask
    array as ``k_train_train``; solves then run by blocked Cholesky where the matrix
    fits and by preconditioned conjugate gradients with tiled products where it does
    not (:func:`infnets.distributed.gp_inference`, same ``predict_fn`` interface).
    """
    from infnets._src.scale.solve import is_stored_kernel  # never imports dask

    if is_stored_kernel(k_train_train):
        from infnets.distributed import gp_inference as at_scale

        return at_scale(
            k_train_train, y_train, diag_reg, diag_reg_absolute_scale, trace_axes, jitter=jitter
        )
    diag_reg = pc.check_nonneg(diag_reg, "diag_reg", _FN)
    if jitter not in (None, "auto"):
        raise ValueError(f"{_FN}: jitter must be None or 'auto', got {jitter!r}.")
    present = {
        name: pc.maybe_pick(k_train_train, name, "k_train_train", _FN) for name in ("nngp", "ntk")
    }
    fields = {name: k for name, k in present.items() if k is not None}
    if not fields:
        raise ValueError(
            f"{_FN}: k_train_train has neither .nngp nor .ntk set; pass a kernel tensor or a "
            "record with at least one of them."
        )
    first = next(iter(fields.values()))
    device, out_dtype = first.device, first.dtype
    y = pc.as_targets(y_train, "y_train", _FN, device)
    layout = OutputLayout(tuple(y.shape), trace_axes, _FN)
    n = y.shape[0]
    hint_tt = "(N, N) with N = len(y_train)"
    for name, k in fields.items():
        arg = (
            "k_train_train"
            if isinstance(k_train_train, (Tensor, np.ndarray))
            else (f"k_train_train.{name}")
        )
        if k.device != device:
            raise ValueError(
                f"{_FN}: k_train_train.nngp and .ntk are on different devices; move both to one."
            )
        if k.ndim < 2 or k.shape[0] != k.shape[1]:
            raise ValueError(
                f"{_FN}: {arg} must be a square train-train kernel, got shape {tuple(k.shape)}."
            )
        if k.shape[0] != n:
            raise ValueError(
                f"{_FN}: {arg} has {k.shape[0]} rows but y_train has {n} examples "
                f"(shape {tuple(y.shape)}); pass the targets of the kernel's training points."
            )
        pc.check_kernel_shape(k, layout.kernel_shape(n, n), arg, _FN, hint_tt)
        _inputs.check_symmetric(layout.kernel_matrix(k, n, n, arg, hint_tt), arg, _FN, k.dtype)
    y_mat = layout.y_matrix(y)

    mats: dict[str, tuple[Tensor, Tensor, float, float]] = {}
    factors: dict[str, Tensor] = {}

    def regularized(name: str) -> tuple[Tensor, Tensor, float, float]:
        """``(K, K + λ I, mean diagonal, λ)`` in float64 for a kernel field, cached."""
        key = pc.field_key(k_train_train, name)
        if key not in mats:
            raw = pc.pick(k_train_train, name, "k_train_train", _FN, device)
            k64 = layout.kernel_matrix(raw, n, n, "k_train_train", hint_tt)
            reg, scale = pc.regularization(k64, diag_reg, diag_reg_absolute_scale)
            k_r = k64.clone()
            k_r.diagonal().add_(reg)
            mats[key] = (k64, k_r, scale, reg)
        return mats[key]

    def factor(name: str) -> Tensor:
        """Lower Cholesky factor of ``K + λ I`` (plus any jitter), cached."""
        key = pc.field_key(k_train_train, name)
        if key not in factors:
            _, k_r, scale, reg = regularized(name)
            what = "k_train_train" if key == "tensor" else f"k_train_train.{name}"
            factors[key], _ = pc.cholesky(k_r, _FN, what, scale, reg, jitter)
        return factors[key]

    alphas: dict[str, Tensor] = {}

    def alpha(name: str) -> Tensor:
        key = pc.field_key(k_train_train, name)
        if key not in alphas:
            alphas[key] = torch.cholesky_solve(y_mat, factor(name))
        return alphas[key]

    def predict_fn(
        get: str | Sequence[str], k_test_train: Any = None, k_test_test: Any = None
    ) -> Any:
        """Posterior mean (and covariance with ``k_test_test``) for ``get``.

        Args:
            get: ``'nngp'``, ``'ntk'``, ``'ntkgp'`` or a tuple of them.
            k_test_train: ``(M, N)`` test-train kernel(s), or ``None`` for the train set.
            k_test_test: ``(M, M)`` test-test kernel(s), or ``None`` for no covariance.

        Returns:
            ``(M, *O)`` mean, or :class:`Gaussian`; a named tuple for tuple ``get``.
        """
        names, is_tuple = pc.parse_get(get, GP_GETS, _FN)
        if k_test_test is not None and k_test_train is None:
            raise ValueError(
                f"{_FN}: k_test_test was given without k_test_train; pass both for test "
                "covariances (k_test_train=k_train_train for the train set)."
            )
        m = n if k_test_train is None else None

        def test_train(name: str) -> Tensor:
            nonlocal m
            if k_test_train is None:
                return regularized(name)[0]
            raw = pc.pick(k_test_train, name, "k_test_train", _FN, device)
            if raw.ndim < 2 or raw.shape[1] != n:
                raise ValueError(
                    f"{_FN}: k_test_train has shape {tuple(raw.shape)}; its second axis must "
                    f"match the {n} training points (M, N)."
                )
            if m is None:
                m = raw.shape[0]
            return layout.kernel_matrix(raw, m, n, "k_test_train", "(M, N) test-train kernel")

        def test_test(name: str) -> Tensor:
            raw = pc.pick(k_test_test, name, "k_test_test", _FN, device)
            assert m is not None
            return layout.kernel_matrix(
                raw, m, m, "k_test_test", f"(M, M) with M = {m} test points"
            )

        results: dict[str, Any] = {}
        for g in names:
            kernel_name = "nngp" if g == "nngp" else "ntk"
            kx = test_train(kernel_name)
            assert m is not None
            mean = kx @ alpha(kernel_name)
            mean = pc.check_finite_result(mean, _FN, f"{g!r} mean")
            mean = layout.mean_from_matrix(mean, m).to(out_dtype)
            if k_test_test is None:
                results[g] = mean
                continue
            chol = factor(kernel_name)
            if g in ("nngp", "ntkgp"):
                kxx = test_test(kernel_name)
                w = torch.linalg.solve_triangular(chol, kx.T, upper=False)
                cov = kxx - w.T @ w
            else:  # 'ntk': Lee et al. 2019 eq. 16 at t = inf
                _require_nngp(k_train_train, k_test_train, k_test_test)
                kx_nngp = test_train("nngp")
                kxx = test_test("nngp")
                k_r_nngp = regularized("nngp")[1]
                a = torch.cholesky_solve(kx.T, chol).T  # Θ(x, X) Θ_r^{-1}
                cross = a @ kx_nngp.T
                cov = kxx - cross - cross.T + a @ k_r_nngp @ a.T
            cov = pc.check_finite_result(pc.symmetrize(cov), _FN, f"{g!r} covariance")
            results[g] = pc.Gaussian(mean, layout.cov_from_matrix(cov, m).to(out_dtype))
        return pc.pack_results(names, is_tuple, results)

    return predict_fn


def _require_nngp(*kernels: Any) -> None:
    """Refuse the ``'ntk'`` covariance from bare tensors: it needs the NNGP *and* the NTK.

    Lee et al. 2019 eq. 16 mixes both kernels; a bare tensor is one matrix, which would be
    used as both, a plausible but wrong covariance (Neural Tangents refuses too).
    """
    names = ("k_train_train", "k_test_train", "k_test_test")
    for name, k in zip(names, kernels):
        if isinstance(k, (Tensor, np.ndarray)):
            raise ValueError(
                f"{_FN}: get='ntk' with k_test_test asks for the covariance of NTK-trained "
                f"networks, which needs both the NNGP and the NTK, but {name} is one bare "
                "tensor (the NNGP is missing). Pass kernel records with .nngp and .ntk, e.g. "
                "kernel_fn(x1, x2, get=('nngp', 'ntk')), for all three kernels, or ask only for "
                "the mean (no k_test_test)."
            )
