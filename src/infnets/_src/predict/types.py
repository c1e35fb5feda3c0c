"""The types of the predictor functions that :mod:`infnets.predict`'s factories return.

Each factory (``gp_inference``, ``gradient_descent_mse``, ``gradient_descent``,
``gradient_descent_mse_ensemble``) returns a closure; these protocols state, by overloads,
what the closure returns for each way of calling it:

* one name in ``get`` gives that prediction, several (a tuple or list) a ``Predictions``
  named tuple of them (typed as a ``tuple``; its fields are named after ``get``);
* a mean is a ``Tensor``; asking for covariances (``k_test_test`` given, or
  ``compute_cov=True``) gives :class:`Gaussian` records of mean and covariance instead;
* the gradient-descent predictors return the train outputs, or ``(train, test)`` outputs
  when a test-train kernel is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypeAlias, overload

import numpy as np
from torch import Tensor

from infnets._src.core.kernel import Kernel
from infnets._src.predict.common import Gaussian

__all__ = [
    "KernelInput",
    "GPPredictFn",
    "MSEPredictFn",
    "ODEPredictFn",
    "EnsemblePredictFn",
]

KernelInput: TypeAlias = Tensor | np.ndarray | Kernel | tuple[Any, ...]
"""A kernel argument: a matrix (used for every kernel name), or a record whose ``.nngp`` /
``.ntk`` fields are read (an ``infnets.Kernel``, or the named tuple ``kernel_fn`` returns
for a tuple ``get``)."""

#: several names in ``get``
Names: TypeAlias = tuple[str, ...] | list[str]


class GPPredictFn(Protocol):
    """``predict_fn(get, k_test_train=None, k_test_test=None)`` of ``gp_inference``.

    Returns the ``(M, *O)`` posterior mean (a ``Tensor``), or with ``k_test_test`` a
    :class:`Gaussian` of mean and ``(M, M)`` covariance; a named tuple of those for
    several names in ``get``.
    """

    @overload
    def __call__(
        self, get: str, k_test_train: KernelInput | None = None, k_test_test: None = None
    ) -> Tensor: ...

    @overload
    def __call__(
        self, get: str, k_test_train: KernelInput | None, k_test_test: KernelInput
    ) -> Gaussian: ...

    @overload
    def __call__(
        self, get: Names, k_test_train: KernelInput | None = None, k_test_test: None = None
    ) -> tuple[Tensor, ...]: ...

    @overload
    def __call__(
        self, get: Names, k_test_train: KernelInput | None, k_test_test: KernelInput
    ) -> tuple[Gaussian, ...]: ...


class MSEPredictFn(Protocol):
    """``predict_fn(t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None)`` of
    ``gradient_descent_mse`` (``t=None``: convergence).

    Returns the ``([T,] N, *O)`` train outputs, or ``(train, test)`` outputs when
    ``k_test_train`` is given.
    """

    @overload
    def __call__(
        self,
        t: Any = None,
        fx_train_0: Any = 0.0,
        fx_test_0: Any = None,
        k_test_train: None = None,
    ) -> Tensor: ...

    @overload
    def __call__(
        self, t: Any, fx_train_0: Any, fx_test_0: Any, k_test_train: KernelInput
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def __call__(
        self,
        t: Any = None,
        fx_train_0: Any = 0.0,
        fx_test_0: Any = None,
        *,
        k_test_train: KernelInput,
    ) -> tuple[Tensor, Tensor]: ...


class ODEPredictFn(Protocol):
    """``predict_fn(t, fx_train_0=0.0, fx_test_0=None, k_test_train=None)`` of
    ``gradient_descent`` (``t`` required: the flow is integrated up to it).

    Returns the ``([T,] N, *O)`` train outputs, or ``(train, test)`` outputs when
    ``k_test_train`` is given.
    """

    @overload
    def __call__(
        self, t: Any, fx_train_0: Any = 0.0, fx_test_0: Any = None, k_test_train: None = None
    ) -> Tensor: ...

    @overload
    def __call__(
        self, t: Any, fx_train_0: Any, fx_test_0: Any, k_test_train: KernelInput
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def __call__(
        self, t: Any, fx_train_0: Any = 0.0, fx_test_0: Any = None, *, k_test_train: KernelInput
    ) -> tuple[Tensor, Tensor]: ...


class EnsemblePredictFn(Protocol):
    """``predict_fn(t=None, x_test=None, get=None, compute_cov=False)`` of
    ``gradient_descent_mse_ensemble``.

    ``get=None`` means ``('nngp', 'ntk')``: a named tuple. Returns the ``([T,] M, *O)``
    ensemble mean (a ``Tensor``), or with ``compute_cov=True`` a :class:`Gaussian`; a
    named tuple of those for several names (or none) in ``get``.
    """

    @overload
    def __call__(
        self,
        t: Any = None,
        x_test: Tensor | None = None,
        get: None = None,
        compute_cov: Literal[False] = False,
    ) -> tuple[Tensor, ...]: ...

    @overload
    def __call__(
        self,
        t: Any = None,
        x_test: Tensor | None = None,
        get: None = None,
        *,
        compute_cov: Literal[True],
    ) -> tuple[Gaussian, ...]: ...

    @overload
    def __call__(
        self, t: Any, x_test: Tensor | None, get: str, compute_cov: Literal[False] = False
    ) -> Tensor: ...

    @overload
    def __call__(
        self, t: Any, x_test: Tensor | None, get: str, compute_cov: Literal[True]
    ) -> Gaussian: ...

    @overload
    def __call__(
        self, t: Any, x_test: Tensor | None, get: Names, compute_cov: Literal[False] = False
    ) -> tuple[Tensor, ...]: ...

    @overload
    def __call__(
        self, t: Any, x_test: Tensor | None, get: Names, compute_cov: Literal[True]
    ) -> tuple[Gaussian, ...]: ...

    @overload
    def __call__(
        self,
        t: Any = None,
        x_test: Tensor | None = None,
        get: str | Sequence[str] | None = None,
        compute_cov: bool = False,
    ) -> Tensor | Gaussian | tuple[Tensor, ...] | tuple[Gaussian, ...]: ...
