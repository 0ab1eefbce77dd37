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
import reprlib
from dataclasses import dataclass, fields
from typing import Any

import yaml

from rclib.core.paths import source_fingerprint

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagenet", "folder")
DISK_DATASETS = ("imagenet", "folder")  # read from a folder the user provides
MODELS = ("vgg_small", "vgg16")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")
MARGIN_SPACES = ("logits", "probs")
SIZE_MODELS = ("vgg16", "small")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Config:
    """Every knob of every chapter. Field comments say what each one means."""

    profile: str = "cpu"  # named set of defaults: smoke | cpu | paper
    seed: int = 0  # random seed: data split, initialisation, training order
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # CPU intra-op threads, ignored on CUDA (one: 2.4x faster than two for the small models here)
    # data (Sec. 3)
    dataset: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | imagenet | folder
    data_dir: str = "data"  # dataset folder; relative paths start at the project root
    image_size: int = 8  # input height and width in pixels (digits are natively 8x8)
    train_size: int = 0  # training images to use; 0 means all
    test_size: int = 0  # test images to use; 0 means all
    test_fraction: float = 0.2  # share of the images held out for testing (paper: 10k of 50k)
    num_workers: int = 0  # data-loading worker processes
    pin_memory: bool = True  # page-locked host batches, so copies to the GPU can overlap compute (CUDA only)
    persistent_workers: bool = True  # keep data-loading workers alive between epochs (with num_workers > 0)
    decoded_cache: bool = True  # folder datasets: keep the decoded, resized test images on disk as uint8 tensors
    # model (App. B)
    model: str = "vgg_small"  # vgg_small (VGG16 topology for small inputs) | vgg16 (torchvision; scaled by width and hidden)
    width: int = 16  # channels of the first conv block (VGG16: 64)
    hidden: int = 256  # width of the two hidden linear layers (VGG16: 4096)
    batch_norm: bool = True  # BatchNorm after every convolution
    dropout: float = 0.5  # dropout probability in the classifier
    weights: str = "none"  # none | imagenet | path/to/weights.safetensors
    head_epochs: int = 1  # epochs fitting a new classifier head when the weights have another class count
    # baseline training
    optimizer: str = "adam"  # optimiser of the baseline: adam | sgd
    lr: float = 1e-3  # learning rate of the baseline
    momentum: float = 0.9  # SGD momentum of the baseline
    weight_decay: float = 0.0  # weight decay of the baseline
    batch_size: int = 64  # examples per training batch
    eval_batch_size: int = 512  # examples per batch when evaluating and attacking (no parameter gradients)
    # accelerator (each applies on CUDA only; CPU runs stay fp32, NCHW and deterministic)
    non_blocking: bool = True  # asynchronous host-to-GPU copies (CUDA only)
    cudnn_benchmark: bool = True  # cuDNN times and picks the fastest convolution algorithms (CUDA only)
    channels_last: bool = True  # NHWC memory layout for convolutions (CUDA only)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    epochs: int = 30  # baseline training epochs
    # attacks (Eq 8)
    epsilon: float | str = "match"  # FGSM strength of every robust number set beside the paper's: match (where the baselines keep Table 1's 12.0 %, found in chapter 00) or a number in pixel units
    epsilons: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # FGSM strengths of the robustness curves
    # pruning (Alg 1-5)
    prune_rate: float = 0.5  # the single prune rate of Table 1 and Figures 2 and 4
    prune_rates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # prune rates of the sweeps
    prune_step: float = 0.1  # r_inc of Alg 5, the increment of each iterative pruning step
    retrain_epochs: int = 2  # retraining epochs after each iterative pruning step
    latency_batch: int = 256  # the large batch of chapter 01's latency figure (the small one is 1)
    latency_repeats: int = 30  # timed forward passes per model and batch in chapter 01's latency figure
    # weight sharing (Alg 6, Table 2)
    conv_bits: int = 8  # weight-sharing index bits of convolutions
    linear_bits: int = 5  # weight-sharing index bits of linear layers
    size_model: str = "vgg16"  # chapter 02's real-file check: vgg16 (about 30 s, 6 GB) | small (a stand-in, for tests)
    # robust retraining (Alg 7, App. C)
    retrain_optimizer: str = "sgd"  # optimiser of all retraining: sgd | adam
    retrain_lr: float = 0.005  # learning rate of all retraining
    retrain_momentum: float = 0.9  # momentum of all retraining
    retrain_weight_decay: float = 0.005  # weight decay of all retraining
    adv_epsilon: float | str = "epsilon"  # FGSM strength inside Algorithm 7: epsilon (the same, as in the paper) or a number
    margin_weight: float = 0.1  # lambda of Eq. 10, the weight of the margin penalty
    margin_on: str = "logits"  # logits | probs: where the margin is measured (see chapter 04)
    adv_epochs: int = 1  # epochs of Algorithm 7 (the paper: 1)
    # decision boundaries (Sec. 3.3)
    map_rates: tuple[float, ...] = (0.2, 0.4, 0.5)  # chapter 03's prune rates for roughness vs robustness
    resolution: int = 100  # grid points per side of a PCA decision map
    local_examples: int = 12  # test inputs whose local maps are averaged (12: the cpu book's 10-minute budget)
    local_resolution: int = 41  # grid points per side of each local decision map
    hurt_rate: float = 0.7  # chapter 04's second global prune rate, where pruning clearly hurts
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # seeds of the repeated runs (mean and spread)
    # stronger attacks (chapter 05, beyond the paper)
    attack_sample: int = 100  # test inputs (a seeded sample) for chapter 05's expensive attacks and curves (100: one input is 1 point)
    apgd_steps: int = 100  # iterations of chapter 05's APGD-CE and of each APGD-T target (AutoAttack: 100)
    apgd_targets: int = 3  # target classes of chapter 05's APGD-T (AutoAttack: 9)
    square_queries: int = 300  # queries per input of chapter 05's black-box Square attack (AutoAttack: 5000)

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
# Fields that take a number or one word: the word defers the number to a later, measured step
WORDS = {"epsilon": "match", "adv_epsilon": "epsilon"}

