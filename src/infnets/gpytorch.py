r"""Infinite-width network kernels for GPyTorch, with learnable weight and bias variances.

:class:`InfiniteWidthKernel` is a ``gpytorch.kernels.Kernel`` computing the NNGP (or NTK)
of an :mod:`infnets.stax` architecture. The weight and bias variances
``W_var = W_std^2`` and ``b_var = b_std^2``, shared by the architecture's affine layers,
are positivity-constrained parameters, so an ``ExactGP`` fits them, like any GPyTorch
hyper-parameter, by maximising the marginal likelihood (autograd differentiates
through the kernel maps).

Requires GPyTorch (``pip install "infnets[gpytorch]"``).

Examples:
    >>> import torch, gpytorch
    >>> from infnets import stax
    >>> from infnets.gpytorch import InfiniteWidthKernel
    >>> net = stax.serial(stax.Dense(512, W_std=1.5, b_std=0.1), stax.Relu(),
    ...                   stax.Dense(1, W_std=1.5, b_std=0.1))
    >>> kernel = InfiniteWidthKernel(net, get='nngp')
    >>> x = torch.randn(5, 3)
    >>> kernel(x).to_dense().shape
    torch.Size([5, 5])
    >>> float(kernel.W_var.detach())  # 1.5 ** 2
    2.25
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import gpytorch
    from gpytorch.constraints import Interval, Positive
    from gpytorch.priors import Prior
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "infnets.gpytorch needs GPyTorch: pip install 'infnets[gpytorch]' (or gpytorch)."
    ) from err

from infnets._src.core import inputs
from infnets._src.ecosystem.batched import batched_kernel, batched_spatial_kernel
from infnets._src.layers import hyper as lh
from infnets._src.layers.base import Layer

__all__ = ["InfiniteWidthKernel"]

_GETS = ("nngp", "ntk")


class InfiniteWidthKernel(gpytorch.kernels.Kernel):
    r"""NNGP or NTK of an infinite network, with learnable ``W_var`` and ``b_var``.

    For an architecture whose affine layers share ``W_std = sqrt(W_var)`` and
    ``b_std = sqrt(b_var)``, ``k(x, x')`` is the NNGP covariance (``get='nngp'``, Lee
    et al. 2018, "Deep neural networks as Gaussian processes") or the neural tangent
    kernel (``get='ntk'``, Jacot et al. 2018). E.g. one ReLU hidden layer gives
    ``k(x, x') = W_var sqrt(q q') / (2 pi) (sin t + (pi - t) cos t) + b_var`` with
    ``q = W_var x.x / d + b_var`` and ``cos t`` the correlation of the pre-activations
    (Cho & Saul 2009).

    The variances are stored as raw parameters ``raw_W_var``/``raw_b_var`` mapped
    through a positivity constraint (``Positive()`` by default), GPyTorch's pattern for
    ``lengthscale`` and ``outputscale``. When ``x1`` and ``x2`` are the same tensor the
    symmetric kernel is computed once (exactly symmetric, about half the work).

    Batches: inputs are ``(..., N, D)``. With ``batch_shape=()`` (default) the variances
    are shared and every leading batch of input sets is evaluated in one vectorised pass
    of the kernel maps, no Python loop (all wanted pairs of all batches form one packed
    kernel record: :func:`infnets._src.ecosystem.batched.batched_kernel`). With
    ``batch_shape=(B,)`` (e.g. one GP per task) ``W_var``/``b_var`` have shape ``(B,)``,
    one pair of variances per batch entry, and all ``B`` sets of variances still go
    through one pass: the packed record gets a trailing axis of length ``B`` on which
    the ``(B,)`` standard deviations broadcast (each pair is computed for its own batch
    entry only), so autograd reaches every raw variance through that one pass. Inputs
    reshaped to images (``input_shape``) are batched as well: one packed record of the
    pairs within each input set, all sets in one pass of the kernel maps
    (:func:`infnets._src.ecosystem.batched.batched_spatial_kernel`; blocks of pairs only
    to fit the memory budget), the work of one ``kernel_fn`` call per set. With a
    ``batch_shape`` images take one such pass per set of variances: the trailing group
    axis is fully connected only (convolutions and pooling would read it as a spatial
    axis), and the layers cannot scale one record's pairs and examples by different
    groups' variances.

    ``W_var`` and ``ScaleKernel``: the readout layer multiplies the kernel by ``W_var``,
    so ``ScaleKernel(InfiniteWidthKernel(...))`` has overlapping parameters. For an
    architecture without biases whose nonlinearities are positively homogeneous (ReLU,
    ``ABRelu``, ``LeakyRelu``) the kernel of depth ``L`` is exactly ``W_var^L`` times a
    fixed kernel, so ``outputscale`` and ``W_var`` are not identifiable (only
    ``outputscale * W_var^L`` is): use one of them (fix the other, e.g.
    ``kernel.raw_W_var.requires_grad_(False)``). With biases or other nonlinearities
    (``Erf``) ``W_var`` also changes the kernel's shape, and a ``ScaleKernel`` adds one
    more degree of freedom, an output scale separate from the weights of every layer.

    ``get`` defaults to ``'nngp'``, as in :class:`infnets.sklearn.InfiniteWidthKernel`:
    a GP kernel is the prior covariance of the network's outputs.

    Args:
        layer: an infnets layer (all its affine layers use the shared variances; those
            without a bias keep none) or a factory ``layer_fn(W_std, b_std) -> Layer``.
        get: ``'nngp'`` (default) or ``'ntk'``.
        W_std: initial weight standard deviation; ``None`` reads it from the first
            affine layer of ``layer`` (required with a factory).
        b_std: initial bias standard deviation; ``None`` reads it from ``layer``; no
            ``b_var`` parameter when the result is ``None`` (no biases).
        input_shape: per-example shape the ``D`` features are reshaped to, e.g.
            ``(1, 8, 8)`` for a convolutional ``layer``.
        W_var_constraint: constraint of ``W_var`` (default ``Positive()``).
        b_var_constraint: constraint of ``b_var`` (default ``Positive()``).
        W_var_prior: optional GPyTorch prior on ``W_var``.
        b_var_prior: optional GPyTorch prior on ``b_var``.
        **kwargs: passed to ``gpytorch.kernels.Kernel`` (e.g. ``active_dims``,
            ``batch_shape``).

    Examples:
        >>> import torch, gpytorch
        >>> from infnets import stax
        >>> from infnets.gpytorch import InfiniteWidthKernel
        >>> class GP(gpytorch.models.ExactGP):
        ...     def __init__(self, x, y, likelihood):
        ...         super().__init__(x, y, likelihood)
        ...         self.mean_module = gpytorch.means.ZeroMean()
        ...         self.covar_module = InfiniteWidthKernel(
        ...             stax.serial(stax.Dense(1, W_std=1.0, b_std=0.1), stax.Erf(),
        ...                         stax.Dense(1, W_std=1.0, b_std=0.1)))
        ...     def forward(self, x):
        ...         return gpytorch.distributions.MultivariateNormal(
        ...             self.mean_module(x), self.covar_module(x))
        >>> x = torch.linspace(-2, 2, 20)[:, None]; y = torch.tanh(3 * x[:, 0])
        >>> model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood())
        >>> sorted(name for name, _ in model.covar_module.named_parameters())
        ['raw_W_var', 'raw_b_var']

        A batch of 4 input sets, one kernel call; and 2 GPs with their own variances:

        >>> net = stax.serial(stax.Dense(1, W_std=1.0, b_std=0.1), stax.Relu(), stax.Dense(1))
        >>> InfiniteWidthKernel(net)(torch.randn(4, 6, 3)).to_dense().shape
        torch.Size([4, 6, 6])
        >>> two = InfiniteWidthKernel(net, batch_shape=torch.Size([2]))
        >>> two.W_var.shape, two(torch.randn(2, 6, 3)).to_dense().shape
        (torch.Size([2]), torch.Size([2, 6, 6]))
    """

    has_lengthscale = False

    def __init__(
        self,
        layer: lh.LayerSpec,
        get: str = lh.DEFAULT_GET,
        W_std: float | None = None,  # noqa: N803 - the papers' names
        b_std: float | None = None,
        input_shape: Sequence[int] | None = None,
        W_var_constraint: Interval | None = None,  # noqa: N803
        b_var_constraint: Interval | None = None,
        W_var_prior: Prior | None = None,  # noqa: N803
        b_var_prior: Prior | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        who = "InfiniteWidthKernel"
        if get not in _GETS:
            raise ValueError(f"{who}: get must be 'nngp' or 'ntk', got {get!r}.")
        if isinstance(layer, Layer) and (W_std is None or b_std is None):
            w0, b0 = lh.read_stds(layer, who)
            W_std = w0 if W_std is None else W_std  # noqa: N806
            b_std = b0 if b_std is None else b_std
        elif not isinstance(layer, Layer) and not callable(layer):
            raise TypeError(
                f"{who}: layer must be an infnets layer or a factory layer_fn(W_std, b_std), "
                f"got {type(layer).__name__}."
            )
        if W_std is None:
            raise ValueError(f"{who}: pass W_std when layer is a factory.")
        self.layer_spec = layer
        self.get = get
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.has_bias = b_std is not None

        self._add_variance("W_var", float(W_std) ** 2, W_var_constraint, W_var_prior)
        if b_std is not None:
            self._add_variance("b_var", float(b_std) ** 2, b_var_constraint, b_var_prior)

    def _add_variance(
        self, name: str, value: float, constraint: Interval | None, prior: Prior | None
    ) -> None:
        raw = "raw_" + name
        self.register_parameter(raw, torch.nn.Parameter(torch.zeros(self.batch_shape)))
        self.register_constraint(raw, Positive() if constraint is None else constraint)
        if prior is not None:
            self.register_prior(
                f"{name}_prior",
                prior,
                lambda m, n=name: getattr(m, n),
                lambda m, v, n=name: m._set_variance(n, v),
            )
        self._set_variance(name, value)

    def _set_variance(self, name: str, value: Any) -> None:
        raw = getattr(self, "raw_" + name)
        if not torch.is_tensor(value):
            value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device)
        constraint = getattr(self, f"raw_{name}_constraint")
        self.initialize(**{"raw_" + name: constraint.inverse_transform(value.to(raw))})

    # ------------------------------------------------------------ variances
    @property
    def W_var(self) -> Tensor:  # noqa: N802 - the papers' names
        """The weight variance ``W_std^2``: positive, of shape ``batch_shape``."""
        return self.raw_W_var_constraint.transform(self.raw_W_var)

    @W_var.setter
    def W_var(self, value: Any) -> None:  # noqa: N802
        self._set_variance("W_var", value)

    @property
    def b_var(self) -> Tensor | None:
        """The bias variance ``b_std^2`` (``None`` when the architecture has no bias)."""
        if not self.has_bias:
            return None
        return self.raw_b_var_constraint.transform(self.raw_b_var)

    @b_var.setter
    def b_var(self, value: Any) -> None:
        if not self.has_bias:
            raise AttributeError("InfiniteWidthKernel: this architecture has no bias variance.")
        self._set_variance("b_var", value)

    def layer(self, *index: int) -> Layer:
        """The architecture with the current ``W_std``/``b_std`` (tensors, differentiable).

        Args:
            *index: with a ``batch_shape``, the batch entry whose variances to use (one
                integer per batch axis); none without.

        Returns:
            An infnets layer.
        """
        if len(index) != len(self.batch_shape):
            raise ValueError(
                f"InfiniteWidthKernel.layer: pass {len(self.batch_shape)} batch indices "
                f"(batch_shape {tuple(self.batch_shape)}), got {index}."
            )
        b_var = self.b_var
        return lh.build_layer(
            self.layer_spec,
            self.W_var[index].sqrt(),
            None if b_var is None else b_var[index].sqrt(),
            "InfiniteWidthKernel",
        )

    # --------------------------------------------------------------- kernel
    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        diag: bool = False,
        last_dim_is_batch: bool = False,
        **params: Any,
    ) -> Tensor:
        """The ``(..., N1, N2)`` kernel matrix (``(..., N1)`` with ``diag=True``).

        Args:
            x1: ``(..., N1, D)`` inputs.
            x2: ``(..., N2, D)`` inputs.
            diag: return only ``k(x1_i, x2_i)``.
            last_dim_is_batch: not supported (raises).
            **params: ignored (GPyTorch's protocol).

        Returns:
            The kernel values, in the inputs' dtype.
        """
        if last_dim_is_batch:
            raise NotImplementedError("InfiniteWidthKernel does not support last_dim_is_batch.")
        nb = len(self.batch_shape)
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        if not batch:
            return self._single(self.layer(), x1, x2, diag)
        same = x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))
        a = x1.expand(*batch, *x1.shape[-2:])
        b = x2.expand(*batch, *x2.shape[-2:])
        if nb == 0:
            a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
            out = self._batch(self.layer(), a, b, same, diag)
            return out.reshape(*batch, *out.shape[1:])
        # batch_shape axes first (G = prod(batch_shape) sets of variances), the other batch
        # axes within (L input sets per set of variances): one pass for all G * L sets
        lead = len(batch) - nb
        order = list(range(lead, len(batch))) + list(range(lead))
        a = a.permute(*order, a.ndim - 2, a.ndim - 1)
        b = b.permute(*order, b.ndim - 2, b.ndim - 1)
        groups = self.batch_shape.numel()
        a = a.reshape(groups, -1, *a.shape[-2:])
        b = b.reshape(groups, -1, *b.shape[-2:])
        if self.input_shape is None:
            out = self._grouped(a, b, same, diag)
        else:
            # images: one pass per set of variances, each over all its input sets at once.
            # batched_kernel's trailing group axis would be read as a spatial axis by the
            # convolutions and pooling, and folding the groups into the pair axis would need
            # every affine layer to scale pairs (nngp/ntk, M entries) and examples (cov1, N
            # entries) by their own group's variances: the layers take scalar (or trailing
            # (G,)) standard deviations only (see the class docstring)
            layers = [self.layer(*i) for i in itertools.product(*map(range, self.batch_shape))]
            out = torch.stack([self._batch(lay, a[i], b[i], same, diag)
                               for i, lay in enumerate(layers)])  # fmt: skip
        out = out.reshape(*self.batch_shape, *batch[:lead], *out.shape[2:])
        back = list(range(nb, nb + lead)) + list(range(nb))
        return out.permute(*back, *range(len(batch), out.ndim))

    def _grouped(self, a: Tensor, b: Tensor, same: bool, diag: bool) -> Tensor:
        """``(G, L, N1, N2)`` (or ``(G, L, N1)``) kernels of ``G`` groups of ``L`` input sets,
        group ``g`` with the ``g``-th variances (flattened ``batch_shape``): one pass of the
        kernel maps, the variances as ``(G,)`` tensors (:func:`inputs.hyper_batch`)."""
        if diag and not same and a.shape[-2] != b.shape[-2]:
            raise RuntimeError("InfiniteWidthKernel: diag=True needs x1 and x2 of equal size.")
        groups = a.shape[0]
        b_var = self.b_var
        with inputs.hyper_batch(groups):
            layer = lh.build_layer(
                self.layer_spec,
                self.W_var.reshape(groups).sqrt(),
                None if b_var is None else b_var.reshape(groups).sqrt(),
                "InfiniteWidthKernel",
            )
            return batched_kernel(layer, a, None if same else b, self.get, diag)

    def _batch(self, layer: Layer, a: Tensor, b: Tensor, same: bool, diag: bool) -> Tensor:
        """``(L, N1, N2)`` (or ``(L, N1)``) kernels of ``L`` input sets with shared variances."""
        if diag and not same and a.shape[-2] != b.shape[-2]:
            raise RuntimeError("InfiniteWidthKernel: diag=True needs x1 and x2 of equal size.")
        if self.input_shape is None:
            return batched_kernel(layer, a, None if same else b, self.get, diag)
        # images: one packed record of the pairs within each set, all sets at once (in
        # blocks of pairs bounded by memory): the work of one kernel_fn call per set
        imgs = (self._images(a), None if same else self._images(b))
        return batched_spatial_kernel(layer, *imgs, self.get, diag)

    def _images(self, x: Tensor) -> Tensor:
        """``(L, N, D)`` rows to ``(L, N, *input_shape)`` images."""
        flat = lh.reshape_inputs(
            x.reshape(-1, x.shape[-1]), self.input_shape, "InfiniteWidthKernel"
        )
        return flat.reshape(x.shape[:-1] + flat.shape[1:])

    def _single(self, layer: Layer, x1: Tensor, x2: Tensor, diag: bool) -> Tensor:
        same = x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))
        if diag and self.input_shape is not None:
            # k(x1_i, x2_i) of images: the N pairs (i, i) alone, one packed record
            return self._batch(layer, x1[None], x2[None], same, diag)[0]
        a = lh.reshape_inputs(x1, self.input_shape, "InfiniteWidthKernel")
        if diag:
            if same:
                return lh.kernel_diag(layer, a, self.get)
            if x1.shape[0] != x2.shape[0]:
                raise RuntimeError("InfiniteWidthKernel: diag=True needs x1 and x2 of equal size.")
            return batched_kernel(layer, x1[None], x2[None], self.get, diag)[0]
        b2 = None if same else lh.reshape_inputs(x2, self.input_shape, "InfiniteWidthKernel")
        return lh.kernel_matrix(layer, a, b2, self.get)
