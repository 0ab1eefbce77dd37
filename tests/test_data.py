"""rclib.data.datasets: every dataset kind on tiny inputs, without any download.

digits is embedded; ``folder`` and ``imagenet`` read fake ImageFolders written here with PIL;
mnist / fashion_mnist / cifar10 read tiny files in torchvision's own on-disk formats written
here, and torchvision's download functions are replaced by ones that fail, so a test can never
reach the network.
"""

from __future__ import annotations

import pickle
import struct
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from toys import ODD_MODES, image_folder, odd_mode_folder

from rclib.core import artifacts, config
from rclib.data import datasets, split
from rclib.experiments import setup


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _all_train(splits: datasets.Splits) -> tuple[torch.Tensor, torch.Tensor]:
    return datasets.as_tensors(splits.train.dataset)


# ---------------------------------------------------------------- digits

def test_digits_shapes_range_and_sizes(tiny_cfg):
    s = datasets.load(tiny_cfg)
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert s.class_names == [str(i) for i in range(10)]
    assert len(s.train.dataset) == 128 and len(s.test.dataset) == 64
    x, y = next(iter(s.train))
    assert x.shape == (tiny_cfg.batch_size, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (tiny_cfg.batch_size,) and y.dtype == torch.long
    xt, yt = datasets.as_tensors(s.test.dataset)
    for t in (x, xt):
        assert t.min() >= 0 and t.max() <= 1
    assert t.max() == 1.0  # full scale is used (16/16)
    assert set(yt.tolist()) <= set(range(10))
    assert len(s.mean) == len(s.std) == 1 and 0 < s.mean[0] < 1 and s.std[0] > 0


def test_digits_full_split_is_stratified_and_disjoint():
    cfg = config.load("smoke", train_size=0, test_size=0)
    s = datasets.load(cfg)
    xtr, ytr = _all_train(s)
    xte, yte = datasets.as_tensors(s.test.dataset)
    assert len(ytr) + len(yte) == 1797
    assert abs(len(yte) - 1797 * cfg.test_fraction) <= 1  # sklearn rounds the test share up
    assert not (_rows(xtr) & _rows(xte))  # the 1797 digit images are all distinct
    counts = Counter(yte.tolist())
    assert set(counts) == set(range(10))
    assert max(counts.values()) - min(counts.values()) <= 2  # ~36 of each class


def test_digits_limits_keep_every_class(tiny_cfg):
    s = datasets.load(tiny_cfg)
    _, ytr = _all_train(s)
    _, yte = datasets.as_tensors(s.test.dataset)
    assert set(ytr.tolist()) == set(range(10))
    assert len(set(yte.tolist())) >= 8
    xtr, _ = _all_train(s)
    xte, _ = datasets.as_tensors(s.test.dataset)
    assert not (_rows(xtr) & _rows(xte))


def test_digits_split_and_shuffle_are_seeded(tiny_cfg):
    a, b = datasets.load(tiny_cfg), datasets.load(tiny_cfg)
    for part in ("train", "test"):
        xa, ya = datasets.as_tensors(getattr(a, part).dataset)
        xb, yb = datasets.as_tensors(getattr(b, part).dataset)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ba, bb = next(iter(a.train)), next(iter(b.train))
    assert torch.equal(ba[0], bb[0]) and torch.equal(ba[1], bb[1])
    other = datasets.load(config.load("smoke", train_size=128, test_size=64, seed=1))
    assert not torch.equal(datasets.as_tensors(a.test.dataset)[0], datasets.as_tensors(other.test.dataset)[0])


def test_digits_resized_when_asked():
    s = datasets.load(config.load("smoke", image_size=16, train_size=32, test_size=16))
    x, _ = datasets.first_batch(s.test, 5)
    assert s.input_shape == (1, 16, 16) and x.shape == (5, 1, 16, 16)
    assert x.min() >= 0 and x.max() <= 1


def test_first_batch_crosses_batches_in_order(tiny_cfg):
    cfg = config.load("smoke", train_size=64, test_size=40, batch_size=16)
    s = datasets.load(cfg)
    x, y = datasets.first_batch(s.test, 20)  # needs two batches of 16
    xa, ya = datasets.as_tensors(s.test.dataset)
    assert x.shape == (20, 1, 8, 8) and torch.equal(x, xa[:20]) and torch.equal(y, ya[:20])


# ---------------------------------------------------------------- ImageFolder datasets


def test_folder_dataset(tmp_path):
    root = image_folder(tmp_path / "imgs", ["cat", "dog", "emu"], 4)
    cfg = config.load("smoke", dataset="folder", data_dir=str(root), image_size=32, batch_size=4,
                      train_size=0, test_size=0, local_examples=1)
    s = datasets.load(cfg)
    assert s.num_classes == 3 and s.class_names == ["cat", "dog", "emu"]
    assert s.input_shape == (3, 32, 32)
    assert len(s.train.dataset) + len(s.test.dataset) == 12
    assert len(s.test.dataset) == 3  # round(4 * 0.2) = 1 of each class (stratified)
    assert sorted(split.labels(s.test.dataset)) == [0, 1, 2]
    for loader in (s.train, s.test):
        x, y = datasets.as_tensors(loader.dataset)
        assert x.shape[1:] == (3, 32, 32)
        assert x.min() >= 0 and x.max() <= 1
        # the red level says which class folder the image came from
        red = (x[:, 0].mean(dim=(1, 2)) * 255).round()
        assert torch.equal(red, (60 * y + 20).float())
    assert s.mean == datasets.IMAGENET_MEAN and s.std == datasets.IMAGENET_STD


def test_folder_with_too_few_images(tmp_path):
    root = image_folder(tmp_path / "one", ["a"], 1)
    with pytest.raises(ValueError, match="data_dir"):
        datasets.load(setup.load("smoke", dataset="folder", data_dir=str(root), image_size=8))


@pytest.mark.parametrize("fraction, n_test", [(0.9, 1), (0.1, 1)])
def test_tiny_folder_keeps_an_image_on_each_side(tmp_path, fraction, n_test):
    root = image_folder(tmp_path / "two", ["a", "b"], 1, size=(10, 10))
    s = datasets.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8,
                              test_fraction=fraction, train_size=0, test_size=0, local_examples=1))
    assert len(s.train.dataset) == 2 - n_test and len(s.test.dataset) == n_test


