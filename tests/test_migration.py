"""The differences listed in ``docs/neural_tangents.md``, one test each.

Every test runs both lines of a translation on infnets -- the naive port of the Neural
Tangents (NT 0.6.5) line and the fixed line of the guide -- and checks the fixed line
against an independent oracle of what NT computes (a closed form, a ``torch`` primitive,
an explicit Jacobian), and that the naive line computes something else or raises. NT's
conventions quoted here were read from its sources (``_src/predict.py``,
``_src/stax/linear.py``, ``_src/empirical.py``, ``_src/utils/utils.py``).

Tolerances: everything runs in float64 on problems of at most a few hundred numbers, so
exact relations hold to ~1e-12 relative; ``RTOL = 1e-9`` leaves three orders of margin
for eigendecompositions and matrix exponentials, while every "naive differs" check is
made on differences of order 1e-2 or larger.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infnets import Kernel, empirical, predict, stax

RTOL = 1e-9
DT = torch.float64


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max())))


def spd(n: int, seed: int) -> torch.Tensor:
    """A well-conditioned symmetric positive definite ``(n, n)`` matrix."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=DT)


# ---------------------------------------------------------------- predict: loss and time


def nt_mse_train(ntk, y, lr, t, f0):
    """NT's ``gradient_descent_mse`` on the train set (``_make_expm1_fn(y_train.size)``):
    ``f_t = y + expm(-lr t Θ / y.size) (f_0 - y)``, by ``torch.linalg.matrix_exp``."""
    e = torch.linalg.matrix_exp(-lr * t * ntk / y.numel())
    return y + e @ (f0 - y)


def test_mse_time_is_divided_by_y_train_size():
    ntk, n, k = spd(6, 0), 6, 3
    y = torch.randn(n, k, dtype=DT, generator=torch.Generator().manual_seed(1))
    lr, t = 0.7, 5.0
    oracle = nt_mse_train(ntk, y, lr, t, torch.zeros_like(y))
    predict_fn = predict.gradient_descent_mse(ntk, y, learning_rate=lr)
    naive = predict_fn(t)  # NT: predict_fn(t)
    fixed = predict_fn(t / y.numel())  # infnets: t / y_train.size
    assert close(fixed, oracle)
    assert (naive - oracle).abs().max() > 1e-2
    # equivalently, divide the learning rate
    by_lr = predict.gradient_descent_mse(ntk, y, learning_rate=lr / y.numel())(t)
    assert close(by_lr, oracle)
    # and the test set: NT's inv_expm1 branch, f_x = Θ_xX Θ^-1 (I - expm(-lr t Θ / n)) y
    k_xX = torch.randn(4, n, dtype=DT, generator=torch.Generator().manual_seed(2))
    e = torch.linalg.matrix_exp(-lr * t * ntk / y.numel())
    oracle_test = k_xX @ torch.linalg.solve(ntk, (torch.eye(n, dtype=DT) - e) @ y)
    _, fx_test = predict_fn(t / y.numel(), 0.0, 0.0, k_xX)
    assert close(fx_test, oracle_test)


def test_mse_ensemble_time_is_divided_by_y_train_size():
    x = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    x_test = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    _, _, kernel_fn = stax.serial(stax.Dense(8, b_std=0.1), stax.Erf(), stax.Dense(1))
    ntk = kernel_fn(x, None, "ntk")
    ntk_xX = kernel_fn(x_test, x, "ntk")
    lr, t = 1.0, 3.0
    e = torch.linalg.matrix_exp(-lr * t * ntk / y.numel())
    oracle = ntk_xX @ torch.linalg.solve(ntk, (torch.eye(5, dtype=DT) - e) @ y)
    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x, y, learning_rate=lr)
    naive = predict_fn(t, x_test, "ntk")
    fixed = predict_fn(t / y.numel(), x_test, "ntk")
    assert close(fixed, oracle)
    assert (naive - oracle).abs().max() > 1e-2


