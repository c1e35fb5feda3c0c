"""A finite network seen as a pure function of named parameter tensors.

The empirical kernels accept two kinds of model:

* a ``torch.nn.Module``: its trainable parameters (``requires_grad=True``) are the variables
  of the kernel; frozen parameters and buffers (e.g. BatchNorm running statistics) are
  constants. The module is evaluated with ``torch.func.functional_call``.
* a pure function ``f(params, x)`` whose ``params`` is a pytree (nested dicts / tuples /
  lists of tensors, e.g. the params of an ``infnets.stax`` network). Its leaves are named by
  their path, joined with dots (``"0.W"``).

:class:`Model` hides the difference: :meth:`Model.bind` returns a :class:`Bound` model with a
dict ``values`` of trainable tensors and ``call(values, x)``.

This file also finds the *structured* layers of a module (``nn.Linear``, ``nn.Conv1d/2d/3d``
called once per forward, with their own untied parameters) and provides the forward hooks
the structured NTK uses to read their inputs and to inject output perturbations.

Threads: ``functional_call`` swaps the bound tensors into the module's own attributes for the
duration of a forward pass and swaps the originals back, and the structured NTK registers
forward hooks on the user's layers. Two threads doing either on one module at once would see
each other's tensors (wrong kernels) and could leave detached tensors in the model
(``requires_grad=False`` on every parameter). Every public entry point that touches an
``nn.Module`` therefore holds :data:`MODULE_LOCK` (re-entrant, process-wide) for its whole
call (:meth:`Model.locked`, :func:`locked`); pure functions ``f(params, x)`` run unlocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias, TypeVar, cast

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

Params = Any  # a pytree of tensors, or a dict name -> tensor for modules

#: the module types of structured convolution layers
ConvModule: TypeAlias = nn.Conv1d | nn.Conv2d | nn.Conv3d

_CONV_TYPES: dict[type[ConvModule], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}

#: held while any ``nn.Module`` is read, swapped (``functional_call``) or hooked (see the
#: module docstring); re-entrant, so nested entry points (a kernel calling another) are fine
MODULE_LOCK = threading.RLock()

_F = TypeVar("_F", bound=Callable[..., Any])


def locked(method: _F) -> _F:
    """Run ``method`` of an object with a ``model`` (:class:`Model`) under its lock."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.model.locked():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a pytree leaf from its key path (``"0.W"``; ``"param"`` for a root leaf)."""
    return ".".join(_key_name(e) for e in path) or "param"


def tensor_slots(module: nn.Module) -> dict[str, str]:
    """Every place a parameter or buffer is stored, mapped to its canonical name.

    ``functional_call`` must be given each *distinct* ``(module, attribute)`` slot once: a
    module that appears twice in the tree (``nn.Sequential(lin, act, lin)``) would be swapped
    twice by ``tie_weights=True``, and the second swap's "original" is the replacement, which
    then stays in the user's model (torch 2.x). Modules are therefore visited once
    (``named_modules`` removes duplicates), while a tensor shared by two different modules
    (tied weights) gets one slot per module, both bound to the value of its canonical name
    (the one ``named_parameters``/``named_buffers`` report).
    """
    canonical = {id(t): n for n, t in module.named_parameters()}
    canonical.update({id(t): n for n, t in module.named_buffers()})
    slots: dict[str, str] = {}
    for prefix, m in module.named_modules():
        stored = list(m._parameters.items()) + list(m._buffers.items())
        for attr, t in stored:
            if t is not None and id(t) in canonical:
                slots[f"{prefix}.{attr}" if prefix else attr] = canonical[id(t)]
    return slots


def call_with(
    module: nn.Module, slots: dict[str, str], tensors: dict[str, Tensor], x: Tensor
) -> Tensor:
    """``module(x)`` with every slot of :func:`tensor_slots` replaced by ``tensors[name]``."""
    bound = {path: tensors[name] for path, name in slots.items()}
    with MODULE_LOCK:
        return functional_call(module, bound, (x,), tie_weights=False)


