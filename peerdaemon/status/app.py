"""The status page's ASGI application: the page, its two static files, the JSON API and the live
event stream (docs/status-page.md). No framework: a dozen routes and four checks.

Every request, in order:
1. its `Host` must name this listener (DNS rebinding), else 403;
2. a loopback client must be the daemon's own user (Linux: `/proc/net/tcp`), else 403;
3. `/api/*` only: an `Origin`, when sent, must be this page's (403); the `X-API-Key` header must
   hold the key (401); a POST must be `application/json` (415) and small (413).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import trio

from ..core.errors import (
    BAD_REQUEST,
    EXISTS,
    FORBIDDEN,
    INTERNAL,
    LINK_CONFLICT,
    NOT_FOUND,
    NOT_SHARED,
    STORE_FAILED,
    UNKNOWN_OP,
    OpError,
)
from . import views
from .security import Guard, client_is_loopback, connection_uid, same_key
from .views import OperationHandler, Sizes, call, to_json

log = logging.getLogger("peerdaemon.status")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 64 << 10
SSE_QUEUE = 1024
"""Events queued for one stream before it is closed as too slow (the client resumes with its
last id: nothing is lost while the log still holds them)."""
KEEPALIVE = 15.0
COALESCE = 0.05
"""Seconds a stream waits after an event for more to send with it (bursts: one write)."""
API_KEY_META = "{{API_KEY}}"

_STATIC = {
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
_HTTP_STATUS = {
    BAD_REQUEST: 400,
    NOT_FOUND: 404,
    EXISTS: 409,
    LINK_CONFLICT: 409,
    NOT_SHARED: 409,
    FORBIDDEN: 403,
    UNKNOWN_OP: 501,
    INTERNAL: 500,
    STORE_FAILED: 503,
    "mock-failed": 502,
    "mock-unavailable": 503,
}


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class PushSession:
    """The session of one event stream: what the socket's `Session` is to a connection.

    `events.subscribe` pushes every new event here; pushes never block the daemon: past
    `SSE_QUEUE` unsent events the stream is closed (`overflowed`) and the client resumes."""

    def __init__(self, limit: int = SSE_QUEUE) -> None:
        self.data: dict[str, Any] = {}
        self.closed = False
        self.overflowed = False
        self._send, self.receive = trio.open_memory_channel[tuple[int, Any]](limit)
        self._subs: dict[int, Callable[[], None] | None] = {}
        self._next = 1
        self._callbacks: list[Callable[[], None]] = []

    def open_subscription(self, on_close: Callable[[], None] | None = None) -> int:
        if self.closed:
            raise RuntimeError("session is closed")
        sub = self._next
        self._next += 1
        self._subs[sub] = on_close
        return sub

    def push(self, sub: int, event: Any) -> None:
        if self.closed or sub not in self._subs:
            return
        try:
            self._send.send_nowait((sub, event))
        except trio.WouldBlock:
            self.overflowed = True
            self.close()

    def close_subscription(self, sub: int) -> bool:
        if sub not in self._subs:
            return False
        on_close = self._subs.pop(sub)
        if on_close is not None:
            on_close()
        return True

    def on_close(self, callback: Callable[[], None]) -> None:
        if self.closed:
            callback()
        else:
            self._callbacks.append(callback)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sub in list(self._subs):
            self.close_subscription(sub)
        for callback in self._callbacks:
            callback()
        self._send.close()


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class StatusApp:
    """The ASGI app. `ops` answers the operations; `sizes` the stored size of environments."""

    def __init__(
        self,
        ops: OperationHandler,
        key: str,
        guard: Guard,
        *,
        sizes: Sizes | None = None,
        uid: int | None = None,
        check_user: Callable[[tuple[str, int], tuple[str, int]], int | None | bool] = (
            connection_uid
        ),
    ) -> None:
        self.ops = ops
        self.key = key
        self.guard = guard
        self.sizes = sizes
        self.uid = os.geteuid() if uid is None else uid
        self.check_user = check_user
        self.streams = 0
        self._index = _static("index.html").decode()
        self._files = {path: (_static(name), kind) for path, (name, kind) in _STATIC.items()}
        self._routes: dict[tuple[str, str], Callable[[Scope, Any], Awaitable[Any]]] = {
            ("GET", "/api/overview"): self.get_overview,
            ("GET", "/api/device"): self.get_device,
            ("GET", "/api/spaces"): self.get_spaces,
            ("GET", "/api/environments"): self.get_environments,
            ("GET", "/api/peers"): self.get_peers,
            ("GET", "/api/events/recent"): self.get_recent,
            ("POST", "/api/environments/share"): self.post_share,
            ("POST", "/api/environments/unshare"): self.post_unshare,
            ("POST", "/api/mocks/start"): self.post_mock_start,
            ("POST", "/api/mocks/stop"): self.post_mock_stop,
            ("POST", "/api/spaces/invite"): self.post_invite,
        }

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        try:
            await self._http(scope, receive, send)
        except HttpError as exc:
            await _respond_json(
                send, exc.status, {"error": {"code": exc.code, "message": exc.message}}
            )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        host = headers.get("host")
        if not self.guard.host_ok(host):
            raise HttpError(
                403,
                "bad-host",
                "Host check error: this status page answers only to its own address "
                "(localhost, 127.0.0.1, [::1] with its port, or a configured name)",
            )
        own_user = self._own_user(scope)
        if own_user is False:
            raise HttpError(403, "forbidden", "this status page belongs to another user")
        method, path = scope["method"], scope["path"]
        if path == "/" or path == "/index.html":
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "bad-method", f"{method} {path}: use GET")
            await self._page(send, embed_key=own_user is True)
            return
        if path in self._files:
            body, kind = self._files[path]
            await _respond(send, 200, body, kind)
            return
        if path == "/favicon.ico":
            await _respond(send, 204, b"", "text/plain")
            return
        if not path.startswith("/api/"):
            raise HttpError(404, "not-found", f"no page {path}")
        if not self.guard.origin_ok(headers.get("origin"), host):
            raise HttpError(403, "bad-origin", "cross-origin requests are refused")
        if not same_key(headers.get("x-api-key"), self.key):
            raise HttpError(401, "bad-api-key", "missing or wrong X-API-Key header")
        if path == "/api/events":
            if method != "GET":
                raise HttpError(405, "bad-method", "GET /api/events")
            await self._stream(scope, receive, send, headers)
            return
        handler = self._routes.get((method, path))
        if handler is None:
            known = any(p == path for _, p in self._routes)
            raise HttpError(
                405 if known else 404,
                "bad-method" if known else "not-found",
                f"{method} {path}: no such endpoint",
            )
        body: Any = None
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise HttpError(415, "bad-content-type", "POST bodies must be application/json")
            body = _parse_json(await _read_body(receive))
            if not isinstance(body, dict):
                raise HttpError(400, BAD_REQUEST, "the body must be a JSON object")
        try:
            result = await handler(scope, body)
        except OpError as exc:
            raise HttpError(_HTTP_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        except HttpError:
            raise
        except Exception as exc:
            log.error("status page: %s %s failed", method, path, exc_info=exc)
            raise HttpError(500, INTERNAL, f"{type(exc).__name__}: {exc}") from None
        await _respond_json(send, 200, result)

    def _own_user(self, scope: Scope) -> bool | None:
        """True: a loopback client of the daemon's own user; None: a client we cannot place (not
        loopback, or a system without /proc/net/tcp); False: another user's."""
        client, server = scope.get("client"), scope.get("server")
        if not client_is_loopback(client) or server is None:
            return None
        uid = self.check_user((client[0], client[1]), (server[0], server[1]))
        if uid is False:
            return None
        return uid == self.uid

    async def _page(self, send: Send, *, embed_key: bool) -> None:
        # The key goes into the page only for the daemon's own user on this machine (the page is
        # same-origin only: CSP, frame-ancestors); anyone else types it, or opens `#key=...`.
        html = self._index.replace(API_KEY_META, self.key if embed_key else "")
        await _respond(send, 200, html.encode(), "text/html; charset=utf-8")

    # -- reads --------------------------------------------------------------------------------

    async def get_overview(self, scope: Scope, body: Any) -> Any:
        limit = _int_param(scope, "limit", 50, 0, 1000)
        session = PushSession()
        try:
            return await views.overview(self.ops, self.sizes, session, limit)
        finally:
            session.close()

    async def get_device(self, scope: Scope, body: Any) -> Any:
        return await views.device(self.ops)

    async def get_spaces(self, scope: Scope, body: Any) -> Any:
        return await views.spaces(self.ops)

    async def get_environments(self, scope: Scope, body: Any) -> Any:
        return await views.environments(self.ops, self.sizes)

    async def get_peers(self, scope: Scope, body: Any) -> Any:
        return await views.peers(self.ops)

    async def get_recent(self, scope: Scope, body: Any) -> Any:
        limit = _int_param(scope, "limit", 50, 0, 10_000)
        session = PushSession()
        try:
            return await views.recent_events(self.ops, limit, session)
        finally:
            session.close()

    # -- actions (each one socket operation) --------------------------------------------------

    async def post_share(self, scope: Scope, body: dict[str, Any]) -> Any:
        args = {"id": _field(body, "id"), "space": _field(body, "space")}
        if body.get("copy") is not None:
            args["copy"] = body["copy"]
        return await call(self.ops, "env.share", **args)

    async def post_unshare(self, scope: Scope, body: dict[str, Any]) -> Any:
        return await call(self.ops, "env.unshare", id=_field(body, "id"))

    async def post_mock_start(self, scope: Scope, body: dict[str, Any]) -> Any:
        args: dict[str, Any] = {"id": _field(body, "id")}
        for name in ("port", "hostname"):
            if body.get(name) is not None:
                args[name] = body[name]
        return await call(self.ops, "mock.start", **args)

    async def post_mock_stop(self, scope: Scope, body: dict[str, Any]) -> Any:
        return await call(self.ops, "mock.stop", id=_field(body, "id"))

    async def post_invite(self, scope: Scope, body: dict[str, Any]) -> Any:
        return await call(self.ops, "space.invite", space=_field(body, "space"))

    # -- the event stream ---------------------------------------------------------------------

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        """Server-sent events from the event log: `since` (or `Last-Event-ID`, which a
        reconnecting client sends) is the last id seen; without either, from now."""
        since: int | None = None
        last = headers.get("last-event-id")
        if last is not None and last.strip().isdigit():
            since = int(last)
        elif _param(scope, "since") is not None:
            since = _int_param(scope, "since", 0, 0, 1 << 62)
        session = PushSession()
        args = {} if since is None else {"since": since}
        try:
            result = await views.call(self.ops, "events.subscribe", session, **args)
        except OpError as exc:
            raise HttpError(_HTTP_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        self.streams += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"x-accel-buffering", b"no"),
                        *_SECURITY_HEADERS,
                    ],
                }
            )
            hello = {k: result[k] for k in ("cursor", "missed", "reset")}
            chunk = b"retry: 2000\nevent: hello\ndata: " + to_json(hello) + b"\n\n"
            sent = since if since is not None else result["cursor"]
            for event in result["events"]:
                chunk += _sse(event)
                sent = max(sent, event["id"])
            await _chunk(send, chunk)
            gone = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope, gone)
                await self._forward(session, send, sent)
                nursery.cancel_scope.cancel()
            if gone.is_set():
                return
            if session.overflowed:
                log.info("status page: an event stream fell behind and was closed")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.streams -= 1
            session.close()

    async def _forward(self, session: PushSession, send: Send, sent: int) -> None:
        """Pushes to the client until the session ends (too slow); a comment line after
        `KEEPALIVE` seconds of silence keeps proxies and idle timers from closing it."""
        while True:
            with trio.move_on_after(KEEPALIVE) as timer:
                try:
                    _sub, event = await session.receive.receive()
                except trio.EndOfChannel:
                    return
            if timer.cancelled_caught:
                await _chunk(send, b": keep-alive\n\n")
                continue
            batch = [event]
            await trio.sleep(COALESCE)  # a burst goes out in one write, not one per event
            while True:
                try:
                    batch.append(session.receive.receive_nowait()[1])
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            fresh = [e for e in batch if e.get("id", sent + 1) > sent]
            if fresh:
                sent = max(sent, *(e.get("id", sent) for e in fresh))
                await _chunk(send, b"".join(_sse(e) for e in fresh))


