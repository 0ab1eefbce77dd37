"""Distance to the decision boundary (future work of the paper, Sec. 4.1; chapter 06).

Every robustness number of chapters 00-05 is an accuracy at one attack strength eps, so a
verdict can hinge on the eps chosen. The direct quantity is, per input x with label y, the
smallest L-infinity perturbation that changes the model's decision,

    d(x) = min { ||delta||_inf : argmax h(x + delta) != y,  x + delta in [0, 1]^n },

and robust accuracy at every eps at once is the share of inputs with d(x) > eps. No attack
computes d exactly for a deep network; any adversarial point found gives an upper bound. This
module brackets d from two sides of the attack literature:

* **a minimum-norm attack**, ART's DeepFool (:func:`rclib.robust.strong.deepfool`): it minimises the
  L2 norm, so the L-infinity norm of its step is an upper bound on d (often a loose one);
* **bisection on eps with a fixed-eps attack** (:func:`bisection_linf`): PGD-10 (chapter 05's
  table attack) run at a per-input radius that halves the interval [low, high] ``steps`` times:
  at ``high`` PGD found an adversarial point (an upper bound on d), at ``low`` it found none
  (not a proof: a stronger attack might). An input PGD cannot flip even at ``eps_max`` gets
  ``high = inf``.

:func:`distances` returns both, the clean logit margin ``z_y - max_{j != y} z_j`` (the quantity
Eq. 9-10's penalty trains) and ``distance = min(deepfool, high)``: the smallest perturbation
found, 0 for an input the model gets wrong unperturbed. :func:`accuracy_curve` turns distances
into robust accuracy at any eps.

Why not FAB or FMN, the stronger minimum-norm attacks: ART 1.20 has neither, and its
Brendel-Bethge attack needs numba (a JIT compile in every chapter's kernel), which the project
does not install; the bisection with PGD gives the tighter bound anyway (chapter 06 measures by how
much).

For a linear model without the pixel box the distance is known in closed form:
``min_j (z_y - z_j) / ||w_y - w_j||_1``; the tests check both brackets against it.

Used by chapter 06.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from rclib.nn import train
from rclib.robust import attacks, strong
from rclib.robust.attacks import EPS_MAX

BISECTION_STEPS = 8  # 0.5 / 2^8 = 0.002: finer than one grey level of a 16-level digit (1/16)
PGD_STEPS = 10  # chapter 05's table attack


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = train.model_device(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(b.to(device)).float().cpu() for b in x.split(batch_size)])
    finally:
        model.train(was_training)


def logit_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per input, ``z_y - max_{j != y} z_j`` on the clean logits (Eq. 9-10's margin, on logits as
    chapter 04 trains it): positive where the model is right, larger the more confidently.

    Args:
        model: classifier (B, C, H, W) -> (B, K) logits, evaluated in eval mode (mode restored).
        x: inputs (N, C, H, W) in [0, 1]; y: labels (N,).

    Returns:
        float32 CPU tensor (N,).

    Example:
        >>> logit_margin(model, x, y) > 0   # exactly the inputs classified correctly (no ties)

    Used by chapter 06.
    """
    z = _logits(model, x, batch_size)
    y = y.cpu()
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], -torch.inf).amax(1)
    return true - other


def _linf(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).abs().amax(1) if len(delta) else torch.zeros(0)


DEEPFOOL_STEPS = 10  # on the cpu profile's models 10, 20 and 50 steps flipped the same inputs by the same steps


def deepfool_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_iter: int = DEEPFOOL_STEPS,
                  overshoot: float = 0.02, batch_size: int = 128) -> torch.Tensor:
    """Per input, the L-infinity norm of DeepFool's perturbation (:func:`rclib.robust.strong.deepfool`)
    where it changes the decision: an upper bound on the distance d(x). 0 where the model is
    already wrong; ``inf`` where DeepFool did not change the decision within ``max_iter`` steps.

    Why 10 steps, not ART's 50: ART computes every class gradient of the whole batch at every
    step until its last input flips, so a batch costs its slowest input's steps; on Algorithm
    7's cpu-profile model 50 steps took 4.3 s and 10 steps 0.9 s, with the same 96 of 100
    inputs flipped at the same distances.

    Returns:
        float32 CPU tensor (N,).

    Used by chapter 06.
    """
    x, y = x.detach().cpu(), y.cpu()
    out = torch.zeros(len(y))
    right = (_logits(model, x, batch_size).argmax(1) == y).nonzero().flatten()
    if len(right) == 0:
        return out
    adv = strong.deepfool(model, x[right], max_iter=max_iter, overshoot=overshoot, batch_size=batch_size)
    flipped = _logits(model, adv, batch_size).argmax(1) != y[right]
    out[right] = torch.where(flipped, _linf(adv - x[right]), torch.tensor(torch.inf))
    return out


