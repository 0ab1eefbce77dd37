"""Decision boundary maps (paper Sec 3.3, Fig 7-8) and a number for their smoothness.

The paper's heuristic: project the inputs on their first two principal components, sample a
grid in that plane, map every grid point back to pixel space with the inverse PCA transform,
and colour it by the model's predicted class, darker where the model is more confident.
:func:`decision_map` does exactly that; :func:`local_map` looks at the plane through a single
input spanned by its FGSM direction and a random direction, at the attack's own scale; and
:func:`roughness` turns a map into numbers, so "smoother" is measured rather than eyeballed.

A map is a plane in pixel space: grid coordinates ``(u, v)`` become the pixels
``clamp(origin + u * basis[0] + v * basis[1], 0, 1)``. Clamping keeps every queried point a
valid image, so far from the data the queried set is the plane folded onto the pixel cube.

Array convention: ``pred[i, j]`` is the grid point with ``v = vs[i]`` (rows, second axis) and
``u = us[j]`` (columns, first axis), so ``plt.imshow(m.pred, origin="lower", extent=m.extent)``
draws it with the first component horizontal.

Used by chapter 03 (Fig 7, boundaries of compressed models) and chapter 04 (Fig 8, Alg 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rclib.robust.attacks import input_gradient


@dataclass
class DecisionMap:
    """A model's predictions on a square grid in a 2-D plane of pixel space.

    Attributes:
        pred: (res, res) int array, predicted class at each grid point (rows = v, columns = u).
        conf: (res, res) float array in [0, 1], the max softmax probability there.
        extent: ``(umin, umax, vmin, vmax)`` of the grid, in the plane's coordinates.
        points: (N, 2) the data projected on the plane (one point, the origin, for a local map).
        origin: (D,) the plane's origin in flattened pixel space (D = C*H*W).
        basis: (2, D) the plane's directions in flattened pixel space.
        input_shape: (C, H, W) of the model's inputs.
        labels: (N,) labels of ``points`` when known, else None.
        pca: the fitted ``sklearn.decomposition.PCA`` for a PCA map (pass it to another
            :func:`decision_map` call to draw a second model in the same plane), else None.
        info: free-form description (kind, directions, radius, ...).
    """
    pred: np.ndarray
    conf: np.ndarray
    extent: tuple[float, float, float, float]
    points: np.ndarray
    origin: np.ndarray
    basis: np.ndarray
    input_shape: tuple[int, ...]
    labels: np.ndarray | None = None
    pca: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return self.pred.shape[0]

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """The grid's ``u`` values (columns) and ``v`` values (rows)."""
        umin, umax, vmin, vmax = self.extent
        return np.linspace(umin, umax, self.pred.shape[1]), np.linspace(vmin, vmax, self.pred.shape[0])

    def to_pixels(self, coords) -> torch.Tensor:
        """Plane coordinates (M, 2) to images (M, C, H, W) in [0, 1] (float32, CPU)."""
        c = torch.as_tensor(np.asarray(coords, dtype=np.float32))
        return _plane_pixels(c, torch.as_tensor(self.origin), torch.as_tensor(self.basis), self.input_shape)


def _plane_pixels(coords: torch.Tensor, origin: torch.Tensor, basis: torch.Tensor,
                  shape: tuple[int, ...]) -> torch.Tensor:
    flat = origin.to(coords) + coords @ basis.to(coords)
    return flat.clamp(0.0, 1.0).view(len(coords), *shape)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _grid(extent: tuple[float, float, float, float], resolution: int) -> np.ndarray:
    umin, umax, vmin, vmax = extent
    us, vs = np.linspace(umin, umax, resolution), np.linspace(vmin, vmax, resolution)
    uu, vv = np.meshgrid(us, vs)  # uu[i, j] = us[j], vv[i, j] = vs[i]
    return np.stack([uu.ravel(), vv.ravel()], axis=1).astype(np.float32)


@torch.no_grad()
def _predict_plane(model: nn.Module, coords: np.ndarray, origin: np.ndarray, basis: np.ndarray,
                   shape: tuple[int, ...], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and max softmax at each plane point; eval mode, caller's mode restored."""
    device = next(model.parameters()).device
    o = torch.as_tensor(origin, dtype=torch.float32, device=device)
    b = torch.as_tensor(basis, dtype=torch.float32, device=device)
    c = torch.as_tensor(coords, dtype=torch.float32, device=device)
    preds, confs = [], []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(c), batch_size):
            probs = model(_plane_pixels(c[i:i + batch_size], o, b, shape)).float().softmax(dim=1)
            conf, pred = probs.max(dim=1)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(confs).numpy().astype(np.float64)


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution={resolution!r} is not allowed: an integer >= 2")


