"""Taylor models (``linearize`` / ``taylor_expand``) against explicit derivatives, and ensembles.

References are assembled from ``torch.autograd.functional.jacobian`` on the flattened
parameter vector (``J``: outputs x parameters, ``H``: outputs x parameters x parameters), in
float64, so every comparison is to round-off (1e-10).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from infnets import empirical, stax

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


class ConvBN(nn.Module):
    """A convolution, BatchNorm with running statistics (buffers), tanh and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


def _model(name: str) -> tuple[nn.Module, Tensor]:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 2)
        )
        x = torch.randn(4, 3, generator=g, dtype=DT)
    else:
        model = ConvBN()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            model.bn.running_var.uniform_(0.5, 2.0, generator=g)
            model.bn.weight.uniform_(0.5, 1.5, generator=g)
        model.eval()
        x = torch.randn(3, 2, 4, 4, generator=g, dtype=DT)
    return model.double(), x


class Flat:
    """The model as ``F(vector) -> flat outputs`` with explicit ``J`` and ``H`` at ``v0``."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.model, self.x = model, x
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.v0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = s.numel()
            out[n] = v[i : i + k].reshape(s)
            i += k
        return out

    def __call__(self, v: Tensor) -> Tensor:
        return functional_call(self.model, self.unflatten(v), (self.x,)).reshape(-1)

    def derivatives(self) -> tuple[Tensor, Tensor, Tensor]:
        jac = torch.autograd.functional.jacobian
        f0 = self(self.v0).detach()
        j = jac(self, self.v0)
        h = jac(lambda v: jac(self, v, create_graph=True), self.v0)
        return f0, j, h


def _set(module: nn.Module, values: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(values[n.removeprefix("params.")])


@pytest.mark.parametrize("name", ["mlp", "convbn"])
@pytest.mark.parametrize("degree", [1, 2])
def test_values_and_gradients_match_explicit_derivatives(name: str, degree: int) -> None:
    model, x = _model(name)
    flat = Flat(model, x)
    f0, j, h = flat.derivatives()
    g = torch.Generator().manual_seed(4)
    d = 0.3 * torch.randn(flat.v0.shape, generator=g, dtype=DT)
    w = torch.randn(f0.shape, generator=g, dtype=DT)  # cotangent of the outputs
    expected = f0 + j @ d
    expected_grad = j.T @ w
    if degree == 2:
        expected = expected + 0.5 * torch.einsum("mpq,p,q->m", h, d, d)
        expected_grad = expected_grad + torch.einsum("mpq,m,q->p", h, w, d)
    taylor = empirical.taylor_expand(model, None, degree)
    _set(taylor, flat.unflatten(flat.v0 + d))
    out = taylor(x)
    torch.testing.assert_close(out.reshape(-1), expected, **TOL)
    (out.reshape(-1) @ w).backward()
    got = torch.cat([taylor.get_parameter("params." + n).grad.reshape(-1) for n in flat.names])
    torch.testing.assert_close(got, expected_grad, **TOL)
    # the nested torch.func.jvp path (used inside transforms) agrees with the fast one
    nested = vmap(lambda xi: taylor(xi[None])[0])(x)
    torch.testing.assert_close(nested, out.detach(), **TOL)
    with torch.no_grad():  # inference: same values, no graph
        again = taylor(x)
    assert not again.requires_grad
    torch.testing.assert_close(again, out.detach(), **TOL)


@pytest.mark.parametrize("degree", [1, 2])
def test_second_derivatives_are_exact(degree: int) -> None:
    """Hessian of ``<w, f_k(theta)>`` in ``theta``: ``sum_m w_m H_m`` for ``k = 2`` (constant),
    ``0`` for ``k = 1``; computed through the Taylor model with double backward."""
    model, x = _model("mlp")
    flat = Flat(model, x)
    f0, _, h = flat.derivatives()
    w = torch.randn(f0.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    taylor = empirical.taylor_expand(model, None, degree)
    d = 0.2 * torch.randn(flat.v0.shape, generator=torch.Generator().manual_seed(6), dtype=DT)
    names = ["params." + n for n in flat.names]
    buffers = dict(taylor.named_buffers())

    def objective(v: Tensor) -> Tensor:
        params = dict(zip(names, flat.unflatten(v).values()))
        return functional_call(taylor, (params, buffers), (x,)).reshape(-1) @ w

    hess = torch.autograd.functional.hessian(objective, flat.v0 + d)
    expected = torch.einsum("mpq,m->pq", h, w) if degree == 2 else torch.zeros_like(hess)
    torch.testing.assert_close(hess, expected, **TOL)


def test_pure_function_degree_two_and_input_gradients() -> None:
    """A function ``f(params, x)``; an input that requires grad takes the nested path, which
    gives the same value and the input gradient of the quadratic model."""
    g = torch.Generator().manual_seed(7)
    p0 = {"a": torch.randn(3, 4, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.sin(x @ p["a"]) * p["b"]

    x = torch.randn(5, 3, generator=g, dtype=DT)
    quad = empirical.taylor_expand(f, p0, 2)
    with torch.no_grad():
        for prm in quad.parameters():
            prm.add_(0.1 * torch.randn(prm.shape, generator=g, dtype=DT))
    fast = quad(x)
    xg = x.clone().requires_grad_()
    slow = quad(xg)
    torch.testing.assert_close(slow, fast, **TOL)
    (gx,) = torch.autograd.grad(slow.sum(), xg)
    theta0, delta = (
        quad.expansion_params,
        {k: quad.current_params[k] - quad.expansion_params[k] for k in p0},
    )

    def reference(x: Tensor) -> Tensor:
        def along(t: Tensor) -> Tensor:
            return f({k: theta0[k] + t * delta[k] for k in p0}, x)

        t0 = torch.zeros((), dtype=DT)
        first = torch.func.jvp(along, (t0,), (torch.ones((), dtype=DT),))
        second = torch.func.jvp(
            lambda t: torch.func.jvp(along, (t,), (torch.ones((), dtype=DT),))[1],
            (t0,),
            (torch.ones((), dtype=DT),),
        )[1]
        return first[0] + first[1] + 0.5 * second

    torch.testing.assert_close(gx, torch.func.grad(lambda x: reference(x).sum())(x), **TOL)


def test_frozen_trainable_subset_and_linear_model() -> None:
    """Freezing some Taylor parameters, and a model linear in its parameters
    (``D^2 f = 0``: the second-order path returns zeros for that term)."""
    torch.manual_seed(8)
    lin_model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=DT)
    quad = empirical.taylor_expand(lin_model, None, 2)
    with torch.no_grad():
        quad.params.weight.add_(1.0)
    expected = x @ (lin_model.weight + 1.0).T + lin_model.bias
    torch.testing.assert_close(quad(x), expected.detach(), **TOL)
    quad.params.bias.requires_grad_(False)
    quad(x).sum().backward()
    assert quad.params.bias.grad is None
    torch.testing.assert_close(quad.params.weight.grad, x.sum(0).expand(2, 3), **TOL)


# --------------------------------------------------------------------------- ensembles
def _ensemble_step(members: list[nn.Module], x: Tensor, y: Tensor, lr: float) -> dict:
    """One vmapped SGD step on ``1/2 |f(x) - y|^2`` for every member at once."""
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def loss(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return 0.5 * (functional_call(base, (p, b), (x,)) - y).square().sum()

    grads = vmap(grad(loss))(params, buffers)
    return {n: params[n].detach() - lr * grads[n] for n in params}


@pytest.mark.parametrize("kind", ["twin", "linearized", "quadratic"])
def test_vmapped_ensemble_step_matches_members(kind: str) -> None:
    net = stax.serial(stax.Dense(16, b_std=0.1), stax.Erf(), stax.Dense(1, b_std=0.1))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randn(6, 1, generator=g, dtype=DT)
    twins = [net.to_module((-1, 3), key=k, dtype=DT) for k in range(4)]
    if kind == "twin":
        members: list[nn.Module] = twins
    else:
        members = [
            empirical.taylor_expand(t, None, 1 if kind == "linearized" else 2) for t in twins
        ]
        with torch.no_grad():  # away from the expansion point, so every term matters
            for m in members:
                for p in m.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
    lr = 0.05
    stepped = _ensemble_step(members, x, y, lr)
    for i, member in enumerate(members):
        opt = torch.optim.SGD(member.parameters(), lr=lr)
        opt.zero_grad()
        (0.5 * (member(x) - y).square().sum()).backward()
        opt.step()
        for n, p in member.named_parameters():
            torch.testing.assert_close(stepped[n][i], p.detach(), **TOL)
