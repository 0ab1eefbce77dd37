"""rclib.attack_study (chapter 05) on toys: the seeded attack sample, zero input gradients,
and the gradient-masking checks on rows whose outcome is known by construction."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from rclib import attack_study, config

from toys import tiny_vgg  # noqa: E402

torch.set_num_threads(1)


def test_attack_subset_is_seeded_sorted_distinct_and_capped():
    cfg = config.load("smoke", epsilon=0.1)
    a = attack_study.attack_subset(cfg, 360)
    assert len(a) == cfg.attack_sample and len(set(a.tolist())) == len(a)
    assert torch.equal(a, a.sort().values) and int(a.max()) < 360
    assert torch.equal(a, attack_study.attack_subset(cfg, 360))
    assert not torch.equal(a, attack_study.attack_subset(dataclasses.replace(cfg, seed=1), 360))
    assert torch.equal(attack_study.attack_subset(cfg, 10), torch.arange(10))  # fewer digits: all of them


def test_zero_gradient_inputs_flags_a_saturated_softmax_only():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = tiny_vgg().eval()
    y = model(x).argmax(1).detach()
    assert not attack_study.zero_gradient_inputs(model, x, y).any()
    saturated = nn.Sequential(model, nn.Linear(10, 10))
    with torch.no_grad():  # logits scaled by 1e6: softmax is exactly one-hot in float32
        saturated[1].weight.copy_(1e6 * torch.eye(10))
        saturated[1].bias.zero_()
    flags = attack_study.zero_gradient_inputs(saturated.eval(), x, y, batch_size=5)
    assert flags.dtype == torch.bool and len(flags) == 16 and flags.all()


def _rows(fgsm=0.6, pgd=0.4, transfer=0.5, cascade=(0.35, 0.3, 0.3), square=0.3, large=0.0, zero=0.0):
    """A model's rows: ``cascade`` is the worst case after PGD-50, + APGD-CE and + APGD-T; ``square``
    the worst case once Square has run on what they left."""
    def r(kind, attack, eps, on, acc):
        return dict(variant="m", seed=0, kind=kind, attack=attack, eps=eps, on=on, accuracy=acc, n=100)

    return [r("table", "FGSM", 0.1, "test", fgsm), r("table", "PGD-10", 0.1, "test", pgd),
            r("check", "transfer PGD-10 from Baseline", 0.1, "test", transfer),
            r("table", attack_study.CHEAP_ATTACKS[2], 0.1, "subset", cascade[0]),
            r("table", "+ APGD-CE", 0.1, "subset", cascade[1]), r("table", "+ APGD-T", 0.1, "subset", cascade[2]),
            r("table", "+ Square", 0.1, "subset", square),
            r("check", "PGD-10 from x", attack_study.LARGE_EPS, "subset", large),
            r("check", "zero input gradient", 0.0, "test", zero)]


def test_masking_checks_pass_on_an_honest_model():
    out = attack_study.masking_checks(_rows())
    assert [c["check"] for c in out] == list(attack_study.MASKING_CHECKS)
    assert all(c["passed"] for c in out)
    assert out[2]["ours"] == 0.3 and out[2]["against"] == 0.3  # Square broke nothing the gradients left


@pytest.mark.parametrize("change, check", [
    (dict(pgd=0.7, transfer=0.9), 0),  # PGD weaker than FGSM
    (dict(transfer=0.2), 1),           # a surrogate's examples beat the white-box attack
    (dict(square=0.25), 2),            # black-box breaks digits every gradient attack left standing
    (dict(large=0.3), 3),              # robust at a budget that should break everything
    (dict(zero=0.01), 4),              # some inputs give the attack no gradient
])
def test_each_masking_symptom_fails_its_own_check_only(change, check):
    out = attack_study.masking_checks(_rows(**change))
    assert [c["passed"] for c in out] == [i != check for i in range(len(attack_study.MASKING_CHECKS))]
