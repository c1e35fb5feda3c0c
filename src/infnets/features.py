"""Random features of infinite-width kernels: NNGP and NTK regression past ``N^2``.

``random_features(net, x, n_features)`` returns ``(N, D)`` matrices whose inner products
estimate ``net.kernel_fn(x, None, get)``; :func:`feature_regression` solves kernel ridge
regression on them in ``O(N D^2)`` time without an ``N x N`` kernel::

    from infnets import features, stax
    net = stax.serial(stax.Dense(1, W_std=1.5, b_std=0.05), stax.Relu(), stax.Dense(1))
    f_train = features.random_features(net, x_train, 2048, get="ntk", key=0).ntk
    f_test = features.random_features(net, x_test, 2048, get="ntk", key=0).ntk
    _, mean = features.feature_regression(f_train, y_train, f_test, diag_reg=1e-3)
"""

from infnets._src.features.random import Features, feature_regression, random_features

__all__ = ["Features", "feature_regression", "random_features"]
