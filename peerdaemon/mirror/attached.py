"""An environment's external files on disk (FILE bodies, TLS files beside a linked file), kept
in step with its files document (core/attachments.py, docs/files.md).

Two kinds of folders: a linked environment's folder goes both ways (a file the environment
refers to is read when it changes on disk, and written when it changes elsewhere); a folder that
only serves (a mock's folder for an unlinked environment, the hub's) is only written.

Reading is polled (every `interval`) by size and mtime, and a file counts only once two stats
around the read agree: a file being written is read again on the next round, never synced
half-written. Writing replaces the file whole (`replace_file`), so Mockoon never reads half of
one either. A path the environment names that escapes its folder (absolute outside it, `..`,
a symlink that leads out) is refused with a `file-refused` event, never read or written.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ..core.attachments import Attachments, FileRefused, referenced_paths
from ..core.errors import is_failure
from ..core.events import EventLog
from ..core.files import replace_file
from ..core.registry import Registry, UnknownEnvironment

__all__ = ["Folder", "FolderSync", "inside", "materialize"]

log = logging.getLogger("peerdaemon.mirror.files")

FILE_ORIGIN = "file"


@dataclass(frozen=True)
class Folder:
    path: Path
    two_way: bool  # a linked environment's folder; else only written (a mock's)


def inside(folder: Path, relative: str) -> Path | None:
    """`folder/relative` if it stays inside `folder` once symlinks are resolved, else None."""
    target = folder / relative
    try:
        root = folder.resolve()
        resolved = target.resolve()
    except (OSError, RuntimeError):
        return None
    if resolved != root and root not in resolved.parents:
        return None
    return target


def _read_stable(path: Path) -> tuple[bytes, tuple[int, int]] | None:
    """The file's bytes if its size and mtime did not move while it was read (else None)."""
    try:
        before = os.stat(path)
        data = path.read_bytes()
        after = os.stat(path)
    except OSError:
        return None
    key = (after.st_size, after.st_mtime_ns)
    if (before.st_size, before.st_mtime_ns) != key or len(data) != after.st_size:
        return None
    return data, key


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def materialize(folder: Path, files: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    """Write each file (path relative to `folder`) whole where it differs; -> the stat keys of
    what is on disk now. Paths that escape are skipped (the caller checked them already)."""
    written: dict[str, tuple[int, int]] = {}
    for relative, data in files.items():
        target = inside(folder, relative)
        if target is None:
            continue
        current = None
        try:
            current = target.read_bytes() if target.is_file() else None
        except OSError:
            pass
        if current != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            st = replace_file(target, data, 0o644)
            written[relative] = (st.st_size, st.st_mtime_ns)
        else:
            key = _stat_key(target)
            if key is not None:
                written[relative] = key
    return written


class FolderSync:
    """One task for every environment that has folders (`folders()`: env id -> folders)."""

    def __init__(
        self,
        registry: Registry,
        attachments: Attachments,
        events: EventLog,
        folders: Callable[[], dict[str, list[Folder]]],
        *,
        interval: float = 0.25,
    ) -> None:
        self.registry = registry
        self.attachments = attachments
        self.events = events
        self.folders = folders
        self.interval = interval
        self._seen: dict[tuple[str, str, str], tuple[tuple[int, int], str]] = {}
        """(env, folder, path) -> the file's stat and digest as last read or written."""
        self._refused: set[tuple[str, str]] = set()
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = self.attachments.add_files_listener(self._on_files)
        try:
            task_status.started()
            while True:
                try:
                    await self.sync_once()
                except Exception:  # one bad round is logged; the next one tries again
                    log.exception("syncing environments' files failed")
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self.attachments.remove_listener(token)

    def _on_files(self, env_id: str, paths: list[str], origin: str) -> None:
        self._wake.set()  # written on the next round, at once

    async def sync_once(self) -> None:
        for env_id, folders in list(self.folders().items()):
            for folder in folders:
                try:
                    await self._sync(env_id, folder)
                except UnknownEnvironment:
                    break
                except BaseException as exc:
                    if not is_failure(exc):
                        raise
                    log.exception("files of %s in %s", env_id, folder.path)

    async def _sync(self, env_id: str, folder: Folder) -> None:
        root = str(folder.path)
        if folder.two_way:
            environment = self.registry.export(env_id)
            wanted, refused = referenced_paths(environment)
            for path in refused:
                self._refuse(env_id, path, "it is not inside the environment's folder")
            for relative in wanted:
                await self._read(env_id, folder, relative)
        # what the document holds and the folder does not (or holds otherwise): written
        pending: dict[str, bytes] = {}
        for relative, entry in self.attachments.entries(env_id).items():
            if entry.sha256 is None:
                continue
            key = (env_id, root, relative)
            target = inside(folder.path, relative)
            if target is None:
                self._refuse(env_id, relative, "it would be written outside the folder")
                continue
            on_disk = _stat_key(target)
            seen = self._seen.get(key)
            if on_disk is not None and seen == (on_disk, entry.sha256):
                continue  # as last read or written
            data = self.attachments.content(env_id, relative)
            if data is None:
                continue
            if on_disk is not None and folder.two_way and (seen is None or seen[0] != on_disk):
                # changed here since we last looked: new work unless it is the document's version
                read = await trio.to_thread.run_sync(_read_stable, target)
                if read is None:
                    continue
                if hashlib.sha256(read[0]).hexdigest() != entry.sha256:
                    continue  # read as an edit on the next round (if the environment names it)
            pending[relative] = data
        if pending:
            written = await trio.to_thread.run_sync(materialize, folder.path, pending)
            for relative, stat_key in written.items():
                digest = hashlib.sha256(pending[relative]).hexdigest()
                self._seen[(env_id, root, relative)] = (stat_key, digest)

    async def _read(self, env_id: str, folder: Folder, relative: str) -> None:
        key = (env_id, str(folder.path), relative)
        target = inside(folder.path, relative)
        if target is None:
            self._refuse(env_id, relative, "it leads outside the environment's folder")
            return
        stat_key = _stat_key(target)
        seen = self._seen.get(key)
        if stat_key is None or (seen is not None and seen[0] == stat_key):
            return
        read = await trio.to_thread.run_sync(_read_stable, target)
        if read is None:
            return  # being written: next round
        data, stat_key = read
        digest = hashlib.sha256(data).hexdigest()
        entry = self.attachments.entries(env_id).get(relative)
        if entry is not None and entry.sha256 == digest:
            self._seen[key] = (stat_key, digest)
            return
        try:
            self.attachments.put_file(env_id, relative, data, FILE_ORIGIN)
        except FileRefused as exc:
            self._refuse(env_id, relative, str(exc))
            return
        self._seen[key] = (stat_key, digest)

    def _refuse(self, env_id: str, path: str, reason: str) -> None:
        if (env_id, path) in self._refused:
            return
        self._refused.add((env_id, path))
        log.warning("environment %s: file %r not synced: %s", env_id, path, reason)
        self.events.emit("file-refused", id=env_id, path=path, reason=reason)
