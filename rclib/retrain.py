"""Table 1's retrained models, one cached step each (Alg 7, its ablations, the clean control and
the Madry-style PGD variant), so a chapter streams them one at a time instead of holding seven
VGG16-sized models, and a run elsewhere (``python -m rclib retrain``) can produce the very
artifact a chapter reads.

Every step starts from the same copy of the baseline, globally pruned (Alg 1) at ``rate``, and
retrains it for ``cfg.adv_epochs`` epochs with the retraining optimiser (App. C: SGD, lr 0.005,
momentum 0.9, weight decay 0.005):

========================  ==========================================================
step                      the model (Table 1 / chapter 05 row)
========================  ==========================================================
``clean``                 clean cross-entropy only ("Pruned + Retrained", the control)
``alg7``                  Alg 7: FGSM at ``adv_epsilon`` + margin ``margin_weight``
``alg7-no-margin``        Alg 7 with ``margin_weight = 0`` (FGSM training only)
``alg7-margin-only``      Alg 7 with ``eps = 0`` (clean data + margin only)
``alg7-pgd``              Alg 7 with PGD examples (Madry et al.'s adversarial training)
========================  ==========================================================

Used by chapters 04 and 05 (through ``pipeline.robust_table`` and ``attack_study``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import nn

from . import accel, artifacts, prune, sizes
from .config import Config

TABLE1_ROWS = ("Baseline", "Pruned", "Pruned + Retrained", "Pruned + Adv Ret.", "Pruned + Adv Ret. + WS")
ABLATION_ROWS = ("Pruned + FGSM training only (lambda 0)", "Pruned + margin only (eps 0)")
MADRY_ROW = "Pruned + Adv Ret. with PGD (Madry-style)"
MADRY_STEPS = 7  # PGD steps per batch when retraining the Madry-style row (Madry et al.'s CIFAR value)

STEPS = {  # step name (command line, artifact) -> the row it produces
    "clean": TABLE1_ROWS[2],
    "alg7": TABLE1_ROWS[3],
    "alg7-no-margin": ABLATION_ROWS[0],
    "alg7-margin-only": ABLATION_ROWS[1],
    "alg7-pgd": MADRY_ROW,
}
STEP_OF = {row: step for step, row in STEPS.items()}
_OPTIMISER_FIELDS = ("retrain_optimizer", "retrain_lr", "retrain_momentum", "retrain_weight_decay", "adv_epochs")


def step_fields(step: str) -> tuple[str, ...]:
    """The Config fields a step's artifact is keyed by: the baseline's, the retraining
    optimiser's, the prune rate and, for the adversarial steps, the Alg 7 settings they read."""
    from .pipeline import BASELINE_FIELDS

    check_step(step)
    extra = () if step == "clean" else ("margin_on",) + (
        ("adv_epsilon",) if step == "alg7-no-margin" else ("margin_weight",) if step == "alg7-margin-only"
        else ("adv_epsilon", "margin_weight"))
    return BASELINE_FIELDS + _OPTIMISER_FIELDS + ("prune_rate",) + extra


def check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"step={step!r} is not allowed; choose one of {', '.join(STEPS)}")


def retrain_in_place(cfg: Config, model: nn.Module, loader, step: str, progress: bool = False,
                     runtime: accel.Runtime | None = None) -> list[dict[str, Any]]:
    """Run ``step``'s retraining on ``model`` (already pruned) in place; returns the history.

    The one place that maps a step to ``train.fit`` or ``robust.adversarial_retrain`` with the
    retraining optimiser of ``cfg`` (and ``runtime``'s precision and copies, see
    :mod:`rclib.accel`), so every caller (chapters, command line) trains alike.
    """
    from . import robust, train

    check_step(step)
    kw = dict(epochs=cfg.adv_epochs, lr=cfg.retrain_lr, momentum=cfg.retrain_momentum,
              weight_decay=cfg.retrain_weight_decay, optimizer=cfg.retrain_optimizer, seed=cfg.seed,
              progress=progress, runtime=runtime)
    if step == "clean":
        return train.fit(model, loader, kw.pop("epochs"), desc="retrain", blame=f"retrain_lr={cfg.retrain_lr:g}", **kw)
    eps = 0.0 if step == "alg7-margin-only" else cfg.adv_epsilon
    weight = 0.0 if step == "alg7-no-margin" else cfg.margin_weight
    pgd = dict(attack="pgd", pgd_steps=MADRY_STEPS) if step == "alg7-pgd" else {}
    return robust.adversarial_retrain(model, loader, eps, weight, on=cfg.margin_on,
                                      blame=f"retrain_lr={cfg.retrain_lr:g} or margin_weight={weight:g}", **pgd, **kw)


def artifact(cfg: Config, rate: float, step: str, base: nn.Module) -> dict[str, Any]:
    """The key under which ``step``'s model at ``rate``, retrained from ``base`` on ``base``'s
    device, is cached: ``artifacts.cached(**key, ...)`` and ``artifacts.location(**key)`` take it.
    One definition for the chapters and for ``python -m rclib retrain`` (one process or many),
    so both find the same artifact."""
    from .pipeline import kind_of

    check_step(step)
    return dict(cfg=dataclasses.replace(cfg, prune_rate=rate), step=f"retrained-{step}", names=step_fields(step),
                kind=kind_of(cfg, base))


