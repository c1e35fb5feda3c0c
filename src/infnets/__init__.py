"""infnets: infinite-width neural networks in PyTorch.

Exact NNGP and NTK kernels of architectures written once with :mod:`infnets.stax`,
their finite-width twins, closed-form predictions (:mod:`infnets.predict`) and the
finite-width side (:mod:`infnets.empirical`). Optional integrations live in
:mod:`infnets.distributed`, :mod:`infnets.sklearn`, :mod:`infnets.gpytorch` and
:mod:`infnets.plot` and are imported on demand.
"""

from infnets import empirical, predict, stax
from infnets._src.core.kernel import Kernel

__version__ = "0.1.0"

__all__ = ["Kernel", "empirical", "predict", "stax", "__version__"]
