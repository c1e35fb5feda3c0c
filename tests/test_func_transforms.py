"""``torch.func`` transforms through ``kernel_fn``: gradients against finite differences.

The oracle is a central difference ``(k(x + h e) - k(x - h e)) / 2h`` in float64 with
``h = 1e-6``: its truncation error is ``O(h^2 |k'''|)`` ~ 1e-12 and its rounding error
``~ eps |k| / h`` ~ 1e-10 for kernels of order one, so 1e-6 relative is a safe margin that a
wrong derivative (off by any structural term) cannot meet.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev

from infnets import stax

DT = torch.float64
H = 1e-6


def _fd(f, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Central differences of a scalar function of ``x``, entry by entry."""
    out = torch.empty_like(x)
    flat, grad_flat = x.reshape(-1), out.reshape(-1)
    for i in range(flat.numel()):  # a test oracle over a handful of coordinates
        e = torch.zeros_like(flat)
        e[i] = H
        grad_flat[i] = (f((flat + e).view_as(x)) - f((flat - e).view_as(x))) / (2 * H)
    return out


NETS = {
    "relu": lambda: stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1)),
    "erf": lambda: stax.serial(stax.Dense(8, W_std=1.2, b_std=0.2), stax.Erf(), stax.Dense(1)),
    "gelu": lambda: stax.serial(stax.Dense(8), stax.Gelu(), stax.Dense(1, b_std=0.3)),
    "conv": lambda: stax.serial(
        stax.Conv(4, (3,), padding="SAME", W_std=1.3, b_std=0.1),
        stax.Relu(),
        stax.GlobalAvgPool(),
        stax.Dense(1),
    ),
}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_grad_wrt_inputs(name: str, get: str) -> None:
    net = NETS[name]()
    gen = torch.Generator().manual_seed(0)
    shape = (3, 2, 5) if name == "conv" else (3, 4)
    x1 = torch.randn(shape, generator=gen, dtype=DT)
    x2 = torch.randn(shape, generator=gen, dtype=DT)
    weights = torch.randn(3, 3, generator=gen, dtype=DT)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (net.kernel_fn(x, x2, get) * weights).sum()

    g = grad(f)(x1)
    torch.testing.assert_close(g, _fd(f, x1), rtol=1e-6, atol=1e-8)
    # the same through autograd and jacrev of the whole matrix
    xr = x1.clone().requires_grad_(True)
    f(xr).backward()
    torch.testing.assert_close(g, xr.grad, rtol=1e-12, atol=1e-13)
    jac = jacrev(lambda x: net.kernel_fn(x, x2, get))(x1)
    torch.testing.assert_close(torch.einsum("ij,ij...->...", weights, jac), g)


def test_grad_wrt_hyperparameters() -> None:
    """Gradients with respect to tensor ``W_std``/``b_std`` (symmetric ``x2=None`` path)."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)

    def f(p: torch.Tensor) -> torch.Tensor:
        net = stax.serial(stax.Dense(16, W_std=p[0], b_std=p[1]), stax.Relu(), stax.Dense(1))
        return net.kernel_fn(x, None, "ntk").sum()

    p = torch.tensor([1.4, 0.3], dtype=DT)
    torch.testing.assert_close(grad(f)(p), _fd(f, p), rtol=1e-6, atol=1e-8)


def test_vmap_is_refused_clearly() -> None:
    """vmap over kernel_fn is not supported (inputs are validated with data-dependent checks):
    a clear error names the argument and the fix, instead of torch's control-flow error."""
    net = NETS["relu"]()
    xs = torch.randn(4, 3, 2, dtype=DT)
    with pytest.raises(TypeError, match=r"x1 is batched by torch\.func\.vmap.*stack the examples"):
        torch.func.vmap(lambda a: net.kernel_fn(a, None, "nngp"))(xs)


def test_torch_compile_matches_eager() -> None:
    """torch.compile of a function calling kernel_fn runs (with graph breaks) and agrees."""
    net = NETS["erf"]()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda a: net.kernel_fn(a, None, "ntk"), backend="eager")
    torch.testing.assert_close(compiled(x), net.kernel_fn(x, None, "ntk"), rtol=0, atol=0)
