"""Small helpers for the chapters' presentation: show real source, tabulate paper vs ours.

Used by every chapter.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Sequence

from rclib.core.paths import project_root
from rclib.report.verdict import OUTCOMES


def source(obj: Any):
    """The source of a function or class, syntax-highlighted, so the book shows the code that ran."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


# What a page shows and what it folds away: a code cell a reader need not read to follow the
# method (gluing values and figures into the prose, building claim rows, importing, reshaping
# tables) is tagged ``hide-input``, rendered as a "Show code cell source" toggle with its output
# open; a cell that lists an algorithm (:func:`source`) or runs a chapter's experiment stays open.
HIDDEN_TAGS = frozenset({"hide-input", "remove-input", "remove-cell"})
PLUMBING = re.compile(r"\bglue(?:_figure)?\(|\bbook\.(?:claim|check|readable|claims_table)\(|^\s*(?:import|from)\s+\w|"
                      r"\.(?:pivot_table|groupby|melt|unstack|agg)\(", re.M)


def is_plumbing(code: str) -> bool:
    """Whether a code cell's text is plumbing (:data:`PLUMBING`), to be hidden behind a toggle.
    A cell that lists an algorithm's source holds nothing else, so it is never plumbing. Checked on
    every page by tests/test_notebooks.py and on the rendered HTML by tests/test_rendered.py."""
    return PLUMBING.search(code) is not None


# The three kinds of rows a chapter glues. Only the paper's claims are tallied as the paper's;
# the book's own findings are counted apart; checks hold by construction and are never tallied.
PAPER, FINDING, CHECK = "paper", "finding", "check"
KINDS = (PAPER, FINDING, CHECK)
# What a row actually measures: the introduction and the claims page group the paper's claims so
MEASURES = ("robustness", "robustness beyond clean accuracy", "clean accuracy", "boundary smoothness",
            "sparsity", "size", "speed")
PASSED = "passed"
ROW_DETAILS = ("kind", "measures", "setting", "refuted_by", "anchor")  # what claim() and check() add for the claims page
# A chapter section's MyST label, ``(chNN-name)=`` above its heading: Sphinx makes it an id of the
# chapter's HTML page, so a claims row can link to the very section that measures it
ANCHOR = re.compile(r"ch(\d\d)-[a-z0-9]+(?:-[a-z0-9]+)*")
KIND_LABELS = {PAPER: "the paper's claims", FINDING: "the book's findings", CHECK: "checks (by construction)"}
KIND_OF = {label: kind for kind, label in KIND_LABELS.items()}
# The chapters whose rows the claims page and the introduction gather, in reading order
CHAPTERS = ("notebooks/00_baseline.ipynb", "notebooks/01_pruning.ipynb", "notebooks/02_weight_sharing.ipynb",
            "notebooks/03_boundary_smoothness.ipynb", "notebooks/04_robust_retraining.ipynb",
            "notebooks/05_stronger_attacks.ipynb", "notebooks/06_boundary_distance.ipynb")


def _plain(v: Any) -> Any:  # glue stores a repr that must read back: no nan, no numpy types
    if isinstance(v, (float, int)) and not isinstance(v, bool):
        return None if v != v else float(f"{v:.6g}")  # 6 significant digits: no 14.799999999999997
    return v if v is None or isinstance(v, (str, bool)) else str(v)


def _anchor(anchor: str) -> str:
    if not isinstance(anchor, str) or not ANCHOR.fullmatch(anchor):
        raise ValueError(f"anchor={anchor!r} is not a chapter section's label: chNN-name (lower case, digits "
                         "and hyphens), as in the label (chNN-name)= above the section that measures the row")
    return anchor


