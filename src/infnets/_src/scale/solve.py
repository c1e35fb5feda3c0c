"""Solving with kernel matrices too large for one machine: tiled CG, Cholesky where it fits.

The NNGP / NTK posterior mean of infinitely wide networks (Lee et al. 2018,
"Deep neural networks as Gaussian processes"; Lee et al. 2019, "Wide neural
networks of any depth evolve as linear models under gradient descent", eq. 16
at ``t = inf``) is

    ``mu(x) = K(x, X) alpha``,   ``(K(X, X) + lambda I) alpha = Y``,

with ``K`` the NNGP (Bayesian posterior) or the NTK (gradient-descent ensemble;
also the mean of the NTK-GP). Two solvers of the linear system:

* **Cholesky** (``method='cholesky'``): the matrix is read tile by tile into one
  float64 array, the ridge added in place, and factored in place by LAPACK's
  blocked ``potrf`` (no second copy): ``N^3 / 3`` flops, ``8 N^2`` bytes.
* **Preconditioned conjugate gradients** (``method='cg'``, :func:`cg_solve`):
  the matrix is only touched through products ``K V`` computed tile by tile (a
  Dask array over a zarr store: one read of the matrix per iteration, spread over
  the cluster), so ``N`` is bounded by disk, not memory. All right-hand sides
  iterate together (one matrix pass per iteration for every output). Kernel
  spectra decay fast, so a rank-``r`` randomized Nystrom preconditioner (Frangella,
  Tropp & Udell 2023, "Randomized Nystrom preconditioning", SIAM J. Matrix Anal.
  Appl. 44(2)) built from a single product ``K Omega`` makes the iteration count
  nearly independent of ``N``; a Jacobi (diagonal) preconditioner is available too.

``method='auto'`` picks Cholesky when ``8 N^2`` bytes fit the memory budget.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "CGResult",
    "as_operator",
    "cg_solve",
    "gp_inference",
    "is_stored_kernel",
    "solve_posterior_mean",
]

_FN = "solve_posterior_mean"


# ------------------------------------------------------------------ operators
class _Operator:
    """A kernel matrix reached through tiled products (base: an in-memory matrix).

    The products use numpy only: mixing torch's and numpy's thread pools in one
    loop makes both spin against each other.
    """

    def __init__(self, mat: np.ndarray) -> None:
        self.mat = mat
        self.shape: tuple[int, int] = (int(mat.shape[0]), int(mat.shape[1]))
        self.dtype = np.dtype(mat.dtype)

    def matmat(self, v: np.ndarray) -> np.ndarray:
        """``K @ v`` in float64 for ``v`` of shape ``(N2, k)``."""
        if self.mat.dtype == np.float64:
            return self.mat @ v
        out = np.empty((self.shape[0], v.shape[1]))
        step = 4096
        for s in range(0, self.shape[0], step):
            out[s : s + step] = self.mat[s : s + step].astype(np.float64) @ v
        return out

    def diagonal(self) -> np.ndarray:
        return np.diagonal(self.mat).astype(np.float64)

    def load(self) -> np.ndarray:
        """The matrix as a new float64 array (tile by tile for stored matrices)."""
        return np.array(self.mat, dtype=np.float64)


class _DaskOperator(_Operator):
    """A Dask array (e.g. ``from_zarr`` of a kernel store): products run on its scheduler."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.shape = (int(arr.shape[0]), int(arr.shape[1]))
        self.dtype = np.dtype(arr.dtype)

    def matmat(self, v: np.ndarray) -> np.ndarray:
        import dask.array as da

        vd = da.from_array(v, chunks=(self.arr.chunks[1], v.shape[1]))
        return np.asarray(da.matmul(self.arr, vd).compute(), dtype=np.float64)

    def diagonal(self) -> np.ndarray:
        import dask.array as da

        return np.asarray(da.diagonal(self.arr).compute(), dtype=np.float64)

    def load(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float64)
        start = 0
        for size in self.arr.chunks[0]:  # one panel of tile rows at a time
            out[start : start + size] = self.arr[start : start + size].compute()
            start += size
        return out


