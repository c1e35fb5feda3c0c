"""An ExactGP with an infinite network's NNGP kernel, its variances fitted by marginal likelihood.

Run: python examples/gpytorch_exact_gp.py   (needs: pip install gpytorch)
"""

from __future__ import annotations

import gpytorch
import torch

from infnets import stax
from infnets.gpytorch import InfiniteWidthKernel


class InfiniteNetworkGP(gpytorch.models.ExactGP):
    """Zero mean, the NNGP of a 2-hidden-layer Erf network as the covariance."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood
    ):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        net = stax.serial(
            stax.Dense(512, W_std=1.0, b_std=0.1), stax.Erf(),
            stax.Dense(512, W_std=1.0, b_std=0.1), stax.Erf(),
            stax.Dense(1, W_std=1.0, b_std=0.1),
        )  # fmt: skip
        self.covar_module = InfiniteWidthKernel(net, get="nngp")

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def main(steps: int = 60) -> None:
    torch.manual_seed(0)
    x = torch.rand(80, 2, dtype=torch.float64) * 4 - 2
    y = torch.sin(2 * x[:, 0]) * x[:, 1] + 0.05 * torch.randn(80, dtype=torch.float64)
    x_train, y_train, x_test, y_test = x[:60], y[:60], x[60:], y[60:]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 1e-2
    model = InfiniteNetworkGP(x_train, y_train, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    kernel = model.covar_module
    model.train()
    likelihood.train()
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = -mll(model(x_train), y_train)
        if step % 20 == 0:
            w_var, b_var = kernel.W_var.detach().item(), kernel.b_var.detach().item()
            noise = likelihood.noise.detach().item()
            print(f"step {step:3d}: marginal log-likelihood {-loss.detach().item():8.4f}  "
                  f"W_var {w_var:.3f}  b_var {b_var:.4f}  noise {noise:.4f}")  # fmt: skip
        loss.backward()
        optimizer.step()
    model.eval()
    likelihood.eval()
    with torch.no_grad():
        pred = likelihood(model(x_test))
    rmse = (pred.mean - y_test).pow(2).mean().sqrt()
    print(f"test RMSE {rmse:.4f}; mean predictive sd {pred.stddev.mean():.4f}")


if __name__ == "__main__":
    main()
