"""rclib.report.map_explorer: the explorers are driven in code (setting ``.value`` fires the observers, as a
slider drag does in JupyterLab) and their outputs checked; the static figures carry the numbers.

One small model is trained once for the module (smoke profile, ~4 s); the explorer is shared too,
so its caches make later tests cheap. Tests set every control they rely on.
"""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rclib.core import config
from rclib.data import datasets
from rclib.experiments import live_variants, steps
from rclib.nn import train
from rclib.report import (
    fgsm_viewer,
    map_explorer,  # noqa: E402
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, splits, base): the smoke baseline (512 train / 64 test digits, ~70% accuracy).

    The brief's 128-image, 2-epoch model predicts one class everywhere (6% accuracy), so its
    decision map is a single region and pruning cannot visibly change it: the smoke profile's
    own training size and epochs are the smallest that give a map worth testing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RCLIB_ARTIFACTS", str(tmp_path_factory.mktemp("artifacts")))
        cfg = config.load("smoke", epsilon=0.1, test_size=64)
        splits = datasets.load(cfg)
        base, metrics, _ = steps.baseline(cfg, splits, progress=False)
    assert metrics["clean_accuracy"] > 0.4, "the fixture model must learn something"
    return cfg, splits, base


@pytest.fixture(scope="module")
def ex(trained):
    cfg, splits, base = trained
    return map_explorer.Explorer(base, splits, cfg, resolution=30)


def _png(output: ipywidgets.Output) -> bytes:
    assert len(output.outputs) == 1
    return base64.b64decode(output.outputs[0]["data"]["image/png"])


def _share_module():
    try:
        from rclib.compress import share
    except ImportError as err:  # pragma: no cover - only while share.py is being written
        pytest.skip(f"rclib.compress.share is missing ({err}); weight sharing is not testable yet")
    if not hasattr(share, "weight_share"):  # pragma: no cover
        pytest.skip("rclib.compress.share has no weight_share yet")
    return share


def test_explorer_defaults_controls_and_first_output(ex, trained):
    cfg, splits, _ = trained
    assert isinstance(ex, ipywidgets.Widget)
    assert list(ex.method.options) == ["global", "layer", "channel", "channel (hardened)"]
    assert (ex.method.value, ex.rate.value, ex.shared.value) == ("global", cfg.prune_rate, False)
    assert ex.epsilon.value == pytest.approx(cfg.epsilon)
    assert (ex.rate.min, ex.rate.max, ex.epsilon.min, ex.epsilon.max) == (0.0, 0.98, 0.0, 0.3)
    assert ex.rate.continuous_update is False and ex.epsilon.continuous_update is False
    assert isinstance(ex.output, ipywidgets.Output) and isinstance(ex.status, ipywidgets.HTML)
    assert _png(ex.output).startswith(PNG)
    assert ex.last is ex.state
    for key in ("accuracy", "robust_accuracy", "boundary_fraction", "nonzero", "max_distinct"):
        assert key in ex.state
    assert f"{100 * ex.state['accuracy']:.1f}%" in ex.status.value
    assert f"{ex.state['boundary_length']:.2f}" in ex.status.value and "boundary length" in ex.status.value


def test_pruning_changes_accuracy_map_and_figure(ex, trained):
    _, _, base = trained
    s0 = dict(ex.set(method="global", rate=0.0, shared=False, eps=0.1))
    map0 = ex.variants.map("global", 0.0, False)
    png0 = _png(ex.output)
    assert s0["accuracy"] == pytest.approx(train.evaluate(base, trained[1].test))

    open_figures = len(plt.get_fignums())
    ex.rate.value = 0.9  # fires the observer, like releasing the slider
    assert len(plt.get_fignums()) == open_figures  # drawn into the widget, then closed
    s1 = ex.state
    map1 = ex.variants.map("global", 0.9, False)
    assert s1["rate"] == 0.9 and s1["method"] == "global"
    assert s1["nonzero"] < 0.15 * s0["nonzero"]  # 90% of the prunable weights are gone
    assert s1["accuracy"] != s0["accuracy"]
    assert not np.array_equal(map0.conf, map1.conf)  # the boundary map moved
    assert map1.extent == map0.extent  # ... in the same PCA plane
    np.testing.assert_allclose(map1.basis, map0.basis)
    assert _png(ex.output) != png0  # the Output got the new figure
    assert "global, r = 0.9" in ex.figure.axes[0].get_title()


