"""Model size (paper Eq 6-7, Sec. 4.1).

``approx_size_mb`` is the paper's formula: number of non-zero parameters times precision. It is
a formula, not a file: the paper could not measure real compressed sizes (its Sec. 4.1).

Used by chapter 00 (baseline size) and the pruning and weight-sharing chapters.
"""

from __future__ import annotations

import torch
from torch import nn

UNITS = {"MB": 1e6, "MiB": 2**20}


def nonzero_parameters(model: nn.Module) -> int:
    """Non-zero entries over all parameters (pruned weights through torch masks count as zero)."""
    total = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            # a pruned weight lives as ``<name>_orig``; its effective value is the masked attribute
            value = getattr(m, name[: -len("_orig")]) if name.endswith("_orig") else p
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
                p = getattr(m, name)
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
