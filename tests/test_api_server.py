"""The trio socket server against a fake Handler, spoken to with raw frames.

FakeHandler (tests/helpers.py) is also used by test_client.py and test_cli_parse.py.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import struct
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from helpers import FakeHandler

from peerdaemon.api import server as server_mod
from peerdaemon.api.framing import FrameDecoder, FrameError, encode_frame
from peerdaemon.api.protocol import OpError, Pending, arg, parse_request, request_id_of
from peerdaemon.api.server import (
    DaemonAlreadyRunning,
    ServerStartError,
    check_peer_uid,
    peer_credentials,
    prepare_socket_dir,
    serve_unix,
)
from peerdaemon.store import Ticket


class RawConn:
    """A client speaking raw frames, to test what real clients would never send."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(1 << 30)

    @classmethod
    async def open(cls, path: Path) -> RawConn:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, msg: Any) -> None:
        await self.stream.send_all(encode_frame(msg))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> Any:
        while True:
            event = self.decoder.next_event()
            if event is not None:
                assert not isinstance(event, FrameError), event
                return event
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError
            self.decoder.feed(data)

    async def call(self, msg: dict) -> dict:
        await self.send(msg)
        return await self.recv()

    async def expect_eof(self) -> None:
        with pytest.raises(EOFError):
            while True:
                await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
def sock_path(tmp_path_factory) -> Path:
    # tmp_path_factory keeps the path short (AF_UNIX paths are limited to ~107 bytes)
    return tmp_path_factory.mktemp("s") / "peerdaemon" / "pd.sock"


@pytest.fixture
def handler() -> FakeHandler:
    return FakeHandler()


@pytest.fixture
async def server(nursery, sock_path, handler):
    await nursery.start(partial(serve_unix, sock_path, handler, max_frame=1 << 16))
    return sock_path


@pytest.fixture
async def conn(server):
    c = await RawConn.open(server)
    yield c
    await c.aclose()


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# --- protocol helpers ---------------------------------------------------------------------------
def test_parse_request_valid_and_invalid():
    assert parse_request({"id": 1, "op": "x"}).args == {}
    assert parse_request({"id": "a", "op": "x", "args": None, "future": 1}).id == "a"
    for bad in (
        {"op": "x"},
        {"id": True, "op": "x"},
        {"id": 1.5, "op": "x"},
        {"id": 2**64, "op": "x"},
        {"id": 1},
        {"id": 1, "op": ""},
        {"id": 1, "op": 5},
        {"id": 1, "op": "x", "args": [1]},
    ):
        with pytest.raises(OpError) as info:
            parse_request(bad)
        assert info.value.code == "bad-request"
    assert request_id_of({"id": True}) is None
    assert request_id_of({"id": -(2**64)}) == -(2**64)


def test_arg_helper():
    args = {"s": "x", "n": 3, "b": True, "raw": bytearray(b"\x01"), "nil": None}
    assert arg(args, "s", str) == "x"
    assert arg(args, "n", float) == 3
    assert arg(args, "raw", bytes) == b"\x01"
    assert arg(args, "nil", str, default="d") == "d"
    assert arg(args, "missing", int, default=None) is None
    with pytest.raises(OpError, match="must be an integer"):
        arg(args, "b", int)
    with pytest.raises(OpError, match="env.get: missing argument 'id'"):
        arg(args, "id", str, op="env.get")


# --- socket setup -------------------------------------------------------------------------------
async def test_socket_file_and_directory_modes(server):
    st = os.lstat(server)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.parent).st_mode) == 0o700


async def test_existing_dedicated_dir_is_tightened(nursery, tmp_path_factory, handler):
    d = tmp_path_factory.mktemp("s") / "peerdaemon-x"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    await nursery.start(serve_unix, d / "pd.sock", handler)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_foreign_dedicated_dir_is_refused(tmp_path):
    d = tmp_path / "peerdaemon-y"
    d.mkdir()
    os.chown(d, 12345, 12345)  # tests run as root
    with pytest.raises(ServerStartError, match="owned by uid 12345"):
        prepare_socket_dir(d)


