"""Figures of infinite-width predictions: posterior bands, training dynamics, kernels.

Each helper draws on a new ``matplotlib.figure.Figure`` (or on a given ``Axes``) and
returns the figure; nothing touches ``pyplot``'s global state, so the helpers work
headless (figures are rendered by the Agg backend when saved) and in notebooks
(a ``Figure`` displays itself). matplotlib is an optional dependency
(``pip install "infnets[plot]"``), imported when a helper is first called.

Examples:
    >>> import io, torch
    >>> from infnets import plot
    >>> x = torch.linspace(-3, 3, 50)
    >>> fig = plot.posterior_bands(x[::10], torch.sin(x[::10]), x,
    ...                            {'NNGP': (torch.sin(x), 0.1 * torch.ones(50))})
    >>> fig.savefig(io.BytesIO(), format='png')  # or plot.save(fig, 'bands.png')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "figure",
    "posterior_bands",
    "dynamics_curves",
    "kernel_heatmap",
    "phase_diagram",
    "save",
]

#: colours of successive curves (colour-blind safe, Okabe-Ito)
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "infnets.plot needs matplotlib: pip install 'infnets[plot]' (or matplotlib)."
        ) from err
    return matplotlib


def _figure_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    _matplotlib()
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def figure(
    ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.5)
) -> tuple[Figure, list[Axes]]:
    """A new figure with a grid of axes, outside ``pyplot``'s global state.

    Args:
        ncols: columns of axes.
        nrows: rows of axes.
        size: ``(width, height)`` in inches of one axes.

    Returns:
        ``(figure, axes)`` with ``axes`` a flat list, row by row; pass an axes to the
        helpers' ``ax`` argument to draw several panels in one figure.

    Examples:
        >>> fig, axes = figure(ncols=2)
        >>> len(axes), fig.get_size_inches().tolist()
        (2, [12.0, 4.5])
    """
    _matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [a for row in axes for a in row]


def _np(x: Any) -> np.ndarray:
    """A 1-D or 2-D float numpy array from a tensor, an array or a list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


