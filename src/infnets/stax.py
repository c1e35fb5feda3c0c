"""Layers of infinite-width networks, each with its finite twin.

Every layer unpacks into ``(init_fn, apply_fn, kernel_fn)``::

    from infnets import stax
    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(1, W_std=1.5, b_std=0.05))
    k = kernel_fn(x_train, x_test, ('nngp', 'ntk'))   # k.nngp, k.ntk: (N1, N2)
    out_shape, params = init_fn(0, (-1, 64))          # a finite network
    y = apply_fn(params, x_train)
"""

from infnets._src.attention import GlobalSelfAttention
from infnets._src.combinators import (
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
from infnets._src.conv import Conv
from infnets._src.dense import Dense
from infnets._src.dropout import Dropout
from infnets._src.elementwise import (
    ABRelu,
    Abs,
    Cos,
    ElementwiseLayer,
    Erf,
    Exp,
    Gaussian,
    Gelu,
    Hermite,
    LeakyRelu,
    Monomial,
    Polynomial,
    Rbf,
    RectifiedMonomial,
    Relu,
    Sigmoid_like,
    Sign,
    Sin,
)
from infnets._src.elementwise_numerical import Elementwise, ElementwiseNumerical
from infnets._src.kernel import Kernel
from infnets._src.layer import Layer, StaxModule
from infnets._src.normalization import LayerNorm
from infnets._src.pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool

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
    "parallel",
    "serial",
]
