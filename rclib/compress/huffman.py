"""Entropy coding of symbol streams for the compressed file (``codec``): canonical Huffman.

A stream of symbols (codebook indices, or gaps between non-zero positions) becomes a canonical
Huffman code (codes at most 20 bits; the table is the code length of every symbol, one byte
each) packed MSB-first into bytes. The stream is cut into blocks of B symbols whose starting bit
offsets are stored (fixed-width residuals, well under 0.1 bit per symbol), so all blocks are
decoded at once (``huffdecode``). A stream of a single distinct symbol costs no bits. Deep
Compression (Han et al. 2016) Huffman-codes the same two streams; the paper leaves it as future
work (Sec. 4.1).

Why our own coder: a pure-Python bit loop (e.g. dahuffman) would need about two minutes for
VGG16's 138M symbols; these vectorised passes take a fraction of a second, and the tests check
the bytes against the first version of the format.

Used by chapter 02 (weight sharing) and 04, through ``codec``.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Mapping

import numpy as np
import torch

HUFFMAN_LIMIT = 20  # longest Huffman code, so a decoding table has at most 2^20 entries
_STEP = 1 << 18  # symbols per step of the chunked passes: temporaries stay in cache
_W, _SIX, _LOW6 = np.uint64(64), np.uint64(6), np.uint64(63)


class Corrupt(ValueError):
    """A stream or segment that contradicts its header; ``codec`` reports it as a corrupt file.
    Used by chapter 02 and 04, through ``codec``."""


def field_int(d: Mapping[str, Any], key: str) -> int:
    """Header field ``key`` of ``d``, which must be a non-negative int (not a bool)."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise Corrupt(f"header field {key!r} is not a non-negative integer")
    return v


def segment(payload: memoryview, ref: Any) -> memoryview:
    """The bytes ``[offset, length]`` of the payload that ``ref`` points at, checked."""
    if (not isinstance(ref, list) or len(ref) != 2 or
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ref) or
            ref[0] + ref[1] > len(payload)):
        raise Corrupt(f"segment {ref!r} lies outside the payload")
    return payload[ref[0]: ref[0] + ref[1]]


class Payload:
    """Collects binary segments (any contiguous buffers: numpy arrays are kept, not copied); the
    header refers to them as [offset, length]. Used by chapter 02 and 04, through ``codec``."""

    def __init__(self):
        self.parts: list[memoryview] = []
        self.size = 0

    def add(self, data: bytes | memoryview | np.ndarray) -> list[int]:
        view = memoryview(data).cast("B")
        ref = [self.size, view.nbytes]
        self.parts.append(view)
        self.size += view.nbytes
        return ref


# ---- bit packing ---------------------------------------------------------------------------
# An *item* is one or more codewords concatenated: its bits left-aligned in a uint64 ``v`` and
# its length ``l`` <= 64. Items are written at running bit offsets into 64-bit big-endian words.

def _pack_items(v: np.ndarray, l: np.ndarray, offset: np.uint64, words: np.ndarray) -> np.ndarray:
    """OR the items into ``words`` from bit ``offset`` on; returns each item's end bit.

    An item of at most 64 bits starting at bit s lies in words s // 64 and s // 64 + 1, and every
    word from the first to the last holds the start of some item; so each word is the sum (=
    the OR: the fields are disjoint) of one run of consecutive items' parts, read off a running
    sum (uint64, wrapping: a run's sum never wraps, so differences are exact).
    """
    ends = np.cumsum(l)
    ends += offset
    start = ends - l
    w = start >> _SIX
    sh = start & _LOW6
    hi = v >> sh
    np.subtract(_W, sh, out=sh)
    lo = v << sh  # numpy shifts by 64 give 0: an item starting on a word boundary has no lo part
    last = np.flatnonzero(w[1:] != w[:-1])
    last = np.append(last, w.size - 1)
    a, k = int(w[0]), last.size
    np.cumsum(hi, out=hi)
    np.cumsum(lo, out=lo)
    words[a:a + k] |= np.diff(hi[last], prepend=np.uint64(0))
    words[a + 1:a + 1 + k] |= np.diff(lo[last], prepend=np.uint64(0))
    return ends


