"""Chapter 03's experiments: compressed variants of a baseline, and the roughness of their
decision boundaries (Sec 3.3) beside their robustness.

Used by chapter 03 (``map_inputs`` also by chapter 04).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rclib.compress import share
from rclib.core import artifacts
from rclib.core.config import MAP_POINTS, Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets, split
from rclib.experiments.pruning import ALGORITHMS, Pruning, iterative_trajectory, pruned
from rclib.experiments.steps import kind_of, runtime_of, share_bits
from rclib.nn import masks, train
from rclib.robust import attacks, boundary

SWEEP = Step("boundary_sweep", ("seed", "data", "model", "train", "retrain", "prune_step", "map_rates", "epsilon",
                                "sharing", "maps"))


def map_inputs(splits: datasets.Splits, device: Any = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``MAP_POINTS`` test inputs and labels for PCA decision maps, spread across the classes
    (``split.spread_sample``, seeded): a 10k x 150k ImageNet matrix would not fit PCA in memory,
    and the first 1000 of a class-sorted test set would hold 100 of its 1000 classes. Every
    prefix covers as many classes as it can, so the local maps' ``x[:local_examples]`` do too.
    Digits' test set is used whole. Used by chapters 03 and 04."""
    x, y = split.spread_sample(splits.test, MAP_POINTS, seed)
    return x.to(device), y.to(device)


class CompressedVariants(Mapping):
    """Chapter 03's compressed versions of one baseline, by label, made one at a time.

    ``variants[label]`` is the variant's description ``{"method", "rate", "shared"}``;
    :meth:`model` builds the variant itself, afresh on each call, on ``base``'s device: nothing
    but the hardened models of the iterative trajectory (on the host, ``HostModel``) is kept,
    so a loop that drops each model before asking for the next holds ``base`` and one variant
    (a masked VGG16 alone is about 1.66 GB: weight_orig, mask and weight; 26 of them were 41 GB).
    Masks are folded into the weights (``masks.make_permanent``) once the variant is made, since
    nothing here retrains it: the same numbers from a third of the memory.

    Built by :func:`compressed_variants`. Used by chapter 03.
    """

    def __init__(self, cfg: Config, splits: datasets.Splits, base: nn.Module, rates,
                 methods=ALGORITHMS, shared=(False, True)):
        rates = sorted(float(r) for r in rates)
        self.base, self.bits = base, share_bits(cfg)
        # Alg 5 trains, so its models are made once, on one trajectory, and kept on the host
        self.hardened = iterative_trajectory(cfg, splits, base, rates) if "iterative" in methods else {}
        self._info: dict[str, dict[str, Any]] = {}
        for method, r in [("baseline", 0.0)] + [(m, r) for m in methods for r in rates]:
            for ws in shared:
                label = ("baseline" if method == "baseline" else f"{method} r={r:g}") + (" + WS" if ws else "")
                self._info[label] = dict(method=method, rate=r, shared=ws)

    def __getitem__(self, label: str) -> dict[str, Any]:
        return dict(self._info[label])

    def __iter__(self):
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def model(self, label: str) -> nn.Module:
        """The variant ``label`` in eval mode, masks folded; ``base`` itself for ``"baseline"``
        (never modified). Drop it (``del``) before asking for the next one."""
        v = self[label]
        if v["method"] == "baseline":
            if not v["shared"]:
                return self.base
            m = masks.clone(self.base)
        elif v["method"] == "iterative":
            m = self.hardened[v["rate"]].build(next(self.base.parameters()).device)
        else:
            m = pruned(self.base, Pruning(v["method"]), v["rate"])
        if v["shared"]:
            share.weight_share(m, self.bits)  # on the masked copy: pruned entries stay zero
        return masks.make_permanent(m).eval()


def compressed_variants(cfg: Config, splits: datasets.Splits, base: nn.Module, rates,
                        methods=ALGORITHMS, shared=(False, True)) -> CompressedVariants:
    """Every compressed version of ``base`` that chapter 03 compares, by label.

    ``methods``: one-shot ``global``/``layer``/``channel`` (Alg 1-3, not retrained) and
    ``iterative`` (Alg 5: channel pruning in ``cfg.prune_step`` steps with ``retrainer``,
    hardened), each at every rate of ``rates``, each without and with weight sharing (Alg 6 with
    ``share_bits(cfg)``). The baseline (``"baseline"``, and ``"baseline + WS"``) comes first.

    Returns:
        A :class:`CompressedVariants`: ``{label: {"method", "rate", "shared"}}`` in a stable
        order, whose ``model(label)`` builds each variant when it is needed.

    Example:
        >>> variants = compressed_variants(cfg, splits, base, [0.5])
        >>> for label in variants:
        ...     m = variants.model(label)
        ...     print(label, train.evaluate(m, splits.test))
        ...     del m  # one variant at a time

    Used by chapter 03.
    """
    return CompressedVariants(cfg, splits, base, rates, methods, shared)


def boundary_sweep(cfg: Config, splits: datasets.Splits, base: nn.Module,
                   progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Roughness against robustness for every variant of :func:`compressed_variants` at
    ``cfg.map_rates`` (cached).

    Each row: label, method, rate, shared, clean and FGSM (``cfg.epsilon``) accuracy, the
    ``boundary.roughness`` of the PCA map (``cfg.resolution``; one PCA plane fitted on the test
    inputs, shared by all variants) prefixed ``pca_``, and the mean roughness of local maps
    (``cfg.local_resolution``) around the first ``cfg.local_examples`` test inputs prefixed
    ``local_``. The PCA plane is fitted on :func:`map_inputs`. Variants are made, measured and
    dropped one at a time (``base`` and one variant on the device); map forward passes run in
    batches of ``cfg.eval_batch_size``.

    Used by chapter 03.
    """
    def compute():
        x, y = map_inputs(splits, next(base.parameters()).device, cfg.seed)
        n, batch = cfg.local_examples, cfg.eval_batch_size
        variants = compressed_variants(cfg, splits, base, cfg.map_rates)
        rows, pca = [], None
        for label in progress_bar(variants, desc="roughness", show=progress):
            v, m = variants[label], variants.model(label)
            dmap = boundary.decision_map(m, x, y, resolution=cfg.resolution, pca=pca, batch_size=batch)
            pca = dmap.pca
            rt = runtime_of(cfg, m)
            row = dict(label=label, method=v["method"], rate=v["rate"], shared=v["shared"],
                       accuracy=train.evaluate(m, splits.test, runtime=rt),
                       robust_accuracy=attacks.robust_accuracy(m, splits.test, attacks.fgsm, cfg.epsilon,
                                                               runtime=rt))
            row.update({f"pca_{k}": float(val) for k, val in boundary.roughness(dmap).items()})
            row.update({f"local_{k}": float(val) for k, val in
                        boundary.local_roughness(m, x[:n], y[:n], seed=cfg.seed, resolution=cfg.local_resolution,
                                                 batch_size=batch).items()})
            rows.append(row)
            del m, dmap
        return None, {"rows": rows}

    check = artifacts.rows_with("label", "method", "rate", "shared", "accuracy", "robust_accuracy",
                                "pca_boundary_length", "pca_confidence_tv", "pca_regions",
                                "local_boundary_length", "local_confidence_tv")
    _, metrics, hit = artifacts.cached(cfg, SWEEP, compute, check=check,
                                       kind=kind_of(cfg, base))
    return metrics["rows"], hit
