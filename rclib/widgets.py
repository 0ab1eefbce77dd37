"""JupyterLab explorers (ipywidgets) for the decision-boundary chapter, and their static figures.

Two live tools, each backed by a plain plotting function that the book calls instead:

* :class:`Explorer` (or :func:`explorer`): pick a pruning method, a prune rate, weight sharing
  on/off and an FGSM epsilon; see the variant's decision map in the paper's PCA plane (Sec 3.3,
  Fig 7), its clean and FGSM robust accuracy and its boundary roughness. Static twin:
  :func:`explorer_figure` (computed with :func:`static_explorer` at the widget's defaults).
* :class:`AdversarialViewer` (or :func:`adversarial_viewer`): FGSM examples (clean image,
  perturbation, adversarial image, predicted labels) under an epsilon slider. Static twin:
  :func:`adversarial_figure`.

Why static twins: the published book has no kernel, and widgets load their JavaScript from a
CDN (blank offline), so a result must never live only in a widget (DESIGN.md, "Widgets in the
static book"). The widgets draw through the same functions, so the live and the static pictures
are identical; chapter 03 shows the static figure and tells readers to run ``make lab``.

Why caches: on the ``cpu`` profile a variant costs ~1 s (prune, share, evaluate, a 60x60 map)
and an FGSM pass ~0.1 s; moving a slider back to a value already seen should be instant. Every
variant's numbers and map are computed once per ``(method, rate, shared)`` and every robust
accuracy once per ``(method, rate, shared, eps)`` (:class:`Variants`). Models are not cached:
only the variant on screen is kept (a masked VGG16 is about 1.66 GB), and one seen before is
rebuilt, deterministically, when a new epsilon needs it.

Map sizes follow the config: ``min(cfg.resolution, MAX_RESOLUTION)`` grid points per side,
the ``config.MAP_POINTS`` test inputs of chapter 03's PCA plane, forward passes in batches of
``cfg.eval_batch_size``.

Used by chapter 03 (boundary smoothness).
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter
from typing import Any, Mapping, Sequence

import ipywidgets as ipw
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from . import attacks, boundary, data, pipeline, plots, prune, share, train
from .config import MAP_POINTS
from .share import DEFAULT_BITS

METHODS = ("global", "layer", "channel", "channel (hardened)")
MAX_RATE = 0.98  # beyond this one-shot pruning leaves too few weights to say anything
MAX_EPS = 0.3
MAX_RESOLUTION = 60  # grid points per side of a live map at most: ~0.3 s a map on the cpu profile
MAP_BATCH = 1024  # grid points per forward pass without a config


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _describe(variant: Mapping[str, Any]) -> tuple[str, str, str]:
    """The three title lines shared by the figure and the widget's status line."""
    rate = float(variant["rate"])
    what = "unpruned" if rate == 0 else f"{variant['method']}, r = {rate:g}"
    ws = "on" if variant.get("shared") else "off"
    line1 = f"{what}, weight sharing {ws}"
    line2 = (f"clean {_pct(variant['accuracy'])}, FGSM eps = {float(variant['eps']):g}: "
             f"{_pct(variant['robust_accuracy'])}")
    # boundary length is the roughness number chapter 03 defines and plots (boundary.roughness)
    line3 = f"boundary length {variant['boundary_length']:.2f}"
    return line1, line2, line3


def explorer_figure(variant: Mapping[str, Any], dmap: boundary.DecisionMap, num_classes: int,
                    ax=None) -> Figure:
    """One model variant's decision map (Fig 7 style), titled with everything that defines and
    measures it: the static picture of :class:`Explorer`.

    Args:
        variant: a dict with ``method``, ``rate`` (0 means unpruned), ``shared`` (bool), ``eps``,
            ``accuracy`` and ``robust_accuracy`` (in [0, 1]) and ``boundary_length`` (from
            ``boundary.roughness``), e.g. :meth:`Variants.measure` or ``Explorer.last``.
        dmap: the variant's ``boundary.DecisionMap`` (e.g. :meth:`Variants.map`).
        num_classes: K, for the colours (``splits.num_classes``).
        ax: draw into this axes; default a new figure with a class legend on the right.

    Returns:
        The matplotlib Figure (the one holding ``ax`` when given).

    Example:
        >>> v = Variants(base, splits)
        >>> row = v.measure("global", 0.9, shared=True, eps=0.1)
        >>> fig = explorer_figure(row, v.map("global", 0.9, True), splits.num_classes)

    Used by chapter 03 (boundary smoothness): the static stand-in for the live explorer.
    """
    import matplotlib
    import matplotlib.patches as mpatches

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4.9, 4.1))
    fig = plots.decision_map(dmap, num_classes, "\n".join(_describe(variant)), ax=ax)
    if own:
        # the class colours are the only key to the map; put them beside it, not over the data
        colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors
        handles = [mpatches.Patch(color=colours[k % len(colours)], label=str(k)) for k in range(num_classes)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                  title="class", title_fontsize=7, frameon=False)
        fig.tight_layout()
    return fig


