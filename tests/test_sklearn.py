"""Tests of infnets.sklearn: the kernel, its gradients, GPR fitting, the estimators."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import WhiteKernel
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from infnets import predict, stax
from infnets._src.layers.hyper import affine_layers, kernel_jacobian, with_stds
from infnets.sklearn import (
    NTKSVC,
    InfiniteWidthKernel,
    NNGPRegressor,
    NTKClassifier,
    NTKRegressor,
    NTKTransformer,
    class_probabilities,
    kernel_cache,
)


def _net(w: float = 1.2, b: float = 0.3):
    return stax.serial(
        stax.Dense(64, W_std=w, b_std=b),
        stax.Relu(),
        stax.Dense(64, W_std=w, b_std=b),
        stax.Erf(),
        stax.Dense(1, W_std=w, b_std=b),
    )


def _data(n: int = 30, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.05 * rng.normal(size=n)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny kernels: one thread avoids inter-thread synchronisation overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- estimator checks
def _expected_failures(estimator):  # type: ignore[no-untyped-def]
    if isinstance(estimator, NTKSVC):  # inherited from libsvm; sklearn marks SVC the same way
        reason = "SVC: sample_weight is not equivalent to removing/repeating samples."
        return {"check_sample_weight_equivalence_on_dense_data": reason}
    return {}


_CHECKED = [
    NTKRegressor(),
    NTKRegressor(get="ntkgp"),
    NNGPRegressor(),
    NTKClassifier(),
    NTKSVC(),
    NTKTransformer(),
]
if "expected_failed_checks" in inspect.signature(parametrize_with_checks).parameters:
    _checks = parametrize_with_checks(_CHECKED, expected_failed_checks=_expected_failures)
else:  # scikit-learn < 1.6: NTKSVC declares it in its _xfail_checks tag
    _checks = parametrize_with_checks(_CHECKED)


@_checks
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


# --------------------------------------------------------------------- the kernel
def test_kernel_matches_kernel_fn_and_diag():
    x, _ = _data(20)
    y, _ = _data(7, seed=1)
    for get in ("nngp", "ntk"):
        k = InfiniteWidthKernel(_net(), get=get)
        ref = _net().kernel_fn(torch.as_tensor(x), torch.as_tensor(y), get).numpy()
        np.testing.assert_allclose(k(x, y), ref, rtol=1e-12)
        np.testing.assert_allclose(k.diag(x), np.diag(k(x)), rtol=1e-10)
    assert not k.is_stationary()
    assert k.requires_vector_input


def test_kernel_reads_and_shares_stds():
    k = InfiniteWidthKernel(_net(1.3, 0.2))
    assert (k.W_std, k.b_std) == (1.3, 0.2)
    assert [h.name for h in k.hyperparameters] == ["W_std", "b_std"]
    np.testing.assert_allclose(k.theta, np.log([1.3, 0.2]))
    layer = with_stds(_net(), 0.7, 0.1)
    assert all((a.W_std, a.b_std) == (0.7, 0.1) for a in affine_layers(layer))
    mixed = stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))
    with pytest.warns(UserWarning, match="different W_std"):
        k2 = InfiniteWidthKernel(mixed)
    assert (k2.W_std, k2.b_std) == (1.5, 0.1)
    shared = with_stds(mixed, 2.0, 0.5)
    assert [a.b_std for a in affine_layers(shared)] == [0.5, None]  # no bias stays no bias


def test_kernel_clone_and_fixed_bounds():
    k = InfiniteWidthKernel(_net(), W_std=1.1, b_std=0.2, b_std_bounds="fixed")
    assert k.n_dims == 1
    c = clone(k)
    assert c.get_params()["W_std"] == 1.1 and c.b_std == 0.2
    k2 = k.clone_with_theta(np.log([2.0]))
    assert k2.W_std == pytest.approx(2.0) and k2.b_std == 0.2
    x, _ = _data(10)
    _, grad = k(x, eval_gradient=True)
    assert grad.shape == (10, 10, 1)


def test_no_bias_layer_has_fixed_b_std():
    net = stax.serial(stax.Dense(16, W_std=1.4), stax.Relu(), stax.Dense(1, W_std=1.4))
    k = InfiniteWidthKernel(net)
    assert k.b_std is None and k.n_dims == 1
    x, _ = _data(8)
    kx, grad = k(x, eval_gradient=True)
    assert grad.shape == (8, 8, 1)
    # the NNGP of a bias-free ReLU network is homogeneous of degree 2 in W_std
    np.testing.assert_allclose(grad[..., 0], 4 * kx, rtol=1e-9)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_gradient_matches_finite_differences(get):
    x, _ = _data(12)
    k = InfiniteWidthKernel(_net(), get=get, W_std=1.3, b_std=0.4)
    value, grad = k(x, eval_gradient=True)
    np.testing.assert_allclose(value, k(x), rtol=1e-7)
    assert grad.shape == (12, 12, 2)
    # plain evaluations take the fused (no-autograd) kernel maps, which may round
    # differently from the autograd path; a step of 1e-4 keeps such noise far below rtol
    eps = 1e-4
    for j in range(2):
        up, down = k.theta.copy(), k.theta.copy()
        up[j] += eps
        down[j] -= eps
        fd = (k.clone_with_theta(up)(x) - k.clone_with_theta(down)(x)) / (2 * eps)
        np.testing.assert_allclose(grad[..., j], fd, rtol=1e-4, atol=1e-7)


def test_kernel_jacobian_helper():
    p = torch.tensor([2.0, 3.0], dtype=torch.float64)
    k, j = kernel_jacobian(lambda q: torch.stack([q[0] ** 2, q[0] * q[1]]), p)
    torch.testing.assert_close(k, torch.tensor([4.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(j, torch.tensor([[4.0, 0.0], [3.0, 2.0]], dtype=torch.float64))


def test_factory_layer_fn():
    def layer_fn(W_std, b_std):  # noqa: N803
        return stax.serial(stax.Dense(32, W_std=W_std, b_std=b_std), stax.Relu(),
                           stax.Dense(1, W_std=1.0, b_std=b_std))  # fmt: skip

    k = InfiniteWidthKernel(layer_fn, get="nngp", W_std=1.5, b_std=0.2)
    x, _ = _data(6)
    ref = layer_fn(1.5, 0.2).kernel_fn(torch.as_tensor(x), None, "nngp").numpy()
    np.testing.assert_allclose(k(x), ref, rtol=1e-12)
    _, grad = k(x, eval_gradient=True)
    assert grad.shape == (6, 6, 2)
    with pytest.raises(ValueError, match="pass W_std"):
        InfiniteWidthKernel(layer_fn)


def test_gpr_optimises_log_marginal_likelihood():
    x, y = _data(40)
    kernel = InfiniteWidthKernel(_net(), get="nngp", W_std=0.3, b_std=2.0) + WhiteKernel(1e-2)
    fixed = GaussianProcessRegressor(kernel, optimizer=None).fit(x, y)
    fitted = GaussianProcessRegressor(kernel, n_restarts_optimizer=0, random_state=0).fit(x, y)
    lml0 = fixed.log_marginal_likelihood_value_
    lml1 = fitted.log_marginal_likelihood_value_
    assert lml1 > lml0 + 5.0
    params = fitted.kernel_.get_params()
    assert params["k1__W_std"] != pytest.approx(0.3)
    # its predictions are the NNGP posterior of predict.gp_inference with the fitted values
    k1, noise = fitted.kernel_.k1, fitted.kernel_.k2.noise_level
    net = with_stds(_net(), k1.W_std, k1.b_std)
    xt = torch.as_tensor(x)
    pf = predict.gp_inference(
        net.kernel_fn(xt, None, "nngp"), torch.as_tensor(y)[:, None],
        diag_reg=noise + 1e-10, diag_reg_absolute_scale=True,
    )  # fmt: skip
    mean = pf("nngp", net.kernel_fn(xt[:5], xt, "nngp"))[:, 0].numpy()
    np.testing.assert_allclose(fitted.predict(x[:5]), mean, rtol=1e-6, atol=1e-8)


def test_precomputed_kernel_in_svc():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / x.std()
    kernel = InfiniteWidthKernel(_net(), get="ntk")
    k_train = kernel(x[:300])
    k_test = kernel(x[300:500], x[:300])
    svc = SVC(kernel="precomputed", C=10.0).fit(k_train, y[:300])
    assert svc.score(k_test, y[300:500]) > 0.8


# ------------------------------------------------------------------- estimators
def test_regressors_match_predict():
    x, y = _data(30)
    net = _net()
    xt = torch.as_tensor(x)
    k = net.kernel_fn(xt, None, ("nngp", "ntk"))
    kx = net.kernel_fn(xt[:6], xt, ("nngp", "ntk"))
    kxx = net.kernel_fn(xt[:6], None, ("nngp", "ntk"))
    pf = predict.gp_inference(k, torch.as_tensor(y)[:, None], diag_reg=1e-3)
    for est, get in ((NTKRegressor(net, diag_reg=1e-3), "ntk"),
                     (NNGPRegressor(net, diag_reg=1e-3), "nngp")):  # fmt: skip
        mean, std = est.fit(x, y).predict(x[:6], return_std=True)
        ref = pf(get, kx, kxx)
        np.testing.assert_allclose(mean, ref.mean[:, 0].numpy(), rtol=1e-9)
        np.testing.assert_allclose(std, ref.covariance.diagonal().sqrt().numpy(), rtol=1e-6)


def test_finite_time_and_normalize_y():
    x, y = _data(30)
    y = 10.0 + 3.0 * y
    early = NTKRegressor(_net(), t=1e-7, normalize_y=True).fit(x, y)
    late = NTKRegressor(_net(), t=1e6, normalize_y=True).fit(x, y)
    inf = NTKRegressor(_net(), normalize_y=True).fit(x, y)
    # at t ~ 0 the ensemble mean is the prior mean: the targets' mean
    np.testing.assert_allclose(early.predict(x[:4]), y.mean(), rtol=1e-3)
    np.testing.assert_allclose(late.predict(x[:4]), inf.predict(x[:4]), rtol=1e-6)
    assert inf.score(x, y) > 0.99
    y2 = np.stack([y, -y], 1)
    assert NNGPRegressor(_net()).fit(x, y2).predict(x[:3]).shape == (3, 2)


def test_classifier_on_digits_fc_and_conv():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / x.std()
    clf = NTKClassifier(_net(), diag_reg=1e-3).fit(x[:300], y[:300])
    assert clf.score(x[300:450], y[300:450]) > 0.85
    proba = clf.predict_proba(x[300:320])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-10)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(1)], clf.predict(x[300:320]))
    if not hasattr(stax, "Conv"):
        pytest.skip("stax.Conv not available")
    conv = stax.serial(stax.Conv(8, (3, 3), padding="SAME", W_std=1.5, b_std=0.1), stax.Relu(),
                       stax.Flatten(), stax.Dense(1, W_std=1.5, b_std=0.1))  # fmt: skip
    cnn = NTKClassifier(conv, get="nngp", input_shape=(1, 8, 8)).fit(x[:200], y[:200])
    assert cnn.score(x[300:400], y[300:400]) > 0.8


def test_classifier_labels_and_errors():
    x, _ = _data(20)
    labels = np.array(["cat", "dog"])[np.arange(20) % 2]
    clf = NTKClassifier(_net()).fit(x, labels)
    assert set(clf.predict(x)) <= {"cat", "dog"}
    np.testing.assert_array_equal(clf.predict(x), labels)  # interpolates the training set
    with pytest.raises(ValueError, match="at least 2 classes"):
        NTKClassifier(_net()).fit(x, np.zeros(20))
    with pytest.raises(ValueError, match="get must be"):
        NTKClassifier(_net(), get="bad").fit(x, labels)


def test_class_probabilities_match_monte_carlo():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, 4))
    var = np.array([0.0, 0.1, 1.0, 4.0, 25.0])
    p = class_probabilities(mean, var)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_array_equal(p[0], np.eye(4)[mean[0].argmax()])
    z = rng.normal(size=(200_000, 1, 4))
    samples = mean[None] + np.sqrt(var)[None, :, None] * z
    mc = np.stack([(samples.argmax(-1) == c).mean(0) for c in range(4)], -1)
    np.testing.assert_allclose(p, mc, atol=5e-3)
    np.testing.assert_array_equal(p.argmax(1), mean.argmax(1))


def test_estimator_pickle_roundtrip():
    import pickle

    x, y = _data(20)
    reg = NTKRegressor(_net()).fit(x, y)
    again = pickle.loads(pickle.dumps(reg))
    np.testing.assert_allclose(again.predict(x[:3]), reg.predict(x[:3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone(reg)


# ------------------------------------------- grid searches, the kernel cache, the SVM
def _digits(n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    keep = y < 3  # three classes: small folds still hold every class
    return (x[keep][:n] - 8.0) / 8.0, y[keep][:n]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts every kernel evaluation of every infnets layer (``layer.kernel_fn(...)`` and
    ``layer(...)`` both call ``Layer._kernel_fn``)."""
    from infnets._src.layers.base import Layer

    calls = []
    original = Layer._kernel_fn

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Layer, "_kernel_fn", counting)
    kernel_cache.clear()
    yield calls
    kernel_cache.clear()


