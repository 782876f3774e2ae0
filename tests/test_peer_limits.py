"""Robustness limits of the peer links (docs/peer-protocol.md, section 7 "Slow peers" and
"Connections in their handshake"): a peer that stops reading gets its queued updates merged,
then is dropped with `too-slow` (queue over `max_queued`, or a write stalled for `send_timeout`)
while the daemon keeps serving the others; the next connection resyncs. Incoming connections
that have not authenticated are bounded in total and per address; one more gets `busy` at once.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from typing import Any

import cbor2
import pytest
import trio
from helpers import LOCAL
from helpers import until as wait_for
from peerutil import FakeHost, MemoryConnection, Node, exchange, make_identity, make_space, wire
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, open_websocket

from peerdaemon.model import MODEL_VERSION
from peerdaemon.peer import Closed, Link, PeerConfig, PeerConnection

S1 = make_space("s1")
BIG = 32 * 1024


def blob() -> str:
    return os.urandom(BIG // 2).hex()


def pair(cfg: PeerConfig, values: dict[str, Any] | None = None):
    """Two connected sans-I/O connections over two hosts sharing `env`, exchanged until quiet."""
    host_a, host_b = FakeHost([S1]), FakeHost([S1])
    host_a.add_doc("env", ["s1"], values or {"v": 0})
    host_b.share("env", "s1")
    return host_a, host_b


def connect(host_a: FakeHost, host_b: FakeHost, cfg: PeerConfig, ids=None):
    ident_a, ident_b = ids or (make_identity("a"), make_identity("b"))
    a = MemoryConnection(ident_a, host_a, dialer=True, now=0.0, config=cfg.session)  # type: ignore[arg-type]
    b = MemoryConnection(ident_b, host_b, dialer=False, now=0.0, config=cfg.session)  # type: ignore[arg-type]
    exchange(a, b)
    assert a.state == b.state == "open"
    return a, b


# -- the sans-I/O queue ------------------------------------------------------------------------


def test_queued_updates_are_merged_past_the_soft_limit_and_still_converge():
    cfg = PeerConfig(coalesce_bytes=256 * 1024, max_queued=4 << 20)
    host_a, host_b = pair(cfg)
    a, b = connect(host_a, host_b, cfg)
    conns = [a]
    wire(host_a, lambda: conns)
    for i in range(40):  # ~1.3 MB: past the soft limit, under the hard one
        host_a.edit("env", {f"k{i % 4}": blob()})
    assert a.state == "open"
    assert a.coalesced > 0
    assert len(a._out) < 10  # one update message for `env`, not 40
    assert a.queued_bytes <= 40 * (BIG + 200)
    exchange(a, b)
    assert host_b.values("env") == host_a.values("env")
    assert a.queued_bytes == 0


def test_a_peer_that_never_reads_is_closed_too_slow_and_resyncs_on_reconnect():
    cfg = PeerConfig(coalesce_bytes=128 * 1024, max_queued=1 << 20)
    host_a, host_b = pair(cfg)
    ids = make_identity("a"), make_identity("b")
    a, b = connect(host_a, host_b, cfg, ids)
    conns = [a]
    wire(host_a, lambda: conns)
    peak = 0
    for i in range(200):  # 6.4 MB of changes, never taken by a writer
        host_a.edit("env", {"big": blob(), f"n{i}": i})
        peak = max(peak, a.queued_bytes)
        if a.closed is not None:
            break
    assert a.closed is not None and a.closed.reason == "too-slow" and not a.closed.by_peer
    assert a.coalesced > 0
    assert peak <= cfg.max_queued + BIG + 1024  # never more than the limit plus one update
    (close,) = a.data_to_send()  # the queue was dropped: only the close is left
    b.receive(close, 1.0)
    assert b.closed == Closed("too-slow", b.closed.detail, by_peer=True)  # type: ignore[union-attr]
    assert host_b.values("env") != host_a.values("env")

    a2, b2 = connect(host_a, host_b, cfg, ids)  # reconnecting: step 1 / step 2 catch up
    assert host_b.values("env") == host_a.values("env")
    assert a2.queued_bytes == 0 and b2.closed is None


def test_one_message_larger_than_the_queue_limit_is_not_too_slow():
    cfg = PeerConfig(coalesce_bytes=16 * 1024, max_queued=64 * 1024)
    host_a, host_b = pair(cfg, {"huge": os.urandom(100_000).hex()})  # a 200 KB first sync
    a, b = connect(host_a, host_b, cfg)
    assert host_b.values("env") == host_a.values("env")
    assert a.closed is None and b.closed is None


# -- the trio link: a write that makes no progress ----------------------------------------------


class MemoryWs:
    """One end of an in-memory websocket pair; `reading` unset = the peer stopped reading."""

    def __init__(self, send: Any, receive: Any, remote: str) -> None:
        self._send, self._receive, self.remote = send, receive, remote
        self.reading = trio.Event()
        self.reading.set()

    async def send_message(self, data: bytes) -> None:
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(1006, "gone")) from None

    async def get_message(self) -> bytes:
        await self.reading.wait()
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(1000, "closed")) from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self._send.aclose()


def memory_pair() -> tuple[MemoryWs, MemoryWs]:
    ab_send, ab_recv = trio.open_memory_channel[bytes](0)
    ba_send, ba_recv = trio.open_memory_channel[bytes](0)
    return MemoryWs(ab_send, ba_recv, "mem:a"), MemoryWs(ba_send, ab_recv, "mem:b")


def make_link(ident: Any, host: FakeHost, cfg: PeerConfig, *, dialer: bool, events: list) -> Link:
    def make_conn(now: float) -> PeerConnection:
        return PeerConnection(
            ident, host, dialer=dialer, now=now, config=cfg.session, model=MODEL_VERSION
        )  # type: ignore[arg-type]

    return Link(
        make_conn,
        dialer=dialer,
        address="mem",
        on_event=lambda link, event: events.append(event),
        config=cfg,
        host=host,  # type: ignore[arg-type]
    )


async def test_a_stalled_write_closes_too_slow_after_send_timeout(autojump_clock):
    # Long keep-alive timers, so only the stalled write can end the link.
    a_cfg = PeerConfig(ping_interval=300, idle_timeout=1000, send_timeout=60, close_grace=1)
    c_cfg = PeerConfig(ping_interval=1e5, idle_timeout=1e6, close_grace=1)
    host_a, host_c = FakeHost([S1]), FakeHost([S1])
    host_a.add_doc("env", ["s1"], {"v": 0})
    host_c.share("env", "s1")
    ids = make_identity("a"), make_identity("c")
    results: dict[str, Closed] = {}

    async def run(name: str, link: Link, ws: MemoryWs) -> None:
        results[name] = await link.run(ws)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        ws_a, ws_c = memory_pair()
        a_events: list = []
        link_a = make_link(ids[0], host_a, a_cfg, dialer=False, events=a_events)
        link_c = make_link(ids[1], host_c, c_cfg, dialer=True, events=[])
        host_a.add_listener(link_a.local_update)
        nursery.start_soon(run, "a", link_a, ws_a)
        nursery.start_soon(run, "c", link_c, ws_c)
        await wait_for(lambda: host_c.values("env") == {"v": 0})

        ws_c.reading = trio.Event()  # c stops reading
        await trio.sleep(1)
        stalled_at = trio.current_time()
        for i in range(3):
            host_a.edit("env", {"v": i + 1})  # never blocks, whatever c does
        with trio.fail_after(120):
            while "a" not in results:
                await trio.sleep(1)
        assert results["a"].reason == "too-slow"
        assert 60 <= trio.current_time() - stalled_at <= 60 + 3
        assert link_a.conn is not None and link_a.conn.queued_bytes <= 200
        ws_c.reading.set()  # c reads again: its connection is gone
        await ws_a.aclose()
        with trio.fail_after(10):
            while "c" not in results:
                await trio.sleep(0.1)

        # Reconnecting resyncs what c missed.
        ws_a, ws_c = memory_pair()
        link_a = make_link(ids[0], host_a, a_cfg, dialer=False, events=[])
        link_c = make_link(ids[1], host_c, c_cfg, dialer=True, events=[])
        nursery.start_soon(run, "a2", link_a, ws_a)
        nursery.start_soon(run, "c2", link_c, ws_c)
        await wait_for(lambda: host_c.values("env") == {"v": 3})
        nursery.cancel_scope.cancel()


# -- real sockets: one stuck peer among others --------------------------------------------------


class PausableWs:
    """A real websocket whose reader can be paused (then TCP back-pressure reaches the daemon)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.reading = trio.Event()
        self.reading.set()

    @property
    def remote(self) -> Any:
        return self.ws.remote

    async def get_message(self) -> bytes:
        await self.reading.wait()
        return await self.ws.get_message()

    async def send_message(self, data: bytes) -> None:
        await self.ws.send_message(data)

    async def aclose(self, *args: Any) -> None:
        await self.ws.aclose(*args)