def _rate_key(rate: float) -> float:
    # slider values carry float noise (0.5000000001); 4 decimals is finer than any slider step
    return round(float(rate), 4)


class Variants:
    """Computed model variants and their numbers, cached: the engine behind :class:`Explorer`,
    usable without any widget (the book's static figure).

    A variant is ``pipeline.pruned(base, method, rate)`` (``rate == 0``: the unpruned base,
    whatever the method), optionally weight-shared in place with ``share.weight_share(model,
    bits)``, its masks then folded into the weights (nothing here retrains it). Per variant it
    keeps its clean test accuracy and its decision map; all maps lie on ONE PCA plane, fitted
    on the first map's inputs (the test inputs) and reused, so maps of different variants are
    comparable point by point. Robust accuracies are cached per epsilon. Only the most recent
    variant's model is kept (:meth:`model`), so the explorer holds ``base`` and one variant
    however many settings a reader tries. ``calls`` counts the actual computations
    (``"variant"``, ``"model"`` for a rebuilt model, ``"robust"``), so a cache hit is observable.

    Args:
        base: the trained, unpruned model (e.g. ``pipeline.baseline(cfg, splits)[0]``); never
            modified.
        splits: ``data.load(cfg)``; the test loader is used for all accuracies.
        resolution: decision-map grid points per side (default 60: ~0.3 s on the cpu profile).
        bits: weight-sharing index widths, default ``{"conv": 8, "linear": 5}`` (Sec 3.2).
        max_points: at most this many test inputs define the PCA plane and are drawn as points
            (default ``config.MAP_POINTS``, as chapter 03's maps; the digits test set has 360).
        batch_size: grid points per forward pass of a map (the explorer passes
            ``cfg.eval_batch_size``).

    Example:
        >>> v = Variants(base, splits)
        >>> v.measure("channel", 0.5, shared=False, eps=0.1)["robust_accuracy"]

    Used by chapter 03 (boundary smoothness), through :class:`Explorer` and :func:`static_explorer`.
    """

    def __init__(self, base: nn.Module, splits: data.Splits, resolution: int = MAX_RESOLUTION,
                 bits: Mapping[str, int] | int | None = None, max_points: int = MAP_POINTS,
                 batch_size: int = MAP_BATCH):
        self.base = base  # not even its train/eval mode is changed: every consumer sets eval itself
        self.splits = splits
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.bits = dict(DEFAULT_BITS) if bits is None else bits
        self.x, self.y = data.spread_sample(splits.test, max_points)  # as pipeline.map_inputs: every class
        self.pca = None  # fitted by the first map, then shared by all
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.robust_cache: dict[tuple, float] = {}
        self.calls: Counter = Counter()
        self._current: tuple[tuple, nn.Module] | None = None  # the one variant model kept

    @staticmethod
    def key(method: str, rate: float, shared: bool) -> tuple[str, float, bool]:
        """The cache key; every method at rate 0 is the same unpruned model, so one entry."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
        r = _rate_key(rate)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"rate={rate!r} is not allowed: a prune rate in [0, 1)")
        return ("unpruned" if r == 0 else method, r, bool(shared))

    def _build(self, method: str, rate: float, shared: bool) -> nn.Module:
        if rate == 0:
            model = prune.clone(self.base) if shared else self.base  # a copy only when sharing changes it
        else:
            model = pipeline.pruned(self.base, method, rate)
        if shared:
            share.weight_share(model, self.bits)  # on the masked copy: pruned entries stay zero
        return model if model is self.base else prune.make_permanent(model).eval()

    def model(self, method: str, rate: float, shared: bool) -> nn.Module:
        """The variant's model (do not modify): the one built last is kept, any other is built
        afresh (pruning and sharing are deterministic) and replaces it."""
        k = self.key(method, rate, shared)
        if self._current is None or self._current[0] != k:
            self._current = None  # free the previous variant before building the next
            self.calls["model"] += 1
            self._current = (k, self._build(k[0], k[1], k[2]))
        return self._current[1]

    def variant(self, method: str, rate: float, shared: bool) -> dict[str, Any]:
        """The cached variant's numbers and map: ``{"accuracy", "map", "roughness", "nonzero",
        "max_distinct", "seconds"}``; computed on the first request only (the model itself:
        :meth:`model`)."""
        k = self.key(method, rate, shared)
        if k not in self.cache:
            self.calls["variant"] += 1
            t0 = time.perf_counter()
            model = self.model(method, rate, shared)
            acc = train.evaluate(model, self.splits.test)
            dmap = boundary.decision_map(model, self.x, self.y, self.resolution, pca=self.pca,
                                         batch_size=self.batch_size)
            if self.pca is None:
                self.pca = dmap.pca
            self.cache[k] = dict(accuracy=acc, map=dmap, roughness=boundary.roughness(dmap),
                                 nonzero=_nonzero_weights(model), max_distinct=_max_distinct(model),
                                 seconds=time.perf_counter() - t0)
        return self.cache[k]

    def robust(self, method: str, rate: float, shared: bool, eps: float) -> float:
        """FGSM robust test accuracy of the variant at ``eps`` (cached; eps 0 = clean accuracy)."""
        if not 0 <= float(eps):
            raise ValueError(f"eps={eps!r} is not allowed: an FGSM step >= 0")
        k = self.key(method, rate, shared) + (round(float(eps), 4),)
        if k not in self.robust_cache:
            model = self.model(method, rate, shared)
            self.calls["robust"] += 1
            self.robust_cache[k] = attacks.robust_accuracy(model, self.splits.test, attacks.fgsm, k[-1])
        return self.robust_cache[k]

    def map(self, method: str, rate: float, shared: bool) -> boundary.DecisionMap:
        """The variant's decision map on the shared PCA plane."""
        return self.variant(method, rate, shared)["map"]

    def measure(self, method: str, rate: float, shared: bool, eps: float) -> dict[str, Any]:
        """The numbers :func:`explorer_figure` and the explorer's status line show, as a dict:
        ``method, rate, shared, eps, accuracy, robust_accuracy, boundary_fraction,
        boundary_length, regions, nonzero, max_distinct``."""
        v = self.variant(method, rate, shared)
        rough = v["roughness"]
        return dict(method=method, rate=_rate_key(rate), shared=bool(shared), eps=float(eps),
                    accuracy=v["accuracy"], robust_accuracy=self.robust(method, rate, shared, eps),
                    boundary_fraction=rough["boundary_fraction"],
                    boundary_length=rough["boundary_length"], regions=rough["regions"],
                    nonzero=v["nonzero"], max_distinct=v["max_distinct"])


