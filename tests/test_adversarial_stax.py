"""Adversarial cases of ``infnets.stax`` kernels (issue #16): overflow, underflow, threads,
bad hyper-parameters, precision near correlation 1.

Oracles: the same architecture in float64 (where float32 overflows), closed forms written
here (the arc-cosine kernel), 40-digit mpmath for the near-duplicate precision bound.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from infnets import stax
from infnets._src.core.inputs import KernelOverflowError

F32, F64 = torch.float32, torch.float64


def _x(n: int = 5, d: int = 3, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------ overflow (defect 2)
def _deep(act: stax.Layer, depth: int) -> stax.Layer:
    return stax.serial(*[l for _ in range(depth) for l in (stax.Dense(8), act)], stax.Dense(1))


@pytest.mark.parametrize(
    "net, where",
    [
        (_deep(stax.Exp(), 8), r"layer \d+ \(Exp"),
        (_deep(stax.Monomial(3), 8), r"layer \d+ \(Monomial\(degree=3\)\)"),
        (stax.serial(stax.Dense(8, W_std=1e25), stax.Relu(), stax.Dense(1)), r"layer 0 \(Dense"),
    ],
    ids=["exp", "monomial", "huge_W_std"],
)
@pytest.mark.parametrize("batch_size", [None, 2], ids=["single", "tiled"])
def test_float32_overflow_names_layer_dtype_and_fix(net, where: str, batch_size) -> None:
    x = _x(dtype=F32)
    with pytest.raises(KernelOverflowError, match=where) as info:
        net.kernel_fn(x, None, batch_size=batch_size)
    msg = str(info.value)
    assert "torch.float32" in msg and "float64" in msg and "W_std" in msg
    assert isinstance(info.value, FloatingPointError)


def test_nested_serial_overflow_path() -> None:
    block = stax.serial(stax.Dense(8), stax.Exp())
    net = stax.serial(stax.Dense(8), stax.Relu(), stax.serial(*[block] * 8), stax.Dense(1))
    with pytest.raises(KernelOverflowError, match=r"layer 2\.\d+ \(serial|layer 2\.\d+\.1 \(Exp"):
        net.kernel_fn(_x(dtype=F32), None)


def test_overflow_on_fast_path_pairs_and_x2() -> None:
    # N1 N2 above one block of the FC fast path: the per-block check finds the pair
    net = stax.serial(stax.Dense(8, W_std=2.0), stax.Relu(), stax.Dense(1, W_std=2.0))
    x1 = _x(300, 4, F32, seed=1)
    x2 = _x(300, 4, F32, seed=2)
    x2[137] *= 1e20  # one huge example: its pairs overflow, the others are fine
    # the failing pair is found (per block; per tile, mapped back to example indices) and
    # re-run: its input kernel x1 x2^T / d already overflows
    ends_in_relu = stax.serial(stax.Dense(8, W_std=2.0), stax.Relu())
    cases = [(net, "ntk"), (net, "nngp"), (ends_in_relu, None)]  # NTK alone / NNGP / both
    for batch_size in (None, 64):
        for model, get in cases:
            with pytest.raises(KernelOverflowError, match="at the input kernel"):
                model.kernel_fn(x1, x2, get, batch_size=batch_size)
    ok = net.kernel_fn(x1, x2[:137], "ntk")
    assert bool(torch.isfinite(ok).all())


def test_large_float32_inputs_that_fit_match_float64() -> None:
    net = stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1, W_std=1.5))
    x = _unit(_x(6, 3)) * 1e19  # squared norm 1e38: below float32's max 3.4e38
    k32 = net.kernel_fn(x.float(), None)
    k64 = net.kernel_fn(x, None)
    scale = float(k64.ntk.abs().max())
    # float32 rounding through 3 layers: a few hundred ulps (eps = 1.2e-7) of the scale
    torch.testing.assert_close(k32.ntk.double(), k64.ntk, rtol=0, atol=1e-4 * scale)
    with pytest.raises(KernelOverflowError, match="input kernel.*float32"):
        net.kernel_fn((x * 3).float(), None)  # squared norm 9e38: overflows


def test_conv_overflow_is_located() -> None:
    net = stax.serial(stax.Conv(4, (2,)), *[stax.Exp(), stax.Conv(4, (2,))] * 6, stax.Flatten())
    x = torch.randn(2, 1, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(KernelOverflowError, match=r"layer \d+ \(Exp"):
        net.kernel_fn(x, None, "nngp")


# ---------------------------------------------------------------------- underflow (defect 2)
@pytest.mark.parametrize("dtype, norm", [(F32, 1e-20), (F64, 1e-160)])
def test_tiny_inputs_are_refused_not_constant(dtype: torch.dtype, norm: float) -> None:
    net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    x = (_unit(_x(4, 3)) * norm).to(dtype)
    with pytest.raises(ValueError, match=r"x1 is too small for .*(x1\.double|rescale|Rescale)"):
        net.kernel_fn(x, None)
    with pytest.raises(ValueError, match="x2 is too small"):
        net.kernel_fn(_x(2, 3, dtype), x)


@pytest.mark.parametrize("scale", [1e-10, 1e-15, 1e-17])
def test_small_but_normal_inputs_keep_exact_scaling(scale: float) -> None:
    # ReLU without bias is 2-homogeneous: K(s x) = s^2 K(x), down to squared norms near the
    # smallest normal float32 (1e-34 at s = 1e-17); variances were floored at sqrt(tiny)
    # (1e-19) and the kernel came out constant
    fc = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    conv = stax.serial(stax.Conv(4, (3,)), stax.Relu(), stax.Flatten(), stax.Dense(1))
    for net, x in (
        (fc, _unit(_x(4, 3, F32))),  # FC fast path (pair factors)
        (conv, torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))),  # record maps
    ):
        ref = net.kernel_fn(x, None, "nngp")
        small = net.kernel_fn(x * scale, None, "nngp")
        # float32 rounding of a few operations: 1e-5 relative (eps = 1.2e-7)
        torch.testing.assert_close(small / scale**2, ref, rtol=1e-5, atol=0)
    # exact zeros stay allowed: their kernel is 0 up to the variance floor (tiny)
    zero = fc.kernel_fn(torch.zeros(2, 3), None, "nngp")
    assert bool((zero.abs() <= torch.finfo(F32).tiny).all())


# ---------------------------------------------------------------------- threads (defect 1)
def test_kernel_fn_from_threads_matches_sequential() -> None:
    nets = [
        stax.serial(stax.Dense(16, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1)),
        stax.serial(stax.Conv(4, (3,), padding="SAME"), stax.Erf(), stax.Flatten(), stax.Dense(1)),
    ]
    xs = [_x(40, 6), torch.randn(6, 2, 8, dtype=F64, generator=torch.Generator().manual_seed(1))]
    sizes = (None, 7)  # untiled and tiled (7 x 7 tiles on a thread pool of their own)
    refs = {(n, b): nets[n].kernel_fn(xs[n], None, batch_size=b) for n in (0, 1) for b in sizes}
    barrier = threading.Barrier(6)
    out: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            out[i] = [nets[i % 2].kernel_fn(xs[i % 2], None, batch_size=sizes[i // 3])]
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (k,) in out.items():  # type: ignore[misc]
        ref = refs[(i % 2, sizes[i // 3])]
        # the same call alone and among threads does the same arithmetic: bit for bit
        torch.testing.assert_close(k.nngp, ref.nngp, rtol=0, atol=0)
        torch.testing.assert_close(k.ntk, ref.ntk, rtol=0, atol=0)


# ------------------------------------------------------------- hyper-parameters (defect 6)
def test_memory_budget_inf_works_and_nan_is_refused() -> None:
    net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    x = _x()
    torch.testing.assert_close(
        net.kernel_fn(x, None, "nngp", memory_budget=float("inf")), net.kernel_fn(x, None, "nngp")
    )
    for bad in (float("nan"), -1.0, 0):
        with pytest.raises(ValueError, match="memory_budget"):
            net.kernel_fn(x, None, memory_budget=bad)
    with pytest.raises(TypeError, match="memory_budget"):
        net.kernel_fn(x, None, memory_budget="1GB")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_accepts_pytorch_names(approximate: str) -> None:
    layer = stax.Gelu(approximate=approximate)
    x = torch.linspace(-3, 3, 13, dtype=F64)
    ref = torch.nn.functional.gelu(x, approximate=approximate)
    torch.testing.assert_close(layer.fn(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["exact", "Tanh", 1, None, "erf"])
def test_gelu_refuses_other_approximations(bad) -> None:
    with pytest.raises((ValueError, TypeError), match="approximate"):
        stax.Gelu(approximate=bad)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda v: stax.Dense(4, W_std=v), "W_std"),
        (lambda v: stax.Dense(4, b_std=v), "b_std"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_bad_std_is_refused_by_name(make, arg: str, value: float) -> None:
    with pytest.raises(ValueError, match=arg):
        make(value)
    with pytest.raises(ValueError, match=arg):
        make(torch.tensor(value))  # tensors are checked too


def test_tensor_hyper_parameters_are_checked_when_used() -> None:
    w = torch.tensor(1.5, dtype=F64)
    net = stax.serial(stax.Dense(8, W_std=w), stax.Relu(), stax.Dense(1))
    x = _x()
    ref = stax.serial(stax.Dense(8, W_std=1.5), stax.Relu(), stax.Dense(1)).kernel_fn(x, None)
    torch.testing.assert_close(net.kernel_fn(x, None).ntk, ref.ntk)
    with torch.no_grad():
        w.fill_(math.nan)  # changed after construction: refused at use, by name
    with pytest.raises(ValueError, match="W_std"):
        net.kernel_fn(x, None)


# ------------------------------------------------------- precision near rho = 1 (defect 9)
def _mp_relu_ntk(x: list[float], y: list[float], depth: int, w: float, b: float):  # noqa: ANN202
    """NNGP and NTK of ``depth`` x (Dense, Relu) then Dense, in 40-digit mpmath (the
    arc-cosine recursion of Cho & Saul 2009 / Jacot et al. 2018, written out here)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):  # restores the global precision afterwards
        return _mp_recursion(mpmath.mp, x, y, depth, w, b)


