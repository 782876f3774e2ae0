"""The peer links' websocket (core/websocket.py, core/wsstream.py): the sans-I/O core fed
bytes, then the trio shell on 127.0.0.1 against trio-websocket (what peers spoke before, and
what the tests' raw peers speak): messages, limits, pings, the closing handshake, and that a
message goes out from the sender's own task and comes in in the reader's."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
import trio_websocket
from helpers import LOCAL
from helpers import until as wait_for
from peerutil import FAST, Node, make_space

from peerdaemon.core.websocket import (
    ClientHandshake,
    CloseReason,
    ConnectionClosed,
    HandshakeFailed,
    Rejected,
    ServerHandshake,
    WebSocketCore,
)
from peerdaemon.core.wsstream import WebSocket, connect, read_upgrade

S1 = make_space("s1")


def pair(max_message: int = 1 << 20) -> tuple[WebSocketCore, WebSocketCore]:
    """A client and a server core after the opening handshake, fed each other's bytes."""
    client = ClientHandshake("example:1", "/peer", max_message=max_message)
    server = ServerHandshake()
    request = server.receive_data(client.request())
    assert request is not None and request.path == "/peer"
    assert request.headers["upgrade"].lower() == "websocket"
    answer, server_core = server.accept(max_message=max_message)
    client_core = client.receive_data(answer)
    assert client_core is not None
    return client_core, server_core


def carry(src: WebSocketCore, dst: WebSocketCore, step: int = 0) -> None:
    """What `src` has to send, into `dst` (`step` bytes at a time if given)."""
    data = bytes(src.data_to_send())
    for i in range(0, len(data), step or len(data) or 1):
        dst.receive_data(data[i : i + (step or len(data))])


def messages(core: WebSocketCore) -> list[bytes | str]:
    out = []
    while (message := core.next_message()) is not None:
        out.append(message)
    return out


# -- the core, fed bytes ------------------------------------------------------------------------
def test_messages_both_ways_whole_or_a_byte_at_a_time():
    client, server = pair()
    client.send_message(b"\x00binary")
    client.send_message("text")
    big = os.urandom(70_000)  # a 64-bit length
    client.send_message(big)
    carry(client, server, step=1)
    assert messages(server) == [b"\x00binary", "text", big]
    server.send_message(b"back")
    carry(server, client)
    assert messages(client) == [b"back"]
    assert client.closed is None and server.closed is None


def test_frames_that_come_with_the_upgrade_answer_are_not_lost():
    handshake = ClientHandshake("example:1", "/peer", max_message=1024)
    server = ServerHandshake()
    server.receive_data(handshake.request())
    answer, server_core = server.accept(max_message=1024)
    server_core.send_message(b"first")
    client = handshake.receive_data(answer + bytes(server_core.data_to_send()))
    assert client is not None and messages(client) == [b"first"]


def test_a_message_over_the_limit_closes_with_1009():
    client, server = pair(max_message=1000)
    client.send_message(b"x" * 1001)
    carry(client, server)
    assert messages(server) == []
    assert server.input_ended and server.closed is not None and server.closed.code == 1009
    carry(server, client)  # the close frame
    assert messages(client) == []
    assert client.closed is not None and client.closed.code == 1009
    with pytest.raises(ConnectionClosed):
        client.send_message(b"more")


def test_pings_are_answered_in_order():
    client, server = pair()
    client.ping(b"p1")
    client.send_message(b"after")
    carry(client, server)
    assert messages(server) == [b"after"]
    data = bytes(server.data_to_send())
    assert data[:1] == b"\x8a" and data.endswith(b"p1")  # an unmasked pong, the same payload


def test_the_closing_handshake_carries_code_and_reason():
    client, server = pair()
    server.send_message(b"last")
    server.close(1000, "too-slow")
    carry(server, client)
    assert messages(client) == [b"last"]  # what came before the close is still read
    assert client.closed == CloseReason(1000, "too-slow") and client.input_ended
    carry(client, server)  # the answer
    messages(server)
    assert server.input_ended and server.finished and client.finished


def test_an_unmasked_frame_from_a_client_is_a_protocol_error():
    _, server = pair()
    server.receive_data(b"\x82\x02hi")  # a client must mask its frames
    assert messages(server) == []
    assert server.closed is not None and server.closed.code == 1002
    assert bytes(server.data_to_send())[:1] == b"\x88"  # our close frame


def test_a_masked_frame_from_the_server_is_a_protocol_error():
    client, _ = pair()
    client.receive_data(b"\x82\x82abcd\x09\x08")  # a server must not mask its frames
    assert messages(client) == []
    assert client.closed is not None and client.closed.code == 1002
    out = bytes(client.data_to_send())
    assert out[0] == 0x88 and out[1] & 0x80  # our close frame, masked


