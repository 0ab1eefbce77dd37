"""What the two JupyterLab explorers share: how a figure reaches a widget, a small result table,
and the largest epsilon a slider offers.

Used by ``report.map_explorer`` and ``report.fgsm_viewer`` (chapters 03 and 00).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

from matplotlib.figure import Figure

MAX_EPS = 0.3


def png_output(fig: Figure) -> dict[str, Any]:
    """A display_data output holding ``fig`` as PNG. Written into ``Output.outputs`` directly
    (not ``with output: display(fig)``), because the context manager captures only inside a
    running kernel: this way the figure also reaches the widget from a test, a thread or any
    observer callback, and the inline backend never shows a stray copy."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                     "text/plain": repr(fig)}}


def html_table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>"
                    for k, v in rows)
    return f"<table style='font-size:90%'>{cells}</table>"
