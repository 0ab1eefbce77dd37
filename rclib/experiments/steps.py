"""Cached steps shared by the chapters: each trains or loads what it needs, so any chapter runs
on its own (papermill) and recomputes only what is missing or stale.

Every loop runs with ``accel.runtime(cfg, device)`` (:func:`runtime_of`): plain fp32 on a CPU,
bf16 autocast, channels_last and asynchronous copies on CUDA, as the config says.

Used by chapter 00 (``baseline``) and every later chapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from rclib.core import accel, artifacts, verify
from rclib.core.config import Config
from rclib.core.keys import Step
from rclib.core.progress import progress_bar
from rclib.data import datasets
from rclib.nn import masks, models, train

BASELINE = Step("baseline", ("seed", "data", "model", "train"))


def runtime_of(cfg: Config, model: nn.Module) -> accel.Runtime:
    """The :class:`rclib.core.accel.Runtime` of ``cfg`` on the device ``model`` lives on."""
    return accel.runtime(cfg, train.model_device(model))


def kind_of(cfg: Config, model: nn.Module) -> str:
    """The artifact key's compute kind for work done on ``model``'s device (which may differ
    from ``cfg.device`` when a caller passes another device)."""
    return accel.compute_kind(cfg, train.model_device(model))


HOST_KIND = "cpu/fp32"  # steps that never leave the CPU, whatever the device: keyed as such


def new_model(cfg: Config, splits: datasets.Splits, pretrained: bool = True) -> models.VGG:
    """An untrained (or torchvision-pretrained) model shaped for ``splits``; ``pretrained=False``
    when a full state dict is loaded into it right away (``models.build``)."""
    return models.build(cfg, splits.num_classes, splits.input_shape, splits.mean, splits.std, pretrained=pretrained)


def rebuild(cfg: Config, splits: datasets.Splits, state: Mapping[str, torch.Tensor], device: Any = "cpu",
            runtime: accel.Runtime | None = None, what: str = "a saved model") -> models.VGG:
    """The one way a model is made from a saved state (a cached step's, a retrained variant's).

    The model is built without pretrained weights (the state replaces every weight, so reading an
    ImageNet checkpoint first would be wasted), the state is checked tensor by tensor against it
    (``verify.check_state``: names, shapes, dtypes; ``KeyError``/``TypeError`` name ``what``),
    loaded strictly, moved to ``device``, prepared for ``runtime`` when given
    (``accel.prepare``: channels_last on CUDA) and put in eval mode.

    Used by every cached step that returns a model, and by chapter 04's decision maps.
    """
    model = new_model(cfg, splits, pretrained=False)
    verify.check_state(state, model.state_dict(), what)
    model.load_state_dict(state, strict=True)
    model = model.to(device)
    return (model if runtime is None else accel.prepare(model, runtime)).eval()


def share_bits(cfg: Config) -> dict[str, int]:
    """Table 2's index widths as ``share.weight_share`` takes them. Used by chapters 02-04."""
    return {"conv": cfg.conv_bits, "linear": cfg.linear_bits}