def as_operator(k: Any, get: str = "nngp", name: str = "k", fn: str = _FN) -> _Operator:
    """Wrap a kernel matrix: a store path, :class:`KernelStore`, zarr/Dask array, tensor, array.

    Args:
        k: the ``(N1, N2)`` matrix; a path or store gives its ``get`` kernel; a record
            with ``.nngp``/``.ntk`` attributes gives that attribute.
        get: which kernel of a store or record, ``'nngp'`` or ``'ntk'``.
        name: the argument's name for error messages.
        fn: the calling function's name for error messages.

    Returns:
        An operator with ``shape``, ``matmat(v)``, ``diagonal()`` and ``load()``.
    """
    from infnets._src.scale.store import KernelStore

    if get not in ("nngp", "ntk"):
        raise ValueError(f"{fn}: get must be 'nngp' or 'ntk', got {get!r}.")
    if isinstance(k, _Operator):
        return k
    if isinstance(k, (str, os.PathLike)):
        k = KernelStore(k)
    if isinstance(k, KernelStore):
        k._require_complete()
        return _check_op(_DaskOperator(k.to_dask(get)), name, fn)
    mod = type(k).__module__ or ""
    if mod.startswith("zarr"):
        import dask.array as da

        return _check_op(_DaskOperator(da.from_zarr(k)), name, fn)
    if mod.startswith("dask"):
        return _check_op(_DaskOperator(k), name, fn)
    if isinstance(k, torch.Tensor):
        k = k.detach().cpu().numpy()
    if isinstance(k, np.ndarray):
        return _check_op(_Operator(k), name, fn)
    if hasattr(k, get):
        value = getattr(k, get)
        if value is None:
            raise ValueError(f"{fn}: {name}.{get} is None; compute it with get including {get!r}.")
        return as_operator(value, get, f"{name}.{get}", fn)
    raise TypeError(
        f"{fn}: {name} must be a kernel store path, KernelStore, zarr or Dask array, tensor, "
        f"numpy array or a record with .nngp/.ntk; got {type(k).__name__}."
    )


def _check_op(op: _Operator, name: str, fn: str) -> _Operator:
    if len(op.shape) != 2:
        raise ValueError(f"{fn}: {name} must be a matrix, got shape {op.shape}.")
    if op.dtype not in (np.float32, np.float64):
        raise TypeError(f"{fn}: {name} has dtype {op.dtype}; pass a float32/float64 kernel.")
    return op


# ----------------------------------------------------------- preconditioners
def _jacobi(op: _Operator, shift: float) -> Callable[[np.ndarray], np.ndarray]:
    d = op.diagonal() + shift
    if np.any(d <= 0):
        raise ValueError(
            f"{_FN}: the kernel's diagonal (+ ridge) has entries <= 0 ({d.min():.3g}); "
            "a kernel matrix must be positive definite."
        )
    inv = 1.0 / d
    return lambda r: r * inv[:, None]


def _nystrom(
    op: _Operator, shift: float, rank: int, seed: int
) -> Callable[[np.ndarray], np.ndarray]:
    """Randomized Nystrom preconditioner of ``K + shift I`` (Frangella et al. 2023, Alg. 2.1)."""
    n = op.shape[0]
    rank = max(1, min(rank, n))
    gen = np.random.default_rng(seed)
    omega, _ = np.linalg.qr(gen.standard_normal((n, rank)))
    y = op.matmat(omega)  # one pass over the matrix
    nu = math.sqrt(n) * np.finfo(np.float64).eps * max(np.linalg.norm(y), 1e-300)
    for _ in range(8):
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        core = 0.5 * (core + core.T)
        try:
            chol = np.linalg.cholesky(core)
            break
        except np.linalg.LinAlgError:
            nu *= 100.0
    else:  # pragma: no cover - only for matrices far from positive semi-definite
        warnings.warn(f"{_FN}: Nystrom preconditioner failed; using Jacobi.", stacklevel=3)
        return _jacobi(op, shift)
    b = scipy.linalg.solve_triangular(chol, y_nu.T, lower=True).T  # Y_nu L^{-T}
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    lam = np.maximum(s**2 - nu, 0.0)
    keep = lam > max(lam[0], 1e-300) * 1e-12 if lam.size else lam > 0
    u, lam = u[:, keep], lam[keep]
    if lam.size == 0:
        return lambda r: r
    lam_r = lam[-1]
    scale = (lam_r + shift) / (lam + shift)

    def apply(r: np.ndarray) -> np.ndarray:
        ur = u.T @ r
        return r + u @ ((scale[:, None] - 1.0) * ur)

    return apply


