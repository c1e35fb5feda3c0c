r"""Architectures as estimator parameters: layers, ``stax`` expressions, factories.

scikit-learn copies parameters (``clone`` deep-copies them) and compares them (a kernel's
``__eq__``, ``GridSearchCV``'s printed ``best_params_``). infnets layers compare by
identity, so a copied layer is "different". Here an architecture is identified by its
*canonical key*: the layer's ``repr``, a ``stax`` expression, accepted only when it
describes the layer completely, i.e. when parsing it back with
:func:`infnets._src.app.arch_parser.parse_arch` gives a layer with the same ``repr``
(layers holding functions or tensors have no key and compare by identity).

Architectures may also be given as that text, e.g.
``"serial(Dense(512, W_std=1.5), Relu(), Dense(1))"``, which is convenient in parameter
grids: ``best_params_`` then prints the text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infnets._src.app.arch_parser import ArchError, parse_arch
from infnets._src.layers.base import Layer

__all__ = [
    "ArchSpec",
    "architecture_key",
    "describe",
    "resolve_layer",
    "same_architecture",
]

#: what estimators accept as an architecture: a layer, a ``stax`` expression, or ``None``
ArchSpec = Layer | str | None


def resolve_layer(spec: Any, who: str, default: Callable[[], Layer] | None = None) -> Layer:
    """The layer an architecture parameter names.

    Args:
        spec: an infnets layer, the text of a ``stax`` expression, or ``None``.
        who: the caller's name for messages.
        default: builds the layer for ``spec=None`` (``None``: refuse ``None``).

    Returns:
        An infnets layer.

    Raises:
        TypeError: ``spec`` is of another type.
        ValueError: the text is not a valid ``stax`` expression (an ``ArchError``).

    Examples:
        >>> resolve_layer("serial(Dense(8), Relu(), Dense(1))", "demo").layers[1]
        Relu()
    """
    if isinstance(spec, Layer):
        return spec
    if isinstance(spec, str):
        try:
            return parse_arch(spec)
        except ArchError as err:
            raise ValueError(f"{who}: layer {spec!r} is not a stax expression: {err}") from err
    if spec is None and default is not None:
        return default()
    raise TypeError(
        f"{who}: layer must be an infnets layer or the text of a stax expression"
        f"{' (or None)' if default is not None else ''}, got {type(spec).__name__}."
    )


def architecture_key(layer: Any) -> str | None:
    """The canonical text of an architecture, or ``None`` when it has none.

    The key is ``repr(layer)`` when that text parses back into a layer with the same
    ``repr`` (so it describes the layer completely); layers holding functions
    (``Elementwise``) or tensor hyper-parameters get ``None``.

    Args:
        layer: an infnets layer or the text of a ``stax`` expression.

    Returns:
        The key, or ``None``.

    Examples:
        >>> from infnets import stax
        >>> a = stax.serial(stax.Dense(8, W_std=1.5), stax.Relu())
        >>> architecture_key(a) == architecture_key("serial(Dense(8, W_std=1.5), Relu())")
        True
    """
    try:
        if isinstance(layer, str):
            layer = parse_arch(layer)
        if not isinstance(layer, Layer):
            return None
        text = repr(layer)
        return text if repr(parse_arch(text)) == text else None
    except (ArchError, TypeError, ValueError, SyntaxError, RecursionError):
        return None


def same_architecture(a: Any, b: Any) -> bool:
    """Whether two architecture parameters describe the same network.

    Identical objects are the same; layers and ``stax`` texts compare by
    :func:`architecture_key`; anything else (factories, layers without a key) by identity.

    Args:
        a: an architecture parameter (layer, text, factory or ``None``).
        b: another one.

    Returns:
        ``True`` when they are the same architecture.
    """
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, (Layer, str)) and isinstance(b, (Layer, str)):
        key = architecture_key(a)
        return key is not None and key == architecture_key(b)
    return False


def describe(spec: Any) -> str:
    """Short text naming an architecture parameter, for ``repr``.

    Args:
        spec: a layer, a ``stax`` text, a factory or ``None``.

    Returns:
        The layer's ``repr``, the text quoted, or the factory's qualified name.
    """
    if isinstance(spec, str):
        return repr(spec)
    if isinstance(spec, Layer) or spec is None:
        return repr(spec)
    name = getattr(spec, "__qualname__", None) or type(spec).__name__
    return f"<factory {name}>"
