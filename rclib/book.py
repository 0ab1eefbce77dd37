"""Small helpers for the chapters' presentation: show real source, tabulate paper vs ours.

Used by every chapter.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence


def source(obj: Any):
    """The source of a function or class, syntax-highlighted, so the book shows the code that ran."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def comparison(rows: Sequence[dict[str, Any]]):
    """A "paper vs ours" table: one row per claim with ``quantity``, ``paper``, ``ours``,
    ``verdict`` (and any further columns given).

    Returned as a pandas Styler: unlike a DataFrame's repr it never truncates the verdicts,
    and a value the paper does not report shows as a dash.
    """
    import pandas as pd

    table = pd.DataFrame(list(rows)).set_index("quantity")
    return table.style.format(precision=2, na_rep="—").set_properties(
        subset=["verdict"], **{"text-align": "left"})


def glued(path) -> dict[str, Any]:
    """The values a notebook stored with ``myst_nb.glue``, read back from its executed copy.

    Returns ``{name: value}`` with each value parsed from its text form (numbers, strings,
    lists); values that are not Python literals are returned as their text.
    Used by the tests and by pages that gather results across chapters.
    """
    import ast

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    out: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            prefix = output["metadata"]["scrapbook"].get("mime_prefix", "")
            text = output.get("data", {}).get(prefix + "text/plain", "")
            try:
                out[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                out[name] = text
    return out
