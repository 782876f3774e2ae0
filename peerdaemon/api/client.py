"""Clients for the local API: `AsyncClient` (trio) and `Client` (plain blocking socket).

Both speak docs/local-api.md through `framing.py`. The async client pipelines: any number of
tasks may `call()` at once, responses are matched by id and pushes by subscription. It costs a
message no hop through another task (issue 13): a request is written from the caller's task with
one non-blocking write (a writer task takes only what the socket does not), and a caller waiting
for a response or an event reads the socket itself, for everyone, while no other caller does; a
background reader reads only while nobody waits and events may come (the daemon drops a client
that leaves them unread).
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from . import peercred
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, FrameTooLarge, encode_frame
from .protocol import FRAME_TOO_LARGE, request_message

__all__ = [
    "AsyncClient",
    "AsyncSubscription",
    "Client",
    "ClientError",
    "ConnectionLost",
    "DaemonError",
    "DaemonNotRunning",
    "ForeignListener",
    "Subscription",
    "open_client",
]

_READ_SIZE = 1 << 16
_WRITE_BATCH = 1 << 18

if TYPE_CHECKING:
    import trio
else:

    class _LazyTrio(ModuleType):
        """Imports trio on first use: the CLI only needs the blocking `Client`, and importing
        trio would add ~0.1 s to every `peerdaemon` command."""

        def __getattr__(self, name: str) -> Any:
            import trio as real

            globals()["trio"] = real
            return getattr(real, name)

    trio = _LazyTrio("trio")


class ClientError(Exception):
    """Base class of everything the clients raise about the daemon or the connection."""


class DaemonError(ClientError):
    """The daemon answered with an error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class DaemonNotRunning(ClientError):
    def __init__(self, path: Path | str) -> None:
        super().__init__(f"no peerdaemon is running on {path} (start one with `peerdaemon run`)")
        self.path = Path(path)


class ForeignListener(ClientError):
    """What listens on the socket belongs to another user: not our daemon (nothing was sent)."""

    def __init__(self, path: Path | str, uid: int | None, detail: str = "") -> None:
        what = detail or (
            f"is held by uid {uid}, neither this user (uid {os.getuid()}) nor root; another "
            "user may be posing as the daemon"
        )
        super().__init__(f"refusing to use the socket {path}: it {what}")
        self.path = Path(path)
        self.uid = uid


class ConnectionLost(ClientError):
    """The connection ended (daemon stopped, or the client was closed) before an answer came."""


def _resolve(path: Path | str | None) -> Path:
    if path is None:
        from peerdaemon.core.locations import default_socket_path

        return default_socket_path()
    return Path(path)


def _connect_error(path: Path, exc: OSError) -> ClientError:
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError | NotADirectoryError):
        return DaemonNotRunning(path)
    return ClientError(f"cannot connect to {path}: {exc.strerror or exc}")


def _check_listener(sock: Any, path: Path) -> None:
    """Refuse a listener of another user (SO_PEERCRED) before a byte is sent to it: with
    `--socket` in a shared directory, another user may have bound the path first."""
    try:
        creds = peercred.peer_credentials(sock)
    except OSError as exc:
        raise ForeignListener(
            path, None, f"cannot be checked: its owner is unknown ({exc.strerror or exc})"
        ) from None
    uid = creds[1] if creds else None
    if not peercred.listener_allowed(uid):
        raise ForeignListener(path, uid)


def _encode_request(req_id: int, op: str, args: dict[str, Any], max_frame: int) -> bytes:
    try:
        return encode_frame(request_message(req_id, op, args), max_frame=max_frame)
    except FrameTooLarge as exc:
        raise DaemonError(FRAME_TOO_LARGE, f"request too large: {exc}") from None


def _response_outcome(msg: dict[Any, Any]) -> tuple[Any, DaemonError | None]:
    error = msg.get("error")
    if error is not None:
        if isinstance(error, dict):
            return None, DaemonError(str(error.get("code")), str(error.get("message", "")))
        return None, DaemonError("bad-response", repr(error))
    return msg.get("result"), None


def _null_id_error(msg: dict[Any, Any]) -> DaemonError:
    """An error the daemon could not attribute to a request: fatal for these clients (they
    never send bad frames, so it means the daemon refused the connection or we are out of
    sync)."""
    _, err = _response_outcome(msg)
    return err or DaemonError("bad-response", "response with a null id")


