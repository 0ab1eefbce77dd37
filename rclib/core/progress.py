"""Progress bars (tqdm.auto) that a whole run can switch off.

A loop shows a bar when its caller asks (``progress=True``) unless ``TQDM_DISABLE`` is set in the
environment. The book's runner sets it for every chapter kernel: inside a kernel a bar becomes an
ipywidgets output, which the static book can only show as debris ("seeds: 0%|") or nothing, and
the runner reports each cell's progress itself. tqdm reads ``TQDM_DISABLE`` only for calls that
leave ``disable`` unset; rclib's loops set it from ``progress``, so the switch is applied here.

Used by every long loop of rclib (training, sweeps, attacks, the seeds of a chapter).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm.auto import tqdm


def switched_off() -> bool:
    """Whether the environment switches every bar off (``TQDM_DISABLE`` set and not ``0``/empty)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, disabled when ``show`` is False or the
    environment switches bars off (:func:`switched_off`)."""
    return tqdm(iterable, disable=not show or switched_off(), **kwargs)
