"""The mirror service: keeps linked files and environment documents in step (docs/mirror.md).

The trio shell around `link.LinkMachine`: one task per link polls the file's stat every
`POLL_INTERVAL` (robust against editors' atomic renames, with no watcher library to keep), reads
and parses it in a worker thread when the stat changed, writes atomically (temporary file in the
same folder, fsync, rename), and carries out what the machine decides.

File content is applied as a three-way merge: the link keeps the Yjs state that its file content
corresponds to (`base`: the state it last wrote, or the result of the last apply); the new file
content is applied as minimal edits to a fork of that state, and only the difference is merged
into the live document. So edits made elsewhere since the file was last synced survive a save
made from the older file, exactly as concurrent CRDT edits do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import trio
from pycrdt import Doc

from ..core.errors import (
    BAD_REQUEST,
    LINK_CONFLICT,
    NOT_FOUND,
    OpError,
    Pending,
)
from ..model import ModelError, apply_environment, prepare
from ..model.lib0 import EMPTY_UPDATE
from ..store import Store, StoreError
from .format import content_hash, format_environment, json_hash, text_style
from .link import (
    Action,
    Apply,
    Emit,
    LinkMachine,
    Observation,
    Render,
    Sig,
    Synced,
    Write,
    WriteOutcome,
)

log = logging.getLogger("peerdaemon.mirror")

POLL_INTERVAL = 0.2
"""Seconds between two stats of a linked file."""

RACY_NS = 2_000_000_000
"""A file whose mtime is this recent may change again without its sig changing (timestamps are
as coarse as a clock tick, 1 s on ext3, 2 s on FAT): its content is compared as well."""
FIRST_SYNC_TIMEOUT = 10.0
"""How long `env.link` waits for the first write or apply before answering anyway."""
FLUSH_TIMEOUT = 2.0
"""How long shutdown may spend writing changes not yet mirrored."""
RESTART_DELAY = 1.0
"""Seconds before a link that hit a bug starts again."""
ORIGIN = "file"
LINKS_KEY = "links"
MIRROR_KEY = "mirror"
CONFLICT_SUFFIX = ".peerdaemon-conflict.json"


def _is_failure(exc: BaseException) -> bool:
    """An error of one link (a bug, a document no file can hold), not a cancellation: pycrdt's
    Rust panics are BaseExceptions, yet they are failures like any other."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def conflict_path_for(path: Path) -> Path:
    """`env.json` -> `env.peerdaemon-conflict.json`, next to it."""
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(stem + CONFLICT_SUFFIX)


