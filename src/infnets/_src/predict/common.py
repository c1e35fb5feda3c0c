"""Shared machinery of :mod:`infnets.predict`: input checks, layouts, factorizations.

The rules every predictor follows, stated once:

* **Precision.** Every solve, factorization and matrix exponential runs in
  ``float64`` on the kernels' device, whatever the kernels' dtype; results are
  cast back to the dtype of the train-train kernel (a ``float32`` pipeline stays
  ``float32`` and loses only the final rounding).
* **Devices.** Results live on the kernels' device. Targets given as numpy
  arrays are moved there; tensors on another device are refused.
* **Outputs.** Targets have shape ``(N, *O)``; the kernels act as ``K (x) I`` on
  the output axes ``O`` (one-hot classes share one kernel). They are flattened to
  an ``(N, k)`` matrix for the linear algebra and restored on the way out.
* **Conditioning.** A train-train kernel that is not numerically positive
  definite raises a ``ValueError`` giving its smallest eigenvalue and the
  ``diag_reg`` that would fix it, unless ``jitter='auto'`` asks to add the
  smallest working jitter (reported with ``warnings.warn``).
"""

from __future__ import annotations

import collections
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

Jitter = Literal["auto"] | None

#: dtype of every solve and factorization
SOLVE_DTYPE = torch.float64

#: jitter ladder for ``jitter='auto'``, relative to the mean diagonal
_JITTER_LEVELS = tuple(10.0**e for e in range(-10, -1))


class Gaussian(NamedTuple):
    """Mean and covariance of a Gaussian prediction.

    Attributes:
        mean: ``(..., M, *O)`` predicted means (leading time axis when asked).
        covariance: ``(..., M, M)`` covariance over the test points, shared by every
            output unit (the kernel acts as ``K (x) I`` on the outputs).
    """

    mean: Tensor
    covariance: Tensor


@functools.cache
def predictions_type(names: tuple[str, ...]) -> Callable[..., tuple[Any, ...]]:
    """Named tuple type ``Predictions(name0, name1, ...)`` for a tuple ``get``."""
    return collections.namedtuple("Predictions", names)


