# Frozen copy of rclib/share.py at commit e46de29 (before issue 15): the "today" column of the
# benchmarks in bench/, timed beside the current code in one run. Not part of rclib; do not edit.
"""Weight sharing (paper Sec. 1.2 and 2.2: Alg 6, Eq 6-7).

Weight sharing is the quantiser ``Q`` of the paper's Eq 2: every prunable layer's non-zero
weights are clustered by k-means into ``2^n`` values (``l_bins``) whose initial centroids are
*linearly spaced* between the layer's smallest and largest weight; each weight is then replaced
by its centroid. A layer can then be stored as ``n``-bit indices into a ``2^n``-entry float
lookup table plus the positions of the non-zeros (COO), instead of 32-bit floats.

Why our own 1-D k-means (:func:`kmeans_1d`) instead of scikit-learn: VGG16 has 138M weights and
its first linear layer alone 103M. In one dimension Lloyd's algorithm is exact and cheap once the
values are sorted: the clusters are contiguous runs of the sorted values, the boundaries are the
midpoints between neighbouring centroids (one ``np.searchsorted`` of ``k`` midpoints), and the
cluster means come from prefix sums. One sort, then each iteration costs O(k log N) instead of
O(N k). scikit-learn's ``KMeans`` needs minutes per full VGG16 pass (``bench/bench_share.py``
measures both).

The pitfall this module guards against: linearly spaced initial centroids land in the pruning
gap (after magnitude pruning no weight is near zero), so plain Lloyd leaves those clusters empty
for ever (about 20% of 256 on VGG16) and quantises worse than scikit-learn, which relocates
empty clusters. :func:`kmeans_1d` re-seeds every empty cluster by splitting the cluster with the
largest squared error, which never increases the error, so all ``2^n`` values get used. Lloyd's
fixed points are still only local optima (scikit-learn's too), so split-merge moves that strictly
lower the error follow. Measured on VGG16 (random init, 50% pruned, ``bench/bench_share.py``):
all 16 layers in ~15 s on one core, against ~280 s extrapolated for scikit-learn, with about
half scikit-learn's quantisation error on the 256-cluster convolutions and 0.88x on the linears.

Used by chapter 02 (weight sharing) and 04.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import torch
from torch import nn

from rclib.nn.masks import effective as effective_weight  # noqa: F401  (public here too)
from rclib.nn.models import prunable_layers

Bits = Union[int, Mapping[str, int]]
DEFAULT_BITS: dict[str, int] = {"conv": 8, "linear": 5}  # the paper's Sec. 3.2 (2^8 and 2^5 bins)
UNITS = {"MB": 1e6, "MiB": 2**20}


@dataclass
class Codebook:
    """One weight-shared layer in COO form (Alg 6's ``(C, Quantized_W)``).

    Attributes:
        centroids: (k,) float32, sorted ascending, ``k <= 2^bits`` (fewer only when the layer has
            fewer distinct non-zero weights than ``2^bits``).
        indices: (nnz,) codes into ``centroids`` of the non-zero weights, in row-major order
            (uint8 when k <= 256, else uint16).
        positions: (nnz,) int64 flat row-major indices of the non-zero weights.
        shape: the weight tensor's shape.
        bits: the index width n of the layer.
    """

    centroids: np.ndarray
    indices: np.ndarray
    positions: np.ndarray
    shape: tuple[int, ...]
    bits: int

    def dense(self) -> np.ndarray:
        """The quantised weight tensor (float32, zeros where pruned)."""
        w = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        w[self.positions] = self.centroids[self.indices]
        return w.reshape(self.shape)


def _code_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8) if k <= 2**8 else np.dtype(np.uint16) if k <= 2**16 else np.dtype(np.int64)


def kmeans_1d(values: np.ndarray, k: int, iters: int = 300, init: np.ndarray | None = None,
              refine: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Exact Lloyd k-means on scalars, initialised with linearly spaced centroids (Alg 6).

    The values are sorted once and prefix sums are taken, so an iteration is: midpoints between
    neighbouring centroids -> ``np.searchsorted`` -> contiguous clusters -> means from the prefix
    sums; it costs O(k log N), not O(N k). Each cluster left empty is re-seeded by splitting, at
    its mean, the cluster with the largest sum of squared errors (the two halves' means can only
    lower the error); Lloyd then continues. A run stops when the clusters no longer change (a
    fixed point of Lloyd) or after ``iters`` iterations.

    Lloyd's fixed points are only local optima (scikit-learn's too: on gap-shaped data either can
    win by a few percent). So after convergence, up to ``refine`` split-merge moves follow: merge
    the two neighbouring clusters whose union costs least, split at its mean the cluster whose
    split gains most, keep the move only if it lowers the error, and re-run Lloyd. Each move
    strictly lowers the error; ``refine=0`` gives plain Lloyd with empty-cluster handling.

    Args:
        values: (N,) array of any real dtype (flattened if not 1-D), N >= 1.
        k: number of clusters, >= 1.
        iters: maximum Lloyd iterations per run, default 300 (scikit-learn's ``max_iter``).
        init: (k,) initial centroids; default ``linspace(min, max, k)``, the paper's
            linearly spaced bins.
        refine: maximum number of split-merge moves after Lloyd converged, default 1000.

    Returns:
        ``(centroids, labels)``: centroids (k',) float32 sorted ascending with ``k' = k``, or
        ``k' = #distinct values`` when there are fewer distinct values than ``k`` (then the
        quantisation is lossless); labels (N,) codes of the nearest centroid (uint8 if k' <= 256,
        uint16 if k' <= 65536, else int64).

    Example:
        >>> c, lab = kmeans_1d(np.array([-1.0, -0.9, 0.8, 1.0]), 2)
        >>> c[lab]
        array([-0.95, -0.95,  0.9 ,  0.9 ], dtype=float32)

    Used by chapter 02 (weight sharing) and 04.
    """
    x = np.asarray(values).reshape(-1)
    if x.size == 0:
        raise ValueError("values is empty: k-means needs at least one value")
    for arg, v, low in (("k", k, 1), ("iters", iters, 1), ("refine", refine, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{arg}={v!r} is not allowed: an integer >= {low}")
    k = int(k)
    if not np.isfinite(x).all():
        raise ValueError("values contain NaN or infinity: k-means needs finite values")
    xs = np.sort(x if x.dtype == np.float64 else x.astype(np.float32))
    distinct = 1 + int(np.count_nonzero(xs[1:] != xs[:-1]))
    if distinct <= k:
        # fewer distinct values than clusters: the distinct values themselves are optimal (error 0)
        uniq = np.unique(xs).astype(np.float32)
        return uniq, np.searchsorted(uniq, x.astype(np.float32)).astype(_code_dtype(uniq.size))

    if init is None:
        c = np.linspace(float(xs[0]), float(xs[-1]), k)
    else:
        c = np.sort(np.asarray(init, dtype=np.float64).reshape(-1))
        if c.size != k:
            raise ValueError(f"init has {c.size} centroids, k={k}")
    km = _Sorted1D(xs)
    c, b = km.lloyd(c, iters)
    err = km.total_sse(b)
    for _ in range(int(refine)):
        for cand in km.moves(b, tries=4):
            c2, b2 = km.lloyd(cand, iters)
            err2 = km.total_sse(b2)
            # the prefix sums carry rounding: demand a gain clearly above it
            if err2 < err * (1 - 1e-8):
                c, b, err = c2, b2, err2
                break
        else:
            break  # no candidate move lowers the error: a local optimum of Lloyd + moves

    c32 = c.astype(np.float32)
    # nearest float32 centroid: the codebook the weights will actually take
    mids = (c32[:-1].astype(np.float64) + c32[1:]) / 2
    labels = np.searchsorted(mids, x, side="right").astype(_code_dtype(k))
    return c32, labels


class _Sorted1D:
    """Sorted values with prefix sums: cluster sums and squared errors of any run in O(1)."""

    def __init__(self, xs: np.ndarray):
        self.xs, self.n = xs, xs.size
        # shift by the mean so the float64 prefix sums of squares keep their precision
        shift = float(np.mean(xs, dtype=np.float64))
        self.shift = shift
        self.s1 = np.zeros(self.n + 1)
        np.cumsum(xs - np.float64(shift) if xs.dtype == np.float64 else xs.astype(np.float64) - shift,
                  out=self.s1[1:])
        self.s2 = np.zeros(self.n + 1)
        np.cumsum(np.square(self.s1[1:] - self.s1[:-1]), out=self.s2[1:])

    def mean(self, a, z):
        return (self.s1[z] - self.s1[a]) / np.maximum(z - a, 1) + self.shift

    def sse(self, a, z):
        cnt = np.maximum(z - a, 1)
        d1 = self.s1[z] - self.s1[a]
        return np.maximum((self.s2[z] - self.s2[a]) - d1 * d1 / cnt, 0.0)

    def bounds(self, c: np.ndarray) -> np.ndarray:
        b = np.empty(c.size + 1, dtype=np.int64)
        b[0], b[-1] = 0, self.n
        b[1:-1] = self.count_below((c[:-1] + c[1:]) / 2)
        return b

    def count_below(self, t: np.ndarray) -> np.ndarray:
        """``#{x < t}`` for float64 thresholds, searching in the values' own dtype: a float64
        search in float32 data would convert (copy) all N values on every call."""
        if self.xs.dtype == np.float64:
            return np.searchsorted(self.xs, t, side="left")
        t32 = t.astype(self.xs.dtype)
        # for float32 x:  x < t  <=>  x < (smallest float32 >= t)
        up = np.where(t32.astype(np.float64) < t, np.nextafter(t32, self.xs.dtype.type(np.inf)), t32)
        return np.searchsorted(self.xs, up, side="left")

    def lloyd(self, c: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
        prev = None
        for _ in range(iters):
            b = self.bounds(c)  # cluster j = xs[b[j]:b[j+1]]
            if prev is not None and np.array_equal(b, prev):
                break  # stable assignment and c holds its means: Lloyd's fixed point
            prev = b
            cnt = np.diff(b)
            c = np.where(cnt > 0, self.mean(b[:-1], b[1:]), c)
            empty = np.flatnonzero(cnt == 0)
            if empty.size:
                c = self._reseed(b, c, empty)
                prev = None  # clusters changed outside Lloyd's step: iterate again
            c = np.sort(c)
        return c, self.bounds(c)

    def _split_point(self, a, z):
        """Index splitting run [a, z) at its mean, both parts non-empty (needs z - a >= 2)."""
        scalar = np.ndim(a) == 0
        a, z = np.atleast_1d(a), np.atleast_1d(z)
        m = np.clip(self.count_below(self.mean(a, z).astype(np.float64)), a + 1, z - 1)
        return int(m[0]) if scalar else m

    def _splittable(self, a, z):
        return (z - a >= 2) & (self.xs[np.minimum(np.maximum(z - 1, 0), self.n - 1)]
                               != self.xs[np.minimum(a, self.n - 1)])

    def _reseed(self, b, c, empty):
        """Give each empty cluster half of the cluster with the largest squared error."""
        c = c.copy()
        lo, hi = b[:-1].copy(), b[1:].copy()
        sse = np.where(self._splittable(lo, hi), self.sse(lo, hi), -1.0)
        for e in empty:
            j = int(np.argmax(sse))
            if sse[j] < 0:
                break  # nothing splittable left (cannot happen while #distinct > k)
            a, z = int(lo[j]), int(hi[j])
            m = int(self._split_point(a, z))
            for idx, (p, q) in ((j, (a, m)), (e, (m, z))):
                c[idx] = self.mean(p, q)
                lo[idx], hi[idx] = p, q
                sse[idx] = self.sse(p, q) if self._splittable(p, q) else -1.0
        return c

    def total_sse(self, b: np.ndarray) -> float:
        return float(self.sse(b[:-1], b[1:]).sum())

    def moves(self, b: np.ndarray, tries: int) -> list[np.ndarray]:
        """Candidate centroid sets, best first: merge two neighbours and split one cluster."""
        lo, hi = b[:-1], b[1:]
        k = lo.size
        if k < 3:
            return []
        sse = self.sse(lo, hi)
        merge_cost = self.sse(lo[:-1], hi[1:]) - sse[:-1] - sse[1:]  # pair (i, i+1)
        cand = np.flatnonzero(self._splittable(lo, hi))
        if cand.size == 0:
            return []
        m = self._split_point(lo[cand], hi[cand])
        gain = sse[cand] - self.sse(lo[cand], m) - self.sse(m, hi[cand])
        top_split = np.argsort(-gain)[:tries]
        top_merge = np.argsort(merge_cost)[: tries + 2]
        scored = []
        for si in top_split:
            j = int(cand[si])
            for p in top_merge:
                p = int(p)
                if p in (j - 1, j):
                    continue  # a merge must not involve the split cluster
                scored.append((merge_cost[p] - gain[si], j, int(m[si]), p))
        scored.sort()
        means = self.mean(lo, hi)
        out = []
        for _, j, mj, p in scored[:tries]:
            keep = np.delete(means, [j, p, p + 1])
            new = self.mean(np.array([lo[j], mj, lo[p]]), np.array([mj, hi[j], hi[p + 1]]))
            out.append(np.sort(np.concatenate([keep, new])))
        return out


def _validate_bits(bits: Bits, names: list[str] | None = None) -> None:
    def one(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 16:
            raise ValueError(f"bits{where}={v!r} is not allowed: an index width from 1 to 16 "
                             "(2 to 65536 shared values per layer)")

    if isinstance(bits, Mapping):
        allowed = {"conv", "linear"} | set(names or [])
        for key, v in bits.items():
            if key not in allowed:
                raise ValueError(f"bits has key {key!r}: allowed keys are 'conv', 'linear' or a "
                                 "prunable layer name")
            one(v, f"[{key!r}]")
    else:
        one(bits, "")


def _layer_bits(bits: Bits, name: str, module: nn.Module) -> int:
    if not isinstance(bits, Mapping):
        return int(bits)
    if name in bits:
        return int(bits[name])
    kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
    if kind not in bits:
        raise ValueError(f"bits={dict(bits)!r} gives no width for {kind} layer {name!r}")
    return int(bits[kind])


def set_weight_values(module: nn.Module, positions: np.ndarray, values: np.ndarray,
                      name: str = "weight") -> None:
    """Write ``values`` at flat ``positions`` of the layer's weight, keeping any pruning mask.

    With torch pruning the values go into ``weight_orig`` (so ``weight = orig * mask`` keeps the
    pruned zeros) and the cached ``weight`` attribute is recomputed, without autograd history (a
    tensor with history cannot be deep-copied, see DESIGN.md).
    Used by chapter 02 (weight sharing) and 04.
    """
    masked = hasattr(module, f"{name}_orig")
    target = getattr(module, f"{name}_orig" if masked else name)
    with torch.no_grad():
        idx = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(target.device)
        val = torch.from_numpy(np.ascontiguousarray(values)).to(target.device, target.dtype)
        target.view(-1)[idx] = val
        if masked:
            setattr(module, name, target * getattr(module, f"{name}_mask"))


def share_tensor(weight: np.ndarray, bits: int, iters: int = 300, refine: int = 1000) -> Codebook:
    """Alg 6 on one weight array, without touching any model.

    Args:
        weight: the layer's (effective) weight, any shape, float32; zeros are pruned weights.
        bits: index width n (1..16): k-means of the non-zeros into ``2^n`` centroids initialised
            linearly between their min and max.
        iters, refine: as in :func:`kmeans_1d`.

    Returns:
        The :class:`Codebook` (COO); ``Codebook.dense()`` is the weight-shared tensor.

    Example:
        >>> book = share_tensor(layer.weight.detach().numpy(), 5)
        >>> np.unique(book.dense()).size <= 2**5 + 1  # the centroids and 0
        True

    Used by chapter 02 (weight sharing) and 04, and by ``storage.save_compressed(bits=...)``.
    """
    _validate_bits(bits)
    w = np.asarray(weight, dtype=np.float32)
    flat = w.reshape(-1)
    pos = np.flatnonzero(flat)
    if pos.size == 0:
        return Codebook(np.zeros(0, np.float32), np.zeros(0, np.uint8), pos, tuple(w.shape), bits)
    cent, lab = kmeans_1d(flat[pos], 2**bits, iters=iters, refine=refine)
    return Codebook(cent, lab, pos, tuple(w.shape), bits)


def weight_share(model: nn.Module, bits: Bits = DEFAULT_BITS, layers: list[str] | None = None,
                 iters: int = 300, refine: int = 1000) -> dict[str, Codebook]:
    """Alg 6 (weight sharing Q), in place on every prunable layer of ``model``.

    Per layer: take the non-zero weights (COO), run k-means with ``2^n`` centroids initialised
    linearly between the layer's smallest and largest non-zero weight, and replace each non-zero
    weight by its centroid. Pruned zeros stay exactly zero (with torch pruning masks the shared
    values go into ``weight_orig``; the mask is kept). Biases are not shared (the paper shares
    weights only).

    Args:
        model: any module; its layers are ``models.prunable_layers(model)`` (L_prune(h)).
        bits: index width n per layer: an int for all layers, or a dict with keys ``"conv"``,
            ``"linear"`` and/or layer names (a name wins over its kind). Default
            ``{"conv": 8, "linear": 5}`` (Sec. 3.2). Each width must be 1..16 (``ValueError``
            naming ``bits`` otherwise); the paper requires n < weight_data_size (32).
        layers: names of the prunable layers to share; default all.
        iters, refine: maximum Lloyd iterations per run and split-merge moves per layer
            (see :func:`kmeans_1d`); ``refine=0`` is plain Lloyd with empty clusters re-seeded.

    Returns:
        ``{layer_name: Codebook}`` with centroids (k,) float32 and codes/positions (nnz,).

    Example:
        >>> books = weight_share(model, bits={"conv": 8, "linear": 5})
        >>> len(np.unique(books["classifier.0"].centroids)) <= 2**5
        True

    Used by chapter 02 (weight sharing) and 04.
    """
    named = prunable_layers(model)
    names = [n for n, _ in named]
    _validate_bits(bits, names)
    if layers is not None:
        unknown = sorted(set(layers) - set(names))
        if unknown:
            raise ValueError(f"layers={unknown!r} are not prunable layers; known: {names}")
    books: dict[str, Codebook] = {}
    for name, module in named:
        if layers is not None and name not in layers:
            continue
        b = _layer_bits(bits, name, module)
        w = effective_weight(module).cpu().numpy()
        book = share_tensor(w, b, iters=iters, refine=refine)
        if book.positions.size:
            set_weight_values(module, book.positions, book.centroids[book.indices])
        books[name] = book
    return books


def codebooks(model: nn.Module) -> dict[str, np.ndarray]:
    """The distinct non-zero weight values of each prunable layer (sorted float32).

    After :func:`weight_share` these are the layer's used centroids, so ``len`` is at most
    ``2^n`` (the guarantee of Eq 7 checked in the paper's Fig. 6).
    Used by chapter 02 (weight sharing) and 04.
    """
    out = {}
    for name, module in prunable_layers(model):
        w = effective_weight(module).cpu().numpy().reshape(-1)
        out[name] = np.unique(w[w != 0]).astype(np.float32)
    return out


def compression_rate(bits: int, n_weights: int, weight_bits: int = 32) -> float:
    """Eq 6-7: size of a weight-shared layer relative to its dense float storage.

    ``(2^n * weight_data_size + n * number_of_weights) / (number_of_weights * weight_data_size)
    = 2^n / number_of_weights + n / weight_data_size``: a ``2^n``-entry float lookup table plus
    an ``n``-bit index per weight, over ``number_of_weights`` floats. Like the paper, this counts
    neither the positions of the non-zeros (COO) nor any entropy coding; ``storage`` measures a
    real file.

    Args:
        bits: n, the index width (1..16, and n < weight_bits as Alg 6 requires).
        n_weights: number_of_weights, >= 1 (the weights that get indices).
        weight_bits: weight_data_size, the precision of a dense weight and of a table entry;
            default 32.

    Returns:
        The ratio (smaller is better; 1.0 means no saving), e.g. 5 bits over 1M weights:
        ``32/1e6 + 5/32 = 0.156282``.

    Example:
        >>> compression_rate(8, 1_000_000)
        0.250256

    Used by chapter 02 (weight sharing) and 04.
    """
    _validate_bits(bits)
    if isinstance(n_weights, bool) or not isinstance(n_weights, (int, np.integer)) or n_weights < 1:
        raise ValueError(f"n_weights={n_weights!r} is not allowed: a count >= 1")
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, np.integer)) or weight_bits <= bits:
        raise ValueError(f"weight_bits={weight_bits!r} is not allowed: Alg 6 requires bits < weight_bits")
    return (2**bits * weight_bits + bits * n_weights) / (n_weights * weight_bits)


def shared_size_mb(model: nn.Module, bits: Bits = DEFAULT_BITS, unit: str = "MB") -> float:
    """Approximate size of the weight-shared model, the Table 1 "Approx Size" of the "+ WS" row.

    Sum over prunable layers of ``nnz * n`` (an n-bit index per non-zero weight, Eq 6) plus
    ``2^n * 32`` (the layer's float32 lookup table), plus every other parameter (biases,
    BatchNorm, layers that are not prunable) at 32 bits per non-zero value, as
    ``storage.approx_size_mb`` counts them. Positions of the non-zeros are not counted (the
    paper's formula does not); ``storage.save_compressed`` writes a real file that pays for them.

    Args:
        model: the pruned model (weight-shared or not: only its non-zero counts matter).
        bits: as in :func:`weight_share`; default ``{"conv": 8, "linear": 5}``.
        unit: ``"MB"`` (10^6 bytes, default) or ``"MiB"`` (2^20 bytes).

    Example:
        >>> shared_size_mb(model, {"conv": 8, "linear": 5})  # VGG16, random init, 50% global pruning
        47.3...

    Used by chapter 02 (weight sharing) and 04.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not allowed: one of {', '.join(UNITS)}")
    named = prunable_layers(model)
    _validate_bits(bits, [n for n, _ in named])
    shared_ids = set()
    total_bits = 0
    for name, module in named:
        b = _layer_bits(bits, name, module)
        nnz = int(torch.count_nonzero(effective_weight(module)))
        total_bits += nnz * b + 2**b * 32
        shared_ids.add(id(module))
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            base = pname[: -len("_orig")] if pname.endswith("_orig") else pname
            if id(m) in shared_ids and base == "weight":
                continue
            value = effective_weight(m, base) if pname.endswith("_orig") else p.detach()
            total_bits += int(torch.count_nonzero(value)) * 32
    return total_bits / 8 / UNITS[unit]
