"""rclib.experiments.retrain: Table 1's retrained models as separate cached steps, streamed one at a time."""

from __future__ import annotations

import pytest
import torch
from toys import LiveModels

from rclib.core import artifacts, config
from rclib.data import datasets
from rclib.experiments import pruning, retrain, steps, table1, variants
from rclib.experiments.variants import RETRAININGS
from rclib.nn import models, train
from rclib.robust import attacks


@pytest.fixture(scope="module")
def setup():
    cfg = config.load("smoke", epsilon=0.1, train_size=128, test_size=64, epochs=1, width=4, hidden=16)
    splits = datasets.load(cfg)
    model = steps.new_model(cfg, splits)
    train.fit(model, splits.train, 1, progress=False)
    return cfg, splits, model.eval()


@pytest.mark.parametrize("name", list(RETRAININGS))
def test_each_step_keeps_pruned_weights_zero_and_caches(setup, name):
    cfg, splits, base = setup
    step = RETRAININGS[name]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    state, metrics, hit = retrain.retrained(cfg, splits, base, 0.5, step)
    assert not hit and metrics["history"]
    masked = pruning.pruned(base, pruning.GLOBAL, 0.5)
    for name, module in models.prunable_layers(masked):
        dead = module.weight_mask == 0
        assert dead.any()
        assert (state[f"{name}.weight"][dead] == 0).all(), f"{step}: {name} has non-zero pruned weights"
    # the baseline is untouched, and the second call reads the identical state from the cache
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    again, _, hit = retrain.retrained(cfg, splits, base, 0.5, step)
    assert hit and all(torch.equal(state[k], again[k]) for k in state)


def test_every_retraining_makes_one_variant_and_names_are_unique():
    made = [v.retraining for v in variants.BY_LABEL.values() if v.retraining is not None and not v.shared]
    assert sorted(r.name for r in made) == sorted(RETRAININGS)  # each step feeds exactly one row
    assert variants.ADV_WS.retraining is variants.ALG7 and variants.ADV_WS.shared


def _fields(how):
    return set(retrain.artifact(config.load("smoke"), 0.5, how, torch.nn.Linear(1, 1))["step"].fields())


def test_step_keys_differ_only_where_the_step_reads_the_field():
    assert "adv_epsilon" not in _fields(variants.CLEAN) and "margin_on" not in _fields(variants.CLEAN)
    assert "margin_weight" not in _fields(variants.NO_MARGIN)
    assert "adv_epsilon" not in _fields(variants.MARGIN_ONLY)
    assert {"adv_epsilon", "margin_weight", "prune_rate", "seed"} <= _fields(variants.ALG7)
    assert "epsilon" not in _fields(variants.ALG7)  # the model does not depend on the evaluation's epsilon


