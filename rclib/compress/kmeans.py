"""One-dimensional k-means for weight sharing (Alg 6): exact Lloyd on a fine histogram, with
empty clusters re-seeded and split-merge refinement.

Why our own 1-D k-means (:func:`kmeans_1d`) instead of scikit-learn: VGG16 has 138M weights and
its first linear layer alone 103M. In one dimension the clusters of Lloyd's algorithm are
contiguous runs of the sorted values, the boundaries are the midpoints between neighbouring
centroids, and cluster means come from prefix sums, so an iteration costs O(k log M) instead of
O(N k). Sorting is not even needed: the values go into a fine histogram (bins 2^-11 of a
value's magnitude wide, two ``np.bincount`` passes with exact per-bin counts and sums), and
k-means moves whole bins, which changes every clustering's error by the same constant (the
bins' own spread). scikit-learn's ``KMeans`` needs minutes per full VGG16 pass
(``bench/bench_share.py`` measures both).

The pitfall this module guards against: linearly spaced initial centroids land in the pruning
gap (after magnitude pruning no weight is near zero), so plain Lloyd leaves those clusters empty
for ever (about 20% of 256 on VGG16) and quantises worse than scikit-learn, which relocates
empty clusters. :func:`kmeans_1d` re-seeds every empty cluster by splitting the cluster with the
largest squared error, which never increases the error, so all ``2^n`` values get used. Lloyd's
fixed points are still only local optima (scikit-learn's too), so split-merge moves that strictly
lower the error follow. Measured on VGG16 (random init, 50% pruned, ``bench/bench_share.py``):
all 16 layers in under 5 s on one core, against minutes extrapolated for scikit-learn, with
about half scikit-learn's quantisation error on the 256-cluster convolutions and 0.88x on the
linears.

Used by ``compress.share`` (chapters 02 and 04).
"""

from __future__ import annotations

import numpy as np


def _code_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8) if k <= 2**8 else np.dtype(np.uint16) if k <= 2**16 else np.dtype(np.int64)


