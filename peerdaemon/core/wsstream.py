"""The trio shell of `websocket.py`: an open websocket over a trio stream (`WebSocket`), dialing
one (`connect`) and answering an upgrade (`read_upgrade`, then `Upgrade.accept` or `refuse`).

Why not trio-websocket: the latency of a LAN hop. There, a message sent waits for a lock and a
task switch inside `send_all`, and a message received is read by a task of its own and handed
over through a channel. Here a message is written from the task that sends it, with one
non-blocking `write()` when nothing is queued before it; only what the socket does not take
starts a writer task. A message is read in the task that asks for it (the peer link's own).
Under TLS (a hub behind `wss://`) writes go through the writer task and reads through the
stream, as there is no socket to write to directly.

`WebSocket` has the methods of trio-websocket's `WebSocketConnection` that `peer.Link` uses
(`get_message`, `send_message`, `aclose`, `closed`, `remote`), plus `send_nowait`, `pending`
and `wait_progress` for a sender that never waits on a peer (`Link`'s own queue bounds what it
hands over, so it takes more only once `pending` is 0).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .streams import socket_fd, stream_remote
from .websocket import (
    ABNORMAL,
    NORMAL,
    ClientHandshake,
    CloseReason,
    ConnectionClosed,
    ServerHandshake,
    UpgradeRequest,
    WebSocketCore,
)

__all__ = [
    "RECEIVE_SIZE",
    "Upgrade",
    "WebSocket",
    "connect",
    "read_upgrade",
]

RECEIVE_SIZE = 256 * 1024
Spawn = Callable[[Callable[[], Awaitable[Any]]], None]
"""Where the writer task starts when the socket does not take everything (`nursery.start_soon`)."""


class WebSocket:
    """An open websocket over `stream`: one task reads (`get_message`), any task sends."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        core: WebSocketCore,
        spawn: Spawn,
        *,
        path: str = "/",
        headers: dict[str, str] | None = None,
        close_timeout: float = 2.0,
    ) -> None:
        self.stream = stream
        self.core = core
        self._spawn = spawn
        self.path = path
        self.headers = headers or {}
        self.remote = stream_remote(stream)
        """`(host, port)` of the other end, or None."""
        self.close_timeout = close_timeout
        self._fd = socket_fd(stream)
        self._writing = False
        self._reading = False
        self._progress = trio.Event()
        self._reader_left: trio.Event | None = None
        self._stream_closed = False

    def __repr__(self) -> str:
        return f"<WebSocket {self.remote} {self.path} closed={self.closed}>"

    @property
    def closed(self) -> CloseReason | None:
        """Why the websocket closed (None while open)."""
        return self.core.closed

    @property
    def pending(self) -> int:
        """Bytes sent but not yet taken by the socket."""
        return self.core.pending

    # -- sending -----------------------------------------------------------------------------------
    def send_nowait(self, message: bytes | str) -> None:
        """Queue `message` and write it at once if the socket takes it (then `pending` is 0),
        else leave the rest to the writer task. Never waits; `ConnectionClosed` once closed."""
        self.core.send_message(message)
        self._write()

    async def send_message(self, message: bytes | str) -> None:
        """Send `message` and wait until the socket took it (trio-websocket's contract)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(message)
        if not self.core.pending:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while self.core.pending:
            await self.wait_progress()

    async def wait_progress(self) -> None:
        """Return once the socket took some of what is pending (at once if nothing is);
        `ConnectionClosed` if the connection is gone. Writes in this task if no writer task is
        under way (one that could not start, say in a cancelled nursery, leaves it to us)."""
        if self.core.pending and not self._stream_closed:
            if self._writing:
                await self._progress.wait()
            else:
                self._writing = True
                try:
                    await self._write_some()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self._lost()
                finally:
                    self._writing = False
        if self.core.lost or self._stream_closed:
            raise ConnectionClosed(self.core.closed or CloseReason(ABNORMAL))

    def _write(self) -> None:
        """Write what is queued with one non-blocking write; a writer task takes the rest."""
        if self._writing or self._stream_closed:
            return
        core = self.core
        if self._fd >= 0:
            data = core.data_to_send()
            if not data:
                return
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost()
                return
            if sent == len(data):
                self._progressed()
                return
            core.put_back(memoryview(data)[sent:])
        elif not core.pending:
            return
        self._writing = True
        self._spawn(self._writer)

    async def _writer(self) -> None:
        try:
            while self.core.pending and not self._stream_closed:
                await self._write_some()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost()
        finally:
            self._writing = False
            self._progressed()

    async def _write_some(self) -> None:
        """Wait until the socket takes more, and write what it takes."""
        core = self.core
        if self._fd < 0:
            await self.stream.send_all(core.data_to_send())
        else:
            await trio.lowlevel.wait_writable(self._fd)
            if self._stream_closed:
                return
            data = core.data_to_send()
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                core.put_back(memoryview(data)[sent:])
        self._progressed()

    def _progressed(self) -> None:
        event, self._progress = self._progress, trio.Event()
        event.set()

    def _lost(self) -> None:
        self.core.connection_lost()
        self._progressed()

    # -- receiving ---------------------------------------------------------------------------------
    async def get_message(self) -> bytes | str:
        """The next message, read in this task; `ConnectionClosed` once the connection is
        closed and every message before the close was taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._reading:
            raise trio.BusyResourceError("another task is reading this websocket")
        core = self.core
        yielded = False
        self._reading = True
        try:
            while True:
                message = core.next_message()
                if core.pending:
                    self._write()  # a pong, a close frame
                if message is not None:
                    break
                if core.input_ended:
                    raise ConnectionClosed(core.closed or CloseReason(ABNORMAL))
                data, waited = await self._read()
                yielded = yielded or waited
                core.receive_data(data)
        finally:
            self._done_reading()
        if not yielded:  # let others run between messages that were already there
            await trio.lowlevel.cancel_shielded_checkpoint()
        return message

    def _done_reading(self) -> None:
        self._reading = False
        if self._reader_left is not None:  # an `aclose` waits for the reader's answer
            self._reader_left.set()
            self._reader_left = None

    async def _read(self) -> tuple[bytes, bool]:
        """The next bytes (b"": the connection ended), and whether this task waited for them."""
        if self._stream_closed:
            return b"", False
        fd = self._fd
        if fd < 0:
            try:
                return await self.stream.receive_some(RECEIVE_SIZE), True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b"", True
        waited = False
        while True:
            try:
                return os.read(fd, RECEIVE_SIZE), waited
            except BlockingIOError:
                pass
            except OSError:
                return b"", waited
            # (waiting outside the `except`: the exception would stay alive meanwhile)
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return b"", True
            waited = True
            if self._stream_closed:
                return b"", True

    # -- closing -----------------------------------------------------------------------------------
    async def aclose(self, code: int = NORMAL, reason: str | None = None) -> None:
        """Close: our close frame after what is queued, the peer's answer (read here, or by the
        task in `get_message`), then the stream; at most `close_timeout`. Idempotent."""
        if self._stream_closed:
            await trio.lowlevel.checkpoint()
            return
        core = self.core
        try:
            with trio.move_on_after(self.close_timeout):
                core.close(code, reason)
                self._write()
                await self._drain()
                while not core.input_ended:
                    if self._reading:  # the reader sees the answer
                        if self._reader_left is None:
                            self._reader_left = trio.Event()
                        await self._reader_left.wait()
                        continue
                    self._reading = True
                    try:
                        data, _ = await self._read()
                    finally:
                        self._done_reading()
                    core.receive_data(data)
                    while core.next_message() is not None:
                        pass  # after our close, messages are dropped
                    self._write()
                await self._drain()  # our answer to the peer's close
        finally:
            await self._close_stream()

    async def _drain(self) -> None:
        try:
            while self.core.pending:
                await self.wait_progress()
        except ConnectionClosed:
            pass

    async def _close_stream(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        self.core.connection_lost()
        self._progressed()
        try:
            await self.stream.aclose()  # (wakes a reader or writer waiting on the socket)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


# --------------------------------------------------------------------------------- dialing
async def connect(
    host: str,
    port: int,
    path: str,
    spawn: Spawn,
    *,
    max_message: int,
    ssl_context: Any = None,
    close_timeout: float = 2.0,
) -> WebSocket:
    """Open a websocket to `host:port` at `path` (over TLS with `ssl_context`). `OSError` or
    `trio.BrokenResourceError` if the connection fails, `Rejected` (an HTTP status instead of
    the upgrade) or `HandshakeFailed`. Bound it with a deadline: a silent server is waited for."""
    if ssl_context is None:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    else:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context, https_compatible=True
        )
    try:
        # the Host header as trio-websocket wrote it (the port unless a default one)
        handshake = ClientHandshake(
            host if port in (80, 443) else f"{host}:{port}", path, max_message=max_message
        )
        await stream.send_all(handshake.request())
        while True:
            core = handshake.receive_data(await stream.receive_some(RECEIVE_SIZE) or None)
            if core is not None:
                break
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return WebSocket(stream, core, spawn, path=path, close_timeout=close_timeout)


