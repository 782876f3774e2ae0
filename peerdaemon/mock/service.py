"""Mock serving on a device: the environments a user asked to serve, kept in the store so that
a daemon running as a service serves them again after a restart, served live by Mockoon's own
engine in one runner process (docs/mock-runner.md).

Every change of a served environment, whatever its source (the socket, a linked file, a peer, a
hub), reaches the registry's update stream; the service marks the environment dirty and its
flush task hands the newest export to the engine. Changes that arrive while one is being handed
over are coalesced, so a burst of edits costs one export, never a queue of stale ones.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..core.errors import BAD_REQUEST, NOT_FOUND, OpError, arg
from ..core.events import Event, EventLog
from ..core.registry import Registry, UnknownEnvironment
from ..store import Store
from .engine import ERROR, MockEngine, Notice, ServerSpec
from .install import locate
from .process import RunnerShell

__all__ = ["MOCKS_KEY", "MockService", "mock_url", "safe_dirname"]

log = logging.getLogger("peerdaemon.mock")

MOCKS_KEY = "mocks"
"""Store setting: env id -> {port, hostname}, the overrides given to `mock start`."""
START_WAIT = 10.0
"""`mock.start` answers once the server runs or failed, or after this long (still starting)."""
LOG_SIZE = 1000
"""Requests kept per served environment for `mock logs`."""

OpHandler = Callable[[dict[str, Any], Any], Any]


def mock_url(environment: dict[str, Any], hostname: str | None, port: int | None, tls: bool) -> str:
    """Where a served environment answers, as Mockoon's own UI shows it."""
    host = hostname or ""
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    prefix = environment.get("endpointPrefix") if isinstance(environment, dict) else ""
    prefix = prefix.strip("/") if isinstance(prefix, str) else ""
    scheme = "https" if tls else "http"
    return f"{scheme}://{host}:{port if port is not None else '?'}/{prefix + '/' if prefix else ''}"


