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

from ..core.attachments import Attachments, FileRefused, conflict_name, referenced_paths
from ..core.errors import is_failure
from ..core.events import EventLog
from ..core.files import replace_file
from ..core.registry import Registry, UnknownEnvironment
from ..store import Store

__all__ = ["Folder", "FolderSync", "inside", "materialize"]

log = logging.getLogger("peerdaemon.mirror.files")

FILE_ORIGIN = "file"
SYNCED_KEY = "files.synced"


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


def materialize(
    folder: Path,
    files: dict[str, bytes],
    expected: dict[str, tuple[int, int] | None] | None = None,
) -> dict[str, tuple[int, int]]:
    """Write each file (path relative to `folder`) whole where it differs; -> the stat keys of
    what is on disk now. Paths that escape are skipped (the caller checked them already), and
    so is a file whose stat key is no longer the one in `expected` (None: absent): it changed
    on disk since it was looked at, and that change is read on the next round, not overwritten."""
    written: dict[str, tuple[int, int]] = {}
    for relative, data in files.items():
        target = inside(folder, relative)
        if target is None:
            continue
        if expected is not None and relative in expected:
            if _stat_key(target) != expected[relative]:
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
    """One task for every environment that has folders (`folders()`: env id -> folders).

    A three-way decision per file, as for linked environment files (docs/mirror.md): against
    the digest both sides last agreed on (kept in the store, setting `files.synced`, so that
    a restart or a peer's change that arrives first never passes for new work on disk):

    | disk | document | then |
    |---|---|---|
    | as agreed | changed elsewhere | the document's version is written |
    | changed here | as agreed | the file is read into the document (an edit) |
    | changed here | changed elsewhere | the file goes in as a conflict copy, the document's version is written |
    """

    def __init__(
        self,
        registry: Registry,
        attachments: Attachments,
        events: EventLog,
        folders: Callable[[], dict[str, list[Folder]]],
        *,
        store: Store | None = None,
        interval: float = 0.25,
    ) -> None:
        self.registry = registry
        self.attachments = attachments
        self.events = events
        self.folders = folders
        self.store = store
        self.interval = interval
        self._stats: dict[tuple[str, str, str], tuple[tuple[int, int], str]] = {}
        """(env, folder, path) -> the file's stat and digest when last read or written."""
        saved = store.get_setting(SYNCED_KEY) if store is not None else None
        self._synced: dict[str, str] = dict(saved) if isinstance(saved, dict) else {}
        """(env, folder, path), joined by NUL -> the digest disk and document last agreed on."""
        self._refused: set[tuple[str, str]] = set()
        self._wanted: dict[str, tuple[list[str], list[str]]] = {}
        """env id -> the files its environment references (and refuses), until it changes: a
        round reads them from this, so an idle environment is neither exported nor kept loaded."""
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = self.attachments.add_files_listener(self._on_files)
        changes = self.registry.add_listener(self._on_change)
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
            self.registry.remove_listener(changes)
            self.attachments.remove_listener(token)

    def _on_files(self, env_id: str, paths: list[str], origin: str) -> None:
        self._wake.set()  # written on the next round, at once

    def _on_change(self, env_id: str, update: bytes, origin: str) -> None:
        self._wanted.pop(env_id, None)

    def _referenced(self, env_id: str) -> tuple[list[str], list[str]]:
        known = self._wanted.get(env_id)
        if known is None:
            known = self._wanted[env_id] = referenced_paths(self.registry.export(env_id))
        return known

    async def sync_once(self) -> None:
        changed = False
        for env_id, folders in list(self.folders().items()):
            for folder in folders:
                try:
                    changed |= await self._sync(env_id, folder)
                except UnknownEnvironment:
                    break
                except BaseException as exc:
                    if not is_failure(exc):
                        raise
                    log.exception("files of %s in %s", env_id, folder.path)
        if changed and self.store is not None:
            self.store.put_setting(SYNCED_KEY, dict(self._synced))

    async def _disk(self, key: tuple[str, str, str], target: Path) -> str | None | bool:
        """The file's digest; None if there is none; False while it is being written."""
        stat_key = _stat_key(target)
        if stat_key is None:
            return None
        known = self._stats.get(key)
        if known is not None and known[0] == stat_key:
            return known[1]
        read = await trio.to_thread.run_sync(_read_stable, target)
        if read is None:
            return False
        digest = hashlib.sha256(read[0]).hexdigest()
        self._stats[key] = (read[1], digest)
        return digest

    async def _sync(self, env_id: str, folder: Folder) -> bool:
        """One round for one folder; True if an agreed digest changed (to be saved)."""
        root = str(folder.path)
        wanted: list[str] = []
        if folder.two_way:
            wanted, refused = self._referenced(env_id)
            for path in refused:
                self._refuse(env_id, path, "it is not inside the environment's folder")
        writes: dict[str, bytes] = {}
        seen: dict[str, tuple[int, int] | None] = {}
        changed = False
        entries = self.attachments.entries(env_id)
        for relative in sorted(set(wanted) | set(entries)):
            key = (env_id, root, relative)
            target = inside(folder.path, relative)
            if target is None:
                self._refuse(env_id, relative, "it leads outside the environment's folder")
                continue
            disk = await self._disk(key, target)
            if disk is False:
                continue  # being written: next round
            synced_key = "\0".join(key)
            agreed = self._synced.get(synced_key)
            read: bytes | None = None
            if folder.two_way and disk is not None and disk != agreed:  # changed here
                got = await trio.to_thread.run_sync(_read_stable, target)
                if got is None:
                    continue
                read, disk = got[0], hashlib.sha256(got[0]).hexdigest()
                self._stats[key] = (got[1], disk)
            entry = entries.get(relative)
            if disk != (entry.sha256 if entry is not None else None):
                # No await from here on: what is done takes the document as it is now. A peer's
                # change that arrived during the reads above counts, else the file would replace
                # it as if the document had not changed, and the peer's version would be lost.
                # (In step with the older view is safe: such a change wakes another round.)
                entry = self.attachments.entry(env_id, relative)
            doc = entry.sha256 if entry is not None else None
            if disk == doc:
                if disk is not None and agreed != disk:
                    self._synced[synced_key] = disk
                    changed = True
                continue
            if read is None or disk == agreed:
                if doc is not None:  # the document's version goes to disk
                    data = self.attachments.content(env_id, relative)
                    if data is not None:
                        writes[relative] = data
                        seen[relative] = self._stats[key][0] if disk is not None else None
                continue
            if doc is None or doc == agreed:  # the file changed here only: an edit
                if self._put(env_id, relative, read):
                    self._synced[synced_key] = disk
                    changed = True
                continue
            # ... and in the document: both kept, the file as a conflict copy
            copy = conflict_name(relative, disk, self.attachments.device)
            if self._put(env_id, copy, read):
                self.events.emit(
                    "file-conflict", id=env_id, path=relative, conflict_path=copy, origin="file"
                )
                content = self.attachments.content(env_id, relative)
                if content is not None:
                    writes[relative] = content
                    seen[relative] = self._stats[key][0]
        if writes:
            written = await trio.to_thread.run_sync(materialize, folder.path, writes, seen)
            for relative, stat_key in written.items():
                digest = hashlib.sha256(writes[relative]).hexdigest()
                key = (env_id, root, relative)
                self._stats[key] = (stat_key, digest)
                self._synced["\0".join(key)] = digest
                changed = True
        return changed

    def _put(self, env_id: str, relative: str, data: bytes) -> bool:
        try:
            self.attachments.put_file(env_id, relative, data, FILE_ORIGIN)
        except FileRefused as exc:
            self._refuse(env_id, relative, str(exc))
            return False
        return True

    def _refuse(self, env_id: str, path: str, reason: str) -> None:
        if (env_id, path) in self._refused:
            return
        self._refused.add((env_id, path))
        log.warning("environment %s: file %r not synced: %s", env_id, path, reason)
        self.events.emit("file-refused", id=env_id, path=path, reason=reason)