def test_max_learning_rate_default_size():
    ntk = spd(7, 6)
    w_max = float(torch.linalg.eigvalsh(ntk)[-1])
    naive = predict.max_learning_rate(ntk)  # NT: factor = ntk.shape[0] when None
    fixed = predict.max_learning_rate(ntk, y_train_size=ntk.shape[0])
    assert fixed == pytest.approx(2 * 7 / w_max, rel=1e-12)
    assert naive == pytest.approx(2 / w_max, rel=1e-12)


def test_gradient_descent_uses_the_loss_as_given():
    """NT's ODE ``gradient_descent`` does not normalise: a mean loss there equals its
    ``gradient_descent_mse``, and the same holds here, against the closed form."""
    ntk = spd(4, 7)
    y = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    lr, t = 0.5, 4.0

    def mean_loss(f, y):
        return 0.5 * ((f - y) ** 2).mean()

    def sum_loss(f, y):
        return 0.5 * ((f - y) ** 2).sum()

    f_mean = predict.gradient_descent(mean_loss, ntk, y, lr)(t, 0.0)
    f_sum = predict.gradient_descent(sum_loss, ntk, y, lr)(t, 0.0)
    zero = torch.zeros_like(y)
    # the ODE solver's tolerances (rtol 1e-7, atol 1e-9) bound the agreement
    assert close(f_mean, nt_mse_train(ntk, y, lr, t, zero), rtol=1e-5)
    assert close(f_sum, nt_mse_train(ntk, y, lr, t * y.numel(), zero), rtol=1e-5)


def test_momentum_time_counts_steps():
    """NT integrates momentum in units of ``sqrt(lr)`` but its ``t`` still counts steps;
    so does infnets'. Oracle: discrete heavy-ball iterations (error O(lr w / (1 - m)))."""
    ntk = spd(4, 9)
    y = torch.randn(4, 1, dtype=DT, generator=torch.Generator().manual_seed(10))
    w_max = float(torch.linalg.eigvalsh(ntk)[-1])
    lr, m, steps = 1e-3 / w_max, 0.9, 3000
    f_prev = f = torch.zeros_like(y)
    for _ in range(steps):
        f, f_prev = f + m * (f - f_prev) - lr * ntk @ (f - y), f
    ode = predict.gradient_descent(lambda f, y: 0.5 * ((f - y) ** 2).sum(), ntk, y, lr, momentum=m)(
        float(steps), 0.0
    )
    # relative to the distance travelled; the discretisation error is ~1 % here
    assert float((ode - f).norm() / f.norm()) < 0.02


def test_gp_inference_get_has_no_default():
    k = spd(5, 11)
    y = torch.randn(5, 1, dtype=DT, generator=torch.Generator().manual_seed(12))
    k_xX = torch.randn(2, 5, dtype=DT, generator=torch.Generator().manual_seed(13))
    record = Kernel(nngp=k, ntk=2 * k, cov1=k.diagonal(), cov2=None, shape1=(5, 1), shape2=(5, 1))
    predict_fn = predict.gp_inference(record, y)
    with pytest.raises(TypeError):
        predict_fn(k_test_train=k_xX)  # NT: get=None means ('nngp', 'ntk')
    with pytest.raises(TypeError):
        predict_fn(None, k_xX)
    test_record = Kernel(
        nngp=k_xX,
        ntk=2 * k_xX,
        cov1=torch.ones(2, dtype=DT),
        cov2=k.diagonal(),
        shape1=(2, 1),
        shape2=(5, 1),
    )
    out = predict_fn(("nngp", "ntk"), test_record)
    assert close(out.nngp, k_xX @ torch.linalg.solve(k, y))
    assert close(out.ntk, (2 * k_xX) @ torch.linalg.solve(2 * k, y))


