"""rclib.core.artifacts: compute once then hit, keys, damage -> warning + recompute, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

from rclib.core import artifacts, config
from rclib.core.keys import Step
from rclib.experiments import setup, sizing

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
    t1, m1, hit1 = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    t2, m2, hit2 = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert compute.calls == 1
    assert (hit1, hit2) == (False, True)
    assert m1 == m2 == {"accuracy": 0.75, "curve": [0.1, 0.2], "calls": 1}
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)
    path = artifacts.location(cfg, Step("baseline", NAMES))
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

    assert artifacts.cached(cfg, Step("table", NAMES), compute) == (None, {"x": 1}, False)
    assert artifacts.cached(cfg, Step("table", NAMES), compute) == (None, {"x": 1}, True)
    assert len(calls) == 1


def test_location_depends_on_named_fields_only():
    a = config.load("smoke")
    loc = artifacts.location(a, Step("pruned", NAMES))
    assert artifacts.location(config.load("smoke", epsilon=0.3), Step("pruned", NAMES)) != loc
    assert artifacts.location(config.load("smoke", prune_rate=0.8), Step("pruned", NAMES)) != loc
    assert artifacts.location(config.load("smoke", lr=0.5), Step("pruned", NAMES)) == loc
    assert artifacts.location(a, Step("other", NAMES)) != loc
    assert artifacts.location(config.load("cpu"), Step("pruned", NAMES)).parent.name == "cpu"


def test_changed_field_recomputes():
    compute = Counter()
    artifacts.cached(config.load("smoke"), Step("s", NAMES), compute)
    _, _, hit = artifacts.cached(config.load("smoke", epsilon=0.3), Step("s", NAMES), compute)
    assert not hit and compute.calls == 2
    _, _, hit = artifacts.cached(config.load("smoke", epochs=3), Step("s", NAMES), compute)
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
    artifacts.cached(cfg, Step("baseline", NAMES), compute)
    path = artifacts.location(cfg, Step("baseline", NAMES))
    _flip_a_byte(path / victim, at)
    with pytest.warns(UserWarning, match="recomputed"):
        tensors, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert not hit and compute.calls == 2 and metrics["calls"] == 2
    assert torch.equal(tensors["w"], Counter()()[0]["w"])
    # the repaired artifact is served again, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert hit and compute.calls == 2 and metrics["calls"] == 2


def test_failing_compute_leaves_nothing_behind():
    cfg = config.load("smoke")

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        artifacts.cached(cfg, Step("baseline", NAMES), boom)
    assert not artifacts.location(cfg, Step("baseline", NAMES)).exists()
    root = artifacts.root()
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_failing_write_is_atomic():
    # tensors that cannot be serialised fail inside save: no final or temporary folder remains
    cfg = config.load("smoke")
    with pytest.raises(Exception):
        artifacts.cached(cfg, Step("baseline", NAMES), lambda: ({"w": "not a tensor"}, {"a": 1}))
    parent = artifacts.root() / "smoke"
    assert not artifacts.location(cfg, Step("baseline", NAMES)).exists()
    assert list(parent.iterdir()) == []
    # metrics that are not JSON fail the same way
    with pytest.raises(TypeError):
        artifacts.cached(cfg, Step("baseline", NAMES), lambda: (None, {"a": object()}))
    assert list(parent.iterdir()) == []


def test_save_keeps_a_valid_copy_under_the_same_key(tmp_path):
    # a key names one result: a second writer finds an equal, valid copy and treats it as done
    path = tmp_path / "a" / "step-x"
    artifacts.save(path, {"w": torch.zeros(2)}, {"v": 1})
    artifacts.save(path, {"w": torch.ones(2)}, {"v": 2})
    tensors, metrics = artifacts.load(path)
    assert torch.equal(tensors["w"], torch.zeros(2)) and metrics == {"v": 1}
    assert sorted(os.listdir(path.parent)) == ["step-x"]


@pytest.mark.parametrize("damage", ["file", "flipped", "empty folder", "no manifest"])
def test_save_replaces_a_damaged_copy(tmp_path, damage):
    path = tmp_path / "a" / "step-x"
    path.parent.mkdir()
    if damage == "file":
        path.write_text("not a folder")
    elif damage == "flipped":
        artifacts.save(path, {"w": torch.zeros(2)}, {"v": 1})
        _flip_a_byte(path / artifacts.METRICS, 2)
    elif damage == "empty folder":
        path.mkdir()
    else:
        path.mkdir()
        (path / artifacts.METRICS).write_text("{}")
    artifacts.save(path, {"w": torch.ones(2)}, {"v": 2})
    tensors, metrics = artifacts.load(path)
    assert torch.equal(tensors["w"], torch.ones(2)) and metrics == {"v": 2}
    assert sorted(os.listdir(path.parent)) == ["step-x"]  # no temporary or trash left


def test_load_of_absent_path_is_none(tmp_path):
    assert artifacts.load(tmp_path / "nothing") is None


@pytest.mark.parametrize("step", ["../evil", "a/b", "has space", "", "dot.name"])
def test_invalid_step_name(step):
    with pytest.raises(ValueError, match="step"):
        artifacts.location(setup.load("smoke"), Step(step, NAMES))
    with pytest.raises(ValueError, match="step"):
        artifacts.cached(setup.load("smoke"), Step(step, NAMES), Counter())


def test_unknown_field_in_names():
    with pytest.raises(ValueError, match="bogus"):
        artifacts.cached(setup.load("smoke"), Step("baseline", ("bogus",)), Counter())


# --- damage: warning + recompute, never a crash -------------------------------------------------

def _recomputes_with_warning(cfg, compute, match="damaged artifact .* it will be recomputed"):
    with pytest.warns(UserWarning, match=match):
        tensors, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert not hit and metrics["calls"] == compute.calls
    with warnings.catch_warnings():  # the repaired artifact is served again, silently
        warnings.simplefilter("error")
        _, again, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute)
    assert hit and again == metrics
    return tensors


@pytest.mark.parametrize("victim", [artifacts.WEIGHTS, artifacts.METRICS, artifacts.MANIFEST])
def test_missing_file_of_the_pair_warns_and_recomputes(victim):
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, Step("baseline", NAMES), compute)
    (artifacts.location(cfg, Step("baseline", NAMES)) / victim).unlink()
    tensors = _recomputes_with_warning(cfg, compute, match=f"{victim} is missing")
    assert compute.calls == 2 and torch.equal(tensors["w"], Counter()()[0]["w"])


def test_artifact_path_that_is_a_file_warns_and_recomputes():
    cfg = config.load("smoke")
    compute = Counter()
    path = artifacts.location(cfg, Step("baseline", NAMES))
    path.parent.mkdir(parents=True)
    path.write_text("a stray file where the artifact folder belongs")
    _recomputes_with_warning(cfg, compute, match="not a folder")
    assert compute.calls == 1 and path.is_dir()


@pytest.fixture
def alarm():
    """Fail instead of hanging if a guarded read ever reaches /dev/zero."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("a refused file was read"))
    signal.alarm(20)
    yield
    signal.alarm(0)