def _nonzero_weights(model: nn.Module) -> int:
    """Non-zero weights of the prunable layers (what pruning removes)."""
    table = prune.sparsity(model)
    return int((table["weights"] - table["zeros"]).sum())


def _max_distinct(model: nn.Module) -> int:
    """The largest number of distinct non-zero weight values in one prunable layer: at most
    2^bits after weight sharing (Eq 7), about the layer's size without it."""
    return max((len(v) for v in share.codebooks(model).values()), default=0)


def static_explorer(base: nn.Module, splits: data.Splits, cfg=None, method: str = "global",
                    rate: float | None = None, shared: bool = False, eps: float | None = None,
                    resolution: int | None = None, bits: Mapping[str, int] | int | None = None) -> Figure:
    """:func:`explorer_figure` at the explorer's defaults, without any widget (for the book).

    Args:
        base, splits: as for :class:`Variants`.
        cfg: a ``Config``; when given, ``rate`` and ``eps`` default to ``cfg.prune_rate`` and
            ``cfg.epsilon`` (else 0.5 and 0.1).
        method, rate, shared, eps: the variant (defaults: global, 0.5, off, 0.1).
        resolution: map grid points per side (default as the explorer: ``min(cfg.resolution,
            60)``, 60 without a config).
        bits: weight-sharing widths; default ``cfg.conv_bits``/``cfg.linear_bits``, else 8/5.

    Example:
        >>> fig = static_explorer(base, splits, cfg)

    Used by chapter 03 (boundary smoothness).
    """
    rate, eps = _defaults(cfg, rate, eps)
    v = Variants(base, splits, bits=_bits(cfg, bits), **_map_settings(cfg, resolution))
    return explorer_figure(v.measure(method, rate, shared, eps), v.map(method, rate, shared), splits.num_classes)


