"""The book as its readers see it: checks over the rendered HTML of the smoke build.

Each check is a small function from one page's HTML to a list of problems (empty: the page is
fine), unit-tested below on tiny pages, one that must pass and ones that must fail, so each is
shown to catch what it claims. ``test_book_html`` runs them over every page of the smoke book
(``smoke_book``, built once per session by ``conftest.py``):

- ``raw_pipe_tables``: a Markdown pipe table left as text in a paragraph (``| --- |``), as
  myst-nb renders a Markdown *output* (CommonMark, no tables);
- ``raw_roles``: a MyST role left as text (``{glue:text}``, ``{ref}``, ...);
- ``unresolved_references``: a cross-reference Sphinx could not resolve (an ``xref`` without a
  link) or ``??`` in the text;
- ``cdn_scripts``: a script loaded from another host (MathJax, require.js, the widget manager,
  ...), or math on a page that loads no local MathJax/KaTeX: offline, formulas stay raw LaTeX;
- ``uncaptioned_figures`` (chapters): an image in the page's content that is not in a
  ``<figure>`` with a non-empty ``<figcaption>`` (logos excepted);
- ``code_cells``: a plumbing cell (:func:`rclib.report.book.is_plumbing`: glue, claim rows,
  imports, reshaping) whose code is open on the page instead of behind a "Show code cell source"
  toggle, or an algorithm's listing (``book.source``) folded away;
- ``truncated_cells``: a table cell cut short with ``...``, as pandas shortens long text in a
  DataFrame's display (``display.max_colwidth``): a verdict or a setting the reader cannot read;
- ``claim_links`` (the claims page): a row of a claims table (a table with a ``verdict`` column)
  whose first cell has no link to ``notebooks/NN_*.html#anchor``, or whose anchor is not in that
  chapter's page.

On an already built book, without pytest: ``python tests/test_rendered.py _build/html``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from bs4 import BeautifulSoup, NavigableString, Tag  # a dependency of jupyter-book's theme

from rclib.report import book

ROOT = Path(__file__).resolve().parent.parent

# text inside these is shown as code or is not shown at all: a role or a table there is quoted
CODE_TAGS = frozenset({"pre", "code", "kbd", "samp", "script", "style", "template", "noscript"})
# a pipe table's delimiter row: | --- |, |---|, |:--|, and the em/en dash that smart quotes make of ---
PIPE_RULE = re.compile(r"\|\s*:?[-\u2013\u2014]+:?\s*\|")
RAW_ROLE = re.compile(r"\{(?:glue(?::[\w-]+)?|ref|numref|eq|doc|download|term|cite(?::\w+)?|"
                      r"math|abbr|sub|sup|prf:ref|bibliography)\}")
UNRESOLVED_MARK = re.compile(r"(?<!\?)\?\?(?!\?)")
REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # https://, http://, //host
LOCAL_MATH_SCRIPT = re.compile(r"mathjax|katex", re.I)
CHAPTER_LINK = re.compile(r"^(?:\.\./)?notebooks/\d\d_[\w.-]+\.html#(.+)$")


def _soup(html: str) -> BeautifulSoup:
    return BeautifulSoup(html, "html.parser")


def _content(soup: BeautifulSoup) -> Tag:
    """What the reader reads: the theme's article (sphinx-book-theme), else <main>, else the body."""
    return (soup.find("article", class_="bd-article") or soup.find("main") or soup.body or soup)


def _classes(tag: Tag) -> list[str]:
    return tag.get("class") or []


def _is_math(tag: Tag) -> bool:
    return tag.name in ("span", "div") and "math" in _classes(tag)


def _hidden(node) -> bool:
    """Inside code, a script or style, or math (left to MathJax)."""
    return any(isinstance(p, Tag) and (p.name in CODE_TAGS or _is_math(p)) for p in node.parents)


def _prose_text(tag: Tag) -> str:
    """The text of ``tag`` as a reader sees it as prose: code, scripts and math left out."""
    return "".join(s for s in tag.find_all(string=True) if not _hidden(s))


