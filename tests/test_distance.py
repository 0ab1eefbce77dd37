"""Chapter 06's distances to the boundary, on linear models whose L-infinity distance is known in
closed form: for logits z = W x + b and label y, d(x) = min_j (z_y - z_j) / ||w_y - w_j||_1 (the
pixel box does not bind: inputs sit near 0.5 and distances stay below 0.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rclib.robust import attacks, distance


def linear(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))
    with torch.no_grad():  # centred on mid-grey: z = W (x - 0.5), so distances stay small
        m[1].weight.mul_(4)
        m[1].bias.copy_(-0.5 * m[1].weight.sum(1))
    return m.eval()


def inputs(model: nn.Module, n: int = 40, seed: int = 1):
    """Inputs near mid-grey, labelled with the model's own prediction (so all are correct), and
    their exact L-infinity distances."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.4 * (torch.rand(n, 1, 4, 4, generator=g) - 0.5)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w = model[1].weight.detach()
    wy = w[y]  # (n, 16)
    gaps = (z.gather(1, y[:, None]) - z)  # (n, K), z_y - z_j
    norms = (wy[:, None, :] - w[None]).abs().sum(2)  # ||w_y - w_j||_1
    exact = torch.where(gaps > 0, gaps / norms, torch.tensor(torch.inf)).amin(1)
    assert float(exact.max()) < 0.3  # the box [0, 1] never binds
    return x, y, exact


def test_bisection_brackets_the_exact_distance_of_a_binary_linear_model():
    # two classes: the sign of the cross-entropy gradient is the optimal L-inf direction, so PGD
    # flips exactly above the distance and the bracket closes on it
    model = linear(2)
    x, y, exact = inputs(model)
    low, high = distance.bisection_linf(model, x, y, steps=10)
    step = distance.EPS_MAX / 2**10
    assert torch.all(high >= exact - 1e-6)  # no attack beats the true distance
    assert torch.all(high <= exact + step + 1e-6) and torch.all(low <= exact + 1e-6)
    assert torch.all(high - low <= step + 1e-7)


def test_deepfool_matches_its_closed_form_on_a_binary_linear_model():
    # DeepFool's L2 step to a linear boundary is m (w_j - w_y) / ||w_j - w_y||_2^2, then x 1.02:
    # its L-inf norm is 1.02 m ||w_j - w_y||_inf / ||w_j - w_y||_2^2, at least the L-inf distance
    model = linear(2)
    x, y, exact = inputs(model)
    w = model[1].weight.detach()
    diff = w[1 - y] - w[y]
    with torch.no_grad():
        z = model(x)
    m = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)
    closed = 1.02 * m * diff.abs().amax(1) / diff.pow(2).sum(1)
    got = distance.deepfool_linf(model, x, y)
    assert torch.allclose(got, closed, rtol=1e-3, atol=1e-5)
    assert torch.all(got >= exact - 1e-6)


def test_every_bound_is_at_least_the_exact_distance_with_several_classes():
    model = linear(5, seed=3)
    x, y, exact = inputs(model, seed=4)
    d = distance.distances(model, x, y, seed=0)
    for key in ("deepfool", "high", "distance"):
        assert torch.all(d[key] >= exact - 1e-6), key
    assert torch.equal(d["distance"], torch.minimum(d["deepfool"], d["high"]))
    assert torch.all(d["margin"] > 0)
    # the margin is the numerator of the exact distance: ranks agree closely on a linear model
    assert torch.all(d["low"] <= d["high"])


