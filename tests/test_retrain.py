"""rclib.retrain: Table 1's retrained models as separate cached steps, streamed one at a time."""

from __future__ import annotations

import pytest
import torch

from rclib import artifacts, attacks, config, data, models, pipeline, prune, retrain, train

from toys import LiveModels


@pytest.fixture(scope="module")
def setup():
    cfg = config.load("smoke", epsilon=0.1, train_size=128, test_size=64, epochs=1, width=4, hidden=16)
    splits = data.load(cfg)
    model = pipeline.new_model(cfg, splits)
    train.fit(model, splits.train, 1, progress=False)
    return cfg, splits, model.eval()


@pytest.mark.parametrize("step", list(retrain.STEPS))
def test_each_step_keeps_pruned_weights_zero_and_caches(setup, step):
    cfg, splits, base = setup
    before = {k: v.clone() for k, v in base.state_dict().items()}
    state, metrics, hit = retrain.retrained(cfg, splits, base, 0.5, step)
    assert not hit and metrics["history"]
    masked = pipeline.pruned(base, "global", 0.5)
    for name, module in models.prunable_layers(masked):
        dead = module.weight_mask == 0
        assert dead.any()
        assert (state[f"{name}.weight"][dead] == 0).all(), f"{step}: {name} has non-zero pruned weights"
    # the baseline is untouched, and the second call reads the identical state from the cache
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    again, _, hit = retrain.retrained(cfg, splits, base, 0.5, step)
    assert hit and all(torch.equal(state[k], again[k]) for k in state)


def test_steps_map_to_rows_and_unknown_step_is_refused():
    assert set(retrain.STEP_OF) == set(retrain.TABLE1_ROWS[2:4] + retrain.ABLATION_ROWS + (retrain.MADRY_ROW,))
    with pytest.raises(ValueError, match="step='alg8'.*clean"):
        retrain.retrained(config.load("smoke"), None, models.build(config.load("smoke"), 10, (1, 8, 8), (0.3,), (0.3,)),
                          0.5, "alg8")


def test_step_keys_differ_only_where_the_step_reads_the_field():
    assert "adv_epsilon" not in retrain.step_fields("clean")
    assert "margin_weight" not in retrain.step_fields("alg7-no-margin")
    assert "adv_epsilon" not in retrain.step_fields("alg7-margin-only")
    assert {"adv_epsilon", "margin_weight", "prune_rate", "seed"} <= set(retrain.step_fields("alg7"))


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
    rows, states, hit = pipeline.robust_table(cfg, splits, base, 0.5, progress=False)
    assert not hit and [r["variant"] for r in rows] == list(retrain.TABLE1_ROWS + retrain.ABLATION_ROWS)
    assert len(live) >= len(rows) and max(live) <= 1  # the row's own model (and base)
    assert list(states) == list(retrain.TABLE1_ROWS + retrain.ABLATION_ROWS) and len(states) == 7
    with pytest.raises(KeyError):
        states["nope"]
    ws = states["Pruned + Adv Ret. + WS"]
    alg7 = states["Pruned + Adv Ret."]
    for name, _ in models.prunable_layers(base):  # sharing keeps the zeros and tabulates the rest
        w, a = ws[f"{name}.weight"], alg7[f"{name}.weight"]
        assert torch.equal(w == 0, a == 0)
        assert len(torch.unique(w[w != 0])) <= 2 ** max(cfg.conv_bits, cfg.linear_bits)
    m = pipeline.new_model(cfg, splits)
    m.load_state_dict(states["Pruned"], strict=True)
    assert not prune.is_pruned(m)  # folded: evaluated without weight_orig and mask copies


def test_evaluation_step_counts_and_robust_table_reads_it(setup):
    """The robust evaluation of a step is its own artifact (what ``python -m rclib evaluate``
    writes, also under torchrun): its counts are those of train.evaluate and robust_accuracy,
    and chapter 04's table takes its accuracies from it instead of recomputing them."""
    cfg, splits, base = setup
    outcomes, metrics, hit = retrain.evaluated(cfg, splits, base, 0.5, "alg7")
    assert not hit and metrics["world_size"] == 1 and metrics["pgd_steps"] == retrain.EVAL_PGD_STEPS
    m = pipeline.new_model(cfg, splits)
    m.load_state_dict(retrain.retrained(cfg, splits, base, 0.5, "alg7")[0])
    n = len(splits.test.dataset)
    assert metrics["clean"] == {"correct": round(train.evaluate(m.eval(), splits.test) * n), "n": n}
    assert metrics["fgsm"]["correct"] == round(attacks.robust_accuracy(m, splits.test, attacks.fgsm, cfg.epsilon) * n)
    assert int(outcomes["pgd"].sum()) == metrics["pgd"]["correct"] and len(outcomes["pgd"]) == n
    # a run elsewhere (torchrun) left other counts under the same key: the table shows them
    path = artifacts.location(**retrain.evaluation_artifact(cfg, 0.5, "alg7", base))
    doctored = dict(metrics, clean={"correct": 1, "n": n}, fgsm={"correct": 0, "n": n})
    info = artifacts.recorded(path)  # same key material, other counts
    artifacts.discard(path)
    artifacts.save(path, outcomes, doctored, info=info)
    rows, _, _ = pipeline.robust_table(cfg, splits, base, 0.5, progress=False)
    row = next(r for r in rows if r["variant"] == retrain.STEPS["alg7"])
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
    _, metrics, hit = retrain.evaluated(cfg, splits, base, 0.5, "clean")
    assert not hit and metrics["clean"]["n"] == 64
    assert reads == []
    pipeline.new_model(cfg, splits)  # the counter itself works: a plain build reads them once
    assert reads == [str(weights)]


def test_every_rebuild_from_a_state_skips_the_pretrained_weights():
    """Each ``new_model(...)`` whose next lines load a full state passes ``pretrained=False``
    (retrain and both places in distributed read the checkpoint only to overwrite it before)."""
    import inspect
    import re

    from rclib import attack_study, distributed

    for module in (retrain, distributed, pipeline, attack_study):
        lines = inspect.getsource(module).splitlines()
        for i, line in enumerate(lines):
            if re.search(r"new_model\(cfg, splits[^)]*\)", line) and \
                    any("load_state_dict" in nxt for nxt in lines[i + 1:i + 3]):
                assert "pretrained=False" in line, f"{module.__name__} line {i + 1}: {line.strip()}"
