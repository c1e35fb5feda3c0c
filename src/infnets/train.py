"""Training finite networks the way :mod:`infnets.predict` trains infinite ones.

:func:`gradient_descent_ensemble` trains many initialisations of a finite network (the twin of
an :mod:`infnets.stax` network, or any pure ``apply_fn(params, x)``) by full-batch gradient
descent on ``L = 1/2 sum (f - y)^2`` with step ``learning_rate``: step ``t`` is time ``t`` of
``predict.gradient_descent_mse(..., discrete=True)`` and of
``predict.gradient_descent_mse_ensemble(..., discrete=True)``, whose means and covariances the
ensemble approaches as the width grows (Lee et al. 2019).
"""

from __future__ import annotations

from infnets._src.research.train import Trajectory, gradient_descent_ensemble, stack_params

__all__ = ["Trajectory", "gradient_descent_ensemble", "stack_params"]