def test_imagenet_split_follows_test_fraction_and_seed(tmp_path):
    root = image_folder(tmp_path / "val", ["n01", "n02"], 10, size=(50, 40))
    cfg = config.load("smoke", dataset="imagenet", data_dir=str(root), image_size=32,
                      test_fraction=0.3, train_size=0, test_size=0)
    s = datasets.load(cfg)
    tr, te = s.train.dataset.indices, s.test.dataset.indices
    assert len(te) == 6 and len(tr) == 14
    assert sorted(tr + te) == list(range(20))
    again = datasets.load(cfg)
    assert again.train.dataset.indices == tr and again.test.dataset.indices == te
    other = datasets.load(config.load("smoke", dataset="imagenet", data_dir=str(root), image_size=32,
                                  test_fraction=0.3, train_size=0, test_size=0, seed=3))
    assert other.test.dataset.indices != te
    # resize to round(32 * 256 / 224) = 37 on the short side, then centre-crop 32
    assert s.input_shape == (3, 32, 32)
    x, y = datasets.first_batch(s.test, 6)
    assert x.shape == (6, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert set(y.tolist()) <= {0, 1}


def test_imagenet_centre_crop_keeps_the_centre(tmp_path):
    # a wide image: left/right thirds black, centre white; the crop must be all centre
    root = tmp_path / "val"
    for c in ("c", "d"):  # an ImageFolder needs at least two classes
        (root / c).mkdir(parents=True)
        for i in range(2):
            arr = np.zeros((40, 120, 3), dtype=np.uint8)
            arr[:, 40:80] = 255
            Image.fromarray(arr).save(root / c / f"{i}.png")
    s = datasets.load(config.load("smoke", dataset="imagenet", data_dir=str(root), image_size=28,
                              train_size=0, test_size=0, local_examples=1))
    x, _ = datasets.as_tensors(s.train.dataset)
    assert x.shape[1:] == (3, 28, 28)
    assert x[:, :, :, 4:-4].min() > 0.99  # resized to 32x96, the middle 32 columns are white


def test_train_size_limits_folder(tmp_path):
    root = image_folder(tmp_path / "imgs", ["a", "b"], 10, size=(12, 12))
    s = datasets.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8,
                              train_size=5, test_size=2, local_examples=1))
    assert len(s.train.dataset) == 5 and len(s.test.dataset) == 2
    assert not set(s.train.dataset.indices) & set(s.test.dataset.indices)


