"""Adversarial cases of ``infnets.empirical``: threads, inputs that require grad, models whose
examples are not independent (issue #16).

Concurrency oracle: the same kernel computed sequentially, before any thread runs; the model
must come back with the same parameter objects, values and ``requires_grad`` flags.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from infnets import empirical

DT = torch.float64
N_THREADS = 6


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).to(DT)


def _snapshot(model: nn.Module) -> list[tuple[int, bool, Tensor]]:
    return [(id(p), p.requires_grad, p.detach().clone()) for p in model.parameters()]


def _run_threads(work: Callable[[int], Any], n: int = N_THREADS) -> list[Any]:
    """Run ``work(i)`` on ``n`` threads started together; re-raise the first error."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            out[i] = work(i)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize(
    "make",
    [
        # one kernel function per thread, each implementation (each touches the module
        # differently: hooks, vmap(jacrev), jvp/vjp)
        lambda m, i: empirical.empirical_ntk_fn(
            m, implementation=("structured", "jacobian_contraction", "ntk_vector_products")[i % 3]
        ),
        lambda m, i: empirical.empirical_kernel_fn(m),
        lambda m, i: empirical.empirical_nngp_fn(m),
    ],
    ids=["ntk", "kernel", "nngp"],
)
def test_empirical_kernels_from_threads_match_sequential_and_leave_model_intact(make) -> None:
    model = _mlp()
    x = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    before = _snapshot(model)
    ref = make(model, 0)(x)
    ref = ref if isinstance(ref, Tensor) else torch.stack(tuple(ref))

    def work(i: int) -> Tensor:
        fn = make(model, i)
        vals = [fn(x) for _ in range(3)]
        return torch.stack([v if isinstance(v, Tensor) else torch.stack(tuple(v)) for v in vals])

    for got in _run_threads(work):
        # the implementations differ only by rounding (~10 ulps of entries of size ~10)
        torch.testing.assert_close(got, ref.expand_as(got), rtol=1e-12, atol=1e-12)
    after = _snapshot(model)
    assert [(i, g) for i, g, _ in after] == [(i, g) for i, g, _ in before]
    for (_, _, a), (_, _, b) in zip(after, before):
        assert torch.equal(a, b)


def test_one_shared_kernel_fn_from_threads() -> None:
    model = _mlp()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    fn = empirical.empirical_ntk_fn(model)
    ref = fn(x)
    for got in _run_threads(lambda i: fn(x)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_linearize_and_taylor_from_threads() -> None:
    model = _mlp()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    ids = [id(p) for p in model.parameters()]
    ref = model(x).detach()

    def work(i: int) -> Tensor:
        lin = empirical.linearize(model) if i % 2 else empirical.taylor_expand(model, None, 2)
        return torch.stack([lin(x).detach() for _ in range(3)])

    for got in _run_threads(work):
        # at the expansion point every Taylor polynomial equals the network (explicit forward)
        torch.testing.assert_close(got, ref.expand_as(got), rtol=1e-13, atol=1e-13)
    assert [id(p) for p in model.parameters()] == ids
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


# ------------------------------------------------------------ messages that blame (defect 8)
class _MixesBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - x.mean(0, keepdim=True))  # the kernel used to be all ones


class _ShrinksBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).sum(0, keepdim=True)  # the kernel used to be plausible numbers


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


IMPLS = ("auto", "jacobian_contraction", "ntk_vector_products")


@pytest.mark.parametrize("impl", IMPLS)
def test_input_requiring_grad_is_blamed(impl: str) -> None:
    x = torch.randn(3, 3).requires_grad_(True)
    fn = empirical.empirical_ntk_fn(nn.Linear(3, 2), implementation=impl)
    with pytest.raises(ValueError, match=r"x1 requires grad.*x1\.detach\(\)"):
        fn(x)
    with pytest.raises(ValueError, match=r"x2 requires grad"):
        fn(x.detach(), x)
    assert x.grad is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "model, match",
    [
        (_MixesBatch, "mixes the examples of a batch"),
        (_ShrinksBatch, "changes the batch size"),
    ],
    ids=["mixes", "shrinks"],
)
def test_models_without_per_example_outputs_are_blamed(model, match: str, impl: str) -> None:
    fn = empirical.empirical_ntk_fn(model(), implementation=impl)
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(4, 3))


def test_recurrent_module_is_blamed() -> None:
    x = torch.randn(3, 5, 3)
    with pytest.raises(TypeError, match=r"rnn is a recurrent layer \(GRU\)"):
        empirical.empirical_ntk_fn(_Recurrent())(x)
    with pytest.raises(TypeError, match="recurrent layer"):
        empirical.linearize(_Recurrent())
    # the NNGP needs only forward passes: it works, and equals f f^T / O (explicit)
    model = _Recurrent()
    out = model(x).detach()
    torch.testing.assert_close(empirical.empirical_nngp_fn(model)(x), out @ out.T)


def test_per_example_model_passes_the_batch_check_in_float32() -> None:
    # batched and single passes differ by rounding only: no false alarm at sqrt(eps)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 64), nn.ReLU(), nn.Linear(64, 3))
    x = torch.randn(7, 50)
    k = empirical.empirical_ntk_fn(model, implementation="jacobian_contraction")(x)
    params = list(model.parameters())

    def jac(i: int, o: int) -> Tensor:  # d f_o(x_i) / d theta by plain autograd
        grads = torch.autograd.grad(model(x[i : i + 1])[0, o], params)
        return torch.cat([g.reshape(-1) for g in grads])

    j = torch.stack([torch.stack([jac(i, o) for o in range(3)]) for i in range(7)])  # (7, 3, P)
    ref = torch.einsum("iop,jop->ij", j, j) / 3  # the default traces the output axis (mean)
    # float32 sums of ~3500 products: 1e-5 relative
    torch.testing.assert_close(k, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
