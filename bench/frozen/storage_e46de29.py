# Frozen copy of rclib/storage.py at commit e46de29 (before issue 15): the "today" column of the
# benchmarks in bench/, timed beside the current code in one run. Not part of rclib; do not edit.
"""Model size (paper Eq 6-7, Sec. 4.1): the paper's formulas and a real compressed file.

``approx_size_mb`` is the paper's formula: number of non-zero parameters times precision. It is
a formula, not a file: the paper could not measure real compressed sizes (its Sec. 4.1, "Future
work should leverage the weight shared model to reduce model persist size using Huffman
encoding"). ``save_compressed`` / ``load_compressed`` write and read that file, so its bytes
can be measured, and ``size_report`` puts the four numbers side by side: dense safetensors,
the paper's approximate size, the real file, and the Shannon bound of what the file encodes.

File format (version 1; all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89RCLZ\\r\\n\\x1a"
    8       2     format version (uint16) = 1
    10      2     flags (uint16) = 0
    12      8     H = header length in bytes (uint64)
    20      8     P = payload length in bytes (uint64)
    28      32    sha256 of bytes [0, 28) + header + payload
    60      H     header: UTF-8 JSON
    60+H    P     payload: the binary segments the header points at as [offset, length]

The header holds ``spec`` (``models.describe(model)`` for an rclib ``VGG``, so ``load_compressed``
can rebuild the architecture without ``model=``; ``null`` otherwise) and ``tensors``: every
entry of the model's effective state dict (pruning masks applied) with its name, shape, dtype
and one of three encodings:

- ``shared`` (a prunable layer's float32 weight with at most 2^16 distinct non-zero values,
  e.g. after ``share.weight_share``): the sorted distinct non-zero values (the codebook, float32),
  and two entropy-coded streams over the non-zeros in row-major order: the *codes* (index of
  each weight's value in the codebook) and the *gaps* between successive non-zero positions,
  relative indices as in Deep Compression (Han et al. 2016). Gaps are symbols ``gap - 1`` of
  an alphabet of size A (a power of two from 256 to 65536 chosen from the mean gap); symbol
  ``A - 1`` escapes to an exact gap in an ``overflow`` array (uint32, or uint64 for layers with
  2^32 or more weights).
- ``sparse`` (a prunable layer's float32 weight whose values are too many to tabulate, i.e. a
  model that is pruned but not weight-shared, or where a codebook would not pay): the same gap
  stream, and the non-zero values as raw float32. We chose to store such layers exactly rather
  than refuse them, so a merely pruned model gets a real file size too.
- ``raw`` (biases, BatchNorm parameters and buffers, any other tensor): the tensor's bytes in
  its own dtype (float32 for almost everything).

Entropy coding is canonical Huffman (codes at most 20 bits), packed MSB-first into bytes with
numpy and decoded table-driven: a stream is cut into blocks of B symbols whose starting bit
offsets are stored (fixed-width residuals, well under 0.1 bit per symbol), so all blocks are
decoded at once, one numpy step per symbol of a block. This keeps VGG16 (138M weights) at
seconds, where a pure-Python bit loop would take minutes. A stream of a single distinct symbol
costs no bits. The Huffman table per stream is the code length of every symbol (one byte each).

Integrity: a file is refused with ``ValueError`` when it is shorter or longer than its header
says, its magic or version is unknown, its checksum does not match, or its header does not
describe a consistent set of segments; tensor names, shapes and dtypes are checked against the
model before anything is decoded, so even a header with a valid checksum cannot make the reader
allocate more than the model holds. Nothing is ever unpickled. Writes are atomic (a temporary
file in the same folder, then ``os.replace``).

Measured on VGG16 (138M weights, random init, 8/5-bit weight sharing, ``bench/bench_share.py``):
at 50% global pruning the file is 62 MB (dense safetensors 553 MB; the paper's weight-shared
formula 47 MB, which ignores the positions of the non-zeros) and within 1.2% of the entropy
bound; writing takes about 10 s and reading, with rebuilding the architecture, about 5 s.

Used by chapter 00 (baseline size) and the pruning, weight-sharing and robust chapters (01-04).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch
from torch import nn

from rclib.nn.masks import effective

UNITS = {"MB": 1e6, "MiB": 2**20}


def nonzero_parameters(model: nn.Module) -> int:
    """Non-zero entries over all parameters (pruned weights through torch masks count as zero;
    their values are recomputed as ``orig * mask``, see ``models.effective``)."""
    total = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            # a pruned weight lives as ``<name>_orig``; its effective value is the masked attribute
            value = effective(m, name[: -len("_orig")]) if name.endswith("_orig") else p
            total += int(torch.count_nonzero(value.detach()))
    return total


def approx_size_mb(model: nn.Module, bits: int = 32, unit: str = "MB") -> float:
    """The paper's "Approximate Model Size" (Table 1): non-zero parameters x precision.

    Args:
        model: any module; masked (pruned) weights count as zero.
        bits: precision per stored parameter, default 32 (float32).
        unit: "MB" (10^6 bytes, default) or "MiB" (2^20 bytes). The paper does not say which it
            used; chapter 00 shows both beside its numbers.

    Returns:
        The size in ``unit``.

    Example:
        >>> approx_size_mb(torchvision.models.vgg16(), unit="MiB")  # 138,357,544 parameters
        527.79...

    Used by chapters 00, 01, 02 and 04.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not allowed: one of {', '.join(UNITS)}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits={bits!r} is not allowed: a precision from 1 to 64")
    return nonzero_parameters(model) * bits / 8 / UNITS[unit]


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the model computes with it: a pruned ``<name>_orig`` / ``<name>_mask``
    pair becomes the single masked tensor ``<name>`` (what ``prune.make_permanent`` would leave)."""
    state = {}
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if name.endswith("_mask") or name in m._non_persistent_buffers_set:
                continue
            if name.endswith("_orig"):
                name = name[: -len("_orig")]
                p = effective(m, name)
            state[prefix + name] = p.detach().cpu().contiguous()
    return state


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's effective weights written as safetensors (dense float32, zeros kept).

    This is what a pruned but not hardened model costs on disk: pruning by masks zeroes
    weights but still stores every one of them.
    Used by chapters 01 and 02.
    """
    from safetensors.torch import save

    return len(save(effective_state(model)))


