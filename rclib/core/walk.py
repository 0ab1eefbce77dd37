"""Walking an image folder without hanging: links followed as torchvision follows them, but never
into a cycle, never into a pseudo file system, and never past a bounded number of entries.

torchvision's ``ImageFolder`` walks with ``os.walk(followlinks=True)``: a class folder holding
``a -> .`` makes it (and any check that walks the same way) loop forever, and ``/proc`` leads
through ``/proc/<pid>/root`` to the whole machine. :func:`files` is that walk with three
bounds: a folder that is one of its own ancestors (same device and inode) is not entered again,
so a link cycle ends while every non-cyclic layout lists exactly what ``os.walk`` lists; folders
under ``/proc``, ``/sys`` and ``/dev`` are refused; and more than ``MAX_ENTRIES`` entries raise
:class:`TooLarge`. The order is torchvision's: by folder path, then file name.

Used by ``checks`` (the up-front ImageFolder check), ``data`` (the folder datasets) and
``artifacts`` (the data-folder fingerprint in every cache key).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

MAX_ENTRIES = 5_000_000  # directory entries one walk may visit (ImageNet's train set: 1.3M files)
PSEUDO = ("/proc", "/sys", "/dev")  # kernel file systems: endless or unreadable as image folders


class TooLarge(ValueError):
    """A folder walk that met a pseudo file system or more than ``MAX_ENTRIES`` entries."""


def pseudo(path: str | os.PathLike) -> bool:
    """Whether ``path`` resolves into ``/proc``, ``/sys`` or ``/dev``."""
    real = os.path.realpath(path)
    return any(real == p or real.startswith(p + "/") for p in PSEUDO)


def files(root: str | os.PathLike, max_entries: int = MAX_ENTRIES,
          skip: str | os.PathLike | None = None) -> Iterator[tuple[str, os.DirEntry]]:
    """``(folder path, entry)`` of every non-directory entry under ``root``, sorted by folder
    path then name, following links to folders except into a cycle (see the module docstring);
    the folder ``skip`` (the artifact cache, when it lies inside a data folder) is not entered.
    Raises :class:`TooLarge` for a pseudo file system or too many entries."""
    root = os.fspath(root)
    skipped = os.path.realpath(skip) if skip is not None else None
    if pseudo(root):
        raise TooLarge(f"{root} is in a kernel file system ({', '.join(PSEUDO)}), not an image folder")
    seen = 0
    found: list[tuple[str, str, os.DirEntry]] = []
    st = os.stat(root)
    stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [(root, ((st.st_dev, st.st_ino),))]
    while stack:
        here, ancestors = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue  # as os.walk: an unreadable folder is skipped
        seen += len(entries)
        if seen > max_entries:
            raise TooLarge(f"{root} holds more than {max_entries:,} entries")
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if not is_dir:
                found.append((here, e.name, e))
                continue
            if (e.is_symlink() and pseudo(e.path)) or (skipped and os.path.realpath(e.path) == skipped):
                continue
            try:
                s = e.stat()
            except OSError:
                continue
            ident = (s.st_dev, s.st_ino)
            if ident not in ancestors:  # a folder inside itself: a link cycle, entered once
                stack.append((e.path, ancestors + (ident,)))
    found.sort(key=lambda t: (t[0], t[1]))
    for folder, _, entry in found:
        yield folder, entry


def relative(folder: str, entry: os.DirEntry, root: str | os.PathLike) -> str:
    """``entry``'s path relative to ``root``, ``/``-separated."""
    return os.path.relpath(os.path.join(folder, entry.name), os.fspath(root)).replace(os.sep, "/")


def is_under(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` resolves to ``root`` or somewhere inside it."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
