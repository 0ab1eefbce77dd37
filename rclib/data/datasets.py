"""Datasets and loaders (paper Sec. 3): pixels stay in [0, 1]; normalisation lives in the model.

Keeping inputs in pixel space means an FGSM step of size epsilon and the clamp to [0, 1] mean
the same thing for every dataset; the model's first layer (``models.Normalize``) standardises.

Datasets:
    digits         scikit-learn's 8x8 handwritten digits (embedded, no download), seeded
                   stratified split.
    mnist, fashion_mnist, cifar10
                   torchvision, downloaded into ``data_dir`` when missing.
    imagenet       an ILSVRC2012 validation folder laid out as ImageFolder (one sub-folder per
                   class), resized 256 / centre-cropped 224, split 40k/10k as in the paper
                   (``test_fraction`` of the images, 0.2 by default, are the test set) by a
                   stratified seeded split (:func:`stratified_split`): 10 of each class's 50.
    folder         any ImageFolder, resized and centre-cropped to ``image_size``, same split.

Folder images of any mode (grayscale, CMYK, RGBA, palette, 16-bit) load as RGB
(:func:`rgb_loader`). With ``decoded_cache`` the folder test set is decoded once and read back as
uint8 tensors (:mod:`rclib.data.decoded`). Loaders take ``num_workers``, ``pin_memory`` (only on
CUDA) and ``persistent_workers`` (only with workers) from the config (:func:`loader_options`).

Used by every chapter (``datasets.load(cfg)``; ``spread_sample`` for the decision maps' inputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from rclib.core import artifacts, walk
from rclib.core.config import Config, resolve_device
from rclib.core.paths import resolve_path, source_fingerprint
from rclib.data import checks, decoded
from rclib.data.split import stratified_split, take_round_robin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Splits:
    """What ``load`` returns: loaders plus what a model needs to know about the inputs."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]  # per channel, for the model's Normalize layer
    std: tuple[float, ...]
    class_names: list[str]


def _limit(indices: list[int], size: int, seed: int) -> list[int]:
    """Keep ``size`` of ``indices`` (all when size is 0), chosen by a seeded permutation."""
    if size == 0 or size >= len(indices):
        return indices
    keep = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))[:size]
    return sorted(indices[i] for i in keep.tolist())


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


DIGITS_FOLDER = "digits"  # under the artifact root: load_digits and its split, per seed


def _digits_split(cfg: Config) -> dict[str, torch.Tensor]:
    """scikit-learn's digits (``x`` (1797, 1, 8, 8) in [0, 1], ``y``) and their seeded stratified
    split (``train``, ``test``: sorted indices), kept under the artifact root once computed.

    Why a cache: importing ``sklearn.datasets`` and ``sklearn.model_selection`` costs 1.5-1.8 s of
    CPU in every process that loads digits (every chapter's kernel, every torchrun rank, every
    test), more than reading these arrays. The entry is keyed by the seed, the test fraction,
    scikit-learn's version (a release could split differently) and the rclib source (as every
    artifact is), written atomically by whichever process gets there first (under torchrun any
    rank: the content is the same) and verified like every artifact; a read-only cache only means
    the arrays are recomputed."""
    path = artifacts.root() / DIGITS_FOLDER / (f"seed{cfg.seed}-test{cfg.test_fraction!r}-sklearn{version('scikit-learn')}"
                                               f"-src{source_fingerprint()[:12]}")
    found = artifacts.load(path)
    if found is not None and found[0] is not None and set(found[0]) == {"x", "y", "train", "test"}:
        return found[0]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(d.target)), test_size=cfg.test_fraction, stratify=d.target, random_state=cfg.seed
    )
    arrays = {"x": torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1),  # (N, 1, 8, 8) in [0, 1]
              "y": torch.tensor(d.target, dtype=torch.long),
              "train": torch.tensor(sorted(train_idx.tolist())), "test": torch.tensor(sorted(test_idx.tolist()))}
    artifacts.try_write(lambda: artifacts.save(path, arrays, {"n": len(d.target)}), path)
    return arrays


