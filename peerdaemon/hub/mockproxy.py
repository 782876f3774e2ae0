"""The Cloud Mock's door on the hub's port: a plain HTTP request to `/mock/SPACE/ENV/...` is
checked by the sans-I/O gate (mockgate.py: ids, the mock token in any of its three carriers,
body size, rate) and forwarded, token removed, to the environment's engine on loopback; the
engine's answer goes back as it comes.

One request per connection (`Connection: close`), like the rest of the hub's plain HTTP. A mock
that hangs or a flood on one environment stays that environment's: each has its own rate limit
and a cap on requests in flight (503 past it), every forward has a deadline (504), and the hub
holds at most `max_connections` mock connections at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import trio

from .mockgate import (
    Forward,
    RateLimiter,
    Respond,
    decide,
    forward_headers,
    parse_mock_target,
    response_headers,
    strip_token,
)
from .mocks import HostedMocks
from .transport import HttpExchange, Request

__all__ = ["MockProxy"]

log = logging.getLogger("peerdaemon.hub.mockproxy")

RECEIVE = 64 * 1024
IDLE_REUSE = 2.0
"""An engine connection idle this long is not reused: Node closes idle ones after 5 s."""
MAX_IDLE = 32
"""Idle engine connections kept per mock."""
START_WAIT = 5.0
"""A request to a mock that is starting (just turned on, runner restarting) waits this long."""


_RATE_LIMITED = Respond(
    429,
    {"error": "rate-limited", "message": "too many requests to this mock; retry in 1 s"},
    ((b"retry-after", b"1"),),
)
"""As `mockgate.decide` answers past the rate, for the window the hub processes share."""


class MockProxy:
    def __init__(self, mocks: HostedMocks, *, tls: bool = False) -> None:
        self.mocks = mocks
        self.config = mocks.config
        self.scheme = "https" if tls else "http"
        self.limiter = RateLimiter(rate=50.0, burst=50.0)
        self.in_flight: dict[str, int] = {}
        self.connections = 0
        self._idle: dict[int, list[tuple[trio.SocketStream, h11.Connection, float]]] = {}
        """port -> idle engine connections, newest last."""

    async def handle(
        self,
        exchange: HttpExchange,
        request: Request,
        remote: tuple[str, int] | None,
        body_deadline: float,
        admitted: Callable[[], None],
    ) -> None:
        """Answer one mock request (the head is read; the body is read here, by the deadline).
        `admitted()` once the body is in: the connection stops counting as half-open."""
        if self.connections >= self.config.max_connections:
            await _respond(exchange, _error(503, "busy", "too many mock connections"))
            return
        self.connections += 1
        try:
            await self._handle(exchange, request, remote, body_deadline, admitted)
        finally:
            self.connections -= 1

    async def _handle(
        self,
        exchange: HttpExchange,
        request: Request,
        remote: tuple[str, int] | None,
        body_deadline: float,
        admitted: Callable[[], None],
    ) -> None:
        target = parse_mock_target(request.target)
        mock = None
        limits = None
        if target is not None and target.valid:
            mock = self.mocks.lookup(target.space, target.env)
            limits = self.mocks.limits(target.space) if mock is not None else None
        max_body = limits.mock_body_bytes if limits is not None else 1 << 20
        with trio.move_on_at(body_deadline) as scope:
            body = await _read_body(exchange, max_body + 1)
        if scope.cancelled_caught:
            await _respond(
                exchange, _error(408, "timeout", "the request body did not arrive in time")
            )
            return
        admitted()
        rate = float(limits.mock_rps) if limits is not None else 50.0
        stripped = strip_token(request.target, request.raw_headers, body)
        decision = decide(
            target,
            mock,
            stripped,
            max_body=max_body,
            limiter=self.limiter,
            now=trio.current_time(),
            rate=rate,
            burst=rate,
        )
        if isinstance(decision, Respond):
            await _respond(exchange, decision)
            return
        assert mock is not None and target is not None
        if not await self.mocks.allow_rate(target.space, target.env, rate):
            await _respond(exchange, _RATE_LIMITED)  # the cluster's window is spent
            return
        key = mock.key
        if self.in_flight.get(key, 0) >= self.config.max_in_flight:
            await _respond(
                exchange, _error(503, "busy", "too many requests to this mock in flight")
            )
            return
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            await self._forward(exchange, request, decision, target.space, target.env, remote)
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]

    async def _forward(
        self,
        exchange: HttpExchange,
        request: Request,
        forward: Forward,
        space: str,
        env: str,
        remote: tuple[str, int] | None,
    ) -> None:
        port = await self.mocks.wait_running(space, env, START_WAIT)
        if port is None:
            await _respond(exchange, _error(503, "unavailable", "the mock is not running"))
            return
        headers = forward_headers(
            forward.headers,
            remote[0] if remote else "",
            self.scheme,
            request.headers.get("host", ""),
        )
        if request.wants_websocket:
            await self._tunnel(exchange, request, forward, headers, port)
            return
        started = False
        with trio.move_on_after(self.config.request_timeout) as scope:
            try:
                await self._exchange(exchange, request, forward, headers, port)
                return
            except OSError as exc:
                log.info("cloud mock %s/%s: engine connection failed: %s", space, env, exc)
            except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                # the engine closed the connection: its server was stopped or replaced
                log.info("cloud mock %s/%s: bad engine answer: %s", space, env, exc)
            except _Started:
                started = True
        if started:
            return
        if scope.cancelled_caught:
            await _respond(exchange, _error(504, "timeout", "the mock did not answer in time"))
        else:
            await _respond(exchange, _error(502, "bad-gateway", "the mock gave no valid answer"))

    async def _exchange(
        self,
        exchange: HttpExchange,
        request: Request,
        forward: Forward,
        headers: list[tuple[bytes, bytes]],
        port: int,
    ) -> bool:
        """One request to the engine, its answer relayed as it comes; True once complete.
        OSError or h11's errors before the answer's head: the caller answers 502.

        Engine connections are kept alive and reused (`_idle`): a request then costs the engine
        no accept and the hub no connect. A reused connection the engine closed meanwhile fails
        when the request is sent, before the engine saw it: the request goes again on a new one.
        """
        started = False
        upstream, client = self._take(port)
        fresh = upstream is None
        if upstream is None or client is None:
            upstream, client = (
                await trio.open_tcp_stream("127.0.0.1", port),
                h11.Connection(h11.CLIENT),
            )
        keep = False
        try:
            out = client.send(
                h11.Request(method=request.method, target=forward.target, headers=headers)
            )
            if forward.body:
                out += client.send(h11.Data(data=forward.body))
            out += client.send(h11.EndOfMessage())
            try:
                await upstream.send_all(out)
            except (OSError, trio.BrokenResourceError):
                if fresh:
                    raise
                await upstream.aclose()
                upstream, client = (
                    await trio.open_tcp_stream("127.0.0.1", port),
                    h11.Connection(h11.CLIENT),
                )
                fresh = True
                out = client.send(
                    h11.Request(method=request.method, target=forward.target, headers=headers)
                )
                if forward.body:
                    out += client.send(h11.Data(data=forward.body))
                await upstream.send_all(out + client.send(h11.EndOfMessage()))
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await upstream.receive_some(RECEIVE))
                elif isinstance(event, h11.Response):
                    fields = [*response_headers(event.headers), (b"Connection", b"close")]
                    response = h11.Response(
                        status_code=event.status_code, headers=fields, reason=event.reason
                    )
                    await exchange.stream.send_all(exchange.h11.send(response) or b"")
                    started = True
                elif isinstance(event, h11.Data):
                    if request.method != "HEAD":
                        await exchange.stream.send_all(exchange.h11.send(event) or b"")
                elif isinstance(event, h11.EndOfMessage):
                    await exchange.stream.send_all(exchange.h11.send(h11.EndOfMessage()) or b"")
                    keep = client.our_state is h11.DONE and client.their_state is h11.DONE
                    return True
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("closed before the end of the answer")
        except (OSError, h11.RemoteProtocolError, trio.BrokenResourceError):
            if started:
                raise _Started from None
            raise
        finally:
            if keep:
                client.start_next_cycle()
                self._give_back(port, upstream, client)
            else:
                with trio.CancelScope(shield=True):
                    await upstream.aclose()

    async def _tunnel(
        self,
        exchange: HttpExchange,
        request: Request,
        forward: Forward,
        headers: list[tuple[bytes, bytes]],
        port: int,
    ) -> None:
        """A WebSocket route: the upgrade goes to the engine (the token removed, as for any
        request); once it answers 101, the bytes are relayed both ways until either side ends.
        The connection counts against the mock's requests in flight for as long as it lasts."""
        upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        try:
            with trio.fail_after(self.config.request_timeout):
                upstream = await trio.open_tcp_stream("127.0.0.1", port)
        except (OSError, trio.TooSlowError):
            await _respond(exchange, _error(502, "bad-gateway", "the mock cannot be reached"))
            return
        async with upstream:
            client = h11.Connection(h11.CLIENT)
            head = h11.Request(method="GET", target=forward.target, headers=[*headers, *upgrade])
            try:
                with trio.fail_after(self.config.request_timeout):
                    await upstream.send_all(client.send(head) + client.send(h11.EndOfMessage()))
                    while True:
                        event = client.next_event()
                        if event is h11.NEED_DATA:
                            client.receive_data(await upstream.receive_some(RECEIVE))
                            continue
                        break
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError):
                await _respond(exchange, _error(502, "bad-gateway", "the mock did not answer"))
                return
            if not (isinstance(event, h11.InformationalResponse) and event.status_code == 101):
                status = getattr(event, "status_code", 502)
                await _respond(
                    exchange, _error(status if status >= 400 else 502, "refused", "no upgrade")
                )
                return
            fields = [*response_headers(event.headers), *upgrade]
            accepted = h11.InformationalResponse(status_code=101, headers=fields)
            await exchange.stream.send_all(exchange.h11.send(accepted) or b"")
            from_client = bytes(exchange.h11.trailing_data[0])
            from_engine = bytes(client.trailing_data[0])

            async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream, first: bytes) -> None:
                try:
                    if first:
                        await sink.send_all(first)
                    while data := await source.receive_some(RECEIVE):
                        await sink.send_all(data)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # one side ended: so does the other

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, exchange.stream, upstream, from_client)
                nursery.start_soon(pipe, upstream, exchange.stream, from_engine)

    def _take(self, port: int) -> tuple[trio.SocketStream, h11.Connection] | tuple[None, None]:
        idle = self._idle.get(port)
        now = trio.current_time()
        while idle:
            stream, client, since = idle.pop()
            if now - since < IDLE_REUSE:
                return stream, client
            _discard(stream)
        return None, None

    def _give_back(self, port: int, stream: trio.SocketStream, client: h11.Connection) -> None:
        idle = self._idle.setdefault(port, [])
        if len(idle) >= MAX_IDLE:
            _discard(stream)
            return
        idle.append((stream, client, trio.current_time()))