def wrap_model_error(who: str, err: Exception) -> RuntimeError:
    """A clear error for a model that torch.func cannot evaluate (chained to ``err``)."""
    return RuntimeError(
        f"{who}: evaluating `model` with torch.func failed ({type(err).__name__}: {err}). "
        "The model must be a pure function of its parameters and inputs, callable through "
        "torch.func.functional_call/vmap/jacrev/jvp, with independent examples: put "
        "BatchNorm/Dropout in eval mode (model.eval()), avoid .item()/float(tensor), "
        "data-dependent Python control flow and in-place updates of parameters. If only one "
        "implementation fails, try implementation='jacobian_contraction'."
    )


@dataclasses.dataclass(frozen=True)
class Bound:
    """A model with its parameters fixed.

    Attributes:
        names: trainable parameter names, in a fixed order.
        values: ``name -> tensor`` trainable parameters (detached).
        call: ``call(values, x) -> f(x)`` evaluating the model at ``values``.
        unflatten: ``values -> params`` in the caller's layout (pytree or dict).
        const: for modules, ``name -> tensor`` of the frozen parameters and buffers that
            ``call`` holds fixed (after ``params`` overrides); empty for functions.
    """

    names: tuple[str, ...]
    values: dict[str, Tensor]
    call: Callable[[dict[str, Tensor], Tensor], Tensor]
    unflatten: Callable[[dict[str, Tensor]], Params]
    const: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """Total number of trainable scalars."""
        return sum(v.numel() for v in self.values.values())


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """A layer whose NTK contribution has a structured closed form.

    Attributes:
        name: qualified module name.
        module: the ``nn.Linear`` / ``nn.ConvNd`` module.
        conv_dims: 0 for ``nn.Linear``, else the number of spatial dimensions.
        weight: full name of its trainable weight, or ``None`` if frozen.
        bias: full name of its trainable bias, or ``None`` if absent or frozen.
    """

    name: str
    module: nn.Module
    conv_dims: int
    weight: str | None
    bias: str | None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def linear(self) -> nn.Linear:
        """The module as the ``nn.Linear`` it is when ``conv_dims == 0``."""
        return cast(nn.Linear, self.module)

    @property
    def conv(self) -> ConvModule:
        """The module as the ``nn.ConvNd`` it is when ``conv_dims > 0``."""
        return as_conv(self.module)


def as_conv(m: nn.Module) -> ConvModule:
    """``m``, known to be a plain ``nn.ConvNd`` (:func:`_structured_kind`), typed as one."""
    return cast(ConvModule, m)


