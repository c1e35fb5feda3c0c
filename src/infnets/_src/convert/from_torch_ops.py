r"""The converters of :func:`infnets.stax.from_torch`, one per torch operation.

Each is registered in :data:`~infnets._src.convert.from_torch_registry.CONVERTERS` by
:func:`~infnets._src.convert.from_torch_registry.register_converter` when this module is imported.

Hyper-parameters (see ``docs/from_torch.md``): ``nn.Linear``/``nn.Conv*d`` with fan-in
``n`` (``in_features``, or ``in_channels * prod(kernel_size)``) are sampled by PyTorch's
``reset_parameters`` as ``W ~ U(-1/sqrt(n), 1/sqrt(n))`` (``kaiming_uniform_(a=sqrt(5))``)
and ``b ~ U(-1/sqrt(n), 1/sqrt(n))``, so ``Var W = Var b = 1 / (3 n)``:
``W_std^2 = n Var W = 1/3`` and ``b_std^2 = Var b = 1 / (3 n)`` at the model's own ``n``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.conv import _ConvNd

from infnets._src.convert.from_torch_layers import PAD_MODES, ChannelAffine, Pad, Scale
from infnets._src.convert.from_torch_registry import (
    ALIAS,
    CONVERTERS,
    META,
    Conversion,
    Converter,
    FromTorchError,
    NeedsShapeError,
    NotYetSupportedError,
    Op,
    first_input,
    register_converter,
    single,
)
from infnets._src.elementwise import rectified as ew_rect
from infnets._src.elementwise import smooth as ew_smooth
from infnets._src.elementwise.numerical import ElementwiseNumerical
from infnets._src.layers import combinators as comb
from infnets._src.layers.base import Layer
from infnets._src.layers.dense import Dense
from infnets._src.layers.normalization import LayerNorm
from infnets._src.spatial import pooling
from infnets._src.spatial.conv import Conv, axis_geometry

__all__ = ["KINKED_DEG", "activation"]

#: Gauss-Hermite nodes for activations without a closed form whose derivative jumps
#: (``Hardtanh`` and the like converge slowly at kinks away from 0)
KINKED_DEG = 96


def _std(op: Op, name: str, value: float) -> float:
    given = getattr(op.options, name)
    if isinstance(given, Mapping):
        return float(given.get(op.module_name, value))
    return value if given is None else float(given)


def _tensor(m: nn.Module, name: str) -> Tensor:
    """The parameter ``name`` of ``m`` (``nn.Module`` attributes type as ``Tensor | Module``)."""
    return cast(Tensor, getattr(m, name))


def _affine_stds(op: Op, m: nn.Module, fan_in: int) -> tuple[float, float | None]:
    """``(W_std, b_std)`` of a ``Linear``/``Conv`` (see the module docstring)."""
    has_bias = getattr(m, "bias", None) is not None
    if op.options.stds == "weights":
        w = _tensor(m, "weight").detach()
        w_std = math.sqrt(fan_in * float(w.double().pow(2).mean()))
        b_std = None
        if has_bias:
            b_std = math.sqrt(float(_tensor(m, "bias").detach().double().pow(2).mean()))
    else:
        w_std = 1.0 / math.sqrt(3.0)
        b_std = 1.0 / math.sqrt(3.0 * fan_in) if has_bias else None
    w_std = _std(op, "W_std", w_std)
    if has_bias:
        b_std = _std(op, "b_std", b_std)  # type: ignore[arg-type]
    return w_std, b_std


def _reader(parameterization: str, w_std: float, b_std: float | None, fan_in: int) -> Any:
    """Read ``weight``/``bias`` of a module into ``{'W', 'b'}`` in the given parameterization.

    Standard: the tensors themselves (copies). NTK: ``W / (W_std / sqrt(n))`` and
    ``b / b_std``, so that ``apply_fn`` computes the same function.
    """

    def read(m: nn.Module) -> dict[str, Tensor]:
        w = _tensor(m, "weight").detach().clone()
        out = {"W": w}
        if b_std is not None:
            out["b"] = _tensor(m, "bias").detach().clone()
        if parameterization == "ntk":
            for name, std in (("W", w_std / math.sqrt(fan_in)), ("b", b_std)):
                if name in out:
                    assert std is not None  # "b" is read only with a b_std
                    if std == 0:
                        raise FromTorchError(
                            f"params_from: {name}_std = 0 in the NTK parameterization cannot "
                            "represent the module's weights; use parameterization='standard'."
                        )
                    out[name] = out[name] / std
        return out

    return read


# ------------------------------------------------------------------ affine layers
@register_converter(nn.Linear)
def _linear(op: Op) -> Conversion:
    m = op.target
    shape = op.shape()
    if shape is not None and len(shape) != 2:
        raise op.refuse(
            f"nn.Linear acts on the last axis of a {len(shape)}-D tensor {tuple(shape)}; "
            "only (N, features) inputs have an infinite-width kernel here (flatten or pool "
            "first; sequence models need attention layers)."
        )
    w_std, b_std = _affine_stds(op, m, m.in_features)
    par = op.options.parameterization
    layer = Dense(m.out_features, w_std, b_std, par)
    return Conversion(layer, (first_input(op),), reader=_reader(par, w_std, b_std, m.in_features))


def _conv_padding(op: Op, m: _ConvNd, spatial: tuple[int, ...] | None) -> tuple[str, Any]:
    """``(conv padding, Pad layer or None)`` for an ``nn.Conv*d``."""
    nd = len(m.kernel_size)
    mode = m.padding_mode
    if m.padding == "valid" or (not isinstance(m.padding, str) and not any(m.padding)):
        return "VALID", None
    if m.padding == "same":
        # stride 1 (PyTorch's rule): total k - 1, lo = total // 2 as infnets' SAME
        if mode == "zeros":
            return "SAME", None
        pads = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in m.kernel_size)
        return "VALID", Pad(pads, mode)
    padding = cast(tuple[int, ...], m.padding)  # torch's only strings returned above
    pads = tuple((p, p) for p in padding)
    if spatial is not None and mode in ("zeros", "circular"):
        same = [
            axis_geometry(n, k, s, "SAME", "Conv", a)
            for a, (n, k, s) in enumerate(zip(spatial, m.kernel_size, m.stride))
        ]
        torch_out = [
            (n + 2 * p - k) // s + 1
            for n, p, k, s in zip(spatial, padding, m.kernel_size, m.stride)
        ]
        if all(g.lo == p and g.out == o for g, p, o in zip(same, padding, torch_out)):
            return ("SAME" if mode == "zeros" else "CIRCULAR"), None
    assert len(pads) == nd
    return "VALID", Pad(pads, mode)


@register_converter(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(op: Op) -> Conversion:
    m = op.target
    if any(d != 1 for d in m.dilation):
        raise op.refuse(
            f"dilation={tuple(m.dilation)}: infnets' Conv has no dilated filters yet.",
            NotYetSupportedError,
        )
    if m.groups != 1:
        raise op.refuse(
            f"groups={m.groups}: grouped/depthwise convolutions are not converted (their "
            "infinite-width kernel differs from the dense convolution's).",
            NotYetSupportedError,
        )
    if m.padding_mode not in PAD_MODES:
        raise op.refuse(f"padding_mode={m.padding_mode!r} is not supported.")
    shape = op.shape()
    padding, pad = _conv_padding(op, m, None if shape is None else tuple(shape[2:]))
    fan_in = m.in_channels * math.prod(m.kernel_size)
    w_std, b_std = _affine_stds(op, m, fan_in)
    par = op.options.parameterization
    strides = tuple(m.stride)
    layer = Conv(m.out_channels, tuple(m.kernel_size), strides, padding, w_std, b_std, par)
    read = _reader(par, w_std, b_std, fan_in)
    if pad is not None:
        return Conversion(layer, (first_input(op),), pre=(pad,), reader=read)
    return Conversion(layer, (first_input(op),), reader=read)


# ------------------------------------------------------------------ activations
class _Fn:
    """A named elementwise function (readable ``ElementwiseNumerical`` reprs)."""

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor]) -> None:
        self.__name__, self.fn = name, fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _numerical(name: str, fn: Callable[..., Tensor], deg: int, **kw: Any) -> Layer:
    return ElementwiseNumerical(_Fn(name, functools.partial(fn, **kw) if kw else fn), deg)


def activation(op: Op, kind: str, **kw: Any) -> Layer:
    """The infnets layer of activation ``kind`` (closed form where infnets has one)."""
    deg = op.options.deg
    if kind == "relu":
        return ew_rect.Relu()
    if kind == "leaky_relu":
        return ew_rect.LeakyRelu(float(kw.get("negative_slope", 0.01)))
    if kind == "gelu":
        approx = kw.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise op.refuse(f"GELU approximate={approx!r} is unknown.")
        return ew_smooth.Gelu(approximate=approx == "tanh")
    if kind == "erf":
        return ew_smooth.Erf()
    if kind == "tanh":
        return _numerical("tanh", torch.tanh, deg)
    if kind == "sigmoid":
        return _numerical("sigmoid", torch.sigmoid, deg)
    if kind == "silu":
        return _numerical("silu", F.silu, deg)
    if kind == "mish":
        return _numerical("mish", F.mish, deg)
    if kind == "softsign":
        return _numerical("softsign", F.softsign, deg)
    if kind == "elu":
        return _numerical("elu", F.elu, max(deg, KINKED_DEG), alpha=float(kw.get("alpha", 1.0)))
    if kind == "softplus":
        beta, thr = float(kw.get("beta", 1.0)), float(kw.get("threshold", 20.0))
        return _numerical("softplus", F.softplus, deg, beta=beta, threshold=thr)
    if kind == "hardtanh":
        lo, hi = float(kw.get("min_val", -1.0)), float(kw.get("max_val", 1.0))
        return _numerical("hardtanh", F.hardtanh, max(deg, KINKED_DEG), min_val=lo, max_val=hi)
    if kind == "relu6":
        return _numerical("relu6", F.relu6, max(deg, KINKED_DEG))
    if kind == "hardswish":
        return _numerical("hardswish", F.hardswish, max(deg, KINKED_DEG))
    if kind == "hardsigmoid":
        return _numerical("hardsigmoid", F.hardsigmoid, max(deg, KINKED_DEG))
    raise op.refuse(f"unknown activation {kind!r}.")  # pragma: no cover


_ACT_MODULES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.ReLU: ("relu", ()),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.GELU: ("gelu", ("approximate",)),
    nn.Tanh: ("tanh", ()),
    nn.Sigmoid: ("sigmoid", ()),
    nn.SiLU: ("silu", ()),
    nn.Mish: ("mish", ()),
    nn.Softsign: ("softsign", ()),
    nn.ELU: ("elu", ("alpha",)),
    nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")),
    nn.ReLU6: ("relu6", ()),
    nn.Hardswish: ("hardswish", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()),
}


@register_converter(*_ACT_MODULES)
def _activation_module(op: Op) -> Conversion:
    m = op.target
    for cls in type(m).__mro__:
        if cls in _ACT_MODULES:
            kind, attrs = _ACT_MODULES[cls]
            break
    return single(op, activation(op, kind, **{a: getattr(m, a) for a in attrs}))


# functions and methods: name -> (kind, positional parameter names after the input)
_ACT_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.relu: ("relu", ()),
    torch.relu: ("relu", ()),
    "relu": ("relu", ()),
    F.relu_: ("relu", ()),
    torch.relu_: ("relu", ()),
    "relu_": ("relu", ()),
    F.leaky_relu: ("leaky_relu", ("negative_slope",)),
    F.gelu: ("gelu", ()),
    torch.erf: ("erf", ()),
    torch.special.erf: ("erf", ()),
    "erf": ("erf", ()),
    torch.tanh: ("tanh", ()),
    F.tanh: ("tanh", ()),
    "tanh": ("tanh", ()),
    torch.sigmoid: ("sigmoid", ()),
    F.sigmoid: ("sigmoid", ()),
    "sigmoid": ("sigmoid", ()),
    F.silu: ("silu", ()),
    F.mish: ("mish", ()),
    F.softsign: ("softsign", ()),
    F.elu: ("elu", ("alpha",)),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.hardtanh: ("hardtanh", ("min_val", "max_val")),
    F.relu6: ("relu6", ()),
    F.hardswish: ("hardswish", ()),
    F.hardsigmoid: ("hardsigmoid", ()),
}


@register_converter(*_ACT_FUNCTIONS)
def _activation_function(op: Op) -> Conversion:
    kind, names = _ACT_FUNCTIONS[op.target]
    kw = {name: op.constant(op.arg(1 + i, name), name) for i, name in enumerate(names)}
    kw = {k: v for k, v in kw.items() if v is not None}
    if kind == "gelu":
        kw["approximate"] = op.kwargs.get("approximate", "none")
    return single(op, activation(op, kind, **kw))


# ------------------------------------------------------------------ identities
@register_converter(nn.Identity, "contiguous")
def _identity(op: Op) -> Any:
    first_input(op)
    return ALIAS


@register_converter(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
def _dropout(op: Op) -> Any:
    m = op.target
    if m.training and m.p > 0:
        raise op.refuse(
            f"dropout (p={m.p}) in training mode makes the examples' outputs depend on "
            "shared random masks; call model.eval() first (dropout is then the identity), "
            f"or write the network with stax.Dropout({1 - m.p:g}, mode='train') for the "
            "kernel of train-mode dropout."
        )
    first_input(op)
    return ALIAS


@register_converter(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout_function(op: Op) -> Any:
    p = op.constant(op.arg(1, "p", 0.5), "p")
    training = op.constant(op.arg(2, "training", True), "training")
    if training and p > 0:
        raise op.refuse(
            f"F.dropout(p={p}, training=True): dropout in training mode has no deterministic "
            "kernel; pass training=self.training and call model.eval()."
        )
    first_input(op)
    return ALIAS


@register_converter("size", "dim")
def _size(op: Op) -> Any:
    return META


# ------------------------------------------------------------------ normalisation
@register_converter(nn.LayerNorm)
def _layer_norm(op: Op) -> Conversion:
    m = op.target
    shape = op.need_shape()
    if len(shape) != 2 or tuple(m.normalized_shape) != (shape[1],):
        raise op.refuse(
            f"nn.LayerNorm{tuple(m.normalized_shape)} on a tensor of shape {tuple(shape)}: "
            "only normalisation over the features of (N, features) activations is converted "
            "(normalising over spatial positions has no exact kernel here)."
        )
    norm = LayerNorm(axis=-1, eps=float(m.eps))
    if not m.elementwise_affine:
        return Conversion(norm, (first_input(op),))
    has_bias = getattr(m, "bias", None) is not None
    affine = ChannelAffine(-1, has_bias)

    def read(mod: nn.Module) -> dict[str, Tensor]:
        out = {"g": _tensor(mod, "weight").detach().clone()}
        if has_bias:
            out["h"] = _tensor(mod, "bias").detach().clone()
        return out

    layer = comb.serial(norm, affine)
    return Conversion(layer, (first_input(op),), reader=lambda mod: ((), read(mod)))


@register_converter(F.layer_norm)
def _layer_norm_function(op: Op) -> Conversion:
    shape = op.need_shape()
    normalized = tuple(op.constant(op.arg(1, "normalized_shape"), "normalized_shape"))
    if op.arg(2, "weight") is not None or op.arg(3, "bias") is not None:
        raise op.refuse("F.layer_norm with weight/bias tensors: use nn.LayerNorm.")
    if len(shape) != 2 or normalized != (shape[1],):
        raise op.refuse("only normalisation over the features of (N, features) is converted.")
    eps = float(op.constant(op.arg(4, "eps", 1e-5), "eps"))
    return single(op, LayerNorm(axis=-1, eps=eps))


# ------------------------------------------------------------------ pooling and readouts
def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _avg_pool(
    op: Op,
    nd: int,
    kernel: Any,
    stride: Any,
    padding: Any,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor: Any,
) -> Conversion:
    window = _tuple(kernel, nd)
    strides = window if stride is None or stride == [] or stride == () else _tuple(stride, nd)
    pads = _tuple(padding, nd)
    if divisor is not None:
        raise op.refuse("divisor_override is not supported.", NotYetSupportedError)
    x = first_input(op)
    if ceil_mode:
        shape = op.need_shape()
        floor = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(shape[2:], pads, window, strides)]
        if list(op.need_shape(op.node)[2:]) != floor:
            raise op.refuse("ceil_mode=True changes the output size here; not supported.")
    if not any(pads):
        return Conversion(pooling.AvgPool(window, strides, "VALID"), (x,))
    if count_include_pad:  # zeros counted: a VALID average of the zero-padded input
        return Conversion(
            pooling.AvgPool(window, strides, "VALID"), (x,), pre=(Pad(tuple((p, p) for p in pads)),)
        )
    raise op.refuse("padding with count_include_pad=False is not supported.", NotYetSupportedError)


@register_converter(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(op: Op) -> Conversion:
    m = op.target
    nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
    return _avg_pool(
        op,
        nd,
        m.kernel_size,
        m.stride,
        m.padding,
        m.ceil_mode,
        m.count_include_pad,
        getattr(m, "divisor_override", None),
    )


@register_converter(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool_function(op: Op) -> Conversion:
    nd = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}[op.target]
    c = op.constant
    return _avg_pool(
        op,
        nd,
        c(op.arg(1, "kernel_size"), "kernel_size"),
        c(op.arg(2, "stride"), "stride"),
        c(op.arg(3, "padding", 0), "padding"),
        c(op.arg(4, "ceil_mode", False), "ceil_mode"),
        c(op.arg(5, "count_include_pad", True), "count_include_pad"),
        c(op.arg(6, "divisor_override"), "divisor_override"),
    )


def _adaptive(op: Op, size: Any) -> Conversion:
    x = first_input(op)
    sizes = size if isinstance(size, (tuple, list)) else None
    if size == 1 or (sizes is not None and all(s == 1 for s in sizes)):
        shape = op.shape()
        out = op.out_shape
        if out is not None and len(out) > 2:  # keeps (N, C, 1, 1): one window per axis
            return Conversion(pooling.AvgPool(tuple(shape[2:])), (x,))  # type: ignore[index]
        if out is None:  # adaptive pooling always keeps the spatial axes
            raise op.refuse("needs example_input to know the spatial size.", NeedsShapeError)
    shape = op.need_shape()
    outs = _tuple(size, len(shape) - 2)
    if any(o is None or n % o for n, o in zip(shape[2:], outs)):
        raise op.refuse(
            f"adaptive pooling from {tuple(shape[2:])} to {outs} has unequal windows; only "
            "output sizes dividing the input size are converted.",
            NotYetSupportedError,
        )
    window = tuple(n // o for n, o in zip(shape[2:], outs))
    return Conversion(pooling.AvgPool(window), (x,))


@register_converter(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_module(op: Op) -> Conversion:
    return _adaptive(op, op.target.output_size)


@register_converter(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_function(op: Op) -> Conversion:
    return _adaptive(op, op.constant(op.arg(1, "output_size"), "output_size"))


def _reduce(op: Op, mean: bool) -> Conversion:
    x = first_input(op)
    shape = op.need_shape(x)
    dims = op.constant(op.arg(1, "dim"), "dim")
    keep = op.constant(op.arg(2, "keepdim", False), "keepdim")
    if op.kwargs.get("dtype") is not None:
        raise op.refuse("a dtype change is not converted.")
    nd = len(shape)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    spatial = list(range(2, nd))
    if nd < 3 or sorted(d % nd for d in dims) != spatial:
        raise op.refuse(
            f"{'mean' if mean else 'sum'} over dims {dims} of a tensor of shape {tuple(shape)}: "
            "only reductions over all spatial axes (global pooling) have an exact kernel; "
            "reducing the channel (width) axis or the batch axis does not."
        )
    if keep:
        if not mean:
            raise op.refuse("sum with keepdim=True is not converted.", NotYetSupportedError)
        return Conversion(pooling.AvgPool(tuple(shape[2:])), (x,))
    return Conversion(pooling.GlobalAvgPool() if mean else pooling.GlobalSumPool(), (x,))


@register_converter("mean", torch.mean)
def _mean(op: Op) -> Conversion:
    return _reduce(op, True)


@register_converter("sum", torch.sum)
def _sum(op: Op) -> Conversion:
    return _reduce(op, False)


def _flatten_to(op: Op, x: fx.Node, out: tuple[int, ...] | None) -> Any:
    shape = op.need_shape(x)
    if out is None:
        out = op.need_shape(op.node)
    if tuple(out) == tuple(shape):
        return ALIAS
    if len(out) == 2 and out[0] == shape[0] and out[1] == math.prod(shape[1:]):
        return Conversion(pooling.Flatten(), (x,))
    raise op.refuse(
        f"reshaping {tuple(shape)} to {tuple(out)}: only flattening to (N, -1) keeps the "
        "batch axis and the channel-major feature order of an infinite-width network."
    )


@register_converter(nn.Flatten)
def _flatten_module(op: Op) -> Any:
    m = op.target
    x = first_input(op)
    if m.start_dim != 1 or m.end_dim != -1:
        raise op.refuse(f"nn.Flatten({m.start_dim}, {m.end_dim}): only start_dim=1 is converted.")
    if op.shape(x) is None:  # flattens all but the batch axis, whatever the shape
        return Conversion(pooling.Flatten(), (x,))
    return _flatten_to(op, x, op.out_shape)


@register_converter(torch.flatten, "flatten", "view", "reshape", torch.reshape)
def _reshape(op: Op) -> Any:
    x = first_input(op)
    if op.target in (torch.flatten, "flatten"):
        start = op.constant(op.arg(1, "start_dim", 0), "start_dim")
        end = op.constant(op.arg(2, "end_dim", -1), "end_dim")
        if start != 1 or end != -1:
            raise op.refuse(f"flatten(start_dim={start}, end_dim={end}): only start_dim=1.")
        shape = op.shape(x)
        if shape is None:  # x.flatten(1) flattens all but the batch axis, whatever the shape
            return Conversion(pooling.Flatten(), (x,))
        return _flatten_to(op, x, (shape[0], math.prod(shape[1:])))
    rest = op.args[1:] if len(op.args) > 1 else (op.kwargs.get("shape") or op.kwargs.get("size"),)
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if op.shape(x) is None and len(rest) == 2 and rest[1] == -1 and _is_batch_size(rest[0], x):
        return Conversion(pooling.Flatten(), (x,))  # x.view(x.size(0), -1)
    return _flatten_to(op, x, op.out_shape)


def _is_batch_size(a: Any, x: fx.Node) -> bool:
    """Whether ``a`` is ``x.size(0)`` or ``x.shape[0]`` in the traced graph."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size" and a.args[0] is x:
        return bool((a.args[1:] or (a.kwargs.get("dim"),))[0] == 0)
    if a.op == "call_function" and a.target is operator.getitem and a.args[1] == 0:
        src = a.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_function" and src.target is getattr and src.args == (x, "shape"))
            or (src.op == "call_method" and src.target == "size" and src.args == (x,))
        )
    return False


