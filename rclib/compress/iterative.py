"""Iterative pruning (paper Alg 5): prune a little, retrain, repeat, until the target rate.

Used by chapter 01 and, through ``experiments.pruning.iterative_trajectory``, chapter 03.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch import nn

from rclib.compress.harden import harden
from rclib.compress.prune import METHODS, check_rate, prune


def schedule(rate: float, step: float, extra: Sequence[float] = ()) -> list[float]:
    """Algorithm 5's prune rates: step, 2 step, ... below ``rate``, then ``rate`` itself, with
    any ``extra`` rates below ``rate`` merged in (a sweep measures them on one trajectory).

    The paper's loop (``for i = r_inc; i < r; i += r_inc``) never reaches r; we end on r so
    that the result has the rate asked for.
    """
    rate, step = check_rate(rate), check_rate(step, "step")
    n = int(np.floor(rate / step + 1e-9))
    rates = {round(step * i, 10) for i in range(1, n + 1) if step * i < rate - 1e-9}
    rates |= {check_rate(r, "extra") for r in extra if r < rate}
    return sorted(rates) + [rate]


def iterative(model: nn.Module, rate: float, step: float, retrain: Callable[[nn.Module], object],
              method: str = "channel", on_step: Callable[[nn.Module, float], None] | None = None,
              layers: Sequence[str] | None = None, extra: Sequence[float] = ()) -> nn.Module:
    """Algorithm 5, A_Iterative: prune to ``step``, retrain, prune to ``2 step``, retrain, ...
    up to ``rate``; then harden when the method is structural.

    Retraining keeps the masks, so weights pruned at one step stay exactly zero at every later
    step (``train.fit`` zeroes their gradients; the mask re-applies on every forward pass).

    Args:
        model: modified in place (masks added, weights retrained).
        rate: the final prune rate r in (0, 1).
        step: r_inc in (0, 1), the increment of each pruning step.
        retrain: ``retrain(model)`` trains the masked model in place (e.g. one epoch of
            ``train.fit``); called after every pruning step, including the last.
        method: the one-shot method applied at each step; default ``"channel"`` as in the paper.
        on_step: optional ``on_step(model, rate_so_far)`` after each retraining, e.g. to measure
            every rate of a sweep on one trajectory.
        layers: default L_prune(h).
        extra: further rates to stop at (see :func:`schedule`).

    Returns:
        ``harden(model)`` (a new, smaller model) for ``method="channel"``, else ``model``.

    Used by chapter 01.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    for r in schedule(rate, step, extra):
        prune(model, method, r, layers)
        retrain(model)
        if on_step is not None:
            on_step(model, r)
    return harden(model) if method == "channel" else model
