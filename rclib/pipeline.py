"""Cached steps shared by the chapters: each trains or loads what it needs, so any chapter runs
on its own (papermill) and recomputes only what is missing or stale.

Used by chapter 00 (``baseline``) and every later chapter.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import artifacts, data, models, train
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
