"""The chapters' parameters: the ``parameters`` cell every chapter carries, what papermill
injected into it, and the table of the configuration a page ran with.

Every Config field is a parameter of every chapter (:func:`parameters_source`); a name papermill
injected that is not a field is found by :func:`injected_names` and refused by
``rclib.experiments.setup.from_notebook``.

Used by every chapter's first cells and by the tests that compare each parameters cell with
:func:`parameters_source`.
"""

from __future__ import annotations

import ast
import inspect
import re

import pandas as pd

from rclib.core.config import DEFAULT_PROFILE, FIELD_NAMES, PROFILES, Config, profile_config

PAPERMILL_COMMENT = "# Parameters"  # the first line of the cell papermill injects


def injected_names(history: list[str]) -> list[str]:
    """Names assigned by the parameters papermill injected, read from IPython's input history.

    Papermill adds any ``-p NAME VALUE`` to the executed notebook, known or not (it only logs
    "Passed unknown parameter"), in a cell starting with ``# Parameters``. Reading that cell
    back is the only way a chapter can see a misspelt name; without it the chapter would run
    with the profile's value.
    """
    for source in reversed(history):
        if source.lstrip().startswith(PAPERMILL_COMMENT):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return []
            return [t.id for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
    return []


def field_help() -> dict[str, str]:
    """Each Config field's one-line description: the comment on its line in :class:`Config`."""
    found = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?  # (.+)$", line)
        if m and m.group(1) in FIELD_NAMES:
            found[m.group(1)] = m.group(2)
    return found


def parameters_source() -> str:
    """The ``parameters`` cell every chapter carries: every Config field, ``None`` by default.

    A test checks that each chapter's cell is exactly this text, so a new field reaches every
    chapter. No ``=`` may appear in a comment (papermill's parameter inspection breaks on it).
    """
    helps = field_help()
    lines = ["# Every field of rclib.core.config.Config is a parameter of every chapter.",
             "# None means: take the profile's value. Lists: [0.5, 0.9] or the text \"[0.5, 0.9]\".",
             f'profile = "{DEFAULT_PROFILE}"  # {" | ".join(PROFILES)}']
    lines += [f"{n} = None  # {helps[n]}" for n in FIELD_NAMES[1:]]
    return "\n".join(lines)


def table(cfg: Config, names: tuple[str, ...] | None = None):
    """The configuration that produced a page, shown at the top of each chapter.

    Rows: ``names`` (the fields the chapter reads; all when None), then every other field whose
    value differs from the profile's. The second column gives the profile's value where the run
    overrides it and is empty elsewhere, so a reader sees at once what was changed. The rows are
    the fields' own names, since they are what a reader passes (``-p name value``); the header
    says so.
    """
    base = profile_config(cfg.profile)
    names = FIELD_NAMES if names is None else tuple(names)
    rows = list(names) + [n for n in FIELD_NAMES if n not in names and getattr(cfg, n) != getattr(base, n)]
    return pd.DataFrame({
        "parameter": rows,
        "value": [str(getattr(cfg, n)) for n in rows],
        f"profile {cfg.profile!r} has": [str(getattr(base, n)) if getattr(cfg, n) != getattr(base, n) else ""
                                         for n in rows],
    }).set_index("parameter").rename_axis("parameter (a Config field, set with -p)")
