"""Quick start: an infinitely wide ReLU network's kernels and closed-form predictions.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch

from infnets import predict, stax


def main() -> None:
    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(1, W_std=1.5, b_std=0.05),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1]) * x[:, 1:]  # (N, 1) targets
    x_train, y_train, x_test, y_test = x[:100], y[:100], x[100:], y[100:]

    k_train_train = kernel_fn(x_train, None, ("nngp", "ntk"))
    k_test_train = kernel_fn(x_test, x_train, ("nngp", "ntk"))
    k_test_test = kernel_fn(x_test, None, ("nngp", "ntk"))
    predict_fn = predict.gp_inference(k_train_train, y_train, diag_reg=1e-4)
    out = predict_fn(("nngp", "ntk"), k_test_train, k_test_test)

    print("20 test points of y = sin(2 x0) x1, 100 training points")
    print(f"{'target':>8s} {'NNGP mean':>10s} {'sd':>6s} {'NTK mean':>9s} {'sd':>6s}")
    for i in range(x_test.shape[0]):
        row = [out.nngp.mean[i, 0], out.nngp.covariance[i, i].sqrt()]
        row += [out.ntk.mean[i, 0], out.ntk.covariance[i, i].sqrt()]
        print(f"{y_test[i, 0]:8.3f} {row[0]:10.3f} {row[1]:6.3f} {row[2]:9.3f} {row[3]:6.3f}")
    for name in ("nngp", "ntk"):
        rmse = (getattr(out, name).mean - y_test).pow(2).mean().sqrt()
        print(f"{name.upper()} test RMSE {rmse:.3f}")


if __name__ == "__main__":
    main()
