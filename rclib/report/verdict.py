"""Verdicts computed from numbers with spread: "holds", "does not hold" or "inconclusive".

The book never types the outcome of one of our runs. A chapter passes its per-seed (or
per-model) numbers to one of the functions below and glues the returned :class:`Verdict` into
its prose: ``str(v)`` (the outcome, then its evidence), ``v.evidence`` (the evidence alone), or
:func:`clause`, which states the outcome in words as a whole clause. The rules:

**Spread** (``rclib.core.stats``): a number about our runs is the mean over the seeds with the
sample standard deviation, and its 95% Student-t interval, intersected with the quantity's
possible range (``stats.SHARE``, ``stats.NONNEGATIVE``).

**Paired comparison** (:func:`paired`). ``a`` and ``b`` come from the same seeds; the claim is
about ``d = a - b`` against ``margin`` (e.g. ``paired(a, b, ">")``: "a beats b"). It *holds* iff
every seed's ``d`` is on the claimed side of ``margin`` **and** the t-interval of the mean ``d``
lies on that side too. It *does not hold* iff every seed's ``d`` is on the other side (ties with
``margin`` count there: no difference is not "a beats b") **and** the interval lies there too.
Anything else is *inconclusive*: one disagreeing seed is enough, because another draw of seeds
could then flip the answer. With fewer than two seeds it is always inconclusive (one seed is an
anecdote). With two seeds ``t(0.975, 1)`` is 12.7, so only a very large, steady difference can
hold; that is the honest price of the ``smoke`` profile.

**One quantity against a bound** (:func:`threshold`, e.g. "the gain is at least 2x"): the same
all-seeds-and-interval rule on the values themselves.

**Correlation** (:func:`correlation`, over models): Pearson's r or Spearman's rho with a
percentile bootstrap interval (pairs resampled with a seeded ``numpy`` generator, so the same
seed gives the same interval; resamples in which x or y is constant are skipped). It *holds* iff
the interval lies strictly on the claimed side of 0, *does not hold* iff it lies entirely on the
other side (0 included), else *inconclusive*. Fewer than ``min_n`` models, a constant input, or
more skipped resamples than one tail of the interval holds (2.5% at 95%: an undefined resample
could lie in either tail, and a trend carried by a single model shows up exactly so) are
inconclusive, with the reason. Models that are not independent (a model and its weight-shared
twin, which share every weight position) form a *family* (``groups``): the bootstrap resamples
whole families, and ``min_n`` counts families, so twins cannot pass for extra evidence.

**Wording for prose** comes from :func:`clause`, a whole clause that the prose uses as it stands:
"Algorithm 7 raises robust accuracy", "Algorithm 7 does not raise robust accuracy", or "it is
inconclusive whether Algorithm 7 raises robust accuracy", followed by its evidence in parentheses
("2 of 2 seeds agree; +12.0 pp, 95% CI +3.1 to +20.9"). So a sentence cannot contradict the
numbers beside it, and it reads as a sentence whatever the outcome. A verdict's text never holds
parentheses of its own, so prose may put it inside its own.

Used by chapters 01-06 and book/claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rclib.core.stats import Bounds, Values, as_vector, number, percent_label, spread, with_unit

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
OUTCOMES = (HOLDS, FAILS, INCONCLUSIVE)


# Each claim names the side it asserts and, implicitly, its complement (where "does not hold"
# lives): ties with the bound belong to whichever of the two contains them.
_SIDES = {">": (np.greater, "above"), ">=": (np.greater_equal, "at or above"),
          "<": (np.less, "below"), "<=": (np.less_equal, "at or below")}
_OTHER = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim tested on our numbers, with what it rests on.

    Attributes:
        outcome: ``HOLDS``, ``FAILS`` or ``INCONCLUSIVE``.
        estimate: the point estimate (mean difference, mean, r, share), unscaled.
        low, high: its interval at ``level`` (NaN when none can be computed).
        n: seeds or models the verdict rests on.
        detail: a short reason, e.g. ``"3 of 3 seeds agree"`` or ``"only 2 models"``; without
            parentheses, since prose glues a verdict inside its own.
        sentence: a ready-to-glue clause starting with the outcome and stating why.
        claim: the claim tested, in unscaled units, e.g. ``"mean difference > 0"``.
        scale, unit, digits, signed, label: how ``estimate`` is shown (``label`` prefixes it,
            e.g. ``"r = "``).

    Used by chapters 01-06 and book/claims.
    """

    outcome: str
    estimate: float
    low: float
    high: float
    n: int
    detail: str
    sentence: str
    claim: str = ""
    level: float = 0.95
    scale: float = 1.0
    unit: str = ""
    digits: int = 2
    signed: bool = True
    label: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if "(" in self.detail or ")" in self.detail:
            raise ValueError(f"detail {self.detail!r} has parentheses: prose glues a verdict inside its own")

    @property
    def holds(self) -> bool:
        return self.outcome == HOLDS

    @property
    def fails(self) -> bool:
        return self.outcome == FAILS

    @property
    def inconclusive(self) -> bool:
        return self.outcome == INCONCLUSIVE

    def numbers(self) -> str:
        """``"+23.4 pp, 95% CI +12.0 to +34.8"`` (or ``", no interval"`` when there is none)."""
        est = f"{self.label}{number(self.estimate, self.scale, self.digits, self.signed)}"
        est = with_unit(est, self.unit)
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{est}, no interval"
        lo = number(self.low, self.scale, self.digits, self.signed)
        hi = number(self.high, self.scale, self.digits, self.signed)
        return f"{est}, {percent_label(self.level)} CI {lo} to {hi}"

    @property
    def evidence(self) -> str:
        """What the outcome rests on, without the outcome: ``"3 of 3 seeds agree; +23.4 pp, 95% CI
        +12.0 to +34.8"``, or the detail alone when there is no estimate (``"only 3 models"``). For
        prose that states the outcome in its own words (:func:`clause`)."""
        if math.isnan(self.estimate):
            return self.detail
        return f"{self.detail}; {self.numbers()}"

    def __str__(self) -> str:
        # a colon, not parentheses: chapters glue this inside a sentence's own parentheses
        return f"{self.outcome}: {self.evidence}"