# A profile is data: overrides of Config's defaults. Comments give the purpose.
PROFILES: dict[str, dict[str, Any]] = {
    # seconds on a CPU: tests and CI execute every chapter with it
    "smoke": dict(
        threads=1, train_size=512, test_size=128, width=8, hidden=64, batch_size=64,
        epochs=12, lr=3e-3, epsilons=(0.0, 0.1, 0.2), prune_rates=(0.5, 0.9), retrain_epochs=1,
        seeds=(0, 1), map_rates=(0.5,), resolution=40, local_examples=4, local_resolution=21, size_model="small",
        attack_sample=20, apgd_steps=10, apgd_targets=2, square_queries=50,
        latency_batch=64, latency_repeats=5,
    ),
    # minutes on a laptop CPU: the published book
    "cpu": dict(),
    # the paper's setting on a GPU: ImageNet val 40k/10k, torchvision VGG16 with ImageNet weights
    "paper": dict(
        dataset="imagenet", data_dir="data/imagenet/val", image_size=224, model="vgg16", width=64, hidden=4096,
        weights="imagenet", batch_norm=False, epochs=0, batch_size=128, eval_batch_size=128, num_workers=4,
        optimizer="sgd", lr=0.005, weight_decay=0.005, epsilon=0.03,
        epsilons=(0.0, 0.005, 0.01, 0.02, 0.03, 0.05), prune_rate=0.5,
        prune_rates=(0.1, 0.3, 0.5, 0.7, 0.9), retrain_epochs=1,
    ),
}
DEFAULT_PROFILE = "cpu"

MAX_SEED = 2**32 - 1
MIN_RESOLUTION, MAX_RESOLUTION = 10, 2000
MAX_PRUNE_STEPS = 1000
MAP_POINTS = 1000  # test inputs that fit a PCA plane: all of digits' 360, a sample of ImageNet's 10k


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


MAX_TEXT = 100_000  # characters of one parameter's value; longer is refused before it is parsed
MAX_ENTRIES = 10_000  # entries of one list parameter (seeds, prune rates, ...)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxstring, _SHORT.maxother = 2, 10, 10, 80, 80


def shown(value: Any) -> str:
    """``repr(value)`` bounded in size and cost whatever the value (a YAML alias bomb is a small
    object whose full repr is gigabytes): what every error message of this module prints."""
    return _SHORT.repr(value)


