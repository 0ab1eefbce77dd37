"""The compressed model file (paper Sec. 4.1's future work): format, Huffman coding, read, write.

The paper sizes a weight-shared model by formula only (Eq 6-7; "Future work should leverage the
weight shared model to reduce model persist size using Huffman encoding"). ``save_compressed``
writes that file and ``load_compressed`` reads it back exactly; ``sizes`` holds the yardsticks
(formula, dense bytes, entropy bound) the file is compared with.

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

Entropy coding (canonical Huffman, codes at most 20 bits, blocks decoded in parallel) is in
``huffman``; each stream's record holds its length ``n``, ``alphabet``, and either ``single``
(one distinct symbol, no bits) or ``maxlen``, ``nbits``, ``block`` and the segments ``lengths``
(code length per symbol), ``bits`` and ``blocks`` (block start offsets).

Integrity: a file is refused with ``ValueError`` when it is not a regular file (``/dev/zero``
would read for ever), shorter or longer than its prefix says (checked against the file's size
before anything else is read), its magic, version or flags are unknown, its checksum does not
match, its header is not JSON of format ``rclib.compressed`` and this version (nesting too deep
for the JSON parser included), or it does not describe a consistent set of segments. Tensor
names, shapes and dtypes are checked against the model before anything is decoded; a model
rebuilt from the file's ``spec`` is first built on the ``meta`` device (no memory), compared
with the tensor records, and refused if it would hold more than
``max(MIN_ALLOWANCE, ALLOWANCE_PER_BYTE x payload)`` bytes, so even a header with a valid
checksum cannot make the reader allocate gigabytes. Nothing is ever unpickled. Writes are
atomic (a temporary file in the same folder, then ``os.replace``).

Measured on VGG16 (138M weights, random init, 8/5-bit weight sharing, ``bench/bench_share.py``):
at 50% global pruning the file is 62 MB (dense safetensors 553 MB; the paper's weight-shared
formula 47 MB, which ignores the positions of the non-zeros) and within 1.1% of the entropy
bound; writing and reading (with rebuilding the architecture) take about 0.55x the time of the
first version of this codec, which wrote the same bytes.

Used by chapter 02 (weight sharing) and 04.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch
from torch import nn

from .huffman import Corrupt, Payload, counts_of, decode_stream, encode_stream, entropy_bits, field_int, segment
from .sizes import effective_state, state_shapes

# --------------------------------------------------------------------------------------------
# The compressed file
# --------------------------------------------------------------------------------------------

MAGIC = b"\x89RCLZ\r\n\x1a"  # PNG-style: a non-ASCII byte, then CR LF and ^Z catch text-mode mangling
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHQQ32s")  # magic, version, flags, header bytes, payload bytes, sha256
MAX_CODEBOOK = 2**16  # at most this many distinct non-zero values make a "shared" (coded) layer
# a rebuilt architecture may hold at most max(MIN_ALLOWANCE, ALLOWANCE_PER_BYTE x payload) bytes
# of tensors: save_compressed's files stay far below (VGG16: 9x at 50% pruning, about 1000x at
# 99.9%), while a re-signed header cannot make the reader allocate gigabytes for a tiny payload
MIN_ALLOWANCE = 2**26
ALLOWANCE_PER_BYTE = 2**12
_STEP = 1 << 18  # elements per step of the chunked passes: temporaries stay in cache
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
Bits = Union[int, Mapping[str, int], None]


def _check_host() -> None:
    # raw tensors are written in the host's byte order; the format is little-endian
    if sys.byteorder != "little":
        raise ValueError("the rclib compressed format is little-endian; this host is big-endian")


# ---- tensor encodings ----------------------------------------------------------------------

def _gap_alphabet(nnz: int, numel: int) -> int:
    # about 8x the mean gap, so an escape (a raw overflow gap) is rare (~e^-8 for random masks);
    # but the Huffman table costs a byte per symbol, so for a very sparse layer (few non-zeros,
    # huge gaps) the alphabet is capped near nnz: escaping every gap then costs less than the table
    mean_gap = numel / max(nnz, 1)
    wanted = 2 ** math.ceil(math.log2(8 * mean_gap))
    cap = 2 ** math.ceil(math.log2(max(nnz, 2)))
    return int(min(2**16, max(256, min(wanted, cap))))


def _factorize_small(values: np.ndarray, limit: int = 512) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sorted distinct values, code of each)`` for float32 values with at most ``limit``
    distinct ones (a weight-shared layer), else None.

    Why not ``pd.factorize``: a perfect hash of the float bits (multiply-shift into a table of
    2^18 slots, multiplier drawn until the keys do not collide) codes a chunk in a few cheap
    passes; a chunk with unseen values adds them and is coded again. Codes are insertion ids
    until one small lookup turns them into sorted ranks.
    """
    keys = values.view(np.uint32)
    rng = np.random.default_rng(0)
    seen = np.zeros(0, dtype=np.uint32)
    ids = np.empty(values.size, dtype=np.uint16)
    table = slot_key = mult = None
    s = 0
    while s < values.size:
        if table is None:
            for _ in range(64):
                mult = np.uint32(rng.integers(1, 2**32) | 1)
                h = (seen * mult) >> np.uint32(14)
                if np.unique(h).size == seen.size:
                    break
            else:
                return None
            table = np.zeros(2**18, dtype=np.uint16)
            slot_key = np.full(2**18, 0, dtype=np.uint32)  # key 0 (+0.0) never occurs: non-zeros
            table[h] = np.arange(seen.size, dtype=np.uint16)
            slot_key[h] = seen
        k = keys[s:s + _STEP]
        h = (k * mult) >> np.uint32(14)
        hit = slot_key[h] == k
        if not hit.all():
            new = np.unique(k[~hit])
            if seen.size + new.size > limit:
                return None
            seen = np.concatenate([seen, new])
            table = None
            continue
        ids[s:s + k.size] = table[h]
        s += k.size
    uniq = seen.view(np.float32)
    order = np.argsort(uniq)
    rank = np.empty(seen.size, dtype=np.uint16)
    rank[order] = np.arange(seen.size, dtype=np.uint16)
    return uniq[order], rank.astype(np.uint8 if seen.size <= 256 else np.uint16)[ids]


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sorted distinct values, code of each value)`` if there are at most MAX_CODEBOOK
    distinct values and all are finite; else None."""
    if values.size > 200_000 and np.unique(values[:200_000]).size > MAX_CODEBOOK:
        return None  # early out: a sample already has too many distinct values
    if not np.isfinite(values).all():
        return None
    found = _factorize_small(values) if values.size > 200_000 and values.dtype == np.float32 else None
    if found is not None:
        return found
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
    """Decide a prunable layer weight's encoding and compute its symbol streams.

    The positions are walked a chunk at a time: on VGG16 whole-layer int64 positions and
    gaps were 400 MB temporaries each.
    """
    flat = w.reshape(-1)
    nnz = int(np.count_nonzero(flat))
    ga = _gap_alphabet(nnz, flat.size)
    gsym = np.empty(nnz, dtype=np.uint8 if ga <= 256 else np.uint16)
    values = np.empty(nnz, dtype=flat.dtype)
    overflow, last, i = [], -1, 0
    for s in range(0, flat.size, _STEP):
        c = flat[s:s + _STEP]
        pos = np.flatnonzero(c)
        if not pos.size:
            continue
        np.take(c, pos, out=values[i:i + pos.size])
        pos += s
        gaps = np.empty_like(pos)
        gaps[0] = pos[0] - last
        np.subtract(pos[1:], pos[:-1], out=gaps[1:])
        if gaps.max() >= ga:
            overflow.append(gaps[gaps >= ga])
            np.minimum(gaps, ga, out=gaps)
        np.subtract(gaps, 1, out=gsym[i:i + pos.size], casting="unsafe")
        last, i = int(pos[-1]), i + pos.size
    overflow = (np.concatenate(overflow) if overflow else np.zeros(0, np.int64)).astype(
        np.uint32 if flat.size < 2**32 else np.uint64)
    plan = dict(nnz=nnz, gap_alphabet=ga, gaps=gsym, overflow=overflow, encoding="sparse",
                values=values)
    found = _distinct(values) if values.size else None
    if found is not None:
        uniq, codes = found
        shared_cost = uniq.size * 5 + entropy_bits(counts_of(codes, uniq.size)) / 8
        if shared_cost < 4 * values.size:  # a codebook must pay for itself
            plan.update(encoding="shared", codebook=uniq.astype(np.float32), codes=codes)
            del plan["values"]
    return plan


def plan(model: nn.Module, bits: Bits = None) -> list[dict[str, Any]]:
    """Per entry of the effective state: its encoding and symbol streams (weight-shared while
    planning when ``bits`` is given), before any bit is written; ``encode`` writes them and
    ``sizes`` measures them. Used by chapter 02 and 04."""
    from . import share
    from .models import prunable_layers

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


def encode(model: nn.Module, bits: Bits = None, entries: list[dict[str, Any]] | None = None) -> bytes:
    """The bytes of the compressed file of ``model`` (``entries`` from :func:`plan` if already
    planned). Used by chapter 02 and 04, through ``save_compressed`` and ``sizes.size_report``."""
    from . import models

    if entries is None:
        entries = plan(model, bits)
    spec = None
    if isinstance(model, models.VGG):
        try:
            spec = models.describe(model)
        except ValueError:
            spec = None  # a layer models cannot describe: load_compressed then needs model=
    out = Payload()
    tensors = []
    for e in entries:
        rec = {k: e[k] for k in ("name", "shape", "dtype", "encoding")}
        if e["encoding"] == "raw":
            t = e["tensor"]
            rec["data"] = out.add(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            rec.update(nnz=e["nnz"], gap_alphabet=e["gap_alphabet"],
                       gaps=encode_stream(e["gaps"], e["gap_alphabet"], out),
                       overflow=out.add(e["overflow"].tobytes()),  # little-endian host (checked)
                       overflow_dtype=e["overflow"].dtype.str)
            if e["encoding"] == "shared":
                rec["codebook"] = out.add(e["codebook"].astype("<f4").tobytes())
                rec["codes"] = encode_stream(e["codes"], e["codebook"].size, out)
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
    data = encode(model, bits)
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
    """The header and payload of a file, checked before anything large is read: a regular file,
    magic, version, flags and the lengths in the prefix against the file's size; then the
    checksum, and a JSON header of the right format and version."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file (a device, pipe or folder cannot be an rclib compressed model)")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError(f"{path}: not an rclib compressed model (only {len(prefix)} bytes)")
        magic, version, flags, hlen, plen, digest = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError(f"{path}: not an rclib compressed model (bad magic bytes {magic!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {version} is not supported (this rclib reads {FORMAT_VERSION})")
        if flags != 0:
            raise ValueError(f"{path}: file is corrupt (flags {flags:#06x}; version {FORMAT_VERSION} defines none)")
        if info.st_size != _PREFIX.size + hlen + plen:
            what = "truncated" if info.st_size < _PREFIX.size + hlen + plen else "has trailing bytes"
            raise ValueError(f"{path}: file is corrupt ({what}: {info.st_size} bytes, the header says "
                             f"{_PREFIX.size + hlen + plen})")
        data = bytearray(hlen + plen)
        if f.readinto(data) != len(data) or f.read(1):
            raise ValueError(f"{path}: file is corrupt (its size changed while reading)")
    h = hashlib.sha256(prefix[:28])
    h.update(data)
    if h.digest() != digest:
        raise ValueError(f"{path}: file is corrupt (sha256 checksum mismatch)")
    try:
        header = json.loads(data[:hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: file is corrupt (unreadable header: {err})") from None
    except RecursionError:
        raise ValueError(f"{path}: file is corrupt (header JSON nested too deeply)") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ValueError(f"{path}: file is corrupt (header without a tensor list)")
    if header.get("format") != "rclib.compressed" or header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: file is corrupt (header format {header.get('format')!r} version "
                         f"{header.get('version')!r}, expected 'rclib.compressed' {FORMAT_VERSION})")
    return header, memoryview(data)[hlen:]


def _decode_tensor(rec: dict[str, Any], payload: memoryview) -> torch.Tensor:
    shape = rec["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise Corrupt("bad shape")
    numel = math.prod(shape)
    dtype = _DTYPES[rec["dtype"]]  # checked by load_compressed
    enc = rec["encoding"]
    if not isinstance(enc, str):
        raise Corrupt("bad encoding")
    if enc == "raw":
        raw = segment(payload, rec["data"])
        if len(raw) != numel * dtype.itemsize:
            raise Corrupt("raw tensor size does not match its shape")
        if numel == 0:
            return torch.zeros(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    if enc not in ("shared", "sparse") or dtype != torch.float32:
        raise Corrupt(f"unknown encoding {enc!r}")
    nnz, ga = field_int(rec, "nnz"), field_int(rec, "gap_alphabet")
    if nnz > numel or field_int(rec["gaps"], "n") != nnz or rec["gaps"]["alphabet"] != ga:
        raise Corrupt("gap stream does not match nnz")
    if enc == "shared" and field_int(rec["codes"], "n") != nnz:
        raise Corrupt("code stream does not match nnz")
    gsym = decode_stream(rec["gaps"], payload)
    if rec["overflow_dtype"] not in ("<u4", "<u8"):
        raise Corrupt("bad overflow dtype")
    over = np.frombuffer(segment(payload, rec["overflow"]), dtype=rec["overflow_dtype"])
    if over.size and (int(over.min()) < 1 or int(over.max()) > numel):
        raise Corrupt("non-zero positions outside the tensor")
    if enc == "shared":
        book = np.frombuffer(segment(payload, rec["codebook"]), dtype="<f4")
        codes = decode_stream(rec["codes"], payload)
        if codes.size != nnz or rec["codes"]["alphabet"] != book.size:
            raise Corrupt("code stream does not match the codebook")
    else:
        values = np.frombuffer(segment(payload, rec["values"]), dtype="<f4")
        if values.size != nnz:
            raise Corrupt("value count does not match nnz")
    w = np.zeros(numel, dtype=np.float32)
    last, used = -1, 0  # position of the previous non-zero; overflow gaps consumed
    for s in range(0, nnz, _STEP):  # a chunk at a time: no 400 MB int64 temporaries on VGG16
        g = gsym[s:s + _STEP].astype(np.int64)
        g += 1
        esc = np.flatnonzero(g == ga)
        if used + esc.size > over.size:
            raise Corrupt("escape count does not match the overflow gaps")
        g[esc] = over[used:used + esc.size]
        used += esc.size
        pos = np.cumsum(g)
        pos += last
        if pos[-1] >= numel:
            raise Corrupt("non-zero positions outside the tensor")
        w[pos] = book[codes[s:s + _STEP]] if enc == "shared" else values[s:s + _STEP]
        last = int(pos[-1])
    if used != over.size:
        raise Corrupt("escape count does not match the overflow gaps")
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
        model = _skeleton(path, header.get("spec"))
    # names and shapes are checked against the model before decoding, so a header that lies
    # about sizes cannot make us allocate more than the model itself holds
    expected = state_shapes(model)
    found = {rec["name"]: (tuple(rec["shape"]), _DTYPES[rec["dtype"]]) for rec in records}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra or len(found) != len(records):
        raise ValueError(f"{path}: the model does not match the file (missing from the file: "
                         f"{missing[:5]}, not in the model: {extra[:5]})")
    for name, (shape, dtype) in found.items():
        if expected[name] != (shape, dtype):
            raise ValueError(f"{path}: {name} is {shape} {dtype} in the file but "
                             f"{expected[name][0]} {expected[name][1]} in the model")
    if rebuilt:
        holds = sum(math.prod(s) * d.itemsize for s, d in expected.values())
        allowed = max(MIN_ALLOWANCE, ALLOWANCE_PER_BYTE * len(payload))
        if holds > allowed:
            raise ValueError(f"{path}: file is corrupt (its architecture holds {holds:,} bytes of "
                             f"tensors, more than {allowed:,} that a {len(payload):,}-byte payload "
                             f"can describe)")
        model = _materialise(model, header["spec"])
    try:
        state = {rec["name"]: _decode_tensor(rec, payload) for rec in records}
    except Corrupt as err:
        raise ValueError(f"{path}: file is corrupt ({err})") from None
    except (KeyError, TypeError, IndexError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: file is corrupt ({type(err).__name__}: {err})") from None
    _fill(model, state, adopt=rebuilt)
    return model.eval() if rebuilt else model


def _skeleton(path: str | os.PathLike, spec: Any) -> nn.Module:
    """The recorded architecture on the ``meta`` device: shapes without memory, so a spec of
    any size costs nothing until it has been checked against the file."""
    from . import models

    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the file records no rclib architecture; pass model= to fill")
    try:
        with torch.device("meta"):
            return models.from_spec(spec)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, MemoryError, RecursionError) as err:
        raise ValueError(f"{path}: cannot rebuild the recorded architecture ({type(err).__name__}: {err})") from None


def _materialise(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Real (uninitialised) memory for a skeleton: every persistent tensor is then filled from
    the file, so the random initialisation is skipped (seconds on VGG16); the non-persistent
    normalisation buffers are rebuilt from the spec."""
    from . import models

    model = model.to_empty(device="cpu")
    if isinstance(model, models.VGG):
        model.normalize = models.Normalize(tuple(spec["mean"]), tuple(spec["std"]))
    return model


def _fill(model: nn.Module, state: dict[str, torch.Tensor], adopt: bool = False) -> None:
    """Copy the decoded tensors into ``model``; ``adopt`` (a freshly rebuilt model) makes them
    its storage instead, sparing a copy and the page faults of a second 553 MB on VGG16."""
    with torch.no_grad():
        for name, t in state.items():
            mod_name, _, attr = name.rpartition(".")
            m = model.get_submodule(mod_name)
            if hasattr(m, f"{attr}_orig"):
                orig, mask = getattr(m, f"{attr}_orig"), getattr(m, f"{attr}_mask")
                orig.copy_(t)
                mask.copy_((t != 0).to(mask.dtype))
                setattr(m, attr, orig * mask)  # the cached masked weight, without autograd history
            elif adopt:
                getattr(m, attr).data = t
            else:
                getattr(m, attr).copy_(t)
