"""Table 1's retrained models, one cached step each (Alg 7, its ablations, the clean control and
the Madry-style PGD variant: ``experiments.variants``), so a chapter streams them one at a time
instead of holding seven VGG16-sized models, and a run elsewhere (``python -m rclib retrain``) can
produce the very artifact a chapter reads.

Every step starts from the same copy of the baseline, globally pruned (Alg 1) at ``rate``, and
retrains it for ``cfg.adv_epochs`` epochs with the retraining optimiser (App. C: SGD, lr 0.005,
momentum 0.9, weight decay 0.005).

Used by chapters 04-06 (through ``table1.robust_table`` and ``attack_study``) and by
``python -m rclib retrain`` / ``evaluate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import nn

from rclib.compress import prune
from rclib.core import accel, artifacts
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.experiments.steps import BASELINE, kind_of, rebuild, runtime_of
from rclib.experiments.variants import MADRY_STEPS, Retraining, Variant
from rclib.nn import masks, train
from rclib.robust import attacks, margin

# every retraining reads the baseline's fields, the retraining optimiser's and the prune rate;
# each adds the Alg 7 fields it uses (Retraining.reads)
RETRAINED = Step("retrained", BASELINE.reads + ("retrain_optimizer", "retrain_lr", "retrain_momentum",
                                                "retrain_weight_decay", "adv_epochs", "prune_rate"))


def retrain_in_place(cfg: Config, model: nn.Module, loader, how: Retraining, progress: bool = False,
                     runtime: accel.Runtime | None = None) -> list[dict[str, Any]]:
    """Run the retraining ``how`` on ``model`` (already pruned) in place; returns the history.

    The one place that maps a step to ``train.fit`` or ``margin.adversarial_retrain`` with the
    retraining optimiser of ``cfg`` (and ``runtime``'s precision and copies, see
    :mod:`rclib.core.accel`), so every caller (chapters, command line) trains alike.
    """
    optimiser = train.Optimiser.retraining(cfg)
    if not how.adversarial:
        return train.fit(model, loader, cfg.adv_epochs, optimiser, seed=cfg.seed, desc="retrain", progress=progress,
                         blame=f"retrain_lr={cfg.retrain_lr:g}", runtime=runtime)
    objective = margin.Objective(eps=cfg.adv_epsilon if how.perturbs else 0.0,
                                 margin_weight=cfg.margin_weight if how.margin else 0.0,
                                 on=cfg.margin_on, attack=how.attack, pgd_steps=MADRY_STEPS)
    return margin.adversarial_retrain(model, loader, objective, cfg.adv_epochs, optimiser, seed=cfg.seed,
                                      progress=progress, runtime=runtime,
                                      blame=f"retrain_lr={cfg.retrain_lr:g} or margin_weight={objective.margin_weight:g}")


def artifact(cfg: Config, rate: float, how: Retraining, base: nn.Module) -> dict[str, Any]:
    """The key under which the model retrained by ``how`` at ``rate`` from ``base`` on ``base``'s
    device is cached: ``artifacts.cached(**key, ...)`` and ``artifacts.location(**key)`` take it.
    One definition for the chapters and for ``python -m rclib retrain`` (one process or many),
    so both find the same artifact."""
    step = RETRAINED.named(f"retrained-{how.name}").reading(*how.reads())
    return dict(cfg=dataclasses.replace(cfg, prune_rate=rate), step=step, kind=kind_of(cfg, base))


def state_check(base: nn.Module, how: Retraining) -> Callable[[dict | None, dict], None]:
    """The ``check`` of a step's artifact: its tensors fit ``base``'s architecture exactly (names,
    shapes and dtypes) and its metrics hold a history; raises ``RuntimeError`` or ``KeyError`` otherwise."""
    want = {k: (v.shape, v.dtype) for k, v in masks.effective_state(base).items()}

    def check(tensors, metrics):
        if tensors is None or {k: (v.shape, v.dtype) for k, v in tensors.items()} != want:
            raise RuntimeError(f"the {how.name!r} tensors do not fit the model (names, shapes or dtypes)")
        if "history" not in metrics:
            raise KeyError("metrics lack history")
    return check


def pruned_copy(base: nn.Module, rate: float) -> nn.Module:
    """A copy of ``base`` globally pruned (Alg 1) at ``rate``, masks attached: where every step
    starts. Deterministic, so every process of a distributed run computes the same masks."""
    m = masks.clone(base)
    prune.global_unstructured(m, rate)
    return m


def retrained(cfg: Config, splits, base: nn.Module, rate: float, how: Retraining,
              progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """One Table 1 model: ``base`` globally pruned at ``rate`` and retrained by ``how`` (cached).

    Args:
        cfg: what the step reads keys the artifact (:func:`artifact`); ``cfg.seed`` seeds the run.
        splits: ``datasets.load(cfg)``; trains on ``splits.train``.
        base: the baseline, on the device to train on; never modified.
        rate: the global prune rate (Table 1: 0.5).
        how: one of ``variants.RETRAININGS``.

    Returns:
        ``(state, metrics, cached)``: the effective state dict on the host (masks folded in, so
        pruned weights are stored as exact zeros; load it with ``strict=True`` into a model built
        like ``base``), ``{"history": [...], "world_size": 1}`` and whether it came from disk.
        Only one retrained copy of ``base`` exists at a time, and it is gone when this returns.
        ``python -m rclib retrain`` under torchrun writes the same artifact with
        ``world_size`` processes (:mod:`rclib.experiments.distributed`).

    Used by chapters 04 and 05, and by ``python -m rclib retrain`` in one process.
    """
    def compute():
        m = pruned_copy(base, rate)
        history = retrain_in_place(cfg, m, splits.train, how, progress, runtime_of(cfg, base))
        return masks.effective_state(m), {"history": history, "world_size": 1}

    return artifacts.cached(**artifact(cfg, rate, how, base), compute=compute, check=state_check(base, how))


EVAL_ATTACKS = ("clean", "fgsm", "pgd")
EVAL_PGD_STEPS = 10  # PGD-10 with a random start, chapter 05's cheap white-box attack


def evaluation_artifact(cfg: Config, rate: float, how: Retraining, base: nn.Module) -> dict[str, Any]:
    """The key of the robust evaluation of ``how``'s model (see :func:`evaluated`): that of
    :func:`artifact`, also reading ``epsilon``."""
    key = artifact(cfg, rate, how, base)
    return dict(key, step=key["step"].named(f"evaluated-{how.name}").reading("epsilon"))


def outcomes(model: nn.Module, loader, eps: float, seed: int,
             runtime: accel.Runtime | None = None) -> dict[str, torch.Tensor]:
    """Per-example outcomes (bool, loader order, True where still correct) of ``model`` on
    ``loader``: clean, FGSM at ``eps`` and PGD-10 at ``eps`` whose random starts come from a
    generator seeded with ``seed``; ``runtime`` as in :func:`rclib.robust.attacks.robust_correct`.
    Used by :func:`evaluated` and ``rclib.experiments.distributed``."""
    device = next(model.parameters()).device
    return {"clean": attacks.robust_correct(model, loader, attacks.fgsm, 0.0, runtime=runtime),
            "fgsm": attacks.robust_correct(model, loader, attacks.fgsm, eps, runtime=runtime),
            "pgd": attacks.robust_correct(model, loader, attacks.pgd, eps, runtime=runtime, steps=EVAL_PGD_STEPS,
                                          generator=torch.Generator(device=device).manual_seed(seed))}


def counts(found: dict[str, torch.Tensor], eps: float, world_size: int = 1) -> dict[str, Any]:
    """The metrics of an evaluation: for each attack ``{"correct", "n"}`` (counts, so results of
    several processes add up exactly), plus ``epsilon``, ``pgd_steps`` and ``world_size``."""
    out: dict[str, Any] = {k: {"correct": int(found[k].sum()), "n": len(found[k])} for k in EVAL_ATTACKS}
    return dict(out, epsilon=eps, pgd_steps=EVAL_PGD_STEPS, world_size=world_size)


def evaluation_check(tensors, metrics) -> None:
    """The ``check`` of an evaluation artifact: counts and per-example outcomes of every attack."""
    for k in EVAL_ATTACKS:
        if not {"correct", "n"} <= set(metrics[k]) or tensors is None or len(tensors[k]) != metrics[k]["n"]:
            raise KeyError(f"the evaluation lacks counts or outcomes of {k!r}")


def evaluated(cfg: Config, splits, base: nn.Module, rate: float, how: Retraining,
              progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """Clean, FGSM and PGD-10 test accuracy of ``how``'s model at ``rate`` (cached).

    All at ``cfg.epsilon`` on ``splits.test``; PGD's random starts are seeded with ``cfg.seed``.

    Returns:
        ``(outcomes, metrics, cached)``: per-example outcomes as uint8 tensors (test order, 1 =
        still correct), :func:`counts` and whether it came from disk. ``python -m rclib
        evaluate`` under torchrun writes the same artifact from N shards of the test set.

    Used by chapter 04 (``table1.robust_table``'s accuracy columns of the retrained rows) and
    by ``python -m rclib evaluate`` in one process.
    """
    rt = runtime_of(cfg, base)

    def compute():
        state, _, _ = retrained(cfg, splits, base, rate, how, progress)
        m = rebuild(cfg, splits, state, next(base.parameters()).device, rt, what=how.name)
        found = outcomes(m, splits.test, cfg.epsilon, cfg.seed, rt)
        return {k: v.to(torch.uint8) for k, v in found.items()}, counts(found, cfg.epsilon)

    return artifacts.cached(**evaluation_artifact(cfg, rate, how, base), compute=compute, check=evaluation_check)


class LazyStates(Mapping):
    """A read-only ``{variant: state dict}`` whose states are built (or read from the cache) when
    asked for and not kept, so a chapter holds one model's weights at a time. Used by chapters 04
    and 05 (``table1.robust_table``'s second result)."""

    def __init__(self, variants: tuple[Variant, ...], make: Callable[[Variant], dict[str, torch.Tensor]]):
        self._names, self._make = variants, make

    def __getitem__(self, variant: Variant) -> dict[str, torch.Tensor]:
        if variant not in self._names:
            raise KeyError(variant)
        return self._make(variant)

    def __iter__(self) -> Iterator[Variant]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