def _is_final(event: Any, ends_on_deleted: bool) -> bool:
    """An environment subscription ends with its `deleted` event (the daemon closes it)."""
    return ends_on_deleted and isinstance(event, dict) and event.get("type") == "deleted"


# --- option helpers shared by both clients ------------------------------------------------------
def _env_args(env: dict[str, Any] | str) -> dict[str, Any]:
    return {"json": env} if isinstance(env, str) else {"env": env}


def _import_args(env: dict[str, Any] | str, new_id: bool) -> dict[str, Any]:
    args = _env_args(env)
    if new_id:
        args["new_id"] = True
    return args


def _put_args(env_id: str, env: dict[str, Any] | str, force_id: bool) -> dict[str, Any]:
    args = {"id": env_id, **_env_args(env)}
    if force_id:
        args["force_id"] = True
    return args


def _patch_args(env_id: str, ops: list[Any] | str) -> dict[str, Any]:
    return {"id": env_id, "json": ops} if isinstance(ops, str) else {"id": env_id, "patch": ops}


def _export_args(env_id: str, format: str, state_vector: bytes | None) -> dict[str, Any]:
    args: dict[str, Any] = {"id": env_id, "format": format}
    if state_vector is not None:
        args["state_vector"] = bytes(state_vector)
    return args


def _get_args(env_id: str, pointer: str | None) -> dict[str, Any]:
    return {"id": env_id} if pointer is None else {"id": env_id, "pointer": pointer}


def _since_args(since: int | None) -> dict[str, Any]:
    return {} if since is None else {"since": since}


# ================================================================================================
# trio client
# ================================================================================================
class _Call:
    """One request awaiting its response; its caller parks in `lot` while another task reads."""

    __slots__ = ("lot", "finished", "result", "error", "subscribe")

    def __init__(self, subscribe: bool) -> None:
        self.lot = trio.lowlevel.ParkingLot()
        self.finished = False
        self.result: Any = None
        self.error: ClientError | None = None
        self.subscribe = subscribe

    def ready(self) -> bool:
        return self.finished


class _Events:
    """One subscription's events not yet taken by its iterator; `closed` once no more come."""

    __slots__ = ("lot", "queue", "closed")

    def __init__(self) -> None:
        self.lot = trio.lowlevel.ParkingLot()
        self.queue: collections.deque[Any] = collections.deque()
        self.closed = False

    def ready(self) -> bool:
        return self.closed or bool(self.queue)


_Waiter = _Call | _Events

_BACKGROUND = object()
"""`AsyncClient._reader` while the background task waits to read."""


