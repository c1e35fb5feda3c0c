"""Adversarial cases of ``infnets.predict`` (issue #16): asymmetric train kernels, an NTK
covariance without its NNGP, stiff and diverging gradient flows.

Oracles: explicit linear algebra (eigendecomposition, ``scipy.linalg.expm``) written here, not
the library's code paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from infnets import predict

DT = torch.float64


def _data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=DT, generator=g)
    k = x @ x.T + 0.5 * torch.eye(n, dtype=DT)
    y = torch.randn(n, 2, dtype=DT, generator=g)
    return x, k, y


# ----------------------------------------------------------------------- symmetry (defect 4)
@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda k, y: predict.gp_inference(k, y), "k_train_train"),
        (lambda k, y: predict.gradient_descent_mse(k, y), "k_train_train"),
        (lambda k, y: predict.max_learning_rate(k), "ntk_train_train"),
        (
            lambda k, y: predict.gradient_descent(lambda f, t: (f - t).pow(2).sum(), k, y),
            "k_train_train",
        ),
    ],
    ids=["gp_inference", "gradient_descent_mse", "max_learning_rate", "gradient_descent"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_asymmetric_train_kernel_is_refused_by_name(call, arg: str, dtype: torch.dtype) -> None:
    _, k, y = _data()
    bad = k.clone().to(dtype)
    bad[0, 1] += 1e-2 * float(k.abs().max())  # one triangle only: 1 % of the scale
    with pytest.raises(ValueError, match=f"{arg} is not symmetric"):
        call(bad, y)
    # round-off asymmetry (a few ulps, as a Gram matrix computed in another order has) passes
    ok = k.to(dtype)
    ok[0, 1] = torch.nextafter(ok[0, 1], torch.tensor(math.inf, dtype=dtype))
    call(ok, y)


def test_asymmetric_record_field_is_named() -> None:
    _, k, y = _data()
    ntk = k.clone()
    ntk[2, 0] -= 0.5
    rec = type("Rec", (), {"nngp": k, "ntk": ntk})()
    with pytest.raises(ValueError, match=r"k_train_train\.ntk is not symmetric"):
        predict.gp_inference(rec, y)


# ------------------------------------------------------------------ NNGP missing (defect 5)
def test_ntk_covariance_from_one_bare_tensor_is_refused() -> None:
    x, k, y = _data()
    xt = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    kx, kxx = xt @ x.T, xt @ xt.T + 0.5 * torch.eye(3, dtype=DT)
    p = predict.gp_inference(k, y, diag_reg=1e-3)
    with pytest.raises(ValueError, match="NNGP is missing"):
        p("ntk", kx, kxx)
    # the mean alone needs only the NTK, and the NNGP covariance only the NNGP: both work
    mean = p("ntk", kx)
    ref = kx @ torch.linalg.solve(k + 1e-3 * k.diagonal().mean() * torch.eye(6, dtype=DT), y)
    torch.testing.assert_close(mean, ref, rtol=1e-10, atol=1e-12)
    assert isinstance(p("nngp", kx, kxx), predict.Gaussian)


# ------------------------------------------------------------ stiff gradient flow (defect 3)
def _mse(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((f - y) ** 2).sum()


def _stiff_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """10 points, a kernel with eigenvalues from 0.5 to ~60: lr w_max t ~ 6e5 at t = 1e4."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, dtype=DT, generator=g)
    k = 4.0 * (x @ x.T) + 0.5 * torch.eye(10, dtype=DT)
    y = torch.randn(10, 2, dtype=DT, generator=g)
    return x, k, y


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_stiff_gradient_flow_is_solved_with_bounded_work(momentum: float | None) -> None:
    x, k, y = _stiff_problem()
    calls = [0]

    def counted(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return _mse(f, t)

    lr, times = 1.0, [0.05, 1.0, 1e4]
    f0 = torch.full_like(y, 0.3)
    out = predict.gradient_descent(counted, k, y, lr, momentum)(torch.tensor(times), f0)
    a, yy, ff = k.numpy(), y.numpy(), f0.numpy()
    n = a.shape[0]
    for i, t in enumerate(times):
        if momentum is None:  # f(t) = y + e^{-lr K t} (f0 - y)
            ref = yy + scipy.linalg.expm(-lr * a * t) @ (ff - yy)
        else:  # [f - y, f'] obeys s' = [[0, I], [-lr K, -(1 - m) I]] s
            gen = np.block([[np.zeros((n, n)), np.eye(n)], [-lr * a, -(1 - momentum) * np.eye(n)]])
            s = scipy.linalg.expm(gen * t) @ np.concatenate([ff - yy, np.zeros_like(yy)])
            ref = yy + s[:n]
        # rtol 1e-7 of the solver on O(1) outputs; at t = 1e4 the residual has decayed to 0
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=0, atol=1e-5)
    # work bounded independently of t: ~550 loss calls (LSODA) without momentum, ~12 000
    # (Radau, resolving ~100 periods of the fast oscillating mode until it decays) with it;
    # dopri5 needs ~ lr w_max t / 3 ~ 2e5 steps (6 calls each), resp. ~ sqrt(lr w_max) t / 3
    assert calls[0] < (2000 if momentum is None else 20000)