# --------------------------------------------------------------------------------------------
# The compressed file
# --------------------------------------------------------------------------------------------

MAGIC = b"\x89RCLZ\r\n\x1a"  # PNG-style: a non-ASCII byte, then CR LF and ^Z catch text-mode mangling
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHQQ32s")  # magic, version, flags, header bytes, payload bytes, sha256
MAX_CODEBOOK = 2**16  # at most this many distinct non-zero values make a "shared" (coded) layer
HUFFMAN_LIMIT = 20  # longest Huffman code, so a decoding table has at most 2^20 entries
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
Bits = Union[int, Mapping[str, int], None]


class _Corrupt(ValueError):
    pass


def _check_host() -> None:
    # raw tensors are written in the host's byte order; the format is little-endian
    if sys.byteorder != "little":
        raise ValueError("the rclib compressed format is little-endian; this host is big-endian")


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
        raise _Corrupt("a fixed-width field array is shorter than its header says")
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
        raise _Corrupt("Huffman code lengths do not form a complete prefix code")
    codes = np.zeros(lengths.size, dtype=np.uint64)
    codes[sym] = (start >> (maxlen - ln)).astype(np.uint64)
    table = np.repeat((sym.astype(np.uint32) << np.uint32(5)) | ln.astype(np.uint32), span)
    return codes, table, maxlen


def _entropy_bits(counts: np.ndarray) -> float:
    """Shannon bound in bits of a stream with these symbol counts (zeroth order)."""
    c = counts[counts > 0].astype(np.float64)
    if c.size <= 1:
        return 0.0
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum())


def _block_len(n: int) -> int:
    # about 1000 blocks: the decoder makes one numpy step per symbol of a block, over all blocks
    return int(min(4096, max(32, math.ceil(n / 1024))))


