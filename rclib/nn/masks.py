"""Masked weights: a pruned layer computes with ``<name>_orig * <name>_mask``
(``torch.nn.utils.prune``). These helpers count, copy, move, fold and export such models as the
model computes with them, whatever compressed it.

Used by ``compress`` (pruning, sizes, the compressed file), ``experiments`` and chapters 01-04.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from rclib.nn import models

_COUNT_CHUNK = 1 << 20  # elements per step of effective_nonzero: the product stays in cache


def count_nonzero(t: torch.Tensor) -> int:
    """``int(torch.count_nonzero(t))``; on CPU through numpy, about 9x faster (0.05 s against
    0.46 s for VGG16's fc6 half pruned, one thread). Used by ``sizes`` and ``share``."""
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:  # numpy has no bfloat16
        return int(np.count_nonzero(t.numpy()))
    return int(torch.count_nonzero(t))


def effective_nonzero(module: nn.Module, name: str = "weight") -> int:
    """``torch.count_nonzero(effective(module, name))`` without building the masked tensor.

    Why: the paper's size formula counts non-zeros of every weight, and on VGG16 the product
    ``orig * mask`` is a 553 MB temporary per call; chunk by chunk it stays in cache (0.9 s to
    0.15 s per call on VGG16). Used by ``sizes``, ``share`` and ``prune.sparsity``.
    """
    mask = getattr(module, f"{name}_mask", None)
    if mask is None:
        return count_nonzero(getattr(module, name).detach())
    orig, mask = getattr(module, f"{name}_orig").detach().reshape(-1), mask.detach().reshape(-1)
    if orig.device.type != "cpu":  # one kernel on a GPU; the chunks are for the CPU's cache
        return count_nonzero(orig * mask)
    return sum(count_nonzero(o * m) for o, m in zip(orig.split(_COUNT_CHUNK), mask.split(_COUNT_CHUNK)))


def effective(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` as the next forward pass will compute with it, detached.

    With ``torch.nn.utils.prune`` the attribute ``module.<name>`` is only refreshed by a forward
    pass; after an optimiser step it is stale. This recomputes ``<name>_orig * <name>_mask``.
    Used by ``prune``, ``share`` and ``sizes``.
    """
    mask = getattr(module, f"{name}_mask", None)
    if mask is None:
        return getattr(module, name).detach()
    return (getattr(module, f"{name}_orig") * mask).detach()


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


def state_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each entry of :func:`effective_state`, without touching any data
    (so it works on a model on the ``meta`` device). Used by chapters 01, 02 and 04."""
    return {key: (tuple(p.shape), p.dtype) for key, _, _, p in _state_entries(model)}


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its parameter (``torch.nn.utils.prune.remove``), in place.

    Afterwards the zeros are plain zeros in ``weight``/``bias`` and the state dict has the
    usual keys; retraining may then revive them. Returns ``model``. Used by chapters 01-02.
    """
    for m in model.modules():
        for name in [n[: -len("_mask")] for n, _ in m.named_buffers(recurse=False) if n.endswith("_mask")]:
            torch_prune.remove(m, name)
    return model


def clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works for a pruned model that has been trained.

    ``torch.nn.utils.prune`` stores the masked weight as a plain attribute computed in the last
    forward pass; after a pass with gradients that tensor is not a graph leaf and deepcopy
    refuses it. Recomputing it without gradients first (exactly what the next forward pass does)
    makes the copy possible. Used by ``experiments`` and chapters 01-04.
    """
    _refresh_masked(model)
    return copy.deepcopy(model)


def move(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model.to(device)`` that also moves the masked weights of a pruned model.

    ``torch.nn.utils.prune`` keeps ``<name> = <name>_orig * <name>_mask`` as a plain attribute,
    which ``Module.to`` leaves where it was until the next forward pass: a pruned model "moved"
    to the host would still hold a weight-sized tensor per layer on the GPU. Used by
    ``steps.over_seeds``.
    """
    model.to(device)
    _refresh_masked(model)
    return model


def _refresh_masked(model: nn.Module) -> None:
    """Recompute every ``<name> = <name>_orig * <name>_mask`` now, without gradients (what the
    next forward pass would do), where the parameters are."""
    with torch.no_grad():
        for m in model.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    setattr(m, hook._tensor_name, hook.apply_mask(m))


def mask_agreement(ours: nn.Module, theirs: nn.Module) -> dict[str, object]:
    """Compare the pruning masks of two copies of one model (e.g. ours and torch's Alg 1).

    Two correct implementations of magnitude pruning agree on every weight except those whose
    magnitude equals the threshold exactly: which of several tied weights goes is arbitrary
    (``torch.topk`` breaks ties in no documented order). So the check is: equal numbers of zeros,
    and every differing entry is such a tie.

    Returns:
        ``{"zeros_ours", "zeros_theirs", "differ", "ties_only", "agree"}``; ``agree`` is True when
        the zero counts match and all differences are ties.

    Used by chapter 01 and ``bench/bench_prune.py``.
    """
    pairs = list(zip(models.prunable_layers(ours), models.prunable_layers(theirs)))
    differ = sum(int((a.weight_mask != b.weight_mask).sum()) for (_, a), (_, b) in pairs)
    zeros_ours = sum(int((a.weight_mask == 0).sum()) for (_, a), _ in pairs)
    zeros_theirs = sum(int((b.weight_mask == 0).sum()) for _, (_, b) in pairs)
    pruned = [a.weight_orig.detach().abs()[~a.weight_mask.bool()] for (_, a), _ in pairs]
    threshold = max((float(p.max()) for p in pruned if p.numel()), default=0.0)
    ties_only = all(bool((a.weight_orig.detach().abs()[a.weight_mask != b.weight_mask] == threshold).all())
                    for (_, a), (_, b) in pairs)
    return dict(zeros_ours=zeros_ours, zeros_theirs=zeros_theirs, differ=differ, ties_only=ties_only,
                agree=zeros_ours == zeros_theirs and ties_only)
