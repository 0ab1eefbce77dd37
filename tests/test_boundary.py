"""rclib.robust.boundary: PCA maps on a hand-made model, roughness of known maps, local maps, modes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from sklearn.decomposition import PCA
from torch import nn
from toys import LiveModels, tiny_vgg  # noqa: E402

from rclib.experiments import pruning, smoothness
from rclib.robust import boundary  # noqa: E402
from rclib.robust.attacks import fgsm
from rclib.robust.boundary import DecisionMap, decision_map, local_map, rgb, roughness

torch.set_num_threads(1)

def planar_data(n: int = 200, seed: int = 0) -> torch.Tensor:
    """(n, 1, 4, 4) images 0.5 + a e1 + b e2 + small noise, a wider than b; never clamped on the grid."""
    g = torch.Generator().manual_seed(seed)
    e1 = torch.tensor([1.0, -1.0] * 8) / 4  # unit vectors, entries +-1/4, orthogonal
    e2 = torch.tensor([1.0, 1.0, -1.0, -1.0] * 4) / 4
    a = torch.rand(n, 1, generator=g) * 2 - 1
    b = (torch.rand(n, 1, generator=g) * 2 - 1) * 0.4
    x = 0.5 + a * e1 + b * e2 + 0.005 * torch.randn(n, 16, generator=g)
    return x.view(n, 1, 4, 4)


class FirstComponentSign(nn.Module):
    """Class 0 where the projection on ``pc1`` (about ``mean``) is positive, class 1 elsewhere."""

    def __init__(self, pca: PCA):
        super().__init__()
        self.register_buffer("w", torch.tensor(pca.components_[0], dtype=torch.float32))
        self.register_buffer("m", torch.tensor(pca.mean_, dtype=torch.float32))
        self.scale = nn.Parameter(torch.tensor(5.0))  # a parameter, so the device can be read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x.flatten(1) - self.m) @ self.w * self.scale
        return torch.stack([s, -s], dim=1)


# ---- the PCA map -----------------------------------------------------------------------------

def test_pca_map_of_a_first_component_classifier_is_split_at_zero():
    x = planar_data()
    pca = PCA(n_components=2, random_state=0).fit(x.flatten(1).numpy())
    model = FirstComponentSign(pca).train()
    m = decision_map(model, x, resolution=20, pca=pca)
    assert model.training  # mode restored
    us, vs = m.axes()
    assert (us != 0).all()
    expected = np.where(us > 0, 0, 1)[None, :].repeat(20, axis=0)
    np.testing.assert_array_equal(m.pred, expected)
    r = roughness(m)
    assert r["regions"] == 2 and r["classes"] == 2
    assert r["boundary_length"] == pytest.approx(1.0)  # one straight boundary across the map
    assert r["boundary_fraction"] == pytest.approx(20 / (2 * 20 * 19))
    # the grid really spans the first two components: points map back onto the data
    back = m.to_pixels(m.points[:5]).flatten(1).numpy()
    np.testing.assert_allclose(back, pca.inverse_transform(pca.transform(x[:5].flatten(1).numpy())), atol=1e-5)


def test_pca_map_shapes_ranges_and_shared_plane():
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    model = tiny_vgg().eval()
    m = decision_map(model, x, y, resolution=30)
    assert not model.training
    assert m.pred.shape == m.conf.shape == (30, 30) and m.resolution == 30
    assert m.pred.dtype.kind == "i" and m.pred.min() >= 0 and m.pred.max() < 10
    assert ((m.conf >= 0) & (m.conf <= 1)).all() and (m.conf >= 0.1 - 1e-6).all()  # max of 10 probs
    umin, umax, vmin, vmax = m.extent
    assert m.points.shape == (64, 2) and m.labels.tolist() == y.tolist()
    assert ((m.points[:, 0] > umin) & (m.points[:, 0] < umax)).all()
    assert ((m.points[:, 1] > vmin) & (m.points[:, 1] < vmax)).all()
    other = decision_map(tiny_vgg(seed=1), x, resolution=30, pca=m.pca)  # a second model, same plane
    assert other.extent == m.extent and np.array_equal(other.points, m.points)
    with pytest.raises(ValueError, match="resolution="):
        decision_map(model, x, resolution=1)
    with pytest.raises(ValueError, match="margin="):
        decision_map(model, x, margin=-0.1)


def test_pca_map_at_resolution_100_is_cheap():
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = tiny_vgg().train()
    decision_map(model, x, resolution=10)  # warm-up
    start = time.perf_counter()
    m = decision_map(model, x, resolution=100)
    elapsed = time.perf_counter() - start
    assert m.pred.shape == (100, 100) and model.training
    assert elapsed < 3.0, f"{elapsed:.2f} s"  # about 0.1-0.3 s unloaded; slack for a busy machine


# ---- roughness -------------------------------------------------------------------------------

def _map(pred: np.ndarray, conf: np.ndarray | None = None) -> DecisionMap:

    conf = np.ones(pred.shape) if conf is None else conf
    return DecisionMap(pred=pred, conf=conf, extent=(0, 1, 0, 1), points=np.zeros((0, 2)),
                       origin=np.zeros(4), basis=np.zeros((2, 4)), input_shape=(1, 2, 2))


@pytest.mark.parametrize("r", [8, 25])
def test_roughness_of_constant_and_checkerboard(r):
    const = roughness(_map(np.full((r, r), 3)))
    assert const["boundary_fraction"] == 0 and const["boundary_length"] == 0
    assert const["regions"] == 1 and const["classes"] == 1
    assert const["confidence_variation"] == 0 and const["confidence_tv"] == 0
    i, j = np.indices((r, r))
    checker = roughness(_map((i + j) % 2))
    assert checker["boundary_fraction"] == 1.0
    assert checker["regions"] == r * r and checker["classes"] == 2
    assert roughness((i + j) % 2) == {k: checker[k] for k in ("boundary_fraction", "boundary_length",
                                                              "regions", "classes")}


def test_roughness_length_and_tv_do_not_depend_on_resolution():
    for r in (10, 40, 160):
        _, j = np.indices((r, r))
        ramp = np.linspace(0, 1, r)[None, :].repeat(r, axis=0)
        out = roughness(_map((j >= r // 2).astype(int), ramp))
        assert out["boundary_length"] == pytest.approx(1.0)
        assert out["confidence_tv"] == pytest.approx(1.0)
        assert out["regions"] == 2


# ---- local maps ------------------------------------------------------------------------------

def test_local_map_plane_through_the_input_along_fgsm():
    model = tiny_vgg().train()
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    y = 4
    m = local_map(model, x, y, radius=0.2, resolution=21, seed=5)
    assert model.training
    assert m.pred.shape == m.conf.shape == (21, 21) and m.extent == (-0.2, 0.2, -0.2, 0.2)
    d1, d2 = torch.as_tensor(m.basis)
    assert abs(float(d1 @ d2)) < 1e-9 and float(d1.norm()) == pytest.approx(float(d2.norm()))
    # the centre grid point is the input; (eps, 0) is FGSM's example at eps
    torch.testing.assert_close(m.to_pixels([[0.0, 0.0]])[0], x)
    eps = 0.1
    torch.testing.assert_close(m.to_pixels([[eps, 0.0]]), fgsm(model, x[None], torch.tensor([y]), eps))
    centre_pred = model.eval()(x[None]).argmax(1).item()
    assert m.pred[10, 10] == centre_pred
    # deterministic with the seed, another seed another random direction
    again = local_map(model, x, torch.tensor(y), radius=0.2, resolution=21, seed=5)
    np.testing.assert_array_equal(again.pred, m.pred)
    np.testing.assert_array_equal(again.basis, m.basis)
    other = local_map(model, x, y, radius=0.2, resolution=21, seed=6)
    np.testing.assert_array_equal(other.basis[0], m.basis[0])
    assert not np.array_equal(other.basis[1], m.basis[1])
    with pytest.raises(ValueError, match="radius="):
        local_map(model, x, y, radius=0.0)


def test_rgb_image():
    pred = np.array([[0, 1], [2, 3]])
    conf = np.array([[1.0, 0.1], [0.55, 1.0]])
    img = rgb(_map(pred, conf), num_classes=10)
    assert img.shape == (2, 2, 3) and (img >= 0).all() and (img <= 1).all()
    import matplotlib

    colours = np.asarray(matplotlib.colormaps["tab10"].colors)[:, :3]
    np.testing.assert_allclose(img[0, 0], colours[0])  # certain: the class colour itself
    # chance-level confidence: the palest tint, still showing its class (a collapsed model's map
    # must not be white)
    floor = boundary.RGB_FLOOR
    np.testing.assert_allclose(img[0, 1], floor * colours[1] + (1 - floor))
    assert not np.allclose(img[0, 1], 1.0)


# ---- batches and streaming -------------------------------------------------------------------

class _Batches(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


def test_map_forward_passes_come_in_batches_of_the_given_size():
    model = tiny_vgg().eval()
    x = torch.rand(30, 1, 8, 8)
    y = torch.randint(0, 10, (30,))
    whole = decision_map(model, x, y, resolution=12)
    counted = _Batches(model)
    small = decision_map(counted, x, y, resolution=12, batch_size=50)
    assert counted.sizes == [50] * 2 + [44] and np.array_equal(small.pred, whole.pred)
    np.testing.assert_allclose(small.conf, whole.conf, rtol=1e-6)
    counted.sizes.clear()
    rough = boundary.local_roughness(counted, x[:2], y[:2], resolution=11, batch_size=100)
    grid = [s for s in counted.sizes if s != 1]  # one input-gradient pass per local map
    assert grid == [100, 21] * 2 and rough == boundary.local_roughness(model, x[:2], y[:2], resolution=11)


def test_boundary_sweep_streams_variants_with_masks_folded(monkeypatch):
    """Chapter 03's sweep holds base and one variant at a time (it once kept 26 masked VGG16s, about
    41 GB) and evaluates them with their masks folded, with the numbers of the masked models."""
    from rclib.core import config
    from rclib.data import datasets
    from rclib.experiments import steps
    from rclib.nn import train
    from rclib.robust import attacks

    cfg = config.load("smoke", epsilon=0.1, train_size=128, test_size=64, epochs=1, width=4, hidden=16, map_rates=[0.5],
                      local_examples=2, resolution=10, local_resolution=11, eval_batch_size=64)
    splits = datasets.load(cfg)
    base, _, _ = steps.baseline(cfg, splits, progress=False)
    live, masked = [], []
    evaluate = train.evaluate
    models_ = LiveModels().start(monkeypatch)  # base exists already and is not counted

    def counting(model, loader, *args, **kwargs):  # how many VGGs exist besides base while a variant is measured
        live.append(models_.count(limit=1))
        masked.append(torch_prune.is_pruned(model))
        return evaluate(model, loader, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", counting)
    rows, hit = smoothness.boundary_sweep(cfg, splits, base, progress=False)
    monkeypatch.setattr(train, "evaluate", evaluate)
    labels = [r["label"] for r in rows]
    assert not hit and len(rows) == 2 + 2 * len(pruning.ALGORITHMS) and len(live) == len(rows)
    assert max(live) <= 1 and not any(masked)  # the variant measured (and base); no masks
    variants = smoothness.compressed_variants(cfg, splits, base, cfg.map_rates)
    assert list(variants) == labels and variants["layer r=0.5 + WS"] == dict(method="layer", rate=0.5, shared=True)
    assert all(isinstance(h, pruning.HostModel) for h in variants.hardened.values())
    row = rows[labels.index("global r=0.5")]
    with_masks = pruning.pruned(base, pruning.GLOBAL, 0.5)  # as the sweep measured it before streaming
    assert torch_prune.is_pruned(with_masks) and row["accuracy"] == evaluate(with_masks, splits.test)
    assert row["robust_accuracy"] == attacks.robust_accuracy(with_masks, splits.test, attacks.fgsm, cfg.epsilon)
