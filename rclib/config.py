"""Configuration: named profiles as data, validated into one frozen dataclass (paper App. C).

A profile is a plain dict of overrides on top of :class:`Config`'s defaults. ``load(profile,
**overrides)`` merges, coerces and validates, and returns a frozen, hashable :class:`Config`.
Every bad value raises ``ValueError`` naming the parameter, the value and what is allowed, so a
papermill run with a bad ``-p`` fails in its first cell before anything is written.

Used by every chapter (first code cell) and by ``python -m rclib``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagenet", "folder")
DISK_DATASETS = ("imagenet", "folder")  # read from a folder the user provides
MODELS = ("vgg_small", "vgg16")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")
PRUNE_METHODS = ("global", "layer", "channel", "iterative")
MARGIN_SPACES = ("logits", "probs")


@dataclass(frozen=True)
class Config:
    """Every knob of every chapter. Field comments say what each one means."""

    profile: str = "cpu"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 2  # torch intra-op threads on CPU
    # data (Sec. 3)
    dataset: str = "digits"
    data_dir: str = "data"  # relative paths are taken from the project root
    image_size: int = 8  # digits are natively 8x8
    train_size: int = 0  # 0 means the whole training split
    test_size: int = 0  # 0 means the whole test split
    test_fraction: float = 0.2  # the paper: 10k of the 50k ImageNet val images
    num_workers: int = 0
    # model (App. B)
    model: str = "vgg_small"
    width: int = 16  # channels of the first conv block (VGG16: 64)
    hidden: int = 256  # width of the two hidden linear layers (VGG16: 4096)
    batch_norm: bool = True
    dropout: float = 0.5
    weights: str = "none"  # none | imagenet | path/to/weights.safetensors
    # baseline training
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 30
    # attacks (Eq 8)
    epsilon: float = 0.1  # FGSM strength in pixel units, pixels in [0, 1]
    epsilons: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
    # pruning (Alg 1-5)
    prune_method: str = "global"
    prune_rate: float = 0.5
    prune_rates: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    prune_step: float = 0.1  # r_inc of Alg 5
    retrain_epochs: int = 2
    # weight sharing (Alg 6, Table 2)
    conv_bits: int = 8
    linear_bits: int = 5
    # robust retraining (Alg 7, App. C)
    retrain_optimizer: str = "sgd"
    retrain_lr: float = 0.005
    retrain_momentum: float = 0.9
    retrain_weight_decay: float = 0.005
    adv_epsilon: float = 0.1
    margin_weight: float = 0.1
    margin_on: str = "logits"  # logits | probs (see chapter 04)
    adv_epochs: int = 1
    # decision boundaries (Sec. 3.3)
    map_rates: tuple[float, ...] = (0.3, 0.5, 0.7)  # chapter 03's prune rates for roughness vs robustness
    resolution: int = 100  # grid points per side of a PCA decision map
    local_examples: int = 20  # test inputs whose local maps are averaged
    hurt_rate: float = 0.8  # chapter 04's second global prune rate, where pruning clearly hurts
    seeds: tuple[int, ...] = (0, 1, 2)  # chapter 04 repeats Table 1 with each (mean and spread)

    def digest(self, names: tuple[str, ...] | None = None) -> str:
        """Short hash of the named fields (all when None) and of the rclib source.

        The source fingerprint makes every cached artifact stale when any rclib module
        changes, so a cache can never serve results computed by older code.
        """
        names = tuple(f.name for f in fields(self)) if names is None else names
        unknown = [n for n in names if n not in FIELD_NAMES]
        if unknown:
            raise ValueError(f"digest: unknown config fields {unknown}")
        payload = json.dumps({n: getattr(self, n) for n in sorted(names)}, sort_keys=True)
        h = hashlib.sha256(payload.encode())
        h.update(source_fingerprint().encode())
        return h.hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(Config))
_TYPES = {f.name: f.type for f in fields(Config)}

# A profile is data: overrides of Config's defaults. Comments give the purpose.
PROFILES: dict[str, dict[str, Any]] = {
    # seconds on a CPU: tests and CI execute every chapter with it
    "smoke": dict(
        threads=1, train_size=512, test_size=128, width=8, hidden=64, batch_size=64,
        epochs=12, lr=3e-3, epsilons=(0.0, 0.1, 0.2), prune_rates=(0.5, 0.9), retrain_epochs=1,
        seeds=(0, 1), map_rates=(0.5,), resolution=40, local_examples=4,
    ),
    # minutes on a laptop CPU: the published book
    "cpu": dict(),
    # the paper's setting on a GPU: ImageNet val 40k/10k, torchvision VGG16 with ImageNet weights
    "paper": dict(
        dataset="imagenet", data_dir="data/imagenet/val", image_size=224, model="vgg16",
        weights="imagenet", batch_norm=False, epochs=0, batch_size=128, num_workers=4,
        optimizer="sgd", lr=0.005, weight_decay=0.005, epsilon=0.03,
        epsilons=(0.0, 0.005, 0.01, 0.02, 0.03, 0.05), prune_rate=0.5,
        prune_rates=(0.1, 0.3, 0.5, 0.7, 0.9), retrain_epochs=1, adv_epsilon=0.03,
    ),
}
DEFAULT_PROFILE = "cpu"


def project_root() -> Path:
    """The checkout holding rclib when run from source, else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def resolve_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


