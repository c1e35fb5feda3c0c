r"""The operation registry of :func:`infnets.stax.from_torch`: torch op -> infnets layer.

Each ``torch.fx`` node (a module call, a function call or a tensor method) is looked up
in one registry by its key -- an ``nn.Module`` subclass (the most derived registered
base wins), a function object (``torch.relu``, ``operator.add``, ...) or a method name
(``"view"``) -- and its *converter* turns the call into an infnets layer. A converter
receives an :class:`Op` and returns a :class:`Conversion` (a layer and the graph nodes
it consumes), :data:`ALIAS` (an identity: ``nn.Dropout`` in eval mode, ``nn.Identity``),
:data:`META` (a shape computation such as ``x.size(0)``) or raises
:class:`FromTorchError`. New operations join with :func:`register_converter`, e.g. the
attention converter once ``stax.GlobalSelfAttention`` exists::

    @register_converter(nn.MultiheadAttention)
    def _attention(op: Op) -> Conversion: ...

(the refusals registered for attention by :mod:`~infnets._src.convert.from_torch_ops` are
defaults that never replace a converter registered for the same key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard, cast

from torch import fx, nn

from infnets._src.layers.base import Layer

__all__ = [
    "ALIAS",
    "CONVERTERS",
    "META",
    "Conversion",
    "Converter",
    "FALLBACK",
    "FromTorchError",
    "NeedsShapeError",
    "NotYetSupportedError",
    "Op",
    "Options",
    "Relayout",
    "find_converter",
    "first_input",
    "register_converter",
    "single",
]

#: a converter's answer for an identity (the node's value is its first tensor input)
ALIAS = object()
#: a converter's answer for a shape computation (``x.size(0)``, ``x.shape``)
META = object()

FALLBACK = (
    "Nothing was computed. Finite-width alternatives for this model: "
    "infnets.empirical.empirical_ntk_fn(model) (its NTK at the current weights) or "
    "infnets.empirical.monte_carlo_kernel_fn(*infnets.stax.reinit_fns(model), key=0, "
    "n_samples=64) (NNGP and NTK averaged over re-initialisations)."
)


class FromTorchError(ValueError):
    """An operation of the model has no exact infinite-width kernel in infnets.

    The message names the operation and the line of the model's source that calls it,
    and points to the finite-width Monte Carlo fallback (``infnets.empirical``).
    """


class NotYetSupportedError(FromTorchError, NotImplementedError):
    """An operation with an infinite-width limit that infnets does not convert yet."""


class NeedsShapeError(FromTorchError, TypeError):
    """A conversion that depends on the input's shape, asked without ``example_input``."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Conversion options of :func:`~infnets.stax.from_torch` (see there)."""

    parameterization: str = "standard"
    stds: str = "reset_parameters"
    W_std: float | Mapping[str, float] | None = None
    b_std: float | Mapping[str, float] | None = None
    deg: int = 24


