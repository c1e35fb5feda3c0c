"""Finite width: empirical NTK/NNGP of any PyTorch model, Monte Carlo kernels, Taylor models.

The *empirical* (finite-width) neural tangent kernel of a network ``f(theta, x)`` at its
current parameters ``theta`` is

    Theta(x1, x2) = J(x1) J(x2)^T,   J(x) = d f(theta, x) / d theta,

(Jacot, Gabriel & Hongler 2018, "Neural Tangent Kernel"). It governs gradient descent on
the linearized network (:func:`linearize`) exactly, and the trained wide network
approximately (Lee et al. 2019). This module computes it for any ``torch.nn.Module`` (or any
pure function ``f(params, x)``) with three exact algorithms -- Jacobian contraction,
NTK-vector products and *structured derivatives* -- following Novak, Sohl-Dickstein &
Schoenholz (2022), "Fast Finite Width Neural Tangent Kernel" (ICML).

Output shapes
-------------
For ``f(x)`` of shape ``(N, S_1, ..., S_k)`` the kernel has, after the two example axes, one
pair of axes per output axis, *interleaved*: ``(N1, N2, S_1, S_1, ..., S_k, S_k)``.

* ``trace_axes`` (default ``(-1,)``, the logits): that pair is replaced by the **mean of its
  diagonal**, ``(1 / S) sum_s K[..., s, s]`` (the trace divided by the axis size, Neural
  Tangents' convention). It estimates the per-output-unit kernel, the one infinite-width
  kernels (``infnets.stax``) and ``infnets.predict`` use.
* ``diagonal_axes``: only the diagonal of that pair is kept, as a single axis. ``(0,)``
  keeps only ``K(x1[n], x2[n])`` (``N1 == N2``; e.g. the per-example NTK norms).

With ``f(x)`` of shape ``(N, 10)``:

====================================  ==================
``trace_axes``, ``diagonal_axes``     kernel shape
====================================  ==================
``(-1,)``, ``()`` (default)           ``(N1, N2)``
``()``, ``()``                        ``(N1, N2, 10, 10)``
``()``, ``(-1,)``                     ``(N1, N2, 10)``
``(-1,)``, ``(0,)``                   ``(N,)``
====================================  ==================

and with ``f(x)`` of shape ``(N, 8, 8, 3)`` (e.g. a per-pixel head), ``trace_axes=(-1,)``
gives ``(N1, N2, 8, 8, 8, 8)`` and ``trace_axes=(-1,), diagonal_axes=(1, 2)`` gives
``(N1, N2, 8, 8)``.

Public functions
----------------
:func:`empirical_ntk_fn`, :func:`empirical_nngp_fn`, :func:`empirical_kernel_fn`,
:func:`monte_carlo_kernel_fn`, :func:`linearize`, :func:`taylor_expand`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from infnets._src.empirical.kernels import EmpiricalKernel, EmpiricalNNGP, MonteCarloKernel
from infnets._src.empirical.model import Model
from infnets._src.empirical.ntk import IMPLEMENTATIONS, EmpiricalNTK, Plan
from infnets._src.empirical.taylor import TaylorModel

__all__ = [
    "IMPLEMENTATIONS",
    "EmpiricalKernel",
    "EmpiricalNNGP",
    "EmpiricalNTK",
    "MonteCarloKernel",
    "Plan",
    "TaylorModel",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "linearize",
    "monte_carlo_kernel_fn",
    "taylor_expand",
]

Axes = int | Sequence[int]
ModelLike = torch.nn.Module | Callable[..., Tensor]


def empirical_ntk_fn(
    model: ModelLike,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    implementation: str = "auto",
    chunk_size: int | None = None,
) -> EmpiricalNTK:
    """The empirical NTK ``Theta(x1, x2) = J(x1) J(x2)^T`` of a finite network.

    Math: with ``J(x) = d f(theta, x) / d theta`` over all trainable parameters,
    ``Theta[n1, n2, s, s'] = sum_p J(x1)[n1, s, p] J(x2)[n2, s', p]``, then reduced along
    ``trace_axes`` (mean of the diagonal) and ``diagonal_axes`` (see the module docstring).
    Three exact algorithms (Novak, Sohl-Dickstein & Schoenholz 2022, "Fast Finite Width
    Neural Tangent Kernel"):

    * ``'jacobian_contraction'``: per-example Jacobians with ``vmap(jacrev)``, then their
      inner products. Memory ``~ N O P`` (``O`` outputs, ``P`` parameters).
    * ``'ntk_vector_products'``: one vector-Jacobian product per example of ``x2`` and output
      unit, then one Jacobian-vector product on ``x1``; never stores a Jacobian.
    * ``'structured'``: for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers ``y = W u + b``
      (convolutions as products over image patches ``u_p``), the weight contribution is
      ``sum_{p,q} (u1_p . u2_q)(g1_p . g2_q)`` from the layer inputs ``u`` and output
      cotangents ``g = df/dy`` -- for a dense layer ``(u1 u2^T) * (g1 g2^T)`` -- or, when
      cheaper, the contraction of the per-example weight Jacobians ``sum_p g_p u_p^T``;
      the bias gives ``(sum_p g1_p) . (sum_q g2_q)``. Parameters of other modules
      (normalization, custom layers, shared or parametrized weights) fall back to Jacobian
      contraction inside the same backward pass. Elementwise layers (activations, pooling)
      need nothing: they only shape the cotangents. When every output axis is traced or
      diagonal and all parameters are in ``nn.Linear`` layers, the output units are
      processed in chunks (one forward pass, one backward pass per chunk) so that only one
      chunk's cotangents are held: ``ntk_fn.plan(x1, x2).output_chunks`` tells how many.
      When the model is a *chain* (an ``nn.Sequential``, possibly nested, of structured
      layers holding every trainable parameter, elementwise activations, pooling, padding,
      flattening, frozen normalization and dropout in eval mode), the cotangents come
      from a backward pass written out layer by layer instead of ``vmap(jacrev)``: each
      layer is contracted as soon as its cotangents exist, and a convolution read out
      through global average pooling and a linear head needs one weight gradient per
      example instead of one per example and output unit
      (``ntk_fn.plan(x1, x2).chain`` tells; same kernel up to round-off). Chains also
      split the output units into chunks when one layer's cotangents would exceed 1 GiB
      (e.g. 1000 logits), at no extra cost in products.
    * ``'auto'`` (default): measures the forward FLOPs ``F`` of one example once per input
      shape and picks the cheapest by the estimates ``JC ~ (N1+N2) O 2F + 2 N1 N2 w P``,
      ``NTVP ~ N2 O (2F + 2 N1 F)``, ``structured ~`` JC with each structured layer's term
      replaced by its cheaper rule (``w`` = output pairs per example pair); ties go to
      ``'structured'``. ``ntk_fn.plan(x1, x2)`` shows the choice and the estimates.

    Traced axes are averaged, not summed: ``trace_axes=(-1,)`` returns
    ``(1/O) sum_o J_o(x1) . J_o(x2)``, so with ``O`` logits the result is ``1/O`` of the
    full trace (Neural Tangents' convention; multiply by ``O`` for the plain trace).

    Args:
        model: an ``nn.Module`` (its trainable parameters are the variables; frozen
            parameters and buffers are constants, e.g. BatchNorm running statistics in eval
            mode) or a pure function ``f(params, x)`` with ``params`` a dict/pytree of tensors
            (e.g. an ``infnets.stax`` ``apply_fn``; then pass ``params`` to ``ntk_fn``).
            Examples must be independent: call ``model.eval()`` for BatchNorm/Dropout.
        trace_axes: output axes to average over (default the last); ``()`` keeps all.
        diagonal_axes: output axes to keep only the diagonal of; may include ``0``.
        implementation: ``'auto'``, ``'structured'``, ``'jacobian_contraction'`` or
            ``'ntk_vector_products'``; all give the same kernel up to round-off.
        chunk_size: if set, the kernel is computed in blocks of at most ``chunk_size``
            examples of ``x1`` and of ``x2``, bounding peak memory (per-example
            intermediates of one block; symmetric problems compute only the upper blocks).

    Returns:
        ``ntk_fn(x1, x2=None, params=None, per_layer=False)``: ``x1`` of shape ``(N1, ...)``,
        ``x2`` of shape ``(N2, ...)`` (``None``: ``x2 = x1``), ``params`` overriding the
        module's parameters (a dict ``name -> tensor``) or, for a function, its params.
        Returns the kernel, shape ``(N1, N2)`` for the default axes (see the module
        docstring); with ``per_layer=True`` (or ``'module'``) a dict ``module name ->
        kernel`` of each module's contribution (they sum to the kernel), with
        ``per_layer='parameter'`` one entry per parameter tensor. The kernel is not
        differentiable w.r.t. the parameters.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import empirical_ntk_fn
        >>> net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> x1, x2 = torch.randn(5, 3), torch.randn(2, 3)
        >>> empirical_ntk_fn(net)(x1, x2).shape
        torch.Size([5, 2])
        >>> empirical_ntk_fn(net, trace_axes=())(x1, x2).shape
        torch.Size([5, 2, 4, 4])
        >>> sorted(empirical_ntk_fn(net)(x1, per_layer=True))
        ['0', '2']
    """
    return EmpiricalNTK(model, trace_axes, diagonal_axes, implementation, chunk_size)


def empirical_nngp_fn(
    model: ModelLike,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    chunk_size: int | None = None,
) -> EmpiricalNNGP:
    """The empirical NNGP kernel: the outer product of the network's outputs.

    Math: ``K[n1, n2, s, s'] = f(x1)[n1, s] f(x2)[n2, s']`` -- the *output* outer product
    (not a covariance of penultimate-layer features), reduced along ``trace_axes`` (mean of
    the diagonal) and ``diagonal_axes`` like the NTK. Averaged over random initializations
    it estimates the NNGP kernel ``E[f(x1) f(x2)]`` of Neal (1996) and Lee et al. (2018),
    "Deep Neural Networks as Gaussian Processes" (see :func:`monte_carlo_kernel_fn`).

    Args:
        model: an ``nn.Module`` or a function ``f(params, x)`` (as in :func:`empirical_ntk_fn`).
        trace_axes: output axes to average over (default the last).
        diagonal_axes: output axes to keep only the diagonal of; may include ``0``.
        chunk_size: evaluate the model on at most this many examples at a time.

    Returns:
        ``nngp_fn(x1, x2=None, params=None)`` returning a tensor of the same shape as the
        NTK's, ``(N1, N2)`` by default.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import empirical_nngp_fn
        >>> net = nn.Linear(3, 4)
        >>> x = torch.randn(5, 3)
        >>> k = empirical_nngp_fn(net)(x)
        >>> torch.allclose(k, net(x) @ net(x).T / 4)
        True
    """
    return EmpiricalNNGP(model, trace_axes, diagonal_axes, chunk_size)


def empirical_kernel_fn(
    model: ModelLike,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    implementation: str = "auto",
    chunk_size: int | None = None,
) -> EmpiricalKernel:
    """Empirical NNGP and NTK together, with the ``get`` convention of ``stax`` kernels.

    Math: ``nngp = f(x1) f(x2)^T`` (:func:`empirical_nngp_fn`) and
    ``ntk = J(x1) J(x2)^T`` (:func:`empirical_ntk_fn`), both reduced along the same axes;
    ``cov1``/``cov2`` are the per-example ``nngp`` of ``x1``/``x2`` with themselves.

    Args:
        model: an ``nn.Module`` or a function ``f(params, x)``.
        trace_axes: output axes to average over (default the last).
        diagonal_axes: output axes to keep only the diagonal of.
        implementation: NTK algorithm (see :func:`empirical_ntk_fn`).
        chunk_size: block size in examples (see :func:`empirical_ntk_fn`).

    Returns:
        ``kernel_fn(x1, x2=None, get=None, params=None)``: ``get=None`` gives a named tuple
        ``Kernels(nngp, ntk)``; a name (``'nngp'``, ``'ntk'``, ``'cov1'``, ``'cov2'``) gives
        that tensor; a tuple of names gives a named tuple of those. Only what is asked for
        is computed.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import empirical_kernel_fn
        >>> kernel_fn = empirical_kernel_fn(nn.Linear(3, 2))
        >>> k = kernel_fn(torch.randn(4, 3))
        >>> k.nngp.shape, k.ntk.shape
        (torch.Size([4, 4]), torch.Size([4, 4]))
        >>> kernel_fn(torch.randn(4, 3), get="ntk").shape
        torch.Size([4, 4])
    """
    return EmpiricalKernel(model, trace_axes, diagonal_axes, implementation, chunk_size)


def monte_carlo_kernel_fn(
    init_fn: Callable[..., Any],
    apply_fn: Callable[..., Tensor],
    key: int | torch.Generator,
    n_samples: int | Sequence[int],
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    implementation: str = "auto",
    chunk_size: int | None = None,
) -> MonteCarloKernel:
    """Monte Carlo estimates of the NNGP and NTK: empirical kernels averaged over inits.

    Math: with ``theta_1, ..., theta_S`` drawn by ``init_fn``,
    ``K_S = (1/S) sum_s K_emp(theta_s)``. For the finite twins of ``infnets.stax`` networks
    ``E[K_emp]`` tends to the analytic ``kernel_fn`` as the widths grow (Neal 1996; Lee et
    al. 2018; Jacot et al. 2018) -- exactly, at any width, for one hidden layer -- and the
    Monte Carlo error shrinks like ``1 / sqrt(S)``. This also gives kernels of layers
    without a closed form. Traced axes are averaged, so with ``trace_axes=(-1,)`` the
    estimate is per output unit, like the analytic kernels.

    Args:
        init_fn: ``init_fn(key, input_shape) -> (output_shape, params)``; called with a
            ``torch.Generator``, ``input_shape = (-1, *x1.shape[1:])`` and, when it accepts
            them, ``dtype``/``device`` of ``x1``.
        apply_fn: ``apply_fn(params, x) -> f(x)``.
        key: seed or generator. Every call of ``kernel_fn`` replays the same samples (from
            the seed, or from the generator's state when ``monte_carlo_kernel_fn`` ran), so
            ``kernel_fn(x1, x2)`` and ``kernel_fn(x1)`` use the same networks.
        n_samples: number of samples ``S``, or an increasing sequence of them (e.g.
            ``[1, 2, 4, 8]``): ``kernel_fn`` then returns a generator of the running
            estimates at those counts (a convergence curve for the price of the largest).
        trace_axes, diagonal_axes, implementation, chunk_size: as in
            :func:`empirical_kernel_fn`.

    Returns:
        ``kernel_fn(x1, x2=None, get=None)`` with the ``get`` convention of
        :func:`empirical_kernel_fn`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import monte_carlo_kernel_fn
        >>> def init_fn(gen, shape):
        ...     return (-1, 1), {"w": torch.randn(shape[-1], generator=gen)}
        >>> def apply_fn(params, x):
        ...     return (x @ params["w"])[:, None] / x.shape[-1] ** 0.5
        >>> kernel_fn = monte_carlo_kernel_fn(init_fn, apply_fn, key=0, n_samples=[10, 100])
        >>> [k.shape for k in kernel_fn(torch.randn(3, 5), get="nngp")]
        [torch.Size([3, 3]), torch.Size([3, 3])]
    """
    return MonteCarloKernel(
        init_fn, apply_fn, key, n_samples, trace_axes, diagonal_axes, implementation, chunk_size
    )


def linearize(model: ModelLike, params: Any = None) -> TaylorModel:
    """The network linearized in its parameters, as a trainable ``nn.Module``.

    Math: ``f_lin(theta, x) = f(theta_0, x) + J(x) (theta - theta_0)`` with
    ``J(x) = d f(theta_0, x) / d theta``. Under gradient descent ``f_lin`` evolves exactly as
    kernel regression with the empirical NTK at ``theta_0`` (Lee et al. 2019, "Wide Neural
    Networks of Any Depth Evolve as Linear Models Under Gradient Descent").

    Evaluation: one forward pass of the network on ``torch.autograd.forward_ad`` dual tensors
    (primal ``theta_0``, tangent ``theta - theta_0``; no Jacobian is stored), so a training
    step costs about two forward passes and one backward pass of the network. Inside
    ``torch.func`` transforms (``vmap`` over an ensemble built with
    ``torch.func.stack_module_state``, ``grad``, ``jacrev``) it uses ``torch.func.jvp``
    instead; the values and gradients are the same.

    Args:
        model: an ``nn.Module`` or a function ``f(params, x)``.
        params: the expansion point ``theta_0``: for a module ``None`` (its current
            parameters) or a dict overriding some; for a function its params pytree.

    Returns:
        A :class:`TaylorModel` ``lin`` with ``lin(x) = f_lin(theta, x)``; its trainable
        parameters ``theta`` start at ``theta_0`` (``lin.parameters()`` for optimizers;
        ``lin.current_params`` in the original layout); ``theta_0`` and the module's buffers
        are frozen copies.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import linearize
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> lin = linearize(net)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(lin(x), net(x))
        True
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    """
    return taylor_expand(model, params, 1, who="linearize")


def taylor_expand(
    model: ModelLike, params: Any, degree: int, *, who: str = "taylor_expand"
) -> TaylorModel:
    """The degree-``k`` Taylor polynomial of a network in its parameters, as an ``nn.Module``.

    Math: ``f_k(theta, x) = sum_{j<=k} (1/j!) D^j f(theta_0, x)[theta - theta_0]^{(j)}``.
    ``k = 1`` is :func:`linearize`; ``k = 2`` adds the curvature term studied by Bai & Lee
    (2020), "Beyond Linearization: On Quadratic and Higher-Order Approximation of Wide
    Neural Networks".

    Evaluation (exact in every case): ``k = 1`` as in :func:`linearize`; ``k = 2`` by one
    forward pass on dual tensors with the primal recorded by autograd, two reverse passes
    for ``D^2 f[delta, delta]`` and, in the backward pass, one reverse pass for the gradient
    ``J^T g + D^2 f[delta, .]^T g`` (about 5.5x the network's own training step on a small
    MLP, double backward supported); ``k >= 3``, inside ``torch.func`` transforms, or with
    an input that requires grad at ``k = 2``: ``k`` nested ``torch.func.jvp`` s.

    Args:
        model: an ``nn.Module`` or a function ``f(params, x)``.
        params: the expansion point (``None`` for a module's current parameters).
        degree: the order ``k >= 0``.
        who: name used in error messages.

    Returns:
        A :class:`TaylorModel` (trainable parameters start at the expansion point).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from infnets.empirical import taylor_expand
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> quad = taylor_expand(net, None, 2)
        >>> quad(torch.randn(4, 3)).shape
        torch.Size([4, 1])
    """
    from infnets._src.core import inputs as _inputs

    degree = _inputs.check_int(degree, "degree", 0)
    m = Model(model, who)
    with m.locked():  # no other thread swaps the module's tensors while they are read
        m.check_mode()
        m.check_transformable()
        return TaylorModel(m, m.bind(params), degree)