# ---------------------------------------------------------------- scalar checks
def check_nonneg(value: Any, name: str, fn: str) -> float:
    """A finite float ``>= 0`` (``diag_reg`` and friends)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a scalar, got shape {tuple(value.shape)}.")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value}.")
    return value


def check_positive(value: Any, name: str, fn: str) -> float:
    """A finite float ``> 0`` (learning rates)."""
    value = check_nonneg(value, name, fn)
    if value == 0:
        raise ValueError(f"{fn}: {name} must be > 0, got 0.")
    return value


def check_momentum(momentum: Any, fn: str) -> float:
    """A heavy-ball momentum in ``[0, 1)``."""
    value = check_nonneg(momentum, "momentum", fn)
    if value >= 1:
        raise ValueError(
            f"{fn}: momentum must be in [0, 1) (1 never damps the velocity), got {value}."
        )
    return value


# ---------------------------------------------------------------- tensors
def as_matrix_input(x: Any, name: str, fn: str) -> Tensor:
    """A float kernel tensor (numpy converted), checked finite and non-empty."""
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{fn}: {name} is an object array; pass a float array.")
        x = torch.as_tensor(x)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor, numpy.ndarray or a kernel record with "
            f".nngp/.ntk attributes (infnets.Kernel, a named tuple); got {type(x).__name__}."
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{fn}: {name} has dtype {x.dtype}; kernels must be float32 or float64 "
            f"(convert with {name}.double())."
        )
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(x.shape)}).")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{fn}: {name} contains NaN or Inf; recompute the kernel (check its inputs "
            "for NaN) before predicting."
        )
    return x


def as_targets(y: Any, name: str, fn: str, device: torch.device, keep_int: bool = False) -> Tensor:
    """Targets as a tensor on ``device``: float64 (or integer labels when ``keep_int``).

    Integer and boolean targets (e.g. one-hot labels) are cast to float64 unless
    ``keep_int``; complex and object targets are refused; NaN/Inf raise.
    """
    if isinstance(y, np.ndarray):
        if y.dtype == object:
            raise TypeError(f"{fn}: {name} is an object array; pass a numeric array.")
        y = torch.as_tensor(y).to(device)
    elif isinstance(y, Tensor):
        if y.device != device:
            raise ValueError(
                f"{fn}: {name} is on {y.device} but the kernels are on {device}; "
                f"move it with {name}.to({str(device)!r})."
            )
    else:
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor or numpy.ndarray, got {type(y).__name__}."
        )
    if y.is_complex():
        raise TypeError(f"{fn}: {name} is complex; pass real targets.")
    if y.ndim == 0:
        raise ValueError(
            f"{fn}: {name} is a scalar; pass one target per training example, shape (N, ...)."
        )
    if y.dtype.is_floating_point:
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{fn}: {name} contains NaN or Inf; clean or impute the targets.")
        return y.to(SOLVE_DTYPE)
    if keep_int:
        return y
    return y.to(SOLVE_DTYPE)


def as_initial_outputs(
    f0: Any, name: str, fn: str, shape: tuple[int, ...], device: torch.device
) -> Tensor:
    """Initial outputs broadcast to ``shape`` (float64); a number means a constant."""
    if f0 is None:
        f0 = 0.0
    if isinstance(f0, (int, float, np.floating, np.integer)) and not isinstance(f0, bool):
        value = float(f0)
        if not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be finite, got {value}.")
        return torch.full(shape, value, dtype=SOLVE_DTYPE, device=device)
    t = as_targets(f0, name, fn, device)
    try:
        return torch.broadcast_to(t, shape).to(SOLVE_DTYPE)
    except RuntimeError:
        raise ValueError(
            f"{fn}: {name} has shape {tuple(t.shape)}, which does not broadcast to the "
            f"outputs' shape {shape}."
        ) from None


def check_kernel_shape(k: Tensor, expected: tuple[int, ...], name: str, fn: str, hint: str) -> None:
    """Raise a ``ValueError`` naming ``name`` when ``k.shape != expected``."""
    if tuple(k.shape) != expected:
        raise ValueError(f"{fn}: {name} has shape {tuple(k.shape)}, expected {expected} ({hint}).")


def pick(kernel: Any, name: str, arg: str, fn: str, device: torch.device | None = None) -> Tensor:
    """The ``name`` field (``'nngp'`` or ``'ntk'``) of a kernel argument.

    A plain tensor (or array) is returned for every ``name``; a record (an
    :class:`infnets.Kernel`, a named tuple, any object with ``.nngp``/``.ntk``)
    gives its attribute, which must not be ``None``. Arrays are moved to
    ``device``; tensors on another device are refused.
    """
    value = maybe_pick(kernel, name, arg, fn, device)
    if value is None:
        raise ValueError(
            f"{fn}: {arg}.{name} is missing (None); compute the kernel with get including "
            f"{name!r} (e.g. kernel_fn(x1, x2, get=('nngp', 'ntk')))."
        )
    return value


def maybe_pick(
    kernel: Any, name: str, arg: str, fn: str, device: torch.device | None = None
) -> Tensor | None:
    """Like :func:`pick` but ``None`` when a record lacks the field or it is ``None``."""
    value: Tensor | np.ndarray | None
    if isinstance(kernel, (Tensor, np.ndarray)):
        value, label = kernel, arg
    elif hasattr(kernel, "nngp") or hasattr(kernel, "ntk"):
        if getattr(kernel, "is_packed", False):
            kernel = kernel.to_dense()
        value, label = getattr(kernel, name, None), f"{arg}.{name}"
        if value is None:
            return None
    else:
        raise TypeError(
            f"{fn}: {arg} must be a torch.Tensor, numpy.ndarray or a kernel record with "
            f".nngp/.ntk attributes (infnets.Kernel, a named tuple); got {type(kernel).__name__}."
        )
    was_array = isinstance(value, np.ndarray)
    value = as_matrix_input(value, label, fn)
    if device is not None and value.device != device:
        if not was_array:
            raise ValueError(
                f"{fn}: {label} is on {value.device} but the train kernel is on {device}; "
                f"move it with .to({str(device)!r})."
            )
        value = value.to(device)
    return value


def pick_test_train_ntk(k_test_train: Any, n: int, fn: str, device: torch.device) -> Tensor:
    """The ``(M, N)`` test-train NTK of a tensor or a record (its ``.ntk``), on ``device``."""
    kx = pick(k_test_train, "ntk", "k_test_train", fn, device)
    if kx.ndim != 2 or kx.shape[1] != n:
        raise ValueError(
            f"{fn}: k_test_train has shape {tuple(kx.shape)}; expected (M, {n}) "
            "(test points by training points)."
        )
    return kx


def field_key(kernel: Any, name: str) -> str:
    """Cache key of a kernel field: plain tensors serve every name with one matrix."""
    return "tensor" if isinstance(kernel, (Tensor, np.ndarray)) else name


def parse_get(get: Any, allowed: tuple[str, ...], fn: str) -> tuple[tuple[str, ...], bool]:
    """``(names, is_tuple)`` for a ``get`` given as a str or a sequence of str."""
    if isinstance(get, str):
        names: tuple[str, ...] = (get,)
        is_tuple = False
    elif isinstance(get, Sequence):
        names, is_tuple = tuple(get), True
    else:
        raise TypeError(f"{fn}: get must be a str or a tuple of str from {allowed}, got {get!r}.")
    if not names:
        raise ValueError(f"{fn}: get must name at least one of {allowed}.")
    for n in names:
        if n not in allowed:
            raise ValueError(f"{fn}: get: unknown name {n!r}; choose from {allowed}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: get {names} contains duplicates.")
    return names, is_tuple


def pack_results(names: tuple[str, ...], is_tuple: bool, results: dict[str, Any]) -> Any:
    """One result, or a ``Predictions`` named tuple for a tuple ``get``."""
    if not is_tuple:
        return results[names[0]]
    return predictions_type(names)(*(results[n] for n in names))


# ---------------------------------------------------------------- times
def parse_times(t: Any, fn: str, allow_inf: bool = True) -> tuple[Tensor, bool]:
    """Times as a 1-D float64 CPU tensor and whether the caller asked for a time axis.

    ``None`` means ``inf`` (convergence) when ``allow_inf``. Scalars give no time
    axis; 1-D tensors, arrays and lists give a leading one.
    """
    if t is None:
        if not allow_inf:
            raise ValueError(f"{fn}: t is required (a time >= 0 or a 1-D tensor of times).")
        return torch.tensor([math.inf], dtype=SOLVE_DTYPE), False
    if isinstance(t, bool):
        raise TypeError(f"{fn}: t must be a number or a 1-D tensor of times, got a bool.")
    if isinstance(t, (int, float, np.floating, np.integer)):
        times, axis = torch.tensor([float(t)], dtype=SOLVE_DTYPE), False
    elif isinstance(t, (Tensor, np.ndarray, list, tuple)):
        arr = torch.as_tensor(
            t.detach().cpu() if isinstance(t, Tensor) else np.asarray(t, dtype=np.float64)
        )
        if arr.is_complex() or arr.dtype == torch.bool:
            raise TypeError(f"{fn}: t must be real times, got dtype {arr.dtype}.")
        if arr.ndim > 1:
            raise ValueError(f"{fn}: t must be a scalar or 1-D, got shape {tuple(arr.shape)}.")
        axis = arr.ndim == 1
        times = arr.reshape(-1).to(SOLVE_DTYPE)
        if times.numel() == 0:
            raise ValueError(f"{fn}: t is empty; pass at least one time.")
    else:
        raise TypeError(
            f"{fn}: t must be a number or a 1-D tensor of times, got {type(t).__name__}."
        )
    if bool(torch.isnan(times).any()):
        raise ValueError(f"{fn}: t contains NaN.")
    if bool((times < 0).any()):
        raise ValueError(
            f"{fn}: t must be >= 0 (time since initialisation, in steps), got "
            f"{times[times < 0][0].item()}."
        )
    if not allow_inf and bool(torch.isinf(times).any()):
        raise ValueError(
            f"{fn}: t must be finite here (this dynamics need not converge); pass finite times."
        )
    return times, axis


# ---------------------------------------------------------------- conditioning
def regularization(k: Tensor, diag_reg: float, absolute: bool) -> tuple[float, float]:
    """``(lambda, scale)``: the absolute ridge and the kernel's mean diagonal."""
    scale = float(torch.diagonal(k).mean())
    return (diag_reg if absolute else diag_reg * scale), scale


