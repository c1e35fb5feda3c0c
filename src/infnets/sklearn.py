r"""Infinite-width networks for scikit-learn: a kernel, estimators, a kernel transformer.

* :class:`InfiniteWidthKernel` is a ``sklearn.gaussian_process.kernels.Kernel``: the NTK
  or NNGP of an :mod:`infnets.stax` architecture, with the weight and bias standard
  deviations ``W_std``, ``b_std`` as hyper-parameters (log-scale gradients from autograd),
  so ``GaussianProcessRegressor`` fits them by maximising the marginal likelihood. It
  combines with scikit-learn kernels (``+ WhiteKernel()``, ``ConstantKernel() *``) and its
  matrices feed ``SVC(kernel='precomputed')``.
* :class:`NTKRegressor` and :class:`NNGPRegressor` predict with the infinite ensemble of
  networks trained by gradient descent on MSE (Lee et al. 2019, "Wide neural networks of
  any depth evolve as linear models under gradient descent") or with the Bayesian
  posterior of the NNGP (Lee et al. 2018, "Deep neural networks as Gaussian processes"),
  at convergence or at a finite training time ``t``.
  ``NTKRegressor(get='ntkgp')`` gives the NTK-GP of He, Lakshminarayanan & Teh 2020.
* :class:`NTKClassifier` regresses centred one-hot targets and turns the Gaussian
  posterior into class probabilities: ``P(class c has the largest output)``.
* :class:`NTKSVC` is a support-vector classifier on the NTK (``SVC(kernel='precomputed')``
  inside); :class:`NTKTransformer` turns inputs into their kernel against the training
  set, so ``make_pipeline(NTKTransformer(), SVC(kernel='precomputed'))`` works.

Kernel matrices are cached per process (:data:`kernel_cache`), keyed by the architecture's
canonical text, the kernel and a digest of the data: a ``GridSearchCV`` over parameters
that leave the kernel unchanged (``C``, ``diag_reg``) evaluates it once per (architecture,
fold). Architectures may be given as layers or as ``stax`` text, e.g.
``param_grid={'layer': ['serial(Dense(512), Relu(), Dense(1))', ...]}``; both print as the
architecture in ``best_params_``.

The estimators follow scikit-learn's conventions (``fit``/``predict``/``score``,
``get_params``/``set_params``, ``clone``, pickling, ``check_estimator``). The input kernel
is ``x . x' / d``, so standardise features first (``make_pipeline(StandardScaler(), ...)``).
Images for convolutional layers are given as flat rows with ``input_shape=(C, H, W)``.

Examples:
    >>> import numpy as np
    >>> from infnets.sklearn import NTKRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 3)); y = np.sin(X[:, 0])
    >>> reg = NTKRegressor(diag_reg=1e-3).fit(X[:30], y[:30])
    >>> reg.predict(X[30:]).shape
    (10,)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import log_ndtr
from torch import Tensor

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.gaussian_process.kernels import Hyperparameter, Kernel
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "infnets.sklearn needs scikit-learn: pip install 'infnets[sklearn]' (or scikit-learn)."
    ) from err

from infnets import predict
from infnets._src.ecosystem import architectures as arch
from infnets._src.ecosystem import cache as kc
from infnets._src.ecosystem.cache import KernelCache, kernel_cache
from infnets._src.ecosystem.sk_common import as_tensor as _as_tensor
from infnets._src.ecosystem.sk_common import check_get, default_layer, estimator_layer
from infnets._src.ecosystem.sk_common import validate as _validate
from infnets._src.ecosystem.sk_svm import NTKSVC, NTKTransformer
from infnets._src.layers import hyper as lh
from infnets._src.layers.base import Layer

__all__ = [
    "InfiniteWidthKernel",
    "NTKRegressor",
    "NNGPRegressor",
    "NTKClassifier",
    "NTKSVC",
    "NTKTransformer",
    "KernelCache",
    "kernel_cache",
    "class_probabilities",
    "default_layer",
]

#: test points per block when predicting (bounds the (M, M) test-test kernels)
PREDICT_BLOCK = 512
#: Gauss-Hermite nodes of the class-probability integral
N_QUADRATURE = 48


def _check_get(get: Any, who: str) -> str:
    return check_get(get, who, ("nngp", "ntk"))


# ===================================================================== kernel
class InfiniteWidthKernel(Kernel):
    r"""The NTK or NNGP of an infinite network as a scikit-learn kernel.

    The kernel of an :mod:`infnets.stax` architecture (``get='ntk'``: the neural
    tangent kernel ``Θ`` of Jacot et al. 2018; ``get='nngp'``: the NNGP covariance ``K``
    of Lee et al. 2018) with two hyper-parameters shared by its affine layers: the
    weight and bias standard deviations. For the NTK parameterization with ReLU the
    one-hidden-layer NNGP reads
    ``K(x, x') = W_std^2 E[relu(u) relu(u')] + b_std^2`` with
    ``(u, u') ~ N(0, W_std^2 x.x'/d + b_std^2)``, so ``W_std`` scales the kernel and
    ``b_std`` adds an offset at every layer.

    As scikit-learn requires, hyper-parameters live on a log scale: ``theta =
    log([W_std, b_std])`` and the gradient is ``dK / dlog(W_std) = W_std dK / dW_std``,
    computed by autograd through the kernel maps (``P + 1`` reverse passes for ``P``
    free hyper-parameters, see :func:`infnets._src.layers.hyper.kernel_jacobian`).

    Kernel matrices evaluated without the gradient go through the process-wide
    :data:`kernel_cache`, keyed by the architecture (with the current ``W_std``/``b_std``)
    and the content of ``X``/``Y``: ``SVC(kernel=InfiniteWidthKernel(...))`` in a
    ``GridSearchCV`` over ``C`` evaluates the kernel once per fold. Two kernels are equal
    (``k == clone(k)``) when their architectures have the same canonical text
    (:func:`infnets._src.ecosystem.architectures.architecture_key`) and their other
    parameters are equal; ``repr`` shows the architecture.

    Args:
        layer: an infnets layer, whose affine layers (``Dense``, ``Conv``) are rebuilt
            with the shared ``W_std``/``b_std`` (layers without a bias keep none), the
            text of a ``stax`` expression for such a layer (e.g.
            ``"serial(Dense(512, W_std=1.5), Relu(), Dense(1))"``), or a factory
            ``layer_fn(W_std, b_std) -> Layer`` for any other sharing pattern.
        get: ``'nngp'`` (default, as in :class:`infnets.gpytorch.InfiniteWidthKernel`:
            a kernel object is a prior covariance) or ``'ntk'``.
        W_std: weight standard deviation ``> 0``; ``None`` reads it from the first
            affine layer of ``layer`` (required with a factory).
        b_std: bias standard deviation ``> 0``; ``None`` reads it from ``layer`` (and
            means no bias hyper-parameter if no affine layer has a bias, or, with a
            factory, that the factory gets ``b_std=None``).
        W_std_bounds: ``(low, high)`` bounds of ``W_std`` or ``'fixed'``.
        b_std_bounds: ``(low, high)`` bounds of ``b_std`` or ``'fixed'``.
        input_shape: per-example shape (e.g. ``(1, 8, 8)`` for a convolution) into which
            the ``(n_samples, n_features)`` rows are reshaped; ``None`` keeps them flat.

    Examples:
        >>> import numpy as np
        >>> from sklearn.gaussian_process import GaussianProcessRegressor
        >>> from sklearn.gaussian_process.kernels import WhiteKernel
        >>> from infnets import stax
        >>> from infnets.sklearn import InfiniteWidthKernel
        >>> net = stax.serial(stax.Dense(512, W_std=1.0, b_std=0.1), stax.Relu(),
        ...                   stax.Dense(1, W_std=1.0, b_std=0.1))
        >>> kernel = InfiniteWidthKernel(net, get='nngp', b_std_bounds='fixed')
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(40, 2))
        >>> y = np.sin(2 * X[:, 0]) * X[:, 1] + 0.1 * rng.normal(size=40)
        >>> gpr = GaussianProcessRegressor(kernel + WhiteKernel(1e-2)).fit(X, y)
        >>> bool(gpr.kernel_.k1.W_std != 1.0)  # fitted by maximising the marginal likelihood
        True
    """

    def __init__(
        self,
        layer: lh.LayerSpec | str,
        get: str = lh.DEFAULT_GET,
        W_std: float | None = None,  # noqa: N803 - the papers' names
        b_std: float | None = None,
        W_std_bounds: tuple[float, float] | str = (1e-2, 1e2),  # noqa: N803
        b_std_bounds: tuple[float, float] | str = (1e-5, 1e1),
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.layer = layer
        self.get = get
        if isinstance(layer, (Layer, str)) and (W_std is None or b_std is None):
            resolved = arch.resolve_layer(layer, "InfiniteWidthKernel")
            w0, b0 = lh.read_stds(resolved, "InfiniteWidthKernel")
            W_std = w0 if W_std is None else W_std
            b_std = b0 if b_std is None else b_std
        if W_std is None:
            raise ValueError("InfiniteWidthKernel: pass W_std when layer is a factory.")
        self.W_std = W_std
        self.b_std = b_std
        self.W_std_bounds = W_std_bounds
        self.b_std_bounds = b_std_bounds
        self.input_shape = input_shape

    # --------------------------------------------------------- hyper-parameters
    @property
    def hyperparameter_W_std(self) -> Hyperparameter:  # noqa: N802 - sklearn's naming rule
        """The weight standard deviation, on a log scale."""
        return Hyperparameter("W_std", "numeric", self.W_std_bounds)

    @property
    def hyperparameter_b_std(self) -> Hyperparameter:
        """The bias standard deviation, on a log scale (fixed when there is no bias)."""
        bounds = "fixed" if self.b_std is None else self.b_std_bounds
        return Hyperparameter("b_std", "numeric", bounds)

    def _layer(self, W_std: Any, b_std: Any) -> Layer:  # noqa: N803
        spec = self.layer
        if isinstance(spec, str):
            spec = arch.resolve_layer(spec, "InfiniteWidthKernel")
        return lh.build_layer(spec, W_std, b_std, "InfiniteWidthKernel")

    def _inputs(self, X: Any) -> Tensor:  # noqa: N803
        return _as_tensor(X, self.input_shape, "InfiniteWidthKernel")

    # --------------------------------------------------------- kernel protocol
    def __call__(
        self,
        X: Any,  # noqa: N803 - scikit-learn's argument names
        Y: Any = None,  # noqa: N803
        eval_gradient: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The kernel matrix ``k(X, Y)`` and, optionally, its log-hyper-parameter gradient.

        Args:
            X: ``(N1, D)`` inputs.
            Y: ``(N2, D)`` inputs, or ``None`` for ``Y = X``.
            eval_gradient: also return the gradient (only with ``Y=None``).

        Returns:
            The ``(N1, N2)`` kernel; with ``eval_gradient``, also the ``(N1, N1, P)``
            gradient in the ``P`` non-fixed hyper-parameters' logarithms
            (order of ``self.hyperparameters``: ``W_std``, ``b_std``).
        """
        get = _check_get(self.get, "InfiniteWidthKernel")
        x = self._inputs(X)
        if not eval_gradient:
            y = None if Y is None else self._inputs(Y)
            layer = self._layer(float(self.W_std), _float_or_none(self.b_std))
            return kc.kernels(layer, x, y, (get,))[get].numpy()
        if Y is not None:
            raise ValueError("Gradient can only be evaluated when Y is None.")
        has_b = self.b_std is not None
        values = torch.tensor(
            [float(self.W_std), float(self.b_std) if self.b_std is not None else 1.0],
            dtype=torch.float64,
        )

        def fn(p: Tensor) -> Tensor:
            return lh.kernel_matrix(self._layer(p[0], p[1] if has_b else None), x, None, get)

        k, jac = lh.kernel_jacobian(fn, values)
        cols = []
        for j, hp in enumerate(self.hyperparameters):  # alphabetical: W_std, b_std
            if not hp.fixed:
                cols.append(jac[..., j] * values[j])  # d/dlog(v) = v d/dv
        grad = torch.stack(cols, -1) if cols else k.new_empty(tuple(k.shape) + (0,))
        return k.numpy(), grad.numpy()

    def diag(self, X: Any) -> np.ndarray:  # noqa: N803
        """``k(x_i, x_i)`` for every row of ``X``, shape ``(N,)``, without the full matrix."""
        get = _check_get(self.get, "InfiniteWidthKernel")
        layer = self._layer(self.W_std, self.b_std)
        return lh.kernel_diag(layer, self._inputs(X), get).numpy()

    def is_stationary(self) -> bool:
        """False: network kernels depend on the inputs' norms, not only on ``x - x'``."""
        return False

    @property
    def requires_vector_input(self) -> bool:
        """True: inputs are numeric feature vectors."""
        return True

    def __eq__(self, other: object) -> bool:
        """Equal type and parameters; architectures compare by their canonical text."""
        if type(self) is not type(other):
            return False
        assert isinstance(other, InfiniteWidthKernel)
        mine, theirs = self.get_params(), other.get_params()
        if set(mine) != set(theirs):
            return False
        for key, value in mine.items():
            if key == "layer":
                if not arch.same_architecture(value, theirs[key]):
                    return False
            elif np.any(value != theirs[key]):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable parameters, like sklearn's kernels

    def __repr__(self) -> str:
        b = "None" if self.b_std is None else f"{float(self.b_std):.3g}"
        return (
            f"InfiniteWidthKernel({arch.describe(self.layer)}, get={self.get!r}, "
            f"W_std={float(self.W_std):.3g}, b_std={b})"
        )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