def _bits(cfg, bits):
    """Explicit ``bits``, else the config's ``conv_bits``/``linear_bits``, else Sec 3.2's 8/5."""
    if bits is not None:
        return bits
    if cfg is not None:
        return {"conv": int(cfg.conv_bits), "linear": int(cfg.linear_bits)}
    return dict(DEFAULT_BITS)


def _map_settings(cfg, resolution: int | None, max_points: int | None = None) -> dict[str, int]:
    """A live map's grid, inputs and batch from the config: at most ``MAX_RESOLUTION`` points
    per side (a slider must answer in about a second), chapter 03's ``MAP_POINTS`` inputs, and
    ``cfg.eval_batch_size`` grid points per forward pass."""
    if resolution is None:
        resolution = min(int(cfg.resolution), MAX_RESOLUTION) if cfg is not None else MAX_RESOLUTION
    return dict(resolution=int(resolution), max_points=MAP_POINTS if max_points is None else int(max_points),
                batch_size=int(cfg.eval_batch_size) if cfg is not None else MAP_BATCH)


def _defaults(cfg, rate: float | None, eps: float | None) -> tuple[float, float]:
    if rate is None:
        rate = float(cfg.prune_rate) if cfg is not None else 0.5
    if eps is None:
        eps = float(cfg.epsilon) if cfg is not None else 0.1
    return rate, eps


