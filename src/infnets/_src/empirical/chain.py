"""The structured empirical NTK of layer chains, with a hand-written backward pass.

The structured algorithm (``empirical_ntk.contract``; Novak, Sohl-Dickstein & Schoenholz 2022,
"Fast Finite Width Neural Tangent Kernel", Sec. 3-4) needs, for every structured layer
``y = W u + b`` (``nn.Linear``, ``nn.ConvNd``), its inputs ``u`` and the output cotangents
``g = d f_o / d y`` of every example and output unit ``o``. For a general module these come
from ``vmap(jacrev)`` (``empirical_ntk.features``). When the module is a *chain*, an
``nn.Sequential`` (possibly nested) of per-example layers, this file computes the same
cotangents with a backward pass written out layer by layer:

* one forward pass over the whole batch keeps what the backward pass needs: the inputs of
  the structured layers, the derivative ``phi'(z)`` of each elementwise activation (a boolean
  mask for ReLU) and the inputs of the other parameter-free layers;
* the backward pass starts from the unit cotangents ``e_o`` (``(n, O, *S)``, the example axis
  a stride-0 broadcast) and walks the chain backwards: ``g <- g W`` for ``nn.Linear``, the
  input gradient of the convolution for ``nn.ConvNd`` (``aten.convolution_backward`` with only
  the input gradient requested, the input passed as uninitialized memory: its values are
  never read), ``g <- g * phi'(z)`` in place for activations, and ``torch.func.vjp`` vmapped
  over the output units for the other layers (pooling, flattening, padding, eval-mode
  normalization);
* it is a generator: each structured layer's ``(u, g)`` is contracted (both sides in
  lockstep when ``x1`` and ``x2`` differ) before the pass goes on, so only one layer's
  cotangents are alive at a time.

Against ``vmap(jacrev)`` this avoids broadcasting every saved activation over the ``O``
output units (the batching rule of the convolution backward materializes its input once per
unit, ``n O |u|`` numbers per layer, although the input gradient never reads it), out-of-place
masks, and holding all layers' cotangents at once. The arithmetic is the same, so both paths
agree to round-off (the tests compare them with each other and with a row-by-row autograd
Jacobian).

A chain qualifies when every trainable parameter belongs to a structured layer of the chain
called once, every other leaf is one of the per-example layer types below (so evaluating the
whole batch at once equals evaluating each example alone), and no module has forward hooks.
Anything else uses the general path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

from infnets._src.empirical.functorch import jvp, vjp
from infnets._src.empirical.model import Bound, _structured_kind, as_conv, tensor_slots

#: Elementwise activations: their backward is a multiplication by ``phi'(z)`` (computed by
#: forward-mode AD during the forward pass; a boolean mask for ``nn.ReLU``).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
)
#: Layers that are the identity at evaluation time (``Model.check_mode`` has refused random
#: dropout already).
IDENTITY: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
#: Parameter-free (or frozen) layers that act on each example separately, differentiated with
#: ``torch.func.vjp``. ``nn.Flatten``/``nn.Unflatten`` must not touch the batch axis (checked
#: on the actual input).
PER_EXAMPLE: tuple[type[nn.Module], ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)


def _writable(t: Tensor) -> bool:
    """Whether no element of ``t`` is stored twice (no stride-0 broadcast axis)."""
    return all(st != 0 or sz == 1 for st, sz in zip(t.stride(), t.shape))


class NotAChain(Exception):
    """Raised during the forward pass when a layer turns out not to act per example."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One leaf of the chain.

    Attributes:
        kind: ``'layer'`` (structured), ``'relu'``, ``'act'`` (other elementwise) or
            ``'map'`` (other per-example layer).
        name: the module's qualified name (the structured-layer key for ``'layer'``).
        module: the leaf module.
        params: its parameters and buffers by local name, as bound for this call.
    """

    kind: str
    name: str
    module: nn.Module
    params: dict[str, Tensor]

    def __call__(self, h: Tensor) -> Tensor:
        if not self.params:
            return self.module(h)
        return functional_call(self.module, self.params, (h,))


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]] | None:
    """The leaves of nested plain ``nn.Sequential`` containers, or ``None``."""
    out: list[tuple[str, nn.Module]] = []
    stack = [(prefix, module)]
    while stack:
        name, m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m):
            return None
        if isinstance(m, nn.Sequential):
            if type(m).forward is not nn.Sequential.forward:
                return None
            kids = [(f"{name}.{k}" if name else k, c) for k, c in m._modules.items()]
            stack.extend(reversed([(k, c) for k, c in kids if c is not None]))
        else:
            out.append((name, m))
    return out


def _plain(m: nn.Module, classes: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``m`` is an instance of one of ``classes`` with that class's own ``forward``."""
    for base in classes:
        if isinstance(m, base):
            return type(m).forward is base.forward
    return False


