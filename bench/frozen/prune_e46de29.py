# Frozen copy of rclib/prune.py at commit e46de29 (before issue 15): the "today" column of the
# benchmarks in bench/, timed beside the current code in one run. Not part of rclib; do not edit.
"""Pruning (paper Sec. 1.1, 2.1; Algorithms 1-5).

Every pruning function works on L_prune(h) = ``models.prunable_layers(model)`` unless given an
explicit list of layer names, and stores its result as a ``torch.nn.utils.prune`` mask
(``weight_orig`` * ``weight_mask``), so PyTorch's own tools, ``prune.remove`` and
:func:`make_permanent` keep working and retraining can keep pruned weights at zero
(``train.fit`` zeroes their gradients).

A prune **rate is absolute**: after ``global_unstructured(model, 0.7)`` 70% of the prunable
weights are zero, however many were zero before. (``torch.nn.utils.prune`` instead prunes
``amount`` of the weights that are *still* unpruned.) On an unpruned model both agree, and the
masks of Algorithm 1 equal torch's ``global_unstructured(..., L1Unstructured, amount=rate)``;
the tests check it. Absolute rates make Algorithm 5's schedule (0.1, 0.2, ..., r) read as it
is written.

Why not call ``torch.nn.utils.prune.global_unstructured`` directly: it finds the threshold with
a full ``topk`` over all weights, which takes ~30 s on VGG16's 138M weights on these CPUs;
``np.partition`` finds the same threshold in a fraction of a second (``bench/bench_prune.py``).

Used by chapter 01 (pruning) and, through ``pipeline``, chapters 02-04.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from rclib.nn import masks, models

METHODS = ("global", "layer", "channel")
"""One-shot methods :func:`prune` dispatches to (Alg 1, 2, 3)."""


def _check_rate(rate: float, name: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise ValueError(f"{name}={rate!r} is not allowed: a prune rate strictly between 0 and 1")
    return float(rate)


def _targets(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to prune: L_prune(h), or the named Conv2d/Linear layers."""
    if layers is None:
        found = models.prunable_layers(model)
    else:
        named = dict(model.named_modules())
        unknown = [n for n in layers if not isinstance(named.get(n), (nn.Conv2d, nn.Linear))]
        if unknown:
            allowed = ", ".join(n for n, m in named.items() if isinstance(m, (nn.Conv2d, nn.Linear)))
            raise ValueError(f"layers={unknown!r} are not Conv2d/Linear layers of the model; "
                             f"allowed: {allowed}")
        found = [(n, named[n]) for n in layers]
    if not found:
        raise ValueError("layers: L_prune(h) is empty; the model has no Conv2d or Linear layer to prune")
    return found


def _scores(module: nn.Module) -> torch.Tensor:
    """|w| of the weights as the model computes with them (already pruned entries are 0)."""
    return masks.effective(module).abs()