def test_epsilon_zero_is_clean_and_larger_eps_no_better(ex):
    for method, rate in (("global", 0.0), ("layer", 0.5), ("channel (hardened)", 0.5)):
        clean = ex.set(method=method, rate=rate, shared=False, eps=0.0)
        assert clean["robust_accuracy"] == clean["accuracy"]
        strong = ex.set(eps=0.3)
        assert strong["eps"] == pytest.approx(0.3)
        assert strong["robust_accuracy"] <= strong["accuracy"]
    assert ex.set(method="global", rate=0.0, eps=0.3)["robust_accuracy"] < ex.state["accuracy"]


def test_weight_sharing_limits_distinct_weights_and_keeps_zeros(ex, trained):
    share = _share_module()
    _, _, base = trained
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bits = ex.variants.bits
    assert bits == {"conv": trained[0].conv_bits, "linear": trained[0].linear_bits}

    plain = dict(ex.set(method="global", rate=0.5, shared=False, eps=0.1))
    shared = dict(ex.set(shared=True))
    assert plain["max_distinct"] > 2 ** bits["conv"]  # trained weights are (nearly) all distinct
    assert shared["max_distinct"] <= 2 ** bits["conv"]
    assert shared["nonzero"] == plain["nonzero"]  # pruned zeros stay zero, kept ones non-zero
    for name, values in share.codebooks(ex.model).items():
        kind = "conv" if name.startswith("features") else "linear"
        assert len(values) <= 2 ** bits[kind], name
    assert ex.figure.axes[0].get_title().startswith("global, r = 0.5, weight sharing on")

    unpruned = ex.set(rate=0.0, shared=True)  # shares a copy, never the base itself
    assert unpruned["max_distinct"] <= 2 ** bits["conv"]
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cache_hits_do_not_recompute(ex):
    ex.set(method="layer", rate=0.7, shared=False, eps=0.1)
    calls = dict(ex.variants.calls)
    again = ex.set(method="layer", rate=0.7, shared=False, eps=0.1)
    assert dict(ex.variants.calls) == calls and again["cached"] is True

    ex.epsilon.value = 0.25  # a new epsilon: one FGSM pass, no new variant
    assert ex.variants.calls["variant"] == calls["variant"]
    assert ex.variants.calls["robust"] == calls["robust"] + 1
    ex.epsilon.value = 0.1  # back to a value already seen: nothing computed
    ex.rate.value = 0.7
    assert ex.variants.calls["robust"] == calls["robust"] + 1 and ex.state["cached"] is True

    ex.set(method="global", rate=0.0, eps=0.1)  # rate 0 is one unpruned model for every method
    n = ex.variants.calls["variant"]
    ex.method.value = "channel"
    assert ex.variants.calls["variant"] == n and ex.state["cached"] is True
    assert ex.state["method"] == "channel"


def test_set_updates_once(ex, monkeypatch):
    counted = []
    original = map_explorer.Explorer.update

    def counting(self):
        counted.append(1)
        return original(self)

    monkeypatch.setattr(map_explorer.Explorer, "update", counting)
    ex.set(method="channel", rate=0.3, shared=False, eps=0.05)
    assert len(counted) == 1
    ex.rate.value = 0.4  # a single control: one update through the observer
    assert len(counted) == 2


def test_bad_arguments_name_the_parameter(trained):
    cfg, splits, base = trained
    with pytest.raises(ValueError, match="method"):
        map_explorer.Explorer(base, splits, cfg, method="random")
    with pytest.raises(ValueError, match="rate"):
        live_variants.Variants.key("global", 1.0, False)
    with pytest.raises(ValueError, match="eps"):
        live_variants.Variants(base, splits, resolution=8).robust("global", 0.0, False, -0.1)


