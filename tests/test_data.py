"""rclib.data: every dataset kind on tiny inputs, without any download.

digits is embedded; ``folder`` and ``imagenet`` read fake ImageFolders written here with PIL;
mnist / fashion_mnist / cifar10 read tiny files in torchvision's own on-disk formats written
here, and torchvision's download functions are replaced by ones that fail, so a test can never
reach the network.
"""

from __future__ import annotations

import pickle
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from rclib import config, data

from toys import image_folder


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _all_train(splits: data.Splits) -> tuple[torch.Tensor, torch.Tensor]:
    return data.as_tensors(splits.train.dataset)


# ---------------------------------------------------------------- digits

def test_digits_shapes_range_and_sizes(tiny_cfg):
    s = data.load(tiny_cfg)
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert s.class_names == [str(i) for i in range(10)]
    assert len(s.train.dataset) == 128 and len(s.test.dataset) == 64
    x, y = next(iter(s.train))
    assert x.shape == (tiny_cfg.batch_size, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (tiny_cfg.batch_size,) and y.dtype == torch.long
    xt, yt = data.as_tensors(s.test.dataset)
    for t in (x, xt):
        assert t.min() >= 0 and t.max() <= 1
    assert t.max() == 1.0  # full scale is used (16/16)
    assert set(yt.tolist()) <= set(range(10))
    assert len(s.mean) == len(s.std) == 1 and 0 < s.mean[0] < 1 and s.std[0] > 0


def test_digits_full_split_is_stratified_and_disjoint():
    cfg = config.load("smoke", train_size=0, test_size=0)
    s = data.load(cfg)
    xtr, ytr = _all_train(s)
    xte, yte = data.as_tensors(s.test.dataset)
    assert len(ytr) + len(yte) == 1797
    assert abs(len(yte) - 1797 * cfg.test_fraction) <= 1  # sklearn rounds the test share up
    assert not (_rows(xtr) & _rows(xte))  # the 1797 digit images are all distinct
    counts = Counter(yte.tolist())
    assert set(counts) == set(range(10))
    assert max(counts.values()) - min(counts.values()) <= 2  # ~36 of each class


def test_digits_limits_keep_every_class(tiny_cfg):
    s = data.load(tiny_cfg)
    _, ytr = _all_train(s)
    _, yte = data.as_tensors(s.test.dataset)
    assert set(ytr.tolist()) == set(range(10))
    assert len(set(yte.tolist())) >= 8
    xtr, _ = _all_train(s)
    xte, _ = data.as_tensors(s.test.dataset)
    assert not (_rows(xtr) & _rows(xte))


def test_digits_split_and_shuffle_are_seeded(tiny_cfg):
    a, b = data.load(tiny_cfg), data.load(tiny_cfg)
    for part in ("train", "test"):
        xa, ya = data.as_tensors(getattr(a, part).dataset)
        xb, yb = data.as_tensors(getattr(b, part).dataset)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ba, bb = next(iter(a.train)), next(iter(b.train))
    assert torch.equal(ba[0], bb[0]) and torch.equal(ba[1], bb[1])
    other = data.load(config.load("smoke", train_size=128, test_size=64, seed=1))
    assert not torch.equal(data.as_tensors(a.test.dataset)[0], data.as_tensors(other.test.dataset)[0])


def test_digits_resized_when_asked():
    s = data.load(config.load("smoke", image_size=16, train_size=32, test_size=16))
    x, _ = data.first_batch(s.test, 5)
    assert s.input_shape == (1, 16, 16) and x.shape == (5, 1, 16, 16)
    assert x.min() >= 0 and x.max() <= 1


def test_first_batch_crosses_batches_in_order(tiny_cfg):
    cfg = config.load("smoke", train_size=64, test_size=40, batch_size=16)
    s = data.load(cfg)
    x, y = data.first_batch(s.test, 20)  # needs two batches of 16
    xa, ya = data.as_tensors(s.test.dataset)
    assert x.shape == (20, 1, 8, 8) and torch.equal(x, xa[:20]) and torch.equal(y, ya[:20])


# ---------------------------------------------------------------- ImageFolder datasets


def test_folder_dataset(tmp_path):
    root = image_folder(tmp_path / "imgs", ["cat", "dog", "emu"], 4)
    cfg = config.load("smoke", dataset="folder", data_dir=str(root), image_size=32, batch_size=4,
                      train_size=0, test_size=0, local_examples=1)
    s = data.load(cfg)
    assert s.num_classes == 3 and s.class_names == ["cat", "dog", "emu"]
    assert s.input_shape == (3, 32, 32)
    assert len(s.train.dataset) + len(s.test.dataset) == 12
    assert len(s.test.dataset) == round(12 * cfg.test_fraction)
    for loader in (s.train, s.test):
        x, y = data.as_tensors(loader.dataset)
        assert x.shape[1:] == (3, 32, 32)
        assert x.min() >= 0 and x.max() <= 1
        # the red level says which class folder the image came from
        red = (x[:, 0].mean(dim=(1, 2)) * 255).round()
        assert torch.equal(red, (60 * y + 20).float())
    assert s.mean == data.IMAGENET_MEAN and s.std == data.IMAGENET_STD


def test_folder_with_too_few_images(tmp_path):
    root = image_folder(tmp_path / "one", ["a"], 1)
    with pytest.raises(ValueError, match="data_dir"):
        data.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8))


