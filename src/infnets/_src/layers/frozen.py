r"""Frozen layers: parameters drawn at random but never trained.

A network whose layer ``l`` is not trained has the same random function at
initialisation, so the same NNGP, but its NTK sums the gradient inner products of the
*trained* parameters only (Jacot et al. 2018, "Neural tangent kernel", eq. 2: the
NTK is ``sum_p df/dtheta_p df/dtheta_p`` over trained ``theta``). Every infinite-width
layer maps the NTK of its input affinely,

``Theta' = T(K) + L_K(Theta)``,

where ``T(K)`` is the contribution of the layer's own parameters and ``L_K`` carries the
earlier layers' contributions through it (``W_std^2 Theta`` for ``Dense``, ``Theta
E[phi' phi']`` for a nonlinearity, ...; Arora et al. 2019, "On exact computation with an
infinitely wide neural net", section 3). Freezing drops ``T``: ``Theta' = L_K(Theta) =
Theta'(Theta) - Theta'(0)``, computed exactly by running the layer's kernel map on the
input record and on the same record with a zero NTK. This holds for any layer or
container (compositions of affine maps are affine), at twice the cost of the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from infnets._src.core.kernel import Kernel, is_zero_ntk, zero_ntk
from infnets._src.core.protocol import KernelTree
from infnets._src.layers.base import Layer, Wrapper, as_layer_list

__all__ = ["Frozen"]


def _records(k: KernelTree) -> list[Kernel]:
    return k if isinstance(k, list) else [k]


def _each(k: KernelTree, fn: Callable[[Kernel], Kernel]) -> KernelTree:
    """``fn`` applied to every record of ``k``, keeping the (possibly nested) list structure."""
    if isinstance(k, list):
        # a nested list comes back as a list: KernelTree types only the flat case
        return [cast(Kernel, _each(kk, fn)) for kk in k]
    return fn(k)


def _with_zero_ntk(k: KernelTree) -> KernelTree:
    return _each(k, lambda kk: kk.replace(ntk=zero_ntk(kk.nngp)))


def _ntk_difference(full: KernelTree, own: KernelTree) -> KernelTree:
    if isinstance(full, list):
        # ``own`` has the structure of ``full``: the same layer ran on the same records
        own_list = cast(list[Kernel], own)
        return [cast(Kernel, _ntk_difference(f, o)) for f, o in zip(full, own_list)]
    own_k = cast(Kernel, own)
    # both runs track the NTK: the caller returns early when the input has none
    assert full.ntk is not None and own_k.ntk is not None
    return full.replace(ntk=full.ntk - own_k.ntk)


def _zero_out(k: KernelTree) -> KernelTree:
    return _each(k, lambda kk: kk.replace(ntk=zero_ntk(kk.nngp)))


class Frozen(Wrapper):
    r"""``layer`` with its parameters not trained: same NNGP, NTK without their gradients.

    Kernels (module docstring): the NNGP is ``layer``'s; the NTK is
    ``Theta'(Theta) - Theta'(0)``, the NTK of the network with this layer's own
    contribution removed (exact: every layer maps the NTK affinely). A frozen layer on
    raw inputs therefore contributes nothing to the NTK.

    The finite twin is ``layer``'s, with the same parameters; ``to_module`` registers
    them with ``requires_grad=False``, so ``torch.optim`` and
    ``infnets.empirical.empirical_ntk_fn`` leave them out, matching the kernel. (When
    training through ``apply_fn`` directly, leave them out of the optimiser yourself.)

    Args:
        layer: any infnets layer or container, e.g. ``Dense(512)`` or a whole block.

    Examples:
        >>> from infnets import stax
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> net = stax.serial(stax.Frozen(stax.Dense(8, 1.5)), stax.Relu(), stax.Dense(1))
        >>> k = net.kernel_fn(x, None, ('nngp', 'ntk'))
        >>> torch.allclose(k.ntk, k.nngp)  # only the last layer trains: Theta = K
        True
        >>> m = net.to_module((-1, 3))
        >>> [p.requires_grad for p in m.parameters()]
        [False, True]
    """

    #: read by :class:`~infnets._src.layers.base.StaxModule` to freeze the finite twin
    frozen = True

    def __init__(self, layer: Layer) -> None:
        (self.layer,) = as_layer_list([layer], "Frozen")

    def __repr__(self) -> str:
        return f"Frozen({self.layer!r})"

    def extra_records(self) -> int:
        return sum(leaf.extra_records() for leaf in _leaves(self.layer)) + 1

    # --------------------------------------------------------------- infinite
    def kernel(self, k: KernelTree) -> KernelTree:
        return self._frozen(k, self.layer.kernel)

    def kernel_planned(self, k: KernelTree, out_full: Any) -> KernelTree:
        return self._frozen(k, lambda kk: self.layer.kernel_planned(kk, out_full))

    def _frozen(self, k: KernelTree, run: Callable[[KernelTree], KernelTree]) -> KernelTree:
        records = _records(k)
        if any(r.ntk is None for r in records):
            return run(k)  # NNGP only
        if all(is_zero_ntk(r.ntk) for r in records):
            return _zero_out(run(k))  # only this layer's contribution, removed
        return _ntk_difference(run(k), run(_with_zero_ntk(k)))


def _leaves(layer: Layer) -> Sequence[Layer]:
    kids = layer.sublayers()
    return [layer] if not kids else [leaf for kid in kids for leaf in _leaves(kid)]
