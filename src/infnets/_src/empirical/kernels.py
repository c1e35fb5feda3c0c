"""Empirical NNGP, combined empirical kernels and Monte Carlo kernel estimates."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.empirical.axes import make_axes
from infnets._src.empirical.model import Model, locked, wrap_model_error
from infnets._src.empirical.ntk import EmpiricalKernelFn, EmpiricalNTK, check_inputs


class EmpiricalNNGP(EmpiricalKernelFn):
    """The callable returned by ``empirical_nngp_fn``: ``mean over traced axes of f1 f2^T``."""

    def __init__(
        self,
        model: Any,
        trace_axes: Any,
        diagonal_axes: Any,
        chunk_size: int | None,
        who: str = "empirical_nngp_fn",
    ) -> None:
        super().__init__(model, trace_axes, diagonal_axes, chunk_size, who)

    def outputs(self, bound: Any, x: Tensor) -> Tensor:
        """``f(x)``, evaluated in chunks of ``chunk_size`` examples."""
        parts = [x] if self.chunk_size is None else list(torch.split(x, self.chunk_size))
        try:
            with torch.no_grad():
                outs = [bound.call(bound.values, p) for p in parts]
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise wrap_model_error(self.who, err) from err
        for p, o in zip(parts, outs):
            if not isinstance(o, Tensor) or o.ndim == 0 or o.shape[0] != p.shape[0]:
                raise ValueError(
                    f"{self.who}: the model must return one tensor with the batch axis first; "
                    f"on {p.shape[0]} examples it returned "
                    f"{tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__}."
                )
        return torch.cat(outs)

    @locked
    def output_pair(self, x1: Tensor, x2: Tensor | None, params: Any) -> tuple[Tensor, Tensor]:
        """``f(x1)`` and ``f(x2)`` (``f(x1)`` again for ``x2=None``) under ``params``."""
        self.model.check_mode()
        bound = self.model.bind(params)
        f1 = self.outputs(bound, x1)
        return f1, (f1 if x2 is None else self.outputs(bound, x2))

    def from_outputs(self, f1: Tensor, f2: Tensor, diagonal_axes: tuple[int, ...]) -> Tensor:
        ax = make_axes(tuple(f1.shape), tuple(f2.shape), self.trace_axes, diagonal_axes, self.who)
        k = torch.einsum(f"{ax.a1},{ax.a2}->{ax.out}", f1, f2)
        return k / ax.trace_size if ax.trace_size != 1 else k

    @locked
    def __call__(self, x1: Any, x2: Any = None, params: Any = None) -> Tensor:
        x1, x2 = check_inputs(x1, x2, self.who)
        f1, f2 = self.output_pair(x1, x2, params)
        return self.from_outputs(f1, f2, self.diagonal_axes)


class EmpiricalKernel:
    """The callable returned by ``empirical_kernel_fn`` (NNGP and NTK, ``get`` selects)."""

    def __init__(
        self,
        model: Any,
        trace_axes: Any,
        diagonal_axes: Any,
        implementation: str,
        chunk_size: int | None,
        who: str = "empirical_kernel_fn",
    ) -> None:
        self.model = model if isinstance(model, Model) else Model(model, who)
        self.nngp = EmpiricalNNGP(self.model, trace_axes, diagonal_axes, chunk_size, who)
        self.ntk = EmpiricalNTK(
            self.model, trace_axes, diagonal_axes, implementation, chunk_size, who
        )
        self.who = who

    @locked
    def values(self, x1: Any, x2: Any, names: tuple[str, ...], params: Any) -> dict[str, Any]:
        """The kernels in ``names`` (subset of nngp, ntk, cov1, cov2) as a dict."""
        x1, x2 = check_inputs(x1, x2, self.who)
        out: dict[str, Any] = {}
        if set(names) & {"nngp", "cov1", "cov2"}:
            nn = self.nngp
            f1, f2 = nn.output_pair(x1, x2, params)
            diag = tuple(sorted(set(nn.diagonal_axes) | {0}))
            if "nngp" in names:
                out["nngp"] = nn.from_outputs(f1, f2, nn.diagonal_axes)
            if "cov1" in names:
                out["cov1"] = nn.from_outputs(f1, f1, diag)
            if "cov2" in names:
                out["cov2"] = None if x2 is None else nn.from_outputs(f2, f2, diag)
        if "ntk" in names:
            out["ntk"] = self.ntk(x1, x2, params)
        return out

    def __call__(self, x1: Any, x2: Any = None, get: Any = None, params: Any = None) -> Any:
        names = _inputs.parse_get(get)
        return select(self.values(x1, x2, names, params), get, names)


def select(values: dict[str, Any], get: Any, names: tuple[str, ...]) -> Any:
    """``get`` convention: ``None`` -> ``Kernels(nngp, ntk)``; str -> tensor; tuple -> tuple."""
    if isinstance(get, str):
        return values[get]
    return _inputs.kernel_tuple_type(names)(*(values[n] for n in names))


def _check_n_samples(n_samples: Any, who: str) -> tuple[list[int], bool]:
    if isinstance(n_samples, (int, np.integer)) and not isinstance(n_samples, bool):
        return [_inputs.check_int(n_samples, "n_samples", 1)], False
    if not isinstance(n_samples, Iterable) or isinstance(n_samples, str):
        raise TypeError(
            f"{who}: n_samples must be an int or an iterable of ints such as "
            f"[1, 2, 4, 8], got {n_samples!r}."
        )
    ns = [_inputs.check_int(n, "n_samples", 1) for n in n_samples]
    if not ns:
        raise ValueError(f"{who}: n_samples is empty; give at least one sample count.")
    if any(b <= a for a, b in zip(ns, ns[1:])):
        raise ValueError(f"{who}: n_samples={ns} must be strictly increasing.")
    return ns, True


class MonteCarloKernel:
    """The callable returned by ``monte_carlo_kernel_fn`` (see its docstring)."""

    def __init__(
        self,
        init_fn: Callable[..., Any],
        apply_fn: Callable[..., Tensor],
        key: int | torch.Generator,
        n_samples: Any,
        trace_axes: Any,
        diagonal_axes: Any,
        implementation: str,
        chunk_size: int | None,
        who: str = "monte_carlo_kernel_fn",
    ) -> None:
        if not callable(init_fn) or not callable(apply_fn):
            raise TypeError(
                f"{who}: init_fn and apply_fn must be callables, e.g. "
                "`init_fn, apply_fn, kernel_fn = stax.serial(...)`."
            )
        if isinstance(key, torch.Generator):
            self._key: int | tuple[torch.device, Tensor] = (key.device, key.get_state())
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            self._key = int(key)
        else:
            raise TypeError(
                f"{who}: key must be an int seed or a torch.Generator, got {type(key).__name__}."
            )
        self.ns, self.iterate = _check_n_samples(n_samples, who)
        self.init_fn = init_fn
        try:
            sig = inspect.signature(init_fn).parameters
            self._kw = "dtype" in sig or any(p.kind == p.VAR_KEYWORD for p in sig.values())
        except (TypeError, ValueError):
            self._kw = True
        self.kernel = EmpiricalKernel(
            apply_fn, trace_axes, diagonal_axes, implementation, chunk_size, who
        )
        self.who = who

    def _generator(self, device: torch.device) -> torch.Generator:
        if isinstance(self._key, int):
            g = torch.Generator(device=device)
            g.manual_seed(self._key)
            return g
        dev, state = self._key
        g = torch.Generator(device=dev)
        g.set_state(state)
        return g

    def _estimates(
        self, x1: Tensor, x2: Tensor | None, names: tuple[str, ...], get: Any
    ) -> Iterator[Any]:
        gen = self._generator(x1.device)
        shape = (-1,) + tuple(x1.shape[1:])
        sums: dict[str, Any] = {}
        checkpoints = set(self.ns)
        for s in range(1, self.ns[-1] + 1):
            if self._kw:
                _, params = self.init_fn(gen, shape, dtype=x1.dtype, device=x1.device)
            else:
                _, params = self.init_fn(gen, shape)
            vals = self.kernel.values(x1, x2, names, params)
            for n, v in vals.items():
                sums[n] = v if n not in sums or v is None else sums[n] + v
            if s in checkpoints:
                est = {n: None if v is None else v / s for n, v in sums.items()}
                yield select(est, get, names)

    def __call__(self, x1: Any, x2: Any = None, get: Any = None) -> Any:
        names = _inputs.parse_get(get)
        x1, x2 = check_inputs(x1, x2, self.who)
        gen = self._estimates(x1, x2, names, get)
        if self.iterate:
            return gen
        out = None
        for out in gen:  # noqa: B007 - the last estimate is the answer
            pass
        return out
