"""The strongest evaluation, from a well-kept library: APGD, Square and AutoAttack through ART.

Hand-written attacks are where robustness claims go wrong (a weak attack overstates robustness,
DESIGN.md's "FGSM overstates robustness"), so the attacks a chapter reports as *strongest* come
from the adversarial-robustness-toolbox (ART), not from rclib. This module wraps an rclib model
for ART and returns, for every attack, the per-example outcome ("still correct") in the same
form as :func:`rclib.robust.attacks.robust_correct`, so the worst case over attacks is taken per
example (:func:`worst_case`).

Attacks (``name``; all L-infinity, pixels in [0, 1]):

- ``"pgd"``: ART's ProjectedGradientDescent (``pgd_steps`` steps of ``eps_step``, default
  ``2.5 * eps / pgd_steps``; ``restarts`` random starts, 0 = start at x). Used as a reference for
  :func:`rclib.robust.attacks.pgd`.
- ``"apgd-ce"``: AutoProjectedGradientDescent with cross-entropy (Croce & Hein, 2020), ``apgd_steps``
  iterations, initial step ``2 * eps``, ``restarts`` random starts.
- ``"apgd-t"``: targeted APGD with the difference-of-logits-ratio loss, run once per target
  among the ``targets`` classes with the highest clean logits other than the label (AutoAttack's
  APGD-T); an example counts as broken if any target's run fools the model.
- ``"square"``: Square Attack (Andriushchenko et al., 2020), black-box, margin loss, at most
  ``square_queries`` iterations (one model query per still-robust example each) per restart,
  ``restarts`` restarts. The query budget is the caller's: measured on one CPU thread, 1000
  queries on 500 digits cost 80 s for the ``cpu`` profile's vgg_small (random weights) when no
  example breaks (the worst case: broken examples stop being queried); there APGD-CE's 100 steps
  cost 8 s and APGD-T's 9 targets 75 s.
- ``"autoattack"``: AutoAttack's standard ensemble without FAB-T: apgd-ce, then apgd-t, then
  square, each on the examples the previous ones did not break. ART's own ``AutoAttack`` class
  is not used: it imports ``multiprocess`` (not an ART dependency) and runs a different list
  (untargeted DLR and DeepFool instead of APGD-T).
- :func:`deepfool`: ART's DeepFool, a minimum-norm attack (no radius), for chapter 06's distances.

Used by chapters 05 and 06.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "square", "autoattack")


@dataclass(frozen=True)
class Outcome:
    """One attack's result: ``correct[i]`` is True where example i is still classified correctly.
    Used by chapter 05."""

    attack: str
    eps: float
    correct: torch.Tensor  # bool (N,), in the order of the data

    @property
    def accuracy(self) -> float:
        """Robust accuracy: the share of examples still correct."""
        return int(self.correct.sum()) / max(len(self.correct), 1)


class _Hidden(nn.Module):
    """Calls the model without registering it as a submodule, so ART's ``zero_grad()``,
    ``train()`` and ``to()`` on its wrapper never reach the caller's model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@contextlib.contextmanager
