"""The hub's port bounds the connections that have not authenticated yet (docs/hub.md,
"Connections in their handshake"), like the LAN listener: in total and per remote address, from
the TCP accept until the request is answered (plain HTTP), the token is accepted (`/yjs`) or the
daemon's auth is (`/peer`). One more waits for a slot (a burst of fast handshakes is served
whole); past `max_waiting` waiting, or after `head_timeout` waiting, it is answered `503 busy`,
while authenticated y-websocket clients and daemons keep syncing. A request head that does not
arrive within `head_timeout`, and a websocket not authenticated in time, are closed. All on
127.0.0.1.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
from helpers import SPACE, client, running_hub, setup_accounts, until, url
from peerutil import FakeHost, make_identity, make_space
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    open_websocket,
    open_websocket_url,
)

import peerdaemon.hub.http as hub_http
from peerdaemon.core.admission import Admission, Slot
from peerdaemon.hub.accounts import Limits
from peerdaemon.hub.admission import REFUSE_TIMEOUT, QueuedAdmission
from peerdaemon.hub.http import HttpConfig
from peerdaemon.hub.server import ConfigError, build_config
from peerdaemon.hub.transport import CLOSE_TIMEOUT
from peerdaemon.hublink import HubClientAuth
from peerdaemon.peer import Established, Link, PeerConfig, PeerConnection

SPACE_DOC = f"space:{SPACE}"
MANY_DEVICES = Limits(devices_per_user=10)


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:  # reset by the server
        pass
    return data


async def http_raw(port: int, path: str) -> tuple[int, bytes]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await read_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def connect_from(port: int, seen_as: dict[int, str] | None = None, ip: str = "") -> Any:
    """A raw TCP connection that sends nothing; with `seen_as`, the hub sees it coming from
    `ip` (its source port is registered before it connects)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    if seen_as is not None:
        seen_as[sock.getsockname()[1]] = ip
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


class Daemon:
    """A daemon's side of the hub link (hub mode, real token proof) over a real websocket; its
    documents live in a FakeHost."""

    def __init__(self, token: str) -> None:
        self.host = FakeHost([make_space(SPACE)])
        self.host.add_doc(SPACE_DOC, [SPACE])
        self.established = trio.Event()
        config = PeerConfig(close_grace=0.5)

        def make_conn(now: float) -> PeerConnection:
            return PeerConnection(
                make_identity("laptop"),
                self.host,  # type: ignore[arg-type]
                dialer=True,
                now=now,
                config=config,
                auth=HubClientAuth(token, {SPACE: "Team"}, trust_first_use=True),
            )

        def on_event(link: Link, event: Any) -> None:
            if isinstance(event, Established):
                self.established.set()

        self.link = Link(make_conn, dialer=True, address="hub", on_event=on_event, config=config)
        self.host.add_listener(self.link.local_update)

    @asynccontextmanager
    async def running(self, port: int):
        async with (
            open_websocket("127.0.0.1", port, "/peer", use_ssl=False) as ws,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self.link.run, ws)
            with trio.fail_after(5):
                await self.established.wait()
            yield self
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------ limits
async def test_past_the_limit_connections_wait_for_a_slot_then_busy_while_the_authenticated_sync(
    tmp_path,
):
    tokens = setup_accounts(tmp_path, "alice")
    http = HttpConfig(max_half_open=8, max_half_open_per_ip=8, max_waiting=2)
    async with running_hub(tmp_path, http=http, limits=MANY_DEVICES) as server:
        admission = server.http.admission
        daemon = Daemon(tokens["alice"])
        async with (
            client(server, SPACE, SPACE_DOC, tokens["alice"], device="web") as web,
            daemon.running(server.port),
            trio.open_nursery() as nursery,
        ):
            assert admission.count == 0  # authenticated: neither counts
            async with AsyncExitStack() as stack:
                idle = [
                    await stack.enter_async_context(await connect_from(server.port))
                    for _ in range(8)
                ]
                await until(lambda: admission.count == 8)

                # Two more wait for their turn (nothing of theirs is read meanwhile) ...
                answers: list[tuple[int, bytes]] = []

                async def ask() -> None:
                    answers.append(await http_raw(server.port, "/health"))

                nursery.start_soon(ask)
                nursery.start_soon(ask)
                await until(lambda: admission.waiting == 2)

                # ... and one more, whatever it asks for, gets 503 busy at once, and is closed.
                start = trio.current_time()
                with pytest.raises(ConnectionRejected) as refused:
                    async with open_websocket_url(url(server, SPACE, SPACE_DOC, tokens["alice"])):
                        pass
                assert (refused.value.status_code, refused.value.body) == (503, b"busy\n")
                with pytest.raises(ConnectionRejected) as refused:
                    async with open_websocket("127.0.0.1", server.port, "/peer", use_ssl=False):
                        pass
                assert (refused.value.status_code, refused.value.body) == (503, b"busy\n")
                assert await http_raw(server.port, "/health") == (503, b"busy\n")
                assert trio.current_time() - start < 1.0
                assert admission.count == 8 and admission.refused == 3 and not answers

                # Meanwhile the authenticated client and daemon sync both ways.
                await web.edit("from", "web")
                await until(lambda: daemon.host.values(SPACE_DOC).get("from") == "web")
                daemon.host.edit(SPACE_DOC, {"daemon": 1})
                await web.wait_for(lambda: web.map().get("daemon") == 1)

                # A half-open one leaves: the waiting ones are served in turn.
                await idle.pop().aclose()
                await until(lambda: len(answers) == 2)
                assert [status for status, _ in answers] == [200, 200]
                assert admission.waiting == 0 and admission.count == 7
                # A client takes the free slot only until its token is accepted.
                async with client(server, SPACE, SPACE_DOC, tokens["alice"], device="late") as late:
                    assert late.map() == {"from": "web", "daemon": 1}
                    assert admission.count == 7
                    async with client(server, SPACE, SPACE_DOC, tokens["alice"], device="more"):
                        assert admission.count == 7
            await until(lambda: admission.count == 0)  # closed: released
            assert admission.by_ip == {}
            await web.edit("still", "syncing")
            await until(lambda: daemon.host.values(SPACE_DOC).get("still") == "syncing")


