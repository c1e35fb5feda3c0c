"""The finite-width side: empirical NTKs, Monte Carlo kernels and linearized networks of any module.

* :mod:`.model`: evaluating a user's ``nn.Module`` functionally without mutating it;
* :mod:`.axes`: output axes (trace, diagonal, free);
* :mod:`.ntk` (driver and cost model), :mod:`.structured` (JC and structured features),
  :mod:`.chunking` (output-unit chunks, chain streams), :mod:`.ntvp` (NTK-vector products,
  example blocks), :mod:`.chain` (hand-written backward pass of ``nn.Sequential`` chains);
* :mod:`.kernels` (Monte Carlo NNGP/NTK), :mod:`.taylor` (linearize, Taylor expansions).

May import: :mod:`infnets._src.core`.
"""