def test_predict_signature_differences_raise():
    k = spd(3, 14)
    y = torch.ones(3, 1, dtype=DT)
    with pytest.raises(TypeError):
        predict.gradient_descent_mse(k, y, 1.0, 0.0, True)  # NT's 5th positional
    with pytest.raises(TypeError):
        predict.gradient_descent_mse(k, y, trace_axes=(-1,))
    x = torch.randn(3, 2, dtype=DT)
    _, _, kernel_fn = stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(1))
    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, x, y, trace_axes=(-1,))
    with pytest.raises(TypeError):  # forwarded to kernel_fn, which refuses it
        predict_fn(1.0, x, "ntk")


def test_mse_fx_train_0_none_still_returns_train_outputs():
    """NT returns only ``fx_test_t`` for ``fx_train_0=None``; infnets treats it as 0 and
    returns the pair whenever ``k_test_train`` is given."""
    k = spd(4, 15)
    y = torch.randn(4, 1, dtype=DT, generator=torch.Generator().manual_seed(16))
    predict_fn = predict.gradient_descent_mse(k, y)
    out = predict_fn(1.0, None, 0.0, k)
    assert isinstance(out, tuple)
    _, fx_test = predict_fn(1.0, 0.0, 0.0, k)
    assert close(out[1], fx_test)


# ---------------------------------------------------------------- stax


def test_pool_strides_default_is_the_window():
    x = torch.randn(3, 2, 5, 6, dtype=DT, generator=torch.Generator().manual_seed(17))
    flat = stax.Flatten()
    oracle = flat.kernel_fn(F.avg_pool2d(x, (2, 3), stride=1), None, "nngp")
    naive = stax.serial(stax.AvgPool((2, 3)), stax.Flatten()).kernel_fn(x, None, "nngp")
    fixed = stax.serial(stax.AvgPool((2, 3), strides=(1, 1)), stax.Flatten()).kernel_fn(
        x, None, "nngp"
    )
    assert close(fixed, oracle)
    assert (naive - oracle).abs().max() > 1e-3
    assert stax.AvgPool((2, 3)).init_fn(0, (-1, 2, 5, 6))[0] == (-1, 2, 2, 2)
    summed = stax.serial(stax.SumPool((2, 3), strides=(1, 1)), stax.Flatten())
    oracle_sum = flat.kernel_fn(6 * F.avg_pool2d(x, (2, 3), stride=1), None, "nngp")
    assert close(summed.kernel_fn(x, None, "nngp"), oracle_sum)


def conv_nngp_oracle(x_nchw: torch.Tensor, filt: tuple[int, int]) -> torch.Tensor:
    """NNGP of ``Conv(filt, 'VALID', W_std=1)`` then ``Flatten``: the mean over output
    positions of patch inner products divided by the fan-in, from ``F.unfold``."""
    p = F.unfold(x_nchw, filt)  # (N, C kh kw, P)
    return torch.einsum("icp,jcp->ij", p, p) / (p.shape[1] * p.shape[2])


def test_images_are_channels_first():
    x_nhwc = torch.randn(3, 5, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(18))
    net = stax.serial(stax.Conv(8, (3, 2)), stax.Flatten())
    oracle = conv_nngp_oracle(x_nhwc.permute(0, 3, 1, 2), (3, 2))
    naive = net.kernel_fn(x_nhwc, None, "nngp")  # runs: H is read as the channel axis
    fixed = net.kernel_fn(x_nhwc.permute(0, 3, 1, 2), None, "nngp")
    assert close(fixed, oracle)
    assert (naive - oracle).abs().max() > 1e-3
    with pytest.raises(TypeError):
        stax.Conv(8, (3, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_layer_norm_and_concat_axes_name_channels():
    x = torch.randn(2, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(19))
    with pytest.raises(ValueError):
        stax.LayerNorm(axis=-1).kernel_fn(x, None, "nngp")  # NT's axis=-1 on NWC
    base = stax.serial(stax.Conv(4, (1,)), stax.Flatten())
    k = stax.serial(stax.Conv(4, (1,)), stax.LayerNorm(axis=1), stax.Flatten())
    k0 = stax.Conv(4, (1,)).kernel_fn(x, None)
    # oracle: per position, nngp / sqrt(cov1 cov1'), then the Flatten average
    c = k0.nngp.diagonal(dim1=2, dim2=3)  # (N, N, L)
    v = k0.cov1.diagonal(dim1=1, dim2=2)  # (N, L)
    oracle = (c / (v[:, None] * v[None, :]).sqrt()).mean(-1)
    assert close(k.kernel_fn(x, None, "nngp"), oracle)
    assert not close(base.kernel_fn(x, None, "nngp"), oracle, rtol=1e-3)
    branches = stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.Identity()))
    with pytest.raises(ValueError):
        stax.serial(branches, stax.FanInConcat(axis=-1)).kernel_fn(x, None, "nngp")
    joined = stax.serial(branches, stax.FanInConcat(axis=1), stax.Flatten())
    assert close(joined.kernel_fn(x, None, "nngp"), stax.Flatten().kernel_fn(x, None, "nngp"))


