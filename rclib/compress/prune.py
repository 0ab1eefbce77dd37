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
a full ``topk`` over all weights and builds its masks in several full-size passes, 20-40 s
on VGG16's 138M weights on these CPUs; ours (a sampled bracket, then ``np.partition`` of the
few scores inside it, and masks and masked weights written in one chunked pass) gives the same
masks 13-24x faster (0.6 s on a quiet machine), and 2.4-4x faster than rclib's previous
``np.partition`` of all scores (``bench/bench_prune.py`` times all three in one run).

Hardening (Alg 4) is :mod:`rclib.compress.harden`, iterative pruning (Alg 5)
:mod:`rclib.compress.iterative`.

Used by chapter 01 (pruning) and, through ``experiments``, chapters 02-04.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from rclib.compress.harden import following_batchnorm
from rclib.nn import models
from rclib.nn.masks import effective, effective_nonzero

METHODS = ("global", "layer", "channel")
"""One-shot methods :func:`prune` dispatches to (Alg 1, 2, 3)."""


def check_rate(rate: float, name: str = "rate") -> float:
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
    return effective(module).abs()


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
    mask = keep.to(device=param.device, dtype=param.dtype)
    if _pruning_hook(module, name) is None:
        _attach_mask(module, name, mask)
    else:
        # Already pruned: the new mask is the product of both, which is what torch's
        # PruningContainer computes too. It is combined in place because the container keeps
        # every step's mask alive: ten global prunings of VGG16 peaked at 9.8 GB that way, 4.4 GB
        # this way.
        old = getattr(module, name + "_mask")
        old.mul_(mask)
        setattr(module, name, getattr(module, name + "_orig") * old)


def _pruning_hook(module: nn.Module, name: str) -> torch_prune.BasePruningMethod | None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == name:
            return hook
    return None


def _attach_mask(module: nn.Module, name: str, mask: torch.Tensor, masked: torch.Tensor | None = None) -> None:
    """``torch_prune.custom_from_mask`` on a tensor that is not pruned yet, with the same result
    (``<name>_orig``, ``<name>_mask``, ``<name> = mask * orig`` and a ``CustomFromMask`` hook).

    Why not call it: it first builds ``ones_like(orig)`` and multiplies it with the mask, two
    extra passes over every weight (1.1 GB of writes on VGG16) for a mask we already have.
    ``masked``: ``mask * orig`` when the caller has it already (computed while the data was in
    cache); the forward pre-hook recomputes it at every forward pass anyway.
    """
    method = torch_prune.CustomFromMask(mask)
    method._tensor_name = name
    orig = getattr(module, name)
    module.register_parameter(name + "_orig", orig)
    del module._parameters[name]
    module.register_buffer(name + "_mask", mask)
    setattr(module, name, method.apply_mask(module) if masked is None else masked)
    module.register_forward_pre_hook(method)


_CHUNK = 1 << 20  # elements per step of the passes below: scratch stays in cache, no big temporaries


def _chunks(w: np.ndarray, reverse: bool = False):
    starts = range(0, w.size, _CHUNK)
    for s in (reversed(starts) if reverse else starts):
        yield s, w[s:s + _CHUNK]


def _global_threshold(flat: list[np.ndarray], k: int, sample: int = 1 << 18) -> tuple[float, int]:
    """``(threshold, surplus)`` such that dropping every |w| < threshold and all but the last
    ``surplus`` ties |w| == threshold drops exactly the ``k`` smallest |w| over all ``flat``
    (1-D) arrays together, 0 < k < N.

    Why not ``np.partition`` of the concatenated scores: on VGG16 (N = 138M) every full-size
    temporary costs a pass plus its page faults. Here the threshold is bracketed by quantiles of
    a random sample (8 standard deviations of the sample rank either side), one chunked pass
    counts the scores below the bracket and collects those inside it (about 2% of N), and
    ``np.partition`` of those alone gives the exact threshold. A bracket that misses (never
    seen) widens to all scores.
    """
    sizes = np.array([w.size for w in flat])
    n = int(sizes.sum())
    lo, hi = -np.inf, np.inf
    if n > 4 * sample:
        idx = np.sort(np.random.default_rng(0).integers(0, n, sample))
        layer = np.searchsorted(np.cumsum(sizes), idx, side="right")
        offset = idx - np.concatenate([[0], np.cumsum(sizes)[:-1]])[layer]
        drawn = np.sort(np.concatenate([np.abs(flat[i][offset[layer == i]]) for i in range(len(flat))]))
        q = k / n
        spread = 8 * np.sqrt(sample * q * (1 - q)) + 8
        i_lo, i_hi = int(q * sample - spread), int(q * sample + spread)
        lo = drawn[i_lo] if i_lo >= 0 else -np.inf
        hi = drawn[i_hi] if i_hi < sample else np.inf
    below, inside = 0, []
    scratch = np.empty(min(_CHUNK, n), dtype=np.result_type(*flat))
    for w in flat:
        for _, c in _chunks(w):
            a = np.abs(c, out=scratch[:c.size])
            below += int(np.count_nonzero(a < lo))
            inside.append(a[(a >= lo) & (a <= hi)])
    inside = np.concatenate(inside)
    if not below < k <= below + inside.size:  # the sample misled us: take every score
        below, inside = 0, np.abs(np.concatenate(flat))
    inside.partition(k - below - 1)
    threshold = inside[k - below - 1]
    return threshold, int(np.count_nonzero(inside[k - below:] == threshold))  # ties beyond the k dropped


