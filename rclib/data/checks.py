"""Can this dataset be read here? Its files, its classes and split sizes, and whether a missing
torchvision dataset could be downloaded at all, judged without loading a single image.

Each check raises ``ValueError`` naming the parameter, the value and what is allowed, so a chapter
stops in its first code cell and nothing is written.

Used by ``rclib.experiments.setup.feasible`` (every chapter's first cell, ``python -m rclib``) and
by ``data.datasets.load``.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from rclib.core import walk
from rclib.core.config import MAP_POINTS, Config, refuse
from rclib.core.paths import resolve_path
from rclib.data.split import split_test_count

DIGITS_IMAGES = 1797  # scikit-learn's load_digits
# the official splits of the torchvision datasets (used for cifar10, whose size needs unpickling)
TORCHVISION_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "cifar10": (50000, 10000)}
TORCHVISION_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}
PROBE_TIMEOUT = 5.0  # seconds to wait for a dataset mirror before calling it unreachable


@dataclass(frozen=True)
class DataShape:
    """What a dataset will give: split sizes before ``train_size``/``test_size``, classes, input."""

    n_train: int
    n_test: int
    num_classes: int
    input_shape: tuple[int, int, int]


def image_folder_classes(root: Path) -> dict[str, int]:
    """``{class sub-folder: number of image files}`` of an ImageFolder, counted as torchvision's
    ``ImageFolder`` counts them (every sub-folder is a class; files searched recursively, links
    followed but never into a cycle: :func:`rclib.core.walk.files`, which raises ``walk.TooLarge``
    for a kernel file system or more than ``walk.MAX_ENTRIES`` entries in all)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if walk.pseudo(root):
        raise walk.TooLarge(f"{root} is in a kernel file system, not an image folder")
    counts: dict[str, int] = {}
    budget = walk.MAX_ENTRIES
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir():
                found = list(walk.files(entry.path, budget))
                budget -= len(found)
                counts[entry.name] = sum(1 for _, e in found if e.name.lower().endswith(IMG_EXTENSIONS))
    return dict(sorted(counts.items()))


def _folder_shape(cfg: Config) -> DataShape:
    root = resolve_path(cfg.data_dir)
    if not root.is_dir():
        refuse("data_dir", cfg.data_dir, f"dataset {cfg.dataset!r} reads images from disk, and {root} is "
              "not an existing folder (an ImageFolder: one sub-folder per class)")
    try:
        counts = image_folder_classes(root)
    except walk.TooLarge as err:
        refuse("data_dir", cfg.data_dir, f"an image folder a walk can list ({err})")
    empty = [name for name, n in counts.items() if n == 0]
    if len(counts) - len(empty) < 2 or empty:
        what = (f"{root} has {len(counts)} sub-folders" +
                (f", and {len(empty)} of them hold no image ({', '.join(empty[:5])}"
                 f"{', ...' if len(empty) > 5 else ''})" if empty else ""))
        refuse("data_dir", cfg.data_dir, f"dataset {cfg.dataset!r} needs an ImageFolder: at least two class "
              f"sub-folders, each holding images (.jpg, .png, ...); {what}")
    n = sum(counts.values())
    n_test = split_test_count(list(counts.values()), cfg.test_fraction)
    return DataShape(n - n_test, n_test, len(counts), (3, cfg.image_size, cfg.image_size))


def torchvision_class(dataset: str):
    """The torchvision dataset class behind ``dataset`` (mnist, fashion_mnist, cifar10).
    Used here and by ``datasets.load``."""
    import torchvision

    return getattr(torchvision.datasets, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}[dataset])


def _torchvision_missing(cfg: Config) -> list[Path]:
    """The files of a torchvision dataset that are not under ``data_dir`` (empty: all there)."""
    root = resolve_path(cfg.data_dir)
    c = torchvision_class(cfg.dataset)
    if cfg.dataset == "cifar10":
        wanted = [root / c.base_folder / name for name, _ in c.train_list + c.test_list]
    else:
        wanted = [root / c.__name__ / "raw" / os.path.splitext(os.path.basename(url))[0] for url, _ in c.resources]
    return [p for p in wanted if not p.is_file()]