def test_dropout_rate_is_the_keep_probability():
    x = torch.ones(1, 20000, dtype=DT)
    init_fn, apply_fn, _ = stax.Dropout(0.8)
    _, params = init_fn(0, (-1, 20000))
    y = apply_fn(params, x, rng=0)
    kept = float((y != 0).to(DT).mean())
    # binomial standard error sqrt(0.8 * 0.2 / 20000) = 0.0028; 5 sigma
    assert abs(kept - 0.8) < 0.015
    assert close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8))


def test_dropout_diagonal_x1_is_x2():
    """NT inflates the diagonal by 1 / rate whenever ``x1_is_x2`` (``x2 is None``, the same
    array, or equal values); infnets for ``x2 is None`` and the same tensor, not for a copy."""
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(20))
    net = stax.serial(stax.Dense(8), stax.Relu(), stax.Dropout(0.5), stax.Dense(1))
    plain = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1)).kernel_fn(x, None, "nngp")
    oracle = plain + torch.diag(plain.diagonal())  # diagonal times 1 / rate = 2
    assert close(net.kernel_fn(x, None, "nngp"), oracle)
    assert close(net.kernel_fn(x, x, "nngp"), oracle)
    assert close(net.kernel_fn(x, x.clone(), "nngp"), plain)  # a copy: other examples
    # other examples: no same-example entries, no inflation
    other = x + 1e-3
    ref = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1)).kernel_fn(x, other, "nngp")
    assert close(net.kernel_fn(x, other, "nngp"), ref)


def test_b_std_none_versus_zero():
    """``b_std=None``: no bias parameter; ``0.0``: a bias initialised at 0 but trained, which
    adds 1 to the standard-parameterization NTK (as in NT). Oracle: the exact NTK of the
    one-layer finite twin, ``x1 . x2 + [bias]``, by autodiff."""
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(21))
    for b_std, bias in ((None, 0.0), (0.0, 1.0)):
        layer = stax.Dense(5, b_std=b_std, parameterization="standard")
        init_fn, apply_fn, kernel_fn = layer
        _, params = init_fn(0, (-1, 3), dtype=DT)
        emp = empirical.empirical_ntk_fn(apply_fn)(x, None, params)
        assert close(emp, x @ x.T + bias)
        assert close(kernel_fn(x, None, "ntk"), x @ x.T + bias)
        ntk_param = stax.Dense(5, b_std=b_std).kernel_fn(x, None, "ntk")
        assert close(ntk_param, x @ x.T / 3)  # NTK parameterization: b_std^2 = 0 either way


def test_random_keys_are_seeds_or_generators():
    init_fn, _, _ = stax.serial(stax.Dense(3), stax.Relu(), stax.Dense(1))
    a = init_fn(0, (-1, 2))[1]
    b = init_fn(torch.Generator().manual_seed(0), (-1, 2))[1]
    c = init_fn(1, (-1, 2))[1]
    flat = [torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(p)]) for p in (a, b, c)]
    assert torch.equal(flat[0], flat[1])
    assert not torch.equal(flat[0], flat[2])


# ---------------------------------------------------------------- kernels and records


