"""Chapter 04's experiment: Table 1 for one seed and one prune rate, plus Alg 7's ablation.

Used by chapters 04, 05 and 06.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rclib.compress import share, sizes
from rclib.core import artifacts
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets
from rclib.experiments import retrain
from rclib.experiments.pruning import GLOBAL, pruned
from rclib.experiments.steps import kind_of, rebuild, runtime_of, share_bits
from rclib.experiments.variants import ABLATION, TABLE1, Variant, labels
from rclib.nn import masks, train
from rclib.robust import attacks

# what every model of Table 1 is made from, and how it is attacked: chapters 05 and 06 build on it
READS = ("seed", "data", "model", "train", "retrain", "attack", "alg7", "sharing")
TABLE = Step("robust_table", READS + ("prune_rate",))


def robust_table(cfg: Config, splits: datasets.Splits, base: nn.Module, rate: float,
                 progress: bool = True) -> tuple[list[dict[str, Any]], Mapping[str, dict], bool]:
    """Table 1 for one seed (``cfg.seed``) and one global prune rate, plus Alg 7's ablation.

    Rows (each a copy of ``base`` pruned with global unstructured pruning at ``rate``):

    * ``Baseline``: unpruned.
    * ``Pruned``: no retraining.
    * ``Pruned + Retrained``: the same budget as Alg 7 (``cfg.adv_epochs`` epochs, the same
      optimiser) on clean data only, plain cross-entropy.
    * ``Pruned + Adv Ret.``: Alg 7, ``margin.adversarial_retrain`` with ``cfg.adv_epsilon`` and
      ``cfg.margin_weight``.
    * ``Pruned + Adv Ret. + WS``: then weight sharing (Alg 6, ``cfg.conv_bits``/``linear_bits``).
    * Ablation: Alg 7 with ``margin_weight = 0`` (FGSM training only) and with ``eps = 0``
      (clean data + margin only).

    Each row has clean and FGSM (``cfg.epsilon``) test accuracy, FGSM robust accuracy among the
    test inputs the model classifies correctly (``robust_given_clean``: robustness apart from
    clean accuracy), the FGSM curve over ``cfg.epsilons`` (``curve``), the paper's approximate size
    (weight-shared formula for the WS row) and the bytes of our compressed file. The retrained
    models are :func:`rclib.experiments.retrain.retrained`'s cached steps and their accuracies
    :func:`rclib.experiments.retrain.evaluated`'s (the same counts ``train.evaluate`` and ``robust_accuracy``
    give, or those ``python -m rclib evaluate`` wrote under torchrun); they are loaded one at a
    time with their masks folded in, so at most two models (``base`` and one variant) exist at once.

    Returns:
        ``(rows, states, cached)``; ``states`` maps every :class:`~rclib.experiments.variants.Variant`
        to its effective state dict (masks folded in; ``steps.rebuild`` makes it a model), built or read from
        the cache on each access and not kept (``retrain.LazyStates``): Figure 8's decision maps
        and chapter 05's attacks use them.

    Used by chapters 04 and 05.
    """
    device = next(base.parameters()).device
    rows_of = TABLE1 + ABLATION
    rt = runtime_of(cfg, base)

    def state_of(v: Variant) -> dict[str, torch.Tensor]:
        if not v.pruned:
            return masks.effective_state(base)
        if v.retraining is None:
            m = pruned(base, GLOBAL, rate)
        else:
            state = retrain.retrained(cfg, splits, base, rate, v.retraining)[0]
            if not v.shared:
                return state
            m = rebuild(cfg, splits, state, device, rt, what=v.label)
        if v.shared:
            share.weight_share(m, share_bits(cfg))
        return masks.effective_state(m)

    def compute():
        rows = []
        for v in progress_bar(rows_of, desc=f"Table 1 at r={rate:g}", show=progress):
            own_step = v.retraining is not None and not v.shared  # its evaluation is a cached step of its own
            if own_step:
                found, counts, _ = retrain.evaluated(cfg, splits, base, rate, v.retraining)
                acc = {k: counts[k]["correct"] / max(counts[k]["n"], 1) for k in ("clean", "fgsm")}
                clean_ok, fgsm_ok = found["clean"].bool(), found["fgsm"].bool()
            m = base if not v.pruned else rebuild(cfg, splits, state_of(v), device, rt, what=v.label)
            if not own_step:
                clean_ok = attacks.robust_correct(m, splits.test, attacks.fgsm, 0.0, runtime=rt)
                fgsm_ok = attacks.robust_correct(m, splits.test, attacks.fgsm, cfg.epsilon, runtime=rt)
                acc = dict(clean=train.evaluate(m, splits.test, runtime=rt),
                           fgsm=int(fgsm_ok.sum()) / max(len(fgsm_ok), 1))
            rows.append(dict(
                variant=v.label, seed=cfg.seed, rate=rate, accuracy=acc["clean"], robust_accuracy=acc["fgsm"],
                robust_given_clean=int((clean_ok & fgsm_ok).sum()) / max(int(clean_ok.sum()), 1),
                curve=attacks.fgsm_curve(m, splits.test, cfg.epsilons, runtime=rt),
                approx_mb=sizes.shared_size_mb(m, share_bits(cfg)) if v.shared else sizes.approx_size_mb(m),
                file_bytes=sizes.size_report(m)["file_bytes"]))
            del m
        return None, {"rows": rows}

    def check(tensors, metrics):  # every row chapter 04 tabulates
        artifacts.rows_with("variant", "seed", "rate", "accuracy", "robust_accuracy", "robust_given_clean", "curve",
                            "approx_mb", "file_bytes")(tensors, metrics)
        missing = set(labels(rows_of)) - {row["variant"] for row in metrics["rows"]}
        if missing:
            raise KeyError(f"rows lack the variants {sorted(missing)}")

    step_cfg = dataclasses.replace(cfg, prune_rate=rate)
    _, metrics, hit = artifacts.cached(step_cfg, TABLE, compute, check=check, kind=kind_of(cfg, base))
    return metrics["rows"], retrain.LazyStates(rows_of, state_of), hit
