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

The computations and their caches are :class:`rclib.experiments.live_variants.Variants`.

Map sizes follow the config: ``min(cfg.resolution, MAX_RESOLUTION)`` grid points per side,
the ``config.MAP_POINTS`` test inputs of chapter 03's PCA plane, forward passes in batches of
``cfg.eval_batch_size``.

Used by chapter 03 (boundary smoothness).
"""

from __future__ import annotations

import html
import time
from typing import Any, Mapping

import ipywidgets as ipw
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from torch import nn

from rclib.compress.share import DEFAULT_BITS
from rclib.core.config import MAP_POINTS
from rclib.data import datasets
from rclib.experiments.live_variants import MAP_BATCH, MAX_RESOLUTION, METHODS, Variants
from rclib.report import map_plots
from rclib.report.widget_parts import MAX_EPS, html_table, png_output
from rclib.robust import boundary

MAX_RATE = 0.98  # beyond this one-shot pruning leaves too few weights to say anything


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
    fig = map_plots.decision_map(dmap, num_classes, "\n".join(_describe(variant)), ax=ax)
    if own:
        # the class colours are the only key to the map; put them beside it, not over the data
        colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"].colors
        handles = [mpatches.Patch(color=colours[k % len(colours)], label=str(k)) for k in range(num_classes)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                  title="class", title_fontsize=7, frameon=False)
        fig.tight_layout()
    return fig


def static_explorer(base: nn.Module, splits: datasets.Splits, cfg=None, method: str = "global",
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
        splits: ``datasets.load(cfg)`` (test set for accuracies and the map's plane).
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

    def __init__(self, base: nn.Module, splits: datasets.Splits, cfg=None, *, method: str = "global",
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
            self.output.outputs = (png_output(fig),)
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
        return html_table(rows)


def explorer(base: nn.Module, splits: datasets.Splits, cfg=None, **kwargs: Any) -> Explorer:
    """An :class:`Explorer` (an ``ipywidgets.VBox``); ``kwargs`` as for :class:`Explorer`.

    Example:
        >>> explorer(base, splits, cfg, resolution=80)

    Used by chapter 03 (boundary smoothness).
    """
    return Explorer(base, splits, cfg, **kwargs)


