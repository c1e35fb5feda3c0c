"""Tests of infnets.sklearn: the kernel, its gradients, GPR fitting, the estimators."""

from __future__ import annotations

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
    InfiniteWidthKernel,
    NNGPRegressor,
    NTKClassifier,
    NTKRegressor,
    class_probabilities,
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
@parametrize_with_checks([NTKRegressor(), NNGPRegressor(), NTKClassifier()])
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
