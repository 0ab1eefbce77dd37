"""Cached results: ``data/artifacts/<profile>/<step>-<hash>/`` with safetensors + JSON.

Keys
  The key hashes the config fields a step depends on AND the rclib source (``Config.digest``)
  AND the content of the files the step reads (:func:`content_fingerprint`), so a change of any
  of them makes a fresh directory and the stale one is never read:

  * ``weights`` given as a file: the sha256 of its bytes (hashed once per process for a given
    path, size, mtime and inode, so a 500 MB file costs one read per run). Replacing the file at
    the same path changes the key.
  * ``data_dir`` of a dataset read from disk (``imagenet``, ``folder``, and the downloaded files of
    ``mnist``/``fashion_mnist``/``cifar10``): a cheap fingerprint of every file under the folder,
    its relative path, size and mtime (never its bytes). Renaming, resizing or touching an image
    changes the key. The artifact root itself is skipped.
  * where and how it was computed (:func:`rclib.core.accel.compute_kind`): ``cpu`` or
    ``cuda:<GPU name>``, the effective precision (fp32 or bf16) and, on CUDA, the channels_last
    layout. Results of a CPU and of a GPU, or of fp32 and bf16, never share an entry.

Writes
  Everything goes into a unique temporary sibling folder, which is renamed into place only when
  complete, so an interrupted run leaves no half-written artifact. A key names one result, so
  when another process has already put a valid artifact under the same key, ``save`` drops its
  own copy and treats the save as done (the two are equal). A damaged occupant, or a plain file,
  is first renamed aside to a unique ``.<name>.trash-*`` sibling and only then deleted, so no
  process ever deletes a folder that another one is renaming. Several processes may therefore
  save and load the same key at once.

Key material
  The manifest also records everything the key was computed from (:func:`record`): the step,
  the settings it depends on, the rclib source fingerprint, the disk-content fingerprint and the
  compute kind. A reader serves an entry only when that record equals what it asks for, so a
  folder copied or linked under another key (seed 1's folder replaced by seed 0's) is refused
  with ``its manifest records other key material (seed: 0, asked 1)`` and recomputed.

Damage
  ``manifest.json`` lists the files (``weights.safetensors``, ``metrics.json``, nothing else) and
  a sha256 for each. On load, any of these means "recompute", with the warning
  ``ignoring damaged artifact <path> (<reason>); it will be recomputed`` and never a crash:
  the path is a file, not a folder; the manifest is missing or not JSON; it names any other file
  (a path outside the folder, such as ``/dev/zero``, is refused unread); a listed file is missing,
  not a regular file, or fails its checksum; the JSON or safetensors cannot be parsed; the
  entry itself is a link (a link out of the cache is refused unread), or the manifest is not a
  regular file (a FIFO would block, a link to ``/dev/zero`` never end) or is larger than
  ``MAX_MANIFEST`` bytes; the recorded key material differs from what is asked; the metrics
  break :func:`rclib.core.verify.check_metrics` (an accuracy outside [0, 1], NaN, a string where a
  number belongs) or a floating-point tensor is not finite. Nothing is ever unpickled. A caller may also pass ``check(tensors, metrics)`` to :func:`cached`; when it
  raises ``KeyError``, ``IndexError``, ``TypeError``, ``ValueError`` or ``RuntimeError`` (metrics
  lack a key, tensors have the wrong names or shapes), the warning is
  ``ignoring unusable artifact <path> (<error>); it will be recomputed``. Either way the
  rejected artifact is moved aside and the recomputed one takes its place.

Read-only cache
  When the cache cannot be written (a read-only mount, no permission), results are computed and
  used but not stored, with the warning ``artifact cache ... is not writable (...); results are
  not stored``; reading it works as usual.

The root is ``$RCLIB_ARTIFACTS`` when set (tests use a temporary folder), else
``<project>/data/artifacts``. ``make clean`` removes it.

Used by ``experiments`` (every chapter's cached steps).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from rclib.core import accel, verify, walk
from rclib.core.config import DISK_DATASETS, Config
from rclib.core.keys import Step
from rclib.core.paths import project_root, resolve_path, source_fingerprint

WEIGHTS = "weights.safetensors"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
KNOWN_FILES = (WEIGHTS, METRICS)
CHECK_ERRORS = (KeyError, IndexError, TypeError, ValueError, RuntimeError)
# where torchvision keeps each dataset under data_dir (the rest of data_dir is not read)
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}
RENAME_ATTEMPTS = 20
MAX_MANIFEST = 1 << 20  # bytes: a manifest lists two files and a key record; more is damage
# errors that mean "this cache cannot be written here", as opposed to a bug or a full disk
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)

Tensors = dict[str, torch.Tensor]
Metrics = dict[str, Any]


def root() -> Path:
    env = os.environ.get("RCLIB_ARTIFACTS")
    return Path(env) if env else project_root() / "data" / "artifacts"


_FILE_HASHES: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime, inode): a replaced file is re-hashed."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _sha256(path)
    return _FILE_HASHES[key]


def _folder_listing(folder: Path) -> list[str]:
    """``relative/path size mtime_ns`` for every file under ``folder`` (links followed, as
    torchvision's ImageFolder does, but never into a cycle or a kernel file system, and at most
    ``walk.MAX_ENTRIES`` entries: :func:`rclib.core.walk.files`). The artifact root is skipped."""
    out: list[str] = []
    for here, e in walk.files(folder, skip=root()):
        try:
            s = e.stat()
        except (FileNotFoundError, NotADirectoryError):  # a dangling link: no file to read
            continue
        out.append(f"{walk.relative(here, e, folder)}\0{s.st_size}\0{s.st_mtime_ns}")
    return sorted(out)


def content_fingerprint(cfg: Config, names: tuple[str, ...]) -> str:
    """A hash of the disk content that the fields ``names`` point at, or ``""`` when they point
    at none (built-in data, no weights file): then the key is ``cfg.digest(names)`` alone."""
    parts = []
    if "weights" in names and cfg.weights not in ("none", "imagenet"):
        path = resolve_path(cfg.weights)
        parts.append(f"weights\0{_file_sha256(path) if path.is_file() else 'absent'}")
    if "data_dir" in names and (cfg.dataset in DISK_DATASETS or cfg.dataset in TORCHVISION_FOLDERS):
        folder = resolve_path(cfg.data_dir) / TORCHVISION_FOLDERS.get(cfg.dataset, "")
        if folder.is_dir():  # a torchvision dataset not yet downloaded has no files to key on
            parts.append("data_dir\0" + "\n".join(_folder_listing(folder)))
    if not parts:
        return ""
    return hashlib.sha256("\n\n".join(parts).encode()).hexdigest()


def key(digest: str, kind: str, content: str = "") -> str:
    """The 12 hex digits naming an artifact: config digest, compute kind and disk content."""
    return hashlib.sha256(f"{digest}\0{kind}\0{content}".encode()).hexdigest()[:12]


def location(cfg: Config, step: Step, content: str | None = None, kind: str | None = None) -> Path:
    """Where ``step`` of ``cfg`` lives, keyed by the fields the step reads (``step.fields()``),
    by the content of the files they name (``content``: :func:`content_fingerprint`, computed
    when not given) and by where it is computed (``kind``: :func:`rclib.core.accel.compute_kind` of
    ``cfg``'s device when not given; a test may pass another device's kind)."""
    names = step.fields()
    content = content_fingerprint(cfg, names) if content is None else content
    kind = accel.compute_kind(cfg) if kind is None else kind
    return root() / cfg.profile / f"{step.name}-{key(cfg.digest(names), kind, content)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Damaged(Exception):
    """An artifact folder that must not be served; the message says why."""


def record(cfg: Config, step: Step, content: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """The key material of an entry (what :func:`location` hashes), as the manifest stores it:
    step, settings, rclib source fingerprint, disk-content fingerprint, compute kind. Same
    arguments as :func:`location`."""
    names = step.fields()
    content = content_fingerprint(cfg, names) if content is None else content
    kind = accel.compute_kind(cfg) if kind is None else kind
    out = {"step": step.name, "config": {n: getattr(cfg, n) for n in names}, "compute": kind,
           "source": source_fingerprint(), "content": content}
    return json.loads(json.dumps(out))  # tuples as lists: the form it has when read back


def _manifest(path: Path) -> Any:
    """The parsed manifest, refused unread when it is not a small regular file."""
    try:
        st = os.lstat(path / MANIFEST)
    except FileNotFoundError:
        raise Damaged(f"{MANIFEST} is missing") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO blocks forever, a link to /dev/zero never ends
        raise Damaged(f"{MANIFEST} is not a regular file; refused unread")
    if st.st_size > MAX_MANIFEST:
        raise Damaged(f"{MANIFEST} has {st.st_size:,} bytes, more than {MAX_MANIFEST:,}; refused unread")
    with open(path / MANIFEST, "rb") as f:
        return json.loads(f.read(MAX_MANIFEST + 1))


def recorded(path: Path) -> dict[str, Any] | None:
    """The key material an entry's manifest records (None when it records none or cannot be
    read): what ``save(..., info=)`` wrote. For inspection and for tests that rewrite an entry."""
    try:
        manifest = _manifest(Path(path))
    except (Damaged, OSError, ValueError):
        return None
    info = manifest.get("info") if isinstance(manifest, dict) else None
    return info if isinstance(info, dict) else None


def _verified(path: Path, expect: dict[str, Any] | None = None) -> dict[str, str]:
    """The manifest's ``{file: sha256}`` once every listed file checks out and, with ``expect``,
    once its key record equals ``expect``; raises :class:`Damaged` otherwise."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):  # a link may lead out of the cache, or to another key's entry
        raise Damaged("a link, not a folder of the cache; refused unread")
    if not stat.S_ISDIR(mode):
        raise Damaged("not a folder")
    manifest = _manifest(path)
    if expect is not None:
        diff = verify.key_differences(manifest.get("info") if isinstance(manifest, dict) else None, expect)
        if diff:
            raise Damaged(f"its manifest records other key material ({diff})")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or METRICS not in files:
        raise Damaged(f"{MANIFEST} does not list {METRICS}")
    # only the two known names are ever opened: a manifest cannot point outside its folder
    for name in files:
        if name not in KNOWN_FILES:
            raise Damaged(f"{MANIFEST} names {name!r}, not one of {', '.join(KNOWN_FILES)}; refused unread")
    for name, digest in files.items():
        try:
            mode = os.lstat(path / name).st_mode
        except FileNotFoundError:
            raise Damaged(f"{name} is missing") from None
        if not stat.S_ISREG(mode):  # a link or device (/dev/zero) would hang or escape the checksum
            raise Damaged(f"{name} is not a regular file")
        if _sha256(path / name) != digest:
            raise Damaged(f"checksum mismatch in {path / name}")
    return files