def _digits(cfg: Config):
    arrays = _digits_split(cfg)
    x, y = arrays["x"], arrays["y"]
    if cfg.image_size != 8:
        x = torch.nn.functional.interpolate(x, size=cfg.image_size, mode="bilinear", align_corners=False)
    train_idx = _limit(arrays["train"].tolist(), cfg.train_size, cfg.seed)
    test_idx = _limit(arrays["test"].tolist(), cfg.test_size, cfg.seed)
    train = TensorDataset(x[train_idx], y[train_idx])
    test = TensorDataset(x[test_idx], y[test_idx])
    mean, std = _channel_stats(x[train_idx])
    return train, test, 10, [str(i) for i in range(10)], mean, std


def _torchvision(cfg: Config):
    from torchvision import transforms as T

    cls = checks.torchvision_class(cfg.dataset)
    root = resolve_path(cfg.data_dir)
    # refuses, before anything is created under data_dir, when the files are absent and no
    # mirror answers; only then may torchvision create folders and download
    download = not checks.ensure_downloadable(cfg)
    if download:
        root.mkdir(parents=True, exist_ok=True)
    tf = T.Compose([T.Resize(cfg.image_size), T.ToTensor()])
    train = cls(str(root), train=True, download=download, transform=tf)
    test = cls(str(root), train=False, download=download, transform=tf)
    train = Subset(train, _limit(list(range(len(train))), cfg.train_size, cfg.seed))
    test = Subset(test, _limit(list(range(len(test))), cfg.test_size, cfg.seed))
    # statistics from (up to) 2048 training images: enough for a per-channel mean/std
    probe = torch.stack([train[i][0] for i in range(min(len(train), 2048))])
    mean, std = _channel_stats(probe)
    return train, test, len(train.dataset.classes), list(train.dataset.classes), mean, std


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillow opens 16-bit PNGs