@pytest.mark.parametrize("fraction, n_test", [(0.9, 1), (0.1, 1)])
def test_tiny_folder_keeps_an_image_on_each_side(tmp_path, fraction, n_test):
    root = image_folder(tmp_path / "two", ["a", "b"], 1, size=(10, 10))
    s = data.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8,
                              test_fraction=fraction, train_size=0, test_size=0, local_examples=1))
    assert len(s.train.dataset) == 2 - n_test and len(s.test.dataset) == n_test


def test_imagenet_split_follows_test_fraction_and_seed(tmp_path):
    root = image_folder(tmp_path / "val", ["n01", "n02"], 10, size=(50, 40))
    cfg = config.load("smoke", dataset="imagenet", data_dir=str(root), image_size=32,
                      test_fraction=0.3, train_size=0, test_size=0)
    s = data.load(cfg)
    tr, te = s.train.dataset.indices, s.test.dataset.indices
    assert len(te) == 6 and len(tr) == 14
    assert sorted(tr + te) == list(range(20))
    again = data.load(cfg)
    assert again.train.dataset.indices == tr and again.test.dataset.indices == te
    other = data.load(config.load("smoke", dataset="imagenet", data_dir=str(root), image_size=32,
                                  test_fraction=0.3, train_size=0, test_size=0, seed=3))
    assert other.test.dataset.indices != te
    # resize to round(32 * 256 / 224) = 37 on the short side, then centre-crop 32
    assert s.input_shape == (3, 32, 32)
    x, y = data.first_batch(s.test, 6)
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
    s = data.load(config.load("smoke", dataset="imagenet", data_dir=str(root), image_size=28,
                              train_size=0, test_size=0, local_examples=1))
    x, _ = data.as_tensors(s.train.dataset)
    assert x.shape[1:] == (3, 28, 28)
    assert x[:, :, :, 4:-4].min() > 0.99  # resized to 32x96, the middle 32 columns are white


def test_train_size_limits_folder(tmp_path):
    root = image_folder(tmp_path / "imgs", ["a", "b"], 10, size=(12, 12))
    s = data.load(config.load("smoke", dataset="folder", data_dir=str(root), image_size=8,
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
    s = data.load(cfg)
    assert s.num_classes == 10 and len(s.class_names) == 10
    assert s.input_shape == (1, 28, 28)
    assert len(s.train.dataset) == 30 and len(s.test.dataset) == 10
    x, y = data.as_tensors(s.train.dataset)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(y, torch.arange(30) % 10)
    assert torch.allclose(x[:, 0] * 255, torch.tensor(train_images, dtype=torch.float32), atol=1e-3)
    small = data.load(config.load("smoke", dataset=dataset, data_dir=str(tmp_path), image_size=8,
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
    s = data.load(config.load("smoke", dataset="cifar10", data_dir=str(tmp_path), image_size=32,
                              train_size=0, test_size=0))
    assert s.num_classes == 10 and s.class_names == labels
    assert s.input_shape == (3, 32, 32)
    assert len(s.train.dataset) == 20 and len(s.test.dataset) == 4
    x, y = data.as_tensors(s.test.dataset)
    assert x.min() >= 0 and x.max() <= 1 and y.tolist() == [0, 1, 2, 9]
    assert len(s.mean) == 3 and all(v > 0 for v in s.std)


def test_test_loader_uses_the_evaluation_batch_size():
    s = data.load(config.load("smoke", train_size=64, test_size=40, batch_size=16, eval_batch_size=32))
    assert s.train.batch_size == 16 and s.test.batch_size == 32
    assert [len(y) for _, y in s.test] == [32, 8]