async def test_a_burst_of_clients_from_one_address_is_served_whole(tmp_path):
    """More clients at once than one address may have in their handshake (a page of tabs, a
    reconnect storm, a proxy): every one is served, none is refused."""
    tokens = setup_accounts(tmp_path, "alice")
    http = HttpConfig(max_half_open=4, max_half_open_per_ip=2)
    burst = 40
    async with running_hub(tmp_path, http=http, limits=Limits(devices_per_user=burst)) as server:
        admission = server.http.admission
        synced = 0
        everyone_in = trio.Event()

        async def join(i: int) -> None:
            nonlocal synced
            async with client(server, SPACE, "env-1", tokens["alice"], device=f"tab{i}"):
                synced += 1
                if synced == burst:
                    everyone_in.set()
                await everyone_in.wait()

        async with trio.open_nursery() as nursery:
            for i in range(burst):
                nursery.start_soon(join, i)
        assert synced == burst and admission.refused == 0
        assert admission.count == 0 and admission.waiting == 0


async def test_half_open_connections_are_capped_per_address(tmp_path, monkeypatch):
    seen_as: dict[int, str] = {}  # client port -> the address the hub should see
    real_remote = hub_http.remote_address

    def remote(stream: Any) -> tuple[str, int] | None:
        address = real_remote(stream)
        return (seen_as.get(address[1], address[0]), address[1]) if address else None

    monkeypatch.setattr(hub_http, "remote_address", remote)
    tokens = setup_accounts(tmp_path, "alice")
    http = HttpConfig(max_half_open=8, max_half_open_per_ip=3)
    a, b = "198.51.100.1", "203.0.113.9"
    async with running_hub(tmp_path, http=http) as server:
        admission = server.http.admission
        async with AsyncExitStack() as stack:
            from_a = [
                await stack.enter_async_context(await connect_from(server.port, seen_as, a))
                for _ in range(3)
            ]
            await until(lambda: admission.by_ip.get(a) == 3)
            over = await stack.enter_async_context(await connect_from(server.port, seen_as, a))
            await over.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a's fourth
            await until(lambda: admission.waiting == 1)  # waits for one of a's slots
            assert admission.count == 3 < http.max_half_open
            for _ in range(3):  # another address still gets in at once
                await stack.enter_async_context(await connect_from(server.port, seen_as, b))
            await until(lambda: admission.by_ip == {a: 3, b: 3})
            async with client(server, SPACE, "env-1", tokens["alice"]) as c:  # and 127.0.0.1
                await c.edit("k", "v")
            assert admission.waiting == 1
            await from_a[0].aclose()  # one of a's leaves: a's fourth gets its slot
            assert (await read_all(over)).startswith(b"HTTP/1.1 200 ")  # answered: released
            await until(lambda: admission.by_ip == {a: 2, b: 3})
            assert admission.waiting == 0 and admission.refused == 0
        await until(lambda: admission.count == 0)


