"""Figures: one function per figure kind, one style. Each returns the matplotlib Figure.

Used by every chapter; the widgets call the same functions, so a chapter's static figure and
its live explorer draw identical pictures.

Conventions, the same in every figure (and stated in every caption): a line, bar or point
about several seeds is their mean, and its band or error bar is plus/minus one *sample*
standard deviation over the seeds (ddof 1; none with a single seed). Figures are sized for the
book's text column, ``BOOK_WIDTH`` inches at the style's dpi (about 800 px), so that the book
shows them at their own size and their labels stay legible. A chapter glues each figure with
:func:`glue_figure` and shows it, numbered and captioned, with myst-nb's ``{glue:figure}``.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from rclib.core.stats import seed_stats
from rclib.report.figstyle import (
    BOOK_WIDTH,
    band,
    legend_below,
    legend_in,
    series_style,
    show_image,
)


def samples(x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], n: int = 20, title: str = ""):
    """A grid of input images (pixels in [0, 1]) labelled with their class. Chapter 00."""
    n = min(n, len(x))
    cols = min(10, n)
    rows = int(np.ceil(n / cols))
    size = min(1.0, BOOK_WIDTH / cols)  # inches per image: a row of ten fills the text column
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.3) * rows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            show_image(ax, x[i])
            ax.set_title(class_names[int(y[i])], fontsize=9)
        else:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curve(history: Sequence[dict] | Sequence[Sequence[dict]], title: str = "Baseline training"):
    """Training loss (left axis) and training accuracy in % (right axis) per epoch; several
    histories (one per seed) give means with +/- std bands. Chapter 00."""
    runs = [history] if history and isinstance(history[0], dict) else list(history)
    epochs = [h["epoch"] for h in runs[0]]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    band(ax, epochs, [[h["loss"] for h in r] for r in runs], marker="o", color="C0", label="loss")
    ax.set_xlabel("epoch" + (f" (mean ± std over {len(runs)} seeds)" if len(runs) > 1 else ""))
    ax.set_ylabel("cross-entropy loss", color="C0")
    if all("accuracy" in h for r in runs for h in r):
        ax2 = ax.twinx()
        band(ax2, epochs, [[h["accuracy"] for h in r] for r in runs], 100, marker="s", color="C1", label="accuracy")
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
    list or one list per seed (then its mean with a +/- one sample standard deviation band).
    Each model has its own colour, marker, line style and width (:func:`series_style`), so
    curves that coincide stay distinguishable.

    ``paper`` marks points reported by the paper: ``{label: (epsilon, accuracy in [0, 1])}``;
    only where the paper's axis means ours (the same data and epsilon scale).
    ``operating``: ``(epsilon, target accuracy in [0, 1])`` of the paper's operating point
    (:mod:`rclib.experiments.operating`), drawn as dotted lines. With more than two models the
    legend goes below the panel. Chapters 00, 04 and 05.
    """
    entries = len(curves) + len(paper or {}) + (operating is not None)
    fig, ax = plt.subplots(figsize=(6.0, 3.4 + (0.3 * ((entries + 1) // 2) if len(curves) > 2 else 0)),
                           layout="constrained")
    for i, (label, acc) in enumerate(curves.items()):
        band(ax, epsilons, acc, 100, label=label, **series_style(i))
    for label, (eps, acc) in (paper or {}).items():
        ax.plot([eps], [100 * acc], "*", markersize=12, color="k", label=label, zorder=20)
    if operating is not None:
        eps, target = operating
        ax.axvline(eps, color="0.3", linestyle=":", linewidth=1)
        ax.axhline(100 * target, color="0.3", linestyle=":", linewidth=1,
                   label=f"operating point: $\\epsilon$ = {eps:g}, {100 * target:.0f} %")
    ax.set_xlabel(r"$\epsilon$ (L$\infty$ step, pixels in [0, 1])")
    ax.set_ylabel(f"{attack} robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    if len(curves) > 2:  # many models: below the panel, never over the curves
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    else:
        ax.legend(fontsize=8)
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
    size = min(1.1, (BOOK_WIDTH - 0.8) / n)  # inches per image; room for the row labels
    fig, axes = plt.subplots(3, n, figsize=(size * n + 0.8, 3 * (size + 0.3) + 0.4), squeeze=False)
    for i in range(n):
        show_image(axes[0, i], x[i])
        ok = int(pred_clean[i]) == int(y[i])
        axes[0, i].set_title(f"pred {class_names[int(pred_clean[i])]}", fontsize=9, color="k" if ok else "r")
        delta = (x_adv[i] - x[i]).detach().cpu().mean(0)
        axes[1, i].imshow(delta.numpy(), cmap="RdBu", vmin=-scale, vmax=scale)
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
        axes[1, i].grid(False)
        show_image(axes[2, i], x_adv[i])
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
    "global + WS": dict(color="C3", marker="x", linestyle="--"),  # chapter 02: global pruning, then weight sharing
}


def _method_style(method: str, i: int) -> dict:
    """``METHOD_STYLE[method]`` with the width, marker size and drawing order of the ``i``-th line:
    later lines thinner and on top, so methods whose curves coincide (the formula sizes of the
    unstructured methods, a model and its weight-shared twin) all stay visible."""
    return dict(METHOD_STYLE.get(method, {}), linewidth=max(2.8 - 0.4 * i, 1.0), markersize=max(7.5 - 0.8 * i, 3.5),
                zorder=2 + i)


def _by_method(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["rate"]) for m, rs in out.items()}


def metric_vs_rate(rows: Sequence[dict], metric: str, ylabel: str, title: str,
                   baseline: float | Sequence[float] | None = None, percent: bool = True, ax=None,
                   legend: bool = True):
    """One line per pruning method: ``metric`` against prune rate (the paper's Figure 1 and its
    FGSM twin; Figure 3 with ``metric="approx_mb"``). Rows from several seeds give the mean with
    a band of +/- one sample standard deviation. ``baseline`` (one value, or one per seed) draws
    the unpruned value, with its band. ``ax``: draw into this panel (see :func:`metric_panels`).
    Chapters 01 and 02."""
    own = ax is None
    fig, ax = (ax.figure, ax) if not own else plt.subplots(figsize=(5.8, 3.6))
    scale = 100 if percent else 1
    seeds = {r.get("seed") for r in rows}
    for i, (method, rs) in enumerate(_by_method(rows).items()):
        rates, mean, std, _ = seed_stats(rs, metric, scale)
        line, = ax.plot(rates, mean, label=method, **_method_style(method, i))
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
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=8)
    if own:
        fig.tight_layout()
    return fig


def metric_panels(rows: Sequence[dict], panels: Sequence[dict]):
    """:func:`metric_vs_rate` panels side by side, sized for the book, with one legend below
    them: each of ``panels`` is a dict of that function's keyword arguments (``metric``,
    ``ylabel``, ``title``, optionally ``baseline``). Chapter 01's accuracy and robust accuracy
    against prune rate, chapter 02's with and without weight sharing."""
    fig, axes = plt.subplots(1, len(panels), figsize=(BOOK_WIDTH, 3.9), squeeze=False, layout="constrained")
    for ax, kw in zip(axes[0], panels):
        metric_vs_rate(rows, ax=ax, legend=False, **kw)
    return legend_below(fig, axes, ncol=3)


def layer_sparsity(tables: dict, rate: float):
    """Figure 2: sparsity (%) of each prunable layer, one bar group per method; tables holding
    several seeds (a ``seed`` column, rows per layer and seed) give mean bars with +/- std error
    bars. Chapter 01."""
    names = list(dict.fromkeys(next(iter(tables.values()))["layer"].tolist()))
    x = np.arange(len(names))
    width = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH, 3.6))
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
    """The paper's Figure 4: forward latency (ms) of model variants at each batch size (bars:
    mean over the seeds' models, error bars +/- one sample standard deviation), with the speed-up
    a FLOP count would predict drawn as the hardened model's limit. Chapter 01.

    ``rows``: dicts with ``model``, ``batch`` and ``seconds``; the first model is the reference.
    """
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(min(3.4 * len(batches), BOOK_WIDTH), 3.9), squeeze=False,
                             layout="constrained")
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
    fig.suptitle("Inference latency (median of repeated runs, CPU)", fontsize=11)
    return legend_below(fig, axes, ncol=1)


