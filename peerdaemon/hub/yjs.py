"""The `/yjs/SPACE/DOC` endpoint: y-websocket clients in their rooms, over the hub's transport.

The decisions live in cores without I/O: who may connect and stay (`yauth.YjsAuth`), what a
room does with each message (`ywebsocket.Rooms`), when a connection is pinged, cut or too slow
(`wsconn.WsConn`). This shell acts on what they ask for:

* a `StoreUpdate` the rooms return: applied to `HubDocs` at once, before the connection's next
  message (so each client's updates keep their order), with its origin so that HubDocs relays
  it to every connection but that one (its store commits it alongside); a limit or bad bytes go back to the rooms
  (`Rooms.update_refused`), which deny or close that connection;
* connections with something new to write (the shared `ready` list): after every call into
  the rooms, their transports are woken, and an idle one writes at once (transport.py).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Protocol

import trio

from ..core.admission import Slot
from ..core.events import EventLog
from .accounts import LimitExceeded
from .transport import WebSocketTransport
from .yauth import AccountsLike, Admitted, YjsAuth
from .ywebsocket import (
    AWARENESS_TIMEOUT,
    CLOSE_CODES,
    Outlet,
    Rooms,
    StoreUpdate,
    YConn,
    take_ready,
)

__all__ = ["DocsWriter", "YjsEndpoint", "store_update"]

log = logging.getLogger("peerdaemon.hub.yjs")


class DocsWriter(Protocol):
    """What the endpoint writes to `HubDocs`."""

    def apply(self, space_id: str, doc_id: str, update: bytes, origin: str) -> object: ...


def store_update(docs: DocsWriter, rooms: Rooms, event: StoreUpdate) -> None:
    """Apply a client's update to the documents, or tell the rooms why it was refused."""
    conn = event.conn
    try:
        docs.apply(event.space_id, event.doc_id, event.update, conn.origin)
    except LimitExceeded as exc:
        log.info("yws %s (%s): %s", conn.number, conn.user, exc)
        rooms.update_refused(event, exc.reason)
    except ValueError as exc:
        log.info("yws %s: bad update: %s", conn.number, exc)
        rooms.update_refused(event, None)