# ================================================================= estimators
class _InfiniteWidthEstimator(BaseEstimator):
    """Shared fit/predict machinery of the estimators (kernels, solves, caching)."""

    _fixed_get: str | None = None
    _gets: tuple[str, ...] = ("nngp", "ntk", "ntkgp")

    # subclasses define (or inherit) an explicit __init__ (scikit-learn introspects it)
    layer: Layer | str | None
    diag_reg: float
    diag_reg_absolute_scale: bool
    t: float | None
    learning_rate: float
    input_shape: Sequence[int] | None

    def _get(self) -> str:
        if self._fixed_get is not None:
            return self._fixed_get
        return check_get(getattr(self, "get", "ntk"), type(self).__name__, self._gets)

    def _fit_targets(self, X: Any, targets: np.ndarray) -> None:  # noqa: N803
        name = type(self).__name__
        self._get()  # validates ``get``
        if self.t is not None and not (float(self.t) >= 0):
            raise ValueError(f"{name}: t must be None (convergence) or a time >= 0.")
        self.layer_ = estimator_layer(self.layer, name)
        self.X_train_ = np.array(X, dtype=np.float64)
        self.targets_ = np.array(targets, dtype=np.float64)
        self._cache: dict[str, Any] = {}
        self._predictor()  # factorize now: errors surface in fit

    def _names(self) -> tuple[str, ...]:
        """The kernels the posterior of ``get`` needs (NNGP, both, or the NTK alone)."""
        return {"nngp": ("nngp",), "ntk": ("nngp", "ntk"), "ntkgp": ("ntk",)}[self._get()]

    def _predictor(self) -> Any:
        """The cached ``predict`` closure (rebuilt after unpickling)."""
        cache = getattr(self, "_cache", None)
        if cache is None:
            cache = self._cache = {}
        if "fn" in cache:
            return cache["fn"]
        x = _as_tensor(self.X_train_, self.input_shape, type(self).__name__)
        y = torch.as_tensor(self.targets_)
        if self.t is not None:
            # the NTK-GP ensemble at time t: prior covariance and training kernel both the NTK
            alias = {"nngp": "ntk"} if self._get() == "ntkgp" else None
            cache["fn"] = predict.gradient_descent_mse_ensemble(
                kc.caching_kernel_fn(self.layer_, alias=alias),
                x,
                y,
                learning_rate=self.learning_rate,
                diag_reg=self.diag_reg,
                diag_reg_absolute_scale=self.diag_reg_absolute_scale,
            )
        else:
            k_train = kc.caching_kernel_fn(self.layer_)(x, None, self._names())
            cache["fn"] = predict.gp_inference(
                k_train, y, self.diag_reg, self.diag_reg_absolute_scale
            )
        return cache["fn"]

    def _posterior(self, X: Any, want_var: bool) -> tuple[np.ndarray, np.ndarray | None]:  # noqa: N803
        """Posterior mean ``(M, k)`` and variance ``(M,)`` (shared by the outputs)."""
        check_is_fitted(self)
        X = _validate(self, X, reset=False, dtype=np.float64)  # noqa: N806
        x = _as_tensor(X, self.input_shape, type(self).__name__)
        fn = self._predictor()
        get = self._get()
        kernel_fn = kc.caching_kernel_fn(self.layer_)
        x_train = _as_tensor(self.X_train_, self.input_shape, type(self).__name__)
        names = self._names()
        test_names = ("ntk",) if get == "ntkgp" else ("nngp",)
        means, variances = [], []
        for lo in range(0, x.shape[0], PREDICT_BLOCK):
            xb = x[lo : lo + PREDICT_BLOCK]
            if self.t is not None:
                t_get = "ntk" if get == "ntkgp" else get
                out = fn(t=float(self.t), x_test=xb, get=t_get, compute_cov=want_var)
            else:
                k_tt = kernel_fn(xb, None, test_names) if want_var else None
                out = fn(get, kernel_fn(xb, x_train, names), k_tt)
            if want_var:
                means.append(out.mean)
                variances.append(out.covariance.diagonal().clamp_min(0.0))
            else:
                means.append(out)
        mean = torch.cat(means).reshape(x.shape[0], -1).numpy()
        var = torch.cat(variances).numpy() if want_var else None
        return mean, var

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_cache", None)  # closures do not pickle; rebuilt on first use
        return state