def mirror_file_name(name: str, env_id: str) -> str:
    """`<sanitized name>-<first 8 chars of id>.json`: readable, and unique per environment."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-") or "environment"
    short = re.sub(r"[^A-Za-z0-9]", "", env_id)[:8] or "env"
    return f"{slug}-{short}.json"


# -- file I/O (worker threads) -------------------------------------------------------------------


def _current_umask() -> int:
    """The process umask, read without setting it where possible (os.umask changes it for
    every thread for a moment, and the store writer's thread may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _sig(st: os.stat_result) -> Sig:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stat(path: Path) -> tuple[str, Sig | None]:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing", None
    except OSError:
        return "error", None
    if stat.S_ISDIR(st.st_mode):
        return "dir", _sig(st)
    return "file", _sig(st)


def _os_reason(path: Path, exc: OSError, verb: str) -> str:
    if exc.errno == errno.ENOENT:
        return f"cannot {verb} {path}: the folder {path.parent} does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot {verb} {path}: permission denied"
    if exc.errno == errno.EISDIR:
        return f"cannot {verb} {path}: it is a directory"
    if exc.errno == errno.ENOTDIR:
        return f"cannot {verb} {path}: a part of {path.parent} is not a folder"
    return f"cannot {verb} {path}: {exc.strerror or exc}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"malformed JSON: {name} is not a JSON value")


def parse_environment(data: bytes, env_id: str) -> tuple[dict[str, Any], Any, str]:
    """File bytes -> (prepared environment, raw JSON, JSON hash); ValueError says why not."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError("the file is empty")
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    if "\\u" in text:  # "\ud800" parses, but a lone surrogate is not text (pycrdt panics on it)
        try:
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff)") from None
    if isinstance(raw, dict) and isinstance(raw.get("uuid"), str) and raw["uuid"] != env_id:
        raise ValueError(f"it holds another environment (uuid {raw['uuid']})")
    try:
        prepared, _notes = prepare(raw, env_id)
    except ModelError as exc:
        raise ValueError(exc.message) from None
    return prepared, raw, json_hash(raw)


def _observe(path: Path, env_id: str) -> tuple[Observation, dict[str, Any] | None, Any]:
    """Stat, read and parse the path: (observation, prepared environment, raw JSON)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return Observation("missing"), None, None
    except IsADirectoryError:
        kind, sig = _stat(path)
        return Observation("dir", sig), None, None
    except OSError as exc:
        kind, sig = _stat(path)
        if kind == "dir":
            return Observation("dir", sig), None, None
        return Observation("error", sig, error=_os_reason(path, exc, "read")), None, None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return Observation("dir", _sig(st)), None, None
        if not stat.S_ISREG(st.st_mode):
            return Observation("error", _sig(st), error=f"{path} is not a regular file"), None, None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        sig = _sig(os.fstat(fd))
    except OSError as exc:
        return Observation("error", None, error=_os_reason(path, exc, "read")), None, None
    finally:
        os.close(fd)
    try:
        prepared, raw, jh = parse_environment(data, env_id)
    except (ValueError, RecursionError) as exc:
        return Observation("file", sig, data, None, str(exc)), None, None
    return Observation("file", sig, data, jh), prepared, raw


def _racy(sig: Sig) -> bool:
    """Whether the file may have changed since `sig` without its sig changing: its mtime is so
    recent that another save within the timestamp's granularity would keep it (git's "racy"
    entries). Then only the content can tell. (A save sets the mtime to now, so an mtime far
    from now, even in the future, would change with any save.)"""
    return abs(time.time_ns() - sig[0]) < RACY_NS


def _content_is(path: Path, known: str | None) -> bool:
    """Whether the file's bytes still hash to `known` (for a stat that cannot tell)."""
    try:
        with open(path, "rb") as f:
            return content_hash(f.read()) == known
    except OSError:
        return False  # let an observation say what is wrong


def _write_atomic(
    path: Path,
    data: bytes,
    expect: Sig | None | Literal["any"],
    umask: int,
    expect_hash: str | None = None,
) -> tuple[WriteOutcome, Sig | None, str | None]:
    """Temporary file in the same folder, fsync, rename: a reader never sees half a file.

    Unless `expect` is "any", nothing is written when the file is no longer what the link last
    saw (someone saved it meanwhile): the link reads it first, so their save is not lost. While
    the sig is racy, the content is compared with `expect_hash` too.
    """
    try:
        current = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        current = None
    except OSError as exc:
        return "failed", None, _os_reason(path, exc, "write")
    if current is not None and stat.S_ISDIR(current.st_mode):
        return "failed", None, f"{path} is a directory, not a file: not writing there"
    if expect != "any" and (None if current is None else _sig(current)) != expect:
        return "changed", None, None
    if (
        expect not in ("any", None)
        and expect_hash is not None
        and _racy(expect)
        and not _content_is(path, expect_hash)
    ):
        return "changed", None, None
    mode = stat.S_IMODE(current.st_mode) if current is not None else 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        return "failed", None, _os_reason(path, exc, "write")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, mode)
            sig = _sig(os.fstat(fd))  # rename keeps mtime, size and inode
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return "failed", None, _os_reason(path, exc, "write")
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # the rename is done; a folder that cannot be fsynced is not an error
    return "ok", sig, None


def _render(env: dict[str, Any], template: Any, style: tuple[bool, bool]) -> tuple[bytes, str, Any]:
    """-> (file bytes, JSON hash, the written object parsed back: the next template)."""
    text = format_environment(env, template=template, style=style)
    return text.encode("utf-8", "surrogatepass"), json_hash(env), json.loads(text)


def _fork_apply(base: bytes, prepared: dict[str, Any]) -> tuple[bytes, bytes]:
    """Apply `prepared` to a fork of `base`: (the difference, the fork's whole state)."""
    fork = Doc()
    fork.apply_update(base)
    before = fork.get_state()
    apply_environment(fork, prepared)
    return fork.get_update(before), fork.get_update()


