"""infnets: infinite-width neural networks in PyTorch.

Exact NNGP and NTK kernels of architectures written once with :mod:`infnets.stax`,
their finite-width twins, and closed-form predictions (:mod:`infnets.predict`).
"""

from infnets import stax
from infnets._src.kernel import Kernel

__version__ = "0.1.0"

__all__ = ["Kernel", "stax", "__version__"]
