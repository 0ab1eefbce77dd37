"""Command line: execute the chapters with papermill, then build the book with execution off.

    python -m rclib book [--profile P] [-p NAME VALUE ...] [--timeout S] [--no-build]
    python -m rclib run notebooks/00_baseline.ipynb [--profile P] [-p NAME VALUE ...] [-o OUT]
    python -m rclib build            # render what was executed last, without re-running
    python -m rclib retrain  --step STEP [STEP ...] [--rate R ...] [--all-seeds] [--profile P] [-p NAME VALUE ...]
    python -m rclib evaluate --step STEP [STEP ...] [--rate R ...] [--all-seeds] [--profile P] [-p NAME VALUE ...]
                             [--timeout S] [--join-timeout S]
    torchrun --nproc_per_node=N -m rclib retrain ...   # the same on N processes (rclib.distributed)
    python -m rclib gpu-check [--budget S] [--size auto|full|tiny]   # measure the paper setting here

Why papermill first and not Jupyter Book's own execution: its cache runs notebooks in file-name
order, reports a failing notebook only as a warning, and cannot see changed artifacts. Here each
chapter listed in ``_toc.yml`` runs in toc order into ``_build/src/`` (a copy of the book
sources), a failure stops everything with the notebook and cell named, and then
``jupyter-book build -W -n --keep-going`` renders those executed copies into ``_build/html``.

``retrain`` and ``evaluate`` compute Table 1's retrained models and their clean / FGSM / PGD-10
test counts as the cached artifacts chapters 04 and 05 read (``rclib.retrain``), in this process
or, launched by torchrun, on N processes with DistributedDataParallel (``rclib.distributed``);
a book built afterwards finds them and does not recompute them.

Every refusal happens before any work: exit status 2 and one line naming the option (a bad
``-p`` value, ``-p profile`` clashing with ``--profile``, an output path that would overwrite a
source notebook or cannot be written: ``rclib.outputs``, torchrun variables that do not fit:
``rclib.distributed.context``).

Used by ``make book``, the README and the notebook smoke tests.
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

from . import config, outputs
from .config import DEFAULT_PROFILE, PROFILES, project_root

BUILD = "_build"
STAGE = "src"  # _build/src: the book sources with executed notebooks
BOOK_FILES = ("_config.yml", "_toc.yml")
BOOK_DIRS = ("book",)  # copied as they are; notebooks among them are executed over the copies


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


def _environment() -> None:
    # see DESIGN "thread collapse"; the kernels papermill starts inherit this environment
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # tqdm bars inside a kernel become widget outputs that the static book cannot show;
    # the runner shows cell progress instead
    os.environ.setdefault("TQDM_DISABLE", "1")


STEP_COMMANDS = ("retrain", "evaluate")


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The ``-p NAME VALUE`` pairs as config overrides. Raises ``ValueError`` for options that
    clash: ``-p profile`` naming another profile than ``--profile`` (the run would check one and
    execute the other), or one name given twice with different values."""
    out: dict[str, Any] = {}
    for name, text in args.parameter:
        value = parse_value(text)
        if name == "profile":
            if value != args.profile:
                raise ValueError(f"-p profile {text!r} is not allowed: it clashes with --profile {args.profile!r}; "
                                 "choose the profile with --profile alone")
            continue
        if name in out and out[name] != value:
            raise ValueError(f"-p {name} is not allowed twice with different values ({out[name]!r} and {value!r})")
        out[name] = value
    return out


def refuse(err: BaseException) -> int:
    """One line on stderr and exit status 2: a refusal before anything runs."""
    print(f"FAILED before running anything: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def step_command(args: argparse.Namespace) -> int:
    """``retrain`` / ``evaluate``: check the options, the config, the steps, the rates and
    torchrun's environment (exit 2, before any process group or training starts), then run
    them (``rclib.distributed.run``)."""
    from . import distributed

    try:
        overrides = overrides_of(args)
        cfg = config.load(args.profile, **overrides)
        from . import retrain

        from .distributed import TRAJECTORY_STEP

        for step in args.step:
            if step == TRAJECTORY_STEP and args.command == "retrain":
                continue  # Alg 5's iterative retraining: one trajectory through every --rate
            retrain.check_step(step)
        rates = args.rate or ([cfg.prune_rate] if args.step != [TRAJECTORY_STEP] else list(cfg.prune_rates))
        for r in rates:
            if not 0 < r < 1:
                raise ValueError(f"--rate {r!r} is not allowed: a prune rate in (0, 1)")
        for option, value in (("--timeout", args.timeout), ("--join-timeout", args.join_timeout)):
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{option} {value!r} is not allowed: a finite number of seconds > 0")
        # torchrun's variables, checked together here rather than as a traceback inside run
        distributed.context(os.environ, cfg.device, args.timeout, args.join_timeout)
    except ValueError as err:
        return refuse(err)

    started = time.perf_counter()
    try:
        distributed.run(args.command, cfg, list(args.step), rates, list(cfg.seeds) if args.all_seeds else [cfg.seed],
                        timeout_s=args.timeout, progress=not args.quiet, join_timeout_s=args.join_timeout)
    except distributed.JoinFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.command} done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


# ---- gpu-check: one bounded measurement of the paper setting on this device (rclib.gpucheck)

