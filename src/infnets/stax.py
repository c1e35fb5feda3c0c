"""Layers of infinite-width networks, each with its finite twin.

Every layer unpacks into ``(init_fn, apply_fn, kernel_fn)``::

    from infnets import stax
    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(1, W_std=1.5, b_std=0.05))
    k = kernel_fn(x_train, x_test, ('nngp', 'ntk'))   # k.nngp, k.ntk: (N1, N2)
    out_shape, params = init_fn(0, (-1, 64))          # a finite network
    y = apply_fn(params, x_train)

Your own ``torch.nn.Module``: ``net = stax.from_torch(model, x)`` (see :func:`from_torch`).
"""

from infnets._src.attention.layer import GlobalSelfAttention
from infnets._src.convert.from_torch import (
    FromTorchError,
    NotYetSupportedError,
    TorchGraph,
    from_torch,
    params_from,
    reinit_fns,
)
from infnets._src.core.kernel import Kernel
from infnets._src.elementwise.base import ElementwiseLayer
from infnets._src.elementwise.normalized import ExpNormalized
from infnets._src.elementwise.numerical import Elementwise, ElementwiseNumerical
from infnets._src.elementwise.polynomial import Hermite, Monomial, Polynomial
from infnets._src.elementwise.rectified import ABRelu, Abs, LeakyRelu, RectifiedMonomial, Relu, Sign
from infnets._src.elementwise.smooth import (
    Cos,
    Erf,
    Exp,
    Gabor,
    Gaussian,
    Gelu,
    Rbf,
    Sigmoid_like,
    Sin,
)
from infnets._src.graph.aggregate import Aggregate
from infnets._src.layers.base import Layer, StaxModule
from infnets._src.layers.combinators import (
    FanInConcat,
    FanInProd,
    FanInSum,
    FanOut,
    Identity,
    Parallel,
    Serial,
    parallel,
    serial,
)
from infnets._src.layers.dense import Dense
from infnets._src.layers.dot_general import DotGeneral
from infnets._src.layers.dropout import Dropout
from infnets._src.layers.frozen import Frozen
from infnets._src.layers.index import Index, Slice
from infnets._src.layers.normalization import LayerNorm
from infnets._src.layers.repeat import Repeat, repeat
from infnets._src.spatial.conv import Conv
from infnets._src.spatial.conv_transpose import ConvTranspose
from infnets._src.spatial.local import ConvLocal
from infnets._src.spatial.pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from infnets._src.spatial.resize import ImageResize

__all__ = [
    "ABRelu",
    "Abs",
    "AvgPool",
    "Conv",
    "Cos",
    "Dense",
    "Dropout",
    "Elementwise",
    "ElementwiseLayer",
    "ElementwiseNumerical",
    "Erf",
    "Exp",
    "FanInConcat",
    "FanInProd",
    "FanInSum",
    "FanOut",
    "Flatten",
    "FromTorchError",
    "Gaussian",
    "Gelu",
    "GlobalAvgPool",
    "GlobalSelfAttention",
    "GlobalSumPool",
    "Hermite",
    "Identity",
    "Kernel",
    "Layer",
    "LayerNorm",
    "LeakyRelu",
    "Monomial",
    "NotYetSupportedError",
    "Parallel",
    "Polynomial",
    "Rbf",
    "RectifiedMonomial",
    "Relu",
    "Serial",
    "Sigmoid_like",
    "Sign",
    "Sin",
    "StaxModule",
    "SumPool",
    "TorchGraph",
    "from_torch",
    "parallel",
    "params_from",
    "reinit_fns",
    "serial",
]

__all__ += [
    "Aggregate",
    "ConvLocal",
    "ConvTranspose",
    "DotGeneral",
    "ExpNormalized",
    "Frozen",
    "Gabor",
    "ImageResize",
    "Index",
    "Repeat",
    "Slice",
    "repeat",
]
