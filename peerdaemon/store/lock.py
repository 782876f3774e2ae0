"""Data-directory lock: one peerdaemon per data dir.

`fcntl.flock` rather than a pid file alone: the kernel drops the lock when the holder dies
(even on kill -9), so a stale pid can never keep the daemon from starting. The pid written into
the file only serves the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from .errors import StoreError, StoreLockedError

LOCK_NAME = "peerdaemon.lock"


class LockHeld(Exception):
    """Another process holds the lock; `pid` is the one it wrote, if readable."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by pid {pid if pid is not None else 'unknown'}")
        self.pid = pid


class LockFileUnusable(Exception):
    """The lock file cannot be opened or is not one we may lock: the message says why."""


def lock_file(path: Path, *, owner_only: bool = False) -> int:
    """Open `path` (created 0600) and take an exclusive `flock` without waiting; returns the fd.

    Never through a symlink, and only a regular file (with `owner_only`, only one of ours): in a
    shared folder another user could plant a link there, to have us create, lock or overwrite a
    file of their choosing, or hold a file of theirs to block us. The data dir and the socket's
    lock (`api.server`) both take their lock here.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockFileUnusable(f"{path} is a symbolic link; refusing to follow it") from None
        raise LockFileUnusable(f"cannot open {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LockFileUnusable(f"{path} is not a regular file")
    if owner_only and st.st_uid != os.getuid():
        os.close(fd)
        raise LockFileUnusable(f"{path} is owned by uid {st.st_uid}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _read_pid(fd)
            os.close(fd)
            raise LockHeld(path, holder) from None
        os.close(fd)
        raise LockFileUnusable(f"cannot lock {path}: {e.strerror or e}") from None
    return fd


class DataDirLock:
    """An exclusive `flock` on `data_dir/peerdaemon.lock`, held until `release()`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreLockedError naming the holder's pid."""
        try:
            fd = lock_file(self.path)
        except LockHeld as held:
            who = f"pid {held.pid}" if held.pid is not None else "pid unknown"
            raise StoreLockedError(
                f"data directory {self.data_dir} is in use by another peerdaemon ({who})"
            ) from None
        except LockFileUnusable as e:
            raise StoreError(f"data directory lock: {e}") from None
        # Write then truncate, so a concurrent reader sees either pid on the first line,
        # never an empty file.
        data = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as e:  # a full disk, say: not a bare errno without the file
            os.close(fd)
            raise StoreError(f"cannot write {self.path}: {e.strerror or e}") from e
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; idempotent. The file stays (unlinking it would race a new locker)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None