# ------------------------------------------------------------------------ CG
@dataclasses.dataclass(frozen=True)
class CGResult:
    """Result of :func:`cg_solve`.

    Attributes:
        x: ``(N,)`` or ``(N, k)`` float64 solution (the shape of ``b``).
        iterations: iterations run (each one product with the matrix).
        converged: whether every column reached ``tol``.
        residual: ``(k,)`` final relative residuals ``||b - A x|| / ||b||`` (recursive).
    """

    x: torch.Tensor
    iterations: int
    converged: bool
    residual: np.ndarray


def cg_solve(
    a: Any,
    b: Any,
    *,
    shift: float = 0.0,
    tol: float = 1e-8,
    maxiter: int | None = None,
    preconditioner: str | Callable[[np.ndarray], np.ndarray] | None = "nystrom",
    rank: int = 100,
    x0: Any = None,
    get: str = "nngp",
    seed: int = 0,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> CGResult:
    r"""Solve ``(A + shift I) x = b`` by preconditioned conjugate gradients, tile by tile.

    Block-parallel PCG (Hestenes & Stiefel 1952): every column of ``b`` runs its own
    CG recurrence, all sharing one product ``A P`` per iteration, computed tile by
    tile (Dask arrays on their scheduler; a kernel store's zarr chunks are read once
    per iteration). Stops when ``||r_k|| <= tol ||b_k||`` for every column.

    Args:
        a: symmetric positive (semi-)definite ``(N, N)`` matrix: a kernel store path or
            :class:`~infnets.distributed.KernelStore` (its ``get`` kernel), a zarr or
            Dask array, a tensor or numpy array.
        b: ``(N,)`` or ``(N, k)`` right-hand sides.
        shift: ``>= 0`` added to the diagonal (the ridge ``lambda``).
        tol: relative residual tolerance.
        maxiter: iteration cap (default ``max(1000, 2 N)``).
        preconditioner: ``'nystrom'`` (randomized rank-``rank`` Nystrom, one extra pass),
            ``'jacobi'`` (diagonal), ``None``, or a function ``M^{-1}(R)`` on ``(N, k)``.
        rank: sketch size of the Nystrom preconditioner.
        x0: initial guess (default zeros).
        get: which kernel of a store or record.
        seed: seed of the Nystrom sketch.
        callback: ``callback(iteration, relative_residuals)`` after each iteration.

    Returns:
        A :class:`CGResult` with ``x`` in float64.

    Examples:
        >>> import torch
        >>> g = torch.randn(50, 50, dtype=torch.float64)
        >>> a = g @ g.T / 50 + torch.eye(50, dtype=torch.float64)
        >>> b = torch.randn(50, 2, dtype=torch.float64)
        >>> res = cg_solve(a, b, tol=1e-10)
        >>> res.converged, bool(torch.allclose(a @ res.x, b, atol=1e-8))
        (True, True)
    """
    op = as_operator(a, get, "a", "cg_solve")
    n = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"cg_solve: a must be square, got shape {op.shape}.")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 0):
        raise ValueError(f"cg_solve: shift must be a finite number >= 0, got {shift!r}.")
    bm = _as_float64(b, "b", "cg_solve")
    vector = bm.ndim == 1
    if vector:
        bm = bm[:, None]
    if bm.ndim != 2 or bm.shape[0] != n:
        raise ValueError(f"cg_solve: b has shape {tuple(bm.shape)}; expected ({n},) or ({n}, k).")
    maxiter = max(1000, 2 * n) if maxiter is None else maxiter
    if isinstance(preconditioner, str):
        if preconditioner == "nystrom":
            minv = _nystrom(op, float(shift), rank, seed)
        elif preconditioner == "jacobi":
            minv = _jacobi(op, float(shift))
        else:
            raise ValueError(
                f"cg_solve: preconditioner must be 'nystrom', 'jacobi', None or a function, "
                f"got {preconditioner!r}."
            )
    elif preconditioner is None:
        minv = lambda r: r
    elif callable(preconditioner):
        minv = preconditioner
    else:
        raise TypeError("cg_solve: preconditioner must be a str, None or a function.")

    def matmat(v: np.ndarray) -> np.ndarray:
        out = op.matmat(v)
        return out + shift * v if shift else out

    x = np.zeros_like(bm) if x0 is None else _as_float64(x0, "x0", "cg_solve").reshape(bm.shape)
    r = bm - matmat(x) if x0 is not None else bm.copy()
    bnorm = np.linalg.norm(bm, axis=0)
    bnorm[bnorm == 0] = 1.0
    z = minv(r)
    p = z.copy()
    rz = np.einsum("ij,ij->j", r, z)
    rel = np.linalg.norm(r, axis=0) / bnorm
    it = 0
    while it < maxiter and np.any(rel > tol):
        ap = matmat(p)
        pap = np.einsum("ij,ij->j", p, ap)
        active = rel > tol
        if np.any(active & (pap <= 0)):
            raise ValueError(
                "cg_solve: the matrix (+ shift) is not positive definite (p^T A p <= 0); "
                "add a ridge (diag_reg / shift) or check the kernel."
            )
        alpha = np.where(active, rz / np.where(pap > 0, pap, 1.0), 0.0)
        x += alpha * p
        r -= alpha * ap
        z = minv(r)
        rz_new = np.einsum("ij,ij->j", r, z)
        beta = np.where(active, rz_new / np.where(rz != 0, rz, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
        rel = np.linalg.norm(r, axis=0) / bnorm
        it += 1
        if callback is not None:
            callback(it, rel.copy())
    xt = torch.from_numpy(x[:, 0] if vector else x)
    return CGResult(x=xt, iterations=it, converged=bool(np.all(rel <= tol)), residual=rel)


def _as_float64(y: Any, name: str, fn: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a tensor or numpy array, got {type(y).__name__}.")
    if y.dtype == object or np.iscomplexobj(y):
        raise TypeError(f"{fn}: {name} must be real numbers, got dtype {y.dtype}.")
    out = np.array(y, dtype=np.float64, order="C")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{fn}: {name} contains NaN or Inf.")
    return out


# ---------------------------------------------------------------- posterior
def _memory_budget() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except ImportError:  # pragma: no cover
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 2**18
        return int(pages * os.sysconf("SC_PAGE_SIZE") * 0.5)


def solve_posterior_mean(
    k_train_train: Any,
    y_train: Any,
    k_test_train: Any = None,
    get: str = "nngp",
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    *,
    method: str = "auto",
    tol: float = 1e-8,
    maxiter: int | None = None,
    preconditioner: str | None = "nystrom",
    rank: int = 100,
    memory_limit: int | None = None,
    return_info: bool = False,
) -> Any:
    r"""NNGP / NTK posterior mean from (possibly stored, larger-than-memory) kernels.

    ``mu = K(x, X) (K(X, X) + lambda I)^{-1} Y`` with ``lambda = diag_reg * mean(diag K(X, X))``
    (or ``diag_reg`` itself with ``diag_reg_absolute_scale``), the convention of
    :func:`infnets.predict.gp_inference`. ``get='nngp'`` gives the Bayesian posterior
    mean of the NNGP (Lee et al. 2018); ``get='ntk'`` the mean of infinitely wide
    networks trained to convergence on MSE (Lee et al. 2019, eq. 16; the NTK-GP mean
    of He et al. 2020 is the same). See the module docstring for the two solvers.

    Args:
        k_train_train: ``(N, N)`` train-train kernel: a kernel store path or
            :class:`~infnets.distributed.KernelStore` (its ``get`` array), a zarr or Dask
            array, a tensor / numpy array, or a record with ``.nngp``/``.ntk``.
        y_train: ``(N, *O)`` targets.
        k_test_train: ``(M, N)`` test-train kernel in any of the same forms (``None``:
            predict on the training inputs).
        get: ``'nngp'`` or ``'ntk'`` (which array of a store or record).
        diag_reg: ridge ``>= 0``, relative to the mean diagonal unless absolute.
        diag_reg_absolute_scale: ``diag_reg`` is absolute.
        method: ``'cholesky'`` (in memory), ``'cg'`` (tiled PCG) or ``'auto'`` (Cholesky
            when ``8 N^2`` bytes fit ``memory_limit``).
        tol: relative residual tolerance of CG.
        maxiter: CG iteration cap.
        preconditioner: CG preconditioner, ``'nystrom'``, ``'jacobi'`` or ``None``.
        rank: Nystrom sketch size.
        memory_limit: bytes available to Cholesky (default: half the free memory).
        return_info: also return a dict ``{'method', 'iterations', 'residual', 'ridge'}``.

    Returns:
        ``(M, *O)`` tensor of posterior means in the train kernel's dtype (float32 or
        float64), and the info dict when ``return_info``.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(64), stax.Relu(), stax.Dense(1))
        >>> x, xt = torch.randn(40, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> y = torch.sin(x[:, :1])
        >>> k, kt = net.kernel_fn(x, None, 'nngp'), net.kernel_fn(xt, x, 'nngp')
        >>> a = solve_posterior_mean(k, y, kt, diag_reg=1e-3, method='cg', tol=1e-12)
        >>> b = solve_posterior_mean(k, y, kt, diag_reg=1e-3, method='cholesky')
        >>> bool(torch.allclose(a, b, atol=1e-9))
        True
    """
    op = as_operator(k_train_train, get, "k_train_train")
    y, out_shape = _targets(y_train, op.shape[0])
    test_op = _test_operator(k_test_train, get, op.shape[0])
    opts = _SolveOptions(
        diag_reg, diag_reg_absolute_scale, method, tol, maxiter, preconditioner, rank, memory_limit
    )
    solver = _Solver(op, opts, "k_train_train" if get is None else f"k_train_train ({get})")
    alpha = solver.solve(y)
    mean = _finish((test_op or op).matmat(alpha), out_shape, op.dtype)
    return (mean, dict(solver.info)) if return_info else mean


@dataclasses.dataclass(frozen=True)
class _SolveOptions:
    """The solver arguments of :func:`solve_posterior_mean` and :func:`gp_inference`
    (``absolute`` is ``diag_reg_absolute_scale``); checked when a :class:`_Solver` uses them."""

    diag_reg: float
    absolute: bool
    method: str
    tol: float
    maxiter: int | None
    preconditioner: str | None
    rank: int
    memory_limit: int | None


class _Solver:
    """``(K + lambda I)^{-1} B`` for one train-train kernel: Cholesky (cached) or PCG."""

    def __init__(self, op: _Operator, opts: _SolveOptions, what: str) -> None:
        diag_reg, method, preconditioner = opts.diag_reg, opts.method, opts.preconditioner
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"{_FN}: {what} must be square, got shape {op.shape}.")
        if (
            isinstance(diag_reg, bool)
            or not isinstance(diag_reg, (int, float))
            or not (math.isfinite(diag_reg) and diag_reg >= 0)
        ):
            raise ValueError(f"{_FN}: diag_reg must be a finite number >= 0, got {diag_reg!r}.")
        if method not in ("auto", "cholesky", "cg"):
            raise ValueError(f"{_FN}: method must be 'auto', 'cholesky' or 'cg', got {method!r}.")
        n = op.shape[0]
        self.op, self.what, self.n = op, what, n
        self.scale = float(op.diagonal().mean())
        self.ridge = float(diag_reg) if opts.absolute else float(diag_reg) * self.scale
        if method == "auto":
            budget = _memory_budget() if opts.memory_limit is None else int(opts.memory_limit)
            method = "cholesky" if 8 * n * n <= budget else "cg"
        self.method = method
        self.tol, self.maxiter = opts.tol, opts.maxiter
        self.info: dict[str, Any] = {"method": method, "ridge": self.ridge, "iterations": 0}
        self._factor: Any = None
        self._minv: Any = None
        if method == "cholesky":
            mat = op.load()
            mat[np.diag_indices(n)] += self.ridge
            try:
                self._factor = scipy.linalg.cho_factor(
                    mat, lower=True, overwrite_a=True, check_finite=False
                )
            except np.linalg.LinAlgError:
                raise ValueError(
                    f"{_FN}: {what} + ridge ({self.ridge:.3g}) is not positive definite (mean "
                    f"diagonal {self.scale:.3g}); pass a larger diag_reg (e.g. 1e-6 relative)."
                ) from None
        elif preconditioner == "nystrom":
            self._minv = _nystrom(op, self.ridge, opts.rank, 0)
        elif preconditioner == "jacobi":
            self._minv = _jacobi(op, self.ridge)
        elif preconditioner is not None:
            raise ValueError(
                f"{_FN}: preconditioner must be 'nystrom', 'jacobi' or None, got "
                f"{preconditioner!r}."
            )

    def solve(self, b: np.ndarray) -> np.ndarray:
        """``(K + lambda I)^{-1} b`` for ``b`` of shape ``(N, k)``, float64."""
        if self._factor is not None:
            return scipy.linalg.cho_solve(self._factor, b, check_finite=False)
        res = cg_solve(
            self.op,
            b,
            shift=self.ridge,
            tol=self.tol,
            maxiter=self.maxiter,
            preconditioner=self._minv,
        )
        self.info["iterations"] += res.iterations
        self.info["residual"] = res.residual
        if not res.converged:
            warnings.warn(
                f"{_FN}: CG on {self.what} stopped after {res.iterations} iterations with "
                f"relative residual {float(res.residual.max()):.2e} > tol={self.tol:g}; raise "
                "maxiter or diag_reg.",
                stacklevel=3,
            )
        return res.x.numpy()


def _targets(y_train: Any, n: int) -> tuple[np.ndarray, tuple[int, ...]]:
    y = _as_float64(y_train, "y_train", _FN)
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(
            f"{_FN}: y_train has shape {y.shape}, but k_train_train has {n} training points."
        )
    return y.reshape(n, -1), tuple(y.shape[1:])


def _test_operator(k: Any, get: str, n: int, name: str = "k_test_train") -> _Operator | None:
    if k is None:
        return None
    op = as_operator(k, get, name)
    if op.shape[1] != n:
        raise ValueError(
            f"{_FN}: {name} has shape {op.shape}; its second axis must match the {n} "
            "training points."
        )
    return op


def _finish(m: np.ndarray, out_shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    out = torch.from_numpy(np.ascontiguousarray(m).reshape((m.shape[0],) + out_shape))
    return out.to(torch.float32 if dtype == np.float32 else torch.float64)


def is_stored_kernel(k: Any) -> bool:
    """Whether ``k`` is a kernel for the scale path: a store path, store, zarr or Dask array.

    Also true for a record (``Kernel``, named tuple) whose ``.nngp`` or ``.ntk`` is one.
    Never imports Dask or zarr (``infnets.predict`` can call it on every input).

    Examples:
        >>> is_stored_kernel('K.zarr'), is_stored_kernel(torch.eye(2))
        (True, False)
    """
    from infnets._src.scale.store import KernelStore

    if isinstance(k, (str, os.PathLike, KernelStore)):
        return True
    mod = type(k).__module__ or ""
    if mod.startswith(("dask", "zarr")):
        return True
    if isinstance(k, (torch.Tensor, np.ndarray)):
        return False
    return any(
        (type(v).__module__ or "").startswith(("dask", "zarr"))
        for v in (getattr(k, "nngp", None), getattr(k, "ntk", None))
        if v is not None
    )


def gp_inference(
    k_train_train: Any,
    y_train: Any,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Any = (-1,),
    *,
    jitter: Any = None,
    method: str = "auto",
    tol: float = 1e-8,
    maxiter: int | None = None,
    preconditioner: str | None = "nystrom",
    rank: int = 100,
    memory_limit: int | None = None,
) -> Callable[..., Any]:
    r"""Posterior of infinitely wide networks from stored kernels, like ``predict.gp_inference``.

    The same means and covariances as :func:`infnets.predict.gp_inference` (same
    ``get`` names, same ``diag_reg`` convention), for kernels given as store paths,
    :class:`~infnets.distributed.KernelStore`, zarr or Dask arrays (or in memory):
    every solve with a train-train kernel goes through a cached Cholesky factor or
    PCG (see the module docstring), and products with test-train kernels are tiled.

    * ``'nngp'``: ``mu = K(x, X) K_r^{-1} Y``, ``Sigma = K(x, x) - K(x, X) K_r^{-1} K(X, x)``;
    * ``'ntk'``: ``mu = Th(x, X) Th_r^{-1} Y``; with ``A = Th(x, X) Th_r^{-1}``,
      ``Sigma = K(x, x) - A K(X, x) - K(x, X) A^T + A K_r A^T`` (Lee et al. 2019, eq. 16);
    * ``'ntkgp'``: the NTK mean with ``Sigma = Th(x, x) - Th(x, X) Th_r^{-1} Th(X, x)``.

    Covariances solve with ``M`` right-hand sides and hold ``(N, M)`` arrays in memory.

    Args:
        k_train_train: ``(N, N)`` train-train kernel(s): a store path or ``KernelStore``
            (``'nngp'``/``'ntk'`` arrays chosen by ``get``), a record with ``.nngp``/
            ``.ntk`` (e.g. the named tuple of :func:`~infnets.distributed.kernel_matrix`),
            or one zarr / Dask / numpy / torch matrix used for every ``get``.
        y_train: ``(N, *O)`` targets.
        diag_reg: ridge ``>= 0`` (relative to each kernel's mean diagonal unless absolute).
        diag_reg_absolute_scale: ``diag_reg`` is absolute.
        trace_axes: as in ``predict.gp_inference``; here the kernels must act as the
            identity on every output axis (the default for ``(N, k)`` targets).
        jitter: only ``None`` (automatic jitter needs repeated factorizations).
        method, tol, maxiter, preconditioner, rank, memory_limit: as in
            :func:`solve_posterior_mean`.

    Returns:
        ``predict_fn(get, k_test_train=None, k_test_test=None)`` returning the ``(M, *O)``
        mean, or ``Gaussian(mean, covariance)`` with ``k_test_test``; a named tuple for a
        tuple ``get``. Test kernels may be given in any of the forms above.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(64), stax.Relu(), stax.Dense(1))
        >>> x, xt = torch.randn(30, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
        >>> k, kt = net.kernel_fn(x, None, ('nngp', 'ntk')), net.kernel_fn(xt, x, ('nngp', 'ntk'))
        >>> kxx = net.kernel_fn(xt, None, ('nngp', 'ntk'))
        >>> predict_fn = gp_inference(k, torch.sin(x[:, :1]), diag_reg=1e-3, method='cg')
        >>> mean, cov = predict_fn('ntk', kt, kxx)
        >>> mean.shape, cov.shape
        (torch.Size([4, 1]), torch.Size([4, 4]))
    """
    from infnets._src.scale.store import KernelStore

    shared = not (
        isinstance(k_train_train, (str, os.PathLike, KernelStore))
        or (hasattr(k_train_train, "nngp") or hasattr(k_train_train, "ntk"))
    )
    opts = _SolveOptions(
        diag_reg, diag_reg_absolute_scale, method, tol, maxiter, preconditioner, rank, memory_limit
    )
    ops: dict[str, _Operator] = {}
    solvers: dict[str, _Solver] = {}

    def train_op(name: str) -> _Operator:
        key = "shared" if shared else name
        if key not in ops:
            ops[key] = as_operator(k_train_train, name, "k_train_train")
        return ops[key]

    n = train_op("nngp" if shared else _first_field(k_train_train)).shape[0]
    y, out_shape = _targets(y_train, n)
    if jitter is not None:
        raise NotImplementedError(
            f"{_FN}: jitter={jitter!r} is not available for stored kernels; pass diag_reg."
        )
    n_out = len(out_shape)
    traced = {int(a) % (n_out + 1) for a in trace_axes} if n_out else set()
    if n_out and traced != set(range(1, n_out + 1)):
        raise NotImplementedError(
            f"{_FN}: stored kernels act as the identity on every output axis; trace_axes="
            f"{tuple(trace_axes)} leaves some of the {n_out} output axes of y_train untraced."
        )

    def solver(name: str) -> _Solver:
        key = "shared" if shared else name
        if key not in solvers:
            what = "k_train_train" if shared else f"k_train_train.{name}"
            solvers[key] = _Solver(train_op(name), opts, what)
        return solvers[key]

    alphas: dict[str, np.ndarray] = {}

    def alpha(name: str) -> np.ndarray:
        key = "shared" if shared else name
        if key not in alphas:
            alphas[key] = solver(name).solve(y)
        return alphas[key]

    def predict_fn(get: Any, k_test_train: Any = None, k_test_test: Any = None) -> Any:
        names = (get,) if isinstance(get, str) else tuple(get)
        if not names or any(g not in ("nngp", "ntk", "ntkgp") for g in names):
            raise ValueError(f"{_FN}: get must be 'nngp', 'ntk', 'ntkgp' or a tuple, got {get!r}.")
        if k_test_test is not None and k_test_train is None:
            raise ValueError(
                f"{_FN}: k_test_test was given without k_test_train; pass both for test "
                "covariances (k_test_train=k_train_train for the train set)."
            )
        dtype = train_op(_first_field(k_train_train) if not shared else "nngp").dtype
        results: dict[str, Any] = {}
        for g in names:
            kname = "nngp" if g == "nngp" else "ntk"
            kx = _test_operator(k_test_train, kname, n) or train_op(kname)
            mean = _finish(kx.matmat(alpha(kname)), out_shape, dtype)
            if k_test_test is None:
                results[g] = mean
                continue
            kx_dense_t = np.ascontiguousarray(kx.load().T)  # (N, M)
            if g in ("nngp", "ntkgp"):
                kxx = as_operator(k_test_test, kname, "k_test_test").load()
                cov = kxx - kx_dense_t.T @ solver(kname).solve(kx_dense_t)
            else:
                kx_nngp = _test_operator(k_test_train, "nngp", n) or train_op("nngp")
                kxx = as_operator(k_test_test, "nngp", "k_test_test").load()
                k_nngp_t = np.ascontiguousarray(kx_nngp.load().T)  # K(X, x), (N, M)
                a_t = solver("ntk").solve(kx_dense_t)  # Th_r^{-1} Th(X, x) = A^T
                cross = a_t.T @ k_nngp_t  # A K(X, x)
                nngp_solver = solver("nngp")
                k_r_a_t = train_op("nngp").matmat(a_t) + nngp_solver.ridge * a_t
                cov = kxx - cross - cross.T + a_t.T @ k_r_a_t
            cov = 0.5 * (cov + cov.T)
            results[g] = _gaussian(mean, torch.from_numpy(cov).to(mean.dtype))
        if isinstance(get, str):
            return results[get]
        return _predictions_type(names)(*(results[g] for g in names))

    return predict_fn


def _first_field(k: Any) -> str:
    from infnets._src.scale.store import KernelStore

    if isinstance(k, (str, os.PathLike)):
        k = KernelStore(k)
    if isinstance(k, KernelStore):
        return k.names[0]
    return "nngp" if getattr(k, "nngp", None) is not None else "ntk"


def _predictions_type(names: tuple[str, ...]) -> Any:
    try:
        from infnets._src.predict.common import predictions_type
    except ImportError:  # pragma: no cover - predict is part of infnets
        from infnets._src.core.inputs import kernel_tuple_type

        return kernel_tuple_type(names)
    return predictions_type(names)


def _gaussian(mean: torch.Tensor, cov: torch.Tensor) -> Any:
    try:
        from infnets._src.predict.common import Gaussian as PredictGaussian
    except ImportError:  # pragma: no cover - predict is part of infnets
        import collections

        Gaussian = collections.namedtuple("Gaussian", ["mean", "covariance"])  # noqa: N806
        return Gaussian(mean, cov)
    return PredictGaussian(mean, cov)