class _Payload:
    """Collects binary segments; the header refers to them as [offset, length]."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        ref = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return ref


def _encode_stream(sym: np.ndarray, alphabet: int, out: _Payload) -> dict[str, Any]:
    n = int(sym.size)
    meta: dict[str, Any] = {"n": n, "alphabet": alphabet}
    if n == 0:
        return meta
    counts = np.bincount(sym, minlength=alphabet)
    used = np.flatnonzero(counts)
    if used.size == 1:  # e.g. an unpruned layer's gaps are all 1: nothing to store
        meta["single"] = int(used[0])
        return meta
    lengths = _huffman_lengths(counts)
    codes, _, maxlen = _canonical(lengths)
    bits, nbits = _pack_bits(codes[sym], lengths[sym])
    block = _block_len(n)
    # starting bit of each block after the first, stored as fixed-width residual lengths
    ends = np.cumsum(lengths[sym[: (n - 1) // block * block]], dtype=np.int64)
    starts = np.concatenate([[0], ends[block - 1::block]]) if ends.size else np.zeros(1, np.int64)
    blen = np.diff(starts)
    lo = int(blen.min()) if blen.size else 0
    width = int(blen.max() - lo).bit_length() if blen.size else 0
    res, _ = _pack_bits((blen - lo).astype(np.uint64), np.full(blen.size, width, np.int64))
    meta.update(maxlen=maxlen, nbits=nbits, block=block, lengths=out.add(lengths.tobytes()),
                bits=out.add(bits), blocks={"min": lo, "width": width, "data": out.add(res)})
    return meta


def _decode_stream(meta: dict[str, Any], payload: memoryview) -> np.ndarray:
    n, alphabet = _int(meta, "n"), _int(meta, "alphabet")
    if not 1 <= alphabet <= 2**16:
        raise _Corrupt(f"stream alphabet {alphabet} out of range")
    dtype = np.uint8 if alphabet <= 256 else np.uint16
    if n == 0:
        return np.zeros(0, dtype)
    if "single" in meta:
        s = _int(meta, "single")
        if not 0 <= s < alphabet:
            raise _Corrupt("stream symbol out of range")
        return np.full(n, s, dtype)
    lengths = np.frombuffer(_seg(payload, meta["lengths"]), dtype=np.uint8)
    if lengths.size != alphabet or lengths.max() > HUFFMAN_LIMIT or np.count_nonzero(lengths) < 2:
        raise _Corrupt("bad Huffman table")
    _, table, maxlen = _canonical(lengths)
    block, nbits = _int(meta, "block"), _int(meta, "nbits")
    bits = _seg(payload, meta["bits"])
    if not 1 <= block <= 2**16 or nbits > 8 * len(bits):
        raise _Corrupt("bad stream sizes")
    nb = -(-n // block)
    bm = meta["blocks"]
    if _int(bm, "width") > 32:
        raise _Corrupt("bad block offsets")
    blen = _read_fixed(_seg(payload, bm["data"]), nb - 1, _int(bm, "width")) + _int(bm, "min")
    starts = np.concatenate([[0], np.cumsum(blen)]).astype(np.uint64)
    if int(starts[-1]) > nbits:
        raise _Corrupt("block offsets beyond the stream")
    win = _windows(bits, block * maxlen)
    pos = starts.copy()
    out = np.empty((block, nb), dtype=dtype)
    idx = np.empty(nb, np.uint64)
    sh = np.empty(nb, np.uint64)
    e = np.empty(nb, np.uint32)
    top, mask, five = np.uint64(64 - maxlen), np.uint64((1 << maxlen) - 1), np.uint64(5)
    for t in range(block):  # all blocks advance together: one numpy step per symbol of a block
        np.right_shift(pos, five, out=idx)
        np.bitwise_and(pos, np.uint64(31), out=sh)
        np.subtract(top, sh, out=sh)
        peek = np.right_shift(win[idx], sh)
        np.bitwise_and(peek, mask, out=peek)
        np.take(table, peek, out=e)
        np.right_shift(e, np.uint32(5), out=out[t], casting="unsafe")
        np.bitwise_and(e, np.uint32(31), out=e)
        pos += e
    if nb > 1 and not np.array_equal(pos[:-1], starts[1:]):
        raise _Corrupt("a coded block does not end where the next begins")
    sym = out.T.reshape(-1)[:n]
    if int(sym.max()) >= alphabet:
        raise _Corrupt("decoded symbol out of range")
    return sym


# ---- tensor encodings ----------------------------------------------------------------------

def _int(d: Mapping[str, Any], key: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Corrupt(f"header field {key!r} is not a non-negative integer")
    return v


def _seg(payload: memoryview, ref: Any) -> memoryview:
    if (not isinstance(ref, list) or len(ref) != 2 or
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ref) or
            ref[0] + ref[1] > len(payload)):
        raise _Corrupt(f"segment {ref!r} lies outside the payload")
    return payload[ref[0]: ref[0] + ref[1]]


def _gap_alphabet(nnz: int, numel: int) -> int:
    # about 8x the mean gap, so an escape (a raw overflow gap) is rare (~e^-8 for random masks);
    # but the Huffman table costs a byte per symbol, so for a very sparse layer (few non-zeros,
    # huge gaps) the alphabet is capped near nnz: escaping every gap then costs less than the table
    mean_gap = numel / max(nnz, 1)
    wanted = 2 ** math.ceil(math.log2(8 * mean_gap))
    cap = 2 ** math.ceil(math.log2(max(nnz, 2)))
    return int(min(2**16, max(256, min(wanted, cap))))


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sorted distinct values, code of each value)`` if there are at most MAX_CODEBOOK
    distinct values and all are finite; else None."""
    if values.size > 200_000 and np.unique(values[:200_000]).size > MAX_CODEBOOK:
        return None  # early out: a sample already has too many distinct values
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