async def test_a_connection_that_waits_too_long_gets_busy(tmp_path, autojump_clock):
    """A wait for a slot lasts at most `head_timeout`: then `503 busy`."""

    class Silent:  # holds its slot until the hub cuts it (handshake_timeout + CLOSE_TIMEOUT)
        async def handle_peer(self, ws: Any) -> None:
            await trio.sleep_forever()

    http = HttpConfig(max_half_open=1, max_half_open_per_ip=1, head_timeout=5.0)
    async with running_hub(
        tmp_path, http=http, peer_endpoint=lambda docs, accounts, events: Silent()
    ) as server:
        admission = server.http.admission
        async with open_websocket("127.0.0.1", server.port, "/peer", use_ssl=False):
            assert admission.count == 1
            start = trio.current_time()
            assert await http_raw(server.port, "/health") == (503, b"busy\n")
            assert 5.0 - 0.1 <= trio.current_time() - start <= 5.0 + REFUSE_TIMEOUT
            assert admission.waiting == 0 and admission.refused == 1


async def test_refused_and_closed_connections_release_their_slots(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    http = HttpConfig(max_half_open=4, max_half_open_per_ip=4)
    async with running_hub(tmp_path, http=http) as server:
        admission = server.http.admission
        for _ in range(3 * http.max_half_open):  # answered ones never pile up
            assert (await http_raw(server.port, "/health"))[0] == 200
            assert (await http_raw(server.port, "/nope"))[0] == 404
            async with open_websocket_url(url(server, SPACE, "env-1", "wrong")) as ws:
                with pytest.raises(ConnectionClosed):  # permission-denied, then 4401
                    while True:
                        await ws.get_message()
        await until(lambda: admission.count == 0)
        assert admission.refused == 0
        async with client(server, SPACE, "env-1", tokens["alice"]):
            assert admission.count == 0


# ---------------------------------------------------------------------------------- timeouts
async def test_a_request_head_that_never_arrives_is_closed_after_head_timeout(
    tmp_path, autojump_clock
):
    http = HttpConfig(head_timeout=10.0)
    async with running_hub(tmp_path, http=http) as server:
        admission = server.http.admission
        silent = await connect_from(server.port)
        slow = await connect_from(server.port)  # a slowloris: a header byte a second
        start = trio.current_time()
        await until(lambda: admission.count == 2)
        closed_at: dict[str, float] = {}

        async def wait_closed(name: str, stream: trio.SocketStream) -> None:
            assert await read_all(stream) == b""  # closed without an answer
            closed_at[name] = trio.current_time() - start

        async def trickle() -> None:
            await slow.send_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
            while "slow" not in closed_at:
                await trio.sleep(1)
                try:
                    await slow.send_all(b"a")
                except trio.BrokenResourceError:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_closed, "silent", silent)
            nursery.start_soon(wait_closed, "slow", slow)
            nursery.start_soon(trickle)
        assert all(10.0 - 0.1 <= t <= 10.5 for t in closed_at.values()), closed_at
        await until(lambda: admission.count == 0)
        await silent.aclose()
        await slow.aclose()


async def test_a_daemon_that_never_authenticates_times_out_and_releases(tmp_path, autojump_clock):
    async with running_hub(tmp_path) as server:
        admission = server.http.admission
        async with open_websocket("127.0.0.1", server.port, "/peer", use_ssl=False) as ws:
            start = trio.current_time()
            assert admission.count == 1  # upgraded, but no hello: still half-open
            close = cbor2.loads(await ws.get_message())  # the endpoint's handshake timeout
            assert (close["t"], close["reason"]) == ("close", "timeout")
            assert 10.0 - 0.1 <= trio.current_time() - start <= 10.5
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        await until(lambda: admission.count == 0)


