"""rclib.robust.strong: ART's attacks on an rclib model, per-example outcomes and their worst case."""

from __future__ import annotations

import pytest
import torch

from rclib.nn import train
from rclib.robust import attacks, strong

SMALL = dict(apgd_steps=10, targets=3, square_queries=50, batch_size=64)


@pytest.mark.parametrize("name", strong.ATTACKS)
def test_outcome_has_one_entry_per_example_and_accuracy_is_its_mean(trained_toy, name):
    model, s = trained_toy
    out = strong.evaluate(model, s.test, name, 0.1, **SMALL)
    n = len(s.test.dataset)
    assert out.attack == name and out.eps == 0.1
    assert out.correct.dtype == torch.bool and out.correct.shape == (n,)
    assert out.accuracy == int(out.correct.sum()) / n
    clean = attacks.robust_correct(model, s.test, attacks.fgsm, 0.0)
    assert bool((clean | ~out.correct).all())  # never correct where the clean model is wrong
    assert out.accuracy < clean.float().mean().item()  # the attack broke something at eps 0.1


@pytest.mark.parametrize("name", ["apgd-ce", "square"])
def test_eps_zero_gives_clean_accuracy(trained_toy, name):
    model, s = trained_toy
    assert strong.evaluate(model, s.test, name, 0.0, **SMALL).accuracy == train.evaluate(model, s.test)


@pytest.mark.parametrize("name", ["pgd", "apgd-t", "square"])
def test_examples_stay_in_the_ball_and_the_box(trained_toy, name):
    model, s = trained_toy
    x, y = next(iter(s.test))
    adv = strong.generate(model, (x, y), name, 0.1, **SMALL)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert (adv - x).abs().max().item() <= 0.1 + 1e-7
    assert adv.min() >= 0 and adv.max() <= 1


def test_the_model_is_left_as_found(trained_toy):
    model, s = trained_toy
    x, y = next(iter(s.test))
    first = next(model.parameters())
    first.grad = torch.ones_like(first)  # a caller's gradient must survive
    model.train()
    try:
        strong.evaluate(model, (x, y), "apgd-ce", 0.1, **SMALL)
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        assert torch.equal(first.grad, torch.ones_like(first))
        assert all(p.grad is None for p in model.parameters() if p is not first)
    finally:
        first.grad = None
        model.eval()


def test_seeded_runs_repeat(trained_toy):
    model, s = trained_toy
    a = strong.evaluate(model, s.test, "apgd-ce", 0.05, seed=3, **SMALL)
    b = strong.evaluate(model, s.test, "apgd-ce", 0.05, seed=3, **SMALL)
    assert torch.equal(a.correct, b.correct)


def test_loader_and_tensors_give_the_same_outcome(trained_toy):
    model, s = trained_toy
    x, y = map(torch.cat, zip(*s.test))
    a = strong.evaluate(model, s.test, "pgd", 0.1, restarts=0, pgd_steps=5)
    b = strong.evaluate(model, (x, y), "pgd", 0.1, restarts=0, pgd_steps=5)
    assert torch.equal(a.correct, b.correct)


def test_art_pgd_agrees_with_rclib_pgd_per_example(trained_toy):
    model, s = trained_toy
    ours = attacks.robust_correct(model, s.test, attacks.pgd, 0.1, alpha=0.02, steps=10, random_start=False)
    art = strong.evaluate(model, s.test, "pgd", 0.1, eps_step=0.02, pgd_steps=10, restarts=0)
    assert torch.equal(ours, art.correct)


def test_worst_case_is_the_elementwise_and(trained_toy):
    model, s = trained_toy
    a = strong.evaluate(model, s.test, "square", 0.1, **SMALL)
    b = attacks.robust_correct(model, s.test, attacks.fgsm, 0.1)
    both = strong.worst_case(a, b)
    assert torch.equal(both, a.correct & b)
    assert both.float().mean() <= min(a.accuracy, b.float().mean().item())
    m1 = torch.tensor([True, True, False, False])
    m2 = torch.tensor([True, False, True, False])
    assert strong.worst_case(m1, m2).tolist() == [True, False, False, False]
    assert torch.equal(strong.worst_case(m1), m1)
    with pytest.raises(ValueError, match="different numbers"):
        strong.worst_case(m1, torch.tensor([True]))


def test_unknown_attack_and_negative_eps_are_refused(trained_toy):
    model, s = trained_toy
    with pytest.raises(ValueError, match="apgd-ce"):
        strong.evaluate(model, s.test, "fab", 0.1)
    with pytest.raises(ValueError, match="eps"):
        strong.evaluate(model, s.test, "square", -0.1)
