"""The layer protocol: one object, a finite network and its infinite-width kernel.

Every infnets layer is a small immutable object that unpacks into the triple
``(init_fn, apply_fn, kernel_fn)`` familiar from Neural Tangents' ``stax``:

* ``init_fn(key, input_shape, dtype=None, device=None) -> (output_shape, params)``
  samples the parameters of a finite network (``key`` an int seed or a
  ``torch.Generator``; ``-1`` marks the batch axis in shapes);
* ``apply_fn(params, x) -> y`` runs that finite network;
* ``kernel_fn(x1, x2=None, get=None)`` returns the exact NNGP/NTK of the same
  architecture in the limit of infinite width.

Subclasses implement three methods: :meth:`Layer.init`, :meth:`Layer.apply` and
:meth:`Layer.kernel` (a map from :class:`~infnets.Kernel` to ``Kernel``). Layers
with several inputs or outputs (``FanOut``, ``FanIn*``, ``parallel``) take and
return lists of shapes, tensors and kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from infnets._src.core import inputs as _inputs
from infnets._src.core import masking
from infnets._src.core.kernel import Kernel
from infnets._src.core.protocol import FusedStep, KernelFn, KernelTree, Params, ShapeTree
from infnets._src.evaluate import tiling
from infnets._src.layers import side_inputs


class Layer:
    """Base class of every infnets layer (see the module docstring)."""

    # ----------------------------------------------------------- to implement
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        """Sample parameters for input shape ``in_shape``; return ``(out_shape, params)``."""
        return in_shape, ()

    def apply(self, params: Params, x: Any) -> Any:
        """Run the finite layer on ``x`` (a tensor, or a list for fan-in layers)."""
        raise NotImplementedError

    def kernel(self, k: KernelTree) -> KernelTree:
        """Map the input :class:`Kernel` (or list of them) to the output one."""
        raise NotImplementedError

    # ----------------------------------------------- spatial requirements
    def spatial_requirement(self, out_full: Any) -> Any:
        """Whether this layer needs the full pixel-pair covariance of its input.

        Convolutional records keep either every pixel pair or only per-position
        covariances (see :mod:`infnets._src.core.kernel`). Each layer declares what it
        needs; ``serial``/``parallel`` combine the needs once, before computing.

        Args:
            out_full: whether the layers after this one need the full spatial
                covariance of its output (a list with one entry per branch for
                layers with several outputs).

        Returns:
            The same for its input (a list per input branch, or one bool for all).
            The default suits layers acting on each position separately
            (activations, normalisation over channels, ``Conv``): pass-through.
        """
        return out_full

    def kernel_planned(self, k: KernelTree, out_full: Any) -> KernelTree:
        """:meth:`kernel` knowing what follows needs (``None``: keep every layout as is).

        Containers (``serial``, ``parallel``) override this to drop pixel pairs as
        soon as no later layer needs them; other layers just call :meth:`kernel`.
        """
        return self.kernel(k)

    # ------------------------------------------------ what evaluation may ask
    def fused_steps(self) -> Sequence[FusedStep] | None:
        """This layer as steps of the fully-connected fast path, or ``None`` (no fused form).

        :func:`infnets._src.evaluate.chunks.fc_plan` fuses a network only when every layer
        declares steps: ``Dense`` in the NTK parameterization an
        :class:`~infnets._src.core.protocol.Affine` step, the ReLU family and ``Erf`` a
        :class:`~infnets._src.core.protocol.PairMap`, ``serial`` the steps of its layers.
        """
        return None

    def sublayers(self) -> Sequence[Layer]:
        """The layers this one is made of (containers), else ``()``."""
        return ()

    def extra_records(self) -> int:
        """How many records beyond one this layer keeps alive at once (``FanOut``: n - 1)."""
        return 0

    def output_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial shape of the output for inputs of spatial shape ``spatial``.

        For memory planning only: the default (the same shape) is right for layers that keep
        or shrink the positions; layers that enlarge them (``ConvTranspose``, upsampling
        ``ImageResize``) must override it.
        """
        return spatial

    # ----------------------------------------------------------- public API
    @property
    def init_fn(self) -> Callable[..., tuple[ShapeTree, Params]]:
        """``init_fn(key, input_shape, dtype=None, device=None) -> (out_shape, params)``."""
        return self._init_fn

    @property
    def apply_fn(self) -> Callable[..., Any]:
        """``apply_fn(params, x, *, mask_constant=None, mask=None, rng=None, **side) -> y``: the
        finite network (masks of padded positions: :mod:`infnets._src.core.masking`; ``rng``:
        seed or generator of ``Dropout`` in train mode; ``side``: ``pattern=`` for graph
        networks, see ``stax.Aggregate``)."""
        return self._apply_fn

    def _apply_fn(
        self,
        params: Params,
        x: Any,
        *,
        mask_constant: float | None = None,
        mask: Tensor | None = None,
        rng: int | torch.Generator | None = None,
        **side: Any,
    ) -> Any:
        masked = mask_constant is not None or mask is not None or rng is not None
        if not masked and not side:
            return self.apply(params, x)
        with contextlib.ExitStack() as stack:
            if side:
                stack.enter_context(side_inputs.using(**side))
            if masked:
                stack.enter_context(masking.apply_context(x, mask_constant, mask, rng))
            return self.apply(params, x)

    @property
    def kernel_fn(self) -> KernelFn:
        """``kernel_fn(x1, x2=None, get=None, *, diagonal_spatial=None, memory_budget=None,
        batch_size=None, progress=None, mask_constant=None, per_layer=False)``: the
        infinite-width kernels (see
        :func:`infnets._src.evaluate.tiling.kernel_fn` for the options)."""
        return self._kernel_fn

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter((self.init_fn, self.apply_fn, self.kernel_fn))

    def __call__(self, x1: Any, x2: Any = None, get: Any = None, **options: Any) -> Any:
        """Shorthand for :meth:`kernel_fn`."""
        return self._kernel_fn(x1, x2, get, **options)

    def _init_fn(
        self,
        key: int | torch.Generator,
        input_shape: Any,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Any, Params]:
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.device("cpu")
        gen = _inputs.make_generator(key, device)
        return self.init(gen, _as_shape(input_shape), dtype, device)

    def _kernel_fn(self, x1: Any, x2: Any = None, get: Any = None, **options: Any) -> Any:
        side = {name: options.pop(name) for name in side_inputs.NAMES if name in options}
        if side:
            with side_inputs.using(**side):
                return self._kernel_fn(x1, x2, get, **options)
        if isinstance(x1, Kernel) or (
            isinstance(x1, list) and x1 and all(isinstance(k, Kernel) for k in x1)
        ):
            if x2 is not None or get is not None or options:
                raise ValueError("kernel_fn(kernel): pass a Kernel record alone, without x2/get.")
            return self.kernel(x1)
        return tiling.kernel_fn(self, x1, x2, get, **options)

    def to_module(
        self,
        input_shape: Any,
        key: int | torch.Generator = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        mask_constant: float | None = None,
    ) -> StaxModule:
        """The finite network as a trainable ``torch.nn.Module``.

        Args:
            input_shape: shape of one batch of inputs, batch axis first (``-1`` allowed).
            key: seed or generator for the initial parameters.
            dtype, device: of the parameters (default: torch's default dtype, CPU).
            mask_constant: default mask constant of ``module(x)`` (padded positions;
                see :mod:`infnets._src.core.masking`); ``module(x, mask_constant=...)`` or
                ``module(x, mask=...)`` override it per call.

        Returns:
            A :class:`StaxModule` whose registered parameters are this layer's
            ``params``; ``module(x) == apply_fn(params, x)``.
        """
        out_shape, params = self._init_fn(key, input_shape, dtype, device)
        module = StaxModule(self, params, out_shape)
        module.mask_constant = mask_constant
        return module


