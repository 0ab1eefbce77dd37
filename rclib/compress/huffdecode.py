"""Decoding the Huffman-coded streams of the compressed file (``huffman``), all blocks at once.

A stream is cut into blocks whose starting bits are stored, so the decoder advances every block
together, one numpy step at a time. Two decoders, chosen per stream:

- ``by_byte``, a finite-state machine over bytes (the table-driven decoder that reads k bits at
  a time from a node of the code tree, Choueka, Klein & Perl 1985, "Efficient variants of
  Huffman codes in high level languages", here with k = 8 and vectorised over blocks): one
  table lookup by ``state * 256 + byte`` gives every symbol that byte completes and the next
  state. One step per byte instead of per symbol: 4-7x fewer steps on VGG16's gap streams
  (1.1-2.1 bits per symbol). The symbols of a step are packed in a record of 1-8 bytes; the
  records are then compacted (a mask of each record's used bytes, ``np.flatnonzero``, a gather).
- ``by_symbol``: one step per symbol, through a table indexed by the next ``maxlen`` bits; for
  alphabets over 256 symbols (the machine's states times 256 would no longer fit a 16-bit key)
  and for streams of many bits per symbol, where a byte holds about one symbol anyway and the
  compaction would cost more than it saves.

Both check that each block decodes to exactly its number of symbols and ends exactly where the
next begins; a stream that does not raises ``huffman.Corrupt``.

Used by chapter 02 (weight sharing) and 04, through ``codec``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from rclib.compress.huffman import HUFFMAN_LIMIT, Corrupt, canonical, field_int, read_fixed, segment

_CACHE = 1 << 18  # bytes per step of the chunked passes: temporaries stay in cache
# ``by_byte`` when a stream averages fewer bits per symbol (measured on VGG16's streams: gaps at
# 1.1-2.1 bits 1.9-2.5x faster than by symbol, 5-bit codebook indices at 4.7 bits 1.4x faster,
# 8-bit ones at 7.7 bits 1.5x slower)
BYTE_MACHINE_BELOW = 6.0
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def decode_blocks(bits: np.ndarray, nbits: int, lengths: np.ndarray, starts: np.ndarray, n: int,
                  block: int, dtype: type) -> np.ndarray:
    """The ``n`` symbols (``dtype``) of a stream.

    Args:
        bits: the coded bytes (uint8, MSB-first), ``nbits`` of them meaningful.
        lengths: code length of every symbol of the alphabet (canonical code, checked complete).
        starts: (number of blocks,) starting bit of each block of ``block`` symbols (the first 0).

    Used by chapter 02 and 04, through :func:`decode_stream`.
    """
    if dtype == np.uint8 and nbits < BYTE_MACHINE_BELOW * n:
        return by_byte(bits, nbits, machine(lengths), starts, n, block)
    return by_symbol(bits, lengths, starts, n, block, dtype)


# ---- one step per symbol -------------------------------------------------------------------

def by_symbol(bits: np.ndarray, lengths: np.ndarray, starts: np.ndarray, n: int, block: int,
              dtype: type) -> np.ndarray:
    """Decode with one numpy step per symbol of a block (all blocks at once): the next ``maxlen``
    bits index tables of the symbol and its code length. Arguments as :func:`decode_blocks`.
    Used by chapter 02 and 04, through ``codec``."""
    _, table, maxlen = canonical(lengths)
    symbol_of, length_of = (table >> 5).astype(dtype), (table & 31).astype(np.uint8)  # bytes: stay in cache
    nb = starts.size
    # win[i] = 32-bit words i and i+1 of the bits, as one uint64 (padded past the end)
    w = np.zeros((bits.size + 3) // 4 + (block * maxlen + 31) // 32 + 2, dtype=">u4")
    w.view(np.uint8)[: bits.size] = bits
    w = w.astype(np.uint64)
    win = (w[:-1] << np.uint64(32)) | w[1:]
    pos = starts.astype(np.uint64)
    out = np.empty((block, nb), dtype=dtype)
    idx, sh, peek = np.empty(nb, np.uint64), np.empty(nb, np.uint64), np.empty(nb, np.uint64)
    step = np.empty(nb, np.uint8)
    top, five, low5 = np.uint64(64 - maxlen), np.uint64(5), np.uint64(31)
    # ndarray.take, not np.take (the wrapper costs more than a small step); mode="clip": no
    # bounds checks and no buffering (indices are in range)
    for t in range(block):
        np.right_shift(pos, five, out=idx)
        np.bitwise_and(pos, low5, out=sh)
        win.take(idx, out=peek, mode="clip")
        np.left_shift(peek, sh, out=peek)  # the next maxlen bits, left-aligned ...
        np.right_shift(peek, top, out=peek)  # ... then right-aligned: the table index
        symbol_of.take(peek, out=out[t], mode="clip")
        length_of.take(peek, out=step, mode="clip")
        np.add(pos, step, out=pos)
    if nb > 1 and not np.array_equal(pos[:-1], starts[1:].astype(np.uint64)):
        raise Corrupt("a coded block does not end where the next begins")
    return np.ascontiguousarray(out.T).reshape(-1)[:n]


# ---- one step per byte ---------------------------------------------------------------------

class Machine(NamedTuple):
    """The byte decoder of one canonical code, over S states (the code tree's internal nodes,
    root 0). Tables are indexed by ``state * 256 + byte``."""
    records: np.ndarray  # the symbols the byte completes, little-endian, in 1, 2, 4 or 8 bytes
    counts: np.ndarray  # uint8: how many
    base: np.ndarray  # uint16: next state * 256
    inner: np.ndarray  # (S, 2) bool: the child for bit b is an internal node
    child: np.ndarray  # (S, 2) intp: that child's state, or the leaf's symbol


def machine(lengths: np.ndarray) -> Machine:
    """The byte decoder of the canonical code with these code lengths (at most 256 symbols).

    Nodes are numbered as in a heap (prefix p of depth d is ``1 << d | p``, its children ``2k``
    and ``2k + 1``); the tables for one bit are composed into 2, 4 and 8 bits (a few thousand
    elements each: under 3 ms for a full 256-symbol code). Used by chapter 02 and 04, through ``codec``.
    """
    codes, _, maxlen = canonical(lengths)
    used = np.flatnonzero(lengths)
    ln, cd = lengths[used].astype(np.int64), codes[used].astype(np.int64)
    depth = np.arange(maxlen)
    prefixes = (1 << depth) | (cd[:, None] >> np.maximum(ln[:, None] - depth, 0))
    keys = np.unique(prefixes[depth < ln[:, None]])  # internal nodes, the root (1) first
    leaves = (1 << ln) | cd
    order = np.argsort(leaves)
    kids = 2 * keys[:, None] + np.arange(2)
    k = np.searchsorted(keys, kids).clip(max=keys.size - 1)
    inner = keys[k] == kids
    child = np.where(inner, k, used[order][np.searchsorted(leaves[order], kids).clip(max=used.size - 1)])
    nxt = np.where(inner, child, 0)  # after a leaf, the root
    cnt = (~inner).astype(np.int64)
    sym = np.where(inner, 0, child).astype(np.uint64)
    s = keys.size
    for _ in range(3):  # k bits then k more: [state, high bits, low bits] -> [state, 2k bits]
        then = nxt[nxt]
        sym = (sym[:, :, None] | (sym[nxt] << (np.uint64(8) * cnt[:, :, None].astype(np.uint64)))).reshape(s, -1)
        cnt = (cnt[:, :, None] + cnt[nxt]).reshape(s, -1)
        nxt = then.reshape(s, -1)
    size = 1 << (int(cnt.max()) - 1).bit_length()  # bytes per record: 1, 2, 4 or 8
    return Machine(sym.astype(_UINT[size]).reshape(-1), cnt.astype(np.uint8).reshape(-1),
                   (nxt.reshape(-1) << 8).astype(np.uint16), inner, child)


def _walk(m: Machine, state: np.ndarray, byte: np.ndarray, lo: np.ndarray, hi: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bits ``lo`` to ``hi - 1`` (MSB first) of one byte per block, a bit at a time from
    ``state``: a block's first byte (its first bits belong to the previous block) and its last
    (only some bits are its own). Returns the states after, the symbols (little-endian in a
    uint64, as ``Machine.records``) and their counts."""
    state = state.astype(np.intp)
    byte = byte.astype(np.intp)
    sym = np.zeros(state.size, np.uint64)
    cnt = np.zeros(state.size, np.uint64)
    for i in range(8):
        act = (i >= lo) & (i < hi)
        bit = (byte >> (7 - i)) & 1
        inner = m.inner[state, bit]
        leaf = act & ~inner
        sym |= np.where(leaf, m.child[state, bit].astype(np.uint64) << (np.uint64(8) * cnt), np.uint64(0))
        cnt += leaf
        state = np.where(act, np.where(inner, m.child[state, bit], 0), state)
    return state, sym, cnt