def _big_endian(words: np.ndarray, nbits: int) -> np.ndarray:
    """The first ``nbits`` bits of 64-bit words as bytes (the last byte zero-padded), a view."""
    words.byteswap(inplace=True)
    return words.view(np.uint8)[: (nbits + 7) // 8]


def _pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """``values`` (each < 2^width, width <= 32) as fixed-width fields, MSB-first."""
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    v = values.astype(np.uint64) << np.uint64(64 - width)
    words = np.zeros(values.size * width // 64 + 2, np.uint64)
    _pack_items(v, np.full(values.size, width, np.uint64), np.uint64(0), words)
    return _big_endian(words, values.size * width)


def read_fixed(buf: memoryview | bytes, count: int, width: int) -> np.ndarray:
    """``count`` unsigned fields of ``width`` (<= 32) bits written by ``_pack_fixed``."""
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    if len(buf) * 8 < count * width:
        raise Corrupt("a fixed-width field array is shorter than its header says")
    w = np.zeros((len(buf) + 3) // 4 + 2, dtype=">u4")
    w.view(np.uint8)[: len(buf)] = np.frombuffer(buf, dtype=np.uint8)
    w = w.astype(np.uint64)
    win = (w[:-1] << np.uint64(32)) | w[1:]  # win[i]: 32-bit words i and i+1
    pos = np.arange(count, dtype=np.uint64) * np.uint64(width)
    val = win[pos >> np.uint64(5)] >> (np.uint64(64 - width) - (pos & np.uint64(31)))
    return (val & np.uint64((1 << width) - 1)).astype(np.int64)


def _item_tables(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per symbol its codeword as an item, the length in the low 6 bits (codes are at most 20
    bits: the fields never meet); for alphabets of at most 256 symbols also every pair of
    symbols, indexed by the two symbol bytes read as one little-endian uint16."""
    ln = lengths.astype(np.uint64)
    single = np.where(lengths > 0, codes << (_W - ln), np.uint64(0)).astype(np.uint64) | ln
    if lengths.size > 256:
        return single, None
    s = np.zeros(256, np.uint64)
    s[: single.size] = single
    length = s & _LOW6
    v = s ^ length
    first, second = np.tile(np.arange(256), 256), np.repeat(np.arange(256), 256)
    pair = v[first] | (v[second] >> length[first]) | (length[first] + length[second])
    return single, pair


def _pack_stream(sym: np.ndarray, counts: np.ndarray, codes: np.ndarray, lengths: np.ndarray,
                 block: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Huffman-code ``sym`` (whose symbol ``counts`` are given) MSB-first; also the bit offset
    where each block of ``block`` symbols after the first starts.

    A chunk's symbols become items by one table lookup per *pair* of byte symbols, then
    neighbouring items are merged (halving their number) while the longest stays within 64
    bits: the costly per-item passes of ``_pack_items`` then run on a few codewords at a time
    (gap streams of about 2 bits per symbol pack 32 codewords per item).
    """
    single, pair = _item_tables(codes, lengths)
    sym_len = lengths.astype(np.uint64)
    nbits = int((counts * lengths.astype(np.int64)).sum())
    words = np.zeros(nbits // 64 + 2, dtype=np.uint64)
    marks = np.arange(block - 1, (sym.size - 1) // block * block, block)  # last symbol of a block
    block_ends = np.empty(marks.size, dtype=np.uint64)
    offset = np.uint64(0)
    for s in range(0, sym.size, _STEP):
        c = sym[s:s + _STEP]
        if pair is not None and c.size > 1:
            even = c.size & ~1
            e = np.take(pair, c[:even].view(np.uint16))
            if even < c.size:
                e = np.append(e, single[c[-1]])
            g = 2  # symbols per item
        else:
            e, g = np.take(single, c), 1
        l = e & _LOW6
        v = e ^ l
        while v.size > 1:
            if v.size % 2:
                v, l = np.append(v, np.uint64(0)), np.append(l, np.uint64(0))
            l2 = l[0::2] + l[1::2]
            if int(l2.max()) > 64:
                break
            v = v[0::2] | (v[1::2] >> l[0::2])
            l, g = l2, 2 * g
        ends = _pack_items(v, l, offset, words)
        m0, m1 = np.searchsorted(marks, [s, s + c.size])
        if m1 > m0:  # a block ends inside an item: take off the lengths of the item's later symbols
            r = marks[m0:m1] - s
            item = r // g
            later = r[:, None] + np.arange(1, g)
            inside = later < np.minimum((item + 1) * g, c.size)[:, None]
            extra = (sym_len[c[np.where(inside, later, 0)]] * inside).sum(axis=1)
            block_ends[m0:m1] = ends[item] - extra.astype(np.uint64)
        offset = ends[-1]
    return _big_endian(words, nbits), nbits, block_ends


# ---- canonical Huffman ---------------------------------------------------------------------

def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Code lengths of a Huffman code for ``weights`` (>= 2 positive entries)."""
    n = weights.size
    heap = [(float(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    nxt = n
    while len(heap) > 1:
        wa, a = heapq.heappop(heap)
        wb, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (wa + wb, nxt))
        nxt += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents have larger ids than their children
        depth[node] = depth[parent[node]] + 1
    return depth[:n]


def _huffman_lengths(counts: np.ndarray, limit: int = HUFFMAN_LIMIT) -> np.ndarray:
    """Code length per symbol (0 for unused symbols), at most ``limit`` bits.

    Length limiting by flattening: rare symbols' counts are raised to a floor that doubles
    until the longest code fits (a Huffman code of the flattened counts is still complete,
    so the Kraft sum stays exactly 1 and the decoding table is full).
    """
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    c = counts[used].astype(np.float64)
    floor = c.sum() / 2.0**limit
    while True:
        depth = _huffman_depths(c)
        if depth.max() <= limit:
            break
        c = np.maximum(c, floor)
        floor *= 2
    lengths[used] = depth
    return lengths


def canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Canonical codes from code lengths, and the decoding table.

    Returns ``(codes, table, maxlen)``: ``codes[s]`` the codeword of symbol s; ``table[p]`` for
    every ``maxlen``-bit prefix p is ``symbol << 5 | length``. ``Corrupt`` if the lengths do not
    form a complete prefix code. Used by chapter 02 and 04, through ``codec``.
    """
    used = np.flatnonzero(lengths)
    ln = lengths[used].astype(np.int64)
    order = np.lexsort((used, ln))  # by length, then symbol
    sym, ln = used[order], ln[order]
    maxlen = int(ln[-1])
    span = np.int64(1) << (maxlen - ln)  # table entries (prefixes) each codeword owns
    start = np.cumsum(span) - span
    if int(start[-1] + span[-1]) != 1 << maxlen:
        raise Corrupt("Huffman code lengths do not form a complete prefix code")
    codes = np.zeros(lengths.size, dtype=np.uint64)
    codes[sym] = (start >> (maxlen - ln)).astype(np.uint64)
    table = np.repeat((sym.astype(np.uint32) << np.uint32(5)) | ln.astype(np.uint32), span)
    return codes, table, maxlen


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon bound in bits of a stream with these symbol counts (zeroth order).
    Used by chapter 02 and 04, through ``sizes.entropy_bound_bytes``."""
    c = counts[counts > 0].astype(np.float64)
    if c.size <= 1:
        return 0.0
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum())


def _block_len(n: int) -> int:
    # about 1000 blocks: the decoder advances all blocks together, one numpy step at a time
    return int(min(4096, max(32, math.ceil(n / 1024))))


def counts_of(sym: np.ndarray, alphabet: int) -> np.ndarray:
    """``np.bincount(sym, minlength=alphabet)`` (int64). Byte symbols are counted by torch, which
    reads them as they are (3x faster than numpy, which first casts them to int64); others a
    chunk at a time, so the int64 copy stays small. Used by chapter 02 and 04, through ``codec``."""
    if sym.dtype == np.uint8:
        return torch.bincount(torch.from_numpy(sym), minlength=alphabet).numpy()[:alphabet].astype(np.int64)
    counts = np.zeros(alphabet, dtype=np.int64)
    for s in range(0, sym.size, _STEP * 4):
        counts += np.bincount(sym[s:s + _STEP * 4], minlength=alphabet)[:alphabet]
    return counts


def encode_stream(sym: np.ndarray, alphabet: int, out: Payload,
                  counts: np.ndarray | None = None) -> dict[str, Any]:
    """Huffman-code the symbols ``sym`` (< ``alphabet``) into segments of ``out``; returns the
    stream's header record (see ``codec``'s format). ``counts``: ``counts_of(sym, alphabet)``
    if already known. Used by chapter 02 and 04, through ``codec``."""
    n = int(sym.size)
    meta: dict[str, Any] = {"n": n, "alphabet": alphabet}
    if n == 0:
        return meta
    if counts is None:
        counts = counts_of(sym, alphabet)
    used = np.flatnonzero(counts)
    if used.size == 1:  # e.g. an unpruned layer's gaps are all 1: nothing to store
        meta["single"] = int(used[0])
        return meta
    lengths = _huffman_lengths(counts)
    codes, _, maxlen = canonical(lengths)
    block = _block_len(n)
    bits, nbits, block_ends = _pack_stream(sym, counts, codes, lengths, block)
    # starting bit of each block after the first, stored as fixed-width residual lengths
    blen = np.diff(np.concatenate([[0], block_ends.astype(np.int64)]))
    lo = int(blen.min()) if blen.size else 0
    width = int(blen.max() - lo).bit_length() if blen.size else 0
    meta.update(maxlen=maxlen, nbits=nbits, block=block, lengths=out.add(lengths),
                bits=out.add(bits), blocks={"min": lo, "width": width,
                                            "data": out.add(_pack_fixed(blen - lo, width))})
    return meta


