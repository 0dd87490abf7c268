"""Files that survive crashes, full disks and concurrent processes: the primitives of the run store.

- Atomic writes: the data go to a temporary file beside the target, are flushed to disk and renamed
  over it, so a reader sees the old file or the new one, never half of one. A write that fails (a
  full disk, a read-only folder) removes its temporary file, leaves the target as it was, and raises
  ``StorageError`` with one sentence that names the path (and, for a full disk, the space needed
  and the space free).
- ``ProcessLock``: one holder at a time, across processes and, on a shared filesystem, hosts. It is
  the operating system's lock on an open file (``fcntl.flock``), so it ends with its holder: a
  killed process leaves no stale lock, and a recycled process id cannot fake a live one. The lock
  file records the holder's host, process id and start time, for messages only.
"""
from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
import socket
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import SatlibError

try:
    import fcntl
except ImportError:     # Windows: no flock; the library still imports, only training refuses to start
    fcntl = None

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class StorageError(SatlibError):
    """A file of the run store could not be written: a full disk, a read-only folder, a file where a folder
    should be."""


def _size(size: int) -> str:
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2 ** 10:.0f} kB"


def write_error(path: Path, err: OSError, size: int = 0) -> StorageError:
    """The one-sentence ``StorageError`` for a failed write of ``size`` bytes to ``path``."""
    if err.errno in _FULL:
        try:
            free = f"{_size(shutil.disk_usage(path.parent).free)} are free"
        except OSError:
            free = "the free space is unknown"
        return StorageError(f"the disk is full: writing {path} needs about {_size(size)} and {free}; the files written "
                            f"before are kept, so free some space and run again.")
    return StorageError(f"cannot write {path} ({err.strerror or err}); make that folder writable or set SATLIB_RUNS "
                        f"to a writable folder.")


def make_folder(folder: Path) -> None:
    """``folder`` and its parents, created if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(folder, err) from err


@contextmanager
def staged(path: Path, data: bytes | memoryview) -> Iterator[Path]:
    """A temporary file beside ``path`` that holds ``data``, flushed to disk, for the caller to rename over
    ``path``; it is removed if the caller leaves it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        _discard(tmp)                               # first, so that the message counts the space it held as free
        raise write_error(path, err, memoryview(data).nbytes) from err
    try:
        yield tmp
    finally:
        _discard(tmp)


def _discard(path: Path) -> None:
    with suppress(OSError):                         # gone already, or a read-only folder where it never was
        path.unlink()


def serialised(obj: Any) -> memoryview:
    """The bytes ``torch.save`` writes for ``obj`` (in memory, so a failed write is an ordinary ``OSError``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically (see the module docstring)."""
    with staged(path, data) as tmp:
        os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write_bytes(path, serialised(obj))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the text file ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


class ProcessLock:
    """An exclusive lock on the file ``path`` that one process holds at a time (see the module docstring).

    Written on ``fcntl.flock`` rather than taken from the filelock package because the holder removes
    the lock file when it lets go (a run leaves no lock file behind, and a run that never trained no
    folder): a process that was waiting may then have locked a file that is no longer in place, and
    must notice it and try the file in place, which filelock 3 does not do.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock unless another holder has it; ``True`` once this object holds it."""
        if self._fd is not None:
            return True
        if fcntl is None:
            raise StorageError(f"cannot lock {self.path}: this platform has no fcntl.flock, which training needs to "
                               f"keep other processes off the run; train on Linux or macOS.")
        folder = self.path.parent
        while True:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except (FileNotFoundError, FileExistsError) as err:
                if os.path.lexists(folder) and not folder.is_dir():
                    raise write_error(self.path, err) from err
                continue                          # the folder came or went with another holder: again
            except OSError as err:
                raise write_error(self.path, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if isinstance(err, BlockingIOError):
                    return False
                raise write_error(self.path, err) from err
            if _same_file(fd, self.path):
                break
            os.close(fd)                          # its holder removed this file as it let go: lock the one in place
        note = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": datetime.now().astimezone().isoformat("T", "seconds")}).encode()
        try:
            os.ftruncate(fd, 0)
            os.write(fd, note)
        except OSError as err:
            os.close(fd)
            raise write_error(self.path, err, len(note)) from err
        self._fd = fd
        return True

    def release(self) -> None:
        """Let go; the file is removed while still locked, so no waiting process keeps a lock on it unnoticed."""
        if self._fd is not None:
            with suppress(OSError):
                self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held(self) -> bool | None:
        """Whether some process holds the lock now; ``None`` where that cannot be probed."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)
        return False

    def holder(self) -> str:
        """Who holds the lock, as its file records: ``process 123 on host gpu-7 since 2026-01-31T09:00:00+00:00``."""
        try:
            note = json.loads(self.path.read_text())
            host, pid, since = note["host"], note["pid"], note["since"]
        except (OSError, ValueError, TypeError, KeyError):
            return "another process (it has not recorded its name yet)"
        where = f"this host ({host})" if host == socket.gethostname() else f"host {host}"
        return f"process {pid} on {where} since {since}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