class AsyncSubscription:
    """Async iterator over the events of one subscription.

    `initial` is the subscribe result (`{sub, snapshot, update}` or `{sub, cursor, ...}`).
    Iteration ends after `aclose()` or after an environment's `deleted` event, and raises
    `ConnectionLost` if the connection drops. Events are buffered without bound until read.
    """

    def __init__(
        self,
        client: AsyncClient,
        sub: int,
        initial: dict[str, Any],
        events: _Events,
        *,
        ends_on_deleted: bool = False,
    ) -> None:
        self.client = client
        self.sub = sub
        self.initial = initial
        self._events = events
        self._closed = False
        self._ends_on_deleted = ends_on_deleted

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        events = self._events
        await self.client._wait(events)
        if not events.queue:  # closed, and every event before that was taken
            if not self._closed and self.client._error is not None:
                raise self.client._error from None
            raise StopAsyncIteration
        event = events.queue.popleft()
        if _is_final(event, self._ends_on_deleted):
            self._closed = True  # the daemon closed it: iteration ends after this event
            self.client._drop_subscription(self.sub)
        return event

    async def aclose(self) -> None:
        """Unsubscribe (best effort if the connection is already gone); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.client._drop_subscription(self.sub)
        if self.client._error is None:
            try:
                await self.client.call("unsubscribe", sub=self.sub)
            except ClientError:
                pass

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncClient:
    """Trio client. Use `async with await AsyncClient.connect(path) as c` or `open_client()`."""

    def __init__(self, stream: trio.SocketStream, path: Path, max_frame: int) -> None:
        self.path = path
        self.max_frame = max_frame
        self._stream = stream
        self._sock = stream.socket
        self._fd = stream.socket.fileno()  # used only while `_error` is None (reused after)
        self._decoder = FrameDecoder(max_frame)
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._calls: dict[int, _Call] = {}
        self._abandoned: set[int] = set()  # subscribe calls whose caller went away
        self._subs: dict[int, _Events] = {}
        # Who reads the socket: None, _BACKGROUND, the task of a caller, or a parked waiter the
        # turn was handed to (its task takes it when it wakes).
        self._reader: object = None
        self._read_waiter: _Waiter | None = None  # what the reading caller waits for
        self._read_scope: trio.CancelScope | None = None
        self._parked: dict[_Waiter, int] = {}  # waiters whose tasks wait for a reader, in order
        self._bg_lot = trio.lowlevel.ParkingLot()
        self._bg_scope: trio.CancelScope | None = None
        self._next_id = 1
        self._error: ClientError | None = None
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None
        self._service_scope: trio.CancelScope | None = None

    @classmethod
    async def connect(
        cls, path: Path | str | None = None, *, max_frame: int = DEFAULT_MAX_FRAME
    ) -> AsyncClient:
        """Connect to the daemon's socket (default: `default_socket_path()`)."""
        resolved = _resolve(path)
        try:
            stream = await trio.open_unix_socket(os.fspath(resolved))
        except OSError as exc:
            raise _connect_error(resolved, exc) from None
        try:
            _check_listener(stream.socket, resolved)
        except BaseException:
            stream.socket.close()
            raise
        return cls(stream, resolved, max_frame)

    async def __aenter__(self) -> AsyncClient:
        if self._nursery_cm is not None:
            raise RuntimeError("AsyncClient entered twice")
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        try:
            await self._nursery.start(self._service)
        except BaseException as exc:
            await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _service(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Background reader and writer under their own scope, so that `aclose()` inside the
        # `async with` body stops them without cancelling the body itself.
        async with trio.open_nursery() as nursery:
            self._service_scope = nursery.cancel_scope
            nursery.start_soon(self._background_reader)
            nursery.start_soon(self._writer)
            task_status.started()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._nursery is not None
        self._fail(ConnectionLost("client closed"))
        if self._service_scope is not None:
            self._service_scope.cancel()
        try:
            return bool(await self._nursery_cm.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            # Our tasks never raise, so a group holding just the body's exception is that
            # exception: let it propagate unwrapped.
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return False
            raise
        finally:
            self._stream.socket.close()

    async def aclose(self) -> None:
        """Close the connection (also done by leaving the `async with`)."""
        self._fail(ConnectionLost("client closed"))
        if self._service_scope is not None:
            self._service_scope.cancel()
        self._stream.socket.close()

    @property
    def closed(self) -> bool:
        return self._error is not None

    # --- plumbing ----------------------------------------------------------------------------
    def _fail(self, error: ClientError) -> None:
        """The connection is over: wake every waiting call and end every subscription."""
        if self._error is None:
            self._error = error
        for call in self._calls.values():
            if not call.finished:
                call.error = self._error
                call.finished = True
                call.lot.unpark_all()
        for events in self._subs.values():
            events.closed = True
            events.lot.unpark_all()
        self._subs.clear()
        for waiter in self._parked:
            waiter.lot.unpark_all()
        self._out.clear()
        if self._read_scope is not None:
            self._read_scope.cancel()
        self._writer_lot.unpark_all()
        self._bg_lot.unpark_all()

    # Sending: from the caller's task, one non-blocking write when nothing is queued before the
    # frame; what the socket does not take is queued (in order) for the writer task. A frame is
    # whole in the socket or in the queue before the caller can be cancelled, so a cancelled
    # call never leaves a partial frame behind.
    def _send(self, frame: bytes) -> None:
        if self._error is not None:
            return
        out = self._out
        if not out:
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._write_failed(exc)
                return
            if sent == len(frame):
                return
            out.append(memoryview(frame)[sent:])
            self._writer_lot.unpark_all()
            return
        out.append(frame)

    def _write_failed(self, exc: OSError) -> None:
        """The daemon may have said why before it closed (a refused connection's error):
        take in what it sent first, so that this is what calls raise."""
        while self._error is None and self._read_available():
            pass
        self._fail(ConnectionLost(f"connection to the daemon lost: {exc}"))

    async def _writer(self) -> None:
        out = self._out
        while self._error is None:
            if not out:
                await self._writer_lot.park()
                continue
            try:
                await trio.lowlevel.wait_writable(self._sock)
            except (trio.ClosedResourceError, OSError) as exc:
                self._fail(ConnectionLost(f"connection to the daemon lost: {exc}"))
                return
            if self._error is not None:
                return
            # Coalesce what queued up meanwhile: one syscall for a burst.
            first = out.popleft()
            size = len(first)
            if out and size < _WRITE_BATCH:
                batch = [first]
                while out and size < _WRITE_BATCH:
                    frame = out.popleft()
                    batch.append(frame)
                    size += len(frame)
                first = b"".join(batch)
            try:
                sent = os.write(self._fd, first)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._write_failed(exc)
                return
            if sent < len(first):
                out.appendleft(memoryview(first)[sent:])

    # Receiving: a caller waiting for a response or an event reads the socket itself when no
    # other caller does (the background reader gives way to it), so what it waits for costs no
    # hop through another task; what it reads for others wakes them, and when it is done it
    # hands the reading to a waiting caller, or back to the background reader.
    async def _wait(self, waiter: _Waiter) -> None:
        """Return once `waiter.ready()` or the connection is over (always a checkpoint)."""
        if waiter.ready() or self._error is not None:
            await trio.lowlevel.checkpoint()
            return
        me = trio.lowlevel.current_task()
        try:
            while not waiter.ready() and self._error is None:
                reader = self._reader
                if reader is None or reader is _BACKGROUND or reader is me or reader is waiter:
                    if reader is _BACKGROUND and self._bg_scope is not None:
                        self._bg_scope.cancel()  # stops waiting at once: the socket is ours
                    self._reader = me
                    self._read_waiter = waiter
                    try:
                        with trio.CancelScope() as self._read_scope:
                            await trio.lowlevel.wait_readable(self._sock)
                    except (trio.ClosedResourceError, OSError) as exc:
                        self._fail(ConnectionLost(f"connection to the daemon lost: {exc}"))
                        return
                    finally:
                        self._read_scope = self._read_waiter = None
                    self._read_available()
                else:
                    self._parked[waiter] = self._parked.get(waiter, 0) + 1
                    try:
                        await waiter.lot.park()
                    finally:
                        left = self._parked.pop(waiter) - 1
                        if left:
                            self._parked[waiter] = left
        finally:
            if self._reader is me or self._reader is waiter:
                self._pass_reading()

    def _pass_reading(self) -> None:
        for waiter in self._parked:
            self._reader = waiter
            waiter.lot.unpark_all()
            return
        self._reader = None
        self._wake_background()

    def _wake_background(self) -> None:
        """Let the background reader read if something may come unasked: events, or the answer
        to an abandoned subscribe. Else the next caller reads (a client of plain calls, the
        CLI's, never pays for a task that only waits)."""
        if self._reader is None and (self._subs or self._abandoned):
            self._bg_lot.unpark_all()

    def _wake(self, waiter: _Waiter) -> None:
        """`waiter` became ready other than by a frame read: wake whoever waits for it."""
        waiter.lot.unpark_all()
        if self._read_waiter is waiter and self._read_scope is not None:
            self._read_scope.cancel()

    async def _background_reader(self) -> None:
        """Reads while no caller does: events are taken in (the server disconnects a client
        that leaves them in the socket) and a lost connection is noticed, with nobody waiting."""
        while self._error is None:
            if self._reader is not None or not (self._subs or self._abandoned):
                await self._bg_lot.park()
                continue
            self._reader = _BACKGROUND
            try:
                with trio.CancelScope() as self._bg_scope:
                    await trio.lowlevel.wait_readable(self._sock)
            except (trio.ClosedResourceError, OSError) as exc:
                self._fail(ConnectionLost(f"connection to the daemon lost: {exc}"))
                return
            finally:
                self._bg_scope = None
            if self._reader is _BACKGROUND:  # (else a caller took over)
                self._reader = None
                self._read_available()

    def _read_available(self) -> bool:
        """Read what the socket holds and hand out every complete frame; False if it held
        nothing (or the connection is over)."""
        if self._error is not None:
            return False
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._fail(ConnectionLost(f"connection to the daemon lost: {exc}"))
            return False
        if not data:
            self._fail(ConnectionLost("the daemon closed the connection"))
            return False
        self._decoder.feed(data)
        while self._error is None and (event := self._decoder.next_event()) is not None:
            fatal = self._dispatch(event)
            if fatal is not None:
                self._fail(fatal)
        return True

    def _dispatch(self, msg: dict[Any, Any] | FrameError) -> ClientError | None:
        if isinstance(msg, FrameError):
            return DaemonError(msg.code, f"unreadable frame from the daemon: {msg.message}")
        if "id" not in msg:
            events = self._subs.get(msg.get("sub"))  # type: ignore[arg-type]
            if events is not None:
                events.queue.append(msg.get("event"))
                if events.lot:
                    events.lot.unpark_all()
            return None
        req_id = msg["id"]
        if req_id is None:
            return _null_id_error(msg)
        result, error = _response_outcome(msg)
        call = self._calls.get(req_id)
        if call is None:
            if req_id in self._abandoned:
                self._abandoned.discard(req_id)
                if error is None and isinstance(result, dict) and "sub" in result:
                    self._send_unsubscribe(result["sub"])
            return None
        if call.subscribe and error is None and isinstance(result, dict):
            # Register now: the subscription's first events may be in the very next frame.
            sub = result.get("sub")
            if isinstance(sub, int):
                events = _Events()
                self._subs[sub] = events
                result = (result, events)
        call.result, call.error = result, error
        call.finished = True
        if call.lot:
            call.lot.unpark_all()
        return None

    def _send_unsubscribe(self, sub: int) -> None:
        req_id = self._next_id
        self._next_id += 1
        self._send(_encode_request(req_id, "unsubscribe", {"sub": sub}, self.max_frame))

    def _drop_subscription(self, sub: int) -> None:
        events = self._subs.pop(sub, None)
        if events is not None:
            events.closed = True
            self._wake(events)

    async def _call(self, op: str, args: dict[str, Any], *, subscribe: bool = False) -> Any:
        if self._nursery is None:
            raise RuntimeError("use `async with` on the AsyncClient before calling it")
        if self._error is not None:
            raise self._error
        req_id = self._next_id
        self._next_id += 1
        frame = _encode_request(req_id, op, args, self.max_frame)
        call = _Call(subscribe)
        self._calls[req_id] = call
        try:
            self._send(frame)
            await self._wait(call)
        except BaseException:
            if subscribe:
                if not call.finished:
                    self._abandoned.add(req_id)
                    self._wake_background()
                elif call.error is None and isinstance(call.result, tuple):
                    sub = call.result[0]["sub"]
                    self._drop_subscription(sub)
                    self._send_unsubscribe(sub)
            raise
        finally:
            del self._calls[req_id]
        if call.error is not None:
            raise call.error
        return call.result

    # --- API ---------------------------------------------------------------------------------
    async def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raises `DaemonError` for error responses."""
        return await self._call(op, args)

    async def _subscribe(self, op: str, args: dict[str, Any]) -> AsyncSubscription:
        result = await self._call(op, args, subscribe=True)
        if not isinstance(result, tuple):
            raise DaemonError("bad-response", f"{op} result has no subscription id")
        initial, events = result
        return AsyncSubscription(
            self, initial["sub"], initial, events, ends_on_deleted=op == "env.subscribe"
        )

    async def subscribe(self, op: str, **args: Any) -> AsyncSubscription:
        """A subscribing operation (`mock.logs` with `follow`...): `.initial` is its result."""
        return await self._subscribe(op, args)

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def list_envs(self) -> list[dict[str, Any]]:
        return await self.call("env.list")

    async def import_env(self, env: dict[str, Any] | str, new_id: bool = False) -> dict[str, Any]:
        """Import an environment (object, or raw JSON text); returns `{id, repairs}`."""
        return await self._call("env.import", _import_args(env, new_id))

    async def get(self, env_id: str, pointer: str | None = None) -> Any:
        return await self._call("env.get", _get_args(env_id, pointer))

    async def put(
        self, env_id: str, env: dict[str, Any] | str, *, force_id: bool = False
    ) -> dict[str, Any]:
        """Replace an environment; content whose uuid is another id is refused (`uuid-mismatch`)
        unless `force_id`."""
        return await self._call("env.put", _put_args(env_id, env, force_id))

    async def patch(self, env_id: str, ops: list[Any] | str) -> dict[str, Any]:
        return await self._call("env.patch", _patch_args(env_id, ops))

    async def delete(self, env_id: str) -> Any:
        return await self.call("env.delete", id=env_id)

    async def export(
        self, env_id: str, format: str = "json", *, state_vector: bytes | None = None
    ) -> Any:
        return await self._call("env.export", _export_args(env_id, format, state_vector))

    async def merge(self, env_id: str, update: bytes) -> dict[str, Any]:
        return await self.call("env.merge", id=env_id, update=bytes(update))

    async def subscribe_env(self, env_id: str) -> AsyncSubscription:
        """Subscribe to one environment: `.initial` = `{sub, snapshot, update}`."""
        return await self._subscribe("env.subscribe", {"id": env_id})

    async def subscribe_events(self, since: int | None = None) -> AsyncSubscription:
        """Subscribe to the daemon's event log: `.initial` = `{sub, cursor}`."""
        return await self._subscribe("events.subscribe", _since_args(since))


@asynccontextmanager
async def open_client(
    path: Path | str | None = None, *, max_frame: int = DEFAULT_MAX_FRAME
) -> AsyncIterator[AsyncClient]:
    """`async with open_client(path) as client:` connect, serve, close."""
    client = await AsyncClient.connect(path, max_frame=max_frame)
    async with client:
        yield client


# ================================================================================================
# blocking client
# ================================================================================================
class Subscription:
    """Blocking iterator over one subscription's events (see `AsyncSubscription`)."""

    def __init__(
        self,
        client: Client,
        sub: int,
        initial: dict[str, Any],
        queue: collections.deque,
        *,
        ends_on_deleted: bool = False,
    ) -> None:
        self.client = client
        self.sub = sub
        self.initial = initial
        self._queue = queue
        self._closed = False
        self._ends_on_deleted = ends_on_deleted

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event; None once closed; raises `TimeoutError` after `timeout` seconds."""
        while not self._queue:
            if self._closed:
                return None
            self.client._pump(timeout)
        event = self._queue.popleft()
        if _is_final(event, self._ends_on_deleted):
            self._closed = True  # the daemon closed it: iteration ends after this event
            self._queue.clear()
            self.client._subs.pop(self.sub, None)
        return event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (event := self.next_event()) is not None:
            yield event

    def close(self) -> None:
        """Unsubscribe (best effort if the connection is gone); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.client._subs.pop(self.sub, None)
        if not self.client.closed:
            try:
                self.client.call("unsubscribe", sub=self.sub)
            except ClientError:
                pass

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """Blocking client over a plain socket; no trio. Not thread-safe: one per thread.

    `timeout` (seconds, None = wait forever) applies to connecting and to each call; a
    `TimeoutError` leaves the connection usable (a late response is discarded).
    """

    def __init__(
        self, sock: socket.socket, path: Path, *, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        self.path = path
        self.max_frame = max_frame
        self._sock: socket.socket | None = sock
        self._timeout = sock.gettimeout()
        self._decoder = FrameDecoder(max_frame)
        self._waiting: dict[int, bool] = {}  # id -> is a subscribe call
        self._responses: dict[int, tuple[Any, DaemonError | None]] = {}
        self._subs: dict[int, collections.deque] = {}
        self._next_id = 1
        self._error: ClientError | None = None

    @classmethod
    def connect(
        cls,
        path: Path | str | None = None,
        *,
        timeout: float | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> Client:
        resolved = _resolve(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(resolved))
        except OSError as exc:
            sock.close()
            raise _connect_error(resolved, exc) from None
        try:
            _check_listener(sock, resolved)
        except BaseException:
            sock.close()
            raise
        return cls(sock, resolved, max_frame=max_frame)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._fail(ConnectionLost("client closed"))

    @property
    def closed(self) -> bool:
        return self._error is not None

    def _fail(self, error: ClientError) -> ClientError:
        if self._error is None:
            self._error = error
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return self._error

    def _pump(self, timeout: float | None) -> None:
        """Read at least one chunk and dispatch every complete frame in it."""
        if self._sock is None:
            raise self._error or ConnectionLost("client closed")
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(_READ_SIZE)
        except TimeoutError:
            raise
        except OSError as exc:
            raise self._fail(ConnectionLost(f"connection to the daemon lost: {exc}")) from None
        finally:
            if self._sock is not None:
                self._sock.settimeout(self._timeout)
        if not data:
            raise self._fail(ConnectionLost("the daemon closed the connection"))
        self._decoder.feed(data)
        while (msg := self._decoder.next_event()) is not None:
            if isinstance(msg, FrameError):
                raise self._fail(
                    DaemonError(msg.code, f"unreadable frame from the daemon: {msg.message}")
                )
            if "id" not in msg:
                queue = self._subs.get(msg.get("sub"))  # type: ignore[arg-type]
                if queue is not None:
                    queue.append(msg.get("event"))
                continue
            req_id = msg["id"]
            if req_id is None:
                raise self._fail(_null_id_error(msg))
            subscribe = self._waiting.pop(req_id, None)
            if subscribe is None:
                continue  # a response nobody waits for any more (timed-out call)
            result, error = _response_outcome(msg)
            if subscribe and error is None and isinstance(result, dict):
                sub = result.get("sub")
                if isinstance(sub, int):
                    self._subs[sub] = collections.deque()
            self._responses[req_id] = (result, error)

    def _call(self, op: str, args: dict[str, Any], *, subscribe: bool = False) -> Any:
        if self._sock is None:
            raise self._error or ConnectionLost("client closed")
        req_id = self._next_id
        self._next_id += 1
        frame = _encode_request(req_id, op, args, self.max_frame)
        try:
            self._sock.sendall(frame)
        except OSError as exc:
            # A partial write (e.g. timeout) desynchronises the stream: give up on it.
            raise self._fail(ConnectionLost(f"connection to the daemon lost: {exc}")) from None
        self._waiting[req_id] = subscribe
        try:
            while req_id not in self._responses:
                self._pump(self._timeout)
        except BaseException:
            self._waiting.pop(req_id, None)
            raise
        result, error = self._responses.pop(req_id)
        if error is not None:
            raise error
        return result

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and wait for its result; raises `DaemonError` on error responses."""
        return self._call(op, args)

    def _subscribe(self, op: str, args: dict[str, Any]) -> Subscription:
        initial = self._call(op, args, subscribe=True)
        sub = initial.get("sub") if isinstance(initial, dict) else None
        if not isinstance(sub, int) or sub not in self._subs:
            raise DaemonError("bad-response", f"{op} result has no subscription id")
        return Subscription(
            self, sub, initial, self._subs[sub], ends_on_deleted=op == "env.subscribe"
        )

    def subscribe(self, op: str, **args: Any) -> Subscription:
        """A subscribing operation (`mock.logs` with `follow`...): `.initial` is its result."""
        return self._subscribe(op, args)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def list_envs(self) -> list[dict[str, Any]]:
        return self.call("env.list")

    def import_env(self, env: dict[str, Any] | str, new_id: bool = False) -> dict[str, Any]:
        return self._call("env.import", _import_args(env, new_id))

    def get(self, env_id: str, pointer: str | None = None) -> Any:
        return self._call("env.get", _get_args(env_id, pointer))

    def put(
        self, env_id: str, env: dict[str, Any] | str, *, force_id: bool = False
    ) -> dict[str, Any]:
        return self._call("env.put", _put_args(env_id, env, force_id))

    def patch(self, env_id: str, ops: list[Any] | str) -> dict[str, Any]:
        return self._call("env.patch", _patch_args(env_id, ops))

    def delete(self, env_id: str) -> Any:
        return self.call("env.delete", id=env_id)

    def export(
        self, env_id: str, format: str = "json", *, state_vector: bytes | None = None
    ) -> Any:
        return self._call("env.export", _export_args(env_id, format, state_vector))

    def merge(self, env_id: str, update: bytes) -> dict[str, Any]:
        return self.call("env.merge", id=env_id, update=bytes(update))

    def subscribe_env(self, env_id: str) -> Subscription:
        return self._subscribe("env.subscribe", {"id": env_id})

    def subscribe_events(self, since: int | None = None) -> Subscription:
        return self._subscribe("events.subscribe", _since_args(since))
