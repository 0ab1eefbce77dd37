"""Can this configuration run here? Checks against the disk and the machine, before any work.

``config.validate`` judges each value on its own (types, ranges, choices). What remains needs the
world outside the config: the dataset's files and how many images they hold, a weights file's
header and tensor names, whether the model, one training batch and a decision map fit in this
machine's memory, and whether a torchvision dataset that is not on disk could be downloaded at
all. :func:`feasible` runs them all in well under a second (it builds the model on PyTorch's
``meta`` device: shapes only, nothing allocated) and raises ``ValueError`` naming the parameter,
the value and what is allowed, so a chapter stops in its first code cell and nothing is written.

Used by ``config.validate``: every chapter's first cell and ``python -m rclib`` before it runs
anything.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import walk
from .config import MAP_POINTS, Config, resolve_path

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


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def image_folder_classes(root: Path) -> dict[str, int]:
    """``{class sub-folder: number of image files}`` of an ImageFolder, counted as torchvision's
    ``ImageFolder`` counts them (every sub-folder is a class; files searched recursively, links
    followed but never into a cycle: :func:`rclib.walk.files`, which raises ``walk.TooLarge``
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
        _fail("data_dir", cfg.data_dir, f"dataset {cfg.dataset!r} reads images from disk, and {root} is "
              "not an existing folder (an ImageFolder: one sub-folder per class)")
    try:
        counts = image_folder_classes(root)
    except walk.TooLarge as err:
        _fail("data_dir", cfg.data_dir, f"an image folder a walk can list ({err})")
    empty = [name for name, n in counts.items() if n == 0]
    if len(counts) - len(empty) < 2 or empty:
        what = (f"{root} has {len(counts)} sub-folders" +
                (f", and {len(empty)} of them hold no image ({', '.join(empty[:5])}"
                 f"{', ...' if len(empty) > 5 else ''})" if empty else ""))
        _fail("data_dir", cfg.data_dir, f"dataset {cfg.dataset!r} needs an ImageFolder: at least two class "
              f"sub-folders, each holding images (.jpg, .png, ...); {what}")
    from .data import split_test_count  # data needs torch; imported only for folder datasets

    n = sum(counts.values())
    n_test = split_test_count(list(counts.values()), cfg.test_fraction)
    return DataShape(n - n_test, n_test, len(counts), (3, cfg.image_size, cfg.image_size))


def torchvision_class(dataset: str):
    """The torchvision dataset class behind ``dataset`` (mnist, fashion_mnist, cifar10).
    Used here and by ``data.load``."""
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


def _reachable(url: str) -> str | None:
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
    anything is created under ``data_dir``. Used here and by ``data.load``."""
    missing = _torchvision_missing(cfg)
    if not missing:
        return True
    cls = torchvision_class(cfg.dataset)
    urls = ([m + cls.resources[0][0] for m in cls.mirrors] if hasattr(cls, "mirrors") else [cls.url])
    reasons = [r for r in map(_reachable, urls) if r is not None]
    if len(reasons) == len(urls):
        _fail("data_dir", cfg.data_dir, f"dataset {cfg.dataset!r} is not there ({len(missing)} files missing, "
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
            _fail("test_fraction", cfg.test_fraction, f"a fraction that leaves at least one image of each of "
                  f"the {k} classes on both sides of the split; it leaves {n} {side} image(s)")


def check_training(cfg: Config, shape: DataShape) -> None:
    """Training must be able to run: some training at all, and no BatchNorm batch of one.

    * ``epochs`` 0 with ``weights='none'`` trains nothing: every chapter would report verdicts
      on a randomly initialised model at chance. A weights file (the paper profile) is a model.
    * With ``batch_norm``, ``batch_size`` 1 makes every training batch a single image, which
      BatchNorm cannot normalise ("Expected more than 1 value per channel"), mid-training. A
      training set whose LAST batch would hold one image (``train_size`` 513, ``batch_size`` 64)
      is not refused: ``data.load`` drops that one image per epoch (a different one each epoch,
      as the order is shuffled); every other configuration keeps all its batches and numbers.
    """
    if cfg.epochs == 0 and cfg.weights == "none":
        raise ValueError(f"epochs={cfg.epochs!r} with weights={cfg.weights!r} is not allowed: it trains "
                         "nothing, and every page would report on an untrained model at chance; give "
                         "epochs >= 1, or a weights file to start from")
    if cfg.batch_norm and cfg.batch_size == 1:
        raise ValueError(f"batch_size={cfg.batch_size!r} is not allowed with batch_norm=True: every training "
                         "batch would be one image, which BatchNorm cannot normalise; use batch_size >= 2, "
                         "or batch_norm=False")


def check_sizes(cfg: Config, shape: DataShape) -> None:
    """``train_size``, ``test_size`` and ``local_examples`` must be met by the data."""
    if cfg.train_size > shape.n_train:
        _fail("train_size", cfg.train_size, f"at most {shape.n_train}, the training images of {cfg.dataset!r} "
              "with this test_fraction (0 means all of them)")
    if cfg.test_size > shape.n_test:
        _fail("test_size", cfg.test_size, f"at most {shape.n_test}, the test images of {cfg.dataset!r} "
              "with this test_fraction (0 means all of them)")
    n_test = cfg.test_size or shape.n_test
    if cfg.local_examples > min(n_test, MAP_POINTS):
        _fail("local_examples", cfg.local_examples, f"at most {min(n_test, MAP_POINTS)}: local maps are drawn "
              f"from the test set ({n_test} images here)")


def _meta_model(cfg: Config, shape: DataShape):
    import torch

    from . import models

    c = shape.input_shape[0]
    with torch.device("meta"):
        return models.from_spec(models.spec(cfg, shape.num_classes, shape.input_shape, (0.0,) * c, (1.0,) * c))


def _layer_outputs(model, input_shape: tuple[int, int, int]) -> int:
    """Elements of every convolution's and linear layer's output for one example of a VGG (the
    activations a backward pass keeps), walking ``features``, ``avgpool`` and ``classifier``."""
    from torch import nn

    c, h, w = input_shape
    total = 0

    def out(size: int, k: int, s: int, p: int) -> int:
        return (size + 2 * p - k) // s + 1

    def pair(v) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else tuple(v)

    for m in list(model.features) + [model.avgpool]:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            (kh, kw), (sh, sw), (ph, pw) = pair(m.kernel_size), pair(m.stride), pair(m.padding)
            h, w = out(h, kh, sh, ph), out(w, kw, sw, pw)
            if h < 1 or w < 1:
                raise ValueError(f"{type(m).__name__} leaves a {h}x{w} map")
            if isinstance(m, nn.Conv2d):
                c = m.out_channels
                total += c * h * w
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            h, w = pair(m.output_size)
        elif not isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Identity)):
            raise ValueError(f"cannot size a {type(m).__name__} layer")
    total += sum(m.out_features for m in model.classifier if isinstance(m, nn.Linear))
    return total


def memory_needed(cfg: Config, shape: DataShape) -> dict[str, float]:
    """Bytes the run needs at the very least, by what needs them (a lower bound, so only the
    obviously impossible is refused).

    * ``training``: 4 bytes x (4 x parameters + outputs of every convolution and linear layer
      for one ``batch_size`` batch): weights, gradients and two Adam moments, and the
      activations the backward pass keeps.
    * ``evaluation``: 4 bytes x (parameters + those outputs for one ``eval_batch_size`` batch),
      what an attack's input gradient keeps.
    * ``decision map``: ``resolution``^2 grid points, each with two plane coordinates, a class, a
      confidence and an RGB colour (8 bytes each).

    Counted from the layers' shapes alone (the model is built on the ``meta`` device, and the
    output size of every layer follows from its kernel, stride and padding), so even an absurd
    width costs nothing. A forward pass on ``meta`` would give the same counts but imports
    torch's meta kernels first, about 1.5 s at the start of every chapter.
    """
    model = _meta_model(cfg, shape)
    params = sum(p.numel() for p in model.parameters())
    try:
        acts = _layer_outputs(model, shape.input_shape)
    except ValueError as err:  # e.g. five max-pools on an 8x8 input leave nothing
        _fail("image_size", cfg.image_size, f"an input size model={cfg.model!r} can take ({err})")
    # activations are per example: one forward pass of shapes, scaled by each batch size
    return {"training": 4.0 * (4 * params + acts * cfg.batch_size),
            "evaluation": 4.0 * (params + acts * cfg.eval_batch_size),
            "decision map": 8.0 * 8 * cfg.resolution ** 2}


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config, shape: DataShape, defaults: Config | None = None) -> None:
    """Refuse a configuration whose memory is obviously beyond the machine, naming the
    parameters that drive it (those changed from ``defaults``, the profile, first)."""
    total = machine_memory()
    drivers = {"training": ("width", "hidden", "image_size", "batch_size", "model"),
               "evaluation": ("width", "hidden", "image_size", "eval_batch_size", "model"),
               "decision map": ("resolution",)}
    for what, need in memory_needed(cfg, shape).items():
        if need <= total:
            continue
        names = drivers[what]
        if defaults is not None:
            changed = [n for n in names if getattr(cfg, n) != getattr(defaults, n)]
            names = tuple(changed) or names
        values = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names)
        raise ValueError(f"{values} is not allowed: the {what} would need about {need / 1e9:,.1f} GB, more than "
                         f"this machine's {total / 2**30:.0f} GiB of memory; choose smaller values")


def check_weights(cfg: Config, shape: DataShape) -> None:
    """A ``weights`` file must be a readable safetensors file whose tensors fit the model:
    the header is parsed (nothing else is read) and names and shapes are compared. Only the
    classifier head may differ in shape (a 1000-class head on a 10-class folder): ``models.build``
    leaves it out and ``pipeline.baseline`` fits a new one."""
    if cfg.weights == "imagenet":
        check_pretrained(cfg)
        return
    if cfg.weights == "none":
        return
    from safetensors import safe_open

    path = resolve_path(cfg.weights)
    if path.suffix != ".safetensors" or not path.is_file():
        _fail("weights", cfg.weights, "'none', 'imagenet', or an existing .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as err:  # garbage, an empty file, a renamed pickle: the header does not parse
        _fail("weights", cfg.weights, f"a readable safetensors file; its header does not parse ({err})")
    from .models import head_name

    meta = _meta_model(cfg, shape)
    wanted = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    head = head_name(meta)
    diff = sorted(set(found) ^ set(wanted)) + sorted(k for k in set(found) & set(wanted) if found[k] != wanted[k]
                                                     and not k.startswith(f"{head}."))
    if diff:
        shown = "; ".join(f"{k}: file {found.get(k, 'absent')}, model {wanted.get(k, 'absent')}" for k in diff[:4])
        _fail("weights", cfg.weights, f"a state dict of the configured model (model={cfg.model!r}, "
              f"width={cfg.width}, hidden={cfg.hidden}, {shape.num_classes} classes); {len(diff)} tensors "
              f"differ: {shown}{' ...' if len(diff) > 4 else ''}")
    want_dtype = {k: SAFETENSORS_DTYPES.get(str(v.dtype), str(v.dtype)) for k, v in meta.state_dict().items()}
    wrong = sorted(k for k in found if dtypes[k] != want_dtype[k])
    if wrong:  # int8 or bool weights of the right shape would load by silent conversion
        shown = "; ".join(f"{k}: file {dtypes[k]}, model {want_dtype[k]}" for k in wrong[:4])
        _fail("weights", cfg.weights, f"a state dict with the model's dtypes; {len(wrong)} tensors differ: "
              f"{shown}{' ...' if len(wrong) > 4 else ''}")
    bad = nonfinite_tensor(path)
    if bad:
        _fail("weights", cfg.weights, f"a file of finite weights; tensor {bad!r} holds NaN or infinite values "
              "(a diverged training run?)")


# torch dtype (as str) -> the name a safetensors header uses
SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.float64": "F64", "torch.float16": "F16",
                      "torch.bfloat16": "BF16", "torch.int64": "I64", "torch.int32": "I32",
                      "torch.int8": "I8", "torch.uint8": "U8", "torch.bool": "BOOL"}
_FINITE: dict[tuple, str | None] = {}


def nonfinite_tensor(path: Path) -> str | None:
    """The name of the first floating-point tensor of a safetensors file holding NaN or an
    infinity, else None. Tensors are read one at a time (memory of the largest one), and the
    answer is remembered per (path, size, mtime, inode) for the life of the process."""
    import torch
    from safetensors import safe_open

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key not in _FINITE:
        _FINITE[key] = None
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    _FINITE[key] = k
                    break
    return _FINITE[key]


def imagenet_checkpoint(cfg: Config) -> tuple[Path, str]:
    """Where ``torch.hub`` keeps torchvision's ImageNet VGG16 weights for ``cfg`` (with or
    without BatchNorm), and the address it downloads them from."""
    import torch
    import torchvision

    w = (torchvision.models.VGG16_BN_Weights if cfg.batch_norm else torchvision.models.VGG16_Weights).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url), w.url


def check_pretrained(cfg: Config) -> None:
    """``weights='imagenet'`` needs torchvision's file in the torch.hub cache, or a network that
    answers within ``PROBE_TIMEOUT`` seconds (a HEAD request: nothing is downloaded here).
    Without either, torch.hub would fail mid-chapter after the data has loaded, with a long
    traceback and no timeout; refuse up front and name the local-file alternative."""
    path, url = imagenet_checkpoint(cfg)
    if path.is_file():
        return
    reason = _reachable(url)
    if reason is None:
        return
    stem = path.stem.split("-")[0]
    _fail("weights", cfg.weights, f"torchvision's ImageNet weights are not in the torch.hub cache ({path}) and "
          f"cannot be downloaded from {url} ({reason}); copy that file to {path}, or pass "
          f"weights=path/to/{stem}.safetensors, made once from it with: python -c \"import torch; "
          f"from safetensors.torch import save_file; save_file(torch.load('{path.name}', weights_only=True), "
          f"'{stem}.safetensors')\"")


def feasible(cfg: Config, defaults: Config | None = None) -> None:
    """Run every check of this module; ``defaults`` (the profile's config) sharpens messages."""
    shape = dataset_shape(cfg)
    check_split(cfg, shape)
    check_sizes(cfg, shape)
    check_training(cfg, shape)
    check_memory(cfg, shape, defaults)
    check_weights(cfg, shape)
