"""Seeded, stratified splits of a folder dataset, and class-balanced samples (paper Sec. 3: the
ImageNet validation set split 40k/10k).

Every order here comes from a seeded sha256 of an image's identity, so a split is the same on
every machine and Python, and adding images to one class never moves an image of another.

Used by ``data.datasets`` (folder splits, ``spread_sample``) and ``data.checks`` (sizing a split
without reading it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


def _rank(seed: int, text: str) -> bytes:
    """A seeded sort key that is the same on every machine and Python (``hash`` is salted)."""
    return hashlib.sha256(f"{seed}\0{text}".encode()).digest()


def class_test_count(n: int, test_fraction: float) -> int:
    """How many of a class's ``n`` images go to the test set: ``round(n * test_fraction)``, but at
    least one on each side when ``n >= 2`` (a lone image goes to test only if that rounds to 1)."""
    k = int(round(n * test_fraction))
    return k if n < 2 else min(n - 1, max(1, k))


def split_test_count(counts: Sequence[int], test_fraction: float) -> int:
    """Test images of :func:`stratified_split` for classes of ``counts`` images (at least one on
    each side overall). Used here and by ``checks``, which sizes the split without reading it."""
    n = sum(counts)
    return min(n - 1, max(1, sum(class_test_count(c, test_fraction) for c in counts)))


Groups = dict[int, list[int]]  # class -> indices, in the class's seeded order


def stratified_split(paths: Sequence[str], labels: Sequence[int], test_fraction: float,
                     seed: int) -> tuple[Groups, Groups]:
    """Split a folder dataset class by class: ``(train, test)`` as ``{class: indices}``.

    Within each class the images are ordered by a seeded hash of ``(seed, relative path)`` and
    the first :func:`class_test_count` of them are the test set. So every class with two or more
    images is on both sides, and adding or removing files in one class never moves an image of
    another class. Only a folder of single-image classes can leave a side empty; then the image
    with the first hash of all changes sides.

    Args:
        paths: each image's path relative to the folder (``/``-separated), as identity.
        labels: each image's class index; test_fraction: in (0, 1); seed: any int.

    Returns:
        Two dicts ``{class: [index, ...]}`` in the seeded order (a prefix of a class's test list
        is what :func:`take_round_robin` keeps when ``test_size`` limits it).
    """
    by_class: Groups = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    train: Groups = {}
    test: Groups = {}
    for label, members in sorted(by_class.items()):
        members.sort(key=lambda i: (_rank(seed, paths[i]), paths[i]))
        k = class_test_count(len(members), test_fraction)
        test[label], train[label] = members[:k], members[k:]
    _keep_both_sides(train, test, paths, seed)
    return train, test


def _keep_both_sides(train: Groups, test: Groups, paths: Sequence[str], seed: int) -> None:
    for src, dst in ((train, test), (test, train)):
        if not any(dst.values()):
            first = min((i for members in src.values() for i in members), key=lambda i: _rank(seed, paths[i]))
            label = next(c for c, members in src.items() if first in members)
            src[label].remove(first)
            dst[label].append(first)


def take_round_robin(groups: Groups, size: int, seed: int, names: Sequence[str] | None = None) -> list[int]:
    """Up to ``size`` indices (all when 0), one per class in turn: the first of every class, then
    the second, and so on, in a seeded order of classes (hashed from ``names[c]``, else ``c``, so
    it does not depend on which other classes exist). Returns them in the order taken."""
    order = sorted(groups, key=lambda c: _rank(seed, f"class\0{names[c] if names else c}"))
    total = sum(len(groups[c]) for c in order)
    size = total if size == 0 else min(size, total)
    taken: list[int] = []
    depth = 0
    while len(taken) < size:
        taken += [groups[c][depth] for c in order if depth < len(groups[c])][:size - len(taken)]
        depth += 1
    return taken


def labels(dataset: Dataset) -> list[int]:
    """Every example's class index, without decoding images where the dataset lists its targets
    (``Subset`` of an ImageFolder, TensorDataset, torchvision datasets, the decoded cache)."""
    if isinstance(dataset, Subset):
        parent = labels(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).tolist()
    return [int(dataset[i][1]) for i in range(len(dataset))]


def spread_sample(source: Dataset | DataLoader, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples spread across the classes: seeded, round-robin over classes.

    Each class's examples are put in a seeded order, the classes too; the sample takes the first
    example of every class, then the second, and so on (:func:`take_round_robin`). So any
    prefix ``x[:k]`` covers ``min(k, classes)`` classes, and ``spread_sample(d, k, s)`` is the
    first ``k`` of ``spread_sample(d, n, s)``. Only the chosen examples are read.

    Args:
        source: a dataset, or a loader (its ``dataset`` is used; its order and batches are not).
        n: how many (>= 1); all examples, in the spread order, when the dataset has fewer.
        seed: chooses the order within and across classes.

    Returns:
        ``(x, y)``: x (n, C, H, W), y (n,) long, in the order taken (on the CPU).

    Raises:
        ValueError: naming ``n`` when it is not a whole number >= 1.

    Example:
        >>> x, y = spread_sample(splits.test, 1000, cfg.seed)  # inputs of a PCA decision map

    Used by chapters 03 and 04 (the inputs of decision maps and the local maps' examples).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not allowed: a whole number >= 1")
    dataset = source.dataset if isinstance(source, DataLoader) else source
    groups: Groups = {}
    for i, label in enumerate(labels(dataset)):
        groups.setdefault(label, []).append(i)
    for label, members in groups.items():
        members.sort(key=lambda i: _rank(seed, f"{label}\0{i}"))
    chosen = take_round_robin(groups, n, seed)
    items = [dataset[i] for i in chosen]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.long)