async def test_a_stuck_peer_is_dropped_while_the_daemon_keeps_serving_others():
    cfg = PeerConfig(
        coalesce_bytes=256 * 1024,
        max_queued=1 << 20,
        backoff_initial=0.05,
        backoff_max=0.4,
        connect_timeout=2.0,
        close_grace=0.5,
    )
    a, b = Node("alice", S1, config=cfg), Node("bob", S1)
    carol_ident, carol_host = make_identity("carol"), FakeHost([S1])
    a.host.add_doc("env", ["s1"], {"v": 0})
    b.host.share("env", "s1")
    carol_host.share("env", "s1")
    slow_cfg = PeerConfig(idle_timeout=1000, ping_interval=1, close_grace=0.5)
    carol_events: list = []
    async with a.running(), b.running(static=[(LOCAL, a.port)]):  # type: ignore[list-item]
        async with trio.open_nursery() as nursery:
            link_c = make_link(carol_ident, carol_host, slow_cfg, dialer=True, events=carol_events)
            paused: list[PausableWs] = []

            async def carol() -> None:
                async with open_websocket(LOCAL, a.port, "/peer", use_ssl=False) as ws:  # type: ignore[arg-type]
                    paused.append(PausableWs(ws))
                    await link_c.run(paused[0])  # type: ignore[arg-type]

            nursery.start_soon(carol)
            await wait_for(lambda: a.state(b) == "connected")
            await wait_for(lambda: carol_host.values("env") == {"v": 0})
            await wait_for(lambda: a.state(b) == "connected" and len(a.manager._links()) == 2)  # type: ignore[union-attr]
            (a_to_carol,) = [
                lk for lk in a.manager._links() if lk.peer_device == carol_ident.device_id
            ]  # type: ignore[union-attr]
            conn = a_to_carol.conn
            assert conn is not None

            paused[0].reading = trio.Event()  # carol stops reading
            peak, i = 0, 0
            with trio.fail_after(30):
                while conn.closed is None:
                    i += 1
                    a.host.edit("env", {"big": blob(), "v": i})
                    peak = max(peak, conn.queued_bytes)
                    await trio.sleep(0)  # let the writers run
                    assert i < 4000, "never dropped"
            assert conn.closed.reason == "too-slow"
            assert conn.coalesced > 0
            assert peak <= cfg.max_queued + BIG + 1024
            await wait_for(lambda: (a.row(carol_ident.device_id) or {}).get("reason") == "too-slow")
            # bob was served all along: same link, every change
            await wait_for(lambda: b.host.values("env") == a.host.values("env"))
            assert (
                a.state(b) == "connected"
                and a.events.of("peer-disconnected")[0]["reason"] == "too-slow"
            )
            assert all(e["device"] != b.id for e in a.events.of("peer-disconnected"))
            paused[0].reading.set()  # carol reads again: the link is gone, she reconnects
            with trio.fail_after(10):
                while link_c.closed is None:
                    await trio.sleep(0.05)

            c = Node("carol", S1)
            c.identity, c.host = carol_ident, carol_host
            async with c.running(static=[(LOCAL, a.port)], listen=False):  # type: ignore[list-item]
                await wait_for(lambda: carol_host.values("env") == a.host.values("env"))
            nursery.cancel_scope.cancel()


