"""rclib.report.verdict on synthetic numbers: each rule's clear yes, clear no and inconclusive cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from rclib.core import stats as S
from rclib.report import verdict as V
from rclib.report import wording
from rclib.report.verdict import FAILS, HOLDS, INCONCLUSIVE

# ---- spread and fmt -------------------------------------------------------------------------

def test_spread_is_mean_sample_std_and_student_t_interval():
    x = np.array([0.91, 0.95, 0.88, 0.97])
    s = S.spread(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s.n == 4
    assert s.mean == pytest.approx(x.mean())
    assert s.std == pytest.approx(np.std(x, ddof=1))
    assert (s.low, s.high) == pytest.approx((lo, hi))


def test_spread_of_one_value_has_no_spread_and_empty_or_nan_is_refused():
    s = S.spread([0.5])
    assert s.n == 1 and s.mean == 0.5
    assert math.isnan(s.std) and math.isnan(s.low) and math.isnan(s.high)
    with pytest.raises(ValueError):
        S.spread([])
    with pytest.raises(ValueError, match="NaN"):
        S.spread([0.5, float("nan")])


def test_fmt_mean_pm_sample_std_and_single_value_without_pm():
    assert S.fmt([0.972, 0.961, 0.983]) == "97.2 ± 1.1"  # mean 0.972, sample std 0.011
    assert S.fmt([0.972]) == "97.2"
    assert S.fmt([2.0, 4.0], scale=1, digits=2) == f"3.00 ± {math.sqrt(2):.2f}"
    assert S.fmt([-0.02, -0.04], signed=True) == "-3.0 ± 1.4"
    assert S.fmt([0.0004, -0.0004], signed=True).startswith("+0.0 ±")  # never "-0.0"


# ---- paired comparisons ---------------------------------------------------------------------

def test_paired_clear_yes():
    a, b = [0.90, 0.85, 0.88], [0.70, 0.60, 0.65]
    v = V.paired(a, b, ">")
    d = np.subtract(a, b)
    assert v.outcome == HOLDS and v.holds
    assert v.n == 3 and v.estimate == pytest.approx(d.mean())
    assert 0 < v.low < v.estimate < v.high
    assert v.detail == "3 of 3 seeds agree" and v.claim == "mean difference > 0"
    assert v.sentence.startswith("holds: all 3 seeds")


def test_paired_clear_no():
    v = V.paired([0.60, 0.62, 0.58], [0.80, 0.79, 0.83], ">")
    assert v.outcome == FAILS and v.fails
    assert v.high < 0 and v.detail == "0 of 3 seeds agree"
    assert v.sentence.startswith("does not hold:")


def test_paired_all_seeds_agree_but_interval_spans_zero_is_inconclusive():
    # every seed has a > b, but so noisily that another draw of seeds could reverse the mean
    v = V.paired([0.81, 1.00, 0.82], [0.80, 0.80, 0.80], ">")
    assert v.low < 0 < v.high
    assert v.outcome == INCONCLUSIVE and v.inconclusive
    assert "interval spans" in v.detail


def test_one_disagreeing_seed_is_inconclusive_even_if_the_interval_excludes_zero():
    d = np.r_[np.full(19, 0.10), -0.01]  # 19 seeds clearly up, one slightly down
    v = V.paired(d, np.zeros_like(d), ">")
    assert v.low > 0, "the interval alone would say holds; the all-seeds rule must overrule it"
    assert v.outcome == INCONCLUSIVE
    assert v.detail == "19 of 20 seeds agree"
    assert "1 does not" in v.sentence


def test_one_seed_is_always_inconclusive():
    v = V.paired([0.99], [0.10], ">")
    assert v.outcome == INCONCLUSIVE and v.n == 1
    assert "anecdote" in v.detail
    assert math.isnan(v.low) and math.isnan(v.high)
    assert str(v).endswith("no interval")


def test_pairing_sees_a_steady_gain_that_unpaired_spreads_would_hide():
    # seeds differ a lot from each other, but within each seed a beats b by 1-2 points
    b = np.array([0.60, 0.75, 0.90, 0.68])
    a = b + np.array([0.012, 0.015, 0.011, 0.018])
    sa, sb = S.spread(a), S.spread(b)
    assert sa.low < sb.high  # the two means' intervals overlap ...
    assert V.paired(a, b, ">").outcome == HOLDS  # ... yet every paired difference is positive


def test_ties_do_not_support_a_strict_claim_in_either_direction():
    a = [0.7, 0.8, 0.9]
    assert V.paired(a, a, ">").outcome == FAILS
    assert V.paired(a, a, "<").outcome == FAILS


def test_margin_shifts_the_bound():
    a, b = [0.90, 0.91, 0.92], [0.80, 0.80, 0.80]  # a beats b by 10-12 points
    assert V.paired(a, b, ">", margin=0.05).outcome == HOLDS
    assert V.paired(a, b, ">", margin=0.15).outcome == FAILS
    # "a is more than 5 points below b" does not hold
    assert V.paired(a, b, "<", margin=-0.05).outcome == FAILS


def test_swapping_a_and_b_flips_holds_and_fails():
    rng = np.random.default_rng(11)
    seen = {HOLDS: 0, FAILS: 0, INCONCLUSIVE: 0}
    for _ in range(300):
        n = int(rng.integers(2, 7))
        a = rng.normal(0.8, 0.05, n)
        b = a + rng.normal(rng.normal(0, 0.05), 0.03, n)  # continuous: no ties with 0
        v, w = V.paired(a, b, ">"), V.paired(b, a, ">")
        flip = {HOLDS: FAILS, FAILS: HOLDS, INCONCLUSIVE: INCONCLUSIVE}
        assert w.outcome == flip[v.outcome]
        assert V.paired(a, b, "<").outcome == w.outcome  # "a < b" is "b > a"
        assert w.estimate == pytest.approx(-v.estimate)
        seen[v.outcome] += 1
    assert all(seen.values()), f"the random cases must reach every outcome: {seen}"


def test_paired_refuses_unpaired_or_bad_input():
    with pytest.raises(ValueError, match="same seeds"):
        V.paired([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="claim"):
        V.paired([0.1, 0.2], [0.1, 0.2], "!=")
    with pytest.raises(ValueError, match="NaN"):
        V.paired([0.1, float("nan")], [0.1, 0.2])


# ---- one quantity against a bound -----------------------------------------------------------

def test_threshold_yes_no_inconclusive_and_ties():
    assert V.threshold([2.6, 2.8, 2.7], ">=", 2.0).outcome == HOLDS
    assert V.threshold([1.2, 1.4, 1.3], ">=", 2.0).outcome == FAILS
    assert V.threshold([1.9, 2.8, 2.4], ">=", 2.0).outcome == INCONCLUSIVE
    assert V.threshold([2.0, 2.0, 2.0], ">=", 2.0).outcome == HOLDS  # exactly 2x is "at least 2x"
    assert V.threshold([2.0, 2.0, 2.0], ">", 2.0).outcome == FAILS
    assert V.threshold([0.1, 0.2, 0.15], "<", 0.5).outcome == HOLDS


# ---- correlations ---------------------------------------------------------------------------

def _line(slope: float, noise: float, n: int = 12, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, n)
    return x, slope * x + rng.normal(0, noise, n)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_clear_yes_and_clear_no(method):
    x, y = _line(-1.0, 0.05)
    v = V.correlation(x, y, "negative", method)
    assert v.outcome == HOLDS and v.high < 0 and v.n == 12
    assert V.correlation(x, y, "positive", method).outcome == FAILS
    ref = stats.pearsonr(x, y)[0] if method == "pearson" else stats.spearmanr(x, y)[0]
    assert v.estimate == pytest.approx(ref)


def test_correlation_of_noise_is_inconclusive():
    x, y = _line(0.0, 1.0)
    v = V.correlation(x, y, "negative")
    assert v.low < 0 < v.high
    assert v.outcome == INCONCLUSIVE and "spans 0" in v.sentence


def test_correlation_with_too_few_models_is_inconclusive():
    x, y = _line(-1.0, 0.0, n=4)  # a perfect line, but only 4 points
    v = V.correlation(x, y, "negative", min_n=5)
    assert v.outcome == INCONCLUSIVE and v.detail == "only 4 models"
    assert V.correlation(x, y, "negative", min_n=4).outcome == HOLDS


def test_correlation_of_constant_input_is_inconclusive_with_reason():
    v = V.correlation(np.full(8, 0.3), np.arange(8.0), "negative")
    assert v.outcome == INCONCLUSIVE and v.detail == "x is constant"
    assert math.isnan(v.estimate)
    assert V.correlation(np.arange(8.0), np.full(8, 0.1)).detail == "y is constant"


def test_correlation_bootstrap_is_deterministic_per_seed():
    x, y = _line(-0.5, 0.3)
    v1, v2 = V.correlation(x, y, seed=7), V.correlation(x, y, seed=7)
    assert (v1.low, v1.high) == (v2.low, v2.high)
    v3 = V.correlation(x, y, seed=8)
    assert (v3.low, v3.high) != (v1.low, v1.high)
    assert v3.estimate == v1.estimate  # the seed moves only the interval


def test_a_trend_carried_by_one_model_is_inconclusive():
    # r = -1 exactly, but only because one model differs: about a third of the resamples miss
    # it and are flat, far more than the 2.5% tail the interval's lower bound rests on
    x = np.r_[np.zeros(9), 1.0]
    v = V.correlation(x, -x, "negative")
    assert v.estimate == pytest.approx(-1.0)
    assert v.outcome == INCONCLUSIVE and "tied" in v.detail


# ---- the Verdict object and the words for prose ---------------------------------------------

def test_verdict_string_form():
    v = V.Verdict(HOLDS, 0.234, 0.120, 0.348, 3, "3 of 3 seeds", "holds: ...",
                  scale=100, unit="pp", digits=1)
    assert str(v) == "holds: 3 of 3 seeds; +23.4 pp, 95% CI +12.0 to +34.8"
    r = V.correlation(*_line(-1.0, 0.05))
    assert str(r).startswith("holds: 12 models; r = -")
    with pytest.raises(ValueError):
        V.Verdict("probably", 0.0, 0.0, 0.0, 3, "", "")


def test_paired_string_matches_its_numbers():
    a, b = [0.90, 0.85, 0.88], [0.70, 0.60, 0.65]
    v = V.paired(a, b, ">")
    s = S.spread(np.subtract(a, b))
    assert str(v) == (f"holds: 3 of 3 seeds agree; {100 * s.mean:+.1f} pp, "
                      f"95% CI {100 * s.low:+.1f} to {100 * s.high:+.1f}")


def test_clause_states_each_outcome_as_a_whole_clause_with_its_evidence():
    yes = V.paired([0.9, 0.8, 0.85], [0.5, 0.4, 0.45])
    no = V.paired([0.5, 0.4, 0.45], [0.9, 0.8, 0.85])
    unsure = V.paired([0.9], [0.5])
    words = ("Algorithm 7", "raises robust accuracy", "does not raise robust accuracy")
    assert wording.clause(yes, *words) == f"Algorithm 7 raises robust accuracy ({yes.evidence})"
    assert wording.clause(no, *words, evidence=False) == "Algorithm 7 does not raise robust accuracy"
    # inconclusive: a clause that reads whole, no verb phrase with "(inconclusive)" stuck in it
    said = wording.clause(unsure, *words)
    assert said == ("it is inconclusive whether Algorithm 7 raises robust accuracy "
                    "(one seed is an anecdote; +40.0 pp, no interval)")
    assert said.count("(") == said.count(")") == 1  # the evidence, with no parentheses nested in it
    # the evidence is str(v) without its outcome word, and without numbers when there is no estimate
    assert str(yes) == f"holds: {yes.evidence}" and yes.evidence.startswith("3 of 3 seeds agree; +")
    empty = V.threshold([], ">", 0.5, empty="no model beats chance")
    assert empty.evidence == "no model beats chance" and str(empty) == "inconclusive: no model beats chance"
    with pytest.raises(ValueError, match="negate"):
        wording.clause(yes, "compressed models", "are rougher", "are smoother")  # refused even when it holds
    with pytest.raises(ValueError, match="negate"):  # yes's own "not" does not count as the negation
        wording.clause(yes, "compression", "costs what retraining does not give back", "costs what retraining does not restore")
    assert wording.clause(no, "compression", "costs what retraining does not give back",
                    "does not cost what retraining does not give back", evidence=False).startswith("compression does not")
    with pytest.raises(ValueError, match="given"):
        wording.clause(yes, "", "raises", "does not raise")


def test_a_verdicts_text_never_nests_parentheses():
    """Chapters glue a verdict inside their own parentheses: its text has none of its own."""
    cases = [V.threshold([0.025] * 3, ">", 0.0, resolution=1 / 40), V.threshold([], ">", 0.5, empty="none left"),
             V.paired([0.9], [0.5]), V.paired([0.6, 0.7, 0.5], [0.5, 0.6, 0.7]),
             V.correlation([1, 2, 3], [3, 2, 1]), V.arithmetic(263.87, 263.9, 0.05, unit="MiB")]
    for v in cases:
        assert "(" not in str(v) and ")" not in str(v), str(v)
    with pytest.raises(ValueError, match="parentheses"):
        V.Verdict(HOLDS, 0.1, 0.0, 0.2, 3, "3 of 3 seeds (all)", "holds")


def test_seeded_correlation_needs_every_seed_to_agree():
    rng = np.random.default_rng(0)
    seeds = np.repeat([0, 1, 2], 8)
    x = rng.normal(size=24)
    y = -x + 0.1 * rng.normal(size=24)  # every seed strongly negative
    v = V.seeded_correlation(x, y, seeds, "negative")
    assert v.holds and "3 of 3 seeds" in v.detail
    assert V.seeded_correlation(x, -y, seeds, "negative").fails
    flipped = y.copy()
    flipped[seeds == 2] *= -1  # one seed's models point the other way
    mixed = V.seeded_correlation(x, flipped, seeds, "negative")
    assert mixed.inconclusive and "2 of 3 seeds" in mixed.detail
    single = V.seeded_correlation(x[:8], y[:8], seeds[:8], "negative")
    assert single.inconclusive  # one seed is an anecdote, however many models it has


def test_arithmetic_is_exact_within_its_tolerance():
    ok = V.arithmetic(263.87, 263.9, 0.05, unit="MiB")
    assert ok.holds and "within 0.05 MiB" in ok.detail and "263.87 against 263.90" in ok.sentence
    off = V.arithmetic(527.74, 534.3, 0.05, unit="MiB")
    assert off.fails and "off by more than" in off.detail
    with pytest.raises(ValueError):
        V.arithmetic(float("nan"), 1.0, 0.1)


def test_a_difference_within_one_measurement_step_is_inconclusive():
    # three seeds each one example apart on a 40-example sample: a zero-width interval, no evidence
    one = [0.025, 0.025, 0.025]
    assert V.threshold(one, ">", 0.0).holds  # without the guard the rule is fooled
    v = V.threshold(one, ">", 0.0, resolution=1 / 40)
    assert v.inconclusive and "one measurement step" in v.detail
    assert V.paired([0.5, 0.6, 0.7], [0.475, 0.575, 0.675], ">", resolution=1 / 40).inconclusive
    assert V.paired([0.6, 0.7, 0.8], [0.5, 0.6, 0.7], ">", resolution=1 / 40).holds  # four steps clear


def test_no_values_give_an_inconclusive_verdict_with_the_callers_reason():
    """A claim whose every seed was filtered out (chapter 03 with an untrained head: no
    compressed model beats chance) is not judged and does not stop the chapter: the verdict says
    why (the caller's reason, else a generic one) and its table cell reads n/a."""
    v = V.threshold([], "<=", 0.02, scale=100, unit="pp")
    assert v.inconclusive and v.n == 0 and "no seeds" in str(v)
    assert V.paired([], [], ">").inconclusive
    v = V.threshold([], ">", 0.5, scale=100, unit="%", empty="no compressed model beats chance")
    assert v.inconclusive and v.n == 0 and math.isnan(v.estimate)
    assert str(v) == "inconclusive: no compressed model beats chance"
    assert wording.clause(v, "compressed models", "are rougher", "are not rougher", evidence=False) == \
        "it is inconclusive whether compressed models are rougher"
    assert S.fmt([]) == "n/a" and S.fmt([], empty="none") == "none" and S.fmt([0.5]) == "50.0"


def test_a_share_near_100_or_0_keeps_its_interval_inside_0_and_1():
    near_top = S.spread([0.98, 1.0, 1.0, 0.97, 1.0], bounds=S.SHARE)
    near_zero = S.spread([0.0, 0.02, 0.0, 0.05, 0.0], bounds=S.SHARE)
    plain = S.spread([0.98, 1.0, 1.0, 0.97, 1.0])
    assert plain.high > 1.0  # the plain t-interval leaves the possible range ...
    assert near_top.high == 1.0 and near_top.low == plain.low  # ... the bounded one is cut at 1
    assert near_zero.low == 0.0 and 0 < near_zero.high < 1
    v = V.threshold([0.98, 1.0, 1.0, 0.97, 1.0], ">", 0.5, bounds=S.SHARE)
    assert v.holds and v.high == 1.0


def test_a_spread_near_zero_has_no_negative_interval_and_its_verdict_is_unchanged():
    values = [0.001, 0.0, 0.002, 0.0, 0.0005]
    v = V.threshold(values, "<=", 0.02, bounds=S.NONNEGATIVE)
    assert v.low == 0.0 and v.high > 0 and v.holds
    assert V.threshold(values, "<=", 0.02).outcome == v.outcome
    with pytest.raises(ValueError, match="possible range"):
        S.spread([-0.1, 0.2], bounds=S.NONNEGATIVE)


def test_twin_families_are_resampled_together_and_counted_once():
    # 6 families of two identical twins: 12 pairs, but only 6 independent models
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=6), 2)
    y = -x + np.repeat(rng.normal(scale=0.8, size=6), 2)
    fam = np.repeat(np.arange(6), 2)
    flat = V.correlation(x, y, "negative", min_n=5)
    grouped = V.correlation(x, y, "negative", min_n=5, groups=fam)
    assert flat.estimate == grouped.estimate  # the point estimate uses every model
    assert grouped.high - grouped.low > flat.high - flat.low  # twins no longer narrow the interval
    assert "6 families" in grouped.detail
    few = V.correlation(x[:8], y[:8], "negative", min_n=5, groups=fam[:8])
    assert few.inconclusive and "only 4 families" in few.detail  # 8 models, 4 independent
    with pytest.raises(ValueError, match="groups"):
        V.correlation(x, y, groups=fam[:3])
    # families named by tuples (seed, model), as chapter 06 names a model and its twin, are the
    # same families: a tuple label is one label, not one per field
    named = [(int(f) // 3, f"m{f}") for f in fam]
    assert V.correlation(x, y, "negative", min_n=5, groups=named) == grouped