def _mp_recursion(mp, x: list[float], y: list[float], depth: int, w: float, b: float):  # noqa: ANN001, ANN202
    mpf, d = mp.mpf, len(x)
    q1 = mp.fsum(mpf(a) ** 2 for a in x) / d
    q2 = mp.fsum(mpf(a) ** 2 for a in y) / d
    c = mp.fsum(mpf(a) * mpf(e) for a, e in zip(x, y)) / d
    rho_in = c / mp.sqrt(q1 * q2)
    th, w2, b2 = mpf(0), mpf(w) ** 2, mpf(b) ** 2
    for _ in range(depth):
        q1, q2, c = w2 * q1 + b2, w2 * q2 + b2, w2 * c + b2
        th = c + w2 * th
        s = mp.sqrt(q1 * q2)
        t = mp.acos(min(c / s, mpf(1)))
        c = s / (2 * mp.pi) * (mp.sin(t) + (mp.pi - t) * mp.cos(t))
        th = th * (mp.pi - t) / (2 * mp.pi)
        q1, q2 = q1 / 2, q2 / 2
    c = w2 * c + b2
    return c, c + w2 * th, rho_in


@pytest.mark.parametrize("depth", [10, 20])
def test_near_duplicates_meet_the_documented_bound(depth: int) -> None:
    # docs/guarantees.md: relative error <= 2 L eps / sqrt(1 - rho) for inputs of
    # correlation rho through L ReLU layers (measured: 0.7-1.2 L eps / sqrt(1 - rho) for
    # rho from 1 - 1e-6 to 1 - 1e-14); duplicates stay exact
    w, b = 1.4, 0.1
    layers = [lay for _ in range(depth) for lay in (stax.Dense(1, W_std=w, b_std=b), stax.Relu())]
    net = stax.serial(*layers, stax.Dense(1, W_std=w, b_std=b))
    eps = torch.finfo(F64).eps
    g = torch.Generator().manual_seed(depth)
    for delta in (1e-4, 1e-6):
        x = torch.randn(8, dtype=F64, generator=g)
        y = x + delta * torch.randn(8, dtype=F64, generator=g)
        k = net.kernel_fn(torch.stack([x, y]), None)
        nngp, ntk, rho = _mp_relu_ntk(x.tolist(), y.tolist(), depth, w, b)
        bound = 2 * depth * eps / math.sqrt(float(1 - rho))
        assert abs(float((k.nngp[0, 1] - float(nngp)) / float(nngp))) <= bound
        assert abs(float((k.ntk[0, 1] - float(ntk)) / float(ntk))) <= bound
        dup = net.kernel_fn(torch.stack([x, x]), None)  # correlation exactly 1
        assert dup.ntk[0, 1] == dup.ntk[0, 0] and dup.nngp[0, 1] == dup.nngp[0, 0]
        nn_dup, ntk_dup, _ = _mp_relu_ntk(x.tolist(), x.tolist(), depth, w, b)
        assert abs(float(dup.ntk[0, 0]) / float(ntk_dup) - 1) <= 8 * depth * eps


