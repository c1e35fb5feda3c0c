r"""Random features of the NNGP and NTK of fully-connected networks: kernels past ``N^2``.

Features ``phi(x)`` (``(N, D)``) whose inner products ``phi(x) . phi(y)`` estimate the kernel
let regression and GP predictions run in ``O(N D^2)`` time and ``O(N D)`` memory instead of
forming the ``N x N`` kernel. The estimate follows the architecture layer by layer, each step
exact in expectation given the previous layer's features (Rahimi & Recht 2007; Cho & Saul 2009,
"Kernel methods for deep learning"; for the NTK, Zandieh, Han, Avron, Shoham, Kim & Shin 2021,
"Scaling neural tangent kernels via sketching and random features", and Han, Avron, Shoham,
Kim & Shin 2022, "Fast neural kernel embeddings for general activations"):

* inputs: ``phi_0 = x / sqrt(d)`` (so ``phi_0 . phi_0' = x . x' / d``, the input kernel) and no
  NTK features (the inputs have no parameters);
* ``Dense`` in the NTK parameterization (``K' = W^2 K + b^2``, ``Theta' = K' + W^2 Theta``):
  ``phi' = [W phi, b]`` and ``psi' = [phi', W psi]``, exactly (concatenation);
* an activation ``sigma`` (``K' = E[sigma(u) sigma(u')]``, ``Theta' = Theta E[sigma'(u)
  sigma'(u')]`` for ``(u, u') ~ N(0, K)``): with a Gaussian matrix ``G`` of ``D`` rows,
  ``u = G phi`` has rows distributed as ``N(0, phi . phi')``, so ``phi' = sigma(u) / sqrt(D)``
  estimates the NNGP map without bias, and with a second, independent Gaussian matrix ``R``,
  ``psi' = (sigma'(u) / sqrt(D)) * (R psi)`` (elementwise product) estimates the product
  ``Theta E[sigma' sigma']`` without bias, since ``E_R[(r . psi)(r . psi')] = psi . psi'``
  (a Gaussian sketch of the tensor product ``sigma'(u) (x) psi``).

Each activation's estimate is unbiased given the features it receives; through several
activations the maps' curvature adds a bias of order ``1/D``. The relative error of an entry
is of order ``sqrt(depth / D)`` (measured in ``tests/test_features.py``: halving when ``D``
grows 4x). NTK features need the NTK parameterization (the standard one's NTK scales with the
widths, which random features do not have).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from infnets._src.core import inputs as _inputs
from infnets._src.core.protocol import KernelLayer, leaves
from infnets._src.elementwise.base import ElementwiseLayer
from infnets._src.layers.dense import Dense

__all__ = ["Features", "random_features", "feature_regression"]

#: examples per block: features of a block are computed at once (bounded temporaries)
BLOCK_ROWS = 8192


class Features(NamedTuple):
    """Random features: ``nngp`` ``(N, D_K)`` and ``ntk`` ``(N, D_T)`` (``None`` if not asked)."""

    nngp: Tensor | None
    ntk: Tensor | None


def _derivative(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def dfn(u: Tensor) -> Tensor:
        with torch.enable_grad():
            v = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(v).sum(), v, allow_unused=True)
        return torch.zeros_like(u) if g is None else g

    return dfn


def _steps(layer: KernelLayer, need_ntk: bool) -> list[Any]:
    """The architecture as ``('dense', w, b)`` and ``('act', fn, dfn)`` steps."""
    steps: list[Any] = []
    for leaf in leaves(layer):
        if isinstance(leaf, Dense):
            w, b = leaf.W_std, leaf.b_std
            if need_ntk and leaf.parameterization != "ntk":
                raise ValueError(
                    f"random_features: NTK features need the NTK parameterization; {leaf!r} "
                    "uses 'standard' (ask get='nngp', or build with parameterization='ntk')."
                )
            steps.append(("dense", float(w), 0.0 if b is None else float(b)))
        elif isinstance(leaf, ElementwiseLayer):
            if not steps or steps[-1][0] != "dense":
                raise ValueError(
                    f"random_features: {leaf!r} must follow a Dense layer (its input must be "
                    "Gaussian)."
                )
            steps.append(("act", leaf.fn, _derivative(leaf.fn) if need_ntk else None))
        else:
            raise ValueError(
                f"random_features: {leaf!r} is not supported; random features cover "
                "fully-connected networks of Dense layers and elementwise activations "
                "(use kernel_fn for the exact kernel of other architectures)."
            )
    if not steps or steps[0][0] != "dense":
        raise ValueError("random_features: the network must start with a Dense layer.")
    return steps


def random_features(
    layer: KernelLayer,
    x: Any,
    n_features: int = 1024,
    get: str | Sequence[str] = ("nngp", "ntk"),
    key: int | torch.Generator = 0,
) -> Features:
    r"""Random features whose inner products estimate the NNGP and NTK of ``layer``.

    ``phi(x_i) . phi(x_j)`` is an estimate of ``kernel_fn(x, None, 'nngp')[i, j]`` (and the
    NTK features of the NTK), built layer by layer as the module docstring describes; the
    same ``key`` gives the same random matrices, so features of train and test inputs computed
    in separate calls with one ``key`` are features of one kernel.

    Args:
        layer: a fully-connected network (``stax.serial`` of ``Dense`` and elementwise layers,
            starting with ``Dense``; NTK features need the NTK parameterization).
        x: ``(N, d)`` inputs.
        n_features: ``D``, the random features per activation (the width of the sampled
            layers). The relative error of kernel entries is of order ``sqrt(depth / D)``.
        get: ``'nngp'``, ``'ntk'`` or both.
        key: seed (or generator) of the random matrices.

    Returns:
        :class:`Features`: ``nngp`` of shape ``(N, D + 1)`` after a final ``Dense`` with bias
        (``(N, D)`` without), ``ntk`` ``(N, 2 D + 1)`` (its concatenation with the carried NTK
        features), or ``None`` when not asked. dtype and device follow ``x``.

    Examples:
        >>> import torch
        >>> from infnets import features, stax
        >>> net = stax.serial(stax.Dense(1, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> f = features.random_features(net, x, n_features=20000)
        >>> k = net.kernel_fn(x, None, ('nngp', 'ntk'))
        >>> bool(((f.ntk @ f.ntk.T - k.ntk).abs().max() < 0.1 * k.ntk.abs().max()))
        True
    """
    names = (get,) if isinstance(get, str) else tuple(get)
    if not names or any(g not in ("nngp", "ntk") for g in names):
        raise ValueError(f"random_features: get must be 'nngp', 'ntk' or both, got {get!r}.")
    need_ntk = "ntk" in names
    x = _inputs.as_tensor(x, "x")
    if x.ndim != 2:
        raise ValueError(
            f"random_features: x has shape {tuple(x.shape)}; pass (N, features) inputs."
        )
    n_features = _inputs.check_int(n_features, "random_features: n_features", 1)
    steps = _steps(layer, need_ntk)
    gen = _inputs.make_generator(key, x.device)

    # the random matrices, drawn once in a fixed order (same key -> same kernel)
    mats: list[tuple[Tensor, Tensor | None]] = []
    dim_k, dim_t = x.shape[1], 0
    for step in steps:
        if step[0] == "dense":
            dim_k, dim_t = dim_k + (step[2] != 0.0), (dim_k + (step[2] != 0.0) + dim_t)
            continue
        g = torch.randn(dim_k, n_features, generator=gen, dtype=x.dtype, device=x.device)
        r = None
        if need_ntk and dim_t:
            r = torch.randn(dim_t, n_features, generator=gen, dtype=x.dtype, device=x.device)
        mats.append((g, r))
        dim_k, dim_t = n_features, (n_features if dim_t else 0)

    def block(xb: Tensor) -> tuple[Tensor, Tensor | None]:
        phi = xb / math.sqrt(xb.shape[1])
        psi: Tensor | None = None  # zero NTK features until the first parameter
        i = 0
        for step in steps:
            if step[0] == "dense":
                _, w, b = step
                phi = phi * w
                if b != 0.0:
                    phi = torch.cat([phi, phi.new_full((phi.shape[0], 1), b)], 1)
                if need_ntk:
                    psi = phi if psi is None else torch.cat([phi, psi * w], 1)
                continue
            _, fn, dfn = step
            g, r = mats[i]
            i += 1
            u = phi @ g
            phi = fn(u).div_(math.sqrt(n_features))
            if need_ntk and psi is not None:
                assert r is not None
                psi = dfn(u).div_(math.sqrt(n_features)).mul_(psi @ r)
        return phi, psi

    want_k = "nngp" in names
    out_k = x.new_empty((x.shape[0], dim_k)) if want_k else None
    out_t = x.new_empty((x.shape[0], dim_t)) if need_ntk else None
    for s in range(0, x.shape[0], BLOCK_ROWS):  # blocks of examples: bounded temporaries
        phi, psi = block(x[s : s + BLOCK_ROWS])
        if out_k is not None:
            out_k[s : s + BLOCK_ROWS] = phi
        if out_t is not None and psi is not None:
            out_t[s : s + BLOCK_ROWS] = psi
    return Features(out_k, out_t)


def feature_regression(
    train: Tensor, y_train: Any, test: Tensor | None = None, diag_reg: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    r"""Kernel ridge regression / GP posterior mean on features, without an ``N x N`` matrix.

    With train features ``Phi`` ``(N, D)``, the kernel ``K = Phi Phi^T`` and the ridge
    ``lambda``, the posterior mean at test features ``Phi_*`` is
    ``K_* (K + lambda I)^{-1} Y = Phi_* (Phi^T Phi + lambda I)^{-1} Phi^T Y`` (push-through
    identity): a ``D x D`` solve, ``O(N D^2)`` time, ``Phi^T Phi`` accumulated in float64 over
    blocks of rows (``O(D^2)`` memory besides the features). This is ``predict.gp_inference``'s mean
    (``'nngp'`` with NNGP features, ``'ntk'`` with NTK features) for the feature kernel.

    Args:
        train: ``(N, D)`` features of the training inputs.
        y_train: ``(N,)`` or ``(N, K)`` targets.
        test: ``(M, D)`` features of the test inputs (``None``: only the weights).
        diag_reg: the ridge ``lambda`` (absolute), >= 0; 0 needs ``Phi^T Phi`` invertible.

    Returns:
        ``(weights, mean)``: ``(D, K)`` weights with ``mean = test @ weights`` ``(M, K)``
        (``None`` without ``test``); ``y_train`` of shape ``(N,)`` gives ``(D,)``/``(M,)``.
    """
    y = _inputs.as_tensor(y_train, "y_train").to(train.dtype)
    if train.ndim != 2 or y.shape[0] != train.shape[0]:
        raise ValueError(
            f"feature_regression: train {tuple(train.shape)} and y_train {tuple(y.shape)} "
            "must be (N, D) and (N,) or (N, K)."
        )
    if not diag_reg >= 0:
        raise ValueError(f"feature_regression: diag_reg must be >= 0, got {diag_reg!r}.")
    work = torch.promote_types(train.dtype, torch.float64)  # accumulate in float64
    d = train.shape[1]
    gram = torch.zeros((d, d), dtype=work, device=train.device)
    rhs = torch.zeros((d,) + tuple(y.shape[1:]), dtype=work, device=train.device)
    for s in range(0, train.shape[0], BLOCK_ROWS):  # O(B D) temporaries, whatever N is
        block = train[s : s + BLOCK_ROWS].to(work)
        gram.addmm_(block.T, block)
        rhs += block.T @ y[s : s + BLOCK_ROWS].to(work)
    gram.diagonal().add_(diag_reg)
    weights = torch.linalg.solve(gram, rhs).to(train.dtype)
    return weights, None if test is None else test @ weights