def _png_output(fig: Figure) -> dict[str, Any]:
    """A display_data output holding ``fig`` as PNG. Written into ``Output.outputs`` directly
    (not ``with output: display(fig)``), because the context manager captures only inside a
    running kernel: this way the figure also reaches the widget from a test, a thread or any
    observer callback, and the inline backend never shows a stray copy."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                     "text/plain": repr(fig)}}


def _table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>"
                    for k, v in rows)
    return f"<table style='font-size:90%'>{cells}</table>"


class Explorer(ipw.VBox):
    """Live explorer of compressed variants and their decision boundaries (paper Sec 3.3, Fig 7).

    Controls (attributes, ipywidgets): ``method`` Dropdown (global, layer, channel, channel
    (hardened)), ``rate`` FloatSlider (0 = the unpruned baseline, up to 0.98), ``shared``
    Checkbox (weight sharing, ``bits`` per layer), ``epsilon`` FloatSlider (FGSM, 0 to 0.3).
    Outputs: ``status`` (HTML: clean and robust accuracy, roughness, non-zero weights, distinct
    values per layer) and ``output`` (Output holding :func:`explorer_figure`). Sliders use
    ``continuous_update=False``, so a drag computes once, on release.

    Every change of a control calls :meth:`update`, which reads the numbers from
    :class:`Variants` (computed once per ``(method, rate, shared)`` and per epsilon, then
    cached), redraws, and stores what is shown in ``state`` (also ``last``): the dict of
    :meth:`Variants.measure` plus ``cached`` (nothing was computed) and ``seconds``.
    ``figure`` is the last Figure drawn. Use :meth:`set` to change several controls with a
    single update.

    Args:
        base: the trained unpruned model; never modified.
        splits: ``data.load(cfg)`` (test set for accuracies and the map's plane).
        cfg: optional ``Config``: ``rate`` and ``eps`` default to ``cfg.prune_rate`` and
            ``cfg.epsilon`` (else 0.5 and 0.1).
        method: initial method, default ``"global"``.
        rate, shared, eps: initial prune rate, weight sharing (default off) and FGSM epsilon.
        resolution: decision-map grid points per side; default ``min(cfg.resolution, 60)``, 60
            without a config.
        bits: weight-sharing widths; default ``cfg.conv_bits``/``cfg.linear_bits`` when ``cfg``
            is given, else ``{"conv": 8, "linear": 5}``.
        max_points: test inputs that define the plane, default ``config.MAP_POINTS``.

    Example:
        >>> ex = Explorer(base, splits, cfg)   # the last expression of a cell shows it
        >>> ex.rate.value = 0.9                # or drag the slider
        >>> ex.state["robust_accuracy"]

    Used by chapter 03 (boundary smoothness): run ``make lab`` and open the chapter for the live
    version; the book shows :func:`explorer_figure` at these defaults.
    """

    def __init__(self, base: nn.Module, splits: data.Splits, cfg=None, *, method: str = "global",
                 rate: float | None = None, shared: bool = False, eps: float | None = None,
                 resolution: int | None = None, bits: Mapping[str, int] | int | None = None,
                 max_points: int | None = None):
        rate, eps = _defaults(cfg, rate, eps)
        self.variants = Variants(base, splits, bits=_bits(cfg, bits), **_map_settings(cfg, resolution, max_points))
        self.variants.key(method, rate, shared)  # fail now, naming the bad argument
        self.num_classes = splits.num_classes
        self.state: dict[str, Any] = {}
        self.figure: Figure | None = None
        self._hold = False
        self.method = ipw.Dropdown(options=list(METHODS), value=method, description="method")
        self.rate = ipw.FloatSlider(value=rate, min=0.0, max=MAX_RATE, step=0.01, description="prune rate",
                                    readout_format=".2f", continuous_update=False)
        b = self.variants.bits
        widths = f"{b.get('conv')}/{b.get('linear')}" if isinstance(b, Mapping) else f"{b}"
        label = f"weight sharing ({widths} bit)"
        self.shared = ipw.Checkbox(value=bool(shared), description=label, indent=False)
        self.epsilon = ipw.FloatSlider(value=eps, min=0.0, max=MAX_EPS, step=0.01, description="FGSM eps",
                                       readout_format=".2f", continuous_update=False,
                                       style={"description_width": "initial"})
        self.status = ipw.HTML()
        self.output = ipw.Output()
        super().__init__(children=[ipw.HBox([self.method, self.shared]), ipw.HBox([self.rate, self.epsilon]),
                                   self.status, self.output])
        for control in (self.method, self.rate, self.shared, self.epsilon):
            control.observe(self._on_change, names="value")
        self.update()

    @property
    def last(self) -> dict[str, Any]:
        """The numbers currently shown (same dict as ``state``)."""
        return self.state

    @property
    def model(self) -> nn.Module:
        """The current variant's model (kept while it is shown; do not modify)."""
        return self.variants.model(self.method.value, self.rate.value, self.shared.value)

    def _on_change(self, _change) -> None:
        if not self._hold:
            self.update()

    def set(self, method: str | None = None, rate: float | None = None, shared: bool | None = None,
            eps: float | None = None) -> dict[str, Any]:
        """Set any of the controls, then update once (instead of once per control)."""
        self._hold = True
        try:
            for control, value in ((self.method, method), (self.rate, rate), (self.shared, shared),
                                   (self.epsilon, eps)):
                if value is not None:
                    control.value = value
        finally:
            self._hold = False
        return self.update()

    def update(self) -> dict[str, Any]:
        """Recompute (or fetch from the cache) the current variant, redraw, refresh ``state``."""
        method, rate, shared, eps = self.method.value, self.rate.value, self.shared.value, self.epsilon.value
        calls = sum(self.variants.calls.values())
        try:
            k = self.variants.key(method, rate, shared)
            if k not in self.variants.cache:
                # shown while the variant is computed; a kernel sends it to the page at once
                self.status.value = "<i>computing this variant (prune, share, evaluate, map) ...</i>"
            t0 = time.perf_counter()
            row = self.variants.measure(method, rate, shared, eps)
            fig = explorer_figure(row, self.variants.map(method, rate, shared), self.num_classes)
            self.output.outputs = (_png_output(fig),)
            plt.close(fig)  # the PNG is in the widget; an open figure would leak or show twice
        except Exception as err:
            self.status.value = f"<b style='color:#b00'>error: {html.escape(repr(err))}</b>"
            raise
        row.update(cached=sum(self.variants.calls.values()) == calls, seconds=time.perf_counter() - t0)
        self.figure = fig
        self.state.clear()
        self.state.update(row)
        self.status.value = self._status_html(row)
        return self.state

    @staticmethod
    def _status_html(row: Mapping[str, Any]) -> str:
        line1, _, _ = _describe(row)
        rows = [("variant", line1),
                ("clean accuracy", _pct(row["accuracy"])),
                (f"FGSM robust accuracy (eps {row['eps']:g})", _pct(row["robust_accuracy"])),
                ("boundary length (roughness, chapter 03)", f"{row['boundary_length']:.2f}"),
                ("non-zero weights", f"{row['nonzero']:,}"),
                ("max distinct weights in a layer", f"{row['max_distinct']:,}"),
                ("time", "cached" if row["cached"] else f"{row['seconds']:.2f} s")]
        return _table(rows)


def explorer(base: nn.Module, splits: data.Splits, cfg=None, **kwargs: Any) -> Explorer:
    """An :class:`Explorer` (an ``ipywidgets.VBox``); ``kwargs`` as for :class:`Explorer`.

    Example:
        >>> explorer(base, splits, cfg, resolution=80)

    Used by chapter 03 (boundary smoothness).
    """
    return Explorer(base, splits, cfg, **kwargs)


def adversarial_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, Any]:
    """FGSM examples and the model's predictions on both sides.

    Returns:
        ``{"x_adv", "pred_clean", "pred_adv"}`` (tensors on the CPU) and
        ``"perturbation_max"`` = max |x_adv - x| (``eps`` unless clamping to [0, 1] cut every
        pixel short).

    Example:
        >>> p = adversarial_predictions(model, x, y, 0.1)
        >>> (p["pred_adv"] != y).float().mean()   # error rate under attack

    Used by chapter 03 (boundary smoothness), through :func:`adversarial_figure` and the viewer.
    """
    device = train.model_device(model)
    xd, yd = x.to(device), y.to(device)
    x_adv = attacks.fgsm(model, xd, yd, float(eps))
    pred_clean = train.predict(model, xd).argmax(1)
    pred_adv = train.predict(model, x_adv).argmax(1)
    x_adv = x_adv.cpu()
    return dict(x_adv=x_adv, pred_clean=pred_clean.cpu(), pred_adv=pred_adv.cpu(),
                perturbation_max=float((x_adv - x.cpu()).abs().max()) if len(x) else 0.0)