@register_converter(operator.getitem)
def _getitem(op: Op) -> Any:
    src = op.args[0]
    if isinstance(src, fx.Node) and src in op.meta_nodes:
        return META
    raise op.refuse("indexing or slicing an activation (e.g. selecting channels) is not converted.")


@register_converter(getattr)
def _getattr(op: Op) -> Any:
    if op.args[1] in ("shape", "ndim"):
        return META
    raise op.refuse(f"attribute {op.args[1]!r} of an activation is not converted.")


# ------------------------------------------------------------------ joins and arithmetic
def _number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


@register_converter(
    operator.add,
    operator.iadd,
    torch.add,
    "add",
    "add_",
    operator.sub,
    operator.isub,
    torch.sub,
    "sub",
    "sub_",
)
def _add(op: Op) -> Any:
    a, b = op.arg(0, "input"), op.arg(1, "other")
    alpha = op.constant(op.kwargs.get("alpha", 1), "alpha")
    sub = op.target in (operator.sub, operator.isub, torch.sub, "sub", "sub_")
    sign = -alpha if sub else alpha
    if op.is_tensor(a) and op.is_tensor(b):
        pre_b = None if sign == 1 else Scale(float(sign))
        return Conversion(comb.FanInSum(), (a, b), pre=(None, pre_b))
    tensor, const = (a, b) if op.is_tensor(a) else (b, a)
    if not op.is_tensor(tensor) or not _number(const):
        raise op.refuse("adds something that is neither an activation nor a number.")
    if const == 0:
        return ALIAS if tensor is a or not sub else Conversion(Scale(-1.0), (tensor,))
    raise op.refuse(
        f"adding the constant {const!r} shifts the mean of every unit; the infinite-width "
        "kernels here assume centred pre-activations (use a bias, i.e. nn.Linear/nn.Conv)."
    )


