"""Figures of decision boundaries and distances: PCA and local decision maps (the paper's
Figures 7-8), roughness against robustness, distance curves and margins, and the shared weights.

Used by chapters 02-04 and 06.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch

from rclib.report.figstyle import (
    BOOK_WIDTH,
    band,
    legend_below,
    legend_in,
    series_style,
)
from rclib.robust import boundary


def decision_map(dmap, num_classes: int, title: str = "", ax=None, points: bool = True):
    """One decision map (``boundary.DecisionMap``): colour = predicted class, intensity =
    confidence (pale = uncertain), optionally the projected data points. Figures 7 and 8."""

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(boundary.rgb(dmap, num_classes), origin="lower", extent=dmap.extent,
              aspect="auto", interpolation="nearest")
    if points and dmap.points is not None and len(dmap.points):
        ax.scatter(dmap.points[:, 0], dmap.points[:, 1], s=3, c="k", alpha=0.25, linewidths=0)
    local = dmap.info.get("kind") == "local"
    axis = ("gradient-sign direction (pixels)", "random direction") if local else ("PC 1", "PC 2")
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    ax.set_xlim(dmap.extent[0], dmap.extent[1])
    ax.set_ylim(dmap.extent[2], dmap.extent[3])
    ax.set_title(title, fontsize=9)
    ax.grid(False)  # grid lines would cross the map's own boundaries
    return fig


def decision_maps(maps: Sequence, titles: Sequence[str], num_classes: int, ncols: int = 3,
                  suptitle: str = "", points: bool = True):
    """A grid of decision maps with one class legend (chapter 03's maps after the paper's
    Figure 7, chapter 04's after its Figure 8), sized for the book's text column: ``ncols``
    maps per row share ``BOOK_WIDTH``, so at the default 3 each map is about 260 px wide. The
    legend takes the first empty cell of the grid, or a row below it when the grid is full."""
    import matplotlib
    import matplotlib.patches as mpatches

    n = len(maps)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    spare = nrows * ncols > n  # an empty cell to hold the legend
    side = BOOK_WIDTH / ncols
    height = nrows * (0.9 * side + 0.45) + (0 if spare else 0.7) + (0.35 if suptitle else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(BOOK_WIDTH, height), squeeze=False, layout="constrained")
    for ax, m, t in zip(axes.flat, maps, titles):
        decision_map(m, num_classes, t, ax=ax, points=points)
        ax.title.set_fontsize(9.5)
        ax.tick_params(labelsize=8)
        ax.xaxis.label.set_fontsize(8.5)
        ax.yaxis.label.set_fontsize(8.5)
    colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors
    handles = [mpatches.Patch(color=colours[k % len(colours)], label=str(k)) for k in range(num_classes)]
    title = "predicted class\n(pale = low confidence)"
    empty = list(axes.flat)[n:]
    for ax in empty:
        ax.axis("off")
    if empty:
        legend_in(empty[0], handles, [h.get_label() for h in handles], ncol=2, title=title, title_fontsize=8.5)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(num_classes, 10), fontsize=8,
                   title=title.replace("\n", " "), title_fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10.5)
    return fig


def roughness_scatter(rows: Sequence[dict], metrics: Sequence[tuple[str, str]], title: str = ""):
    """Chapter 03: FGSM robust accuracy (%) against each roughness measure, one panel per
    measure, one marker per pruning method, filled without and hollow with weight sharing. Each
    point is one model of one seed (nothing averaged). Panels two to a row; the legend takes the
    grid's empty cell, or a row below it, never a panel's data area.

    ``rows``: dicts with ``method``, ``shared``, ``robust_accuracy`` and the ``metrics`` keys;
    ``metrics``: ``(key, axis label)`` pairs.
    """
    markers = {"baseline": "*", "global": "o", "layer": "s", "channel": "^", "iterative": "D"}
    ncols = min(2, len(metrics))
    nrows = (len(metrics) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(BOOK_WIDTH, 3.2 * nrows + (0.4 if title else 0)),
                             squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax, (key, label) in zip(flat, metrics):
        for i, method in enumerate(markers):
            for shared in (False, True):
                pts = [r for r in rows if r["method"] == method and bool(r["shared"]) == shared]
                if not pts:
                    continue
                ax.scatter([r[key] for r in pts], [100 * r["robust_accuracy"] for r in pts],
                           marker=markers[method], s=70 if method == "baseline" else 36,
                           facecolors="none" if shared else f"C{i}", edgecolors=f"C{i}",
                           label=f"{method}{' + WS' if shared else ''}")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("FGSM robust accuracy (%)", fontsize=9)
    handles, labels = flat[0].get_legend_handles_labels()
    empty = flat[len(metrics):]
    for ax in empty:
        ax.axis("off")
    if handles:  # no rows (no model beats chance): no legend to draw
        if empty:
            legend_in(empty[0], handles, labels, ncol=2, title="pruning method (hollow: + weight sharing)",
                       title_fontsize=8.5)
        else:
            fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10.5)
    return fig


def distance_curves(grid: Sequence[float], curves: dict[str, Sequence[Sequence[float]]],
                    points: dict[str, tuple] | None = None,
                    title: str = "Robust accuracy implied by the distances"):
    """Robust accuracy (%) at every eps of ``grid`` implied by per-input distances, one band per
    model (mean +/- one sample standard deviation over seeds; ``curves[label]`` one list per
    seed), with fixed-eps attack results as diamonds in the model's colour: ``points[label] =
    (eps, mean accuracy in [0, 1])`` or ``(eps, mean, sample std)``, the std drawn as error bars
    (e.g. chapter 05's PGD-10 over seeds). Every model has its own line style, width and colour
    (:func:`series_style`), later ones thinner and on top. Chapter 06."""
    entries = len(curves) + bool(points)
    fig, ax = plt.subplots(figsize=(6.4, 3.6 + 0.3 * ((entries + 1) // 2)), layout="constrained")
    for i, (label, runs) in enumerate(curves.items()):
        style = dict(series_style(i), marker=None)  # a dense grid: lines, no markers
        band(ax, grid, runs, 100, label=label, **style)
        if points and label in points:
            eps, acc, *sd = points[label]
            err = 100 * np.asarray(sd[0], dtype=float) if sd else None
            ax.errorbar(eps, 100 * np.asarray(acc, dtype=float), yerr=err, fmt="D", color=f"C{i % 10}",
                        markersize=5, markeredgecolor="k", markeredgewidth=0.6, capsize=2, elinewidth=1,
                        zorder=20)
    if points:
        ax.plot([], [], "D", color="0.6", markeredgecolor="k", markeredgewidth=0.6,
                label="PGD-10 (chapter 05), mean ± 1 sd")
    ax.set_xlabel(r"$\epsilon$ (L$\infty$, pixels in [0, 1])")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return fig


def margin_vs_distance(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], unflipped: float, top: float,
                       title: str = "Logit margin against distance to the boundary"):
    """One scatter per model of the clean logit margin (x) against the input's distance to the
    boundary (y), over the inputs classified correctly; inputs no attack flipped (distance
    ``unflipped``) are drawn as triangles at ``top`` (the largest eps tried). Chapter 06."""
    fig, axes = plt.subplots(1, len(panels), figsize=(min(3.0 * len(panels), BOOK_WIDTH), 3.1), squeeze=False,
                             sharey=True)
    for ax, (label, (margin, dist)) in zip(axes[0], panels.items()):
        right = dist > 0
        m, d = margin[right].numpy(), dist[right].numpy()
        far = d >= unflipped
        ax.scatter(m[~far], d[~far], s=10, alpha=0.6)
        ax.scatter(m[far], np.full(int(far.sum()), top), marker="^", s=14, color="C3",
                   label="no flip found" if far.any() else None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("logit margin $z_y - \\max_{j \\ne y} z_j$")
        if far.any():
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(r"distance ($L\infty$)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def shared_weights(layers: Sequence[tuple[str, np.ndarray, np.ndarray]], zoom_values: int = 12):
    """Chapter 02, after the paper's Figure 6: the non-zero weights of some layers before and
    after weight sharing, one row per layer.

    Left, the whole range in 200 bins (the shared weights as an outline over the float ones),
    with every shared value as a tick under the axis: a
    layer may have 256 shared values, more than a column of 800 px can show as spikes, so the
    ticks mark them and the shaded window is drawn, right, in fine bins (about a dozen per gap
    between shared values), where each shared value is one spike and the float weights a
    continuous spread. Counts on a log scale.

    ``layers``: ``(title, weights before, weights after)``, the weights as 1-D arrays of the
    layer's non-zero values; ``zoom_values``: how many consecutive shared values the zoom shows,
    around the most populated one.
    """
    fig, axes = plt.subplots(len(layers), 2, figsize=(BOOK_WIDTH, 2.7 * len(layers) + 0.5), squeeze=False,
                             layout="constrained", width_ratios=(1.25, 1))
    for (full, zoom), (title, wb, wa) in zip(axes, layers):
        wb, wa = np.asarray(wb, dtype=float), np.asarray(wa, dtype=float)
        values, counts = np.unique(wa, return_counts=True)
        edges = np.linspace(min(wb.min(), wa.min()), max(wb.max(), wa.max()), 201)
        full.hist(wb, bins=edges, color="C0", alpha=0.6, label="pruned (float32)")
        full.hist(wa, bins=edges, color="C3", histtype="step", linewidth=0.9, label="weight-shared")
        full.vlines(values, 0, 0.06, transform=full.get_xaxis_transform(), color="C3", linewidth=0.6,
                    label="a shared value")
        # the zoom: zoom_values consecutive shared values around the most populated one, on one side
        # of zero (pruning leaves a gap around it: a window across it would show mostly nothing)
        side = values > 0 if (values > 0).sum() >= (values < 0).sum() else values < 0
        first, last = np.flatnonzero(side)[[0, -1]]
        k = min(zoom_values, last - first + 1)
        peak = first + int(np.argmax(counts[first:last + 1]))
        lo = int(np.clip(peak - k // 2, first, last + 1 - k))
        window = values[lo:lo + k]
        gap = float(np.diff(values).min()) if len(values) > 1 else max(abs(float(values[0])), 1e-3)
        left = (window[0] + values[lo - 1]) / 2 if lo > first else window[0] - gap / 2
        right = (window[-1] + values[lo + k]) / 2 if lo + k <= last else window[-1] + gap / 2
        fine = np.linspace(left, right, 12 * k + 1)
        zoom.hist(wb[(wb >= left) & (wb <= right)], bins=fine, color="C0", alpha=0.6)
        zoom.hist(wa[(wa >= left) & (wa <= right)], bins=fine, color="C3", alpha=0.8)
        full.axvspan(left, right, color="0.5", alpha=0.2, linewidth=0, label="zoomed window (right)")
        for ax in (full, zoom):
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("weight value", fontsize=9)
            ax.tick_params(labelsize=8)
        full.set_ylabel("count per bin (log scale)", fontsize=9)
        full.set_title(f"{title}: {len(values)} shared values", fontsize=9.5)
        zoom.set_title(f"zoom: {k} of them, fine bins", fontsize=9.5)
        zoom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))  # the default's 8 labels overlap
        full.legend()  # collected below the figure
    return legend_below(fig, axes, ncol=4)