def _coerce(name: str, value: Any) -> Any:
    """Turn papermill/CLI values (ints for floats, lists or YAML strings for tuples) into the field's type.
    The cost is bounded whatever the value: text beyond ``MAX_TEXT`` characters and lists beyond
    ``MAX_ENTRIES`` entries are refused before they are parsed or judged."""
    kind = _TYPES[name]
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"{name}={shown(value)} is not allowed: at most {MAX_TEXT:,} characters ({len(value):,} given)")
    bad = f"{name}={shown(value)} has the wrong type; expected {kind}"
    if kind.startswith("tuple"):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"{bad} (a list such as [0.5, 0.9])") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{name}={shown(value)} has the wrong type; expected {kind} (a non-empty list such "
                             "as [0.5, 0.9])")
        if len(value) > MAX_ENTRIES:
            raise ValueError(f"{name}={shown(value)} is not allowed: at most {MAX_ENTRIES:,} entries ({len(value):,} given)")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}={shown(value)} is not allowed: every entry must be a number "
                                 f"({shown(v)} is not)")
            if kind == "tuple[int, ...]":
                if not float(v).is_integer():
                    raise ValueError(f"{name}={shown(value)} is not allowed: every entry must be a whole number "
                                     f"({v!r} is not)")
                v = int(v)
            elif not math.isfinite(v):
                raise ValueError(f"{name}={shown(value)} is not allowed: every entry must be a finite number "
                                 f"({v!r} is not)")
            out.append(v if kind == "tuple[int, ...]" else float(v))
        seen: set = set()
        repeated = sorted({v for v in out if v in seen or seen.add(v)})  # one pass: bounded cost
        if repeated:  # refused, not silently de-duplicated: a repeated rate or seed is a typo
            raise ValueError(f"{name}={shown(tuple(out))} is not allowed: every entry must be distinct "
                             f"({', '.join(map(str, repeated))} repeated)")
        return tuple(out)
    if kind == "float | str":  # a number, or the field's one word (WORDS)
        word = WORDS[name]
        if isinstance(value, str):
            if value.strip().lower() == word:
                return word
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not allowed: {word!r} or a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{bad} ({word!r} or a number)")
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not allowed: {word!r} or a finite number")
        return float(value)
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
            raise ValueError(f"{name}={value!r} is not allowed: a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{bad} (a string)")
    return value


def refuse(name: str, value: Any, allowed: str) -> None:
    """Raise the one error every refusal of a parameter gives: its name, its value, what is allowed.
    A path-length text shows whole (a reader must see which file); anything longer is bounded.
    Used here, by ``data.checks`` and ``nn.checks``."""
    text = repr(value) if isinstance(value, str) and len(value) <= 4096 else shown(value)
    raise ValueError(f"{name}={text} is not allowed: {allowed}")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        refuse(name, value, allowed)


