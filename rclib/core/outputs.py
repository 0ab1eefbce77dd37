"""Where the command line may write: judged before any chapter runs, so that the user's own
files are never overwritten and an hour of work never ends in an unwritable output.

:func:`check_output` (``python -m rclib run -o OUT``) refuses a new path not ending in ``.ipynb``,
a path that is a source notebook
(the chapter itself or any notebook of the checkout that is not under ``_build``), an existing
folder, device, pipe or socket (``-o /dev/null`` would run the whole chapter, then fail to read
back what it wrote), a file that cannot be written, or a folder that cannot be created.
:func:`check_folder` (``--out``) refuses a path that is a file, or a folder that cannot be
created. Each raises ``ValueError`` naming the option, the value and what is allowed; the CLI
turns it into exit status 2 and one line. Used by ``rclib.__main__``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

BUILD = "_build"  # executed copies live under <root>/_build: never a source


def _creatable(path: Path, option: str) -> None:
    """``path`` (absent) can be made: its nearest existing ancestor is a writable folder."""
    parent = path
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path} is not allowed: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} is not allowed: {parent} is not writable")


def check_folder(path: Path, option: str = "--out") -> None:
    """``path`` is, or can become, a writable folder."""
    path = Path(path)
    if os.path.lexists(path):
        if not path.is_dir():
            raise ValueError(f"{option} {path} is not allowed: it is a file; give a folder (it receives {BUILD}/)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path} is not allowed: the folder is not writable")
        return
    _creatable(path, option)


def source_notebook(path: Path, root: Path) -> bool:
    """Whether ``path`` is a notebook of the checkout ``root`` outside ``_build``: a chapter or
    page that an executed copy must never replace."""
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(root))
    if real.suffix != ".ipynb" or not real.is_relative_to(root):
        return False
    rel = real.relative_to(root)
    return rel.parts[0] not in (BUILD, ".venv") and real.exists()


def check_output(output: Path, notebook: Path, root: Path, option: str = "-o/--output") -> None:
    """``output`` may receive ``notebook``'s executed copy (see the module docstring)."""
    output = Path(output)
    if output.suffix != ".ipynb" and not os.path.exists(output):
        raise ValueError(f"{option} {output} is not allowed: an .ipynb file (the executed notebook)")
    if os.path.realpath(output) == os.path.realpath(notebook) or source_notebook(output, root):
        raise ValueError(f"{option} {output} is not allowed: it is a source notebook of this checkout, which "
                         f"the executed copy would overwrite; give a path under {BUILD}/ or outside the checkout")
    if os.path.lexists(output):
        mode = os.stat(output).st_mode if os.path.exists(output) else os.lstat(output).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{option} {output} is not allowed: it is not a regular file (a folder, device or "
                             "pipe cannot hold the executed notebook, which is read back after the run)")
        if not os.access(output, os.W_OK):
            raise ValueError(f"{option} {output} is not allowed: the file is not writable")
        return
    _creatable(output.parent if str(output.parent) else Path("."), option)
