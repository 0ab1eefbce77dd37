"""rclib.experiments.operating: the paper's operating point found on synthetic robust-accuracy curves."""

from __future__ import annotations

import numpy as np
import pytest

from rclib.core import config
from rclib.experiments import operating, setup


def _linear(slopes, clean=1.0):
    """Per-seed curves clean - slope * eps, clipped to [0, 1]: rows seeds, columns epsilons."""
    return lambda eps: np.clip(clean - np.outer(slopes, eps), 0.0, 1.0)


def test_matches_the_mean_curve_within_its_tolerance():
    eps, per_seed, grid = operating.match_epsilon(_linear([3.5, 4.0, 4.5]))
    # no seed is clipped before it: the mean curve is 1 - 4 * eps, 12 % at eps 0.22
    assert eps == pytest.approx(0.22, abs=0.002)
    assert abs(per_seed.mean() - operating.TARGET) <= operating.TOLERANCE
    assert len(per_seed) == 3 and all(0 <= m <= 1 for _, m in grid)
    assert eps == round(eps, 4)  # the printed value is the measured one


def test_a_curve_that_never_reaches_the_target_is_refused_with_what_was_measured():
    flat = _linear([0.5, 0.6])  # lowest mean: 1 - 0.55 * 0.5 = 72.5 % at eps 0.5
    with pytest.raises(ValueError, match=r"never falls to the paper's 12.0 %.*72.5 % at epsilon 0.5.*Set `epsilon` to a number"):
        operating.match_epsilon(flat)


def test_baselines_already_at_the_target_without_an_attack_are_refused():
    with pytest.raises(ValueError, match=r"clean accuracy \(10.0 % on average\) is already"):
        operating.match_epsilon(_linear([1.0], clean=0.10))


def test_a_curve_that_jumps_across_the_band_is_refused():
    step = lambda eps: np.where(np.asarray(eps)[None, :] < 0.2, 0.9, 0.0)  # 90 % then 0 %: nothing near 12 %
    with pytest.raises(ValueError, match="jumps across"):
        operating.match_epsilon(step)


def test_a_fixed_epsilon_measures_nothing_and_apply_sets_both_epsilons():
    cfg = config.load("smoke", epsilon=0.05)
    point = operating.fixed(cfg)
    assert (point.epsilon, point.matched, point.per_seed) == (0.05, False, ())
    assert point.apply(cfg).adv_epsilon == 0.05  # adv_epsilon follows epsilon by default, as in the paper
    own = config.load("smoke", epsilon=0.05, adv_epsilon=0.3)
    assert point.apply(own).adv_epsilon == 0.3
    matched = operating.OperatingPoint(epsilon=0.2, matched=True, seeds=(0, 1), per_seed=(0.11, 0.125))
    assert matched.within and matched.apply(config.load("smoke")).epsilon == 0.2
    assert "keep 11.8" in operating.describe(matched)
    with pytest.raises(ValueError, match="match"):
        operating.fixed(setup.load("smoke"))


def test_epsilon_takes_match_or_a_number_and_nothing_else():
    assert config.load("cpu").epsilon == "match" and config.PROFILES["paper"]["epsilon"] == 0.03
    assert config.load("smoke", epsilon="0.2").epsilon == 0.2
    assert config.load("smoke", epsilon="MATCH").epsilon == "match"
    for bad in ("matched", -0.1, True):
        with pytest.raises(ValueError, match="epsilon="):
            setup.load("smoke", epsilon=bad)
    with pytest.raises(ValueError, match="adv_epsilon="):
        setup.load("smoke", adv_epsilon="match")


def test_the_fgsm_curve_equals_robust_accuracy_at_every_epsilon(tiny_cfg):
    from rclib.data import datasets
    from rclib.experiments import steps
    from rclib.robust import attacks

    splits = datasets.load(tiny_cfg)
    model, _, _ = steps.baseline(tiny_cfg, splits, "cpu", progress=False)
    grid = [0.0, 0.05, 0.1, 0.3]
    assert attacks.fgsm_curve(model, splits.test, grid) == attacks.robust_curve(model, splits.test, grid)