# ---------------------------------------------------------------- torchvision datasets, offline

@pytest.fixture
def no_download(monkeypatch):
    """Make any attempt to download fail loudly instead of reaching the network."""
    from torchvision.datasets import cifar, mnist

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download a dataset")

    monkeypatch.setattr(mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(cifar, "download_and_extract_archive", refuse)


def _write_idx(raw, prefix, n, rng):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return images, labels


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_from_local_idx_files(tmp_path, no_download, dataset, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images, _ = _write_idx(raw, "train", 30, rng)
    _write_idx(raw, "t10k", 20, rng)
    cfg = config.load("smoke", dataset=dataset, data_dir=str(tmp_path), image_size=28,
                      train_size=0, test_size=10, batch_size=8)
    s = datasets.load(cfg)
    assert s.num_classes == 10 and len(s.class_names) == 10
    assert s.input_shape == (1, 28, 28)
    assert len(s.train.dataset) == 30 and len(s.test.dataset) == 10
    x, y = datasets.as_tensors(s.train.dataset)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(y, torch.arange(30) % 10)
    assert torch.allclose(x[:, 0] * 255, torch.tensor(train_images, dtype=torch.float32), atol=1e-3)
    small = datasets.load(config.load("smoke", dataset=dataset, data_dir=str(tmp_path), image_size=8,
                                  train_size=12, test_size=4))
    assert small.input_shape == (1, 8, 8) and len(small.train.dataset) == 12


def test_cifar10_from_local_batches(tmp_path, monkeypatch, no_download):
    # torchvision's CIFAR format is pickled; these pickles are ones this test wrote itself.
    import os

    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        (base / name).write_bytes(pickle.dumps(batch))
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": labels}))
    s = datasets.load(config.load("smoke", dataset="cifar10", data_dir=str(tmp_path), image_size=32,
                              train_size=0, test_size=0))
    assert s.num_classes == 10 and s.class_names == labels
    assert s.input_shape == (3, 32, 32)
    assert len(s.train.dataset) == 20 and len(s.test.dataset) == 4
    x, y = datasets.as_tensors(s.test.dataset)
    assert x.min() >= 0 and x.max() <= 1 and y.tolist() == [0, 1, 2, 9]
    assert len(s.mean) == 3 and all(v > 0 for v in s.std)


def test_test_loader_uses_the_evaluation_batch_size():
    s = datasets.load(config.load("smoke", train_size=64, test_size=40, batch_size=16, eval_batch_size=32))
    assert s.train.batch_size == 16 and s.test.batch_size == 32
    assert [len(y) for _, y in s.test] == [32, 8]


# ---------------------------------------------------------------- stratified folder split

def _fake_folder(sizes: dict[str, int]) -> tuple[list[str], list[int]]:
    """Relative paths and labels as ImageFolder lists them (sorted by class, then path)."""
    paths, labels = [], []
    for c, (name, n) in enumerate(sorted(sizes.items())):
        paths += [f"{name}/img{i:05d}.JPEG" for i in range(n)]
        labels += [c] * n
    return paths, labels


def _members(groups: dict[int, list[int]], paths: list[str]) -> dict[str, set[str]]:
    return {paths[g[0]].split("/")[0]: {paths[i] for i in g} for g in groups.values() if g}


def test_stratified_split_per_class_counts_and_both_sides():
    sizes = {"a": 50, "b": 50, "c": 2, "d": 1, "e": 7, "f": 3}
    paths, labels = _fake_folder(sizes)
    train, test = split.stratified_split(paths, labels, 0.2, seed=0)
    counts = {name: len(test[c]) for c, name in enumerate(sorted(sizes))}
    assert counts == {"a": 10, "b": 10, "c": 1, "d": 0, "e": 1, "f": 1}
    for c, name in enumerate(sorted(sizes)):
        assert len(train[c]) + len(test[c]) == sizes[name]
        assert {labels[i] for i in train[c] + test[c]} == {c}
        if sizes[name] >= 2:
            assert train[c] and test[c]
    every = [i for g in (*train.values(), *test.values()) for i in g]
    assert sorted(every) == list(range(len(paths)))
    assert sum(counts.values()) == split.split_test_count(list(sizes.values()), 0.2)


def test_paper_split_is_10k_of_50k_with_10_per_class():
    paths, labels = _fake_folder({f"n{c:08d}": 50 for c in range(1000)})
    train, test = split.stratified_split(paths, labels, 0.2, seed=0)
    assert {len(g) for g in test.values()} == {10} and {len(g) for g in train.values()} == {40}
    assert split.split_test_count([50] * 1000, 0.2) == 10_000


def test_stratified_split_is_seeded_and_keeps_other_classes_when_one_changes():
    sizes = {"a": 20, "b": 20, "c": 20}
    paths, labels = _fake_folder(sizes)
    train, test = split.stratified_split(paths, labels, 0.25, seed=5)
    again = split.stratified_split(paths, labels, 0.25, seed=5)
    assert (train, test) == again
    assert split.stratified_split(paths, labels, 0.25, seed=6)[1] != test
    before = _members(test, paths)
    # class b loses 7 images and gains 3; a and c must keep exactly their test images
    changed = {"a": 20, "b": 16, "c": 20}
    paths2, labels2 = _fake_folder(changed)
    paths2 = [p.replace("b/img0001", "b/new0001") for p in paths2]
    after = _members(split.stratified_split(paths2, labels2, 0.25, seed=5)[1], paths2)
    assert after["a"] == before["a"] and after["c"] == before["c"]


def test_take_round_robin_covers_classes_first():
    groups = {0: [0, 1, 2, 3], 1: [10, 11], 2: [20, 21, 22]}
    names = ["x", "y", "z"]
    three = split.take_round_robin(groups, 3, 0, names)
    assert sorted(three) == [0, 10, 20]
    five = split.take_round_robin(groups, 5, 0, names)
    assert five[:3] == three and sorted(five[3:]) in ([1, 11], [1, 21], [11, 21])
    assert sorted(split.take_round_robin(groups, 0, 0, names)) == sorted(sum(groups.values(), []))
    assert sorted(split.take_round_robin(groups, 99, 0, names)) == sorted(sum(groups.values(), []))
    # the class order hangs on class names: adding a class keeps the others' relative order
    more = split.take_round_robin({**groups, 3: [30]}, 4, 0, names + ["w"])
    assert [i for i in more if i < 30] == three


def test_folder_limits_are_stratified(tmp_path):
    root = image_folder(tmp_path / "imgs", ["a", "b", "c"], 10, size=(12, 12))
    s = datasets.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8,
                              train_size=7, test_size=3, local_examples=1))
    assert sorted(split.labels(s.test.dataset)) == [0, 1, 2]
    assert sorted(Counter(split.labels(s.train.dataset)).values()) == [2, 2, 3]


