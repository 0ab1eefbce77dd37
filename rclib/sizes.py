"""Model size yardsticks (paper Eq 6-7, Table 1, Sec. 4.1): formulas, dense bytes, entropy bound.

``approx_size_mb`` is the paper's formula: number of non-zero parameters times precision. It is
a formula, not a file: the paper could not measure real compressed sizes (its Sec. 4.1, "Future
work should leverage the weight shared model to reduce model persist size using Huffman
encoding"). ``codec.save_compressed`` writes that file, and ``size_report`` puts the numbers side
by side: dense safetensors, the paper's approximate size, the real file, and the Shannon bound
of what the file encodes. ``dense_bytes`` is computed from shapes and dtypes alone (no tensor is
serialised: on VGG16 that was 553 MB per call).

Used by chapter 00 (baseline size) and the pruning, weight-sharing and robust chapters (01-04).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Union

import torch
from torch import nn

from .huffman import entropy_bits
from .models import count_nonzero, effective, effective_nonzero

UNITS = {"MB": 1e6, "MiB": 2**20}
Bits = Union[int, Mapping[str, int], None]

# safetensors' dtype names, and its order of tensors in a file: dtype by this rank descending,
# then name (the Rust crate's ``Dtype`` enum order); offsets and so the header length depend on it
_ST_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
             torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
             torch.float64: "F64", torch.int64: "I64"}
_ST_RANK = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def nonzero_parameters(model: nn.Module) -> int:
    """Non-zero entries over all parameters (pruned weights through torch masks count as zero;
    their values are recomputed as ``orig * mask``, see ``models.effective``).
    Used by chapters 01-04."""
    total = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            # a pruned weight lives as ``<name>_orig``; its effective value is ``orig * mask``
            total += effective_nonzero(m, name[: -len("_orig")]) if name.endswith("_orig") else \
                count_nonzero(p.detach())
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
    pair becomes the single masked tensor ``<name>`` (what ``prune.make_permanent`` would leave).
    Used by chapters 02-04."""
    return {key: (effective(m, name.removesuffix("_orig")) if name.endswith("_orig") else p).detach().cpu().contiguous()
            for key, m, name, p in _state_entries(model)}


def _state_entries(model: nn.Module):
    """``(key, module, name, tensor)`` for every entry of the effective state dict: masks and
    non-persistent buffers left out, a pruned ``<name>_orig`` keyed as ``<name>``."""
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if not (name.endswith("_mask") or name in m._non_persistent_buffers_set):
                yield prefix + name.removesuffix("_orig"), m, name, p


def safetensors_bytes(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Length of the safetensors file (no metadata) holding tensors of these shapes and dtypes.

    The format is an 8-byte header length, a JSON header padded with spaces to a multiple of 8,
    then the raw data. The header lists each tensor's dtype, shape and byte offsets in the
    file's order (see ``_ST_RANK``), so its length follows from shapes and dtypes alone; the
    tests check it against ``safetensors.torch.save``. Used by chapters 01 and 02.
    """
    order = sorted(shapes.items(), key=lambda kv: (-_ST_RANK.index(_ST_NAMES[kv[1][1]]), kv[0]))
    offset, header = 0, 2  # the braces
    for name, (shape, dtype) in order:
        end = offset + math.prod(shape) * dtype.itemsize
        entry = (f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{_ST_NAMES[dtype]}","shape":['
                 f'{",".join(map(str, shape))}],"data_offsets":[{offset},{end}]}}')
        header += len(entry.encode()) + 1  # the comma (one too many: offsets the braces' 2)
        offset = end
    header -= 1 if order else 0
    return 8 + header + (-header) % 8 + offset


def state_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each entry of :func:`effective_state`, without touching any data
    (so it works on a model on the ``meta`` device). Used by chapters 01, 02 and 04."""
    return {key: (tuple(p.shape), p.dtype) for key, _, _, p in _state_entries(model)}


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's effective weights written as safetensors (dense, zeros kept).

    This is what a pruned but not hardened model costs on disk: pruning by masks zeroes
    weights but still stores every one of them. Computed from shapes and dtypes
    (:func:`safetensors_bytes`), nothing is serialised; equal to
    ``len(safetensors.torch.save(effective_state(model)))``.
    Used by chapters 01 and 02.
    """
    shapes = state_shapes(model)
    return safetensors_bytes(shapes)


def entropy_bound_bytes(model: nn.Module, bits: Bits = None) -> float:
    """The Shannon bound of what ``codec.save_compressed`` encodes, in bytes.

    Sum over the entropy-coded streams (gap symbols and codebook indices of each prunable layer)
    of ``count * H`` (zeroth-order empirical entropy of the stream), plus the bytes stored as
    they are (codebooks, overflow gaps, raw float32 values of ``sparse`` layers, raw tensors).
    The header, the Huffman tables and the block offsets are not counted: the difference to the
    real file is the price of Huffman coding (whole bits per symbol) and of the format.

    Args:
        model: as for :func:`codec.save_compressed`.
        bits: as for :func:`codec.save_compressed` (weight sharing while encoding), default ``None``.

    Example:
        >>> entropy_bound_bytes(model) / 1e6  # MB

    Used by chapter 02 (weight sharing) and 04.
    """
    from . import codec

    return _entropy_bound(codec.plan(model, bits))


def _entropy_bound(entries: list[dict[str, Any]]) -> float:
    total_bits = 0.0
    for e in entries:
        if e["encoding"] == "raw":
            total_bits += 8 * e["tensor"].numel() * e["tensor"].element_size()
            continue
        total_bits += entropy_bits(e["gap_counts"])
        total_bits += 8 * e["overflow"].nbytes
        if e["encoding"] == "shared":
            total_bits += entropy_bits(e["code_counts"]) + 32 * e["codebook"].size
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
                total_bits += 32 * count_nonzero(e["tensor"])
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
        the real ``codec.save_compressed`` file; ``entropy_bound_bytes``: the Shannon bound of
        what that file encodes (:func:`entropy_bound_bytes`). Buffers (BatchNorm statistics)
        count in the file and the bound only, as in the paper's formula.

    Args:
        model: as for :func:`codec.save_compressed`.
        bits: as for :func:`codec.save_compressed`: ``None`` (default) measures the model as it is;
            an int or dict measures it weight-shared while writing (``dense_bytes`` and
            ``approx_bytes`` stay those of ``model``).

    Example:
        >>> {k: v / 1e6 for k, v in size_report(model).items()}  # MB

    Used by chapter 02 (weight sharing) and 04.
    """
    from . import codec

    entries = codec.plan(model, bits)
    return dict(dense_bytes=dense_bytes(model), approx_bytes=approx_size_mb(model) * 1e6,
                shared_approx_bytes=_formula_bytes(entries), file_bytes=len(codec.encode(model, bits, entries)),
                entropy_bound_bytes=_entropy_bound(entries))
