"""rclib.core.config: profiles, overrides, coercion, validation messages, digests."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from toys import image_folder

from rclib.core import config, params, paths
from rclib.experiments import setup
from rclib.nn import models


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_profiles_load(profile):
    cfg = config.load(profile)
    assert cfg.profile == profile
    for name, value in config.PROFILES[profile].items():
        expected = tuple(float(v) for v in value) if isinstance(value, tuple) else value
        assert getattr(cfg, name) == expected, name


def test_paper_profile_needs_its_data_folder(tmp_path):
    # the paper profile reads ImageNet val from disk; the folder is validated up front
    with pytest.raises(ValueError, match="data_dir"):
        setup.load("paper", data_dir=str(tmp_path / "absent"))
    root = image_folder(tmp_path / "val", ["n01", "n02"], 3, size=(12, 12))
    cfg = config.load("paper", data_dir=str(root), local_examples=1, weights="none", epochs=1)
    with pytest.raises(ValueError, match=r"epochs=0 with weights='none' is not allowed: it trains nothing"):
        setup.load("paper", data_dir=str(root), local_examples=1, weights="none")  # the profile's epochs 0
    assert cfg.dataset == "imagenet" and cfg.model == "vgg16" and config.PROFILES["paper"]["weights"] == "imagenet"


def test_default_profile_is_cpu():
    assert config.load().profile == "cpu"


def test_config_is_frozen_and_hashable():
    a = config.load("smoke")
    b = config.load("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.epsilon = 0.5  # type: ignore[misc]
    assert a == b and hash(a) == hash(b)
    assert len({a, b, config.load("smoke", epsilon=0.2)}) == 2


def test_overrides_and_coercion():
    cfg = config.load("smoke", epsilon=0.2, lr=1, epochs=3.0, batch_norm="False")
    assert cfg.epsilon == 0.2
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.batch_norm is False


def test_yaml_string_and_list_overrides_become_tuples():
    assert config.load("smoke", prune_rates="[0.5, 0.9]").prune_rates == (0.5, 0.9)
    assert config.load("smoke", prune_rates=[0.3, 0.6]).prune_rates == (0.3, 0.6)
    assert config.load("smoke", epsilons=0.1).epsilons == (0.1,)
    assert config.load("smoke", epsilons="[0, 0.1]").epsilons == (0.0, 0.1)
    assert all(isinstance(e, float) for e in config.load("smoke", epsilons=[0, 1]).epsilons)


def test_none_overrides_are_ignored():
    base = config.load("smoke")
    cfg = config.load("smoke", epsilon=None, prune_rates=None, dataset=None)
    assert cfg == base


def test_overrides_do_not_leak_into_profiles():
    before = dict(config.PROFILES["smoke"])
    config.load("smoke", epochs=1, width=4)
    assert config.PROFILES["smoke"] == before
    assert config.load("smoke").epochs == before["epochs"]


def test_digest_tracks_named_fields_only():
    a = config.load("smoke")
    names = ("epsilon", "prune_rate")
    assert a.digest(names) != config.load("smoke", epsilon=0.25).digest(names)
    assert a.digest(names) != config.load("smoke", prune_rate=0.7).digest(names)
    assert a.digest(names) == config.load("smoke", lr=0.5, epochs=2).digest(names)
    assert a.digest(names) == a.digest(tuple(reversed(names)))  # order does not matter
    assert re.fullmatch(r"[0-9a-f]{12}", a.digest(names))
    # the full digest sees every field
    assert a.digest() != config.load("smoke", lr=0.5).digest()


def test_digest_rejects_unknown_fields():
    with pytest.raises(ValueError, match="nonsense"):
        setup.load("smoke").digest(("nonsense",))


def test_validate_returns_good_config_unchanged():
    cfg = config.load("smoke")
    assert config.validate(cfg) is cfg


_NO_DIR = "/nonexistent/rclib-tests/no-such-folder"
_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so device='cuda' is valid")

BAD = [
    ("epsilon", dict(epsilon=-1)),
    ("adv_epsilon", dict(adv_epsilon=-0.1)),
    ("epsilons", dict(epsilons=[0.0, -0.1])),
    ("prune_rate", dict(prune_rate=0)),
    ("prune_rate", dict(prune_rate=1)),
    ("prune_rates", dict(prune_rates=[0.5, 1.2])),
    ("prune_rates", dict(prune_rates="[0.5, 1.2]")),
    ("prune_rates", dict(prune_rates="[0.5, fast]")),
    ("prune_step", dict(prune_step=0)),
    ("conv_bits", dict(conv_bits=0)),
    ("linear_bits", dict(linear_bits=17)),
    ("dataset", dict(dataset="bogus")),
    ("model", dict(model="resnet")),
    ("optimizer", dict(optimizer="rmsprop")),
    ("margin_on", dict(margin_on="softmax")),
    ("device", dict(device="tpu")),
    pytest.param("device", dict(device="cuda"), marks=_CUDA, id="device-cuda-without-gpu"),
    ("batch_size", dict(batch_size=0)),
    ("width", dict(width=-8)),
    ("epochs", dict(epochs=-1)),
    ("train_size", dict(train_size=-5)),
    ("lr", dict(lr=0)),
    ("lr", dict(lr="fast")),
    ("lr", dict(lr=float("nan"))),
    ("epochs", dict(epochs=1.5)),
    ("dropout", dict(dropout=1.0)),
    ("test_fraction", dict(test_fraction=1.0)),
    ("data_dir", dict(dataset="folder", data_dir=_NO_DIR)),
    ("data_dir", dict(dataset="imagenet", data_dir=_NO_DIR)),
    ("weights", dict(weights="/nonexistent/w.safetensors")),
    ("weights", dict(weights="imagenet")),  # only for vgg16
    ("bogus_field", dict(bogus_field=1)),
]


@pytest.mark.parametrize("name, overrides", BAD)
def test_bad_parameter_is_named(name, overrides):
    with pytest.raises(ValueError, match=name):
        setup.load("smoke", **overrides)


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="profile") as err:
        setup.load("gpu-huge")
    assert "gpu-huge" in str(err.value) and "smoke" in str(err.value)


def test_message_says_what_is_allowed():
    with pytest.raises(ValueError) as err:
        setup.load("smoke", dataset="bogus")
    assert "bogus" in str(err.value) and "digits" in str(err.value)
    with pytest.raises(ValueError) as err:
        setup.load("smoke", prune_rate=1)
    assert "(0, 1)" in str(err.value)


def test_data_dir_ok_for_disk_dataset(tmp_path):
    image_folder(tmp_path, ["a", "b"], 3, size=(12, 12))
    cfg = config.load("smoke", dataset="folder", data_dir=str(tmp_path), train_size=0, test_size=0,
                      local_examples=1)
    assert paths.resolve_path(cfg.data_dir) == tmp_path


def test_resolve_device():
    assert config.resolve_device("cpu") == "cpu"
    assert config.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        config.resolve_device("tpu")


# ---------------------------------------------------------------- bad input refused up front
# Each case: (the parameter the message must name, overrides, text the message must contain).
# All are refused by config.load, i.e. in a chapter's first code cell and before `python -m rclib`
# runs anything; none of them may reach training.


def _weights_file(tmp_path, name: str, content: bytes | None = None, tensors=None) -> str:
    path = tmp_path / name
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        path.write_bytes(content)
    return str(path)


def _smoke_state():
    cfg = config.load("smoke")
    from rclib.nn import models

    return models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,)).state_dict()


REFUSED = [
    ("seed", dict(seed=2**32), "4294967295"),
    ("seed", dict(seed=-1), "-1"),
    ("seeds", dict(seeds="[0, 4294967296]"), "4294967295"),
    ("seeds", dict(seeds="[1, 1]"), "distinct"),
    ("seeds", dict(seeds=[0, 2, 0]), "repeated"),
    ("prune_rates", dict(prune_rates="[0.5, 0.5]"), "distinct"),
    ("map_rates", dict(map_rates=[0.3, 0.3]), "distinct"),
    ("epsilons", dict(epsilons=[0.1, 0.1]), "distinct"),
    ("epsilons", dict(epsilons="[0, .inf]"), "finite"),
    ("epsilons", dict(epsilons=[0.0, float("nan")]), "finite"),
    ("prune_rates", dict(prune_rates="[0.5, .nan]"), "finite"),
    ("map_rates", dict(map_rates=[0.3, float("inf")]), "finite"),
    ("resolution", dict(resolution=1), "from 10"),
    ("resolution", dict(resolution=9), "from 10"),
    ("resolution", dict(resolution=100000), "to 2000"),
    ("threads", dict(threads=100000), "cores"),
    ("prune_step", dict(prune_step=1e-9), "1000 steps"),
    ("prune_step", dict(prune_step=1e-4), "1000 steps"),
    ("local_examples", dict(local_examples=5000), "1000"),
    ("local_examples", dict(local_examples=200, test_size=100), "at most 100"),
    ("train_size", dict(train_size=100000), "at most 1437"),
    ("test_size", dict(test_size=5000), "at most 360"),
    ("width", dict(width=1000000), "GB"),
    ("hidden", dict(hidden=10**9), "GB"),
    ("image_size", dict(image_size=100000), "GB"),
    ("batch_size", dict(batch_size=10**9), "GB"),
    ("epsilon", dict(epsilon=float("inf")), "finite"),
    ("lr", dict(lr=float("-inf")), "lr"),
    ("image_size", dict(model="vgg16", batch_norm=False, image_size=8), "can take"),
]


@pytest.mark.parametrize("name, overrides, text", REFUSED, ids=[f"{c[0]}-{i}" for i, c in enumerate(REFUSED)])
def test_bad_value_is_refused_naming_parameter_value_and_rule(name, overrides, text):
    with pytest.raises(ValueError) as err:
        setup.load("smoke", **overrides)
    msg = str(err.value)
    assert f"{name}=" in msg, msg
    assert text in msg, msg


def test_weights_must_be_a_readable_safetensors_file_of_the_model(tmp_path):
    import pickle

    import torch

    cases = {
        "garbage": _weights_file(tmp_path, "garbage.safetensors", b"\xff" * 64),
        "empty": _weights_file(tmp_path, "empty.safetensors", b""),
        "pickle": _weights_file(tmp_path, "pickle.safetensors", pickle.dumps({"a": [1, 2, 3]})),
        "other names": _weights_file(tmp_path, "other.safetensors", tensors={"w": torch.zeros(3)}),
    }
    state = {k: v.clone() for k, v in _smoke_state().items()}
    state["classifier.3.weight"] = torch.zeros(5, state["classifier.3.weight"].shape[1])
    cases["wrong shape"] = _weights_file(tmp_path, "shape.safetensors", tensors=state)
    for what, path in cases.items():
        with pytest.raises(ValueError) as err:
            setup.load("smoke", weights=path)
        msg = str(err.value)
        assert msg.startswith(f"weights={path!r} is not allowed"), (what, msg)
    good = _weights_file(tmp_path, "good.safetensors", tensors={k: v.contiguous() for k, v in _smoke_state().items()})
    assert config.load("smoke", weights=good).weights == good
    # only the head may differ: models.build drops it and pipeline.baseline fits a new one
    state = {k: v.clone() for k, v in _smoke_state().items()}
    state["classifier.6.weight"] = torch.zeros(1000, state["classifier.6.weight"].shape[1])
    state["classifier.6.bias"] = torch.zeros(1000)
    head = _weights_file(tmp_path, "head.safetensors", tensors=state)
    assert config.load("smoke", weights=head).weights == head


def _no_network(monkeypatch, tmp_path):
    """torch.hub's cache in an empty folder, and every probe of the network failing; returns the
    probed addresses."""
    import torch

    from rclib.data import checks

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    probed = []

    def unreachable(url):
        probed.append(url)
        return "URLError: <urlopen error [Errno -2] Name or service not known>"

    monkeypatch.setattr(checks, "reachable", unreachable)
    return probed


def test_imagenet_weights_offline_are_refused_up_front_naming_the_local_file_route(tmp_path, monkeypatch):
    # torch.hub would fail after the data loaded, with a 25-frame URLError and no timeout
    probed = _no_network(monkeypatch, tmp_path)
    root = image_folder(tmp_path / "val", ["n01", "n02"], 3, size=(12, 12))
    with pytest.raises(ValueError) as err:
        setup.load("paper", data_dir=str(root), local_examples=1)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("weights='imagenet' is not allowed")
    cached = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(cached) in msg and "weights=path/to/vgg16.safetensors" in msg and "save_file" in msg
    assert "weights_only=True" in msg and probed == ["https://download.pytorch.org/models/vgg16-397923af.pth"]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # in the cache: no probe at all
    probed.clear()
    assert config.load("paper", data_dir=str(root), local_examples=1).weights == "imagenet" and probed == []


def test_network_probe_has_a_short_timeout_and_never_downloads(monkeypatch):
    import urllib.request

    from rclib.data import checks

    seen = {}

    def fake_urlopen(request, timeout=None):
        seen.update(method=request.get_method(), timeout=timeout)
        raise OSError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert checks.reachable("https://example.invalid/x.pth").startswith("OSError")
    assert seen == {"method": "HEAD", "timeout": checks.PROBE_TIMEOUT} and checks.PROBE_TIMEOUT <= 10


@pytest.mark.parametrize("layout", ["etc-like", "one class", "empty class"])
def test_data_dir_must_be_an_image_folder(tmp_path, layout):
    root = tmp_path / "d"
    if layout == "etc-like":  # sub-folders without images, like /etc
        for name in (".java", "PackageKit", "ssl"):
            (root / name).mkdir(parents=True)
            (root / name / "conf.txt").write_text("x")
    elif layout == "one class":
        image_folder(root, ["only"], 4, size=(12, 12))
    else:
        image_folder(root, ["a", "b"], 3, size=(12, 12))
        (root / "c").mkdir()
    with pytest.raises(ValueError) as err:
        setup.load("smoke", dataset="folder", data_dir=str(root), train_size=0, test_size=0, local_examples=1)
    msg = str(err.value)
    assert msg.startswith(f"data_dir={str(root)!r} is not allowed") and "class" in msg, msg


def test_torchvision_dataset_offline_is_refused_and_nothing_created(tmp_path, monkeypatch):
    from rclib.data import checks

    monkeypatch.setattr(checks, "reachable", lambda url: "URLError: no route")  # as on these machines
    target = tmp_path / "mnist-here"
    with pytest.raises(ValueError) as err:
        setup.load("smoke", dataset="mnist", data_dir=str(target))
    assert "data_dir=" in str(err.value) and "cannot be downloaded" in str(err.value)
    assert not target.exists()


def test_unknown_parameter_suggests_the_close_name():
    with pytest.raises(ValueError) as err:
        setup.load("smoke", epsilom=0.2)
    assert "'epsilom' (did you mean 'epsilon'?)" in str(err.value) and "known parameters" in str(err.value)


def _namespace(injected: str | None, **values):
    history = ["", "# Every field ...\nprofile = 'cpu'\nseed = None\n"]
    if injected is not None:
        history.append(injected)
    return {"In": history, "profile": "smoke", **{n: None for n in config.FIELD_NAMES[1:]}, **values}


def test_from_notebook_takes_every_field_and_refuses_misspelt_injected_names():
    cfg = setup.from_notebook(_namespace('# Parameters\nprofile = "smoke"\nwidth = 4\nseed = 3\n', width=4, seed=3))
    assert (cfg.profile, cfg.width, cfg.seed) == ("smoke", 4, 3)
    with pytest.raises(ValueError, match=r"'epsilom' \(did you mean 'epsilon'\?\)"):
        setup.from_notebook(_namespace('# Parameters\nprofile = "smoke"\nepsilom = 0.2\n', epsilom=0.2))
    # run by hand in JupyterLab: no injected cell, the parameters cell's values are used
    assert setup.from_notebook(_namespace(None, epsilon=0.2)).epsilon == 0.2


def test_parameters_cell_declares_every_field_without_equals_in_comments():
    src = params.parameters_source()
    names = [line.split(" = ")[0] for line in src.splitlines() if not line.startswith("#")]
    assert names == list(config.FIELD_NAMES)
    for line in src.splitlines():
        assert "=" not in line.partition("#")[2], line


def test_table_shows_every_field_that_differs_from_the_profile():
    t = params.table(config.load("smoke", width=4, seed=3), ("profile", "epsilon"))
    assert list(t.index) == ["profile", "epsilon", "seed", "width"]
    assert t.loc["width", "value"] == "4" and t.loc["width", "profile 'smoke' has"] == "8"
    assert t.loc["epsilon", "profile 'smoke' has"] == ""
    assert t.index.name == "parameter (a Config field, set with -p)"  # the rows are field names, and say so


@pytest.mark.parametrize("spec", [
    dict(model="vgg_small", width=16, hidden=256, batch_norm=True, input_shape=[1, 8, 8]),
    dict(model="vgg_small", width=4, hidden=32, batch_norm=False, input_shape=[3, 32, 32]),
    dict(model="vgg16", width=4, hidden=32, batch_norm=True, input_shape=[3, 32, 32]),
    dict(model="vgg16", width=64, hidden=4096, batch_norm=False, input_shape=[3, 224, 224]),
])
def test_layer_outputs_counted_from_shapes_match_a_meta_forward_pass(spec):
    """checks sizes activations from kernel, stride and padding instead of a forward pass on the
    meta device (which costs every chapter 1.5 s of imports); both count the same elements."""
    from torch import nn

    from rclib.nn import checks

    with torch.device("meta"):
        model = models.from_spec(dict(spec, dropout=0.5, num_classes=10, mean=[0.0] * spec["input_shape"][0],
                                      std=[1.0] * spec["input_shape"][0]))
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.numel()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.empty(1, *spec["input_shape"], device="meta"))
    for h in hooks:
        h.remove()
    assert checks.layer_outputs(model, tuple(spec["input_shape"])) == sum(seen)
