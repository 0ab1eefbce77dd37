"""Is a model spec one that ``models.from_spec`` can build into a working classifier? Judged from
the spec alone, before anything is built.

A compressed file's checksum proves only that its bytes are the ones written; the ``spec`` in its
header carries no tensors to cross-check. Without this, ``std [0.0]`` loads and gives NaN logits,
a ReLU after the last linear layer clamps every logit, and channel counts or pooling sizes that
do not chain load and fail at the first forward pass (one asked for 10 TB). :func:`check`
raises ``ValueError`` naming the field: ``spec.std[0]=0.0 is not allowed: a finite number > 0
(inputs are divided by it)``.

Checked: ``input_shape`` (3 whole numbers, each at most ``MAX_SIDE``), ``mean`` and ``std``
(one finite number per input channel; every std > 0), ``num_classes``, ``dropout``, and either
the formula fields (``model``, ``width``, ``hidden``, ``batch_norm``) or every layer of
``layers``: each convolution takes the channels the previous layer gives, BatchNorm has that
many features, no map shrinks below 1x1, the average pool's output is at most the larger of the
map and 7 per side (VGG's own 7x7), the first linear layer takes exactly what the pool gives,
linear sizes chain, and the last layer is a linear one with ``num_classes`` outputs.

Used by ``codec.load_compressed`` (chapters 02 and 04).
"""

from __future__ import annotations

import math
from typing import Any

from rclib.core.config import MODELS

MAX_SIDE = 16384  # pixels per side, channels of an input, classes: beyond any model here
MAX_WIDTH = 1 << 20  # channels or features of one layer
POOL_SIDE = 7  # VGG's adaptive average pool: 7x7, whatever the map


class BadSpec(ValueError):
    """A spec that cannot make a working model; the message names the field, its value and what is allowed."""


def _bad(field: str, value: Any, allowed: str) -> BadSpec:
    text = repr(value)
    return BadSpec(f"spec.{field}={text if len(text) <= 60 else text[:57] + '...'} is not allowed: {allowed}")


def _whole(field: str, v: Any, low: int = 1, high: int = MAX_WIDTH) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _bad(field, v, f"a whole number from {low} to {high}")
    return v


