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
  e.g. after ``share.weight_share``; found by ``codebook``): the sorted distinct non-zero values
  (the codebook, float32), and two entropy-coded streams over the non-zeros in row-major order:
  the *codes* (index of each weight's value in the codebook) and the *gaps* between successive
  non-zero positions, relative indices as in Deep Compression (Han et al. 2016). Gaps are
  symbols ``gap - 1`` of an alphabet of size A (a power of two from 256 to 65536 chosen from
  the mean gap); symbol ``A - 1`` escapes to an exact gap in an ``overflow`` array (uint32, or
  uint64 for layers with 2^32 or more weights).
- ``sparse`` (a prunable layer's float32 weight whose values are too many to tabulate, i.e. a
  model that is pruned but not weight-shared, or where a codebook would not pay): the same gap
  stream, and the non-zero values as raw float32. We chose to store such layers exactly rather
  than refuse them, so a merely pruned model gets a real file size too.
- ``raw`` (biases, BatchNorm parameters and buffers, any other tensor): the tensor's bytes in
  its own dtype (float32 for almost everything).

Entropy coding (canonical Huffman, codes at most 20 bits, blocks decoded in parallel) is in
``huffman`` and ``huffdecode``; each stream's record holds its length ``n``, ``alphabet``, and
either ``single`` (one distinct symbol, no bits) or ``maxlen``, ``nbits``, ``block`` and the
segments ``lengths`` (code length per symbol), ``bits`` and ``blocks`` (block start offsets).
The prefix, checksum, header and atomic write are in ``container``.

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
atomic (a temporary file in the same folder, then ``os.replace``). Reader checks: ``container``
(file, prefix, checksum, header) and here (tensor records, model, allowance).

Measured on VGG16 (138M weights, random init, 8/5-bit weight sharing, ``bench/bench_share.py
--file-only``, fastest of 3 on one core of a shared 2-core machine): at 50% global pruning the
file is 62 MB (dense safetensors 553 MB; the paper's weight-shared formula 47 MB, which ignores
the positions of the non-zeros) and within 1.1% of the entropy bound; it is written in 1.1 s
and read back, architecture rebuilt, in 1.2 s: 0.13x and 0.24x the time of the first version
of this codec (e46de29, frozen in ``bench/frozen``), which wrote the same bytes.

Used by chapter 02 (weight sharing) and 04.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Union

import numpy as np
import torch
from torch import nn

from rclib.compress import container, share
from rclib.compress.codebook import distinct
from rclib.compress.huffdecode import decode_stream
from rclib.compress.huffman import Corrupt, Payload, counts_of, encode_stream, entropy_bits, field_int, segment
from rclib.nn import models, specs
from rclib.nn.masks import effective_state, state_shapes
from rclib.nn.models import prunable_layers

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


# ---- tensor encodings ----------------------------------------------------------------------

def _gap_alphabet(nnz: int, numel: int) -> int:
    # about 8x the mean gap, so an escape (a raw overflow gap) is rare (~e^-8 for random masks);
    # but the Huffman table costs a byte per symbol, so for a very sparse layer (few non-zeros,
    # huge gaps) the alphabet is capped near nnz: escaping every gap then costs less than the table
    mean_gap = numel / max(nnz, 1)
    wanted = 2 ** math.ceil(math.log2(8 * mean_gap))
    cap = 2 ** math.ceil(math.log2(max(nnz, 2)))
    return int(min(2**16, max(256, min(wanted, cap))))


def _plan_weight(w: np.ndarray) -> dict[str, Any]:
    """Decide a prunable layer weight's encoding and compute its symbol streams and their counts.

    The positions are walked a chunk at a time: on VGG16 whole-layer int64 positions and
    gaps were 400 MB temporaries each.
    """
    flat = w.reshape(-1)
    # counted on bool masks, a chunk at a time: twice as fast as count_nonzero of the floats
    nnz = sum(int(np.count_nonzero(flat[s:s + _STEP] != 0)) for s in range(0, flat.size, _STEP))
    ga = _gap_alphabet(nnz, flat.size)
    gsym = np.empty(nnz, dtype=np.uint8 if ga <= 256 else np.uint16)
    values = np.empty(nnz, dtype=flat.dtype)
    overflow, last, i = [], -1, 0
    for s in range(0, flat.size, _STEP):
        c = flat[s:s + _STEP]
        pos = np.flatnonzero(c != 0)  # of a bool mask: branch-free, 12x faster than of the floats
        if not pos.size:
            continue
        c.take(pos, out=values[i:i + pos.size], mode="clip")  # "raise" would buffer the output
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
    plan = dict(nnz=nnz, gap_alphabet=ga, gaps=gsym, gap_counts=counts_of(gsym, ga), overflow=overflow,
                encoding="sparse", values=values)
    found = distinct(values) if values.size else None
    if found is not None:
        uniq, codes = found
        code_counts = counts_of(codes, uniq.size)
        shared_cost = uniq.size * 5 + entropy_bits(code_counts) / 8
        if shared_cost < 4 * values.size:  # a codebook must pay for itself
            plan.update(encoding="shared", codebook=uniq.astype(np.float32), codes=codes, code_counts=code_counts)
            del plan["values"]
    return plan


def plan(model: nn.Module, bits: Bits = None) -> list[dict[str, Any]]:
    """Per entry of the effective state: its encoding and symbol streams (weight-shared while
    planning when ``bits`` is given), before any bit is written; ``encode`` writes them and
    ``sizes`` measures them. Used by chapter 02 and 04."""

    container.check_host()
    layers = dict(prunable_layers(model))
    if bits is not None:
        share.validate_bits(bits, list(layers))
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
                w = share.share_tensor(w, share.layer_bits(bits, layer, layers[layer])).dense()
            entry.update(_plan_weight(w))
        else:
            entry.update(encoding="raw", tensor=t, parameter=name in params)
        entries.append(entry)
    return entries


def _file_parts(model: nn.Module, bits: Bits = None, entries: list[dict[str, Any]] | None = None) -> list:
    """The compressed file of ``model`` as a list of buffers (``container.assemble``)."""

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
            rec["data"] = out.add(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        else:
            rec.update(nnz=e["nnz"], gap_alphabet=e["gap_alphabet"],
                       gaps=encode_stream(e["gaps"], e["gap_alphabet"], out, e["gap_counts"]),
                       overflow=out.add(e["overflow"]),  # little-endian host (checked)
                       overflow_dtype=e["overflow"].dtype.str)
            if e["encoding"] == "shared":
                rec["codebook"] = out.add(np.asarray(e["codebook"], "<f4"))
                rec["codes"] = encode_stream(e["codes"], e["codebook"].size, out, e["code_counts"])
            else:
                rec["values"] = out.add(np.asarray(e["values"], "<f4"))
        tensors.append(rec)
    return container.assemble(dict(spec=spec, tensors=tensors), out.parts)


def encode(model: nn.Module, bits: Bits = None, entries: list[dict[str, Any]] | None = None) -> bytes:
    """The bytes of the compressed file of ``model`` (``entries`` from :func:`plan` if already
    planned). Used by chapter 02 and 04, through ``save_compressed`` and ``sizes.size_report``."""
    return b"".join(_file_parts(model, bits, entries))


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
    return container.write_atomic(path, _file_parts(model, bits))


def _scatter(w: np.ndarray, gsym: np.ndarray, ga: int, over: np.ndarray,
             values: Any) -> None:
    """Put the non-zeros into the zeroed flat ``w``: positions are running sums of the gaps
    (symbol + 1, or an overflow gap where the symbol is ``ga - 1``); ``values(s, e)`` gives
    the values of non-zeros s to e. A chunk at a time: no 400 MB int64 temporaries on VGG16."""
    last, used = -1, 0  # position of the previous non-zero; overflow gaps consumed
    one_up = np.arange(1, min(gsym.size, _STEP) + 1)
    for s in range(0, gsym.size, _STEP):
        g = gsym[s:s + _STEP]
        pos = np.cumsum(g, dtype=np.int64)
        pos += one_up[: g.size]  # gap = symbol + 1 ...
        pos += last
        esc = np.flatnonzero(g == ga - 1)
        if esc.size:  # ... or, for the escape symbol, the next overflow gap
            if used + esc.size > over.size:
                raise Corrupt("escape count does not match the overflow gaps")
            jump = np.zeros(g.size, np.int64)
            jump[esc] = over[used:used + esc.size].astype(np.int64) - ga
            pos += np.cumsum(jump)
            used += esc.size
        if pos[-1] >= w.size:  # gaps are >= 1, so positions only grow: the last is the largest
            raise Corrupt("non-zero positions outside the tensor")
        w[pos] = values(s, s + g.size)
        last = int(pos[-1])
    if used != over.size:
        raise Corrupt("escape count does not match the overflow gaps")


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
        values = lambda s, e: np.take(book, codes[s:e])  # noqa: E731
    else:
        raw = np.frombuffer(segment(payload, rec["values"]), dtype="<f4")
        if raw.size != nnz:
            raise Corrupt("value count does not match nnz")
        values = lambda s, e: raw[s:e]  # noqa: E731
    w = np.zeros(numel, dtype=np.float32)
    _scatter(w, gsym, ga, over, values)
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
    container.check_host()
    header, payload = container.read(path)
    records = header["tensors"]
    for rec in records:
        if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("shape"), list)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rec["shape"])
                and isinstance(rec.get("dtype"), str) and rec["dtype"] in _DTYPES):
            raise ValueError(f"{path}: file is corrupt (bad tensor record)")
    names = [rec["name"] for rec in records]
    twice = sorted({n for i, n in enumerate(names) if n in names[:i]}) if len(set(names)) != len(names) else []
    if twice:
        raise ValueError(f"{path}: file is corrupt (tensor records listed twice: {twice[:5]})")
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
        model = models.materialise(model, header["spec"])
    try:
        state = {rec["name"]: _decode_tensor(rec, payload) for rec in records}
    except Corrupt as err:
        raise ValueError(f"{path}: file is corrupt ({err})") from None
    except (KeyError, TypeError, IndexError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: file is corrupt ({type(err).__name__}: {err})") from None
    _fill(model, state, adopt=rebuilt)
    return model.eval() if rebuilt else model


def _skeleton(path: str | os.PathLike, spec: Any) -> nn.Module:
    """``models.skeleton(spec)``, its refusals naming the file."""
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the file records no rclib architecture; pass model= to fill")
    try:
        return models.skeleton(spec)
    except specs.BadSpec as err:
        raise ValueError(f"{path}: file is corrupt ({err})") from None
    except ValueError as err:
        raise ValueError(f"{path}: cannot rebuild the recorded architecture ({err})") from None


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