def chain_of(module: nn.Module | None, bound: Bound, layers: set[str]) -> list[Step] | None:
    """The chain of ``module`` for the structured path, or ``None`` if it does not qualify.

    Args:
        module: the model (``None`` for a function ``f(params, x)``: never a chain).
        bound: the bound parameters (trainable values and constants).
        layers: names of the structured layers called once per forward (the probe's).

    Returns:
        The steps in forward order, or ``None``.
    """
    if module is None:
        return None
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return None
    leaves = _leaves(module, "")
    if leaves is None:
        return None
    values = {**bound.const, **bound.values}
    canonical = tensor_slots(module)
    covered: set[str] = set()
    seen: set[int] = set()
    steps: list[Step] = []
    for name, m in leaves:
        if id(m) in seen or any(True for _ in m.children()):
            return None
        seen.add(id(m))
        prefix = f"{name}." if name else ""
        own = dict(m.named_parameters(recurse=False))
        local = {
            k: values[canonical[prefix + k]]
            for k in list(own) + [k for k, _ in m.named_buffers(recurse=False)]
            if canonical.get(prefix + k) in values
        }
        trainable = {canonical[prefix + k] for k in own if prefix + k in canonical}
        trainable &= set(bound.names)
        if name in layers and _structured_kind(m) is not None:
            covered |= trainable
            steps.append(Step("layer", name, m, local))
        elif trainable:
            return None
        elif _plain(m, IDENTITY):
            continue
        elif _plain(m, ELEMENTWISE):
            steps.append(Step("relu" if type(m) is nn.ReLU else "act", name, m, local))
        elif _plain(m, PER_EXAMPLE):
            steps.append(Step("map", name, m, local))
        else:
            return None
    if covered != set(bound.names) or not steps:
        return None
    return steps


def _per_example_map(step: Step, h: Tensor) -> None:
    """Refuse ``Flatten``/``Unflatten`` over the batch axis."""
    m = step.module
    if isinstance(m, nn.Flatten) and m.start_dim % h.ndim == 0:
        raise NotAChain(step.name)
    if isinstance(m, nn.Unflatten) and isinstance(m.dim, int) and m.dim % h.ndim == 0:
        raise NotAChain(step.name)