def kmeans_1d(values: np.ndarray, k: int, iters: int = 300, init: np.ndarray | None = None,
              refine: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means on scalars, initialised with linearly spaced centroids (Alg 6).

    The values (as float32) go into a fine histogram: bins of 2^12 consecutive float32 values
    (2^-11 of the magnitude) with exact counts and sums. Lloyd then works on the bins: an
    iteration is midpoints between neighbouring centroids -> ``np.searchsorted`` over the bin
    means -> contiguous runs of bins -> cluster means from prefix sums, O(k log M) for M
    non-empty bins. Keeping a bin together changes every clustering's squared error by the same
    constant, so runs compare exactly; a bin is far narrower than any gap between centroids.
    Each cluster left empty is re-seeded by splitting, at its mean, the cluster with the
    largest squared error (the two halves' means can only lower the error); Lloyd then
    continues. A run stops when the clusters no longer change (a fixed point of Lloyd) or after
    ``iters`` iterations. The labels are the nearest float32 centroid of each value, exactly.

    Lloyd's fixed points are only local optima (scikit-learn's too: on gap-shaped data either can
    win by a few percent). So after convergence, up to ``refine`` split-merge moves follow: merge
    the two neighbouring clusters whose union costs least, split at its mean the cluster whose
    split gains most, and keep the move if a few Lloyd steps from it lower the error; Lloyd
    converges again at the end. Each kept move strictly lowers the error; ``refine=0`` gives
    plain Lloyd with empty-cluster handling.

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

    The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

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
    x32 = x.astype(np.float32, copy=False)
    hist = _histogram(x32)
    if hist[0].size <= k:  # few bins: maybe fewer distinct values than clusters
        uniq = np.unique(x32)
        if uniq.size <= k:  # the distinct values themselves are optimal (error 0)
            return uniq, np.searchsorted(uniq, x32).astype(_code_dtype(uniq.size))

    if init is None:
        c = np.linspace(float(x32.min()), float(x32.max()), k)
    else:
        c = np.sort(np.asarray(init, dtype=np.float64).reshape(-1))
        if c.size != k:
            raise ValueError(f"init has {c.size} centroids, k={k}")
    km = _Binned1D(*hist[1:])
    c, b = km.lloyd(c, iters)
    err = km.total_sse(b)
    for _ in range(int(refine)):
        for cand in km.moves(b, tries=4):
            # a few Lloyd steps (each lowers the error) tell a good move from a bad one
            c2, b2 = km.lloyd(cand, min(iters, _POLISH))
            err2 = km.total_sse(b2)
            # the prefix sums carry rounding: demand a gain clearly above it
            if err2 < err * (1 - 1e-8):
                c, b, err = c2, b2, err2
                break
        else:
            break  # no candidate move lowers the error: a local optimum of Lloyd + moves
    c, b = km.lloyd(c, iters)

    c32 = c.astype(np.float32)
    # nearest float32 centroid: the codebook the weights will actually take
    return c32, _nearest(x32, c32, hist[0], _code_dtype(k))


_BIN_SHIFT = 12  # a bin is 2^12 consecutive float32 values: 2^-11 of a value's magnitude wide


_POLISH = 10  # Lloyd steps that judge a split-merge move


_CHUNK = 1 << 22


_SMALL = 1 << 16  # fewer values than this: no 2^20-bin tables


def _ordered(x32: np.ndarray) -> np.ndarray:
    """uint32 keys in the order of the float32 values (flip the sign bit, or all bits if negative)."""
    k = x32.view(np.uint32)
    return k ^ ((k >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))


def _from_ordered(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    return np.where(keys >= np.uint32(0x80000000), keys ^ np.uint32(0x80000000), ~keys).view(np.float32)


def _histogram(x32: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty bins of the values: ``(bin ids, bin means, counts, sums)``, in value order.

    Why a histogram instead of sorting (``np.sort`` + prefix sums of 69M values took ~3 s on
    VGG16): two ``np.bincount`` passes over the values give each bin's count and exact sum,
    and k-means then moves whole bins. A cluster's squared error differs from the exact one
    by the bins' own spread only, the same for every clustering that keeps bins together, so
    Lloyd and the moves compare clusterings exactly; bins are far narrower (2^-11 of the
    value) than any gap between centroids.
    """
    if x32.size < _SMALL:  # a sort of the few bin ids beats 2^20-bin tables
        ids, inv = np.unique(_ordered(x32) >> np.uint32(_BIN_SHIFT), return_inverse=True)
        counts, sums = np.bincount(inv), np.bincount(inv, weights=x32)
        return ids, sums / counts, counts, sums
    nb = 1 << (32 - _BIN_SHIFT)
    counts = np.zeros(nb, dtype=np.int64)
    sums = np.zeros(nb, dtype=np.float64)
    for s in range(0, x32.size, _CHUNK):
        c = x32[s:s + _CHUNK]
        b = _ordered(c) >> np.uint32(_BIN_SHIFT)
        counts += np.bincount(b, minlength=nb)
        sums += np.bincount(b, weights=c, minlength=nb)
    ids = np.flatnonzero(counts)
    counts, sums = counts[ids], sums[ids]
    return ids, sums / counts, counts, sums


def _nearest(x32: np.ndarray, c32: np.ndarray, ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Index of the nearest of the sorted centroids for each value (ties to the upper one), as
    ``np.searchsorted(midpoints, x, side="right")``: looked up per bin, and searched per value
    only in the few bins a midpoint cuts."""
    mids = (c32[:-1].astype(np.float64) + c32[1:]) / 2
    if x32.size < _SMALL:
        return np.searchsorted(mids, x32, side="right").astype(dtype)
    first = _from_ordered(ids << _BIN_SHIFT).astype(np.float64)
    last = _from_ordered((ids << _BIN_SHIFT) | ((1 << _BIN_SHIFT) - 1)).astype(np.float64)
    nb = 1 << (32 - _BIN_SHIFT)
    label = np.zeros(nb, dtype=dtype)
    label[ids] = np.searchsorted(mids, first, side="right")
    cut = np.zeros(nb, dtype=bool)
    cut[ids] = label[ids] != np.searchsorted(mids, last, side="right")
    out = np.empty(x32.size, dtype=dtype)
    for s in range(0, x32.size, _CHUNK):
        c = x32[s:s + _CHUNK]
        b = _ordered(c) >> np.uint32(_BIN_SHIFT)
        lab = label[b]
        f = np.flatnonzero(cut[b])
        lab[f] = np.searchsorted(mids, c[f], side="right")
        out[s:s + c.size] = lab
    return out


class _Binned1D:
    """Bins (sorted means with counts and sums) and their prefix sums: the size, mean and squared
    error (up to the bins' own spread) of any run of bins in O(1)."""

    def __init__(self, means: np.ndarray, counts: np.ndarray, sums: np.ndarray):
        self.xs, self.n = means, means.size
        # shift by the mean so the float64 prefix sums of squares keep their precision
        self.shift = float(sums.sum() / counts.sum())
        d = sums - self.shift * counts
        self.s0 = np.concatenate([[0], np.cumsum(counts)])
        self.s1 = np.concatenate([[0.0], np.cumsum(d)])
        self.s2 = np.concatenate([[0.0], np.cumsum(d * d / counts)])

    def mean(self, a, z):
        return (self.s1[z] - self.s1[a]) / np.maximum(self.s0[z] - self.s0[a], 1) + self.shift

    def sse(self, a, z):
        cnt = np.maximum(self.s0[z] - self.s0[a], 1)
        d1 = self.s1[z] - self.s1[a]
        return np.maximum((self.s2[z] - self.s2[a]) - d1 * d1 / cnt, 0.0)

    def bounds(self, c: np.ndarray) -> np.ndarray:
        b = np.empty(c.size + 1, dtype=np.int64)
        b[0], b[-1] = 0, self.n
        b[1:-1] = self.count_below((c[:-1] + c[1:]) / 2)
        return b

    def count_below(self, t: np.ndarray) -> np.ndarray:
        """Bins whose mean is below ``t``."""
        return np.searchsorted(self.xs, t, side="left")

    def _splittable(self, a, z):
        return z - a >= 2  # bins have distinct means

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
