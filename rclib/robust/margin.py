"""Robust retraining (paper Sec 2.4-2.6): maximum margin regularisation (Eq 9-10) and Alg 7.

Alg 7 retrains a compressed model on each batch's clean examples together with their FGSM
counterparts (Eq 8), minimising cross-entropy plus ``lambda`` times the maximum margin loss of
Eq 9. The paper's Appendix C sets one epoch of SGD (lr 0.005, momentum 0.9, weight decay 0.005),
``eps = 0.03`` and ``lambda = 0.1``.

Training goes through :func:`rclib.nn.train.fit` with a ``loss_fn``, so pruning masks are honoured
(pruned weights stay exactly zero, no momentum builds up behind a mask) and runs are seeded.

Used by chapter 04 (robust retraining of the pruned model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rclib.core.accel import Runtime, unwrap
from rclib.core.config import MARGIN_SPACES
from rclib.nn.train import APPENDIX_C, Optimiser, fit
from rclib.robust.attacks import fgsm, pgd

ADV_ATTACKS = ("fgsm", "pgd")  # how Alg 7 crafts its adversarial half: the paper's FGSM, or Madry's PGD


@dataclass(frozen=True)
class Objective:
    """What Algorithm 7 minimises per batch (Eq 9-10): cross-entropy on clean and adversarial
    inputs plus ``margin_weight`` times the margin loss. Every value is checked when it is made.

    Attributes:
        eps: the adversarial half's strength in pixel units, >= 0 (App. C: 0.03 on ImageNet);
            0 trains on clean data with the margin regulariser.
        margin_weight: ``lambda`` of Eq 10, >= 0 (App. C: 0.1); 0 is plain adversarial training.
        on: where the margin is measured, ``"logits"`` or ``"probs"`` (:func:`margin_loss`).
        margin: the margin of Eq 9 (the paper: 1).
        attack: ``"fgsm"`` (Alg 7 as the paper writes it) or ``"pgd"``: ``pgd_steps`` steps of
            L-infinity PGD with a random start (step ``2.5 * eps / pgd_steps``), Madry et al.'s
            adversarial training inside the same objective (chapter 05's "Madry" row).
        pgd_steps: PGD steps per batch with ``attack="pgd"``, >= 1 (Madry et al.'s CIFAR-10: 7).
    """

    eps: float = 0.03
    margin_weight: float = 0.1
    on: str = "logits"
    margin: float = 1.0
    attack: str = "fgsm"
    pgd_steps: int = 7

    def __post_init__(self) -> None:
        for name in ("eps", "margin_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} is not allowed: a finite number >= 0")
        _check_margin_args(self.margin, self.on)
        if self.attack not in ADV_ATTACKS:
            raise ValueError(f"attack={self.attack!r} is not allowed: one of {', '.join(ADV_ATTACKS)}")
        if isinstance(self.pgd_steps, bool) or not isinstance(self.pgd_steps, int) or self.pgd_steps < 1:
            raise ValueError(f"pgd_steps={self.pgd_steps!r} is not allowed: an integer >= 1")


def _check_margin_args(margin: float, on: str) -> None:
    if on not in MARGIN_SPACES:
        raise ValueError(f"on={on!r} is not allowed: one of {', '.join(MARGIN_SPACES)}")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin={margin!r} is not allowed: a finite number >= 0")


def margin_loss(logits: torch.Tensor, y: torch.Tensor, margin: float = 1.0, on: str = "logits") -> torch.Tensor:
    """Maximum margin loss, Eq 9, averaged over the batch.

    ``MM(z, y) = max(0, margin - (z_y - max_{i != y} z_i))``: a hinge on the gap between the true
    class's score and the best other class's score. The paper writes the margin as 1; it is a
    parameter here. The paper does not say how the per-example values are reduced ("across the
    entire dataset"); we take the batch mean, as PyTorch's cross-entropy does, so ``lambda`` of
    Eq 10 weighs the two terms of Alg 7 on the same per-example scale.

    Which scores ``z`` are. Eq 9 calls ``z`` the logits of ``h`` and Alg 7 feeds the same ``z``
    to both cross-entropy and the margin loss, yet the text adds "since each z_i is in [0, 1]",
    which holds for softmax probabilities, not logits. ``on`` picks one reading:

    * ``"logits"`` (default): the hinge on raw logit gaps, the multi-class hinge of Crammer and
      Singer. It is zero once the true logit leads by ``margin``, and until then its gradient
      with respect to the two logits involved is exactly +-1 whatever the confidence, so it pushes
      hardest on the examples that matter (wrong, or right by a small margin: typically the FGSM
      half of the batch) and leaves confidently correct ones to cross-entropy. This is what Alg 7
      computes as written (one ``z`` for both terms), hence the default.
    * ``"probs"``: softmax first, the reading the [0, 1] sentence suggests. Then the gap lies in
      [-1, 1], so with ``margin = 1`` the hinge is never inactive (it is ``1 - gap`` everywhere
      except at a one-hot output) and acts as a bounded linear penalty. Its gradient passes through
      the softmax Jacobian, which vanishes as the output saturates, for confidently correct and,
      more harmfully, for confidently *wrong* examples: an FGSM example the model misclassifies
      with high confidence gets almost no push back. It is offered for comparison (chapter 04).

    Args:
        logits: (B, K) scores, K >= 2 (raw logits; softmax is applied here when ``on="probs"``).
        y: (B,) integer labels in [0, K).
        margin: the required gap (>= 0; default 1.0, the paper's value).
        on: ``"logits"`` (default) or ``"probs"``, see above.

    Returns:
        A scalar tensor: the mean over the batch of the hinge, differentiable in ``logits``.

    Raises:
        ValueError: naming ``on``, ``margin`` or ``logits`` when they are not allowed.

    Example:
        >>> margin_loss(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 0]))
        tensor(2.)

    Used by chapter 04 through :func:`adversarial_margin_loss` and :func:`adversarial_retrain`.
    """
    _check_margin_args(margin, on)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)} is not allowed: (B, K) with K >= 2 classes")
    z = logits.softmax(dim=1) if on == "probs" else logits
    y = y.long().view(-1, 1)
    true = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, float("-inf")).amax(dim=1)
    return F.relu(margin - (true - others)).mean()


def adversarial_margin_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective,
                            parts: dict[str, float] | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """The per-batch objective of Alg 7: ``CE(z, Y) + lambda * MM(z, Y)`` on ``z = h([x; x_adv])``.

    ``x_adv = fgsm(model, x, y, objective.eps)`` is generated from the current model (Eq 8; the gradient is
    taken in eval mode, as everywhere in :mod:`rclib.robust.attacks`, and carries no parameter gradient).
    Clean and adversarial inputs are then concatenated into one batch of 2B, labels ``[y; y]``,
    and passed through the model in the caller's mode (train mode during ``fit``, so BatchNorm
    normalises clean and adversarial examples with shared batch statistics, as in the paper).
    Both terms are batch means over the 2B examples. A model wrapped in
    ``DistributedDataParallel`` crafts ``x_adv`` with its inner module (an input gradient must
    not touch DDP's gradient reducer), and trains through the wrapper.

    With ``eps = 0`` the adversarial half would duplicate the clean half; the forward pass then
    uses ``x`` once, which gives the same loss value and the same gradients (BatchNorm's batch
    mean and biased variance are unchanged by duplication) at half the cost.

    Args:
        model: classifier mapping (B, C, H, W) pixels in [0, 1] to (B, K) logits.
        x: (B, C, H, W) clean inputs on the model's device; y: (B,) labels.
        objective: eps, margin weight, margin space and attack (:class:`Objective`).
        parts: if a dict is given, ``"ce"``, ``"mm"`` (unweighted) and ``"n"`` (B) are written
            into it, so a caller can log the two terms.
        generator: PGD's random starts (``attack="pgd"``).

    Returns:
        The scalar total loss, differentiable in the model's parameters.

    Example:
        >>> loss = adversarial_margin_loss(model, x, y, Objective(eps=0.03, margin_weight=0.1))
        >>> loss.backward()

    Used by chapter 04 through :func:`adversarial_retrain`.
    """
    o = objective
    plain = unwrap(model)  # input gradients bypass DistributedDataParallel: no gradient sync, no hooks
    if o.attack == "pgd":
        x_adv = pgd(plain, x, y, o.eps, steps=o.pgd_steps, generator=generator)
    else:
        x_adv = fgsm(plain, x, y, o.eps)
    if o.eps == 0:
        xs, ys = x, y
    else:
        xs, ys = torch.cat([x, x_adv]), torch.cat([y, y])
    z = model(xs)
    ce = F.cross_entropy(z, ys)
    mm = margin_loss(z, ys, margin=o.margin, on=o.on)
    if parts is not None:
        parts.update(ce=ce.item(), mm=mm.item(), n=len(y))
    return ce + o.margin_weight * mm


def adversarial_retrain(model: nn.Module, loader: DataLoader, objective: Objective = Objective(), epochs: int = 1,
                        optimiser: Optimiser = APPENDIX_C, seed: int = 0, progress: bool = True,
                        runtime: Runtime | None = None, blame: str | None = None) -> list[dict[str, Any]]:
    """Alg 7: retrain a (compressed) model in place on clean + FGSM examples with the margin loss.

    For every batch ``(x, y)``: ``x_adv = x + eps * sign(grad_x CE(h(x), y))`` (clamped to
    [0, 1]); ``z = h([x; x_adv])``; ``L = CE(z, [y; y]) + margin_weight * MM(z, [y; y])``
    (Eq 9-10); one optimiser step. The pruning step of Alg 7 (``h_pruned = A(h, r)``) is done
    beforehand by the caller with :mod:`rclib.compress.prune`; this function is the retraining loop.

    Special cases: ``margin_weight = 0`` is plain FGSM adversarial training (Goodfellow et al.'s
    50/50 mix); ``eps = 0`` is clean training with the margin regulariser.

    Pruned weights stay exactly zero: the loop is :func:`rclib.nn.train.fit`, which masks the
    gradients of every ``torch.nn.utils.prune`` mask. The model's train/eval mode is restored.

    Args:
        model: the classifier, trained in place on its own device.
        loader: yields ``(x, y)``, x (B, C, H, W) pixels in [0, 1], y (B,).
        objective: eps, margin weight, margin space and attack (:class:`Objective`; the default
            is App. C's: FGSM at 0.03, lambda 0.1, margin on logits). With ``attack="pgd"`` the
            random starts come from a generator seeded with ``seed``, so runs repeat.
        epochs: passes over ``loader``, >= 0 (App. C: 1).
        optimiser: App. C's SGD, lr 0.005, momentum 0.9, weight decay 0.005 by default
            (:class:`rclib.nn.train.Optimiser`).
        seed: reseeds torch and the loader's shuffling, so equal seeds give equal runs.
        progress: show a tqdm bar.
        runtime: copies, layout and precision of :func:`rclib.nn.train.fit`
            (:class:`rclib.core.accel.Runtime`; default plain fp32). Under bf16 the loss of Alg 7
            runs in bf16 autocast, while the FGSM/PGD input gradients stay fp32.
        blame: the settings named if the loss stops being finite (``train.Diverged``); default
            ``lr`` and ``margin_weight`` with their values.

    Returns:
        One dict per epoch: ``{"epoch", "loss", "ce", "mm"}``, the epoch means of the total
        loss, of cross-entropy and of the unweighted margin loss (over the 2B-example batches).

    Raises:
        ValueError: naming ``epochs`` when it is not allowed (the objective and the optimiser
        check their own values when they are made).

    Example:
        >>> prune.global_unstructured(model, 0.5)
        >>> history = adversarial_retrain(model, splits.train, Objective(eps=0.1, margin_weight=0.1))
        >>> robust_accuracy(model, splits.test, fgsm, 0.1)

    Used by chapter 04 (Table 1's "Pruned + Adv Ret." rows and Fig 8) and chapter 05 (the
    Madry-style row, ``attack="pgd"``).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r} is not allowed: an integer >= 0")
    # a generator of its own: PGD's random starts must not shift the global stream that fit's
    # shuffling and dropout draw from, or the same seed would give different FGSM-free runs
    pgd_run = objective.attack == "pgd"
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed) if pgd_run else None

    batches: list[dict[str, float]] = []

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts: dict[str, float] = {}
        loss = adversarial_margin_loss(m, x, y, objective, parts=parts, generator=gen)
        batches.append(parts)
        return loss

    history = fit(model, loader, epochs, optimiser, seed=seed, loss_fn=loss_fn,
                  desc="Alg 7 with PGD" if pgd_run else "Alg 7", progress=progress,
                  blame=blame or f"lr={optimiser.lr:g} or margin_weight={objective.margin_weight:g}", runtime=runtime)
    per_epoch = len(batches) // max(len(history), 1)
    for i, row in enumerate(history):
        chunk = batches[i * per_epoch:(i + 1) * per_epoch]
        n = sum(b["n"] for b in chunk)
        for key in ("ce", "mm"):
            row[key] = sum(b[key] * b["n"] for b in chunk) / max(n, 1)
    return history
