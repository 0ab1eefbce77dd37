"""The command line runner: toc parsing, -p values, failure reporting, the papermill route."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from rclib.__main__ import main
from rclib.report.runner import AFTER, ChapterFailed, parse_value, run_notebook, side_by_side, toc_notebooks


def test_parse_value_reads_like_papermill():
    assert parse_value("-1") == -1 and isinstance(parse_value("-1"), int)
    assert parse_value("0.03") == 0.03
    assert parse_value("1e-3") == 1e-3
    assert parse_value("True") is True
    assert parse_value("None") is None
    assert parse_value("[0.5, 0.9]") == [0.5, 0.9]
    assert parse_value("digits") == "digits"


def test_toc_order_and_only_notebooks(tmp_path):
    (tmp_path / "nb").mkdir()
    for name in ("b", "a"):
        nbformat.write(new_notebook(), tmp_path / "nb" / f"{name}.ipynb")
    (tmp_path / "intro.md").write_text("# hi")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n- chapters:\n  - file: nb/b\n  - file: nb/a.ipynb\n  - file: intro\n")
    assert toc_notebooks(tmp_path) == [Path("nb/b.ipynb"), Path("nb/a.ipynb")]


def _notebook(path: Path, *sources: str) -> Path:
    cells = [new_code_cell("x = 1", metadata={"tags": ["parameters"]})] + [new_code_cell(s) for s in sources]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                       "language": "python"}}), path)
    return path


def test_failure_names_notebook_cell_and_error(tmp_path):
    nb = _notebook(tmp_path / "boom.ipynb", "y = x + 1", "raise ValueError('x=2 is not allowed')")
    with pytest.raises(ChapterFailed) as err:
        run_notebook(nb, tmp_path / "out.ipynb", {"x": 2}, timeout=120, progress=False)
    msg = str(err.value)
    assert "boom.ipynb" in msg and "cell" in msg and "ValueError" in msg and "x=2 is not allowed" in msg


def test_parameters_are_injected_and_hidden(tmp_path):
    nb = _notebook(tmp_path / "ok.ipynb", "print(x * 2)")
    out = tmp_path / "out.ipynb"
    run_notebook(nb, out, {"x": 21}, timeout=120, progress=False)
    result = nbformat.read(out, as_version=4)
    injected = [c for c in result.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "remove-cell" in injected[0].metadata.tags
    assert "42" in result.cells[-1].outputs[0]["text"]


def _main(*args: str) -> int:
    """``python -m rclib ARGS`` in this process, its environment changes undone afterwards (a
    subprocess imports torch again for the checks that size the model: 2-3 s each)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("TQDM_DISABLE", "OMP_WAIT_POLICY"):  # main sets them; restored afterwards
            mp.delenv(name, raising=False)
        return main(list(args))


def test_cli_run_exits_nonzero_on_failure(tmp_path, capsys):
    nb = _notebook(tmp_path / "bad.ipynb", "assert seed == 0, 'seed must be 0'")
    assert _main("run", str(nb), "-p", "seed", "5", "--quiet", "-o", str(tmp_path / "o.ipynb")) == 1
    assert "seed must be 0" in capsys.readouterr().err


@pytest.mark.parametrize("args, text", [
    (["-p", "epsilom", "0.2"], "did you mean 'epsilon'?"),
    (["-p", "prune_rate", "1.5"], "prune_rate=1.5 is not allowed"),
    (["-p", "width", "1000000"], "width=1000000 is not allowed"),
])
def test_book_validates_the_merged_config_before_running_anything(tmp_path, capsys, args, text):
    start = time.perf_counter()
    code = _main("book", "--profile", "smoke", "--out", str(tmp_path), *args)
    err = capsys.readouterr().err
    assert code == 2 and text in err, err
    assert "FAILED before running anything" in err
    assert not (tmp_path / "_build").exists()  # nothing staged, nothing executed
    assert time.perf_counter() - start < 60  # seconds, not after chapter 00 has trained


def test_exit_code_reaches_the_shell(tmp_path):
    """``python -m rclib`` exits with ``main``'s code (the tests above call ``main`` directly)."""
    proc = subprocess.run([sys.executable, "-m", "rclib", "book", "--profile", "smoke", "--out", str(tmp_path),
                           "-p", "epsilom", "0.2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean 'epsilon'?" in proc.stderr, proc.stderr


def test_dead_kernel_names_the_cell_and_keeps_the_partial_notebook(tmp_path):
    nb = _notebook(tmp_path / "dies.ipynb", "y = x + 1", "import os\nos._exit(9)  # as the OOM killer would", "z = 3")
    out = tmp_path / "out.ipynb"
    with pytest.raises(ChapterFailed) as err:
        run_notebook(nb, out, {"x": 1}, timeout=120, progress=False)
    msg = str(err.value)
    assert "DeadKernelError" in msg and "stopped in cell" in msg and "'import os'" in msg, msg
    assert str(out) in msg and out.exists()
    partial = nbformat.read(out, as_version=4)
    started = [c.metadata.papermill["start_time"] is not None for c in partial.cells]
    assert started == [True, True, True, True, False]  # the cell after the one that died never ran


def test_cli_rejects_unknown_profile(capsys):
    with pytest.raises(SystemExit):
        main(["book", "--profile", "huge"])
    assert "huge" in capsys.readouterr().err


def test_side_by_side_waits_only_for_what_is_in_its_batch_and_stops_on_a_failure(capsys):
    after, before = next(iter((k, v) for k, v in AFTER.items()))
    other = Path("notebooks/02_weight_sharing.ipynb")
    log: list[tuple[str, Path]] = []

    def execute(nb: Path, bar: bool) -> float:
        log.append(("start", nb))
        time.sleep(0.05)
        if nb == failing:
            raise ChapterFailed(f"{nb} failed on purpose")
        log.append(("end", nb))
        return 0.05

    failing = None
    side_by_side([after, before, other], 2, iter(range(1, 4)), 3, execute, "test", False)
    assert log.index(("end", before)) < log.index(("start", after))  # AFTER honoured inside a batch
    log.clear()
    side_by_side([after], 2, iter(range(1, 4)), 1, execute, "test", False)  # its dependency ran earlier
    assert log == [("start", after), ("end", after)]
    log.clear()
    failing = before
    with pytest.raises(ChapterFailed, match="failed on purpose"):
        side_by_side([after, before], 2, iter(range(1, 4)), 2, execute, "test", False)
    assert ("start", after) not in log  # nothing new starts after a failure
