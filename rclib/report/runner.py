"""The book's runner: every chapter of ``_toc.yml`` executed by papermill into ``_build/src``
(a copy of the book sources), then rendered by Jupyter Book with execution off.

Why papermill first and not Jupyter Book's own execution: its cache runs notebooks in file-name
order, reports a failing notebook only as a warning, and cannot see changed artifacts. Here each
chapter runs in toc order (independent chapters side by side), a failure stops everything with
the notebook and cell named, and then ``jupyter-book build -W -n --keep-going`` renders those
executed copies into ``_build/html``.

Used by ``python -m rclib book|run|build`` (``make book``) and the notebook smoke tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from rclib.core.paths import project_root

BUILD = "_build"


STAGE = "src"  # _build/src: the book sources with executed notebooks


BOOK_FILES = ("_config.yml", "_toc.yml")


# copied as they are: book/ (its notebooks are executed over the copies) and _static/ (the book's CSS,
# which Jupyter Book links into every page)
BOOK_DIRS = ("book", "_static")


class ChapterFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def toc_notebooks(root: Path) -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in reading order (relative paths)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    found: list[Path] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):  # the root page is a document too
                if key not in node:
                    continue
                path = Path(str(node[key]))
                if path.suffix == ".ipynb" or (not path.suffix and (root / path.with_suffix(".ipynb")).exists()):
                    found.append(path.with_suffix(".ipynb"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return found


def execution_order(notebooks: list[Path]) -> list[Path]:
    """Chapters (``notebooks/``) first, in toc order, then the pages under ``book/`` that gather
    the chapters' results (the claims page, the introduction), wherever the toc places them."""
    return sorted(notebooks, key=lambda nb: nb.parts[0] == "book")


# A chapter that reads models another chapter caches starts after it has finished; run at the
# same time, both would train the same models in two processes. Chapter 03 maps Alg 5's
# iterative trajectory that chapter 01 trains; chapter 05 attacks chapter 04's Table 1 models;
# chapter 06 measures those models' distances beside chapter 05's PGD-10 points.
AFTER = {Path("notebooks/03_boundary_smoothness.ipynb"): Path("notebooks/01_pruning.ipynb"),
         Path("notebooks/05_stronger_attacks.ipynb"): Path("notebooks/04_robust_retraining.ipynb"),
         Path("notebooks/06_boundary_distance.ipynb"): Path("notebooks/05_stronger_attacks.ipynb")}


def default_jobs() -> int:
    """Chapters at once: 2 on a CPU machine with 2 or more cores (each chapter runs one torch
    thread, see ``Config.threads``), 1 where a GPU is visible (a paper-scale chapter wants its
    memory to itself)."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def execute_all(root: Path, src: Path, notebooks: list[Path], args: argparse.Namespace,
                params: dict[str, Any], jobs: int) -> None:
    """``python -m rclib book``'s execution: the first chapter alone (it trains every seed's
    baseline and finds the operating point that all later chapters read), then the other chapters
    ``jobs`` at a time, honouring :data:`AFTER` (the chapters that others wait for start first,
    then those that waited, then toc order), then the gathering pages, also ``jobs`` at a time
    (they only read the chapters). Each kernel is driven from a thread of this process. The first
    failure stops the scheduling of new notebooks; those already running finish. Raises
    ChapterFailed naming the chapter."""
    chapters = [nb for nb in notebooks if nb.parts[0] != "book"]
    pages = [nb for nb in notebooks if nb.parts[0] == "book"]
    count = iter(range(1, len(notebooks) + 1))
    if chapters:
        print(f"[{next(count)}/{len(notebooks)}] {chapters[0]} (profile {args.profile})", flush=True)
        seconds = run_notebook(root / chapters[0], src / chapters[0], params, args.timeout, progress=not args.quiet)
        print(f"      done in {seconds:.1f} s", flush=True)
    # the chapters others wait for first, then those that waited (the two long chains, 01 -> 03 and
    # 04 -> 05, then run side by side), then toc order
    later = sorted(chapters[1:], key=lambda nb: (nb not in AFTER.values(), nb not in AFTER))
    for batch in (later, pages):
        side_by_side(batch, jobs, count, len(notebooks),
                     lambda nb, bar: run_notebook(root / nb, src / nb, params, args.timeout, progress=bar),
                     f"profile {args.profile}", not args.quiet)


def side_by_side(pending: list[Path], jobs: int, count: Iterator[int], total: int,
                 execute: Callable[[Path, bool], float], what: str, progress: bool) -> None:
    """Run ``execute(nb, progress_bar)`` for every notebook of ``pending``, ``jobs`` at a time in
    threads, starting one only once its :data:`AFTER` entry has finished if that entry is among
    ``pending`` (one run before this batch, or not in the toc, is not waited for).

    Threads, not a ``python -m rclib run`` process per notebook: each kernel is a process of its
    own anyway, and the wrapper cost an interpreter and a torch import (about 2.5 s of CPU) each.
    With ``jobs`` > 1 no progress bar (two would interleave on one terminal); the scheduler's
    lines say what runs. The first failure stops new starts; raised once the running ones end.
    """
    pending, done, failure = list(pending), set(), None
    batch = set(pending)
    with cf.ThreadPoolExecutor(jobs) as pool:
        running: dict[cf.Future, Path] = {}
        while pending or running:
            ready = [nb for nb in pending if AFTER.get(nb) in done or AFTER.get(nb) not in batch]
            while failure is None and ready and len(running) < jobs:
                nb = ready.pop(0)
                pending.remove(nb)
                at_once = f", {len(running) + 1} of {jobs} at once" if jobs > 1 else ""
                print(f"[{next(count)}/{total}] {nb} ({what}{at_once})", flush=True)
                running[pool.submit(execute, nb, progress and jobs == 1)] = nb
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                nb = running.pop(future)
                try:
                    print(f"      {nb} done in {future.result():.1f} s", flush=True)
                    done.add(nb)
                except ChapterFailed as err:
                    failure = failure or err
    if failure is not None:
        raise failure


def parse_value(text: str) -> Any:
    """A ``-p`` value as papermill would read it: int, float, bool/None, a YAML list, else text."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, list, type(None))) else text