class MockService:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        events: EventLog,
        *,
        data_dir: Path,
        directory_of: Callable[[str], Path | None] | None = None,
        runner_env: dict[str, str] | None = None,
        runner_args: list[str] | None = None,
        hosted: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.events = events
        self.data_dir = Path(data_dir)
        self.directory_of = directory_of or (lambda _env_id: None)
        self.hosted = hosted or (lambda: [])
        """The hub's Cloud Mocks of this device's environments, listed beside its own."""
        self.engine = MockEngine()
        args = list(runner_args or [])
        self.shell = RunnerShell(
            self.engine, lambda: [*locate(self.data_dir), *args], self._on_notices, env=runner_env
        )
        self.logs: dict[str, deque[dict[str, Any]]] = {}
        self._followers: dict[str, dict[int, tuple[Any, int]]] = {}
        """env id -> token -> (socket session, subscription): `mock.logs --follow`."""
        self._next_follower = 1
        self._dirty: set[str] = set()
        self._dirty_event = trio.Event()
        self._noticed = trio.Event()
        """Set (and replaced) whenever the runner reported something: `mock.start` waits on it."""

    # -- wiring --------------------------------------------------------------------------------

    def register(self, operations: Any) -> None:
        for op, handler in {
            "mock.start": self.op_start,
            "mock.stop": self.op_stop,
            "mock.list": self.op_list,
            "mock.logs": self.op_logs,
        }.items():
            operations.register(op, handler)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = self.registry.add_listener(self._on_change)
        # a served environment's document stays loaded: each change is exported for the engine
        keeper = self.registry.add_keeper(lambda env_id: env_id in self.engine.servers)
        watcher = self.events.listen(self._on_event)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.shell.run)
                nursery.start_soon(self._flush_loop)
                saved = self._saved()
                for env_id, entry in saved.items():
                    self._serve(env_id, _int(entry.get("port")), _str(entry.get("hostname")))
                gone = [env_id for env_id in saved if env_id not in self.engine.servers]
                if gone:  # deleted while the daemon was stopped: nothing to serve again
                    self.store.put_setting(
                        MOCKS_KEY, {k: v for k, v in saved.items() if k not in gone}
                    )
                task_status.started()
        finally:
            self.registry.remove_listener(listener)
            self.registry.remove_keeper(keeper)
            self.events.unlisten(watcher)

    def _saved(self) -> dict[str, dict[str, Any]]:
        value = self.store.get_setting(MOCKS_KEY) or {}
        return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, dict)}

    # -- serving -------------------------------------------------------------------------------

    def _directory(self, env_id: str) -> str:
        directory = self.directory_of(env_id)
        if directory is None:
            directory = self.data_dir / "mock-files" / safe_dirname(env_id)
            directory.mkdir(parents=True, exist_ok=True)
        return str(directory)

    def folders(self) -> dict[str, Path]:
        """The folder each served environment is served from (its engine's directory)."""
        return {env_id: Path(s.spec.directory) for env_id, s in self.engine.servers.items()}

    def _serve(self, env_id: str, port: int | None, hostname: str | None) -> None:
        try:
            environment = self.registry.export(env_id)
        except UnknownEnvironment:
            environment = None
        if environment is None:
            log.warning("mock of %s not served: the environment is gone", env_id)
            return
        spec = ServerSpec(environment, self._directory(env_id), port, hostname)
        self.engine.available()
        self.engine.serve(env_id, spec, trio.current_time())
        self.logs.setdefault(env_id, deque(maxlen=LOG_SIZE))
        self.shell.poke()

    def _on_change(self, env_id: str, update: bytes, origin: str) -> None:
        if env_id in self.engine.servers:
            self._dirty.add(env_id)
            self._dirty_event.set()

    def _on_event(self, event: Event) -> None:
        env_id = event.get("data", {}).get("id")
        if event.get("type") == "environment-deleted" and env_id in self.engine.servers:
            self._forget(env_id)
            self.events.emit("mock-stopped", id=env_id, reason="the environment was deleted")

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            dirty, self._dirty = self._dirty, set()
            now = trio.current_time()
            for env_id in dirty:
                try:
                    environment = self.registry.export(env_id)
                except UnknownEnvironment:
                    continue
                self.engine.change(env_id, environment, now)
            self.shell.poke()

    def _forget(self, env_id: str) -> None:
        """Stop serving; followers of its requests get a last `stopped` event."""
        for session, sub in list(self._followers.pop(env_id, {}).values()):
            session.push(sub, {"type": "stopped", "id": env_id})
            session.close_subscription(sub)
        self.logs.pop(env_id, None)
        self.engine.remove(env_id)
        self.shell.poke()
        saved = self._saved()
        if saved.pop(env_id, None) is not None:
            self.store.put_setting(MOCKS_KEY, saved)

    def _on_notices(self, notices: list[Notice]) -> None:
        self._noticed.set()
        self._noticed = trio.Event()
        for notice in notices:
            server_id = notice.id
            if notice.kind == "request" and server_id is not None:
                entry = _log_entry(notice.data)
                self.logs.setdefault(server_id, deque(maxlen=LOG_SIZE)).append(entry)
                for session, sub in list(self._followers.get(server_id, {}).values()):
                    session.push(sub, {"type": "request", **entry})
            elif notice.kind == "started":
                server = self.engine.servers.get(server_id or "")
                url = self._url(server_id) if server is not None else None
                self.events.emit("mock-started", id=server_id, port=notice.data["port"], url=url)
            elif notice.kind == "error":
                self.events.emit("mock-error", id=server_id, **_jsonable(notice.data))
            elif notice.kind == "runner-exited":
                self.events.emit("mock-runner-exited", **notice.data)
            elif notice.kind == "blocked":
                self.events.emit("mock-blocked", id=server_id, **_jsonable(notice.data))

    def _url(self, env_id: str | None) -> str | None:
        server = self.engine.servers.get(env_id or "")
        if server is None:
            return None
        port = server.port if server.port is not None else server.spec.port
        if port is None:
            port = _int(server.spec.environment.get("port"))
        hostname = server.hostname if server.hostname is not None else server.spec.hostname
        if hostname is None:
            hostname = server.spec.environment.get("hostname") or None
        tls = server.tls or bool((server.spec.environment.get("tlsOptions") or {}).get("enabled"))
        return mock_url(server.spec.environment, hostname, port, tls)

    def describe(self, env_id: str) -> dict[str, Any]:
        server = self.engine.servers[env_id]
        name = server.spec.environment.get("name")
        return {
            **server.describe(),
            "name": name if isinstance(name, str) else "",
            "where": "device",
            "url": self._url(env_id),
        }

    # -- operations ----------------------------------------------------------------------------

    async def op_start(self, args: dict[str, Any], session: Any) -> dict[str, Any]:
        env_id = arg(args, "id", str, op="mock.start")
        port = arg(args, "port", int, default=None, op="mock.start")
        hostname = arg(args, "hostname", str, default=None, op="mock.start")
        if port is not None and not 0 <= port <= 65535:
            raise OpError(BAD_REQUEST, f"mock.start: port {port} is not in 0-65535")
        self.registry.get(env_id)  # unknown: not-found
        saved = self._saved()
        saved[env_id] = {"port": port, "hostname": hostname}
        ticket = self.store.put_setting(MOCKS_KEY, saved)
        self._serve(env_id, port, hostname)
        await ticket.wait()
        with trio.move_on_after(START_WAIT):
            while (server := self.engine.servers.get(env_id)) is not None and (
                server.state == "starting"
            ):
                await self._noticed.wait()
        if env_id not in self.engine.servers:
            raise OpError(NOT_FOUND, f"environment {env_id} was deleted")
        server = self.engine.servers[env_id]
        if server.state in (ERROR, "unavailable") and server.error is not None:
            raise OpError(
                "mock-failed" if server.state == ERROR else "mock-unavailable",
                str(server.error.get("message") or server.error.get("code")),
            )
        return self.describe(env_id)

    async def op_stop(self, args: dict[str, Any], session: Any) -> dict[str, Any]:
        env_id = arg(args, "id", str, op="mock.stop")
        if env_id not in self.engine.servers and env_id not in self._saved():
            raise OpError(NOT_FOUND, f"environment {env_id} is not being served")
        self._forget(env_id)
        self.events.emit("mock-stopped", id=env_id, reason="stopped")
        return {"id": env_id, "stopped": True}

    async def op_list(self, args: dict[str, Any], session: Any) -> list[dict[str, Any]]:
        """This device's mocks, then the hub's Cloud Mocks of its shared environments."""
        own = [self.describe(env_id) for env_id in sorted(self.engine.servers)]
        return own + self.hosted()

    async def op_logs(self, args: dict[str, Any], session: Any) -> dict[str, Any]:
        env_id = arg(args, "id", str, op="mock.logs")
        limit = arg(args, "limit", int, default=100, op="mock.logs")
        follow = arg(args, "follow", bool, default=False, op="mock.logs")
        if env_id not in self.engine.servers:
            raise OpError(NOT_FOUND, f"environment {env_id} is not being served")
        entries = list(self.logs.get(env_id, ()))[-max(0, limit) :] if limit else []
        result: dict[str, Any] = {"id": env_id, "entries": entries}
        if follow:
            token = self._next_follower
            self._next_follower += 1
            followers = self._followers.setdefault(env_id, {})
            sub = session.open_subscription(on_close=lambda: followers.pop(token, None))
            followers[token] = (session, sub)
            result["sub"] = sub
        return result


def _log_entry(data: dict[str, Any]) -> dict[str, Any]:
    """One request as `mock logs` shows it (docs/local-api.md)."""
    keys = (
        "time",
        "method",
        "path",
        "query",
        "status",
        "routeUUID",
        "routeResponseUUID",
        "durationMs",
        "proxied",
        "request",
        "response",
        "truncated",
    )
    return {key: data.get(key) for key in keys}


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("id", "type")}


def _int(value: object) -> int | None:
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def safe_dirname(env_id: str) -> str:
    """An id as one folder name (the mock folders of unlinked environments, the hub's)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in env_id)[:128] or "env"