def test_shared_dir_is_left_alone(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    prepare_socket_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777


async def test_stale_socket_is_replaced(nursery, sock_path, handler):
    sock_path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    await nursery.start(serve_unix, sock_path, handler)
    c = await RawConn.open(sock_path)
    assert (await c.call({"id": 1, "op": "echo", "args": {"a": 1}}))["result"] == {"a": 1}
    await c.aclose()


async def test_second_server_on_same_path_fails(server, handler):
    with pytest.raises(DaemonAlreadyRunning, match="already listening"):
        await serve_unix(server, handler)
    # and the first one still works
    c = await RawConn.open(server)
    assert (await c.call({"id": 1, "op": "echo"}))["result"] == {}
    await c.aclose()


async def test_live_listener_without_lock_is_not_removed(sock_path, handler):
    sock_path.parent.mkdir(mode=0o700)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock_path))
    live.listen(1)
    try:
        with pytest.raises(DaemonAlreadyRunning):
            await serve_unix(sock_path, handler)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        live.close()


async def test_regular_file_is_not_replaced(sock_path, handler):
    sock_path.parent.mkdir(mode=0o700)
    sock_path.write_text("precious")
    with pytest.raises(ServerStartError, match="not a socket"):
        await serve_unix(sock_path, handler)
    assert sock_path.read_text() == "precious"


async def test_too_long_path_is_a_clear_error(tmp_path, handler):
    with pytest.raises(ServerStartError, match="too long"):
        await serve_unix(tmp_path / ("x" * 200) / "pd.sock", handler)


async def test_socket_removed_on_exit(sock_path, handler):
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, sock_path, handler)
        assert sock_path.exists()
        nursery.cancel_scope.cancel()
    assert not sock_path.exists()


# --- peer credentials ---------------------------------------------------------------------------
def test_peer_credentials_of_a_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pid, uid, gid = peer_credentials(a)
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_uid_check(monkeypatch):
    assert check_peer_uid(os.getuid())
    assert check_peer_uid(None)  # platform without SO_PEERCRED: file modes decide
    monkeypatch.setattr(server_mod.os, "getuid", lambda: 4242)
    assert not check_peer_uid(0)
    assert check_peer_uid(4242)


async def test_other_uid_is_refused_with_forbidden(server, handler, monkeypatch):
    monkeypatch.setattr(server_mod.os, "getuid", lambda: 4242)
    c = await RawConn.open(server)
    msg = await c.recv()
    assert msg["id"] is None and msg["error"]["code"] == "forbidden"
    await c.expect_eof()
    await c.aclose()
    assert handler.applied == []


# --- requests and errors ------------------------------------------------------------------------
async def test_echo_with_bytes_and_string_id(conn):
    resp = await conn.call({"id": "req-1", "op": "echo", "args": {"u": b"\x00\xff", "n": None}})
    assert resp == {"id": "req-1", "result": {"u": b"\x00\xff", "n": None}}
    assert await conn.call({"id": 2, "op": "bytes"}) == {"id": 2, "result": b"\x00\x01\x02"}


async def test_error_responses(conn):
    assert (await conn.call({"id": 1, "op": "fail"}))["error"] == {
        "code": "not-found",
        "message": "no such thing",
    }
    assert (await conn.call({"id": 2, "op": "nope"}))["error"]["code"] == "unknown-op"
    resp = await conn.call({"id": 3})
    assert resp["id"] == 3 and resp["error"]["code"] == "bad-request"
    resp = await conn.call({"op": "echo"})
    assert resp["id"] is None and resp["error"]["code"] == "bad-request"
    resp = await conn.call({"id": False, "op": "echo"})
    assert resp["id"] is None and resp["error"]["code"] == "bad-request"
    resp = await conn.call({"id": 4, "op": "echo", "args": "x"})
    assert resp["id"] == 4 and resp["error"]["code"] == "bad-request"
    assert (await conn.call({"id": 5, "op": "echo"}))["result"] == {}


