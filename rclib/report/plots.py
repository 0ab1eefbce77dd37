"""Figures: one function per figure kind, one style. Each returns the matplotlib Figure.

Used by every chapter; the widgets call the same functions, so a chapter's static figure and
its live explorer draw identical pictures.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from rclib.core.stats import seed_stats
from rclib.robust import boundary

STYLE = {
    "figure.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}
plt.rcParams.update(STYLE)


def _show_image(ax, img: torch.Tensor, cmap="gray_r"):
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap, vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def samples(x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], n: int = 20, title: str = ""):
    """A grid of input images (pixels in [0, 1]) labelled with their class. Chapter 00."""
    n = min(n, len(x))
    cols = min(10, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show_image(ax, x[i])
            ax.set_title(class_names[int(y[i])], fontsize=9)
        else:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _band(ax, x, runs: np.ndarray, scale: float = 1.0, **style):
    """Mean line of ``runs`` (one row per seed) with a +/- one standard deviation band."""
    runs = scale * np.atleast_2d(np.asarray(runs, dtype=float))
    mean = runs.mean(0)
    line, = ax.plot(x, mean, **style)
    if len(runs) > 1:
        std = runs.std(0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def training_curve(history: Sequence[dict] | Sequence[Sequence[dict]], title: str = "Baseline training"):
    """Training loss (left axis) and training accuracy in % (right axis) per epoch; several
    histories (one per seed) give means with +/- std bands. Chapter 00."""
    runs = [history] if history and isinstance(history[0], dict) else list(history)
    epochs = [h["epoch"] for h in runs[0]]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    _band(ax, epochs, [[h["loss"] for h in r] for r in runs], marker="o", color="C0", label="loss")
    ax.set_xlabel("epoch" + (f" (mean ± std over {len(runs)} seeds)" if len(runs) > 1 else ""))
    ax.set_ylabel("cross-entropy loss", color="C0")
    if all("accuracy" in h for r in runs for h in r):
        ax2 = ax.twinx()
        _band(ax2, epochs, [[h["accuracy"] for h in r] for r in runs], 100, marker="s", color="C1", label="accuracy")
        ax2.set_ylabel("training accuracy (%)", color="C1")
        ax2.set_ylim(0, 100)
        ax2.grid(False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def robust_curves(epsilons: Sequence[float], curves: dict[str, Sequence[float]],
                  paper: dict[str, tuple[float, float]] | None = None,
                  title: str = "FGSM robust accuracy", attack: str = "FGSM",
                  operating: tuple[float, float] | None = None):
    """Robust accuracy (%) against epsilon for one or more models; a model's curve may be one
    list or one list per seed (then its mean with a +/- std band).

    ``paper`` marks points reported by the paper: ``{label: (epsilon, accuracy in [0, 1])}``.
    ``operating``: ``(epsilon, target accuracy in [0, 1])`` of the paper's operating point
    (:mod:`rclib.experiments.operating`), drawn as dotted lines. Chapters 00, 04 and 05.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (label, acc) in enumerate(curves.items()):
        _band(ax, epsilons, acc, 100, marker="o", color=f"C{i}", label=label)
    for label, (eps, acc) in (paper or {}).items():
        ax.plot([eps], [100 * acc], "*", markersize=12, color="k", label=label)
    if operating is not None:
        eps, target = operating
        ax.axvline(eps, color="0.3", linestyle=":", linewidth=1)
        ax.axhline(100 * target, color="0.3", linestyle=":", linewidth=1,
                   label=f"operating point: $\\epsilon$ = {eps:g}, {100 * target:.0f} %")
    ax.set_xlabel(r"$\epsilon$ (L$\infty$ step, pixels in [0, 1])")
    ax.set_ylabel(f"{attack} robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def adversarial_examples(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, pred_clean: torch.Tensor,
                         pred_adv: torch.Tensor, class_names: Sequence[str], eps: float, n: int = 6):
    """Rows: clean image, perturbation (x_adv - x), adversarial image, with predicted labels.

    The perturbation is drawn on a diverging scale from -eps to +eps (at eps 0, where nothing
    changes, on +/- one grey level of an 8-bit image, so the colourbar stays readable).
    Chapters 00 and 03 (viewer).
    """
    n = min(n, len(x))
    scale = max(float(eps), 1 / 255)
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 4.6), squeeze=False)
    for i in range(n):
        _show_image(axes[0, i], x[i])
        ok = int(pred_clean[i]) == int(y[i])
        axes[0, i].set_title(f"pred {class_names[int(pred_clean[i])]}", fontsize=9, color="k" if ok else "r")
        delta = (x_adv[i] - x[i]).detach().cpu().mean(0)
        axes[1, i].imshow(delta.numpy(), cmap="RdBu", vmin=-scale, vmax=scale)
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
        axes[1, i].grid(False)
        _show_image(axes[2, i], x_adv[i])
        ok = int(pred_adv[i]) == int(y[i])
        axes[2, i].set_title(f"pred {class_names[int(pred_adv[i])]}", fontsize=9, color="k" if ok else "r")
    axes[0, 0].set_ylabel("clean")
    axes[1, 0].set_ylabel("perturbation")
    axes[2, 0].set_ylabel("adversarial")
    fig.suptitle(f"FGSM, $\\epsilon$ = {eps:g} (red label: misclassified)")
    fig.tight_layout()
    return fig


