"""Cached steps shared by the chapters: each trains or loads what it needs, so any chapter runs
on its own (papermill) and recomputes only what is missing or stale.

Used by chapter 00 (``baseline``) and every later chapter.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts, attacks, data, models, prune, storage, train
from .config import Config

DATA_FIELDS = ("seed", "dataset", "data_dir", "image_size", "train_size", "test_size", "test_fraction")
MODEL_FIELDS = ("model", "width", "hidden", "batch_norm", "dropout", "weights")
TRAIN_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs")
BASELINE_FIELDS = DATA_FIELDS + MODEL_FIELDS + TRAIN_FIELDS


def new_model(cfg: Config, splits: data.Splits) -> models.VGG:
    """An untrained (or torchvision-pretrained) model shaped for ``splits``."""
    return models.build(cfg, splits.num_classes, splits.input_shape, splits.mean, splits.std)


def baseline(cfg: Config, splits: data.Splits, device: str = "cpu",
             progress: bool = True) -> tuple[nn.Module, dict[str, Any], bool]:
    """Train the unpruned baseline h (or load it from the artifact cache).

    Args:
        cfg: uses the data, model and training fields (``BASELINE_FIELDS``, the cache key).
        splits: from ``data.load(cfg)``.
        device: where the returned model lives.

    Returns:
        ``(model, metrics, cached)``: the model in eval mode; metrics with ``clean_accuracy``
        (test set, in [0, 1]) and ``history`` (per-epoch loss and training accuracy);
        ``cached`` tells whether it came from disk.

    Used by chapter 00 and, as the starting point, by chapters 01-04.
    """
    def compute():
        model = new_model(cfg, splits).to(device)
        history = train.fit(model, splits.train, cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                            desc="baseline", progress=progress)
        return model.state_dict(), {"clean_accuracy": train.evaluate(model, splits.test), "history": history}

    tensors, metrics, hit = artifacts.cached(cfg, "baseline", BASELINE_FIELDS, compute)
    model = new_model(cfg, splits)
    model.load_state_dict(tensors)
    return model.to(device).eval(), metrics, hit


RETRAIN_FIELDS = ("retrain_epochs", "retrain_optimizer", "retrain_lr", "retrain_momentum",
                  "retrain_weight_decay")
SWEEP_FIELDS = BASELINE_FIELDS + RETRAIN_FIELDS + ("prune_rates", "prune_step", "epsilon")


def retrainer(cfg: Config, splits: data.Splits, desc: str = "retrain") -> Callable[[nn.Module], object]:
    """``retrain(model)``: ``cfg.retrain_epochs`` of mask-keeping training with the retraining
    optimiser (App. C: SGD, lr 0.005, momentum 0.9, weight decay 0.005). Alg 5's retrain()."""
    def retrain(model: nn.Module):
        return train.fit(model, splits.train, cfg.retrain_epochs, lr=cfg.retrain_lr,
                         optimizer=cfg.retrain_optimizer, momentum=cfg.retrain_momentum,
                         weight_decay=cfg.retrain_weight_decay, seed=cfg.seed, desc=desc,
                         progress=False)
    return retrain


def pruned(model: nn.Module, method: str, rate: float) -> nn.Module:
    """A pruned copy of ``model`` (one-shot ``method`` at ``rate``); ``model`` is untouched.
    ``method`` may end in ``" (hardened)"`` for a channel-pruned then hardened copy."""
    hardened = method.endswith(" (hardened)")
    base = method.removesuffix(" (hardened)")
    with torch.no_grad():  # deepcopy of a pruned model fails after a forward pass with grad
        copy_ = copy.deepcopy(model)
    prune.prune(copy_, base, rate)
    return prune.harden(copy_) if hardened else copy_


def measure(model: nn.Module, splits: data.Splits, eps: float) -> dict[str, Any]:
    """Clean and FGSM robust test accuracy, and the model's size by every yardstick we use."""
    return dict(accuracy=train.evaluate(model, splits.test),
                robust_accuracy=attacks.robust_accuracy(model, splits.test, attacks.fgsm, eps),
                nonzero=storage.nonzero_parameters(model),
                parameters=sum(t.numel() for t in storage.effective_state(model).values()),
                approx_mb=storage.approx_size_mb(model),
                dense_bytes=storage.dense_bytes(model))


def prune_sweep(cfg: Config, splits: data.Splits, base: nn.Module,
                progress: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Figure 1/3 data: every pruning method at every rate of ``cfg.prune_rates`` (cached).

    Methods: ``global`` (Alg 1), ``layer`` (Alg 2), ``channel`` (Alg 3, masked),
    ``channel (hardened)`` (Alg 3 + Alg 4) and ``iterative (hardened)`` (Alg 5: channel pruning
    in steps of ``cfg.prune_step`` with ``retrainer`` in between, measured after hardening at
    each rate of the sweep on one trajectory). One-shot methods are not retrained, as in the
    paper's Figure 1.

    Returns:
        ``(rows, cached)``; each row is ``{"method", "rate"}`` plus :func:`measure`'s fields.

    Used by chapter 01.
    """
    rates = sorted(cfg.prune_rates)

    def compute():
        rows = []
        one_shot = ("global", "layer", "channel", "channel (hardened)")
        bar = tqdm(total=len(one_shot) * len(rates) + 1, desc="prune sweep", disable=not progress)
        for method in one_shot:
            for r in rates:
                rows.append(dict(method=method, rate=r, **measure(pruned(base, method, r), splits, cfg.epsilon)))
                bar.update()

        def record(model: nn.Module, r: float) -> None:
            if any(abs(r - q) < 1e-9 for q in rates):
                rows.append(dict(method="iterative (hardened)", rate=r,
                                 **measure(prune.harden(model), splits, cfg.epsilon)))

        with torch.no_grad():
            model = copy.deepcopy(base)
        prune.iterative(model, rates[-1], cfg.prune_step, retrainer(cfg, splits), "channel",
                        on_step=record, extra=rates)
        bar.update()
        bar.close()
        return None, {"rows": rows}

    _, metrics, hit = artifacts.cached(cfg, "prune_sweep", SWEEP_FIELDS, compute)
    return metrics["rows"], hit
