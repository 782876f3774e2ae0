"""Trio shell around the sans-I/O framing: the daemon's Unix-socket server.

Per connection: one reader applies requests strictly in order via `Handler.handle`; a `Pending`
result is acknowledged once durable (from its store ticket's completion, else from a background
task), so pipelined writes share the store's group commit; every outgoing frame goes through one
queue drained by one writer task, except that a frame with nothing ahead of it is written to the
(non-blocking) socket at once: a request's answer costs no hop to another task. Pushes never
block the daemon: a client that stops reading is disconnected instead.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

from ..store import Ticket
from ..store.errors import StoreError
from ..store.lock import LockFileUnusable, LockHeld, lock_file
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, FrameTooLarge, encode_frame
from .peercred import peer_credentials
from .protocol import (
    FORBIDDEN,
    FRAME_TOO_LARGE,
    INTERNAL,
    STORE_FAILED,
    OpError,
    Pending,
    error_message,
    parse_request,
    push_message,
    request_id_of,
    result_message,
)

__all__ = [
    "DEFAULT_MAX_BACKLOG_FRAMES",
    "DEFAULT_MAX_INFLIGHT",
    "DaemonAlreadyRunning",
    "Handler",
    "ServerStartError",
    "Session",
    "check_peer_uid",
    "peer_credentials",
    "prepare_socket_dir",
    "serve_unix",
]

log = logging.getLogger("peerdaemon.api")

DEFAULT_MAX_INFLIGHT = 1024
"""Pending (not yet durable) requests per connection before the reader stops reading."""
DEFAULT_MAX_BACKLOG_FRAMES = 4096
"""Unsent frames per connection beyond which a push disconnects the (stuck) client."""

# The reader stops taking new requests while this much is waiting to be written (back-pressure
# for clients that pipeline requests but read responses slowly).
_RESPONSE_HIGH_FRAMES = 64
_RESPONSE_HIGH_BYTES = 1 << 20
_READ_SIZE = 1 << 16
_WRITE_BATCH = 1 << 18
_SUN_PATH_MAX = 107 if os.uname().sysname == "Linux" else 103  # bytes, excluding the NUL


class ServerStartError(RuntimeError):
    """The socket could not be set up (bad path, unsafe directory, not a socket...)."""


class DaemonAlreadyRunning(ServerStartError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"another peerdaemon is already listening on {path}")
        self.path = path


class Handler(Protocol):
    """Implemented by the daemon (peerdaemon.operations.environments)."""

    async def handle(self, op: str, args: dict[Any, Any], session: Session) -> Any:
        """Apply one request; return the result, a `Pending`, or raise `OpError`."""
        ...


class _Sub:
    __slots__ = ("on_close", "held")

    def __init__(self, on_close: Callable[[], None] | None, held: list[bytes] | None) -> None:
        self.on_close = on_close
        # Frames pushed before the response that created the subscription was queued; None once
        # that response is out (pushes then go straight to the outgoing queue).
        self.held = held


class Session:
    """One client connection as seen by the Handler: identity, subscriptions, close hooks."""

    def __init__(
        self, conn: _Connection, number: int, peer_uid: int | None, peer_pid: int | None
    ) -> None:
        self._conn = conn
        self.number = number
        """Connection serial number, for logs."""
        self.peer_uid = peer_uid
        """The client's uid from SO_PEERCRED (None where the platform has no such option)."""
        self.peer_pid = peer_pid
        self.data: dict[str, Any] = {}
        """Free scratch space for the Handler (e.g. per-connection state)."""
        self._next_sub = 1
        self._subs: dict[int, _Sub] = {}
        self._opening: list[int] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._finalized = False

    def __repr__(self) -> str:
        return f"<Session #{self.number} uid={self.peer_uid} pid={self.peer_pid}>"

    @property
    def closed(self) -> bool:
        """True once the connection is going away; pushes are then dropped."""
        return self._conn.dead or self._finalized

    @property
    def subscriptions(self) -> frozenset[int]:
        return frozenset(self._subs)

    def open_subscription(self, on_close: Callable[[], None] | None = None) -> int:
        """Allocate a subscription id; `on_close` runs when it is closed or the connection ends.

        Pushes made while the current request is being handled are held back and sent right
        after its response, so a client always sees the subscribe result before the events.
        """
        if self._finalized:
            raise RuntimeError("session is closed")
        sub = self._next_sub
        self._next_sub += 1
        if self._opening is not None:
            self._opening.append(sub)
            self._subs[sub] = _Sub(on_close, [])
        else:
            self._subs[sub] = _Sub(on_close, None)
        return sub

    def push(self, sub: int, event: Any) -> None:
        """Queue `{"sub": sub, "event": event}` without blocking.

        Dropped silently if the subscription or the connection is closed. If the client is not
        reading and the outgoing backlog exceeds the limits, the connection is closed (with
        every subscription's `on_close`) rather than blocking or growing without bound.
        """
        s = self._subs.get(sub)
        if s is None or self.closed:
            return
        conn = self._conn
        try:
            frame = encode_frame(push_message(sub, event), max_frame=conn.max_frame)
        except FrameTooLarge as exc:
            conn.abort(f"event for subscription {sub} too large to send ({exc})")
            return
        except Exception as exc:
            log.error("%r: cannot encode event for subscription %d: %r", self, sub, exc)
            conn.abort(f"event for subscription {sub} could not be encoded")
            return
        if (
            conn.backlog_frames >= conn.max_backlog_frames
            or conn.backlog_bytes + len(frame) > conn.max_backlog_bytes
        ):
            conn.abort(
                f"client is not reading: {conn.backlog_frames} frames / "
                f"{conn.backlog_bytes} bytes unsent"
            )
            return
        if s.held is not None:
            conn.count(frame)
            s.held.append(frame)
        else:
            conn.enqueue(frame)

    def close_subscription(self, sub: int) -> bool:
        """Close a subscription (running its `on_close`); False if it was not open.

        Events pushed before this call are still delivered, none after; so once the client
        has the response to its `unsubscribe`, no more events for `sub` will arrive.
        """
        s = self._subs.pop(sub, None)
        if s is None:
            return False
        if s.held:
            self._conn.uncount(s.held)
        if s.on_close is not None:
            _run_callback(s.on_close, self)
        return True

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback()` (synchronously, once) when the connection has ended.

        Runs immediately if it already has. Exceptions are logged and ignored.
        """
        if self._finalized:
            _run_callback(callback, self)
        else:
            self._callbacks.append(callback)

    # --- used by the connection ------------------------------------------------------------
    def _begin_request(self) -> None:
        self._opening = []

    def _end_request(self) -> list[int]:
        opening, self._opening = self._opening or [], None
        return opening

    def _release(self, subs: list[int]) -> None:
        """The response for the request that opened `subs` is queued: send their held events."""
        for sub in subs:
            s = self._subs.get(sub)
            if s is None or s.held is None:
                continue
            held, s.held = s.held, None
            for frame in held:
                self._conn.enqueue(frame, counted=True)

    def _discard(self, subs: list[int]) -> None:
        """The request that opened `subs` failed: close them so the Handler's hooks run."""
        for sub in subs:
            self.close_subscription(sub)

    def _finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        for sub in list(self._subs):
            self.close_subscription(sub)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_callback(callback, self)


def _run_callback(callback: Callable[[], None], session: Session) -> None:
    try:
        callback()
    except Exception:
        log.exception("%r: close callback %r failed", session, callback)


class _Connection:
    def __init__(
        self,
        stream: trio.SocketStream,
        handler: Handler,
        *,
        number: int,
        peer_uid: int | None,
        peer_pid: int | None,
        max_frame: int,
        max_inflight: int,
        max_backlog_frames: int,
        max_backlog_bytes: int,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.max_frame = max_frame
        self.max_inflight = max_inflight
        self.max_backlog_frames = max_backlog_frames
        self.max_backlog_bytes = max_backlog_bytes
        self.decoder = FrameDecoder(max_frame)
        self.send_ch, self.recv_ch = trio.open_memory_channel[bytes](math.inf)
        self.backlog_frames = 0  # accepted but not yet written, including held pushes
        self.backlog_bytes = 0
        self.inflight = 0
        self.room = trio.lowlevel.ParkingLot()
        self.dead = False
        self.fd = stream.socket.fileno()  # written directly only while not `dead` (reused then)
        self.read_scope: trio.CancelScope | None = None
        self.bg_scope: trio.CancelScope | None = None
        self.bg_nursery: trio.Nursery | None = None
        self.session = Session(self, number, peer_uid, peer_pid)

    # --- outgoing queue ----------------------------------------------------------------------
    def count(self, frame: bytes) -> None:
        self.backlog_frames += 1
        self.backlog_bytes += len(frame)

    def uncount(self, frames: list[bytes]) -> None:
        self.backlog_frames -= len(frames)
        self.backlog_bytes -= sum(map(len, frames))
        self.room.unpark_all()

    def enqueue(self, frame: bytes, *, counted: bool = False) -> None:
        if not counted:
            self.count(frame)
        if self.backlog_frames == 1 and not self.dead:
            # Nothing ahead of it (a frame stays counted until written, also while the writer
            # task sends it): straight into the socket, which trio made non-blocking; what does
            # not fit goes to the writer task.
            try:
                sent = os.write(self.fd, frame)
            except OSError:  # full (BlockingIOError), or broken: the writer task says so
                sent = 0
            if sent:
                self.backlog_bytes -= sent
                if sent == len(frame):
                    self.backlog_frames -= 1
                    self.room.unpark_all()
                    return
                frame = frame[sent:]
        try:
            self.send_ch.send_nowait(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # connection closing; nothing will be written any more

    def respond(self, req_id: int | str | None, result: Any, opened: list[int]) -> None:
        try:
            frame = encode_frame(result_message(req_id, result), max_frame=self.max_frame)
        except FrameTooLarge as exc:
            self.session._discard(opened)
            self.respond_error(req_id, FRAME_TOO_LARGE, f"response too large: {exc}")
            return
        except Exception as exc:
            log.error("%r: cannot encode result of request %r: %r", self.session, req_id, exc)
            self.session._discard(opened)
            self.respond_error(req_id, INTERNAL, f"result could not be encoded: {exc}")
            return
        self.enqueue(frame)
        self.session._release(opened)

    def respond_error(self, req_id: int | str | None, code: str, message: str) -> None:
        self.enqueue(encode_frame(error_message(req_id, code, message)))

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Stop serving this connection now (sync, callable from any task)."""
        if self.dead:
            return
        self.dead = True
        log.log(level, "%r: closing connection: %s", self.session, reason)
        if self.read_scope is not None:
            self.read_scope.cancel()
        if self.bg_scope is not None:
            self.bg_scope.cancel()
        self.room.unpark_all()

    # --- tasks -------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.bg_nursery = await nursery.start(self._background)
                await self._read_loop()
                # EOF: deliver the acknowledgements still pending, then let the writer drain.
                while self.inflight and not self.dead:
                    await self.room.park()
                self.send_ch.close()
        finally:
            self.dead = True
            self.session._finalize()

    async def _background(self, *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        # Writer and Pending acknowledgements live here, under a scope that `abort` cancels
        # without cancelling a `handle()` call that the reader is in the middle of.
        async with trio.open_nursery() as nursery:
            self.bg_scope = nursery.cancel_scope
            if self.dead:
                nursery.cancel_scope.cancel()
            nursery.start_soon(self._writer)
            task_status.started(nursery)

    async def _writer(self) -> None:
        try:
            async with self.recv_ch:
                while True:
                    try:
                        frame = await self.recv_ch.receive()
                    except trio.EndOfChannel:
                        return
                    batch = [frame]
                    size = len(frame)
                    while size < _WRITE_BATCH:
                        try:
                            frame = self.recv_ch.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        batch.append(frame)
                        size += len(frame)
                    await self.stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
                    self.uncount(batch)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.abort(f"write failed: {exc!r}", logging.DEBUG)

    async def _wait_for_room(self) -> None:
        while not self.dead and (
            self.inflight >= self.max_inflight
            or self.backlog_frames >= _RESPONSE_HIGH_FRAMES
            or self.backlog_bytes >= _RESPONSE_HIGH_BYTES
        ):
            await self.room.park()

    async def _read_loop(self) -> None:
        while True:
            await self._wait_for_room()
            if self.dead:
                return
            event = self.decoder.next_event()
            if event is None:
                with trio.CancelScope() as scope:
                    self.read_scope = scope
                    try:
                        data = await self.stream.receive_some(_READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        self.abort(f"read failed: {exc!r}", logging.DEBUG)
                        return
                    finally:
                        self.read_scope = None
                if scope.cancelled_caught:
                    return
                if not data:
                    if self.decoder.buffered or self.decoder.skipping:
                        log.debug("%r: EOF in the middle of a frame", self.session)
                    return
                self.decoder.feed(data)
            elif isinstance(event, FrameError):
                self.respond_error(None, event.code, event.message)
            else:
                await self._dispatch(event)

    async def _dispatch(self, msg: dict[Any, Any]) -> None:
        req_id = request_id_of(msg)
        try:
            req = parse_request(msg)
        except OpError as exc:
            self.respond_error(req_id, exc.code, exc.message)
            return
        session = self.session
        session._begin_request()
        try:
            result = await self.handler.handle(req.op, req.args, session)
        except OpError as exc:
            session._discard(session._end_request())
            self.respond_error(req.id, exc.code, exc.message)
            return
        except Exception as exc:
            log.exception("%r: op %r failed", session, req.op)
            session._discard(session._end_request())
            self.respond_error(req.id, INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        except BaseException:
            session._end_request()  # cancelled: subscriptions opened so far close on finalize
            raise
        opened = session._end_request()
        if not isinstance(result, Pending):
            self.respond(req.id, result, opened)
            return
        self.inflight += 1
        ticket = _ticket_of(result)
        if ticket is not None:  # answered from the ticket's completion: no task per write
            ticket.add_done_callback(partial(self._durable, req.id, result.result, opened))
            return
        try:
            assert self.bg_nursery is not None
            self.bg_nursery.start_soon(self._finish_pending, req.id, result, opened)
        except RuntimeError:  # background nursery already closed: the connection is dead
            self.inflight -= 1
            session._discard(opened)

    def _durable(self, req_id: int | str, result: Any, opened: list[int], ticket: Ticket) -> None:
        """The write of a request is durable (or failed): answer it, as `_finish_pending` does."""
        try:
            if self.dead:  # (a dead connection's subscriptions are closed already)
                return
            error = ticket.error()
            if error is not None:  # logged by the store
                self.session._discard(opened)
                self.respond_error(req_id, STORE_FAILED, str(error))
            else:
                self.respond(req_id, result, opened)
        finally:
            self.inflight -= 1
            self.room.unpark_all()

    async def _finish_pending(self, req_id: int | str, pending: Pending, opened: list[int]) -> None:
        try:
            try:
                await pending.wait()
            except OpError as exc:
                self.session._discard(opened)
                self.respond_error(req_id, exc.code, exc.message)
                return
            except StoreError as exc:  # logged by the store
                self.session._discard(opened)
                self.respond_error(req_id, STORE_FAILED, str(exc))
                return
            except Exception as exc:
                log.exception("%r: waiting for request %r failed", self.session, req_id)
                self.session._discard(opened)
                self.respond_error(req_id, INTERNAL, f"{type(exc).__name__}: {exc}")
                return
            self.respond(req_id, pending.result, opened)
        finally:
            self.inflight -= 1
            self.room.unpark_all()


def _ticket_of(pending: Pending) -> Ticket | None:
    """The store ticket a `Pending` waits for, when its `wait` is that ticket's own (as the
    operations make them); None for any other wait (several tickets, other conditions)."""
    wait = pending.wait
    ticket = getattr(wait, "__self__", None)
    if isinstance(ticket, Ticket) and getattr(wait, "__func__", None) is Ticket.wait:
        return ticket
    return None


def check_peer_uid(uid: int | None) -> bool:
    """Only the daemon's own user may connect (None = unknown: the 0700/0600 modes decide)."""
    return uid is None or uid == os.getuid()


async def _refuse(stream: trio.SocketStream, message: str) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(encode_frame(error_message(None, FORBIDDEN, message)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class _ConnectionHandler:
    def __init__(self, handler: Handler, limits: dict[str, int]) -> None:
        self.handler = handler
        self.limits = limits
        self.count = 0

    async def __call__(self, stream: trio.SocketStream) -> None:
        self.count += 1
        number = self.count
        try:
            try:
                creds = peer_credentials(stream.socket)
            except OSError as exc:
                log.warning("connection #%d: cannot read peer credentials: %r", number, exc)
                await _refuse(stream, "cannot determine the peer's uid")
                return
            pid, uid = (creds[0], creds[1]) if creds else (None, None)
            if not check_peer_uid(uid):
                log.warning("connection #%d from uid %s (pid %s) refused", number, uid, pid)
                await _refuse(stream, f"uid {uid} may not use the peerdaemon of uid {os.getuid()}")
                return
            conn = _Connection(
                stream, self.handler, number=number, peer_uid=uid, peer_pid=pid, **self.limits
            )
            log.debug("%r: connected", conn.session)
            await conn.run()
            log.debug("%r: disconnected", conn.session)
        except Exception:
            log.exception("connection #%d: unexpected error", number)
        finally:
            await trio.aclose_forcefully(stream)


def prepare_socket_dir(directory: Path) -> None:
    """Create the socket's directory 0700, or check/tighten an existing one.

    A directory we create, or one named `peerdaemon*` (the defaults), must be ours and is
    chmod-ed to 0700; any other existing directory (say /tmp for `--socket /tmp/pd.sock`) is
    left alone: the socket's 0600 mode and the SO_PEERCRED check still protect it.
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
        created = True
    except FileExistsError:
        created = False
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ServerStartError(f"{directory} is not a directory")
    dedicated = created or directory.name.startswith("peerdaemon")
    if not dedicated:
        return
    if st.st_uid != os.getuid():
        raise ServerStartError(
            f"refusing to use {directory}: owned by uid {st.st_uid}, not {os.getuid()}"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def _acquire_lock(path: Path) -> int:
    """flock `<socket>.lock` so two daemons starting at once cannot steal each other's socket."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        return lock_file(lock_path, owner_only=True)
    except LockHeld:
        raise DaemonAlreadyRunning(path) from None
    except LockFileUnusable as exc:
        raise ServerStartError(f"refusing to use {exc} (remove it)") from None


async def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerStartError(f"{path} exists and is not a socket; refusing to replace it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listening: stale
        except trio.TooSlowError:
            raise DaemonAlreadyRunning(path) from None  # listening but its backlog is full
        except OSError as exc:
            raise ServerStartError(f"cannot probe existing socket {path}: {exc}") from exc
        else:
            raise DaemonAlreadyRunning(path)
    log.info("removing stale socket %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def serve_unix(
    path: Path | str,
    handler: Handler,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    max_backlog_frames: int = DEFAULT_MAX_BACKLOG_FRAMES,
    max_backlog_bytes: int | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local API on the Unix socket `path` until cancelled.

    Calls `task_status.started(path)` once the socket accepts connections; raises
    `DaemonAlreadyRunning` if a live daemon answers on `path` and `ServerStartError` for unusable
    paths. `max_backlog_bytes` defaults to 2 * max_frame. The socket file is removed on exit.
    """
    path = Path(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ServerStartError(
            f"socket path too long ({len(os.fsencode(path))} > {_SUN_PATH_MAX} bytes): {path}"
        )
    limits = {
        "max_frame": max_frame,
        "max_inflight": max_inflight,
        "max_backlog_frames": max_backlog_frames,
        "max_backlog_bytes": 2 * max_frame if max_backlog_bytes is None else max_backlog_bytes,
    }
    prepare_socket_dir(path.parent)
    lock_fd = _acquire_lock(path)
    try:
        await _remove_stale_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fspath(path))
            os.chmod(path, 0o600)
            sock.listen(128)
            inode = os.stat(path).st_ino
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(trio.serve_listeners, _ConnectionHandler(handler, limits), [listener])
                )
                log.info("listening on %s", path)
                task_status.started(path)
        finally:
            sock.close()
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
    finally:
        os.close(lock_fd)
