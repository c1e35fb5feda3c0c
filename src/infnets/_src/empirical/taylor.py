"""Taylor expansions of a network in its parameters, as trainable ``nn.Module`` s.

For parameters ``theta`` near an expansion point ``theta_0`` and ``delta = theta - theta_0``,

    f_k(theta, x) = sum_{j=0}^{k} (1 / j!) D^j_theta f(theta_0, x)[delta]^{(j)},

where ``D^j f[v]^{(j)} = d^j/dt^j f(theta_0 + t v)|_{t=0}``. ``k = 1`` is the linearized
network of Lee et al. (2019), "Wide Neural Networks of Any Depth Evolve as Linear Models Under
Gradient Descent", whose gradient-descent dynamics are those of kernel regression with the
empirical NTK at ``theta_0``.

Three evaluation paths, all exact (same values and gradients up to round-off):

* degree 1 (fast path): one forward pass of the network on dual tensors
  (``torch.autograd.forward_ad``): primal ``theta_0``, tangent ``delta``. The primal stream
  needs no autograd graph (``theta_0`` is a buffer); the tangent stream is recorded for the
  backward pass. About two forward passes and one backward pass of the network.
* degree 2 (fast path): one dual forward pass as above, but with the primal ``theta_0``
  recorded by autograd (leaf tensors ``theta``): its tangent ``u(theta) = J(theta) delta``
  is differentiated in ``theta`` along ``delta`` by two reverse passes (``a(c) =
  <grad_theta <c, u>, delta>`` with a dummy cotangent ``c`` is linear in ``c``, and
  ``grad_c a = D^2 f[delta, delta]``), which gives the value
  ``f + J delta + 1/2 D^2 f[delta, delta]``. Gradients come from the identity

      d/d delta <g, f_2> = J^T g + D^2 f[delta, .]^T g = grad_theta <g, f(theta) + J(theta) delta>

  at ``theta = theta_0`` with ``delta`` held fixed: one reverse pass through the graph of
  the same dual forward pass (:class:`_SecondOrderGrad`). With ``create_graph`` that pass is
  itself recorded and depends on ``delta``, so higher derivatives stay exact.
* otherwise (degree >= 3, inside ``torch.func`` transforms such as ``vmap`` for ensembles,
  or an input that requires grad at degree 2): ``k`` nested ``torch.func.jvp`` s
  (:func:`taylor_terms`), slower but composable with every ``torch.func`` transform.

The network's own tensors are replaced for the duration of a call by writing the module
slots directly (what ``torch.func.functional_call`` does, without its per-call overhead),
under :data:`~infnets._src.empirical.model.MODULE_LOCK`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn

from infnets._src.empirical.functorch import jvp
from infnets._src.empirical.model import MODULE_LOCK, Bound, Model, tensor_slots

#: ``(module, attribute, is_parameter)``: one place a tensor is stored in a module tree
Ref = tuple[nn.Module, str, bool]


def _tree_module(values: dict[str, Tensor], as_parameters: bool) -> nn.Module:
    """Nested ``nn.Module`` s holding ``values`` under their dotted names."""
    root = nn.Module()
    for name, value in values.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if as_parameters:
            node.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        else:
            node.register_buffer(leaf, value.detach().clone())
    return root


def _refs(root: nn.Module, names: tuple[str, ...]) -> list[Ref]:
    """Where each dotted name of :func:`_tree_module` is stored (read at call time, so that
    ``functional_call``/``stack_module_state`` replacements and ``.to()`` are seen)."""
    out = []
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            node = getattr(node, part)
        out.append((node, leaf, leaf in node._parameters))
    return out


def _read(refs: list[Ref], names: tuple[str, ...]) -> dict[str, Tensor]:
    return {
        n: (m._parameters[a] if is_p else m._buffers[a])  # type: ignore[misc]
        for n, (m, a, is_p) in zip(names, refs)
    }


def _slot_refs(module: nn.Module) -> list[tuple[nn.Module, str, bool, str]]:
    """Every slot of :func:`~infnets._src.empirical.model.tensor_slots` as
    ``(owner module, attribute, is_parameter, canonical name)``."""
    out = []
    for path, name in tensor_slots(module).items():
        prefix, _, attr = path.rpartition(".")
        owner = module.get_submodule(prefix)
        out.append((owner, attr, attr in owner._parameters, name))
    return out


@contextlib.contextmanager
def _swapped(
    slots: list[tuple[nn.Module, str, bool, str]], tensors: dict[str, Tensor]
) -> Iterator[None]:
    """Every slot holds ``tensors[name]`` inside the block; the originals are restored after.

    The same writes as ``torch.func.functional_call(module, ..., tie_weights=False)``
    (``module._parameters[attr] = t``), so dual and ``torch.func``-wrapped tensors pass
    through unchanged. The caller holds ``MODULE_LOCK``.
    """
    saved: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for owner, attr, is_param, name in slots:
            store: dict[str, Any] = owner._parameters if is_param else owner._buffers
            saved.append((store, attr, store[attr]))
            store[attr] = tensors[name]
        yield
    finally:
        for store, attr, original in reversed(saved):
            store[attr] = original


def taylor_terms(
    f: Callable[[dict[str, Tensor]], Tensor],
    theta0: dict[str, Tensor],
    delta: dict[str, Tensor],
    degree: int,
) -> list[Tensor]:
    """``[D^j f(theta0)[delta]^{(j)} for j = 0..degree]`` by nested ``jvp`` s.

    Args:
        f: function of the parameter dict.
        theta0: the expansion point.
        delta: the direction ``theta - theta0``.
        degree: highest order ``k``.

    Returns:
        ``k + 1`` tensors shaped like ``f(theta0)``.
    """
    if degree == 0:
        return [f(theta0)]

    def lower(theta: dict[str, Tensor]) -> list[Tensor]:
        return taylor_terms(f, theta, delta, degree - 1)

    primal, tangent = jvp(lower, (theta0,), (delta,))
    return [primal[0]] + list(tangent)


def _second_derivative(
    tangent: Tensor, points: dict[str, Tensor], direction: dict[str, Tensor]
) -> Tensor:
    """``D_theta(tangent)[direction]`` (here ``D^2 f[delta, delta]``) by two reverse passes.

    ``tangent = J(theta) delta`` was recorded as a function of the leaves ``points``
    (``theta``); with a dummy cotangent ``c``, ``a(c) = <grad_theta <c, tangent>, direction>``
    is linear in ``c`` and its gradient in ``c`` is the directional derivative.
    """
    dummy = torch.zeros_like(tangent, requires_grad=True)
    names = list(points)
    grads = torch.autograd.grad(
        tangent, [points[n] for n in names], dummy, create_graph=True, allow_unused=True
    )
    total: Tensor | None = None
    for name, g in zip(names, grads):
        if g is not None and g.requires_grad:
            term = (g * direction[name]).sum()
            total = term if total is None else total + term
    if total is None:  # the tangent does not depend on theta: f is linear in it
        return torch.zeros_like(tangent)
    (second,) = torch.autograd.grad(total, dummy, retain_graph=True, allow_unused=True)
    return torch.zeros_like(tangent) if second is None else second


class _SecondOrderGrad(torch.autograd.Function):
    """Attach the exact gradient of a degree-2 expansion to its (precomputed) value.

    ``forward(value, (points, lower), *deltas)`` returns ``value``; ``backward(g)`` returns,
    for each ``delta``, ``grad_theta <g, lower>`` at the leaves ``points`` (``lower`` is
    ``f(theta) + J(theta) delta``, recorded with the real ``deltas`` as tangents; see the
    module docstring). With ``create_graph`` the reverse pass is recorded too, and depends on
    ``deltas`` through ``lower``, so second derivatives are exact as well.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, saved: Any, *deltas: Tensor) -> Tensor:
        ctx.saved = saved
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        points, lower = ctx.saved
        grads = torch.autograd.grad(
            lower,
            points,
            grad,
            retain_graph=True,  # a caller may run backward twice (retain_graph=True)
            create_graph=torch.is_grad_enabled(),
            allow_unused=True,
        )
        return (None, None) + tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, points)
        )