_FINGERPRINT: str | None = None


def source_fingerprint() -> str:
    """sha256 over the text of every rclib/*.py, computed once per process."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        h = hashlib.sha256()
        for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _FINGERPRINT = h.hexdigest()
    return _FINGERPRINT


def resolve_device(device: str = "auto") -> str:
    """'auto' gives 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is an error."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not allowed; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    return device


def _coerce(name: str, value: Any) -> Any:
    """Turn papermill/CLI values (ints for floats, lists or YAML strings for tuples) into the field's type."""
    kind = _TYPES[name]
    bad = f"{name}={value!r} has the wrong type; expected {kind}"
    if kind.startswith("tuple"):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"{bad} (a list such as [0.5, 0.9])") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{bad} (a non-empty list such as [0.5, 0.9])")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} contains {v!r}; every entry must be a number")
            if kind == "tuple[int, ...]":
                if not float(v).is_integer():
                    raise ValueError(f"{name} contains {v!r}; every entry must be a whole number")
                v = int(v)
            out.append(v if kind == "tuple[int, ...]" else float(v))
        return tuple(out)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"{bad} (True or False)")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{bad} (a whole number)")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{bad} (a number)")
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{bad} (a string)")
    return value


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def validate(cfg: Config) -> Config:
    """Raise ValueError naming the first bad field; return cfg unchanged when all are fine."""
    _check(cfg.profile in PROFILES, "profile", cfg.profile, f"one of {', '.join(PROFILES)}")
    _check(cfg.device in DEVICES, "device", cfg.device, f"one of {', '.join(DEVICES)}")
    resolve_device(cfg.device)
    _check(cfg.dataset in DATASETS, "dataset", cfg.dataset, f"one of {', '.join(DATASETS)}")
    _check(cfg.model in MODELS, "model", cfg.model, f"one of {', '.join(MODELS)}")
    for name, choices in (("optimizer", OPTIMIZERS), ("retrain_optimizer", OPTIMIZERS),
                          ("prune_method", PRUNE_METHODS), ("margin_on", MARGIN_SPACES)):
        _check(getattr(cfg, name) in choices, name, getattr(cfg, name), f"one of {', '.join(choices)}")
    for name in ("threads", "image_size", "width", "hidden", "batch_size", "resolution", "local_examples"):
        _check(getattr(cfg, name) > 0, name, getattr(cfg, name), "a positive whole number")
    for name in ("seed", "train_size", "test_size", "num_workers", "epochs", "retrain_epochs", "adv_epochs"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), "a whole number >= 0")
    for name in ("lr", "retrain_lr"):
        _check(getattr(cfg, name) > 0, name, getattr(cfg, name), "a learning rate > 0")
    for name in ("momentum", "retrain_momentum", "dropout"):
        _check(0 <= getattr(cfg, name) < 1, name, getattr(cfg, name), "a number in [0, 1)")
    for name in ("weight_decay", "retrain_weight_decay", "margin_weight", "epsilon", "adv_epsilon"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), "a number >= 0")
    _check(all(e >= 0 for e in cfg.epsilons), "epsilons", cfg.epsilons, "every epsilon >= 0")
    _check(0 < cfg.test_fraction < 1, "test_fraction", cfg.test_fraction, "a fraction in (0, 1)")
    _check(0 < cfg.prune_rate < 1, "prune_rate", cfg.prune_rate, "a prune rate in (0, 1)")
    _check(all(0 < r < 1 for r in cfg.prune_rates), "prune_rates", cfg.prune_rates,
           "every prune rate in (0, 1)")
    _check(all(0 < r < 1 for r in cfg.map_rates), "map_rates", cfg.map_rates, "every prune rate in (0, 1)")
    _check(0 < cfg.hurt_rate < 1, "hurt_rate", cfg.hurt_rate, "a prune rate in (0, 1)")
    _check(all(v >= 0 for v in cfg.seeds), "seeds", cfg.seeds, "whole numbers >= 0")
    _check(0 < cfg.prune_step < 1, "prune_step", cfg.prune_step, "a step in (0, 1)")
    for name in ("conv_bits", "linear_bits"):
        _check(1 <= getattr(cfg, name) <= 16, name, getattr(cfg, name), "a bit width from 1 to 16")
    if cfg.dataset in DISK_DATASETS:
        root = resolve_path(cfg.data_dir)
        _check(root.is_dir(), "data_dir", cfg.data_dir,
               f"dataset {cfg.dataset!r} reads images from disk, and {root} is not an existing folder "
               "(an ImageFolder: one sub-folder per class)")
    if cfg.weights not in ("none", "imagenet"):
        path = resolve_path(cfg.weights)
        _check(path.suffix == ".safetensors" and path.is_file(), "weights", cfg.weights,
               "'none', 'imagenet', or an existing .safetensors file")
    if cfg.weights == "imagenet":
        _check(cfg.model == "vgg16", "weights", cfg.weights, "'imagenet' weights exist only for model='vgg16'")
    return cfg