def not_pd_error(
    fn: str, what: str, w_min: float, scale: float, reg: float, tol: float
) -> ValueError:
    """The error for a kernel that is not numerically positive definite.

    The suggested ``diag_reg`` lifts the smallest eigenvalue well above round-off:
    ``10 max(-w_min, tol)``, and at least ``1e-8`` of the mean diagonal (a ridge
    that keeps the condition number below about ``1e8``).
    """
    needed = max(10 * max(-w_min, tol), 1e-8 * max(scale, 0.0))
    total = reg + needed
    rel = total / scale if scale > 0 else math.inf
    return ValueError(
        f"{fn}: {what} + diag_reg * I is not positive definite (smallest eigenvalue "
        f"{w_min:.3g}, mean diagonal {scale:.3g}); duplicated or nearly collinear training "
        f"points, or fewer features than points, cause this. Pass diag_reg={rel:.1e} or larger "
        f"(relative to the mean diagonal; diag_reg={total:.1e} with "
        "diag_reg_absolute_scale=True), or jitter='auto' to add the smallest jitter that works."
    )


def _jitter_warning(fn: str, what: str, added: float, scale: float) -> None:
    warnings.warn(
        f"{fn}: {what} was not positive definite; jitter='auto' added {added:.3g} "
        f"({added / scale if scale > 0 else math.inf:.1e} x the mean diagonal) to its diagonal.",
        stacklevel=4,
    )