METHOD_STYLE = {
    "global": dict(color="C0", marker="o"),
    "layer": dict(color="C1", marker="s"),
    "channel": dict(color="C2", marker="^"),
    "channel (hardened)": dict(color="C2", marker="x", linestyle="--"),
    "iterative (hardened)": dict(color="C3", marker="D"),
}


def _by_method(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["rate"]) for m, rs in out.items()}


def metric_vs_rate(rows: Sequence[dict], metric: str, ylabel: str, title: str,
                   baseline: float | Sequence[float] | None = None, percent: bool = True, ax=None):
    """One line per pruning method: ``metric`` against prune rate (Figure 1 and its FGSM twin;
    Figure 3 with ``metric="approx_mb"``). Rows from several seeds give the mean with a band of
    +/- one standard deviation. ``baseline`` (one value, or one per seed) draws the unpruned
    value, with its band. Chapter 01."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.8, 3.6))
    scale = 100 if percent else 1
    seeds = {r.get("seed") for r in rows}
    for method, rs in _by_method(rows).items():
        rates, mean, std, _ = seed_stats(rs, metric, scale)
        line, = ax.plot(rates, mean, label=method, **METHOD_STYLE.get(method, {}))
        if std.any():
            ax.fill_between(rates, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    if baseline is not None:
        b = scale * np.atleast_1d(np.asarray(baseline, dtype=float))
        ax.axhline(b.mean(), color="grey", linestyle=":", label="unpruned")
        if len(b) > 1:
            ax.axhspan(b.mean() - b.std(ddof=1), b.mean() + b.std(ddof=1), color="grey", alpha=0.1, linewidth=0)
    ax.set_xlabel("prune rate r")
    ax.set_ylabel(ylabel + (f"\nmean ± std over {len(seeds)} seeds" if len(seeds) > 1 else ""))
    if percent:
        ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_sparsity(tables: dict, rate: float):
    """Figure 2: sparsity (%) of each prunable layer, one bar group per method; tables holding
    several seeds (a ``seed`` column, rows per layer and seed) give mean bars with +/- std error
    bars. Chapter 01."""
    names = list(dict.fromkeys(next(iter(tables.values()))["layer"].tolist()))
    x = np.arange(len(names))
    width = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (label, table) in enumerate(tables.items()):
        g = table.groupby("layer", sort=False)["sparsity"]
        mean, std = g.mean().reindex(names), g.std(ddof=1).reindex(names).fillna(0.0)
        ax.bar(x + i * width - 0.4 + width / 2, 100 * mean, width, yerr=100 * std, capsize=2, label=label)
    ax.axhline(100 * rate, color="grey", linestyle=":", label=f"target r = {rate:g}")
    ax.set_xticks(x, [n.replace("features.", "conv ").replace("classifier.", "fc ") for n in names],
                  rotation=60, fontsize=8)
    ax.set_ylabel("weights pruned (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Sparsity by prunable layer at r = {rate:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def latency_bars(rows: Sequence[dict], flop_ratio: float):
    """Figure 4: forward latency (ms) of model variants at each batch size, with the speed-up
    a FLOP count would predict drawn as the hardened model's limit. Chapter 01.

    ``rows``: dicts with ``model``, ``batch`` and ``seconds``; the first model is the reference.
    """
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(3.4 * len(batches), 3.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        ms = {m: np.array([1e3 * r["seconds"] for r in rows if r["batch"] == b and r["model"] == m]) for m in labels}
        t = {m: v.mean() for m, v in ms.items()}  # mean over seeds' models when several
        err = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in ms.values()]
        ax.bar(labels, [t[m] for m in labels], yerr=err, capsize=3, color=[f"C{i}" for i in range(len(labels))])
        ax.axhline(t[labels[0]] / flop_ratio, color="k", linestyle="--",
                   label=f"unpruned / FLOP ratio ({flop_ratio:.1f}x)")
        ax.set_title(f"batch {b}")
        ax.set_ylabel("forward pass (ms)")
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=7)
    fig.suptitle("Inference latency (median of repeated runs, CPU)")
    fig.tight_layout()
    return fig


def compression_vs_rate(rows: Sequence[dict]):
    """Figure 3: model size against prune rate per method; left the paper's formula (non-zero
    parameters x 32 bit), right the bytes of the model's safetensors file (dense: masked zeros
    are stored; a hardened model stores only what is left). Both in MB (10^6 bytes). Chapter 01."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, scale, title in ((axes[0], "approx_mb", 1.0, "paper's approximate size"),
                                  (axes[1], "dense_bytes", 1e-6, "safetensors file")):
        for method, rs in _by_method(rows).items():  # mean over seeds (sizes barely vary)
            rates, mean, std, _ = seed_stats(rs, key, scale)
            line, = ax.plot(rates, mean, label=method, **METHOD_STYLE.get(method, {}))
            if std.any():
                ax.fill_between(rates, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("prune rate r")
        ax.set_title(title)
    axes[0].set_ylabel("size (MB, log scale)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Compression vs prune rate")
    fig.tight_layout()
    return fig


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
    return fig


def decision_maps(maps: Sequence, titles: Sequence[str], num_classes: int, ncols: int = 4,
                  suptitle: str = "", points: bool = True):
    """A grid of decision maps with a shared class legend (Figure 7 / Figure 8)."""
    import matplotlib
    import matplotlib.patches as mpatches

    n = len(maps)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 3.0 * nrows + 0.6), squeeze=False)
    for ax, m, t in zip(axes.flat, maps, titles):
        decision_map(m, num_classes, t, ax=ax, points=points)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors
    handles = [mpatches.Patch(color=colours[k % len(colours)], label=str(k)) for k in range(num_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(num_classes, 10), fontsize=8,
               title="predicted class (pale = low confidence)", title_fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def table1_bars(summary, rates: Sequence[float], variants: Sequence[str], paper: dict | None = None):
    """Chapter 04: clean and FGSM robust accuracy (%) of each Table 1 variant, mean over seeds
    with the min-max spread as error bars, one panel per prune rate; the paper's robust
    accuracies as black ticks on the first panel.

    ``summary``: a DataFrame with columns rate, variant, metric ("accuracy" |
    "robust_accuracy"), mean, min, max (fractions in [0, 1]).
    """
    fig, axes = plt.subplots(1, len(rates), figsize=(5.6 * len(rates), 4.2), sharey=True, squeeze=False)
    x = np.arange(len(variants))
    for ax, rate in zip(axes[0], rates):
        for i, (metric, label) in enumerate((("accuracy", "clean"), ("robust_accuracy", "FGSM robust"))):
            s = summary[(summary.rate == rate) & (summary.metric == metric)].set_index("variant").loc[list(variants)]
            err = np.vstack([s["mean"] - s["min"], s["max"] - s["mean"]]) * 100
            ax.bar(x + (i - 0.5) * 0.38, 100 * s["mean"], 0.38, yerr=err, capsize=3, label=label,
                   color=f"C{i}")
        if paper is not None and ax is axes[0][0]:
            ax.scatter(x + 0.19, [paper[v]["robust_accuracy"] for v in variants], marker="_", s=300,
                       color="k", zorder=3, label="paper, FGSM robust (ImageNet)")
        ax.set_xticks(x, [v.replace("Pruned + ", "+ ") for v in variants], rotation=25, ha="right", fontsize=8)
        ax.set_title(f"global pruning at r = {rate:g}")
        ax.set_ylim(0, 125)  # headroom for the legend above the bars
        ax.set_yticks(range(0, 101, 20))
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="upper center", ncol=3)
    fig.suptitle("Table 1 as bars: mean over seeds, error bars from min to max")
    fig.tight_layout()
    return fig


def roughness_scatter(rows: Sequence[dict], metrics: Sequence[tuple[str, str]], title: str = ""):
    """Chapter 03: FGSM robust accuracy (%) against each roughness measure, one panel per
    measure, one marker per pruning method, filled without and hollow with weight sharing.

    ``rows``: dicts with ``method``, ``shared``, ``robust_accuracy`` and the ``metrics`` keys;
    ``metrics``: ``(key, axis label)`` pairs.
    """
    markers = {"baseline": "*", "global": "o", "layer": "s", "channel": "^", "iterative": "D"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for i, method in enumerate(markers):
            for shared in (False, True):
                pts = [r for r in rows if r["method"] == method and bool(r["shared"]) == shared]
                if not pts:
                    continue
                ax.scatter([r[key] for r in pts], [100 * r["robust_accuracy"] for r in pts],
                           marker=markers[method], s=60 if method == "baseline" else 36,
                           facecolors="none" if shared else f"C{i}", edgecolors=f"C{i}",
                           label=f"{method}{' + WS' if shared else ''}")
        ax.set_xlabel(label)
        ax.set_ylabel("FGSM robust accuracy (%)")
    if axes[0][0].get_legend_handles_labels()[0]:  # no rows (no model beats chance): no legend to draw
        axes[0][0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def distance_curves(grid: Sequence[float], curves: dict[str, Sequence[Sequence[float]]],
                    points: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                    title: str = "Robust accuracy implied by the distances"):
    """Robust accuracy (%) at every eps of ``grid`` implied by per-input distances, one band per
    model (mean +/- one std over seeds; ``curves[label]`` one list per seed), with fixed-eps
    attack results as markers in the model's colour (``points[label] = (eps, accuracy in
    [0, 1])``, e.g. chapter 05's PGD-10 means). Chapter 06."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    styles = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))  # a weight-shared twin must not hide its source
    for i, (label, runs) in enumerate(curves.items()):
        _band(ax, grid, runs, 100, color=f"C{i}", label=label, linestyle=styles[i % len(styles)],
              linewidth=max(2.6 - 0.4 * i, 1.0))  # later curves thinner, drawn over earlier ones
        if points and label in points:
            eps, acc = points[label]
            ax.plot(eps, 100 * np.asarray(acc, dtype=float), "D", color=f"C{i}", markersize=5,
                    markeredgecolor="k", markeredgewidth=0.6)
    if points:
        ax.plot([], [], "D", color="0.6", markeredgecolor="k", markeredgewidth=0.6, label="PGD-10 (chapter 05)")
    ax.set_xlabel(r"$\epsilon$ (L$\infty$, pixels in [0, 1])")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def margin_vs_distance(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], unflipped: float, top: float,
                       title: str = "Logit margin against distance to the boundary"):
    """One scatter per model of the clean logit margin (x) against the input's distance to the
    boundary (y), over the inputs classified correctly; inputs no attack flipped (distance
    ``unflipped``) are drawn as triangles at ``top`` (the largest eps tried). Chapter 06."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.0), squeeze=False, sharey=True)
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
