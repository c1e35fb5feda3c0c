r"""Precomputed infinite-width kernels in scikit-learn pipelines, and an SVM on the NTK.

* :class:`NTKTransformer` maps inputs to their kernel against the training set,
  ``X -> k(X, X_train)`` of shape ``(M, N)`` (``k(X_train, X_train)`` when fitted), the
  input ``SVC(kernel='precomputed')``, ``KernelRidge(kernel='precomputed')`` and
  ``KernelPCA(kernel='precomputed')`` expect after it in a ``Pipeline``;
* :class:`NTKSVC` is that pipeline as one classifier: ``sklearn.svm.SVC`` with
  ``kernel='precomputed'`` on the NTK (or NNGP) of an architecture (Arora et al. 2019,
  "On exact computation with an infinitely wide neural net", use kernel SVMs on the NTK;
  Novak et al. 2019 and Lee et al. 2020, "Finite versus infinite neural networks", compare
  them with finite networks).

Both evaluate kernels through :mod:`infnets._src.ecosystem.cache`, so in a ``GridSearchCV``
over ``C`` (or the parameters of what follows the transformer) each kernel matrix is
computed once per (architecture, fold), not once per parameter combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from sklearn.base import (
        BaseEstimator,
        ClassifierMixin,
        ClassNamePrefixFeaturesOutMixin,
        TransformerMixin,
    )
    from sklearn.svm import SVC
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "infnets.sklearn needs scikit-learn: pip install 'infnets[sklearn]' (or scikit-learn)."
    ) from err

from infnets._src.ecosystem import cache as kc
from infnets._src.ecosystem.architectures import ArchSpec
from infnets._src.ecosystem.sk_common import as_tensor, check_get, estimator_layer, validate

__all__ = ["NTKTransformer", "NTKSVC"]


def _kernel_against_train(est: Any, X: Any, get: str) -> np.ndarray:  # noqa: N803
    """``k(X, X_train_)`` of a fitted estimator; ``X`` equal to the training set takes the
    symmetric (exactly symmetric, half-cost, cached at fit) evaluation."""
    who = type(est).__name__
    x = as_tensor(X, est.input_shape, who)
    train = est.X_train_
    same = X.shape == train.shape and np.array_equal(X, train)
    x2 = None if same else as_tensor(train, est.input_shape, who)
    return kc.kernels(est.layer_, x, x2, (get,))[get].numpy()


class NTKTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    r"""Inputs to their infinite-width kernel against the training set, for pipelines.

    ``fit(X)`` stores ``X``; ``transform(Z)`` returns the ``(M, N)`` matrix
    ``k(Z, X)``: the NTK ``Θ`` (Jacot et al. 2018) or the NNGP ``K`` (Lee et al. 2018) of
    the architecture. Followed by ``SVC(kernel='precomputed')`` (or any estimator taking a
    precomputed kernel), the pipeline is a kernel machine on the infinite network's
    kernel; because kernels are cached by (architecture, data), a grid search over the
    final estimator's parameters evaluates each fold's kernels once.

    Args:
        layer: an infnets architecture or the text of a ``stax`` expression
            (``"serial(Dense(512), Relu(), Dense(1))"``); ``None`` for the default
            two-hidden-layer ReLU network (:func:`infnets.sklearn.default_layer`).
        get: ``'ntk'`` or ``'nngp'``.
        input_shape: per-example shape the flat rows are reshaped into (convolutions).

    Examples:
        >>> from sklearn.datasets import load_digits
        >>> from sklearn.pipeline import make_pipeline
        >>> from sklearn.svm import SVC
        >>> from infnets.sklearn import NTKTransformer
        >>> X, y = load_digits(return_X_y=True)
        >>> pipe = make_pipeline(NTKTransformer(), SVC(kernel='precomputed', C=10.0))
        >>> pipe.fit(X[:300] / 16, y[:300]).score(X[300:400] / 16, y[300:400]) > 0.85
        True
        >>> NTKTransformer().fit(X[:300] / 16).transform(X[:5] / 16).shape
        (5, 300)
    """

    def __init__(
        self,
        layer: ArchSpec = None,
        get: str = "ntk",
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.layer = layer
        self.get = get
        self.input_shape = input_shape

    def fit(self, X: Any, y: Any = None) -> NTKTransformer:  # noqa: N803
        """Store the training inputs.

        Args:
            X: ``(N, D)`` training inputs.
            y: ignored.

        Returns:
            ``self``.
        """
        who = type(self).__name__
        X = validate(self, X, dtype=np.float64)  # noqa: N806
        check_get(self.get, who)
        self.layer_ = estimator_layer(self.layer, who)
        self.X_train_ = np.array(X, dtype=np.float64)
        self._n_features_out = self.X_train_.shape[0]
        return self

    def transform(self, X: Any) -> np.ndarray:  # noqa: N803
        """The kernel of ``X`` against the training inputs.

        Args:
            X: ``(M, D)`` inputs.

        Returns:
            ``(M, N)`` float64 kernel matrix ``k(X, X_train)``.
        """
        check_is_fitted(self)
        X = validate(self, X, reset=False, dtype=np.float64)  # noqa: N806
        return _kernel_against_train(self, X, self.get)


class NTKSVC(ClassifierMixin, BaseEstimator):
    r"""A support-vector classifier on the NTK (or NNGP) of an infinite network.

    ``sklearn.svm.SVC(kernel='precomputed')`` fitted on ``k(X, X)`` and evaluated on
    ``k(Z, X)``, with ``k`` the NTK ``Θ`` or the NNGP ``K`` of the architecture: the
    dual problem ``max_a sum a_i - 1/2 sum a_i a_j y_i y_j k(x_i, x_j)``,
    ``0 <= a_i <= C`` (one-vs-one for several classes), as in Arora et al. 2019, "On exact
    computation with an infinitely wide neural net". Kernels are cached by (architecture,
    data), so a ``GridSearchCV`` over ``C`` evaluates them once per fold.

    Args:
        layer: an infnets architecture or the text of a ``stax`` expression; ``None`` for
            :func:`infnets.sklearn.default_layer`.
        get: ``'ntk'`` or ``'nngp'``.
        C: inverse regularisation strength ``> 0`` of ``SVC``.
        class_weight: ``SVC``'s ``class_weight`` (``None``, ``'balanced'`` or a dict).
        tol: ``SVC``'s stopping tolerance.
        max_iter: ``SVC``'s iteration limit (``-1``: none).
        decision_function_shape: ``'ovr'`` or ``'ovo'`` (as ``SVC``).
        break_ties: as ``SVC``.
        input_shape: per-example shape the flat rows are reshaped into (convolutions).

    Attributes:
        svc_: the fitted ``SVC``.
        classes_: the class labels.
        n_iter_: the solver's iterations per one-vs-one problem.

    Examples:
        >>> from sklearn.datasets import load_digits
        >>> from sklearn.model_selection import GridSearchCV
        >>> from infnets.sklearn import NTKSVC
        >>> X, y = load_digits(return_X_y=True)
        >>> X = X[:240] / 16; y = y[:240]
        >>> search = GridSearchCV(NTKSVC(), {'C': [0.1, 1.0, 10.0]}, cv=3).fit(X, y)
        >>> bool(search.best_score_ > 0.85), search.best_estimator_.decision_function(X[:2]).shape
        (True, (2, 10))
    """

    def __init__(
        self,
        layer: ArchSpec = None,
        get: str = "ntk",
        C: float = 1.0,  # noqa: N803 - scikit-learn's name
        class_weight: dict[Any, float] | str | None = None,
        tol: float = 1e-3,
        max_iter: int = -1,
        decision_function_shape: str = "ovr",
        break_ties: bool = False,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.layer = layer
        self.get = get
        self.C = C
        self.class_weight = class_weight
        self.tol = tol
        self.max_iter = max_iter
        self.decision_function_shape = decision_function_shape
        self.break_ties = break_ties
        self.input_shape = input_shape

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> NTKSVC:  # noqa: N803
        """Fit the SVM on the training kernel ``k(X, X)``.

        Args:
            X: ``(N, D)`` inputs.
            y: ``(N,)`` class labels.
            sample_weight: optional ``(N,)`` per-sample weights (rescale ``C``).

        Returns:
            ``self``.
        """
        who = type(self).__name__
        X, y = validate(self, X, y, dtype=np.float64)  # noqa: N806
        check_classification_targets(y)
        check_get(self.get, who)
        self.layer_ = estimator_layer(self.layer, who)
        self.X_train_ = np.array(X, dtype=np.float64)
        k_train = _kernel_against_train(self, self.X_train_, self.get)
        self.svc_ = SVC(
            kernel="precomputed",
            C=self.C,
            class_weight=self.class_weight,
            tol=self.tol,
            max_iter=self.max_iter,
            decision_function_shape=self.decision_function_shape,
            break_ties=self.break_ties,
        ).fit(k_train, y, sample_weight=sample_weight)
        self.classes_ = self.svc_.classes_
        self.n_iter_ = self.svc_.n_iter_
        return self

    def _test_kernel(self, X: Any) -> np.ndarray:  # noqa: N803
        check_is_fitted(self)
        X = validate(self, X, reset=False, dtype=np.float64)  # noqa: N806
        return _kernel_against_train(self, X, self.get)

    def decision_function(self, X: Any) -> np.ndarray:  # noqa: N803
        """Signed distances to the separating hyperplanes (as ``SVC.decision_function``).

        Args:
            X: ``(M, D)`` inputs.

        Returns:
            ``(M,)`` for two classes, else ``(M, C)`` (``'ovr'``) or
            ``(M, C (C - 1) / 2)`` (``'ovo'``).
        """
        k_test = self._test_kernel(X)
        return self.svc_.decision_function(k_test)

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        """Class labels of ``X``.

        Args:
            X: ``(M, D)`` inputs.

        Returns:
            ``(M,)`` labels from ``classes_``.
        """
        k_test = self._test_kernel(X)
        return self.svc_.predict(k_test)

    def __sklearn_tags__(self) -> Any:  # scikit-learn >= 1.6: expected failures live in tests
        return super().__sklearn_tags__()

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {
            "_xfail_checks": {
                "check_sample_weights_invariance": (
                    "libsvm's SVC: zero sample_weight is not equivalent to removing samples"
                )
            }
        }