# --------------------------------------------------------------------------------- listening
class Upgrade:
    """A client's upgrade request read from `stream`: accept or refuse it."""

    def __init__(self, stream: trio.abc.Stream, handshake: ServerHandshake) -> None:
        assert handshake.request is not None
        self.stream = stream
        self.handshake = handshake
        self.request: UpgradeRequest = handshake.request

    @property
    def path(self) -> str:
        return self.request.path.split("?", 1)[0]

    async def accept(
        self, spawn: Spawn, *, max_message: int, close_timeout: float = 2.0
    ) -> WebSocket:
        data, core = self.handshake.accept(max_message=max_message)
        await self.stream.send_all(data)
        return WebSocket(
            self.stream,
            core,
            spawn,
            path=self.request.path,
            headers=self.request.headers,
            close_timeout=close_timeout,
        )

    async def refuse(self, status: int, body: bytes = b"") -> None:
        """Answer `status` (and `body`) instead of the upgrade, and hang up."""
        try:
            await self.stream.send_all(self.handshake.reject(status, body))
        finally:
            await trio.aclose_forcefully(self.stream)


async def read_upgrade(stream: trio.abc.Stream) -> Upgrade:
    """Read a client's upgrade request; `HandshakeFailed` if it is none (bound it with a
    deadline: a silent client is waited for)."""
    handshake = ServerHandshake()
    while True:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if handshake.receive_data(data or None) is not None:
            return Upgrade(stream, handshake)
