"""What a cached result must be before it is served: its metrics by meaning, its tensors by dtype,
shape and finiteness.

A checksum only says a file is the one that was written; an edited ``metrics.json`` with a
recomputed checksum passes it. So :mod:`rclib.core.artifacts` also judges what it reads:

* :func:`check_metrics` walks ``metrics.json`` and applies the schema every step's metrics share
  (:data:`RULES`): an accuracy is a number in [0, 1]; counts, sizes and times are finite numbers
  >= 0, counts whole; a ``correct`` count is at most its sibling ``n``; a ``loss`` is finite.
  A string, a bool, NaN or an infinity where a number belongs is refused, so a damaged value is
  recomputed instead of failing in a late cell or reaching the book as ``inf ± inf``.
* :func:`check_tensors`: every floating-point tensor is finite (NaN weights are never served).
* :func:`check_state`: the tensors are exactly the reference model's state: names, shapes AND
  dtypes (int8 or bool weights of the right shape would otherwise load by silent conversion).
* :func:`key_differences`: what an entry's recorded key material says that differs from what
  the reader asks for (settings, source, inputs, compute kind).

Each raises ``TypeError`` or ``ValueError`` (both in ``artifacts.CHECK_ERRORS``) with a one-line
reason; the caller warns and recomputes. Used by ``artifacts.load`` and ``artifacts.cached``
(every chapter's cached steps), ``steps.baseline`` and ``retrain.state_check``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

# (pattern on the key, what the value must be): the first matching rule applies
RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(^|_)accuracy$"), "accuracy"),
    (re.compile(r"^(n|correct|nonzero|parameters|epoch|world_size|batch_per_process)$"), "count"),
    (re.compile(r"_bytes$|_mib$|(^|_)seconds$"), "size"),  # the paper's size formula gives fractions
    (re.compile(r"(^|_)loss$"), "finite"),
)
MAX_DEPTH = 64  # metrics nest a few levels; deeper is damage, and recursion must stay bounded
WHAT = {"accuracy": "an accuracy in [0, 1]", "count": "a whole number >= 0",
        "size": "a finite number >= 0", "finite": "a finite number"}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _judge(where: str, kind: str, v: Any) -> None:
    ok = _number(v) and math.isfinite(v)
    if ok and kind == "accuracy":
        ok = 0.0 <= v <= 1.0
    elif ok and kind == "count":
        ok = v >= 0 and float(v).is_integer()
    elif ok and kind == "size":
        ok = v >= 0
    if not ok:
        raise ValueError(f"{where}={_short(v)} is not {WHAT[kind]}")


def _rule(key: str) -> str | None:
    return next((kind for pattern, kind in RULES if pattern.search(key)), None)


def check_metrics(metrics: Any, where: str = "metrics", depth: int = 0) -> None:
    """Raise ``ValueError`` naming the first value of ``metrics`` that breaks :data:`RULES`, or
    any float that is not finite (JSON lets ``NaN`` and ``Infinity`` through)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where} nests more than {MAX_DEPTH} levels")
    if isinstance(metrics, Mapping):
        for k, v in metrics.items():
            here = f"{where}[{k!r}]"
            kind = _rule(str(k))
            if kind is not None and not isinstance(v, (Mapping, list)):
                _judge(here, kind, v)
            elif kind is not None and isinstance(v, list):  # e.g. an accuracy per epsilon
                for i, x in enumerate(v):
                    _judge(f"{here}[{i}]", kind, x) if not isinstance(x, (Mapping, list)) else \
                        check_metrics(x, f"{here}[{i}]", depth + 1)
            else:
                check_metrics(v, here, depth + 1)
        n, correct = metrics.get("n"), metrics.get("correct")
        if _number(n) and _number(correct) and correct > n:
            raise ValueError(f"{where}: correct={correct} is more than n={n}")
    elif isinstance(metrics, list):
        for i, v in enumerate(metrics):
            check_metrics(v, f"{where}[{i}]", depth + 1)
    elif isinstance(metrics, float) and not math.isfinite(metrics):
        raise ValueError(f"{where}={metrics!r} is not a finite number")


def check_tensors(tensors: Mapping[str, torch.Tensor] | None) -> None:
    """Raise ``ValueError`` naming the first floating-point tensor holding NaN or an infinity."""
    for name, t in (tensors or {}).items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")


def check_state(tensors: Mapping[str, torch.Tensor] | None, reference: Mapping[str, torch.Tensor],
                what: str = "the model") -> None:
    """Raise unless ``tensors`` has exactly ``reference``'s names (``RuntimeError``, as
    ``load_state_dict`` would), and each tensor its shape and dtype (``TypeError``: an int8 or
    bool tensor would load by silent conversion). ``reference``: a model's ``state_dict()``."""
    if tensors is None:
        raise RuntimeError(f"no tensors where {what}'s state belongs")
    missing, extra = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
    if missing or extra:
        raise RuntimeError(f"tensors do not fit {what}: missing {missing[:3]}, not in it {extra[:3]}")
    for name, ref in reference.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise TypeError(f"tensor {name!r} is {tuple(t.shape)} {t.dtype}; {what} holds "
                            f"{tuple(ref.shape)} {ref.dtype}")


def key_differences(found: Any, expect: dict[str, Any]) -> str:
    """Which parts of a recorded key (an artifact manifest's ``info``) differ from the expected
    one, briefly (at most three, "" when none); used by ``artifacts`` to refuse an entry copied
    or linked under another key."""
    if not isinstance(found, dict):
        return f"no key record ({type(found).__name__})"
    diff = []
    for k, want in expect.items():
        got = found.get(k)
        if k == "config" and isinstance(got, dict) and isinstance(want, dict):
            diff += [f"{n}: {str(got.get(n, 'absent'))[:40]}, asked {str(w)[:40]}" for n, w in want.items()
                     if got.get(n, "absent") != w]
            diff += [f"{n}: not asked" for n in got if n not in want]
        elif got != want:
            diff.append(f"{k}: differs" if k in ("source", "content") else f"{k}: {str(got)[:40]}, asked {str(want)[:40]}")
    return "; ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")