def _rankdata(v, axis: int = -1) -> np.ndarray:
    """Average ranks with ties (Spearman's r); scipy.stats is imported only when it is needed."""
    from scipy.stats import rankdata

    return rankdata(v, axis=axis)


def threshold(values: Values, claim: str, bound: float, *, level: float = 0.95,
              items: str = "seeds", scale: float = 1.0, unit: str = "", digits: int = 2,
              signed: bool = False, label: str = "", what: str = "mean", resolution: float = 0.0,
              empty: str | None = None, bounds: Bounds = None) -> Verdict:
    """Does a per-seed quantity lie on the ``claim`` side (``>``, ``>=``, ``<``, ``<=``) of a bound?

    Rule: HOLDS iff every value is on the claimed side of ``bound`` and so is the whole
    t-interval of the mean; FAILS iff every value and the whole interval are on the other side
    (the complement: ``>`` against ``<=`` and so on); otherwise INCONCLUSIVE, and always
    INCONCLUSIVE with fewer than two values. ``resolution`` is the step of the measurement (e.g.
    one example of a 40-example sample is 0.025): a mean within one step of the bound is
    INCONCLUSIVE, since a single example changing sides would move it across (equal seeds give
    a zero-width interval that would otherwise look decisive). No values (every seed filtered
    out, as in a run where no model beats chance) give an INCONCLUSIVE verdict, never an error:
    a caller that expects that case says why in ``empty`` (e.g. "no compressed model beats
    chance"); otherwise the reason is generic. ``bounds``: the quantity's possible range, as in
    :func:`spread` (a share: :data:`SHARE`; never negative: :data:`NONNEGATIVE`).
    Used by chapters 01-06 and book/claims.
    """
    if claim not in _SIDES:
        raise ValueError(f"claim must be one of {sorted(_SIDES)}, got {claim!r}")
    x = as_vector(values, "values")
    show = dict(level=level, scale=scale, unit=unit, digits=digits, signed=signed, label=label,
                claim=f"{what} {claim} {bound:g}")
    if x.size == 0:  # e.g. no seed had a model above chance to measure: nothing to judge, said so
        why = empty or f"no {items} gave a value to judge"
        return Verdict(INCONCLUSIVE, math.nan, math.nan, math.nan, 0, why,
                       f"{INCONCLUSIVE}: {why}, so there is nothing to test", **show)
    s = spread(x, level, bounds)
    n = s.n
    on_side, side = _SIDES[claim]
    other_side = _SIDES[_OTHER[claim]][1]
    b = with_unit(number(bound, scale, digits, False), unit)
    one = items[:-1] if items.endswith("s") else items
    if n < 2:
        return Verdict(INCONCLUSIVE, s.mean, s.low, s.high, n, f"one {one} is an anecdote",
                       f"{INCONCLUSIVE}: one {one} is an anecdote, and the {what} has no "
                       f"interval to compare with {b}", **show)
    if resolution > 0 and abs(s.mean - bound) <= resolution * (1 + 1e-9):  # float sums of equal steps
        step = with_unit(number(resolution, scale, digits, False), unit)
        return Verdict(INCONCLUSIVE, s.mean, s.low, s.high, n, f"within one measurement step, {step}, of {b}",
                       f"{INCONCLUSIVE}: the {what} lies within one measurement step ({step}) of {b}, "
                       "so one example changing sides would move it across", **show)
    k = int(on_side(x, bound).sum())
    lo_hi = with_unit(f"{number(s.low, scale, digits, signed)} to "
                       f"{number(s.high, scale, digits, signed)}", unit)
    interval = f"the {percent_label(level)} interval of the {what} ({lo_hi})"
    if k == n and on_side(s.low, bound) and on_side(s.high, bound):
        return Verdict(HOLDS, s.mean, s.low, s.high, n, f"{n} of {n} {items} agree",
                       f"{HOLDS}: all {n} {items} and {interval} lie {side} {b}", **show)
    if k == 0 and not on_side(s.low, bound) and not on_side(s.high, bound):
        return Verdict(FAILS, s.mean, s.low, s.high, n, f"0 of {n} {items} agree",
                       f"{FAILS}: all {n} {items} and {interval} lie {other_side} {b}", **show)
    if k in (0, n):
        # every seed agrees, but the interval says a new draw of seeds could disagree
        return Verdict(INCONCLUSIVE, s.mean, s.low, s.high, n,
                       f"{k} of {n} {items} agree, but the {percent_label(level)} interval spans {b}",
                       f"{INCONCLUSIVE}: all {n} {items} lie {side if k else other_side} {b}, "
                       f"but {interval} spans it", **show)
    return Verdict(INCONCLUSIVE, s.mean, s.low, s.high, n, f"{k} of {n} {items} agree",
                   f"{INCONCLUSIVE}: {k} of {n} {items} lie {side} {b} and {n - k} "
                   f"{'does' if n - k == 1 else 'do'} not ({percent_label(level)} interval of the "
                   f"{what}: {lo_hi})", **show)