def _discard(stream: trio.SocketStream) -> None:
    """Close an engine connection nobody will use again, now (closing the socket needs no
    await: the engine sees it end, and nothing is left to flush on an idle connection)."""
    try:
        stream.socket.close()
    except OSError:
        pass


class _Started(Exception):
    """The engine's answer failed after its head was sent on: the connection just closes."""


async def _read_body(exchange: HttpExchange, limit: int) -> bytes:
    """The request body, at most `limit` bytes of it (the gate answers 413 past its limit)."""
    parts: list[bytes] = []
    size = 0
    if exchange.h11.they_are_waiting_for_100_continue:  # curl waits a second for it otherwise
        await exchange.stream.send_all(
            exchange.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        )
    while True:
        try:
            event = exchange.h11.next_event()
        except h11.RemoteProtocolError:
            return b"".join(parts)
        if event is h11.NEED_DATA:
            data = await exchange.stream.receive_some(RECEIVE)
            exchange.h11.receive_data(data)
            if not data:
                return b"".join(parts)
            continue
        if isinstance(event, h11.Data):
            size += len(event.data)
            parts.append(bytes(event.data))
            if size >= limit:
                return b"".join(parts)
            continue
        return b"".join(parts)  # EndOfMessage (or the client left)


def _error(status: int, code: str, message: str) -> Respond:
    return Respond(status, {"error": code, "message": message})


async def _respond(exchange: HttpExchange, response: Respond) -> None:
    try:
        await exchange.respond(response.status, response.body, headers=response.headers)
    except h11.LocalProtocolError:
        pass  # a response was started already: the connection just closes