def state_check(base: nn.Module, step: str) -> Callable[[dict | None, dict], None]:
    """The ``check`` of a step's artifact: its tensors fit ``base``'s architecture exactly (names,
    shapes and dtypes) and its metrics hold a history; raises ``RuntimeError`` or ``KeyError`` otherwise."""
    want = {k: (v.shape, v.dtype) for k, v in sizes.effective_state(base).items()}

    def check(tensors, metrics):
        if tensors is None or {k: (v.shape, v.dtype) for k, v in tensors.items()} != want:
            raise RuntimeError(f"the {step!r} tensors do not fit the model (names, shapes or dtypes)")
        if "history" not in metrics:
            raise KeyError("metrics lack history")
    return check


def pruned_copy(base: nn.Module, rate: float) -> nn.Module:
    """A copy of ``base`` globally pruned (Alg 1) at ``rate``, masks attached: where every step
    starts. Deterministic, so every process of a distributed run computes the same masks."""
    m = prune.clone(base)
    prune.global_unstructured(m, rate)
    return m


def retrained(cfg: Config, splits, base: nn.Module, rate: float, step: str,
              progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """One Table 1 model: ``base`` globally pruned at ``rate`` and retrained by ``step`` (cached).

    Args:
        cfg: the step's fields (:func:`step_fields`) key the artifact; ``cfg.seed`` seeds the run.
        splits: ``data.load(cfg)``; trains on ``splits.train``.
        base: the baseline, on the device to train on; never modified.
        rate: the global prune rate (Table 1: 0.5).
        step: one of ``STEPS``.

    Returns:
        ``(state, metrics, cached)``: the effective state dict on the host (masks folded in, so
        pruned weights are stored as exact zeros; load it with ``strict=True`` into a model built
        like ``base``), ``{"history": [...], "world_size": 1}`` and whether it came from disk.
        Only one retrained copy of ``base`` exists at a time, and it is gone when this returns.
        ``python -m rclib retrain`` under torchrun writes the same artifact with
        ``world_size`` processes (:mod:`rclib.distributed`).

    Used by chapters 04 and 05, and by ``python -m rclib retrain`` in one process.
    """
    from .pipeline import runtime_of

    def compute():
        m = pruned_copy(base, rate)
        history = retrain_in_place(cfg, m, splits.train, step, progress, runtime_of(cfg, base))
        return sizes.effective_state(m), {"history": history, "world_size": 1}

    return artifacts.cached(**artifact(cfg, rate, step, base), compute=compute, check=state_check(base, step))


EVAL_ATTACKS = ("clean", "fgsm", "pgd")
EVAL_PGD_STEPS = 10  # PGD-10 with a random start, chapter 05's cheap white-box attack


def evaluation_artifact(cfg: Config, rate: float, step: str, base: nn.Module) -> dict[str, Any]:
    """The key of the robust evaluation of ``step``'s model (see :func:`evaluated`): that of
    :func:`artifact` with ``epsilon`` added to the fields."""
    key = artifact(cfg, rate, step, base)
    return dict(key, step=f"evaluated-{step}", names=key["names"] + ("epsilon",))


def outcomes(model: nn.Module, loader, eps: float, seed: int,
             runtime: accel.Runtime | None = None) -> dict[str, torch.Tensor]:
    """Per-example outcomes (bool, loader order, True where still correct) of ``model`` on
    ``loader``: clean, FGSM at ``eps`` and PGD-10 at ``eps`` whose random starts come from a
    generator seeded with ``seed``; ``runtime`` as in :func:`rclib.attacks.robust_correct`.
    Used by :func:`evaluated` and ``rclib.distributed``."""
    from . import attacks

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


def evaluated(cfg: Config, splits, base: nn.Module, rate: float, step: str,
              progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """Clean, FGSM and PGD-10 test accuracy of ``step``'s model at ``rate`` (cached).

    All at ``cfg.epsilon`` on ``splits.test``; PGD's random starts are seeded with ``cfg.seed``.

    Returns:
        ``(outcomes, metrics, cached)``: per-example outcomes as uint8 tensors (test order, 1 =
        still correct), :func:`counts` and whether it came from disk. ``python -m rclib
        evaluate`` under torchrun writes the same artifact from N shards of the test set.

    Used by chapter 04 (``pipeline.robust_table``'s accuracy columns of the retrained rows) and
    by ``python -m rclib evaluate`` in one process.
    """
    from .pipeline import new_model, runtime_of

    rt = runtime_of(cfg, base)

    def compute():
        state, _, _ = retrained(cfg, splits, base, rate, step, progress)
        m = new_model(cfg, splits, pretrained=False)  # the state replaces every weight: skip the checkpoint
        m.load_state_dict(state, strict=True)
        m = accel.prepare(m.to(next(base.parameters()).device), rt).eval()
        found = outcomes(m, splits.test, cfg.epsilon, cfg.seed, rt)
        return {k: v.to(torch.uint8) for k, v in found.items()}, counts(found, cfg.epsilon)

    return artifacts.cached(**evaluation_artifact(cfg, rate, step, base), compute=compute, check=evaluation_check)


class LazyStates(Mapping):
    """A read-only ``{row name: state dict}`` whose states are built (or read from the cache) when
    asked for and not kept, so a chapter holds one model's weights at a time. Used by chapters 04
    and 05 (``pipeline.robust_table``'s second result)."""

    def __init__(self, names: tuple[str, ...], make: Callable[[str], dict[str, torch.Tensor]]):
        self._names, self._make = names, make

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