@pytest.mark.parametrize("name", ["/dev/zero", "../metrics.json", "sub/metrics.json", "other.bin", ".."])
def test_manifest_naming_another_file_is_refused_unread(name, alarm):
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, Step("baseline", NAMES), compute)
    path = artifacts.location(cfg, Step("baseline", NAMES))
    manifest = json.loads((path / artifacts.MANIFEST).read_text())
    manifest["files"][name] = "0" * 64
    (path / artifacts.MANIFEST).write_text(json.dumps(manifest))
    _recomputes_with_warning(cfg, compute, match="refused unread")
    assert compute.calls == 2


def test_listed_file_that_is_a_link_to_a_device_is_refused(alarm):
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, Step("baseline", NAMES), compute)
    path = artifacts.location(cfg, Step("baseline", NAMES))
    (path / artifacts.WEIGHTS).unlink()
    (path / artifacts.WEIGHTS).symlink_to("/dev/zero")
    _recomputes_with_warning(cfg, compute, match="not a regular file")


def _strict_check(tensors, metrics):
    """What a caller needs: an ``accuracy`` and exactly the tensors ``w`` and ``idx``."""
    metrics["accuracy"]
    if set(tensors) != {"w", "idx"}:
        raise RuntimeError(f"unexpected tensor names {sorted(tensors)}")


