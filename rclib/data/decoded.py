"""The decoded test images of a folder dataset, kept on disk as uint8 tensors.

Every evaluation and attack pass over an ImageNet test split decodes 10k JPEGs, resizes and
centre-crops them again; the chapters make hundreds of such passes. The result of that work is
fixed (the transform has no randomness), so it is stored once, as an (N, 3, H, W) uint8 tensor
in a safetensors artifact (1.5 GB for 10k images at 224x224), and later runs read it back.

Exactness: ``ToTensor`` turns a PIL RGB image into ``uint8 -> float32 / 255``; the cache keeps the
uint8 pixels after resize and crop, and :class:`DecodedImages` does the same division, so a
cached batch is bit-identical to a decoded one (a test checks it).

Key: the folder's content fingerprint (:func:`rclib.core.artifacts.content_fingerprint`: every file's
path, size and mtime), the resize and crop sizes, the split's indices, and the versions of
torchvision and Pillow (their resampling could change). The rclib source is deliberately not in
the key: editing rclib must not cost a 10k-image decode; :data:`VERSION` is raised when this
module changes what it stores. Writes are atomic and checksummed (:func:`rclib.core.artifacts.save`);
a damaged or unusable cache is reported with a warning and rebuilt.

Bound: each seed's split is its own entry (1.5 GB at 224x224), and keys change with the folder,
the sizes and the library versions, so old entries would pile up. After a new entry is written,
the least recently used ones are removed until all of them together take at most
``RCLIB_DECODED_GB`` (default :data:`KEEP_GB`, room for the ``paper`` profile's three seeds and
a few more); an entry in use is never removed. ``rm -r data/artifacts/decoded`` (or
``make clean``) drops them all.

Used by ``datasets.load`` (``decoded_cache``), hence by every chapter run on a folder dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from rclib.core import artifacts
from rclib.core.config import Config

VERSION = 1
FOLDER = "decoded"  # under artifacts.root(), beside the profiles' folders
BUILD_BATCH = 64
KEEP_GB = 8.0  # default bound on all decoded entries together (RCLIB_DECODED_GB overrides it)


class DecodedImages(Dataset):
    """``(image, label)`` pairs from a uint8 (N, C, H, W) tensor: ``image`` is float32 in
    [0, 1] (``uint8 / 255``, exactly as ``ToTensor``), ``label`` an int (as ``ImageFolder``).
    ``indices``: where each image sits in the folder dataset (as a ``Subset``'s)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: list[int] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(f"images of dtype {images.dtype} and shape {tuple(images.shape)} with "
                             f"{len(targets)} targets: need uint8 (N, C, H, W) and N targets")
        self.images = images
        self.targets = targets.long()
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].to(torch.float32).div(255), int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch converted in one operation (a DataLoader calls this when it exists):
        elementwise, so the values are those of ``__getitem__``, at a fraction of the cost."""
        pixels = self.images[torch.as_tensor(indices, dtype=torch.long)].to(torch.float32).div_(255)
        return list(zip(pixels.unbind(0), self.targets[indices].tolist()))


def location(cfg: Config, resize: int, indices: list[int]) -> Path:
    """Where the decoded images of ``indices`` of ``cfg``'s folder live."""
    import PIL
    import torchvision

    recipe = dict(version=VERSION, folder=artifacts.content_fingerprint(cfg, ("data_dir",)), resize=resize,
                  crop=cfg.image_size, torchvision=torchvision.__version__, pillow=PIL.__version__,
                  indices=hashlib.sha256(json.dumps(indices).encode()).hexdigest())
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return artifacts.root() / FOLDER / f"{cfg.dataset}-{cfg.image_size}-{key}"


def _build(pixels: Dataset, indices: list[int], workers: int) -> torch.Tensor:
    """Decode ``pixels[i]`` (uint8 (C, H, W) tensors) for every index, in parallel workers."""
    loader = DataLoader(Subset(pixels, indices), batch_size=BUILD_BATCH, num_workers=workers)
    batches = [x for x, _ in loader]
    return torch.cat(batches) if batches else torch.zeros(0, dtype=torch.uint8)


