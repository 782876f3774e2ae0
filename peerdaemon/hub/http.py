"""The hub's one port: plain HTTP (`GET /health`; `GET /metrics`, metrics.py;
`/mock/SPACE/ENV/...`, the Cloud Mock, handed to `MockProxy`, mockproxy.py), and websocket
upgrades for `/yjs/SPACE/DOC` (y-websocket clients, yjs.py) and `/peer` (daemons, handed to a
`PeerHandler`, peer_socket.py).

`HubHttp.handle` takes each accepted stream through the same steps: admission (a half-open
slot, after a wait for one if need be, or `503 busy`: admission.py), the request head and its
answer or upgrade (h11: transport.py), then the endpoint, on a `WebSocketTransport` driving the
connection's core (`WsConn`: keep-alive, handshake deadline, too-slow).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio

from ..core.admission import Slot
from . import metrics
from .admission import HandshakeWatch, HubAdmission
from .transport import (
    CLOSE_TIMEOUT,
    BadRequest,
    HttpExchange,
    Request,
    Timers,
    Upgraded,
    WebSocketTransport,
    remote_address,
)
from .wsconn import WsConn, ws_frame
from .yjs import YjsEndpoint
from .ywebsocket import Outbox, Outlet, YConn

if TYPE_CHECKING:
    # loaded with the first daemon (`/peer` brings the peer protocol, and `cryptography`) or
    # the first hosted mock (cloudmock.py): a hub of y-websocket clients keeps neither in memory
    from .cloudmock import MockDoor
    from .peer_socket import PeerHandler

__all__ = ["HttpConfig", "HubHttp"]

log = logging.getLogger("peerdaemon.hub.http")


@dataclass
class HttpConfig:
    max_message: int = 256 << 20  # largest websocket message accepted (a 15 MB first sync is one)
    coalesce_bytes: int = 1 << 20  # a client's queued updates get merged past this
    limit_bytes: int = 64 << 20  # ... and the client is dropped (1013 too-slow) past this
    stall_seconds: float = 30.0  # a writer without progress this long: the client is dropped
    ping_interval: float = 30.0  # a silent client is pinged; silent for twice this: dropped
    # Connections not authenticated yet (docs/hub.md, "Connections in their handshake"):
    max_half_open: int = 256  # at most this many at once; one more gets 503 busy
    max_half_open_per_ip: int = 16  # ... and this many from one remote address
    max_waiting: int = 4096  # more wait (up to head_timeout) for a slot; past this: 503 busy
    head_timeout: float = 10.0  # the request head must arrive (and be answered) by then
    handshake_timeout: float = 10.0  # a websocket must authenticate by then (+ CLOSE_TIMEOUT)
    # `/metrics` (docs/hub.md, "Metrics"): with a token, only `Authorization: Bearer TOKEN`;
    # without one, loopback clients only
    metrics_token: str | None = None


class HubHttp:
    """Serves one accepted stream: `await hub_http.handle(stream)` (for `trio.serve_listeners`)."""

    def __init__(
        self,
        yjs: YjsEndpoint,
        peer_handler: PeerHandler | None = None,
        *,
        config: HttpConfig | None = None,
        version: str = "",
        stats: Callable[[], dict[str, Any]] | None = None,
        mocks: MockDoor | None = None,
        metrics_source: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.yjs = yjs
        self.mocks = mocks
        self.peer_handler = peer_handler  # None: `/peer` is closed "not-available"
        self.config = config or HttpConfig()
        self.version = version
        self.stats = stats
        self.metrics_source = metrics_source
        """The figures of the rest of the hub for `/metrics` (`metrics.hub_families`' keys)."""
        self.started = time.time()
        self.peer_connections = 0
        self._next_conn = 1
        c = self.config
        self.gate = HubAdmission(
            c.max_half_open, c.max_half_open_per_ip, c.max_waiting, c.head_timeout
        )
        self.admission = self.gate.admission
        """Connections not authenticated yet (every path), in total and per remote address."""
        self._writers: trio.Nursery | None = None
        self._timers: Timers | None = None

    # -- entry -----------------------------------------------------------------------------------
    async def serve(self, listeners: list[Any]) -> None:
        """Serve `listeners` until cancelled. The connections' writer tasks (started only while
        a socket holds back output) and their timers are kept here, one nursery and one task
        for all rather than a nursery and a cancel scope per connection."""
        async with trio.open_nursery() as nursery:
            self._writers = nursery
            self._timers = Timers()
            nursery.start_soon(self._timers.run)
            try:
                await trio.serve_listeners(self.handle, listeners)
            finally:
                self._writers = self._timers = None

    async def handle(self, stream: trio.abc.Stream) -> None:
        remote = remote_address(stream)
        slot: Slot | None = None
        try:
            slot = await self.gate.admit(stream, remote)
            yws = await self._handle(stream, remote, slot) if slot is not None else None
            if yws is not None:  # a y-websocket client, served from here: one coroutine less
                transport, conn, doc_id, on_message = yws  # kept alive per idle connection
                try:
                    await transport.run(on_message)
                finally:
                    self.yjs.close(conn, doc_id)
        except trio.TooSlowError:
            log.debug("hub connection from %s: no request head in time; closed", remote)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # one connection's failure never takes the hub down
            log.exception("hub connection failed")
        finally:
            if slot is not None:
                slot.release()
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()

    async def _handle(
        self, stream: trio.abc.Stream, remote: tuple[str, int] | None, slot: Slot
    ) -> tuple[WebSocketTransport, YConn, str, Callable[[bytes | str], None]] | None:
        """Answer the request, or serve its websocket (`/peer`, the Cloud Mock); a `/yjs`
        client admitted to its room comes back (its transport, connection, document id and
        message handler) for `handle` to run."""
        exchange = HttpExchange(stream)
        with trio.fail_after(self.config.head_timeout):  # the head, and the answer to it
            upgraded = await self._answer_or_upgrade(exchange, remote)
        if isinstance(upgraded, Request):  # a Cloud Mock request: its body by the same deadline
            assert self.mocks is not None
            deadline = trio.current_time() + self.config.head_timeout
            await self.mocks.handle(exchange, upgraded, remote, deadline, slot.release)
            return None
        del exchange  # h11's buffers: not kept for the websocket's lifetime
        if upgraded is None:
            slot.release()  # answered
            return None
        request = upgraded.request
        watch = HandshakeWatch.after_upgrade(
            slot, trio.current_time(), self.config.handshake_timeout
        )
        if request.path == "/peer":
            from .peer_socket import NotAvailablePeerHandler, PeerSocket

            outlet = Outlet(self._number(), self._outbox())
            transport = self._transport(stream, outlet, upgraded, watch)
            send_limit = self.config.coalesce_bytes
            ws = PeerSocket(transport, request, remote, slot, send_limit=send_limit)
            self.peer_connections += 1
            try:
                await ws.serve(self.peer_handler or NotAvailablePeerHandler())
            finally:
                self.peer_connections -= 1
            return None
        space_id, doc_id = (unquote(p) for p in request.path[len("/yjs/") :].split("/"))
        await self.yjs.prepare(request.query, space_id)
        conn = YConn(self._number(), self._outbox(), ready=self.yjs.ready)
        transport = self._transport(stream, conn, upgraded, watch)
        on_message = self.yjs.open(transport, conn, space_id, doc_id, request.query, slot)
        return transport, conn, doc_id, on_message

    async def _answer_or_upgrade(
        self, exchange: HttpExchange, remote: tuple[str, int] | None = None
    ) -> Upgraded | Request | None:
        """Read the request head and answer it: plain HTTP and bad requests get their response
        (None), a websocket upgrade of `/yjs/SPACE/DOC` or `/peer` its `101` (the request, and
        the websocket connection with the bytes read past the head); a Cloud Mock request is
        returned for `MockProxy`."""
        try:
            request = await exchange.read_request()
        except BadRequest as exc:
            await exchange.respond_json(exc.status, {"error": str(exc)})
            return None
        if request is None:
            return None
        if request.path.startswith("/mock/") and self.mocks is not None:
            return request  # plain or a WebSocket route's upgrade: MockProxy relays both
        if not request.wants_websocket:
            if request.path == "/health" and request.method in ("GET", "HEAD"):
                await exchange.respond_json(200, self.health())
            elif request.path == "/metrics" and request.method in ("GET", "HEAD"):
                await self._answer_metrics(exchange, request, remote)
            else:
                await exchange.respond_json(404, {"error": "not found"})
            return None
        if request.path.startswith("/yjs/"):
            parts = request.path[len("/yjs/") :].split("/")
            if len(parts) != 2 or not all(parts):
                await exchange.respond_json(404, {"error": "expected /yjs/SPACE_ID/DOC_ID"})
                return None
        elif request.path != "/peer":
            await exchange.respond_json(404, {"error": "not found"})
            return None
        try:
            return await exchange.upgrade(request)
        except BadRequest as exc:
            await exchange.respond_json(exc.status, {"error": str(exc)}, exc.headers)
            return None

    def health(self) -> dict[str, Any]:
        rooms = self.yjs.rooms
        out: dict[str, Any] = {
            "status": "ok",
            "version": self.version,
            "rooms": len(rooms.rooms),
            "clients": rooms.clients + self.peer_connections,
        }
        if self.stats is not None:
            out.update(self.stats())
        return out

    # -- /metrics -------------------------------------------------------------------------------
    async def _answer_metrics(
        self, exchange: HttpExchange, request: Request, remote: tuple[str, int] | None
    ) -> None:
        refusal = self.metrics_refusal(request, remote)
        if refusal is not None:
            status, body, headers = refusal
            await exchange.respond_json(status, body, headers)
            return
        snapshot = self.metrics_snapshot(scraping=True)
        text = metrics.render(metrics.hub_families(snapshot))
        await exchange.respond(200, text.encode("utf-8"), content_type=metrics.CONTENT_TYPE)

    def metrics_refusal(
        self, request: Request, remote: tuple[str, int] | None
    ) -> tuple[int, dict[str, str], list[tuple[bytes, bytes]]] | None:
        """None if `/metrics` is served to this request, else the answer: with a token set,
        401 unless `Authorization: Bearer TOKEN`; without one, 403 unless from loopback."""
        token = self.config.metrics_token
        if token:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8"), token.encode("utf-8")
            ):
                return None
            challenge = [(b"WWW-Authenticate", b'Bearer realm="peerdaemon-hub"')]
            body = {"error": "unauthorized", "message": "/metrics needs Authorization: Bearer"}
            return 401, body, challenge
        if remote is not None and _is_loopback(remote[0]):
            return None
        body = {
            "error": "forbidden",
            "message": "/metrics is served to loopback clients only, unless [metrics] token is set",
        }
        return 403, body, []

    def metrics_snapshot(self, *, scraping: bool = False) -> dict[str, Any]:
        """What `/metrics` shows (see `metrics.hub_families`): this port's connections, and the
        rest of the hub's figures from `metrics_source`. `scraping`: asked by a `/metrics`
        request, whose own half-open connection is not counted."""
        rooms = self.yjs.rooms
        snap: dict[str, Any] = {
            "version": self.version,
            "start_time": self.started,
            "connections": {
                "yjs": rooms.clients,
                "peer": self.peer_connections,
                "mock": self.mocks.connections if self.mocks is not None else 0,
            },
            "half_open": max(0, self.admission.count - (1 if scraping else 0)),
            "busy_refusals": self.admission.refused,
            "rooms": len(rooms.rooms),
        }
        if self.metrics_source is not None:
            snap.update(self.metrics_source())
        return snap

    # -- one websocket ---------------------------------------------------------------------------
    def _number(self) -> int:
        number = self._next_conn
        self._next_conn += 1
        return number

    def _outbox(self) -> Outbox:
        c = self.config
        return Outbox(ws_frame, coalesce_bytes=c.coalesce_bytes, limit_bytes=c.limit_bytes)

    def _transport(
        self, stream: trio.abc.Stream, outlet: Outlet, upgraded: Upgraded, watch: HandshakeWatch
    ) -> WebSocketTransport:
        c = self.config
        core = WsConn(
            outlet,
            now=trio.current_time(),
            max_message=c.max_message,
            ping_interval=c.ping_interval,
            stall_seconds=c.stall_seconds,
            watch=watch,
        )
        spawn = self._writers.start_soon if self._writers is not None else None
        return WebSocketTransport(stream, core, upgraded.leftover, spawn, self._timers)


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