@register_converter(
    operator.mul,
    operator.imul,
    torch.mul,
    "mul",
    "mul_",
    operator.truediv,
    operator.itruediv,
    torch.div,
    "div",
    "div_",
    operator.neg,
    torch.neg,
    "neg",
)
def _mul(op: Op) -> Any:
    if op.target in (operator.neg, torch.neg, "neg"):
        return single(op, Scale(-1.0))
    a, b = op.arg(0, "input"), op.arg(1, "other")
    div = op.target in (operator.truediv, operator.itruediv, torch.div, "div", "div_")
    if op.kwargs.get("rounding_mode") is not None:
        raise op.refuse("division with rounding is not converted.")
    if op.is_tensor(a) and op.is_tensor(b):
        if div:
            raise op.refuse("dividing two activations has no exact infinite-width kernel.")
        return Conversion(comb.FanInProd(), (a, b))
    if op.is_tensor(a) and _number(b):
        c = 1.0 / b if div else float(b)
        return ALIAS if c == 1 else Conversion(Scale(c), (a,))
    if op.is_tensor(b) and _number(a) and not div:
        return ALIAS if a == 1 else Conversion(Scale(float(a)), (b,))
    raise op.refuse("multiplies by something that is neither an activation nor a number.")


@register_converter(torch.cat, torch.concat, torch.concatenate)
def _cat(op: Op) -> Conversion:
    xs = op.arg(0, "tensors")
    dim = op.constant(op.arg(1, "dim", 0), "dim")
    if not isinstance(xs, (list, tuple)) or not all(op.is_tensor(x) for x in xs):
        raise op.refuse("concatenates something other than activations.")
    shape = op.shape(xs[0])
    nd = len(shape) if shape is not None else None
    if nd is None and dim not in (1, -1):
        raise op.refuse("needs example_input to resolve the concatenation axis.", NeedsShapeError)
    if not (dim == 1 if nd is None else dim % nd == 1):
        raise op.refuse(
            f"torch.cat along dim {dim}: only the channel axis (dim=1) has an exact "
            "infinite-width kernel (a weighted average of the branches' kernels)."
        )
    if len(xs) == 1:
        return ALIAS  # type: ignore[return-value]
    return Conversion(comb.FanInConcat(axis=1), tuple(xs))


