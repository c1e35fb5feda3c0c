r"""Kernels of your own model: ``torch.nn.Module`` -> infinite-width infnets layer.

:func:`from_torch` traces a model with ``torch.fx``, maps every call to its infnets layer
(the registry of :mod:`infnets._src.convert.from_torch_ops`) and returns a :class:`TorchGraph`:
an infnets layer whose ``kernel_fn`` is the NNGP/NTK of the model's architecture and
initialisation (Neal 1996; Lee et al. 2018; Jacot et al. 2018; Novak et al. 2019), whose
``apply_fn(params_from(layer, model), x)`` is ``model(x)``, and whose ``to_module`` gives
a finite twin.

The limit: every hidden width (``out_features``, ``out_channels``) goes to infinity; the
input and output sizes stay. Hyper-parameters are PyTorch's initialisation at the model's
own widths (standard parameterization, ``y = x W^T + b``):

* ``W_std^2 = fan_in Var(W) = 1/3`` and ``b_std^2 = Var(b) = 1 / (3 fan_in)`` for the
  default ``reset_parameters`` (``kaiming_uniform_(a=sqrt(5))`` and
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), or ``stds='weights'``:
  ``W_std^2 = fan_in mean(W^2)``, ``b_std^2 = mean(b^2)`` from the current tensors.
* The kernel is the Gaussian-process approximation of *this* model at initialisation
  (the bias variance of a hidden layer is the one of its actual ``fan_in``), and the NTK
  the expected NTK at these widths: in the standard parameterization
  ``Theta' = n K + [bias] + W_std^2 Theta`` for a layer of fan-in ``n`` (Sohl-Dickstein et
  al. 2020), which grows with the widths. ``parameterization='ntk'`` gives the NTK
  parameterization's kernel instead (same NNGP).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import os
import re
import traceback
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from infnets._src.convert import (
    from_torch_attention,  # noqa: F401 - registers attention
    from_torch_ops,  # noqa: F401 - registers the converters
)
from infnets._src.convert.from_torch_layers import ChannelAffine, NoNTK
from infnets._src.convert.from_torch_registry import (
    ALIAS,
    FALLBACK,
    META,
    Conversion,
    FromTorchError,
    NotYetSupportedError,
    Op,
    Options,
    Relayout,
    find_converter,
)
from infnets._src.core import inputs as _inputs
from infnets._src.core.protocol import ShapeTree, single_shape
from infnets._src.elementwise import base as ew_base
from infnets._src.empirical.model import call_with, tensor_slots
from infnets._src.layers import combinators as comb
from infnets._src.layers.base import Layer, Params, adapt_spatial
from infnets._src.layers.dense import check_parameterization

__all__ = [
    "FromTorchError",
    "NotYetSupportedError",
    "TorchGraph",
    "from_torch",
    "params_from",
    "reinit_fns",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(os.path.abspath(__file__))
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>.*)')


# ------------------------------------------------------------------ graph layer
@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One layer of a :class:`TorchGraph`.

    Attributes:
        name: unique name (the ``torch.fx`` node's); parameters are stored under it.
        layer: the infnets layer.
        inputs: value indices it consumes (``0`` the graph input, ``i + 1`` node ``i``).
        label: the model's call it comes from, e.g. ``"nn.Linear 'fc1'"``.
        where: the model's source line.
        module: qualified name of the module holding its parameters, or ``None``.
        reader: ``reader(module) -> params`` in ``layer``'s layout.
    """

    name: str
    layer: Layer
    inputs: tuple[int, ...]
    label: str = ""
    where: str = ""
    module: str | None = None
    reader: Callable[[nn.Module], Params] | None = None


def _merge_need(a: Any, b: Any) -> Any:
    """Two consumers' spatial requirements of one value: full if either needs it."""
    if a is _UNSET:
        return b
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


_UNSET = object()