def decision_map(model: nn.Module, x, y=None, resolution: int = 100, margin: float = 0.1, pca=None,
                 extent: tuple[float, float, float, float] | None = None,
                 batch_size: int = 1024) -> DecisionMap:
    """The paper's PCA decision map (Sec 3.3, Fig 7): predictions on a grid in the plane of the
    first two principal components of the inputs.

    Steps: fit ``PCA(2)`` on the flattened inputs (or reuse ``pca``); project the inputs; lay a
    ``resolution x resolution`` grid over their bounding box widened by ``margin`` times its
    width on each side; map each grid point back to pixels with the inverse transform
    (``mean + u * pc1 + v * pc2``, scaled like ``pca.inverse_transform`` when whitened) and clamp
    to [0, 1]; record the model's predicted class and max softmax probability, in eval mode,
    without gradients, in batches of ``batch_size`` (the caller's mode is restored).

    Args:
        model: classifier mapping (B, C, H, W) pixels in [0, 1] to (B, K) logits.
        x: (N, C, H, W) inputs (tensor or array) that define the plane and the extent.
        y: optional (N,) labels, kept in ``labels`` for scatter plots; not used otherwise.
        resolution: grid points per side (>= 2; default 100). Cost: ``resolution**2`` forward
            passes (10,000 at the default, well under a second for the small CPU models).
        margin: relative padding of the data's bounding box (>= 0; default 0.1).
        pca: a fitted ``sklearn.decomposition.PCA`` with >= 2 components, e.g. ``other.pca``,
            so several models are drawn in one plane. Default: fit one (``random_state=0``).
        extent: ``(umin, umax, vmin, vmax)`` to use instead of the data's padded bounding box.
        batch_size: grid points per forward pass.

    Returns:
        A :class:`DecisionMap` with ``pred`` and ``conf`` of shape (resolution, resolution).

    Example:
        >>> m = decision_map(model, x_test[:500], y_test[:500], resolution=100)
        >>> m_pruned = decision_map(pruned, x_test[:500], y_test[:500], pca=m.pca)
        >>> roughness(m)["boundary_length"], roughness(m_pruned)["boundary_length"]

    Used by chapters 03 and 04 (Fig 7 and Fig 8).
    """
    from sklearn.decomposition import PCA

    _check_resolution(resolution)
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin={margin!r} is not allowed: a finite number >= 0")
    xs = _as_numpy(x).astype(np.float32)
    if xs.ndim != 4:
        raise ValueError(f"x of shape {xs.shape} is not allowed: (N, C, H, W)")
    flat = xs.reshape(len(xs), -1)
    if pca is None:
        if len(xs) < 2:
            raise ValueError("x must hold at least 2 inputs to fit a PCA")
        pca = PCA(n_components=2, random_state=0).fit(flat)
    elif getattr(pca, "n_components_", 0) < 2 or pca.components_.shape[1] != flat.shape[1]:
        raise ValueError("pca must be a fitted PCA with >= 2 components on inputs of x's size")
    points = pca.transform(flat)[:, :2]
    basis = pca.components_[:2].astype(np.float64)
    if getattr(pca, "whiten", False):
        basis = basis * np.sqrt(pca.explained_variance_[:2])[:, None]
    origin = pca.mean_.astype(np.float64)
    if extent is None:
        lo, hi = points.min(axis=0), points.max(axis=0)
        pad = margin * np.maximum(hi - lo, 1e-6)
        extent = (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    pred, conf = _predict_plane(model, _grid(extent, resolution), origin, basis, xs.shape[1:], batch_size)
    r = resolution
    return DecisionMap(pred=pred.reshape(r, r), conf=conf.reshape(r, r), extent=tuple(extent),
                       points=points, origin=origin, basis=basis, input_shape=tuple(xs.shape[1:]),
                       labels=None if y is None else _as_numpy(y).astype(np.int64), pca=pca,
                       info=dict(kind="pca", explained_variance_ratio=pca.explained_variance_ratio_[:2].tolist()))


def local_map(model: nn.Module, x, y, radius: float = 0.3, resolution: int = 51, seed: int = 0,
              batch_size: int = 1024) -> DecisionMap:
    """Predictions in the plane through ONE input spanned by its FGSM direction and a random one.

    ``u`` runs along ``d1 = sign(grad_x CE(h(x), y))`` (the gradient taken in eval mode, as in
    :func:`rclib.robust.attacks.fgsm`), so the grid point ``(eps, 0)`` is exactly the FGSM example at
    ``eps`` (Eq 8) and the ``u`` axis is in pixel units of an L-infinity step. ``v`` runs along a
    random sign vector (seeded with ``seed``, independent of torch's global RNG), made orthogonal
    to ``d1`` and rescaled to ``d1``'s Euclidean length, so both directions move each pixel by 1
    on average (root mean square) per unit. Where the gradient is exactly zero (a saturated
    model), ``d1`` is replaced by a second random direction and ``info["directions"]`` says so.
    The grid is ``[-radius, radius]^2``, points clamped to [0, 1].

    Args:
        model: classifier; evaluated in eval mode, mode restored.
        x: one input, (C, H, W) or (1, C, H, W), pixels in [0, 1].
        y: its label (int or 0-d / 1-element tensor).
        radius: half-width of the grid in pixel units (> 0; default 0.3).
        resolution: grid points per side (>= 2; default 51: odd, so the input itself is the
            centre grid point).
        seed: seeds the random direction.
        batch_size: grid points per forward pass.

    Returns:
        A :class:`DecisionMap`; ``points`` is ``[[0, 0]]`` (the input), ``labels`` ``[y]``.

    Example:
        >>> m = local_map(model, x_test[0], y_test[0], radius=0.3)
        >>> roughness(m)

    Used by chapters 03 and 04 (boundaries around single test images, at the attack's scale).
    """
    _check_resolution(resolution)
    if not np.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius={radius!r} is not allowed: a finite number > 0")
    device = next(model.parameters()).device
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or len(x) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)} is not allowed: one input, (C, H, W) or (1, C, H, W)")
    y_t = torch.as_tensor(y, dtype=torch.long).view(1)
    grad = input_gradient(model, x.to(device), y_t.to(device)).cpu().double().flatten()
    gen = torch.Generator().manual_seed(int(seed))
    d2 = (torch.randint(0, 2, grad.shape, generator=gen, dtype=torch.float64) * 2 - 1)
    directions = ("fgsm_sign", "random")
    d1 = grad.sign()
    if not d1.any():
        d1 = torch.randint(0, 2, grad.shape, generator=gen, dtype=torch.float64) * 2 - 1
        directions = ("random (zero gradient)", "random")
    d2 = d2 - (d2 @ d1) / (d1 @ d1) * d1
    n2 = d2.norm()
    if n2 == 0:  # only possible for D == 1
        raise ValueError("cannot build a plane in a 1-dimensional input space")
    d2 = d2 * (d1.norm() / n2)
    basis = torch.stack([d1, d2]).numpy()
    origin = x.flatten().double().numpy()
    extent = (-float(radius), float(radius), -float(radius), float(radius))
    pred, conf = _predict_plane(model, _grid(extent, resolution), origin, basis, tuple(x.shape[1:]), batch_size)
    r = resolution
    return DecisionMap(pred=pred.reshape(r, r), conf=conf.reshape(r, r), extent=extent,
                       points=np.zeros((1, 2)), origin=origin, basis=basis, input_shape=tuple(x.shape[1:]),
                       labels=y_t.numpy(), pca=None,
                       info=dict(kind="local", directions=directions, radius=float(radius), seed=int(seed)))


