"""The codebook of a weight-shared layer, recovered from its weights: the sorted distinct
non-zero values and each weight's index among them (the *codes* of ``codec``'s ``shared``
encoding; Deep Compression, Han et al. 2016, stores a layer the same way).

``codec`` cannot ask ``share`` for the codebook: a model may come weight-shared from anywhere,
so the file is written from what the weights are. For VGG16's 69M non-zeros this has to be a
few cheap passes, not a sort: see :func:`_factorize_small`.

Used by chapter 02 (weight sharing) and 04, through ``codec``.
"""

from __future__ import annotations

import numpy as np

MAX_CODEBOOK = 2**16  # at most this many distinct non-zero values make a "shared" (coded) layer
_STEP = 1 << 18  # values per step of the chunked passes: temporaries stay in cache


def _perfect_hash(keys: np.ndarray, shift: int, rng: np.random.Generator) -> np.uint32 | None:
    """A multiplier m with ``(keys * m) >> shift`` (uint32, wrapping) all distinct, or None."""
    for _ in range(64):
        mult = np.uint32(rng.integers(1, 2**32) | 1)
        if np.unique((keys * mult) >> np.uint32(shift)).size == keys.size:
            return mult
    return None


def _factorize_small(values: np.ndarray, seed: np.ndarray, limit: int = 512) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sorted distinct values, code of each)`` for float32 values with at most ``limit``
    distinct ones (a weight-shared layer), else None. ``seed``: the sorted distinct values of a
    sample of them.

    Why not ``pd.factorize``: a perfect hash of the float bits (multiply-shift into a table of
    about (number of values)^2 slots, 64 kB for 256 values, so it stays in cache; multiplier
    drawn until the keys do not collide) codes a chunk in a few cheap passes, checked by
    looking the values up again. Codes are ranks while every value is one of the seed's; a
    chunk with unseen values adds them (as ids after the seed's) and is coded again, and one
    small lookup turns ids into ranks at the end.
    """
    keys = values.view(np.uint32)
    found = seed.astype(np.float32).view(np.uint32)  # sorted by value: ids are ranks
    ids = np.empty(values.size, dtype=np.uint8 if found.size <= 256 else np.uint16)
    rng = np.random.default_rng(0)
    table, extended, s = None, False, 0
    while s < values.size:
        if table is None:
            if found.size > limit:
                return None
            shift = 32 - max(10, 2 * (found.size - 1).bit_length())
            mult = _perfect_hash(found, shift, rng)
            if mult is None:
                return None
            table = np.zeros(1 << (32 - shift), dtype=ids.dtype)
            table[(found * mult) >> np.uint32(shift)] = np.arange(found.size)
        k = keys[s:s + _STEP]
        h = k * mult
        h >>= np.uint32(shift)
        c = ids[s:s + k.size]
        table.take(h, out=c, mode="clip")
        back = found.take(c)
        if not np.array_equal(back, k):
            found = np.concatenate([found, np.unique(k[back != k])])
            if found.size > 256 and ids.dtype == np.uint8:
                ids = ids.astype(np.uint16)
            table, extended = None, True
            continue
        s += k.size
    uniq = found.view(np.float32)
    if not extended:
        return uniq, ids
    order = np.argsort(uniq)
    rank = np.empty(found.size, dtype=ids.dtype)
    rank[order] = np.arange(found.size)
    return uniq[order], rank[ids].astype(np.uint8 if found.size <= 256 else np.uint16)


def distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sorted distinct values, code of each value)`` (codes uint8 for up to 256 values, else
    uint16) if there are at most ``MAX_CODEBOOK`` distinct values and all are finite; else None.

    Args:
        values: (N,) the non-zero weights of a layer, in order.

    Used by chapter 02 (weight sharing) and 04, through ``codec.save_compressed``.
    """
    seed = np.unique(values[:200_000])
    if seed.size > MAX_CODEBOOK:
        return None  # early out: a sample already has too many distinct values
    if values.size > 200_000 and values.dtype == np.float32:
        found = _factorize_small(values, seed)
        if found is not None:  # every value is one of found[0]: checking those checks all
            return found if np.isfinite(found[0]).all() else None
    if not np.isfinite(values).all():
        return None
    if values.size > 200_000:
        import pandas as pd  # hash-based: one O(N) pass, no sort of 50M values

        codes, uniq = pd.factorize(values, sort=True)
        uniq = np.asarray(uniq, dtype=values.dtype)
    else:
        uniq, codes = np.unique(values, return_inverse=True)
    if uniq.size > MAX_CODEBOOK:
        return None
    return uniq, codes.astype(np.uint8 if uniq.size <= 256 else np.uint16)