def test_batching_is_a_keyword():
    import infnets

    assert not hasattr(infnets, "batch")
    x = torch.randn(7, 3, dtype=DT, generator=torch.Generator().manual_seed(22))
    _, _, kernel_fn = stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(1))
    whole = kernel_fn(x, None, "ntk")
    assert close(kernel_fn(x, None, "ntk", batch_size=2), whole)
    assert close(kernel_fn(x, None, "ntk", memory_budget=2**16), whole)


def test_kernel_record_fields():
    x = torch.randn(2, 2, 5, 4, dtype=DT, generator=torch.Generator().manual_seed(23))
    k = stax.serial(stax.Conv(3, (2, 2)), stax.Relu()).kernel_fn(x, None)
    for name in (
        "x1_is_x2",
        "diagonal_batch",
        "batch_axis",
        "channel_axis",
        "is_reversed",
        "is_input",
    ):
        assert not hasattr(k, name), name
    # NT's layout with diagonal_batch=True, diagonal_spatial=False: interleaved positions
    assert k.nngp.shape == (2, 2, 4, 4, 3, 3)
    assert k.cov1.shape == (2, 4, 4, 3, 3)
    assert close(k.cov1, torch.stack([k.nngp[i, i] for i in range(2)]))
    assert k.is_gaussian is False and k.mask1 is None


# ---------------------------------------------------------------- empirical


def jacobian_ntk(f, params, x, axes_sum):
    """Explicit ``J J^T`` from ``torch.autograd.functional.jacobian`` (no vmap, no jvp)."""
    names = list(params)

    def as_vector(*values):
        return f(dict(zip(names, values)), x)

    jac = torch.autograd.functional.jacobian(as_vector, tuple(params[n] for n in names))
    j = torch.cat([t.reshape(*t.shape[: f(params, x).ndim], -1) for t in jac], -1)
    return axes_sum(j)


def test_trace_axes_count_channels_first():
    g = torch.Generator().manual_seed(24)
    params = {"w": torch.randn(3, 2, 1, 1, generator=g, dtype=DT)}
    x = torch.randn(2, 2, 3, 4, generator=g, dtype=DT)

    def f_nchw(p, x):
        return torch.tanh(F.conv2d(x, p["w"]))

    def f_nhwc(p, x):
        return f_nchw(p, x).permute(0, 2, 3, 1)

    def trace_channels(j):  # j: (N, C, H, W, P) -> (N1, N2, H, H, W, W)
        return torch.einsum("ichwp,jcgvp->ijhgwv", j, j) / j.shape[1]

    oracle = jacobian_ntk(f_nchw, params, x, trace_channels)
    nt_line = empirical.empirical_ntk_fn(f_nhwc, trace_axes=(-1,))(x, None, params)
    naive = empirical.empirical_ntk_fn(f_nchw, trace_axes=(-1,))(x, None, params)
    fixed = empirical.empirical_ntk_fn(f_nchw, trace_axes=(1,))(x, None, params)
    assert close(nt_line, oracle)
    assert close(fixed, oracle)
    assert naive.shape == (2, 2, 3, 3, 3, 3)  # traced W: (N, N, C, C, H, H)
    diag = empirical.empirical_ntk_fn(f_nchw, trace_axes=(1,), diagonal_axes=(2, 3))
    assert close(diag(x, None, params), oracle.diagonal(0, 2, 3).diagonal(0, 2, 3))


NT_IMPLEMENTATION = {  # NtkImplementation member (value) -> infnets string
    "AUTO": (0, "auto"),
    "JACOBIAN_CONTRACTION": (1, "jacobian_contraction"),
    "NTK_VECTOR_PRODUCTS": (2, "ntk_vector_products"),
    "STRUCTURED_DERIVATIVES": (3, "structured"),
}