def _keep_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask that drops exactly the ``k`` smallest of the flat ``scores``.

    ``np.partition`` finds the k-th smallest value in linear time; entries tied with it are
    kept from the end, in index order, until exactly ``k`` are dropped.
    """
    n = scores.size
    if k <= 0:
        return np.ones(n, dtype=bool)
    if k >= n:
        return np.zeros(n, dtype=bool)
    threshold = np.partition(scores, k - 1)[k - 1]
    keep = scores > threshold
    surplus = int(n - keep.sum()) - k
    if surplus > 0:
        ties = np.flatnonzero(scores == threshold)
        keep[ties[-surplus:]] = True
    return keep


def _apply_mask(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    """Store ``keep`` as the mask of ``module.<name>`` (combined with an existing mask)."""
    param = getattr(module, name)
    torch_prune.custom_from_mask(module, name, keep.to(device=param.device, dtype=param.dtype))


def global_unstructured(model: nn.Module, rate: float, layers: Sequence[str] | None = None) -> nn.Module:
    """Algorithm 1, A_Global: zero the ``rate`` fraction of smallest-magnitude weights, ranked
    across all prunable layers together.

    Exactly ``round(rate * N)`` weights are zero afterwards (N = weights in the layers), the
    same count and, on an unpruned model, the same masks as
    ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured, amount=rate)``.
    Biases are not pruned (the paper prunes weights).

    Args:
        model: any network; modified in place (masks added).
        rate: r in (0, 1), the fraction of weights to zero (absolute, see module docstring).
        layers: qualified names of the Conv2d/Linear layers to prune; default L_prune(h).

    Returns:
        ``model`` (for chaining).

    Example:
        >>> global_unstructured(model, 0.5)
        >>> sparsity(model)["zeros"].sum() == round(0.5 * sparsity(model)["weights"].sum())
        True

    Used by chapters 01-04 (global pruning at 50% is the paper's Table 1 setting).
    """
    rate = _check_rate(rate)
    targets = _targets(model, layers)
    scores = [_scores(m).cpu().numpy().ravel() for _, m in targets]
    flat = np.concatenate(scores)
    keep = _keep_mask(flat, round(rate * flat.size))
    start = 0
    for (_, m), s in zip(targets, scores):
        _apply_mask(m, "weight", torch.from_numpy(keep[start:start + s.size]).view_as(m.weight))
        start += s.size
    return model


def layer_unstructured(model: nn.Module, rate: float, layers: Sequence[str] | None = None) -> nn.Module:
    """Algorithm 2, A_Layer: in each prunable layer, zero its own ``rate`` fraction of
    smallest-magnitude weights (``round(rate * n_l)`` of the layer's ``n_l``), so sparsity is
    even across layers.

    Args:
        model: modified in place; rate: r in (0, 1); layers: default L_prune(h).

    Returns:
        ``model``. Per layer the masks equal ``torch.nn.utils.prune.l1_unstructured(layer,
        "weight", amount=rate)`` on an unpruned model.

    Used by chapter 01.
    """
    rate = _check_rate(rate)
    for _, m in _targets(model, layers):
        s = _scores(m).cpu().numpy().ravel()
        keep = _keep_mask(s, round(rate * s.size))
        _apply_mask(m, "weight", torch.from_numpy(keep).view_as(m.weight))
    return model


def _following_batchnorm(model: nn.Module) -> dict[nn.Module, nn.Module]:
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


def channel_structured(model: nn.Module, rate: float, layers: Sequence[str] | None = None) -> nn.Module:
    """Algorithm 3, A_Channel: in each prunable layer zero the ``rate`` fraction of output
    channels with the smallest L1 norm |g| = sum |w_g| (conv filters, linear rows).

    The whole channel goes: its weights, its bias and the scale and shift of the BatchNorm that
    follows it, so the channel's output is exactly 0 in train and eval mode and
    :func:`harden` can remove it without changing the model's function. (Masking only the
    weights, as ``torch.nn.utils.prune.ln_structured`` does, leaves ``relu(bias)`` firing.)

    The last prunable layer is never pruned: its outputs are the classes. At least one channel
    per layer survives (``round(rate * C)`` is capped at ``C - 1``).

    Args:
        model: modified in place; rate: r in (0, 1); layers: default L_prune(h).

    Returns:
        ``model``.

    Used by chapter 01 (and by :func:`iterative`).
    """
    rate = _check_rate(rate)
    targets = _targets(model, layers)
    output_layer = models.prunable_layers(model)[-1][1]
    bn_of = _following_batchnorm(model)
    for _, m in targets:
        if m is output_layer:
            continue
        norms = _scores(m).flatten(1).sum(1).cpu().numpy()
        n_channels = norms.size
        keep = torch.from_numpy(_keep_mask(norms, min(round(rate * n_channels), n_channels - 1)))
        shape = (-1,) + (1,) * (m.weight.dim() - 1)
        _apply_mask(m, "weight", keep.view(shape).expand_as(m.weight).clone())
        if m.bias is not None:
            _apply_mask(m, "bias", keep)
        if m in bn_of:
            for name in ("weight", "bias"):
                _apply_mask(bn_of[m], name, keep)
    return model


def prune(model: nn.Module, method: str, rate: float, layers: Sequence[str] | None = None) -> nn.Module:
    """Apply one of the one-shot methods by name: ``global`` (Alg 1), ``layer`` (Alg 2) or
    ``channel`` (Alg 3), in place. Used by ``pipeline`` and chapters 01-04."""
    funcs = {"global": global_unstructured, "layer": layer_unstructured, "channel": channel_structured}
    if method not in funcs:
        raise ValueError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    return funcs[method](model, rate, layers)


def _alive(m: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """Output channels of ``m`` whose output is not identically zero, as a bool vector.

    A channel is dead when its weights and bias are zero (it emits 0) and the BatchNorm after
    it maps 0 to 0 in both modes: shift 0, and scale 0 or running mean 0. At least one channel
    is kept so that no layer becomes empty.
    """
    with torch.no_grad():
        alive = masks.effective(m).flatten(1).ne(0).any(1)
        if m.bias is not None:
            alive |= masks.effective(m, "bias").ne(0)
        if bn is not None and bn.affine:
            scale, shift = masks.effective(bn), masks.effective(bn, "bias")
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
    bn_of = _following_batchnorm(model)
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
                w = masks.effective(m)
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
                    state[f"{key}.bias"] = masks.effective(m, "bias")[out_keep].clone()
                if isinstance(m, nn.Conv2d):
                    entries[part][i] = ["conv", w.shape[1], w.shape[0], m.kernel_size[0], m.stride[0], m.padding[0]]
                    convs_out = m.out_channels
                else:
                    entries[part][i] = ["linear", w.shape[1], w.shape[0]]
                prev_keep = out_keep
            elif isinstance(m, nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, name, None) is not None:
                        state[f"{key}.{name}"] = masks.effective(m, name)[prev_keep].clone()
                if m.num_batches_tracked is not None:
                    state[f"{key}.num_batches_tracked"] = m.num_batches_tracked.clone()
                entries[part][i] = ["bn", len(prev_keep)]
    hardened = models.from_spec(spec)
    hardened.load_state_dict(state)
    device = next(model.parameters()).device
    return hardened.to(device).train(model.training)


def schedule(rate: float, step: float, extra: Sequence[float] = ()) -> list[float]:
    """Algorithm 5's prune rates: step, 2 step, ... below ``rate``, then ``rate`` itself, with
    any ``extra`` rates below ``rate`` merged in (a sweep measures them on one trajectory).

    The paper's loop (``for i = r_inc; i < r; i += r_inc``) never reaches r; we end on r so
    that the result has the rate asked for.
    """
    rate, step = _check_rate(rate), _check_rate(step, "step")
    n = int(np.floor(rate / step + 1e-9))
    rates = {round(step * i, 10) for i in range(1, n + 1) if step * i < rate - 1e-9}
    rates |= {_check_rate(r, "extra") for r in extra if r < rate}
    return sorted(rates) + [rate]


def iterative(model: nn.Module, rate: float, step: float, retrain: Callable[[nn.Module], object],
              method: str = "channel", on_step: Callable[[nn.Module, float], None] | None = None,
              layers: Sequence[str] | None = None, extra: Sequence[float] = ()) -> nn.Module:
    """Algorithm 5, A_Iterative: prune to ``step``, retrain, prune to ``2 step``, retrain, ...
    up to ``rate``; then harden when the method is structural.

    Retraining keeps the masks, so weights pruned at one step stay exactly zero at every later
    step (``train.fit`` zeroes their gradients; the mask re-applies on every forward pass).

    Args:
        model: modified in place (masks added, weights retrained).
        rate: the final prune rate r in (0, 1).
        step: r_inc in (0, 1), the increment of each pruning step.
        retrain: ``retrain(model)`` trains the masked model in place (e.g. one epoch of
            ``train.fit``); called after every pruning step, including the last.
        method: the one-shot method applied at each step; default ``"channel"`` as in the paper.
        on_step: optional ``on_step(model, rate_so_far)`` after each retraining, e.g. to measure
            every rate of a sweep on one trajectory.
        layers: default L_prune(h).
        extra: further rates to stop at (see :func:`schedule`).

    Returns:
        ``harden(model)`` (a new, smaller model) for ``method="channel"``, else ``model``.

    Used by chapter 01.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    for r in schedule(rate, step, extra):
        prune(model, method, r, layers)
        retrain(model)
        if on_step is not None:
            on_step(model, r)
    return harden(model) if method == "channel" else model


def sparsity(model: nn.Module, layers: Sequence[str] | None = None):
    """Per-layer sparsity table of the prunable layers (Figure 2).

    Returns:
        A ``pandas.DataFrame`` with columns ``layer`` (qualified name), ``type`` (Conv2d |
        Linear), ``weights`` (count), ``zeros`` (weights that are exactly 0, masked or not)
        and ``sparsity`` (zeros / weights).

    Used by chapter 01.
    """
    import pandas as pd

    rows = []
    for name, m in _targets(model, layers):
        w = masks.effective(m)
        zeros = int(w.numel() - torch.count_nonzero(w))
        rows.append(dict(layer=name, type=type(m).__name__, weights=w.numel(), zeros=zeros,
                         sparsity=zeros / w.numel()))
    return pd.DataFrame(rows)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its parameter (``torch.nn.utils.prune.remove``), in place.

    Afterwards the zeros are plain zeros in ``weight``/``bias`` and the state dict has the
    usual keys; retraining may then revive them. Returns ``model``. Used by chapters 01-02.
    """
    for m in model.modules():
        for name in [n[: -len("_mask")] for n, _ in m.named_buffers(recurse=False) if n.endswith("_mask")]:
            torch_prune.remove(m, name)
    return model


def is_pruned(model: nn.Module) -> bool:
    """Whether any module carries a pruning mask."""
    return any(n.endswith("_mask") for n, _ in model.named_buffers())


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


def clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works for a pruned model that has been trained.

    ``torch.nn.utils.prune`` stores the masked weight as a plain attribute computed in the last
    forward pass; after a pass with gradients that tensor is not a graph leaf and deepcopy
    refuses it. Recomputing it without gradients first (exactly what the next forward pass does)
    makes the copy possible. Used by ``pipeline`` and chapters 01-04.
    """
    with torch.no_grad():
        for m in model.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    setattr(m, hook._tensor_name, hook.apply_mask(m))
        return copy.deepcopy(model)
