"""Nothing wrong reaches the book: artifacts verify their key material and their content
(rclib.core.artifacts, rclib.core.verify), a read-only cache is used read-only, weights are checked by dtype."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings

import pytest
import torch

from rclib.core import artifacts, config, paths, verify
from rclib.core.keys import Step
from rclib.experiments import setup

NAMES = ("seed", "epsilon")


class Counter:
    def __init__(self, accuracy: float = 0.75):
        self.calls, self.accuracy = 0, accuracy

    def __call__(self):
        self.calls += 1
        return {"w": torch.full((2, 3), float(self.calls))}, {"clean_accuracy": self.accuracy, "calls": self.calls}


def _entry(seed: int, compute: Counter):
    cfg = config.load("smoke", seed=seed)
    artifacts.cached(cfg, Step("baseline", NAMES), compute)
    return cfg, artifacts.location(cfg, Step("baseline", NAMES))


def _rewrite(path, tensors=None, metrics=None):
    """Consistent tampering: new content, valid checksums, the same recorded key material."""
    old_t, old_m = artifacts.load(path)
    info = artifacts.recorded(path)
    artifacts.discard(path)
    artifacts.save(path, old_t if tensors is None else tensors, old_m if metrics is None else metrics, info=info)


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_entry_under_another_key_is_not_served(how):
    """Seed 1's folder replaced by seed 0's (copied, or linked): refused, seed 1 recomputed."""
    zero, one = Counter(0.6), Counter(0.7)
    _entry(0, zero)
    cfg1, path1 = _entry(1, one)
    _, path0 = _entry(0, zero)
    shutil.rmtree(path1)
    if how == "copy":
        shutil.copytree(path0, path1)
        match = r"other key material \(config seed|seed: 0, asked 1"
    else:
        path1.symlink_to(path0, target_is_directory=True)
        match = "a link, not a folder of the cache; refused unread"
    with pytest.warns(UserWarning, match=match):
        _, metrics, hit = artifacts.cached(cfg1, Step("baseline", NAMES), one)
    assert not hit and metrics["clean_accuracy"] == 0.7 and one.calls == 2
    assert path0.is_dir() and artifacts.load(path0)[1]["clean_accuracy"] == 0.6  # seed 0's entry untouched


def test_record_names_every_part_of_the_key():
    cfg = config.load("smoke")
    rec = artifacts.record(cfg, Step("baseline", NAMES))
    assert set(rec) == {"step", "config", "compute", "source", "content"}
    assert rec["config"] == {"seed": 0, "epsilon": cfg.epsilon} and rec["source"] == paths.source_fingerprint()
    artifacts.cached(cfg, Step("baseline", NAMES), Counter())
    assert artifacts.recorded(artifacts.location(cfg, Step("baseline", NAMES))) == rec


def test_manifest_fifo_or_device_link_is_refused_unread():
    """A FIFO would block forever, /dev/zero read until memory runs out: both refused by lstat."""
    for kind in ("fifo", "dev-zero"):
        compute = Counter()
        cfg, path = _entry(0 if kind == "fifo" else 1, compute)
        (path / artifacts.MANIFEST).unlink()
        if kind == "fifo":
            os.mkfifo(path / artifacts.MANIFEST)
        else:
            (path / artifacts.MANIFEST).symlink_to("/dev/zero")
        done = []
        t = threading.Thread(target=lambda: done.append(artifacts.load(path)), daemon=True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            t.start()
            t.join(10)
        assert done == [None], f"{kind}: load did not return"
        assert any("manifest.json is not a regular file; refused unread" in str(w.message) for w in seen)


def test_oversized_manifest_is_refused_unread(monkeypatch):
    cfg, path = _entry(0, Counter())
    monkeypatch.setattr(artifacts, "MAX_MANIFEST", 10)
    with pytest.warns(UserWarning, match=r"more than 10; refused unread"):
        assert artifacts.load(path) is None


@pytest.mark.parametrize("bad, reason", [
    ({"clean_accuracy": 1e308}, r"clean_accuracy'\]=1e\+308 is not an accuracy in \[0, 1\]"),
    ({"clean_accuracy": float("nan")}, r"clean_accuracy'\]=nan is not an accuracy"),
    ({"clean_accuracy": "0.9"}, r"clean_accuracy'\]='0.9' is not an accuracy"),
    ({"clean_accuracy": True}, r"is not an accuracy"),
    ({"clean_accuracy": 0.5, "history": [{"epoch": 1, "loss": float("inf"), "accuracy": 0.5}]},
     r"history'\]\[0\]\['loss'\]=inf is not a finite number"),
    ({"clean_accuracy": 0.5, "fgsm": {"correct": 11, "n": 10}}, r"correct=11 is more than n=10"),
    ({"clean_accuracy": 0.5, "fgsm": {"correct": 1.5, "n": 10}}, r"correct'\]=1.5 is not a whole number"),
    ({"clean_accuracy": 0.5, "rows": [{"dense_bytes": -3}]}, r"dense_bytes'\]=-3 is not a finite number >= 0"),
    ({"clean_accuracy": 0.5, "pearson": float("-inf")}, r"pearson'\]=-inf is not a finite number"),
])
def test_metrics_with_consistent_checksums_are_judged_and_recomputed(bad, reason):
    compute = Counter()
    cfg, path = _entry(0, compute)
    _rewrite(path, metrics=bad)
    with pytest.warns(UserWarning, match=reason):
        _, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert not hit and metrics["clean_accuracy"] == 0.75 and compute.calls == 2


def test_metrics_schema_accepts_real_metrics():
    verify.check_metrics({"clean_accuracy": 1.0, "history": [{"epoch": 1, "loss": 0.3, "accuracy": 0.0}],
                          "rows": [{"accuracy": 0.5, "robust_accuracy": [0.1, 0.2], "approx_bytes": 10.5,
                                    "nonzero": 3, "seed": 0, "label": "x"}],
                          "clean": {"correct": 3, "n": 3}, "share_seconds": 0.1, "world_size": 2})


def test_metrics_check_is_bounded_in_depth():
    deep: list = []
    for _ in range(verify.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match="nests more than"):
        verify.check_metrics({"x": deep})


def test_nan_weights_in_the_cache_are_recomputed():
    compute = Counter()
    cfg, path = _entry(0, compute)
    _rewrite(path, tensors={"w": torch.full((2, 3), float("nan"))})
    with pytest.warns(UserWarning, match=r"tensor 'w' holds NaN or infinite values"):
        tensors, _, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert not hit and torch.isfinite(tensors["w"]).all()


def test_state_is_checked_by_dtype_as_well_as_shape(tiny_model):
    ref = tiny_model.state_dict()
    verify.check_state({k: v.clone() for k, v in ref.items()}, ref)
    name = next(k for k, v in ref.items() if v.is_floating_point())
    for dtype in (torch.int8, torch.bool, torch.float16):
        state = {k: v.clone() for k, v in ref.items()}
        state[name] = state[name].to(dtype)
        with pytest.raises(TypeError, match=f"tensor '{name}' is .* {dtype}; the model holds"):
            verify.check_state(state, ref)
    with pytest.raises(RuntimeError, match="missing"):
        verify.check_state({k: v for k, v in ref.items() if k != name}, ref)


def test_int8_baseline_weights_in_the_cache_are_recomputed(tiny_cfg):
    from rclib.data import datasets
    from rclib.experiments import steps

    splits = datasets.load(tiny_cfg)
    _, _, hit = steps.baseline(tiny_cfg, splits, progress=False)
    path = artifacts.location(tiny_cfg, steps.BASELINE)
    tensors, _ = artifacts.load(path)
    name = next(k for k, v in tensors.items() if k.endswith("weight") and v.dim() == 4)
    _rewrite(path, tensors={**tensors, name: tensors[name].to(torch.int8)})
    with pytest.warns(UserWarning, match=rf"unusable artifact .*TypeError: tensor '{name}' is .* torch.int8"):
        model, _, hit = steps.baseline(tiny_cfg, splits, progress=False)
    assert not hit and dict(model.named_parameters())[name].dtype == torch.float32


def test_read_only_cache_is_used_read_only(monkeypatch):
    compute = Counter()
    cfg, path = _entry(0, compute)

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(artifacts.root()))

    monkeypatch.setattr(artifacts, "save", refuse)
    monkeypatch.setattr(artifacts, "discard", refuse)
    with warnings.catch_warnings():  # an entry that is there is read as usual
        warnings.simplefilter("error")
        assert artifacts.cached(cfg, Step("baseline", NAMES), compute)[2] is True
    other = config.load("smoke", seed=3)
    with pytest.warns(UserWarning, match=r"is not writable \(Read-only file system.*results are not stored"):
        tensors, metrics, hit = artifacts.cached(other, Step("baseline", NAMES), compute)
    assert not hit and metrics["calls"] == 2 and not artifacts.location(other, Step("baseline", NAMES)).exists()
    _rewrite_bad = {"clean_accuracy": 7.0}  # a damaged entry that cannot be replaced: computed, not stored
    monkeypatch.undo()
    _rewrite(path, metrics=_rewrite_bad)
    monkeypatch.setattr(artifacts, "save", refuse)
    monkeypatch.setattr(artifacts, "discard", refuse)
    with pytest.warns(UserWarning) as seen:
        _, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert not hit and metrics["clean_accuracy"] == 0.75
    assert any("not writable" in str(w.message) for w in seen)


def test_other_write_errors_still_propagate(monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "save", full)
    with pytest.raises(OSError, match="No space"):
        artifacts.cached(setup.load("smoke"), Step("baseline", NAMES), Counter())


def test_decoded_cache_records_its_entry():
    """The decoded test-image cache compares its recorded entry name, so a copy is refused."""
    path = artifacts.root() / "decoded" / "aaa"
    artifacts.save(path, {"x": torch.zeros(1)}, {"n": 1}, info={"entry": "bbb"})
    with pytest.warns(UserWarning, match=r"other key material \(entry: bbb, asked aaa"):
        assert artifacts.load(path, expect={"entry": "aaa"}) is None
    assert json.loads((path / artifacts.MANIFEST).read_text())["info"] == {"entry": "bbb"}
