"""The compressed model file's container: fixed prefix, checksum, JSON header, payload.

``codec`` decides what the header and payload hold (its module docstring documents the whole
format); this module writes them atomically and reads them back with every check a reader must
make before trusting anything: a regular file, magic, version, flags, the lengths in the prefix
against the file's size (before anything large is read), the sha256 checksum, and a JSON header
of the right format and version. Nothing is ever unpickled.

Used by chapter 02 (weight sharing) and 04, through ``codec.save_compressed`` and
``codec.load_compressed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

MAGIC = b"\x89RCLZ\r\n\x1a"  # PNG-style: a non-ASCII byte, then CR LF and ^Z catch text-mode mangling
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHQQ32s")  # magic, version, flags, header bytes, payload bytes, sha256
FORMAT_NAME = "rclib.compressed"


def check_host() -> None:
    """Refuse a big-endian host: raw tensors are written in the host's byte order, and the
    format is little-endian. Used by chapter 02 and 04, through ``codec``."""
    if sys.byteorder != "little":
        raise ValueError("the rclib compressed format is little-endian; this host is big-endian")


def assemble(header: dict[str, Any], payload: list[memoryview]) -> list[bytes | memoryview]:
    """The file as a list of buffers: the prefix (whose sha256 covers its first 28 bytes, the
    header and the payload), the header as compact JSON (``format`` and ``version`` added
    before ``header``'s keys), and the payload segments as they are (no copy of the ~60 MB of
    a VGG16 file). Used by chapter 02 and 04, through ``codec``."""
    head = json.dumps(dict(format=FORMAT_NAME, version=FORMAT_VERSION, **header),
                      separators=(",", ":")).encode()
    size = sum(p.nbytes for p in payload)
    prefix = struct.pack("<8sHHQQ", MAGIC, FORMAT_VERSION, 0, len(head), size)
    digest = hashlib.sha256(prefix)
    digest.update(head)
    for part in payload:
        digest.update(part)
    return [prefix, digest.digest(), head, *payload]


def write_atomic(path: str | os.PathLike, parts: Iterable[bytes | memoryview]) -> int:
    """Write the buffers to ``path`` through a temporary file in the same folder, fsync, then
    ``os.replace``: a reader never sees half a file. Returns the bytes written.
    Used by chapter 02 and 04, through ``codec.save_compressed``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                n += f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def read(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    """The header and payload of a file, checked before anything large is read: a regular file,
    magic, version, flags and the lengths in the prefix against the file's size; then the
    checksum, and a JSON header of the right format and version. ``ValueError`` otherwise.
    The payload is read with one ``readinto`` into a buffer of its size and returned as a
    memoryview of it. Used by chapter 02 and 04, through ``codec.load_compressed``."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file (a device, pipe or folder cannot be an rclib compressed model)")
    with open(path, "rb", buffering=0) as f:  # unbuffered: one readinto straight into our buffer
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError(f"{path}: not an rclib compressed model (only {len(prefix)} bytes)")
        magic, version, flags, hlen, plen, digest = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError(f"{path}: not an rclib compressed model (bad magic bytes {magic!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {version} is not supported (this rclib reads {FORMAT_VERSION})")
        if flags != 0:
            raise ValueError(f"{path}: file is corrupt (flags {flags:#06x}; version {FORMAT_VERSION} defines none)")
        if info.st_size != _PREFIX.size + hlen + plen:
            what = "truncated" if info.st_size < _PREFIX.size + hlen + plen else "has trailing bytes"
            raise ValueError(f"{path}: file is corrupt ({what}: {info.st_size} bytes, the header says "
                             f"{_PREFIX.size + hlen + plen})")
        data = bytearray(hlen + plen)
        view, got = memoryview(data), 0
        while got < len(data):  # a raw read may return less than asked
            k = f.readinto(view[got:])
            if not k:
                break
            got += k
        if got != len(data) or f.read(1):
            raise ValueError(f"{path}: file is corrupt (its size changed while reading)")
    h = hashlib.sha256(prefix[:28])
    h.update(data)
    if h.digest() != digest:
        raise ValueError(f"{path}: file is corrupt (sha256 checksum mismatch)")
    try:
        header = json.loads(view[:hlen].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: file is corrupt (unreadable header: {err})") from None
    except RecursionError:
        raise ValueError(f"{path}: file is corrupt (header JSON nested too deeply)") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ValueError(f"{path}: file is corrupt (header without a tensor list)")
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: file is corrupt (header format {header.get('format')!r} version "
                         f"{header.get('version')!r}, expected {FORMAT_NAME!r} {FORMAT_VERSION})")
    return header, view[hlen:]
