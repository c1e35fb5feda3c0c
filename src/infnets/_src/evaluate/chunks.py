"""Cache-blocked evaluation of fully-connected kernels over blocks of example pairs."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core import safe_math as sm
from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import Affine, KernelLayer, PairMap, input_kernel

__all__ = [
    "HEAP_KEEP_BYTES",
    "PAIR_CHUNK",
    "Heap",
    "evaluate_fc",
    "fc_plan",
    "single_threaded_ops",
    "thread_workers",
    "tune_heap",
]

#: pairs of examples per block on the fully-connected path: a block's temporaries
#: (512 KB each in float64) stay in the CPU's cache between layers, and each torch
#: op on a block is large enough (~60 us) for its fixed cost (and the GIL taken
#: between ops) to be small. Blocks run on a pool of threads with single-threaded
#: ops (see thread_workers). Measured on 2 cores, 4000 examples, 5 layers: 0.55 s
#: with 32K-pair blocks, 0.50 s with 64K or 128K.
PAIR_CHUNK = 1 << 16


def _joined(layer: Any, k_out: Any) -> Kernel:
    if not isinstance(k_out, Kernel):
        raise ValueError(
            f"{layer!r} ends with {len(k_out)} branches; join them with a FanIn layer "
            "(FanInSum, FanInConcat, FanInProd) before asking for a kernel."
        )
    return k_out


class NonFinitePair(FloatingPointError):
    """The kernel of pair ``(i, j)`` came out NaN/Inf (raised by :func:`evaluate_fc`, which
    checks each block while it is in cache; the caller names the layer)."""

    def __init__(self, i: int, j: int) -> None:
        super().__init__(f"the kernel of pair ({i}, {j}) is not finite")
        self.i, self.j = i, j


def _check_block(vals: Any, r0: int, c0: int) -> None:
    """Raise :class:`NonFinitePair` at the first NaN/Inf of a block's tensors."""
    for val in vals:
        if val is not None and not _inputs.all_finite(val):
            i, j = (~torch.isfinite(val)).nonzero()[0].tolist()[:2]
            raise NonFinitePair(r0 + i, c0 + j)