# -- connections in their handshake --------------------------------------------------------------


async def test_the_65th_half_open_connection_is_refused_and_the_64_time_out():
    cfg = PeerConfig(
        handshake_timeout=2.0, max_half_open=64, max_half_open_per_ip=64, close_grace=0.5
    )
    a = Node("alice", S1, config=cfg)
    async with a.running(), AsyncExitStack() as stack:
        socks = [
            await stack.enter_async_context(
                open_websocket(LOCAL, a.port, "/peer", use_ssl=False)  # type: ignore[arg-type]
            )
            for _ in range(64)
        ]
        start = trio.current_time()
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket(LOCAL, a.port, "/peer", use_ssl=False):  # type: ignore[arg-type]
                pass
        assert trio.current_time() - start < 1.0  # at once, not after a timeout
        assert (refused.value.status_code, refused.value.body) == (503, b"busy\n")
        for ws in socks:
            with trio.fail_after(5):
                reply = cbor2.loads(await ws.get_message())
            assert (reply["t"], reply["reason"]) == ("close", "timeout")
        assert trio.current_time() - start < 4.0
        # Room again: a member gets in.
        b = Node("bob", S1)
        async with b.running(static=[(LOCAL, a.port)], listen=False):  # type: ignore[list-item]
            await wait_for(lambda: a.state(b) == "connected")


async def test_half_open_connections_are_capped_per_address_and_a_dialer_sees_busy():
    cfg = PeerConfig(
        handshake_timeout=1.0,
        max_half_open=64,
        max_half_open_per_ip=8,
        close_grace=0.5,
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=2.0,
    )
    a, b, d = Node("alice", S1, config=cfg), Node("bob", S1), Node("dave", S1)
    async with a.running(), b.running(static=[(LOCAL, a.port)], listen=False):  # type: ignore[list-item]
        await wait_for(lambda: a.state(b) == "connected")  # authenticated: does not count
        async with AsyncExitStack() as stack:
            for _ in range(8):
                await stack.enter_async_context(
                    open_websocket(LOCAL, a.port, "/peer", use_ssl=False)  # type: ignore[arg-type]
                )
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket(LOCAL, a.port, "/peer", use_ssl=False):  # type: ignore[arg-type]
                    pass
            assert refused.value.status_code == 503
            async with d.running(static=[(LOCAL, a.port)], listen=False):  # type: ignore[list-item]
                await wait_for(
                    lambda: (d.row(address=f"{LOCAL}:{a.port}") or {}).get("reason") == "busy"
                )
                assert a.state(b) == "connected"
                # the 8 strangers time out (handshake timeout), then dave's redial gets through
                await wait_for(lambda: a.state(d) == "connected", timeout=5)
        assert a.manager is not None
