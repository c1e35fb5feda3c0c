"""Tests of infnets.plot: every helper returns a figure that saves as a valid PNG."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from infnets import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: str) -> None:
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_posterior_bands(tmp_path):
    x = torch.linspace(-3, 3, 40)
    fig = plot.posterior_bands(
        x[::8], torch.sin(x[::8]), x, {"NNGP": (torch.sin(x), 0.1 * torch.ones(40))},
        y_test=torch.sin(x), title="bands",
    )  # fmt: skip
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "bands"
    assert "NNGP" in [t.get_text() for t in ax.get_legend().get_texts()]
    _check_png(plot.save(fig, tmp_path / "sub" / "bands.png"))


def test_dynamics_curves(tmp_path):
    t = torch.tensor([0.0, 1.0, 10.0, 100.0])
    fig = plot.dynamics_curves(
        t, {"width 64": torch.tensor([2.0, 1.0, 0.5, 0.2])},
        reference=("infinite", torch.tensor([2.0, 0.9, 0.45, 0.2])),
        bands={"width 64": torch.full((4,), 0.05)},
    )  # fmt: skip
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 2
    assert ax.get_lines()[0].get_xdata()[0] == pytest.approx(0.5)  # t = 0 at the left edge
    _check_png(plot.save(fig, tmp_path / "dyn.png"))


def test_kernel_heatmap_sorts_by_class(tmp_path):
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    k = torch.eye(6) + 0.5 * (labels[:, None] == labels[None, :]).double()
    fig = plot.kernel_heatmap(k, labels, title="k")
    ax = fig.axes[0]
    shown = ax.get_images()[0].get_array()
    order = torch.argsort(labels, stable=True)
    expected = (k / 1.5)[order][:, order]
    assert torch.allclose(torch.as_tensor(shown.data), expected.float().double(), atol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    _check_png(plot.save(fig, tmp_path / "heat.png"))
    with pytest.raises(ValueError, match="square"):
        plot.kernel_heatmap(torch.ones(3, 4))
    with pytest.raises(ValueError, match="labels"):
        plot.kernel_heatmap(torch.eye(3), [0, 1])


def test_figure_grid_and_shared_axes(tmp_path):
    fig, axes = plot.figure(ncols=2, nrows=1)
    assert len(axes) == 2
    plot.kernel_heatmap(torch.eye(4), ax=axes[0])
    plot.dynamics_curves([1, 2, 3], {"a": [3, 2, 1]}, ax=axes[1], log_y=False)
    assert axes[1].get_yscale() == "linear"
    _check_png(plot.save(fig, tmp_path / "grid.png"))