def reachable(url: str) -> str | None:
    """None when ``url`` answers within PROBE_TIMEOUT, else the reason it does not."""
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    except Exception as err:  # no route, DNS failure, HTTP error, timeout: all mean "cannot download"
        return f"{type(err).__name__}: {err}"
    return None


def ensure_downloadable(cfg: Config) -> bool:
    """For mnist / fashion_mnist / cifar10: True when the files are under ``data_dir``; False when
    they are not but a mirror answers (the caller may download); ``ValueError`` otherwise, before
    anything is created under ``data_dir``. Used here and by ``datasets.load``."""
    missing = _torchvision_missing(cfg)
    if not missing:
        return True
    cls = torchvision_class(cfg.dataset)
    urls = ([m + cls.resources[0][0] for m in cls.mirrors] if hasattr(cls, "mirrors") else [cls.url])
    reasons = [r for r in map(reachable, urls) if r is not None]
    if len(reasons) == len(urls):
        refuse("data_dir", cfg.data_dir, f"dataset {cfg.dataset!r} is not there ({len(missing)} files missing, "
              f"e.g. {missing[0]}) and cannot be downloaded ({reasons[0]}); put its files there, "
              "or use dataset='digits', which needs no download")
    return False


def _idx_count(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">II", f.read(8))[1]  # magic, number of items


def dataset_shape(cfg: Config) -> DataShape:
    """Split sizes, classes and input shape of ``cfg.dataset`` without loading any image."""
    s = cfg.image_size
    if cfg.dataset == "digits":
        n_test = math.ceil(DIGITS_IMAGES * cfg.test_fraction)  # scikit-learn's train_test_split
        return DataShape(DIGITS_IMAGES - n_test, n_test, 10, (1, s, s))
    if cfg.dataset in TORCHVISION_SIZES:
        n_train, n_test = TORCHVISION_SIZES[cfg.dataset]
        if ensure_downloadable(cfg) and cfg.dataset != "cifar10":  # on disk: the idx headers say how many
            raw = resolve_path(cfg.data_dir) / torchvision_class(cfg.dataset).__name__ / "raw"
            n_train, n_test = _idx_count(raw / "train-labels-idx1-ubyte"), _idx_count(raw / "t10k-labels-idx1-ubyte")
        return DataShape(n_train, n_test, 10, (TORCHVISION_CHANNELS[cfg.dataset], s, s))
    return _folder_shape(cfg)


def check_split(cfg: Config, shape: DataShape) -> None:
    """The split must leave every class on both sides: scikit-learn's stratified split of
    ``digits`` needs at least one image per class in each split (``test_fraction`` 0.001 leaves
    2 test images for 10 classes, 0.999 one training image). Checked here rather than failing in
    a chapter's data cell. Folder datasets use ``data.stratified_split``, which keeps every class
    of two or more images on both sides by construction; torchvision's datasets have their own
    split and do not use ``test_fraction``."""
    if cfg.dataset != "digits":
        return
    k = shape.num_classes
    for side, n in (("test", shape.n_test), ("training", shape.n_train)):
        if n < k:
            refuse("test_fraction", cfg.test_fraction, f"a fraction that leaves at least one image of each of "
                  f"the {k} classes on both sides of the split; it leaves {n} {side} image(s)")


def check_sizes(cfg: Config, shape: DataShape) -> None:
    """``train_size``, ``test_size`` and ``local_examples`` must be met by the data."""
    if cfg.train_size > shape.n_train:
        refuse("train_size", cfg.train_size, f"at most {shape.n_train}, the training images of {cfg.dataset!r} "
              "with this test_fraction (0 means all of them)")
    if cfg.test_size > shape.n_test:
        refuse("test_size", cfg.test_size, f"at most {shape.n_test}, the test images of {cfg.dataset!r} "
              "with this test_fraction (0 means all of them)")
    n_test = cfg.test_size or shape.n_test
    if cfg.local_examples > min(n_test, MAP_POINTS):
        refuse("local_examples", cfg.local_examples, f"at most {min(n_test, MAP_POINTS)}: local maps are drawn "
              f"from the test set ({n_test} images here)")


_FINITE: dict[tuple, str | None] = {}


