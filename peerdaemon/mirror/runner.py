"""The trio task of one link: carries out what its `LinkMachine` decides (docs/mirror.md).

It stats the file every `POLL_INTERVAL` (robust against editors' atomic renames, with no watcher
library to keep), has it read, parsed and written in worker threads (`files.py`), sleeps until the
machine's deadline or a document change, and feeds back what happened. Documents stay on the trio
thread; rendering and forking them for an apply run in worker threads too.

File content is applied as a three-way merge: the runner keeps the Yjs state that its file content
corresponds to (`base`: the state it last wrote, or the result of the last apply); the new file
content is applied as minimal edits to a fork of that state, and only the difference is merged
into the live document. So edits made elsewhere since the file was last synced survive a save
made from the older file, exactly as concurrent CRDT edits do.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from pycrdt import Doc

from ..core.errors import is_failure
from ..core.events import EventLog
from ..core.registry import Registry
from ..model import apply_environment
from ..model.lib0 import EMPTY_UPDATE
from .files import content_is, is_racy, read_file, stat_path, write_if_unchanged
from .format import content_hash, format_environment, json_hash, text_style
from .link import Action, Apply, Emit, InSync, LinkMachine, Render, Write

log = logging.getLogger("peerdaemon.mirror")

POLL_INTERVAL = 0.2
"""Seconds between two stats of a linked file."""
FLUSH_TIMEOUT = 2.0
"""How long unlink or shutdown may spend writing changes not yet mirrored."""
RESTART_DELAY = 1.0
"""Seconds before a link that hit a bug starts again."""
ORIGIN = "file"
"""The origin of the document changes a file brings."""

_WARNINGS = ("mirror-error", "mirror-conflict", "mirror-file-deleted")


def describe_failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def render_file(
    env: dict[str, Any], template: Any, style: tuple[bool, bool]
) -> tuple[bytes, str, Any]:
    """-> (file bytes, JSON hash, the written object parsed back: the next template)."""
    text = format_environment(env, template=template, style=style)
    return text.encode("utf-8", "surrogatepass"), json_hash(env), json.loads(text)


def fork_apply(base: bytes, prepared: dict[str, Any]) -> tuple[bytes, bytes]:
    """Apply `prepared` to a fork of `base`: (the difference, the fork's whole state)."""
    fork = Doc()
    fork.apply_update(base)
    before = fork.get_state()
    apply_environment(fork, prepared)
    return fork.get_update(before), fork.get_update()


class LinkRunner:
    """The task of one link: polls the file, sleeps until the machine's deadline, acts.

    `on_in_sync(env_id, content_hash)` persists what file and document last agreed on; the
    service decides whether this link is still the one stored.
    """

    def __init__(
        self,
        machine: LinkMachine,
        *,
        auto: bool,
        registry: Registry,
        events: EventLog,
        umask: int,
        on_in_sync: Callable[[str, str], None],
    ) -> None:
        self.machine = machine
        self.env_id = machine.env_id
        self.path = Path(machine.path)
        self.conflict_path = Path(machine.conflict_path)
        self.auto = auto
        self.registry = registry
        self.events = events
        self.umask = umask
        self.on_in_sync = on_in_sync
        self.wake = trio.Event()
        self.first_sync = trio.Event()
        """Set once the link first wrote or applied, or failed: `env.link` answers then."""
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.template: Any = None  # the file's last content we know, parsed: key order
        self.style: tuple[bool, bool] = (True, False)  # ... and its layout (Mockoon's default)
        self.base: bytes | None = None  # Yjs state the file's content corresponds to
        # the file's last read: its content hash and, if valid, the environment to apply
        self._read_hash: str | None = None
        self._read_environment: dict[str, Any] | None = None
        # the last render, for the write that follows it
        self._rendered_base: bytes | None = None
        self._rendered_template: Any = None
        self._rendered_hash: str | None = None

    def doc_changed(self) -> None:
        self.machine.doc_changed(trio.current_time())
        self.wake.set()

    def describe(self) -> dict[str, Any]:
        """This link for `env.links`."""
        machine = self.machine
        return {
            "id": self.env_id,
            "path": str(self.path),
            "conflict_path": str(self.conflict_path),
            "auto": self.auto,
            "state": machine.state,
            "error": machine.reason,
            "conflict": machine.conflict,
            "stats": dict(machine.stats),
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
                await self._poll_loop()
            except BaseException as exc:
                if not is_failure(exc):  # Cancelled: the link or the daemon stops
                    raise
                await self._failed(exc, "internal error: ")
                await trio.sleep(RESTART_DELAY)

    async def _last_flush(self) -> None:
        """The flush at unlink or shutdown runs outside the supervised loop: its failure is this
        link's error too (in `env links` and a `mirror-error` event), never the daemon's end."""
        try:
            await self._flush()
        except BaseException as exc:
            if not is_failure(exc):
                raise
            await self._failed(exc, "the last changes could not be written: ")

    async def _failed(self, exc: BaseException, prefix: str) -> None:
        """Put the link in error with why; logged with its traceback once per distinct reason."""
        reason = prefix + describe_failure(exc)
        if reason != self.machine.error:
            log.error("link %s -> %s failed", self.env_id, self.path, exc_info=exc)
        self.first_sync.set()
        await self._carry_out(self.machine.failed(trio.current_time(), reason))

    async def _poll_loop(self) -> None:
        machine = self.machine
        await self._read_and_feed()
        next_stat = trio.current_time() + POLL_INTERVAL
        while True:
            now = trio.current_time()
            if machine.want_observe or now >= next_stat:
                next_stat = now + POLL_INTERVAL
                kind, sig = await trio.to_thread.run_sync(stat_path, self.path)
                changed = (
                    machine.want_observe
                    or sig != machine.sig
                    or (kind != machine.kind and machine.kind != "error")
                )
                if not changed and kind == "file" and sig is not None and is_racy(sig):
                    known = machine.file_hash
                    changed = not await trio.to_thread.run_sync(content_is, self.path, known)
                if changed:
                    await self._read_and_feed()
            await self._carry_out(machine.poll(trio.current_time()))
            deadline = machine.deadline()
            wake_at = next_stat if deadline is None else min(next_stat, deadline)
            if machine.want_observe:
                wake_at = trio.current_time()
            with trio.move_on_at(wake_at):
                await self.wake.wait()
            self.wake = trio.Event()

    async def _read_and_feed(self) -> None:
        observation, environment, raw = await trio.to_thread.run_sync(
            read_file, self.path, self.env_id
        )
        if observation.kind == "file":
            self._read_hash, self._read_environment = observation.hash, environment
            if raw is not None:  # follow the file's current key order and layout
                self.template, self.style = raw, text_style(observation.content)
        await self._carry_out(self.machine.observed(trio.current_time(), observation))

    async def _flush(self) -> None:
        """At shutdown or unlink: write what the document has and the file does not yet."""
        machine = self.machine
        if not (
            machine.dirty
            and machine.started
            and machine.pending_missing is None
            and machine.pending_invalid is None
        ):
            return
        if (
            machine.conflict
            or machine.in_flight
            or machine.rendering
            or machine.want_observe
            or machine.retry_at is not None
        ):
            return
        if self.env_id not in self.registry.envs:
            return
        await self._carry_out(machine.poll(trio.current_time() + 3600))

    async def _carry_out(self, actions: list[Action]) -> None:
        """Run the machine's actions, and those its answers bring, in order."""
        queue: deque[Action] = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Render):
                queue.extend(await self._render(action.target))
            elif isinstance(action, Write):
                queue.extend(await self._write(action))
            elif isinstance(action, Apply):
                queue.extend(await self._apply(action.content))
            elif isinstance(action, Emit):
                if action.type in _WARNINGS:
                    log.warning("%s: %s", action.type, action.data.get("reason"))
                    self.first_sync.set()
                self.events.emit(action.type, **action.data)
            elif isinstance(action, InSync):
                self.on_in_sync(self.env_id, action.content_hash)
                self.first_sync.set()

    async def _render(self, target: str) -> list[Action]:
        registry = self.registry
        if self.env_id not in registry.envs:
            self.machine.rendering = None
            return []
        try:
            env = registry.export(self.env_id)
            base = registry.state_update(self.env_id) if target == "file" else None
            content, rendered_hash, template = await trio.to_thread.run_sync(
                render_file, env, self.template, self.style
            )
        except BaseException as exc:
            # the document holds what no file can say (or a bug): this link's error, retried
            # with backoff; the file keeps its last good content
            if not is_failure(exc):
                raise
            reason = (
                f"the environment cannot be written to {self.path.name}: {describe_failure(exc)}"
            )
            if reason != self.machine.error:
                log.error("link %s -> %s: rendering failed", self.env_id, self.path, exc_info=exc)
            self.first_sync.set()
            return self.machine.failed(trio.current_time(), reason)
        self._rendered_base, self._rendered_template = base, template
        self._rendered_hash = rendered_hash
        actions = self.machine.rendered(trio.current_time(), target, content, rendered_hash)
        if target == "file" and not any(isinstance(a, Write) for a in actions):
            if self.machine.file_json == rendered_hash and self.machine.kind == "file":
                self.base = base  # the file already says what this state says
        return actions

    async def _write(self, write: Write) -> list[Action]:
        path = self.path if write.target == "file" else self.conflict_path
        outcome, sig, error = await trio.to_thread.run_sync(
            write_if_unchanged, path, write.content, write.expect, self.umask, write.expect_hash
        )
        if outcome == "ok" and write.target == "file":
            self.base, self.template = self._rendered_base, self._rendered_template
        return self.machine.write_done(
            trio.current_time(),
            write.target,
            outcome,
            content=write.content,
            json_hash=self._rendered_hash,
            sig=sig,
            error=error,
        )

    async def _apply(self, content: bytes) -> list[Action]:
        registry = self.registry
        machine = self.machine
        environment = self._read_environment
        if self._read_hash != content_hash(content) or environment is None:
            error = "the file changed while it was read"
            return machine.applied(trio.current_time(), content, error=error)
        if self.env_id not in registry.envs:
            machine.in_flight = False
            return []
        base = self.base if self.base is not None else registry.state_update(self.env_id)
        try:
            delta, new_base = await trio.to_thread.run_sync(fork_apply, base, environment)
            if self.env_id not in registry.envs:
                machine.in_flight = False
                return []
            if delta != EMPTY_UPDATE:
                registry.before_replace(self.env_id, environment, ORIGIN)
                registry.merge(self.env_id, delta, ORIGIN)
        except BaseException as exc:  # a bug, or a pycrdt panic: keep the file, keep running
            if not is_failure(exc):
                raise
            log.exception("applying %s failed", self.path)
            return machine.applied(
                trio.current_time(), content, error=f"it could not be applied: {exc}"
            )
        self.base = new_base
        return machine.applied(trio.current_time(), content)
