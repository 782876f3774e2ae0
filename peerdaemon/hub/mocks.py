"""The hub's Cloud Mock: every shared environment whose space document says `hub: true` is
served 24/7 from the hub's own stored state by Mockoon's engine (one confined runner process,
docs/mock-runner.md), and reached through the hub's port at `/mock/SPACE/ENV/` (mockproxy.py).

Live: a change of a hosted environment's document reaches the runner as soon as the hub has
applied it (HubDocs' listeners are called with the relay to clients, not after the commit); a
change of a space document (a member turned a mock on or off, changed its access or rotated its
token) is reconciled at once.

Contained: the runner runs with `--confine` (no outgoing connection but to the operator's
allow-list, never to loopback, link-local or private ranges unless listed; file paths never
leave the environment's folder) and an empty process environment, so a member's environment
cannot reach the hub's network or secrets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..core.events import EventLog
from ..mock import (
    ERROR,
    RUNNING,
    MockEngine,
    Notice,
    RunnerShell,
    ServerSpec,
    locate,
    safe_dirname,
)
from ..model import export_environment
from ..spaces import SpaceDoc
from .accounts import Accounts
from .cloudmock import MockConfig  # (there, so a hub's config loads no more)
from .docs import FILES_PREFIX, SPACE_PREFIX, HubDocs, StoreUnavailable

__all__ = ["HostedMock", "HostedMocks", "MockConfig"]

STORE_RETRY = 1.0
"""Seconds before what the store could not give (PostgreSQL away, scaled mode) is read again."""

log = logging.getLogger("peerdaemon.hub.mocks")


@dataclass
class HostedMock:
    space: str
    env: str
    access: str
    token: str | None
    refused: str | None = None  # why the hub does not serve it (a limit)

    @property
    def key(self) -> str:
        return f"{self.space}/{self.env}"


class HostedMocks:
    def __init__(
        self,
        docs: HubDocs,
        accounts: Accounts | None,
        events: EventLog,
        data_dir: Path,
        config: MockConfig | None = None,
    ) -> None:
        self.docs = docs
        self.accounts = accounts
        self.events = events
        self.data_dir = Path(data_dir)
        self.config = config or MockConfig()
        self.engine = MockEngine(log_body_bytes=0)
        flags = ["--confine"]
        for host in self.config.allow_hosts:
            flags += ["--allow-host", host]
        if self.config.faker_seed is not None:
            flags += ["--faker-seed", str(self.config.faker_seed)]
        files = (self.data_dir / "mock-files").resolve()
        files.mkdir(parents=True, exist_ok=True)
        self.shell = RunnerShell(
            self.engine,
            lambda: [*locate(self.data_dir, sandbox=[files]), *flags],
            self._on_notices,
            env={},  # no variable of the hub's process reaches a template
            cwd=str(files),
            confined=True,
        )
        self.hosted: dict[str, HostedMock] = {}
        self.requests = 0
        self._dirty: set[str] = set()
        self._spaces_dirty: set[str] = set()
        self._files_dirty: set[str] = set()
        self._awaited: set[str] = set()
        """Hosted per the space document, but the environment's document has not arrived yet."""
        self._wake = trio.Event()
        self._noticed = trio.Event()

    # -- reading (the proxy) ---------------------------------------------------------------------

    def lookup(self, space: str, env: str) -> HostedMock | None:
        """The setting of a Cloud Mock the hub serves (None: off, unknown or refused)."""
        mock = self.hosted.get(f"{space}/{env}")
        return mock if mock is not None and mock.refused is None else None

    def port_of(self, mock: HostedMock) -> int | None:
        server = self.engine.servers.get(mock.key)
        return server.port if server is not None and server.state == RUNNING else None

    def limits(self, space: str) -> Any:
        return self.accounts.space_limits(space) if self.accounts is not None else None

    async def allow_rate(self, space: str, env: str, rate: float) -> bool:
        """A request the proxy's own bucket let through: also within a shared limit? (One
        process: the bucket is the limit; a cluster's processes share a window,
        hub/cluster/mocks.py.)"""
        return True

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for key, mock in sorted(self.hosted.items()):
            server = self.engine.servers.get(key)
            out.append(
                {
                    "space": mock.space,
                    "env": mock.env,
                    "access": mock.access,
                    "state": "refused" if mock.refused else (server.state if server else "-"),
                    "reason": mock.refused or (server.error if server else None),
                    "requests": server.requests if server else 0,
                }
            )
        return out

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = self.docs.add_listener(self._on_change)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.shell.run)
                for space in self.docs.spaces():
                    self._reconcile_or_later(space)
                self.shell.poke()
                nursery.start_soon(self._flush_loop)
                task_status.started()
        finally:
            self.docs.remove_listener(token)

    def _on_change(self, space: str, doc_id: str, update: bytes, origin: str) -> None:
        if doc_id == SPACE_PREFIX + space:
            self._spaces_dirty.add(space)
        elif doc_id.startswith(FILES_PREFIX):
            key = f"{space}/{doc_id[len(FILES_PREFIX) :]}"
            if key not in self.engine.servers:
                return
            self._files_dirty.add(key)
        elif f"{space}/{doc_id}" in self.engine.servers:
            self._dirty.add(f"{space}/{doc_id}")
        elif f"{space}/{doc_id}" in self._awaited:
            self._spaces_dirty.add(space)
        else:
            return
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            spaces, self._spaces_dirty = self._spaces_dirty, set()
            for space in spaces:
                self._reconcile_or_later(space)
            files, self._files_dirty = self._files_dirty, set()
            for key in files:
                try:
                    await self._write_files(key)
                except StoreUnavailable:
                    self._files_dirty.add(key)
            dirty, self._dirty = self._dirty, set()
            now = trio.current_time()
            for key in dirty:
                space, env = key.split("/", 1)
                environment = self._export(space, env)
                if environment is not None:
                    self.engine.change(key, environment, now)
            self.shell.poke()
            if self._spaces_dirty or self._files_dirty or self._dirty:
                await trio.sleep(STORE_RETRY)  # what the store could not give now, again
                self._wake.set()

    def _reconcile_or_later(self, space: str) -> None:
        try:
            self._reconcile(space)
        except StoreUnavailable as exc:  # (the mocks go on as they were meanwhile)
            log.warning("cloud mocks of space %s wait for the store: %s", space, exc)
            self._spaces_dirty.add(space)
            self._wake.set()

    def _export(self, space: str, env: str) -> dict[str, Any] | None:
        try:
            doc = self.docs.get_doc(space, env)
        except StoreUnavailable:
            self._dirty.add(f"{space}/{env}")  # exported once the store answers
            return None
        if doc is None:
            return None
        try:
            return export_environment(doc, env)
        except Exception as exc:  # reading is total; this is a bug, and one mock's only
            log.exception("cannot export %s/%s", space, env)
            self.events.emit("mock-error", id=f"{space}/{env}", code="EXPORT", message=str(exc))
            return None

    def _reconcile(self, space: str) -> None:
        """Serve what the space document says, within the hub's and the owner's limits."""
        doc = self.docs.get_doc(space, SPACE_PREFIX + space)
        wanted = SpaceDoc(doc).hosted() if doc is not None and self.config.enabled else {}
        self._awaited = {k for k in self._awaited if not k.startswith(f"{space}/")}
        self._awaited.update(f"{space}/{env}" for env in wanted if not self.docs.has(space, env))
        wanted = {env: s for env, s in wanted.items() if self.docs.has(space, env)}
        now = trio.current_time()
        for key in [k for k, m in self.hosted.items() if m.space == space and m.env not in wanted]:
            del self.hosted[key]
            self.engine.remove(key)
        limits = self.limits(space)
        per_owner = limits.hosted_mocks if limits is not None else None
        owner = self.accounts.owner_of(space) if self.accounts is not None else None
        # within a limit, the mocks turned on first keep their place
        for env, setting in sorted(wanted.items(), key=lambda kv: (kv[1]["at"] or 0, kv[0])):
            key = f"{space}/{env}"
            mock = HostedMock(space, env, setting["access"], setting["token"])
            refused = self._over_limit(key, owner, per_owner)
            mock.refused = refused
            self.hosted[key] = mock
            if refused is not None:
                self.engine.remove(key)
                continue
            if key not in self.engine.servers:
                self.engine.available()  # a runner installed meanwhile is found at once
                environment = self._export(space, env)
                if environment is None:
                    continue
                directory = self._directory(key)
                directory.mkdir(parents=True, exist_ok=True)
                self.engine.serve(key, ServerSpec(environment, str(directory), 0, "127.0.0.1"), now)
                self._files_dirty.add(key)  # written by the flush loop, before requests need them
                self._wake.set()
        self.shell.poke()

    def _directory(self, key: str) -> Path:
        space, env = key.split("/", 1)
        return self.data_dir / "mock-files" / space / safe_dirname(env)

    async def _write_files(self, key: str) -> None:
        """The environment's synced files (core/attachments.py) into its folder: the only files
        its engine may read (the runner is confined to that folder)."""
        # here, not at the top: a hub that hosts no mock does not keep these loaded
        from ..core.attachments import FilesDoc
        from ..mirror import materialize

        space, env = key.split("/", 1)
        doc = self.docs.get_doc(space, FILES_PREFIX + env)
        if doc is None:
            return
        files = FilesDoc(doc)
        contents = {}
        for path, entry in files.entries().items():
            data = files.blob(entry.sha256) if entry.sha256 else None
            if data is not None:
                contents[path] = data
        try:
            await trio.to_thread.run_sync(materialize, self._directory(key), contents)
        except OSError as exc:
            log.warning("cloud mock %s: cannot write its files: %s", key, exc)

    def _over_limit(self, key: str, owner: str | None, per_owner: int | None) -> str | None:
        served = [k for k, m in self.hosted.items() if m.refused is None and k != key]
        if key not in self.engine.servers and len(served) >= self.config.max_hosted:
            return f"the hub serves at most {self.config.max_hosted} Cloud Mocks"
        if per_owner is not None and key not in self.engine.servers:
            mine = [
                k
                for k in served
                if self.accounts is not None
                and self.accounts.owner_of(self.hosted[k].space) == owner
            ]
            if len(mine) >= per_owner:
                return f"the space's owner may host at most {per_owner} Cloud Mocks"
        return None

    async def wait_running(self, space: str, env: str, timeout: float) -> int | None:
        """The mock's port once it runs (a request that arrives while it starts waits)."""
        with trio.move_on_after(timeout):
            while True:
                mock = self.lookup(space, env)
                if mock is None:
                    return None
                port = self.port_of(mock)
                server = self.engine.servers.get(mock.key)
                if port is not None:
                    return port
                if server is None or server.state == ERROR:
                    return None
                await self._noticed.wait()
        return None

    def _on_notices(self, notices: list[Notice]) -> None:
        self._noticed.set()
        self._noticed = trio.Event()
        for notice in notices:
            if notice.kind == "request":
                self.requests += 1
            elif notice.kind in ("error", "blocked", "runner-exited"):
                data = {k: v for k, v in notice.data.items() if k not in ("id", "type")}
                self.events.emit(f"mock-{notice.kind}", id=notice.id, **data)
                quiet = notice.kind == "error" and data.get("fatal") is not True
                (log.debug if quiet else log.warning)(
                    "cloud mock %s: %s %s", notice.id or "runner", notice.kind, data
                )