def _plan_weight(w: np.ndarray) -> dict[str, Any]:
    """Decide a prunable layer weight's encoding and compute its symbol streams."""
    flat = w.reshape(-1)
    pos = np.flatnonzero(flat)
    values = flat[pos]
    gaps = np.diff(pos, prepend=-1)
    ga = _gap_alphabet(pos.size, flat.size)
    gsym = (np.minimum(gaps, ga) - 1).astype(np.uint8 if ga <= 256 else np.uint16)
    overflow = gaps[gaps >= ga].astype(np.uint32 if flat.size < 2**32 else np.uint64)
    plan = dict(nnz=int(pos.size), gap_alphabet=ga, gaps=gsym, overflow=overflow, encoding="sparse",
                values=values)
    found = _distinct(values) if values.size else None
    if found is not None:
        uniq, codes = found
        shared_cost = uniq.size * 5 + _entropy_bits(np.bincount(codes, minlength=uniq.size)) / 8
        if shared_cost < 4 * values.size:  # a codebook must pay for itself
            plan.update(encoding="shared", codebook=uniq.astype(np.float32), codes=codes)
            del plan["values"]
    return plan


def _plan(model: nn.Module, bits: Bits = None) -> list[dict[str, Any]]:
    from frozen import share_e46de29 as share
    from rclib.nn.models import prunable_layers

    _check_host()
    layers = dict(prunable_layers(model))
    if bits is not None:
        share._validate_bits(bits, list(layers))
    params = {n.removesuffix("_orig") for n, _ in model.named_parameters()}
    entries = []
    for name, t in effective_state(model).items():
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        entry: dict[str, Any] = dict(name=name, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {t.dtype}, which the format does not store")
        if layer in layers and t.dtype == torch.float32 and t.numel() > 0:
            w = t.numpy()
            if bits is not None:  # weight sharing while writing; the model is left untouched
                w = share.share_tensor(w, share._layer_bits(bits, layer, layers[layer])).dense()
            entry.update(_plan_weight(w))
        else:
            entry.update(encoding="raw", tensor=t, parameter=name in params)
        entries.append(entry)
    return entries


def _encode(model: nn.Module, bits: Bits = None, entries: list[dict[str, Any]] | None = None) -> bytes:
    from rclib.nn import models

    if entries is None:
        entries = _plan(model, bits)
    spec = None
    if isinstance(model, models.VGG):
        try:
            spec = models.describe(model)
        except ValueError:
            spec = None  # a layer models cannot describe: load_compressed then needs model=
    out = _Payload()
    tensors = []
    for e in entries:
        rec = {k: e[k] for k in ("name", "shape", "dtype", "encoding")}
        if e["encoding"] == "raw":
            t = e["tensor"]
            rec["data"] = out.add(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            rec.update(nnz=e["nnz"], gap_alphabet=e["gap_alphabet"],
                       gaps=_encode_stream(e["gaps"], e["gap_alphabet"], out),
                       overflow=out.add(e["overflow"].tobytes()),  # little-endian host (checked)
                       overflow_dtype=e["overflow"].dtype.str)
            if e["encoding"] == "shared":
                rec["codebook"] = out.add(e["codebook"].astype("<f4").tobytes())
                rec["codes"] = _encode_stream(e["codes"], e["codebook"].size, out)
            else:
                rec["values"] = out.add(e["values"].astype("<f4").tobytes())
        tensors.append(rec)
    header = json.dumps(dict(format="rclib.compressed", version=FORMAT_VERSION, spec=spec,
                             tensors=tensors), separators=(",", ":")).encode()
    prefix = struct.pack("<8sHHQQ", MAGIC, FORMAT_VERSION, 0, len(header), out.size)
    digest = hashlib.sha256(prefix)
    digest.update(header)
    for part in out.parts:
        digest.update(part)
    return b"".join([prefix, digest.digest(), header, *out.parts])


def save_compressed(model: nn.Module, path: str | os.PathLike, bits: Bits = None) -> int:
    """Write ``model`` as a real compressed file (format in the module docstring).

    Prunable layers (``models.prunable_layers``) are stored as COO: entropy-coded gaps between
    non-zero positions plus entropy-coded codebook indices (a weight-shared layer) or raw float32
    values (a layer with too many distinct values); everything else raw. Loading gives back
    exactly the effective weights (pruning masks applied), so the loaded model's outputs equal
    the saved one's bit for bit.

    Args:
        model: any module; an rclib ``VGG`` also records its architecture (``models.describe``),
            so ``load_compressed`` can rebuild it without ``model=``.
        path: the file to write; its folder must exist. Written atomically.
        bits: ``None`` (default) stores the weights as they are. An int or a dict as in
            ``share.weight_share`` (e.g. ``{"conv": 8, "linear": 5}``) weight-shares each prunable
            layer while writing (Alg 6), leaving ``model`` untouched; the file then holds the
            weight-shared model.

    Returns:
        The number of bytes written.

    Example:
        >>> share.weight_share(model, {"conv": 8, "linear": 5})
        >>> n = save_compressed(model, "model.rclz")
        >>> torch.equal(load_compressed("model.rclz").eval()(x), model.eval()(x))
        True

    Used by chapter 02 (weight sharing) and 04.
    """
    data = _encode(model, bits)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    data = Path(path).read_bytes()
    if len(data) < _PREFIX.size:
        raise ValueError(f"{path}: not an rclib compressed model (only {len(data)} bytes)")
    magic, version, _flags, hlen, plen, digest = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{path}: not an rclib compressed model (bad magic bytes {magic!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version} is not supported (this rclib reads {FORMAT_VERSION})")
    if len(data) != _PREFIX.size + hlen + plen:
        what = "truncated" if len(data) < _PREFIX.size + hlen + plen else "has trailing bytes"
        raise ValueError(f"{path}: file is corrupt ({what}: {len(data)} bytes, the header says "
                         f"{_PREFIX.size + hlen + plen})")
    h = hashlib.sha256(data[:28])
    h.update(memoryview(data)[_PREFIX.size:])
    if h.digest() != digest:
        raise ValueError(f"{path}: file is corrupt (sha256 checksum mismatch)")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: file is corrupt (unreadable header: {err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ValueError(f"{path}: file is corrupt (header without a tensor list)")
    return header, memoryview(data)[_PREFIX.size + hlen:]


def _decode_tensor(rec: dict[str, Any], payload: memoryview) -> torch.Tensor:
    shape = rec["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _Corrupt("bad shape")
    numel = math.prod(shape)
    dtype = _DTYPES[rec["dtype"]]  # checked by load_compressed
    enc = rec["encoding"]
    if not isinstance(enc, str):
        raise _Corrupt("bad encoding")
    if enc == "raw":
        raw = _seg(payload, rec["data"])
        if len(raw) != numel * dtype.itemsize:
            raise _Corrupt("raw tensor size does not match its shape")
        if numel == 0:
            return torch.zeros(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    if enc not in ("shared", "sparse") or dtype != torch.float32:
        raise _Corrupt(f"unknown encoding {enc!r}")
    nnz, ga = _int(rec, "nnz"), _int(rec, "gap_alphabet")
    if nnz > numel or _int(rec["gaps"], "n") != nnz or rec["gaps"]["alphabet"] != ga:
        raise _Corrupt("gap stream does not match nnz")
    if enc == "shared" and _int(rec["codes"], "n") != nnz:
        raise _Corrupt("code stream does not match nnz")
    gsym = _decode_stream(rec["gaps"], payload)
    gaps = gsym.astype(np.int64) + 1
    if rec["overflow_dtype"] not in ("<u4", "<u8"):
        raise _Corrupt("bad overflow dtype")
    over = np.frombuffer(_seg(payload, rec["overflow"]), dtype=rec["overflow_dtype"])
    esc = gsym == ga - 1
    if int(esc.sum()) != over.size:
        raise _Corrupt("escape count does not match the overflow gaps")
    gaps[esc] = over
    if nnz and ((gaps < 1).any() or (gaps > numel).any()):
        raise _Corrupt("non-zero positions outside the tensor")
    pos = np.cumsum(gaps) - 1
    if nnz and pos[-1] >= numel:
        raise _Corrupt("non-zero positions outside the tensor")
    if enc == "shared":
        book = np.frombuffer(_seg(payload, rec["codebook"]), dtype="<f4")
        codes = _decode_stream(rec["codes"], payload)
        if codes.size != nnz or rec["codes"]["alphabet"] != book.size:
            raise _Corrupt("code stream does not match the codebook")
        values = book[codes]
    else:
        values = np.frombuffer(_seg(payload, rec["values"]), dtype="<f4")
        if values.size != nnz:
            raise _Corrupt("value count does not match nnz")
    w = np.zeros(numel, dtype=np.float32)
    w[pos] = values
    return torch.from_numpy(w).reshape(shape)


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a file written by :func:`save_compressed`.

    Args:
        path: the file. A truncated, extended or corrupted file, or one that is not an rclib
            compressed model, raises ``ValueError`` before any tensor is built; nothing is ever
            unpickled.
        model: a module to fill (same names and shapes as the saved one; a layer pruned with
            torch keeps its reparametrisation: ``weight_orig`` gets the values, ``weight_mask`` the
            non-zero pattern). Default ``None`` rebuilds the rclib ``VGG`` the file describes
            (``models.from_spec``) and returns it in eval mode.

    Returns:
        The model, holding exactly the saved effective weights.

    Example:
        >>> model = load_compressed("model.rclz")

    Used by chapter 02 (weight sharing) and 04.
    """
    _check_host()
    header, payload = _read(path)
    records = header["tensors"]
    for rec in records:
        if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("shape"), list)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rec["shape"])
                and isinstance(rec.get("dtype"), str) and rec["dtype"] in _DTYPES):
            raise ValueError(f"{path}: file is corrupt (bad tensor record)")
    rebuilt = model is None
    if rebuilt:
        from rclib.nn import models

        if not isinstance(header.get("spec"), dict):
            raise ValueError(f"{path}: the file records no rclib architecture; pass model= to fill")
        try:
            model = models.from_spec(header["spec"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, MemoryError) as err:
            raise ValueError(f"{path}: cannot rebuild the recorded architecture ({type(err).__name__}: {err})") from None
    # names and shapes are checked against the model before decoding, so a header that lies
    # about sizes cannot make us allocate more than the model itself holds
    expected = {k: (tuple(v.shape), v.dtype) for k, v in effective_state(model).items()}
    found = {rec["name"]: (tuple(rec["shape"]), _DTYPES[rec["dtype"]]) for rec in records}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra or len(found) != len(records):
        raise ValueError(f"{path}: the model does not match the file (missing from the file: "
                         f"{missing[:5]}, not in the model: {extra[:5]})")
    for name, (shape, dtype) in found.items():
        if expected[name] != (shape, dtype):
            raise ValueError(f"{path}: {name} is {shape} {dtype} in the file but "
                             f"{expected[name][0]} {expected[name][1]} in the model")
    try:
        state = {rec["name"]: _decode_tensor(rec, payload) for rec in records}
    except _Corrupt as err:
        raise ValueError(f"{path}: file is corrupt ({err})") from None
    except (KeyError, TypeError, IndexError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: file is corrupt ({type(err).__name__}: {err})") from None
    _fill(model, state)
    return model.eval() if rebuilt else model


def _fill(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, t in state.items():
            mod_name, _, attr = name.rpartition(".")
            m = model.get_submodule(mod_name)
            if hasattr(m, f"{attr}_orig"):
                orig, mask = getattr(m, f"{attr}_orig"), getattr(m, f"{attr}_mask")
                orig.copy_(t)
                mask.copy_((t != 0).to(mask.dtype))
                setattr(m, attr, orig * mask)  # the cached masked weight, without autograd history
            else:
                getattr(m, attr).copy_(t)


def entropy_bound_bytes(model: nn.Module, bits: Bits = None) -> float:
    """The Shannon bound of what ``save_compressed`` encodes, in bytes.

    Sum over the entropy-coded streams (gap symbols and codebook indices of each prunable layer)
    of ``count * H`` (zeroth-order empirical entropy of the stream), plus the bytes stored as
    they are (codebooks, overflow gaps, raw float32 values of ``sparse`` layers, raw tensors).
    The header, the Huffman tables and the block offsets are not counted: the difference to the
    real file is the price of Huffman coding (whole bits per symbol) and of the format.

    Args:
        model: as for :func:`save_compressed`.
        bits: as for :func:`save_compressed` (weight sharing while encoding), default ``None``.

    Example:
        >>> entropy_bound_bytes(model) / 1e6  # MB

    Used by chapter 02 (weight sharing) and 04.
    """
    return _entropy_bound(_plan(model, bits))


def _entropy_bound(entries: list[dict[str, Any]]) -> float:
    total_bits = 0.0
    for e in entries:
        if e["encoding"] == "raw":
            total_bits += 8 * e["tensor"].numel() * e["tensor"].element_size()
            continue
        total_bits += _entropy_bits(np.bincount(e["gaps"], minlength=e["gap_alphabet"]))
        total_bits += 8 * e["overflow"].nbytes
        if e["encoding"] == "shared":
            total_bits += _entropy_bits(np.bincount(e["codes"])) + 32 * e["codebook"].size
        else:
            total_bits += 32 * e["values"].size
    return total_bits / 8


def _formula_bytes(entries: list[dict[str, Any]]) -> float:
    """Eq 6's count on what the file holds: per coded layer nnz x ceil(log2 k) index bits plus a
    k-entry float32 table; values of other layers and parameters at 32 bits when non-zero."""
    total_bits = 0
    for e in entries:
        if e["encoding"] == "raw":
            if e["parameter"]:  # as approx_size_mb: parameters only, not BatchNorm statistics
                total_bits += 32 * int(torch.count_nonzero(e["tensor"]))
        elif e["encoding"] == "shared":
            k = e["codebook"].size
            total_bits += e["nnz"] * max(1, math.ceil(math.log2(k))) + 32 * k
        else:
            total_bits += 32 * e["nnz"]
    return total_bits / 8


def size_report(model: nn.Module, bits: Bits = None) -> dict[str, Any]:
    """The model's size four ways, in bytes (divide by 1e6 for the paper's MB).

    Returns:
        ``dense_bytes``: safetensors of the dense effective weights (:func:`dense_bytes`);
        ``approx_bytes``: the paper's Table 1 formula, non-zero parameters x 32 bits
        (:func:`approx_size_mb`); ``shared_approx_bytes``: the paper's weight-shared count
        (Eq 6, as ``share.shared_size_mb``) of what the file holds: each weight-shared layer at
        ``ceil(log2 k)`` bits per non-zero weight plus a k-entry float32 table (k = its number
        of distinct non-zero values), any other layer at 32 bits per non-zero; ``file_bytes``:
        the real :func:`save_compressed` file; ``entropy_bound_bytes``: the Shannon bound of
        what that file encodes (:func:`entropy_bound_bytes`). Buffers (BatchNorm statistics)
        count in the file and the bound only, as in the paper's formula.

    Args:
        model: as for :func:`save_compressed`.
        bits: as for :func:`save_compressed`: ``None`` (default) measures the model as it is;
            an int or dict measures it weight-shared while writing (``dense_bytes`` and
            ``approx_bytes`` stay those of ``model``).

    Example:
        >>> {k: v / 1e6 for k, v in size_report(model).items()}  # MB

    Used by chapter 02 (weight sharing) and 04.
    """
    entries = _plan(model, bits)
    return dict(dense_bytes=dense_bytes(model), approx_bytes=approx_size_mb(model) * 1e6,
                shared_approx_bytes=_formula_bytes(entries), file_bytes=len(_encode(model, bits, entries)),
                entropy_bound_bytes=_entropy_bound(entries))
