"""Chapter 06's study: for every model of Table 1 and its ablation, per seed, each input's
distance to the decision boundary (:mod:`rclib.robust.distance`) on chapter 05's attack sample, and
what it says per model. A cached step per seed on top of :mod:`rclib.experiments.steps`'s Table 1 models.

Used by chapter 06.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from rclib.core import artifacts
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets
from rclib.experiments import attack_study, table1
from rclib.experiments.steps import kind_of, rebuild
from rclib.experiments.variants import ABLATION, BASELINE, TABLE1, Variant, labels
from rclib.robust import boundary, distance

VARIANTS = TABLE1 + ABLATION  # the baseline first: the others are measured on the digits it gets right
# what the distances read: the models (Table 1's reads), which rate, and which sample of digits
TABLE = Step("distance_table", table1.READS + ("prune_rate", "attack_sample", "local_examples", "local_resolution"))
LOOSE = 1.1  # DeepFool's bound counts as looser than the bisection's when more than 10% above it
BRACKET_TOLERANCE = 0.05  # see bracket_tolerance
PER_INPUT = ("margin", "deepfool", "low", "high", "distance")
# An input no attack flipped has no finite bound (inf in rclib.robust.distance). Stored as 1.0, the
# largest L-infinity distance two points of the pixel box can have: beyond every eps tried, and
# finite, as the artifact cache requires of every tensor.
UNFLIPPED = 1.0
GRID = tuple(i / 100 for i in range(51))  # the eps of the curves derived from distances: 0 to 0.5
# local decision maps per model for the roughness beside each distance: a third of chapter 03's
# 12 (about 0.4 s a model on the cpu profile instead of 1.1 s: the book's 10-minute budget)
ROUGHNESS_EXAMPLES = 4


def bracket(d: dict[str, torch.Tensor], eps: float) -> tuple[float, float]:
    """The robust accuracy at ``eps`` that the PGD bisection's bracket allows, ``(lower, upper)``:
    the share of correct inputs PGD could not flip even at ``low >= eps``, and the share with no
    flip found at or below eps (``high > eps``). A fixed-eps PGD run at ``eps`` on the same inputs
    lands in between unless its success is not monotone in eps (a random start). Used by
    chapter 06 against chapter 05's PGD-10 points."""
    e, high = torch.tensor(float(eps)), d["high"]
    return (float(((high > 0) & (d["low"] >= e)).double().mean()), float((high > e).double().mean()))


def summarise(d: dict[str, torch.Tensor], base_correct: torch.Tensor, eps: Sequence[float] = ()) -> dict[str, Any]:
    """One model's numbers from its per-input distances ``d`` (:func:`rclib.robust.distance.distances`,
    inputs no attack flipped at ``UNFLIPPED``) and the baseline's correct inputs of the same
    sample. ``None`` where a number has nothing to be computed from:

    * ``clean_accuracy``: share classified correctly (distance > 0);
    * ``median``: median distance over every input (0 where wrong; ``UNFLIPPED`` where nothing
      flipped it);
    * ``median_both``: median distance over the inputs that this model and the baseline both
      classify correctly, so a model is not called closer to the boundary only because it gets
      more inputs wrong;
    * ``rho``: Spearman's rank correlation between the clean logit margin and the distance over
      the inputs classified correctly and flipped by some attack (at least 3, neither constant);
    * ``loose``: among the inputs both attacks flipped, the share where DeepFool's bound exceeds
      the bisection's by more than ``LOOSE``;
    * ``curve_accuracy``: robust accuracy at each eps of ``GRID`` implied by the distances
      (:func:`rclib.robust.distance.accuracy_curve`);
    * ``bracket_low_accuracy``, ``bracket_high_accuracy``: :func:`bracket` at each of ``eps``;
    * ``n``, ``n_both``, ``n_rho``: the inputs each number is over.

    :func:`distance_table` adds ``local_boundary_length``, chapter 03's roughness
    (:func:`rclib.robust.boundary.local_roughness`) of the same model.

    Used by chapter 06.
    """
    dist, right = d["distance"], d["distance"] > 0
    both = right & base_correct
    finite = right & (dist < UNFLIPPED)
    flipped = right & (d["deepfool"] < UNFLIPPED) & (d["high"] < UNFLIPPED)
    rho = None
    if int(finite.sum()) >= 3:
        m, x = d["margin"][finite].numpy(), dist[finite].numpy()
        if np.ptp(m) > 0 and np.ptp(x) > 0:
            rho = float(stats.spearmanr(m, x).statistic)
    loose = float((d["deepfool"][flipped] > LOOSE * d["high"][flipped]).double().mean()) if flipped.any() else None
    return dict(clean_accuracy=float(right.double().mean()), median=distance.median(dist),
                median_both=distance.median(dist[both]) if both.any() else None, rho=rho, loose=loose,
                curve_accuracy=distance.accuracy_curve(dist, GRID),
                bracket_low_accuracy=[bracket(d, e)[0] for e in eps],
                bracket_high_accuracy=[bracket(d, e)[1] for e in eps],
                n=len(dist), n_both=int(both.sum()), n_rho=int(finite.sum()))