def _svm_searchers() -> dict[str, object]:
    from sklearn.pipeline import Pipeline

    return {
        "NTKSVC": (NTKSVC(_net()), "C"),
        "pipeline": (
            Pipeline([("k", NTKTransformer(_net())), ("svc", SVC(kernel="precomputed"))]),
            "svc__C",
        ),
        "callable kernel": (SVC(kernel=InfiniteWidthKernel(_net(), get="ntk")), "C"),
    }


@pytest.mark.parametrize("how", ["NTKSVC", "pipeline", "callable kernel"])
def test_grid_search_over_c_evaluates_each_kernel_once_per_fold(how, kernel_calls):
    from sklearn.model_selection import GridSearchCV

    x, y = _digits()
    est, name = _svm_searchers()[how]
    grid = {name: [0.01, 0.1, 1.0, 10.0]}
    search = GridSearchCV(est, grid, cv=3).fit(x, y)
    # per fold one train kernel and one test kernel, whatever the number of C values;
    # then one train kernel for the refit on all the data
    assert len(kernel_calls) == 3 * 2 + 1
    assert search.best_score_ > 0.9
    hits = kernel_cache.info().hits
    assert hits == 3 * (len(grid[name]) - 1) * 2  # every other (C, fold) reads the cache

    # with the cache off every (C, fold) evaluates both kernels again
    kernel_calls.clear()
    kernel_cache.max_bytes = 0
    try:
        again = GridSearchCV(clone(est), grid, cv=3).fit(x, y)
    finally:
        kernel_cache.max_bytes = 256 * 2**20
    assert len(kernel_calls) == 4 * 3 * 2 + 1
    np.testing.assert_array_equal(
        again.cv_results_["mean_test_score"], search.cv_results_["mean_test_score"]
    )