def _rewrite(path, tensors=None, metrics=None):
    """Replace an artifact's content with a consistent (checksum-valid) but different one."""
    old_t, old_m = artifacts.load(path)
    info = artifacts.recorded(path)  # the same key material: only the content is rewritten
    artifacts.discard(path)
    artifacts.save(path, old_t if tensors is None else tensors, old_m if metrics is None else metrics, info=info)


@pytest.mark.parametrize("content", ["metrics lack a key", "wrong tensor names", "no tensors"])
def test_unusable_content_warns_and_recomputes(content):
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, Step("baseline", NAMES), compute, check=_strict_check)
    path = artifacts.location(cfg, Step("baseline", NAMES))
    if content == "metrics lack a key":
        _rewrite(path, metrics={"curve": [0.1]})
    elif content == "wrong tensor names":
        _rewrite(path, tensors={"renamed": torch.zeros(1)})
    else:
        info = artifacts.recorded(path)
        artifacts.discard(path)
        artifacts.save(path, None, {"accuracy": 0.5}, info=info)
    with pytest.warns(UserWarning, match=r"unusable artifact .*(KeyError|RuntimeError|TypeError).* recomputed"):
        tensors, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute, check=_strict_check)
    assert not hit and compute.calls == 2 and metrics["calls"] == 2 and set(tensors) == {"w", "idx"}
    with warnings.catch_warnings():  # the recomputed artifact replaced the unusable one on disk
        warnings.simplefilter("error")
        _, metrics, hit = artifacts.cached(cfg, Step("baseline", NAMES), compute, check=_strict_check)
    assert hit and metrics["calls"] == 2


def test_rows_with_check():
    check = artifacts.rows_with("rate", "accuracy")
    check(None, {"rows": [{"rate": 0.5, "accuracy": 0.9, "extra": 1}]})
    check(None, {"rows": []})
    for bad, err in [({}, KeyError), ({"rows": [{"rate": 0.5}]}, KeyError), ({"rows": 3}, TypeError),
                     ({"rows": ["rate accuracy"]}, TypeError)]:
        with pytest.raises(err):
            check(None, bad)


# --- content keys -------------------------------------------------------------------------------

def test_key_without_disk_content_is_the_config_digest_and_compute_kind(tmp_path):
    cfg = config.load("smoke", data_dir=str(tmp_path))  # digits come with scikit-learn, not from disk
    (tmp_path / "anything.txt").write_text("x")
    assert artifacts.content_fingerprint(cfg, NAMES + ("data_dir", "weights")) == ""
    assert artifacts.location(cfg, Step("s", NAMES)).name == f"s-{artifacts.key(cfg.digest(NAMES), 'cpu/fp32')}"


def test_compute_kind_is_in_the_key():
    cfg = config.load("smoke")
    cpu = artifacts.location(cfg, Step("s", NAMES))
    assert artifacts.location(cfg, Step("s", NAMES), kind="cpu/fp32") == cpu  # this machine has no GPU
    gpu = artifacts.location(cfg, Step("s", NAMES), kind="cuda:NVIDIA H200/bf16/channels_last")
    assert gpu != cpu and gpu.parent == cpu.parent
    assert artifacts.location(cfg, Step("s", NAMES), kind="cuda:NVIDIA H200/fp32/channels_last") != gpu
    assert artifacts.location(cfg, Step("s", NAMES), kind="cuda:NVIDIA A100-SXM4-40GB/bf16/channels_last") != gpu
    assert artifacts.location(dataclasses.replace(cfg, precision="bf16"), Step("s", NAMES)) != cpu


def test_cached_results_of_other_devices_are_not_served():
    cfg = config.load("smoke")
    compute = Counter()
    artifacts.cached(cfg, Step("s", NAMES), compute, kind="cuda:NVIDIA H200/bf16/channels_last")
    _, _, hit = artifacts.cached(cfg, Step("s", NAMES), compute)
    assert not hit and compute.calls == 2
    manifest = json.loads((artifacts.location(cfg, Step("s", NAMES)) / artifacts.MANIFEST).read_text())
    assert manifest["info"]["compute"] == "cpu/fp32"