def distance_table(cfg: Config, splits: datasets.Splits, base: torch.nn.Module, rate: float,
                   progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], bool]:
    """Every model of Table 1 and its ablation (chapter 04's cached models, trained if missing)
    at prune rate ``rate``, for one seed: per input of :func:`rclib.experiments.attack_study.attack_subset`
    (chapter 05's ``cfg.attack_sample`` digits), the clean logit margin, DeepFool's bound, the PGD
    bisection's bracket and the distance (:func:`rclib.robust.distance.distances`), and one row per
    model (:func:`summarise`, plus the local roughness of chapter 03 on the first
    ``ROUGHNESS_EXAMPLES`` digits). Cached; the attacks run on one torch thread (as chapter 05's).

    Returns:
        ``(rows, per_input, cached)``: rows with ``variant`` and :func:`summarise`'s keys;
        ``per_input[f"{variant}|{key}"]`` float32 (N,) for every key of ``PER_INPUT``, and
        ``per_input["subset"]`` the test indices.

    Used by chapter 06.
    """
    def compute():
        _, states, _ = table1.robust_table(cfg, splits, base, rate, progress=False)
        with attack_study.one_thread():
            return measure(states)

    def measure(states: dict[Variant, dict]):
        device = next(base.parameters()).device
        idx = attack_study.attack_subset(cfg, len(splits.test.dataset))
        xs, ys = attack_study.take(splits.test.dataset, idx)
        tensors: dict[str, torch.Tensor] = {"subset": idx}
        rows, base_correct = [], None
        for v in progress_bar(VARIANTS, desc=f"distances, seed {cfg.seed}", show=progress):
            m = rebuild(cfg, splits, states[v], device, what=v.label)  # one at a time: paper-scale ones are 0.5 GB
            d = distance.distances(m, xs, ys, seed=cfg.seed, batch_size=cfg.eval_batch_size)
            d = {k: v if k == "margin" else v.clamp(max=UNFLIPPED) for k, v in d.items()}
            k = min(ROUGHNESS_EXAMPLES, cfg.local_examples, len(ys))
            rough = boundary.local_roughness(m, xs[:k].to(device), ys[:k].to(device), seed=cfg.seed,
                                             resolution=cfg.local_resolution, batch_size=cfg.eval_batch_size)
            del m
            if v == BASELINE:
                base_correct = d["distance"] > 0
            rows.append(dict(variant=v.label, **summarise(d, base_correct, cfg.epsilons),
                             local_boundary_length=float(rough["boundary_length"])))
            tensors.update({f"{v.label}|{k}": d[k].float().contiguous() for k in PER_INPUT})
        return tensors, {"rows": rows}

    def check(tensors, metrics):
        artifacts.rows_with("variant", "clean_accuracy", "median", "median_both", "rho", "loose", "n")(tensors, metrics)
        missing = [f"{v.label}|{k}" for v in VARIANTS for k in PER_INPUT if f"{v.label}|{k}" not in tensors]
        if missing or [r["variant"] for r in metrics["rows"]] != labels(VARIANTS):
            raise KeyError(f"distances lack {missing[:3] or 'rows'}")

    step_cfg = dataclasses.replace(cfg, prune_rate=rate)
    tensors, metrics, hit = artifacts.cached(step_cfg, TABLE, compute, check=check, kind=kind_of(cfg, base))
    return [dict(r, seed=cfg.seed, rate=rate) for r in metrics["rows"]], tensors, hit


def bracket_tolerance(n: int) -> float:
    """How far chapter 05's PGD-10 accuracy at an epsilon may lie outside the bracket the
    bisection gives there before the check fails: ``BRACKET_TOLERANCE`` (5 pp), or two inputs of
    the ``n``-input sample when that is more. PGD's success is not monotone in epsilon and its
    random starts are not the bisection's, so an input or two may land on the other side; on the
    smoke profile's 20 inputs one input is already 5 pp. Used by chapter 06."""
    return max(BRACKET_TOLERANCE, 2 / max(int(n), 1))
