"""Taylor expansions of a network in its parameters, as trainable ``nn.Module`` s.

For parameters ``theta`` near an expansion point ``theta_0``,

    f_k(theta, x) = sum_{j=0}^{k} (1 / j!) D^j_theta f(theta_0, x)[theta - theta_0]^{(j)},

where ``D^j f[v]^{(j)} = d^j/dt^j f(theta_0 + t v)|_{t=0}`` is computed by ``j`` nested
forward-mode products (``torch.func.jvp``). ``k = 1`` is the linearized network of Lee et al.
(2019), "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent",
whose gradient-descent dynamics are those of kernel regression with the empirical NTK at
``theta_0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from infnets._src.empirical.functorch import jvp
from infnets._src.empirical.model import MODULE_LOCK, Bound, Model, call_with, tensor_slots


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


def _read(root: nn.Module, names: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            node = getattr(node, part)
        out[name] = getattr(node, leaf)
    return out


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


class TaylorModel(nn.Module):
    """A network replaced by its degree-``k`` Taylor polynomial in the parameters.

    The trainable parameters (registered under ``params``, mirroring the original names)
    start at the expansion point, which is frozen (buffers under ``expansion_point``;
    frozen parameters and buffers of the original module are under ``constants``).
    Build it with :func:`infnets.empirical.linearize` or
    :func:`infnets.empirical.taylor_expand`.
    """

    def __init__(self, model: Model, bound: Bound, degree: int) -> None:
        super().__init__()
        self.degree = degree
        self._names = bound.names
        self._unflatten = bound.unflatten
        self.params = _tree_module(bound.values, as_parameters=True)
        self.expansion_point = _tree_module(bound.values, as_parameters=False)
        self._module = model.module  # plain attribute: not a submodule of this module
        consts: dict[str, Tensor] = {}
        with model.locked():
            self._init_constants(model, bound, consts)
            self._slots = tensor_slots(model.module) if model.module is not None else {}
        self._const_names = tuple(consts)
        self.constants = _tree_module(consts, as_parameters=False)
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
        const = _read(self.constants, self._const_names)
        return call_with(self._module, self._slots, {**const, **values}, x)

    @property
    def current_params(self) -> Any:
        """The trainable parameters in the original layout (dict or pytree)."""
        return self._unflatten(_read(self.params, self._names))

    @property
    def expansion_params(self) -> Any:
        """The (frozen) expansion point in the original layout."""
        return self._unflatten(_read(self.expansion_point, self._names))

    def forward(self, x: Tensor) -> Tensor:
        """``sum_j D^j f(theta_0, x)[theta - theta_0]^{(j)} / j!`` for ``j <= degree``."""
        if self._module is None:
            return self._forward(x)
        with MODULE_LOCK:  # the original module is swapped while it runs (model.py)
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        theta0 = _read(self.expansion_point, self._names)
        if self.degree == 0:
            return self._apply_at(theta0, x)
        theta = _read(self.params, self._names)
        delta = {n: theta[n] - theta0[n] for n in self._names}
        terms = taylor_terms(lambda v: self._apply_at(v, x), theta0, delta, self.degree)
        out = terms[0]
        for j, term in enumerate(terms[1:], start=1):
            out = out + term / math.factorial(j)
        return out

    def extra_repr(self) -> str:
        return f"degree={self.degree}, n_params={sum(p.numel() for p in self.parameters())}"
