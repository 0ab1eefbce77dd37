"""Numbers about our runs: a mean with its spread over seeds, and how a table cell shows it.

A number about our runs is the mean over the seeds with the sample standard deviation
(``ddof=1``), written ``97.2 ± 1.1``; a single seed shows without ``±``. The 95% interval of
the mean is Student's ``mean ± t(0.975, n-1) * std / sqrt(n)``, intersected with the quantity's
possible range (``bounds``: a share stays in [0, 1], a spread is never negative), which keeps
its coverage and never makes it wider.

Used by every chapter, by ``report.verdict`` (which judges claims on these numbers) and by
``experiments.operating``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

# scipy.special, not scipy.stats: the same functions (stats.t.ppf is special.stdtrit, stats.norm.ppf
# is special.ndtri) without the 0.7 s that importing scipy.stats adds to every chapter's start
from scipy import special

Values = Union[Sequence[float], np.ndarray]
Bounds = Union[tuple[float, float], None]


SHARE = (0.0, 1.0)  # a proportion (accuracy, share of models): its mean lies in [0, 1]


NONNEGATIVE = (0.0, math.inf)  # a spread, a largest change, a ratio of sizes or accuracies


@dataclass(frozen=True)
class Stat:
    """Mean with spread: sample std (ddof=1) and a Student-t interval of the mean.

    ``std``, ``low`` and ``high`` are NaN when ``n == 1`` (one value has no spread).
    Used by chapters 01-05 and book/claims.
    """

    mean: float
    std: float
    n: int
    low: float
    high: float
    level: float = 0.95

    def format(self, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
        """``"97.2 ± 1.1"`` (mean ± sample std, times ``scale``); one value shows without ±."""
        m = number(self.mean, scale, digits, signed)
        return m if self.n < 2 else f"{m} ± {self.std * scale:.{digits}f}"


def number(x: float, scale: float, digits: int, signed: bool) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    v = x * scale
    if round(v, digits) == 0:
        v = 0.0  # avoid "-0.0" and "+-0.0"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def with_unit(text: str, unit: str) -> str:
    return f"{text}{unit}" if unit in ("", "%", "x") else f"{text} {unit}"


def percent_label(level: float) -> str:
    return f"{100 * level:g}%"


def as_vector(values: Values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values: {x.tolist()}")
    return x


def spread(values: Values, level: float = 0.95, bounds: Bounds = None) -> Stat:
    """Mean, sample std (ddof=1), n and the Student-t interval of the mean at ``level``.

    Rule: ``mean ± t((1 + level) / 2, n - 1) * std / sqrt(n)``; std and interval are NaN for one
    value. ``bounds=(low, high)``: the quantity's possible range (:data:`SHARE`,
    :data:`NONNEGATIVE`); the interval is intersected with it, which keeps its coverage (the true
    mean lies in the range) and never lets a share's interval leave [0, 1]. Values outside the
    bounds, empty or non-finite input raise ``ValueError``.
    Used by chapters 01-05 and book/claims.
    """
    x = as_vector(values, "values")
    if bounds is not None and x.size and (x.min() < bounds[0] or x.max() > bounds[1]):
        raise ValueError(f"values {x.tolist()} lie outside their possible range {bounds}")
    n = x.size
    if n == 0:
        raise ValueError("spread of no values")
    mean = float(x.mean())
    if n < 2:
        return Stat(mean, math.nan, 1, math.nan, math.nan, level)
    std = float(x.std(ddof=1))
    half = float(special.stdtrit(n - 1, (1 + level) / 2)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Stat(mean, std, n, low, high, level)


def fmt(values: Values, scale: float = 100.0, digits: int = 1, signed: bool = False,
        empty: str | None = None) -> str:
    """Table cell for per-seed values: ``"97.2 ± 1.1"`` (mean ± sample std, times ``scale``).

    A single value shows without ``±``. No values show as ``empty`` (default ``"n/a"``; e.g.
    chapter 03 when no compressed model beats chance). Used by chapters 01-05 and book/claims.
    """
    if np.asarray(values, dtype=float).size == 0:
        return "n/a" if empty is None else empty
    return spread(values).format(scale, digits, signed)


def seed_stats(rows: Sequence[dict], metric: str, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """``(rates, mean, std, n)`` of ``metric`` per prune rate over the rows' seeds (sample std,
    ddof 1; 0 where a rate has one row). Rows of one method; used to draw bands."""
    by_rate: dict[float, list[float]] = {}
    for r in rows:
        by_rate.setdefault(float(r["rate"]), []).append(scale * float(r[metric]))
    rates = np.array(sorted(by_rate))
    vals = [np.asarray(by_rate[k]) for k in rates]
    mean = np.array([v.mean() for v in vals])
    std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
    return rates, mean, std, np.array([len(v) for v in vals])
