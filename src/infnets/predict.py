"""Predictions of infinitely wide networks: Bayesian (NNGP) or trained (NTK), at any time.

An infinitely wide network is a Gaussian process at initialisation (NNGP kernel
``K``) and, trained by gradient descent, evolves as its linearization with a
constant neural tangent kernel ``Θ`` (Jacot et al. 2018; Lee et al. 2019, "Wide
neural networks of any depth evolve as linear models under gradient descent").
Its predictions are therefore closed-form functions of the kernels:

* :func:`gp_inference` — exact posteriors: the NNGP posterior, the infinite-time
  ensemble of NTK-trained networks, and the NTK-GP of He et al. 2020;
* :func:`gradient_descent_mse` — one network's outputs at any training time on MSE;
* :func:`gradient_descent_mse_ensemble` — mean and covariance over initialisations
  at any training time, computing the kernels itself;
* :func:`gradient_descent` — any differentiable loss (e.g. cross-entropy), with
  optional momentum, by integrating the function-space ODE;
* :func:`max_learning_rate` — the largest stable step size.

The factories return closures typed by protocols whose overloads state what each call
returns (:class:`GPPredictFn`, :class:`MSEPredictFn`, :class:`ODEPredictFn`,
:class:`EnsemblePredictFn`): a ``Tensor`` mean, a :class:`Gaussian` when covariances are
asked for, ``(train, test)`` outputs, or named tuples of those for several names in ``get``.

Conventions shared by all of them:

* the MSE loss is ``L = 1/2 sum (f - y)^2`` (a sum over examples and outputs) and
  time ``t`` counts steps of size ``learning_rate``;
* targets have shape ``(N, *O)``; kernels are ``(N1, N2)`` and act as ``K (x) I``
  on the output axes;
* solves run in float64 on the kernels' device; results come back in the train
  kernel's dtype;
* a train kernel that is not numerically positive definite raises a
  ``ValueError`` stating its smallest eigenvalue and the ``diag_reg`` that fixes
  it, unless ``jitter='auto'``; NaN is never returned silently.
"""

from __future__ import annotations

from infnets._src.predict.common import Gaussian
from infnets._src.predict.gp import gp_inference
from infnets._src.predict.mse import (
    gradient_descent_mse,
    gradient_descent_mse_ensemble,
    max_learning_rate,
)
from infnets._src.predict.ode import gradient_descent
from infnets._src.predict.types import (
    EnsemblePredictFn,
    GPPredictFn,
    KernelInput,
    MSEPredictFn,
    ODEPredictFn,
)

__all__ = [
    "EnsemblePredictFn",
    "GPPredictFn",
    "Gaussian",
    "KernelInput",
    "MSEPredictFn",
    "ODEPredictFn",
    "gp_inference",
    "gradient_descent",
    "gradient_descent_mse",
    "gradient_descent_mse_ensemble",
    "max_learning_rate",
]
