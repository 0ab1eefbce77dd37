"""Verdicts as clauses for prose: a whole clause that a chapter glues into its sentence, so the
words can never contradict the numbers beside them.

Used by chapters 00-06.
"""

from __future__ import annotations

import re

from rclib.report.verdict import FAILS, HOLDS, INCONCLUSIVE, Verdict

_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor)\b")


def clause(v: Verdict, subject: str, yes: str, no: str, *, evidence: bool = True) -> str:
    """The outcome of ``v`` as a whole clause that prose uses as it stands, with its evidence.

    ``clause(v, "Algorithm 7", "raises robust accuracy", "does not raise robust accuracy")`` gives

    - when ``v`` holds: "Algorithm 7 raises robust accuracy (2 of 2 seeds agree; +12.0 pp, 95% CI
      +3.1 to +20.9)";
    - when it does not hold: "Algorithm 7 does not raise robust accuracy (0 of 2 seeds agree; ...)";
    - when it is inconclusive: "it is inconclusive whether Algorithm 7 raises robust accuracy (1 of
      2 seeds agree; ...)".

    The clause starts in lower case unless ``subject`` does, so the prose puts it after a lead-in
    ("In our runs, {clause}."), never at the start of a sentence; and it is not put inside
    parentheses, since it ends with its own. ``evidence=False`` leaves out the parenthesis (for a
    sentence that gives ``v.evidence`` or ``str(v)`` elsewhere).

    Raises:
        ValueError: an empty part, or a ``no`` that negates nothing ("smoother" for "rougher"):
            checked on every call, so a wording gap shows up before a run comes out that way.

    Used by chapters 01-06.
    """
    if not (subject.strip() and yes.strip() and no.strip()):
        raise ValueError(f"subject, yes and no must all be given: {subject!r}, {yes!r}, {no!r}")
    if len(_NEGATION.findall(no)) <= len(_NEGATION.findall(yes)):
        raise ValueError(f"no={no!r} must negate yes={yes!r}: one more not, no or never than it has")
    said = {HOLDS: f"{subject} {yes}", FAILS: f"{subject} {no}",
            INCONCLUSIVE: f"it is inconclusive whether {subject} {yes}"}[v.outcome]
    return f"{said} ({v.evidence})" if evidence else said