def test_checks_size_the_stratified_split_without_reading_it(tmp_path):
    from rclib.data import checks

    root = image_folder(tmp_path / "imgs", ["a", "b", "c"], 4, size=(12, 12))
    for i in range(4, 7):  # class c gets 7 images: 1 + 1 + 1 test images at 0.2
        Image.new("RGB", (12, 12), (0, 0, i)).save(root / "c" / f"more{i}.png")
    cfg = config.load("smoke", dataset="folder", data_dir=str(root), image_size=8, train_size=0, test_size=0,
                      local_examples=1)
    shape = checks.dataset_shape(cfg)
    s = datasets.load(cfg)
    assert (shape.n_train, shape.n_test) == (len(s.train.dataset), len(s.test.dataset)) == (12, 3)
    with pytest.raises(ValueError, match="test_size=4"):
        setup.load("smoke", dataset="folder", data_dir=str(root), image_size=8, train_size=0, test_size=4,
                    local_examples=1)


# ---------------------------------------------------------------- image modes

def test_images_of_every_mode_load_as_rgb(tmp_path):
    root = odd_mode_folder(tmp_path / "modes")
    s = datasets.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=12, train_size=0,
                              test_size=0, local_examples=1, test_fraction=0.5))
    full = s.train.dataset.dataset
    assert len(full) == 2 * len(ODD_MODES)
    for i, (path, _) in enumerate(full.samples):
        img = datasets.rgb_loader(path)
        assert img.mode == "RGB"
        x = full[i][0]
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        if "I_16" in path:  # 16-bit gray is scaled to 8 bits, not clipped to white
            gray = np.asarray(img)[..., 0].astype(int)
            with Image.open(path) as raw:
                want = (np.asarray(raw).astype(int) * 255 + 32767) // 65535
            assert np.array_equal(gray, want) and gray.min() == 0 and (gray < 128).mean() > 0.4
        elif "_L." in path:
            with Image.open(path) as raw:
                assert np.array_equal(np.asarray(img)[..., 1], np.asarray(raw))