def inspect_target(path: Path, env_id: str) -> tuple[str, str | None]:
    """Can `env_id` be linked to `path`? -> (mode, refusal). Runs in a worker thread.

    mode "overwrite" (absent or empty file) or "adopt" (a file of this same environment).
    Refusal: (code, message) packed as "code: message".
    """
    parent = path.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        return "", f"bad-path: the folder {parent} does not exist"
    except OSError as exc:
        return "", f"bad-path: {_os_reason(path, exc, 'write')}"
    if not stat.S_ISDIR(pst.st_mode):
        return "", f"bad-path: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return "", f"bad-path: cannot write in {parent}: permission denied"
    kind, _ = _stat(path)
    if kind == "missing":
        return "overwrite", None
    if kind == "dir":
        return "", f"bad-path: {path} is a directory"
    obs, _prepared, _raw = _observe(path, env_id)
    if obs.kind == "error":
        return "", f"bad-path: {obs.error}"
    if not os.access(path, os.W_OK):
        return "", f"bad-path: cannot write {path}: permission denied"
    if not obs.content or not obs.content.strip():
        return "overwrite", None
    if obs.json_hash is None:
        return "", (
            f"link-refused: {path} is not an environment {env_id} can be linked to "
            f"({obs.error}); pass overwrite to replace it with the environment"
        )
    return "adopt", None


# -- one link ------------------------------------------------------------------------------------