def fit_head(cfg: Config, model: nn.Module, splits: datasets.Splits, progress: bool = True,
             runtime: accel.Runtime | None = None) -> list[dict[str, Any]]:
    """Fit ``model``'s classifier head alone (every other parameter frozen) for
    ``cfg.head_epochs`` epochs with the baseline's optimiser: the step that makes pretrained
    weights with another class count usable when ``cfg.epochs`` is 0 (the paper profile), and a
    gentler start otherwise (a random head's gradients would first wreck the pretrained trunk).
    BatchNorm running statistics, which are buffers and not parameters, still adapt to the data
    in training mode. Returns the per-epoch history. Used by :func:`baseline` (chapter 00)."""
    head = dict(model.named_modules())[models.head_name(model)]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    try:
        return train.fit(model, splits.train, cfg.head_epochs, train.Optimiser.baseline(cfg), seed=cfg.seed,
                         desc="new head", progress=progress, blame=f"lr={cfg.lr:g} (optimizer {cfg.optimizer})",
                         runtime=runtime)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def baseline(cfg: Config, splits: datasets.Splits, device: str = "cpu",
             progress: bool = True) -> tuple[nn.Module, dict[str, Any], bool]:
    """Train the unpruned baseline h (or load it from the artifact cache).

    When ``cfg.weights`` brings a classifier head of another shape (``models.head_is_new``),
    :func:`fit_head` first fits a new head alone for ``cfg.head_epochs`` epochs; then all
    parameters train for ``cfg.epochs`` epochs.

    Args:
        cfg: uses the data, model and training fields (what :data:`BASELINE` reads: the cache key).
        splits: from ``datasets.load(cfg)``.
        device: where the returned model lives.

    Returns:
        ``(model, metrics, cached)``: the model in eval mode; metrics with ``clean_accuracy``
        (test set, in [0, 1]), ``history`` (per-epoch loss and training accuracy of the full
        training) and ``head_history`` (of the head-only epochs; empty when no new head was needed);
        ``cached`` tells whether it came from disk.

    Used by chapter 00 and, as the starting point, by chapters 01-04.
    """
    rt = accel.runtime(cfg, device)

    def compute():
        model = accel.prepare(new_model(cfg, splits).to(device), rt)
        head_history = fit_head(cfg, model, splits, progress, rt) if models.head_is_new(cfg, model) else []
        history = train.fit(model, splits.train, cfg.epochs, train.Optimiser.baseline(cfg), seed=cfg.seed,
                            desc="baseline", progress=progress, blame=f"lr={cfg.lr:g} (optimizer {cfg.optimizer})",
                            runtime=rt)
        return model.state_dict(), {"clean_accuracy": train.evaluate(model, splits.test, runtime=rt),
                                    "history": history, "head_history": head_history}

    built: dict[str, nn.Module] = {}

    def check(tensors, metrics):  # a cached state must fit this model exactly, or be recomputed
        if not {"clean_accuracy", "history"} <= metrics.keys():
            raise KeyError(f"metrics lack clean_accuracy or history: {sorted(metrics)}")
        built["model"] = rebuild(cfg, splits, tensors, device, rt, what="the baseline model")

    tensors, metrics, hit = artifacts.cached(cfg, BASELINE, compute, check=check, kind=accel.compute_kind(cfg, device))
    if not hit:
        check(tensors, metrics)
    return built["model"], metrics, hit


def over_seeds(cfg: Config, step: Callable[[Config, datasets.Splits, nn.Module], list[dict[str, Any]]],
               device: str = "cpu", progress: bool = True, park: Sequence[nn.Module] = ()) -> list[dict[str, Any]]:
    """Run ``step(cfg_s, splits_s, base_s)`` once per seed of ``cfg.seeds``, each on that seed's
    own data split and cached baseline (shared by every chapter), and return all rows, each
    tagged with its ``seed``. This is how every headline number becomes a mean with spread.

    ``park``: models the caller keeps for later cells (its own seed's baseline, a shared copy).
    They wait on the host during the loop and return to their device afterwards, so that on a
    GPU each seed's baseline and variants have the device to themselves (at paper scale a VGG16
    is 0.55 GB, with masks 1.1 GB). On CPU moving them changes nothing.

    Used by chapters 01-04.
    """
    away = [(m, d) for m in park if (d := train.model_device(m)).type != "cpu"]
    for m, _ in away:
        masks.move(m, "cpu")
    try:
        rows: list[dict[str, Any]] = []
        for s in progress_bar(cfg.seeds, desc="seeds", show=progress):
            cfg_s = dataclasses.replace(cfg, seed=s)
            splits_s = datasets.load(cfg_s, device)
            base_s, _, _ = baseline(cfg_s, splits_s, device, progress=False)
            rows += [dict(r, seed=s) for r in step(cfg_s, splits_s, base_s)]
            del base_s
        return rows
    finally:
        for m, home in away:
            masks.move(m, home)


def retrainer(cfg: Config, splits: datasets.Splits, desc: str = "retrain",
              loader: DataLoader | None = None) -> Callable[[nn.Module], object]:
    """``retrain(model)``: ``cfg.retrain_epochs`` of mask-keeping training with the retraining
    optimiser (App. C: SGD, lr 0.005, momentum 0.9, weight decay 0.005) on ``loader`` (default
    ``splits.train``; ``rclib.experiments.distributed`` passes a rank's shard). Alg 5's retrain()."""
    def retrain(model: nn.Module):
        return train.fit(model, splits.train if loader is None else loader, cfg.retrain_epochs,
                         train.Optimiser.retraining(cfg), seed=cfg.seed, desc=desc, progress=False,
                         blame=f"retrain_lr={cfg.retrain_lr:g}", runtime=runtime_of(cfg, model))
    return retrain


