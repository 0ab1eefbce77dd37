"""rclib.report.plots: the conventions every captioned figure relies on, checked on small
synthetic data (no model): figures fit the book's text column, error bars and bands are one
sample standard deviation over seeds, curves that coincide stay distinguishable, legends stay
off the data, and a weight-shared layer's discrete values are visible."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from rclib.core import paper  # noqa: E402
from rclib.report import (
    figstyle,
    map_plots,
    plots,  # noqa: E402
)
from rclib.robust.boundary import DecisionMap  # noqa: E402

TABLE1 = ["Baseline", "Pruned", "Pruned + Retrained", "Pruned + Adv Ret.", "Pruned + Adv Ret. + WS"]
SLACK = 0.05  # inches


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _summary(rates=(0.5, 0.7)):
    """Two seeds per (rate, variant, metric), as chapter 04 aggregates them."""
    rng = np.random.default_rng(0)
    rows = [dict(rate=r, variant=v, seed=s, metric=m, value=rng.uniform(0.1, 0.9))
            for r in rates for v in TABLE1 for m in ("accuracy", "robust_accuracy") for s in (0, 1)]
    long = pd.DataFrame(rows)
    return long.groupby(["rate", "variant", "metric"])["value"].agg(["mean", "std", "min", "max"]).reset_index()


def _map(seed: int, res: int = 20) -> DecisionMap:
    r = np.random.default_rng(seed)
    return DecisionMap(pred=r.integers(0, 10, (res, res)), conf=r.uniform(0.1, 1, (res, res)),
                       extent=(-1.0, 1.0, -1.0, 1.0), points=r.normal(0, 0.5, (30, 2)), origin=np.zeros(64),
                       basis=np.zeros((2, 64)), input_shape=(1, 8, 8))


def _curves(n_models: int = 5, n_seeds: int = 2):
    eps = [0.0, 0.1, 0.2, 0.3]
    return eps, {TABLE1[i % 5] + " " * (i // 5): [list(np.linspace(1, 0.1 * i, 4)) for _ in range(n_seeds)]
                 for i in range(n_models)}


def _bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_table1_bars_use_one_sample_sd_and_keep_the_papers_values_off_our_axes():
    summary = _summary()
    fig = plots.table1_bars(summary, (0.5, 0.7), TABLE1, paper=paper.TABLE1, epsilon=0.12)
    ours, hurt, theirs = fig.axes[:3]
    for ax, rate in ((ours, 0.5), (hurt, 0.7)):
        for container, metric in zip(_bars(ax), ("accuracy", "robust_accuracy")):
            want = summary[(summary.rate == rate) & (summary.metric == metric)].set_index("variant").loc[TABLE1]
            segments = container.errorbar.lines[2][0].get_segments()
            half = [abs(s[1][1] - s[0][1]) / 2 for s in segments]
            np.testing.assert_allclose(half, 100 * want["std"].to_numpy(), rtol=1e-6)  # ± 1 sd, not min-max
            np.testing.assert_allclose([b.get_height() for b in container], 100 * want["mean"].to_numpy())
        # nothing but our two bar series and their error bars: no paper ticks or markers on our panels
        assert len(_bars(ax)) == 2 and set(ax.collections) == {c.errorbar.lines[2][0] for c in _bars(ax)}
        assert not [ln for ln in ax.get_lines() if ln.get_marker() not in ("None", "_", None)]
        assert "ours" in ax.get_title()
    assert "paper" in theirs.get_title()
    np.testing.assert_allclose([b.get_height() for b in _bars(theirs)[1]],
                               [paper.TABLE1[v]["robust_accuracy"] for v in TABLE1])
    assert fig.get_size_inches()[0] <= figstyle.BOOK_WIDTH + SLACK


def test_table1_bars_with_one_seed_draw_no_spread():
    summary = _summary()
    summary["std"] = np.nan  # what pandas gives for a single seed
    fig = plots.table1_bars(summary, (0.5,), TABLE1)
    for container in _bars(fig.axes[0]):
        assert all(abs(s[1][1] - s[0][1]) == 0 for s in container.errorbar.lines[2][0].get_segments())


def test_every_curve_has_its_own_look_and_later_ones_lie_on_top():
    eps, curves = _curves(6)
    fig = plots.robust_curves(eps, curves, operating=(0.1, 0.12))
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in curves]
    assert len(lines) == 6
    for key in (lambda ln: ln.get_color(), lambda ln: ln.get_marker(), lambda ln: ln.get_linewidth()):
        assert len({key(ln) for ln in lines}) == 6
    assert len({str(figstyle.series_style(i)["linestyle"]) for i in range(len(figstyle.SERIES_LINES))}) == len(figstyle.SERIES_LINES)
    assert [ln.get_zorder() for ln in lines] == sorted(ln.get_zorder() for ln in lines)
    assert all(a.get_linewidth() > b.get_linewidth() for a, b in zip(lines, lines[1:]))
    legend = fig.axes[0].get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().y1 < fig.axes[0].get_window_extent().y0 + 1


def test_bands_are_one_sample_standard_deviation():
    eps = [0.0, 0.1]
    runs = [[1.0, 0.4], [0.8, 0.2], [0.6, 0.3]]
    fig = plots.robust_curves(eps, {"m": runs})
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    sd = 100 * np.std(runs, axis=0, ddof=1)
    mean = 100 * np.mean(runs, axis=0)
    assert np.isclose(band[:, 1].max(), (mean + sd).max()) and np.isclose(band[:, 1].min(), (mean - sd).min())


def test_panels_share_one_legend_below():
    rows = [dict(seed=s, method=m, rate=r, accuracy=0.9 - r, robust_accuracy=0.1)
            for s in (0, 1) for m in ("global", "global + WS") for r in (0.1, 0.5)]
    fig = plots.metric_panels(rows, [dict(metric="accuracy", ylabel="a", title="(a)"),
                                     dict(metric="robust_accuracy", ylabel="b", title="(b)")])
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    colours = {ln.get_label(): ln.get_color() for ln in fig.axes[0].get_lines()}
    assert colours["global"] != colours["global + WS"]  # chapter 02: sharing has its own colour


def test_decision_maps_fill_the_column_with_readable_maps_and_a_legend_in_the_spare_cell():
    maps = [_map(i) for i in range(5)]
    fig = map_plots.decision_maps(maps, [f"model {i}\nrobust 50%" for i in range(5)], 10, ncols=3)
    fig.canvas.draw()
    assert abs(fig.get_size_inches()[0] - figstyle.BOOK_WIDTH) < SLACK
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5
    for ax in shown:
        assert ax.get_window_extent().width >= 180 * fig.dpi / 110  # px at the book's dpi
        assert ax.title.get_fontsize() >= 9
        assert ax.get_legend() is None
    spare = [ax for ax in fig.axes if not ax.images]
    assert len(spare) == 1 and spare[0].get_legend() is not None and not fig.legends
    full = map_plots.decision_maps(maps[:4], ["a", "b", "c", "d"], 10, ncols=2)  # no spare cell: legend below
    assert len(full.legends) == 1


def test_roughness_scatter_keeps_its_legend_off_the_points():
    rng = np.random.default_rng(1)
    rows = [dict(method=m, shared=sh, robust_accuracy=rng.uniform(), a=rng.uniform(), b=rng.uniform(),
                 c=rng.uniform()) for m in ("baseline", "global", "layer", "channel", "iterative") for sh in (0, 1)]
    fig = map_plots.roughness_scatter(rows, [("a", "A"), ("b", "B"), ("c", "C")], title="t")
    with_points = [ax for ax in fig.axes if ax.collections]
    assert len(with_points) == 3 and all(ax.get_legend() is None for ax in with_points)
    holders = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(holders) == 1 and not holders[0].collections and not holders[0].axison
    assert fig.get_size_inches()[0] <= figstyle.BOOK_WIDTH + SLACK
    two = map_plots.roughness_scatter(rows, [("a", "A"), ("b", "B")])  # no spare cell: a legend below
    assert len(two.legends) == 1 and all(ax.get_legend() is None for ax in two.axes)
    assert map_plots.roughness_scatter([], [("a", "A")]).legends == []  # nothing to draw, no legend


def test_shared_weights_show_every_shared_value():
    rng = np.random.default_rng(2)
    before = rng.normal(0, 0.05, 20000)
    before = before[np.abs(before) > 0.01]
    centroids = np.sort(np.unique(np.round(before, 3)))[::7]  # 8-bit-like: many close values
    after = centroids[np.abs(before[:, None] - centroids[None, :]).argmin(1)]
    fig = map_plots.shared_weights([("conv", before, after)], zoom_values=12)
    full, zoom = fig.axes[:2]
    ticks = [c for c in full.collections if isinstance(c, LineCollection)]
    assert len(ticks) == 1 and len(ticks[0].get_segments()) == len(np.unique(after))
    red = [p for p in zoom.patches if p.get_height() > 0 and p.get_facecolor()[:3] == matplotlib.colors.to_rgb("C3")]
    assert len(red) == 12  # one spike per shared value in the window
    assert "shared values" in full.get_title()
    assert len(fig.legends) == 1


def test_shared_weights_zoom_labels_do_not_overlap():
    """256 shared values (8 bits) put a dozen of them in a narrow window, whose tick labels need
    four decimals: the zoom must still leave room between them."""
    before = -np.abs(np.random.default_rng(3).normal(0, 0.012, 36864))  # negative: labels carry a minus
    before = before[before < -0.01]
    centroids = np.linspace(before.min(), before.max(), 256)  # a window of 12 is about 0.002 wide
    after = centroids[np.abs(before[:, None] - centroids[None, :]).argmin(1)]
    fig = map_plots.shared_weights([("conv", before, after)], zoom_values=12)
    zoom = fig.axes[1]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in zoom.get_xticklabels() if t.get_visible() and t.get_text()]
    assert len(boxes) >= 2 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_every_figure_fits_the_book_column():
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    names = [str(k) for k in range(10)]
    eps, curves = _curves(6)
    figures = [
        plots.samples(x, y, names),
        plots.adversarial_examples(x[:8], x[:8], y[:8], y[:8], y[:8], names, 0.1, n=8),
        plots.robust_curves(eps, curves),
        map_plots.distance_curves(np.linspace(0, 0.3, 7), {"a": [list(np.linspace(1, 0, 7))] * 2},
                              {"a": ([0.1], [0.5], [0.05])}),
        map_plots.margin_vs_distance({k: (torch.randn(30), torch.rand(30)) for k in "abc"}, 1.0, 0.5),
        plots.compression_vs_rate([dict(seed=0, method="global", rate=r, approx_mb=1 - r, dense_bytes=1e6)
                                   for r in (0.1, 0.5)]),
    ]
    for fig in figures:
        assert fig.get_size_inches()[0] <= figstyle.BOOK_WIDTH + SLACK, fig.axes[0].get_title()


def test_glue_figure_glues_the_figure_and_closes_it(monkeypatch):
    import myst_nb

    glued = []
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.append((name, value, display)))
    fig, _ = plt.subplots()
    figstyle.glue_figure("fig_x", fig)
    assert glued == [("fig_x", fig, True)]  # displayed: JupyterLab shows it, the book hides the output
    assert fig.number not in plt.get_fignums()  # closed: the inline backend does not draw it again