def validate(cfg: Config) -> Config:
    """Raise ValueError naming the first bad field; return cfg unchanged when all are fine."""
    _check(cfg.profile in PROFILES, "profile", cfg.profile, f"one of {', '.join(PROFILES)}")
    _check(cfg.device in DEVICES, "device", cfg.device, f"one of {', '.join(DEVICES)}")
    resolve_device(cfg.device)
    _check(cfg.dataset in DATASETS, "dataset", cfg.dataset, f"one of {', '.join(DATASETS)}")
    _check(cfg.model in MODELS, "model", cfg.model, f"one of {', '.join(MODELS)}")
    for name, choices in (("optimizer", OPTIMIZERS), ("retrain_optimizer", OPTIMIZERS),
                          ("margin_on", MARGIN_SPACES),
                          ("size_model", SIZE_MODELS), ("precision", PRECISIONS)):
        _check(getattr(cfg, name) in choices, name, getattr(cfg, name), f"one of {', '.join(choices)}")
    for name in ("threads", "image_size", "width", "hidden", "batch_size", "eval_batch_size", "local_examples",
                 "attack_sample", "apgd_steps", "apgd_targets", "square_queries", "latency_batch", "latency_repeats"):
        _check(getattr(cfg, name) > 0, name, getattr(cfg, name), "a positive whole number")
    for name in ("train_size", "test_size", "num_workers", "epochs", "retrain_epochs", "adv_epochs", "head_epochs"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), "a whole number >= 0")
    seed_range = f"a whole number from 0 to {MAX_SEED} (numpy and scikit-learn take 32-bit seeds)"
    _check(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, seed_range)
    _check(all(0 <= v <= MAX_SEED for v in cfg.seeds), "seeds", cfg.seeds, f"every seed {seed_range}")
    cores = os.cpu_count() or 1
    _check(cfg.threads <= cores, "threads", cfg.threads, f"at most {cores}, the CPU cores of this machine")
    for name in ("resolution", "local_resolution"):
        _check(MIN_RESOLUTION <= getattr(cfg, name) <= MAX_RESOLUTION, name, getattr(cfg, name),
               f"a whole number from {MIN_RESOLUTION} (coarser maps cannot show a boundary's shape) "
               f"to {MAX_RESOLUTION}")
    _check(cfg.local_examples <= MAP_POINTS, "local_examples", cfg.local_examples,
           f"at most {MAP_POINTS}: local maps are drawn from the {MAP_POINTS} inputs of the PCA maps")
    for name in ("lr", "retrain_lr"):
        _check(getattr(cfg, name) > 0, name, getattr(cfg, name), "a learning rate > 0")
    for name in ("momentum", "retrain_momentum", "dropout"):
        _check(0 <= getattr(cfg, name) < 1, name, getattr(cfg, name), "a number in [0, 1)")
    for name in ("weight_decay", "retrain_weight_decay", "margin_weight"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), "a number >= 0")
    for name, word in WORDS.items():
        value = getattr(cfg, name)
        _check(value == word or (not isinstance(value, (str, bool)) and value >= 0), name, value,
               f"{word!r} or a number >= 0")
    _check(all(e >= 0 for e in cfg.epsilons), "epsilons", cfg.epsilons, "every epsilon >= 0")
    _check(0 < cfg.test_fraction < 1, "test_fraction", cfg.test_fraction, "a fraction in (0, 1)")
    _check(0 < cfg.prune_rate < 1, "prune_rate", cfg.prune_rate, "a prune rate in (0, 1)")
    _check(all(0 < r < 1 for r in cfg.prune_rates), "prune_rates", cfg.prune_rates,
           "every prune rate in (0, 1)")
    _check(all(0 < r < 1 for r in cfg.map_rates), "map_rates", cfg.map_rates, "every prune rate in (0, 1)")
    _check(0 < cfg.hurt_rate < 1, "hurt_rate", cfg.hurt_rate, "a prune rate in (0, 1)")
    _check(0 < cfg.prune_step < 1, "prune_step", cfg.prune_step, "a step in (0, 1)")
    top = max(cfg.prune_rates + cfg.map_rates)
    _check(top / cfg.prune_step <= MAX_PRUNE_STEPS, "prune_step", cfg.prune_step,
           f"a step of at least {top / MAX_PRUNE_STEPS:.3g}: Algorithm 5 retrains after every step, "
           f"and reaching the largest rate {top:g} must take at most {MAX_PRUNE_STEPS} steps")
    for name in ("conv_bits", "linear_bits"):
        _check(1 <= getattr(cfg, name) <= 16, name, getattr(cfg, name), "a bit width from 1 to 16")
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
            raise ValueError(unknown_message([name]))
        if value is not None:
            values[name] = value
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    epsilon, adv = coerced.get("epsilon", Config.epsilon), coerced.get("adv_epsilon", Config.adv_epsilon)
    if adv == WORDS["adv_epsilon"] and epsilon != WORDS["epsilon"]:
        coerced["adv_epsilon"] = epsilon  # Alg 7 trains at the fixed epsilon; with "match", once it is found
    return validate(Config(profile=profile, **coerced))


def unknown_message(names: list[str]) -> str:
    """The error for parameters that are not Config fields, with the closest known names."""
    import difflib

    hints = [f"{n!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, FIELD_NAMES, 1))
             else repr(n) for n in names]
    return (f"unknown parameter{'s' if len(names) > 1 else ''} {', '.join(hints)}; "
            f"known parameters: profile, {', '.join(FIELD_NAMES[1:])}")


def profile_config(profile: str) -> Config:
    """The profile's own values, without overrides and without the checks of :func:`validate`
    (the reference that :func:`table` and error messages compare a run's config with)."""
    return Config(profile=profile, **{n: _coerce(n, v) for n, v in PROFILES[profile].items()})