def roughness(m) -> dict[str, float]:
    """Smoothness of a decision map as numbers (higher = rougher).

    Neighbour pairs are the horizontally and vertically adjacent grid points; an ``r x r`` grid
    has ``P = 2 r (r - 1)`` of them. With ``D`` the number of pairs whose predicted classes
    differ and ``|dc|`` the absolute confidence difference of a pair:

    * ``boundary_fraction = D / P``: in [0, 1]; 0 for a single class, 1 for a checkerboard. For a
      fixed smooth boundary it shrinks like ``1 / r`` as the grid gets finer; compare maps of the
      same resolution, or use the next number.
    * ``boundary_length = D / r``: the class boundaries' length measured in grid steps along the
      axes (Manhattan length), in units of the map's side: a straight boundary parallel to an axis
      gives 1, a diagonal one 2. For smooth boundaries it does not depend on the resolution; for
      jagged ones it grows as finer grids resolve more detail, which is what "rough" means.
    * ``confidence_variation = sum |dc| / P``: the mean confidence change between neighbours,
      in [0, 1] (scales like ``1 / r`` for a smooth confidence field).
    * ``confidence_tv = sum |dc| / r``: the anisotropic total variation of the confidence over the
      unit square, ``integral |d conf/du| + |d conf/dv|``, resolution-independent for smooth
      fields (a ramp from 0 to 1 across the map gives 1; so does a step from 0 to 1).
    * ``regions``: the number of 4-connected regions of one predicted class (a single class: 1;
      a checkerboard: ``r * r``). Small islands count as much as large regions.
    * ``classes``: the number of distinct predicted classes; ``mean_confidence``: the mean of
      ``conf``.

    Args:
        m: a :class:`DecisionMap`, or a 2-D integer array of predicted classes (then the
            confidence numbers are not reported).

    Returns:
        A dict of floats (``regions`` and ``classes`` are ints).

    Example:
        >>> roughness(decision_map(model, x))["boundary_fraction"]

    Used by chapters 03 and 04 (the smoothness column beside Fig 7 and Fig 8).
    """
    from scipy import ndimage

    if isinstance(m, DecisionMap):
        pred, conf = np.asarray(m.pred), np.asarray(m.conf, dtype=np.float64)
    else:
        pred, conf = np.asarray(m), None
    if pred.ndim != 2 or min(pred.shape) < 2:
        raise ValueError(f"a map of shape {pred.shape} is not allowed: (r, r) with r >= 2")
    h, w = pred.shape
    side = float(np.sqrt(h * w))  # r for square maps
    pairs = h * (w - 1) + w * (h - 1)
    diff = int((pred[:, 1:] != pred[:, :-1]).sum() + (pred[1:, :] != pred[:-1, :]).sum())
    regions = 0
    for c in np.unique(pred):
        regions += int(ndimage.label(pred == c)[1])  # default structure: 4-connectivity
    out: dict[str, float] = dict(boundary_fraction=diff / pairs, boundary_length=diff / side,
                                 regions=regions, classes=int(len(np.unique(pred))))
    if conf is not None:
        tv = float(np.abs(np.diff(conf, axis=1)).sum() + np.abs(np.diff(conf, axis=0)).sum())
        out.update(confidence_variation=tv / pairs, confidence_tv=tv / side, mean_confidence=float(conf.mean()))
    return out


