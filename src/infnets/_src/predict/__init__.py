"""Predictions of trained infinite networks: GP inference and gradient-descent ensembles.

* :mod:`.common`: shared checks, eigendecompositions, result types;
* :mod:`.gp` (``gp_inference``), :mod:`.mse` (closed-form MSE dynamics at any time),
  :mod:`.ode` (other losses, by ODE integration).

May import: :mod:`infnets._src.core`; stored (Dask) kernels are dispatched to
:mod:`infnets.distributed` at call time.
"""