def test_the_dialer_masks_what_it_sends_and_answers_pings_masked():
    client, server = pair()
    client.send_message(b"hello")
    out = bytes(client.data_to_send())
    assert out[:2] == b"\x82\x85" and out[6:] != b"hello"  # masked: key, then the payload
    server.receive_data(out)
    assert messages(server) == [b"hello"]
    server.ping(b"p")
    carry(server, client)
    assert messages(client) == []
    pong = bytes(client.data_to_send())
    assert pong[:2] == b"\x8a\x81"  # a masked pong ...
    server.receive_data(pong)
    assert messages(server) == [] and server.closed is None  # ... that the server reads


def test_a_close_without_a_code_is_answered_without_one():
    """As wsproto answered it (1005 is never sent)."""
    client, server = pair()
    client.receive_data(b"\x88\x00")
    assert messages(client) == [] and client.closed == CloseReason(1005)
    out = bytes(client.data_to_send())
    assert out[:2] == b"\x88\x80" and len(out) == 6  # masked, empty
    server.receive_data(out)
    assert messages(server) == [] and server.closed == CloseReason(1005)


def test_frames_right_behind_the_upgrade_request_are_not_lost():
    client = ClientHandshake("example:1", "/peer", max_message=1024)
    client_core = WebSocketCore(client=True, max_message=1024)
    client_core.send_message(b"early")
    server = ServerHandshake()
    assert server.receive_data(client.request() + bytes(client_core.data_to_send()))
    _, server_core = server.accept(max_message=1024)
    assert messages(server_core) == [b"early"]


def test_the_end_of_the_connection_reads_as_1006():
    client, server = pair()
    server.receive_data(b"")
    assert server.lost and server.closed == CloseReason(1006)
    with pytest.raises(ConnectionClosed):
        server.send_message(b"x")
    assert server.data_to_send() == b""


def test_a_refused_upgrade_names_the_status_and_body():
    client = ClientHandshake("example:1", "/peer", max_message=1024)
    server = ServerHandshake()
    server.receive_data(client.request())
    with pytest.raises(Rejected) as refused:
        client.receive_data(server.reject(503, b"busy\n"))
    assert (refused.value.status_code, refused.value.body) == (503, b"busy\n")
    with pytest.raises(HandshakeFailed):
        ServerHandshake().receive_data(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")  # no upgrade


# -- the trio shell -----------------------------------------------------------------------------
class Spawns:
    """A nursery's `start_soon` that counts the writer tasks the websocket starts."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.count = 0

    def __call__(self, fn: object) -> None:
        self.count += 1
        self.nursery.start_soon(fn)  # type: ignore[arg-type]


async def test_a_message_is_written_by_the_sender_and_read_by_the_reader():
    """No task in between: `send_nowait` hands the bytes to the socket before it returns, and
    no writer task starts while the socket takes everything."""
    async with trio.open_nursery() as nursery:
        server_ready: list[WebSocket] = []

        async def serve(stream: trio.SocketStream) -> None:
            upgrade = await read_upgrade(stream)
            ws = await upgrade.accept(nursery.start_soon, max_message=1 << 20)
            server_ready.append(ws)
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed:
                    return
                ws.send_nowait(message)  # an echo, from the reader's own task

        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        spawns = Spawns(nursery)
        ws = await connect(LOCAL, port, "/peer", spawns, max_message=1 << 20)
        for i in range(50):
            ws.send_nowait(b"m%d" % i)
            assert ws.pending == 0  # written already
        assert [await ws.get_message() for _ in range(50)] == [b"m%d" % i for i in range(50)]
        assert spawns.count == 0
        await ws.aclose(1000, "bye")
        assert ws.closed is not None and ws.closed.code == 1000
        nursery.cancel_scope.cancel()


async def test_a_full_socket_leaves_the_rest_to_a_writer_in_order():
    async with trio.open_nursery() as nursery:
        received: list[bytes | str] = []
        reading = trio.Event()

        async def serve(stream: trio.SocketStream) -> None:
            upgrade = await read_upgrade(stream)
            ws = await upgrade.accept(nursery.start_soon, max_message=64 << 20)
            await reading.wait()
            while True:
                try:
                    received.append(await ws.get_message())
                except ConnectionClosed:
                    return

        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        spawns = Spawns(nursery)
        ws = await connect(LOCAL, port, "/peer", spawns, max_message=64 << 20)
        blobs = [os.urandom(4 << 20) for _ in range(4)]  # more than the socket buffers hold
        for blob in blobs:
            ws.send_nowait(blob)
        assert ws.pending > 0 and spawns.count == 1
        with trio.move_on_after(0.2):
            while True:
                await ws.wait_progress()  # nobody reads: it stalls
        assert ws.pending > 0
        reading.set()
        while ws.pending:
            await ws.wait_progress()
        await wait_for(lambda: len(received) == 4)
        assert received == blobs
        await ws.aclose()
        nursery.cancel_scope.cancel()


async def test_against_trio_websocket_both_ways():
    """Byte-compatible with what the peers spoke before: our client on a trio-websocket
    server (messages, text, 1009 on a message over its limit), and a trio-websocket client
    on our listener (its close code and reason)."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler, LOCAL, 0, None, max_message_size=1000, task_status=task_status
            )
        )
        port = server.port
        ws = await connect(LOCAL, port, "/peer", nursery.start_soon, max_message=1 << 20)
        await ws.send_message(b"hello")
        await ws.send_message("text")
        assert [await ws.get_message(), await ws.get_message()] == [b"hello", "text"]
        await ws.send_message(b"x" * 1001)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1009
        await ws.aclose()

        async def ours(stream: trio.SocketStream) -> None:
            ws = await (await read_upgrade(stream)).accept(nursery.start_soon, max_message=1024)
            assert await ws.get_message() == b"ping"
            await ws.aclose(1000, "protocol-error")

        listeners = await nursery.start(trio.serve_tcp, ours, 0)
        port = listeners[0].socket.getsockname()[1]
        async with trio_websocket.open_websocket(LOCAL, port, "/peer", use_ssl=False) as client:
            await client.send_message(b"ping")
            with pytest.raises(trio_websocket.ConnectionClosed) as ended:
                await client.get_message()
            assert (ended.value.reason.code, ended.value.reason.reason) == (1000, "protocol-error")
        nursery.cancel_scope.cancel()