DIFFERENCE = (-1.0, 1.0)  # the difference of two shares (accuracies): its mean lies in [-1, 1]


def paired(a: Values, b: Values, claim: str = ">", margin: float = 0.0, *, level: float = 0.95,
           items: str = "seeds", scale: float = 100.0, unit: str = "pp",
           digits: int = 1, resolution: float = 0.0, bounds: Bounds | str = "auto") -> Verdict:
    """Is ``a - b`` (per seed, same seeds in the same order) on the ``claim`` side of ``margin``?

    ``paired(a, b, ">")`` reads "a beats b"; ``paired(a, b, "<", margin=-0.02)`` reads "a is more
    than 2 points below b". The rule is :func:`threshold`'s on the differences: HOLDS iff every
    seed's difference and the t-interval of the mean difference lie on the claimed side of
    ``margin``; FAILS iff all of them lie on the other side (ties included); else INCONCLUSIVE;
    fewer than two seeds is always INCONCLUSIVE. Defaults show accuracies in [0, 1] as
    percentage points. ``bounds``: the difference's possible range for its interval (as in
    :func:`spread`); ``"auto"`` means :data:`DIFFERENCE` for differences of shares in percentage
    points (``unit="pp"``) and none otherwise. Used by chapters 01-06 and book/claims.
    """
    x, y = as_vector(a, "a"), as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same seeds: a has {x.size}, b has {y.size}")
    if bounds == "auto":
        bounds = DIFFERENCE if unit == "pp" else None
    return threshold(x - y, claim, margin, level=level, items=items, scale=scale, unit=unit,
                     digits=digits, signed=True, what="mean difference", resolution=resolution, bounds=bounds)