def posterior_bands(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    predictions: Mapping[str, tuple[Any, Any]],
    y_test: Any = None,
    n_std: float = 2.0,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    r"""Posterior means with ``mean +/- n_std * std`` bands over 1-D training points.

    Args:
        x_train: ``(N,)`` or ``(N, 1)`` training inputs.
        y_train: ``(N,)`` or ``(N, 1)`` training targets.
        x_test: ``(M,)`` or ``(M, 1)`` test inputs (sorted for a clean line).
        predictions: ``label -> (mean, std)``, each ``(M,)`` or ``(M, 1)``; e.g.
            ``{'NNGP posterior': (mean, cov.diagonal().sqrt())}``.
        y_test: optional ``(M,)`` ground truth drawn as a dashed line.
        n_std: half-width of the bands in standard deviations.
        ax: axes to draw on (default: a new figure).
        title: axes title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> import torch
        >>> x = torch.linspace(-1, 1, 20)
        >>> fig = posterior_bands(x[::5], x[::5] ** 2, x, {'GP': (x ** 2, 0.1 + x.abs())})
        >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()][0]
        'GP'
    """
    fig, ax = _figure_axes(ax, (7.0, 4.0))
    xs = _np(x_test).reshape(-1)
    order = np.argsort(xs)
    xs = xs[order]
    if y_test is not None:
        ax.plot(xs, _np(y_test).reshape(-1)[order], "k--", lw=1, label="target function")
    for i, (label, (mean, std)) in enumerate(predictions.items()):
        c = COLORS[i % len(COLORS)]
        m = _np(mean).reshape(-1)[order]
        s = _np(std).reshape(-1)[order]
        ax.plot(xs, m, color=c, lw=2, label=label)
        ax.fill_between(
            xs, m - n_std * s, m + n_std * s, color=c, alpha=0.2, lw=0,
            label=rf"{label} $\pm{n_std:g}\sigma$",
        )  # fmt: skip
    ax.scatter(
        _np(x_train).reshape(-1), _np(y_train).reshape(-1), color="k", s=18, zorder=5,
        label="training points",
    )  # fmt: skip
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return fig


def dynamics_curves(
    times: Any,
    curves: Mapping[str, Any],
    reference: tuple[str, Any] | None = None,
    bands: Mapping[str, Any] | None = None,
    ax: Axes | None = None,
    ylabel: str = "test loss",
    title: str | None = None,
    log_x: bool = True,
    log_y: bool = True,
) -> Figure:
    """Loss (or any metric) versus training time, finite curves beside a reference.

    Args:
        times: ``(T,)`` training times (steps); a time 0 is drawn at the left edge
            of a log axis.
        curves: ``label -> (T,)`` values, e.g. one per finite width.
        reference: ``(label, (T,) values)`` drawn as a thick black line, e.g. the
            infinite-width prediction.
        bands: ``label -> (T,)`` standard errors drawn as a shaded band around the
            curve of the same label.
        ax: axes to draw on (default: a new figure).
        ylabel: y-axis label.
        title: axes title.
        log_x: logarithmic time axis.
        log_y: logarithmic value axis.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> fig = dynamics_curves([0, 1, 10, 100], {'width 64': [2.0, 1.0, 0.3, 0.1]},
        ...                       reference=('infinite', [2.0, 0.9, 0.3, 0.1]))
        >>> len(fig.axes[0].get_lines())
        2
    """
    fig, ax = _figure_axes(ax, (7.0, 4.5))
    t = _np(times).reshape(-1)
    if log_x and t.size > 1:
        positive = t[t > 0]
        t = np.where(t > 0, t, positive.min() / 2 if positive.size else 1.0)
    for i, (label, values) in enumerate(curves.items()):
        c = COLORS[i % len(COLORS)]
        v = _np(values).reshape(-1)
        ax.plot(t, v, color=c, lw=1.5, label=label)
        if bands is not None and label in bands:
            e = _np(bands[label]).reshape(-1)
            ax.fill_between(t, v - e, v + e, color=c, alpha=0.15, lw=0)
    if reference is not None:
        label, values = reference
        ax.plot(t, _np(values).reshape(-1), color="k", lw=2.5, ls="--", label=label)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training time t (gradient-descent steps)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return fig


def kernel_heatmap(
    k: Any,
    labels: Sequence[Any] | Any | None = None,
    normalize: bool = True,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
) -> Figure:
    r"""A kernel matrix as an image, examples sorted by class with class boundaries.

    Args:
        k: ``(N, N)`` kernel matrix.
        labels: ``(N,)`` class labels; examples are sorted by label (stable) and
            the class blocks are outlined and named on the axes.
        normalize: show the correlation ``k_ij / sqrt(k_ii k_jj)`` instead of ``k``.
        ax: axes to draw on (default: a new figure).
        title: axes title.
        cmap: matplotlib colour map.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> import torch
        >>> labels = torch.tensor([1, 0, 1, 0])
        >>> k = 1.0 + (labels[:, None] == labels[None, :]).double()
        >>> fig = kernel_heatmap(k, labels)
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0', '1']
    """
    fig, ax = _figure_axes(ax, (6.0, 5.2))
    mat = _np(k)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"kernel_heatmap: k must be a square (N, N) matrix, got {mat.shape}.")
    if normalize:
        d = np.sqrt(np.clip(np.diag(mat), 1e-300, None))
        mat = mat / d[:, None] / d[None, :]
    ticks: list[float] = []
    names: list[str] = []
    if labels is not None:
        if hasattr(labels, "detach"):
            labels = labels.detach().cpu().numpy()
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != mat.shape[0]:
            raise ValueError(
                f"kernel_heatmap: {lab.shape[0]} labels for a {mat.shape[0]} x "
                f"{mat.shape[0]} kernel."
            )
        order = np.argsort(lab, kind="stable")
        mat = mat[order][:, order]
        lab = lab[order]
        edges = np.flatnonzero(lab[1:] != lab[:-1]) + 1
        for e in edges:
            ax.axhline(e - 0.5, color="w", lw=0.6)
            ax.axvline(e - 0.5, color="w", lw=0.6)
        starts = np.concatenate([[0], edges])
        ends = np.concatenate([edges, [lab.shape[0]]])
        ticks = list((starts + ends - 1) / 2)
        names = [str(v.item() if hasattr(v, "item") else v) for v in lab[starts]]
    im = ax.imshow(mat, cmap=cmap, interpolation="nearest")
    if ticks:
        ax.set_xticks(ticks, names, fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
        ax.set_xlabel("class")
        ax.set_ylabel("class")
    fig.colorbar(im, ax=ax, label="correlation" if normalize else "kernel")
    if title:
        ax.set_title(title)
    return fig


def phase_diagram(
    activation: Any,
    W_std: Any,  # noqa: N803
    b_std: Any,
    quantity: str = "xi_c",
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "magma",
) -> Figure:
    r"""Order-to-chaos phase diagram of a nonlinearity in the ``(W_std^2, b_std^2)`` plane.

    Colours one :class:`infnets.criticality.Criticality` quantity over the grid (by default
    the correlation depth scale ``xi_c``, on a log scale capped at ``10^3``, which diverges on
    the critical line)
    and draws the critical line ``chi_1 = 1`` (Schoenholz et al. 2017, "Deep information
    propagation", Fig. 1; Poole et al. 2016).

    Args:
        activation: an infnets elementwise layer (e.g. ``stax.Erf()``,
            ``stax.ElementwiseNumerical(torch.tanh)``).
        W_std: 1-D grid of weight standard deviations (``A`` values).
        b_std: 1-D grid of bias standard deviations (``B`` values).
        quantity: a field of :class:`~infnets.criticality.Criticality` (``'xi_c'``,
            ``'chi_1'``, ``'q_star'``, ``'c_star'``, ...); ``xi_*`` and ``q_star`` are shown
            in ``log10``.
        ax: axes to draw on (default: a new figure).
        title: axes title.
        cmap: matplotlib colour map.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> import torch
        >>> from infnets import stax
        >>> fig = phase_diagram(stax.Erf(), torch.linspace(0.5, 2.5, 12), torch.linspace(0, 1, 8))
        >>> fig.axes[0].get_xlabel()
        '$\\sigma_w^2$ (W_std$^2$)'
    """
    import torch

    from infnets import criticality as cr

    if quantity not in cr.Criticality._fields:
        raise ValueError(f"phase_diagram: quantity must be one of {cr.Criticality._fields}.")
    w = torch.as_tensor(_np(W_std), dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(_np(b_std), dtype=torch.float64).reshape(-1)
    values = getattr(cr.criticality(activation, w[None, :], b[:, None]), quantity).numpy()
    logged = quantity.startswith("xi") or quantity == "q_star"
    if logged:  # depth scales diverge on the line: the colours stop at 10^3
        with np.errstate(divide="ignore"):
            values = np.log10(np.clip(values, 1e-300, 1e3 if quantity.startswith("xi") else 1e300))
    fig, ax = _figure_axes(ax, (6.0, 4.8))
    w2, b2 = w.numpy() ** 2, b.numpy() ** 2
    mesh = ax.pcolormesh(w2, b2, values, cmap=cmap, shading="nearest")
    fig.colorbar(mesh, ax=ax, label=f"log10 {quantity}" if logged else quantity)
    line_w, _ = cr.critical_line(activation, b)
    ok = np.isfinite(line_w.numpy())
    ax.plot(line_w.numpy()[ok] ** 2, b2[ok], color="w", lw=2, label=r"critical line $\chi_1 = 1$")
    ax.set_xlim(w2.min(), w2.max())
    ax.set_ylim(b2.min(), b2.max())
    ax.set_xlabel(r"$\sigma_w^2$ (W_std$^2$)")
    ax.set_ylabel(r"$\sigma_b^2$ (b_std$^2$)")
    ax.text(0.03, 0.95, "ordered", transform=ax.transAxes, color="w", va="top")
    ax.text(0.97, 0.05, "chaotic", transform=ax.transAxes, color="w", ha="right")
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    return fig


def save(fig: Figure, path: Any, dpi: int = 120) -> str:
    """Write a figure to ``path`` (format from the suffix, e.g. ``.png``) with Agg.

    Args:
        fig: a matplotlib figure.
        path: destination file (parent folders are created).
        dpi: resolution.

    Returns:
        The path written, as a string.

    Examples:
        >>> import os, tempfile
        >>> fig, _ = figure()
        >>> path = save(fig, os.path.join(tempfile.mkdtemp(), 'empty.png'))
        >>> open(path, 'rb').read(4)
        b'\x89PNG'
    """
    import os

    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)  # attach an Agg canvas: no GUI backend is ever involved
    fig.savefig(path, dpi=dpi)
    return path
