"""Validation and conversion of user inputs shared by every public entry point.

The rules, stated once:

* inputs are ``torch.Tensor`` or ``numpy.ndarray`` (numpy is converted with
  ``torch.as_tensor``, so a float64 array stays float64);
* kernels are computed in ``float32`` or ``float64``: integer, boolean, complex
  and half-precision inputs are refused (convert with ``x.double()``);
* inputs must be finite (no NaN/Inf), non-empty, and ``x1``/``x2`` must agree in
  dtype, device and every axis but the batch axis.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

GET_NAMES: tuple[str, ...] = ("nngp", "ntk", "cov1", "cov2")
FLOAT_DTYPES = (torch.float32, torch.float64)


def as_tensor(x: Any, name: str) -> Tensor:
    """Convert ``x`` to a floating tensor, checking dtype and finiteness.

    Args:
        x: a tensor or array.
        name: the argument's name, used in error messages.

    Returns:
        ``x`` as a ``torch.Tensor`` (no copy when it already is one).
    """
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: object arrays are not supported; pass a float array.")
        x = torch.as_tensor(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; kernels are computed in float32 or float64. "
            f"Convert it first, e.g. {name}.double() (integer, bool, complex and half "
            "precision inputs are refused rather than silently cast)."
        )
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}); pass at least one example with at "
            "least one feature."
        )
    if _is_vmapped(x):
        raise TypeError(
            f"{name} is batched by torch.func.vmap; kernel functions are already batched over "
            "examples and validate their inputs (data-dependent checks vmap cannot trace): "
            "stack the examples along axis 0 and make one call instead of vmapping over them "
            "(grad and jacrev are supported)."
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; clean or impute the data first.")
    return x


def _is_vmapped(x: Tensor) -> bool:
    """Whether ``x`` is a ``torch.func.vmap`` batched tensor (at any level)."""
    try:
        from torch._C._functorch import is_batchedtensor
    except ImportError:  # pragma: no cover - older torch without functorch bindings
        return False
    return bool(is_batchedtensor(x))


def check_pair(x1: Any, x2: Any, min_rank: int = 2) -> tuple[Tensor, Tensor | None]:
    """Convert and cross-check ``x1`` and ``x2`` (``x2`` may be ``None``)."""
    x1 = as_tensor(x1, "x1")
    if x1.ndim < min_rank:
        raise ValueError(
            f"x1 must have rank >= {min_rank} (batch first, e.g. (N, features)); "
            f"got shape {tuple(x1.shape)}. Use x1.reshape(N, -1) or x1[None]."
        )
    if x2 is None:
        return x1, None
    x2 = as_tensor(x2, "x2")
    if x2.ndim != x1.ndim or x2.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"x1 and x2 must agree in every axis but the batch axis: x1 has shape "
            f"{tuple(x1.shape)}, x2 has shape {tuple(x2.shape)}."
        )
    if x2.dtype != x1.dtype:
        raise TypeError(
            f"x1 has dtype {x1.dtype} but x2 has dtype {x2.dtype}; convert both to one dtype."
        )
    if x2.device != x1.device:
        raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}; move both to one device.")
    return x1, x2


def parse_get(get: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate ``get`` and return the tuple of names it asks for."""
    if get is None:
        return ("nngp", "ntk")
    if isinstance(get, str):
        names: tuple = (get,)
    else:
        try:
            names = tuple(get)
        except TypeError:
            raise TypeError(
                f"get must be None, a name or a tuple of names from {GET_NAMES}; got {get!r}."
            ) from None
    if not names:
        raise ValueError(f"get must name at least one of {GET_NAMES}; got an empty sequence.")
    for n in names:
        if not isinstance(n, str) or n not in GET_NAMES:
            raise ValueError(f"get: unknown name {n!r}; choose from {GET_NAMES}.")
    if len(set(names)) != len(names):
        raise ValueError(f"get names {names} contain duplicates.")
    return names


@functools.cache
def kernel_tuple_type(names: tuple[str, ...]) -> Callable[..., tuple[Any, ...]]:
    """Named tuple type ``Kernels(name0, name1, ...)`` for a tuple ``get``."""
    return collections.namedtuple("Kernels", names)


def check_std(
    value: float | Tensor | None, name: str, allow_none: bool = False
) -> float | Tensor | None:
    """Check a standard deviation hyper-parameter is a finite number >= 0.

    A scalar tensor is returned as it is (kept as a tensor for autograd). Within
    :func:`hyper_batch` ``(G)`` a ``(G,)`` tensor is accepted too (one value per entry of
    the kernel records' trailing hyper-parameter axis).
    """
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number >= 0, got None.")
    if isinstance(value, Tensor):
        size = getattr(_HYPER_BATCH, "size", None)
        if size is not None and value.shape == (size,):
            bad = value.detach()
            if not bool(torch.isfinite(bad).all()) or bool((bad < 0).any()):
                raise ValueError(f"{name} must be finite and >= 0, got {bad.tolist()}.")
            return value
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}.")
        v = float(value.detach())
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}.")
        return value  # kept as a tensor for autograd
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}.")
    return float(value)


