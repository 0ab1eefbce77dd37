"""Where things are: the project root, paths relative to it, and the fingerprint of rclib's
own source that every cache key includes.

The fingerprint makes every cached artifact stale when any rclib module changes (a cache that
cannot see library changes serves stale results), so it covers every ``.py`` file of the
package, subpackages included.

Used by ``core.config`` (``Config.digest``), ``core.artifacts``, ``data`` and the runner.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def project_root() -> Path:
    """The checkout holding rclib when run from source, else the working directory."""
    here = Path(__file__).resolve().parents[2]  # rclib/core/paths.py -> the checkout
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def resolve_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


PACKAGE = Path(__file__).resolve().parents[1]  # rclib/
_FINGERPRINT: str | None = None


def fingerprint_of(package: Path) -> str:
    """sha256 over the relative path and text of every ``.py`` file under ``package``, in every
    subpackage, in a fixed order."""
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def source_fingerprint() -> str:
    """:func:`fingerprint_of` rclib itself, computed once per process (the source does not change
    under a running chapter)."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        _FINGERPRINT = fingerprint_of(PACKAGE)
    return _FINGERPRINT