# -- HTTP helpers ---------------------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        if key in out:
            if key == "host":
                out[key] = ""  # two Host headers: neither is believed
                continue
            out[key] += ", " + value.decode("latin-1")
        else:
            out[key] = value.decode("latin-1")
    return out


def _param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else None


def _int_param(scope: Scope, name: str, default: int, low: int, high: int) -> int:
    text = _param(scope, name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise HttpError(400, BAD_REQUEST, f"{name} must be an integer in {low}-{high}")
    return int(text)


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise HttpError(400, BAD_REQUEST, f"{name!r} must be a non-empty string")
    return value


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "malformed-json", f"the body is not JSON: {exc}") from None


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, BAD_REQUEST, "the client went away")
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise HttpError(413, "too-large", f"bodies are limited to {MAX_BODY} bytes")
        if not message.get("more_body"):
            return body


async def _respond(send: Send, status: int, body: bytes, kind: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", kind.encode()),
                (b"content-length", str(len(body)).encode()),
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _respond_json(send: Send, status: int, value: Any) -> None:
    await _respond(send, status, to_json(value), "application/json")


async def _chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


def _sse(event: dict[str, Any]) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event.get("id", 0), to_json(event))


async def _until_disconnect(receive: Receive, scope: trio.CancelScope, gone: trio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    scope.cancel()


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