# ---------------------------------------------------------------- spread_sample

def test_spread_sample_covers_classes_and_is_seeded(tiny_cfg):
    s = datasets.load(config.load("smoke", train_size=0, test_size=0))
    x, y = split.spread_sample(s.test, 10, seed=0)
    assert x.shape == (10, 1, 8, 8) and sorted(y.tolist()) == list(range(10))
    x25, y25 = split.spread_sample(s.test.dataset, 25, seed=0)
    assert torch.equal(x25[:10], x) and torch.equal(y25[:10], y)  # a prefix of a larger sample
    counts = Counter(y25.tolist()).values()
    assert max(counts) - min(counts) <= 1
    xa, ya = datasets.as_tensors(s.test.dataset)
    assert _rows(x25) <= _rows(xa) and len(_rows(x25)) == 25
    for xi, yi in zip(x25, y25):  # each example keeps its own label
        assert ya[(xa == xi).flatten(1).all(1)].tolist() == [yi.item()]
    assert not torch.equal(split.spread_sample(s.test, 25, seed=1)[0], x25)
    assert torch.equal(split.spread_sample(s.test, 25, seed=0)[0], x25)


def test_spread_sample_takes_all_when_asked_for_more_and_refuses_bad_n(tiny_cfg):
    s = datasets.load(tiny_cfg)
    x, y = split.spread_sample(s.test, 10_000, seed=0)
    assert len(y) == len(s.test.dataset) and sorted(y.tolist()) == sorted(split.labels(s.test.dataset))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"n={bad!r}"):
            split.spread_sample(s.test, bad, seed=0)


def test_spread_sample_of_a_folder_reads_labels_without_decoding(tmp_path):
    root = image_folder(tmp_path / "imgs", ["a", "b", "c"], 6, size=(12, 12))
    s = datasets.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8, train_size=0,
                              test_size=0, local_examples=1, test_fraction=0.5, decoded_cache=False))
    x, y = split.spread_sample(s.test, 4, seed=0)
    assert x.shape == (4, 3, 8, 8) and set(y[:3].tolist()) == {0, 1, 2}
    red = (x[:, 0].mean(dim=(1, 2)) * 255).round()
    assert torch.equal(red, (60 * y + 20).float())


# ---------------------------------------------------------------- decoded cache

def _folder_cfg(root, **changes):
    base = dict(dataset="imagenet", data_dir=str(root), image_size=16, train_size=0, test_size=0,
                local_examples=1, test_fraction=0.5)
    return config.load("smoke", **{**base, **changes})