def _real(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(field, v, "a finite number")
    return float(v)


def _entry(field: str, entry: Any, kind: str, n: int) -> list:
    if not (isinstance(entry, list) and entry and entry[0] == kind and len(entry) == n + 1):
        raise _bad(field, entry, f"a [{kind!r}, ...] entry with {n} value(s)")
    return entry[1:]


def _features(layers: Any, c: int, h: int, w: int) -> tuple[int, int, int]:
    if not isinstance(layers, list) or not layers:
        raise _bad("layers.features", layers, "a non-empty list of layers")
    for i, e in enumerate(layers):
        field = f"layers.features[{i}]"
        kind = e[0] if isinstance(e, list) and e else None
        if kind == "conv":
            c_in, c_out, k, s, p = _entry(field, e, "conv", 5)
            if _whole(f"{field} in_channels", c_in) != c:
                raise _bad(field, e, f"a convolution taking the {c} channels the previous layer gives")
            c = _whole(f"{field} out_channels", c_out)
            k, s, p = _whole(f"{field} kernel", k), _whole(f"{field} stride", s), _whole(f"{field} padding", p, 0)
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        elif kind == "maxpool":
            k, s = _entry(field, e, "maxpool", 2)
            k, s = _whole(f"{field} kernel", k), _whole(f"{field} stride", s)
            h, w = (h - k) // s + 1, (w - k) // s + 1
        elif kind == "bn":
            (n,) = _entry(field, e, "bn", 1)
            if _whole(field, n) != c:
                raise _bad(field, e, f"a BatchNorm of the {c} channels the previous layer gives")
        elif not _relu_or_dropout(field, e, kind):
            raise _bad(field, e, "a conv, bn, relu, maxpool or dropout layer")
        if h < 1 or w < 1:
            raise _bad(field, e, f"a layer that leaves a map of at least 1x1 (it leaves {h}x{w})")
    return c, h, w


def _relu_or_dropout(field: str, e: Any, kind: Any) -> bool:
    """Check a ReLU or dropout entry, which both stacks may hold; False for any other kind."""
    if kind == "relu":
        _entry(field, e, "relu", 0)
    elif kind == "dropout":
        (pr,) = _entry(field, e, "dropout", 1)
        if not 0 <= _real(field, pr) < 1:
            raise _bad(field, e, "a dropout probability in [0, 1)")
    else:
        return False
    return True


def _classifier(layers: Any, n_in: int, num_classes: int) -> None:
    if not isinstance(layers, list) or not layers:
        raise _bad("layers.classifier", layers, "a non-empty list of layers")
    n = n_in
    for i, e in enumerate(layers):
        field = f"layers.classifier[{i}]"
        kind = e[0] if isinstance(e, list) and e else None
        if kind == "linear":
            a, b = _entry(field, e, "linear", 2)
            if _whole(f"{field} in_features", a, 1, MAX_WIDTH * POOL_SIDE ** 2) != n:
                raise _bad(field, e, f"a linear layer taking the {n} features the previous layer gives")
            n = _whole(f"{field} out_features", b)
        elif not _relu_or_dropout(field, e, kind):
            raise _bad(field, e, "a linear, relu or dropout layer")
    if layers[-1][0] != "linear" or n != num_classes:
        raise _bad(f"layers.classifier[{len(layers) - 1}]", layers[-1],
                   f"the last layer must be a linear one with num_classes={num_classes} outputs (the logits)")


def check(spec: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``spec`` that cannot make a working model
    (see the module docstring); return None when it can."""
    if not isinstance(spec, dict):
        raise _bad("", spec, "an object describing the architecture")
    shape = spec.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise _bad("input_shape", shape, "[channels, height, width]")
    c, h, w = (_whole(f"input_shape[{i}]", v, 1, MAX_SIDE) for i, v in enumerate(shape))
    for name in ("mean", "std"):
        values = spec.get(name)
        if not (isinstance(values, list) and len(values) == c):
            raise _bad(name, values, f"a list of {c} numbers, one per input channel")
        for i, v in enumerate(values):
            if not math.isfinite(_real(f"{name}[{i}]", v)) or (name == "std" and v <= 0):
                raise _bad(f"{name}[{i}]", v, "a finite number > 0 (inputs are divided by it)")
    num_classes = _whole("num_classes", spec.get("num_classes"), 1, MAX_SIDE * 64)
    if not 0 <= _real("dropout", spec.get("dropout", 0.0)) < 1:
        raise _bad("dropout", spec.get("dropout"), "a probability in [0, 1)")
    layers = spec.get("layers")
    if layers is None:
        if spec.get("model") not in MODELS:
            raise _bad("model", spec.get("model"), f"one of {', '.join(MODELS)}")
        _whole("width", spec.get("width"))
        _whole("hidden", spec.get("hidden"))
        if not isinstance(spec.get("batch_norm"), bool):
            raise _bad("batch_norm", spec.get("batch_norm"), "true or false")
        return
    if not isinstance(layers, dict) or set(layers) != {"features", "avgpool", "classifier"}:
        raise _bad("layers", layers, "an object with features, avgpool and classifier")
    c, h, w = _features(layers["features"], c, h, w)
    (size,) = _entry("layers.avgpool", layers["avgpool"], "avgpool", 1)
    if not (isinstance(size, list) and len(size) == 2):
        raise _bad("layers.avgpool", layers["avgpool"], "['avgpool', [height, width]]")
    oh = _whole("layers.avgpool height", size[0], 1, max(h, POOL_SIDE))
    ow = _whole("layers.avgpool width", size[1], 1, max(w, POOL_SIDE))
    _classifier(layers["classifier"], c * oh * ow, num_classes)
