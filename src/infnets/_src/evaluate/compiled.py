"""Fused CPU kernels (``torch.compile``) for the largest convolutional covariances.

Layers that mix positions (pooling) need the covariance of every pair of pixels
of every pair of examples: ``P^2`` entries per pair for ``P`` positions. Eager
torch evaluates an activation's covariance map (~12 elementwise ops) and a
convolution's window sums (one pass per filter offset) as separate passes over
tensors far larger than the CPU caches, so those passes are memory-bound. Here
the two hot spots are compiled by TorchInductor into one loop nest each:

* :func:`pair_map`: an activation's fused pair maps (``pair_factors`` /
  ``pair_maps`` of the ReLU family and Erf) and the NTK update
  ``Theta' = E[phi' phi'] Theta``;
* :func:`conv_pair`: a ``Conv`` layer's NNGP and NTK window sums,
  ``K' = b^2 + W^2/|F| sum_f K(s p + f, s p' + f)`` and
  ``Theta' = K' + W^2/|F| sum_f Theta(s p + f, s p' + f)`` (NTK parameterization).

They are kept separate on purpose: fusing the activation into the convolution's
stencil would recompute it once per filter offset.

Used where it pays and is safe, without flags (like ``jax.jit``, but never making a
call wait for the compiler):

* **where it pays**: a kernel pattern (the layer's hyper-parameters and the exact
  shapes, strides and dtypes of its tensors) is compiled once its eager evaluations have
  passed :data:`MIN_TOTAL` covariance entries in this process, i.e. once it has cost
  about what compiling it costs (the classic rent-or-buy rule: never more than twice the
  better choice in hindsight). E.g. 128 pooled 8x8 images: from the fifth call; the 1797
  digits: within the first call; one-off kernels and test suites: never. Once a pattern
  of the running computations qualifies, their other patterns (edge tiles, per-example
  covariances) are queued as they come. CPU tensors of at least :data:`MIN_ENTRIES`
  entries, without autograd, zero padding only;
* **in the background**: the pattern is queued for one worker thread that compiles it
  once the computation that queued it has ended (or after :data:`DEFER_S` seconds of a
  long one), while later calls go on with the eager code; every call after a compiled
  kernel is ready uses it. A first call therefore costs what eager costs, never the
  compilation;
* **at exit**: an interpreter that ends while a pattern compiles waits for that one
  compilation (at most :data:`EXIT_WAIT_S`; its result stays in the disk cache) and
  drops the rest of the queue;
* **cached on disk**: TorchInductor's FX-graph and AOT caches (``TORCHINDUCTOR_CACHE_DIR``,
  by default under the system temporary directory) keep compiled kernels across
  processes: a new process re-compiles a known pattern in ~1 s instead of 5-15 s.

Without a C++ compiler on the PATH (``$CXX``, else ``g++``/``c++``/``clang++``) the eager
code runs, quietly; any other compiler failure disables the path for the process with a
warning, and the eager code runs with the same results. ``INFNETS_COMPILE`` chooses:
``auto`` (the default, above), ``0`` (never compile), ``1`` (compile every eligible
pattern, small ones too, on its second use and *in* the calling thread: the call
waits, as with ``jax.jit``; for tests and for many calls on small problems).
:func:`wait` blocks until the background compilations queued so far are done
(benchmarks use it to time the steady state).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import queue
import shutil
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from infnets._src.core.kernel import memory_order

__all__ = [
    "MIN_ENTRIES",
    "MIN_PER_EXAMPLE",
    "MIN_TOTAL",
    "conv_pair",
    "enabled",
    "pair_map",
    "pending",
    "problem",
    "wait",
]

#: smallest covariance (entries of one tensor) worth a compiled kernel
MIN_ENTRIES = 1 << 18
#: smallest per-example covariance (``cov1``/``cov2`` of a tile) worth a compiled kernel
MIN_PER_EXAMPLE = 1 << 14
#: covariance entries a pattern must have processed eagerly in this process before it is
#: compiled in the background: ~3 s of eager work (~10 ns per entry and layer), about what
#: compiling a pattern costs without a warm disk cache
MIN_TOTAL = 1 << 28

_LOCK = threading.Lock()
_COMPILING = threading.Lock()
#: most shape patterns compiled per process (each costs seconds the first time)
MAX_VARIANTS = 32
#: with ``INFNETS_COMPILE=1``, uses of a shape pattern that run eager before it is compiled
COMPILE_AFTER = 1
_CACHE: dict[Any, Callable[..., Any]] = {}
_SEEN: dict[Any, int] = {}
_BROKEN: list[str] = []
_QUEUED: set[Any] = set()
#: queued compilations ``(pattern, build, argument specs, calls ended when queued)``;
#: ``None`` stops the worker
_JOBS: queue.Queue[tuple[Any, Callable[[], Callable[..., Any]], list[Any], int] | None] = (
    queue.Queue()
)
_WORKER: list[threading.Thread] = []
#: kernel computations running now and ended so far; ``hot``: the running ones queue every
#: pattern on sight; ``touched``: they met a pattern that has paid for compilation (the
#: next computation then starts hot, see :func:`problem`)
_CALLS = {"active": 0, "ended": 0, "hot": 0, "touched": 0}
_CALLS_CHANGED = threading.Condition(_LOCK)
#: seconds a queued pattern waits for the computation that queued it to end before the
#: background compiler starts on it anyway (a first call is not slowed by the compiler)
DEFER_S = 5.0
#: most seconds an exiting interpreter waits for the compilation in progress
EXIT_WAIT_S = 120.0
_STOP = threading.Event()


def _setting() -> str:
    return os.environ.get("INFNETS_COMPILE", "auto")


def enabled(t: Tensor, per_example: bool = False) -> bool:
    """Whether the compiled kernels may handle covariance ``t``.

    CPU tensors without autograd of at least :data:`MIN_ENTRIES` entries (any size with
    ``INFNETS_COMPILE=1``), unless compilation is off or failed in this process. The
    per-example covariances that travel with each tile (``per_example``) qualify from
    :data:`MIN_PER_EXAMPLE` entries: every tile recomputes its two blocks' ones.
    """
    setting = _setting()
    if setting == "0" or _BROKEN or t.device.type != "cpu" or t.requires_grad:
        return False
    if setting == "1":
        return True  # asked for: a failure to compile is reported (once)
    # automatic: quietly eager where TorchInductor could not build CPU kernels
    return _have_cxx() and t.numel() >= (MIN_PER_EXAMPLE if per_example else MIN_ENTRIES)


@functools.cache
def _have_cxx() -> bool:
    """Whether a C++ compiler for TorchInductor's CPU kernels is on the PATH (``$CXX``)."""
    cxx = os.environ.get("CXX")
    names = [cxx.split()[0]] if cxx and cxx.split() else ["g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names)


@contextlib.contextmanager
def problem() -> Iterator[None]:
    """Mark a running kernel computation.

    The background compiler starts on patterns queued by a running computation once it
    has ended (or after :data:`DEFER_S` seconds), so it does not slow that computation;
    once any pattern of the running computations has paid for compilation, their other
    patterns are queued on sight (they recur with it).
    """
    with _LOCK:
        _CALLS["active"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _CALLS["active"] -= 1
            _CALLS["ended"] += 1
            if not _CALLS["active"]:
                # the next computation starts hot if this one touched qualified patterns
                # (a loop of repeated calls stays hot), cold otherwise
                _CALLS["hot"], _CALLS["touched"] = _CALLS["touched"], 0
            _CALLS_CHANGED.notify_all()


def pending() -> int:
    """Number of kernel patterns queued or being compiled in the background."""
    with _LOCK:
        return len(_QUEUED)


def wait(timeout: float | None = None) -> bool:
    """Block until the background compilations queued so far are finished.

    Args:
        timeout: seconds to wait at most (``None``: no limit).

    Returns:
        ``True`` when nothing is left to compile, ``False`` on timeout.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _signature(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, Tensor))


def _own_code(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``fn`` with a code object of its own, so each variant is a separate dynamo entry.

    TorchDynamo caches compiled graphs per code object and stops (here: raises,
    under ``fullgraph``) after ``recompile_limit`` variants of one; the variants
    of a kernel built by one factory share its inner function's code.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{n}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compile(fn: Callable[..., Any], threads: int) -> Callable[..., Any]:
    """A static compilation of ``fn`` whose loops use ``threads`` OpenMP threads."""
    # cpp_wrapper: the generated C++ entry point releases the GIL, so tiles on several
    # threads run compiled kernels side by side (the default Python wrapper holds it for
    # the whole kernel); cpp.threads: the thread count of the calls that will use it,
    # not of the thread that happens to compile it
    return torch.compile(
        fn,
        dynamic=False,
        fullgraph=True,
        options={"cpp_wrapper": True, "cpp.threads": threads},
    )


def _example(spec: Any) -> Any:
    """An input like the one described by ``spec`` (values are irrelevant to compiling)."""
    if not isinstance(spec, tuple) or spec[:1] != ("tensor",):
        return spec
    _, shape, stride, dtype = spec
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True) if n > 0)
    return torch.ones(size, dtype=dtype).as_strided(shape, stride)


def _spec(a: Any) -> Any:
    if isinstance(a, Tensor):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype)
    return a


def _fail(err: BaseException) -> None:
    _BROKEN.append(repr(err))
    warnings.warn(
        "infnets: torch.compile failed for a convolutional covariance kernel; using the "
        f"eager implementation from now on (same results, slower). Cause: {err!r:.300}",
        RuntimeWarning,
        stacklevel=4,
    )


def _openmp_threads(n: int) -> bool:
    """Give the calling thread ``n`` OpenMP threads without touching other threads.

    ``torch.set_num_threads`` also changes the count that threads started later
    inherit; ``omp_set_num_threads`` of the OpenMP runtime torch loaded changes only
    the caller's. TorchDynamo guards compiled code on the thread count, so the
    background compiler must see the count of the threads that will call the code.
    """
    if torch.get_num_threads() == n:  # also initialises this thread's setting
        return True
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
        for path in sorted(p for p in paths if p.startswith("/") and ".so" in p):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(path).omp_set_num_threads(ctypes.c_int(n))
    return torch.get_num_threads() == n


def _eager(*args: Any) -> None:
    """The entry of a pattern that stays eager (``None``: the caller's eager code runs)."""
    return None


def _worker() -> None:
    """Compile queued patterns one after another (a daemon thread; see :func:`_stop_worker`)."""
    while True:
        job = _JOBS.get()
        if job is None or _STOP.is_set():
            return
        full_key, build, specs, queued_at = job

        def done(q: int = queued_at) -> bool:
            return _CALLS["active"] == 0 or _CALLS["ended"] > q or _STOP.is_set()

        with _LOCK:  # let the computation that queued it finish first
            _CALLS_CHANGED.wait_for(done, DEFER_S)
        _, _, threads, grad = full_key
        try:
            # compiled under the callers' global state (thread count, grad mode), which
            # TorchDynamo guards on; a pattern that cannot match it stays eager
            if not _BROKEN and not _STOP.is_set() and full_key not in _CACHE:
                if not _openmp_threads(threads):
                    _CACHE[full_key] = _eager  # not queued again
                    continue
                raw = _own_code(build(), len(_CACHE) + len(_QUEUED))
                with torch.set_grad_enabled(grad):
                    _compile(raw, threads)(*[_example(s) for s in specs])  # compiles here
                # callers only run the code compiled here: never a compilation of their
                # own (on a guard miss the Python function runs, eagerly)
                _CACHE[full_key] = torch._dynamo.run(raw)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            _fail(err)
        finally:
            with _LOCK:
                _QUEUED.discard(full_key)


def _stop_worker() -> None:
    """At interpreter exit: let the compilation in progress finish, start no other.

    A daemon thread still inside TorchInductor's native code while the interpreter
    tears down its native state aborts the process (``std::terminate``); waiting for the
    one compilation under way (seconds; its result stays in the on-disk cache for the
    next process) avoids that. Queued patterns are dropped.
    """
    _STOP.set()
    _JOBS.put(None)
    with _LOCK:
        _CALLS_CHANGED.notify_all()
    for thread in _WORKER:
        if isinstance(thread, threading.Thread):
            thread.join(EXIT_WAIT_S)


def _enqueue(full_key: Any, build: Callable[[], Callable[..., Any]], args: Sequence[Any]) -> None:
    """Queue ``full_key`` for the background compiler (caller holds ``_LOCK``)."""
    _QUEUED.add(full_key)
    _JOBS.put((full_key, build, [_spec(a) for a in args], _CALLS["ended"]))
    if not _WORKER and not _STOP.is_set():
        thread = threading.Thread(target=_worker, name="infnets-compile", daemon=True)
        thread.start()
        _WORKER.append(thread)
        atexit.register(_stop_worker)


def _unaliased(args: Sequence[Any]) -> tuple[Any, ...]:
    """``args`` with no two tensors sharing memory (copies of the later ones).

    TorchDynamo guards compiled code on which inputs alias each other; the background
    compiler traces inputs of their own, so an aliased call would miss the guard and run
    the Python function. The aliased inputs here are small per-example factors.
    """
    seen: set[int] = set()
    out = []
    for a in args:
        if isinstance(a, Tensor):
            ptr = a.untyped_storage().data_ptr()
            if ptr in seen:
                a = a.clone()
            seen.add(ptr)
        out.append(a)
    return tuple(out)


def _after_fork_in_child() -> None:
    """A forked child has no compiler thread: forget the parent's queue (it re-queues)."""
    global _JOBS, _LOCK, _COMPILING, _CALLS_CHANGED
    _LOCK = threading.Lock()
    _COMPILING = threading.Lock()
    _CALLS_CHANGED = threading.Condition(_LOCK)
    _JOBS = queue.Queue()
    _QUEUED.clear()
    _WORKER.clear()
    _CALLS.update(active=0, hot=0, touched=0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _touch() -> None:
    """The running computations met a pattern that has paid for compilation: the rest of
    their patterns (seen before it qualified, or edge tiles) follow it."""
    if _CALLS["active"]:
        _CALLS["hot"] = _CALLS["touched"] = 1


def _covariance_entries(args: Sequence[Any]) -> int:
    return max((a.numel() for a in args if isinstance(a, Tensor)), default=0)


def _call(key: Any, build: Callable[[], Callable[..., Any]], *args: Any) -> Any:
    """Run the compiled function ``key`` for these arguments; ``None`` to run eager.

    Every pattern (``key`` plus the arguments' shapes, strides and dtypes, plus the
    torch thread count) gets its own static compilation: tiles repeat a few shapes,
    and static shapes vectorise best. At most :data:`MAX_VARIANTS` patterns are
    compiled per process. In ``auto`` mode a pattern is queued for the background
    compiler once it has processed :data:`MIN_TOTAL` entries (or the running computations
    are hot, see :func:`problem`); with
    ``INFNETS_COMPILE=1`` it is compiled here, in the caller, on its second use (one
    compilation at a time: other tile threads go on eagerly meanwhile).
    """
    args = _unaliased(args)
    threads = torch.get_num_threads()
    full_key = (key, _signature(args), threads, torch.is_grad_enabled())
    fn = _CACHE.get(full_key)
    if fn is not None:
        _touch()  # a compiled pattern recurs: its computation is a repeated one
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            _fail(err)
            return None
    background = _setting() != "1"
    with _LOCK:
        if full_key in _QUEUED:
            _touch()
            return None
        if len(_CACHE) + len(_QUEUED) >= MAX_VARIANTS:
            return None
        if background:
            seen = _SEEN.get(full_key, 0) + _covariance_entries(args)
            _SEEN[full_key] = seen
            if seen >= MIN_TOTAL:
                _touch()
            if seen >= MIN_TOTAL or _CALLS["hot"]:
                _enqueue(full_key, build, args)
            return None
        seen = _SEEN.get(full_key, 0)
        _SEEN[full_key] = seen + 1
        if seen < COMPILE_AFTER:
            return None
    # INFNETS_COMPILE=1: compile in this thread, one compilation at a time
    if not _COMPILING.acquire(blocking=False):
        return None
    try:
        fn = _CACHE.get(full_key)
        if fn is None:
            fn = _compile(_own_code(build(), len(_CACHE)), threads)
            out = fn(*args)  # compiles here
            _CACHE[full_key] = fn
            return out
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _fail(err)
        return None
    finally:
        _COMPILING.release()


def _in_order(x: Tensor, order: list[int], inverse: list[int]) -> Tensor:
    """``x`` stored in the memory order ``order`` (the compiler writes it so directly)."""
    return x.permute(order).contiguous().permute(inverse)


# ------------------------------------------------------------------- activations
def pair_map(
    act: Any, c: Tensor, f1: Tensor, f2: Tensor, ntk: Tensor | None
) -> tuple[Tensor, Tensor | None] | None:
    """``(E[phi phi], E[phi' phi'] Theta)`` by ``act.pair_maps``, compiled (any spatial layout).

    Args:
        act: an activation defining ``pair_maps`` (its hyper-parameters are floats).
        c: pair covariances ``(*B, *S)``.
        f1, f2: the two members' factors from ``act.pair_factors``, broadcastable to ``c``.
        ntk: the NTK (same shape as ``c``) or ``None``.

    Returns:
        The new covariance and NTK, or ``None`` when the compiled path is unavailable.
    """
    order, inverse = memory_order(c)
    key = ("map", type(act), tuple(sorted(vars(act).items())), ntk is None, tuple(order))

    def build() -> Callable[..., Any]:
        if ntk is None:

            def fn(c: Tensor, f1: Tensor, f2: Tensor) -> Tensor:
                return _in_order(act.pair_maps(c, f1, f2, False)[0], order, inverse)

            return fn

        def fn_ntk(c: Tensor, f1: Tensor, f2: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            new, dot = act.pair_maps(c, f1, f2, True)
            return _in_order(new, order, inverse), _in_order(dot * t, order, inverse)

        return fn_ntk

    if ntk is None:
        out = _call(key, build, c, f1, f2)
        return None if out is None else (out, None)
    return _call(key, build, c, f1, f2, ntk)


# ------------------------------------------------------------------ convolutions
def supports(geoms: Sequence[Any]) -> bool:
    """Zero-padded (or unpadded) windows; circular padding stays eager."""
    return not any(g.circular for g in geoms)


def _window_sums(t: Tensor, lead: int, full: bool, geoms: Sequence[Any]) -> Tensor:
    """``sum_f t_pad(s p + f, s p' + f)`` (or ``t_pad(s p + f)`` per position), all offsets."""
    nd = len(geoms)
    per = 2 if full else 1
    pads: list[int] = []
    for g in reversed(geoms):
        pads += [g.lo, g.hi] * per
    p = F.pad(t, pads) if any(pads) else t
    offsets: list[tuple[int, ...]] = [()]
    for g in geoms:
        offsets = [o + (f,) for o in offsets for f in range(g.k)]
    out: Tensor | None = None
    for off in offsets:
        idx: list[slice] = [slice(None)] * lead
        for a in range(nd):
            g, f = geoms[a], off[a]
            sl = slice(f, f + g.s * (g.out - 1) + 1, g.s)
            idx += [sl] * per
        v = p[tuple(idx)]
        out = v if out is None else out + v
    assert out is not None
    return out


def conv_pair(
    nngp: Tensor,
    ntk: Tensor | None,
    lead: int,
    full: bool,
    geoms: Sequence[Any],
    w2f: float,
    b2: float | None,
) -> tuple[Tensor, Tensor | None] | None:
    """A ``Conv`` layer (NTK parameterization) on spatial covariances, compiled.

    Args:
        nngp: ``(*B, s_1, s_1', ..., s_d, s_d')`` covariances (``full``) or
            ``(*B, s_1, ..., s_d)`` per-position ones; ``lead`` example axes.
        ntk: the NTK in the same layout, or ``None``.
        lead: number of example axes.
        full: the interleaved pixel-pair layout.
        geoms: one window geometry per spatial axis (no circular padding).
        w2f: ``W_std^2 / |filter|``.
        b2: ``b_std^2`` or ``None``.

    Returns:
        ``(K', Theta')`` in the input's memory order (example axes innermost), or
        ``None`` when the compiled path is unavailable.
    """
    order, inverse = memory_order(nngp)
    key = ("conv", tuple(geoms), lead, full, w2f, b2, ntk is None, tuple(order))

    def build() -> Callable[..., Any]:
        def fn(k: Tensor, t: Tensor | None = None) -> Any:
            new = _window_sums(k, lead, full, geoms) * w2f
            if b2 is not None:
                new = new + b2
            if t is None:
                return _in_order(new, order, inverse)
            theta = _window_sums(t, lead, full, geoms) * w2f + new
            return _in_order(new, order, inverse), _in_order(theta, order, inverse)

        return fn

    if ntk is None:
        out = _call(key, build, nngp)
        return None if out is None else (out, None)
    return _call(key, build, nngp, ntk)
