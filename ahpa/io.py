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
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import yaml

from ahpa.errors import AhpaError


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


# ---------------------------------------------------------------------- output checks
def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _check_writable_place(path: Path, what: str, need_bytes: int) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory with ``need_bytes`` free."""
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise AhpaError(f"{what} {path}: {anc} is an existing file, not a directory; choose a path under a directory")
    read_only_mount = bool(os.statvfs(anc).f_flag & getattr(os, "ST_RDONLY", 1))
    if read_only_mount or not os.access(anc, os.W_OK | os.X_OK):
        raise AhpaError(f"{what} {path}: {anc} is not writable{' (read-only file system)' if read_only_mount else ''}; "
                        "choose a writable location")
    if need_bytes > 0:
        free = shutil.disk_usage(anc).free
        if free < need_bytes:
            raise AhpaError(f"{what} {path}: about {_gib(need_bytes)} must be written but only {_gib(free)} are free on "
                            f"{anc}'s file system; free space or choose another location")


def check_output_dir(path: str | os.PathLike, what: str = "--out", need_bytes: int = 0) -> Path:
    """Refuse (AhpaError, nothing written) an output directory that cannot be one: an existing
    file, a read-only place, or a file system with less than ``need_bytes`` free."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AhpaError(f"{what} {path} is an existing file, not a directory; choose a directory (new or a previous output)")
    _check_writable_place(path, what, need_bytes)
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out", need_bytes: int = 0) -> Path:
    """Refuse an output file name that cannot be written: an existing directory, a parent that
    is a file, a read-only place, or too little free space."""
    path = Path(path)
    if path.is_dir():
        raise AhpaError(f"{what} {path} is an existing directory, but a file name is expected; pass e.g. {path / 'results.json'}")
    _check_writable_place(path.parent, what, need_bytes)
    return path


def remove_temps_in(directory: str | os.PathLike) -> int:
    """Delete every ``.NAME.*.tmp`` temporary directly in ``directory`` (files and directories).

    Only for a directory whose writer holds its :class:`RunLock`.  Returns how many were removed."""
    removed = 0
    for stale in Path(directory).glob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed


# ---------------------------------------------------------------------- run-directory lock
LOCK_FILE = ".ahpa.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive lock on an output directory (``DIR/.ahpa.lock``), held for the life of a command.

    Mechanism: ``fcntl.flock`` on the lock file.  The kernel drops the lock when its holder
    dies, so a lock of a killed process never blocks (its file, naming the dead PID, is taken
    over).  On NFS, Linux emulates ``flock`` with POSIX byte-range locks, which the NFS lock
    manager (NFSv3 NLM, NFSv4 built in) enforces across clients.  Where ``flock`` is not
    supported (e.g. Lustre mounted without ``-o flock``: ENOSYS/EOPNOTSUPP/ENOLCK), it falls
    back to creating the file with ``O_EXCL`` and a PID + host check: a lock whose PID no
    longer runs on this host is stale and taken over; one from another host is never taken
    over (its owner cannot be checked from here).  The file holds JSON
    ``{"pid", "host", "command", "since"}``; the message of a refusal names them.

    Releasing unlinks the file; a waiter that locked the unlinked inode notices (inode
    check after locking) and retries, so two holders never coexist.
    """

    def __init__(self, directory: str | os.PathLike, command: str = "ahpa", name: str = LOCK_FILE):
        self.directory = Path(directory)
        self.path = self.directory / name
        self.command = command
        self.fd: int | None = None
        self.created_dir = False
        self.took_over: dict | None = None
        self.mode = "flock"

    def _refuse(self, holder: dict):
        who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}"
        if holder.get("command"):
            who += f" ({holder['command']}, since {holder.get('since', '?')})"
        return AhpaError(f"{self.directory} is in use by another ahpa process: {who}; wait for it to finish or stop it, "
                         f"or use another output directory (lock file {self.path})")

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()

    def acquire(self) -> "RunLock":
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created_dir = True
        for _ in range(100):
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released in between
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(_read_holder(self.path)) from None
            except OSError as err:
                if err.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                    os.close(fd)
                    raise
                self.mode = "exclusive-create"
                if created:  # O_EXCL made it ours
                    os.pwrite(fd, self._record(), 0)
                    self.fd = fd
                    return self
                os.close(fd)
                return self._acquire_exclusive_create(socket.gethostname())
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked the file while we waited on it: retry
                os.close(fd)
                continue
            previous = _read_holder(self.path)
            if previous.get("pid") and previous.get("pid") != os.getpid():
                self.took_over = previous  # its holder died without releasing (kill -9, node loss)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self.fd = fd
            return self
        raise RuntimeError(f"could not lock {self.path}")

    def _acquire_exclusive_create(self, host: str) -> "RunLock":
        self.mode = "exclusive-create"
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                    self.took_over = holder
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refuse(holder) from None
            os.pwrite(fd, self._record(), 0)
            self.fd = fd
            return self
        raise RuntimeError(f"could not lock {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a stale inode and retries
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
        if self.created_dir:  # a command refused after locking leaves no empty directory behind
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def lock_message(lock: RunLock) -> str | None:
    """One line about a taken-over stale lock, or None."""
    if lock.took_over:
        return (f"note: took over the stale lock of PID {lock.took_over.get('pid')} on {lock.took_over.get('host')} "
                f"(no longer running) in {lock.directory}")
    return None
def lock_on_main_rank(directory, command: str, *, is_main: bool, world: int, device=None, check=None) -> RunLock | None:
    """Rank 0 takes the run-directory lock (after ``check()``, e.g. an output-path check); every
    rank learns whether that failed (one all-reduce), so no rank is left waiting. Prints a
    takeover note once. Returns the lock on rank 0, None elsewhere."""
    lock, error = None, None
    if is_main:
        try:
            if check is not None:
                check()
            lock = RunLock(directory, command).acquire()
        except AhpaError as err:
            error = err
    if world > 1:
        flag = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(flag)
        if float(flag) > 0 and error is None:
            raise AhpaError(f"{directory} cannot be used by {command} (rank 0 says why)")
    if error is not None:
        raise error
    if lock is not None and lock_message(lock):
        print(lock_message(lock))
    return lock


def read_yaml_mapping(path: str | os.PathLike, what: str, expected: str) -> dict:
    """A YAML file that must hold a mapping: a parse error or another type is one line naming the file and
    ``expected`` (the keys it should have)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise AhpaError(f"{what} '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise AhpaError(f"{what} '{path}' must be a mapping ({expected}), got {type(data).__name__}")
    return data


def state_sha256(module: torch.nn.Module, header: str = "{key}:{dtype}:{shape}") -> str:
    """sha256 of a module's state: for each tensor in name order, ``header`` (its name, dtype and shape) and its
    bytes.  The teachers' cache manifests use the default header and ``ahpa sample`` ``"{key}|{dtype}|{shape}|"``,
    each as first written, so that existing caches and sample directories keep their identity."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(header.format(key=key, dtype=t.dtype, shape=tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