RGB_FLOOR = 0.3  # least colour intensity of a decision map's region


def rgb(m: DecisionMap, num_classes: int | None = None) -> np.ndarray:
    """An (r, r, 3) float image in [0, 1]: class colour blended with white by confidence.

    Colours come from matplotlib's ``tab10`` (``tab20`` beyond 10 classes, cycled beyond 20).
    Intensity is ``FLOOR + (1 - FLOOR) t`` with ``t = (conf - 1/K) / (1 - 1/K)`` (0 at chance, 1
    when certain) and ``K = num_classes`` (``t = conf`` when not given), so confident regions are
    saturated and uncertain ones pale, as in the paper's Fig 7; the floor keeps every region's
    class visible (a collapsed model, near chance everywhere, would otherwise draw a white map).
    Draw with
    ``plt.imshow(rgb(m, K), origin="lower", extent=m.extent)``.

    Used by :mod:`rclib.report.plots` for Fig 7 and Fig 8.
    """
    import matplotlib

    k = num_classes if num_classes else int(m.pred.max()) + 1
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    colours = np.asarray(cmap.colors)[:, :3]
    base = colours[np.asarray(m.pred) % len(colours)]
    floor = 1.0 / num_classes if num_classes and num_classes > 1 else 0.0
    t = np.clip((np.asarray(m.conf) - floor) / (1.0 - floor), 0.0, 1.0)[..., None]
    t = RGB_FLOOR + (1.0 - RGB_FLOOR) * t
    return t * base + (1.0 - t) * np.ones_like(base)


def local_roughness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float = 0.3,
                    resolution: int = 41, seed: int = 0, batch_size: int = 1024) -> dict[str, float]:
    """:func:`roughness` of :func:`local_map` averaged over the inputs ``x`` (N, C, H, W).

    One local map per input (its FGSM direction and a random one, the random direction seeded
    with ``seed + i``), so a model's number reflects the boundary an attacker meets near the data,
    not one hand-picked example. Returns the mean of every roughness field. ``resolution`` is
    each map's grid points per side (the chapters pass ``cfg.local_resolution``), ``batch_size``
    the grid points per forward pass (``cfg.eval_batch_size``).

    Used by chapters 03 (roughness against robustness) and 04 (Figure 8).
    """
    totals: dict[str, float] = {}
    for i in range(len(x)):
        r = roughness(local_map(model, x[i:i + 1], y[i:i + 1], radius=radius,
                                resolution=resolution, seed=seed + i, batch_size=batch_size))
        for k, v in r.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / len(x) for k, v in totals.items()}