def test_robust_table_holds_at_most_two_models_and_states_are_lazy(setup, monkeypatch):
    cfg, splits, base = setup
    live: list[int] = []
    models_ = LiveModels().start(monkeypatch)  # base exists already and is not counted

    def counting(original):  # how many VGGs exist besides base while a row is evaluated or attacked
        def wrapped(model, loader, *args, **kwargs):
            live.append(models_.count(limit=1))
            return original(model, loader, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(train, "evaluate", counting(train.evaluate))
    monkeypatch.setattr(attacks, "robust_correct", counting(attacks.robust_correct))
    rows, states, hit = table1.robust_table(cfg, splits, base, 0.5, progress=False)
    assert not hit and [r["variant"] for r in rows] == variants.labels(variants.TABLE1 + variants.ABLATION)
    assert len(live) >= len(rows) and max(live) <= 1  # the row's own model (and base)
    assert list(states) == list(variants.TABLE1 + variants.ABLATION) and len(states) == 7
    with pytest.raises(KeyError):
        states[variants.MADRY]
    ws = states[variants.ADV_WS]
    alg7 = states[variants.ADV]
    for name, _ in models.prunable_layers(base):  # sharing keeps the zeros and tabulates the rest
        w, a = ws[f"{name}.weight"], alg7[f"{name}.weight"]
        assert torch.equal(w == 0, a == 0)
        assert len(torch.unique(w[w != 0])) <= 2 ** max(cfg.conv_bits, cfg.linear_bits)
    m = steps.rebuild(cfg, splits, states[variants.PRUNED])
    assert not torch.nn.utils.prune.is_pruned(m)  # folded: evaluated without weight_orig and mask copies


def test_evaluation_step_counts_and_robust_table_reads_it(setup):
    """The robust evaluation of a step is its own artifact (what ``python -m rclib evaluate``
    writes, also under torchrun): its counts are those of train.evaluate and robust_accuracy,
    and chapter 04's table takes its accuracies from it instead of recomputing them."""
    cfg, splits, base = setup
    outcomes, metrics, hit = retrain.evaluated(cfg, splits, base, 0.5, variants.ALG7)
    assert not hit and metrics["world_size"] == 1 and metrics["pgd_steps"] == retrain.EVAL_PGD_STEPS
    m = steps.rebuild(cfg, splits, retrain.retrained(cfg, splits, base, 0.5, variants.ALG7)[0])
    n = len(splits.test.dataset)
    assert metrics["clean"] == {"correct": round(train.evaluate(m.eval(), splits.test) * n), "n": n}
    assert metrics["fgsm"]["correct"] == round(attacks.robust_accuracy(m, splits.test, attacks.fgsm, cfg.epsilon) * n)
    assert int(outcomes["pgd"].sum()) == metrics["pgd"]["correct"] and len(outcomes["pgd"]) == n
    # a run elsewhere (torchrun) left other counts under the same key: the table shows them
    path = artifacts.location(**retrain.evaluation_artifact(cfg, 0.5, variants.ALG7, base))
    doctored = dict(metrics, clean={"correct": 1, "n": n}, fgsm={"correct": 0, "n": n})
    info = artifacts.recorded(path)  # same key material, other counts
    artifacts.discard(path)
    artifacts.save(path, outcomes, doctored, info=info)
    rows, _, _ = table1.robust_table(cfg, splits, base, 0.5, progress=False)
    row = next(r for r in rows if r["variant"] == variants.ADV.label)
    assert row["accuracy"] == 1 / n and row["robust_accuracy"] == 0


def test_rebuilding_a_retrained_model_does_not_read_the_pretrained_weights(setup, tmp_path, monkeypatch):
    """Under ``paper`` a rebuild that loads a full state right away must not read the 0.5 GB
    ImageNet checkpoint first only to overwrite it (``pretrained=False``)."""
    from safetensors.torch import save_file

    cfg, splits, base = setup
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    cfg = config.load("smoke", epsilon=0.1, train_size=128, test_size=64, epochs=1, width=4, hidden=16,
                      weights=str(weights))
    reads: list[str] = []
    real = models._pretrained_state

    def counted(c):
        reads.append(c.weights)
        return real(c)

    monkeypatch.setattr(models, "_pretrained_state", counted)
    _, metrics, hit = retrain.evaluated(cfg, splits, base, 0.5, variants.CLEAN)
    assert not hit and metrics["clean"]["n"] == 64
    assert reads == []
    steps.new_model(cfg, splits)  # the counter itself works: a plain build reads them once
    assert reads == [str(weights)]


def test_one_function_rebuilds_a_model_from_a_state():
    """``steps.rebuild`` is the only place a model is made from a saved state (built with
    ``pretrained=False``, checked, loaded strictly); besides it only ``nn.models`` (weights files)
    and ``compress.harden`` (a new, smaller architecture) load a state dict. The chapters too."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    loaders = {p.relative_to(root).as_posix() for p in (root / "rclib").rglob("*.py")
               if ".load_state_dict(" in p.read_text()}
    assert loaders == {"rclib/experiments/steps.py", "rclib/nn/models.py", "rclib/compress/harden.py"}
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        assert ".load_state_dict(" not in code, nb.name
    source = Path(steps.__file__).read_text()
    assert "new_model(cfg, splits, pretrained=False)" in source.split("def rebuild(")[1].split("\ndef ")[0]
