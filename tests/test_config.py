"""rclib.config: profiles, overrides, coercion, validation messages, digests."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from rclib import config


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
        config.load("paper", data_dir=str(tmp_path / "absent"))
    cfg = config.load("paper", data_dir=str(tmp_path))
    assert cfg.dataset == "imagenet" and cfg.model == "vgg16" and cfg.weights == "imagenet"


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
        config.load("smoke").digest(("nonsense",))


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
    ("prune_method", dict(prune_method="random")),
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
        config.load("smoke", **overrides)


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="profile") as err:
        config.load("gpu-huge")
    assert "gpu-huge" in str(err.value) and "smoke" in str(err.value)


def test_message_says_what_is_allowed():
    with pytest.raises(ValueError) as err:
        config.load("smoke", dataset="bogus")
    assert "bogus" in str(err.value) and "digits" in str(err.value)
    with pytest.raises(ValueError) as err:
        config.load("smoke", prune_rate=1)
    assert "(0, 1)" in str(err.value)


def test_data_dir_ok_for_disk_dataset(tmp_path):
    cfg = config.load("smoke", dataset="folder", data_dir=str(tmp_path))
    assert config.resolve_path(cfg.data_dir) == tmp_path


def test_resolve_device():
    assert config.resolve_device("cpu") == "cpu"
    assert config.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        config.resolve_device("tpu")
