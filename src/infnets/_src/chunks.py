"""Cache-blocked evaluation of fully-connected kernels over chunks of example pairs."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch
from torch import Tensor

from infnets._src.kernel import Kernel

__all__ = ["PAIR_CHUNK", "evaluate_in_chunks"]

#: pairs of examples per chunk on the fully-connected path: the temporaries of a
#: chunk (8 bytes per pair in float64) stay in the CPU's cache between layers
PAIR_CHUNK = 1 << 15


def _joined(layer: Any, k_out: Any) -> Kernel:
    if not isinstance(k_out, Kernel):
        raise ValueError(
            f"{layer!r} ends with {len(k_out)} branches; join them with a FanIn layer "
            "(FanInSum, FanInConcat, FanInProd) before asking for a kernel."
        )
    return k_out


def evaluate_in_chunks(layer: Any, k_in: Kernel, chunk: int = PAIR_CHUNK) -> Kernel:
    """Run ``layer.kernel`` on a fully-connected input kernel, a chunk of pairs at a time.

    Every fully-connected layer maps each pair of examples independently (given
    the per-example variances, which each chunk carries whole), so evaluating
    the network on chunks of pairs gives exactly the result of one evaluation on
    all pairs. Small chunks keep the temporaries of the elementwise maps in
    cache and bound the scratch memory to O(chunk) beyond the output. Packed
    (symmetric) chunks are written straight into both triangles of the dense
    output. Under autograd the whole problem is evaluated at once.

    Args:
        layer: the network (an infnets layer).
        k_in: an input kernel of 2-D inputs (dense or packed layout, no spatial axes).
        chunk: pairs per chunk.

    Returns:
        The output kernel in the dense ``(N1, N2)`` layout.
    """
    nngp_in, ntk_in = k_in.nngp, k_in.ntk
    n_pairs = nngp_in.numel()
    grad = torch.is_grad_enabled() and nngp_in.requires_grad
    if n_pairs <= chunk or grad or nngp_in.ndim != (1 if k_in.pair_index is not None else 2):
        return _joined(layer, layer.kernel(k_in)).to_dense()

    def part(nngp: Tensor, **changes: Any) -> Kernel:
        ntk = None if ntk_in is None else torch.zeros_like(nngp)
        return _joined(layer, layer.kernel(k_in.replace(nngp=nngp, ntk=ntk, **changes)))

    out_nngp = nngp_in.new_empty((k_in.n1, k_in.n2))
    out_ntk = None if ntk_in is None else torch.empty_like(out_nngp)
    index = k_in.pair_index
    if index is not None:  # symmetric: upper-triangle pairs, mirrored

        def packed(start: int) -> Kernel:
            sl = slice(start, start + chunk)
            i, j = index[0, sl], index[1, sl]
            k = part(nngp_in[sl], pair_index=index[:, sl])
            out_nngp[i, j] = k.nngp
            out_nngp[j, i] = k.nngp
            if out_ntk is not None:
                out_ntk[i, j] = k.ntk  # type: ignore[assignment]
                out_ntk[j, i] = k.ntk  # type: ignore[assignment]
            return k

        k = _map(packed, range(0, n_pairs, chunk))[0]
        return k.replace(nngp=out_nngp, ntk=out_ntk, pair_index=None)
    rows = max(1, chunk // k_in.n2)

    def block(start: int) -> Kernel:
        sl = slice(start, start + rows)
        part_nngp = nngp_in[sl]
        k = part(part_nngp, cov1=k_in.cov1[sl], n1=part_nngp.shape[0])
        out_nngp[sl] = k.nngp
        if out_ntk is not None:
            out_ntk[sl] = k.ntk  # type: ignore[assignment]
        return k

    parts = _map(block, range(0, k_in.n1, rows))
    k = parts[0]
    cov1 = torch.cat([p.cov1 for p in parts])
    shape1 = (k_in.n1,) + tuple(k.shape1[1:])
    return k.replace(nngp=out_nngp, ntk=out_ntk, cov1=cov1, n1=k_in.n1, shape1=shape1)


def _map(fn: Any, starts: range) -> list[Kernel]:
    """``[fn(s) for s in starts]``, spread over ``torch.get_num_threads()`` threads.

    Chunks are small enough that each torch op runs on one thread (below ATen's
    parallel grain), so the chunks themselves are the unit of parallel work:
    no OpenMP barrier per elementwise op, which matters on busy machines. Torch
    ops release the GIL; the chunks write disjoint parts of the output.
    """
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        return [fn(s) for s in starts]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, starts))