@dataclasses.dataclass
class Op:
    """One call of the traced model, as a converter sees it.

    Attributes:
        node: the ``torch.fx`` node.
        target: the module (read only: never modify it), the function, or the method name.
        label: a readable name of the call, e.g. ``"nn.Linear 'fc1'"`` or ``"torch.relu"``.
        module_name: the qualified module name (``"layer1.0.conv1"``) of a module call.
        args, kwargs: the call's arguments (``fx.Node`` for tensors and shapes).
        where: the model's source line making the call (``"model.py:12: x = self.fc(x)"``).
        options: the conversion :class:`Options`.
        shapes: ``node -> shape`` from the example input (empty without one).
    """

    node: fx.Node
    target: Any
    label: str
    module_name: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    where: str
    options: Options
    shapes: dict[fx.Node, tuple[int, ...]]
    meta_nodes: set[fx.Node]
    layouts: dict[fx.Node, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def refuse(self, reason: str, cls: type[FromTorchError] = FromTorchError) -> FromTorchError:
        """The error to raise for this call: operation, source line, reason, fallback."""
        at = f" at {self.where}" if self.where else ""
        return cls(f"from_torch: cannot convert {self.label}{at}: {reason} {FALLBACK}")

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name``."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def layout(self, a: Any) -> tuple[int, ...] | None:
        """How the model holds node ``a``: ``None`` in infnets' ``(N, C, *spatial)`` order,
        else the permutation ``p`` with ``torch_tensor = infnets_tensor.permute(p)``
        (e.g. ``(0, 2, 1)`` for a ``batch_first`` sequence ``(N, L, C)``)."""
        return self.layouts.get(a) if isinstance(a, fx.Node) else None

    def is_tensor(self, a: Any) -> TypeGuard[fx.Node]:
        """Whether ``a`` is a tensor-valued node of the graph."""
        return isinstance(a, fx.Node) and a not in self.meta_nodes

    def shape(self, a: Any = None) -> tuple[int, ...] | None:
        """Shape of node ``a`` (default the first argument) on the example input."""
        return self.shapes.get(self.args[0] if a is None else a)

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        """Shape of this call's output on the example input."""
        return self.shapes.get(self.node)

    def need_shape(self, a: Any = None) -> tuple[int, ...]:
        """The shape of ``a``, or a refusal asking for ``example_input``."""
        s = self.shape(a)
        if s is None:
            raise self.refuse(
                "the conversion depends on the input's shape; pass example_input=x (a batch "
                "of inputs) to from_torch.",
                NeedsShapeError,
            )
        return s

    def constant(self, a: Any, what: str) -> Any:
        """``a`` as a Python constant, refusing tensors and shape computations."""
        if isinstance(a, fx.Node):
            raise self.refuse(f"{what} must be a constant, not computed from tensors.")
        return a


@dataclasses.dataclass
class Conversion:
    """A converter's result: ``layer`` applied to ``inputs`` (nodes), each maybe pre-mapped.

    Attributes:
        layer: the infnets layer (takes a list when there are several inputs).
        inputs: the graph nodes it consumes, in order.
        pre: per input, a layer applied first (e.g. ``Scale(-1)`` for ``a - b``), or ``None``.
        reader: ``reader(module) -> params`` reading the parameters of ``op.module_name`` in
            ``layer``'s layout (``None`` for layers without parameters).
        out_layout: the model's axis order of the output (see :meth:`Op.layout`).
        layout_aware: the converter handled its inputs' layouts itself; otherwise inputs
            held in a permuted order are accepted only by position-wise layers (activations,
            sums, scalings), whose output keeps that order.
    """

    layer: Layer
    inputs: tuple[fx.Node, ...]
    pre: tuple[Layer | None, ...] | None = None
    reader: Callable[[Any], Any] | None = None
    out_layout: tuple[int, ...] | None = None
    layout_aware: bool = False


@dataclasses.dataclass(frozen=True)
class Relayout:
    """A converter's answer for a permutation of axes: node ``src`` held in another order.

    The value is ``src``'s (no layer); ``layout`` is the new permutation from infnets'
    channels-first order to the model's (``None``: channels-first again), see
    :meth:`Op.layout`.
    """

    src: fx.Node
    layout: tuple[int, ...] | None


Converter = Callable[[Op], Any]

#: module types, functions and method names -> converter (see :func:`register_converter`)
CONVERTERS: dict[Any, Converter] = {}


def register_converter(*keys: Any) -> Callable[[Converter], Converter]:
    """Register a converter for module types, functions or tensor-method names.

    Args:
        *keys: ``nn.Module`` subclasses (subclasses of them match too, the most derived
            registered type wins), functions (``torch.tanh``, ``operator.add``) or method
            names (``"tanh"`` for ``x.tanh()``).

    Returns:
        A decorator storing the converter under every key (replacing earlier entries).

    Examples:
        A module of one's own that passes its input through (the registry is global, so an
        example must not replace the converter of a torch module):

        >>> from torch import nn
        >>> from infnets._src.convert.from_torch_ops import ALIAS, register_converter
        >>> class PassThrough(nn.Module):
        ...     def forward(self, x):
        ...         return x
        >>> @register_converter(PassThrough)
        ... def _pass_through(op, alias=ALIAS):
        ...     return alias
    """

    def deco(fn: Converter) -> Converter:
        for key in keys:
            CONVERTERS[key] = fn
        return fn

    return deco


def find_converter(target: Any) -> Converter | None:
    """The converter of a module (by type, most derived first), function or method name.

    A module whose class overrides ``forward`` of the registered base it derives from
    has no converter (``torch.fx`` traces through its own ``forward``).
    """
    if isinstance(target, nn.Module):  # a subclass with its own forward is traced through
        for cls in type(target).__mro__:
            if cls in CONVERTERS:  # a registered module class (a base of ``target``'s)
                base = cast(type[nn.Module], cls)
                return CONVERTERS[cls] if type(target).forward is base.forward else None
        return None
    try:
        return CONVERTERS.get(target)
    except TypeError:  # unhashable
        return None


def first_input(op: Op) -> fx.Node:
    x = op.args[0] if op.args else op.kwargs.get("input")
    if not op.is_tensor(x):
        raise op.refuse("its first argument is not a tensor computed from the input.")
    return x


def single(op: Op, layer: Layer) -> Conversion:
    return Conversion(layer, (first_input(op),))