def test_gradient_flow_nan_loss_is_a_clear_error() -> None:
    _, k, y = _stiff_problem()

    def log_loss(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log(f).sum()  # outputs fall to 0 in finite time, then log is NaN

    with pytest.raises(FloatingPointError, match="loss or its gradient is NaN/Inf at t ="):
        predict.gradient_descent(log_loss, k, y, 1.0)(10.0, 1.0)


def test_explicit_solver_stops_at_the_step_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchdiffeq")
    from infnets._src.predict import ode

    monkeypatch.setattr(ode, "MAX_STEPS", 50)  # the real bound (20 000) takes seconds here
    _, k, y = _stiff_problem()
    p = predict.gradient_descent(_mse, k, y, 1.0, solver="torchdiffeq")
    with pytest.raises(RuntimeError, match="stopped before t = 10000.*solver='scipy'"):
        p(1e4)
    with pytest.raises(RuntimeError, match="over 5 steps"):
        ode.MAX_STEPS = 5  # the stiff solver needs more than 5 steps to t = 1e4 too
        predict.gradient_descent(_mse, k, y, 1.0)(1e4)


def test_long_integration_shows_progress(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from infnets._src.predict import ode

    monkeypatch.setattr(ode, "PROGRESS_DELAY_S", 0.0)
    _, k, y = _stiff_problem()
    predict.gradient_descent(_mse, k, y, 1.0)(100.0)
    assert "gradient_descent" in capsys.readouterr().err


# ------------------------------------------------- the battery's classes: shapes, dtypes, NaN
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda k, y: predict.gp_inference(k, y.clone().fill_(math.nan)), "y_train contains NaN"),
        (lambda k, y: predict.gp_inference(k[:, :5], y), "k_train_train must be a square"),
        (lambda k, y: predict.gp_inference(k, y[:4]), "y_train has 4 examples|has 6 rows"),
        (lambda k, y: predict.gp_inference(k.int(), y), "k_train_train has dtype"),
        (lambda k, y: predict.gp_inference(k, y, diag_reg=-1.0), "diag_reg"),
        (lambda k, y: predict.gradient_descent_mse(k, y, learning_rate=math.nan), "learning_rate"),
        (lambda k, y: predict.gradient_descent_mse(k, y)(-1.0), "t must be >= 0"),
        (lambda k, y: predict.max_learning_rate(k, momentum=1.0), "momentum"),
        (lambda k, y: predict.gradient_descent(_mse, k, y)(math.inf), "t must be finite"),
        (lambda k, y: predict.gradient_descent(_mse, k, y, solver="euler"), "solver"),
    ],
)
def test_bad_predict_arguments_name_the_argument(call, match: str) -> None:
    _, k, y = _data()
    with pytest.raises((TypeError, ValueError), match=match):
        call(k, y)
