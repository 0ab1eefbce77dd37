"""Datasets and loaders (paper Sec. 3): pixels stay in [0, 1]; normalisation lives in the model.

Keeping inputs in pixel space means an FGSM step of size epsilon and the clamp to [0, 1] mean
the same thing for every dataset; the model's first layer (``models.Normalize``) standardises.

Datasets:
    digits         scikit-learn's 8x8 handwritten digits (embedded, no download), seeded
                   stratified split.
    mnist, fashion_mnist, cifar10
                   torchvision, downloaded into ``data_dir`` when missing.
    imagenet       an ILSVRC2012 validation folder laid out as ImageFolder (one sub-folder per
                   class), resized 256 / centre-cropped 224, split 40k/10k by a seeded permutation
                   as in the paper (``test_fraction`` of the images, 0.2 by default, are the test set).
    folder         any ImageFolder, resized and centre-cropped to ``image_size``, same seeded split.

Used by every chapter (``data.load(cfg)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .config import Config, resolve_path

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


def _seeded_split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))  # both sides keep >= 1 image
    return sorted(perm[n_test:]), sorted(perm[:n_test])


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


def _digits(cfg: Config):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if cfg.image_size != 8:
        x = torch.nn.functional.interpolate(x, size=cfg.image_size, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=cfg.test_fraction, stratify=d.target, random_state=cfg.seed
    )
    train_idx = _limit(sorted(train_idx.tolist()), cfg.train_size, cfg.seed)
    test_idx = _limit(sorted(test_idx.tolist()), cfg.test_size, cfg.seed)
    train = TensorDataset(x[train_idx], y[train_idx])
    test = TensorDataset(x[test_idx], y[test_idx])
    mean, std = _channel_stats(x[train_idx])
    return train, test, 10, [str(i) for i in range(10)], mean, std


def _torchvision(cfg: Config):
    from torchvision import transforms as T

    from .checks import ensure_downloadable, torchvision_class

    cls = torchvision_class(cfg.dataset)
    root = resolve_path(cfg.data_dir)
    # refuses, before anything is created under data_dir, when the files are absent and no
    # mirror answers; only then may torchvision create folders and download
    download = not ensure_downloadable(cfg)
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


def _image_folder(cfg: Config):
    from torchvision import datasets
    from torchvision import transforms as T

    root = resolve_path(cfg.data_dir)
    if cfg.dataset == "imagenet":
        # the standard ImageNet evaluation transform: resize 256, centre-crop 224
        resize = round(cfg.image_size * 256 / 224)
    else:
        resize = cfg.image_size
    tf = T.Compose([T.Resize(resize), T.CenterCrop(cfg.image_size), T.ToTensor()])
    full = datasets.ImageFolder(str(root), transform=tf)
    if len(full) < 2:
        raise ValueError(f"data_dir={cfg.data_dir!r} holds {len(full)} images; an ImageFolder needs at least 2")
    train_idx, test_idx = _seeded_split(len(full), cfg.test_fraction, cfg.seed)
    train = Subset(full, _limit(train_idx, cfg.train_size, cfg.seed))
    test = Subset(full, _limit(test_idx, cfg.test_size, cfg.seed))
    return train, test, len(full.classes), list(full.classes), IMAGENET_MEAN, IMAGENET_STD


def load(cfg: Config) -> Splits:
    """Build the train/test loaders of ``cfg.dataset``.

    Args:
        cfg: a validated :class:`rclib.config.Config`; uses ``dataset``, ``data_dir``,
            ``image_size``, ``train_size``, ``test_size``, ``test_fraction``, ``batch_size``
            (training), ``eval_batch_size`` (test), ``num_workers`` and ``seed``.

    Returns:
        :class:`Splits`; batches are ``(x, y)`` with ``x`` of shape (B, C, H, W) in [0, 1] and
        ``y`` of shape (B,) class indices. The train loader shuffles with a seeded generator, so
        the same seed gives the same batches.

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
    return Splits(
        train=DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen, num_workers=cfg.num_workers),
        # evaluation and attacks keep no parameter gradients, so they afford larger batches
        test=DataLoader(test, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers),
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