def test_wrong_inputs_are_at_distance_zero_and_unbreakable_ones_at_infinity():
    model = linear(3)
    x, y, _ = inputs(model, n=12)
    wrong = (y + 1) % 3
    d = distance.distances(model, x, wrong)
    assert torch.all(d["distance"] == 0) and torch.all(d["high"] == 0) and torch.all(d["deepfool"] == 0)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():  # ignores its input: no perturbation changes its decision
        flat[1].weight.zero_()
        flat[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    label = torch.zeros(12, dtype=torch.long)
    low, high = distance.bisection_linf(flat, x, label, steps=3)
    assert torch.all(high == torch.inf) and torch.all(low == distance.EPS_MAX)
    assert torch.all(distance.deepfool_linf(flat, x, label, max_iter=3) == torch.inf)
    assert distance.accuracy_curve(high, [0.0, 0.5, 1.0]) == [1.0, 1.0, 1.0]


def test_accuracy_curve_and_median():
    d = torch.tensor([0.0, 0.05, 0.2, float("inf")])
    assert distance.accuracy_curve(d, [0, 0.1, 0.2]) == [0.75, 0.5, 0.25]
    assert distance.median(torch.tensor([0.1, 0.3, float("inf")])) == pytest.approx(0.3)


def test_pgd_with_one_radius_per_example_stays_in_each_ball():
    model = linear(3)
    x, y, _ = inputs(model, n=6)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    adv = attacks.pgd(model, x, y, eps, steps=5, restarts=2, generator=torch.Generator().manual_seed(0))
    assert torch.all((adv - x).flatten(1).abs().amax(1) <= eps + 1e-7)
    # one radius for all equals the scalar call's ball (the draws differ in rounding only)
    same = attacks.pgd(model, x, y, torch.full((6,), 0.05), steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.all((same - x).abs() <= 0.05 + 1e-7)
    with pytest.raises(ValueError, match="one finite radius >= 0 per example"):
        attacks.pgd(model, x, y, torch.tensor([0.1, -0.1, 0, 0, 0, 0]))


def test_distance_table_caches_every_model_and_stores_finite_tensors():
    from rclib.core import config
    from rclib.data import datasets
    from rclib.experiments import distance_study, steps
    from rclib.nn import train

    cfg = config.load("smoke", epsilon=0.1, train_size=64, test_size=32, epochs=1, width=4, hidden=16,
                      attack_sample=8, batch_size=16, eval_batch_size=16)
    splits = datasets.load(cfg)
    base = steps.new_model(cfg, splits)
    train.fit(base, splits.train, 2, progress=False)
    base.eval()
    rows, per_input, hit = distance_study.distance_table(cfg, splits, base, 0.5, progress=False)
    assert not hit and [r["variant"] for r in rows] == [v.label for v in distance_study.VARIANTS]
    assert per_input["subset"].shape == (8,)
    for v in distance_study.VARIANTS:
        d = {k: per_input[f"{v}|{k}"] for k in distance_study.PER_INPUT}
        assert all(t.shape == (8,) and bool(torch.isfinite(t).all()) for t in d.values())
        assert torch.equal(d["distance"], torch.minimum(d["deepfool"], d["high"]))
        assert bool((d["distance"] <= distance_study.UNFLIPPED).all()) and bool((d["low"] <= d["high"]).all())
        assert torch.equal(d["distance"] > 0, d["margin"] > 0)  # wrong inputs at 0, right ones above
    again, per_input2, hit2 = distance_study.distance_table(cfg, splits, base, 0.5, progress=False)
    assert hit2 and again == rows and all(torch.equal(per_input[k], per_input2[k]) for k in per_input)


def test_summary_counts_and_bracket_agreement_on_known_numbers():
    from rclib.experiments import distance_study

    d = dict(distance=torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0]), margin=torch.tensor([-1.0, 1.0, 2.0, 3.0, 9.0]),
             deepfool=torch.tensor([0.0, 0.2, 0.21, 0.3, 1.0]), high=torch.tensor([0.0, 0.1, 0.2, 0.35, 1.0]),
             low=torch.tensor([0.0, 0.09, 0.19, 0.34, 0.5]))
    s = distance_study.summarise(d, base_correct=torch.tensor([True, True, False, True, True]))
    assert s["clean_accuracy"] == 0.8 and s["median"] == pytest.approx(0.2)
    assert s["median_both"] == pytest.approx(0.3)  # over {0.1, 0.3, 1.0}
    assert s["rho"] == pytest.approx(1.0) and s["n_rho"] == 3  # margin and distance rank alike
    assert s["loose"] == pytest.approx(1 / 3)  # 0.2 > 1.1 x 0.1 only
    # at eps 0.15: low >= 0.15 for 3 inputs (0.19, 0.34, 0.5) and high > 0.15 for the same 3
    assert distance_study.bracket(d, 0.15) == (0.6, 0.6)
    assert distance_study.bracket(d, 0.3) == (pytest.approx(0.4), pytest.approx(0.4))
    assert distance_study.bracket(d, 0.1) == (pytest.approx(0.6), pytest.approx(0.6))
    low = distance_study.summarise(d, torch.ones(5, dtype=torch.bool), [0.05, 0.15])["bracket_low_accuracy"]
    assert low == [pytest.approx(0.8), pytest.approx(0.6)]