def evaluate_fc(
    layer: Any, x1: Tensor, x2: Tensor | None, need_ntk: bool, chunk: int | None = None
) -> Kernel:
    """Kernels of a fully-connected network, computed block by block.

    Every fully-connected layer maps each pair of examples independently given
    the two examples' variances, so the network can be evaluated on any block of
    the ``(N1, N2)`` pair grid with that block's rows and columns of variances,
    and the blocks assembled give exactly the whole. Blocks of ``chunk`` pairs
    keep every temporary of the elementwise maps in cache and bound the scratch
    memory; blocks run side by side on a pool of threads, one torch thread each.

    Networks that :func:`fc_plan` recognises (Dense layers in the NTK
    parameterization and activations with fused pair maps: the ReLU family and
    Erf) skip the layer-by-layer records: the per-example variances of every
    layer are computed once for all examples, and each block runs only the pair
    maps, each activation fused with the ``Dense`` after it.

    For ``x2 = None`` only the upper triangle is computed: block ``b`` holds rows
    ``r0:r1`` against columns ``r0:N`` and is mirrored into columns ``r0:r1``. The
    input Gram matrix is symmetrised and the variances are its diagonal, so the
    result is exactly symmetric and diagonal pairs see correlation exactly 1.

    Args:
        layer: the network (an infnets layer).
        x1: ``(N1, d)`` inputs.
        x2: ``(N2, d)`` inputs or ``None``.
        need_ntk: compute the NTK as well as the NNGP.
        chunk: pairs per block (default: ``PAIR_CHUNK``).

    Returns:
        The output :class:`Kernel` in the dense ``(N1, N2)`` layout.

    Raises:
        NonFinitePair: a pair's NNGP or NTK is NaN/Inf (checked per block, in cache).
    """
    grad = torch.is_grad_enabled() and (
        x1.requires_grad or (x2 is not None and x2.requires_grad) or _has_grad_params(layer)
    )
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    if chunk is None:
        chunk = PAIR_CHUNK
    if grad or n1 * n2 <= chunk:
        out = _joined(layer, layer.kernel(input_kernel(x1, x2, need_ntk))).to_dense()
        _check_block((out.nngp, out.ntk), 0, 0)
        return out

    d = x1.shape[1]
    symmetric = x2 is None
    xs = x1 if x2 is None else x2
    cov1 = (x1 * x1).sum(-1) / d
    cov2 = cov1 if x2 is None else (x2 * x2).sum(-1) / d

    plan = fc_plan(layer)
    ntk_holds_nngp = need_ntk and plan is not None and (plan[-1].act is None or plan[-1].dense)
    chains = None
    if plan is not None:
        chains = (_variance_chain(plan, cov1), None if symmetric else _variance_chain(plan, cov2))

    def block(r0: int, r1: int, c0: int) -> Kernel | tuple[Tensor, Tensor | None]:
        # the input Gram block of these pairs, formed here: no (N1, N2) Gram matrix
        nngp = (x1[r0:r1] @ xs[c0:].T).div_(d)
        if symmetric:
            # the square of diagonal pairs is made exactly symmetric, with the
            # variances on its diagonal bit for bit, so diagonal pairs have
            # correlation exactly 1 and the assembled kernel is exactly symmetric
            sq = nngp[:, : r1 - r0]
            sq.copy_(torch.triu(sq, 1) + torch.triu(sq, 1).T)
            sq.diagonal().copy_(cov1[r0:r1])
        if plan is not None:
            assert chains is not None
            rows = chains[0]
            cols = rows if chains[1] is None else chains[1]
            return _run_plan(plan, nngp, need_ntk, rows, cols, r0, r1, c0)
        k = Kernel(
            nngp=nngp,
            ntk=torch.zeros_like(nngp) if need_ntk else None,
            cov1=cov1[r0:r1],
            cov2=cov2[c0:],
            shape1=(r1 - r0, d),
            shape2=(n2 - c0, d),
            n1=r1 - r0,
            n2=n2 - c0,
        )
        return _joined(layer, layer.kernel(k))

    out_nngp = x1.new_empty((n1, n2))
    out_ntk = torch.empty_like(out_nngp) if need_ntk else None
    bounds = []
    r0 = 0
    while r0 < n1:
        cols = n2 - r0 if symmetric else n2
        r1 = min(n1, r0 + max(1, chunk // cols))
        bounds.append((r0, r1))
        r0 = r1

    def run(b: tuple[int, int]) -> Kernel | None:
        r0, r1 = b
        c0 = r0 if symmetric else 0
        k = block(r0, r1, c0)
        vals = (k.nngp, k.ntk) if isinstance(k, Kernel) else k
        # in cache, one vectorized sum per block; the NTK of a plan ending with an affine
        # step contains the NNGP additively (Theta' = K' + w2 ...), so it alone is checked
        _check_block(vals[1:] if ntk_holds_nngp and not isinstance(k, Kernel) else vals, r0, c0)
        for out, val in zip((out_nngp, out_ntk), vals):
            if out is None or val is None:
                continue
            out[r0:r1, c0:] = val
            if symmetric:
                out[r1:, r0:r1] = val[:, r1 - r0 :].T
        return k if isinstance(k, Kernel) else None

    workers = thread_workers(x1, len(bounds))
    if workers > 1:  # each block writes its own region of the outputs
        tune_heap()  # block temporaries reuse heap pages (see tune_heap)
        with single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(run, bounds))
    else:
        parts = [run(b) for b in bounds]
    if plan is not None:
        assert chains is not None
        # the record's metadata (shapes, flags) from the layers on one pair
        meta = _joined(layer, layer.kernel(input_kernel(x1[:1], None, need_ntk)))
        return meta.replace(
            nngp=out_nngp,
            ntk=out_ntk,
            cov1=chains[0][-1],
            cov2=None if symmetric else chains[1][-1],  # type: ignore[index]
            shape1=(n1,) + tuple(meta.shape1[1:]),
            shape2=(n2,) + tuple(meta.shape2[1:]),
            n1=n1,
            n2=n2,
        )
    last = parts[-1]
    assert last is not None
    return last.replace(
        nngp=out_nngp,
        ntk=out_ntk,
        cov1=torch.cat([p.cov1 for p in parts if p is not None]),
        cov2=None if symmetric else last.cov2,
        shape1=(n1,) + tuple(last.shape1[1:]),
        shape2=(n2,) + tuple(last.shape2[1:]),
        n1=n1,
        n2=n2,
    )


# ---------------------------------------------------------------- fused plans
@dataclasses.dataclass
class PlanStep:
    """One step of a fused fully-connected plan.

    ``act is None``: a ``Dense`` layer, ``K' = b2 + w2 K``, ``Theta' = K' + w2 Theta``.
    Otherwise an activation with ``pair_factors``/``pair_maps``, followed by the
    affine layer ``(w2, b2)`` when ``dense`` (``K' = b2 + w2 E[phi phi]``,
    ``Theta' = K' + w2 E[phi' phi'] Theta``), or last in the network when not
    (``K' = E[phi phi]``, ``Theta' = E[phi' phi'] Theta``).
    """

    act: Any
    w2: float = 1.0
    b2: float = 0.0
    dense: bool = True


def fc_plan(layer: KernelLayer) -> list[PlanStep] | None:
    """The fused plan of a network whose every layer declares fused steps, else ``None``.

    Layers declare their fused form through the protocol
    (:meth:`~infnets._src.core.protocol.KernelLayer.fused_steps`): ``Dense`` in the NTK
    parameterization with float hyper-parameters an :class:`Affine` step, activations
    with ``pair_factors``/``pair_maps`` (ReLU family, Erf) a :class:`PairMap` step,
    ``serial`` the steps of its layers. The plan must start with an affine step and
    each activation must follow one. Anything else returns ``None`` and is evaluated
    layer by layer, with the same results.
    """
    declared = layer.fused_steps()
    if not declared:
        return None
    steps: list[PlanStep] = []
    prev_dense = False
    for step in declared:
        if isinstance(step, Affine):
            if steps and steps[-1].act is not None and not steps[-1].dense:
                steps[-1].w2, steps[-1].b2, steps[-1].dense = step.w2, step.b2, True
            else:
                steps.append(PlanStep(None, step.w2, step.b2))
            prev_dense = True
        elif isinstance(step, PairMap) and prev_dense:
            steps.append(PlanStep(step.act, dense=False))
            prev_dense = False
        else:
            return None
    return steps


def _variance_chain(plan: list[PlanStep], q: Tensor) -> list[Any]:
    """Per-example factors of every activation step, then the output variances (last)."""
    chain: list[Any] = []
    for step in plan:
        if step.act is None:
            q = torch.add(sm.scalar_like(step.b2, q), q, alpha=step.w2)
            continue
        f = step.act.pair_factors(q)
        chain.append(f)
        q = step.act.pair_maps(q, f[0], f[1], False, step.w2, step.b2)[0]
    chain.append(q)
    return chain


def _run_plan(
    plan: list[PlanStep],
    c: Tensor,
    need_ntk: bool,
    rows: list[Any],
    cols: list[Any],
    r0: int,
    r1: int,
    c0: int,
) -> tuple[Tensor, Tensor | None]:
    """The plan on one block of pairs: rows ``r0:r1`` against columns ``c0:``."""
    t: Tensor | None = None  # the NTK; None while it is zero (before any parameter)
    i = 0
    for step in plan:
        if step.act is None:
            c = torch.add(sm.scalar_like(step.b2, c), c, alpha=step.w2)
            if need_ntk:
                t = c if t is None else torch.add(c, t, alpha=step.w2)
            continue
        f1 = rows[i][0][r0:r1, None]
        f2 = cols[i][1][None, c0:]
        i += 1
        new, dot = step.act.pair_maps(c, f1, f2, need_ntk and t is not None, step.w2, step.b2)
        if t is not None and dot is not None:
            t = torch.addcmul(new, dot, t) if step.dense else dot.mul_(t)
        elif need_ntk and step.dense:
            t = new
        c = new
    return c, t


# ------------------------------------------------------------------ heap
def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: freed heap memory kept for reuse between tiles (see tune_heap and Heap)
HEAP_KEEP_BYTES = 1 << 30
#: free memory each thread's heap keeps when it shrinks (glibc ``M_TOP_PAD``)
HEAP_PAD_BYTES = 64 << 20
_HEAP_TUNED = [False]
#: environment variable that opts out of :func:`tune_heap` (``0``, ``false``, ``no``, ``off``)
TUNE_HEAP_ENV = "INFNETS_TUNE_HEAP"
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tune_heap() -> None:
    """Keep freed tile temporaries in the heap instead of returning them to the OS.

    By default glibc serves blocks above a (dynamic, at most 32 MiB) threshold
    with ``mmap`` and hands freed memory at the top of each thread's heap back
    to the OS (whole 64 MiB thread heaps included), so every tile's
    multi-megabyte temporaries land on fresh pages: a page fault per 4 KiB,
    ~15 % of the CPU time of a pooled convolutional kernel (165,000 faults in a
    0.99 s call). Serving blocks up to 32 MiB from the heap, keeping
    :data:`HEAP_PAD_BYTES` free at the top of each heap and trimming the main
    heap only above :data:`HEAP_KEEP_BYTES` removes them (0.85 s, ~0 faults).
    This process-wide glibc setting is made once, on the first tiled CPU
    computation or untiled one of at least ``tiling.HEAP_TUNE_MIN_BYTES`` (32 MiB) of
    estimated working set (never on import, never for small computations);
    :class:`Heap` still returns memory whenever the resident size grows by more than
    :data:`HEAP_KEEP_BYTES` during a run. Setting the environment variable
    ``INFNETS_TUNE_HEAP=0`` opts out (for applications that tune ``malloc`` themselves).
    """
    if _LIBC is None or _HEAP_TUNED[0]:
        return
    if os.environ.get(TUNE_HEAP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return  # opted out: glibc's defaults stay (checked on each call, never latched)
    _HEAP_TUNED[0] = True
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES)
    _LIBC.mallopt(_M_TOP_PAD, HEAP_PAD_BYTES)


def _resident_bytes() -> int:
    """The process's resident set size (Linux ``/proc/self/statm``), 0 if unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


class Heap:
    """Bounds heap growth over a tiled run by trimming when the resident size grows.

    Tiles whose multi-megabyte temporaries interleave on several threads fragment
    glibc's heap: freed memory is kept, and without trimming the resident size
    grows with the number of tiles (to tens of GB for 10^4 tiles). Returning the
    free pages (``malloc_trim``) whenever the resident size exceeds its value at
    the start by ``keep`` bytes bounds that, and costs page faults only then.
    """

    def __init__(self, keep: int) -> None:
        start = _resident_bytes() if _LIBC is not None else 0
        self.limit = start + keep if start else 0

    def check(self) -> None:
        if self.limit and _resident_bytes() > self.limit:
            _LIBC.malloc_trim(0)


def thread_workers(x1: Tensor, n_tasks: int) -> int:
    """Threads to spread independent blocks or tiles over: one per intra-op thread.

    On CPUs with OpenMP, blocks then run side by side with single-threaded torch
    ops, instead of every op splitting itself over the threads and waiting at a
    barrier: on a busy machine (another process holding a core) every such
    barrier stalls, and a 0.5 s kernel took 30 s. Torch ops release the GIL, so
    the threads overlap.
    """
    if x1.device.type != "cpu" or n_tasks < 2:
        return 1
    threads = torch.get_num_threads()
    if threads < 2 or "OpenMP" not in torch.__config__.parallel_info():
        return 1
    return min(threads, n_tasks)


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Torch ops of threads started inside run on one thread; restored on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _has_grad_params(layer: Any) -> bool:
    """Whether any hyper-parameter of the architecture is a tensor requiring grad."""
    seen = [layer]
    while seen:
        obj = seen.pop()
        for value in vars(obj).values():
            if isinstance(value, Tensor) and value.requires_grad:
                return True
            if isinstance(value, (tuple, list)):
                seen.extend(v for v in value if hasattr(v, "__dict__"))
            elif hasattr(value, "kernel") and hasattr(value, "__dict__"):
                seen.append(value)
    return False
