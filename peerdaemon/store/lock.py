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


class DataDirLock:
    """An exclusive `flock` on `data_dir/peerdaemon.lock`, held until `release()`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreLockedError naming the holder's pid."""
        # Never through a symlink: a link planted at the lock path would have the daemon create,
        # lock and overwrite (with its pid) a file of someone else's choosing.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreError(
                    f"lock file {self.path} is a symbolic link; refusing to follow it"
                ) from None
            raise StoreError(f"cannot open lock file {self.path}: {e}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"lock file {self.path} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "pid unknown"
            raise StoreLockedError(
                f"data directory {self.data_dir} is in use by another peerdaemon ({who})"
            ) from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {e}") from e
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
