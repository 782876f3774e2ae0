"""An environment's external files (FILE bodies, TLS certificates), synced as one Yjs document
per environment beside it: `files:<env id>` (layout in docs/files.md).

Mockoon resolves such paths beside the environment file, and Mockoon Cloud does not carry them,
so a teammate's mock breaks. Here each file is content-addressed: the document maps a relative
path to its sha256 and keeps the bytes once per digest, and it travels over the same links as
the environment (LAN peers, hubs, y-websocket clients), stored crash-safe like one.

Two devices that change one file while apart both keep their work: the Yjs map keeps one value
(the same everywhere), and the device whose version lost (it sees its own value replaced by one
made without knowing it: each entry carries a version vector, `seen`) adds its version back as
a conflict copy, Syncthing style (`name.sync-conflict-<sha8>-<device8>.ext`), which every device
then receives like any file.

Paths are checked when read from the document and when read from disk: a path that is absolute,
climbs out of the environment's folder or is otherwise not a plain relative path is refused,
never read or written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Map

from ..model.lib0 import EMPTY_UPDATE
from ..store import Store, Ticket
from .errors import is_failure
from .events import EventLog

__all__ = [
    "FILES_PREFIX",
    "MAX_ENV_BYTES",
    "MAX_FILE_BYTES",
    "MAX_SPACE_BYTES",
    "Attachments",
    "FileEntry",
    "FilesDoc",
    "FileRefused",
    "conflict_name",
    "env_of",
    "files_doc_id",
    "referenced_paths",
    "safe_relative",
]

log = logging.getLogger("peerdaemon.attachments")

FILES_PREFIX = "files:"
LOCAL_ORIGIN = "local"
MAX_FILE_BYTES = 16 << 20
"""A file larger than this is not synced (an event says so)."""
MAX_ENV_BYTES = 64 << 20
"""All of one environment's files together."""
MAX_SPACE_BYTES = 256 << 20
"""All files of the environments of one space together."""
MAX_PATH = 1024
FILES = "files"
BLOBS = "blobs"
_HEX = re.compile(r"[0-9a-f]{64}")
_TEMPLATE = re.compile(r"{{")

ChangeListener = Callable[[str, bytes, str], None]
"""(doc id `files:<env>`, update, origin): for the links that carry it."""
FilesListener = Callable[[str, list[str], str], None]
"""(env id, changed paths, origin): for the folders the files are written to."""


class FileRefused(ValueError):
    """A file that cannot be synced: its path escapes, or it is too large."""


def files_doc_id(env_id: str) -> str:
    return FILES_PREFIX + env_id


def env_of(doc_id: str) -> str | None:
    return doc_id[len(FILES_PREFIX) :] if doc_id.startswith(FILES_PREFIX) else None


def safe_relative(path: object) -> str | None:
    """The normalized relative POSIX path, or None if it is not one that stays inside the folder
    (absolute, `..` out of it, a drive, a backslash, NUL, empty, too long)."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        return None
    if "\\" in path or "\x00" in path or path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return None
    norm = posixpath.normpath(path)
    if norm in (".", "") or norm == ".." or norm.startswith("../") or norm.startswith("/"):
        return None
    return norm


def referenced_paths(environment: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The files an environment reads beside itself, as Mockoon resolves them: FILE bodies of
    responses and callbacks, and TLS files. -> (safe relative paths, refused paths). Templated
    paths (`{{...}}`) depend on the request: they are skipped, not refused."""
    raw: list[str] = []
    for route in _list(environment.get("routes")):
        for response in _list(route.get("responses") if isinstance(route, dict) else None):
            if isinstance(response, dict) and response.get("bodyType") == "FILE":
                raw.append(response.get("filePath"))
    for callback in _list(environment.get("callbacks")):
        if isinstance(callback, dict) and callback.get("bodyType") == "FILE":
            raw.append(callback.get("filePath"))
    tls = environment.get("tlsOptions")
    if isinstance(tls, dict) and tls.get("enabled") is True:
        for key in ("pfxPath", "certPath", "keyPath", "caPath"):
            raw.append(tls.get(key))
    safe: list[str] = []
    refused: list[str] = []
    for path in raw:
        if not isinstance(path, str) or not path.strip() or _TEMPLATE.search(path):
            continue
        norm = safe_relative(path.replace("\\", "/") if re.match(r"\.\.?\\", path) else path)
        (safe if norm is not None else refused).append(norm if norm is not None else path)
    return sorted(set(safe)), sorted(set(refused))