class Model:
    """Adapter from an ``nn.Module`` or a function ``f(params, x)`` to named tensors.

    Args:
        model: the module or the function.
        who: name of the public function, for error messages.
    """

    def __init__(self, model: Any, who: str) -> None:
        self.who = who
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                f"{who}: model is a TorchScript module, which torch.func cannot transform; "
                "pass the original (eager) nn.Module instead."
            )
        if isinstance(model, nn.Module):
            self.module: nn.Module | None = model
            self.fn: Callable[..., Tensor] | None = None
            # layers such as nn.ReLU(inplace=True) may overwrite the input they are given
            with MODULE_LOCK:  # another thread may have swapped tensors in (see above)
                self.in_place = any(getattr(m, "inplace", False) is True for m in model.modules())
                trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            if not trainable:
                raise ValueError(
                    f"{who}: model {type(model).__name__} has no trainable parameters "
                    "(none with requires_grad=True), so its NTK is zero. Unfreeze some, e.g. "
                    "`for p in model.parameters(): p.requires_grad_(True)`."
                )
        elif callable(model):
            self.module = None
            self.fn = model
            self.in_place = False
        else:
            raise TypeError(
                f"{who}: model must be a torch.nn.Module or a function f(params, x), got "
                f"{type(model).__name__}."
            )

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        """:data:`MODULE_LOCK` for a module; a no-op context for a pure function."""
        return MODULE_LOCK if self.module is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ binding
    def bind(self, params: Params | None) -> Bound:
        """Fix the parameters: the module's own (optionally overridden) or ``params``.

        Args:
            params: for a module, ``None`` or a dict ``name -> tensor`` overriding some of
                ``module.named_parameters()``; for a function, the params pytree (required).

        Returns:
            The :class:`Bound` model.
        """
        if self.module is not None:
            with MODULE_LOCK:
                return self._bind_module(params)
        return self._bind_function(params)

    def _bind_module(self, params: Params | None) -> Bound:
        module = self.module
        assert module is not None
        all_params = dict(module.named_parameters())
        overrides: dict[str, Tensor] = {}
        if params is not None:
            if not isinstance(params, dict):
                raise TypeError(
                    f"{self.who}: for an nn.Module, params must be None or a dict "
                    f"name -> tensor (like dict(model.named_parameters())), got "
                    f"{type(params).__name__}."
                )
            for name, value in params.items():
                if name not in all_params:
                    known = ", ".join(list(all_params)[:6])
                    raise KeyError(
                        f"{self.who}: params has key {name!r}, which is not a parameter of "
                        f"the model (its parameters are {known}, ...)."
                    )
                if not isinstance(value, Tensor):
                    raise TypeError(f"{self.who}: params[{name!r}] must be a tensor.")
                overrides[name] = value
        names = tuple(n for n, p in all_params.items() if p.requires_grad)
        values = {n: overrides.get(n, all_params[n]).detach() for n in names}
        const: dict[str, Tensor] = {
            n: overrides.get(n, p).detach() for n, p in all_params.items() if n not in values
        }
        const.update({n: b.detach() for n, b in module.named_buffers()})

        in_place = self.in_place
        slots = tensor_slots(module)

        def call(vals: dict[str, Tensor], x: Tensor) -> Tensor:
            # a copy for in-place layers: the caller's inputs stay intact (and torch.func
            # refuses in-place writes to tensors captured from outside a transform)
            return call_with(module, slots, {**const, **vals}, x.clone() if in_place else x)

        return Bound(names, values, call, lambda vals: dict(vals), const)

    def _bind_function(self, params: Params | None) -> Bound:
        fn = self.fn
        assert fn is not None
        if params is None:
            raise ValueError(
                f"{self.who}: model is a function f(params, x), so pass its parameters: "
                "ntk_fn(x1, x2, params=params)."
            )
        leaves_with_path, spec = pytree.tree_flatten_with_path(params)
        names: list[str] = []
        values: dict[str, Tensor] = {}
        for path, leaf in leaves_with_path:
            if not isinstance(leaf, Tensor):
                raise TypeError(
                    f"{self.who}: params must be a pytree of tensors; leaf {path_name(path)!r} "
                    f"is {type(leaf).__name__}."
                )
            name = path_name(path)
            names.append(name)
            values[name] = leaf.detach()
        trainable = [n for n in names if values[n].is_floating_point() and values[n].numel()]
        if not trainable:
            raise ValueError(
                f"{self.who}: params has no floating-point tensors with elements, so the model "
                "has no trainable parameters and its NTK is zero."
            )
        order = tuple(names)
        fixed = {n: values[n] for n in names if n not in trainable}

        def unflatten(vals: dict[str, Tensor]) -> Params:
            return pytree.tree_unflatten([vals[n] if n in vals else fixed[n] for n in order], spec)

        def call(vals: dict[str, Tensor], x: Tensor) -> Tensor:
            return fn(unflatten(vals), x)

        return Bound(tuple(trainable), {n: values[n] for n in trainable}, call, unflatten)

    # ------------------------------------------------------------------ checks
    def check_mode(self) -> None:
        """Refuse modules whose examples are not independent or that are random."""
        if self.module is None:
            return
        for name, m in self.module.named_modules():
            label = name or type(self.module).__name__
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                m.training or not m.track_running_stats
            ):
                raise ValueError(
                    f"{self.who}: {label} ({type(m).__name__}) normalizes with batch statistics "
                    "(training mode or track_running_stats=False), so the examples of a batch "
                    "are not independent and the empirical NTK is ill-defined. Call "
                    "model.eval() first (running statistics are then constants)."
                )
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(
                    f"{self.who}: {label} ({type(m).__name__}) is random in training mode; "
                    "call model.eval() before computing kernels."
                )

    def check_transformable(self) -> None:
        """Refuse modules that ``torch.func`` transforms (``vmap``, ``jacrev``, ``jvp``) cannot
        differentiate per example: recurrent layers (``nn.RNN``/``nn.LSTM``/``nn.GRU`` run
        fused kernels without batching rules)."""
        if self.module is None:
            return
        for name, m in self.module.named_modules():
            if isinstance(m, nn.RNNBase):
                raise TypeError(
                    f"{self.who}: {name or type(m).__name__} is a recurrent layer "
                    f"({type(m).__name__}), which torch.func cannot vmap or differentiate per "
                    "example, so its empirical NTK cannot be computed. Write the recurrence "
                    "out as a Python loop over nn.Linear layers (or pass a function "
                    "f(params, x) doing so); the empirical NNGP (outputs only) works as is."
                )

    # ------------------------------------------------------------------ structure
    def structured_layers(self, trainable: tuple[str, ...]) -> dict[str, LayerRule]:
        """The ``nn.Linear``/``nn.ConvNd`` layers eligible for the structured NTK rule.

        A layer qualifies when it is a plain (not subclassed-forward) Linear/Conv, owns its
        ``weight``/``bias`` directly (no parametrization, no weight tying, no forward hooks of
        its own) and at least one of them is trainable. Layers called more than once per
        forward are excluded later, by the probe pass.
        """
        if self.module is None:
            return {}
        train = set(trainable)
        counts: dict[int, int] = {}
        for _, p in self.module.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        rules: dict[str, LayerRule] = {}
        for name, m in self.module.named_modules():
            conv_dims = _structured_kind(m)
            if conv_dims is None:
                continue
            if m._forward_hooks or parametrize.is_parametrized(m):
                continue
            prefix = f"{name}." if name else ""
            own = {k: p for k, p in m._parameters.items() if p is not None}
            if "weight" not in own or any(counts.get(id(p), 0) != 1 for p in own.values()):
                continue
            if set(own) - {"weight", "bias"}:
                continue
            weight = f"{prefix}weight" if f"{prefix}weight" in train else None
            bias = f"{prefix}bias" if "bias" in own and f"{prefix}bias" in train else None
            if weight is None and bias is None:
                continue
            rules[name] = LayerRule(name, m, conv_dims, weight, bias)
        return rules