def test_decoded_cache_is_bit_identical_to_decoding(tmp_path, monkeypatch):
    from rclib.data import decoded

    root = odd_mode_folder(tmp_path / "modes", size=(40, 30))
    plain = datasets.load(_folder_cfg(root, decoded_cache=False))
    built = datasets.load(_folder_cfg(root))
    assert isinstance(built.test.dataset, decoded.DecodedImages)
    assert isinstance(built.train.dataset, Subset)  # only the test set is cached
    monkeypatch.setattr(decoded, "_build", lambda *a: pytest.fail("the cache was not used"))
    read = datasets.load(_folder_cfg(root))
    want_x, want_y = datasets.as_tensors(plain.test.dataset)
    for s in (built, read):
        x, y = datasets.as_tensors(s.test.dataset)
        assert x.dtype == torch.float32 and torch.equal(x, want_x) and torch.equal(y, want_y)
        assert s.test.dataset.indices == plain.test.dataset.indices
        assert s.test.num_workers == 0  # in memory already: no worker processes
    files = list((tmp_path / "artifacts" / decoded.FOLDER).iterdir())
    assert len(files) == 1
    images = read.test.dataset.images
    assert images.dtype == torch.uint8 and images.shape == (len(want_y), 3, 16, 16)


def test_decoded_cache_key_follows_folder_size_and_split(tmp_path):
    from rclib.data import decoded

    root = image_folder(tmp_path / "imgs", ["a", "b"], 6, size=(20, 20))
    datasets.load(_folder_cfg(root))
    datasets.load(_folder_cfg(root, image_size=12))
    datasets.load(_folder_cfg(root, seed=1))
    datasets.load(_folder_cfg(root))  # a hit: nothing new
    folder = tmp_path / "artifacts" / decoded.FOLDER
    assert len(list(folder.iterdir())) == 3
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "a" / "extra.png")
    datasets.load(_folder_cfg(root))
    assert len(list(folder.iterdir())) == 4


def test_decoded_cache_keeps_the_recently_used_entries_within_its_bound(tmp_path, monkeypatch):
    """Each seed's split is an entry of its own (1.5 GB at 224 px): past RCLIB_DECODED_GB the least
    recently used go, never the entry in use, and a later load of a kept one is still a hit."""
    from rclib.data import decoded

    root = image_folder(tmp_path / "imgs", ["a", "b"], 6, size=(20, 20))
    datasets.load(_folder_cfg(root, seed=0))
    one = decoded.entries()[0][1]  # bytes of one entry (all have the same shape here)
    monkeypatch.setenv("RCLIB_DECODED_GB", str(2.5 * one / 1e9))  # room for two entries
    datasets.load(_folder_cfg(root, seed=1))
    datasets.load(_folder_cfg(root, seed=0))  # a hit: seed 0 is now the most recently used
    first = {p.name for p, _, _ in decoded.entries()}
    datasets.load(_folder_cfg(root, seed=2))  # a third entry: seed 1, the least recently used, goes
    kept = decoded.entries()
    assert len(first) == 2 and len(kept) == 2 and sum(size for _, size, _ in kept) <= 2.5 * one
    names = {p.name for p, _, _ in kept}
    assert len(names & first) == 1  # one of the two old entries survived: the one used last
    build = decoded._build
    monkeypatch.setattr(decoded, "_build", lambda *a: pytest.fail("seed 0 was evicted"))
    datasets.load(_folder_cfg(root, seed=0))
    monkeypatch.setattr(decoded, "_build", build)
    monkeypatch.setenv("RCLIB_DECODED_GB", "0")  # even a bound of nothing keeps the entry in use
    datasets.load(_folder_cfg(root, seed=3))
    assert len(decoded.entries()) == 1
    monkeypatch.setenv("RCLIB_DECODED_GB", "lots")
    with pytest.raises(ValueError, match="RCLIB_DECODED_GB='lots'"):
        decoded.keep_bytes()


@pytest.mark.parametrize("damage", ["truncate", "labels"])
def test_damaged_or_unusable_decoded_cache_warns_and_is_rebuilt(tmp_path, damage):
    from safetensors.torch import load_file

    from rclib.core import artifacts
    from rclib.data import decoded

    root = image_folder(tmp_path / "imgs", ["a", "b"], 6, size=(20, 20))
    first = datasets.load(_folder_cfg(root))
    want = datasets.as_tensors(first.test.dataset)
    path = next((tmp_path / "artifacts" / decoded.FOLDER).iterdir())
    if damage == "truncate":
        (path / artifacts.WEIGHTS).write_bytes((path / artifacts.WEIGHTS).read_bytes()[:100])
        match = "ignoring damaged artifact"
    else:  # a consistent artifact (checksums fine) holding the wrong labels
        tensors = load_file(str(path / artifacts.WEIGHTS))
        info = artifacts.recorded(path)
        artifacts.discard(path)
        artifacts.save(path, {**tensors, "labels": 1 - tensors["labels"]}, {"n": 0}, info=info)
        match = "ignoring unusable decoded cache"
    with pytest.warns(UserWarning, match=match):
        again = datasets.load(_folder_cfg(root))
    got = datasets.as_tensors(again.test.dataset)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.load(_folder_cfg(root))  # rebuilt and intact