def conflict_name(path: str, sha: str, device: str) -> str:
    """`dir/name.sync-conflict-<sha8>-<device8>.ext`: the same on every device for one loss."""
    head, name = posixpath.split(path)
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    short = re.sub(r"[^A-Za-z0-9]", "", device)[:8] or "device"
    new = f"{stem}.sync-conflict-{sha[:8]}-{short}" + (f".{ext}" if ext else "")
    return posixpath.join(head, new) if head else new


@dataclass(frozen=True)
class FileEntry:
    sha256: str | None  # None: deleted
    size: int
    base: str | None  # the digest this version replaced (None: a new file)
    by: str
    at: float
    seen: dict[str, int] | None = field(default=None, hash=False)
    """device id -> how many changes of this path by that device this version includes (a
    version vector); None in entries from writers that do not keep one."""

    def includes(self, other: FileEntry) -> bool:
        """Whether this version was made knowing `other` (it replaced it, maybe through
        others): else the two were made apart, and replacing `other` by it loses `other`."""
        if self.seen is not None and other.seen is not None:
            return all(self.seen.get(device, 0) >= n for device, n in other.seen.items())
        return self.base != other.base  # without counts: both made from one version, apart


class FilesDoc:
    """Typed reads and writes of one environment's files document (`self.doc`)."""

    def __init__(self, doc: Doc | None = None) -> None:
        self.doc = doc if doc is not None else Doc()

    def _map(self, name: str) -> Map:
        return self.doc.get(name, type=Map)

    def entries(self) -> dict[str, FileEntry]:
        """path -> entry, for well-formed entries with safe paths (others read as absent)."""
        out: dict[str, FileEntry] = {}
        for path, value in self._map(FILES).items():
            entry = _entry(value)
            norm = safe_relative(path)
            if entry is not None and norm == path:
                out[path] = entry
        return out

    def entry(self, path: str) -> FileEntry | None:
        """One path's entry, as `entries()` reads it (without reading them all)."""
        if safe_relative(path) != path:
            return None
        return _entry(self._map(FILES).get(path))

    def blob(self, sha: str) -> bytes | None:
        value = self._map(BLOBS).get(sha)
        if isinstance(value, bytes | bytearray) and hashlib.sha256(value).hexdigest() == sha:
            return bytes(value)
        return None  # missing, or not what its digest says: never written out

    def put(self, path: str, data: bytes, by: str) -> bool:
        """Set `path` to `data` (one transaction); False if it holds that already."""
        sha = hashlib.sha256(data).hexdigest()
        current = self.entries().get(path)
        if current is not None and current.sha256 == sha:
            return False
        with self.doc.transaction():
            blobs = self._map(BLOBS)
            if sha not in blobs:
                blobs[sha] = data
            self._map(FILES)[path] = {
                "sha256": sha,
                "size": len(data),
                "base": current.sha256 if current is not None else None,
                "by": by,
                "at": time.time(),
                "seen": _next_seen(current, by),
            }
            self._collect(exclude=sha)
        return True

    def remove(self, path: str, by: str) -> bool:
        current = self.entries().get(path)
        if current is None or current.sha256 is None:
            return False
        with self.doc.transaction():
            self._map(FILES)[path] = {
                "sha256": None,
                "size": 0,
                "base": current.sha256,
                "by": by,
                "at": time.time(),
                "seen": _next_seen(current, by),
            }
            self._collect()
        return True

    def _collect(self, exclude: str | None = None) -> None:
        """Drop blobs no entry refers to (inside the caller's transaction)."""
        used = {e.sha256 for e in self.entries().values() if e.sha256} | {exclude}
        blobs = self._map(BLOBS)
        for sha in [k for k in blobs.keys() if k not in used]:
            del blobs[sha]

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries().values() if e.sha256)