def _as_shape(shape: Any) -> Any:
    if isinstance(shape, list):
        return [_as_shape(s) for s in shape]
    if isinstance(shape, torch.Size):
        return tuple(shape)
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        raise TypeError(f"input_shape must be a tuple of ints such as (-1, 64), got {shape!r}.")
    return shape


# ------------------------------------------------------------------ nn.Module
def _to_modules(params: Params) -> nn.Module | nn.Parameter:
    if isinstance(params, Tensor):
        return nn.Parameter(params)
    if isinstance(params, dict):
        m = nn.Module()
        for name, p in params.items():
            child = _to_modules(p)
            if isinstance(child, nn.Parameter):
                m.register_parameter(name, child)
            else:
                m.add_module(name, child)
        return m
    if isinstance(params, (tuple, list)):
        container = nn.ModuleList()
        for p in params:
            child = _to_modules(p)
            if isinstance(child, nn.Parameter):
                holder = nn.Module()
                holder.register_parameter("value", child)
                child = holder
            container.append(child)
        return container
    if params is None:
        return nn.Module()
    raise TypeError(f"unsupported parameter container {type(params).__name__}")


def _from_modules(template: Params, module: Any) -> Params:
    if isinstance(template, Tensor):
        return module
    if isinstance(template, dict):
        return {name: _from_modules(p, getattr(module, name)) for name, p in template.items()}
    if isinstance(template, (tuple, list)):
        out = []
        for p, child in zip(template, module):
            if isinstance(p, Tensor):
                out.append(child.value)
            else:
                out.append(_from_modules(p, child))
        return type(template)(out) if isinstance(template, tuple) else out
    return template


