"""Shared fixtures for the unit tests: one thread, a private artifact cache, tiny configs/models.

``OMP_WAIT_POLICY=PASSIVE`` must be in the environment before torch starts its thread pool
(spinning OpenMP threads starve other processes on small machines), so it is set here at
import time, before anything imports torch.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from rclib.core import config
from rclib.nn import models  # noqa: E402
from rclib.nn.train import Optimiser

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_artifacts(tmp_path, monkeypatch):
    """Every test caches into its own temporary folder, never into data/artifacts."""
    monkeypatch.setenv("RCLIB_ARTIFACTS", str(tmp_path / "artifacts"))


@pytest.fixture
def tiny_cfg():
    """The smoke profile cut down further: 128 train / 64 test digits, one epoch."""
    return config.load("smoke", epsilon=0.1, train_size=128, test_size=64, epochs=1)


@pytest.fixture
def tiny_model():
    """A very small VGG16-topology net for 1x8x8 inputs and 10 classes (width 8, hidden 32)."""
    cfg = config.load("smoke", width=8, hidden=32)
    return models.build(cfg, 10, (1, 8, 8), (0.3,), (0.3,))


from toys import PAPER_SMALL, SMOKE_BOOK_PARAMS, ilsvrc_folder, paper_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SMOKE_OVERRIDES = tuple(a for name, value in SMOKE_BOOK_PARAMS.items() for a in ("-p", name, str(value)))

# The two whole-book builds, and the chapter reruns that compare against them, run as background
# processes started as soon as the session knows it needs them, while the unit tests run in this
# process; the tests that read them are moved to the end of the session, by which time they are
# usually done. On these 2-core machines that overlap is most of what keeps `make test` short.
BOOK_FIXTURES = ("smoke_book", "paper_book", "rerun_00")
_builds: dict[str, tuple[subprocess.Popen, Path, Path]] = {}
WARM_01 = Path("warm") / "01_pruning.ipynb"  # chapter 01 rerun on the smoke build's cache
# The smoke job (book + rerun, about 115 s of CPU) is the longest chain; the shorter jobs yield to
# it and to the unit tests, and take the cores that they leave idle.
NICE = {"paper_book": 5, "rerun_00": 5}


def _rclib(*args: str) -> list[str]:
    return [sys.executable, "-m", "rclib", *args]


def _book_command(name: str, out: Path) -> list[list[str]]:
    """The commands of one background job, run one after the other, writing under ``out``."""
    if name == "smoke_book":  # the book, then chapter 01 again on the cache it has just filled
        return [_rclib("book", "--profile", "smoke", *SMOKE_OVERRIDES, "--quiet", "--out", str(out),
                       "--timeout", "600"),
                _rclib("run", "notebooks/01_pruning.ipynb", "--profile", "smoke", *SMOKE_OVERRIDES, "--quiet",
                       "--timeout", "600", "-o", str(out / WARM_01))]
    if name == "rerun_00":  # chapter 00 from an empty cache, as the smoke build runs it
        return [_rclib("run", "notebooks/00_baseline.ipynb", "--profile", "smoke", *SMOKE_OVERRIDES, "--quiet",
                       "--timeout", "600", "-o", str(out / "00_baseline.ipynb"))]
    # the paper's setting on a fake ILSVRC folder with toys.PAPER_SMALL's overrides (sizes, and an
    # untrained head); execution only (the smoke build checks the HTML rendering)
    params = dict(PAPER_SMALL, data_dir=str(ilsvrc_folder(out / "val")), weights=str(paper_weights(out)))
    args = [a for name, value in params.items() for a in ("-p", name, str(value))]
    return [_rclib("book", "--profile", "paper", *args, "--quiet", "--no-build", "--out", str(out),
                   "--timeout", "600")]


def _start_build(name: str, factory: pytest.TempPathFactory) -> None:
    out = factory.mktemp(name)
    log = out / "build.log"
    env = {**os.environ, "RCLIB_ARTIFACTS": str(out / "artifacts")}
    commands = _book_command(name, out)
    cmd = commands[0] if len(commands) == 1 else ["sh", "-c", " && ".join(shlex.join(c) for c in commands)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                preexec_fn=(lambda: os.nice(NICE[name])) if NICE.get(name) else None)
    _builds[name] = (proc, out, log)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so only builds that are needed start
def pytest_collection_modifyitems(session, config, items):
    needs = [i for i in items if set(BOOK_FIXTURES) & set(getattr(i, "fixturenames", ()))]
    items[:] = [i for i in items if i not in needs] + needs
    if config.getoption("collectonly"):
        return
    factory = config._tmp_path_factory  # the session's TempPathFactory (tmp_path_factory fixture)
    for name in BOOK_FIXTURES:
        if any(name in i.fixturenames for i in needs):
            _start_build(name, factory)


def pytest_sessionfinish(session, exitstatus):
    for proc, _, _ in _builds.values():  # an interrupted session leaves no build running
        if proc.poll() is None:
            proc.kill()


def _finished(name: str) -> Path:
    proc, out, log = _builds[name]
    code = proc.wait(timeout=1800)
    assert code == 0, log.read_text()[-6000:]
    return out


@pytest.fixture(scope="session")
def smoke_book():
    """The whole book built once per test session, as `make book` does, under the smoke profile
    with overrides that every chapter must receive: ``python -m rclib book --profile smoke
    -p seed 3 -p width 4 -p seeds "[0, 3]"`` into a temporary folder, with its own artifacts.

    Returns the output folder: executed chapters in ``_build/src``, HTML in ``_build/html``, and
    chapter 01 executed a second time on the cache the build filled in ``WARM_01``.
    The chapter and book tests all read this one build instead of executing again.
    """
    return _finished("smoke_book")


@pytest.fixture(scope="session")
def rerun_00():
    """Chapter 00 executed once more exactly as the smoke build executes it, from an empty cache
    of its own; returns the folder holding ``00_baseline.ipynb``."""
    return _finished("rerun_00")


@pytest.fixture(scope="session")
def paper_book():
    """Every chapter and page executed under ``--profile paper`` on a fake ILSVRC-style folder
    (``toys.ilsvrc_folder``) with ``toys.PAPER_SMALL``'s size-reducing overrides and a local
    weights file whose 1000-class head does not fit the folder (``toys.paper_weights``).

    Returns the output folder (executed notebooks in ``_build/src``).
    """
    return _finished("paper_book")


@pytest.fixture(scope="session")
def trained_toy():
    """A tiny VGG trained for a few seconds on 256 digits (about 50% test accuracy), with its
    splits; shared by the attack tests (training it once keeps them fast)."""
    from rclib.data import datasets
    from rclib.nn import train

    s = datasets.load(config.load("smoke", train_size=256, test_size=64, batch_size=32))
    cfg = config.load("smoke", width=8, hidden=32, dropout=0.0)
    model = models.build(cfg, 10, s.input_shape, s.mean, s.std)
    train.fit(model, s.train, optimiser=Optimiser(lr=3e-3), epochs=10, progress=False)
    model.zero_grad(set_to_none=True)  # fit leaves the last step's gradients behind
    return model, s
