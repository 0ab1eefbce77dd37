"""Cached results: ``data/artifacts/<profile>/<step>-<hash>/`` with safetensors + JSON.

* The key hashes the config fields a step depends on AND the rclib source (``Config.digest``),
  so a change of either makes a fresh directory and the stale one is never read.
* Writes are atomic: everything goes into a temporary sibling directory, which is renamed into
  place only when complete, so an interrupted run leaves no half-written artifact.
* ``manifest.json`` records a sha256 per file; on load a missing file or a mismatch means
  "recompute" (with a warning), never a crash, and nothing is ever unpickled.

The root is ``$RCLIB_ARTIFACTS`` when set (tests use a temporary folder), else
``<project>/data/artifacts``. ``make clean`` removes it.

Used by ``pipeline`` (every chapter's cached steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .config import Config, project_root

WEIGHTS = "weights.safetensors"
METRICS = "metrics.json"
MANIFEST = "manifest.json"


def root() -> Path:
    env = os.environ.get("RCLIB_ARTIFACTS")
    return Path(env) if env else project_root() / "data" / "artifacts"


def location(cfg: Config, step: str, names: tuple[str, ...]) -> Path:
    """Where step ``step`` of ``cfg`` lives, keyed by the fields ``names`` it depends on."""
    if not step.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"step={step!r} must be letters, digits, '-' or '_'")
    return root() / cfg.profile / f"{step}-{cfg.digest(names)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: Path, tensors: dict[str, torch.Tensor] | None, metrics: dict[str, Any],
         info: dict[str, Any] | None = None) -> Path:
    """Write tensors (safetensors) and metrics (JSON) to ``path`` atomically; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        files = {}
        if tensors is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            files[WEIGHTS] = _sha256(tmp / WEIGHTS)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1, sort_keys=True))
        files[METRICS] = _sha256(tmp / METRICS)
        (tmp / MANIFEST).write_text(json.dumps({"files": files, "info": info or {}}, indent=1))
        if path.exists():  # a corrupt or stale copy under the same key: replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]] | None:
    """``(tensors, metrics)`` when ``path`` holds a complete, intact artifact, else ``None``."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"checksum mismatch in {path / name}")
        metrics = json.loads((path / METRICS).read_text())
        tensors = load_file(str(path / WEIGHTS)) if WEIGHTS in manifest["files"] else None
    except FileNotFoundError:
        return None
    except Exception as err:  # corrupt JSON, bad checksum, bad safetensors header, ...
        warnings.warn(f"ignoring damaged artifact {path} ({err}); it will be recomputed", stacklevel=2)
        return None
    return tensors, metrics


def cached(cfg: Config, step: str, names: tuple[str, ...],
           compute: Callable[[], tuple[dict[str, torch.Tensor] | None, dict[str, Any]]]
           ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], bool]:
    """Load step ``step`` if a valid artifact exists, else run ``compute()`` and store it.

    Args:
        cfg: the run's config; ``cfg.profile`` is the folder, ``names`` its fields in the key.
        step: a short name ("baseline", "pruned", ...).
        names: the Config fields the result depends on.
        compute: returns ``(tensors or None, metrics)``; metrics must be JSON-serialisable.

    Returns:
        ``(tensors, metrics, hit)``, ``hit`` True when it came from disk.
    """
    path = location(cfg, step, names)
    found = load(path)
    if found is not None:
        return found[0], found[1], True
    tensors, metrics = compute()
    save(path, tensors, metrics, info={"step": step, "config": {n: getattr(cfg, n) for n in names}})
    return tensors, metrics, False