def _freeze(layer: Layer, template: Params, module: Any) -> None:
    """``requires_grad=False`` on the parameters of layers marked ``frozen`` (``stax.Frozen``).

    Containers' params are tuples aligned with :meth:`Layer.sublayers`, so the walk follows
    both trees together.
    """
    if getattr(layer, "frozen", False):
        if isinstance(module, nn.Module):
            for p in module.parameters():
                p.requires_grad_(False)
        return
    kids = layer.sublayers()
    if kids and isinstance(template, (tuple, list)) and len(template) == len(kids):
        for kid, sub, child in zip(kids, template, module):
            _freeze(kid, sub, child)


class Wrapper(Layer):
    """A layer around one other layer, ``self.layer``, whose finite twin it keeps.

    Subclasses change the kernel (e.g. :class:`~infnets._src.layers.frozen.Frozen`);
    parameters, the forward pass and the spatial layout are the wrapped layer's.
    """

    layer: Layer

    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        return self.layer.init(gen, in_shape, dtype, device)

    def apply(self, params: Params, x: Any) -> Any:
        return self.layer.apply(params, x)

    def spatial_requirement(self, out_full: Any) -> Any:
        return self.layer.spatial_requirement(out_full)


class StaxModule(nn.Module):
    """A finite infnets network as a ``torch.nn.Module``.

    The parameters of ``layer.init_fn`` are registered as ``nn.Parameter`` in a
    tree of submodules mirroring their nesting, so ``torch.optim`` trains them
    and ``torch.func.functional_call`` works on ``named_parameters()``.

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Dense(32), stax.Relu(), stax.Dense(1))
        >>> m = net.to_module((-1, 3), key=0)
        >>> m(torch.ones(5, 3)).shape
        torch.Size([5, 1])
    """

    def __init__(self, layer: Layer, params: Params, output_shape: Any) -> None:
        super().__init__()
        self.layer = layer
        self.output_shape = output_shape
        self._template = params
        self.params = _to_modules(params)
        _freeze(layer, params, self.params)

    @property
    def stax_params(self) -> Params:
        """The parameters in ``apply_fn``'s nested layout (the registered tensors)."""
        return _from_modules(self._template, self.params)

    #: default ``mask_constant`` of :meth:`forward` (set by ``to_module``)
    mask_constant: float | None = None

    def forward(
        self,
        x: Any,
        *,
        mask_constant: float | None = None,
        mask: Tensor | None = None,
        **side: Any,
    ) -> Any:
        """``apply_fn(params, x)``; padded positions marked by ``mask_constant`` (default:
        the module's ``mask_constant``) or an explicit boolean ``mask``; ``side``:
        ``pattern=`` for graph networks."""
        if mask_constant is None and mask is None:
            mask_constant = self.mask_constant
        return self.layer.apply_fn(
            self.stax_params, x, mask_constant=mask_constant, mask=mask, **side
        )

    def extra_repr(self) -> str:
        return repr(self.layer)


def adapt_spatial(k: Any, need: Any, layer: Layer) -> Any:
    """Bring a record (or a list of them) to the spatial layout ``need`` asks for.

    Args:
        k: a :class:`Kernel` or a list of them (branches).
        need: ``True`` (full pixel-pair covariance needed), ``False`` (per-position
            covariances suffice: full records are reduced, exactly), ``None`` (keep
            as is), or a list with one entry per branch.
        layer: the layer about to receive ``k`` (for error messages).

    Returns:
        The adapted record(s).

    Raises:
        ValueError: ``need`` is ``True`` but ``k`` kept only per-position covariances.
    """
    if need is None:
        return k
    if isinstance(k, list):
        needs = need if isinstance(need, list) else [need] * len(k)
        if len(needs) != len(k):  # the layer itself reports the branch-count mismatch
            return k
        return [adapt_spatial(ki, ni, layer) for ki, ni in zip(k, needs)]
    if isinstance(need, list):
        need = any(n is True for n in need)
    if not isinstance(k, Kernel) or not k.is_spatial:
        return k
    if need and k.diagonal_spatial:
        raise ValueError(
            f"{layer!r} needs the full spatial covariance (every pair of positions) of its "
            "input, but only per-position covariances were kept (diagonal_spatial=True). "
            "Call kernel_fn with diagonal_spatial=None (automatic) or False."
        )
    if not need and k.is_full_spatial:
        return k.to_diagonal_spatial()
    return k


def as_layer_list(layers: Sequence[Any], who: str) -> list[Layer]:
    """Check that every element is a :class:`Layer` (a clear error otherwise)."""
    out = list(layers)
    for i, layer in enumerate(out):
        if not isinstance(layer, Layer):
            raise TypeError(
                f"{who}: argument {i} is {type(layer).__name__}, not an infnets layer; "
                "build layers with infnets.stax (e.g. stax.Dense(512))."
            )
    return out


if TYPE_CHECKING:  # the base class satisfies the protocol the evaluation engine relies on
    from infnets._src.core.protocol import KernelLayer

    _PROTOCOL: KernelLayer = Layer()