class TaylorModel(nn.Module):
    """A network replaced by its degree-``k`` Taylor polynomial in the parameters.

    The trainable parameters (registered under ``params``, mirroring the original names)
    start at the expansion point, which is frozen (buffers under ``expansion_point``;
    frozen parameters and buffers of the original module are under ``constants``). Every
    tensor the forward pass reads is a registered parameter or buffer of this module, so
    ``torch.func.functional_call``, ``torch.func.stack_module_state`` + ``torch.func.vmap``
    (ensembles), ``state_dict``, ``.to()`` and ``copy.deepcopy`` see all of them.
    Build it with :func:`infnets.empirical.linearize` or
    :func:`infnets.empirical.taylor_expand` (the math, the papers and the costs are
    described there and in this module's docstring).

    Args:
        model: the adapted network (:class:`~infnets._src.empirical.model.Model`).
        bound: its parameters at the expansion point (:meth:`Model.bind`).
        degree: the order ``k >= 0`` of the polynomial.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import linearize
        >>> lin = linearize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
        >>> [n for n, _ in lin.named_parameters()]
        ['params.0.weight', 'params.0.bias', 'params.2.weight', 'params.2.bias']
        >>> params, buffers = torch.func.stack_module_state([lin, lin])  # an ensemble of 2
        >>> params["params.0.weight"].shape
        torch.Size([2, 4, 3])
    """

    def __init__(self, model: Model, bound: Bound, degree: int) -> None:
        super().__init__()
        self.degree = degree
        self._names = bound.names
        self._unflatten = bound.unflatten
        self.params = _tree_module(bound.values, as_parameters=True)
        self.expansion_point = _tree_module(bound.values, as_parameters=False)
        self._module = model.module  # plain attribute: not a submodule of this module
        self._in_place = model.in_place
        consts: dict[str, Tensor] = {}
        self._slots: list[tuple[nn.Module, str, bool, str]] = []
        with model.locked():
            self._init_constants(model, bound, consts)
            if model.module is not None:
                self._slots = _slot_refs(model.module)
        self._const_names = tuple(consts)
        self.constants = _tree_module(consts, as_parameters=False)
        self._param_refs = _refs(self.params, self._names)
        self._point_refs = _refs(self.expansion_point, self._names)
        self._const_refs = _refs(self.constants, self._const_names)
        self._call = bound.call

    @staticmethod
    def _init_constants(model: Model, bound: Bound, consts: dict[str, Tensor]) -> None:
        if model.module is not None:
            consts.update(
                {n: p for n, p in model.module.named_parameters() if n not in bound.values}
            )
            consts.update(dict(model.module.named_buffers()))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_module":  # keep the original module out of this module's tree
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply_at(self, values: dict[str, Tensor], x: Tensor) -> Tensor:
        if self._module is None:
            return self._call(values, x)
        tensors = {**_read(self._const_refs, self._const_names), **values}
        # a copy for in-place layers: the caller's input stays intact (and torch.func
        # refuses in-place writes to tensors captured from outside a transform)
        x = x.clone() if self._in_place else x
        with _swapped(self._slots, tensors):
            return self._module(x)

    @property
    def current_params(self) -> Any:
        """The trainable parameters in the original layout (dict or pytree)."""
        return self._unflatten(_read(self._param_refs, self._names))

    @property
    def expansion_params(self) -> Any:
        """The (frozen) expansion point in the original layout."""
        return self._unflatten(_read(self._point_refs, self._names))

    def forward(self, x: Tensor) -> Tensor:
        """``sum_j D^j f(theta_0, x)[theta - theta_0]^{(j)} / j!`` for ``j <= degree``."""
        if self._module is None:
            return self._forward(x)
        with MODULE_LOCK:  # the original module's slots are swapped while it runs
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        theta0 = _read(self._point_refs, self._names)
        if self.degree == 0:
            return self._apply_at(theta0, x)
        theta = _read(self._param_refs, self._names)
        delta = {n: theta[n] - theta0[n] for n in self._names}
        # torch.autograd.forward_ad has a single level and no vmap rule for dual tensors:
        # inside torch.func transforms (vmap ensembles, grad, jacrev) use the nested jvp
        fast = not torch._C._are_functorch_transforms_active()
        if fast and self.degree == 1:
            return self._first_order(theta0, delta, x)
        if fast and self.degree == 2 and not (torch.is_grad_enabled() and x.requires_grad):
            return self._second_order(theta0, delta, x)
        terms = taylor_terms(lambda v: self._apply_at(v, x), theta0, delta, self.degree)
        out = terms[0]
        for j, term in enumerate(terms[1:], start=1):
            out = out + term / math.factorial(j)
        return out

    def _first_order(
        self, theta0: dict[str, Tensor], delta: dict[str, Tensor], x: Tensor
    ) -> Tensor:
        """``f(theta0) + J delta``: one forward pass on dual tensors."""
        with fwad.dual_level():
            duals = {n: fwad.make_dual(theta0[n], delta[n]) for n in self._names}
            primal, tangent = fwad.unpack_dual(self._apply_at(duals, x))
        return primal if tangent is None else primal + tangent

    def _second_order(
        self, theta0: dict[str, Tensor], delta: dict[str, Tensor], x: Tensor
    ) -> Tensor:
        """``f + J delta + D^2 f[delta, delta] / 2`` with the exact gradient (module docstring)."""
        names = self._names
        with torch.enable_grad():
            points = {n: theta0[n].detach().requires_grad_() for n in names}
            with fwad.dual_level():
                duals = {n: fwad.make_dual(points[n], delta[n]) for n in names}
                primal, tangent = fwad.unpack_dual(self._apply_at(duals, x))
            if tangent is None:  # the output does not depend on the parameters
                return primal.detach()
            lower = primal + tangent
            fixed = {n: d.detach() for n, d in delta.items()}
            second = _second_derivative(tangent, points, fixed)
            value = (lower + 0.5 * second).detach()
        if not (torch.is_grad_enabled() and any(d.requires_grad for d in delta.values())):
            return value
        saved = (tuple(points.values()), lower)
        return _SecondOrderGrad.apply(value, saved, *delta.values())

    def extra_repr(self) -> str:
        return f"degree={self.degree}, n_params={sum(p.numel() for p in self.parameters())}"