async def test_bad_frames_keep_the_connection_usable(conn, handler):
    for payload in (b"\xff", cbor2.dumps([1, "op"]), cbor2.dumps({"id": 1}) + b"\x00", b""):
        await conn.send_raw(frame_of(payload))
        resp = await conn.recv()
        assert resp["id"] is None and resp["error"]["code"] == "bad-frame"
    assert (await conn.call({"id": 9, "op": "echo", "args": {"ok": True}}))["result"] == {
        "ok": True
    }
    assert handler.applied == [("echo", {"ok": True})]


async def test_oversized_frame_is_skipped_while_streaming(conn):
    size = 1 << 20  # server max_frame is 64 KiB
    async with trio.open_nursery() as nursery:

        async def send_big() -> None:
            await conn.send_raw(struct.pack(">I", size))
            chunk = b"\x00" * 65536
            for _ in range(size // len(chunk)):
                await conn.send_raw(chunk)
            await conn.send({"id": 1, "op": "echo", "args": {"after": True}})

        nursery.start_soon(send_big)
        resp = await conn.recv()
        assert resp["id"] is None and resp["error"]["code"] == "frame-too-large"
        assert (await conn.recv()) == {"id": 1, "result": {"after": True}}


async def test_handler_exception_is_internal_and_server_survives(server, conn):
    resp = await conn.call({"id": 1, "op": "boom"})
    assert resp["error"]["code"] == "internal" and "kaboom" in resp["error"]["message"]
    assert (await conn.call({"id": 2, "op": "echo"}))["result"] == {}
    other = await RawConn.open(server)
    assert (await other.call({"id": 1, "op": "echo"}))["result"] == {}
    await other.aclose()


async def test_unencodable_result_is_internal(conn):
    resp = await conn.call({"id": 1, "op": "unencodable"})
    assert resp["error"]["code"] == "internal"
    assert (await conn.call({"id": 2, "op": "echo"}))["result"] == {}


async def test_response_larger_than_max_frame(conn):
    resp = await conn.call({"id": 1, "op": "big", "args": {"n": 1 << 17}})
    assert resp["id"] == 1 and resp["error"]["code"] == "frame-too-large"
    assert (await conn.call({"id": 2, "op": "big", "args": {"n": 10}}))["result"] == b"x" * 10


# --- ordering and durability --------------------------------------------------------------------
async def test_pipelined_requests_apply_in_order_and_ack_when_durable(conn, handler):
    await conn.send_raw(
        encode_frame({"id": 1, "op": "durable", "args": {"gate": "a", "n": 1}})
        + encode_frame({"id": 2, "op": "durable", "args": {"gate": "b", "n": 2}})
        + encode_frame({"id": 3, "op": "echo", "args": {"n": 3}})
    )
    # Applied in order at once, without waiting for durability...
    assert await conn.recv() == {"id": 3, "result": {"n": 3}}
    assert [a["n"] for _, a in handler.applied] == [1, 2, 3]
    # ...but acknowledged only once durable (here: in the order the gates open).
    handler.gate("b").set()
    assert await conn.recv() == {"id": 2, "result": {"n": 2}}
    handler.gate("a").set()
    assert await conn.recv() == {"id": 1, "result": {"n": 1}}


async def test_pending_failure_becomes_error(conn, handler):
    await conn.send({"id": 1, "op": "durable-fail", "args": {"gate": "g"}})
    await trio.testing.wait_all_tasks_blocked()
    handler.gate("g").set()
    resp = await conn.recv()
    assert resp == {"id": 1, "error": {"code": "bad-update", "message": "could not persist"}}


async def test_inflight_limit_applies_back_pressure(nursery, sock_path, handler):
    await nursery.start(partial(serve_unix, sock_path, handler, max_inflight=2))
    c = await RawConn.open(sock_path)
    for n in range(4):
        await c.send({"id": n, "op": "durable", "args": {"gate": f"g{n}", "n": n}})
    await trio.testing.wait_all_tasks_blocked()
    assert len(handler.applied) == 2  # reader stopped: two acknowledgements outstanding
    handler.gate("g0").set()
    assert (await c.recv())["id"] == 0
    await trio.testing.wait_all_tasks_blocked()
    assert len(handler.applied) == 3
    for n in (1, 2, 3):
        handler.gate(f"g{n}").set()
    assert sorted([(await c.recv())["id"] for _ in range(3)]) == [1, 2, 3]
    await c.aclose()


async def test_half_closed_client_still_gets_pending_acks(conn, handler):
    await conn.send({"id": 1, "op": "durable", "args": {"gate": "g", "n": 1}})
    await conn.stream.send_eof()
    await trio.testing.wait_all_tasks_blocked()
    handler.gate("g").set()
    assert await conn.recv() == {"id": 1, "result": {"n": 1}}
    await conn.expect_eof()


async def test_client_disconnect_mid_request(server, handler):
    c = await RawConn.open(server)
    await c.send({"id": 1, "op": "block", "args": {"gate": "g"}})
    await handler.blocked.wait()
    await c.aclose()
    await trio.testing.wait_all_tasks_blocked()
    handler.gate("g").set()  # the handler finishes its operation; nobody to answer
    await handler.block_returned.wait()
    await handler.session_closed.wait()
    # a pending acknowledgement whose client went away: the session ends once it is settled
    # (a closed and a half-closed socket look the same to the reader)
    c = await RawConn.open(server)
    await c.send({"id": 1, "op": "durable", "args": {"gate": "later", "n": 1}})
    await trio.testing.wait_all_tasks_blocked()
    await c.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert len(handler.sessions_closed) == 1
    handler.gate("later").set()
    await trio.testing.wait_all_tasks_blocked()
    assert len(handler.sessions_closed) == 2
    c = await RawConn.open(server)
    assert (await c.call({"id": 1, "op": "echo"}))["result"] == {}
    await c.aclose()


async def test_reset_connection_does_not_crash_server(server, handler):
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(server))
    raw.sendall(encode_frame({"id": 1, "op": "big", "args": {"n": 60000}}) * 10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    await handler.session_closed.wait()
    c = await RawConn.open(server)
    assert (await c.call({"id": 1, "op": "echo"}))["result"] == {}
    await c.aclose()


# --- subscriptions ------------------------------------------------------------------------------
async def test_subscription_events_follow_the_response(conn, handler):
    early = [{"n": 1}, {"n": 2}]
    resp = await conn.call({"id": 1, "op": "subscribe", "args": {"early": early}})
    sub = resp["result"]["sub"]
    assert await conn.recv() == {"sub": sub, "event": {"n": 1}}
    assert await conn.recv() == {"sub": sub, "event": {"n": 2}}
    session = handler.sessions[0]
    session.push(sub, {"n": 3, "update": b"\x01\x02"})
    assert await conn.recv() == {"sub": sub, "event": {"n": 3, "update": b"\x01\x02"}}
    assert (await conn.call({"id": 2, "op": "unsubscribe", "args": {"sub": sub}}))["result"] is True
    assert handler.closed_subs == [sub]
    session.push(sub, {"n": 4})  # dropped: closed
    assert await conn.call({"id": 3, "op": "echo"}) == {"id": 3, "result": {}}
    assert (await conn.call({"id": 4, "op": "unsubscribe", "args": {"sub": sub}}))[
        "result"
    ] is False


async def test_failed_subscribe_closes_the_subscription(conn, handler):
    resp = await conn.call({"id": 1, "op": "subscribe-fail", "args": {"early": [{"n": 1}]}})
    assert resp["error"]["code"] == "not-found"
    assert handler.closed_subs == [1]
    assert await conn.call({"id": 2, "op": "echo"}) == {"id": 2, "result": {}}


async def test_subscriptions_closed_when_client_leaves(server, handler):
    c = await RawConn.open(server)
    s1 = (await c.call({"id": 1, "op": "subscribe"}))["result"]["sub"]
    s2 = (await c.call({"id": 2, "op": "subscribe"}))["result"]["sub"]
    session = handler.sessions[0]
    await c.aclose()
    await handler.session_closed.wait()
    assert sorted(handler.closed_subs) == [s1, s2]
    assert session.closed
    session.push(s1, {"late": True})  # no error, just dropped
    called = []
    session.on_close(lambda: called.append(1))  # after the end: runs at once
    assert called == [1]


async def test_slow_consumer_is_disconnected_not_waited_for(nursery, sock_path, handler, caplog):
    await nursery.start(partial(serve_unix, sock_path, handler, max_backlog_frames=8))
    c = await RawConn.open(sock_path)
    sub = (await c.call({"id": 1, "op": "subscribe"}))["result"]["sub"]
    session = handler.sessions[0]
    blob = b"\x00" * 65536
    pushed = 0
    while not session.closed:
        assert pushed < 10_000, "a client that never reads must be disconnected"
        session.push(sub, {"blob": blob})  # never blocks
        pushed += 1
        await trio.testing.wait_all_tasks_blocked()
    await handler.session_closed.wait()
    assert handler.closed_subs == [sub]
    assert "client is not reading" in caplog.text
    # everything the server managed to send arrives, then EOF
    await c.expect_eof()
    await c.aclose()
    other = await RawConn.open(sock_path)
    assert (await other.call({"id": 1, "op": "echo"}))["result"] == {}
    await other.aclose()


async def test_events_of_a_pending_subscribe_wait_for_its_ack(nursery, sock_path):
    gates = {"ok": trio.Event(), "fail": trio.Event()}
    closed: list[int] = []

    class DurableSubscribe:
        async def handle(self, op, args, session):
            box: list[int] = []
            sub = session.open_subscription(on_close=lambda: closed.append(box[0]))
            box.append(sub)
            session.push(sub, {"n": sub})

            async def wait() -> None:
                await gates[op].wait()
                if op == "fail":
                    raise OpError("bad-update", "no")

            return Pending(wait, {"sub": sub})

    await nursery.start(serve_unix, sock_path, DurableSubscribe())
    c = await RawConn.open(sock_path)
    try:
        await c.send({"id": 1, "op": "ok"})
        await c.send({"id": 2, "op": "fail"})
        await trio.testing.wait_all_tasks_blocked()
        gates["fail"].set()
        assert (await c.recv())["error"]["code"] == "bad-update"
        assert closed == [2]  # the failed request's subscription is closed, its event dropped
        gates["ok"].set()
        assert await c.recv() == {"id": 1, "result": {"sub": 1}}
        assert await c.recv() == {"sub": 1, "event": {"n": 1}}  # held until after the ack
    finally:
        await c.aclose()


# --- answers from store tickets and straight into the socket ------------------------------------
async def test_store_tickets_are_answered_without_a_task_per_write(conn, handler, monkeypatch):
    """A Pending that waits for one store ticket is answered from the ticket's completion (no
    task waiting per write); a failed ticket is `store-failed` with what `wait()` would raise."""
    tickets: dict[int, Ticket] = {}

    def ticketed(args: dict) -> Pending:
        ticket = tickets[args["n"]] = Ticket()
        return Pending(ticket.wait, {"n": args["n"]})

    handler.responses["ticketed"] = ticketed
    waited: list[Any] = []
    finish = server_mod._Connection._finish_pending

    async def counted(self: Any, *args: Any) -> None:
        waited.append(args[0])
        await finish(self, *args)

    monkeypatch.setattr(server_mod._Connection, "_finish_pending", counted)
    await conn.send_raw(
        b"".join(encode_frame({"id": n, "op": "ticketed", "args": {"n": n}}) for n in (1, 2, 3))
        + encode_frame({"id": 4, "op": "echo", "args": {"n": 4}})
    )
    assert await conn.recv() == {"id": 4, "result": {"n": 4}}
    tickets[2]._complete()
    assert await conn.recv() == {"id": 2, "result": {"n": 2}}
    tickets[1].retry = Ticket()
    tickets[1]._complete(sqlite3.OperationalError("database or disk is full"))
    failed = await conn.recv()
    assert failed["id"] == 1 and failed["error"]["code"] == "store-failed"
    assert "kept in memory" in failed["error"]["message"]
    tickets[3]._complete()
    assert await conn.recv() == {"id": 3, "result": {"n": 3}}
    assert waited == []  # no task was started for them
    await conn.send({"id": 5, "op": "durable", "args": {"gate": "g", "n": 5}})  # any other wait
    await trio.testing.wait_all_tasks_blocked()
    handler.gate("g").set()
    assert await conn.recv() == {"id": 5, "result": {"n": 5}}
    assert waited == [5]


async def test_frames_written_directly_keep_their_order(nursery, sock_path, handler):
    """Answers go straight into the socket while nothing is ahead of them; once the socket is
    full, the rest (and everything after it) goes through the writer task: a client that reads
    only at the end gets every frame whole and in order."""
    await nursery.start(partial(serve_unix, sock_path, handler, max_frame=1 << 20))
    c = await RawConn.open(sock_path)
    try:
        sizes = [300_000, 10, 500_000, 7, 200_000, 1]
        await c.send_raw(
            b"".join(
                encode_frame({"id": i, "op": "big", "args": {"n": n}}) for i, n in enumerate(sizes)
            )
        )
        await trio.testing.wait_all_tasks_blocked()  # all answered, most still unsent
        for i, n in enumerate(sizes):
            assert await c.recv() == {"id": i, "result": b"x" * n}
        assert await c.call({"id": 9, "op": "echo", "args": {}}) == {"id": 9, "result": {}}
    finally:
        await c.aclose()


async def test_a_frame_never_overtakes_one_still_queued(nursery):
    """The direct write's rule, step by step on a socket pair: a frame goes into the socket at
    once only while nothing is queued ahead of it; the rest of a partly written frame, and every
    frame after it, waits for the writer task, which sends them in order."""
    ours, theirs = trio.socket.socketpair()
    conn = server_mod._Connection(
        trio.SocketStream(ours),
        FakeHandler(),
        number=1,
        peer_uid=None,
        peer_pid=None,
        max_frame=1 << 24,
        max_inflight=10,
        max_backlog_frames=100,
        max_backlog_bytes=1 << 26,
    )
    first, second, third = b"a" * 4_000_000, b"b" * 10, b"c" * 5
    conn.enqueue(first)  # more than the socket holds: the rest is queued
    assert conn.backlog_frames == 1 and 0 < conn.backlog_bytes < len(first)
    received = bytearray()
    with trio.move_on_after(0.05):  # room in the socket again...
        while True:
            received += await theirs.recv(1 << 20)
    conn.enqueue(second)  # ...but the rest of `first` is ahead of it
    assert conn.backlog_frames == 2
    nursery.start_soon(conn._writer)
    conn.enqueue(third)
    while len(received) < len(first) + len(second) + len(third):
        received += await theirs.recv(1 << 20)
    assert bytes(received) == first + second + third
    await trio.testing.wait_all_tasks_blocked()
    assert conn.backlog_frames == 0 and conn.backlog_bytes == 0
    conn.enqueue(b"d" * 3)  # nothing ahead: written at once, the writer task idle
    assert conn.backlog_frames == 0
    assert await theirs.recv(10) == b"ddd"
    conn.send_ch.close()
    theirs.close()