def _pearson_rows(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    xc = xs - xs.mean(axis=-1, keepdims=True)
    yc = ys - ys.mean(axis=-1, keepdims=True)
    r = (xc * yc).sum(-1) / np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    return np.clip(r, -1.0, 1.0)


def correlation(x: Values, y: Values, claim: str = "negative", method: str = "pearson", *,
                n_boot: int = 2000, seed: int = 0, min_n: int = 5, level: float = 0.95,
                items: str = "models", groups: Sequence | None = None) -> Verdict:
    """Is the correlation of ``x`` and ``y`` (one pair per model) ``"negative"`` or ``"positive"``?

    Rule: estimate Pearson's r or Spearman's rho; resample the pairs ``n_boot`` times with
    ``numpy.random.default_rng(seed)``, skipping resamples in which x or y is constant, and take
    the percentile interval at ``level``. HOLDS iff the interval lies strictly on the claimed
    side of 0; FAILS iff it lies entirely on the other side (0 included); else INCONCLUSIVE.
    Also INCONCLUSIVE, with the reason: fewer than ``min_n`` pairs, a constant x or y, or more
    than ``n_boot * (1 - level) / 2`` resamples skipped. Deterministic for a given ``seed``.

    ``groups``: one label per pair naming its family (e.g. a model and its weight-shared twin
    share one). The bootstrap then resamples whole families and ``min_n`` counts families, so
    pairs that are not independent cannot narrow the interval (a cluster bootstrap).
    Used by chapters 01-06 and book/claims.
    """
    if claim not in ("negative", "positive"):
        raise ValueError(f"claim must be 'negative' or 'positive', got {claim!r}")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    if min_n < 3 or n_boot < 100:
        raise ValueError(f"need min_n >= 3 and n_boot >= 100, got {min_n} and {n_boot}")
    xv, yv = as_vector(x, "x"), as_vector(y, "y")
    if xv.shape != yv.shape:
        raise ValueError(f"x and y must pair up: {xv.size} vs {yv.size} values")
    n = xv.size
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups must label every pair: {len(groups)} labels for {n} pairs")
    if groups is None:
        family = np.arange(n)
    elif any(isinstance(g, tuple) for g in groups):  # np.asarray would make tuples a 2-D array of fields
        index = {g: i for i, g in enumerate(sorted(set(groups)))}
        family = np.array([index[g] for g in groups], dtype=int)
    else:
        family = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    n_fam = int(family.max()) + 1 if n else 0
    units = items if groups is None else f"{items} in {n_fam} families"
    name = "r" if method == "pearson" else "rho"
    what = "Pearson r" if method == "pearson" else "Spearman rho"
    show = dict(level=level, scale=1.0, unit="", digits=2, signed=True, label=f"{name} = ",
                claim=f"{what} {'<' if claim == 'negative' else '>'} 0")

    def inconclusive(estimate: float, detail: str, why: str, low=math.nan, high=math.nan):
        return Verdict(INCONCLUSIVE, estimate, low, high, n, detail,
                       f"{INCONCLUSIVE}: {why}", **show)

    if n_fam < min_n:
        what_n = f"{n} {items}" if groups is None else f"{n_fam} families of {items}"
        return inconclusive(math.nan, f"only {what_n}",
                            f"only {what_n}; a correlation needs at least {min_n} independent ones")
    for label, v in (("x", xv), ("y", yv)):
        if np.ptp(v) == 0:  # ptp, not std: float rounding can leave a tiny std on equal values
            return inconclusive(math.nan, f"{label} is constant",
                                f"{label} takes one value over the {n} {items}, so no "
                                f"correlation is defined")
    rank = (lambda v: _rankdata(v, axis=-1)) if method == "spearman" else (lambda v: v)
    estimate = float(_pearson_rows(rank(xv), rank(yv)))
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        xs, ys = xv[idx], yv[idx]
        ok = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
        boot = _pearson_rows(rank(xs[ok]), rank(ys[ok])) if ok.any() else np.zeros(0)
    else:  # resampled families differ in size, so one resample at a time
        members = [np.flatnonzero(family == f) for f in range(n_fam)]
        draws = rng.integers(0, n_fam, size=(n_boot, n_fam))
        boot_list = []
        for d in draws:
            i = np.concatenate([members[f] for f in d])
            if np.ptp(xv[i]) > 0 and np.ptp(yv[i]) > 0:
                boot_list.append(float(_pearson_rows(rank(xv[i]), rank(yv[i]))))
        boot = np.asarray(boot_list)
    bad = n_boot - boot.size
    if bad > n_boot * (1 - level) / 2:
        # An undefined resample could sit in either tail, so once they outnumber one tail's
        # mass the percentile bound is unknown. Typically one model carries the whole trend
        # (the resamples that miss it are flat): that is not evidence of a correlation.
        return inconclusive(estimate, "too many tied resamples",
                            f"{bad} of {n_boot} bootstrap resamples have a constant x or y "
                            f"(ties among the {units}), more than the interval's tail")
    low, high = (float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))
    interval = (f"the {percent_label(level)} bootstrap interval of {what} over {n} {units} "
                f"({low:+.2f} to {high:+.2f})")
    neg = claim == "negative"
    if (high < 0) if neg else (low > 0):
        return Verdict(HOLDS, estimate, low, high, n, f"{n} {units}",
                       f"{HOLDS}: {interval} lies {'below' if neg else 'above'} 0", **show)
    if (low >= 0) if neg else (high <= 0):
        return Verdict(FAILS, estimate, low, high, n, f"{n} {units}",
                       f"{FAILS}: {interval} lies {'at or above' if neg else 'at or below'} 0",
                       **show)
    return inconclusive(estimate, f"{n} {units}, interval spans 0", f"{interval} spans 0",
                        low, high)