class YjsEndpoint:
    """Every y-websocket connection of the hub. Hook it to `HubDocs` with
    `docs.add_listener(rooms.on_update)` and `docs.add_flush_listener(endpoint.flush)`, and to
    the accounts with `accounts.add_change_listener(endpoint.revalidate)` (server.py does)."""

    def __init__(
        self,
        rooms: Rooms,
        docs: DocsWriter,
        accounts: AccountsLike,
        *,
        events: EventLog | None = None,
    ) -> None:
        self.rooms = rooms
        self.docs = docs
        self.auth = YjsAuth(accounts)
        self.events = events
        self.ready: list[Outlet] = []
        """Connections with something new to write (filled by the cores, see `wake_ready`)."""
        self.transports: dict[int, WebSocketTransport] = {}

    def wake_ready(self) -> None:
        """Have every connection the cores gave something to write send it."""
        transports = self.transports
        for outlet in take_ready(self.ready):
            transport = transports.get(outlet.number)
            if transport is not None:
                transport.wake()

    # -- what the hub's documents and accounts call ------------------------------------------------
    def flush(self) -> None:
        """HubDocs flush listener: relay the updates just applied."""
        self.rooms.flush()
        self.wake_ready()

    def revalidate(self) -> int:
        """After an accounts change: deny the connections whose token or access is gone."""
        cut = 0
        for conn in self.rooms.connections():
            reason = self.auth.recheck(conn.token_hash, conn.space_id)
            if reason is not None:
                conn.deny(reason)
                cut += 1
        self.wake_ready()
        return cut

    async def expire_awareness(self) -> None:
        """Time out the y-websocket clients' awareness states (`Rooms.expire`), for ever."""
        while True:
            now = time.monotonic()  # the clock `Rooms.receive` uses
            due = self.rooms.expire(now)
            self.wake_ready()
            await trio.sleep(
                min(max(due - now, 0.5), AWARENESS_TIMEOUT) if due else AWARENESS_TIMEOUT
            )

    def close_all(self, code: int, reason: str) -> None:
        for conn in self.rooms.connections():
            conn.close(code, reason)
        self.wake_ready()

    # -- one connection --------------------------------------------------------------------------
    async def serve(
        self,
        transport: WebSocketTransport,
        conn: YConn,
        space_id: str,
        doc_id: str,
        query: Mapping[str, str],
        slot: Slot,
    ) -> None:
        """Admit `conn` and keep it in its room until it closes: `open`, the transport's run,
        `close` (the port calls the three itself, which keeps one coroutine less alive per
        idle connection)."""
        on_message = self.open(transport, conn, space_id, doc_id, query, slot)
        try:
            await transport.run(on_message)
        finally:
            self.close(conn, doc_id)

    FRESH_WAIT = 1.0
    """Seconds a connection about to be refused waits for the accounts to be read again."""

    async def prepare(self, query: Mapping[str, str], space_id: str) -> None:
        """Before `open`, in a cluster: a connection its copy of the accounts would refuse
        (unknown token, no access) has PostgreSQL read again first, so a token or a member
        added a moment ago through another process is let in at once, not at the next poll
        (the embedded hub reads its accounts file itself: nothing to do). PostgreSQL away or
        slow leaves the verdict to what is known."""
        refresh_now = getattr(self.auth.accounts, "refresh_now", None)
        if refresh_now is None or not self.auth.stale_refusal(query, space_id):
            return
        with trio.move_on_after(self.FRESH_WAIT):
            try:
                await refresh_now()
            except sqlite3.Error as exc:
                log.debug("accounts not read again before a refusal: %s", exc)

    def open(
        self,
        transport: WebSocketTransport,
        conn: YConn,
        space_id: str,
        doc_id: str,
        query: Mapping[str, str],
        slot: Slot,
    ) -> Callable[[bytes | str], None]:
        """Admit `conn` (its token, access, ids, device slot) into its room, or have it refused
        (permission-denied and a close); -> what its transport hands each message. The
        connection's admission `slot` is released once it joined (its `HandshakeWatch` cuts it
        otherwise). `conn` must have been made with this endpoint's `ready` list."""
        verdict = self.auth.admit(query, space_id, doc_id, conn.origin)
        if isinstance(verdict, Admitted):
            conn.user = verdict.user
            conn.token_hash = verdict.token_hash
            conn.space_id = space_id
            conn.device = verdict.device
            conn.lease = verdict.lease
            self.rooms.join(space_id, doc_id, conn)
            slot.release()  # authenticated: no longer counts as half-open
        else:
            log.info("yws %d: refused: %s %s", conn.number, verdict.reason, verdict.detail)
            conn.deny(verdict.reason)
        self.transports[conn.number] = transport
        return partial(self.receive, conn)

    def receive(self, conn: YConn, data: bytes | str) -> None:
        """One message from `conn`."""
        if isinstance(data, str):
            conn.close(CLOSE_CODES["protocol-error"], "protocol-error")
        else:
            rooms = self.rooms
            try:
                event = rooms.receive(conn, data)
                if event is not None:
                    store_update(self.docs, rooms, event)
            except Exception:
                log.exception("yws %d: message handling failed", conn.number)
                conn.close(1011, "internal-error")
        self.wake_ready()

    def close(self, conn: YConn, doc_id: str) -> None:
        """`conn` is gone: out of its room, its device slot freed."""
        self.transports.pop(conn.number, None)
        self.rooms.leave(conn)
        self.wake_ready()
        if conn.lease is not None:
            conn.lease.release()
            conn.lease = None
        if conn.dropped_slow:
            log.warning("yws %d (%s): dropped: too slow", conn.number, conn.user)
            if self.events is not None:
                self.events.emit(
                    "client-dropped",
                    connection=conn.number,
                    user=conn.user,
                    space=conn.space_id,
                    doc=doc_id,
                    reason="too-slow",
                )
