r"""A bounded cache of kernel matrices keyed by (architecture, kernel, data content).

A grid search refits an estimator for every parameter combination and fold; parameters
that do not change the kernel (an SVM's ``C``, a ridge) would recompute the same
``(N, N)`` kernel each time. :func:`kernels` looks every requested matrix up under the
key ``(architecture_key(layer), name, data_key(x1), data_key(x2))``, where
:func:`data_key` is a BLAKE2b digest of the inputs' bytes, shape and dtype (so a fold
built again by fancy indexing hits, and an input edited in place misses). Layers without
a canonical key (functions, tensor hyper-parameters; see
:func:`infnets._src.ecosystem.architectures.architecture_key`) are never cached.

The cache is per process (``GridSearchCV(n_jobs=k)`` workers each hold their own),
least-recently-used, bounded by ``max_bytes`` (entries larger than the bound are not
kept; ``max_bytes = 0`` turns caching off) and thread-safe. Lookups return copies, so
callers may modify what they get (``GaussianProcessRegressor`` adds its noise in place).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.ecosystem.architectures import architecture_key
from infnets._src.layers.base import Layer

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CacheInfo",
    "KernelCache",
    "kernel_cache",
    "data_key",
    "kernels",
    "caching_kernel_fn",
]

#: default bound of the process-wide cache (256 MiB: e.g. four 4000 x 4000 float64 kernels)
DEFAULT_MAX_BYTES = 256 * 2**20


class CacheInfo(NamedTuple):
    """Statistics of a :class:`KernelCache` (lookups count one per kernel matrix)."""

    hits: int
    misses: int
    entries: int
    nbytes: int
    max_bytes: int


class KernelCache:
    """A thread-safe least-recently-used store of kernel matrices bounded in bytes.

    Args:
        max_bytes: the bound; ``0`` disables the cache.

    Examples:
        >>> import torch
        >>> cache = KernelCache(max_bytes=1000)
        >>> cache.store(("k",), torch.zeros(10, 10, dtype=torch.float64))  # 800 bytes
        >>> cache.lookup(("k",)).shape, cache.info().entries
        (torch.Size([10, 10]), 1)
        >>> cache.store(("j",), torch.zeros(10, 10, dtype=torch.float64))  # evicts ("k",)
        >>> cache.lookup(("k",)) is None, cache.info().hits, cache.info().misses
        (True, 1, 1)
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._entries: collections.OrderedDict[tuple[Any, ...], Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._nbytes = 0
        self.hits = 0
        self.misses = 0
        self._max_bytes = _inputs.check_int(max_bytes, "KernelCache: max_bytes", 0)

    @property
    def max_bytes(self) -> int:
        """The bound in bytes (setting it evicts what no longer fits; ``0`` disables)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._max_bytes = _inputs.check_int(value, "KernelCache: max_bytes", 0)
        with self._lock:
            self._trim()

    def _trim(self) -> None:
        while self._entries and self._nbytes > self._max_bytes:
            _, old = self._entries.popitem(last=False)
            self._nbytes -= old.numel() * old.element_size()

    def lookup(self, key: tuple[Any, ...]) -> Tensor | None:
        """A copy of the matrix stored under ``key``, or ``None`` (counts a hit or a miss)."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return value.clone()

    def store(self, key: tuple[Any, ...], value: Tensor) -> None:
        """Keep ``value`` (detached, not copied) under ``key`` if it fits the bound."""
        size = value.numel() * value.element_size()
        if size > self._max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.numel() * old.element_size()
            self._entries[key] = value.detach()
            self._nbytes += size
            self._trim()

    def clear(self) -> None:
        """Forget every matrix and reset the statistics."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
            self.hits = self.misses = 0

    def info(self) -> CacheInfo:
        """Hits, misses, entries, bytes held and the bound."""
        with self._lock:
            return CacheInfo(
                self.hits, self.misses, len(self._entries), self._nbytes, self._max_bytes
            )


kernel_cache = KernelCache()
"""The process-wide cache of the scikit-learn estimators, kernels and transformer.

``kernel_cache.info()`` (hits, misses, entries, bytes), ``kernel_cache.clear()``,
``kernel_cache.max_bytes = 2**30`` (the bound; ``0`` turns caching off)."""


def data_key(x: Tensor) -> str:
    """A digest of a tensor's content: BLAKE2b (128 bits) of its bytes, shape and dtype.

    Args:
        x: a CPU tensor.

    Returns:
        32 hexadecimal digits.
    """
    arr = np.ascontiguousarray(x.detach().cpu().numpy())
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.data)  # C-contiguous: hashed in place, no copy
    return h.hexdigest()


def kernels(
    layer: Layer,
    x1: Tensor,
    x2: Tensor | None,
    names: Sequence[str],
    cache: KernelCache | None = None,
) -> dict[str, Tensor]:
    """The kernels ``names`` of ``layer`` on ``(x1, x2)``, each evaluated at most once.

    Matrices found in the cache are copied out; the missing ones are computed together in
    one ``layer.kernel_fn(x1, x2, missing)`` call and stored.

    Args:
        layer: an infnets layer (one without an :func:`architecture_key` is not cached).
        x1: ``(N1, ...)`` inputs.
        x2: ``(N2, ...)`` inputs or ``None`` (the symmetric kernel of ``x1``).
        names: kernels to return, among ``'nngp'`` and ``'ntk'``.
        cache: the cache (default: the process-wide :data:`kernel_cache`).

    Returns:
        ``{name: (N1, N2) tensor}``.
    """
    cache = kernel_cache if cache is None else cache
    names = tuple(names)
    arch = architecture_key(layer) if cache.max_bytes > 0 else None
    if arch is None:
        out = layer.kernel_fn(x1, x2, names)
        return {n: getattr(out, n) for n in names}
    k1 = data_key(x1)
    k2 = None if x2 is None else data_key(x2)
    found = {n: cache.lookup((arch, n, k1, k2)) for n in names}
    missing = tuple(n for n in names if found[n] is None)
    if missing:
        out = layer.kernel_fn(x1, x2, missing)
        for n in missing:
            value = getattr(out, n)
            cache.store((arch, n, k1, k2), value)
            found[n] = value.clone()
    return {n: t for n, t in found.items() if t is not None}


def caching_kernel_fn(
    layer: Layer, cache: KernelCache | None = None, alias: dict[str, str] | None = None
) -> Callable[..., Any]:
    """``kernel_fn(x1, x2=None, get=...)`` of ``layer`` served through the cache.

    Args:
        layer: an infnets layer.
        cache: the cache (default: the process-wide one).
        alias: answer a name with another kernel (``{'nngp': 'ntk'}`` makes the NTK the
            prior covariance: the NTK-GP of He et al. 2020).

    Returns:
        A function taking ``get`` as a name (returns a tensor) or a tuple of names
        (returns a named tuple), like an infnets ``kernel_fn``.
    """
    alias = alias or {}

    def kernel_fn(x1: Tensor, x2: Tensor | None = None, get: Any = None, **kw: Any) -> Any:
        if kw or get is None:
            raise TypeError("caching_kernel_fn: pass get as a name or a tuple, no other options.")
        names = (get,) if isinstance(get, str) else tuple(get)
        wanted = tuple(dict.fromkeys(alias.get(n, n) for n in names))
        got = kernels(layer, x1, x2, wanted, cache)
        values = [got[alias.get(n, n)] for n in names]
        if isinstance(get, str):
            return values[0]
        return _inputs.kernel_tuple_type(names)(*values)

    return kernel_fn
