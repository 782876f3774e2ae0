"""The mock servers' supervisor, without I/O: what should be served, what the runner says is
served, and what to send it next.

Inputs are the user's wishes (`serve`, `change`, `remove`), the runner process's life
(`spawned`, `exited`) and its events (`receive`), each with the current time. Outputs are command
dicts for the runner (`take_commands`), notices for the daemon's event log and request logs
(`take_notices`), `want_runner(now)` and the next deadline (`deadline`, `handle_timer`).

The runner holds nothing we cannot give it again: when it dies every wanted server is started
afresh from its current spec once a new runner says `ready`, after a backoff that grows while the
runner keeps dying young. A server that fails (a port in use, an environment Mockoon refuses) is a
state with a reason; the next change of its environment tries again, since that change may be
the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.backoff import Backoff
from .protocol import RunnerEvent

__all__ = [
    "ERROR",
    "RUNNING",
    "STARTING",
    "UNAVAILABLE",
    "MockEngine",
    "Notice",
    "Server",
    "ServerSpec",
]

STARTING = "starting"
RUNNING = "running"
ERROR = "error"
UNAVAILABLE = "unavailable"  # no runner can be started (Node or the runner missing)

READY_TIMEOUT = 20.0
"""A runner that has not said `ready` by then is killed and started again."""
UNAVAILABLE_RETRY = 30.0
"""Without a runner (no Node.js, not installed), look again this often: installed meanwhile."""
STABLE_AFTER = 30.0
"""A runner that lived this long before dying was not crash-looping: its backoff starts over."""


@dataclass
class ServerSpec:
    environment: dict[str, Any]
    directory: str
    port: int | None = None
    hostname: str | None = None


@dataclass
class Server:
    id: str
    spec: ServerSpec
    state: str = STARTING
    port: int | None = None
    hostname: str | None = None
    tls: bool = False
    requests: int = 0
    error: dict[str, Any] | None = None
    since: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "port": self.port,
            "hostname": self.hostname,
            "tls": self.tls,
            "requests": self.requests,
            "error": self.error,
            "since": self.since,
        }


@dataclass(frozen=True)
class Notice:
    """Something the shell reports: `started`, `stopped`, `error`, `request`, `blocked`,
    `runner-ready`, `runner-exited`."""

    kind: str
    id: str | None
    data: dict[str, Any] = field(default_factory=dict)


class MockEngine:
    def __init__(
        self,
        *,
        backoff: Backoff | None = None,
        log_body_bytes: int = 4096,
    ) -> None:
        self.servers: dict[str, Server] = {}
        self.backoff = backoff or Backoff(0.5, 30.0, 0.2)
        self.log_body_bytes = log_body_bytes
        self.runner = "down"  # down | spawning | ready | unavailable
        self.runner_reason: str | None = None
        self._spawn_at = 0.0
        self._spawned_at = 0.0
        self._commands: list[dict[str, Any]] = []
        self._notices: list[Notice] = []

    # -- wishes --------------------------------------------------------------------------------

    def serve(self, server_id: str, spec: ServerSpec, now: float) -> Server:
        """Serve (or serve again, with new settings) `server_id`."""
        server = self.servers.get(server_id)
        if server is None:
            server = self.servers[server_id] = Server(server_id, spec, since=now)
        server.spec = spec
        self._start(server, now)
        return server

    def change(self, server_id: str, environment: dict[str, Any], now: float) -> None:
        """The environment changed: a running server takes it live, a failed one tries again."""
        server = self.servers.get(server_id)
        if server is None:
            return
        server.spec.environment = environment
        if self.runner != "ready":
            return
        if server.state == ERROR:
            self._start(server, now)
            return
        for command in reversed(self._commands):  # not sent yet: give it the newest instead
            if command["id"] == server_id:
                if command["cmd"] in ("start", "update"):
                    command["environment"] = environment
                    return
                break
        self._commands.append({"cmd": "update", "id": server_id, "environment": environment})

    def remove(self, server_id: str) -> bool:
        server = self.servers.pop(server_id, None)
        if server is None:
            return False
        if self.runner == "ready":
            self._commands.append({"cmd": "stop", "id": server_id})
        self._notices.append(Notice("stopped", server_id, {}))
        return True

    def _start(self, server: Server, now: float) -> None:
        if self.runner == "unavailable":
            server.state = UNAVAILABLE
            server.error = {"code": "UNAVAILABLE", "message": self.runner_reason, "at": now}
            return
        server.state = STARTING
        server.since = now
        if self.runner == "ready":
            spec = server.spec
            self._commands.append(
                {
                    "cmd": "start",
                    "id": server.id,
                    "environment": spec.environment,
                    "directory": spec.directory,
                    "port": spec.port,
                    "hostname": spec.hostname,
                    "logBodyBytes": self.log_body_bytes,
                }
            )

    # -- the runner's life ---------------------------------------------------------------------

    def want_runner(self, now: float) -> bool:
        """True when the shell should start a runner process now."""
        return (
            self.runner in ("down", "unavailable") and bool(self.servers) and now >= self._spawn_at
        )

    def spawned(self, now: float) -> None:
        self.runner = "spawning"
        self._spawned_at = now

    def unavailable(self, reason: str, now: float) -> None:
        """No runner can be started (no Node.js, no installed runner): every server says why."""
        self.runner = "unavailable"
        self.runner_reason = reason
        self._spawn_at = now + UNAVAILABLE_RETRY
        for server in self.servers.values():
            self._start(server, now)
        self._notices.append(Notice("error", None, {"code": "UNAVAILABLE", "message": reason}))

    def available(self) -> None:
        """Installed meanwhile: try again."""
        if self.runner == "unavailable":
            self.runner = "down"
            self.runner_reason = None
            self._spawn_at = 0.0

    def exited(self, reason: str, now: float) -> None:
        """The runner process is gone (or was killed by `handle_timer`)."""
        if self.runner in ("down", "unavailable"):
            return
        if now - self._spawned_at >= STABLE_AFTER:
            self.backoff.reset()
        delay = self.backoff.next_delay()
        self._spawn_at = now + delay
        self.runner = "down"
        self.runner_reason = reason
        self._commands.clear()  # meant for the dead runner; `ready` rebuilds them from the specs
        for server in self.servers.values():
            server.state = STARTING
            server.error = {"code": "RUNNER_EXITED", "message": reason, "at": now}
            server.since = now
        self._notices.append(
            Notice("runner-exited", None, {"reason": reason, "restart_in": round(delay, 3)})
        )

    def deadline(self) -> float | None:
        if self.runner == "spawning":
            return self._spawned_at + READY_TIMEOUT
        if self.runner in ("down", "unavailable") and self.servers:
            return self._spawn_at
        return None

    def handle_timer(self, now: float) -> bool:
        """True when the shell must kill the runner (it never said `ready`)."""
        return self.runner == "spawning" and now >= self._spawned_at + READY_TIMEOUT

    # -- the runner's events -------------------------------------------------------------------

    def receive(self, event: RunnerEvent, now: float) -> None:
        kind = event.kind
        if kind == "ready":
            self.runner = "ready"
            self.runner_reason = None
            self._notices.append(Notice("runner-ready", None, dict(event.data)))
            for server in self.servers.values():
                self._start(server, now)
            return
        if kind == "pong":
            return
        if kind == "blocked":
            self._notices.append(Notice("blocked", event.id, dict(event.data)))
            return
        server = self.servers.get(event.id) if event.id is not None else None
        if kind == "error" and event.id is None:
            self._notices.append(Notice("error", None, dict(event.data)))
            return
        if server is None:
            return  # a server removed meanwhile: its last words
        data = event.data
        if kind == "started":
            server.state = RUNNING
            server.port = _int(data.get("port"))
            hostname = data.get("hostname")
            server.hostname = hostname if isinstance(hostname, str) else None
            server.tls = data.get("tls") is True
            server.error = None
            server.since = now
            self._notices.append(
                Notice("started", server.id, {"port": server.port, "hostname": server.hostname})
            )
        elif kind == "updated":
            self._notices.append(Notice("updated", server.id, {}))
        elif kind == "stopped":
            if server.state != ERROR:
                server.state = STARTING  # a restart (port or TLS change): `started` follows
        elif kind == "error":
            error = {
                "code": str(data.get("code") or "UNKNOWN"),
                "message": str(data.get("message") or ""),
                "at": now,
            }
            server.error = error
            if data.get("fatal") is True:
                server.state = ERROR
                server.since = now
            self._notices.append(Notice("error", server.id, {**error, "fatal": data.get("fatal")}))
        elif kind == "transaction":
            server.requests += 1
            self._notices.append(Notice("request", server.id, dict(data)))

    # -- outputs -------------------------------------------------------------------------------

    def take_commands(self) -> list[dict[str, Any]]:
        commands, self._commands = self._commands, []
        return commands

    def take_notices(self) -> list[Notice]:
        notices, self._notices = self._notices, []
        return notices


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