def cholesky(
    k_reg: Tensor, fn: str, what: str, scale: float, reg: float, jitter: Jitter
) -> tuple[Tensor, float]:
    """Lower Cholesky factor of the (float64) regularized kernel, with optional jitter.

    Returns:
        ``(L, added)``: the factor and the jitter added (0 when none was needed).
    """
    chol, info = torch.linalg.cholesky_ex(k_reg)
    if int(info) == 0:
        return chol, 0.0
    if jitter == "auto":
        eye = torch.eye(k_reg.shape[0], dtype=k_reg.dtype, device=k_reg.device)
        base = scale if scale > 0 else 1.0
        for level in _JITTER_LEVELS:
            chol, info = torch.linalg.cholesky_ex(k_reg + level * base * eye)
            if int(info) == 0:
                _jitter_warning(fn, what, level * base, scale)
                return chol, level * base
    w = torch.linalg.eigvalsh(k_reg)
    tol = k_reg.shape[0] * torch.finfo(SOLVE_DTYPE).eps * float(w.abs().max())
    raise not_pd_error(fn, what, float(w[0]), scale, reg, tol)


class Eig(NamedTuple):
    """Eigendecomposition ``K + lambda I = V diag(w_reg) V^T`` of a train-train kernel."""

    w: Tensor  # (N,) eigenvalues of the unregularized kernel
    w_reg: Tensor  # (N,) eigenvalues with the ridge (and any jitter) added
    v: Tensor  # (N, N) orthonormal eigenvectors (columns)
    singular: bool  # True when the smallest w_reg is not safely > 0
    w_min: float  # smallest eigenvalue of the regularized kernel
    scale: float  # mean diagonal
    reg: float  # absolute ridge added
    tol: float  # round-off threshold on eigenvalues