# ------------------------------------------------------------------ refusals
def _default(key: Any, converter: Converter) -> None:
    """Register a refusal unless a converter for ``key`` exists already."""
    CONVERTERS.setdefault(key, converter)


def _refuse(reason: str, cls: type[FromTorchError] = FromTorchError) -> Converter:
    def convert(op: Op) -> Any:
        raise op.refuse(reason, cls)

    convert.refusal = True  # type: ignore[attr-defined]
    return convert


_MAX = (
    "max pooling takes a maximum over positions, which is not a Gaussian-process "
    "operation: no exact infinite-width kernel exists (replace it by nn.AvgPool)."
)
_BN = (
    "batch normalisation: in training mode it couples the examples of a batch (no "
    "per-pair kernel); in eval mode it is a per-channel affine map of running statistics "
    "with trainable scale and shift, which infnets does not model. Remove it or use "
    "nn.LayerNorm on (N, features) activations."
)
_SOFTMAX = (
    "softmax normalises over an axis of the activations; over a width axis it has no "
    "exact infinite-width kernel, and over the outputs the network is no longer a "
    "Gaussian process. Convert the model up to the logits instead."
)
_ATTENTION = (
    "attention layers are planned (stax.GlobalSelfAttention) but not available to "
    "from_torch yet; once they are, one converter registered for this module type "
    "(register_converter) adds them."
)

_key: Any  # the loops below register refusals for module types, functions and names
for _key in (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    torch.max,
    torch.amax,
    "max",
    "amax",
):
    _default(_key, _refuse(_MAX))
for _key in (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    F.batch_norm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
):
    _default(_key, _refuse(_BN))
for _key in (
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    "softmax",
    "log_softmax",
):
    _default(_key, _refuse(_SOFTMAX))
for _key in (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
):
    _default(_key, _refuse(_ATTENTION, NotYetSupportedError))