def _entry(value: object) -> FileEntry | None:
    if not isinstance(value, dict):
        return None
    sha = value.get("sha256")
    size = value.get("size")
    base = value.get("base")
    if sha is not None and not (isinstance(sha, str) and _HEX.fullmatch(sha)):
        return None
    if not _count(size):
        return None
    by = value.get("by")
    at = value.get("at")
    return FileEntry(
        sha,
        int(size),
        base if isinstance(base, str) and _HEX.fullmatch(base) else None,
        by if isinstance(by, str) else "",
        float(at) if isinstance(at, int | float) and not isinstance(at, bool) else 0.0,
        _seen(value.get("seen")),
    )


def _seen(value: object) -> dict[str, int] | None:
    """A well-formed `seen` map (Yjs may carry its counts as floats), else None."""
    if not isinstance(value, dict):
        return None
    out: dict[str, int] = {}
    for device, n in value.items():
        if not isinstance(device, str) or not _count(n) or n != int(n):
            return None
        out[device] = int(n)
    return out


def _count(value: object) -> bool:
    """A number >= 0 that `int()` takes (a peer's NaN or infinity would raise there)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 and math.isfinite(value)


def _next_seen(current: FileEntry | None, by: str) -> dict[str, int]:
    """The counts of a version `by` makes over `current`: all it knew, and one more of its own."""
    seen = dict(current.seen or {}) if current is not None else {}
    seen[by] = seen.get(by, 0) + 1
    return seen


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


class Attachments:
    """Every environment's files document on this device; all methods run on the trio thread.

    Changes flow like an environment's: stored first (an append per update), then to the
    listeners (the links that carry them: `add_listener`) and to the folders that hold the
    files (`add_files_listener`: the mirror's linked folders, the mock server's folders)."""

    def __init__(self, store: Store, events: EventLog, device: str = "") -> None:
        self.store = store
        self.events = events
        self.device = device
        self.docs: dict[str, FilesDoc] = {}
        self._pending: dict[str, list[bytes]] = {}
        self._listeners: dict[int, ChangeListener] = {}
        self._files_listeners: dict[int, FilesListener] = {}
        self._next = 1
        self.neighbours: Callable[[str], list[str]] = lambda env_id: []
        """The other environments of the space an environment is shared in (set by the
        spaces service): their files count against the same `MAX_SPACE_BYTES`."""
        events.listen(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "environment-deleted":
            env_id = event.get("data", {}).get("id")
            if isinstance(env_id, str):
                self.forget(env_id)

    def load(self) -> int:
        for doc_id, loaded in self.store.load_prefixed(FILES_PREFIX).items():
            env_id = env_of(doc_id)
            if env_id is None:
                continue
            files = self._get(env_id)
            for update in loaded.updates:
                files.doc.apply_update(update)
            self._pending[env_id].clear()  # stored already
        return len(self.docs)

    def _get(self, env_id: str) -> FilesDoc:
        files = self.docs.get(env_id)
        if files is None:
            files = self.docs[env_id] = FilesDoc()
            self._pending[env_id] = []

            def on_transaction(event: Any) -> None:
                if event.update != EMPTY_UPDATE:
                    self._pending[env_id].append(event.update)

            files.doc.observe(on_transaction)
        return files

    # -- reading -------------------------------------------------------------------------------

    def entries(self, env_id: str) -> dict[str, FileEntry]:
        files = self.docs.get(env_id)
        return files.entries() if files is not None else {}

    def entry(self, env_id: str, path: str) -> FileEntry | None:
        files = self.docs.get(env_id)
        return files.entry(path) if files is not None else None

    def content(self, env_id: str, path: str) -> bytes | None:
        files = self.docs.get(env_id)
        entry = files.entries().get(path) if files is not None else None
        if files is None or entry is None or entry.sha256 is None:
            return None
        return files.blob(entry.sha256)

    def state_vector(self, env_id: str) -> bytes:
        files = self.docs.get(env_id)
        return files.doc.get_state() if files is not None else b"\x00"

    def diff(self, env_id: str, state_vector: bytes) -> bytes:
        files = self.docs.get(env_id)
        if files is None:
            return EMPTY_UPDATE
        return files.doc.get_update(state_vector)

    # -- changing ------------------------------------------------------------------------------

    def put_file(self, env_id: str, path: str, data: bytes, origin: str) -> Ticket | None:
        """A file read from disk: synced as an edit. `FileRefused` past a cap or for a bad path."""
        norm = safe_relative(path)
        if norm is None:
            raise FileRefused(f"{path!r} is not a path inside the environment's folder")
        if len(data) > MAX_FILE_BYTES:
            raise FileRefused(
                f"{norm} is {len(data)} bytes; files are synced up to {MAX_FILE_BYTES}"
            )
        files = self._get(env_id)
        current = files.entries().get(norm)
        grows = len(data) - (current.size if current is not None and current.sha256 else 0)
        if files.total_bytes() + grows > MAX_ENV_BYTES:
            raise FileRefused(f"the environment's files would pass {MAX_ENV_BYTES} bytes")
        others = sum(self.docs[e].total_bytes() for e in self.neighbours(env_id) if e in self.docs)
        if others + files.total_bytes() + grows > MAX_SPACE_BYTES:
            raise FileRefused(f"the space's files would pass {MAX_SPACE_BYTES} bytes")
        if not files.put(norm, data, self.device):
            return None
        return self._commit(env_id, [norm], origin)

    def remove_file(self, env_id: str, path: str, origin: str) -> Ticket | None:
        files = self.docs.get(env_id)
        if files is None or not files.remove(path, self.device):
            return None
        return self._commit(env_id, [path], origin)

    def apply(self, env_id: str, update: bytes, origin: str) -> None:
        """A peer's update. A local version it replaced concurrently comes back as a conflict
        copy (module docstring). ValueError on bytes that are not a Yjs update."""
        files = self._get(env_id)
        before = files.entries()
        try:
            files.doc.apply_update(update)
        except BaseException as exc:
            if not is_failure(exc):
                raise
            self._pending[env_id] = []
            raise ValueError(f"not a Yjs update: {exc}") from None
        after = files.entries()
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        self._commit(env_id, changed, origin)
        copies = []
        for path in changed:
            mine, theirs = before.get(path), after.get(path)
            if (
                mine is not None
                and theirs is not None
                and mine.by == self.device
                and theirs.by != self.device
                and mine.sha256
                and mine.sha256 != theirs.sha256
                and not theirs.includes(mine)
            ):
                data = files.blob(mine.sha256)
                if data is not None:
                    copy = conflict_name(path, mine.sha256, self.device)
                    files.put(copy, data, self.device)
                    copies.append(copy)
                    self.events.emit(
                        "file-conflict", id=env_id, path=path, conflict_path=copy, origin=origin
                    )
        if copies:  # this device's own change: it goes to every peer, the sender included
            self._commit(env_id, copies, LOCAL_ORIGIN)

    def _commit(self, env_id: str, paths: list[str], origin: str) -> Ticket | None:
        updates = self._pending.get(env_id, [])
        self._pending[env_id] = []
        ticket = None
        doc_id = files_doc_id(env_id)
        for update in updates:
            ticket = self.store.enqueue_append(doc_id, update)
        if updates and self.store.needs_compaction(doc_id):
            self.store.enqueue_compact(doc_id, self.docs[env_id].doc.get_update())
        for update in updates:
            for listener in list(self._listeners.values()):
                _isolated(listener, doc_id, update, origin)
        if updates and paths:
            for files_listener in list(self._files_listeners.values()):
                _isolated(files_listener, env_id, paths, origin)
            self.events.emit("files-changed", id=env_id, paths=paths, origin=origin)
        return ticket

    def forget(self, env_id: str) -> None:
        """The environment was deleted here: its files go too."""
        if self.docs.pop(env_id, None) is not None:
            self._pending.pop(env_id, None)
            self.store.enqueue_delete(files_doc_id(env_id))

    # -- followers -----------------------------------------------------------------------------

    def add_listener(self, fn: ChangeListener) -> int:
        token = self._next
        self._next += 1
        self._listeners[token] = fn
        return token

    def add_files_listener(self, fn: FilesListener) -> int:
        token = self._next
        self._next += 1
        self._files_listeners[token] = fn
        return token

    def remove_listener(self, token: int) -> None:
        self._listeners.pop(token, None)
        self._files_listeners.pop(token, None)


def _isolated(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as exc:
        if not is_failure(exc):
            raise
        log.exception("a follower of an environment's files failed")
