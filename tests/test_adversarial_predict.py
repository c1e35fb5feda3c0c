"""Adversarial cases of ``infnets.predict`` (issue #16): asymmetric train kernels, an NTK
covariance without its NNGP, stiff and diverging gradient flows.

Oracles: explicit linear algebra (eigendecomposition, ``scipy.linalg.expm``) written here, not
the library's code paths.
"""

from __future__ import annotations

import math

import pytest
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