class LinkRunner:
    """The task of one link: polls the file, sleeps until the machine's deadline, acts."""

    def __init__(
        self, mirror: MirrorService, env_id: str, path: Path, *, auto: bool, machine: LinkMachine
    ) -> None:
        self.mirror = mirror
        self.env_id = env_id
        self.path = path
        self.conflict_path = Path(machine.conflict_path)
        self.auto = auto
        self.m = machine
        self.wake = trio.Event()
        self.first_sync = trio.Event()
        self.scope = trio.CancelScope()
        self.template: Any = None  # the file's last content we know, parsed: key order
        self.style: tuple[bool, bool] = (True, False)  # ... and its layout (Mockoon's default)
        self._render_hash: str | None = None
        self.base: bytes | None = None  # Yjs state the file's content corresponds to
        self._prepared: tuple[str | None, dict[str, Any] | None, Any] = (None, None, None)
        self._render: tuple[bytes | None, Any] = (None, None)
        self.done = trio.Event()

    def doc_changed(self) -> None:
        self.m.doc_changed(trio.current_time())
        self.wake.set()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.env_id,
            "path": str(self.path),
            "conflict_path": str(self.conflict_path),
            "auto": self.auto,
            "state": self.m.state,
            "error": self.m.reason,
            "conflict": self.m.conflict,
            "stats": dict(self.m.stats),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                task_status.started()
                try:
                    await self._supervised()
                finally:
                    with trio.CancelScope(shield=True) as flush:
                        flush.deadline = trio.current_time() + FLUSH_TIMEOUT
                        await self._last_flush()
        finally:
            self.first_sync.set()
            self.done.set()

    async def _supervised(self) -> None:
        """A bug in one link must not end the daemon: report it, wait, look at the file again."""
        while True:
            try:
                await self._loop()
            except BaseException as exc:
                if not _is_failure(exc):  # Cancelled: the link or the daemon stops
                    raise
                await self._failed(exc, "internal error: ")
                await trio.sleep(RESTART_DELAY)

    async def _last_flush(self) -> None:
        """The flush at unlink or shutdown runs outside the supervised loop: its failure is this
        link's error too (in `env links` and a `mirror-error` event), never the daemon's end."""
        try:
            await self._flush()
        except BaseException as exc:
            if not _is_failure(exc):
                raise
            await self._failed(exc, "the last changes could not be written: ")

    async def _failed(self, exc: BaseException, prefix: str) -> None:
        """Put the link in error with why; logged with its traceback once per distinct reason."""
        reason = prefix + _describe(exc)
        if reason != self.m.error:
            log.error("link %s -> %s failed", self.env_id, self.path, exc_info=exc)
        self.first_sync.set()
        await self._do(self.m.failed(trio.current_time(), reason))

    async def _loop(self) -> None:
        await self._observe_and_feed()
        next_stat = trio.current_time() + POLL_INTERVAL
        while True:
            now = trio.current_time()
            if self.m.want_observe or now >= next_stat:
                next_stat = now + POLL_INTERVAL
                kind, sig = await trio.to_thread.run_sync(_stat, self.path)
                changed = (
                    self.m.want_observe
                    or sig != self.m.sig
                    or (kind != self.m.kind and self.m.kind != "error")
                )
                if not changed and kind == "file" and sig is not None and _racy(sig):
                    known = self.m.file_hash
                    changed = not await trio.to_thread.run_sync(_content_is, self.path, known)
                if changed:
                    await self._observe_and_feed()
            await self._do(self.m.poll(trio.current_time()))
            deadline = self.m.deadline()
            wake_at = next_stat if deadline is None else min(next_stat, deadline)
            if self.m.want_observe:
                wake_at = trio.current_time()
            with trio.move_on_at(wake_at):
                await self.wake.wait()
            self.wake = trio.Event()

    async def _observe_and_feed(self) -> None:
        obs, prepared, raw = await trio.to_thread.run_sync(_observe, self.path, self.env_id)
        if obs.kind == "file":
            self._prepared = (obs.hash, prepared, raw)
            if raw is not None:  # follow the file's current key order and layout
                self.template, self.style = raw, text_style(obs.content)
        await self._do(self.m.observed(trio.current_time(), obs))

    async def _flush(self) -> None:
        """At shutdown or unlink: write what the document has and the file does not yet."""
        m = self.m
        if not (m.dirty and m.started and m.pending_missing is None and m.pending_invalid is None):
            return
        if m.conflict or m.in_flight or m.rendering or m.want_observe or m.retry_at is not None:
            return
        if self.env_id not in self.mirror.registry.envs:
            return
        await self._do(m.poll(trio.current_time() + 3600))

    async def _do(self, actions: list[Action]) -> None:
        queue: deque[Action] = deque(actions)
        while queue:
            action = queue.popleft()
            now = trio.current_time
            if isinstance(action, Render):
                queue.extend(await self._render_doc(action.target))
            elif isinstance(action, Write):
                path = self.path if action.target == "file" else self.conflict_path
                outcome, sig, error = await trio.to_thread.run_sync(
                    _write_atomic,
                    path,
                    action.content,
                    action.expect,
                    self.mirror.umask,
                    action.expect_hash,
                )
                base, template = self._render
                if outcome == "ok" and action.target == "file":
                    self.base, self.template = base, template
                queue.extend(
                    self.m.write_done(
                        now(),
                        action.target,
                        outcome,
                        content=action.content,
                        json_hash=self._render_hash,
                        sig=sig,
                        error=error,
                    )
                )
            elif isinstance(action, Apply):
                queue.extend(await self._apply(action.content))
            elif isinstance(action, Emit):
                if action.type in ("mirror-error", "mirror-conflict", "mirror-file-deleted"):
                    log.warning("%s: %s", action.type, action.data.get("reason"))
                    self.first_sync.set()
                self.mirror.events.emit(action.type, **action.data)
            elif isinstance(action, Synced):
                self.mirror.save_synced(self.env_id, action.content_hash)
                self.first_sync.set()

    async def _render_doc(self, target: str) -> list[Action]:
        reg = self.mirror.registry
        if self.env_id not in reg.envs:
            self.m.rendering = None
            return []
        try:
            env = reg.export(self.env_id)
            base = reg.state_update(self.env_id) if target == "file" else None
            content, jh, ordered = await trio.to_thread.run_sync(
                _render, env, self.template, self.style
            )
        except BaseException as exc:
            # the document holds what no file can say (or a bug): this link's error, retried
            # with backoff; the file keeps its last good content
            if not _is_failure(exc):
                raise
            reason = f"the environment cannot be written to {self.path.name}: {_describe(exc)}"
            if reason != self.m.error:
                log.error("link %s -> %s: rendering failed", self.env_id, self.path, exc_info=exc)
            self.first_sync.set()
            return self.m.failed(trio.current_time(), reason)
        self._render = (base, ordered)
        self._render_hash = jh
        actions = self.m.rendered(trio.current_time(), target, content, jh)
        if target == "file" and not any(isinstance(a, Write) for a in actions):
            if self.m.file_json == jh and self.m.kind == "file":
                self.base = base  # the file already says what this state says
        return actions

    async def _apply(self, content: bytes) -> list[Action]:
        reg = self.mirror.registry
        h, prepared, _raw = self._prepared
        now = trio.current_time
        if h != content_hash(content) or prepared is None:
            return self.m.applied(now(), content, error="the file changed while it was read")
        if self.env_id not in reg.envs:
            self.m.in_flight = False
            return []
        base = self.base if self.base is not None else reg.state_update(self.env_id)
        try:
            delta, new_base = await trio.to_thread.run_sync(_fork_apply, base, prepared)
            if self.env_id not in reg.envs:
                self.m.in_flight = False
                return []
            if delta != EMPTY_UPDATE:
                reg.merge(self.env_id, delta, ORIGIN)
        except BaseException as exc:  # a bug, or a pycrdt panic: keep the file, keep running
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise
            log.exception("applying %s failed", self.path)
            return self.m.applied(now(), content, error=f"it could not be applied: {exc}")
        self.base = new_base
        return self.m.applied(now(), content)