def check_int(value: int | np.integer[Any], name: str, low: int, high: int | None = None) -> int:
    """Check an integer hyper-parameter lies in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}.")
    return int(value)


def make_generator(key: int | torch.Generator, device: torch.device | str | None = None):
    """A ``torch.Generator`` from a seed or a generator (returned as is)."""
    if isinstance(key, torch.Generator):
        return key
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"key must be an int seed or a torch.Generator, got {type(key).__name__}.")
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(int(key))
    return g


def check_symmetric(k: Tensor, name: str, fn: str, dtype: torch.dtype | None = None) -> None:
    """Refuse a train-train kernel matrix that is not symmetric to within round-off.

    Solvers read one triangle only (Cholesky, ``eigh``), so an asymmetric matrix (a
    test-train kernel passed by mistake, a kernel assembled from mismatched blocks) would
    give a plausible but wrong answer. The tolerance is ``sqrt(eps)`` of the kernel's
    original ``dtype`` relative to its largest entry (``3.5e-4`` in float32, ``1.5e-8`` in
    float64): a Gram matrix computed in any order differs from its transpose by a few
    ``eps`` times the feature dimension, far below that, while any real asymmetry is far
    above it.

    Args:
        k: a square matrix ``(n, n)`` (already flattened to the linear-algebra layout).
        name: the argument's name, used in the error message.
        fn: the public function, used in the error message.
        dtype: the dtype the kernel was given in (default ``k.dtype``).
    """
    eps = torch.finfo(dtype or k.dtype).eps
    scale = float(k.abs().max())
    gap = float((k - k.transpose(-1, -2)).abs().max())
    if gap > math.sqrt(eps) * scale:
        raise ValueError(
            f"{fn}: {name} is not symmetric (max |K - K^T| = {gap:.3g}, largest entry "
            f"{scale:.3g}); a train-train kernel must be symmetric. Check that you passed the "
            f"train-train kernel (not a test-train one), or symmetrize it: "
            f"{name} = 0.5 * ({name} + {name}.T)."
        )


# ------------------------------------------------------------------ overflow and underflow
def check_representable(x: Tensor, name: str) -> None:
    """Refuse inputs whose kernel cannot be represented in their dtype (underflow).

    The input kernel is a mean of squares per example (per position for images, a mean
    over channels). When it falls below the dtype's smallest normal number (``1.2e-38``
    in float32, ``2.2e-308`` in float64) while the input is not zero, it is subnormal or
    zero: correlations computed from it are wrong (every pair looks uncorrelated), and
    no rescaling inside the maps can recover digits the Gram matrix never had. Exactly
    zero inputs are fine (their kernel is exactly defined).

    Args:
        x: ``(N, features)`` or ``(N, C, *spatial)`` inputs.
        name: the argument's name, used in the error message.
    """
    info = torch.finfo(x.dtype)
    x = x.detach()
    per_example = max(1, x[0].numel())
    smallest = math.inf
    for part in x.split(max(1, (1 << 22) // per_example)):  # float64 copies of <= 32 MiB
        q = part.to(torch.float64).square().mean(1)  # per example (and position)
        small = (q > 0) & (q < info.tiny)
        if bool(small.any()):
            smallest = min(smallest, float(q[small].min()))
    if smallest < math.inf:
        raise ValueError(
            f"{name} is too small for {x.dtype}: its mean square per example is "
            f"{smallest:.3g}, below the smallest normal {x.dtype} number ({info.tiny:.3g}), "
            "so its kernel would underflow and every correlation would be wrong. Rescale "
            f"the inputs (e.g. {name} / {name}.norm(dim=-1, keepdim=True)) or compute in "
            f"float64 ({name}.double())."
        )


class KernelOverflowError(FloatingPointError):
    """A kernel map produced NaN or Inf from finite inputs (overflow).

    Attributes:
        path: position of the failing layer in the architecture (indices into nested
            ``serial`` containers, outermost first); empty for the input kernel or an
            unlocated failure.
        layer: the failing layer's ``repr`` (or what failed).
        dtype: the dtype of the computation.
        fields: the record fields that were not finite.
    """

    def __init__(
        self, path: tuple[int, ...], layer: str, dtype: torch.dtype, fields: Sequence[str]
    ) -> None:
        self.path, self.layer, self.dtype, self.fields = path, layer, dtype, tuple(fields)
        where = f"layer {'.'.join(map(str, path))} ({layer})" if path else layer
        info = torch.finfo(dtype)
        fix = "compute in float64 (x.double())" if dtype != torch.float64 else ""
        super().__init__(
            f"kernel_fn: the {'/'.join(self.fields) or 'kernel'} became NaN/Inf at {where} in "
            f"{dtype} (largest finite value {info.max:.3g}): the kernel overflows (or a "
            "derivative kernel diverges at correlation 1, e.g. Erf with a huge b). "
            + (f"Fix: {fix}, or " if fix else "Fix: ")
            + "reduce the scale: smaller W_std/b_std or inputs of smaller norm, fewer or "
            "gentler layers (Exp and high-degree Monomial grow doubly exponentially with "
            "depth)."
        )

    def at(self, index: int) -> KernelOverflowError:
        """The same error seen one container further out (``index`` prepended to the path)."""
        return KernelOverflowError((index,) + self.path, self.layer, self.dtype, self.fields)


_LOCATING = threading.local()
_HYPER_BATCH = threading.local()


@contextlib.contextmanager
def hyper_batch(size: int) -> Iterator[None]:
    """Within this context (this thread only), tensor standard deviations may be ``(size,)``
    vectors: ``G = size`` sets of hyper-parameters evaluated in one pass of the kernel maps.

    The kernel records then carry a trailing axis of length ``G`` on every covariance
    (``nngp (M, G)``, ``cov1 (N, G)``; :func:`infnets._src.ecosystem.batched.batched_kernel`
    builds them) and the ``(G,)`` hyper-parameters broadcast against it in the affine
    maps; every other map is elementwise over it. Only fully-connected records support it.
    Outside the context hyper-parameters are scalars (a finite network has one ``W_std``).
    """
    before = getattr(_HYPER_BATCH, "size", None)
    _HYPER_BATCH.size = int(size)
    try:
        yield
    finally:
        _HYPER_BATCH.size = before


@contextlib.contextmanager
def locating_overflow() -> Iterator[None]:
    """Within this context (this thread only), ``serial`` checks every layer's output
    record and raises :class:`KernelOverflowError` at the first non-finite one. Used to
    re-run one failing pair; normal evaluations check only the final result."""
    before = getattr(_LOCATING, "on", False)
    _LOCATING.on = True
    try:
        yield
    finally:
        _LOCATING.on = before


def locating() -> bool:
    """Whether :func:`locating_overflow` is active in this thread."""
    return bool(getattr(_LOCATING, "on", False))


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN/Inf.

    On CPU the sum is checked first (NaN and Inf propagate through it; a finite tensor
    whose sum overflows is then checked entry by entry): numpy's vectorized sum reads a
    2000 x 2000 float64 matrix in under 1 ms, where ``torch.isfinite(t).all()`` takes
    ~70 ms (torch 2.13 CPU, 2 cores).
    """
    if t.device.type == "cpu" and t.dtype in FLOAT_DTYPES:
        try:
            arr = t.detach().numpy()
        except (RuntimeError, TypeError):  # torch.func wrappers have no NumPy view
            return bool(torch.isfinite(t).all())
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.add.reduce(arr, axis=None))):
                return True
        return bool(np.isfinite(arr).all())
    return bool(torch.isfinite(t).all())


