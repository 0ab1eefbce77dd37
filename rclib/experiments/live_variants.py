"""Chapter 01's one-shot variants of a baseline computed on demand and cached by setting: the
engine behind chapter 03's JupyterLab explorer (``report.map_explorer``), usable without any
widget (the book's static figure comes from it too).

Why caches: on the ``cpu`` profile a variant costs ~1 s (prune, share, evaluate, a 60x60 map)
and an FGSM pass ~0.1 s; moving a slider back to a value already seen should be instant. Every
variant's numbers and map are computed once per ``(method, rate, shared)`` and every robust
accuracy once per ``(method, rate, shared, eps)``. Models are not cached: only the variant on
screen is kept (a masked VGG16 is about 1.66 GB), and one seen before is rebuilt,
deterministically, when a new epsilon needs it.

Used by chapter 03 (boundary smoothness), through ``report.map_explorer``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Mapping

from torch import nn

from rclib.compress import prune, share
from rclib.compress.share import DEFAULT_BITS
from rclib.core.config import MAP_POINTS
from rclib.data import datasets, split
from rclib.experiments import pruning
from rclib.nn import masks, train
from rclib.robust import attacks, boundary

METHODS = {p.label: p for p in pruning.ONE_SHOT}  # the explorer's labels and what each one does
MAX_RESOLUTION = 60  # grid points per side of a live map at most: ~0.3 s a map on the cpu profile
MAP_BATCH = 1024  # grid points per forward pass without a config


def _rate_key(rate: float) -> float:
    # slider values carry float noise (0.5000000001); 4 decimals is finer than any slider step
    return round(float(rate), 4)


class Variants:
    """Computed model variants and their numbers, cached: the engine behind :class:`Explorer`,
    usable without any widget (the book's static figure).

    A variant is ``pruning.pruned(base, method, rate)`` (``rate == 0``: the unpruned base,
    whatever the method), optionally weight-shared in place with ``share.weight_share(model,
    bits)``, its masks then folded into the weights (nothing here retrains it). Per variant it
    keeps its clean test accuracy and its decision map; all maps lie on ONE PCA plane, fitted
    on the first map's inputs (the test inputs) and reused, so maps of different variants are
    comparable point by point. Robust accuracies are cached per epsilon. Only the most recent
    variant's model is kept (:meth:`model`), so the explorer holds ``base`` and one variant
    however many settings a reader tries. ``calls`` counts the actual computations
    (``"variant"``, ``"model"`` for a rebuilt model, ``"robust"``), so a cache hit is observable.

    Args:
        base: the trained, unpruned model (e.g. ``steps.baseline(cfg, splits)[0]``); never
            modified.
        splits: ``datasets.load(cfg)``; the test loader is used for all accuracies.
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

    def __init__(self, base: nn.Module, splits: datasets.Splits, resolution: int = MAX_RESOLUTION,
                 bits: Mapping[str, int] | int | None = None, max_points: int = MAP_POINTS,
                 batch_size: int = MAP_BATCH):
        self.base = base  # not even its train/eval mode is changed: every consumer sets eval itself
        self.splits = splits
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.bits = dict(DEFAULT_BITS) if bits is None else bits
        self.x, self.y = split.spread_sample(splits.test, max_points)  # as smoothness.map_inputs: every class
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
            model = masks.clone(self.base) if shared else self.base  # a copy only when sharing changes it
        else:
            model = pruning.pruned(self.base, METHODS[method], rate)
        if shared:
            share.weight_share(model, self.bits)  # on the masked copy: pruned entries stay zero
        return model if model is self.base else masks.make_permanent(model).eval()

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