def _text_nodes(root: Tag) -> Iterator[NavigableString]:
    for s in root.find_all(string=True):
        if s.strip() and not _hidden(s) and type(s) is NavigableString:  # not comments/doctypes
            yield s


def _excerpt(text: str, match: re.Match | None = None, width: int = 60) -> str:
    text = " ".join(text.split())
    if match is None:
        return repr(text[:width])
    i = text.find(match.group(0))
    return repr(text[max(0, i - width // 2):i + width // 2])


# -- the checks: one page's HTML in, a list of problems out ---------------------------------------

def raw_pipe_tables(html: str) -> list[str]:
    """Paragraphs holding a Markdown pipe table as text (its ``| --- |`` delimiter row)."""
    out = []
    for p in _content(_soup(html)).find_all("p"):
        if _hidden(p):
            continue
        text = _prose_text(p)
        m = PIPE_RULE.search(" ".join(text.split()))
        if m:
            out.append(f"raw pipe table in a paragraph: {_excerpt(text, m)}")
    return out


def raw_roles(html: str) -> list[str]:
    """MyST roles left as text, such as ``{glue:text}`` (outside code, where they would be quoted)."""
    out = []
    for s in _text_nodes(_content(_soup(html))):
        for m in RAW_ROLE.finditer(s):
            out.append(f"raw role {m.group(0)}: {_excerpt(str(s), m)}")
    return out


def unresolved_references(html: str) -> list[str]:
    """Cross-references without a target: Sphinx's ``xref`` left without a link, or ``??``."""
    content = _content(_soup(html))
    out = []
    for x in content.find_all(class_="xref"):
        if not any(isinstance(p, Tag) and p.name == "a" and p.get("href") for p in x.parents):
            out.append(f"unresolved reference {_excerpt(x.get_text())} ({' '.join(_classes(x))})")
    for s in _text_nodes(content):
        m = UNRESOLVED_MARK.search(s)
        if m:
            out.append(f"'??' in the text: {_excerpt(str(s), m)}")
    return out


def cdn_scripts(html: str) -> list[str]:
    """Scripts the page loads from another host, and math with no local MathJax or KaTeX to show it."""
    soup = _soup(html)
    srcs = [s["src"] for s in soup.find_all("script", src=True)]
    out = [f"script from another host: {src}" for src in srcs if REMOTE.match(src.strip())]
    has_math = _content(soup).find(_is_math) is not None
    if has_math and not any(LOCAL_MATH_SCRIPT.search(src) and not REMOTE.match(src.strip()) for src in srcs):
        out.append("math on the page but no local MathJax/KaTeX script: formulas show as raw LaTeX offline")
    return out


def uncaptioned_figures(html: str) -> list[str]:
    """Images in the content that are not in a <figure> with a non-empty <figcaption> (logos excepted)."""
    out = []
    for img in _content(_soup(html)).find_all("img"):
        if any("logo" in c for t in [img, *img.parents] if isinstance(t, Tag) for c in _classes(t)):
            continue
        figure = img.find_parent("figure")
        caption = figure.find("figcaption") if figure else None
        if caption is None or not caption.get_text(strip=True):
            why = "not in a <figure>" if figure is None else "in a <figure> without a caption"
            heading = img.find_previous(["h1", "h2", "h3"])
            under = f" under {_excerpt(heading.get_text(' ').rstrip('#'), width=50)}" if heading else ""
            out.append(f"image {Path(img.get('src', '?')).name[:16]}...{under}: {why}")
    return out


def code_cells(html: str) -> list[str]:
    """Plumbing cells whose code is open on the page, and algorithm listings folded away. myst-nb
    puts a ``hide-input`` cell's code in a ``<details>`` toggle; its output stays open."""
    out = []
    for cell in _content(_soup(html)).find_all("div", class_="cell"):
        code = cell.find("div", class_="cell_input")
        if code is None:
            continue
        text, folded = code.get_text(), code.find_parent("details") is not None
        if "book.source(" in text and folded:
            out.append(f"algorithm listing behind a toggle: {_excerpt(text)}")
        elif book.is_plumbing(text) and not folded:
            out.append(f"plumbing code open on the page: {_excerpt(text)}")
    return out


def truncated_cells(html: str) -> list[str]:
    """Table cells whose text ends in ``...``: pandas's mark for text it cut to fit a column."""
    out = []
    for td in _content(_soup(html)).find_all("td"):
        text = " ".join(td.get_text().split())
        if text.endswith("...") and not _hidden(td):
            out.append(f"table cell cut short: {_excerpt(text, width=80)}")
    return out


def claim_links(html: str, anchors: Callable[[str], set[str] | None] | None = None) -> list[str]:
    """Rows of the claims tables (tables with a ``verdict`` column) whose first cell does not link
    to ``notebooks/NN_*.html#anchor`` with a non-empty anchor. With ``anchors`` (a page's href
    without its fragment -> the ids in that page, or None if there is no such page), the anchor
    must also exist there."""
    tables = []
    for table in _content(_soup(html)).find_all("table"):
        head = table.find("thead") or table
        if "verdict" in [th.get_text(" ", strip=True).lower() for th in head.find_all("th")]:
            tables.append(table)
    if not tables:
        return ["no claims table (a table with a 'verdict' column)"]
    out = []
    for t, table in enumerate(tables, 1):
        body = table.find("tbody") or table
        for r, row in enumerate(body.find_all("tr"), 1):
            cells = row.find_all(["td", "th"])
            if not cells or all(c.name == "th" for c in cells):
                continue  # a header row
            first = cells[0]
            where = f"table {t}, row {r} ({_excerpt(row.get_text(' '), width=50)})"
            a = first.find("a", href=True)
            if a is None:
                out.append(f"{where}: no link in its first cell")
                continue
            m = CHAPTER_LINK.match(a["href"])
            if not m or not m.group(1).strip():
                out.append(f"{where}: link {a['href']!r} is not notebooks/NN_*.html#<anchor>")
                continue
            if anchors is not None:
                page = a["href"].split("#", 1)[0]
                ids = anchors(page)
                if ids is None:
                    out.append(f"{where}: link {a['href']!r} to a page that does not exist")
                elif m.group(1) not in ids:
                    out.append(f"{where}: anchor #{m.group(1)} is not in {page}")
    return out


# -- the whole book ---------------------------------------------------------------------------

def toc_pages(root: Path = ROOT) -> list[Path]:
    """The HTML page of every document in ``_toc.yml``, relative to the HTML folder."""
    found: list[Path] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    found.append(Path(str(node[key])).with_suffix(".html"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return found


def _ids_of(html_dir: Path, page: Path) -> Callable[[str], set[str] | None]:
    def ids(href: str) -> set[str] | None:
        target = (html_dir / page.parent / href).resolve()
        if not target.is_file():
            return None
        return {t["id"] for t in _soup(target.read_text()).find_all(id=True)}
    return ids


def problems(html_dir: Path, check: str) -> list[str]:
    """``check`` run over the pages it applies to, each problem prefixed with its page."""
    pages = toc_pages()
    out = []
    for page in pages:
        path = html_dir / page
        if not path.is_file():
            out.append(f"{page}: missing")
            continue
        html = path.read_text()
        if check == "uncaptioned_figures":
            if page.parts[0] != "notebooks":  # figures are the chapters'; the pages under book/ hold tables
                continue
            found = uncaptioned_figures(html)
        elif check == "claim_links":
            if page != Path("book/claims.html"):
                continue
            found = claim_links(html, _ids_of(html_dir, page))
        else:
            found = CHECKS[check](html)
        out += [f"{page}: {p}" for p in found]
    return out


CHECKS: dict[str, Callable[[str], list[str]]] = {
    "raw_pipe_tables": raw_pipe_tables,
    "raw_roles": raw_roles,
    "unresolved_references": unresolved_references,
    "cdn_scripts": cdn_scripts,
    "uncaptioned_figures": uncaptioned_figures,
    "claim_links": claim_links,
    "code_cells": code_cells,
    "truncated_cells": truncated_cells,
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_book_html(smoke_book, check):
    found = problems(smoke_book / "_build" / "html", check)
    assert not found, f"{check}: {len(found)} problem(s)\n" + "\n".join(found)


# -- each check on tiny pages: a good one passes, bad ones are caught ----------------------------

def page(body: str, head: str = "") -> str:
    """A page shaped like the theme's: the content in <article class="bd-article"> inside <main>."""
    return (f"<html><head>{head}</head><body><div class='bd-sidebar-primary'>"
            f"<img class='logo__image' src='_static/logo.png'></div><main id='main-content'>"
            f"<article class='bd-article'>{body}</article></main></body></html>")


def test_raw_pipe_tables():
    good = page("<p>A | B is no table.</p><table><tr><td>—</td></tr></table>"
                "<pre>| a | b |\n|---|---|</pre><p>code: <code>| --- |</code></p>")
    assert raw_pipe_tables(good) == []
    for rule in ("| --- | --- |", "|---|---|", "|—|—|", "| :-- | --: |", "|–|"):
        bad = page(f"<div class='output text_markdown'><p>| a | b |\n{rule}\n| 1 | 2 |</p></div>")
        assert len(raw_pipe_tables(bad)) == 1, rule


def test_raw_roles():
    good = page("<p>Robust accuracy <span class='pasted-text'>25.6</span>; the syntax is "
                "<code>{glue:text}`name`</code>.</p><script>{glue:text}</script>")
    assert raw_roles(good) == []
    bad = page("<p>Robust accuracy {glue:text}<code>acc_alg7</code> and {glue}<code>x</code>.</p>"
               "<p>See {numref}<code>fig-1</code>.</p>")
    assert [p.split(":")[0] for p in raw_roles(bad)] == ["raw role {glue", "raw role {glue}", "raw role {numref}"]


def test_unresolved_references():
    good = page("<p>See <a class='reference internal' href='#s'><span class='std std-ref'>Section 1</span>"
                "</a> and <a href='x.html'><span class='xref myst'>x</span></a>?</p><pre>a ?? b</pre>")
    assert unresolved_references(good) == []
    assert len(unresolved_references(page("<p>See <span class='xref std std-ref'>missing</span>.</p>"))) == 1
    assert len(unresolved_references(page("<p>As Figure ?? shows.</p>"))) == 1


def cell(code: str, folded: bool) -> str:
    body = f"<div class='cell_input docutils container'><pre>{code}</pre></div>"
    if folded:
        body = f"<details class='hide above-input'><summary>Show code cell source</summary>{body}</details>"
    return f"<div class='cell docutils container'>{body}<div class='cell_output'><p>out</p></div></div>"


def test_code_cells():
    good = page(cell("book.source(prune.harden)", False) + cell('glue("acc", 0.5, display=False)', True)
                + cell("rows = steps.over_seeds(cfg, step, device)", False)
                + cell("import pandas as pd", True))
    assert code_cells(good) == []
    bad = page(cell("book.source(prune.harden)", True) + cell('glue("acc", 0.5, display=False)', False)
               + cell("t = rows.pivot_table(index='seed')", False))
    assert [p.split(":")[0] for p in code_cells(bad)] == ["algorithm listing behind a toggle"] + [
        "plumbing code open on the page"] * 2


def test_truncated_cells():
    good = page("<table><tr><td>inconclusive: 100 models in 50 families</td><td>1.5</td></tr></table>"
                "<p>and so on...</p>")
    assert truncated_cells(good) == []
    bad = page("<table><tr><td>inconclusive: 100 models in 50 families, inter...</td></tr></table>")
    assert [p.split(":")[0] for p in truncated_cells(bad)] == ["table cell cut short"]


def test_cdn_scripts():
    local = "<script defer src='../_static/mathjax/tex-chtml.js'></script>"
    good = page("<p>Math <span class='math notranslate nohighlight'>\\(x\\)</span></p>", head=local)
    assert cdn_scripts(good) == []
    assert cdn_scripts(page("<p>no math here</p>")) == []
    for url in ("https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js",
                "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.4/require.min.js",
                "https://cdn.jsdelivr.net/npm/@jupyter-widgets/html-manager@1.0.6/dist/embed-amd.js",
                "//cdn.jsdelivr.net/npm/katex/dist/katex.min.js"):
        assert any(url in p for p in cdn_scripts(page("<p>x</p>", head=local + f"<script src='{url}'></script>"))), url
    # math whose only renderer is remote: both the remote script and the missing local one
    remote = "<script src='https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js'></script>"
    assert len(cdn_scripts(page("<div class='math notranslate'>\\[x\\]</div>", head=remote))) == 2
    assert len(cdn_scripts(page("<div class='math notranslate'>\\[x\\]</div>"))) == 1  # no renderer at all


def test_uncaptioned_figures():
    good = page("<figure id='fig-1'><img src='a.png' alt='a'><figcaption><p><span class='caption-number'>"
                "Fig. 1 </span><span class='caption-text'>Robust accuracy</span></p></figcaption></figure>")
    assert uncaptioned_figures(good) == []  # the logo in the sidebar is not content, and exempt anyway
    assert uncaptioned_figures(page("<img class='logo' src='l.png'>")) == []
    assert len(uncaptioned_figures(page("<div class='cell_output'><img src='out.png'></div>"))) == 1
    assert len(uncaptioned_figures(page("<figure><img src='a.png'></figure>"))) == 1
    assert len(uncaptioned_figures(page("<figure><img src='a.png'><figcaption> </figcaption></figure>"))) == 1


CLAIMS_HEAD = "<thead><tr><th>where</th><th>claim</th><th>paper</th><th>ours</th><th>verdict</th></tr></thead>"


def claims_page(*first_cells: str) -> str:
    rows = "".join(f"<tr><td>{c}</td><td>q</td><td>1</td><td>2</td><td><b>holds</b></td></tr>" for c in first_cells)
    return page(f"<table>{CLAIMS_HEAD}<tbody>{rows}</tbody></table>")


def test_claim_links():
    link = "<a href='../notebooks/04_robust_retraining.html#table-1'>Sec. 3.4</a>"
    assert claim_links(claims_page(link, link)) == []
    anchors = {"../notebooks/04_robust_retraining.html": {"table-1"}}.get
    assert claim_links(claims_page(link), anchors) == []
    assert len(claim_links(claims_page(link, "Sec. 3.4"))) == 1  # no link
    assert len(claim_links(claims_page("<a href='../notebooks/04_robust_retraining.html'>Sec. 3.4</a>"))) == 1
    assert len(claim_links(claims_page("<a href='../notebooks/04_robust_retraining.html#'>Sec. 3.4</a>"))) == 1
    assert len(claim_links(claims_page("<a href='https://example.org/#x'>paper</a>"))) == 1
    assert len(claim_links(claims_page(link.replace("table-1", "table-2")), anchors)) == 1  # no such anchor
    assert len(claim_links(claims_page(link.replace("04_robust", "09_robust")), anchors)) == 1  # no such page
    assert claim_links(page("<table><tr><td>no verdicts</td></tr></table>")) == [
        "no claims table (a table with a 'verdict' column)"]


def test_toc_pages_are_the_books():
    pages = toc_pages()
    assert Path("book/claims.html") in pages and Path("book/intro.html") in pages
    assert any(p.parts[0] == "notebooks" for p in pages)


if __name__ == "__main__":  # python tests/test_rendered.py <html folder>: report every check
    html_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "_build" / "html")
    failed = 0
    for name in CHECKS:
        found = problems(html_dir, name)
        failed += bool(found)
        print(f"{name}: {'ok' if not found else f'{len(found)} problem(s)'}")
        for p in found:
            print("   ", p)
    sys.exit(1 if failed else 0)
