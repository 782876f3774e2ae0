"""The mirror service: keeps linked files and environment documents in step (docs/mirror.md).

It owns every link and its lifetime: one `LinkRunner` task per link, started for the stored links
at start, by `env link`, and for every environment under `--mirror-dir`; stopped by `env unlink`,
the environment's deletion, or shutdown (each flushing what the file does not say yet). It tells
a link's runner when its document changed. One link's work is `runner.py`; the socket operations
are `operations.py`; what survives a restart is `settings.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..core.errors import is_failure
from ..core.events import Event, EventLog
from ..core.registry import Registry
from ..store import Store, Ticket
from .files import Refusal, conflict_path_for, current_umask, inspect_target, os_reason
from .link import LinkMachine, StartMode
from .operations import MirrorOperations, OperationTable
from .runner import LinkRunner, describe_failure
from .settings import MirrorSettings, mirror_file_name

log = logging.getLogger("peerdaemon.mirror")

FIRST_SYNC_TIMEOUT = 10.0
"""How long `env.link` waits for the first write or apply before answering anyway."""


class MirrorService:
    """Owns every link; registers `env.link`, `env.unlink`, `env.links`, `env.import_link`."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        operations: OperationTable,
        events: EventLog,
        mirror_dir: Path | None = None,
    ) -> None:
        self.registry = registry
        self.settings = MirrorSettings(store)
        self.events = events
        self.mirror_dir = Path(mirror_dir).expanduser().absolute() if mirror_dir else None
        self.links: dict[str, LinkRunner] = {}
        self._operations = MirrorOperations(self, registry, operations)
        self._nursery: trio.Nursery | None = None
        self._umask = current_umask()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._operations.register()
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

    # -- what the socket operations use ---------------------------------------------------------

    def owner(self, path: Path) -> str | None:
        """The environment linked to `path`, if any (one file mirrors one environment)."""
        for env_id, runner in self.links.items():
            if runner.path == path:
                return env_id
        return None

    def describe_links(self) -> list[dict[str, Any]]:
        return [self.links[env_id].describe() for env_id in sorted(self.links)]

    async def link(
        self, env_id: str, path: Path, mode: StartMode
    ) -> tuple[Ticket | None, dict[str, Any]]:
        """Link (or move the link of) `env_id` to `path`, checked already. Answers once the first
        write or apply is done, or `FIRST_SYNC_TIMEOUT` has passed: the ticket of the stored link,
        and the link as `env.links` shows it."""
        await self._stop(env_id)
        links = self.settings.links()
        links[env_id] = {"path": str(path), "synced": None, "auto": False}
        ticket = self.settings.put_links(links)
        mirror = self.settings.dir_setting()
        if env_id in mirror["excluded"]:
            mirror["excluded"].remove(env_id)
            self.settings.put_dir_setting(mirror)
        runner = self._runner(env_id, path, auto=False, mode=mode)
        await self._start(runner)
        self.events.emit("mirror-linked", id=env_id, path=str(path), mode=mode)
        with trio.move_on_after(FIRST_SYNC_TIMEOUT):
            await runner.first_sync.wait()
        return ticket, runner.describe()

    async def unlink(self, env_id: str) -> tuple[Path, Ticket | None] | None:
        """Stop mirroring `env_id`, leaving its file: (the path, the ticket of the stored change);
        None if it was not linked. A `--mirror-dir` link stays off until linked again."""
        runner = await self._stop(env_id)
        if runner is None:
            return None
        links = self.settings.links()
        links.pop(env_id, None)
        ticket = self.settings.put_links(links)
        if runner.auto:
            mirror = self.settings.dir_setting()
            if env_id not in mirror["excluded"]:
                mirror["excluded"].append(env_id)
                ticket = self.settings.put_dir_setting(mirror)
        self.events.emit("mirror-unlinked", id=env_id, path=str(runner.path), reason="unlinked")
        return runner.path, ticket

    # -- starting and stopping links ------------------------------------------------------------

    async def _start_links(self) -> None:
        saved = self.settings.links()
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
            runner = self._runner(
                env_id, path, auto=auto, mode="resume", synced=entry.get("synced")
            )
            await self._start(runner)
        if dropped:
            self.settings.put_links(saved)
        if self.mirror_dir is not None:
            mirror_dir = self.mirror_dir
            try:
                await trio.to_thread.run_sync(
                    partial(mirror_dir.mkdir, parents=True, exist_ok=True)
                )
            except OSError as exc:
                reason = os_reason(mirror_dir, exc, "create")
                log.warning("mirror-error: %s", reason)
                self.events.emit("mirror-error", id=None, path=str(mirror_dir), reason=reason)
            for env_id in sorted(self.registry.envs):
                await self._guarded(self._auto_link, env_id)

    def _runner(
        self, env_id: str, path: Path, *, auto: bool, mode: StartMode, synced: str | None = None
    ) -> LinkRunner:
        machine = LinkMachine(
            env_id, str(path), str(conflict_path_for(path)), synced=synced, mode=mode
        )
        return LinkRunner(
            machine,
            auto=auto,
            registry=self.registry,
            events=self.events,
            umask=self._umask,
            on_in_sync=self._save_in_sync,
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

    def _save_in_sync(self, env_id: str, content_hash: str) -> None:
        """Only for a link still running: a stopped one's last flush must not touch the
        setting its replacement (or its removal) writes."""
        runner = self.links.get(env_id)
        if runner is not None:
            self.settings.save_synced(env_id, str(runner.path), content_hash)

    # -- following the registry -----------------------------------------------------------------

    def _on_change(self, env_id: str, update: bytes, origin: str) -> None:
        runner = self.links.get(env_id)
        if runner is not None:
            runner.doc_changed()

    def _on_event(self, event: Event) -> None:
        if self._nursery is None:
            return
        env_id = event.get("data", {}).get("id")
        if event["type"] == "environment-deleted" and env_id in self.links:
            self._nursery.start_soon(self._guarded, self._forget, env_id)
        elif event["type"] == "environment-created" and self.mirror_dir is not None:
            self._nursery.start_soon(self._guarded, self._auto_link, env_id)

    async def _guarded(self, step: Callable[[str], Awaitable[None]], env_id: str) -> None:
        """A background step for one environment: its failure is that environment's mirror
        error (logged, and a `mirror-error` event), not the end of the service and the daemon."""
        try:
            await step(env_id)
        except BaseException as exc:
            if not is_failure(exc):
                raise
            reason = f"internal error: {describe_failure(exc)}"
            log.error("mirror of %s: %s", env_id, reason, exc_info=exc)
            runner = self.links.get(env_id)
            path = str(runner.path) if runner is not None else None
            self.events.emit("mirror-error", id=env_id, path=path, reason=reason)

    async def _forget(self, env_id: str) -> None:
        runner = await self._stop(env_id)
        links = self.settings.links()
        if links.pop(env_id, None) is not None:
            self.settings.put_links(links)
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
        mirror = self.settings.dir_setting()
        if env_id in mirror["excluded"]:
            return
        name = mirror["names"].get(env_id)
        if name is None:
            name = mirror_file_name(self.registry.summary(env_id)["name"], env_id)
            mirror["names"][env_id] = name
            self.settings.put_dir_setting(mirror)
        path = self.mirror_dir / name
        if self.owner(path) not in (None, env_id):
            return
        found = await trio.to_thread.run_sync(inspect_target, path, env_id)
        if isinstance(found, Refusal):
            log.warning("mirror-error: %s", found.message)
            self.events.emit("mirror-error", id=env_id, path=str(path), reason=found.message)
            return
        if env_id in self.links:  # linked meanwhile
            return
        links = self.settings.links()
        links[env_id] = {"path": str(path), "synced": None, "auto": True}
        self.settings.put_links(links)
        await self._start(self._runner(env_id, path, auto=True, mode=found))