def test_ntk_implementation_strings():
    assert sorted(s for _, s in NT_IMPLEMENTATION.values()) == sorted(empirical.IMPLEMENTATIONS)
    g = torch.Generator().manual_seed(25)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    net = net.double()
    x = torch.randn(4, 3, generator=g, dtype=DT)
    params = dict(net.named_parameters())

    def f(p, x):
        return torch.func.functional_call(net, p, (x,))

    oracle = jacobian_ntk(
        f,
        {k: v.detach() for k, v in params.items()},
        x,
        lambda j: torch.einsum("icp,jcp->ij", j, j) / j.shape[1],
    )
    for name, (value, string) in NT_IMPLEMENTATION.items():
        with pytest.raises(ValueError):
            empirical.empirical_ntk_fn(net, implementation=value)
        with pytest.raises(ValueError):
            empirical.empirical_ntk_fn(net, implementation=name)
        assert close(empirical.empirical_ntk_fn(net, implementation=string)(x), oracle)


def test_linearize_returns_a_module():
    g = torch.Generator().manual_seed(26)
    p0 = {
        "w1": torch.randn(3, 4, generator=g, dtype=DT),
        "w2": torch.randn(4, 1, generator=g, dtype=DT),
    }
    p1 = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in p0.items()}
    x = torch.randn(5, 3, generator=g, dtype=DT)

    def f(p, x):
        return torch.tanh(x @ p["w1"]) @ p["w2"]

    # oracle: f(p0) + J (p1 - p0) with the explicit Jacobian
    jac = torch.autograd.functional.jacobian(
        lambda a, b: f({"w1": a, "w2": b}, x), (p0["w1"], p0["w2"])
    )
    oracle = f(p0, x) + sum(
        torch.einsum("no...,...->no", j, p1[k] - p0[k]) for j, k in zip(jac, ("w1", "w2"))
    )
    lin = empirical.linearize(f, p0)
    with pytest.raises(TypeError):
        lin(p1, x)  # NT: f_lin(params, x)
    names = dict(lin.named_parameters())
    at_p1 = {n: p1[n.rsplit(".", 1)[-1]] for n in names}
    fixed = torch.func.functional_call(lin, at_p1, (x,))
    assert close(fixed, oracle)
    assert close(lin(x), f(p0, x))


def test_monte_carlo_positional_arguments():
    init_fn, apply_fn, _ = stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(1))
    x = torch.randn(3, 2, dtype=DT)
    # NT: monte_carlo_kernel_fn(init_fn, apply_fn, key, n_samples, batch_size)
    with pytest.raises(ValueError):
        empirical.monte_carlo_kernel_fn(init_fn, apply_fn, 0, 4, 8)(x, None, "nngp")


NT_ENUM_STRINGS = {  # NT enum -> its members' strings, and an infnets constructor taking them
    "Padding": (("VALID", "SAME", "CIRCULAR"), lambda s: stax.Conv(2, (2,), padding=s)),
    "AttentionMechanism": (
        ("SOFTMAX", "IDENTITY", "ABS", "RELU"),
        lambda s: stax.GlobalSelfAttention(2, 2, 2, 1, attention_mechanism=s),
    ),
    "PositionalEmbedding": (
        ("NONE", "SUM", "CONCAT"),
        lambda s: stax.GlobalSelfAttention(2, 2, 2, 1, pos_emb_type=s),
    ),
    "AggregateImplementation": (("DENSE", "SPARSE"), lambda s: stax.Aggregate(implementation=s)),
}


@pytest.mark.parametrize("enum", sorted(NT_ENUM_STRINGS))
def test_nt_enum_strings_are_accepted(enum):
    members, build = NT_ENUM_STRINGS[enum]
    for s in members:
        build(s)
    with pytest.raises((ValueError, TypeError)):
        build("NOT_A_MEMBER")


def test_padding_strings_give_nt_shapes():
    x = torch.randn(2, 3, 5, dtype=DT, generator=torch.Generator().manual_seed(27))
    for padding, size in (("VALID", 3), ("SAME", 5), ("CIRCULAR", 5)):
        k = stax.Conv(2, (3,), padding=padding).kernel_fn(x, None)
        assert k.shape1[-1] == size, padding