def symmetric_eigh(k: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, by LAPACK's divide-and-conquer ``syevd`` through SciPy on CPU.

    On CPU, SciPy's LAPACK (OpenBLAS) runs ``syevd`` 2-2.5x faster than torch's
    MKL build on AMD processors (measured: 1.7 s against 4.1 s for a 2500 x 2500
    float64 matrix on 2 cores); other devices use torch. Same contract: ascending
    eigenvalues, orthonormal eigenvectors in the columns, ``k``'s dtype and device.
    """
    if k.device.type != "cpu" or k.requires_grad or k.dtype not in (torch.float32, torch.float64):
        return torch.linalg.eigh(k)
    import scipy.linalg

    w, v = scipy.linalg.eigh(k.numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(w), torch.from_numpy(v)


def eigh(k64: Tensor, fn: str, what: str, diag_reg: float, absolute: bool, jitter: Jitter) -> Eig:
    """Eigendecomposition of a float64 symmetric kernel with its ridge.

    A kernel whose regularized eigenvalues go below ``-tol`` (``tol = N eps
    max|w|``) is indefinite: it raises (or gets jitter). One whose smallest
    eigenvalue lies in ``[-tol, tol]`` is singular: finite-time predictions are
    still exact (eigenvalues are clipped at 0), but ``t = inf`` raises.
    """
    reg, scale = regularization(k64, diag_reg, absolute)
    w, v = symmetric_eigh(k64)
    n = k64.shape[0]
    w_reg = w + reg
    tol = n * torch.finfo(SOLVE_DTYPE).eps * float(w.abs().max())
    w_min = float(w_reg[0])
    singular = w_min <= tol
    if singular and jitter == "auto":
        base = scale if scale > 0 else 1.0
        for level in _JITTER_LEVELS:
            if w_min + level * base > tol:
                _jitter_warning(fn, what, level * base, scale)
                w_reg = w_reg + level * base
                reg = reg + level * base
                singular = False
                w_min = float(w_reg[0])
                break
    if singular and w_min < -tol:
        raise not_pd_error(fn, what, w_min, scale, reg, tol)
    return Eig(w, w_reg, v, singular, w_min, scale, reg, tol)


def require_converged(eig: Eig, fn: str, what: str) -> None:
    """Raise when ``t = inf`` is asked of a singular kernel."""
    if eig.singular:
        raise not_pd_error(fn, what, eig.w_min, eig.scale, eig.reg, eig.tol)


def decay_integral(w_reg: Tensor, times: Tensor, rate: float) -> Tensor:
    """``phi[t, i] = (1 - exp(-rate w_i t)) / w_i`` (``rate t`` at ``w_i = 0``, ``1/w_i`` at inf).

    Args:
        w_reg: ``(N,)`` eigenvalues (clipped at 0 here).
        times: ``(T,)`` times on any device.
        rate: the learning rate (or twice it for the NNGP variance).

    Returns:
        ``(T, N)`` float64 tensor on ``w_reg``'s device.
    """
    w = w_reg.clamp_min(0.0)
    t = times.to(device=w.device, dtype=w.dtype)[:, None]
    positive = w > 0
    w_safe = torch.where(positive, w, torch.ones_like(w))
    x = rate * w_safe[None, :] * t
    phi = -torch.expm1(-x) / w_safe
    # w = 0: the limit rate * t (inf for t = inf, excluded by require_converged)
    return torch.where(positive[None, :], phi, rate * t.expand_as(phi))


def discrete_decay_sum(w_reg: Tensor, times: Tensor, rate: float, power: float = 1.0) -> Tensor:
    """``phi[t, i] = (1 - (1 - rate w_i)^(power t)) / w_i``, discrete :func:`decay_integral`.

    ``t`` steps of gradient descent ``r <- (1 - rate w) r`` on one eigen-direction leave
    ``(1 - rate w)^t`` of the residual; ``rate sum_{j<t} (1 - rate w)^j`` is ``phi`` with
    ``power = 1``. ``power = 2`` gives the NNGP variance factor ``(1 - (1 - rate w)^{2t}) / w``.
    At ``w_i = 0`` it is ``power rate t``; ``t = inf`` needs ``|1 - rate w| < 1``
    (see :func:`require_stable_steps`).

    Args:
        w_reg: ``(N,)`` eigenvalues (clipped at 0 here).
        times: ``(T,)`` integer step counts (or ``inf``).
        rate: the learning rate.
        power: the exponent's factor (1, or 2 for the NNGP covariance).

    Returns:
        ``(T, N)`` float64 tensor on ``w_reg``'s device.
    """
    w = w_reg.clamp_min(0.0)
    t = times.to(device=w.device, dtype=w.dtype)[:, None] * power
    positive = w > 0
    w_safe = torch.where(positive, w, torch.ones_like(w))
    a = (rate * w_safe)[None, :].expand(t.shape[0], -1)
    small = a < 1
    # 1 - (1 - a)^t: by expm1/log1p where the base is positive (accurate for small a t)
    accurate = -torch.expm1(t * torch.log1p(-torch.where(small, a, torch.zeros_like(a))))
    general = 1 - torch.pow(1 - a, t.expand_as(a))
    phi = torch.where(small, accurate, general) / w_safe
    return torch.where(positive[None, :], phi, power * rate * t.expand_as(phi))


def check_step_times(times: Tensor, fn: str) -> None:
    """Discrete times must be whole numbers of steps (or ``inf``)."""
    finite = times[torch.isfinite(times)]
    if bool((finite != torch.floor(finite)).any()):
        bad = finite[finite != torch.floor(finite)][0].item()
        raise ValueError(
            f"{fn}: with discrete=True, t counts gradient-descent steps and must be whole "
            f"numbers (or inf), got {bad}."
        )


def require_stable_steps(eig: Eig, rate: float, fn: str, what: str) -> None:
    """Raise when ``t = inf`` steps are asked with a learning rate at or above ``2 / w_max``."""
    w_max = float(eig.w_reg.max())
    if rate * w_max >= 2:
        raise ValueError(
            f"{fn}: gradient descent with learning_rate={rate:.4g} diverges on {what} "
            f"(largest eigenvalue {w_max:.4g}: |1 - lr w| >= 1), so t=inf has no limit; use "
            f"learning_rate < {2 / w_max:.4g} (predict.max_learning_rate) or finite t."
        )


def decay(w_reg: Tensor, times: Tensor, rate: float, discrete: bool, power: float = 1.0) -> Tensor:
    """:func:`decay_integral` (gradient flow) or :func:`discrete_decay_sum` (gradient descent)."""
    if discrete:
        return discrete_decay_sum(w_reg, times, rate, power)
    return decay_integral(w_reg, times, power * rate)


def symmetrize(c: Tensor) -> Tensor:
    """``(C + C^T) / 2`` over the last two axes."""
    return 0.5 * (c + c.transpose(-1, -2))


def check_finite_result(x: Tensor, fn: str, what: str) -> Tensor:
    """Refuse to return NaN/Inf (a last guard against round-off blow-ups)."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"{fn}: the {what} contains NaN or Inf (the train-train kernel is too ill-"
            "conditioned for float64); increase diag_reg."
        )
    return x


class IdentityCache:
    """A one-entry cache keyed on a tensor's identity and in-place version counter.

    Holding a reference keeps ``id`` from being reused; ``_version`` changes on
    in-place modification, which invalidates the entry.
    """

    def __init__(self) -> None:
        self._key: Any = None
        self._ref: Any = None
        self.value: dict[str, Any] = {}

    def lookup(self, obj: Any) -> dict[str, Any]:
        """The value dict for ``obj`` (a fresh empty one when ``obj`` changed)."""
        key = (id(obj), getattr(obj, "_version", None))
        if self._ref is not obj or self._key != key:
            self._key, self._ref, self.value = key, obj, {}
        return self.value


def add_time_axis(x: Tensor, has_axis: bool) -> Tensor:
    """Drop the leading length-1 time axis when the caller gave a scalar time."""
    return x if has_axis else x[0]