def _read(path: Path, expect: dict[str, Any] | None = None) -> tuple[Tensors | None, Metrics]:
    files = _verified(path, expect)
    metrics = json.loads((path / METRICS).read_text())
    if not isinstance(metrics, dict):
        raise Damaged(f"{METRICS} holds a {type(metrics).__name__}, not an object")
    verify.check_metrics(metrics)
    tensors = load_file(str(path / WEIGHTS)) if WEIGHTS in files else None
    verify.check_tensors(tensors)
    return tensors, metrics


def _intact(path: Path) -> bool:
    try:
        _verified(path)
        return True
    except Exception:
        return False


def discard(path: Path) -> None:
    """Remove the artifact (folder or stray file) at ``path``, safely under concurrency: it is
    renamed aside to a unique name first, so only this process deletes what it moved."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # already gone (another process discarded it)
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def save(path: Path, tensors: Tensors | None, metrics: Metrics,
         info: dict[str, Any] | None = None) -> Path:
    """Write tensors (safetensors) and metrics (JSON) to ``path`` atomically; return ``path``.

    A valid artifact already at ``path`` (saved by another process under the same key) is kept
    and this copy dropped; a damaged one, or a plain file, is discarded and replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files = {}
        if tensors is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            files[WEIGHTS] = _sha256(tmp / WEIGHTS)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1, sort_keys=True))
        files[METRICS] = _sha256(tmp / METRICS)
        (tmp / MANIFEST).write_text(json.dumps({"files": files, "info": info or {}}, indent=1))
        for _ in range(RENAME_ATTEMPTS):
            try:
                os.rename(tmp, path)  # atomic; refuses a non-empty folder or a file in the way
                return path
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            if _intact(path):  # another process won the race with an equal result
                shutil.rmtree(tmp, ignore_errors=True)
                return path
            discard(path)
        raise OSError(f"could not move {tmp} to {path}: {RENAME_ATTEMPTS} attempts raced with other writers")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _warn(path: Path, kind: str, err: BaseException) -> None:
    reason = " ".join(str(err).split())  # one line, even for torch's multi-line key listings
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    warnings.warn(f"ignoring {kind} artifact {path} ({reason}); it will be recomputed", stacklevel=3)


