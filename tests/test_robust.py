"""rclib.robust.margin: the margin loss of Eq 9 by hand, Alg 7's 2B batch, masks, a descent step, validation."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset
from toys import tiny_vgg  # noqa: E402

from rclib.nn.models import prunable_layers
from rclib.nn.train import APPENDIX_C
from rclib.robust.attacks import fgsm
from rclib.robust.margin import Objective, adversarial_margin_loss, adversarial_retrain, margin_loss

torch.set_num_threads(1)

def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def loader(n: int = 32, batch_size: int = 16) -> DataLoader:
    x, y = data(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


# ---- Eq 9 by hand ----------------------------------------------------------------------------

def test_margin_loss_on_logits_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0],    # gap 2 - 1 = 1: exactly the margin -> 0
                      [0.0, 3.0, 1.0],    # gap 0 - 3 = -3 -> 1 + 3 = 4
                      [5.0, 0.5, 1.0],    # gap 5 - 1 = 4 > margin -> 0
                      [1.0, 0.5, 1.2]])   # y = 2: gap 1.2 - 1 = 0.2 -> 0.8
    y = torch.tensor([0, 0, 0, 2])
    assert margin_loss(z, y).item() == pytest.approx((0 + 4 + 0 + 0.8) / 4)
    assert margin_loss(z[2:3], y[2:3]).item() == 0.0          # true class far ahead: zero
    assert margin_loss(z[:1], y[:1], margin=2.0).item() == pytest.approx(1.0)
    assert margin_loss(z, y, margin=0.0).item() == pytest.approx(3 / 4)  # only the wrong one


def test_margin_loss_on_probs_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]])
    z = p.log()  # softmax(log p) = p exactly (rows sum to 1)
    y = torch.tensor([0, 0])
    # gaps: 0.7 - 0.2 = 0.5 -> 0.5 ; 0.25 - 0.5 = -0.25 -> 1.25
    assert margin_loss(z, y, on="probs").item() == pytest.approx((0.5 + 1.25) / 2, abs=1e-6)
    assert margin_loss(z[:1], y[:1], margin=0.2, on="probs").item() == 0.0  # ahead by 0.5 > 0.2
    # the two readings differ: the same logits on the logit scale
    assert margin_loss(z[:1], y[:1]).item() == pytest.approx(max(0.0, 1 - math.log(0.7 / 0.2)), abs=1e-6)


def test_margin_loss_gradient_hits_true_and_runner_up_only():
    z = torch.tensor([[0.0, 3.0, 1.0]], requires_grad=True)
    margin_loss(z, torch.tensor([0])).backward()
    assert z.grad.tolist() == [[-1.0, 1.0, 0.0]]


def test_margin_loss_validates():
    z, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="on="):
        margin_loss(z, y, on="softmax")
    with pytest.raises(ValueError, match="margin="):
        margin_loss(z, y, margin=-1.0)
    with pytest.raises(ValueError, match="logits"):
        margin_loss(torch.zeros(2, 1), y)


# ---- Alg 7's per-batch loss ------------------------------------------------------------------

def test_alg7_loss_is_ce_plus_margin_on_the_2b_concatenation():
    model = tiny_vgg().train()
    reference = copy.deepcopy(model)  # before any forward: BatchNorm statistics identical
    x, y = data(8)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, inp: sizes.append((len(inp[0]), m.training)))
    loss = adversarial_margin_loss(model, x, y, Objective(eps=0.1, margin_weight=0.5))
    hook.remove()
    # one eval-mode forward of B for FGSM, then one train-mode forward of 2B
    assert sizes == [(8, False), (16, True)]
    assert model.training
    x_adv = fgsm(reference, x, y, 0.1)
    z = reference(torch.cat([x, x_adv]))
    yy = torch.cat([y, y])
    manual = F.cross_entropy(z, yy) + 0.5 * margin_loss(z, yy)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_alg7_loss_with_eps_zero_is_clean_plus_margin():
    model = tiny_vgg().eval()
    x, y = data(8)
    z = model(x)
    expected = F.cross_entropy(z, y) + 0.1 * margin_loss(z, y, on="probs")
    got = adversarial_margin_loss(model, x, y, Objective(eps=0.0, margin_weight=0.1, on="probs"))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not model.training


# ---- Alg 7: retraining -----------------------------------------------------------------------

def test_pruned_weights_stay_zero_through_adversarial_retrain():
    model = tiny_vgg()
    for _, layer in prunable_layers(model):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    masks = {name: layer.weight_mask.clone() for name, layer in prunable_layers(model)}
    start = {name: layer.weight.detach().clone() for name, layer in prunable_layers(model)}
    history = adversarial_retrain(model, loader(), objective=Objective(eps=0.1, margin_weight=0.1), optimiser=replace(APPENDIX_C, lr=0.05), epochs=2, progress=False)
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(math.isfinite(row[k]) for row in history for k in ("loss", "ce", "mm"))
    for name, layer in prunable_layers(model):
        w, kept = layer.weight.detach(), masks[name] == 1
        assert torch.equal(layer.weight_mask, masks[name])
        assert (w[~kept] == 0).all(), name
        assert not torch.equal(w[kept], start[name][kept]), name  # the kept weights did train
    for _, layer in prunable_layers(model):
        prune.remove(layer, "weight")
    assert all((layer.weight[masks[name] == 0] == 0).all() for name, layer in prunable_layers(model))


def test_one_alg7_step_lowers_the_combined_loss_on_its_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = data(16)
    one_batch = DataLoader(TensorDataset(x, y), batch_size=16)

    def combined() -> float:  # regenerates FGSM from the current model, as Alg 7 does
        return adversarial_margin_loss(model, x, y, Objective(eps=0.1, margin_weight=0.5)).item()

    before = combined()
    history = adversarial_retrain(model, one_batch, objective=Objective(eps=0.1, margin_weight=0.5), optimiser=replace(APPENDIX_C, lr=0.01, momentum=0.0, weight_decay=0.0), epochs=1, progress=False)
    after = combined()
    assert history[0]["loss"] == pytest.approx(before, rel=1e-5)  # fit saw the same loss
    assert after < before


def test_margin_weight_zero_is_plain_fgsm_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = data(16)
    h = adversarial_retrain(model, DataLoader(TensorDataset(x, y), batch_size=16), objective=Objective(eps=0.1, margin_weight=0.0), optimiser=replace(APPENDIX_C, lr=0.01), progress=False)
    assert h[0]["loss"] == pytest.approx(h[0]["ce"], rel=1e-6)
    assert h[0]["mm"] > 0


@pytest.mark.parametrize("mode", [True, False])
def test_retrain_restores_the_callers_mode(mode):
    model = tiny_vgg().train(mode)
    adversarial_retrain(model, loader(16), objective=Objective(eps=0.05, margin_weight=0.1), progress=False)
    assert model.training is mode
    assert all(m.training is mode for m in model.modules())


@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(margin_weight=-1.0), "margin_weight"),
    (dict(epochs=-1), "epochs"),
    (dict(epochs=1.5), "epochs"),
    (dict(lr=0.0), "lr"),
    (dict(margin=-0.5), "margin"),
    (dict(on="scores"), "on"),
    (dict(optimizer="lbfgs"), "optimizer"),
])
def test_bad_hyper_parameters_raise_naming_the_parameter(kwargs, name):
    objective = {k: v for k, v in kwargs.items() if k in ("eps", "margin_weight", "margin", "on")}
    optimiser = {{"optimizer": "name"}.get(k, k): v for k, v in kwargs.items() if k in ("lr", "optimizer")}
    model = tiny_vgg()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^{name}="):
        adversarial_retrain(model, loader(16), Objective(**(dict(eps=0.1, margin_weight=0.1) | objective)),
                            replace(APPENDIX_C, **optimiser) if "epochs" not in kwargs else APPENDIX_C,
                            kwargs.get("epochs", 1), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trained


def test_zero_epochs_changes_nothing():
    model = tiny_vgg()
    before = copy.deepcopy(model.state_dict())
    assert adversarial_retrain(model, loader(16), objective=Objective(eps=0.1, margin_weight=0.1), epochs=0, progress=False) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_huge_margin_weight_diverges_with_a_message_naming_it():
    from rclib.nn.train import Diverged

    model = tiny_vgg()
    with pytest.raises(Diverged, match=r"margin_weight=1e\+300"):
        adversarial_retrain(model, loader(), objective=Objective(eps=0.1, margin_weight=1e300), progress=False)


# ---- Alg 7 with PGD examples (chapter 05's Madry-style row) -----------------------------------

def _pruned_toy() -> nn.Module:
    model = tiny_vgg()
    for _, layer in prunable_layers(model):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pgd_retraining_repeats_with_its_seed_keeps_masks_and_differs_from_fgsm():
    runs = {}
    for key, attack in (("pgd", "pgd"), ("pgd again", "pgd"), ("fgsm", "fgsm")):
        model = _pruned_toy()
        history = adversarial_retrain(model, loader(), objective=Objective(eps=0.1, margin_weight=0.1, attack=attack, pgd_steps=3), progress=False)
        assert len(history) == 1 and math.isfinite(history[0]["loss"])
        for _, layer in prunable_layers(model):  # pruned weights are still exactly zero
            assert (layer.weight[layer.weight_mask == 0] == 0).all()
        runs[key] = _state(model)
    assert all(torch.equal(runs["pgd"][k], runs["pgd again"][k]) for k in runs["pgd"])
    assert any(not torch.equal(runs["pgd"][k], runs["fgsm"][k]) for k in runs["pgd"])


def test_pgd_loss_uses_pgd_examples_from_the_given_generator():
    model = tiny_vgg().eval()
    x, y = data(8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    from rclib.robust.attacks import pgd

    x_adv = pgd(model, x, y, 0.1, steps=2, generator=g1)
    z = model(torch.cat([x, x_adv]))
    expected = F.cross_entropy(z, torch.cat([y, y])) + 0.1 * margin_loss(z, torch.cat([y, y]))
    got = adversarial_margin_loss(model, x, y, Objective(0.1, 0.1, attack="pgd", pgd_steps=2), generator=g2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.equal(x_adv, fgsm(model, x, y, 0.1))  # so the match above is not FGSM's loss by chance


@pytest.mark.parametrize("kwargs, name", [(dict(attack="cw"), "attack"), (dict(attack="pgd", pgd_steps=0), "pgd_steps")])
def test_bad_attack_settings_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Objective(eps=0.1, margin_weight=0.1, **kwargs)