def bisection_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_max: float = EPS_MAX,
                   steps: int = BISECTION_STEPS, pgd_steps: int = PGD_STEPS, seed: int = 0,
                   batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input, ``(low, high)``: PGD (:func:`rclib.robust.attacks.pgd`, ``pgd_steps`` steps, random
    start) changes the decision at radius ``high`` and did not at ``low``, after ``steps``
    halvings of [0, ``eps_max``] (each input its own radius in one batched PGD run per halving).

    An input classified wrongly unperturbed gets (0, 0); one that PGD cannot flip at ``eps_max``
    gets (``eps_max``, inf). PGD's success need not be monotone in eps (a random start), so
    ``low`` is what this attack could not do, not a certificate.

    Args:
        model: classifier on the device its inputs go to; x (N, C, H, W) in [0, 1]; y (N,).
        eps_max: the largest radius tried (0.5: a gradient can move every pixel to mid-grey).
        steps: halvings (resolution ``eps_max / 2**steps``).
        pgd_steps: PGD's gradient steps per run.
        seed: every run draws its random starts from a generator seeded with it.

    Returns:
        two float32 CPU tensors (N,), ``low <= high``.

    Example:
        >>> low, high = bisection_linf(model, x, y)
        >>> (high - low)[torch.isfinite(high)].max() <= 0.5 / 2**8
        tensor(True)

    Used by chapter 06.
    """
    if not 0 < eps_max <= 1 or steps < 0:
        raise ValueError(f"eps_max={eps_max!r}, steps={steps!r}: eps_max in (0, 1], steps >= 0")
    device = train.model_device(model)
    x, y = x.detach().cpu(), y.cpu()
    right = _logits(model, x, batch_size).argmax(1) == y
    low, high = torch.zeros(len(y)), torch.zeros(len(y))
    idx = right.nonzero().flatten()
    if len(idx) == 0:
        return low, high

    def fooled(radius: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        out = []
        for b in range(0, len(idx), batch_size):
            xb, yb = x[idx[b:b + batch_size]].to(device), y[idx[b:b + batch_size]].to(device)
            adv = attacks.pgd(model, xb, yb, radius[b:b + batch_size].to(device), steps=pgd_steps, generator=g)
            out.append((_logits(model, adv, batch_size).argmax(1) != yb.cpu()))
        return torch.cat(out)

    lo, hi = torch.zeros(len(idx)), torch.full((len(idx),), float(eps_max))
    never = ~fooled(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = fooled(mid)
        hi, lo = torch.where(f, mid, hi), torch.where(f, lo, mid)
    lo[never], hi[never] = eps_max, torch.inf
    low[idx], high[idx] = lo, hi
    return low, high


def distances(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, eps_max: float = EPS_MAX,
              steps: int = BISECTION_STEPS, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Everything chapter 06 measures per input, as float32 CPU tensors (N,): ``margin``
    (:func:`logit_margin`), ``deepfool`` (:func:`deepfool_linf`), ``low`` and ``high``
    (:func:`bisection_linf`) and ``distance = min(deepfool, high)``, the smallest perturbation
    found that changes the decision (0 for an input classified wrongly; ``inf`` where neither
    attack changed it).

    Example:
        >>> d = distances(model, x, y, seed=0)
        >>> accuracy_curve(d["distance"], [0.0, 0.1])   # clean accuracy, then robust at 0.1

    Used by chapter 06.
    """
    margin = logit_margin(model, x, y, batch_size)
    deep = deepfool_linf(model, x, y, batch_size=batch_size)
    low, high = bisection_linf(model, x, y, eps_max=eps_max, steps=steps, seed=seed, batch_size=batch_size)
    return dict(margin=margin, deepfool=deep, low=low, high=high, distance=torch.minimum(deep, high))


def accuracy_curve(distance: torch.Tensor, eps: Sequence[float]) -> list[float]:
    """Robust accuracy at each eps implied by per-input distances: the share of inputs whose
    distance exceeds eps (eps 0 gives clean accuracy). Distances that are upper bounds give
    upper bounds on robust accuracy, as every attack does.

    Example:
        >>> accuracy_curve(torch.tensor([0.0, 0.05, 0.2, float("inf")]), [0, 0.1])
        [0.75, 0.5]

    Used by chapter 06.
    """
    d = distance.detach().cpu().float()  # eps compared in float32 too: 0.2 is not above float32(0.2)
    return [float((d > torch.tensor(float(e))).double().mean()) if len(d) else 0.0 for e in eps]


def median(distance: torch.Tensor) -> float:
    """The median distance (``inf`` allowed: an input no attack flipped counts as farthest).
    Used by chapter 06."""
    d = distance.detach().cpu().double().numpy()
    return float(np.median(d)) if len(d) else float("nan")
