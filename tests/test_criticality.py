"""Criticality: closed forms (ReLU, erf), independent quadrature (tanh), deep kernel_fn iterates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infnets import criticality as cr
from infnets import stax

F64 = torch.float64
TANH = stax.ElementwiseNumerical(torch.tanh, deg=100)  # quadrature error < 1e-6 here


def test_relu_closed_forms() -> None:
    w = torch.tensor([0.6, 1.0, 1.2, 1.35])
    b = torch.tensor([0.0, 0.3, 0.7])[:, None]
    out = cr.criticality(stax.Relu(), w, b)
    ww, bb = (w.double() ** 2).expand(3, 4), (b.double() ** 2).expand(3, 4)
    torch.testing.assert_close(out.q_star, bb / (1 - ww / 2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.chi_1, ww / 2)
    torch.testing.assert_close(out.chi_q, ww / 2, rtol=1e-7, atol=1e-9)  # V(q) linear
    torch.testing.assert_close(out.c_star, torch.ones_like(ww))  # ordered: W^2 < 2
    torch.testing.assert_close(out.xi_c, -1 / torch.log(ww / 2))
    # chaos is impossible below W^2 = 2 for ReLU; above it the variance diverges
    assert math.isinf(float(cr.variance_fixed_point(stax.Relu(), 1.5, 0.1)))
    w_line, _ = cr.critical_line(stax.Relu(), torch.tensor([0.0, 0.3]))
    torch.testing.assert_close(w_line, torch.full((2,), math.sqrt(2), dtype=F64))
    # the ReLU correlation map (arc-cosine kernel), written out independently
    q, c = 0.8, torch.linspace(-0.9, 0.99, 7, dtype=F64)
    wf, bf = 1.1, 0.4
    k = wf**2 * q / (2 * math.pi) * (torch.sqrt(1 - c**2) + (math.pi - torch.arccos(c)) * c)
    expected = (k + bf**2) / (wf**2 * q / 2 + bf**2)
    torch.testing.assert_close(cr.correlation_map(stax.Relu(), c, q, wf, bf), expected)


def _erf_q_residual(q: np.ndarray, w: float, b: float) -> np.ndarray:
    return w**2 * (2 / np.pi) * np.arcsin(2 * q / (1 + 2 * q)) + b**2 - q


@pytest.mark.parametrize(("w", "b"), [(0.8, 0.2), (1.5, 0.1), (3.0, 0.5), (1.2, 0.0)])
def test_erf_closed_forms(w: float, b: float) -> None:
    out = cr.criticality(stax.Erf(), w, b)
    q = float(out.q_star)
    assert abs(_erf_q_residual(np.array(q), w, b)) < 1e-12
    assert q > 0 or b == 0
    chi_1 = w**2 * (4 / np.pi) / np.sqrt(1 + 4 * q)
    assert float(out.chi_1) == pytest.approx(chi_1, rel=1e-10)
    chi_q = w**2 * (4 / np.pi) / ((1 + 2 * q) * np.sqrt(1 + 4 * q))
    assert float(out.chi_q) == pytest.approx(chi_q, rel=1e-7)
    c = float(out.c_star)
    if chi_1 < 1:
        assert c == 1.0
    else:  # the erf correlation map at c* is the identity, and c* is stable
        m = (w**2 * (2 / np.pi) * np.arcsin(2 * c * q / (1 + 2 * q)) + b**2) / q
        assert m == pytest.approx(c, abs=1e-10) and c < 1
        chi_c = w**2 * (4 / np.pi) / np.sqrt((1 + 2 * q) ** 2 - 4 * c**2 * q**2)
        assert float(out.chi_c) == pytest.approx(chi_c, rel=1e-8)
        assert chi_c < 1
        assert float(out.xi_c) == pytest.approx(-1 / np.log(chi_c), rel=1e-7)


def test_erf_critical_line_closed_form() -> None:
    # on the line: W^2 = (pi / 4) sqrt(1 + 4 q), b^2 = q - W^2 (2 / pi) arcsin(2q / (1 + 2q))
    qs = np.array([1e-3, 0.05, 0.4, 2.0, 10.0])
    w2 = np.pi / 4 * np.sqrt(1 + 4 * qs)
    b2 = qs - w2 * (2 / np.pi) * np.arcsin(2 * qs / (1 + 2 * qs))
    w, q = cr.critical_line(stax.Erf(), torch.tensor(np.sqrt(b2)))
    np.testing.assert_allclose(w.numpy() ** 2, w2, rtol=1e-8)
    np.testing.assert_allclose(q.numpy(), qs, rtol=1e-6)
    chi = cr.criticality(stax.Erf(), w, torch.tensor(np.sqrt(b2))).chi_1
    np.testing.assert_allclose(chi.numpy(), 1.0, rtol=1e-7)


def _tanh_chi1_numpy(w: float, b: float, deg: int = 120) -> float:
    """Independent: iterate the 1-D variance map with numpy Gauss-Hermite, then chi_1."""
    x, wt = np.polynomial.hermite_e.hermegauss(deg)
    wt = wt / wt.sum()
    q = 1.0
    for _ in range(20000):
        q_new = w**2 * np.sum(wt * np.tanh(np.sqrt(q) * x) ** 2) + b**2
        if abs(q_new - q) < 1e-15:
            break
        q = q_new
    return w**2 * np.sum(wt / np.cosh(np.sqrt(q) * x) ** 4)


def test_tanh_critical_line_by_quadrature() -> None:
    b = torch.tensor([0.0, 0.05, 0.2, 0.5])
    w, q = cr.critical_line(TANH, b)
    assert float(w[0]) == pytest.approx(1.0, abs=1e-5)  # tanh'(0) = 1: W_std = 1 at b = 0
    assert bool((w[1:] > w[:-1]).all())  # the line bends to larger W_std as b grows
    for wi, bi in zip(w[1:].tolist(), b[1:].tolist()):
        assert _tanh_chi1_numpy(wi, bi, 160) == pytest.approx(1.0, abs=1e-5)


def test_fixed_points_of_the_correlation_map() -> None:
    fps = cr.correlation_fixed_points(TANH, W_std=2.0, b_std=0.0)
    np.testing.assert_allclose(fps.numpy(), [-1.0, 0.0, 1.0], atol=1e-8)
    out = cr.criticality(TANH, 2.0, 0.0)
    assert abs(float(out.c_star)) < 1e-8 and float(out.chi_1) > 1
    fps = cr.correlation_fixed_points(stax.Erf(), W_std=1.8, b_std=0.3)
    c_star = float(cr.criticality(stax.Erf(), 1.8, 0.3).c_star)
    assert any(abs(float(f) - c_star) < 1e-8 for f in fps) and float(fps[-1]) == 1.0


@pytest.mark.parametrize(("w", "b"), [(1.0, 0.5), (2.0, 0.2)])  # ordered, chaotic
def test_deep_kernel_fn_iterates_converge_at_the_predicted_rate(w: float, b: float) -> None:
    """q^l -> q*, c^l -> c* with |c^l - c*| shrinking by chi_c per layer, from kernel_fn."""
    act = stax.Erf()
    out = cr.criticality(act, w, b)
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64) * math.sqrt(2.0)
    depths = list(range(1, 26))
    cov = []
    for depth in depths:
        layers = [stax.Dense(1, W_std=w, b_std=b)]
        for _ in range(depth - 1):
            layers += [act, stax.Dense(1, W_std=w, b_std=b)]
        cov.append(stax.serial(*layers).kernel_fn(x, None, "nngp"))
    k = torch.stack(cov)
    q = k[:, 0, 0]
    c = k[:, 0, 1] / torch.sqrt(k[:, 0, 0] * k[:, 1, 1])
    assert float(q[-1]) == pytest.approx(float(out.q_star), rel=1e-8)
    gap = (c - out.c_star).abs()
    assert float(gap[-1]) < 0.03 * float(gap[0])  # chi_c^24 = 0.013 for the chaotic case
    ratios = gap[6:12] / gap[5:11]
    np.testing.assert_allclose(ratios.numpy(), float(out.chi_c), rtol=2e-2)
    one_layer = cr.correlation_map(act, c[-2], q[-2], w, b)
    assert float(one_layer) == pytest.approx(float(c[-1]), abs=1e-10)
    assert float(cr.variance_map(act, q[-2], w, b)) == pytest.approx(float(q[-1]), rel=1e-12)


def test_bad_activation() -> None:
    with pytest.raises(TypeError, match="elementwise"):
        cr.criticality(torch.tanh, 1.0, 0.0)


def test_phase_diagram_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from infnets import plot

    b = torch.linspace(0.0, 0.6, 5)
    fig = plot.phase_diagram(stax.Erf(), torch.linspace(0.5, 2.5, 9), b, quantity="xi_c")
    (line,) = fig.axes[0].get_lines()
    w_line, _ = cr.critical_line(stax.Erf(), b)
    np.testing.assert_allclose(line.get_xdata(), w_line.numpy() ** 2)
    path = plot.save(fig, tmp_path / "phase.png")
    assert open(path, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="quantity"):
        plot.phase_diagram(stax.Erf(), [1.0], [0.0], quantity="nope")
