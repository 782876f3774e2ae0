"""Peer managers over real trio-websocket connections on 127.0.0.1, with fake hosts."""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import replace
from typing import Any

import cbor2
import pytest
import trio
from helpers import LOCAL, free_port
from helpers import until as wait_for
from peerutil import FAST, Node, make_space
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket

from peerdaemon.peer import PeerConfig
from peerdaemon.peer import manager as manager_module

S1, S2 = make_space("s1"), make_space("s2")


def count_dials(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (host, port) the peer managers dial from now on, in order: lets a test wait for
    "several retries" instead of sleeping for them."""
    dials: list[tuple[str, int]] = []
    real = manager_module.dial

    async def counting(link: Any, host: str, port: int, **kw: Any) -> Any:
        dials.append((host, port))
        return await real(link, host, port, **kw)

    monkeypatch.setattr(manager_module, "dial", counting)
    return dials


async def test_connect_converge_and_edit_both_ways():
    a, b = Node("alice", S1), Node("bob", S1)
    a.host.add_doc("env", ["s1"], {"from_a": 1})
    b.host.add_doc("env", ["s1"], {"from_b": 2})
    b.host.add_doc("env-b", ["s1"], {"only": "b"})
    a.host.share("env-b", "s1")
    async with b.running():
        async with a.running(static=[(LOCAL, b.port)]):
            await wait_for(lambda: a.state(b) == "connected" and b.state(a) == "connected")
            await wait_for(
                lambda: a.host.values("env") == b.host.values("env") == {"from_a": 1, "from_b": 2}
            )
            await wait_for(lambda: a.host.values("env-b") == {"only": "b"})
            row_a = a.row(b.id)
            assert row_a is not None
            assert row_a["name"] == "bob" and row_a["address"] == f"{LOCAL}:{b.port}"
            assert row_a["spaces"] == 1 and row_a["direction"] == "outgoing"
            assert b.row(a.id)["direction"] == "incoming"  # type: ignore[index]
            await wait_for(lambda: a.row(b.id)["synced"])  # type: ignore[index]

            a.host.edit("env", {"live_a": True})
            await wait_for(lambda: b.host.values("env").get("live_a") is True)
            b.host.edit("env", {"live_b": True})
            await wait_for(lambda: a.host.values("env").get("live_b") is True)
            assert len(a.events.of("peer-connected")) == 1
            assert a.events.of("peer-connected")[0]["device"] == b.id
            assert not a.events.of("peer-disconnected")
            # no update came back to where it started
            assert all(origin == f"peer:{b.id}" for _, _, origin in a.host.applied)
            assert not any(d == "env" and u for d, u, o in b.host.applied if o == f"peer:{b.id}")
        await wait_for(lambda: b.state(a) == "disconnected")
        assert b.row(a.id)["reason"] == "closed"  # type: ignore[index]
        assert b.events.of("peer-disconnected")[-1]["reason"] == "closed"


async def test_reconnect_after_the_listener_restarts():
    a, b = Node("alice", S1), Node("bob", S1)
    a.host.add_doc("env", ["s1"], {"v": 0})
    b.host.share("env", "s1")
    async with trio.open_nursery() as nursery:
        async with a.running() as manager_a:
            async with b.running():
                manager_a.add_address(LOCAL, b.port)  # type: ignore[arg-type]
                await wait_for(lambda: a.state(b) == "connected")
                await wait_for(lambda: b.host.values("env") == {"v": 0})
            # b is down: a notices, keeps editing, keeps retrying
            await wait_for(lambda: a.state(b) == "disconnected")
            assert a.events.of("peer-disconnected")[0]["reason"] == "closed"
            a.host.edit("env", {"v": 1})
            await wait_for(lambda: a.row(b.id)["reason"] == "unreachable")  # type: ignore[index]
            async with b.running():  # same port, same identity and data
                await wait_for(lambda: a.state(b) == "connected", timeout=5)
                await wait_for(lambda: b.host.values("env") == {"v": 1})
                b.host.edit("env", {"w": 2})
                await wait_for(lambda: a.host.values("env") == {"v": 1, "w": 2})
            kinds = [(t, d["reason"]) for t, d in a.events.items]
            assert kinds[:3] == [
                ("peer-connected", None),
                ("peer-disconnected", "closed"),
                ("peer-disconnected", "unreachable"),
            ]
            assert kinds[3] == ("peer-connected", None)
        nursery.cancel_scope.cancel()


async def test_simultaneous_dials_keep_the_connection_of_the_smaller_device_id(caplog):
    caplog.set_level(logging.INFO, logger="peerdaemon.peer")
    a, b = Node("alice", S1), Node("bob", S1)
    a.host.add_doc("env", ["s1"], {"v": 0})
    b.host.share("env", "s1")
    async with a.running() as manager_a, b.running() as manager_b:
        manager_a.add_address(LOCAL, b.port)  # type: ignore[arg-type]
        manager_b.add_address(LOCAL, a.port)  # type: ignore[arg-type]
        await wait_for(lambda: a.state(b) == "connected" and b.state(a) == "connected")

        small, large = (a, b) if a.id < b.id else (b, a)

        def settled() -> bool:
            """The tie-break is over: one link each way, nothing connecting, and the larger
            device's dial has ended (its loop does not redial a connected device, so nothing
            changes by itself from here)."""
            for node, other in ((a, b), (b, a)):
                assert node.manager is not None
                row = node.manager._rows.get(other.id)
                if row is None or len(row.links) != 1 or row.pending:
                    return False
            assert large.manager is not None
            return not any(t.dialing for t in large.manager._targets.values())

        await wait_for(settled)
        assert small.row(large.id)["direction"] == "outgoing"  # type: ignore[index]
        assert large.row(small.id)["direction"] == "incoming"  # type: ignore[index]
        for node, other in ((a, b), (b, a)):
            assert node.manager is not None
            assert len(node.manager._rows[other.id].links) == 1
            assert len(node.events.of("peer-connected")) == 1
            assert node.events.of("peer-disconnected") == []
        assert "duplicate" in caplog.text
        a.host.edit("env", {"v": 1})
        await wait_for(lambda: b.host.values("env") == {"v": 1})


async def test_unreachable_address(monkeypatch):
    dials = count_dials(monkeypatch)
    a = Node("alice", S1)
    port = free_port()
    async with a.running(static=[(LOCAL, port)]):
        address = f"{LOCAL}:{port}"
        await wait_for(lambda: (a.row(address=address) or {}).get("reason") == "unreachable")
        row = a.row(address=address)
        assert (
            row is not None
            and row["device"] is None
            and row["state"] in ("disconnected", "connecting")
        )
        await wait_for(lambda: dials.count((LOCAL, port)) >= 4)  # three failed, one event
        events = a.events.of("peer-disconnected")
        assert len(events) == 1 and events[0]["reason"] == "unreachable"
        assert events[0]["address"] == address


async def test_a_listener_that_never_answers_is_unreachable_and_redialed():
    """A dial is bounded by `connect_timeout` even when the other side accepts TCP and never
    answers the websocket upgrade (trio-websocket alone would wait forever); while the next
    attempt is under way the row reads `connecting` with the last failure, as hub rows do."""
    a = Node("alice", S1, config=replace(FAST, connect_timeout=0.3))
    with trio.socket.socket() as silent:  # the kernel accepts TCP, nobody ever answers
        await silent.bind((LOCAL, 0))
        silent.listen(8)
        address = f"{LOCAL}:{silent.getsockname()[1]}"
        async with a.running(static=[(LOCAL, silent.getsockname()[1])]):
            await wait_for(lambda: (a.row(address=address) or {}).get("reason") == "unreachable")
            await wait_for(lambda: (a.row(address=address) or {}).get("state") == "connecting")
            assert a.row(address=address)["reason"] == "unreachable"  # type: ignore[index]


UPGRADE = (
    b"GET /peer HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def reset_after(port: int, payload: bytes, pause: float) -> None:
    """Connect, send `payload`, wait, then reset the connection (RST, not FIN)."""
    sock = trio.socket.socket()
    await sock.connect((LOCAL, port))
    if payload:
        await sock.send(payload)
    await trio.sleep(pause)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_connections_reset_mid_handshake_do_not_stop_the_listener():
    """A peer killed mid-handshake resets its connection; asking the socket for the peer's
    address then fails (ENOTCONN). That took the whole daemon down once."""
    a, b = Node("alice", S1), Node("bob", S1)
    a.host.add_doc("env", ["s1"], {"v": 1})
    b.host.add_doc("env", ["s1"], {})
    async with b.running():
        for _ in range(15):
            for payload in (b"", UPGRADE[:20], UPGRADE):
                for pause in (0, 0.001, 0.01):
                    await reset_after(b.port, payload, pause)
        async with a.running(static=[(LOCAL, b.port)]):  # the listener still serves
            await wait_for(lambda: b.host.values("env") == {"v": 1}, timeout=30)


async def test_no_common_space_is_unauthorized_on_both_sides(monkeypatch):
    dials = count_dials(monkeypatch)
    a, b = Node("alice", S1), Node("bob", S2)
    a.host.add_doc("env", ["s1"], {"secret": 1})
    async with b.running(), a.running(static=[(LOCAL, b.port)]):  # type: ignore[list-item]
        # a dialed an address whose device never proved its key: the failure is the address's
        dialed = f"{LOCAL}:{b.port}"
        await wait_for(lambda: (a.row(address=dialed) or {}).get("reason") == "unauthorized")
        assert a.row(b.id) is None and a.row(address=dialed)["name"] is None  # type: ignore[index]
        # b verified a's signature before refusing it: a's device is known to b
        await wait_for(lambda: (b.row(a.id) or {}).get("reason") == "unauthorized")
        assert b.row(a.id)["name"] == "alice"  # type: ignore[index]
        await wait_for(lambda: dials.count((LOCAL, b.port)) >= 4)  # three refused, one event
        assert len(a.events.of("peer-disconnected")) == 1
        assert b.host.applied == [] and "env" not in b.host.docs

        b.host.join(S1)  # an invite accepted: the next attempt gets through
        await wait_for(lambda: a.state(b) == "connected")


async def test_incompatible_version_shows_both_versions():
    a, b = Node("alice", S1, model=1), Node("bob", S1, model=2)  # a predates the space gate
    async with b.running(), a.running(static=[(LOCAL, b.port)]):  # type: ignore[list-item]
        # no key is proven across a version mismatch: a's row is the dialed address's, and b
        # (which only heard a's unproven hello) keeps no row for a
        dialed = f"{LOCAL}:{b.port}"
        await wait_for(
            lambda: (a.row(address=dialed) or {}).get("reason") == "incompatible-version"
        )
        row = a.row(address=dialed)
        assert row is not None and row["device"] is None and row["name"] is None
        assert row["versions"] == {
            "local": {"proto": 1, "model": 1},
            "remote": {"proto": 1, "model": 2},
        }
        assert a.events.of("peer-disconnected")[0]["versions"] == row["versions"]
        assert b.manager is not None and b.manager.peers() == []


async def test_garbage_from_a_peer_closes_only_that_link():
    a, b = Node("alice", S1), Node("bob", S1)
    a.host.add_doc("env", ["s1"], {"v": 1})
    b.host.share("env", "s1")
    async with a.running():
        async with open_websocket(LOCAL, a.port, "/peer", use_ssl=False) as ws:  # type: ignore[arg-type]
            await ws.send_message(b"\xff\xfe not cbor")
            reply = cbor2.loads(await ws.get_message())
            assert (reply["t"], reply["reason"]) == ("close", "protocol-error")
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        with pytest.raises(ConnectionRejected):
            async with open_websocket(LOCAL, a.port, "/other", use_ssl=False):  # type: ignore[arg-type]
                pass
        async with b.running(static=[(LOCAL, a.port)]):  # type: ignore[list-item]
            await wait_for(lambda: b.host.values("env") == {"v": 1})
        assert a.host.values("env") == {"v": 1}


async def test_oversized_message_closes_with_too_large():
    small = PeerConfig(
        max_message=64 * 1024, backoff_initial=5.0, connect_timeout=2.0, close_grace=0.5
    )
    a, b = Node("alice", S1), Node("bob", S1, config=small)
    a.host.add_doc("env", ["s1"], {"v": 1})
    b.host.share("env", "s1")
    async with b.running(), a.running(static=[(LOCAL, b.port)]):  # type: ignore[list-item]
        await wait_for(lambda: b.host.values("env") == {"v": 1})
        a.host.edit("env", {"big": "x" * 100_000})
        await wait_for(lambda: (b.row(a.id) or {}).get("reason") == "too-large")
        await wait_for(lambda: (a.row(b.id) or {}).get("reason") == "too-large")
        assert b.host.values("env") == {"v": 1}


async def test_keepalive_holds_an_idle_link_and_silence_times_out():
    cfg = PeerConfig(
        ping_interval=0.05,
        idle_timeout=0.2,
        handshake_timeout=0.3,
        backoff_initial=0.05,
        close_grace=0.5,
    )
    a, b = Node("alice", S1, config=cfg), Node("bob", S1, config=cfg)
    async with b.running(), a.running(static=[(LOCAL, b.port)]):  # type: ignore[list-item]
        await wait_for(lambda: a.state(b) == "connected")
        assert b.manager is not None
        [link] = b.manager._rows[a.id].links
        start = link.messages_received

        def kept_alive() -> bool:
            """Pings for five idle timeouts (one each 0.05 s) came over this one link, and
            the idle timeout never closed it (no fixed sleep: it waits for the pings)."""
            assert link.closed is None, link.closed
            return link.messages_received >= start + 20

        await wait_for(kept_alive)
        assert a.state(b) == "connected" and b.events.of("peer-disconnected") == []

        # a client that opens the websocket and says nothing is dropped after the handshake timeout
        with trio.fail_after(3):
            async with open_websocket(LOCAL, b.port, "/peer", use_ssl=False) as ws:  # type: ignore[arg-type]
                reply = cbor2.loads(await ws.get_message())
                assert reply["reason"] == "timeout"
                with pytest.raises(ConnectionClosed):
                    await ws.get_message()


async def test_dialing_ourselves_is_dropped():
    a = Node("alice", S1)
    async with a.running() as manager:
        manager.add_address(LOCAL, a.port)  # type: ignore[arg-type]
        await wait_for(lambda: not manager._targets)
        assert manager.peers() == []
        assert a.events.items == []


async def test_dial_only_manager_and_removed_address():
    a, b = Node("alice", S1), Node("bob", S1)
    b.host.add_doc("env", ["s1"], {"v": 1})
    a.host.share("env", "s1")
    async with b.running(), a.running(listen=False) as manager:
        assert manager.port is None
        port = free_port()
        manager.add_address(LOCAL, port)
        await wait_for(lambda: a.row(address=f"{LOCAL}:{port}") is not None)
        manager.remove_address(LOCAL, port)
        assert a.row(address=f"{LOCAL}:{port}") is None and len(manager._targets) == 0
        manager.add_address(LOCAL, b.port, device_id=b.id, source="mdns")  # type: ignore[arg-type]
        await wait_for(lambda: a.host.values("env") == {"v": 1})
        assert a.row(b.id)["state"] == "connected"  # type: ignore[index]
        manager.remove_address(LOCAL, b.port)  # type: ignore[arg-type]
        b.host.edit("env", {"v": 2})  # a marker sent after the removal arrives: the link is up
        await wait_for(lambda: a.host.values("env") == {"v": 2})
        assert a.row(b.id)["state"] == "connected"  # type: ignore[index]  # the link stays up
        assert [e for e in a.events.of("peer-disconnected") if e["device"] == b.id] == []


class _QuietConn:
    """Just what `Link._pump` reads of a `PeerConnection`."""

    def __init__(self) -> None:
        self.timer: float | None = 100.0
        self.wants_write = False

    def next_event(self) -> None:
        return None

    def get_timer(self) -> float | None:
        return self.timer


async def test_a_message_wakes_the_writer_and_the_ticker_only_when_they_have_work():
    """Each woken task runs before what the message itself woke (our send, a subscriber's
    write), so a received update wakes neither a writer with nothing to send nor a ticker whose
    deadline only moved later."""
    from peerdaemon.peer.link import Link

    link = Link(lambda now: None, dialer=True, address="x", on_event=lambda *a: None, config=FAST)
    conn = _QuietConn()
    link.conn = conn  # type: ignore[assignment]
    link._tick_at = 50.0  # the ticker sleeps until 50
    link._pump()  # the deadline moved later (a message was received): nothing to do
    assert not link._wakeup.is_set() and not link._tick.is_set()
    conn.wants_write = True
    link._pump()
    assert link._wakeup.is_set() and not link._tick.is_set()
    conn.timer = 10.0  # earlier than the ticker's: it must wake
    link._pump()
    assert link._tick.is_set()
    link._tick = trio.Event()
    conn.timer = None  # closed
    link._pump()
    assert link._tick.is_set()