# -- the service ---------------------------------------------------------------------------------


class MirrorService:
    """Owns every link; registers `env.link`, `env.unlink`, `env.links`, `env.import_link`."""

    def __init__(
        self,
        registry: Any,
        store: Store,
        service: Any,
        events: Any,
        mirror_dir: Path | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.service = service
        self.events = events
        self.mirror_dir = Path(mirror_dir).expanduser().absolute() if mirror_dir else None
        self.links: dict[str, LinkRunner] = {}
        self._nursery: trio.Nursery | None = None
        self.umask = _current_umask()

    # -- lifetime -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for op, handler in (
            ("env.link", self.op_link),
            ("env.unlink", self.op_unlink),
            ("env.links", self.op_links),
            ("env.import_link", self.op_import_link),
        ):
            self.service.register(op, handler)
        token = self.registry.add_listener(self._on_change)
        events_token = self.events.listen(self._on_event)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_links()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.registry.remove_listener(token)
            self.events.unlisten(events_token)

    async def _start_links(self) -> None:
        saved: dict[str, Any] = dict(self.store.get_setting(LINKS_KEY) or {})
        dropped = False
        for env_id, entry in sorted(saved.items()):
            path = Path(entry.get("path", ""))
            auto = bool(entry.get("auto"))
            if (
                env_id not in self.registry.envs
                or not path.is_absolute()
                or (auto and (self.mirror_dir is None or path.parent != self.mirror_dir))
            ):
                del saved[env_id]
                dropped = True
                continue
            machine = self._machine(env_id, path, entry.get("synced"), "resume")
            await self._start(LinkRunner(self, env_id, path, auto=auto, machine=machine))
        if dropped:
            self._put_links(saved)
        if self.mirror_dir is not None:
            try:
                await trio.to_thread.run_sync(
                    lambda: self.mirror_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                )
            except OSError as exc:
                reason = _os_reason(self.mirror_dir, exc, "create")
                log.warning("mirror-error: %s", reason)
                self.events.emit("mirror-error", id=None, path=str(self.mirror_dir), reason=reason)
            for env_id in sorted(self.registry.envs):
                await self._guarded(self._auto_link, env_id)

    def _machine(self, env_id: str, path: Path, synced: str | None, mode: Any) -> LinkMachine:
        return LinkMachine(
            env_id, str(path), str(conflict_path_for(path)), synced=synced, mode=mode
        )

    async def _start(self, runner: LinkRunner) -> None:
        assert self._nursery is not None
        self.links[runner.env_id] = runner
        await self._nursery.start(runner.run)

    async def _stop(self, env_id: str) -> LinkRunner | None:
        runner = self.links.pop(env_id, None)
        if runner is not None:
            runner.scope.cancel()
            await runner.done.wait()
        return runner

    # -- settings -------------------------------------------------------------------------------

    def _links_setting(self) -> dict[str, Any]:
        return dict(self.store.get_setting(LINKS_KEY) or {})

    def _put_links(self, links: dict[str, Any]) -> Any:
        try:
            return self.store.put_setting(LINKS_KEY, links)
        except StoreError as exc:  # closed during shutdown
            log.warning("cannot save links: %s", exc)
            return None

    def _mirror_setting(self) -> dict[str, Any]:
        value = self.store.get_setting(MIRROR_KEY) or {}
        return {
            "names": dict(value.get("names") or {}),
            "excluded": list(value.get("excluded") or []),
        }

    def save_synced(self, env_id: str, content_hash: str) -> None:
        links = self._links_setting()
        entry = links.get(env_id)
        runner = self.links.get(env_id)
        if entry is None or runner is None or entry.get("path") != str(runner.path):
            return
        if entry.get("synced") != content_hash:
            links[env_id] = {**entry, "synced": content_hash}
            self._put_links(links)

    # -- following the registry -----------------------------------------------------------------

    def _on_change(self, env_id: str, update: bytes, origin: str) -> None:
        runner = self.links.get(env_id)
        if runner is not None:
            runner.doc_changed()

    def _on_event(self, event: dict[str, Any]) -> None:
        if self._nursery is None:
            return
        env_id = event.get("data", {}).get("id")
        if event["type"] == "environment-deleted" and env_id in self.links:
            self._nursery.start_soon(self._guarded, self._forget, env_id)
        elif event["type"] == "environment-created" and self.mirror_dir is not None:
            self._nursery.start_soon(self._guarded, self._auto_link, env_id)

    async def _guarded(self, fn: Callable[[str], Any], env_id: str) -> None:
        """A background step for one environment: its failure is that environment's mirror
        error (logged, and a `mirror-error` event), not the end of the service and the daemon."""
        try:
            await fn(env_id)
        except BaseException as exc:
            if not _is_failure(exc):
                raise
            reason = f"internal error: {_describe(exc)}"
            log.error("mirror of %s: %s", env_id, reason, exc_info=exc)
            runner = self.links.get(env_id)
            path = str(runner.path) if runner is not None else None
            self.events.emit("mirror-error", id=env_id, path=path, reason=reason)

    async def _forget(self, env_id: str) -> None:
        runner = await self._stop(env_id)
        links = self._links_setting()
        if links.pop(env_id, None) is not None:
            self._put_links(links)
        if runner is not None:
            self.events.emit(
                "mirror-unlinked",
                id=env_id,
                path=str(runner.path),
                reason="the environment was deleted; the file is left as it is",
            )

    async def _auto_link(self, env_id: str) -> None:
        """`--mirror-dir`: every environment without a link gets one, under a stable name."""
        if self.mirror_dir is None or env_id in self.links or env_id not in self.registry.envs:
            return
        mirror = self._mirror_setting()
        if env_id in mirror["excluded"]:
            return
        name = mirror["names"].get(env_id)
        if name is None:
            name = mirror_file_name(self.registry.summary(env_id)["name"], env_id)
            mirror["names"][env_id] = name
            self.store.put_setting(MIRROR_KEY, mirror)
        path = self.mirror_dir / name
        if self._owner(path) not in (None, env_id):
            return
        mode, refusal = await trio.to_thread.run_sync(inspect_target, path, env_id)
        if refusal is not None:
            reason = refusal.split(": ", 1)[1]
            log.warning("mirror-error: %s", reason)
            self.events.emit("mirror-error", id=env_id, path=str(path), reason=reason)
            return
        if env_id in self.links:  # linked meanwhile
            return
        links = self._links_setting()
        links[env_id] = {"path": str(path), "synced": None, "auto": True}
        self._put_links(links)
        await self._start(
            LinkRunner(
                self, env_id, path, auto=True, machine=self._machine(env_id, path, None, mode)
            )
        )

    def _owner(self, path: Path) -> str | None:
        for env_id, runner in self.links.items():
            if runner.path == path:
                return env_id
        return None

    # -- operations -----------------------------------------------------------------------------

    async def _prepare_link(self, args: dict[str, Any], env_id: str | None) -> tuple[Path, bool]:
        raw = args.get("path")
        if not isinstance(raw, str) or not raw:
            raise OpError(BAD_REQUEST, "argument 'path' must be a non-empty string")
        if not os.path.isabs(raw):
            raise OpError(
                BAD_REQUEST, f"path {raw!r} must be absolute (the daemon's cwd is not yours)"
            )
        path = Path(os.path.realpath(raw))
        owner = self._owner(path)
        if owner is not None and owner != env_id:
            raise OpError(
                LINK_CONFLICT,
                f"{path} is linked to environment {owner} already; one file mirrors one "
                f"environment (`peerdaemon env unlink {owner}` first)",
            )
        return path, bool(args.get("overwrite"))

    async def _link(self, env_id: str, path: Path, mode: str) -> Any:
        await self._stop(env_id)
        links = self._links_setting()
        links[env_id] = {"path": str(path), "synced": None, "auto": False}
        ticket = self._put_links(links)
        mirror = self._mirror_setting()
        if env_id in mirror["excluded"]:
            mirror["excluded"].remove(env_id)
            self.store.put_setting(MIRROR_KEY, mirror)
        runner = LinkRunner(
            self, env_id, path, auto=False, machine=self._machine(env_id, path, None, mode)
        )
        await self._start(runner)
        self.events.emit("mirror-linked", id=env_id, path=str(path), mode=mode)
        with trio.move_on_after(FIRST_SYNC_TIMEOUT):
            await runner.first_sync.wait()
        return ticket, runner.describe()

    async def op_link(self, args: dict[str, Any], session: Any) -> Any:
        env_id = args.get("id")
        if not isinstance(env_id, str) or not env_id:
            raise OpError(BAD_REQUEST, "argument 'id' must be a non-empty string")
        self.registry.get(env_id)
        path, overwrite = await self._prepare_link(args, env_id)
        mode, refusal = await trio.to_thread.run_sync(inspect_target, path, env_id)
        if refusal is not None and not (overwrite and refusal.startswith("link-refused")):
            code, message = refusal.split(": ", 1)
            raise OpError(code, message)
        if overwrite:
            mode = "overwrite"
        if self._owner(path) not in (None, env_id):  # someone linked it while we looked
            raise OpError(LINK_CONFLICT, f"{path} was linked to another environment meanwhile")
        ticket, result = await self._link(env_id, path, mode)
        return Pending(ticket.wait, result) if ticket is not None else result

    async def op_unlink(self, args: dict[str, Any], session: Any) -> Any:
        env_id = args.get("id")
        if not isinstance(env_id, str) or not env_id:
            raise OpError(BAD_REQUEST, "argument 'id' must be a non-empty string")
        runner = await self._stop(env_id)
        if runner is None:
            raise OpError(NOT_FOUND, f"environment {env_id} is not linked to a file")
        links = self._links_setting()
        links.pop(env_id, None)
        ticket = self._put_links(links)
        if runner.auto:
            mirror = self._mirror_setting()
            if env_id not in mirror["excluded"]:
                mirror["excluded"].append(env_id)
                ticket = self.store.put_setting(MIRROR_KEY, mirror)
        self.events.emit("mirror-unlinked", id=env_id, path=str(runner.path), reason="unlinked")
        result = {"id": env_id, "path": str(runner.path), "unlinked": True}
        return Pending(ticket.wait, result) if ticket is not None else result

    async def op_links(self, args: dict[str, Any], session: Any) -> Any:
        return [self.links[i].describe() for i in sorted(self.links)]

    async def op_import_link(self, args: dict[str, Any], session: Any) -> Any:
        """`env.import` of a file, then a link to it: the file becomes the environment's mirror
        (rewritten at once if the import repaired it or gave it a new id)."""
        path, _ = await self._prepare_link(args, None)
        mode, refusal = await trio.to_thread.run_sync(inspect_target, path, "\0")
        if refusal is not None and refusal.startswith("bad-path"):
            code, message = refusal.split(": ", 1)
            raise OpError(code, message)
        import_args = {k: v for k, v in args.items() if k not in ("path", "overwrite")}
        imported = await self.service.handle("env.import", import_args, session)
        waits: list[Callable[[], Any]] = []
        result = imported
        if isinstance(imported, Pending):
            waits.append(imported.wait)
            result = imported.result
        env_id = result["id"]
        ticket, link = await self._link(env_id, path, "overwrite")
        if ticket is not None:
            waits.append(ticket.wait)

        async def wait_all() -> None:
            for wait in waits:
                await wait()

        return Pending(wait_all, {**result, "path": link["path"], "link": link})


__all__ = ["MirrorService", "conflict_path_for", "mirror_file_name", "parse_environment"]
