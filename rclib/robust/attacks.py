"""Adversarial attacks (paper Eq 3-5 and Eq 8, and PGD) in pixel space, inputs in [0, 1].

Every attack takes the gradient with the model in eval mode (dropout off, BatchNorm using its
running statistics: the model that is being attacked is the deployed one), restores the
caller's train/eval mode afterwards, and uses ``torch.autograd.grad`` so no parameter gradient
is accumulated as a side effect.

Input gradients are always taken in fp32, also inside a bf16 autocast loop: autocast flipped the
sign of 1.6-2.8 % of the input-gradient pixels of the smoke models, and FGSM uses only the sign
(see :mod:`rclib.core.accel`). Only the forward passes that classify attacked examples follow the
loop's ``runtime``.

The strongest evaluation (APGD, Square, AutoAttack) is not hand-written: :mod:`rclib.robust.strong`
runs it from the adversarial-robustness-toolbox and returns per-example outcomes in the same form
as :func:`robust_correct`, so a chapter can take the worst case over all attacks per example.

Used by chapter 00 (robust accuracy vs epsilon) and all later chapters.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rclib.core.accel import Runtime, autocast, batch_to, fp32

# attack(model, x, y, eps, **kwargs) -> x_adv; extra keywords (PGD's alpha, steps, ...) pass through
Attack = Callable[..., torch.Tensor]


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x of the mean cross-entropy, taken in eval mode and in fp32 (autocast off); (B, C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), fp32(x.device):
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

    Used by chapters 00-04 and by ``margin.adversarial_retrain`` (Alg 7).
    """
    if eps < 0:
        raise ValueError(f"eps={eps!r} is not allowed: an FGSM step must be >= 0")
    if eps == 0:
        return x.detach().clone()
    grad = input_gradient(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, alpha: float | None = None,
        steps: int = 10, random_start: bool = True, restarts: int = 1, *,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """L-infinity projected gradient descent (Madry et al., 2018), the iterated form of Eq 8:
    ``x_{t+1} = clamp(proj_{|d| <= eps}(x_t + alpha * sign(grad_x CE(h(x_t), y)) - x), 0, 1)``.

    Each step projects onto the eps-ball around ``x`` and then onto the pixel box; both are
    per-pixel intervals that contain ``x``, so clamping to one and then the other is the exact
    projection onto their intersection. The loss is the per-example *sum* of cross-entropies, so an
    example's step does not depend on the batch it sits in (the sign is the same as for the mean).

    Restarts run as one batch of ``restarts * B`` inputs (eval mode makes examples independent;
    memory grows accordingly, so lower the batch size for many restarts of a large model), and
    each example keeps its worst restart: a misclassified one if any, else the one with the
    highest loss. Restart 0 draws its random start exactly as ``restarts=1`` would from the same
    generator state, so more restarts are never weaker per example (up to the rounding
    differences a larger batch may bring, which can flip the sign of a near-zero gradient).

    Args:
        model: classifier mapping (B, C, H, W) pixels in [0, 1] to (B, K) logits; evaluated in
            eval mode, its train/eval mode restored afterwards; no parameter gradient is created.
        x: clean inputs (B, C, H, W) in [0, 1], on the model's device.
        y: true labels (B,).
        eps: L-infinity radius in pixel units (>= 0); 0 returns a copy of ``x``. A tensor (B,)
            gives each example its own radius (chapter 06's bisection on eps), and then the
            default step is each example's own ``2.5 * eps / steps``.
        alpha: step size; default ``2.5 * eps / steps``: together the steps can travel 2.5 eps,
            enough to cross the ball from a random start, with room to turn.
        steps: gradient steps (>= 1).
        random_start: start each restart from a uniform point in the eps-ball (clamped to [0, 1]);
            without it the start is ``x`` and the attack is deterministic.
        restarts: independent random starts (>= 1); per-example worst case over them.
        generator: the random source for the starts (default: torch's global one).

    Returns:
        Adversarial inputs (B, C, H, W), detached, within ``eps`` of ``x`` and in [0, 1].

    Example:
        >>> x_adv = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, restarts=2)
        >>> bool((x_adv - x).abs().max() <= 8 / 255)
        True

    Used by chapter 05 (PGD-10, PGD-50 with restarts) and by ``robust_accuracy`` callers that pass
    ``functools.partial(pgd, alpha=..., steps=...)``.
    """
    each = isinstance(eps, torch.Tensor)
    if each:
        if eps.shape != (len(x),) or not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError(f"eps of shape {tuple(eps.shape)} is not allowed: one finite radius >= 0 per "
                             f"example, shape ({len(x)},)")
        eps = eps.detach().to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    elif eps < 0:
        raise ValueError(f"eps={eps!r} is not allowed: a PGD radius must be >= 0")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps={steps!r}, restarts={restarts!r}: both must be >= 1")
    x = x.detach()
    if not each and eps == 0:
        return x.clone()
    alpha = 2.5 * eps / steps if alpha is None else alpha
    if not random_start:
        restarts = 1  # every restart would be the same deterministic run
    n = len(x)
    x0 = x.repeat(restarts, *([1] * (x.dim() - 1))) if restarts > 1 else x
    yy = y.repeat(restarts) if restarts > 1 else y
    if each and restarts > 1:
        eps = eps.repeat(restarts, *([1] * (x.dim() - 1)))
        alpha = alpha.repeat(restarts, *([1] * (x.dim() - 1))) if isinstance(alpha, torch.Tensor) else alpha
    lo, hi = (x0 - eps).clamp_(min=0.0), (x0 + eps).clamp_(max=1.0)
    # the scalar branch draws exactly as before per-example radii existed, so its numbers stay
    if random_start and each:
        noise = torch.cat([torch.empty_like(x).uniform_(-1.0, 1.0, generator=generator) for _ in range(restarts)])
        adv = torch.maximum(torch.minimum(x0 + noise * eps, hi), lo)
    elif random_start:
        noise = [torch.empty_like(x).uniform_(-eps, eps, generator=generator) for _ in range(restarts)]
        adv = torch.maximum(torch.minimum(x0 + torch.cat(noise), hi), lo)
    else:
        adv = x0.clone()
    was_training = model.training
    model.eval()
    try:
        with fp32(x.device):  # the whole crafting, restart choice included, as in fp32 runs
            adv = _pgd_steps(model, adv, yy, alpha, steps, lo, hi)
            if restarts > 1:
                adv = _worst_restart(model, adv, yy, restarts, n)
    finally:
        model.train(was_training)
    return adv


def _pgd_steps(model: nn.Module, adv: torch.Tensor, yy: torch.Tensor, alpha: float | torch.Tensor, steps: int,
               lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), yy, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        if isinstance(alpha, torch.Tensor):  # one step size per example (B, 1, ..., 1)
            adv = adv.detach().add_(grad.sign_().mul_(alpha))
        else:
            adv = adv.detach().add_(grad.sign_(), alpha=alpha)
        adv = torch.maximum(torch.minimum(adv, hi), lo)
    return adv


def _worst_restart(model: nn.Module, adv: torch.Tensor, yy: torch.Tensor, restarts: int, n: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(adv)
    wrong = (logits.argmax(1) != yy).view(restarts, n)
    score = F.cross_entropy(logits, yy, reduction="none").view(restarts, n)
    best = torch.where(wrong, torch.inf, score).argmax(0)  # first fooling restart, else max loss
    return adv.view(restarts, n, *adv.shape[1:])[best, torch.arange(n, device=adv.device)]


def transfer(source: nn.Module, attack: Attack = pgd, **attack_kwargs: Any) -> Attack:
    """A transfer attack: the returned ``attack(model, x, y, eps)`` crafts its examples on
    ``source`` (a surrogate) with ``attack`` and ignores the model it is given, which is then only
    evaluated on them. White-box robust accuracy should be at most the transfer one; if it is
    higher, the gradients of the attacked model are masked.

    Example:
        >>> robust_correct(pruned, loader, transfer(baseline, pgd, steps=10), eps=0.1)

    Used by chapter 05 (gradient-masking checks).
    """

    def crafted_on_source(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        return attack(source, x, y, eps, **attack_kwargs)

    return crafted_on_source


@torch.no_grad()
def _still_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def robust_correct(model: nn.Module, loader: DataLoader, attack: Attack = fgsm, eps: float = 0.1,
                   *, runtime: Runtime | None = None, **attack_kwargs: Any) -> torch.Tensor:
    """Per-example outcome of an attack: a bool tensor (N,) in loader order, True where the model
    still classifies the attacked example correctly.

    The worst case over several attacks is the elementwise AND of their outcomes (an example is
    robust only if every attack failed on it); :func:`rclib.robust.strong.worst_case` computes it, and
    ``outcome.float().mean()`` is the robust accuracy. The loader must not shuffle, or outcomes
    of different attacks do not line up.

    Args:
        model: the classifier; evaluated in eval mode, its mode restored afterwards.
        loader: yields ``(x, y)`` pixel batches, in a fixed order.
        attack: ``attack(model, x, y, eps, **attack_kwargs) -> x_adv``; default :func:`fgsm`.
        eps: the attack strength.
        runtime: copies, layout and precision (:class:`rclib.core.accel.Runtime`; default plain fp32).
            The attack and the classification of its examples run under its autocast; the
            input gradients of :func:`fgsm` and :func:`pgd` are nevertheless fp32.
        **attack_kwargs: passed to ``attack`` (e.g. ``alpha=0.01, steps=50, restarts=5`` for
            :func:`pgd`).

    Returns:
        A bool tensor of shape (N,) on the CPU (read back once, after the last batch).

    Used by chapter 05 (the per-example worst case over attacks).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outcomes = []
    try:
        with autocast(device, runtime):
            for x, y in loader:
                x, y = batch_to(x, y, device, runtime, loader)
                outcomes.append(_still_correct(model, attack(model, x, y, eps, **attack_kwargs), y))
    finally:
        model.train(was_training)
    return torch.cat(outcomes).cpu() if outcomes else torch.zeros(0, dtype=torch.bool)


def robust_accuracy(model: nn.Module, loader: DataLoader, attack: Attack = fgsm, eps: float = 0.1,
                    *, runtime: Runtime | None = None, **attack_kwargs: Any) -> float:
    """Robust accuracy, Eq 5: the fraction of examples still classified correctly after ``attack``.

    Every example is attacked, including those the model already gets wrong (they count as
    failures either way), so at ``eps=0`` this equals clean accuracy.

    Args:
        model: the classifier; evaluated in eval mode, its mode restored afterwards.
        loader: yields ``(x, y)`` pixel batches.
        attack: ``attack(model, x, y, eps, **attack_kwargs) -> x_adv``; default :func:`fgsm`.
        eps: the attack strength.
        runtime: copies, layout and precision, as in :func:`robust_correct`.
        **attack_kwargs: passed to ``attack``, e.g. ``robust_accuracy(m, loader, pgd, 0.03,
            steps=50, restarts=5)``.

    Returns:
        A float in [0, 1]; 1 - ASR of Eq 4.

    Used by chapters 00-05.
    """
    outcome = robust_correct(model, loader, attack, eps, runtime=runtime, **attack_kwargs)
    return int(outcome.sum()) / max(len(outcome), 1)  # integer division: exactly clean accuracy at eps 0


def robust_curve(model: nn.Module, loader: DataLoader, epsilons, attack: Attack = fgsm,
                 *, runtime: Runtime | None = None, **attack_kwargs: Any) -> list[float]:
    """``robust_accuracy`` at each epsilon (a figure's y values); ``attack_kwargs`` go to the
    attack, ``runtime`` to :func:`robust_correct`. Used by chapters 00, 01 and 05."""
    return [robust_accuracy(model, loader, attack, float(e), runtime=runtime, **attack_kwargs) for e in epsilons]


def fgsm_curve(model: nn.Module, loader: DataLoader, epsilons, *, runtime: Runtime | None = None) -> list[float]:
    """FGSM robust accuracy at every epsilon of ``epsilons`` from one input gradient per batch.

    FGSM's direction ``sign(grad_x CE(h(x), y))`` does not depend on epsilon, so a whole curve
    needs one backward pass per batch and one forward pass per epsilon; the numbers equal
    ``robust_curve(model, loader, epsilons)`` (same gradient, same clamp, same batches), at a
    fraction of the cost when the grid is fine. Used by ``rclib.experiments.steps.operating_point``, whose
    search evaluates some 50 epsilons per baseline (chapter 00).
    """
    device = next(model.parameters()).device
    eps = [float(e) for e in epsilons]
    if any(e < 0 for e in eps):
        raise ValueError(f"epsilons={eps!r} is not allowed: every FGSM step must be >= 0")
    correct, n = torch.zeros(len(eps), dtype=torch.long), 0
    was_training = model.training
    model.eval()
    try:
        with autocast(device, runtime):
            for x, y in loader:
                x, y = batch_to(x, y, device, runtime, loader)
                step = input_gradient(model, x, y).sign()
                for j, e in enumerate(eps):
                    x_adv = x.detach().clone() if e == 0 else (x.detach() + e * step).clamp(0.0, 1.0)
                    correct[j] += int(_still_correct(model, x_adv, y).sum())
                n += len(y)
    finally:
        model.train(was_training)
    return [int(c) / max(n, 1) for c in correct]


EPS_MAX = 0.5  # at 0.5 every pixel can be moved to mid-grey: a larger step is no longer an attack
