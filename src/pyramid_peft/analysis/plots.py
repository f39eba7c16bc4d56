"""Figures of the analyses: labelled heatmaps and scatter plots, written as PNG.

Figures are built with ``matplotlib.figure.Figure`` directly, not ``pyplot``: no global backend or figure registry
is touched, so the analyses run headless and in long-lived processes without leaking figures.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

DPI = 150


def new_figure(width: float, height: float, panels: int = 1) -> tuple[Figure, list]:
    """A figure of ``panels`` side-by-side axes."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def caption(fig: Figure, text: str) -> None:
    """A small wrapped caption under the figure's panels (the constrained layout makes room for it)."""
    width = max(40, int(fig.get_figwidth() * 14))  # about 14 characters of 8-point text per inch
    fig.supxlabel(textwrap.fill(text, width), fontsize=8, ha="center")


def heatmap(
    ax,
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    fmt: str | None = "{:.2f}",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """A labelled heatmap with a colorbar; cells are annotated with ``fmt`` when the grid is small enough to read.

    Without ``vmin`` / ``vmax`` the colours span the data's own range (NaN cells left out).
    """
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    _label_grid(ax, rows, columns, title, xlabel, ylabel)
    ax.figure.colorbar(image, ax=ax, label=colorbar)
    if fmt is not None and matrix.size <= 400:
        _annotate(ax, matrix, fmt, image)


def category_heatmap(
    ax,
    codes: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    categories: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
) -> None:
    """A heatmap of category indices (``-1`` = none) with one colour per category and a labelled colorbar."""
    colors = _category_colors(len(categories))
    cmap = ListedColormap(colors).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(-0.5, len(categories)), len(categories))
    masked = np.ma.masked_less(codes, 0)
    image = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _label_grid(ax, rows, columns, title, xlabel, ylabel)
    bar = ax.figure.colorbar(image, ax=ax, label=colorbar, ticks=np.arange(len(categories)))
    bar.ax.set_yticklabels(list(categories))


def labelled_scatter(ax, points: np.ndarray, labels: Sequence[str], *, title: str, xlabel: str, ylabel: str) -> None:
    """One marker per point, each with its own colour, legend entry and text label."""
    colors = _category_colors(len(labels))
    for (x, y), label, color in zip(points, labels, colors):
        ax.scatter([x], [y], s=80, color=color, edgecolor="black", label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="grey", linewidth=0.5, zorder=1)
    ax.axvline(0, color="grey", linewidth=0.5, zorder=1)
    ax.grid(True, alpha=0.3)
    ax.legend(title="task", fontsize=8, loc="best")


def _label_grid(ax, rows, columns, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=7 if len(rows) > 24 else None)
    # Long axes (one column per adapted layer) need small, vertical labels to stay legible; long names stand
    # upright, short ones (``E1 k=2``) lean.
    small = len(columns) > 24
    longest = _longest(columns)
    rotation = 90 if small or longest > 12 else 45 if longest > 4 else 0
    ax.set_xticks(
        range(len(columns)),
        labels=list(columns),
        rotation=rotation,
        ha="right" if rotation == 45 else "center",
        fontsize=5 if small else None,
    )


def _annotate(ax, matrix: np.ndarray, fmt: str, image) -> None:
    """Cell values in black or white, whichever reads better on the cell's colour."""
    for (i, j), value in np.ndenumerate(matrix):
        if np.isnan(value):
            continue
        shade = np.mean(image.cmap(image.norm(value))[:3])
        color = "black" if shade > 0.5 else "white"
        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7, color=color)


def _category_colors(n: int) -> list:
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20"
    palette = colormaps[name]
    return [palette(i % palette.N) for i in range(n)]


def _longest(labels: Sequence[str]) -> int:
    return max((len(str(label)) for label in labels), default=0)