def by_byte(bits: np.ndarray, nbits: int, m: Machine, starts: np.ndarray, n: int, block: int) -> np.ndarray:
    """Decode with one numpy step per byte of a block (all blocks at once), through ``m``;
    other arguments as :func:`decode_blocks`.

    Step t reads byte t of every block (counted from the byte its first bit is in), looks up
    ``state * 256 + byte`` and keeps the record; the first and last byte of each block are
    walked bit by bit (``_walk``). Every block must end in the root exactly at the next block's
    first bit and hold exactly ``block`` symbols (the last one the rest), else ``Corrupt``.
    Used by chapter 02 and 04, through ``codec``.
    """
    nb = starts.size
    ends = np.append(starts[1:], nbits)
    size = ends - starts
    # a block holds at least one symbol of at least one bit, and at most ``block`` codes of at
    # most HUFFMAN_LIMIT bits: so a lying header cannot make the tables below outgrow the model
    if not (size > 0).all() or int(size.max()) > block * HUFFMAN_LIMIT:
        raise Corrupt("block offsets out of order")
    first, skip = starts >> 3, starts & 7
    last = ((ends - 1) >> 3) - first  # the step of the block's last byte
    steps = int(last.max()) + 1
    buf = np.zeros(bits.size + steps + 1, np.uint8)
    buf[: bits.size] = bits
    # byte t of every block, transposed once so that each step reads one contiguous row
    at = np.empty((steps, nb), np.uint16)
    rows = max(1, _CACHE // steps)
    window = np.lib.stride_tricks.sliding_window_view(buf, steps)
    for b0 in range(0, nb, rows):
        at[:, b0:b0 + rows] = window[first[b0:b0 + rows]].T
    rec = np.empty((steps, nb), m.records.dtype)
    cnt = np.empty((steps, nb), np.uint8)
    state, sym, c = _walk(m, np.zeros(nb, np.intp), buf[first], skip, np.minimum(8, skip + ends - starts))
    rec[0], cnt[0] = sym, c
    base = (state << 8).astype(np.uint16)
    before = np.zeros(nb, np.uint16)  # state * 256 before each block's last byte
    due = set(np.unique(last).tolist())
    key = np.empty(nb, np.uint16)
    # ndarray.take, not np.take (the wrapper costs more than a small step); mode="clip": no
    # bounds checks and no buffering (keys are in range)
    records, counts, nxt = m.records, m.counts, m.base
    for t in range(1, steps):
        if t in due:
            np.copyto(before, base, where=last == t)
        np.bitwise_or(base, at[t], out=key)
        records.take(key, out=rec[t], mode="clip")
        counts.take(key, out=cnt[t], mode="clip")
        nxt.take(key, out=base, mode="clip")
    b = np.flatnonzero(last > 0)
    final = first[b] + last[b]  # the byte each block ends in
    end_state, sym, c = _walk(m, before[b] >> 8, buf[final], np.zeros(b.size, np.int64), ends[b] - 8 * final)
    state[b] = end_state
    if state.any():
        raise Corrupt("a coded block does not end where the next begins")
    rec[last[b], b], cnt[last[b], b] = sym, c
    # records after a block's last byte decoded the next block's bits: they count no symbols
    for t in range(int(last[:-1].min(initial=steps)) + 1, steps):
        cnt[t, last < t] = 0
    cnt[last[-1] + 1:, -1] = 0
    return _compact(rec, cnt, n, block)


def _compact(rec: np.ndarray, cnt: np.ndarray, n: int, block: int) -> np.ndarray:
    """The used bytes of the (steps, blocks) records, block by block: the n symbols in order.
    A slab of blocks at a time is transposed into a buffer that stays in cache, then compacted."""
    steps, nb = rec.shape
    size = rec.itemsize
    c = np.arange(size + 1)
    masks = (np.arange(size) < c[:, None]).astype(np.uint8).view(rec.dtype).reshape(-1)
    out = np.empty(n, np.uint8)
    rows = max(1, _CACHE // (steps * size))
    r = np.empty((rows, steps), rec.dtype)
    k = np.empty((rows, steps), np.uint8)
    done = 0
    for b0 in range(0, nb, rows):
        b1 = min(nb, b0 + rows)
        rr, kk = r[: b1 - b0], k[: b1 - b0]
        rr[...] = rec[:, b0:b1].T
        kk[...] = cnt[:, b0:b1].T
        sel = np.flatnonzero(masks.take(kk, mode="clip").view(np.bool_))
        per = np.diff(np.searchsorted(sel, np.arange(b1 - b0 + 1) * (steps * size)))
        want = np.full(b1 - b0, block)
        if b1 == nb:
            want[-1] = n - block * (nb - 1)
        if not np.array_equal(per, want):
            raise Corrupt("a coded block holds a wrong number of symbols")
        rr.reshape(-1).view(np.uint8).take(sel, out=out[done:done + sel.size], mode="clip")
        done += sel.size
    return out


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
    block, nbits = field_int(meta, "block"), field_int(meta, "nbits")
    bits = segment(payload, meta["bits"])
    if not 1 <= block <= 2**16 or nbits > 8 * len(bits):
        raise Corrupt("bad stream sizes")
    nb = -(-n // block)
    bm = meta["blocks"]
    if field_int(bm, "width") > 32:
        raise Corrupt("bad block offsets")
    blen = read_fixed(segment(payload, bm["data"]), nb - 1, field_int(bm, "width")) + field_int(bm, "min")
    starts = np.concatenate([[0], np.cumsum(blen)])
    if int(starts[-1]) > nbits:
        raise Corrupt("block offsets beyond the stream")
    sym = decode_blocks(np.frombuffer(bits, np.uint8), nbits, lengths, starts, n, block, dtype)
    if int(sym.max()) >= alphabet:
        raise Corrupt("decoded symbol out of range")
    return sym