def _usable(found, n: int, shape: tuple[int, ...], targets: torch.Tensor) -> str | None:
    """None when a loaded artifact holds exactly these images, else what is wrong."""
    tensors, _ = found
    if tensors is None or set(tensors) != {"images", "labels"}:
        return f"tensors {sorted(tensors or {})}, expected images and labels"
    images, labels = tensors["images"], tensors["labels"]
    if images.dtype != torch.uint8 or tuple(images.shape) != (n, *shape):
        return f"images of {images.dtype} {tuple(images.shape)}, expected uint8 {(n, *shape)}"
    if not torch.equal(labels.long(), targets):
        return "labels differ from the folder's"
    return None


def load_or_build(cfg: Config, pixels: Dataset, indices: list[int], targets: list[int],
                  resize: int, workers: int = 0) -> DecodedImages:
    """The images ``pixels[i]`` for ``i`` in ``indices`` (uint8 (3, H, W) each), from the cache
    when it holds them, else decoded (in ``workers`` processes) and stored first.

    Args:
        cfg: uses ``dataset``, ``data_dir`` (fingerprinted) and ``image_size``.
        pixels: the folder dataset with a transform ending in ``PILToTensor`` (uint8).
        indices: the split's indices into ``pixels``; targets: their labels.
        resize: the resize before the centre crop (part of the key).
    """
    path = location(cfg, resize, indices)
    want = torch.tensor(targets, dtype=torch.long)
    shape = (3, cfg.image_size, cfg.image_size)
    # the key material, recorded and compared: a folder copied or linked under another key is refused
    info = {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "entry": Path(path).name}
    found = artifacts.load(path, expect=info)  # warns about a damaged cache itself
    if found is not None:
        problem = _usable(found, len(indices), shape, want)
        if problem is None:
            _touch(path)
            return DecodedImages(found[0]["images"], want, indices)
        warnings.warn(f"ignoring unusable decoded cache {path} ({problem}); it will be rebuilt", stacklevel=2)
    writable = True
    if os.path.lexists(path):  # an intact but unusable copy would be kept by save
        writable = artifacts.try_write(lambda: artifacts.discard(path), path)
    images = _build(pixels, indices, workers)
    if writable:  # a read-only cache: decoded for this run, not stored
        artifacts.try_write(lambda: artifacts.save(path, {"images": images, "labels": want},
                                                   {"n": len(indices), "shape": list(shape), "resize": resize},
                                                   info=info), path)
        _touch(path)
        evict(keep_bytes(), protect=path)
    return DecodedImages(images, want, indices)


def keep_bytes() -> int:
    """The bound on all decoded entries together: ``RCLIB_DECODED_GB`` gigabytes (1e9 bytes),
    default :data:`KEEP_GB`; refused when it is not a number >= 0."""
    text = os.environ.get("RCLIB_DECODED_GB", str(KEEP_GB))
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise ValueError(f"RCLIB_DECODED_GB={text!r} is not allowed: a number of gigabytes >= 0")
    return int(gb * 1e9)


def _touch(path: Path) -> None:
    """Mark an entry as just used: eviction removes the least recently used first."""
    # an explicit time: without one the kernel stamps its coarse clock (a few ms), so two uses in
    # quick succession tie and eviction could pick the one just used
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:  # removed meanwhile by another process's eviction: nothing to mark
        pass


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def entries() -> list[tuple[Path, int, float]]:
    """Every decoded entry as ``(path, bytes, last use)``, least recently used first (hidden
    temporary folders of writes in progress are not entries)."""
    folder = artifacts.root() / FOLDER
    found = []
    for p in folder.iterdir() if folder.is_dir() else ():
        try:
            if p.is_dir() and not p.name.startswith("."):
                found.append((p, _size(p), p.stat().st_mtime))
        except FileNotFoundError:  # discarded by another process meanwhile
            continue
    return sorted(found, key=lambda e: e[2])


def evict(limit: int, protect: Path | None = None) -> list[Path]:
    """Remove the least recently used decoded entries until all together take at most
    ``limit`` bytes, never ``protect`` (the entry just written or read); returns what was
    removed. Used by :func:`load_or_build`."""
    found = entries()
    total = sum(size for _, size, _ in found)
    removed = []
    for path, size, _ in found:
        if total <= limit:
            break
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        artifacts.discard(path)
        removed.append(path)
        total -= size
    return removed