def test_grid_over_architectures_given_as_text(kernel_calls):
    from sklearn.model_selection import GridSearchCV

    x, y = _digits()
    shallow = "serial(Dense(64, W_std=1.5, b_std=0.05), Relu(), Dense(1, W_std=1.5))"
    deep = (
        "serial(Dense(64, W_std=1.5, b_std=0.05), Relu(), Dense(64, W_std=1.5, b_std=0.05), "
        "Relu(), Dense(64, W_std=1.5, b_std=0.05), Relu(), Dense(1, W_std=1.5))"
    )
    grid = {"layer": [shallow, deep], "C": [0.1, 1.0, 10.0]}
    search = GridSearchCV(NTKSVC(), grid, cv=3).fit(x, y)
    assert len(kernel_calls) == 2 * 3 * 2 + 1  # per (architecture, fold), then the refit
    params = search.cv_results_["params"]
    assert {str(p["layer"]) for p in params} == {shallow, deep}
    assert search.best_params_["layer"] in (shallow, deep)
    assert search.best_estimator_.layer == search.best_params_["layer"]
    assert "NTKSVC(layer='serial(Dense(64" in repr(search.best_estimator_)
    # the same architectures given as layers print as distinct architectures too
    by_layer = GridSearchCV(NTKSVC(), {"layer": [_net(), _net(0.7, 0.1)]}, cv=2).fit(x, y)
    texts = {repr(p["layer"]) for p in by_layer.cv_results_["params"]}
    assert len(texts) == 2 and all(t.startswith("serial(Dense(") for t in texts)


