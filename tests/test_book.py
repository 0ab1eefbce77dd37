"""The whole book, as `make book` builds it, under the smoke profile and with warnings as errors."""

from __future__ import annotations

from rclib.core.paths import project_root
from rclib.report.runner import toc_notebooks


def test_book_builds_with_every_chapter(smoke_book):
    html = smoke_book / "_build" / "html"
    assert (html / "index.html").exists()
    intro = (html / "book" / "intro.html").read_text()
    assert "What the paper claims" in intro
    for nb in toc_notebooks(project_root()):
        page = (html / nb.with_suffix(".html")).read_text()
        if nb.parts[0] == "notebooks":  # chapters; the pages under book/ gather tables, not figures
            assert page.count("<img") >= 2, f"{nb} lost its figures"
        else:
            assert "<table" in page and "inconclusive" in page, f"{nb} lost its verdicts"
        # launch buttons must not point at someone else's repository (Jupyter Book's default)
        assert "executablebooks/jupyter-book" not in page
        assert "injected-parameters" not in page
        assert "Traceback (most recent call last)" not in page