# ------------------------------------------------- the battery's classes: shapes, dtypes, NaN
_NET = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))


@pytest.mark.parametrize(
    "x1, x2, get, match",
    [
        (torch.ones(3, 2, dtype=torch.int64), None, None, "x1 has dtype torch.int64"),
        (torch.ones(3, 2, dtype=torch.float16), None, None, "x1 has dtype torch.float16"),
        (torch.tensor([[1.0, math.nan]]), None, None, "x1 contains NaN or Inf"),
        (torch.ones(2, 2), torch.tensor([[math.inf, 0.0]]), None, "x2 contains NaN or Inf"),
        (torch.ones(0, 2), None, None, "x1 is empty"),
        (torch.ones(3), None, None, "x1 must have rank >= 2"),
        (torch.ones(3, 2), torch.ones(3, 5), None, "x1 and x2 must agree"),
        (torch.ones(3, 2), torch.ones(3, 2, dtype=F64), None, "x2 has dtype"),
        (torch.ones(3, 2), None, "cov3", "get: unknown name"),
        ("abc", None, None, "x1 must be a torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(x1, x2, get, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        _NET.kernel_fn(x1, x2, get)


def test_inputs_are_not_mutated() -> None:
    x = _x(20, 3)  # packed symmetric path (>= 16 examples) and the tiled path
    before = x.clone()
    _NET.kernel_fn(x, None)
    _NET.kernel_fn(x, x[:5], batch_size=4)
    assert torch.equal(x, before)