def _conv_input_grad(step: Step, g: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """``d/du <g, conv(u)>`` for ``g (B, C_out, *spatial)`` and inputs of ``in_shape``."""
    m = as_conv(step.module)
    d = len(in_shape) - 2
    w = step.params["weight"]
    pads = list(m._reversed_padding_repeated_twice)
    left = [pads[2 * (d - 1 - i)] for i in range(d)]
    right = [pads[2 * (d - 1 - i) + 1] for i in range(d)]
    simple = m.padding_mode == "zeros" and left == right
    padded = in_shape[:2] + tuple(s + a + b for s, a, b in zip(in_shape[2:], left, right))
    # The input gradient never reads the input's values: uninitialized memory (untouched
    # pages of a fresh allocation cost nothing) instead of a broadcast the kernel would copy.
    dummy = g.new_empty(in_shape if simple else padded)
    gi = torch.ops.aten.convolution_backward(
        g,
        dummy,
        w,
        None,
        list(m.stride),
        left if simple else [0] * d,
        list(m.dilation),
        False,
        [0] * d,
        m.groups,
        [True, False, False],
    )[0]
    if simple:
        return gi
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    # the padding's backward does not depend on the input: one example's pullback, vmapped
    _, pull = vjp(lambda t: F.pad(t, pads, mode=mode), g.new_zeros((1,) + in_shape[1:]))
    return vmap(lambda t: pull(t.unsqueeze(0))[0].squeeze(0))(gi)


@dataclasses.dataclass(frozen=True)
class Factored:
    """Cotangents ``g[i, u, *f] = e[u, *f] * h[i, *f]`` (broadcasting), kept factored.

    Behind a linear head ``f_u = sum_k W[u, k] z_k`` the cotangent of unit ``u`` is the row
    ``W[u]``, the same for every example; global average pooling spreads it evenly over the
    positions and elementwise activations multiply it by an example's ``phi'(z)``. Until the
    next structured layer mixes channels, ``g`` is therefore a product of a small unit factor
    ``e (c, C, 1, ..., 1)`` and an example factor ``h (n, C, *spatial)`` (``None``: ones).
    For a convolution reached in this form the weight Jacobian of unit ``u`` is
    ``e[u, k] A_i[k]`` with ``A_i = sum_p h_i[:, p] u_{i,p}^T``, one weight gradient per
    example instead of one per example and unit (``empirical_ntk._contract_factored``).

    Attributes:
        e: ``(c, *shape_e)``, broadcastable to ``(c, *shape)``.
        h: ``(n, *shape_h)`` broadcastable to ``(n, *shape)``, or ``None`` (ones).
        n: number of examples.
        shape: the per-example cotangent shape (the layer output's).
    """

    e: Tensor
    h: Tensor | None
    n: int
    shape: tuple[int, ...]

    @property
    def per_channel(self) -> bool:
        """Whether ``e`` depends on the channel (first feature axis) only."""
        return self.e.ndim >= 2 and all(s == 1 for s in self.e.shape[2:])

    def dense(self) -> Tensor:
        """``g`` as ``(n, c, *shape)`` (a stride-0 view over examples when ``h`` is ones)."""
        full = (self.n, self.e.shape[0]) + self.shape
        if self.h is None:
            return self.e.unsqueeze(0).expand(full)
        return (self.e.unsqueeze(0) * self.h.unsqueeze(1)).expand(full)


def _factored_map(step: Step, inp: Tensor, state: Factored) -> Factored | None:
    """The backward pass of ``nn.Flatten`` or of global average pooling on a factored
    cotangent, or ``None`` for other steps (then the dense form is used)."""
    m, in_shape = step.module, tuple(inp.shape[1:])
    n, c = state.n, state.e.shape[0]
    if type(m) is nn.Flatten:
        e = state.e.expand((c,) + state.shape).reshape((c,) + in_shape)
        h = state.h
        if h is not None:
            h = h.expand((n,) + state.shape).reshape((n,) + in_shape)
        return Factored(e, h, n, in_shape)
    pools = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    if type(m) in pools and len(state.shape) > 1 and all(s == 1 for s in state.shape[1:]):
        # pooled to one position: the mean over P positions, d out / d in = 1 / P everywhere
        p = math.prod(in_shape[1:])
        return Factored(state.e / p, state.h, n, in_shape)
    return None


class ChainSide:
    """One batch pushed through a chain: the forward pass, then backward passes on demand.

    Args:
        steps: the chain (:func:`chain_of`).
        x: the batch ``(n, *in_shape)``.
        out_shape: the per-example output shape ``S`` (the probe's).

    Raises:
        NotAChain: a layer acts across examples (then the caller uses the general path).
    """

    def __init__(self, steps: list[Step], x: Tensor, out_shape: tuple[int, ...]) -> None:
        self.steps = steps
        self.n = x.shape[0]
        self.out_shape = out_shape
        self.out_size = math.prod(out_shape)
        # the backward pass stops at the first structured layer: nothing before it is kept
        self.first = next(i for i, s in enumerate(steps) if s.kind == "layer")
        self.saved: list[Tensor | None] = []
        h = x
        for i, step in enumerate(steps):
            keep = i >= self.first
            if step.kind == "map":
                _per_example_map(step, h)
            # activations may work in place: never on (a view of) the caller's input
            aliased = h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            src = h.clone() if aliased and step.kind in ("relu", "act") else h
            if not keep:
                self.saved.append(None)
                h = step(src)
            elif step.kind == "relu":
                self.saved.append(h > 0)
                h = step(src)
            elif step.kind == "act":
                h, deriv = jvp(step, (src,), (torch.ones_like(src),))
                self.saved.append(deriv)
            else:
                self.saved.append(h)
                h = step(h)
        if tuple(h.shape) != (self.n,) + out_shape:
            raise NotAChain("output shape")
        self.dtype, self.device = h.dtype, h.device

    def backward(
        self, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[str, Tensor | Factored]]:
        """Yield ``(layer name, g)`` for the structured layers, from the last to the first.

        ``g`` holds the cotangents of the output units ``[start, stop)`` (``c`` of them, in
        flattened order) at the layer's output: a tensor ``(n, c, *layer_output_shape)``, or
        for a convolution read out by a linear head through global average pooling, a
        :class:`Factored` form. It must be used before the next item is requested.
        """
        stop = self.out_size if stop is None else stop
        c = stop - start
        eye = torch.zeros((c, self.out_size), dtype=self.dtype, device=self.device)
        eye[torch.arange(c), start + torch.arange(c)] = 1
        state: Tensor | Factored = Factored(
            eye.reshape((c,) + self.out_shape), None, self.n, self.out_shape
        )
        owned = False  # whether a dense state may be written in place
        for i in range(len(self.steps) - 1, self.first - 1, -1):
            step, saved = self.steps[i], self.saved[i]
            assert saved is not None
            if step.kind == "layer":
                conv = _structured_kind(step.module) != 0
                fac = state if isinstance(state, Factored) else None
                if fac is not None and not (conv and fac.per_channel):
                    state = fac.dense()
                    owned = _writable(state)
                yield step.name, state
                if i == self.first:
                    return
                if fac is not None and fac.h is None and not conv:
                    # a linear head: g = E W stays independent of the example
                    e = torch.matmul(fac.e, step.params["weight"])
                    state = Factored(e, None, self.n, tuple(saved.shape[1:]))
                    continue
                g = state.dense() if isinstance(state, Factored) else state
                state, owned = self._layer_input_grad(step, g, saved), True
            elif step.kind in ("relu", "act"):
                if isinstance(state, Factored):
                    factor = saved.to(self.dtype)  # a ReLU mask is boolean
                    h = factor if state.h is None else state.h * factor
                    state = Factored(state.e, h, self.n, state.shape)
                elif owned:
                    state.mul_(saved.unsqueeze(1))
                else:
                    state, owned = state * saved.unsqueeze(1), True
            elif (
                isinstance(state, Factored)
                and (mapped := _factored_map(step, saved, state)) is not None
            ):
                state = mapped
            else:
                g = state.dense() if isinstance(state, Factored) else state
                _, pull = vjp(step, saved)
                new = vmap(lambda t, pull=pull: pull(t)[0], in_dims=1, out_dims=1)(g)
                shares = new.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
                owned = (owned and not isinstance(state, Factored)) if shares else True
                state = new

    def _layer_input_grad(self, step: Step, g: Tensor, u: Tensor) -> Tensor:
        n, c = g.shape[:2]
        if _structured_kind(step.module) == 0:
            return torch.matmul(g, step.params["weight"])
        d = len(u.shape) - 2
        flat = g.reshape((n * c,) + tuple(g.shape[2:]))
        gi = _conv_input_grad(step, flat, (n * c,) + tuple(u.shape[1:]))
        assert gi.ndim == d + 2
        return gi.reshape((n, c) + tuple(u.shape[1:]))

    def inputs(self, name: str) -> Tensor:
        """The input of structured layer ``name`` (``(n, *in_shape)``)."""
        for step, saved in zip(self.steps, self.saved):
            if step.name == name and step.kind == "layer":
                assert saved is not None
                return saved
        raise KeyError(name)
