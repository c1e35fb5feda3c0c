r"""Evaluating ``kernel_fn``: input kernels, spatial layouts, memory budget and tiles.

``layer.kernel_fn(x1, x2, get, ...)`` runs :func:`kernel_fn` below:

1. **Inputs.** ``(N, features)`` inputs start from ``x1 x2^T / d``; convolutional
   inputs ``(N, C, *spatial)`` (PyTorch layout, 1 to 3 spatial axes) from the
   per-position channel inner products ``sum_c x1[c, p] x2[c, p'] / C``
   (:func:`spatial_input_kernel`).
2. **Layout plan.** Every layer declares whether it needs the full pixel-pair
   covariance of its input (:meth:`~infnets._src.layers.base.Layer.spatial_requirement`);
   the architecture's need is combined once, before computing. Convolutions,
   nonlinearities and ``Flatten`` work on per-position covariances (``O(N1 N2 P)``
   memory), pooling needs pixel pairs (``O(N1 N2 P^2)``), and containers drop the
   pairs as soon as nothing downstream needs them.
3. **Memory budget.** The memory of one pair of examples is estimated from the
   architecture (the largest spatial covariance, never larger than the input's,
   times the covariances kept (NNGP, NTK), the parallel branches and a constant for
   temporaries). When the whole problem exceeds the budget it is computed in tiles
   of examples, only the upper triangle of tiles when ``x2 is None`` (the lower
   one is its transpose), each tile exactly what the untiled computation does on
   those pairs.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core.kernel import (
    Kernel,
    is_zero_ntk,
    select,
    swap_spatial_pairs,
)
from infnets._src.core.protocol import PACK_MIN_EXAMPLES, KernelLayer, input_kernel, leaves
from infnets._src.evaluate import compiled
from infnets._src.evaluate.chunks import (
    HEAP_KEEP_BYTES,
    Heap,
    NonFinitePair,
    evaluate_fc,
    single_threaded_ops,
    thread_workers,
    tune_heap,
)
from infnets._src.evaluate.input_kernels import spatial_input_kernel

__all__ = [
    "kernel_fn",
    "spatial_input_kernel",
    "default_memory_budget",
    "pair_bytes",
    "plan_spatial",
    "TEMPORARIES",
    "BUDGET_FRACTION",
]

#: working copies of each kept covariance alive at once inside a layer (the previous
#: and new records, the maps' temporaries, gathered variances); peak RSS measured on
#: CPU: 4 (pixel pairs, GlobalAvgPool net) to 5 (per-position, Flatten net) per kept
#: covariance (NNGP, NTK)
TEMPORARIES = 5.0
#: fraction of the free memory (RAM, or GPU memory on CUDA) used by default
BUDGET_FRACTION = 0.5
#: show the progress bar (progress=None) only when a run takes longer than this
PROGRESS_DELAY_S = 5.0
#: on CPUs, spatial kernels are computed in tiles of about this many covariance entries
#: per example pair block (~4 MiB in float64), so that every pass over them stays in cache
CACHE_TILE_ENTRIES = 1 << 21


# ------------------------------------------------------------- input kernel
def _fold(need: Any) -> bool:
    if isinstance(need, list):
        return any(_fold(n) for n in need)
    return bool(need)


def plan_spatial(
    layer: KernelLayer, spatial: bool, diagonal_spatial: bool | None
) -> tuple[bool, Any]:
    """Decide the input layout and what the output must keep, before computing.

    Args:
        layer: the architecture.
        spatial: whether the inputs are convolutional ``(N, C, *spatial)``.
        diagonal_spatial: ``None`` (automatic: pixel pairs only where some layer
            needs them), ``True`` (force per-position covariances; refused where a
            layer mixes positions) or ``False`` (keep every pixel pair throughout).

    Returns:
        ``(full_input, out_full)``: whether the input kernel keeps pixel pairs, and
        the requirement passed to :meth:`Layer.kernel_planned` (``None`` keeps
        every layout as it comes).

    Raises:
        ValueError: ``diagonal_spatial=True`` for an architecture that mixes positions.
    """
    if diagonal_spatial is not None and not isinstance(diagonal_spatial, bool):
        raise TypeError(
            f"kernel_fn: diagonal_spatial must be None, True or False, got {diagonal_spatial!r}."
        )
    if not spatial:
        return False, True
    if diagonal_spatial is None:
        return _fold(layer.spatial_requirement(True)), True
    if diagonal_spatial:
        if _fold(layer.spatial_requirement(False)):
            culprits = [leaf for leaf in leaves(layer) if _fold(leaf.spatial_requirement(False))]
            names = ", ".join(repr(c) for c in culprits) or repr(layer)
            raise ValueError(
                f"kernel_fn(..., diagonal_spatial=True): {names} mixes positions and needs "
                "the full spatial covariance (every pair of positions), so per-position "
                "covariances would give a wrong kernel. Use diagonal_spatial=None "
                "(automatic) or False."
            )
        return False, False
    return True, None


# ----------------------------------------------------------------- memory
def _branches(layer: KernelLayer) -> int:
    """An upper bound on the records alive at once: 1 + extra FanOut branches."""
    return 1 + sum(leaf.extra_records() for leaf in leaves(layer))


def pair_bytes(layer: KernelLayer, x1: Tensor, full_input: bool, need_ntk: bool) -> int:
    """Estimated peak memory of one pair of examples, in bytes.

    The largest number of positions ``P`` any layer sees (the input's, or more after layers
    that enlarge images: ``output_spatial`` of the protocol, followed through the layers in
    order) gives the covariance size per pair, ``P^2`` with pixel pairs or ``P`` without (1
    for fully-connected inputs). It is multiplied by the covariances kept (NNGP and NTK),
    :data:`TEMPORARIES` and the number of parallel branches.

    Args:
        layer: the architecture.
        x1: the inputs (shape and dtype).
        full_input: whether pixel pairs are kept at the input.
        need_ntk: whether the NTK is tracked.

    Returns:
        Bytes per pair of examples.
    """
    positions = 1
    if x1.ndim > 2:
        spatial = tuple(x1.shape[2:])
        positions = math.prod(spatial)
        for leaf in leaves(layer):
            spatial = leaf.output_spatial(spatial)
            positions = max(positions, math.prod(spatial))
    per_pair = positions * positions if full_input else positions
    kept = 2 if need_ntk else 1
    return int(math.ceil(per_pair * kept * TEMPORARIES * _branches(layer) * x1.element_size()))


def default_memory_budget(device: torch.device) -> int:
    """A safe share of the free memory: :data:`BUDGET_FRACTION` of free GPU memory on CUDA,
    else of the available RAM (``MemAvailable`` in ``/proc/meminfo``; 4 GiB if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_FRACTION)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    return int(avail * BUDGET_FRACTION)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _cache_side(x1: Tensor, full_input: bool, pairs: int) -> int:
    """Examples per tile side keeping a tile's covariances in cache (CPU, spatial inputs).

    Problems of at most two cache tiles are not split.
    """
    if x1.ndim <= 2 or x1.device.type != "cpu":
        return 1 << 62
    positions = math.prod(x1.shape[2:])
    per_pair = positions * positions if full_input else positions
    if pairs * per_pair <= 2 * CACHE_TILE_ENTRIES:
        return 1 << 62
    return max(1, math.isqrt(CACHE_TILE_ENTRIES // per_pair))


# ------------------------------------------------------------------ evaluate
def _single(
    layer: KernelLayer,
    x1: Tensor,
    x2: Tensor | None,
    need_ntk: bool,
    full_in: bool,
    out_full: Any,
    masks: tuple[Tensor | None, Tensor | None] = (None, None),
) -> Kernel:
    if x1.ndim == 2:  # fully connected: cache-blocked chunks of pairs (exact)
        return evaluate_fc(layer, x1, x2, need_ntk)
    k_in = spatial_input_kernel(x1, x2, need_ntk, full=full_in)
    if masks[0] is not None or masks[1] is not None:  # padded positions (masking.py)
        k_in = k_in.replace(mask1=masks[0], mask2=None if x2 is None else masks[1])
    k_out = layer.kernel_planned(k_in, out_full)
    if not isinstance(k_out, Kernel):
        raise ValueError(
            f"{layer!r} ends with {len(k_out)} branches; join them with a FanIn layer "
            "(FanInSum, FanInConcat, FanInProd) before asking for a kernel."
        )
    if is_zero_ntk(k_out.ntk):  # no parameter anywhere: a real tensor of zeros
        k_out = k_out.replace(ntk=torch.zeros_like(k_out.nngp))
    return k_out.to_dense()


def _mirror(t: Tensor, full_spatial: bool) -> Tensor:
    """Tile ``(j, i)`` from tile ``(i, j)``: swap the example axes (and each position pair)."""
    t = t.transpose(0, 1)
    return swap_spatial_pairs(t, 2) if full_spatial else t


def kernel_fn(
    layer: KernelLayer,
    x1: Any,
    x2: Any = None,
    get: str | Sequence[str] | None = None,
    *,
    diagonal_spatial: bool | None = None,
    memory_budget: int | float | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    mask_constant: float | None = None,
    mask1: Tensor | None = None,
    mask2: Tensor | None = None,
    per_layer: bool | Sequence[int] = False,
) -> Any:
    r"""Infinite-width kernels of ``layer`` on two batches, under a memory budget.

    Args:
        layer: the architecture.
        x1: ``(N1, features)`` or ``(N1, C, *spatial)`` inputs (1 to 3 spatial axes).
        x2: inputs of the same shape but batch size, or ``None`` for ``x2 = x1``.
        get: ``None`` (the :class:`Kernel` record), ``'nngp'``/``'ntk'``/``'cov1'``/
            ``'cov2'`` or a tuple of them (a named tuple).
        diagonal_spatial: ``None`` (default) keeps the pixel-pair covariances only
            where a layer needs them; ``True`` forces per-position covariances and
            refuses architectures that mix positions (pooling); ``False`` keeps all
            pixel pairs (slower; the same kernel). Ignored for fully-connected inputs.
        memory_budget: peak bytes for the kernel computation (default
            :func:`default_memory_budget`); larger problems are computed in tiles of
            examples. ``float('inf')`` means no limit.
        batch_size: examples per tile along each batch axis (overrides the tile size
            the budget would give).
        progress: show a tqdm progress bar over tiles (``None``: only for tiled runs
            that last longer than a few seconds).
        mask_constant: positions of ``(N, C, *spatial)`` inputs whose every channel
            equals it are padding, excluded by the layers that mix positions (see
            :mod:`infnets._src.core.masking`).
        mask1, mask2: explicit boolean masks ``(N, *spatial)`` of ``x1``/``x2``
            (``True`` at padded positions), instead of ``mask_constant``.

        per_layer: for a ``stax.serial`` network, ``True`` returns a list with the kernels
            after each of its layers (depth 1 to L), or a sequence of depths returns those
            (depth ``d``: after the first ``d`` layers), from one pass through the network:
            depth sweeps at the cost of the deepest call. Intermediate records of spatial
            networks keep the layout the next layer needs (``(N1, N2, *S)``, pixel pairs
            interleaved where a later layer needs them). Computed in one tile: refused when
            the problem needs tiling (``batch_size`` or over the memory budget).

    Returns:
        What ``get`` asks for; kernels have shape ``(N1, N2)`` (plus the output's
        spatial axes when the network ends with spatial activations: per-position
        with ``diagonal_spatial=True``, else every pixel pair, interleaved).

    Raises:
        MemoryError: before any work, when one pair of examples (or the result
            itself) cannot fit the budget.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(8, (3, 3), padding='SAME'), stax.Relu(),
        ...                   stax.Flatten(), stax.Dense(1))
        >>> x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
        >>> k = net.kernel_fn(x, None, 'nngp', batch_size=4)  # 2 x 2 tiles, 3 computed
        >>> torch.allclose(k, net.kernel_fn(x, None, 'nngp'))
        True
    """
    names = _inputs.parse_get(get)
    x1, x2 = _inputs.check_pair(x1, x2)
    _inputs.check_representable(x1, "x1")
    if x2 is not None:
        _inputs.check_representable(x2, "x2")
    need_ntk = "ntk" in names
    full_in, out_full = plan_spatial(layer, x1.ndim > 2, diagonal_spatial)
    masks: tuple[Tensor | None, Tensor | None] = (None, None)
    if mask_constant is not None or mask1 is not None or mask2 is not None:
        from infnets._src.core.masking import input_mask

        if mask2 is not None and x2 is None:
            raise ValueError("kernel_fn: mask2 given but x2 is None; pass mask1 only.")
        m1 = input_mask(x1, mask_constant, mask1, "x1")
        m2 = None if x2 is None else input_mask(x2, mask_constant, mask2, "x2")
        masks = (m1, m2)
    if _same_examples(x1, x2, masks):
        # x2 is x1 (Neural Tangents' x1_is_x2): the symmetric path,
        # where same-example entries are known as such (train-mode Dropout inflates them)
        x2, masks = None, (masks[0], None)

    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    per_pair = pair_bytes(layer, x1, full_in, need_ntk)
    if memory_budget is None:
        budget = default_memory_budget(x1.device)
    else:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
            raise TypeError(
                f"kernel_fn: memory_budget must be a number of bytes, got {memory_budget!r}."
            )
        if not memory_budget > 0:
            raise ValueError(f"kernel_fn: memory_budget must be > 0 bytes, got {memory_budget}.")
        budget = 1 << 62 if math.isinf(memory_budget) else int(memory_budget)  # inf: no limit
    if batch_size is not None:
        batch_size = _inputs.check_int(batch_size, "kernel_fn: batch_size", 1)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"kernel_fn: progress must be None, True or False, got {progress!r}.")

    if per_layer is not False:
        depths = _per_layer_depths(layer, per_layer)
        if batch_size is not None or pairs_of(n1, n2, x2 is None) * per_pair > budget:
            raise MemoryError(
                f"kernel_fn: per_layer computes {n1} x {n2} pairs in one tile, which needs more "
                f"than the memory budget of {_human(budget)} (or batch_size was given); raise "
                "memory_budget or pass x1 in row blocks."
            )
        return _per_layer(layer, x1, x2, get, need_ntk, full_in, out_full, masks, depths)

    if per_pair > budget:
        raise MemoryError(
            f"kernel_fn: one pair of examples needs about {_human(per_pair)} for {layer!r} "
            f"on inputs of shape {tuple(x1.shape[1:])} "
            f"({'every pixel pair' if full_in else 'per-position covariances'}, "
            f"{'NNGP and NTK' if need_ntk else 'NNGP'}), more than the memory budget of "
            f"{_human(budget)}. Raise memory_budget, ask for 'nngp' only, downsample the "
            "inputs, or avoid pooling (Flatten needs no pixel pairs)."
        )
    pairs = n1 * (n1 + 1) // 2 if x2 is None and n1 >= PACK_MIN_EXAMPLES else n1 * n2
    cache_side = _cache_side(x1, full_in, pairs)
    args = (layer, x1, x2, need_ntk, full_in, out_full, masks)
    if batch_size is None and pairs * per_pair <= budget and cache_side >= max(n1, n2):
        if x1.device.type == "cpu" and pairs * per_pair >= HEAP_TUNE_MIN_BYTES:
            tune_heap()  # large temporaries: reuse heap pages instead of page-faulting
        return select(_finite(_single, args), get)

    # ------------------------------------------------------------- tiled
    if batch_size is None:
        # one example shows the result's size per pair (and checks the architecture)
        probe = _single(
            layer, x1[:1], None, need_ntk, full_in, out_full, (_rows(masks[0], 0, 1), None)
        )
        out_per_pair = probe.nngp.numel() * (2 if need_ntk else 1) * x1.element_size()
        avail = budget - n1 * n2 * out_per_pair
        if avail < per_pair:
            raise MemoryError(
                f"kernel_fn: the result alone, {n1} x {n2} pairs of about "
                f"{_human(out_per_pair)} each, needs more than the memory budget of "
                f"{_human(budget)}; compute it in row blocks (x1[i:j]) or raise memory_budget."
            )
        # tiles run side by side on CPU threads (see _tile_workers): each needs its share
        workers = max(1, thread_workers(x1, 1 << 30))
        side = min(max(1, int(math.isqrt(int(avail // (per_pair * workers))))), cache_side)
    else:
        side = batch_size
    return select(_finite(_tiled, args, side, progress), get)


def _same_examples(
    x1: Tensor, x2: Tensor | None, masks: tuple[Tensor | None, Tensor | None]
) -> bool:
    """Whether ``x2`` is the very tensor ``x1`` (with the same mask): Neural Tangents'
    ``x1_is_x2`` for ``kernel_fn(x, x)``. An equal copy stays a second batch (it is how the
    symmetric and the general paths are checked against each other)."""
    if x2 is not x1:
        return False
    m1, m2 = masks
    if m1 is None or m2 is None:
        return m1 is None and m2 is None
    return torch.equal(m1, m2)


def pairs_of(n1: int, n2: int, symmetric: bool) -> int:
    """Pairs stored for ``n1 x n2`` examples (one triangle when packed)."""
    return n1 * (n1 + 1) // 2 if symmetric and n1 >= PACK_MIN_EXAMPLES else n1 * n2


def _per_layer_depths(layer: KernelLayer, per_layer: bool | Sequence[int]) -> list[int]:
    steps = getattr(layer, "kernel_steps", None)
    n = len(layer.sublayers())
    if steps is None or n == 0:
        raise ValueError(
            f"kernel_fn: per_layer needs a stax.serial network (its depths are its layers), "
            f"got {layer!r}."
        )
    if per_layer is True:
        return list(range(1, n + 1))
    if isinstance(per_layer, (bool, str)) or not isinstance(per_layer, Sequence):
        raise TypeError(
            f"kernel_fn: per_layer must be True or a sequence of depths 1..{n}, got {per_layer!r}."
        )
    depths = [_inputs.check_int(d, "kernel_fn: per_layer depth", 1) for d in per_layer]
    if not depths or max(depths) > n:
        raise ValueError(f"kernel_fn: per_layer depths must lie in 1..{n}, got {list(per_layer)}.")
    return depths


def _per_layer(
    layer: KernelLayer,
    x1: Tensor,
    x2: Tensor | None,
    get: str | Sequence[str] | None,
    need_ntk: bool,
    full_in: bool,
    out_full: Any,
    masks: tuple[Tensor | None, Tensor | None],
    depths: list[int],
) -> list[Any]:
    """The records after the requested depths of a serial network, in one pass."""
    if x1.ndim == 2:
        k_in = input_kernel(x1, x2, need_ntk)
    else:
        k_in = spatial_input_kernel(x1, x2, need_ntk, full=full_in)
        if masks[0] is not None or masks[1] is not None:
            k_in = k_in.replace(mask1=masks[0], mask2=None if x2 is None else masks[1])
    wanted = set(depths)
    found: dict[int, Kernel] = {}
    steps = layer.kernel_steps(k_in, out_full)  # type: ignore[attr-defined]
    for depth, k in enumerate(steps, 1):
        if depth not in wanted:
            continue
        if not isinstance(k, Kernel):
            raise ValueError(
                f"kernel_fn: per_layer depth {depth} of {layer!r} has {len(k)} branches; ask "
                "for depths where the branches are joined (after a FanIn layer)."
            )
        if is_zero_ntk(k.ntk):
            k = k.replace(ntk=torch.zeros_like(k.nngp))
        k = k.to_dense()
        bad = _inputs.non_finite_fields(k)
        if bad:
            raise FloatingPointError(
                f"kernel_fn: the kernel after layer {depth} of {layer!r} has NaN/Inf in "
                f"{bad} ({x1.dtype}); use float64 inputs or smaller weight scales."
            )
        found[depth] = k
        if len(found) == len(wanted):
            break
    return [select(found[d], get) for d in depths]


def _rows(m: Tensor | None, a: int, b: int) -> Tensor | None:
    return None if m is None else m[a:b]


def _finite(run: Any, args: tuple[Any, ...], *more: Any) -> Kernel:
    """``run(*args, *more)``, refusing a result with NaN/Inf (overflow from finite inputs).

    Fully-connected results are checked block by block while in cache
    (:func:`~infnets._src.evaluate.chunks.evaluate_fc`; ~1 % of its time), others once at
    the end (one pass, small beside a spatial kernel). Only when a check fails is the
    failing pair re-run layer by layer to name the layer (:func:`_locate`).
    """
    try:
        k = run(*args, *more)
    except NonFinitePair as err:
        raise _locate(args, (err.i, err.j)) from None
    except RuntimeError as err:  # a scalar (e.g. W_std**2) overflowing the dtype
        if "without overflow" not in str(err):
            raise
        raise _locate(args, (0, 0)) from err
    fc = args[1].ndim == 2  # nngp/ntk already checked per block
    bad = _inputs.non_finite_fields(k.replace(nngp=k.cov1, ntk=None) if fc else k)
    if bad:
        for name in ("nngp", "ntk", "cov1", "cov2"):
            t = getattr(k, name)
            if t is not None and not _inputs.all_finite(t):
                where = (~torch.isfinite(t)).nonzero()[0].tolist()
                i = where[0]
                pair = {"cov1": (i, i if args[2] is None else 0), "cov2": (0, i)}.get(name)
                raise _locate(args, pair or (where[0], where[1])) from None
    return k


def _locate(args: tuple[Any, ...], pair: tuple[int, int]) -> _inputs.KernelOverflowError:
    """The error naming the first layer whose output is not finite on ``pair`` (i, j).

    ``args`` are :func:`_single`'s ``(layer, x1, x2, need_ntk, full_in, out_full, masks)``.
    """
    layer, x1, x2, need_ntk, full_in, out_full, masks = args
    i, j = pair
    a = x1[i : i + 1]
    b = (None if i == j else x1[j : j + 1]) if x2 is None else x2[j : j + 1]
    m1 = _rows(masks[0], i, i + 1)
    m2 = (
        (None if i == j else _rows(masks[0], j, j + 1)) if x2 is None else _rows(masks[1], j, j + 1)
    )
    with _inputs.locating_overflow():
        if a.ndim == 2:
            k_in = input_kernel(a, b, need_ntk)
        else:
            k_in = spatial_input_kernel(a, b, need_ntk, full=full_in)
        if m1 is not None or m2 is not None:
            k_in = k_in.replace(mask1=m1, mask2=None if b is None else m2)
        bad = _inputs.non_finite_fields(k_in)
        if bad:
            return _inputs.KernelOverflowError((), "the input kernel x1 x2^T / d", a.dtype, bad)
        try:
            out = layer.kernel_planned(k_in, out_full)  # serial checks each of its layers
        except _inputs.KernelOverflowError as err:
            return err
        except RuntimeError as err:
            if "without overflow" not in str(err):
                raise
            return _inputs.KernelOverflowError((), repr(layer), a.dtype, ())
    bad = _inputs.non_finite_fields(out)
    what = repr(layer)
    if not bad:  # finite layer by layer: only the fused fast path overflowed
        what += " (on the fused fast path only; each layer alone stays finite)"
    return _inputs.KernelOverflowError((), what, a.dtype, bad)


#: most extra work accepted to give every tile the same shape (see _tiled)
PAD_FRACTION = 0.02
#: an untiled computation whose estimated working set reaches this many bytes tunes the heap
#: too (:func:`~infnets._src.evaluate.chunks.tune_heap`): its multi-megabyte temporaries then
#: reuse heap pages (the attention benchmark's 17 MB covariances: 74 -> 50 ms a call)
HEAP_TUNE_MIN_BYTES = 32 << 20


def _padded(x: Tensor, side: int) -> Tensor | None:
    """``x`` extended with copies of its first examples to a multiple of ``side``.

    ``None`` when no padding is needed or it would add more than
    :data:`PAD_FRACTION` of the examples.
    """
    n = x.shape[0]
    pad = -n % side
    if pad == 0 or pad > PAD_FRACTION * n:
        return None
    return torch.cat([x, x[:pad]])


def _tiled(
    layer: KernelLayer,
    x1: Tensor,
    x2: Tensor | None,
    need_ntk: bool,
    full_in: bool,
    out_full: Any,
    masks: tuple[Tensor | None, Tensor | None],
    side: int,
    progress: bool | None,
) -> Kernel:
    from tqdm.auto import tqdm

    symmetric = x2 is None
    xb = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], xb.shape[0]

    # Every tile gets the same shape: a short last block of rows (columns) is filled
    # up with copies of the first examples, whose pairs are computed and dropped
    # (at most PAD_FRACTION more work). Tiles then share one shape per layout, so
    # compiled kernels (infnets._src.evaluate.compiled) compile once, not again for the edge.
    def blocks(x: Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """The (padded) examples and the bounds of their blocks."""
        n, padded = x.shape[0], _padded(x, side)
        if padded is None:
            return x, [(a, min(a + side, n)) for a in range(0, n, side)]
        return padded, [(a, a + side) for a in range(0, n, side)]

    xs1, rows = blocks(x1)
    xsb, cols = (xs1, rows) if symmetric else blocks(xb)
    # masks follow their examples (padded like them)
    ms1 = None if masks[0] is None else _padded_like(masks[0], xs1.shape[0])
    msb = ms1 if symmetric else (None if masks[1] is None else _padded_like(masks[1], xsb.shape[0]))
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not symmetric or i <= j]
    out: dict[str, Tensor | None] = {}

    def compute(tile: tuple[int, int]) -> Kernel:
        (a0, a1), (b0, b1) = rows[tile[0]], cols[tile[1]]
        other = None if symmetric and tile[0] == tile[1] else xsb[b0:b1]
        tile_masks = (_rows(ms1, a0, a1), None if other is None else _rows(msb, b0, b1))
        try:
            return _single(layer, xs1[a0:a1], other, need_ntk, full_in, out_full, tile_masks)
        except NonFinitePair as err:  # tile indices -> example indices (padding wraps)
            j0 = a0 if other is None else b0
            raise NonFinitePair((a0 + err.i) % n1, (j0 + err.j) % n2) from None

    def store(tile: tuple[int, int], k: Kernel) -> None:
        """Write a tile (and its mirror) into the outputs: disjoint regions per tile."""
        i, j = tile
        (a0, a1), (b0, b1) = rows[i], cols[j]
        if a1 > n1 or b1 > n2:  # drop the pairs of padding examples
            a1, b1 = min(a1, n1), min(b1, n2)
            k = k.replace(
                nngp=k.nngp[: a1 - a0, : b1 - b0],
                ntk=None if k.ntk is None else k.ntk[: a1 - a0, : b1 - b0],
                cov1=k.cov1[: a1 - a0],
                cov2=None if k.cov2 is None else k.cov2[: b1 - b0],
            )
        nngp, ntk, cov1, cov2 = out["nngp"], out["ntk"], out["cov1"], out["cov2"]
        full = k.is_full_spatial
        nngp[a0:a1, b0:b1] = k.nngp  # type: ignore[index]
        if ntk is not None:
            assert k.ntk is not None  # allocated only when every tile tracks the NTK
            ntk[a0:a1, b0:b1] = k.ntk
        if symmetric:
            if i == j:
                cov1[a0:a1] = k.cov1  # type: ignore[index]
            else:
                nngp[b0:b1, a0:a1] = _mirror(k.nngp, full)  # type: ignore[index]
                if ntk is not None:
                    ntk[b0:b1, a0:a1] = _mirror(k.ntk, full)  # type: ignore[arg-type]
        else:
            if j == 0:
                cov1[a0:a1] = k.cov1  # type: ignore[index]
            if i == 0:
                assert k.cov2 is not None  # tiles of two batches carry both variances
                cov2[b0:b1] = k.cov2  # type: ignore[index]

    bar = tqdm(
        total=len(tiles),
        desc="kernel tiles",
        unit="tile",
        disable=progress is False,
        delay=0.0 if progress else PROGRESS_DELAY_S,
        leave=False,
    )
    workers = thread_workers(x1, len(tiles) - 1)
    if x1.device.type == "cpu":
        tune_heap()
    stack = contextlib.ExitStack()
    stack.enter_context(compiled.problem())
    try:
        # with tile threads, every tile (the first too) runs single-threaded torch ops,
        # so compiled kernels (infnets._src.evaluate.compiled) see one setting and compile once
        with single_threaded_ops() if workers > 1 else contextlib.nullcontext():
            first = compute(tiles[0])
        rest = tuple(first.nngp.shape[2:])
        out["nngp"] = first.nngp.new_empty((n1, n2) + rest)
        out["ntk"] = None if first.ntk is None else first.ntk.new_empty((n1, n2) + rest)
        per_example = tuple(first.cov1.shape[1:])
        out["cov1"] = first.cov1.new_empty((n1,) + per_example)
        out["cov2"] = None if symmetric else first.cov1.new_empty((n2,) + per_example)
        store(tiles[0], first)
        bar.update(1)
        if workers > 1 and not first.nngp.requires_grad:  # no autograd graph to share
            heap = Heap(HEAP_KEEP_BYTES)  # bounds fragmentation (see Heap)
            with single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
                futures = {pool.submit(compute, t): t for t in tiles[1:]}
                for fut in as_completed(futures):
                    store(futures.pop(fut), fut.result())
                    bar.update(1)
                    heap.check()
        else:
            for tile in tiles[1:]:
                store(tile, compute(tile))
                bar.update(1)
    finally:
        bar.close()
        stack.close()
    return first.replace(
        nngp=out["nngp"],
        ntk=out["ntk"],
        cov1=out["cov1"],
        cov2=out["cov2"],
        shape1=(n1,) + tuple(first.shape1[1:]),
        shape2=(n2,) + tuple(first.shape2[1:]),
        pair_index=None,
        n1=n1,
        n2=n2,
        mask1=None if first.mask1 is None else masks[0],
        mask2=None if first.mask2 is None else masks[1],
    )


def _padded_like(m: Tensor, n: int) -> Tensor:
    """A mask extended like :func:`_padded` extends its examples (copies of the first)."""
    pad = n - m.shape[0]
    return m if pad == 0 else torch.cat([m, m[:pad]])
