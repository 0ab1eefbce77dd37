"""rclib.experiments.attack_study (chapter 05) on toys: the seeded attack sample, zero input gradients,
and the gradient-masking checks on rows whose outcome is known by construction."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import pytest
import torch
from torch import nn
from toys import tiny_vgg  # noqa: E402

from rclib.core import config
from rclib.experiments import attack_study, steps, table1, variants

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
    def r(kind, attack, eps, on, acc, source=""):
        return dict(variant="m", seed=0, kind=kind, attack=attack, eps=eps, on=on, accuracy=acc, n=100,
                    source=source)

    return [r("table", "FGSM", 0.1, "test", fgsm), r("table", "PGD-10", 0.1, "test", pgd),
            r("check", "transfer PGD-10 from Baseline", 0.1, "test", transfer, source="Baseline"),
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


def test_spool_gives_back_exactly_what_was_written_batch_by_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(n, 3, 5, 5, generator=g), torch.randint(0, 9, (n,), generator=g)) for n in (4, 4, 3)]
    spool = attack_study.Spool(tmp_path / "s.npy", 11, (3, 5, 5))
    for x, y in batches:
        spool.append(x, y)
    for _ in range(2):  # every model reads the same examples again
        back = list(spool)
        assert [len(y) for _, y in back] == [4, 4, 3]
        assert all(torch.equal(x, bx) and torch.equal(y, by) for (x, y), (bx, by) in zip(batches, back))
    spool.close()


def _image_storages(shape, exclude=frozenset()) -> dict[int, int]:
    """``{storage address: images}`` of live CPU float tensors of ``shape`` (C, H, W), each storage
    counted once, other than the storages in ``exclude``."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch.distributed objects warns
        warnings.simplefilter("ignore", FutureWarning)
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objects:
        if o.dim() == 4 and tuple(o.shape[1:]) == shape and o.device.type == "cpu" \
                and o.is_floating_point():
            ptr = o.untyped_storage().data_ptr()
            if ptr not in exclude:
                storages[ptr] = max(storages.get(ptr, 0), len(o))
    return storages


def _image_rows_held(shape, exclude) -> int:
    return sum(_image_storages(shape, exclude).values())


def test_attack_table_streams_the_test_set_and_transfer_examples_with_the_in_memory_results(monkeypatch):
    """Chapter 05 at 224 px held the test set and two surrogates' transfer examples as tensors
    (20-25 GB); now they stream. The rows equal those of the former all-in-memory computation,
    recomputed here, and while a model meets a surrogate's examples at most one batch of them (and
    the small attack subset) is held."""
    from rclib.data import datasets
    from rclib.nn import train
    from rclib.robust import attacks

    # what streams is the data, not the attack budgets: the ART cascade's steps only cost time here
    cfg = config.load("smoke", epsilon=0.1, train_size=48, test_size=24, epochs=1, width=4, hidden=16, attack_sample=4,
                      batch_size=8, eval_batch_size=16, apgd_steps=3, apgd_targets=1, square_queries=5)
    splits = datasets.load(cfg)
    base = steps.new_model(cfg, splits)
    train.fit(base, splits.train, 1, progress=False)
    base.eval()
    shape = tuple(splits.input_shape)
    # storages alive before (the digits themselves, other tests' leftovers) are not attack_table's
    own = _image_storages(shape)
    held: list[int] = []
    read = attack_study.Spool.__iter__

    def sampled(spool):
        for i, batch in enumerate(read(spool)):
            if i == 2:
                held.append(_image_rows_held(shape, own))
            yield batch

    monkeypatch.setattr(attack_study.Spool, "__iter__", sampled)
    rows, hit = attack_study.attack_table(cfg, splits, base, 0.5, progress=False)
    assert not hit and len(held) == 2 * len(attack_study.VARIANTS) - 2
    # the batch being read and the one before it (still named by the loop that consumes them) and
    # the attack subset: not the 2 x 24 transfer examples and 24 test images held before
    assert 0 < max(held) <= 2 * cfg.batch_size + cfg.attack_sample, held

    # the former computation: the whole test set and every transfer example in memory
    _, states, _ = table1.robust_table(cfg, splits, base, 0.5, progress=False)
    x, y = datasets.as_tensors(splits.test.dataset)
    test = attack_study._batches(x, y, cfg.batch_size)

    def model_of(v):
        return steps.rebuild(cfg, splits, states[v])

    def gen():
        return torch.Generator().manual_seed(cfg.seed)

    crafted = {}
    for src in attack_study.TRANSFER_SOURCES:
        g, source = gen(), model_of(src)
        crafted[src] = [(attacks.pgd(source, xb, yb, cfg.epsilon, steps=attack_study.PGD_STEPS, generator=g), yb)
                        for xb, yb in test]
    got = {(r["variant"], r["attack"]): r["accuracy"] for r in rows if r["on"] == "test"}
    for v in variants.TABLE1[1:4]:
        name = v.label
        m = model_of(v)
        want = {"FGSM": attacks.robust_correct(m, test, attacks.fgsm, cfg.epsilon),
                "PGD-10": attacks.robust_correct(m, test, attacks.pgd, cfg.epsilon, steps=attack_study.PGD_STEPS,
                                                 generator=gen()),
                "zero input gradient": attack_study.zero_gradient_inputs(m, x, y, cfg.eval_batch_size)}
        for src in attack_study.TRANSFER_SOURCES:
            if src != v:
                want[f"transfer PGD-10 from {src.label}"] = attacks.robust_correct(m, crafted[src], lambda _m, xb, _y, _e: xb,
                                                                             cfg.epsilon)
        for attack, correct in want.items():
            assert got[(name, attack)] == float(correct.float().mean()), (name, attack)
    assert not any(attack_study.spool_dir().iterdir())  # the transfer examples' files are gone
