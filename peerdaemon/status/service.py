"""The status page's service: Hypercorn's trio worker serving `StatusApp` on one address.

Started by the supervisor after the local socket. A port already taken is the page's failure, not
the daemon's: it is logged, emitted as a `status-error` event, shown by `status`, and the daemon
goes on syncing. A setting the page cannot run safely with (a non-loopback address without TLS)
is refused before anything starts (`StatusConfigError`, one line).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..core.events import EventLog
from ..store import Store
from .app import StatusApp, lifespan
from .security import (
    Guard,
    canonical_host,
    check_tls,
    load_or_create_key,
)
from .views import OperationHandler

log = logging.getLogger("peerdaemon.status")

DEFAULT_STATUS_PORT = 7611
DEFAULT_STATUS_LISTEN = ("127.0.0.1", DEFAULT_STATUS_PORT)


@dataclass
class StatusSettings:
    listen: tuple[str, int] = DEFAULT_STATUS_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    hosts: list[str] = field(default_factory=list)
    """Host names the page answers to besides localhost, 127.0.0.1 and [::1] (a LAN name)."""


class _QuietStartup(logging.Filter):
    """Hypercorn's "Running on ... (CTRL + C to quit)": the service logs its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on")


class StatusService:
    def __init__(
        self,
        ops: OperationHandler,
        store: Store,
        events: EventLog,
        data_dir: Path,
        settings: StatusSettings,
        *,
        enabled: bool = True,
    ) -> None:
        check_tls(settings.listen, settings.tls_cert, settings.tls_key)
        self.enabled = enabled
        self._changed = trio.Event()
        self._served = trio.Event()
        self.ops = ops
        self.store = store
        self.events = events
        self.settings = settings
        self.key = load_or_create_key(data_dir)
        self.port: int | None = None
        self.url: str | None = None
        self.error: str | None = None
        self.app: StatusApp | None = None

    # -- wiring -------------------------------------------------------------------------------

    def register(self, operations: Any) -> None:
        """The `status_page` section of `status`: where the page is and its API key (the
        socket answers only the daemon's own user)."""
        operations.status_hooks.append(self.status)

    def status(self) -> dict[str, Any]:
        host, port = self.settings.listen
        return {
            "status_page": {
                "url": self.url,
                # the page with the key in its fragment (never sent to a server): opens where
                # the page cannot hand out the key itself (another machine; not Linux)
                "open_url": f"{self.url}#key={self.key}" if self.url else None,
                "listen": f"{canonical_host(host)}:{self.port or port}",
                "api_key": self.key,
                "tls": self.settings.tls_cert is not None,
                "error": self.error,
            }
        }

    async def sizes(self, env_ids: list[str]) -> dict[str, int]:
        """Stored bytes (snapshot and log) of each environment, read in a worker thread."""

        def read() -> dict[str, int]:
            out = {}
            for env_id in env_ids:
                try:
                    stats = self.store.env_stats(env_id)
                except Exception:  # a store closing under us: sizes are a nicety
                    continue
                out[env_id] = int(stats["snapshot_bytes"]) + int(stats["log_bytes"])
            return out

        return await trio.to_thread.run_sync(read)

    # -- running ------------------------------------------------------------------------------

    def reconfigure(self, settings: StatusSettings, enabled: bool) -> None:
        """New settings from a reloaded config file: checked first (StatusConfigError, and the
        page goes on as it was), then the page is served again with them."""
        check_tls(settings.listen, settings.tls_cert, settings.tls_key)
        if (settings, enabled) == (self.settings, self.enabled):
            return
        self.settings, self.enabled = settings, enabled
        self._served = trio.Event()
        self._changed.set()

    async def served(self) -> None:
        """Returns once the page runs with the latest settings (or could not listen)."""
        await self._served.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled, again after each `reconfigure`; `started` with the first
        bound port, or None if the page is off."""
        status: trio.TaskStatus[int | None] = task_status
        while True:
            self._changed = trio.Event()
            async with trio.open_nursery() as nursery:
                port = await nursery.start(self._serve) if self.enabled else None
                if not self.enabled:
                    self.port = self.url = self.error = None
                status.started(port)
                status = trio.TASK_STATUS_IGNORED
                self._served.set()
                await self._changed.wait()
                nursery.cancel_scope.cancel()
            log.info("status page settings changed: serving it again")

    async def _serve(
        self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One listener with the current settings, until cancelled."""
        from hypercorn.config import Config
        from hypercorn.trio import serve

        self.port = self.url = self.error = None
        host, port = self.settings.listen
        tls = self.settings.tls_cert is not None
        config = Config()
        config.bind = [f"{canonical_host(host)}:{port}"]
        if tls:
            config.certfile = str(self.settings.tls_cert)
            config.keyfile = str(self.settings.tls_key)
        config.alpn_protocols = ["http/1.1"]
        config.include_server_header = False
        config.accesslog = None
        http_log = logging.getLogger("peerdaemon.status.http")
        if not any(isinstance(f, _QuietStartup) for f in http_log.filters):
            http_log.addFilter(_QuietStartup())
        config.errorlog = http_log
        config.graceful_timeout = 1.0
        app = _Deferred()
        async with trio.open_nursery() as nursery:
            try:
                binds = await nursery.start(partial(serve, app, config, mode="asgi"))
            except BaseException as group:
                exc = _os_error(group)  # Hypercorn raises it inside exception groups
                if exc is None:
                    raise
                self.error = f"cannot listen on {config.bind[0]}: {exc.strerror or exc}"
                log.warning("status page off: %s", self.error)
                self.events.emit("status-error", reason=self.error)
                task_status.started(None)
                return
            self.port = int(binds[0].rsplit(":", 1)[1])
            guard = Guard.for_listener(host, self.port, tls=tls, extra_hosts=self.settings.hosts)
            self.app = app.set(StatusApp(self.ops, self.key, guard, sizes=self.sizes))
            self.url = f"{'https' if tls else 'http'}://{self._url_host()}:{self.port}/"
            log.info("status page on %s", self.url)
            task_status.started(self.port)

    def _url_host(self) -> str:
        host = self.settings.listen[0]
        if host in ("", "0.0.0.0", "::", "[::]"):
            return self.settings.hosts[0] if self.settings.hosts else "127.0.0.1"
        return canonical_host(host)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError `exc` is, or that every leaf of its exception groups is (the first)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_os_error(e) for e in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


class _Deferred:
    """The app, known once the port is (the Host check needs it); a request that comes in
    meanwhile waits for it."""

    def __init__(self) -> None:
        self.app: StatusApp | None = None
        self.ready = trio.Event()

    def set(self, app: StatusApp) -> StatusApp:
        self.app = app
        self.ready.set()
        return app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await self.ready.wait()
        assert self.app is not None
        await self.app(scope, receive, send)


__all__ = ["DEFAULT_STATUS_LISTEN", "DEFAULT_STATUS_PORT", "StatusService", "StatusSettings"]
