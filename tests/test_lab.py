"""rclib.report.lab: the lab's copies of the executed chapters show glued values, not role names."""

from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from rclib.__main__ import main
from rclib.report import book, lab


def _glued(name: str, text: str):
    return new_output("display_data", data={"text/plain": text},
                      metadata={"scrapbook": {"name": name, "mime_prefix": ""}})


def test_roles_are_filled_with_the_books_formatting_and_unknown_ones_kept(tmp_path):
    nb = new_notebook(cells=[
        new_markdown_cell("# Title"),
        new_code_cell("glue(...)", outputs=[_glued("eps", "0.20641"), _glued("word", "'holds'"), _glued("n", "1437")]),
        new_markdown_cell("At {glue:text}`eps:.3f` it {glue:text}`word`, over {glue:text}`n:,` digits; "
                          "{glue:text}`missing` and {glue:text}`other.ipynb::eps` stay; {glue}`n` too."),
    ])
    src = tmp_path / "src" / "notebooks" / "x.ipynb"
    src.parent.mkdir(parents=True)
    nbformat.write(nb, str(src))
    filled = lab.lab_copies(tmp_path / "src", tmp_path / "lab")
    assert filled == {"notebooks/x.ipynb": 4}
    cells = nbformat.read(str(tmp_path / "lab" / "notebooks" / "x.ipynb"), as_version=4).cells
    assert cells[2].source == ("At 0.206 it holds, over 1,437 digits; {glue:text}`missing` and "
                               "{glue:text}`other.ipynb::eps` stay; 1437 too.")
    assert cells[0].source.startswith(lab.NOTE) and cells[1].outputs == nb.cells[1].outputs


def test_figure_directives_become_captions_under_their_figures(tmp_path):
    """jupyterlab-myst does not know ``{glue:figure}``: the copy keeps its caption as a paragraph,
    values filled, and says which of the figures above it belongs to."""
    nb = new_notebook(cells=[
        new_code_cell("figstyle.glue_figure(...)", outputs=[_glued("seed", "3")]),
        new_markdown_cell("```{glue:figure} fig_a\n:name: fig-ch03-a\n:figwidth: 100%\n\nMaps of seed\n"
                          "{glue:text}`seed`.\n```\n\n"
                          "```{glue:figure} fig_b\n:name: fig-ch03-b\n\nThe same, shared.\n```"),
        new_markdown_cell("```{glue:figure} fig_c\n\nOne figure.\n```\n\nThen prose."),
    ])
    executed = tmp_path / "x.ipynb"
    nbformat.write(nb, str(executed))
    assert lab.lab_copy(executed, tmp_path / "lab.ipynb") == 1
    cells = nbformat.read(str(tmp_path / "lab.ipynb"), as_version=4).cells
    assert cells[1].source.endswith("*Figure 1 of the 2 above:* Maps of seed 3.\n\n"
                                    "*Figure 2 of the 2 above:* The same, shared.")
    assert cells[2].source == "*The figure above:* One figure.\n\nThen prose."
    assert "glue:figure" not in cells[1].source + cells[2].source


def test_the_smoke_books_lab_copies_hold_no_role_of_a_glued_value(smoke_book, capsys):
    assert main(["lab", "--no-launch", "--out", str(smoke_book)]) == 0
    copies = sorted((smoke_book / "_build" / "lab").rglob("*.ipynb"))
    assert len(copies) >= 9
    for path in copies:
        nb = nbformat.read(str(path), as_version=4)
        values = book.glued_text(nb)
        left = [m.group(0) for c in nb.cells if c.cell_type == "markdown" for m in lab.GLUE_ROLE.finditer(c.source)
                if m.group("body").partition(":")[0] in values]
        assert left == [], (path.name, left[:3])
        assert not any("{glue:figure}" in c.source for c in nb.cells if c.cell_type == "markdown"), path.name