def claim(section: str, quantity: str, paper: Any, ours: Any, verdict: Any, *, anchor: str, measures: str,
          setting: str, refuted_by: str, kind: str = PAPER) -> dict[str, Any]:
    """One row of a chapter's "paper vs ours" table, and of the claims page that gathers them.

    Args:
        section: where the paper makes the claim and where we measure it, e.g.
            ``"Sec. 3.1 · chapter 01"``.
        quantity: what is compared, in words.
        paper: the paper's number or statement, in the same units as ``ours`` where it has one
            (``None`` when it reports none).
        ours: our number as text with its spread (``verdict.fmt``) or a number.
        verdict: a ``rclib.report.verdict.Verdict`` or its text.
        anchor: the MyST label of the chapter section that measures the row (where its numbers
            are computed and shown, not the summary), e.g. ``"ch04-table-1"``; the claims page
            links the row there.
        measures: what the row actually measures, one of :data:`MEASURES` (a claim about
            robustness that is judged on clean accuracy is grouped under clean accuracy).
        setting: in one line, where it is measured (epsilon, prune rate, attack, sample).
        refuted_by: in one line, the result that would have made it fail.
        kind: :data:`PAPER` (a claim of the paper, judged in its own terms) or :data:`FINDING`
            (the book's own result, e.g. a criticism of the paper's method); checks come from
            :func:`check`.

    Used by chapters 00-06; read back by the claims page and the introduction.
    """
    if kind not in (PAPER, FINDING):
        raise ValueError(f"kind={kind!r} is not allowed: {PAPER!r} or {FINDING!r} (checks come from book.check)")
    if measures not in MEASURES:
        raise ValueError(f"measures={measures!r} is not allowed: one of {', '.join(MEASURES)}")
    return dict(section=section, quantity=quantity, paper=_plain(paper), ours=_plain(ours), verdict=str(verdict),
                kind=kind, measures=measures, setting=setting, refuted_by=refuted_by, anchor=_anchor(anchor))


class CheckFailed(AssertionError):
    """A property that holds by construction did not: the implementation is broken, and the
    chapter stops here rather than print numbers computed by broken code."""


def check(section: str, quantity: str, ok: bool, detail: str, *, anchor: str, measures: str) -> dict[str, Any]:
    """A property that holds by construction (hardened = masked, uniform layer-wise sparsity, at
    most 2^n shared values, ...): asserted, and listed apart from the claims, never tallied.

    Args:
        section, quantity, anchor, measures: as in :func:`claim`.
        ok: whether it held on every seed.
        detail: what was compared, with the numbers (e.g. ``"largest gap 0.00 pp over 5 seeds"``).

    Raises:
        CheckFailed: when ``ok`` is false, naming the property and the numbers, so a broken
            implementation fails its chapter instead of reaching the book.

    Used by chapters 00-06.
    """
    anchor = _anchor(anchor)
    if not ok:
        raise CheckFailed(f"check failed, {section}: {quantity} ({detail})")
    return dict(section=section, quantity=quantity, paper=None, ours=detail, verdict=PASSED, kind=CHECK,
                measures=measures, setting="every seed", refuted_by="any seed breaking it (the chapter stops)",
                anchor=anchor)


def stage_dir() -> Path:
    """Where the executed chapters are: ``$RCLIB_STAGE`` (set by ``python -m rclib book``), else
    ``<project>/_build/src``."""
    import os


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
    """The outcome word of a verdict's text ("holds: 3 of 3 seeds agree; ..." -> "holds"; the older
    "holds (3 of 3 ...)" form too)."""
    return str(verdict_text).split(" (")[0].split(":")[0]


def tally(claims):
    """Outcomes counted apart by kind: the paper's claims by what they measure, then the book's
    own findings, then the checks (all passed, or the chapter would have stopped). One table that
    the claims page and the introduction both show, so their counts cannot differ.

    Returns a DataFrame indexed by ``(kind, measures)`` with one column per outcome and a total;
    the paper's claims come first, in :data:`MEASURES` order.
    """
    import pandas as pd


    t = claims.assign(outcome=claims.verdict.map(outcome))
    rows = []
    for m in MEASURES:
        sub = t[(t.kind == PAPER) & (t.measures == m)]
        if len(sub):
            rows.append((KIND_LABELS[PAPER], m, sub))
    for kind in (FINDING, CHECK):
        sub = t[t.kind == kind]
        if len(sub):
            rows.append((KIND_LABELS[kind], "all", sub))
    columns = list(OUTCOMES) + [PASSED, "rows"]
    if not rows:
        return pd.DataFrame(columns=columns, index=pd.MultiIndex.from_tuples([], names=["kind", "measures"]))
    table = pd.DataFrame([{**{o: int((sub.outcome == o).sum()) for o in OUTCOMES + (PASSED,)}, "rows": len(sub)}
                          for _, _, sub in rows],
                         index=pd.MultiIndex.from_tuples([(k, m) for k, m, _ in rows], names=["kind", "measures"]))
    return table


