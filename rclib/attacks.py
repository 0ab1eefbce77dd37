"""Adversarial attacks (paper Eq 3-5 and Eq 8) in pixel space, inputs in [0, 1].

Every attack takes the gradient with the model in eval mode (dropout off, BatchNorm using its
running statistics: the model that is being attacked is the deployed one), restores the
caller's train/eval mode afterwards, and uses ``torch.autograd.grad`` so no parameter gradient
is accumulated as a side effect.

Used by chapter 00 (robust accuracy vs epsilon) and all later chapters.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x of the mean cross-entropy, taken in eval mode; (B, C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
    finally:
        model.train(was_training)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method, Eq 8 (Goodfellow et al., 2014):
    ``x_adv = clamp(x + eps * sign(grad_x CE(h(x), y)), 0, 1)``.

    Args:
        model: classifier mapping (B, C, H, W) pixels in [0, 1] to (B, K) logits.
        x: clean inputs (B, C, H, W) in [0, 1], on the model's device.
        y: true labels (B,).
        eps: L-infinity step in pixel units (>= 0); 0 returns a copy of ``x``.

    Returns:
        Adversarial inputs of the same shape, detached, in [0, 1].

    Example:
        >>> x_adv = fgsm(model, x, y, eps=0.1)
        >>> (x_adv - x).abs().max() <= 0.1
        tensor(True)

    Used by chapters 00-04 and by ``robust.adversarial_retrain`` (Alg 7).
    """
    if eps < 0:
        raise ValueError(f"eps={eps!r} is not allowed: an FGSM step must be >= 0")
    if eps == 0:
        return x.detach().clone()
    grad = input_gradient(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return (model(x).argmax(1) == y).sum().item()


def robust_accuracy(model: nn.Module, loader: DataLoader, attack: Attack = fgsm, eps: float = 0.1) -> float:
    """Robust accuracy, Eq 5: the fraction of examples still classified correctly after ``attack``.

    Every example is attacked, including those the model already gets wrong (they count as
    failures either way), so at ``eps=0`` this equals clean accuracy.

    Args:
        model: the classifier; evaluated in eval mode, its mode restored afterwards.
        loader: yields ``(x, y)`` pixel batches.
        attack: ``attack(model, x, y, eps) -> x_adv``; default :func:`fgsm`.
        eps: the attack strength.

    Returns:
        A float in [0, 1]; 1 - ASR of Eq 4.

    Used by chapters 00-04.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += _correct(model, attack(model, x, y, eps), y)
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def robust_curve(model: nn.Module, loader: DataLoader, epsilons, attack: Attack = fgsm) -> list[float]:
    """``robust_accuracy`` at each epsilon (a figure's y values). Used by chapters 00 and 01."""
    return [robust_accuracy(model, loader, attack, float(e)) for e in epsilons]