def add_gpu_check(sub: Any) -> None:
    """The ``gpu-check`` subcommand's arguments."""
    p = sub.add_parser("gpu-check", help="measure the paper setting on this device within a time budget "
                       "(writes _build/gpu-check/gpu-check.json and .md)")
    p.add_argument("--budget", type=float, default=480, metavar="S",
                   help="seconds; stages that would start later are skipped and the report says so (default 480)")
    p.add_argument("--size", choices=("auto", "full", "tiny"), default="auto",
                   help="full: VGG16 at 224 px, the paper's batch sizes; tiny: seconds on a CPU; auto: full on CUDA")
    p.add_argument("--device", choices=config.DEVICES, default="auto")
    p.add_argument("--out", type=Path, default=None, help="folder for the report (default: _build/gpu-check)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def gpu_check(args: argparse.Namespace) -> int:
    """Run :func:`rclib.gpucheck.run`; exit 2 on a bad argument, before any work."""
    if not args.budget > 0:
        print(f"FAILED before running anything: --budget {args.budget!r} is not allowed: seconds > 0", file=sys.stderr)
        return 2
    try:
        config.resolve_device(args.device)
    except ValueError as err:
        print(f"FAILED before running anything: {err}", file=sys.stderr)
        return 2
    from . import gpucheck

    out = args.out or project_root() / BUILD / "gpu-check"
    report = gpucheck.run(out, args.budget, args.size, args.device, progress=not args.quiet)
    if not args.quiet:
        print(f"report: {out / 'gpu-check.md'} and {out / 'gpu-check.json'}"
              f"{'' if report['complete'] else ' (partial: the budget ran out)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rclib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("book", "run"):
        p = sub.add_parser(name, help="execute every toc chapter and build the book" if name == "book"
                           else "execute one chapter")
        if name == "run":
            p.add_argument("notebook", type=Path)
            p.add_argument("-o", "--output", type=Path, help="default: _build/src/<notebook path>")
        else:
            p.add_argument("--no-build", action="store_true", help="execute only; skip jupyter-book")
            p.add_argument("--jobs", type=int, default=None,
                           help="chapters executed at once after chapter 00 (default: 2 on a CPU machine with "
                                "2 or more cores, 1 with a GPU, whose memory one chapter at paper scale needs)")
        p.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
        p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="override a Config field in every chapter run (papermill -p); checked "
                            "before anything runs")
        p.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
        p.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    sub.add_parser("build", help="render the last executed notebooks into _build/html")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=None,
                       help="folder that receives _build/ (default: the project root)")
    for name in STEP_COMMANDS:
        p = sub.add_parser(name, help="retrain Table 1 models (cached artifacts); torchrun can launch it"
                           if name == "retrain" else "clean, FGSM and PGD-10 test counts of retrained models (cached)")
        p.add_argument("--step", nargs="+", required=True, metavar="STEP",
                       help="clean, alg7, alg7-no-margin, alg7-margin-only, alg7-pgd (rclib.retrain.STEPS); "
                       "retrain also takes alg5: Alg 5's trajectory stopping at every --rate (default: prune_rates)")
        p.add_argument("--rate", nargs="+", type=float, default=None, metavar="R",
                       help="global prune rates (default: the config's prune_rate)")
        p.add_argument("--all-seeds", action="store_true",
                       help="every seed of the config's seeds, as chapters 04 and 05 use them (default: seed)")
        p.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
        p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="override a Config field; checked before anything runs")
        p.add_argument("--timeout", type=float, default=1800,
                       help="seconds a process waits for the others at a barrier or collective (default 1800)")
        p.add_argument("--join-timeout", type=float, default=300, dest="join_timeout",
                       help="seconds a process waits for the others to join the process group at the start "
                            "(default 300; only with several processes)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_gpu_check(sub)
    args = parser.parse_args(argv)

    _environment()
    if args.command == "gpu-check":
        return gpu_check(args)
    if args.command in STEP_COMMANDS:
        return step_command(args)
    root = project_root()
    try:
        if args.out is not None:
            outputs.check_folder(args.out)
    except ValueError as err:
        return refuse(err)
    out = (args.out or root).resolve()
    if args.command == "build":
        return build_book(root, out)

    try:  # every chapter takes every field: one check of the merged config, before any work
        overrides = overrides_of(args)
        config.load(args.profile, **overrides)
        if args.command == "run":
            notebook = args.notebook
            if not notebook.is_file():
                raise ValueError(f"notebook {str(notebook)!r} is not allowed: no such notebook file")
            rel = notebook.resolve().relative_to(root) if notebook.resolve().is_relative_to(root) else Path(notebook.name)
            output = args.output or out / BUILD / STAGE / rel
            outputs.check_output(output, notebook, root)
    except ValueError as err:
        return refuse(err)
    params = {"profile": args.profile, **overrides}
    if args.command == "run":
        try:
            seconds = run_notebook(notebook, output, params, args.timeout, progress=not args.quiet)
        except ChapterFailed as err:
            print(f"FAILED: {err}", file=sys.stderr)
            return 1
        print(f"{notebook} ran in {seconds:.1f} s -> {output}")
        return 0

    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        return refuse(ValueError(f"--jobs {args.jobs!r} is not allowed: a whole number >= 1"))
    notebooks = execution_order(toc_notebooks(root))
    src = stage(root, out)
    os.environ["RCLIB_STAGE"] = str(src)  # where gathering pages find the executed chapters
    started = time.perf_counter()
    try:
        execute_all(root, src, notebooks, args, params, jobs)
    except ChapterFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print(f"executed {len(notebooks)} chapters in {time.perf_counter() - started:.1f} s", flush=True)
    if args.no_build:
        return 0
    code = build_book(root, out)
    if code == 0:
        print(f"book: {out / BUILD / 'html' / 'index.html'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