def _unchecked(**changes) -> config.Config:
    """A smoke config pointing at files that only the key looks at: the content key does not
    depend on whether those files would pass config's checks (rclib.experiments.checks, tested elsewhere)."""
    return dataclasses.replace(config.load("smoke"), **changes)


def test_weights_file_content_is_in_the_key(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"first content")
    cfg = _unchecked(weights=str(w))
    names = NAMES + ("weights",)
    first = artifacts.location(cfg, Step("baseline", names))
    assert artifacts.location(cfg, Step("baseline", names)) == first
    assert artifacts.location(cfg, Step("baseline", NAMES)) != first  # only steps that name weights
    # replaced by a new file at the same path (a new inode, another size)
    new = tmp_path / "new.safetensors"
    new.write_bytes(b"second, longer content")
    new.replace(w)
    second = artifacts.location(cfg, Step("baseline", names))
    assert second != first
    # rewritten in place with the same size: the memo trusts (size, mtime) as make does, and
    # timestamps are coarse (a whole tick), so give it a distinct mtime as any later edit has
    st = w.stat()
    w.write_bytes(b"second, LONGER content")
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = artifacts.location(cfg, Step("baseline", names))
    assert third not in (first, second)
    w.write_bytes(b"first content")  # the old bytes give the old key back
    assert artifacts.location(cfg, Step("baseline", names)) == first


def test_replaced_weights_are_not_served_the_old_result(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"old weights")
    cfg = _unchecked(weights=str(w))
    names = NAMES + ("weights",)
    compute = Counter()
    artifacts.cached(cfg, Step("baseline", names), compute)
    assert artifacts.cached(cfg, Step("baseline", names), compute)[2]
    new = tmp_path / "new.safetensors"
    new.write_bytes(b"new weights!")
    new.replace(w)
    _, metrics, hit = artifacts.cached(cfg, Step("baseline", names), compute)
    assert not hit and metrics["calls"] == 2
    info = json.loads((artifacts.location(cfg, Step("baseline", names)) / artifacts.MANIFEST).read_text())["info"]
    assert info["config"]["weights"] == str(w) and len(info["content"]) == 64


def test_weights_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"x" * 1000)
    cfg = _unchecked(weights=str(w))
    calls = []
    real = artifacts._sha256
    monkeypatch.setattr(artifacts, "_sha256", lambda p: calls.append(p) or real(p))
    for step in ("a", "b", "c"):
        artifacts.location(cfg, Step(step, ("weights",)))
    assert calls == [w]


