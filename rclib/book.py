"""Small helpers for the chapters' presentation: show real source, tabulate paper vs ours.

Used by every chapter.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence


def source(obj: Any):
    """The source of a function or class, syntax-highlighted, so the book shows the code that ran."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def claim(section: str, quantity: str, paper: Any, ours: Any, verdict: Any) -> dict[str, Any]:
    """One row of a chapter's "paper vs ours" table, and of the claims page that gathers them.

    Args:
        section: where the paper makes the claim and where we measure it, e.g.
            ``"Sec. 3.1 · chapter 01"``.
        quantity: what is compared, in words.
        paper: the paper's number or statement (``None`` when it reports none).
        ours: our number as text with its spread (``verdict.fmt``) or a number.
        verdict: a ``rclib.verdict.Verdict`` or its text.
    """
    def plain(v: Any) -> Any:  # glue stores a repr that must read back: no nan, no numpy types
        if isinstance(v, (float, int)) and not isinstance(v, bool):
            return None if v != v else float(f"{v:.6g}")  # 6 significant digits: no 14.799999999999997
        return v if v is None or isinstance(v, (str, bool)) else str(v)

    return dict(section=section, quantity=quantity, paper=plain(paper), ours=plain(ours), verdict=str(verdict))


def stage_dir() -> Path:
    """Where the executed chapters are: ``$RCLIB_STAGE`` (set by ``python -m rclib book``), else
    ``<project>/_build/src``."""
    import os

    from .config import project_root

    env = os.environ.get("RCLIB_STAGE")
    return Path(env) if env else project_root() / "_build" / "src"


def gather(chapters: Sequence[str], src=None):
    """Every chapter's glued ``claims`` rows in one DataFrame, in chapter order.

    Args:
        chapters: notebook paths relative to the book root, e.g. ``"notebooks/01_pruning.ipynb"``.
        src: the folder of executed copies; default :func:`stage_dir`.

    Raises:
        FileNotFoundError: naming the chapters not executed yet (run ``python -m rclib book``).

    Used by the claims page and the introduction.
    """
    import pandas as pd

    src = stage_dir() if src is None else src
    missing = [c for c in chapters if not (src / c).exists()]
    if missing:
        raise FileNotFoundError(f"not executed yet under {src}: {', '.join(missing)}; "
                                "run `python -m rclib book` (it executes the chapters first)")
    rows = []
    for c in chapters:
        found = glued(src / c).get("claims")
        if not isinstance(found, list):
            raise ValueError(f"{c} glued no 'claims' list")
        rows += [dict(r, chapter=c) for r in found]
    return pd.DataFrame(rows)


def outcome(verdict_text: str) -> str:
    """The outcome word of a verdict's text ("holds (3 of 3 seeds agree; ...)" -> "holds")."""
    return str(verdict_text).split(" (")[0].split(":")[0]


def verdict_counts(claims):
    """Claims per chapter and outcome (holds / does not hold / inconclusive), with totals."""
    import pandas as pd

    from .verdict import OUTCOMES

    t = claims.assign(outcome=claims.verdict.map(outcome))
    counts = pd.crosstab(t.chapter, t.outcome).reindex(columns=list(OUTCOMES), fill_value=0)
    counts.loc["all chapters"] = counts.sum()
    return counts


def claims_markdown(claims) -> str:
    """The gathered claims as one Markdown table, each row linking to the chapter that measures
    it (links point at the rendered HTML pages). Used by the claims page."""
    def cell(v: Any) -> str:
        missing = v is None or v == "" or (isinstance(v, float) and v != v)  # pandas turns None into nan
        text = "—" if missing else (f"{v:g}" if isinstance(v, float) else str(v))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| where | claim | paper | ours (mean ± sd over seeds) | verdict |", "|---|---|---|---|---|"]
    for r in claims.itertuples():
        page = "../" + str(r.chapter).removesuffix(".ipynb") + ".html"
        lines.append(f"| [{cell(r.section)}]({page}) | {cell(r.quantity)} | {cell(r.paper)} | {cell(r.ours)} | "
                     f"**{outcome(r.verdict)}**{cell(r.verdict)[len(outcome(r.verdict)):]} |")
    return "\n".join(lines)


def comparison(rows: Sequence[dict[str, Any]]):
    """A "paper vs ours" table: one row per claim with ``quantity``, ``paper``, ``ours``,
    ``verdict`` (and any further columns given).

    Returned as a pandas Styler: unlike a DataFrame's repr it never truncates the verdicts,
    and a value the paper does not report shows as a dash. The quantity is the first column,
    not the index: two claims may read alike (chapter 00 under the paper profile, whose headline
    epsilon is the paper's 0.03), and a Styler refuses to style a table with repeated row labels.
    """
    import pandas as pd

    table = pd.DataFrame(list(rows))
    table = table[["quantity"] + [c for c in table.columns if c != "quantity"]]
    return table.style.format(precision=2, na_rep="—").hide(axis="index").set_properties(
        subset=["quantity", "verdict"], **{"text-align": "left"})


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