def load(path: Path, expect: dict[str, Any] | None = None) -> tuple[Tensors | None, Metrics] | None:
    """``(tensors, metrics)`` when ``path`` holds a complete, intact artifact whose recorded key
    material equals ``expect`` (:func:`record`; not compared when None), else ``None`` (with a
    warning when something is there but damaged; see the module docstring)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        return _read(path, expect)
    except Exception as err:  # Damaged, bad JSON, bad safetensors header, a file vanishing, ...
        _warn(path, "damaged", err)
        return None


def cached(cfg: Config, step: Step,
           compute: Callable[[], tuple[Tensors | None, Metrics]],
           check: Callable[[Tensors | None, Metrics], None] | None = None,
           kind: str | None = None) -> tuple[Tensors | None, Metrics, bool]:
    """Load step ``step`` if a valid artifact exists, else run ``compute()`` and store it.

    Args:
        cfg: the run's config; ``cfg.profile`` is the folder.
        step: what is computed: its name and the config groups or fields it reads (the key).
        compute: returns ``(tensors or None, metrics)``; metrics must be JSON-serialisable.
        check: optional; called on a loaded ``(tensors, metrics)``, it raises one of
            ``CHECK_ERRORS`` when the result cannot serve the caller (a missing key, wrong tensor
            names). Then a warning is given and the step recomputed and stored again.
        kind: where and how ``compute`` runs (:func:`rclib.core.accel.compute_kind`); default that of
            ``cfg.device``.

    Returns:
        ``(tensors, metrics, hit)``, ``hit`` True when it came from disk.
    """
    content = content_fingerprint(cfg, step.fields())  # once: a large image folder takes a while to list
    kind = accel.compute_kind(cfg) if kind is None else kind
    path = location(cfg, step, content, kind)
    info = record(cfg, step, content, kind)
    found = load(path, info)
    if found is not None and check is not None:
        try:
            check(*found)
        except CHECK_ERRORS as err:
            _warn(path, "unusable", RuntimeError(f"{type(err).__name__}: {err}"))
            found = None
    if found is not None:
        return found[0], found[1], True
    writable = True
    if os.path.lexists(path):  # rejected above: an intact but unusable copy would block save
        writable = try_write(lambda: discard(path), path)
    tensors, metrics = compute()
    if writable:
        try_write(lambda: save(path, tensors, metrics, info=info), path)
    return tensors, metrics, False


def try_write(write: Callable[[], Any], path: Path) -> bool:
    """Run a cache write (used here and by ``decoded``); on a read-only or forbidden cache warn once and return False (the
    result is used, not stored). Other errors (a full disk, a bug) propagate."""
    try:
        write()
        return True
    except OSError as err:
        if err.errno not in READ_ONLY_ERRNOS:
            raise
        warnings.warn(f"artifact cache {root()} is not writable ({err.strerror}: {err.filename or path}); "
                      "results are not stored", stacklevel=3)
        return False


def rows_with(*keys: str) -> Callable[[Tensors | None, Metrics], None]:
    """A ``check`` for :func:`cached`: ``metrics["rows"]`` is a list of rows with every key."""
    def check(tensors: Tensors | None, metrics: Metrics) -> None:
        rows = metrics["rows"]
        if not isinstance(rows, list):
            raise TypeError(f"rows is a {type(rows).__name__}, not a list")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise TypeError(f"row {i} is a {type(row).__name__}, not an object")
            missing = [k for k in keys if k not in row]
            if missing:
                raise KeyError(f"row {i} lacks {missing}")
    return check