def _structured_kind(m: nn.Module) -> int | None:
    """0 for a plain ``nn.Linear``, d for a plain ``nn.ConvNd``, ``None`` otherwise."""
    typ = type(m)
    if typ.forward is nn.Linear.forward:
        return 0
    for base, dims in _CONV_TYPES.items():
        if isinstance(m, base):
            conv_type = type(m)
            plain = (
                conv_type.forward is base.forward and conv_type._conv_forward is base._conv_forward
            )
            return dims if plain else None
    return None


class LayerTap:
    """Forward hooks on structured layers: count calls, record inputs, add perturbations."""

    def __init__(self, rules: dict[str, LayerRule]) -> None:
        self.rules = rules
        self.calls: dict[str, int] = {}
        self.out_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.inputs: dict[str, Tensor] = {}
        self.deltas: dict[str, Tensor] | None = None

    @contextlib.contextmanager
    def probing(self) -> Iterator[LayerTap]:
        """Count calls and record per-call output shapes (plain forward pass)."""
        self.calls, self.out_shapes = {}, {}

        def make(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
            def hook(mod: nn.Module, args: Any, out: Tensor) -> None:
                self.calls[name] = self.calls.get(name, 0) + 1
                self.out_shapes[name] = (tuple(out.shape), out.dtype)

            return hook

        with self._registered(make):
            yield self

    @contextlib.contextmanager
    def injecting(self, deltas: dict[str, Tensor]) -> Iterator[LayerTap]:
        """Record each layer's input and return ``output + deltas[name]``."""
        self.inputs, self.deltas = {}, deltas

        def make(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
            def hook(mod: nn.Module, args: Any, out: Tensor) -> Tensor | None:
                if name not in deltas:
                    return None
                self.inputs[name] = args[0]
                return out + deltas[name]

            return hook

        try:
            with self._registered(make):
                yield self
        finally:
            self.deltas = None

    @contextlib.contextmanager
    def _registered(self, make: Callable[[str], Any]) -> Iterator[None]:
        handles = [r.module.register_forward_hook(make(n)) for n, r in self.rules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