def load(profile: str = DEFAULT_PROFILE, **overrides: Any) -> Config:
    """Build the validated config of a profile, with overrides; ``None`` overrides are ignored.

    Args:
        profile: one of ``PROFILES`` (``smoke``, ``cpu``, ``paper``); default ``cpu``.
        **overrides: any Config field. Lists may be given as a YAML string (``"[0.5, 0.9]"``).
            A value of ``None`` means "keep the profile's value", which is what the chapters'
            parameters cells use by default.

    Returns:
        A frozen :class:`Config`.

    Raises:
        ValueError: naming the parameter, the bad value and what is allowed.

    Example:
        >>> cfg = load("smoke", epsilon=0.2)
        >>> cfg.epsilon
        0.2

    Used by every chapter's first code cell and by ``python -m rclib``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not allowed: one of {', '.join(PROFILES)}")
    values: dict[str, Any] = dict(PROFILES[profile])
    for name, value in overrides.items():
        if name not in FIELD_NAMES or name == "profile":
            raise ValueError(f"unknown parameter {name!r}; known parameters: {', '.join(FIELD_NAMES[1:])}")
        if value is not None:
            values[name] = value
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    return validate(Config(profile=profile, **coerced))


def configure_torch(cfg: Config) -> str:
    """Seed everything, set the thread count, and return the device to use.

    ``OMP_WAIT_POLICY=PASSIVE`` must be set before torch starts its thread pool; the runner and
    the tests set it, and this sets it for notebooks started some other way (see DESIGN pitfalls).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import random

    import numpy as np
    import torch

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return resolve_device(cfg.device)


def table(cfg: Config, names: tuple[str, ...] | None = None):
    """The effective configuration as a two-column DataFrame (shown at the top of each chapter)."""
    import pandas as pd

    names = FIELD_NAMES if names is None else names
    return pd.DataFrame({"parameter": list(names), "value": [str(getattr(cfg, n)) for n in names]}).set_index("parameter")
