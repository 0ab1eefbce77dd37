"""What `make lab` shows, checked in a real browser: MyST and glue in markdown cells, and a live
explorer. Run on demand, never by the tests (it needs Chromium and Playwright):

    .venv/bin/python -m pip install playwright    # the Python package only; no browser download
    apt-get install -y chromium                    # Debian's Chromium
    .venv/bin/python bench/lab_check.py [_build/src/notebooks/03_boundary_smoothness.ipynb]

It copies one executed chapter (default: chapter 03 of the last `python -m rclib book`) into a
temporary folder as `make lab` does (``rclib.report.lab.lab_copy``: glued values written into the
prose, figure captions as paragraphs; ``--as-built`` copies the chapter unchanged, to see what
glue roles alone give), starts JupyterLab there headless on a free port without a token (the
kernel imports this checkout's rclib and uses the artifact cache in $RCLIB_ARTIFACTS, so run it
with the cache of the build that executed the chapter), opens the notebook in Chromium and
reports:

1. whether the jupyterlab-myst renderer is active;
2. each ``{glue:text}`` / ``{glue}`` role of the executed chapter's markdown cells: shown in the
   page as the glued value, as its key's name, or left raw;
3. after "Run all", whether the explorer (``map_explorer.explorer``) renders its controls and
   whether changing its ``method`` dropdown redraws its figure and status.

Screenshots go to ``--out`` (default ``_build/lab-check``). Exit status 0 only when every glued
value is shown and the explorer redraws; 2 when Playwright or Chromium is missing. Not part of
`make test` or `make bench` (their files are tests/test_*.py and bench/bench_*.py).
``--without-myst`` disables jupyterlab-myst, to see JupyterLab's own markdown renderer.

Found on 2026-12-02 (jupyterlab-myst 2.7.0, JupyterLab 4.6.6, ipywidgets 8.1, chapter 03 of a
smoke build): jupyterlab-myst renders the markdown (math, headings, lists), but all 33 glue
roles of the chapter's 6 glue-bearing markdown cells show their key's name (``resolution``, not
40): it does not read myst-nb's glue outputs. Without it the 33 roles show raw. The explorer
renders after "Run all" and redraws (figure and status) 2-5 s after its method changes. Hence
``rclib.report.lab``, whose copies this script now opens by default.

Found on 2026-12-03 with those copies: chapter 03 of the cpu build showed 15 of its 34 values;
the other 19 were in the captions of ``{glue:figure}`` directives, which jupyterlab-myst does not
render (and the explorer was not found: the check still looked for the old ``widgets.explorer``
name). With captions written as paragraphs (``lab.captions``) chapter 03 of a smoke build shows
34 of 34, the explorer renders 11-19 s after "Run all" and redraws 1.2 s after its method
changes. ``{numref}`` links to figures show their label (``fig-ch03-explorer``) with a warning
mark: the lab has no figure numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

from rclib.report import lab
from rclib.report.book import glued_text

ROOT = Path(__file__).resolve().parent.parent
PLAIN_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
GLUE_ROLE = re.compile(r"\{glue(?::text)?\}`([^`]+)`")
SETTINGS = {  # one notebook cell per DOM node (no windowing), no news pop-up over the page
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(folder: Path, port: int, myst: bool = True) -> subprocess.Popen:
    settings = folder / ".lab-settings"
    for name, value in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    env = dict(os.environ)
    if not myst:  # JupyterLab's own markdown renderer, for comparison
        config = folder / ".jupyter-config"
        (config / "labconfig").mkdir(parents=True, exist_ok=True)
        (config / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": {"jupyterlab-myst": True}}))
        env["JUPYTER_CONFIG_DIR"] = str(config)
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.token=", "--ServerApp.password=", "--allow-root", f"--ServerApp.root_dir={folder}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={folder / '.lab-ws'}",
           "--LabApp.expose_app_in_browser=True"]
    proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=(folder / "lab.log").open("w"),
                            stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"JupyterLab exited: {(folder / 'lab.log').read_text()[-2000:]}")
            time.sleep(1)
    proc.kill()
    raise SystemExit("JupyterLab did not answer within 120 s")


def check(page, nb: nbformat.NotebookNode, out: Path, run_timeout: float, filled: bool = True) -> list[str]:
    """The checks on the opened notebook; returns the failures (also printed as it goes). ``nb``
    is the executed chapter (its glue roles and values); ``filled``: the page shows its lab copy,
    where a value in the text counts before a key's name that the prose may also use as a word."""
    failures = []
    page.wait_for_selector(".jp-Notebook .jp-MarkdownCell", timeout=120_000)
    page.wait_for_timeout(5000)
    page.screenshot(path=str(out / "1-opened.png"))
    myst = page.evaluate("document.querySelectorAll('.jp-MarkdownCell .myst').length")
    print(f"jupyterlab-myst renderer: {'active' if myst else 'NOT active'} ({myst} markdown cells rendered by it)")
    if not myst:
        failures.append("jupyterlab-myst is not rendering the markdown cells")

    # glue: the markdown cells are in notebook order, so the i-th in the page is the i-th in the file
    values = glued_text(nb)
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    rendered = page.eval_on_selector_all(".jp-MarkdownCell", "cs => cs.map(c => (c.querySelector('.myst') "
                                         "|| c.querySelector('.jp-RenderedMarkdown') || c).innerText)")
    counts = {"value": 0, "key": 0, "raw": 0, "other": 0}
    for i, (src, text) in enumerate(zip(sources, rendered)):
        text = " ".join(text.split()).translate(PLAIN_QUOTES)  # the renderer's typographic quotes
        for key in GLUE_ROLE.findall(src):
            name = key.split(":")[0]
            # the text the book shows for this role: the value formatted with the role's spec
            shown = lab.fill_roles("{glue:text}`" + key + "`", values) if name in values else ""
            value = shown.strip().strip("'\"")
            if "{glue" in text:
                kind = "raw"
            elif filled and value and value in text:
                kind = "value"
            elif key in text:  # a key's name (n_working, r_pca:.2f) is not a word of the prose
                kind = "key"
            elif value and value in text:
                kind = "value"
            else:
                kind = "other"
            if kind == "other" and counts["other"] < 3:
                print(f"  not found in markdown cell {i}: {key!r} -> {value[:60]!r}")
            if not any(counts.values()):  # the first role, as an example
                print(f"markdown cell {i}: source {src[:160]!r}\n  rendered {text[:160]!r}\n"
                      f"  glue {key!r}: value {value[:40]!r}, shown as {kind}")
            counts[kind] += 1
    print(f"glue roles: {sum(counts.values())} in {sum(bool(GLUE_ROLE.search(s)) for s in sources)} markdown cells; "
          f"shown as the glued value {counts['value']}, as the key's name {counts['key']}, raw {counts['raw']}, "
          f"other {counts['other']}")
    if counts["key"] or counts["raw"] or counts["other"]:
        failures.append(f"{counts['key'] + counts['raw'] + counts['other']} glue roles do not show their value")
    if any(counts.values()):  # a picture of the markdown cell with the most glue roles
        most = max(range(len(sources)), key=lambda i: len(GLUE_ROLE.findall(sources[i])))
        cell = page.query_selector_all(".jp-MarkdownCell")[most]
        cell.scroll_into_view_if_needed()
        cell.screenshot(path=str(out / "2-glue-cell.png"))

    # the explorer, live: clear the saved outputs (saved widget views can render from the notebook's
    # widget state, without a kernel), run every cell, then change the method
    page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.wait_for_timeout(1000)
    started = time.monotonic()
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")  # returns when all ran
    explorer = None
    while time.monotonic() - started < run_timeout:
        explorer = page.evaluate_handle("""() => [...document.querySelectorAll('.jp-CodeCell')].find(c =>
            c.querySelector('.jp-InputArea-editor').innerText.includes('map_explorer.explorer(') &&
            c.querySelector('.jp-OutputArea .widget-dropdown select'))""").as_element()
        errors = page.query_selector_all(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                                         ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
        if explorer or any("Error" in e.inner_text() for e in errors):
            break
        page.wait_for_timeout(2000)
    if explorer is None:
        page.screenshot(path=str(out / "3-run-all-failed.png"), full_page=True)
        failures.append(f"no explorer controls after {time.monotonic() - started:.0f} s of Run all")
        print(failures[-1])
        return failures
    print(f"explorer rendered {time.monotonic() - started:.0f} s after Run all")
    while time.monotonic() - started < run_timeout and page.evaluate(
            "[...document.querySelectorAll('.jp-InputPrompt')].some(p => p.innerText.includes('*'))"):
        page.wait_for_timeout(1000)  # the cells after it still running
    print(f"all cells ran in {time.monotonic() - started:.0f} s")
    explorer.scroll_into_view_if_needed()
    page.wait_for_timeout(3000)
    explorer.screenshot(path=str(out / "3-explorer.png"))

    def state():
        img = explorer.query_selector(".jp-OutputArea-output img")
        status = explorer.query_selector(".widget-html-content")
        return (img.get_attribute("src")[-64:] if img else None, status.inner_text() if status else "")

    before = state()
    select = explorer.query_selector(".widget-dropdown select")
    options = [o.get_attribute("value") for o in select.query_selector_all("option")]
    current = select.evaluate("s => s.value")
    target = next(o for o in options if o != current)
    print(f"explorer controls: method options {options}; status before {before[1][:120]!r}")
    select.select_option(target)
    t0 = time.monotonic()
    after = before
    while time.monotonic() - t0 < 120 and (after[0] in (None, before[0]) or "computing" in after[1]):
        page.wait_for_timeout(1000)
        after = state()
    explorer.screenshot(path=str(out / "4-explorer-changed.png"))
    if after[0] not in (None, before[0]) and "computing" not in after[1]:
        print(f"method {current} -> {target}: figure and status redrawn in {time.monotonic() - t0:.1f} s; "
              f"status after {after[1][:120]!r}")
    else:
        failures.append(f"changing method to {target} did not redraw the explorer within 120 s")
        print(failures[-1])
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", nargs="?", type=Path,
                    default=ROOT / "_build" / "src" / "notebooks" / "03_boundary_smoothness.ipynb",
                    help="an executed chapter (glued values and an explorer cell)")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "lab-check", help="folder for the screenshots")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds to wait for Run all")
    ap.add_argument("--as-built", action="store_true",
                    help="open the executed chapter as it is, not the lab copy with its glued values filled in")
    ap.add_argument("--without-myst", action="store_true",
                    help="disable jupyterlab-myst, to see what JupyterLab shows without it")
    args = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("needs playwright: .venv/bin/python -m pip install playwright", file=sys.stderr)
        return 2
    if not Path(args.chromium).exists():
        print(f"needs Chromium at {args.chromium} (apt-get install -y chromium)", file=sys.stderr)
        return 2
    nb = nbformat.read(str(args.notebook), as_version=4)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lab-check-") as tmp:
        folder = Path(tmp)
        if args.as_built:
            shutil.copy2(args.notebook, folder / args.notebook.name)
        else:
            print(f"lab copy: {lab.lab_copy(args.notebook, folder / args.notebook.name)} glue roles filled")
        port = _free_port()
        server = start_lab(folder, port, myst=not args.without_myst)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{args.notebook.name}")
                failures = check(page, nb, args.out, args.run_timeout, filled=not args.as_built)
                browser.close()
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"screenshots in {args.out}")
    print("ok" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
