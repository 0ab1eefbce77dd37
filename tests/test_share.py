"""Weight sharing (Alg 6, Eq 6-7): k-means quality, pruned zeros, codebook sizes, formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from rclib.compress import kmeans, share, sizes
from rclib.nn import models

SPEC = dict(model="vgg_small", width=8, hidden=32, batch_norm=True, dropout=0.5, num_classes=10,
            input_shape=[1, 8, 8], mean=[0.3], std=[0.3])


def _pruned_vgg(rate: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    model = models.from_spec(SPEC)
    params = [(m, "weight") for _, m in models.prunable_layers(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=rate)
    return model


def _gap_sample(n: int = 20000, seed: int = 0) -> np.ndarray:
    """Normal weights with |w| < 0.5 sigma pruned away: the non-zeros have a gap around 0."""
    w = np.random.default_rng(seed).normal(0.0, 1.0, n).astype(np.float32)
    return w[np.abs(w) >= 0.5]


def _mse(x, c, labels):
    return float(np.mean((x - c[labels]) ** 2))


@pytest.mark.parametrize("k", [32, 256])
def test_kmeans_1d_no_worse_than_sklearn_same_linear_init(k):
    from sklearn.cluster import KMeans

    x = _gap_sample()
    c, labels = kmeans.kmeans_1d(x, k)
    ours = _mse(x, c, labels)
    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    for tol in (1e-4, 0.0):  # scikit-learn's default stop, and run to convergence
        km = KMeans(k, init=init, n_init=1, max_iter=300, tol=tol).fit(x.reshape(-1, 1).astype(np.float64))
        theirs = _mse(x, km.cluster_centers_.ravel().astype(np.float32), km.labels_)
        assert ours <= theirs * (1 + 1e-3), (tol, ours, theirs)


def test_kmeans_1d_fills_empty_clusters_from_linear_init():
    # two tight groups far apart: most linearly spaced centroids start in the empty middle
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1.0, -0.9, 500), rng.uniform(0.9, 1.0, 500)]).astype(np.float32)
    c, labels = kmeans.kmeans_1d(x, 16, refine=0)
    assert c.shape == (16,) and np.unique(c).size == 16 and np.all(np.diff(c) > 0)
    assert np.unique(labels).size == 16  # every cluster is used
    # labels are the nearest centroid
    assert np.array_equal(np.argmin(np.abs(x[:, None] - c[None, :]), axis=1), labels)
    # far better than leaving 14 clusters empty (one centroid per group)
    assert _mse(x, c, labels) < 0.2 * np.mean([np.var(x[:500]), np.var(x[500:])])


def test_kmeans_1d_few_distinct_values_is_lossless():
    x = np.array([0.5, -0.25, 0.5, 3.0], dtype=np.float32)
    c, labels = kmeans.kmeans_1d(x, 8)
    assert np.array_equal(c, np.array([-0.25, 0.5, 3.0], np.float32))
    assert np.array_equal(c[labels], x)


def test_weight_share_keeps_pruned_zeros_and_mask():
    model = _pruned_vgg()
    before = {n: (m.weight_mask.clone(), int(torch.count_nonzero(m.weight))) for n, m in models.prunable_layers(model)}
    books = share.weight_share(model, bits=3)
    for name, m in models.prunable_layers(model):
        mask, nnz = before[name]
        assert torch.equal(m.weight_mask, mask)  # reparametrisation kept
        w = m.weight_orig * m.weight_mask
        assert torch.equal(m.weight, w)  # the cached weight is up to date
        assert torch.all(w[mask == 0] == 0)
        assert int(torch.count_nonzero(w)) == nnz
        assert books[name].positions.size == nnz
        assert np.array_equal(books[name].dense(), w.detach().numpy())


@pytest.mark.parametrize("bits", [2, 5])
def test_at_most_2_to_the_n_distinct_values(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 200))
    share.weight_share(model, bits={"conv": 8, "linear": bits})
    books = share.codebooks(model)
    assert len(books["0"]) == 2**8  # 1152 conv weights, 256 values
    assert len(books["3"]) == 2**bits


def test_weight_share_plain_layer_in_place_and_layers_subset():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 5))
    second = model[1].weight.detach().clone()
    with torch.no_grad():
        model[0].weight[0] = 0.0
    books = share.weight_share(model, bits=4, layers=["0"])
    assert set(books) == {"0"}
    assert torch.equal(model[1].weight, second)
    assert torch.all(model[0].weight[0] == 0)
    assert torch.unique(model[0].weight[1:]).numel() <= 16


def test_compression_rate_eq_6_7_by_hand():
    # (2^5 * 32 + 5 * 1000) / (1000 * 32) = 6024 / 32000 = 2^5/1000 + 5/32
    assert sizes.compression_rate(5, 1000) == pytest.approx(0.18825, abs=1e-12)
    assert sizes.compression_rate(5, 1000) == pytest.approx(2**5 / 1000 + 5 / 32)
    assert sizes.compression_rate(8, 10**6, weight_bits=16) == pytest.approx(256 / 10**6 + 8 / 16)


def test_shared_size_mb_by_hand():
    layer = nn.Linear(10, 4)
    with torch.no_grad():
        layer.weight.view(-1)[::2] = 0.0  # 20 of 40 weights non-zero
        layer.bias.fill_(1.0)
    model = nn.Sequential(layer)
    # 20 indices x 5 bits + 2^5 table entries x 32 bits + 4 biases x 32 bits
    assert sizes.shared_size_mb(model, bits={"linear": 5}) == pytest.approx((20 * 5 + 32 * 32 + 4 * 32) / 8 / 1e6)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, "8", True, {"conv": 8, "linear": 40}, {"dense": 4}])
def test_bad_bits_names_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        share.weight_share(nn.Sequential(nn.Linear(3, 3)), bits=bits)


def test_compression_rate_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        sizes.compression_rate(0, 100)
    with pytest.raises(ValueError, match="n_weights"):
        sizes.compression_rate(4, 0)


def test_kmeans_1d_labels_are_exactly_the_nearest_centroid_on_binned_data():
    # 300k values: the histogram path; many bins are cut by a midpoint and searched per value
    x = np.concatenate([_gap_sample(400_000, seed=3), -np.float32(1e-3) * np.arange(1, 1000, dtype=np.float32)])
    for k in (32, 256):
        c, labels = kmeans.kmeans_1d(x, k, refine=20)
        mids = (c[:-1].astype(np.float64) + c[1:]) / 2
        assert np.array_equal(labels, np.searchsorted(mids, x, side="right"))
        assert np.unique(labels).size == k
        # the centroids are the means of their clusters up to a bin: re-centring gains < 0.1%
        means = np.bincount(labels, weights=x, minlength=k) / np.bincount(labels, minlength=k)
        assert _mse(x, c, labels) <= 1.001 * float(np.mean((x - means[labels]) ** 2))