def test_kernel_equality_repr_and_text_architectures():
    text = "serial(Dense(64, W_std=1.2, b_std=0.3), Relu(), Dense(1, W_std=1.2, b_std=0.3))"
    net = stax.serial(stax.Dense(64, W_std=1.2, b_std=0.3), stax.Relu(),
                      stax.Dense(1, W_std=1.2, b_std=0.3))  # fmt: skip
    k = InfiniteWidthKernel(net, get="ntk")
    assert k == clone(k) and clone(k) == k
    assert k == InfiniteWidthKernel(text, get="ntk")  # the same architecture as text
    assert k != InfiniteWidthKernel(net, get="nngp")
    assert k != InfiniteWidthKernel(_net(1.2, 0.3), get="ntk")  # another depth
    assert k != InfiniteWidthKernel(net, get="ntk", W_std=1.3)
    assert "serial(Dense(out_dim=64" in repr(k) and "get='ntk'" in repr(k)
    assert repr(k) != repr(InfiniteWidthKernel(_net(1.2, 0.3), get="ntk"))
    # the text builds the same kernel as the layer, and reads its stds
    x, _ = _data(9)
    ref = net.kernel_fn(torch.as_tensor(x), None, "ntk").numpy()
    text_kernel = InfiniteWidthKernel(text, get="ntk")
    assert (text_kernel.W_std, text_kernel.b_std) == (1.2, 0.3)
    np.testing.assert_allclose(text_kernel(x), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="not a stax expression"):
        InfiniteWidthKernel("serial(Dense(8), __import__('os'))")

    # a factory compares by identity, which clone preserves
    def layer_fn(W_std, b_std):  # noqa: N803
        return stax.serial(stax.Dense(8, W_std=W_std, b_std=b_std), stax.Relu(), stax.Dense(1))

    kf = InfiniteWidthKernel(layer_fn, W_std=1.0, b_std=0.1)
    assert kf == clone(kf) and "<factory" in repr(kf)
    # the default kernel is the NNGP, as in infnets.gpytorch (documented)
    assert InfiniteWidthKernel(net).get == "nngp"


