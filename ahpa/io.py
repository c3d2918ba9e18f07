"""Atomic, durable file output: what every writer in ahpa uses (CONTRACT: no partial outputs).

A result appears at its final name only once complete: it is written under a
hidden temporary name in the same directory (``.NAME.<random>.tmp``, so the
rename never crosses a file system), fsynced, and moved into place with
``os.replace``; the directory entry is then fsynced too.  On any error, a
``KeyboardInterrupt`` included, the temporary is removed and the previous
content of the final name, if any, is untouched.  A process killed outright
can leave a temporary behind; :func:`remove_stale_temps` clears them where a
single writer owns the name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (new names, renames) durable.

    Best effort where the platform or file system cannot: no directory file
    descriptors (Windows), or no fsync on them (EINVAL).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (for writers that take a name,
    e.g. safetensors' ``save_file``); on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object (``mode`` "w" or "wb") whose content appears at ``path`` only once fully written."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x")) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 1, sort_keys: bool = False) -> None:
    """Write ``data`` as JSON (plus a final newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path`` to fill; on success its files
    are fsynced and it is renamed to ``path``.

    An existing ``path`` is replaced only with ``overwrite`` (it is renamed aside
    first and deleted after the swap); otherwise the rename fails with ``OSError``
    unless ``path`` is an empty directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for sub in sorted(tmp.rglob("*")):
            if sub.is_file():
                _fsync_file(sub)
        fsync_dir(tmp)
        if overwrite and path.exists():
            old = _temp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete temporaries of ``path`` left by killed writers.  Only for a name with
    one writer: a concurrent writer of the same name would lose its temporary."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")
