"""rclib.artifacts: compute once then hit, keys, damage -> warning + recompute, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rclib import artifacts, config

NAMES = ("epsilon", "prune_rate")


class Counter:
    """A compute function that counts its calls and returns fresh, seeded tensors."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(0)
        return ({"w": torch.randn(3, 4, generator=g), "idx": torch.arange(5)},
                {"accuracy": 0.75, "curve": [0.1, 0.2], "calls": self.calls})


def test_root_follows_environment(tmp_path):
    assert artifacts.root() == tmp_path / "artifacts"  # set by the autouse fixture in conftest


def test_cached_computes_once_then_hits():
    cfg = config.load("smoke")
    compute = Counter()
    t1, m1, hit1 = artifacts.cached(cfg, "baseline", NAMES, compute)
    t2, m2, hit2 = artifacts.cached(cfg, "baseline", NAMES, compute)
    assert compute.calls == 1
    assert (hit1, hit2) == (False, True)
    assert m1 == m2 == {"accuracy": 0.75, "curve": [0.1, 0.2], "calls": 1}
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)
    path = artifacts.location(cfg, "baseline", NAMES)
    assert path.is_dir() and path.parent == artifacts.root() / "smoke"
    manifest = json.loads((path / artifacts.MANIFEST).read_text())
    assert set(manifest["files"]) == {artifacts.WEIGHTS, artifacts.METRICS}
    assert manifest["info"]["config"] == {"epsilon": cfg.epsilon, "prune_rate": cfg.prune_rate}


def test_metrics_only_artifact():
    cfg = config.load("smoke")
    calls = []

    def compute():
        calls.append(1)
        return None, {"x": 1}

    assert artifacts.cached(cfg, "table", NAMES, compute) == (None, {"x": 1}, False)
    assert artifacts.cached(cfg, "table", NAMES, compute) == (None, {"x": 1}, True)
    assert len(calls) == 1


def test_location_depends_on_named_fields_only():
    a = config.load("smoke")
    loc = artifacts.location(a, "pruned", NAMES)
    assert artifacts.location(config.load("smoke", epsilon=0.3), "pruned", NAMES) != loc
    assert artifacts.location(config.load("smoke", prune_rate=0.8), "pruned", NAMES) != loc
    assert artifacts.location(config.load("smoke", lr=0.5), "pruned", NAMES) == loc
    assert artifacts.location(a, "other", NAMES) != loc
    assert artifacts.location(config.load("cpu"), "pruned", NAMES).parent.name == "cpu"


def test_changed_field_recomputes():
    compute = Counter()
    artifacts.cached(config.load("smoke"), "s", NAMES, compute)
    _, _, hit = artifacts.cached(config.load("smoke", epsilon=0.3), "s", NAMES, compute)
    assert not hit and compute.calls == 2
    _, _, hit = artifacts.cached(config.load("smoke", epochs=3), "s", NAMES, compute)
    assert hit and compute.calls == 2  # epochs is not among the step's fields


def _flip_a_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("victim, at", [
    (artifacts.WEIGHTS, 3),      # the safetensors header
    (artifacts.WEIGHTS, -1),     # the tensor bytes
    (artifacts.METRICS, 5),
    (artifacts.MANIFEST, 0),     # no longer JSON
])
def test_damaged_artifact_warns_and_recomputes(victim, at):
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, "baseline", NAMES, compute)
    path = artifacts.location(cfg, "baseline", NAMES)
    _flip_a_byte(path / victim, at)
    with pytest.warns(UserWarning, match="recomputed"):
        tensors, metrics, hit = artifacts.cached(cfg, "baseline", NAMES, compute)
    assert not hit and compute.calls == 2 and metrics["calls"] == 2
    assert torch.equal(tensors["w"], Counter()()[0]["w"])
    # the repaired artifact is served again, without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, metrics, hit = artifacts.cached(cfg, "baseline", NAMES, compute)
    assert hit and compute.calls == 2 and metrics["calls"] == 2


def test_missing_file_recomputes():
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, "baseline", NAMES, compute)
    (artifacts.location(cfg, "baseline", NAMES) / artifacts.WEIGHTS).unlink()
    _, _, hit = artifacts.cached(cfg, "baseline", NAMES, compute)
    assert not hit and compute.calls == 2


def test_failing_compute_leaves_nothing_behind():
    cfg = config.load("smoke")

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        artifacts.cached(cfg, "baseline", NAMES, boom)
    assert not artifacts.location(cfg, "baseline", NAMES).exists()
    root = artifacts.root()
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_failing_write_is_atomic():
    # tensors that cannot be serialised fail inside save: no final or temporary folder remains
    cfg = config.load("smoke")
    with pytest.raises(Exception):
        artifacts.cached(cfg, "baseline", NAMES, lambda: ({"w": "not a tensor"}, {"a": 1}))
    parent = artifacts.root() / "smoke"
    assert not artifacts.location(cfg, "baseline", NAMES).exists()
    assert list(parent.iterdir()) == []
    # metrics that are not JSON fail the same way
    with pytest.raises(TypeError):
        artifacts.cached(cfg, "baseline", NAMES, lambda: (None, {"a": object()}))
    assert list(parent.iterdir()) == []


def test_save_replaces_an_existing_copy(tmp_path):
    path = tmp_path / "a" / "step-x"
    artifacts.save(path, {"w": torch.zeros(2)}, {"v": 1})
    artifacts.save(path, {"w": torch.ones(2)}, {"v": 2})
    tensors, metrics = artifacts.load(path)
    assert torch.equal(tensors["w"], torch.ones(2)) and metrics == {"v": 2}
    assert sorted(os.listdir(path.parent)) == ["step-x"]


def test_load_of_absent_path_is_none(tmp_path):
    assert artifacts.load(tmp_path / "nothing") is None


@pytest.mark.parametrize("step", ["../evil", "a/b", "has space", "", "dot.name"])
def test_invalid_step_name(step):
    with pytest.raises(ValueError, match="step"):
        artifacts.location(config.load("smoke"), step, NAMES)
    with pytest.raises(ValueError, match="step"):
        artifacts.cached(config.load("smoke"), step, NAMES, Counter())


def test_unknown_field_in_names():
    with pytest.raises(ValueError, match="bogus"):
        artifacts.cached(config.load("smoke"), "baseline", ("bogus",), Counter())
