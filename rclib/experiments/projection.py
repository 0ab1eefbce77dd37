"""How long the whole ``paper`` book takes on a device, projected from measured rates.

Each chapter's heavy work is counted in images per operation (training, evaluation, FGSM,
PGD-10, Algorithm 7's step, JPEG decoding), from the profile's fields: 40k/10k images, its prune
rates, seeds, epsilons, maps and retraining epochs. Dividing by the rates ``python -m rclib
gpu-check`` measured gives seconds, and every row shows that arithmetic. Work that does not scale
with images (pruning, weight sharing, the compressed file, ART's subset attacks beyond their
gradient steps, notebook start-up) is left out, so the total is a lower bound of that order.
Training reads JPEGs each epoch, so its rate is the lower of the compute and the decoding rate.

Used by :mod:`rclib.experiments.gpucheck`.
"""

from __future__ import annotations

import math
from typing import Any

from rclib.core.config import Config
from rclib.experiments import attack_study, pruning

IMAGENET_VAL = 50_000  # images of the ILSVRC2012 validation set that the paper splits 40k/10k
PRUNE_METHODS_ONE_SHOT = len(pruning.ONE_SHOT)  # chapter 01's one-shot variants (prune_sweep)
BOUNDARY_METHODS = len(pruning.ALGORITHMS)  # chapter 03's algorithms (smoothness.compressed_variants)
ATTACK_MODELS = len(attack_study.VARIANTS)  # Table 1, its ablation and the Madry-style row
SUBSET_PGD10_EQUIVALENTS = 16  # PGD-50 x2 (10), APGD-CE 20 steps (2), APGD-T 2 x 20 steps (4)


def work(cfg: Config) -> list[tuple[str, str, str, int]]:
    """``(chapter, what, operation, images)`` for every counted piece of the book under ``cfg``."""
    n_test = round(IMAGENET_VAL * cfg.test_fraction) if cfg.test_size == 0 else cfg.test_size
    n_train = IMAGENET_VAL - n_test if cfg.train_size == 0 else cfg.train_size
    seeds, rates, eps = len(cfg.seeds), len(cfg.prune_rates), sum(e > 0 for e in cfg.epsilons)
    alg5 = math.ceil(max(cfg.prune_rates) / cfg.prune_step - 1e-9)
    alg5_maps = math.ceil(max(cfg.map_rates) / cfg.prune_step - 1e-9)
    variants = 2 * (1 + BOUNDARY_METHODS * len(cfg.map_rates))
    map_points = cfg.resolution ** 2 + cfg.local_examples * cfg.local_resolution ** 2
    rows = [
        ("00", "decode the test set once", "decode", n_test),
        ("00", f"baseline: {cfg.epochs} epochs", "train", cfg.epochs * n_train),
        ("00", "clean accuracy", "evaluate", n_test),
        ("00", f"FGSM at {eps} epsilons", "FGSM", eps * n_test),
        ("01", f"{PRUNE_METHODS_ONE_SHOT} one-shot methods x {rates} rates: clean", "evaluate",
         PRUNE_METHODS_ONE_SHOT * rates * n_test),
        ("01", f"{PRUNE_METHODS_ONE_SHOT} one-shot methods x {rates} rates: FGSM", "FGSM",
         PRUNE_METHODS_ONE_SHOT * rates * n_test),
        ("01", f"Alg 5: {alg5} steps x {cfg.retrain_epochs} epochs", "train", alg5 * cfg.retrain_epochs * n_train),
        ("01", f"Alg 5 at {rates} rates: clean + FGSM", "evaluate", 2 * rates * n_test),
        ("02", f"{rates} rates x 2 (shared or not): clean", "evaluate", 2 * rates * n_test),
        ("02", f"{rates} rates x 2: FGSM", "FGSM", 2 * rates * n_test),
        ("03", f"Alg 5 to {max(cfg.map_rates):g}: {alg5_maps} steps x {cfg.retrain_epochs} epochs", "train",
         alg5_maps * cfg.retrain_epochs * n_train),
        ("03", f"{variants} variants: clean + {map_points:,} map points", "evaluate", variants * (n_test + map_points)),
        ("03", f"{variants} variants: FGSM", "FGSM", variants * n_test),
        ("04", f"{seeds} seeds: decode their test sets, baselines' clean accuracy", "decode", (seeds - 1) * n_test),
        ("04", f"{seeds} seeds x 2 rates: clean and margin-only retraining, {cfg.adv_epochs} epoch(s)", "train",
         seeds * 2 * 2 * cfg.adv_epochs * n_train),
        ("04", f"{seeds} seeds x 2 rates: Alg 7 with and without margin", "Alg 7 step",
         seeds * 2 * 2 * cfg.adv_epochs * n_train),
        ("04", f"{seeds} seeds x 2 rates x 7 models: clean", "evaluate", seeds * 2 * 7 * n_test + seeds * n_test),
        ("04", f"{seeds} seeds x 2 rates x 7 models: FGSM", "FGSM", seeds * 2 * 7 * n_test),
        ("04", f"{seeds} seeds x 2 rates x 4 retrained: PGD-10", "PGD-10", seeds * 2 * 4 * n_test),
        ("05", f"{seeds} seeds: Madry-style Alg 7 (7 PGD steps, counted as Alg 7 + 0.7 PGD-10)", "Alg 7 step",
         seeds * cfg.adv_epochs * n_train),
        ("05", f"{seeds} seeds: Madry-style Alg 7, its PGD steps", "PGD-10", round(seeds * cfg.adv_epochs * n_train * 0.7)),
        ("05", f"{seeds} seeds x {ATTACK_MODELS} models: clean + 14 transfer evaluations", "evaluate",
         seeds * (ATTACK_MODELS + 14) * n_test),
        ("05", f"{seeds} seeds x {ATTACK_MODELS} models: FGSM + zero-gradient check", "FGSM",
         seeds * 2 * ATTACK_MODELS * n_test),
        ("05", f"{seeds} seeds: PGD-10 on {ATTACK_MODELS} models + 2 transfer sources + subset attacks", "PGD-10",
         seeds * ((ATTACK_MODELS + 2) * n_test + ATTACK_MODELS * SUBSET_PGD10_EQUIVALENTS * cfg.attack_sample)),
    ]
    return [r for r in rows if r[3] > 0]


