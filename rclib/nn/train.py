"""Training and evaluation: seeded, deterministic on CPU, and mask-aware.

Mask-aware: pruning in rclib uses ``torch.nn.utils.prune``'s reparametrisation
(``weight = weight_orig * weight_mask``), so a pruned weight's gradient is zero and its value
stays exactly zero whatever the optimiser does to ``weight_orig``. ``fit`` additionally zeroes
the masked entries of ``weight_orig``'s gradient so momentum and Adam state never build up there.

Used by chapter 00 (baseline), 01 (retraining after pruning) and 04 (Alg 7's plain baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rclib.core.accel import Runtime, autocast, batch_to, to_device
from rclib.core.config import OPTIMIZERS, Config
from rclib.core.progress import progress_bar


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class Optimiser:
    """Which optimiser trains a model, and with what settings. The defaults are the baseline's
    (Adam, lr 1e-3); :data:`APPENDIX_C` is the paper's retraining optimiser.

    Attributes:
        name: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: the learning rate, > 0; momentum: SGD's; weight_decay: >= 0.
    """

    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.name!r} is not allowed: one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} is not allowed: a finite number > 0")

    @classmethod
    def baseline(cls, cfg: Config) -> "Optimiser":
        """The baseline's optimiser: ``optimizer``, ``lr``, ``momentum``, ``weight_decay``."""
        return cls(cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)

    @classmethod
    def retraining(cls, cfg: Config) -> "Optimiser":
        """Every retraining's optimiser: the ``retrain_*`` fields (App. C by default)."""
        return cls(cfg.retrain_optimizer, cfg.retrain_lr, cfg.retrain_momentum, cfg.retrain_weight_decay)

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD (with momentum) or Adam over the model's trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


APPENDIX_C = Optimiser("sgd", lr=0.005, momentum=0.9, weight_decay=0.005)  # the paper's retraining (Table 2)


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradient of every pruned entry (modules carrying torch prune masks)."""
    for m in model.modules():
        for name, buf in m.named_buffers(recurse=False):
            if name.endswith("_mask"):
                p = getattr(m, name[: -len("_mask")] + "_orig")
                if p.grad is not None:
                    p.grad.mul_(buf)


def reseed(loader: DataLoader, seed: int) -> None:
    """Restart the loader's shuffling and torch's RNG, so a run never depends on what ran before."""
    torch.manual_seed(seed)
    if isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.manual_seed(seed)


class Diverged(ValueError):
    """Training produced a non-finite loss; the message names the settings to change."""


def fit(model: nn.Module, loader: DataLoader, epochs: int, optimiser: Optimiser = Optimiser(), seed: int = 0,
        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        desc: str = "train", progress: bool = True, blame: str | None = None,
        runtime: Runtime | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place with cross-entropy (or ``loss_fn``) for ``epochs`` epochs.

    Args:
        model: any classifier; its device is used for the batches.
        loader: yields ``(x, y)``, x (B, C, H, W), y (B,). A loader whose sampler has
            ``set_epoch`` (a ``DistributedSampler``, see :mod:`rclib.experiments.distributed`) gets each epoch's number.
        epochs: full passes over ``loader`` (0 does nothing).
        optimiser: which optimiser, and its settings (default Adam, lr 1e-3).
        seed: reseeds torch and the loader's shuffling first, so equal seeds give equal runs.
        loss_fn: ``loss_fn(model, x, y) -> scalar``; default cross-entropy on ``model(x)``.
            Alg 7 passes its adversarial + margin loss here.
        desc, progress: the tqdm bar's label, and whether to show it.
        blame: the settings a diverging run points to, e.g. ``"lr=0.001"``; default the
            optimiser's ``lr``. Named in the error so a reader knows which parameter to change.
        runtime: copies, layout and precision of the batches (:class:`rclib.core.accel.Runtime`);
            default plain fp32. The forward pass and the loss run under its autocast, the
            backward pass outside it.

    Raises:
        Diverged: as soon as a batch's loss is not finite (NaN or infinite), so a diverged model
            is never returned, evaluated or cached.

    Returns:
        One dict per epoch: ``{"epoch", "loss", "accuracy"}`` (mean training loss; accuracy on
        the clean training batches as seen during the epoch, only when loss_fn is None).

    Used by chapters 00, 01 and 04.
    """
    device = model_device(model)
    opt = optimiser.build(model)
    reseed(loader, seed)
    history = []
    was_training = model.training
    bar = progress_bar(range(epochs), show=progress, desc=desc, leave=False)
    for epoch in bar:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # a DistributedSampler reshuffles per epoch
            loader.sampler.set_epoch(epoch)
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for batch, (x, y) in enumerate(loader, 1):
            x, y = batch_to(x, y, device, runtime, loader)
            opt.zero_grad(set_to_none=True)
            with autocast(device, runtime):
                if loss_fn is None:
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    correct += (logits.argmax(1) == y).sum().item()
                else:
                    loss = loss_fn(model, x, y)
            loss.backward()
            mask_gradients(model)
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                raise Diverged(f"training diverged ({desc}): the loss is {value} in epoch {epoch + 1}, batch "
                               f"{batch}; lower {blame or f'lr={optimiser.lr:g}'}")
            total_loss += value * len(y)
            seen += len(y)
        row = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1)}
        if loss_fn is None:
            row["accuracy"] = correct / max(seen, 1)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    model.train(was_training)
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
            runtime: Runtime | None = None) -> torch.Tensor:
    """Logits for a tensor of inputs, in eval mode (the caller's mode is restored). (N, K),
    float32 on the CPU (also when ``runtime`` computes them in bf16)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    with autocast(device, runtime):
        out = torch.cat([model(to_device(x[i:i + batch_size], device, runtime)).float().cpu()
                         for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime | None = None) -> float:
    """Top-1 accuracy in [0, 1] over ``loader``, in eval mode (the caller's mode is restored).

    ``runtime``: copies, layout and precision (:class:`rclib.core.accel.Runtime`; default plain fp32).
    Correct predictions are counted on the device and read back once, so a GPU never waits for
    the host between batches.

    Used by every chapter.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    with autocast(device, runtime):
        for x, y in loader:
            x, y = batch_to(x, y, device, runtime, loader)
            correct += (model(x).argmax(1) == y).sum()
            total += len(y)
    model.train(was_training)
    return int(correct) / max(total, 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, batches: int | None = None,
                          seed: int = 0, runtime: Runtime | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``loader``'s data (no weight
    changes).

    Pruning channels shifts the statistics that later layers see, and BatchNorm keeps
    normalising with the unpruned model's statistics; one pass over training data without
    gradients fixes that. Cumulative averages (``momentum=None``) so the order of batches does
    not matter, but which images share a batch does (each batch contributes its own variance):
    the pass draws its batches from ``loader.dataset`` with its own generator seeded by
    ``seed``, so the result never depends on how far another step had advanced ``loader``'s
    shuffling. ``runtime``: copies and layout (statistics are always accumulated in fp32: bf16
    would round the running means). Returns ``model`` in its original mode. Used by chapter 01.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.eval()  # dropout off: only the BatchNorm layers run in training mode
    for m in bns:
        m.train()
    device = model_device(model)
    own = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                     generator=torch.Generator().manual_seed(seed), num_workers=loader.num_workers,
                     pin_memory=loader.pin_memory)
    for i, (x, _) in enumerate(own):
        if batches is not None and i >= batches:
            break
        model(to_device(x, device, runtime, pinned=own.pin_memory))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return model