def _draw_adversarial(x, x_adv, y, pred_clean, pred_adv, class_names, eps: float, n: int) -> Figure:
    fig = plots.adversarial_examples(x, x_adv, y, pred_clean, pred_adv, class_names, eps, n=n)
    n = min(n, len(x))
    changed = int((pred_clean[:n] != pred_adv[:n]).sum())
    wrong = int((pred_adv[:n] != y[:n]).sum())
    fig.suptitle(f"FGSM, eps = {eps:g}: {changed} of {n} predictions changed, {wrong} wrong "
                 "(red: misclassified)", fontsize=10)
    # the perturbation row is drawn on the signed scale [-eps, eps]; a colourbar says so
    axes = np.asarray(fig.axes).reshape(3, -1)
    fig.subplots_adjust(right=0.88)
    pos = axes[1, -1].get_position()
    cax = fig.add_axes((0.9, pos.y0, 0.015, pos.height))
    fig.colorbar(axes[1, -1].images[0], cax=cax, label="x_adv - x")
    return fig


def adversarial_figure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       class_names: Sequence[str], n: int = 6) -> Figure:
    """FGSM at ``eps`` on the first ``n`` of ``x``: rows clean image, perturbation (signed
    colour scale from -eps to +eps with a colourbar, so even a small step is visible),
    adversarial image; column titles are the predicted labels (red when wrong).

    Args:
        model: the classifier (pixels in [0, 1]); evaluated in eval mode.
        x, y: inputs (N, C, H, W) in [0, 1] and labels (N,), e.g. ``data.first_batch(splits.test, 6)``.
        eps: the FGSM step (>= 0).
        class_names: label names (``splits.class_names``).
        n: examples shown, default 6.

    Returns:
        The matplotlib Figure.

    Example:
        >>> x, y = data.first_batch(splits.test, 6)
        >>> adversarial_figure(model, x, y, 0.1, splits.class_names)

    Used by chapter 03 (boundary smoothness), the static stand-in for :class:`AdversarialViewer`.
    """
    x, y = x[:n], y[:n]
    p = adversarial_predictions(model, x, y, eps)
    return _draw_adversarial(x, p["x_adv"], y, p["pred_clean"], p["pred_adv"], class_names, float(eps), n)


