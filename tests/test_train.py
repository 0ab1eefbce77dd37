"""rclib.nn.train: fit lowers the loss, is reproducible, keeps pruned weights at zero; evaluate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from rclib.core import config
from rclib.data import datasets
from rclib.nn import models, train
from rclib.nn.train import Optimiser


def _small(seed: int = 0, dropout: float = 0.5) -> nn.Module:
    cfg = config.load("smoke", width=8, hidden=32, seed=seed, dropout=dropout)
    return models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,))


@pytest.fixture
def loader():
    s = datasets.load(config.load("smoke", train_size=128, test_size=64, batch_size=32))
    return s.train


def test_fit_lowers_the_loss(loader):
    model = _small(dropout=0.0)
    hist = train.fit(model, loader, optimiser=Optimiser(lr=3e-3), epochs=6, progress=False)
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert all(set(h) == {"epoch", "loss", "accuracy"} for h in hist)
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"]


def test_zero_epochs_changes_nothing(loader):
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train.fit(model, loader, epochs=0, progress=False) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_same_seed_gives_bitwise_identical_runs(loader, optimizer):
    runs = []
    for _ in range(2):
        model = _small()
        hist = train.fit(model, loader, optimiser=Optimiser(optimizer, lr=1e-2), epochs=2, seed=5, progress=False)
        runs.append((model.state_dict(), hist))
    (sa, ha), (sb, hb) = runs
    assert ha == hb
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the seed matters: a different one shuffles (and drops out) differently
    model = _small()
    hc = train.fit(model, loader, optimiser=Optimiser(optimizer, lr=1e-2), epochs=2, seed=6, progress=False)
    assert hc != ha


def test_custom_loss_fn_is_used(loader):
    calls = []

    def loss_fn(model, x, y):
        calls.append(len(y))
        return nn.functional.cross_entropy(model(x), y)

    hist = train.fit(_small(), loader, epochs=1, loss_fn=loss_fn, progress=False)
    assert sum(calls) == 128 and "accuracy" not in hist[0]


@pytest.mark.parametrize("optimizer, weight_decay", [("sgd", 0.01), ("adam", 0.01), ("adam", 0.0), ("sgd", 0.0)])
def test_pruned_weights_stay_exactly_zero(loader, optimizer, weight_decay):
    model = _small()
    targets = [model.features[0], model.features[4], model.classifier[0], model.classifier[6]]
    for layer in targets:
        prune.l1_unstructured(layer, "weight", amount=0.5)
    masks = [layer.weight_mask.clone() for layer in targets]
    orig = [layer.weight_orig.detach().clone() for layer in targets]
    train.fit(model, loader, optimiser=Optimiser(optimizer, lr=1e-2, momentum=0.9, weight_decay=weight_decay), epochs=2, progress=False)
    for layer, mask, w0 in zip(targets, masks, orig):
        assert torch.equal(layer.weight_mask, mask)
        assert (layer.weight[mask == 0] == 0).all()
        assert int((layer.weight == 0).sum()) >= int((mask == 0).sum())
        assert not torch.equal(layer.weight_orig[mask == 1], w0[mask == 1])  # it did train
        if weight_decay == 0:
            # no gradient, momentum or Adam state reaches a pruned entry
            assert torch.equal(layer.weight_orig[mask == 0], w0[mask == 0])
    # after making the pruning permanent the zeros are still there
    for layer, mask in zip(targets, masks):
        prune.remove(layer, "weight")
        assert (layer.weight[mask == 0] == 0).all()


def test_mask_gradients_zeroes_masked_entries():
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    layer.weight_orig.grad = torch.ones_like(layer.weight_orig)
    train.mask_gradients(layer)
    assert torch.equal(layer.weight_orig.grad, layer.weight_mask)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        train.Optimiser("rmsprop", 0.1)


@pytest.mark.parametrize("mode", [True, False])
def test_fit_restores_mode(loader, mode):
    model = _small()
    model.train(mode)
    train.fit(model, loader, epochs=1, progress=False)
    assert model.training is mode


@pytest.mark.parametrize("mode", [True, False])
def test_evaluate_accuracy_and_mode(tiny_cfg, mode):
    s = datasets.load(tiny_cfg)
    model = _small()
    train.fit(model, s.train, optimiser=Optimiser(lr=3e-3), epochs=2, progress=False)
    model.train(mode)
    acc = train.evaluate(model, s.test)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert model.training is mode
    assert all(m.training is mode for m in model.modules())
    # the same number by hand, in eval mode
    x, y = datasets.as_tensors(s.test.dataset)
    model.eval()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(expected, abs=1e-9)
    # predict agrees and also restores the mode
    model.train(mode)
    assert torch.equal(train.predict(model, x, batch_size=16).argmax(1), model.eval()(x).argmax(1))


def test_evaluate_on_a_known_model():
    # a linear model that always says class 2: accuracy is the share of 2s
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    y = torch.tensor([2, 2, 0, 1, 2])
    loader = DataLoader(TensorDataset(torch.zeros(5, 4), y), batch_size=2)
    assert train.evaluate(lin, loader) == pytest.approx(3 / 5)


def test_divergence_stops_training_and_names_the_learning_rate(loader):
    model = _small()
    with pytest.raises(train.Diverged, match=r"lr=1e\+30") as err:
        train.fit(model, loader, optimiser=Optimiser("sgd", lr=1e30), epochs=3, progress=False)
    assert "epoch 1" in str(err.value)
    with pytest.raises(train.Diverged, match="retrain_lr=1e"):
        train.fit(_small(), loader, optimiser=Optimiser("sgd", lr=1e30), epochs=1, progress=False, blame="retrain_lr=1e+30")


def test_diverged_baseline_writes_no_artifact(tmp_path, monkeypatch):
    from rclib.core import artifacts
    from rclib.experiments import steps

    cfg = config.load("smoke", train_size=128, test_size=64, epochs=2, lr=1e30, optimizer="sgd")
    splits = datasets.load(cfg)
    with pytest.raises(ValueError, match=r"lr=1e\+30"):
        steps.baseline(cfg, splits, progress=False)
    # nothing but the digits arrays that datasets.load keeps (datasets.DIGITS_FOLDER): no baseline entry
    results = [f for f in artifacts.root().rglob("*.json") if f.relative_to(artifacts.root()).parts[0] != datasets.DIGITS_FOLDER]
    assert not results, results


def test_batchnorm_recalibration_does_not_depend_on_the_loaders_state(loader):
    """Chapter 01's recalibrated accuracy once differed between a cold and a warm cache: the
    pass drew batches from a shared loader whose shuffling state depended on what ran before."""
    import copy

    base = _small()
    fresh, used = copy.deepcopy(base), copy.deepcopy(base)
    train.recalibrate_batchnorm(fresh, loader, seed=5)
    for _ in loader:  # another step advances the shared generator
        pass
    train.recalibrate_batchnorm(used, loader, seed=5)
    for a, b in zip(fresh.buffers(), used.buffers()):
        assert torch.equal(a, b)
    other = copy.deepcopy(base)
    train.recalibrate_batchnorm(other, loader, seed=6)  # another seed, other batches
    assert any(not torch.equal(a, b) for a, b in zip(fresh.buffers(), other.buffers()) if a.dtype.is_floating_point)
