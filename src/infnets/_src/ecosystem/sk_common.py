"""What the scikit-learn estimators share: the default architecture, inputs, validation.

Imports scikit-learn lazily (only :func:`validate` needs it), so this module may be
imported without the ``sklearn`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infnets._src.ecosystem.architectures import resolve_layer
from infnets._src.layers import hyper as lh
from infnets._src.layers.base import Layer

__all__ = ["GETS", "as_tensor", "check_get", "default_layer", "estimator_layer", "validate"]

#: the kernels an estimator may use: NNGP posterior, NTK ensemble, NTK-GP (He et al. 2020)
GETS = ("nngp", "ntk", "ntkgp")


def default_layer(width: int = 512) -> Layer:
    """The estimators' default architecture: two ReLU hidden layers, NTK parameterization.

    ``serial(Dense(w, 1.5, 0.05), Relu(), Dense(w, 1.5, 0.05), Relu(), Dense(1, 1.5, 0.05))``
    (the width does not change the infinite-width kernels; it sets the finite twin).

    Args:
        width: hidden width of the finite twin.

    Returns:
        An infnets layer.
    """
    from infnets._src.elementwise.rectified import Relu
    from infnets._src.layers.combinators import serial
    from infnets._src.layers.dense import Dense

    return serial(
        Dense(width, W_std=1.5, b_std=0.05),
        Relu(),
        Dense(width, W_std=1.5, b_std=0.05),
        Relu(),
        Dense(1, W_std=1.5, b_std=0.05),
    )


def estimator_layer(spec: Any, who: str) -> Layer:
    """The layer of an estimator's ``layer`` parameter (``None``: :func:`default_layer`)."""
    return resolve_layer(spec, who, default_layer)


def check_get(get: Any, who: str, allowed: Sequence[str] = ("nngp", "ntk")) -> str:
    """``get`` if it is one of ``allowed``, else a ``ValueError`` naming them."""
    if get not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{who}: get must be one of {names}, got {get!r}.")
    return str(get)


def as_tensor(x: Any, input_shape: Sequence[int] | None, who: str) -> Tensor:
    """Rows of a float64 array as a (copied) float64 tensor, reshaped for the layer."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{who}: expected a 2-D array (n_samples, n_features), got {arr.shape}.")
    return lh.reshape_inputs(torch.tensor(arr, dtype=torch.float64), input_shape, who)


def validate(est: Any, X: Any, y: Any = "no_validation", **kw: Any) -> Any:  # noqa: N803
    """``sklearn.utils.validation.validate_data`` (scikit-learn >= 1.6) or its predecessor."""
    try:
        from sklearn.utils.validation import validate_data
    except ImportError:  # scikit-learn < 1.6
        return est._validate_data(X, y, **kw)
    return validate_data(est, X, y, **kw)
