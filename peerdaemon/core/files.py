"""Replacing a file whole, the one way the CLI (`env export -o`) and linked files write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["replace_file"]


def replace_file(path: Path, data: bytes, mode: int) -> os.stat_result:
    """Write `data` to a temporary file in `path`'s folder, fsync it, rename it over `path`, fsync
    the folder: a reader (Mockoon) never sees half a file, and a crash leaves the old file or the
    new one. Returns the new file's stat (a rename keeps its mtime, size and inode); raises
    OSError, with nothing left behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, mode)
            written = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # the file is in place; some filesystems cannot fsync a folder
    return written
