"""The book's figure style and what every figure shares: the size of the text column, the
matplotlib style, a distinct look per series, legends outside the data, and how a figure is glued
for its numbered, captioned place in the book.

Used by ``report.plots`` and ``report.map_plots`` (every chapter's figures).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

STYLE = {
    "figure.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}
plt.rcParams.update(STYLE)  # the book's look, for every figure module that imports this one


BOOK_WIDTH = 7.3  # inches: the book's text column (about 800 px at the style's 110 dpi)


# one look per curve when several share an axis: colour, marker, line style and width all differ,
# and later curves are thinner and drawn on top, so a curve that coincides with an earlier one (a
# model and its weight-shared twin) shows as a thin line inside a thick one, not as one line
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


SERIES_LINES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (2, 1)), (0, (8, 2)), (0, (1, 2)))


def series_style(i: int) -> dict:
    """Matplotlib style of the ``i``-th of several curves on one axis (see ``SERIES_MARKERS``)."""
    return dict(color=f"C{i % 10}", marker=SERIES_MARKERS[i % len(SERIES_MARKERS)],
                linestyle=SERIES_LINES[i % len(SERIES_LINES)], linewidth=max(2.8 - 0.35 * i, 1.0),
                markersize=max(7.5 - 0.7 * i, 3.5), zorder=2 + i)


def glue_figure(name: str, fig) -> None:
    """Glue ``fig`` under ``name`` for a ``{glue:figure}`` directive, then close it.

    The figure is glued *displayed*: the book hides that output (the cell is tagged
    ``remove-output``) and shows the figure once, numbered and captioned, where the directive
    is, while JupyterLab, which does not read glue, still shows it as the cell's output. Closing
    it stops the inline backend from drawing it a second time.
    """
    from myst_nb import glue

    glue(name, fig, display=True)
    plt.close(fig)


def legend_below(fig, axes, ncol: int = 3, **kw):
    """One legend for ``axes`` (their handles, each label once) under the figure, outside every
    panel; the figure must use the constrained layout. Removes the panels' own legends."""
    seen: dict[str, object] = {}
    for ax in np.atleast_1d(axes).flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncol=min(ncol, len(seen)), fontsize=8, frameon=False, **kw)
    return fig


def legend_in(ax, handles, labels, **kw):
    """A legend filling an otherwise empty panel ``ax`` (switched off as axes)."""
    ax.axis("off")
    ax.legend(handles, labels, loc="center", fontsize=8, frameon=False, **kw)


def show_image(ax, img: torch.Tensor, cmap="gray_r"):
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap, vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def band(ax, x, runs: np.ndarray, scale: float = 1.0, **style):
    """Mean line of ``runs`` (one row per seed) with a +/- one standard deviation band."""
    runs = scale * np.atleast_2d(np.asarray(runs, dtype=float))
    mean = runs.mean(0)
    line, = ax.plot(x, mean, **style)
    if len(runs) > 1:
        std = runs.std(0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    return line