def rgb_loader(path: str) -> Any:
    """The folder datasets' image loader: torchvision's (``Image.convert("RGB")``, which handles
    grayscale, 1-bit, palette, RGBA and CMYK), except for 16-bit grayscale, which Pillow's
    convert clips at 255 (nearly white images); those are scaled to 8 bits first."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode in SIXTEEN_BIT_MODES:
            wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
            img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # rounded to 8 bits
        return img.convert("RGB")


def _bounded_folder(image_folder: type) -> type:
    """torchvision's ``ImageFolder`` listing its samples with :func:`rclib.core.walk.files` instead of
    ``os.walk(followlinks=True)``: the same samples in the same order, except that a link cycle
    (a class folder holding ``a -> .``) ends instead of hanging, and the walk is bounded."""
    class BoundedFolder(image_folder):
        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            samples = []
            for name in sorted(class_to_idx):
                for here, e in walk.files(os.path.join(directory, name)):
                    path = os.path.join(here, e.name)
                    if (is_valid_file(path) if is_valid_file is not None
                            else e.name.lower().endswith(tuple(extensions))):
                        samples.append((path, class_to_idx[name]))
            return samples
    return BoundedFolder


def _image_folder(cfg: Config):
    import copy

    from torchvision import datasets
    from torchvision import transforms as T

    root = resolve_path(cfg.data_dir)
    if cfg.dataset == "imagenet":
        # the standard ImageNet evaluation transform: resize 256, centre-crop 224
        resize = round(cfg.image_size * 256 / 224)
    else:
        resize = cfg.image_size
    geometry = [T.Resize(resize), T.CenterCrop(cfg.image_size)]
    full = _bounded_folder(datasets.ImageFolder)(str(root), transform=T.Compose([*geometry, T.ToTensor()]),
                                                 loader=rgb_loader)
    if len(full) < 2:
        raise ValueError(f"data_dir={cfg.data_dir!r} holds {len(full)} images; an ImageFolder needs at least 2")
    paths = [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in full.samples]
    train_groups, test_groups = stratified_split(paths, full.targets, cfg.test_fraction, cfg.seed)
    train = Subset(full, sorted(take_round_robin(train_groups, cfg.train_size, cfg.seed, full.classes)))
    test_idx = sorted(take_round_robin(test_groups, cfg.test_size, cfg.seed, full.classes))
    if cfg.decoded_cache:

        pixels = copy.copy(full)  # same samples, uint8 pixels: what the cache stores
        pixels.transform = T.Compose([*geometry, T.PILToTensor()])
        test = decoded.load_or_build(cfg, pixels, test_idx, [full.targets[i] for i in test_idx], resize,
                                     workers=cfg.num_workers)
    else:
        test = Subset(full, test_idx)
    return train, test, len(full.classes), list(full.classes), IMAGENET_MEAN, IMAGENET_STD


def loader_options(cfg: Config, device: str | torch.device, dataset: Dataset | None = None) -> dict[str, Any]:
    """``DataLoader`` keywords from the config: ``num_workers``; ``pin_memory`` only when
    ``device`` is CUDA (page-locked batches only help copies to a GPU); ``persistent_workers``
    only with workers (torch refuses it without). A dataset already in memory as tensors
    (digits, the decoded cache) is read in the main process: workers would only add copies."""
    workers = 0 if _in_memory(dataset) else cfg.num_workers
    return dict(num_workers=workers, pin_memory=cfg.pin_memory and torch.device(device).type == "cuda",
                persistent_workers=cfg.persistent_workers and workers > 0)


def _in_memory(dataset: Dataset | None) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, (TensorDataset, decoded.DecodedImages))


def load(cfg: Config, device: str | torch.device | None = None) -> Splits:
    """Build the train/test loaders of ``cfg.dataset``.

    Args:
        cfg: a validated :class:`rclib.core.config.Config`; uses ``dataset``, ``data_dir``,
            ``image_size``, ``train_size``, ``test_size``, ``test_fraction``, ``batch_size``
            (training), ``eval_batch_size`` (test), ``seed``, ``decoded_cache`` and the loader
            options of :func:`loader_options`.
        device: where the batches will go, for ``pin_memory``; default
            ``config.resolve_device(cfg.device)``.

    Returns:
        :class:`Splits`; batches are ``(x, y)`` with ``x`` of shape (B, C, H, W) in [0, 1] and
        ``y`` of shape (B,) class indices. The train loader shuffles with a seeded generator, so
        the same seed gives the same batches; with BatchNorm it drops a last batch of one image.

    Example:
        >>> splits = load(config.load("smoke"))
        >>> splits.input_shape
        (1, 8, 8)

    Used by every chapter.
    """
    if cfg.dataset == "digits":
        train, test, k, names, mean, std = _digits(cfg)
    elif cfg.dataset in ("mnist", "fashion_mnist", "cifar10"):
        train, test, k, names, mean, std = _torchvision(cfg)
    elif cfg.dataset in ("imagenet", "folder"):
        train, test, k, names, mean, std = _image_folder(cfg)
    else:  # config.validate already refuses these; kept for callers that build Config by hand
        raise ValueError(f"dataset={cfg.dataset!r} is not known")
    x0, _ = train[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    device = resolve_device(cfg.device) if device is None else device
    return Splits(
        # a last batch of ONE image fails inside BatchNorm mid-training: drop that one image per
        # epoch (shuffled, so another each epoch); any other remainder is kept as before
        train=DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                         drop_last=cfg.batch_norm and len(train) % cfg.batch_size == 1,
                         **loader_options(cfg, device, train)),
        # evaluation and attacks keep no parameter gradients, so they afford larger batches
        test=DataLoader(test, batch_size=cfg.eval_batch_size, shuffle=False, **loader_options(cfg, device, test)),
        num_classes=k,
        input_shape=tuple(x0.shape),
        mean=tuple(mean),
        std=tuple(std),
        class_names=names,
    )


def first_batch(loader: DataLoader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of a (non-shuffled) loader as two tensors; for figures."""
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        if sum(len(b) for b in ys) >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a small dataset as (x, y) tensors; used where a chapter needs the whole test set."""
    loader = DataLoader(dataset, batch_size=1024, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)
