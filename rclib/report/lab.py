"""The executed chapters for JupyterLab, with every glued value written into the prose.

``make lab`` renders the chapters' MyST with jupyterlab-myst, which does not read myst-nb's glue:
a ``{glue:text}`key``` role there shows the key's name, not its value (jupyterlab-myst issue
165). So the lab opens copies of the executed chapters (``_build/src``, from the last
``python -m rclib book``) in which each such role is replaced by the text the book shows, formatted
by myst-nb's own ``format_plain_text`` with the role's format spec, and each ``{glue:figure}``
directive (unknown there) by its caption. Cells, outputs and widgets are untouched, so the
explorers still run live; a value in the prose is that of the last build, and rerunning a cell
does not rewrite it (the copy's first cell says so).

Used by ``python -m rclib lab`` (``make lab``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
from myst_nb.core.variables import format_plain_text

from rclib.report.book import glued_text

# {glue:text}`key`, {glue:text}`key:fmt`, {glue}`key`; another document's `path::key` is left alone
GLUE_ROLE = re.compile(r"\{glue(?::text)?\}`(?P<body>[^`:]+(?::[^`]*)?)`")
# ```{glue:figure} name, its :option: lines, then the caption up to the closing fence
FIGURE = re.compile(r"```\{glue:figure\}[ \t]+\S+[ \t]*\n(?:[ \t]*:[\w-]+:[^\n]*\n)*(?P<caption>.*?)\n?```", re.S)
NOTE = ("*In this copy (for JupyterLab) each glued value in the prose is the one of the last book "
        "build; rerunning a cell does not rewrite the text.*\n\n")


def fill_roles(text: str, values: dict[str, str]) -> str:
    """``text`` with every glue role whose key is in ``values`` replaced by the formatted value
    (as the book renders it); a role of an unknown key is left as it is."""
    def paste(m: re.Match) -> str:
        key, _, spec = m.group("body").partition(":")
        if "::" in m.group("body") or key not in values:
            return m.group(0)
        return format_plain_text(values[key], spec or "s")
    return GLUE_ROLE.sub(paste, text)


def captions(text: str) -> str:
    """``text`` with each ``{glue:figure}`` directive replaced by its caption as a paragraph.

    jupyterlab-myst does not know the directive (myst-nb's), so the caption would not show; the
    figure itself is the output of the code cell just before (``figstyle.glue_figure`` glues it
    displayed). The caption names which figure it belongs to when a cell draws several."""
    blocks = list(FIGURE.finditer(text))
    order = iter(range(1, len(blocks) + 1))

    def caption(m: re.Match) -> str:
        k = next(order)
        which = "The figure above" if len(blocks) == 1 else f"Figure {k} of the {len(blocks)} above"
        return f"*{which}:* {' '.join(m.group('caption').split())}"
    return FIGURE.sub(caption, text)


def lab_copy(executed: Path, dest: Path) -> int:
    """Write ``executed`` to ``dest`` with its glue roles filled; returns how many were filled."""
    nb = nbformat.read(str(executed), as_version=4)
    values = glued_text(nb)
    filled = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            new = captions(fill_roles(cell.source, values))
            filled += len(GLUE_ROLE.findall(cell.source)) - len(GLUE_ROLE.findall(new))
            cell.source = new
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is not None and filled:
        first.source = NOTE + first.source
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(dest))
    return filled


def lab_copies(src: Path, dest: Path) -> dict[str, int]:
    """Every executed notebook under ``src`` copied under ``dest`` (same relative paths) with its
    glue roles filled; the rest of the book's sources (``_config.yml``, ``book/``) come along so
    relative links and citations keep their targets. Returns ``{notebook: roles filled}``."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
    return {str(nb.relative_to(src)): lab_copy(nb, dest / nb.relative_to(src))
            for nb in sorted(src.rglob("*.ipynb")) if ".ipynb_checkpoints" not in nb.parts}
