"""Large frames go out without being copied (issue 13, the 15 MB first sync): `ws_frame` keeps a
large payload apart from its header, the outbox hands both pieces to the writer as they are, and
the transport writes several buffers with one `writev`, keeping what the socket did not take
(however it was cut) for the writer task. Small frames stay one `bytes` each."""

from __future__ import annotations

import socket

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from peerdaemon.hub.transport import WebSocketTransport, _unsent
from peerdaemon.hub.wsconn import SPLIT_FRAME, WsConn, ws_frame
from peerdaemon.hub.ywebsocket import Outbox, YConn, frame_size


def parse_frames(data: bytes) -> list[bytes]:
    """The payloads of the server frames in `data`, read as a client does (wsproto)."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    out, parts = [], []
    for event in client.events():
        assert isinstance(event, BytesMessage)
        parts.append(bytes(event.data))
        if event.message_finished:
            out.append(b"".join(parts))
            parts = []
    assert not parts
    return out


def test_a_large_frame_keeps_its_payload_apart():
    small = ws_frame(b"\x00\x02", b"x" * 100)
    assert isinstance(small, bytes) and parse_frames(small) == [b"\x00\x02" + b"x" * 100]
    payload = b"y" * SPLIT_FRAME
    big = ws_frame(b"\x00\x01", payload)
    assert isinstance(big, tuple) and big[-1] is payload  # not copied
    assert frame_size(big) == len(b"".join(big))
    assert parse_frames(b"".join(big)) == [b"\x00\x01" + payload]


def test_the_outbox_counts_and_hands_out_the_pieces():
    outbox = Outbox(ws_frame)
    payload = b"z" * (SPLIT_FRAME * 2)
    big = ws_frame(payload)
    assert outbox.push(b"a") and outbox.push(big) and outbox.push(b"b")
    assert outbox.nbytes == 2 + frame_size(big)
    frames = outbox.take()
    assert frames == [b"a", *big, b"b"] and frames[2] is payload
    assert outbox.nbytes == 0 and len(outbox) == 0
    rest = _unsent(frames, 1 + len(big[0]) + 1)  # "a", the header, a byte of the payload
    outbox.put_back(rest)
    outbox.push(b"c")
    assert outbox.nbytes == len(payload) - 1 + 2
    outbox.clear()  # what the writer started stays
    assert outbox.nbytes == len(payload) - 1 + 1
    assert b"".join(outbox.take()) == payload[1:] + b"b"


def test_unsent_cuts_anywhere_without_copying():
    frames: list[bytes | memoryview] = [b"ab", b"cde", b"f"]
    whole = b"abcdef"
    for sent in range(len(whole) + 1):
        rest = _unsent(frames, sent)
        assert b"".join(bytes(r) for r in rest) == whole[sent:]
    assert _unsent(frames, 0) == frames and _unsent(frames, 2)[0] is frames[1]
    assert _unsent(frames, 6) == []


async def test_wake_writes_the_pieces_and_the_writer_the_rest():
    """A socket that takes a little at a time: the first `writev` leaves most of it, the writer
    task sends the rest in order, and the peer reads exactly the frames queued."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * (SPLIT_FRAME // 64)  # 256 KiB
    messages = [b"first", b"\x00\x01" + payload, b"last"]
    async with trio.open_nursery() as nursery:
        conn = YConn(1, Outbox(ws_frame), ready=[])
        core = WsConn(conn, now=trio.current_time())
        transport = WebSocketTransport(
            trio.SocketStream(a), core, spawn=nursery.start_soon, timers=None
        )
        conn.send(ws_frame(messages[0]))
        conn.send(ws_frame(b"\x00\x01", payload))
        conn.send(ws_frame(messages[2]))
        transport.wake()
        assert conn.outbox.nbytes > 0  # the socket did not take it all: a writer goes on
        expected = sum(len(b"".join(f)) for f in map(_pieces, messages))
        received = b""
        with trio.fail_after(10):
            while len(received) < expected:
                received += await b.recv(1 << 16)
        await transport.drained.wait()
        nursery.cancel_scope.cancel()
    a.close()
    b.close()
    assert parse_frames(received) == messages


def _pieces(message: bytes) -> tuple[bytes, ...]:
    frame = ws_frame(message)
    return (frame,) if isinstance(frame, bytes) else frame