class AdversarialViewer(ipw.VBox):
    """Live FGSM examples: ``epsilon`` FloatSlider (0 to 0.3) and ``index`` IntSlider (the first
    of the ``n`` examples shown); ``status`` HTML and ``output`` Output with
    :func:`adversarial_figure`'s picture. ``state`` (also ``last``) holds what is shown:
    ``eps, index, labels, pred_clean, pred_adv`` (lists of ints), ``changed``, ``wrong`` and
    ``perturbation_max``; ``figure`` the last Figure.

    Args:
        model: the classifier; not modified.
        x, y: a pool of inputs in [0, 1] and labels (e.g. ``data.first_batch(splits.test, 60)``).
        class_names: ``splits.class_names``.
        eps: initial epsilon, default 0.1.
        n: examples shown at once, default 6.
        index: initial first example, default 0.

    Example:
        >>> v = AdversarialViewer(model, x, y, splits.class_names)
        >>> v.epsilon.value = 0.2
        >>> v.state["pred_adv"]

    Used by chapter 03 (boundary smoothness); run ``make lab`` for the live version.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], *,
                 eps: float = 0.1, n: int = 6, index: int = 0):
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
        self.model, self.x, self.y, self.class_names = model, x, y, list(class_names)
        self.n = max(1, min(int(n), len(x)))
        self.state: dict[str, Any] = {}
        self.figure: Figure | None = None
        self.epsilon = ipw.FloatSlider(value=eps, min=0.0, max=MAX_EPS, step=0.01, description="FGSM eps",
                                       readout_format=".2f", continuous_update=False,
                                       style={"description_width": "initial"})
        # browsing needs more inputs than are shown at once: the chapter passes a pool of test inputs
        self.index = ipw.IntSlider(value=index, min=0, max=len(x) - self.n, description="first example",
                                   continuous_update=False, disabled=len(x) <= self.n,
                                   style={"description_width": "initial"})
        self.status = ipw.HTML()
        self.output = ipw.Output()
        super().__init__(children=[ipw.HBox([self.epsilon, self.index]), self.status, self.output])
        for control in (self.epsilon, self.index):
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    @property
    def last(self) -> dict[str, Any]:
        """The predictions currently shown (same dict as ``state``)."""
        return self.state

    def update(self) -> dict[str, Any]:
        """Attack the shown examples at the current epsilon, redraw, refresh ``state``."""
        eps, i = float(self.epsilon.value), int(self.index.value)
        x, y = self.x[i:i + self.n], self.y[i:i + self.n]
        try:
            p = adversarial_predictions(self.model, x, y, eps)
            fig = _draw_adversarial(x, p["x_adv"], y, p["pred_clean"], p["pred_adv"], self.class_names, eps, self.n)
            self.output.outputs = (_png_output(fig),)
            plt.close(fig)
        except Exception as err:
            self.status.value = f"<b style='color:#b00'>error: {html.escape(repr(err))}</b>"
            raise
        self.figure = fig
        labels, pc, pa = y.tolist(), p["pred_clean"].tolist(), p["pred_adv"].tolist()
        self.state.clear()
        self.state.update(eps=eps, index=i, labels=labels, pred_clean=pc, pred_adv=pa,
                          changed=sum(a != b for a, b in zip(pc, pa)),
                          wrong=sum(a != t for a, t in zip(pa, labels)),
                          perturbation_max=p["perturbation_max"])
        names = self.class_names
        self.status.value = _table([
            ("examples", f"{i} to {i + len(labels) - 1}"),
            ("true", " ".join(names[t] for t in labels)),
            ("clean prediction", " ".join(names[t] for t in pc)),
            (f"FGSM prediction (eps {eps:g})", " ".join(names[t] for t in pa)),
            ("max |x_adv - x|", f"{self.state['perturbation_max']:.3f}")])
        return self.state


def adversarial_viewer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str],
                       **kwargs: Any) -> AdversarialViewer:
    """An :class:`AdversarialViewer` (an ``ipywidgets.VBox``); ``kwargs`` as for it.

    Example:
        >>> adversarial_viewer(model, *data.first_batch(splits.test, 60), splits.class_names)

    Used by chapter 03 (boundary smoothness).
    """
    return AdversarialViewer(model, x, y, class_names, **kwargs)