def test_explorer_figure_title_carries_the_numbers(ex, trained):
    _, splits, _ = trained
    row = ex.set(method="channel", rate=0.5, shared=False, eps=0.2)
    fig = map_explorer.explorer_figure(row, ex.variants.map("channel", 0.5, False), splits.num_classes)
    assert isinstance(fig, Figure)
    title = fig.axes[0].get_title()
    for text in ("channel, r = 0.5", "weight sharing off", "eps = 0.2",
                 f"clean {100 * row['accuracy']:.1f}%", f"{100 * row['robust_accuracy']:.1f}%",
                 f"boundary length {row['boundary_length']:.2f}"):
        assert text in title
    plt.close(fig)

    fig, ax = plt.subplots()
    assert map_explorer.explorer_figure(dict(row, rate=0.0), ex.variants.map("global", 0.0, False),
                                   splits.num_classes, ax=ax) is fig
    assert ax.get_title().startswith("unpruned, weight sharing off")
    plt.close(fig)


def test_static_explorer_matches_widget_defaults(trained):
    cfg, splits, base = trained
    fig = map_explorer.static_explorer(base, splits, cfg, resolution=12)
    assert isinstance(fig, Figure)
    assert f"global, r = {cfg.prune_rate:g}, weight sharing off" in fig.axes[0].get_title()
    assert f"eps = {cfg.epsilon:g}" in fig.axes[0].get_title()
    plt.close(fig)


@pytest.fixture(scope="module")
def pool(trained):
    _, splits, _ = trained
    return datasets.first_batch(splits.test, 20)


def test_adversarial_viewer_follows_epsilon_and_index(trained, pool):
    _, splits, base = trained
    x, y = pool
    v = fgsm_viewer.adversarial_viewer(base, x, y, splits.class_names, eps=0.0, n=6)
    assert isinstance(v, ipywidgets.Widget) and v.last is v.state
    assert v.epsilon.continuous_update is False and v.index.max == len(x) - 6 and not v.index.disabled
    # labels are not cut ("first exam..."): the description keeps its natural width
    assert v.index.style.description_width == "initial" == v.epsilon.style.description_width
    s0 = dict(v.state)
    assert s0["pred_adv"] == s0["pred_clean"] and s0["perturbation_max"] == 0.0
    # at eps 0 the signed perturbation scale is one 8-bit grey level, not a degenerate 1e-9
    np.testing.assert_allclose(v.figure.axes[-1].get_ylim(), (-1 / 255, 1 / 255))
    assert s0["labels"] == y[:6].tolist()
    png0 = _png(v.output)
    assert png0.startswith(PNG)

    v.epsilon.value = 0.3
    s1 = dict(v.state)
    assert s1["eps"] == pytest.approx(0.3)
    assert s1["perturbation_max"] == pytest.approx(0.3, abs=1e-6)  # FGSM's L-inf step
    assert s1["pred_clean"] == s0["pred_clean"]
    assert s1["pred_adv"] != s0["pred_adv"] and s1["changed"] > 0
    assert _png(v.output) != png0

    v.index.value = 5
    assert v.state["index"] == 5 and v.state["labels"] == y[5:11].tolist()
    assert f"{v.state['perturbation_max']:.3f}" in v.status.value


def test_adversarial_figure_titles_show_predictions(trained, pool):
    _, splits, base = trained
    x, y = pool
    eps, n = 0.2, 4
    fig = fgsm_viewer.adversarial_figure(base, x, y, eps, splits.class_names, n=n)
    assert isinstance(fig, Figure)
    assert "eps = 0.2" in fig._suptitle.get_text()
    p = fgsm_viewer.adversarial_predictions(base, x[:n], y[:n], eps)
    axes = fig.axes[:3 * n]
    for i in range(n):
        assert axes[i].get_title() == f"pred {splits.class_names[int(p['pred_clean'][i])]}"
        assert axes[2 * n + i].get_title() == f"pred {splits.class_names[int(p['pred_adv'][i])]}"
    assert len(fig.axes) == 3 * n + 1  # plus the perturbation colourbar
    plt.close(fig)