def counts_of(claims) -> dict[str, int]:
    """The headline counts glued by the claims page and the introduction: the paper's claims and
    their outcomes, the findings and the checks."""
    t = tally(claims)
    level = t.index.get_level_values(0)
    paper = t[level == KIND_LABELS[PAPER]]
    return dict(n_paper=int(paper["rows"].sum()), n_holds=int(paper["holds"].sum()),
                n_fails=int(paper["does not hold"].sum()), n_inconclusive=int(paper["inconclusive"].sum()),
                n_findings=int(t[level == KIND_LABELS[FINDING]]["rows"].sum()),
                n_checks=int(t[level == KIND_LABELS[CHECK]]["rows"].sum()))


def section_link(chapter: str, anchor: Any) -> str:
    """The claims page's link to the section that measures a row: ``chapter``
    ``"notebooks/04_robust_retraining.ipynb"`` and anchor ``"ch04-table-1"`` give
    ``"../notebooks/04_robust_retraining.html#ch04-table-1"``.

    Raises:
        ValueError: the anchor is missing or not a label (a row glued before rows had anchors:
            execute the chapter again), or it names another chapter than the one that glued the row.
    """
    page = Path(str(chapter))
    m = ANCHOR.fullmatch(anchor) if isinstance(anchor, str) else None
    if m is None:
        raise ValueError(f"a row of {chapter} has no section anchor ({anchor!r}); "
                         "execute the chapter again (python -m rclib book)")
    if not page.name.startswith(m.group(1) + "_"):
        raise ValueError(f"anchor {anchor!r} names chapter {m.group(1)}, but the row comes from {chapter}")
    return f"../{page.with_suffix('.html').as_posix()}#{anchor}"


def claims_table(claims, kind: str = PAPER):
    """The gathered rows of one kind as an HTML table (a pandas Styler), each row's first cell
    linking to the section of its chapter that measures it (:func:`section_link`); the claims page
    shows one per kind. An HTML table, not Markdown: the book renders a Markdown output as
    CommonMark, which has no tables."""
    import html

    import pandas as pd

    rows = claims[claims.kind == kind]

    def cell(v: Any) -> str:
        missing = v is None or v == "" or (isinstance(v, float) and v != v)  # pandas turns None into nan
        return "—" if missing else html.escape(f"{v:g}" if isinstance(v, float) else str(v))

    def link(r) -> str:
        return f'<a href="{html.escape(section_link(r.chapter, getattr(r, "anchor", None)))}">{cell(r.section)}</a>'

    def verdict_cell(v: str) -> str:
        word = outcome(v)
        return f"<b>{html.escape(word)}</b>{cell(v)[len(word):]}"

    out = pd.DataFrame({
        "in the paper · chapter": [link(r) for r in rows.itertuples()],
        "claim" if kind != CHECK else "property": [cell(q) for q in rows.quantity],
        "what it measures": [cell(m) for m in rows.measures],
        "setting · refuted by": [f"{cell(s)} · <i>{cell(f)}</i>" for s, f in zip(rows.setting, rows.refuted_by)],
        **({"paper": [cell(p) for p in rows.paper]} if kind == PAPER else {}),
        "ours": [cell(o) for o in rows.ours],
        "verdict": [verdict_cell(v) for v in rows.verdict],
    })
    # the class sets a smaller type (_static/rclib.css), so that seven columns and the verdict fit a
    # 1200-pixel window without scrolling
    return text_table(out).set_table_attributes('class="rclib-claims"')


def text_table(table):
    """A table of sentences (verdicts, settings) for display: a pandas Styler, which never cuts a
    cell's text as a DataFrame's display does (``display.max_colwidth``, 50 characters), without
    the row numbers, its cells left- and top-aligned. Used by :func:`claims_table` and chapter 03's
    correlation table."""
    return table.style.hide(axis="index").set_properties(**{"text-align": "left", "vertical-align": "top"})