def _hide_injected(path: Path) -> None:
    """Tag papermill's injected-parameters cell ``remove-cell``: the chapter shows its effective
    configuration as a table instead, which is what a reader needs to see."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = tags + ["remove-cell"]
    nbformat.write(nb, path)


def run_notebook(notebook: Path, output: Path, parameters: dict[str, Any], timeout: int,
                 progress: bool = True) -> float:
    """Execute one chapter with papermill; returns seconds; raises ChapterFailed on error."""
    import papermill as pm

    root = project_root()
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(root),
                            kernel_name="python3", progress_bar=progress,
                            execution_timeout=timeout,
                            # saves as each cell starts and ends: a dead kernel leaves a partial
                            # notebook whose unfinished cell names where it stopped
                            request_save_on_cell_execute=True,
                            # every output is in once the last cell is done: killing the kernel's
                            # process group then skips torch's interpreter teardown (about 1 s
                            # of CPU and wall time per chapter) and takes DataLoader workers along
                            shutdown_kernel="immediate")
    except pm.PapermillExecutionError as err:
        raise ChapterFailed(f"{notebook} failed in cell {err.cell_index} (execution count "
                            f"{err.exec_count}): {err.ename}: {err.evalue}") from None
    except Exception as err:  # timeouts, a dead kernel, a missing file
        raise ChapterFailed(f"{notebook} failed: {type(err).__name__}: {err}{_last_cell(output)}") from None
    _hide_injected(output)
    return time.perf_counter() - start


def _last_cell(output: Path) -> str:
    """Where a chapter stopped without a Python error (a dead kernel, a timeout): papermill saves
    the partial notebook as each cell starts, so the last cell with a start time is the one that
    never finished. Returns a sentence naming that cell and the partial notebook, or "" if
    nothing was saved."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:  # nothing was saved
        return ""
    started = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not started:
        return f"; partial executed notebook: {output}"
    cell = nb.cells[started[-1]]
    first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
    return (f"; it stopped in cell {started[-1]} ({first[:80]!r}), the last cell that started (a dead "
            f"kernel is most often out of memory); partial executed notebook: {output}")


def stage(root: Path, out: Path) -> Path:
    """Copy the book's non-notebook sources into ``<out>/_build/src`` and return that folder."""
    dest = out / BUILD / STAGE
    dest.mkdir(parents=True, exist_ok=True)
    for name in BOOK_FILES:
        shutil.copy2(root / name, dest / name)
    for name in BOOK_DIRS:
        shutil.copytree(root / name, dest / name, dirs_exist_ok=True)
    return dest


def build_book(root: Path, out: Path) -> int:
    """Render ``<out>/_build/src`` into ``<out>/_build/html`` with warnings as errors."""
    src = out / BUILD / STAGE
    missing = [nb for nb in toc_notebooks(root) if not (src / nb).exists()]
    if missing:
        print(f"not executed yet: {', '.join(map(str, missing))}; run `python -m rclib book`", file=sys.stderr)
        return 1
    # jupyter_book has no ``__main__``; call its click entry point in a child interpreter so a
    # Sphinx crash cannot take the runner down with it
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(src),
           "--path-output", str(out), "-W", "-n", "--keep-going"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def environment() -> None:
    """The environment chapter kernels inherit (set before papermill starts any)."""
    # see DESIGN "thread collapse"; the kernels papermill starts inherit this environment
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # tqdm bars inside a kernel become widget outputs that the static book cannot show;
    # the runner shows cell progress instead
    os.environ.setdefault("TQDM_DISABLE", "1")