def _image_folder(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(b"png" * (i + 1))
    return root


@pytest.mark.parametrize("change", ["rename", "resize", "touch", "add", "remove"])
def test_image_folder_fingerprint(tmp_path, change):
    folder = _image_folder(tmp_path / "images")
    cfg = _unchecked(dataset="folder", data_dir=str(folder))
    names = ("dataset", "data_dir")
    before = artifacts.location(cfg, Step("baseline", names))
    assert artifacts.location(cfg, Step("baseline", names)) == before
    img = folder / "cat" / "1.png"
    st = img.stat()
    if change == "rename":
        img.rename(folder / "dog" / "9.png")
        os.utime(folder / "dog" / "9.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "resize":
        img.write_bytes(b"a longer image")
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "touch":
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "add":
        (folder / "dog" / "new.png").write_bytes(b"png")
    else:
        img.unlink()
    assert artifacts.location(cfg, Step("baseline", names)) != before


def test_image_folder_fingerprint_reads_no_bytes(tmp_path, monkeypatch):
    folder = _image_folder(tmp_path / "images")
    cfg = _unchecked(dataset="folder", data_dir=str(folder))
    before = artifacts.location(cfg, Step("baseline", ("data_dir",)))
    img = folder / "cat" / "0.png"
    st = img.stat()
    img.write_bytes(b"PNG")  # same size, same mtime: the cheap fingerprint cannot see it
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert artifacts.location(cfg, Step("baseline", ("data_dir",))) == before


def test_torchvision_download_folder_is_fingerprinted(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\0" * 16)
    cfg = _unchecked(dataset="mnist", data_dir=str(tmp_path))
    names = ("dataset", "data_dir")
    before = artifacts.location(cfg, Step("baseline", names))
    (tmp_path / "unrelated.txt").write_text("other data in data_dir does not matter")
    assert artifacts.location(cfg, Step("baseline", names)) == before
    (raw / "train-images-idx3-ubyte").write_bytes(b"\0" * 17)
    assert artifacts.location(cfg, Step("baseline", names)) != before


# --- concurrency --------------------------------------------------------------------------------

WORKERS, SAVES = 6, 40


def _expected():
    return {"w": torch.arange(12.0).reshape(3, 4)}, {"v": [1, 2, 3]}


def _saver(rank, path, barrier, errors):
    """Save the same key SAVES times alongside the other workers; rank 0 first damages or removes
    the artifact in some rounds, so the others race to replace it. Reports every exception."""
    warnings.simplefilter("error")
    tensors, metrics = _expected()
    failures = []
    for i in range(SAVES):
        try:
            barrier.wait()
            if rank == 0 and os.path.lexists(path):
                if i % 4 == 1:
                    artifacts.discard(path)
                    path.write_text("a plain file")
                elif i % 4 == 2:
                    _flip_a_byte(path / artifacts.METRICS, 1)
                elif i % 4 == 3:
                    artifacts.discard(path)
            barrier.wait()
            artifacts.save(path, tensors, metrics)
            barrier.wait()  # every save has returned: the key must hold the expected artifact
            got_t, got_m = artifacts.load(path)
            if got_m != metrics or not torch.equal(got_t["w"], tensors["w"]):
                raise AssertionError(f"round {i}: loaded {got_t}, {got_m}")
        except Exception as err:  # noqa: BLE001 - collect, the test asserts there are none
            failures.append(f"rank {rank} round {i}: {type(err).__name__}: {err}")
            barrier.abort()
            break
    errors.put(failures)


def test_concurrent_saves_of_one_key():
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    path = artifacts.root() / "smoke" / "step-race"
    barrier, errors = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_saver, args=(r, path, barrier, errors)) for r in range(WORKERS)]
    for p in procs:
        p.start()
    failures = [f for _ in procs for f in errors.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert failures == [] and all(p.exitcode == 0 for p in procs)
    tensors, metrics = artifacts.load(path)
    assert metrics == _expected()[1] and torch.equal(tensors["w"], _expected()[0]["w"])
    assert os.listdir(path.parent) == ["step-race"]  # every temporary and trash folder removed


# --- the pipeline's checks: a cached result that cannot serve a chapter is recomputed -----------

def test_baseline_with_wrong_tensor_names_is_recomputed(tiny_cfg):
    from rclib.data import datasets
    from rclib.experiments import steps

    splits = datasets.load(tiny_cfg)
    model, metrics, hit = steps.baseline(tiny_cfg, splits, progress=False)
    assert not hit
    path = artifacts.location(tiny_cfg, steps.BASELINE)
    state = {f"renamed.{k}": v for k, v in model.state_dict().items()}
    _rewrite(path, tensors=state)
    with pytest.warns(UserWarning, match=r"unusable artifact .*RuntimeError.* recomputed"):
        again, metrics2, hit = steps.baseline(tiny_cfg, splits, progress=False)
    assert not hit and metrics2["clean_accuracy"] == metrics["clean_accuracy"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, hit = steps.baseline(tiny_cfg, splits, progress=False)
    assert hit


def test_sweep_rows_missing_a_key_are_recomputed(tiny_model):
    from rclib.data import datasets
    from rclib.experiments import steps

    cfg = config.load("smoke", epsilon=0.1, train_size=128, test_size=64, epochs=1, prune_rates=(0.5,))
    splits = datasets.load(cfg)
    path = artifacts.location(cfg, sizing.SHARE_SWEEP, kind=steps.kind_of(cfg, tiny_model))
    info = artifacts.record(cfg, sizing.SHARE_SWEEP, kind=steps.kind_of(cfg, tiny_model))
    artifacts.save(path, None, {"rows": [{"rate": 0.5, "shared": False}]}, info=info)  # an older row format
    with pytest.warns(UserWarning, match=r"unusable artifact .*KeyError.* recomputed"):
        rows, hit = sizing.share_sweep(cfg, splits, tiny_model, progress=False)
    assert not hit and len(rows) == 2 and all("file_bytes" in r for r in rows)
    assert artifacts.load(path)[1]["rows"] == rows