# What the code calls a table's columns and index, in words with their units, for display: the
# cached data keep their names, and a chapter shows ``readable(table)``
WORDS = {
    "accuracy": "clean accuracy (%)",
    "robust_accuracy": "FGSM robust accuracy (%)",
    "pca_boundary_length": "PCA map: boundary length (map sides)",
    "pca_confidence_tv": "PCA map: confidence total variation",
    "pca_regions": "PCA map: single-class regions",
    "local_boundary_length": "local maps: boundary length (map sides)",
    "local_confidence_tv": "local maps: confidence total variation",
    "label": "model", "variant": "model", "model": "model", "method": "method",
    "rate": "prune rate r", "epsilon": "FGSM epsilon (pixel units)", "batch": "batch size", "seed": "seed",
    "layer": "layer", "type": "layer type", "weight_shape": "weight shape",
    "parameters": "parameters (weights and biases)", "weights": "weights",
    "bits": "index bits n", "rho": "compression rate ρ",
    "attack": "attack", "check": "check",
    "kind": "kind of row", "measures": "what it measures", "rows": "rows in all",
}
IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+")  # snake_case: a name from the code


def readable(table, words: dict[str, str] | None = None):
    """``table`` (a DataFrame) for display: its column labels (every level) and the names of its
    index and column levels in words, from :data:`WORDS` and then ``words`` (a chapter's own, e.g.
    the epsilon of its robust accuracy). Row labels are data and are left as they are.

    Raises:
        ValueError: a label or level name is still an identifier (``snake_case``) after renaming:
            add it to ``words``.

    Used by chapters 00-05 and the claims page.
    """
    names = {**WORDS, **(words or {})}

    def word(v):
        return names.get(v, v) if isinstance(v, str) else v

    out = table.rename(columns=word)
    out.index = out.index.set_names([word(n) for n in out.index.names])
    out.columns = out.columns.set_names([word(n) for n in out.columns.names])
    labels = [v for c in out.columns for v in (c if isinstance(c, tuple) else (c,))]
    left = sorted({str(v) for v in labels + list(out.index.names) + list(out.columns.names)
                   if isinstance(v, str) and IDENTIFIER.fullmatch(v)})
    if left:
        raise ValueError(f"identifiers left in the table's headers: {', '.join(left)}; give them words=")
    return out


def comparison(rows: Sequence[dict[str, Any]]):
    """A "paper vs ours" table: one row per claim with ``quantity``, ``paper``, ``ours``,
    ``verdict`` (and any further columns given). A chapter passes its glued rows as they are; their
    kind, measures, setting and refutation belong to the claims page and are not shown here.

    Returned as a pandas Styler: unlike a DataFrame's repr it never truncates the verdicts,
    and a value the paper does not report shows as a dash. The quantity is the first column,
    not the index: two claims may read alike (chapter 00 under the paper profile, whose headline
    epsilon is the paper's 0.03), and a Styler refuses to style a table with repeated row labels.
    """
    import pandas as pd

    table = pd.DataFrame(list(rows))
    table = table[["quantity"] + [c for c in table.columns if c not in ("quantity",) + ROW_DETAILS]]
    return table.style.format(precision=2, na_rep="—").hide(axis="index").set_properties(
        subset=["quantity", "verdict"], **{"text-align": "left"})


def glued_text(nb) -> dict[str, str]:
    """``{name: text/plain}`` of every value an executed notebook (an ``nbformat`` node) stored with
    ``myst_nb.glue``, as myst-nb renders it. Used by :func:`glued` and ``report.lab``."""
    out: dict[str, str] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            glue = output.get("metadata", {}).get("scrapbook", {})
            if "name" in glue:
                out[glue["name"]] = output.get("data", {}).get(glue.get("mime_prefix", "") + "text/plain", "")
    return out


def glued(path) -> dict[str, Any]:
    """The values a notebook stored with ``myst_nb.glue``, read back from its executed copy.

    Returns ``{name: value}`` with each value parsed from its text form (numbers, strings,
    lists); values that are not Python literals are returned as their text.
    Used by the tests and by pages that gather results across chapters.
    """
    import ast

    import nbformat

    out: dict[str, Any] = {}
    for name, text in glued_text(nbformat.read(str(path), as_version=4)).items():
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out