async def test_a_peer_endpoint_that_never_authenticates_is_cut_by_the_hub(tmp_path, autojump_clock):
    """The hub's own backstop: a `/peer` socket whose endpoint never releases `ws.slot` is cut
    `handshake_timeout` + `CLOSE_TIMEOUT` after its upgrade."""

    class Silent:
        async def handle_peer(self, ws: Any) -> None:
            assert ws.slot is not None and not ws.slot.released
            await trio.sleep_forever()

    http = HttpConfig(handshake_timeout=5.0)
    async with running_hub(
        tmp_path, http=http, peer_endpoint=lambda docs, accounts, events: Silent()
    ) as server:
        async with open_websocket("127.0.0.1", server.port, "/peer", use_ssl=False) as ws:
            start = trio.current_time()
            with pytest.raises(ConnectionClosed), trio.fail_after(30):
                await ws.get_message()
            assert 5.0 + CLOSE_TIMEOUT - 0.1 <= trio.current_time() - start <= 5.0 + 3.0
        await until(lambda: server.http.admission.count == 0)


# ------------------------------------------------------------------------------------ config
def test_connection_limits_in_the_config_file(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(
        "[connections]\nmax_half_open = 1000\nmax_half_open_per_ip = 50\nhead_timeout = 5\n"
    )
    http = build_config(config_file=path).http
    assert (http.max_half_open, http.max_half_open_per_ip) == (1000, 50)
    assert (http.head_timeout, http.handshake_timeout) == (5.0, 10.0)
    defaults = HttpConfig()
    assert (defaults.max_half_open, defaults.max_half_open_per_ip) == (256, 16)
    path.write_text("[connections]\nmax_half_opn = 3\n")  # unknown: warned, not fatal
    (warning,) = build_config(config_file=path).warnings
    assert "connections.max_half_opn" in warning and "connections.max_half_open" in warning
    for bad in (
        "head_timeout = 0",
        "max_half_open = -1",
        "max_half_open_per_ip = 0",
    ):
        path.write_text(f"[connections]\n{bad}\n")
        with pytest.raises(ConfigError):
            build_config(config_file=path)


def test_admission_counts_per_address():
    admission = Admission(total=3, per_ip=2)
    t1, t2 = admission.admit("a"), admission.admit("a")
    assert t1 is not None and t2 is not None
    assert admission.admit("a") is None  # a's third
    t3 = admission.admit("b")
    assert t3 is not None and admission.admit("c") is None  # the total
    t1.release()
    t1.release()  # idempotent
    assert t1.released and admission.by_ip == {"a": 1, "b": 1} and admission.refused == 2
    assert admission.admit("c") is not None


def test_connections_past_the_limits_wait_in_line():
    """Without I/O: each released slot goes to the longest waiting connection whose address is
    under its own limit; a cancelled wait leaves the line; past `max_waiting`: refused."""
    line = QueuedAdmission(total=3, per_ip=2, max_waiting=3)
    a1, a2, b1 = line.enter("a"), line.enter("a"), line.enter("b")
    assert all(isinstance(s, Slot) for s in (a1, a2, b1))
    a3 = line.enter("a")  # a's third: a is at its limit
    c1 = line.enter("c")  # the total is reached
    c2 = line.enter("c")
    assert line.enter("d") is None and line.refused == 1  # the line is full
    assert line.waiting == 3 and all(w.slot is None for w in (a3, c1, c2))
    line.cancel(c2)
    assert line.waiting == 2
    b1.release()  # the total has room; a is still at its limit: c's first goes, before a's
    assert c1.slot is not None and a3.slot is None and line.by_ip == {"a": 2, "c": 1}
    a1.release()  # now a's own turn
    assert a3.slot is not None and line.waiting == 0 and line.count == 3
    line.cancel(a3)  # a granted wait that is given up releases its slot
    assert line.count == 2 and line.by_ip == {"a": 1, "c": 1}
    assert isinstance(line.enter("e"), Slot)  # nobody waits: straight in
