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

import numpy as np
import torch
from torch import nn

from rclib.compress import codec
from rclib.compress.huffman import entropy_bits
from rclib.compress.share import DEFAULT_BITS, layer_bits, validate_bits
from rclib.nn.masks import count_nonzero, effective_nonzero, state_shapes
from rclib.nn.models import prunable_layers

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
    entries = codec.plan(model, bits)
    return dict(dense_bytes=dense_bytes(model), approx_bytes=approx_size_mb(model) * 1e6,
                shared_approx_bytes=_formula_bytes(entries), file_bytes=len(codec.encode(model, bits, entries)),
                entropy_bound_bytes=_entropy_bound(entries))


def compression_rate(bits: int, n_weights: int, weight_bits: int = 32) -> float:
    """Eq 6-7: size of a weight-shared layer relative to its dense float storage.

    ``(2^n * weight_data_size + n * number_of_weights) / (number_of_weights * weight_data_size)
    = 2^n / number_of_weights + n / weight_data_size``: a ``2^n``-entry float lookup table plus
    an ``n``-bit index per weight, over ``number_of_weights`` floats. Like the paper, this counts
    neither the positions of the non-zeros (COO) nor any entropy coding; ``codec`` writes a
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

    The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

Used by chapter 02 (weight sharing) and 04.
    """
    validate_bits(bits)
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
    ``sizes.approx_size_mb`` counts them. Positions of the non-zeros are not counted (the
    paper's formula does not); ``codec.save_compressed`` writes a real file that pays for them.

    Args:
        model: the pruned model (weight-shared or not: only its non-zero counts matter).
        bits: as in :func:`weight_share`; default ``{"conv": 8, "linear": 5}``.
        unit: ``"MB"`` (10^6 bytes, default) or ``"MiB"`` (2^20 bytes).

    Example:
        >>> shared_size_mb(model, {"conv": 8, "linear": 5})  # VGG16, random init, 50% global pruning
        47.3...

    The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

Used by chapter 02 (weight sharing) and 04.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not allowed: one of {', '.join(UNITS)}")
    named = prunable_layers(model)
    validate_bits(bits, [n for n, _ in named])
    shared_ids = set()
    total_bits = 0
    for name, module in named:
        b = layer_bits(bits, name, module)
        nnz = effective_nonzero(module)
        total_bits += nnz * b + 2**b * 32
        shared_ids.add(id(module))
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            base = pname[: -len("_orig")] if pname.endswith("_orig") else pname
            if id(m) in shared_ids and base == "weight":
                continue
            nnz = effective_nonzero(m, base) if pname.endswith("_orig") else count_nonzero(p.detach())
            total_bits += nnz * 32
    return total_bits / 8 / UNITS[unit]