async def test_aclose_while_another_task_reads():
    async with trio.open_nursery() as nursery:

        async def serve(stream: trio.SocketStream) -> None:
            ws = await (await read_upgrade(stream)).accept(nursery.start_soon, max_message=1024)
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed:
                await ws.aclose()

        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        ws = await connect(LOCAL, port, "/peer", nursery.start_soon, max_message=1024)
        ended: list[CloseReason] = []

        async def read() -> None:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                ended.append(exc.reason)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):
            await ws.aclose(1000, "shutdown")  # the reader sees the answer, then aclose returns
        await wait_for(lambda: bool(ended))
        assert ended[0].code == 1000
        nursery.cancel_scope.cancel()


async def test_a_links_update_is_on_the_wire_before_the_change_returns():
    """`Link.local_update` over our websocket writes at once, from the caller (the registry's
    commit on a daemon): no writer task, no switch to one, before the peer has it."""
    a, b = Node("alice", S1, config=FAST), Node("bob", S1, config=FAST)
    a.host.add_doc("env", ["s1"], {"v": 0})
    b.host.share("env", "s1")
    async with b.running(), a.running(static=[(LOCAL, b.port)]):  # type: ignore[list-item]
        await wait_for(lambda: b.host.values("env") == {"v": 0})
        assert a.manager is not None
        [link] = a.manager._links()
        sent = link.messages_sent
        a.host.edit("env", {"v": 1})  # no checkpoint from here ...
        assert link.messages_sent == sent + 1
        assert link._ws is not None and link._ws.pending == 0  # ... and it is in the socket
        await wait_for(lambda: b.host.values("env") == {"v": 1})


def test_frames_of_the_upgrade_answer_come_first_whenever_they_are_taken():
    handshake = ClientHandshake("example:1", "/peer", max_message=1024)
    server = ServerHandshake()
    server.receive_data(handshake.request())
    answer, server_core = server.accept(max_message=1024)
    server_core.send_message(b"first")
    client = handshake.receive_data(answer + bytes(server_core.data_to_send()))
    assert client is not None
    server_core.send_message(b"second")
    carry(server_core, client)  # more bytes before the first message was taken
    assert messages(client) == [b"first", b"second"]


async def test_over_tls_writes_go_through_the_writer_and_close_cleanly(tmp_path):
    """A hub behind `wss://`: no socket to write to directly, so every write goes through the
    writer task, and reads through the TLS stream; messages, a large one, and the close."""
    import ssl

    from helpers import self_signed

    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    big = os.urandom(3 << 20)
    async with trio.open_nursery() as nursery:

        async def serve(stream: trio.SSLStream) -> None:
            upgrade = await read_upgrade(stream)
            ws = await upgrade.accept(nursery.start_soon, max_message=8 << 20)
            try:
                while True:
                    await ws.send_message(await ws.get_message())
            except ConnectionClosed:
                await ws.aclose()

        listeners = await nursery.start(trio.serve_ssl_over_tcp, serve, 0, server_context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        spawns = Spawns(nursery)
        ws = await connect(
            LOCAL, port, "/peer", spawns, max_message=8 << 20, ssl_context=client_context
        )
        ws.send_nowait(b"small")
        assert ws.pending > 0  # (no direct write under TLS)
        await ws.send_message(big)
        assert [await ws.get_message(), await ws.get_message()] == [b"small", big]
        assert spawns.count >= 1
        with trio.fail_after(5):
            await ws.aclose(1000, "bye")
        assert ws.closed is not None and ws.closed.code == 1000
        nursery.cancel_scope.cancel()
