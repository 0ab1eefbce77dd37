"""rclib.robust.attacks: FGSM against an analytic reference, PGD against ART's, their contract, and robust
accuracy (overall and per example)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rclib.nn import train
from rclib.robust import attacks


def _linear_softmax(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # pixels on the bounds
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _reference_fgsm(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM with the input gradient of the mean cross-entropy worked out by hand:
    for z = W x + b, d/dx mean_b CE(z_b, y_b) = W^T (softmax(z) - onehot(y)) / B."""
    lin = model[1]
    W, b = lin.weight.detach(), lin.bias.detach()
    flat = x.reshape(len(x), -1)
    z = flat @ W.T + b
    p = torch.softmax(z, dim=1)
    onehot = torch.nn.functional.one_hot(y, 10).to(p.dtype)
    grad = ((p - onehot) @ W / len(x)).reshape(x.shape)
    return (x + eps * grad.sign()).clamp(0, 1)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3])
def test_fgsm_matches_analytic_reference(eps):
    model = _linear_softmax()
    x, y = _batch()
    ref = _reference_fgsm(model, x, y, eps)
    out = attacks.fgsm(model, x, y, eps)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)


def test_input_gradient_matches_analytic_gradient():
    model = _linear_softmax(1)
    x, y = _batch(8, seed=1)
    W, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.reshape(8, -1) @ W.T + b, dim=1)
    expected = ((p - torch.nn.functional.one_hot(y, 10).double()) @ W / 8).reshape(x.shape)
    assert torch.allclose(attacks.input_gradient(model, x, y), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_fgsm_stays_in_the_ball_and_the_box(tiny_model, eps):
    x = torch.rand(6, 1, 8, 8)
    y = torch.arange(6)
    out = attacks.fgsm(tiny_model, x, y, eps)
    assert (out - x).abs().max() <= eps + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert not out.requires_grad


def test_fgsm_eps_zero_returns_x(tiny_model):
    x = torch.rand(3, 1, 8, 8)
    out = attacks.fgsm(tiny_model, x, torch.tensor([0, 1, 2]), 0.0)
    assert torch.equal(out, x) and out is not x


def test_fgsm_negative_eps_is_refused(tiny_model):
    with pytest.raises(ValueError, match="eps"):
        attacks.fgsm(tiny_model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), -0.1)


def test_fgsm_restores_train_mode_and_leaves_no_parameter_grads(tiny_model):
    tiny_model.train()
    running = tiny_model.features[1].running_mean.clone()
    attacks.fgsm(tiny_model, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), 0.1)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    assert all(p.grad is None for p in tiny_model.parameters())
    # eval mode during the attack: BatchNorm's running statistics were not updated
    assert torch.equal(tiny_model.features[1].running_mean, running)


def test_fgsm_restores_eval_mode(tiny_model):
    tiny_model.eval()
    attacks.fgsm(tiny_model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)
    assert not tiny_model.training


def test_fgsm_gradient_is_taken_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.9), nn.Linear(64, 10))
    model.train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    first = attacks.fgsm(model, x, y, 0.1)
    for _ in range(3):
        assert torch.equal(attacks.fgsm(model, x, y, 0.1), first)  # dropout was off
    model.eval()
    assert torch.equal(attacks.fgsm(model, x, y, 0.1), first)
    assert model.training is False


def test_robust_accuracy_at_zero_is_clean_accuracy(trained_toy):
    model, s = trained_toy
    model.train()
    clean = train.evaluate(model, s.test)
    assert attacks.robust_accuracy(model, s.test, attacks.fgsm, 0.0) == clean
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())


def test_robust_accuracy_falls_with_eps(trained_toy):
    model, s = trained_toy
    model.eval()
    curve = attacks.robust_curve(model, s.test, [0.0, 0.1, 0.3])
    assert all(0.0 <= a <= 1.0 for a in curve)
    assert curve[0] > 0.3  # the model did learn something, so the drop below is meaningful
    assert curve[2] < curve[0]
    assert curve[1] <= curve[0]


def test_robust_accuracy_counts_every_example():
    # an attack that returns x unchanged gives clean accuracy; one that maps every input to a
    # black image gives the share of labels equal to the model's prediction for black
    model = _linear_softmax()
    x, y = _batch(10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    clean = train.evaluate(model, loader)
    assert attacks.robust_accuracy(model, loader, lambda m, a, b, e: a, 0.5) == clean
    with torch.no_grad():
        black = model(torch.zeros(1, 1, 8, 8, dtype=torch.float64)).argmax(1).item()
    expected = (y == black).double().mean().item()
    got = attacks.robust_accuracy(model, loader, lambda m, a, b, e: torch.zeros_like(a), 0.1)
    assert got == pytest.approx(expected)


# --- PGD -------------------------------------------------------------------------------------


def _art_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
             steps: int) -> torch.Tensor:
    """ART's ProjectedGradientDescent (norm inf, no random start) on every example, the same model."""
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent

    from rclib.robust import strong

    model.eval()
    est = strong.classifier(model, tuple(x.shape[1:]), 10)
    attack = ProjectedGradientDescent(est, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                      num_random_init=0, batch_size=len(x), verbose=False)
    try:
        return torch.from_numpy(attack.generate(x.numpy(), y.numpy()))
    finally:
        model.zero_grad(set_to_none=True)  # ART's loss.backward() fills them; rclib.robust.strong avoids that