def non_finite_fields(record: Any) -> list[str]:
    """Names of the fields (``nngp``, ``ntk``, ``cov1``, ``cov2``) of a kernel record, or of
    a list of records, that contain NaN or Inf."""
    records = record if isinstance(record, list) else [record]
    bad: list[str] = []
    for r in records:
        for name in GET_NAMES:
            t = getattr(r, name, None)
            if isinstance(t, Tensor) and name not in bad and not all_finite(t):
                bad.append(name)
    return bad


def located_step(index: int, layer: Any, run: Any, dtype: torch.dtype) -> Any:
    """``run()`` (a layer's kernel map at ``index`` of a container), checked when locating.

    Raises:
        KernelOverflowError: the output is not finite, a scalar overflowed the dtype
            (``RuntimeError: value cannot be converted ... without overflow``), or a layer
            inside raised it (its path gets ``index`` prepended).
    """
    try:
        out = run()
    except KernelOverflowError as err:
        raise err.at(index) from None
    except RuntimeError as err:
        if "without overflow" not in str(err):
            raise
        raise KernelOverflowError((index,), repr(layer), dtype, ()) from err
    bad = non_finite_fields(out)
    if bad:
        raise KernelOverflowError((index,), repr(layer), dtype, bad)
    return out


def recheck_stds(layer: Any, names: Sequence[str], who: str) -> None:
    """Re-check hyper-parameters given as tensors when the layer is used.

    Tensor hyper-parameters (kept as tensors so that kernels can be differentiated with
    respect to them) are checked by :func:`check_std` at construction, but the caller can
    change them in place afterwards (an optimizer step): each use checks them again, so a
    NaN or negative value is refused by name instead of propagating into the kernel.
    """
    for name in names:
        value = getattr(layer, name)
        if isinstance(value, Tensor):
            check_std(value, f"{who}: {name}")