def compression_vs_rate(rows: Sequence[dict]):
    """Figure 3: model size against prune rate per method; left the paper's formula (non-zero
    parameters x 32 bit), right the bytes of the model's safetensors file (dense: masked zeros
    are stored; a hardened model stores only what is left). Both in MB (10^6 bytes). Chapter 01."""
    fig, axes = plt.subplots(1, 2, figsize=(BOOK_WIDTH, 3.9), sharey=True, layout="constrained")
    for ax, key, scale, title in ((axes[0], "approx_mb", 1.0, "paper's approximate size"),
                                  (axes[1], "dense_bytes", 1e-6, "safetensors file")):
        for i, (method, rs) in enumerate(_by_method(rows).items()):  # mean over seeds (sizes barely vary)
            rates, mean, std, _ = seed_stats(rs, key, scale)
            line, = ax.plot(rates, mean, label=method, **_method_style(method, i))
            if std.any():
                ax.fill_between(rates, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("prune rate r")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("size (MB, log scale)")
    fig.suptitle("Compression vs prune rate", fontsize=11)
    return legend_below(fig, axes, ncol=3)


def table1_bars(summary, rates: Sequence[float], variants: Sequence[str], paper: dict | None = None,
                epsilon: float | None = None):
    """Chapter 04: clean and FGSM robust accuracy (%) of each Table 1 variant, one panel per prune
    rate; bars are means over seeds and error bars +/- one sample standard deviation (ddof 1).

    ``summary``: a DataFrame with columns rate, variant, metric ("accuracy" |
    "robust_accuracy"), mean, std (fractions in [0, 1]; std NaN for a single seed).
    ``paper``: the paper's Table 1 (:data:`rclib.core.paper.TABLE1`, in %), drawn in a panel of
    its own: its FGSM step (0.03 on ImageNet) is not our operating point on our data, so its
    values never stand on our panels' axes. ``epsilon``: our FGSM step, for the labels.
    """
    panels = len(rates) + (paper is not None)
    ncols = min(2, panels)
    nrows = (panels + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(BOOK_WIDTH, 3.3 * nrows + 0.2), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    x = np.arange(len(variants))
    names = [v.replace("Pruned + ", "+ ") for v in variants]
    ours = f"FGSM robust, $\\epsilon$ = {epsilon:g}" if epsilon is not None else "FGSM robust"
    handles = []
    for ax, rate in zip(flat, rates):
        for i, (metric, label) in enumerate((("accuracy", "clean"), ("robust_accuracy", ours))):
            s = summary[(summary.rate == rate) & (summary.metric == metric)].set_index("variant").loc[list(variants)]
            err = 100 * s["std"].fillna(0.0).to_numpy(float)
            bars = ax.bar(x + (i - 0.5) * 0.38, 100 * s["mean"], 0.38, yerr=err, capsize=3, color=f"C{i}",
                          label=f"ours: {label} (mean ± 1 sd over seeds)")
            if ax is flat[0]:
                handles.append(bars)
        ax.set_title(f"ours: global pruning at r = {rate:g}", fontsize=10)
    last = len(rates)
    if paper is not None:
        ax = flat[last]
        for i, (metric, label) in enumerate((("accuracy", "clean"), ("robust_accuracy", "FGSM robust, $\\epsilon$ = 0.03"))):
            bars = ax.bar(x + (i - 0.5) * 0.38, [paper[v][metric] for v in variants], 0.38, color=f"C{i}",
                          alpha=0.45, hatch="//", edgecolor=f"C{i}", label=f"paper: {label} (ImageNet, one run)")
            handles.append(bars)
        ax.set_title("the paper's Table 1: ImageNet, VGG16, one run", fontsize=10)
        last += 1
    for ax in flat[:last]:
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 105)  # an error bar may reach 100
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("test accuracy (%)")
    labels = [h.get_label() for h in handles]
    if last < len(flat):
        for ax in flat[last + 1:]:
            ax.axis("off")
        legend_in(flat[last], handles, labels)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