def test_kernel_cache_keys_bounds_and_copies(kernel_calls):
    from infnets._src.ecosystem.cache import KernelCache, kernels

    x, _ = _data(12)
    xt = torch.as_tensor(x)
    net = _net()
    ref = _net().kernel_fn(xt, None, ("nngp", "ntk"))  # another object: no shared state
    cache = KernelCache(max_bytes=10 * 12 * 12 * 8)
    first = kernels(net, xt, None, ("nngp", "ntk"), cache)
    torch.testing.assert_close(first["ntk"], ref.ntk, rtol=0, atol=0)
    first["ntk"].mul_(0.0)  # callers own what they get
    calls = len(kernel_calls)
    again = kernels(_net(), xt.clone(), None, ("ntk",), cache)  # equal architecture, data
    assert len(kernel_calls) == calls  # served from the cache
    torch.testing.assert_close(again["ntk"], ref.ntk, rtol=0, atol=0)
    moved = xt.clone()
    moved[0, 0] += 1e-12  # any change of the data is another key
    kernels(net, moved, None, ("ntk",), cache)
    assert len(kernel_calls) == calls + 1
    kernels(net, xt, xt, ("ntk",), cache)  # (x, x) is not the symmetric (x, None) problem
    assert len(kernel_calls) == calls + 2
    assert cache.info().entries == 4
    cache.max_bytes = 2 * 12 * 12 * 8  # shrinking evicts the least recently used
    assert cache.info().entries == 2 and cache.info().nbytes == 2 * 12 * 12 * 8
    # a layer whose repr does not describe it (a function inside) is never cached
    fn_net = stax.serial(stax.Dense(8), stax.Elementwise(torch.tanh, lambda c, q1, q2: c))
    kernels(fn_net, xt, None, ("nngp",), cache)
    kernels(fn_net, xt, None, ("nngp",), cache)
    assert len(kernel_calls) == calls + 4


