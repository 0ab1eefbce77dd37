"""rclib.core.progress: a run switches every bar off with TQDM_DISABLE (the book's runner does)."""

from __future__ import annotations

import pytest

from rclib.core import progress


@pytest.mark.parametrize("value, off", [("1", True), ("true", True), ("", False), ("0", False), (None, False)])
def test_the_environment_switches_bars_off_even_when_a_caller_asks_for_one(monkeypatch, value, off):
    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    assert progress.switched_off() is off
    assert progress.progress_bar(range(3), show=True).disable is off
    assert progress.progress_bar(range(3), show=False).disable  # a caller's "no" always holds