# ---------------------------------------------------------------- loader options

def test_loader_options_follow_the_device_and_workers():
    cfg = config.load("smoke", num_workers=2)
    assert datasets.loader_options(cfg, "cpu") == dict(num_workers=2, pin_memory=False, persistent_workers=True)
    assert datasets.loader_options(cfg, "cuda")["pin_memory"] is True
    assert datasets.loader_options(config.load("smoke", num_workers=2, pin_memory=False), "cuda")["pin_memory"] is False
    assert datasets.loader_options(config.load("smoke"), "cuda")["persistent_workers"] is False  # no workers
    digits = TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    assert datasets.loader_options(cfg, "cuda", Subset(digits, [0]))["num_workers"] == 0
    s = datasets.load(cfg)  # no device given: the config's (the CPU here)
    assert not s.train.pin_memory and s.train.num_workers == 0  # digits are in memory
    pinned = datasets.load(cfg, device="cuda")
    assert pinned.train.pin_memory and pinned.test.pin_memory


def test_folder_loader_with_persistent_workers(tmp_path):
    root = image_folder(tmp_path / "imgs", ["a", "b"], 4, size=(12, 12))
    s = datasets.load(_folder_cfg(root, image_size=8, num_workers=1, decoded_cache=False))
    assert s.train.num_workers == 1 and s.train.persistent_workers and not s.train.pin_memory
    assert sum(len(y) for _, y in s.train) == len(s.train.dataset)


def test_decoded_images_batch_and_item_agree_with_to_tensor():
    from torchvision.transforms.functional import to_tensor

    from rclib.data import decoded

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8, generator=g)
    ds = decoded.DecodedImages(images, torch.tensor([3, 1, 4, 1, 5]))
    for i in range(5):
        x, y = ds[i]
        assert torch.equal(x, to_tensor(Image.fromarray(images[i].permute(1, 2, 0).numpy())))
        assert isinstance(y, int) and y == [3, 1, 4, 1, 5][i]
    batch = ds.__getitems__([4, 0, 2])
    assert all(torch.equal(bx, ds[i][0]) and by == ds[i][1] for (bx, by), i in zip(batch, [4, 0, 2]))
    with pytest.raises(ValueError, match="uint8"):
        decoded.DecodedImages(images.float(), torch.zeros(5))


def test_digits_come_back_from_the_cache_identical_and_without_importing_sklearn(tmp_path):
    """The first load keeps load_digits and its seeded split under the artifact root; a later
    process reads them back (the same tensors) without importing scikit-learn's datasets or
    model_selection, 1.5-1.8 s of CPU per chapter kernel otherwise."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = config.load("smoke", seed=5)
    first = datasets.load(cfg)
    entry = next((artifacts.root() / datasets.DIGITS_FOLDER).iterdir())
    assert entry.name.startswith("seed5-test")
    code = ("import sys; from rclib.core import config; from rclib.data import datasets; from safetensors.torch import save_file; "
            "s = datasets.load(config.load('smoke', seed=5)); x, y = datasets.as_tensors(s.test.dataset); "
            "save_file({'x': x, 'y': y}, sys.argv[1]); print(sorted(m for m in sys.modules if m.startswith('sklearn.')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.safetensors")], capture_output=True,
                         text=True, check=True, env={**os.environ})
    assert "sklearn.model_selection" not in out.stdout and "sklearn.datasets" not in out.stdout, out.stdout
    back = load_file(str(tmp_path / "t.safetensors"))
    x, y = back["x"], back["y"]
    x0, y0 = datasets.as_tensors(first.test.dataset)
    assert torch.equal(x, x0) and torch.equal(y, y0)