def seeded_correlation(x: Values, y: Values, seeds: Values, claim: str = "negative",
                       method: str = "pearson", *, n_boot: int = 2000, seed: int = 0,
                       min_n: int = 5, level: float = 0.95, groups: Sequence | None = None) -> Verdict:
    """A correlation over models pooled from several seeds (one pair per model and seed).

    Rule: :func:`correlation` on the pooled pairs gives the estimate and its bootstrap
    interval; each seed's own models give its own estimate. HOLDS iff the pooled verdict holds
    **and** every seed's estimate lies on the claimed side of 0; FAILS iff the pooled verdict
    fails **and** every seed's estimate lies on the other side; else INCONCLUSIVE. Pooling alone
    would let one seed's many models decide; the per-seed check is what "could flip with the
    choice of seeds" means here. Fewer than two seeds is INCONCLUSIVE. The detail names how many
    seeds agree. ``groups`` (families of dependent models, e.g. ``(seed, method, rate)`` shared by
    a model and its weight-shared twin) go to the pooled :func:`correlation`.
    Used by chapter 03 and book/claims.
    """
    xv, yv, sv = as_vector(x, "x"), as_vector(y, "y"), np.asarray(seeds)
    if not xv.shape == yv.shape == sv.shape:
        raise ValueError(f"x, y and seeds must pair up: {xv.size}, {yv.size}, {sv.size} values")
    pooled = correlation(xv, yv, claim, method, n_boot=n_boot, seed=seed, min_n=min_n, level=level,
                         groups=groups)
    rank = (lambda v: _rankdata(v)) if method == "spearman" else (lambda v: v)
    per_seed = []
    for s in np.unique(sv):
        a, b = xv[sv == s], yv[sv == s]
        if a.size >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
            per_seed.append(float(_pearson_rows(rank(a), rank(b))))
    k = sum((r < 0) if claim == "negative" else (r > 0) for r in per_seed)
    agree = f"{k} of {len(per_seed)} seeds on the claimed side"
    if len(per_seed) < 2:
        outcome, why = INCONCLUSIVE, f"fewer than two seeds have a defined correlation ({agree})"
    elif pooled.outcome == HOLDS and k == len(per_seed):
        outcome, why = HOLDS, f"{pooled.sentence.split(': ', 1)[1]}, and {agree}"
    elif pooled.outcome == FAILS and k == 0:
        outcome, why = FAILS, f"{pooled.sentence.split(': ', 1)[1]}, and {agree}"
    else:
        outcome, why = INCONCLUSIVE, f"pooled: {pooled.sentence}; {agree}"
    return Verdict(outcome, pooled.estimate, pooled.low, pooled.high, pooled.n,
                   f"{pooled.detail}; {agree}", f"{outcome}: {why}", claim=pooled.claim,
                   level=level, scale=1.0, unit="", digits=2, signed=True, label=pooled.label)


def arithmetic(value: float, target: float, tolerance: float, *, unit: str = "", digits: int = 2) -> Verdict:
    """For a number that no seed can change (a formula applied to fixed shapes, e.g. the paper's
    size formula on VGG16's layer sizes): HOLDS iff ``|value - target| <= tolerance``, else FAILS.
    Never INCONCLUSIVE: there is no spread to be unsure about, only the stated tolerance (e.g.
    the rounding of the paper's printed number). Used by chapter 00 and book/claims.
    """
    v, t = float(value), float(target)
    if not (math.isfinite(v) and math.isfinite(t) and tolerance >= 0):
        raise ValueError(f"value={value!r}, target={target!r}, tolerance={tolerance!r}: finite numbers, tolerance >= 0")
    diff = v - t
    ok = abs(diff) <= tolerance
    outcome = HOLDS if ok else FAILS
    tol = with_unit(number(tolerance, 1.0, digits, False), unit)
    detail = f"exact arithmetic, within {tol}" if ok else f"exact arithmetic, off by more than {tol}"
    return Verdict(outcome, v, math.nan, math.nan, 1, detail,
                   f"{outcome}: {number(v, 1.0, digits, False)} against {number(t, 1.0, digits, False)} "
                   f"({'within' if ok else 'outside'} {tol})", claim=f"|value - {t:g}| <= {tolerance:g}",
                   scale=1.0, unit=unit, digits=digits, signed=False)