def test_ntkgp_regressor_matches_closed_form():
    x, y = _data(30)
    xs, _ = _data(7, seed=3)
    net = _net()
    lam_rel = 1e-3
    # the oracle: numpy linear algebra on kernel matrices from kernel_fn
    theta = net.kernel_fn(torch.as_tensor(x), None, "ntk").numpy()
    theta_sx = net.kernel_fn(torch.as_tensor(xs), torch.as_tensor(x), "ntk").numpy()
    theta_ss = net.kernel_fn(torch.as_tensor(xs), None, "ntk").numpy()
    reg = theta + lam_rel * np.mean(np.diag(theta)) * np.eye(30)
    mean = theta_sx @ np.linalg.solve(reg, y)
    var = np.diag(theta_ss - theta_sx @ np.linalg.solve(reg, theta_sx.T))
    est = NTKRegressor(net, get="ntkgp", diag_reg=lam_rel).fit(x, y)
    got_mean, got_std = est.predict(xs, return_std=True)
    # cond(reg) < 1e4: the two float64 solves agree to ~1e-12 relative
    np.testing.assert_allclose(got_mean, mean, rtol=1e-9, atol=1e-12)
    # the variance subtracts two O(1) terms; 1e-12 absolute error -> std error 1e-12 / std
    np.testing.assert_allclose(got_std, np.sqrt(var), rtol=1e-6, atol=1e-7)
    # the NTK-GP mean is the NTK ensemble's mean; its uncertainty differs
    ntk_mean, ntk_std = NTKRegressor(net, diag_reg=lam_rel).fit(x, y).predict(xs, True)
    np.testing.assert_allclose(ntk_mean, got_mean, rtol=1e-9, atol=1e-12)
    assert np.max(np.abs(ntk_std - got_std)) > 1e-3
    # the NTK-GP ensemble in time: the NTK prior at t -> 0, the posterior at t -> inf
    early = NTKRegressor(net, get="ntkgp", diag_reg=lam_rel, t=1e-9).fit(x, y)
    m0, s0 = early.predict(xs, return_std=True)
    np.testing.assert_allclose(m0, 0.0, atol=1e-6)
    np.testing.assert_allclose(s0, np.sqrt(np.diag(theta_ss)), rtol=1e-6)
    late = NTKRegressor(net, get="ntkgp", diag_reg=lam_rel, t=1e7).fit(x, y)
    m1, s1 = late.predict(xs, return_std=True)
    np.testing.assert_allclose(m1, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s1, np.sqrt(var), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="get must be"):
        NTKRegressor(net, get="nngp").fit(x, y)
    labels = (y > np.median(y)).astype(int)
    clf = NTKClassifier(net, get="ntkgp").fit(x, labels)
    np.testing.assert_allclose(clf.predict_proba(xs).sum(1), 1.0, rtol=1e-10)


def test_transformer_and_svc_agree_with_precomputed_kernels():
    x, y = _digits(120)
    xtr, ytr, xte = x[:80], y[:80], x[80:]
    net = _net()
    k_train = net.kernel_fn(torch.as_tensor(xtr), None, "ntk").numpy()
    k_test = net.kernel_fn(torch.as_tensor(xte), torch.as_tensor(xtr), "ntk").numpy()
    tr = NTKTransformer(net).fit(xtr)
    np.testing.assert_allclose(tr.transform(xtr), k_train, rtol=1e-12)
    np.testing.assert_allclose(tr.fit_transform(xtr), k_train, rtol=1e-12)
    np.testing.assert_allclose(tr.transform(xte), k_test, rtol=1e-12)
    assert tr.get_feature_names_out().shape == (80,)
    ref = SVC(kernel="precomputed", C=3.0).fit(k_train, ytr)
    svc = NTKSVC(net, C=3.0).fit(xtr, ytr)
    np.testing.assert_allclose(
        svc.decision_function(xte), ref.decision_function(k_test), rtol=1e-8, atol=1e-10
    )
    np.testing.assert_array_equal(svc.predict(xte), ref.predict(k_test))
    assert svc.score(xte, y[80:]) == ref.score(k_test, y[80:])
    nngp = NTKTransformer(net, get="nngp").fit(xtr).transform(xte)
    np.testing.assert_allclose(
        nngp, net.kernel_fn(torch.as_tensor(xte), torch.as_tensor(xtr), "nngp").numpy(),
        rtol=1e-12,
    )  # fmt: skip
    with pytest.raises(ValueError, match="get must be"):
        NTKSVC(net, get="ntkgp").fit(xtr, ytr)
