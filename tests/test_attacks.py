"""rclib.attacks: FGSM against an analytic reference, its contract, and robust accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rclib import attacks, config, data, models, train


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


@pytest.fixture(scope="module")
def trained():
    """A tiny VGG trained for a few seconds on 256 digits (about 50% test accuracy)."""
    s = data.load(config.load("smoke", train_size=256, test_size=64, batch_size=32))
    cfg = config.load("smoke", width=8, hidden=32, dropout=0.0)
    model = models.build(cfg, 10, s.input_shape, s.mean, s.std)
    train.fit(model, s.train, epochs=10, lr=3e-3, progress=False)
    model.zero_grad(set_to_none=True)  # fit leaves the last step's gradients behind
    return model, s


def test_robust_accuracy_at_zero_is_clean_accuracy(trained):
    model, s = trained
    model.train()
    clean = train.evaluate(model, s.test)
    assert attacks.robust_accuracy(model, s.test, attacks.fgsm, 0.0) == clean
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())


def test_robust_accuracy_falls_with_eps(trained):
    model, s = trained
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