def project(cfg: Config, rates: dict[str, float], decode: float | None) -> dict[str, Any]:
    """Seconds per counted piece of :func:`work` from ``rates`` (images/s per operation, as
    ``gpu-check`` names them) and the JPEG ``decode`` rate; a piece whose rate was not measured
    has ``seconds`` None and makes the total partial."""
    eff = dict(rates)
    if decode:
        eff["decode"] = decode
        for op in ("train", "Alg 7 step"):  # training batches come from JPEGs each epoch
            if op in eff:
                eff[op] = min(eff[op], decode)
    rows, total, missing = [], 0.0, []
    for chapter, what, op, images in work(cfg):
        r = eff.get(op)
        seconds = images / r if r else None
        arithmetic = f"{images:,} / {r:,.1f} images/s = {seconds:,.0f} s" if r else f"{images:,} / (not measured)"
        rows.append(dict(chapter=chapter, work=what, operation=op, images=images, images_per_s=r,
                         seconds=seconds, arithmetic=arithmetic))
        if seconds is None:
            missing.append(op)
        else:
            total += seconds
    per_chapter: dict[str, float] = {}
    for row in rows:
        per_chapter[row["chapter"]] = per_chapter.get(row["chapter"], 0.0) + (row["seconds"] or 0.0)
    return {"rows": rows, "per_chapter_s": per_chapter, "total_s": total, "complete": not missing,
            "not_measured": sorted(set(missing))}


def markdown(p: dict[str, Any]) -> str:
    """The projection as a markdown table with its arithmetic and the total."""
    lines = ["| chapter | work | operation | images / rate = time |", "|---|---|---|---|"]
    lines += [f"| {r['chapter']} | {r['work']} | {r['operation']} | {r['arithmetic']} |" for r in p["rows"]]
    chapters = ", ".join(f"{c}: {s / 60:,.1f} min" for c, s in p["per_chapter_s"].items())
    state = "" if p["complete"] else f" (partial: {', '.join(p['not_measured'])} not measured)"
    return "\n".join(lines) + f"\n\nProjected `paper` book: {p['total_s'] / 3600:,.2f} h{state} ({chapters})."
