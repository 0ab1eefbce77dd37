"""Hardening (paper Alg 4): a channel-pruned model rebuilt without its dead channels, a new and
smaller VGG that computes the same function, and the multiply-accumulates it saves.

Masked zeros still cost a multiply in a dense kernel, so only hardening makes channel pruning
faster (chapter 01's Figure 4).

Used by chapter 01 and, through ``compress.iterative`` (Alg 5), chapters 01 and 03.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rclib.nn import models
from rclib.nn.masks import effective


def following_batchnorm(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """conv -> the BatchNorm2d that normalises its output (next in registration order)."""
    pairs: dict[nn.Module, nn.Module] = {}
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            last = m
        elif isinstance(m, nn.BatchNorm2d) and isinstance(last, nn.Conv2d) \
                and m.num_features == last.out_channels:
            pairs[last] = m
            last = None
    return pairs


def _alive(m: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """Output channels of ``m`` whose output is not identically zero, as a bool vector.

    A channel is dead when its weights and bias are zero (it emits 0) and the BatchNorm after
    it maps 0 to 0 in both modes: shift 0, and scale 0 or running mean 0. At least one channel
    is kept so that no layer becomes empty.
    """
    with torch.no_grad():
        alive = effective(m).flatten(1).ne(0).any(1)
        if m.bias is not None:
            alive |= effective(m, "bias").ne(0)
        if bn is not None and bn.affine:
            scale, shift = effective(bn), effective(bn, "bias")
            shifted = scale.ne(0) & bn.running_mean.ne(0) if bn.running_mean is not None else torch.zeros_like(alive)
            alive |= shift.ne(0) | shifted
        if not alive.any():
            alive[0] = True
    return alive


def harden(model: models.VGG) -> models.VGG:
    """Algorithm 4, H(h): graft the surviving channels of a channel-pruned model into a new,
    physically smaller model.

    Each convolution keeps only the output channels whose output is not identically zero (and
    its BatchNorm the matching entries); the next convolution keeps only the matching input
    channels; the first linear layer keeps the matching input columns (``avgpool`` size
    columns per channel); hidden linear layers shrink the same way; the output layer keeps every
    class. The result has plain weights (no masks) and computes the same function as ``model``
    (tested to 1e-5), with fewer parameters and a smaller file.

    Args:
        model: an ``rclib.nn.models.VGG`` (unchanged), usually after :func:`channel_structured`.

    Returns:
        A new ``VGG`` in ``model``'s train/eval mode on its device, whose ``spec`` lists every
        layer (``models.describe``) so it can be rebuilt and saved.

    Used by chapter 01 (Figures 1, 3, 4) and :func:`iterative`.
    """
    if not isinstance(model, models.VGG):
        raise ValueError(f"harden needs an rclib.nn.models.VGG (features/avgpool/classifier), "
                         f"got {type(model).__name__}")
    spec = models.describe(model)
    bn_of = following_batchnorm(model)
    keeps: dict[int, torch.Tensor] = {}  # id(layer) -> kept output channels
    layers = [m for m in list(model.features) + list(model.classifier) if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers[:-1]:
        keeps[id(m)] = torch.nonzero(_alive(m, bn_of.get(m))).flatten()
    keeps[id(layers[-1])] = torch.arange(layers[-1].weight.shape[0])

    # the new layer list, with widths taken from the kept channels
    state = {}
    prev_keep: torch.Tensor | None = None
    entries = {"features": spec["layers"]["features"], "classifier": spec["layers"]["classifier"]}
    convs_out = None
    for part in ("features", "classifier"):
        seq = getattr(model, part)
        for i, m in enumerate(seq):
            key = f"{part}.{i}"
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                out_keep = keeps[id(m)]
                w = effective(m)
                if prev_keep is not None:
                    if isinstance(m, nn.Linear) and convs_out is not None:
                        # flatten(avgpool(x)) is channel-major: each channel owns `per` columns
                        per = m.in_features // convs_out
                        cols = (prev_keep[:, None] * per + torch.arange(per)).flatten()
                        w = w[:, cols]
                        convs_out = None
                    else:
                        w = w[:, prev_keep]
                w = w[out_keep]
                state[f"{key}.weight"] = w.clone()
                if m.bias is not None:
                    state[f"{key}.bias"] = effective(m, "bias")[out_keep].clone()
                if isinstance(m, nn.Conv2d):
                    entries[part][i] = ["conv", w.shape[1], w.shape[0], m.kernel_size[0], m.stride[0], m.padding[0]]
                    convs_out = m.out_channels
                else:
                    entries[part][i] = ["linear", w.shape[1], w.shape[0]]
                prev_keep = out_keep
            elif isinstance(m, nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, name, None) is not None:
                        state[f"{key}.{name}"] = effective(m, name)[prev_keep].clone()
                if m.num_batches_tracked is not None:
                    state[f"{key}.num_batches_tracked"] = m.num_batches_tracked.clone()
                entries[part][i] = ["bn", len(prev_keep)]
    hardened = models.from_spec(spec)
    hardened.load_state_dict(state)
    device = next(model.parameters()).device
    return hardened.to(device).train(model.training)


def flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one example of ``input_shape``
    (C, H, W), counted from the layers' real (dense) shapes.

    Masked zeros still cost a multiply in a dense kernel, so a masked model has the unpruned
    count; only :func:`harden` lowers it. The ratio unpruned/hardened is the speed-up a
    compute-bound run could at best reach (Figure 4). Used by chapter 01 and ``bench/``.
    """
    total = 0

    def count(m: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
        else:
            total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