class TorchGraph(Layer):
    """A traced model as an infnets layer: a DAG of infnets layers (see :func:`from_torch`).

    ``params`` are a dict ``{node name: params of that layer}`` for the layers with
    parameters; :meth:`params_from` reads them from a model of the same architecture.
    ``summary()`` lists the mapping, layer by layer, with the model's source lines.
    """

    def __init__(
        self,
        nodes: tuple[GraphNode, ...],
        output: int,
        input_shape: tuple[int, ...] | None,
        model_name: str,
        in_layout: tuple[int, ...] | None = None,
        out_layout: tuple[int, ...] | None = None,
    ) -> None:
        self.nodes = nodes
        self.output = output
        self.input_shape = input_shape
        self.model_name = model_name
        self.in_layout = in_layout  # model input = channels-first input .permute(in_layout)
        self.out_layout = out_layout
        self._to_cf = None if in_layout is None else tuple(in_layout.index(i) for i in range(3))
        users = [0] * (len(nodes) + 1)
        for node in nodes:
            for v in node.inputs:
                users[v] += 1
        users[output] += 1
        self._users = users

    def __repr__(self) -> str:
        return f"from_torch({self.model_name}: {len(self.nodes)} layers)"

    def summary(self) -> str:
        """The layers, one per line: ``name = layer(inputs)  # model call, source line``."""
        names = ["x"] + [n.name for n in self.nodes]
        lines = [f"from_torch({self.model_name}), input x of shape (N, *{self.input_shape}):"]
        for node in self.nodes:
            args = ", ".join(names[v] for v in node.inputs)
            where = f" at {node.where}" if node.where else ""
            lines.append(f"  {node.name} = {node.layer!r}({args})  # {node.label}{where}")
        lines.append(f"  return {names[self.output]}")
        return "\n".join(lines)

    # ------------------------------------------------------------- checks
    def _check_shape(self, shape: Any, what: str) -> None:
        if isinstance(shape, list):
            raise ValueError(f"{self!r} takes one input, received {len(shape)} branches.")
        if self.input_shape is not None and tuple(shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self!r} was converted for inputs of shape (N, *{self.input_shape}) (the "
                f"example_input), but received {what} of shape {tuple(shape)}; some of its "
                "layers depend on the input's shape. Convert again with an example of this shape."
            )

    def _wrap(self, node: GraphNode, err: ValueError) -> FromTorchError:
        at = f" at {node.where}" if node.where else ""
        return FromTorchError(f"from_torch: {node.label}{at}: {err}")

    def _arg(self, vals: list[Any], node: GraphNode) -> Any:
        ins = [vals[v] for v in node.inputs]
        return ins[0] if len(ins) == 1 else ins

    def _cf_shape(self, shape: Any) -> Any:
        """The model's input shape in infnets' channels-first order."""
        if self._to_cf is None or isinstance(shape, list):
            return shape
        if len(shape) != 3:
            raise ValueError(f"{self!r} takes sequences of rank 3, received shape {tuple(shape)}.")
        return tuple(shape[i] for i in self._to_cf)

    def _kernel_fn(self, x1: Any, x2: Any = None, get: Any = None, **options: Any) -> Any:
        if self._to_cf is not None and isinstance(x1, Tensor):  # the model's sequence layout
            if any(k in options for k in ("mask1", "mask2", "mask_constant")):
                raise ValueError(
                    f"{self!r}: masks are not supported for models of (N, L, C)/(L, N, C) inputs."
                )
            x1 = x1.permute(self._to_cf) if x1.ndim == 3 else x1
            if isinstance(x2, Tensor) and x2.ndim == 3:
                x2 = x2.permute(self._to_cf)
        return super()._kernel_fn(x1, x2, get, **options)

    # ------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        in_shape = self._cf_shape(in_shape)
        self._check_shape(in_shape, "an input shape")
        shapes: list[Any] = [tuple(single_shape(in_shape, self))]
        params: dict[str, Params] = {}
        for node in self.nodes:
            shape, p = node.layer.init(gen, self._arg(shapes, node), dtype, device)
            shapes.append(shape)
            if _has_tensors(p):
                params[node.name] = p
        out = shapes[self.output]
        if self.out_layout is not None:
            out = tuple(out[i] for i in self.out_layout)
        return out, params

    def apply(self, params: Params, x: Any) -> Any:
        if self._to_cf is not None:
            self._cf_shape(x.shape)
            x = x.permute(self._to_cf)
        self._check_shape(tuple(x.shape), "an input")
        vals: list[Any] = [x]
        for node in self.nodes:
            vals.append(node.layer.apply(params.get(node.name, ()), self._arg(vals, node)))
        out = vals[self.output]
        return out if self.out_layout is None else out.permute(self.out_layout)

    # ------------------------------------------------------------- infinite
    def _needs(self, out_full: Any) -> list[Any]:
        """What every value must keep (pixel pairs or not), from the output backwards."""
        needs: list[Any] = [_UNSET] * (len(self.nodes) + 1)
        needs[self.output] = out_full
        for i in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[i]
            own = needs[i + 1]
            if own is _UNSET:  # not used (cannot happen in a converted graph)
                own = False
            req = node.layer.spatial_requirement(own)
            for j, v in enumerate(node.inputs):
                r = req[j] if isinstance(req, list) and len(req) == len(node.inputs) else req
                if isinstance(r, list):
                    r = comb._any_full(r)
                needs[v] = _merge_need(needs[v], r)
        return [False if n is _UNSET else n for n in needs]

    def spatial_requirement(self, out_full: Any) -> Any:
        return self._needs(out_full)[0]

    def kernel(self, k: Any) -> Any:
        return self.kernel_planned(k, True)

    def kernel_planned(self, k: Any, out_full: Any) -> Any:
        self._check_shape(k.shape1 if not isinstance(k, list) else k, "a kernel of inputs")
        needs = self._needs(out_full) if out_full is not None else None
        vals: list[Any] = [k] + [None] * len(self.nodes)
        left = list(self._users)
        for i, node in enumerate(self.nodes):
            arg = self._arg(vals, node)
            try:
                if needs is None:
                    out = node.layer.kernel_planned(arg, None)
                else:
                    req = node.layer.spatial_requirement(needs[i + 1])
                    arg = adapt_spatial(arg, req, node.layer)
                    out = node.layer.kernel_planned(arg, needs[i + 1])
            except FromTorchError:
                raise
            except ValueError as err:
                raise self._wrap(node, err) from err
            vals[i + 1] = out
            for v in node.inputs:  # free what no later layer reads
                left[v] -= 1
                if left[v] == 0:
                    vals[v] = None
        out = vals[self.output]
        return out if out_full is None else adapt_spatial(out, out_full, self)

    # ------------------------------------------------------------- parameters
    def params_from(self, model: nn.Module) -> dict[str, Params]:
        """The parameters of ``model`` (same architecture) in this layer's layout.

        Copies (never views) of the module tensors, converted to the NTK
        parameterization when this layer uses it, so that
        ``apply_fn(params, x) == model(x)`` up to rounding.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"params_from: model must be an nn.Module, got {type(model).__name__}.")
        out: dict[str, Params] = {}
        for node in self.nodes:
            if node.reader is None or node.module is None:
                continue
            try:
                module = model.get_submodule(node.module)
            except AttributeError as err:
                raise ValueError(
                    f"params_from: the model has no submodule {node.module!r}; pass a model "
                    f"of the architecture {self!r} was converted from."
                ) from err
            out[node.name] = node.reader(module)
        return out


def _has_tensors(p: Any) -> bool:
    if isinstance(p, Tensor):
        return True
    if isinstance(p, dict):
        return any(_has_tensors(v) for v in p.values())
    if isinstance(p, (tuple, list)):
        return any(_has_tensors(v) for v in p)
    return False


# ------------------------------------------------------------------ tracing
class _Tracer(fx.Tracer):
    """``torch.fx`` tracer recording source lines; registered module types stay leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _registered_module(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _registered_module(m: nn.Module) -> bool:
    """A converter exists for ``m`` (its type, or a base class with the same ``forward``)."""
    return find_converter(m) is not None


def _user_frame(frames: list[tuple[str, int, str, str]]) -> str:
    """The innermost frame of the user's code: ``"file:line (in fn): code"``."""
    for file, line, fn, code in reversed(frames):
        path = os.path.abspath(file)
        if path.startswith(_TORCH_DIR) or path.startswith(_HERE) or "<frozen" in file:
            continue
        return f"{file}:{line} (in {fn}): {code.strip()}"
    return ""


def _where(node: fx.Node) -> str:
    trace = node.stack_trace or ""
    frames = [(m["file"], int(m["line"]), m["fn"], m["code"]) for m in _FRAME.finditer(trace)]
    return _user_frame(frames)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except FromTorchError:
        raise
    except Exception as err:  # fx refuses data-dependent control flow, .item(), ...
        frames = [
            (f.filename, f.lineno or 0, f.name, f.line or "")
            for f in traceback.extract_tb(err.__traceback__)
        ]
        where = _user_frame(frames)
        at = f" at {where}" if where else ""
        raise FromTorchError(
            f"from_torch: torch.fx cannot trace {type(model).__name__}{at} "
            f"({type(err).__name__}: {err}). Data-dependent Python control flow, "
            "conversions of tensors to Python numbers and other untraceable code have no "
            f"fixed architecture to convert. {FALLBACK}"
        ) from err
    return fx.GraphModule(tracer.root, graph)


def _label(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, str, str | None]:
    if node.op == "call_module":
        m = gm.get_submodule(cast(str, node.target))  # call_module nodes name their module
        kind = type(m)
        prefix = "nn." if kind.__module__.startswith("torch.nn") else ""
        return m, f"{prefix}{kind.__name__} {node.target!r}", str(node.target)
    if node.op == "call_method":
        return node.target, f"Tensor.{node.target}()", None
    fn = node.target
    name = getattr(fn, "__name__", repr(fn))
    for prefix, space in (("F.", torch.nn.functional), ("torch.", torch), ("operator.", operator)):
        if getattr(space, name, None) is fn:
            return fn, prefix + name, None
    return fn, f"{getattr(fn, '__module__', None) or ''}.{name}".lstrip("."), None


def _shapes(gm: fx.GraphModule, example: Tensor | None) -> dict[fx.Node, tuple[int, ...]]:
    if example is None:
        return {}
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        try:
            ShapeProp(gm).propagate(example.detach().clone())
        except Exception as err:
            raise ValueError(
                f"from_torch: running the model on example_input of shape "
                f"{tuple(example.shape)} failed ({type(err).__name__}: {err})."
            ) from err
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[node] = tuple(meta.shape)
    return out


def _ends_in_gain(layer: Layer) -> bool:
    if isinstance(layer, ChannelAffine) or getattr(layer, "ends_in_gain", False):
        return True
    kids = getattr(layer, "layers", None)
    if not kids:
        return False
    return _ends_in_gain(kids[-1])


def _refuse_early(gm: fx.GraphModule, options: Options) -> None:
    """Refuse unknown and refused operations before running the model on the example."""
    for fx_node in gm.graph.nodes:
        if fx_node.op not in ("call_module", "call_function", "call_method"):
            continue
        target, label, module_name = _label(fx_node, gm)
        converter = find_converter(target)
        early = getattr(converter, "early", None)  # checks needing no shapes
        if converter is None or getattr(converter, "refusal", False) or early is not None:
            args, kwargs = tuple(fx_node.args), dict(fx_node.kwargs)
            op = Op(fx_node, target, label, module_name, args, kwargs, _where(fx_node), options,
                    {}, set())  # fmt: skip
            if converter is None:
                raise op.refuse("no infinite-width conversion is known for this operation.")
            (early or converter)(op)


def _convert(
    model: nn.Module, example: Tensor | None, options: Options, input_layout: str | None
) -> TorchGraph:
    wrapped = find_converter(model) is not None  # a registered module type as the model
    gm = _trace(nn.Sequential(model) if wrapped else model)
    _refuse_early(gm, options)
    shapes = _shapes(gm, example)
    in_layout = from_torch_attention.input_layout(model, input_layout)
    layouts: dict[fx.Node, tuple[int, ...]] = {}
    value_of: dict[fx.Node, int] = {}
    meta: set[fx.Node] = set()
    nodes: list[GraphNode] = []
    dead: set[int] = set()
    sums: dict[int, fx.Node] = {}  # value -> the fx add node of a FanInSum
    called: dict[str, str] = {}
    output: int | None = None
    out_layout: tuple[int, ...] | None = None
    for fx_node in gm.graph.nodes:
        where = _where(fx_node)
        if fx_node.op == "placeholder":
            if value_of:
                raise FromTorchError(
                    f"from_torch: {type(model).__name__}.forward takes several inputs "
                    f"({fx_node.name!r} is the second); only models of one tensor are converted."
                )
            value_of[fx_node] = 0
            if in_layout is not None:
                layouts[fx_node] = in_layout
            continue
        if fx_node.op == "get_attr":
            raise FromTorchError(
                f"from_torch: {type(model).__name__} uses the tensor {fx_node.target!r} "
                f"directly in forward{' at ' + where if where else ''}; parameters outside "
                f"Linear/Conv/LayerNorm modules have no infinite-width counterpart. {FALLBACK}"
            )
        if fx_node.op == "output":
            out = fx_node.args[0]
            if not isinstance(out, fx.Node) or out not in value_of:
                raise FromTorchError(
                    f"from_torch: {type(model).__name__}.forward must return one tensor "
                    f"computed from its input, got {out!r}."
                )
            output = value_of[out]
            out_layout = layouts.get(out)
            continue
        target, label, module_name = _label(fx_node, gm)
        if wrapped and module_name is not None:  # the user's model is submodule "0"
            module_name = module_name[2:]
        op = Op(
            fx_node,
            target,
            label,
            module_name,
            tuple(fx_node.args),
            dict(fx_node.kwargs),
            where,
            options,
            shapes,
            meta,
            layouts,
        )
        if module_name is not None and any(True for _ in target.parameters()):
            if module_name in called:
                raise op.refuse(
                    f"module {module_name!r} is called a second time (shared weights); the "
                    "infinite-width kernel of weight sharing is not modelled."
                )
            called[module_name] = where or fx_node.name
        converter = find_converter(target)
        if converter is None:
            raise op.refuse("no infinite-width conversion is known for this operation.")
        res = converter(op)
        if res is META:
            meta.add(fx_node)
            continue
        if res is ALIAS or isinstance(res, Relayout):
            src = res.src if isinstance(res, Relayout) else None
            src = src or next((a for a in fx_node.args if op.is_tensor(a)), None)
            if src is None or src not in value_of:
                raise op.refuse("its input is not an activation of the model.")
            value_of[fx_node] = value_of[src]
            lay = res.layout if isinstance(res, Relayout) else layouts.get(src)
            if lay is not None:
                layouts[fx_node] = lay
            continue
        assert isinstance(res, Conversion)
        if not res.layout_aware:
            res.out_layout = from_torch_attention.common_layout(op, res)
        if res.out_layout is not None:
            layouts[fx_node] = res.out_layout
        pres = res.pre or (None,) * len(res.inputs)
        ins: list[int] = []
        for inp, pre in zip(res.inputs, pres):
            if inp not in value_of:
                raise op.refuse(f"its input {inp!r} is not an activation of the model.")
            v = value_of[inp]
            if pre is not None:
                nodes.append(GraphNode(f"{fx_node.name}_pre{len(ins)}", pre, (v,), label, where))
                v = len(nodes)
            ins.append(v)
        layer = res.layer
        if isinstance(layer, comb.FanInSum):  # a + b + c: one sum of three branches
            flat: list[int] = []
            for v in ins:
                src = sums.get(v)
                if src is not None and len(src.users) == 1:
                    flat.extend(nodes[v - 1].inputs)
                    dead.add(v - 1)
                else:
                    flat.append(v)
            ins = flat
        nonlinear = getattr(layer, "nonlinear_input", False)
        if (isinstance(layer, (ew_base.ElementwiseLayer, comb.FanInProd)) or nonlinear) and any(
            v > 0 and _ends_in_gain(nodes[v - 1].layer) for v in ins
        ):
            layer = NoNTK(
                layer,
                (
                    f"from_torch: {label}{' at ' + where if where else ''} is a nonlinearity "
                    "(or attention, nonlinear in its input through the logits) applied to the "
                    "output of nn.LayerNorm(elementwise_affine=True); its gain "
                    "and bias make the NTK of that composition non-factorising (not modelled). "
                    "Ask for the NNGP only, or use elementwise_affine=False."
                ),
            )
        module = module_name if res.reader is not None else None
        nodes.append(GraphNode(fx_node.name, layer, tuple(ins), label, where, module, res.reader))
        value_of[fx_node] = len(nodes)
        if isinstance(layer, comb.FanInSum):
            sums[len(nodes)] = fx_node
    assert output is not None
    name = type(model).__name__
    return _compact(nodes, dead, output, example, name, in_layout, out_layout)


def _compact(
    nodes: list[GraphNode],
    dead: set[int],
    output: int,
    example: Tensor | None,
    name: str,
    in_layout: tuple[int, ...] | None = None,
    out_layout: tuple[int, ...] | None = None,
) -> TorchGraph:
    new_id = {0: 0}
    kept: list[GraphNode] = []
    for i, node in enumerate(nodes):
        if i in dead:
            continue
        kept.append(dataclasses.replace(node, inputs=tuple(new_id[v] for v in node.inputs)))
        new_id[i + 1] = len(kept)
    shape = None
    if example is not None:
        cf = (
            example.shape
            if in_layout is None
            else example.permute(tuple(in_layout.index(i) for i in range(3))).shape
        )
        shape = tuple(cf[1:])
    return TorchGraph(tuple(kept), new_id[output], shape, name, in_layout, out_layout)


# ------------------------------------------------------------------ public API
def from_torch(
    model: nn.Module,
    example_input: Tensor | None = None,
    *,
    parameterization: str = "standard",
    stds: str = "reset_parameters",
    W_std: float | Mapping[str, float] | None = None,  # noqa: N803 - Neural Tangents' name
    b_std: float | Mapping[str, float] | None = None,
    deg: int = 24,
    input_layout: str | None = None,
) -> TorchGraph:
    r"""The infinite-width NNGP/NTK of a PyTorch model, as an infnets layer.

    The model is traced with ``torch.fx`` (a copy of it: the model is never modified) and
    every call is mapped to its infnets layer: ``nn.Linear`` -> ``Dense``, ``nn.Conv*d``
    -> ``Conv`` (padding modes, strides), activations -> closed forms (``Relu``,
    ``LeakyRelu``, ``Gelu``, ``Erf``) or Gauss-Hermite quadrature
    (``ElementwiseNumerical``: tanh, sigmoid, SiLU, ELU, softplus, hardtanh, ...),
    ``nn.AvgPool*d``/adaptive/``x.mean(spatial)`` -> pooling, flatten/view to ``(N, -1)``
    -> ``Flatten``, ``x + f(x)`` -> ``FanInSum``, ``torch.cat(dim=1)`` -> ``FanInConcat``,
    products -> ``FanInProd``, ``c * x`` -> a scaling, ``nn.LayerNorm`` -> ``LayerNorm``,
    ``nn.Identity``/``nn.Dropout`` (eval) -> identity.

    **The limit.** Hidden widths go to infinity; input and output sizes stay. In the
    standard parameterization (PyTorch's: ``y = x W^T + b``) the hyper-parameters are
    those of the model's initialisation at its own widths (``n`` = fan-in):

    * ``stds='reset_parameters'`` (default): PyTorch's default initialisation,
      ``W, b ~ U(-1/sqrt(n), 1/sqrt(n))``, so ``W_std^2 = n Var W = 1/3`` and
      ``b_std^2 = Var b = 1 / (3 n)``;
    * ``stds='weights'``: from the current tensors (custom initialisations),
      ``W_std^2 = n mean(W^2)`` and ``b_std^2 = mean(b^2)``.

    The NNGP is then the Gaussian-process approximation of this model at
    initialisation (Neal 1996; Lee et al. 2018; Novak et al. 2019), exact for Gaussian
    weights of these variances; PyTorch's uniform weights give the same kernel wherever
    a sum runs over a hidden (infinite) width, and a close one after the first layer,
    whose pre-activations sum only ``n`` input terms. The NTK is the expected NTK at these
    widths (Jacot et al. 2018): in the standard parameterization each layer adds
    ``n K + [bias]``, so it grows with the widths (Sohl-Dickstein et al. 2020).

    Args:
        model: the ``nn.Module`` (a ``nn.Sequential`` or any module with a traceable
            ``forward`` of one tensor). Put it in eval mode when it has dropout.
        example_input: a batch of inputs ``(N, *shape)``; needed by shape-dependent
            conversions (``view``, ``mean`` over dims, adaptive pooling, ``LayerNorm``).
            The layer then accepts inputs of this shape only (besides the batch size).
        parameterization: ``'standard'`` (PyTorch's, default) or ``'ntk'`` (Jacot et al.
            2018: ``y = W_std / sqrt(n) x W^T + b_std b`` with unit-variance ``W, b``; same
            NNGP, width-independent NTK).
        stds: ``'reset_parameters'`` or ``'weights'`` (see above).
        W_std, b_std: override the standard deviations of every ``Linear``/``Conv``
            (a float) or of some (a dict ``{qualified module name: value}``); modules
            without a bias keep none.
        deg: Gauss-Hermite nodes per dimension for activations without a closed form
            (kinked ones use at least 96).
        input_layout: ``'NLC'``/``'LNC'`` for models whose input is a PyTorch sequence
            (``None``: channels-first, or a bare attention module's own order). Attention:
            :mod:`infnets._src.convert.from_torch_attention` (the many-heads limit).

    Returns:
        A :class:`TorchGraph` layer: ``init_fn``, ``apply_fn``, ``kernel_fn``,
        ``to_module``; ``params_from(layer, model)`` reads the model's weights.

    Raises:
        FromTorchError: (a ``ValueError``) an operation without an exact
            infinite-width kernel (max pooling, batch norm, softmax, dropout in training
            mode, data-dependent control flow, ...), naming it and its source line;
            :class:`NotYetSupportedError` (also a ``NotImplementedError``) for those with a
            limit infnets does not convert yet (attention, dilation, groups).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets import stax
        >>> model = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 1)).double()
        >>> x = torch.randn(5, 8, dtype=torch.float64)
        >>> net = stax.from_torch(model, x)
        >>> net.kernel_fn(x, None, 'ntk').shape
        torch.Size([5, 5])
        >>> torch.allclose(net.apply_fn(stax.params_from(net, model), x), model(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_torch: model must be a torch.nn.Module, got {type(model).__name__}.")
    check_parameterization(parameterization, "from_torch")
    if stds not in ("reset_parameters", "weights"):
        raise ValueError(f"from_torch: stds must be 'reset_parameters' or 'weights', got {stds!r}.")
    for name, v in (("W_std", W_std), ("b_std", b_std)):
        if isinstance(v, Mapping):
            known = {n for n, _ in model.named_modules()}
            unknown = sorted(set(v) - known)
            if unknown:
                raise ValueError(f"from_torch: {name} names unknown modules {unknown}.")
            for key, s in v.items():
                _inputs.check_std(s, f"from_torch: {name}[{key!r}]")
        elif v is not None:
            _inputs.check_std(v, f"from_torch: {name}")
    _inputs.check_int(deg, "from_torch: deg", 1, 200)
    if example_input is not None:
        example_input = _inputs.as_tensor(example_input, "example_input")
    options = Options(parameterization, stds, W_std, b_std, deg)
    private = copy.deepcopy(model)  # tracing and shape propagation never touch the model
    return _convert(private, example_input, options, input_layout)


def params_from(layer: TorchGraph, model: nn.Module) -> dict[str, Params]:
    """The weights of ``model`` in the parameter layout of ``layer = from_torch(...)``.

    Math: standard parameterization, the module tensors themselves (``W = weight``,
    ``b = bias``); NTK parameterization, ``W = weight sqrt(n) / W_std`` and
    ``b = bias / b_std``, so that ``layer.apply_fn(params, x) == model(x)`` up to rounding
    in both. ``model`` may be the converted model or another instance of its architecture
    (e.g. after training).

    Args:
        layer: the result of :func:`from_torch`.
        model: a model with the same submodules.

    Returns:
        ``{layer name: {'W': ..., 'b': ...}, ...}`` (copies of the tensors).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets import stax
        >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> net = stax.from_torch(model)
        >>> sorted(stax.params_from(net, model))
        ['_0', '_2']
    """
    if not isinstance(layer, TorchGraph):
        raise TypeError(
            f"params_from: layer must come from stax.from_torch, got {type(layer).__name__}."
        )
    return layer.params_from(model)


def reinit_fns(model: nn.Module) -> tuple[Callable[..., Any], Callable[[Any, Tensor], Tensor]]:
    """``(init_fn, apply_fn)`` sampling ``model``'s own initialisation, for Monte Carlo kernels.

    ``init_fn(key, input_shape, dtype=None, device=None)`` calls ``reset_parameters()`` on
    every submodule of a private copy of ``model`` under a seed drawn from ``key`` and
    returns ``(None, params)`` (``{parameter name: tensor}``); ``apply_fn(params, x)`` runs
    the copy with them. With :func:`infnets.empirical.monte_carlo_kernel_fn` this estimates
    the NNGP/NTK of *any* model, including those :func:`from_torch` refuses.

    Args:
        model: the model (not modified).

    Returns:
        ``(init_fn, apply_fn)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets import stax
        >>> from infnets.empirical import monte_carlo_kernel_fn
        >>> model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.MaxPool1d(1), nn.Linear(64, 1))
        >>> kernel_fn = monte_carlo_kernel_fn(*stax.reinit_fns(model), key=0, n_samples=4)
        >>> kernel_fn(torch.randn(3, 4), None, 'nngp').shape
        torch.Size([3, 3])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reinit_fns: model must be an nn.Module, got {type(model).__name__}.")
    base = copy.deepcopy(model)
    names = {n for n, _ in base.named_parameters()}
    slots = {p: n for p, n in tensor_slots(base).items() if n in names}

    def init_fn(
        key: int | torch.Generator,
        input_shape: Any = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[None, dict[str, Tensor]]:
        gen = _inputs.make_generator(key)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        cuda = sorted({p.device.index or 0 for p in base.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed)
            for m in base.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
            for m in base.modules():  # after its out_proj's reset_parameters (zero bias)
                if isinstance(m, nn.MultiheadAttention):
                    m._reset_parameters()
        params = {n: p.detach().clone() for n, p in base.named_parameters()}
        if dtype is not None or device is not None:
            params = {n: p.to(dtype=dtype or p.dtype, device=device) for n, p in params.items()}
        return None, params

    def apply_fn(params: Any, x: Tensor) -> Tensor:
        return call_with(base, slots, params, x)

    return init_fn, apply_fn