@pytest.mark.parametrize("eps,alpha,steps", [(0.05, 0.01, 10), (0.2, 0.05, 7), (0.3, 0.5, 3)])
def test_pgd_without_random_start_matches_art(trained_toy, eps, alpha, steps):
    model, s = trained_toy
    x, y = next(iter(s.test))
    ours = attacks.pgd(model, x, y, eps, alpha=alpha, steps=steps, random_start=False)
    assert all(p.grad is None for p in model.parameters())
    ref = _art_pgd(model, x, y, eps, alpha, steps)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert (ours - x).abs().max().item() == pytest.approx(eps, abs=1e-6)  # it did move, to the ball's edge


def test_pgd_without_random_start_matches_art_on_an_untrained_model():
    from toys import tiny_vgg

    model = tiny_vgg(3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    ours = attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=10, random_start=False)
    assert (ours - _art_pgd(model, x, y, 0.1, 0.02, 10)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("eps,restarts", [(0.03, 1), (0.1, 3), (0.5, 2)])
def test_pgd_stays_in_the_ball_and_the_box(tiny_model, eps, restarts):
    x = torch.rand(6, 1, 8, 8)
    x[0] = 0.0
    x[1] = 1.0  # on the bounds: the box must win over the ball
    out = attacks.pgd(tiny_model, x, torch.arange(6), eps, alpha=eps / 3, steps=5, restarts=restarts)
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    assert (out - x).abs().max().item() <= eps + 1e-7
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_pgd_default_step_and_eps_zero(tiny_model):
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    assert torch.equal(attacks.pgd(tiny_model, x, y, 0.0), x)
    out = attacks.pgd(tiny_model, x, y, 0.1, steps=4, random_start=False)
    # default alpha = 2.5 eps / steps: four steps can reach the edge of the ball
    assert (out - x).abs().max().item() == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd(tiny_model, x, y, -0.1)
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd(tiny_model, x, y, 0.1, steps=0)


@pytest.mark.parametrize("mode", [True, False])
def test_pgd_restores_mode_and_leaves_no_parameter_grads(tiny_model, mode):
    tiny_model.train(mode)
    running = tiny_model.features[1].running_mean.clone()
    attacks.pgd(tiny_model, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), 0.1, steps=3, restarts=2)
    assert tiny_model.training is mode and all(m.training is mode for m in tiny_model.modules())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert torch.equal(tiny_model.features[1].running_mean, running)  # eval mode inside


def test_pgd_restarts_are_never_worse_per_example(trained_toy):
    import copy

    # float64, so that a batch of 4x the size cannot flip a gradient sign through rounding
    model = copy.deepcopy(trained_toy[0]).double().eval()
    x, y = next(iter(trained_toy[1].test))
    x = x.double()
    one = attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=5, generator=torch.Generator().manual_seed(7))
    four = attacks.pgd(model, x, y, 0.1, alpha=0.02, steps=5, restarts=4,
                       generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        l1, l4 = model(one), model(four)
    wrong1, wrong4 = l1.argmax(1) != y, l4.argmax(1) != y
    assert bool((wrong4 | ~wrong1).all())  # fooled by one restart => fooled by four
    ce = torch.nn.functional.cross_entropy
    both_right = ~wrong1 & ~wrong4
    assert bool((ce(l4, y, reduction="none") >= ce(l1, y, reduction="none") - 1e-9)[both_right].all())
    assert wrong4.sum() >= wrong1.sum()


def test_pgd_is_at_least_as_strong_as_fgsm(trained_toy):
    model, s = trained_toy
    for eps in (0.05, 0.1, 0.2):
        f = attacks.robust_accuracy(model, s.test, attacks.fgsm, eps)
        p = attacks.robust_accuracy(model, s.test, attacks.pgd, eps, steps=10, restarts=2)
        assert p <= f, (eps, p, f)
    assert attacks.robust_accuracy(model, s.test, attacks.pgd, 0.5, steps=20) == 0.0  # no masking


def test_robust_correct_is_per_example_and_passes_keywords(trained_toy):
    import functools

    model, s = trained_toy
    kw = dict(alpha=0.02, steps=5, random_start=False)
    mask = attacks.robust_correct(model, s.test, attacks.pgd, 0.1, **kw)
    n = len(s.test.dataset)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert attacks.robust_accuracy(model, s.test, attacks.pgd, 0.1, **kw) == int(mask.sum()) / n
    assert torch.equal(attacks.robust_correct(model, s.test, functools.partial(attacks.pgd, **kw), 0.1), mask)
    # clean-correct is an upper bound per example: an attack never repairs a mistake here
    clean = attacks.robust_correct(model, s.test, attacks.fgsm, 0.0)
    assert bool((clean | ~mask).all())
    assert attacks.robust_curve(model, s.test, [0.0, 0.1], attacks.pgd, **kw)[1] == int(mask.sum()) / n


def test_transfer_crafts_on_the_source_and_evaluates_the_target(trained_toy):
    from toys import tiny_vgg

    model, s = trained_toy
    kw = dict(alpha=0.02, steps=5, random_start=False)
    direct = attacks.robust_correct(model, s.test, attacks.pgd, 0.1, **kw)
    x, y = next(iter(s.test))
    crafted = attacks.transfer(model, attacks.pgd, **kw)(tiny_vgg(5), x, y, 0.1)  # the target is ignored
    assert torch.equal(crafted, attacks.pgd(model, x, y, 0.1, **kw))
    # crafted on the model itself, a transfer attack is the white-box attack
    assert torch.equal(attacks.robust_correct(model, s.test, attacks.transfer(model, attacks.pgd, **kw), 0.1), direct)
    # crafted on an untrained surrogate, it is weaker than white-box on this model
    weak = attacks.robust_correct(model, s.test, attacks.transfer(tiny_vgg(5), attacks.pgd, **kw), 0.1)
    assert weak.sum() >= direct.sum()
    assert all(p.grad is None for p in model.parameters())
