"""Cache keys derived from what a step reads (rclib.core.keys): every field in one group, and
each step's key changes with exactly the fields it declares."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest
import torch

import rclib.experiments
from rclib.core import artifacts, config
from rclib.core.keys import GROUPS, Step, fields_of
from rclib.experiments import retrain, variants


def declared_steps() -> dict[str, Step]:
    """Every Step the experiments declare (module constants), plus each retraining's and its
    evaluation's (built per retraining by ``retrain.artifact``)."""
    found = {}
    for info in pkgutil.iter_modules(rclib.experiments.__path__, "rclib.experiments."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, Step):
                found[value.name] = value
    base = torch.nn.Linear(1, 1)
    for how in variants.RETRAININGS.values():
        for key in (retrain.artifact(config.load("smoke"), 0.5, how, base),
                    retrain.evaluation_artifact(config.load("smoke"), 0.5, how, base)):
            found[key["step"].name] = key["step"]
    return found


STEPS = declared_steps()


def other(value):
    """A different value of the same type (validity does not matter to a key)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, tuple):
        return value + (value[-1] if value else 1,)
    return f"{value}-other"


def key(cfg: config.Config, step: Step) -> str:
    return artifacts.location(cfg, step, content="", kind="cpu/fp32").name


def test_every_field_is_in_exactly_one_group():
    seen = [f for fields in GROUPS.values() for f in fields]
    assert sorted(seen) == sorted(config.FIELD_NAMES) and len(seen) == len(set(seen))


def test_a_step_reads_names_that_exist():
    with pytest.raises(ValueError, match="neither a config group"):
        Step("x", ("data", "no_such_field"))
    assert fields_of("seed", "sharing") == ("conv_bits", "linear_bits", "seed")


def test_the_experiments_declare_their_steps():
    assert {"baseline", "operating_point", "prune_sweep", "trajectory", "boundary_sweep", "robust_table",
            "share_sweep", "attack_table", "distance_table", "retrained-alg7", "evaluated-alg7"} <= set(STEPS)
    assert all(not set(s.fields()) & set(GROUPS["run"]) for s in STEPS.values())


@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_key_changes_with_exactly_the_fields_its_step_reads(name):
    step = STEPS[name]
    cfg = config.load("smoke", epsilon=0.1)
    before = key(cfg, step)
    for field in config.FIELD_NAMES:
        if field == "profile":  # the profile is the cache's folder, not part of the key
            continue
        changed = dataclasses.replace(cfg, **{field: other(getattr(cfg, field))})
        assert (key(changed, step) != before) == (field in step.fields()), f"{name}: {field}"
