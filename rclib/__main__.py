"""Command line: execute the chapters with papermill, then build the book with execution off.

    python -m rclib book [--profile P] [-p NAME VALUE ...] [--timeout S] [--no-build]
    python -m rclib run notebooks/00_baseline.ipynb [--profile P] [-p NAME VALUE ...] [-o OUT]
    python -m rclib build            # render what was executed last, without re-running
    python -m rclib retrain  --step STEP [STEP ...] [--rate R ...] [--all-seeds] [--profile P] [-p NAME VALUE ...]
    python -m rclib evaluate --step STEP [STEP ...] [--rate R ...] [--all-seeds] [--profile P] [-p NAME VALUE ...]
                             [--timeout S] [--join-timeout S]
    torchrun --nproc_per_node=N -m rclib retrain ...   # the same on N processes (rclib.experiments.torchrun)
    python -m rclib gpu-check [--budget S] [--size auto|full|tiny]   # measure the paper setting here

``book``, ``run`` and ``build`` execute the chapters with papermill and render them
(:mod:`rclib.report.runner`).

``retrain`` and ``evaluate`` compute Table 1's retrained models and their clean / FGSM / PGD-10
test counts as the cached artifacts chapters 04 and 05 read (``rclib.experiments.retrain``), in this process
or, launched by torchrun, on N processes with DistributedDataParallel (``rclib.experiments.torchrun``);
a book built afterwards finds them and does not recompute them.

Every refusal happens before any work: exit status 2 and one line naming the option (a bad
``-p`` value, ``-p profile`` clashing with ``--profile``, an output path that would overwrite a
source notebook or cannot be written: ``rclib.core.outputs``, torchrun variables that do not fit:
``rclib.experiments.distributed.context``).

Used by ``make book``, the README and the notebook smoke tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rclib.core import config, outputs
from rclib.core.config import DEFAULT_PROFILE, PROFILES
from rclib.core.paths import project_root
from rclib.experiments import distributed, gpucheck, setup, torchrun
from rclib.experiments.torchrun import TRAJECTORY_STEP
from rclib.experiments.variants import RETRAININGS
from rclib.report import lab
from rclib.report.runner import (
    BUILD,
    STAGE,
    ChapterFailed,
    build_book,
    default_jobs,
    environment,
    execute_all,
    execution_order,
    parse_value,
    run_notebook,
    stage,
    toc_notebooks,
)

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
    them (``rclib.experiments.torchrun.run``)."""
    try:
        overrides = overrides_of(args)
        cfg = setup.load(args.profile, **overrides)
        for step in args.step:
            if step == TRAJECTORY_STEP and args.command == "retrain":
                continue  # Alg 5's iterative retraining: one trajectory through every --rate
            if step not in RETRAININGS:
                raise ValueError(f"--step {step!r} is not allowed: one of {', '.join(RETRAININGS)}"
                                 + (f" or {TRAJECTORY_STEP}" if args.command == "retrain" else ""))
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
        torchrun.run(args.command, cfg, list(args.step), rates, list(cfg.seeds) if args.all_seeds else [cfg.seed],
                        timeout_s=args.timeout, progress=not args.quiet, join_timeout_s=args.join_timeout)
    except distributed.JoinFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.command} done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


# ---- gpu-check: one bounded measurement of the paper setting on this device (rclib.experiments.gpucheck)

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
    """Run :func:`rclib.experiments.gpucheck.run`; exit 2 on a bad argument, before any work."""
    if not args.budget > 0:
        print(f"FAILED before running anything: --budget {args.budget!r} is not allowed: seconds > 0", file=sys.stderr)
        return 2
    try:
        config.resolve_device(args.device)
    except ValueError as err:
        print(f"FAILED before running anything: {err}", file=sys.stderr)
        return 2
    out = args.out or project_root() / BUILD / "gpu-check"
    report = gpucheck.run(out, args.budget, args.size, args.device, progress=not args.quiet)
    if not args.quiet:
        print(f"report: {out / 'gpu-check.md'} and {out / 'gpu-check.json'}"
              f"{'' if report['complete'] else ' (partial: the budget ran out)'}")
    return 0


def open_lab(root: Path, out: Path, launch: bool = True) -> int:
    """``python -m rclib lab``: copies of the executed chapters with their glued values in the
    prose (:mod:`rclib.report.lab`) under ``<out>/_build/lab``, opened in JupyterLab; without an
    executed book, the source chapters (their glue roles then show names, not values)."""
    src = out / BUILD / STAGE
    if any(src.glob("notebooks/*.ipynb")):
        dest = out / BUILD / "lab"
        filled = lab.lab_copies(src, dest)
        print(f"{dest}: {len(filled)} chapters, {sum(filled.values())} glued values written into the prose")
        folder = dest
    else:
        print(f"no executed book under {src} (run `make book` first): opening the source chapters, whose "
              "glued values show as their names", file=sys.stderr)
        folder = root
    if not launch:
        return 0
    return subprocess.call([str(Path(sys.executable).with_name("jupyter")), "lab", str(folder / "notebooks")])


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
    lab_parser = sub.add_parser("lab", help="JupyterLab on the last executed chapters, glued values written into the prose")
    lab_parser.add_argument("--no-launch", action="store_true", help="write _build/lab only")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=None,
                       help="folder that receives _build/ (default: the project root)")
    for name in STEP_COMMANDS:
        p = sub.add_parser(name, help="retrain Table 1 models (cached artifacts); torchrun can launch it"
                           if name == "retrain" else "clean, FGSM and PGD-10 test counts of retrained models (cached)")
        p.add_argument("--step", nargs="+", required=True, metavar="STEP",
                       help=f"{', '.join(RETRAININGS)} (rclib.experiments.variants.RETRAININGS); "
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

    environment()
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
    if args.command == "lab":
        return open_lab(root, out, launch=not args.no_launch)

    try:  # every chapter takes every field: one check of the merged config, before any work
        overrides = overrides_of(args)
        setup.load(args.profile, **overrides)
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