class _Regressor(RegressorMixin, _InfiniteWidthEstimator):
    """The regressors' shared parameters, ``fit`` and ``predict`` (they differ in ``get``)."""

    def __init__(
        self,
        layer: Layer | str | None = None,
        diag_reg: float = 1e-4,
        diag_reg_absolute_scale: bool = False,
        t: float | None = None,
        learning_rate: float = 1.0,
        normalize_y: bool = False,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.layer = layer
        self.diag_reg = diag_reg
        self.diag_reg_absolute_scale = diag_reg_absolute_scale
        self.t = t
        self.learning_rate = learning_rate
        self.normalize_y = normalize_y
        self.input_shape = input_shape

    def fit(self, X: Any, y: Any) -> _Regressor:  # noqa: N803
        """Store the training set and factorize its kernel.

        Args:
            X: ``(N, D)`` inputs.
            y: ``(N,)`` or ``(N, k)`` targets.

        Returns:
            ``self``.
        """
        X, y = _validate(  # noqa: N806
            self, X, y, multi_output=True, y_numeric=True, dtype=np.float64
        )
        y2 = y.reshape(len(y), -1).astype(np.float64)
        if self.normalize_y:
            self._y_mean = y2.mean(0)
            self._y_std = np.where(y2.std(0) > 0, y2.std(0), 1.0)
        else:
            self._y_mean = np.zeros(y2.shape[1])
            self._y_std = np.ones(y2.shape[1])
        self._y_1d = y.ndim == 1
        self._fit_targets(X, (y2 - self._y_mean) / self._y_std)
        return self

    def predict(
        self,
        X: Any,
        return_std: bool = False,  # noqa: N803
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior mean (and standard deviation) at ``X``.

        Args:
            X: ``(M, D)`` inputs.
            return_std: also return the posterior standard deviation of each output.

        Returns:
            ``(M,)`` or ``(M, k)`` means (like the targets); with ``return_std`` also the
            standard deviations, of the same shape.
        """
        mean, var = self._posterior(X, return_std)
        mean = mean * self._y_std + self._y_mean
        if self._y_1d:
            mean = mean[:, 0]
        if not return_std:
            return mean
        assert var is not None
        std = np.sqrt(var)[:, None] * self._y_std
        return mean, (std[:, 0] if self._y_1d else std)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"multioutput": True}


class NTKRegressor(_Regressor):
    r"""Regression with the infinite ensemble of networks trained by gradient descent.

    With NTK ``Θ``, NNGP ``K`` and ridge ``λ``, the mean prediction of infinitely wide
    networks trained on ``1/2 sum (f(X) - Y)^2`` to convergence is
    ``μ(x) = Θ(x, X) (Θ(X, X) + λ I)^{-1} Y`` (Lee et al. 2019, eq. 16); at a finite
    time ``t`` (steps of size ``learning_rate``) the factor ``(I - exp(-lr Θ t))``
    enters (:func:`infnets.predict.gradient_descent_mse_ensemble`). The standard
    deviation is over random initialisations:

    * ``get='ntk'``: the ensemble of standard initialisations (prior covariance ``K``),
      ``σ^2 = K(x, x) - 2 A K(X, x) + A K_r A^T`` with ``A = Θ(x, X) Θ_r^{-1}``;
    * ``get='ntkgp'``: the NTK-GP of He, Lakshminarayanan & Teh 2020, "Bayesian deep
      ensembles via the neural tangent kernel": each member's initial function gets a
      randomised addition that makes its prior covariance ``Θ``, so the trained
      ensemble is the GP posterior with the NTK as prior,
      ``σ^2 = Θ(x, x) - Θ(x, X) Θ_r^{-1} Θ(X, x)`` (same mean); at a finite ``t``, the
      same ensemble after time ``t``.

    Args:
        layer: an infnets architecture or the text of a ``stax`` expression;
            ``None`` for :func:`default_layer`.
        get: ``'ntk'`` or ``'ntkgp'``.
        diag_reg: ridge, relative to the kernel's mean diagonal unless
            ``diag_reg_absolute_scale``.
        diag_reg_absolute_scale: treat ``diag_reg`` as absolute.
        t: training time (``None``: trained to convergence).
        learning_rate: step size that ``t`` counts (only with ``t``).
        normalize_y: standardise the targets (and undo it on prediction).
        input_shape: per-example shape the flat rows are reshaped into (convolutions).

    Examples:
        >>> import numpy as np
        >>> from infnets.sklearn import NTKRegressor
        >>> X = np.linspace(-1, 1, 30)[:, None]; y = X[:, 0] ** 2
        >>> NTKRegressor(diag_reg=1e-4).fit(X, y).score(X, y) > 0.99
        True
        >>> _, std = NTKRegressor(get='ntkgp').fit(X, y).predict(X[:2], return_std=True)
        >>> std.shape
        (2,)
    """

    _gets = ("ntk", "ntkgp")

    def __init__(
        self,
        layer: Layer | str | None = None,
        get: str = "ntk",
        diag_reg: float = 1e-4,
        diag_reg_absolute_scale: bool = False,
        t: float | None = None,
        learning_rate: float = 1.0,
        normalize_y: bool = False,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.layer = layer
        self.get = get
        self.diag_reg = diag_reg
        self.diag_reg_absolute_scale = diag_reg_absolute_scale
        self.t = t
        self.learning_rate = learning_rate
        self.normalize_y = normalize_y
        self.input_shape = input_shape


class NNGPRegressor(_Regressor):
    r"""Exact Bayesian regression with the NNGP kernel of an infinite network.

    The Gaussian-process posterior of the network prior (Lee et al. 2018):
    ``μ(x) = K(x, X) (K(X, X) + λ I)^{-1} Y``,
    ``σ^2(x) = K(x, x) - K(x, X) (K(X, X) + λ I)^{-1} K(X, x)``; with a finite time ``t``,
    the ensemble of networks whose readout layer alone is trained for ``t`` steps.

    Args:
        layer: an infnets architecture or the text of a ``stax`` expression;
            ``None`` for :func:`default_layer`.
        diag_reg: observation-noise variance, relative to the kernel's mean diagonal
            unless ``diag_reg_absolute_scale``.
        diag_reg_absolute_scale: treat ``diag_reg`` as absolute.
        t: training time of the readout (``None``: the posterior).
        learning_rate: step size that ``t`` counts (only with ``t``).
        normalize_y: standardise the targets (and undo it on prediction).
        input_shape: per-example shape the flat rows are reshaped into (convolutions).

    Examples:
        >>> import numpy as np
        >>> from infnets.sklearn import NNGPRegressor
        >>> X = np.linspace(-1, 1, 30)[:, None]; y = X[:, 0] ** 2
        >>> mean, std = NNGPRegressor().fit(X, y).predict(X[:3], return_std=True)
        >>> mean.shape, std.shape
        ((3,), (3,))
    """

    _fixed_get = "nngp"


def class_probabilities(
    mean: np.ndarray, var: np.ndarray, n_nodes: int = N_QUADRATURE
) -> np.ndarray:
    r"""``P(f_c = max_j f_j)`` for independent outputs ``f_j ~ N(mean_j, var)``.

    With a shared variance ``s^2`` and ``z ~ N(0, 1)``,
    ``P_c = E_z[prod_{j != c} Phi((m_c - m_j) / s + z)]``, a one-dimensional integral
    evaluated by Gauss-Hermite quadrature in log space; rows are renormalised to
    sum to one. A zero variance gives the one-hot of the largest mean.

    Args:
        mean: ``(M, C)`` posterior means.
        var: ``(M,)`` posterior variances (shared by the ``C`` outputs).
        n_nodes: quadrature nodes.

    Returns:
        ``(M, C)`` probabilities.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    log_w = np.log(weights / math.sqrt(2 * math.pi))
    s = np.sqrt(np.maximum(var, 0.0))
    scale = np.maximum(np.abs(mean).max(axis=1), 1.0)
    s = np.maximum(s, 1e-12 * scale)[:, None, None]
    diff = (mean[:, :, None] - mean[:, None, :]) / s  # (M, C, C): (m_c - m_j) / s
    log_phi = log_ndtr(diff[..., None] + nodes)  # (M, C, C, Q)
    c = mean.shape[1]
    log_phi[:, np.arange(c), np.arange(c), :] = 0.0  # j == c contributes no factor
    log_p = log_phi.sum(axis=2) + log_w  # (M, C, Q)
    peak = log_p.max(axis=(1, 2), keepdims=True)
    p = np.exp(log_p - peak).sum(axis=2)
    return p / p.sum(axis=1, keepdims=True)


class NTKClassifier(ClassifierMixin, _InfiniteWidthEstimator):
    r"""Classification by regression of centred one-hot targets with an infinite network.

    Targets are ``e_y - 1/C`` for ``C`` classes; the outputs' posterior (NTK ensemble
    with ``get='ntk'``, NNGP posterior with ``get='nngp'``, NTK-GP posterior of He et al.
    2020 with ``get='ntkgp'``, see :class:`NTKRegressor`) is Gaussian with a variance
    shared by the classes, ``f_c(x) ~ N(μ_c(x), σ^2(x))`` independently, so
    ``predict_proba`` gives ``P(f_c(x) is the largest)`` (see
    :func:`class_probabilities`) and ``predict`` the class of the largest mean
    (Novak et al. 2019; Arora et al. 2019, "On exact computation with an infinitely
    wide neural net").

    Args:
        layer: an infnets architecture or the text of a ``stax`` expression;
            ``None`` for :func:`default_layer`.
        get: ``'ntk'`` (trained ensemble), ``'nngp'`` (Bayesian posterior) or
            ``'ntkgp'`` (the NTK-GP ensemble).
        diag_reg: ridge, relative to the kernel's mean diagonal unless
            ``diag_reg_absolute_scale``.
        diag_reg_absolute_scale: treat ``diag_reg`` as absolute.
        t: training time (``None``: convergence).
        learning_rate: step size that ``t`` counts (only with ``t``).
        input_shape: per-example shape the flat rows are reshaped into, e.g.
            ``(1, 8, 8)`` for digit images and a convolutional ``layer``.

    Examples:
        >>> from sklearn.datasets import load_digits
        >>> from infnets.sklearn import NTKClassifier
        >>> X, y = load_digits(return_X_y=True)
        >>> clf = NTKClassifier().fit(X[:300] / 16, y[:300])
        >>> clf.score(X[300:400] / 16, y[300:400]) > 0.8
        True
    """

    def __init__(
        self,
        layer: Layer | str | None = None,
        get: str = "ntk",
        diag_reg: float = 1e-4,
        diag_reg_absolute_scale: bool = False,
        t: float | None = None,
        learning_rate: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.layer = layer
        self.get = get
        self.diag_reg = diag_reg
        self.diag_reg_absolute_scale = diag_reg_absolute_scale
        self.t = t
        self.learning_rate = learning_rate
        self.input_shape = input_shape

    def fit(self, X: Any, y: Any) -> NTKClassifier:  # noqa: N803
        """Store the training set, encode the labels, factorize the kernel.

        Args:
            X: ``(N, D)`` inputs.
            y: ``(N,)`` class labels.

        Returns:
            ``self``.
        """
        X, y = _validate(self, X, y, dtype=np.float64)  # noqa: N806
        check_classification_targets(y)
        self.classes_, idx = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"NTKClassifier needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {self.classes_[0]!r}."
            )
        targets = np.full((len(y), n_classes), -1.0 / n_classes)
        targets[np.arange(len(y)), idx] += 1.0
        self._fit_targets(X, targets)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:  # noqa: N803
        """``(M, C)`` probabilities that each class has the largest output.

        Args:
            X: ``(M, D)`` inputs.

        Returns:
            ``(M, C)`` probabilities, columns in the order of ``classes_``.
        """
        mean, var = self._posterior(X, want_var=True)
        assert var is not None
        return class_probabilities(mean, var)

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        """``(M,)`` labels of the largest posterior mean output.

        Args:
            X: ``(M, D)`` inputs.

        Returns:
            ``(M,)`` labels from ``classes_``.
        """
        mean, _ = self._posterior(X, want_var=False)
        return self.classes_[np.argmax(mean, axis=1)]