def _global_masks(weights: list[np.ndarray], k: int, products: list[np.ndarray] | None = None,
                  zero: bool = False) -> list[np.ndarray]:
    """Keep-masks (in the weights' dtype) dropping exactly the ``k`` smallest |w| over all
    ``weights`` together, 0 < k < N: the same masks as :func:`_keep_mask` on the concatenated
    scores, ties with the threshold kept from the end (threshold: :func:`_global_threshold`).

    One chunked pass writes the float masks torch needs directly and, given a list
    ``products``, appends ``mask * w`` per layer (the masked weight torch would compute). With
    ``zero`` it writes no mask: it zeroes the dropped weights of ``weights`` in place and
    returns ``[]`` (two mask-sized allocations fewer: their page faults are most of the time
    on VGG16).
    """
    flat = [w.reshape(-1) for w in weights]
    threshold, surplus = _global_threshold(flat, k)
    scratch = np.empty(min(_CHUNK, max(w.size for w in flat)), dtype=np.result_type(*weights))
    keep = np.empty(scratch.size, dtype=bool)
    masks, prods = [], []
    for w in reversed(flat):  # surplus ties are kept from the end
        mask = None if zero else np.empty(w.size, dtype=w.dtype)
        prod = np.empty(w.size, dtype=w.dtype) if products is not None else None
        for s, c in _chunks(w, reverse=True):
            a = np.abs(c, out=scratch[:c.size])
            kept = np.greater(a, threshold, out=keep[:c.size])
            if surplus > 0:
                ties = np.flatnonzero(a == threshold)[-surplus:]
                kept[ties] = True
                surplus -= ties.size
            if zero:
                np.multiply(c, kept, out=c)
                continue
            mask[s:s + c.size] = kept
            if prod is not None:
                np.multiply(mask[s:s + c.size], c, out=prod[s:s + c.size])
        masks.append(mask)
        prods.append(prod)
    if zero:
        return []
    if products is not None:
        products.extend(p.reshape(w.shape) for p, w in zip(prods[::-1], weights))
    return [m.reshape(w.shape) for m, w in zip(masks[::-1], weights)]


def global_unstructured(model: nn.Module, rate: float, layers: Sequence[str] | None = None,
                        masks: bool = True) -> nn.Module:
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
        masks: False zeroes the dropped weights in place and attaches no mask (the weights
            :func:`make_permanent` would leave; retraining would revive them). For counting
            only: on VGG16 it takes a quarter of the time (chapter 02's size formula).

    Returns:
        ``model`` (for chaining).

    Example:
        >>> global_unstructured(model, 0.5)
        >>> sparsity(model)["zeros"].sum() == round(0.5 * sparsity(model)["weights"].sum())
        True

    Used by chapters 01-04 (global pruning at 50% is the paper's Table 1 setting).
    """
    rate = check_rate(rate)
    targets = _targets(model, layers)
    if not masks and any(_pruning_hook(m, "weight") is not None or m.weight.device.type != "cpu" for _, m in targets):
        raise ValueError("masks=False is not allowed on a pruned model or one off the CPU: it zeroes the "
                         "weights in place; prune with masks=True")
    weights = [effective(m).cpu().numpy() for _, m in targets]
    n = sum(w.size for w in weights)
    k = round(rate * n)
    if not masks:  # the numpy arrays are views of the parameters: written in place
        if k >= n:
            for w in weights:
                w.fill(0)
        elif k > 0:
            _global_masks(weights, k, zero=True)
        return model
    if k <= 0 or k >= n:  # tiny layers: nothing or everything goes
        for (_, m), w in zip(targets, weights):
            _apply_mask(m, "weight", torch.full(w.shape, k <= 0))
        return model
    products: list[np.ndarray] = []
    masks = _global_masks(weights, k, products=products)
    for (_, m), mask, prod in zip(targets, masks, products):
        if _pruning_hook(m, "weight") is None and m.weight.device.type == "cpu":
            _attach_mask(m, "weight", torch.from_numpy(mask), torch.from_numpy(prod))
        else:
            _apply_mask(m, "weight", torch.from_numpy(mask))
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
    rate = check_rate(rate)
    for _, m in _targets(model, layers):
        w = effective(m).cpu().numpy()
        k = round(rate * w.size)
        keep = _global_masks([w], k)[0] if 0 < k < w.size else np.full(w.shape, k <= 0)
        _apply_mask(m, "weight", torch.from_numpy(keep))
    return model


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
    rate = check_rate(rate)
    targets = _targets(model, layers)
    output_layer = models.prunable_layers(model)[-1][1]
    bn_of = following_batchnorm(model)
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
    ``channel`` (Alg 3), in place. Used by ``experiments`` and chapters 01-04."""
    funcs = {"global": global_unstructured, "layer": layer_unstructured, "channel": channel_structured}
    if method not in funcs:
        raise ValueError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    return funcs[method](model, rate, layers)


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
        n = m.weight.numel()
        zeros = n - effective_nonzero(m)
        rows.append(dict(layer=name, type=type(m).__name__, weights=n, zeros=zeros, sparsity=zeros / n))
    return pd.DataFrame(rows)