def _attacked(model: nn.Module, seed: int) -> Iterator[None]:
    """Eval mode, no parameter gradients (ART calls ``loss.backward()``), ART quiet, numpy seeded
    (ART draws its random starts from numpy's global generator); all restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    log = logging.getLogger("art")
    level = log.level
    state = np.random.get_state()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.setLevel(logging.ERROR)
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
        log.setLevel(level)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def classifier(model: nn.Module, input_shape: tuple[int, ...], nb_classes: int):
    """ART's ``PyTorchClassifier`` around an rclib model: pixels in [0, 1] (the model standardises
    in its first layer, so no ART preprocessing), cross-entropy loss, the model's device.
    Used by chapter 05."""
    from art.estimators.classification import PyTorchClassifier

    device = next(model.parameters()).device
    return PyTorchClassifier(model=_Hidden(model), loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=nb_classes, clip_values=(0.0, 1.0),
                             device_type="gpu" if device.type == "cuda" else "cpu")


def _tensors(data: DataLoader | tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, DataLoader):
        batches = [(x.detach().cpu(), y.detach().cpu()) for x, y in data]
        if not batches:
            raise ValueError("the data loader yielded no batches")
        x, y = (torch.cat(t) for t in zip(*batches))
    else:
        x, y = (t.detach().cpu() for t in data)
    return x.numpy().astype(np.float32), y.numpy().astype(np.int64)


def _predict(est, x: np.ndarray, batch_size: int) -> np.ndarray:
    return est.predict(x, batch_size=batch_size).argmax(1)


def _run(est, name: str, x: np.ndarray, y: np.ndarray, eps: float, *, batch_size: int, restarts: int,
         pgd_steps: int, eps_step: float | None, apgd_steps: int, targets: int, square_queries: int) -> np.ndarray:
    """x_adv for one attack; only examples still classified correctly are attacked (the others
    are already counted as broken and keep x)."""
    from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent, SquareAttack

    adv = x.copy()
    todo = np.flatnonzero(_predict(est, x, batch_size) == y) if len(x) else np.zeros(0, dtype=int)
    if eps == 0 or len(todo) == 0:
        return adv
    xs, ys = x[todo], y[todo]
    apgd = dict(norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=apgd_steps, nb_random_init=max(restarts, 1),
                batch_size=batch_size, verbose=False)
    if name == "pgd":
        step = 2.5 * eps / pgd_steps if eps_step is None else eps_step
        out = ProjectedGradientDescent(est, norm=np.inf, eps=eps, eps_step=step, max_iter=pgd_steps,
                                       num_random_init=restarts, batch_size=batch_size,
                                       verbose=False).generate(xs, ys)
    elif name == "apgd-ce":
        out = AutoProjectedGradientDescent(est, loss_type="cross_entropy", **apgd).generate(xs, ys)
    elif name == "apgd-t":
        logits = est.predict(xs, batch_size=batch_size)
        logits[np.arange(len(ys)), ys] = -np.inf
        order = np.argsort(-logits, axis=1)[:, :min(targets, est.nb_classes - 1)]
        attack = AutoProjectedGradientDescent(est, loss_type="difference_logits_ratio", targeted=True, **apgd)
        out, alive = xs.copy(), np.ones(len(ys), dtype=bool)
        for k in range(order.shape[1]):
            idx = np.flatnonzero(alive)
            if len(idx) == 0:
                break
            trial = attack.generate(xs[idx], order[idx, k])
            fooled = _predict(est, trial, batch_size) != ys[idx]
            out[idx[fooled]] = trial[fooled]
            alive[idx[fooled]] = False
    elif name == "square":
        out = SquareAttack(est, norm=np.inf, eps=eps, max_iter=square_queries, nb_restarts=max(restarts, 1),
                           batch_size=batch_size, verbose=False).generate(xs, ys)
    elif name == "autoattack":
        out = xs.copy()
        for part in ("apgd-ce", "apgd-t", "square"):
            alive = np.flatnonzero(_predict(est, out, batch_size) == ys)
            if len(alive) == 0:
                break
            out[alive] = _run(est, part, xs[alive], ys[alive], eps, batch_size=batch_size, restarts=restarts,
                              pgd_steps=pgd_steps, eps_step=eps_step, apgd_steps=apgd_steps, targets=targets,
                              square_queries=square_queries)
    else:
        raise ValueError(f"attack={name!r} is not known: one of {', '.join(ATTACKS)}")
    adv[todo] = out
    return adv


def generate(model: nn.Module, data: DataLoader | tuple[torch.Tensor, torch.Tensor], attack: str, eps: float, *,
             batch_size: int = 128, restarts: int = 1, pgd_steps: int = 10, eps_step: float | None = None,
             apgd_steps: int = 100, targets: int = 9, square_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """Adversarial examples from an ART attack on an rclib model (see the module docstring for
    the attacks and their sizes).

    Examples the model already gets wrong are returned unchanged. The result can be fed to
    another model (transfer attacks).

    Args:
        model: classifier on pixels in [0, 1] (B, C, H, W) -> (B, K) logits, float32; evaluated in
            eval mode with its mode, parameter ``requires_grad`` flags and ``.grad`` left as found.
        data: a DataLoader of ``(x, y)`` batches (not shuffled) or a tuple of tensors ``(x, y)``.
        attack: one of ``ATTACKS``.
        eps: L-infinity radius in pixel units (>= 0; 0 returns x).
        batch_size: ART's batch size.
        restarts: random starts (pgd: 0 means start at x; the others use at least 1).
        pgd_steps, eps_step: ``"pgd"``'s iterations and step (default ``2.5 * eps / pgd_steps``).
        apgd_steps: APGD iterations (AutoAttack uses 100).
        targets: target classes for apgd-t (AutoAttack uses 9).
        square_queries: Square's iterations per restart, i.e. its query budget per example.
        seed: seeds numpy's global generator for ART's random starts (restored afterwards).

    Returns:
        x_adv (N, C, H, W) as a float32 CPU tensor, within eps of x and in [0, 1].

    Used by chapter 05.
    """
    if eps < 0:
        raise ValueError(f"eps={eps!r} is not allowed: an attack radius must be >= 0")
    if attack not in ATTACKS:
        raise ValueError(f"attack={attack!r} is not known: one of {', '.join(ATTACKS)}")
    x, y = _tensors(data)
    with _attacked(model, seed):
        with torch.no_grad():
            probe = torch.from_numpy(x[:1]).to(next(model.parameters()).device)
            nb_classes = int(model(probe).shape[1]) if len(x) else 2
        est = classifier(model, x.shape[1:], nb_classes)
        adv = _run(est, attack, x, y, float(eps), batch_size=batch_size, restarts=restarts, pgd_steps=pgd_steps,
                   eps_step=eps_step, apgd_steps=apgd_steps, targets=targets, square_queries=square_queries)
    # ART adds the projected perturbation back to x in float32, which can land one ulp outside
    adv = np.clip(np.clip(adv, x - eps, x + eps), 0.0, 1.0) if len(x) else adv
    return torch.from_numpy(adv)


def evaluate(model: nn.Module, data: DataLoader | tuple[torch.Tensor, torch.Tensor], attack: str, eps: float,
             **options) -> Outcome:
    """Run an ART attack and return its per-example outcome and robust accuracy.

    ``options`` are :func:`generate`'s keywords (``restarts``, ``apgd_steps``, ``targets``,
    ``square_queries``, ``seed``, ...). Every example counts, so at ``eps=0`` the accuracy is
    clean accuracy.

    Example:
        >>> a = evaluate(model, splits.test, "apgd-ce", 0.1)
        >>> b = evaluate(model, splits.test, "square", 0.1, square_queries=500)
        >>> worst_case(a, b).float().mean()   # robust accuracy under the stronger, per example

    Used by chapter 05.
    """
    x, y = _tensors(data)
    adv = generate(model, (torch.from_numpy(x), torch.from_numpy(y)), attack, eps, **options)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = torch.cat([model(a.to(device)).argmax(1).cpu() for a in adv.split(256)]) if len(adv) \
                else torch.zeros(0, dtype=torch.long)
    finally:
        model.train(was_training)
    return Outcome(attack, float(eps), pred == torch.from_numpy(y))


def deepfool(model: nn.Module, x: torch.Tensor, *, max_iter: int = 50, overshoot: float = 0.02,
             nb_grads: int = 10, batch_size: int = 128) -> torch.Tensor:
    """ART's DeepFool (Moosavi-Dezfooli et al., 2016), a minimum-norm attack: no radius; per input
    it steps to the nearest boundary of the model linearised at the current point (the smallest
    L2 step among the ``nb_grads`` most likely classes), repeats until the prediction changes or
    ``max_iter`` steps, and finally overshoots the total step by ``overshoot`` (the paper's 0.02).

    It attacks the model's own prediction, not a label: chapter 06 calls it on inputs the model
    classifies correctly. It minimises the L2 norm, so the L-infinity norm of its perturbation is
    an upper bound on the L-infinity distance to the boundary, not the distance itself.

    Args:
        model: classifier on pixels in [0, 1] (B, C, H, W) -> (B, K) logits; eval mode, parameter
            flags and mode restored afterwards.
        x: inputs (N, C, H, W) in [0, 1], any device.
        max_iter, overshoot, nb_grads, batch_size: ART's ``max_iter``, ``epsilon``, ``nb_grads``
            and ``batch_size``.

    Returns:
        x_adv (N, C, H, W) as a float32 CPU tensor in [0, 1]; an input DeepFool could not flip
        comes back where it stopped.

    Example:
        >>> x_adv = deepfool(model, x)
        >>> (x_adv - x).flatten(1).abs().amax(1)   # an upper bound on each input's distance

    Used by chapter 06.
    """
    from art.attacks.evasion import DeepFool

    xs = x.detach().cpu().numpy().astype(np.float32)
    if len(xs) == 0:
        return torch.from_numpy(xs)
    with _attacked(model, 0):
        with torch.no_grad():
            nb_classes = int(model(torch.from_numpy(xs[:1]).to(next(model.parameters()).device)).shape[1])
        est = classifier(model, xs.shape[1:], nb_classes)
        adv = DeepFool(est, max_iter=max_iter, epsilon=overshoot, nb_grads=min(nb_grads, nb_classes),
                       batch_size=batch_size, verbose=False).generate(xs)
    return torch.from_numpy(np.clip(adv, 0.0, 1.0).astype(np.float32))


def worst_case(*outcomes: Outcome | torch.Tensor) -> torch.Tensor:
    """Per-example worst case over attacks: an example is robust only if it survived every attack,
    the elementwise AND of the outcomes (``Outcome``s or bool tensors from
    :func:`rclib.robust.attacks.robust_correct`, all over the same data in the same order).
    Used by chapter 05."""
    masks = [o.correct if isinstance(o, Outcome) else o for o in outcomes]
    if not masks:
        raise ValueError("worst_case needs at least one outcome")
    if len({len(m) for m in masks}) != 1:
        raise ValueError(f"outcomes cover different numbers of examples: {[len(m) for m in masks]}")
    out = masks[0].bool().cpu().clone()
    for m in masks[1:]:
        out &= m.bool().cpu()
    return out
