r"""Layers as functions of shared hyper-parameters, and kernels differentiated in them.

The scikit-learn and GPyTorch adapters (:mod:`infnets.sklearn`, :mod:`infnets.gpytorch`)
fit the weight and bias standard deviations ``W_std`` and ``b_std`` of an architecture.
An architecture is turned into a function of these two numbers in one of two ways:

* a *layer*: every affine layer (any dataclass layer with ``W_std`` and ``b_std``
  fields, e.g. ``Dense`` and ``Conv``) is rebuilt with the shared values by
  ``dataclasses.replace``; layers without a bias (``b_std=None``) keep none;
* a *factory* ``layer_fn(W_std, b_std) -> Layer`` for any other sharing pattern.

The values may be tensors with ``requires_grad``: the kernel maps are tensor code, so
autograd differentiates the kernel in the hyper-parameters. :func:`kernel_jacobian`
computes the full ``(N, N, P)`` Jacobian with ``P + 1`` reverse passes (the
double-backward trick: ``g(u) = J^T u`` is linear in ``u``, so ``dg_p / du = J_p``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.layers.base import Layer

__all__ = [
    "DEFAULT_GET",
    "LayerSpec",
    "affine_layers",
    "read_stds",
    "with_stds",
    "build_layer",
    "kernel_matrix",
    "kernel_diag",
    "kernel_jacobian",
]

#: a layer whose affine layers share W_std/b_std, or a factory ``layer_fn(W_std, b_std)``
LayerSpec = Layer | Callable[[Any, Any], Layer]

#: the default kernel of the scikit-learn and GPyTorch ``InfiniteWidthKernel`` classes: the
#: NNGP, the prior covariance of the network's outputs (a kernel object is a GP prior; the
#: NTK is the ``get='ntk'`` option, and what the ``NTK*`` estimators use)
DEFAULT_GET = "nngp"

#: rows per block when only the diagonal of a kernel is wanted
DIAG_BLOCK = 128


def _is_affine(layer: Any) -> bool:
    if not dataclasses.is_dataclass(layer):
        return False
    names = {f.name for f in dataclasses.fields(layer)}
    return {"W_std", "b_std"} <= names


def _children(layer: Any) -> tuple[Layer, ...] | None:
    kids = getattr(layer, "layers", None)
    if isinstance(kids, tuple) and all(isinstance(k, Layer) for k in kids):
        return kids
    return None


def affine_layers(layer: Layer) -> list[Layer]:
    """Every affine layer (with ``W_std``/``b_std`` fields) of ``layer``, in order.

    Args:
        layer: an infnets layer (``serial``/``parallel`` are searched recursively).

    Returns:
        The list of affine layers (``Dense``, ``Conv``, ...), possibly empty.
    """
    if _is_affine(layer):
        return [layer]
    kids = _children(layer)
    if kids is None:
        return []
    return [a for k in kids for a in affine_layers(k)]


def with_stds(layer: Layer, W_std: Any, b_std: Any) -> Layer:  # noqa: N803 - paper names
    """A copy of ``layer`` whose affine layers all use ``W_std`` and ``b_std``.

    Affine layers without a bias (``b_std is None``) stay without one.

    Args:
        layer: an infnets layer.
        W_std: shared weight standard deviation (float or scalar tensor).
        b_std: shared bias standard deviation (float or scalar tensor).

    Returns:
        The rebuilt layer (``layer`` itself is unchanged: layers are immutable).
    """
    if _is_affine(layer):
        b = None if layer.b_std is None else b_std  # type: ignore[attr-defined]
        return dataclasses.replace(layer, W_std=W_std, b_std=b)  # type: ignore[type-var]
    kids = _children(layer)
    if kids is None:
        return layer
    return type(layer)(*(with_stds(k, W_std, b_std) for k in kids))


def read_stds(layer: Layer, who: str) -> tuple[float, float | None]:
    """Initial shared ``(W_std, b_std)``: those of the first affine layer of ``layer``.

    Warns when the affine layers disagree, since sharing will make them equal.

    Args:
        layer: an infnets layer with at least one affine layer.
        who: the caller's name for messages.

    Returns:
        ``(W_std, b_std)``; ``b_std`` is ``None`` when no affine layer has a bias.
    """
    affine = affine_layers(layer)
    if not affine:
        raise ValueError(
            f"{who}: {layer!r} has no affine layer (Dense/Conv) whose W_std/b_std could be "
            "fitted; pass a factory layer_fn(W_std, b_std) instead."
        )
    ws = [float(a.W_std) for a in affine]  # type: ignore[attr-defined]
    bs = [float(a.b_std) for a in affine if a.b_std is not None]  # type: ignore[attr-defined]
    if len(set(ws)) > 1 or len(set(bs)) > 1:
        warnings.warn(
            f"{who}: the affine layers have different W_std {ws} / b_std {bs}; the kernel "
            f"shares one value across them, starting from the first layer's "
            f"(W_std={ws[0]}, b_std={bs[0] if bs else None}). Pass a factory "
            "layer_fn(W_std, b_std) for another sharing pattern.",
            stacklevel=3,
        )
    return ws[0], (bs[0] if bs else None)


def build_layer(spec: LayerSpec, W_std: Any, b_std: Any, who: str) -> Layer:  # noqa: N803
    """The layer for hyper-parameters ``(W_std, b_std)`` from a layer or a factory.

    Args:
        spec: an infnets layer (its affine layers are rebuilt by :func:`with_stds`) or
            a factory ``layer_fn(W_std, b_std) -> Layer``.
        W_std: weight standard deviation (float or scalar tensor).
        b_std: bias standard deviation (float, scalar tensor or ``None``).
        who: the caller's name for messages.

    Returns:
        An infnets layer.
    """
    with warnings.catch_warnings():
        # the layers' argument checks read tensor hyper-parameters with float()
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        return _build(spec, W_std, b_std, who)


def _build(spec: LayerSpec, W_std: Any, b_std: Any, who: str) -> Layer:  # noqa: N803
    if isinstance(spec, Layer):
        return with_stds(spec, W_std, b_std)
    if not callable(spec):
        raise TypeError(
            f"{who}: layer must be an infnets layer or a factory layer_fn(W_std, b_std), "
            f"got {type(spec).__name__}."
        )
    out = spec(W_std, b_std)
    if not isinstance(out, Layer):
        raise TypeError(
            f"{who}: layer_fn(W_std, b_std) must return an infnets layer, got {type(out).__name__}."
        )
    return out


def reshape_inputs(x: Tensor, input_shape: Sequence[int] | None, who: str) -> Tensor:
    """``(N, D)`` rows to ``(N, *input_shape)`` (e.g. images for convolutions)."""
    if input_shape is None:
        return x
    shape = tuple(int(s) for s in input_shape)
    n_feat = 1
    for s in shape:
        n_feat *= s
    if x.ndim != 2 or x.shape[1] != n_feat:
        raise ValueError(
            f"{who}: input_shape={shape} needs inputs of shape (N, {n_feat}), got {tuple(x.shape)}."
        )
    return x.reshape((x.shape[0],) + shape)


def kernel_matrix(layer: Layer, x1: Tensor, x2: Tensor | None, get: str) -> Tensor:
    """The ``(N1, N2)`` kernel ``get`` (``'nngp'`` or ``'ntk'``) of ``layer``."""
    return layer.kernel_fn(x1, x2, get)


def kernel_diag(layer: Layer, x: Tensor, get: str, block: int = DIAG_BLOCK) -> Tensor:
    """The ``(N,)`` diagonal ``k(x_i, x_i)`` without the full ``(N, N)`` matrix.

    The NNGP variance comes with every kernel record (``cov1``); the NTK's diagonal
    is read from symmetric blocks of ``block`` rows, ``O(N block)`` work.
    """
    if get == "nngp":
        return layer.kernel_fn(x, None, "cov1")
    parts = [
        layer.kernel_fn(x[lo : lo + block], None, get).diagonal()
        for lo in range(0, x.shape[0], block)
    ]
    return torch.cat(parts)


def kernel_jacobian(fn: Callable[[Tensor], Tensor], params: Tensor) -> tuple[Tensor, Tensor]:
    r"""A tensor-valued function and its full Jacobian in a few parameters.

    With ``K = fn(p)`` of shape ``S`` and ``P`` parameters, ``g(u) = J^T u`` (one
    reverse pass with ``create_graph``) is linear in the cotangent ``u``, and
    ``d g_j / d u = dK / dp_j`` (one more reverse pass each): ``P + 1`` passes
    instead of the ``prod(S)`` a plain reverse-mode Jacobian would need.

    Args:
        fn: maps the ``(P,)`` parameter tensor to a tensor ``K``.
        params: ``(P,)`` parameter values.

    Returns:
        ``(K, J)``: ``K`` detached, of shape ``S``; ``J`` of shape ``(*S, P)`` with
        ``J[..., j] = dK / dp_j`` (zeros where ``K`` does not depend on ``p_j``).

    Examples:
        >>> import torch
        >>> k, j = kernel_jacobian(lambda p: p[0] ** 2 * torch.ones(2, 2), torch.tensor([3.0]))
        >>> j[..., 0]
        tensor([[6., 6.],
                [6., 6.]])
    """
    p = params.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        k = fn(p)
        if not k.requires_grad:
            return k.detach(), k.new_zeros(tuple(k.shape) + (p.numel(),))
        u = torch.zeros_like(k, requires_grad=True)
        (g,) = torch.autograd.grad(k, p, grad_outputs=u, create_graph=True, allow_unused=True)
        cols = []
        for j in range(p.numel()):
            if g is None or not g[j].requires_grad:
                cols.append(torch.zeros_like(k))
                continue
            (col,) = torch.autograd.grad(g[j], u, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(k) if col is None else col)
    return k.detach(), torch.stack([c.detach() for c in cols], dim=-1)
