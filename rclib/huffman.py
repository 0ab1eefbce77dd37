"""Entropy coding of symbol streams for the compressed file (``codec``): canonical Huffman.

A stream of symbols (codebook indices, or gaps between non-zero positions) becomes a canonical
Huffman code (codes at most 20 bits; the table is the code length of every symbol, one byte
each) packed MSB-first into bytes with numpy, and is decoded table-driven: the stream is cut
into blocks of B symbols whose starting bit offsets are stored (fixed-width residuals, well
under 0.1 bit per symbol), so all blocks are decoded at once, one numpy step per symbol of a
block. A stream of a single distinct symbol costs no bits. Deep Compression (Han et al. 2016)
Huffman-codes the same two streams; the paper leaves it as future work (Sec. 4.1).

Why our own coder: a pure-Python bit loop (e.g. dahuffman) would need about two minutes to
decode VGG16's 138M symbols; these vectorised passes take seconds, and the tests check the
bytes against the first version of the format.

Used by chapter 02 (weight sharing) and 04, through ``codec``.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Mapping

import numpy as np

HUFFMAN_LIMIT = 20  # longest Huffman code, so a decoding table has at most 2^20 entries


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


# ---- bit packing ---------------------------------------------------------------------------

def _pack_bits(codes: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Concatenate codewords MSB-first. ``codes[i] < 2^lengths[i]``, lengths 0..32.

    Vectorised: each codeword is placed in the 64-bit window of the two 32-bit words its first
    bit falls in; words are the sums (= bitwise ORs, the fields are disjoint) of their parts,
    accumulated with ``np.bincount`` (float64 sums of values < 2^32 are exact).
    """
    n = codes.size
    if n == 0:
        return b"", 0
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1])
    if total == 0:
        return b"", 0
    words = np.zeros(total // 32 + 2, dtype=np.uint64)
    step = 1 << 22  # chunks bound the temporary memory on 50M-symbol layers
    for s in range(0, n, step):
        ln = lengths[s:s + step].astype(np.int64)
        start = ends[s:s + step] - ln
        w = start >> 5
        shift = (64 - (start & 31) - ln).astype(np.uint64)
        v = codes[s:s + step].astype(np.uint64) << shift
        w0 = int(w[0])
        w -= w0
        span = int(w[-1]) + 2
        acc = np.bincount(w, weights=(v >> np.uint64(32)).astype(np.float64), minlength=span)
        acc[1:] += np.bincount(w, weights=(v & np.uint64(0xFFFFFFFF)).astype(np.float64),
                               minlength=span - 1)[: span - 1]
        words[w0:w0 + span] += acc.astype(np.uint64)
    return words.astype(">u4").tobytes()[: (total + 7) // 8], total


def _windows(buf: memoryview | bytes, extra_bits: int) -> np.ndarray:
    """uint64 windows: ``win[i]`` = 32-bit words i and i+1 of the big-endian bit string."""
    raw = bytes(buf)
    n_words = (len(raw) + 3) // 4 + (extra_bits + 31) // 32 + 2
    w = np.zeros(n_words, dtype=">u4")
    w.view(np.uint8)[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    w = w.astype(np.uint64)
    return (w[:-1] << np.uint64(32)) | w[1:]


def _read_fixed(buf: memoryview | bytes, count: int, width: int) -> np.ndarray:
    """``count`` unsigned fields of ``width`` (<= 32) bits written by ``_pack_bits``."""
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    if len(buf) * 8 < count * width:
        raise Corrupt("a fixed-width field array is shorter than its header says")
    win = _windows(buf, 0)
    pos = np.arange(count, dtype=np.uint64) * np.uint64(width)
    val = (win[pos >> np.uint64(5)] >> (np.uint64(64 - width) - (pos & np.uint64(31))))
    return (val & np.uint64((1 << width) - 1)).astype(np.int64)


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


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Canonical codes from code lengths, and the decoding table.

    Returns ``(codes, table, maxlen)``: ``codes[s]`` the codeword of symbol s; ``table[p]`` for
    every ``maxlen``-bit prefix p is ``symbol << 5 | length``.
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
    # about 1000 blocks: the decoder makes one numpy step per symbol of a block, over all blocks
    return int(min(4096, max(32, math.ceil(n / 1024))))


class Payload:
    """Collects binary segments; the header refers to them as [offset, length].
    Used by chapter 02 and 04, through ``codec``."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        ref = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return ref


_STEP = 1 << 18  # symbols per step of the chunked passes: temporaries stay in cache


def _pack_stream(sym: np.ndarray, counts: np.ndarray, codes: np.ndarray, lengths: np.ndarray,
                 block: int) -> tuple[bytes, int, np.ndarray]:
    """Huffman-code ``sym`` (whose symbol ``counts`` are given) MSB-first; also the bit offset
    where each block of ``block`` symbols after the first starts.

    Same bits as ``_pack_bits(codes[sym], lengths[sym])``, faster: the codeword table is
    left-aligned in 64 bits once, so a symbol's window is ``table[s] >> (start % 32)``; symbols
    starting in the same 32-bit word are contiguous, so the words are ``np.add.reduceat`` sums
    of their parts (= ORs: the fields are disjoint) in exact integers, a chunk at a time.
    """
    ln = lengths.astype(np.uint64)
    left = np.where(lengths > 0, codes << (np.uint64(64) - ln), np.uint64(0)).astype(np.uint64)
    nbits = int((counts * lengths.astype(np.int64)).sum())
    words = np.zeros(nbits // 32 + 2, dtype=np.uint64)
    marks = np.arange(block - 1, (sym.size - 1) // block * block, block)  # last symbol of a block
    block_ends = np.empty(marks.size, dtype=np.uint64)
    offset, low = np.uint64(0), np.uint64(0xFFFFFFFF)
    for s in range(0, sym.size, _STEP):
        c = sym[s:s + _STEP]
        width = ln[c]
        ends = np.cumsum(width, dtype=np.uint64)
        ends += offset
        start = ends - width
        v = left[c] >> (start & np.uint64(31))
        w = start >> np.uint64(5)
        first = np.flatnonzero(w[1:] != w[:-1]) + 1
        first = np.concatenate([[0], first])
        a, z = int(w[0]), int(w[-1]) + 1
        hi, lo = np.add.reduceat(v >> np.uint64(32), first), np.add.reduceat(v & low, first)
        if first.size == z - a:  # codes under 32 bits: every word holds a start, a plain slice
            words[a:z] |= hi
            words[a + 1:z + 1] |= lo
        else:
            at = w[first]
            words[at] |= hi
            words[at + np.uint64(1)] |= lo
        m0, m1 = np.searchsorted(marks, [s, s + c.size])
        block_ends[m0:m1] = ends[marks[m0:m1] - s]
        offset = ends[-1]
    return words.astype(">u4").tobytes()[: (nbits + 7) // 8], nbits, block_ends


def counts_of(sym: np.ndarray, alphabet: int) -> np.ndarray:
    """``np.bincount(sym, minlength=alphabet)`` a chunk at a time: bincount casts uint8/uint16
    symbols to int64, a 400 MB temporary for VGG16's biggest layer."""
    counts = np.zeros(alphabet, dtype=np.int64)
    for s in range(0, sym.size, _STEP * 4):
        counts += np.bincount(sym[s:s + _STEP * 4], minlength=alphabet)[:alphabet]
    return counts


def encode_stream(sym: np.ndarray, alphabet: int, out: Payload) -> dict[str, Any]:
    """Huffman-code the symbols ``sym`` (< ``alphabet``) into segments of ``out``; returns the
    stream's header record (see ``codec``'s format). Used by chapter 02 and 04, through ``codec``."""
    n = int(sym.size)
    meta: dict[str, Any] = {"n": n, "alphabet": alphabet}
    if n == 0:
        return meta
    counts = counts_of(sym, alphabet)
    used = np.flatnonzero(counts)
    if used.size == 1:  # e.g. an unpruned layer's gaps are all 1: nothing to store
        meta["single"] = int(used[0])
        return meta
    lengths = _huffman_lengths(counts)
    codes, _, maxlen = _canonical(lengths)
    block = _block_len(n)
    bits, nbits, block_ends = _pack_stream(sym, counts, codes, lengths, block)
    # starting bit of each block after the first, stored as fixed-width residual lengths
    blen = np.diff(np.concatenate([[0], block_ends.astype(np.int64)]))
    lo = int(blen.min()) if blen.size else 0
    width = int(blen.max() - lo).bit_length() if blen.size else 0
    res, _ = _pack_bits((blen - lo).astype(np.uint64), np.full(blen.size, width, np.int64))
    meta.update(maxlen=maxlen, nbits=nbits, block=block, lengths=out.add(lengths.tobytes()),
                bits=out.add(bits), blocks={"min": lo, "width": width, "data": out.add(res)})
    return meta


def decode_stream(meta: dict[str, Any], payload: memoryview) -> np.ndarray:
    """The symbols of the stream whose header record is ``meta`` (uint8, or uint16 for an
    alphabet over 256); ``Corrupt`` if the record and the bits disagree.
    Used by chapter 02 and 04, through ``codec``."""
    n, alphabet = field_int(meta, "n"), field_int(meta, "alphabet")
    if not 1 <= alphabet <= 2**16:
        raise Corrupt(f"stream alphabet {alphabet} out of range")
    dtype = np.uint8 if alphabet <= 256 else np.uint16
    if n == 0:
        return np.zeros(0, dtype)
    if "single" in meta:
        s = field_int(meta, "single")
        if not 0 <= s < alphabet:
            raise Corrupt("stream symbol out of range")
        return np.full(n, s, dtype)
    lengths = np.frombuffer(segment(payload, meta["lengths"]), dtype=np.uint8)
    if lengths.size != alphabet or lengths.max() > HUFFMAN_LIMIT or np.count_nonzero(lengths) < 2:
        raise Corrupt("bad Huffman table")
    _, table, maxlen = _canonical(lengths)
    symbol_of, length_of = (table >> 5).astype(dtype), (table & 31).astype(np.uint64)
    block, nbits = field_int(meta, "block"), field_int(meta, "nbits")
    bits = segment(payload, meta["bits"])
    if not 1 <= block <= 2**16 or nbits > 8 * len(bits):
        raise Corrupt("bad stream sizes")
    nb = -(-n // block)
    bm = meta["blocks"]
    if field_int(bm, "width") > 32:
        raise Corrupt("bad block offsets")
    blen = _read_fixed(segment(payload, bm["data"]), nb - 1, field_int(bm, "width")) + field_int(bm, "min")
    starts = np.concatenate([[0], np.cumsum(blen)]).astype(np.uint64)
    if int(starts[-1]) > nbits:
        raise Corrupt("block offsets beyond the stream")
    win = _windows(bits, block * maxlen)
    pos = starts.copy()
    out = np.empty((block, nb), dtype=dtype)
    idx = np.empty(nb, np.uint64)
    sh = np.empty(nb, np.uint64)
    peek = np.empty(nb, np.uint64)
    top, five, low5 = np.uint64(64 - maxlen), np.uint64(5), np.uint64(31)
    for t in range(block):  # all blocks advance together: one numpy step per symbol of a block
        np.right_shift(pos, five, out=idx)
        np.bitwise_and(pos, low5, out=sh)
        np.take(win, idx, out=peek)
        np.left_shift(peek, sh, out=peek)  # the next maxlen bits, left-aligned ...
        np.right_shift(peek, top, out=peek)  # ... then right-aligned: the table index
        np.take(symbol_of, peek, out=out[t])
        np.take(length_of, peek, out=idx)
        pos += idx
    if nb > 1 and not np.array_equal(pos[:-1], starts[1:]):
        raise Corrupt("a coded block does not end where the next begins")
    sym = np.empty((nb, block), dtype=dtype)
    for j in range(0, nb, 256):  # transposed in tiles that stay in cache
        sym[j:j + 256] = out[:, j:j + 256].T
    sym = sym.reshape(-1)[:n]
    if int(sym.max()) >= alphabet:
        raise Corrupt("decoded symbol out of range")
    return sym
