"""Connections that have not authenticated yet, on the hub's port (docs/hub.md, "Connections in
their handshake"): what they may cost, and who waits.

Every accepted connection needs a `Slot` (`core.admission`'s counting) before its request head
is read, and holds it until it is answered (plain HTTP), its token is accepted (`/yjs`) or the
daemon's auth is (`/peer`: the endpoint releases `ws.slot`), or it ends. At most
`max_half_open` slots are held at once, `max_half_open_per_ip` from one address: what they bound
is the memory of connections being read (a request head of up to 16 KiB each, a handshake),
which a slow opener (slowloris) holds for as long as it is allowed to.

A connection past those limits is not refused: it waits for a slot (`Waiter`), first come first
served among the addresses that may take one, holding only its socket (nothing is read from
it), for at most `head_timeout`. So a burst of fast, complete handshakes (a page of tabs, a
reconnect storm after a restart, a proxy's many clients on one address) is served as fast as
the hub can handshake, while slow openers use up their own address's slots and time out. Only
past `max_waiting` waiting connections, or when its wait ran out, is one answered `503 busy`
(`HubAdmission.refuse`). A websocket still holding its slot `handshake_timeout` +
`CLOSE_TIMEOUT` after its upgrade is cut (`HandshakeWatch`, a rule the connection's core
applies on its timer).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque

import trio

from ..core.admission import BUSY_BODY, BUSY_STATUS, Admission, Slot
from .transport import CLOSE_TIMEOUT, BadRequest, HttpExchange

__all__ = ["REFUSE_TIMEOUT", "HandshakeWatch", "HubAdmission", "QueuedAdmission", "Waiter"]

log = logging.getLogger("peerdaemon.hub.admission")

REFUSE_TIMEOUT = 1.0
"""How long refusing one connection over the limits may take (reading its request head)."""


class HandshakeWatch:
    """Without I/O: a connection whose `slot` is still held at `deadline` (not authenticated in
    time) is to be cut. `WsConn` asks it on its timer."""

    __slots__ = ("slot", "deadline")

    def __init__(self, slot: Slot, deadline: float) -> None:
        self.slot = slot
        self.deadline = deadline

    @classmethod
    def after_upgrade(cls, slot: Slot, now: float, handshake_timeout: float) -> HandshakeWatch:
        """The hub's rule: `handshake_timeout` to authenticate, plus the time to close politely
        (the `/peer` protocol closes its own late daemons at `handshake_timeout`)."""
        return cls(slot, now + handshake_timeout + CLOSE_TIMEOUT)

    def get_timer(self) -> float:
        return math.inf if self.slot.released else self.deadline

    def expired(self, now: float) -> bool:
        return not self.slot.released and now >= self.deadline


class Waiter:
    """A connection waiting for a slot: `slot` is set (and `granted` called) when it gets one;
    `cancel()` if it stops waiting."""

    __slots__ = ("ip", "order", "slot", "granted", "cancelled")

    def __init__(self, ip: str, order: int) -> None:
        self.ip = ip
        self.order = order
        self.slot: Slot | None = None
        self.granted: trio.Event | None = None
        self.cancelled = False


class QueuedAdmission(Admission):
    """`Admission` whose connections past a limit wait in line (without I/O): `enter` gives a
    `Slot`, a `Waiter`, or None (the line is full); each released slot goes to the longest
    waiting connection whose address is under its own limit."""

    def __init__(self, total: int, per_ip: int, max_waiting: int) -> None:
        super().__init__(total, per_ip)
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lines: dict[str, deque[Waiter]] = {}  # address -> its waiting connections, in order
        self._order = itertools.count()

    def _has_room(self, ip: str) -> bool:
        return self.count < self.total and self.by_ip.get(ip, 0) < self.per_ip

    def _take(self, ip: str) -> Slot:
        self.count += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return Slot(self, ip)

    def enter(self, ip: str) -> Slot | Waiter | None:
        if self._has_room(ip) and ip not in self._lines:  # nobody from there is waiting first
            return self._take(ip)
        if self.waiting >= self.max_waiting:
            self.refused += 1
            return None
        waiter = Waiter(ip, next(self._order))
        self._lines.setdefault(ip, deque()).append(waiter)
        self.waiting += 1
        self._grant()  # the total may have room for the line's first
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """`waiter` stopped waiting (timed out, or left); a slot it got meanwhile is released."""
        if waiter.slot is not None:
            waiter.slot.release()
        elif not waiter.cancelled:
            waiter.cancelled = True
            self.waiting -= 1

    def _release(self, ip: str) -> None:
        super()._release(ip)
        self._grant()

    def _grant(self) -> None:
        while self.waiting and self.count < self.total:
            best: deque[Waiter] | None = None
            for line in self._lines.values():
                while line and line[0].cancelled:
                    line.popleft()
                if line and self.by_ip.get(line[0].ip, 0) < self.per_ip:
                    if best is None or line[0].order < best[0].order:
                        best = line
            if best is None:
                self._lines = {ip: line for ip, line in self._lines.items() if line}
                return
            waiter = best.popleft()
            if not best:
                del self._lines[waiter.ip]
            self.waiting -= 1
            waiter.slot = self._take(waiter.ip)
            if waiter.granted is not None:
                waiter.granted.set()


class HubAdmission:
    """Admits each accepted connection (a `Slot`), at once or after its wait, or refuses it
    with `503 busy`."""

    def __init__(
        self, max_half_open: int, max_half_open_per_ip: int, max_waiting: int, wait_timeout: float
    ) -> None:
        self.admission = QueuedAdmission(max_half_open, max_half_open_per_ip, max_waiting)
        """Connections not authenticated yet (every path), in total and per remote address."""
        self.wait_timeout = wait_timeout
        self._refusing = 0

    async def admit(self, stream: trio.abc.Stream, remote: tuple[str, int] | None) -> Slot | None:
        """A slot for this connection, waiting for one if need be; None if it was refused
        (answered `503 busy` and closed)."""
        got = self.admission.enter(remote[0] if remote is not None else "?")
        if isinstance(got, Slot):
            return got
        if got is not None:
            try:
                if got.slot is None:
                    got.granted = trio.Event()
                    with trio.move_on_after(self.wait_timeout):
                        await got.granted.wait()
            finally:
                if got.slot is None:
                    self.admission.cancel(got)
            if got.slot is not None:
                return got.slot
            self.admission.refused += 1
        await self.refuse(stream, remote)
        return None

    async def refuse(self, stream: trio.abc.Stream, remote: tuple[str, int] | None) -> None:
        """Over the limits: `503 busy` and close, at once. The request head is read first
        (closing with it unread would reset the connection before the client reads the
        answer), for at most `REFUSE_TIMEOUT`; while as many are being refused as may be half
        open, just hang up."""
        log.debug("hub connection from %s refused: busy", remote)
        if self._refusing >= self.admission.total:
            await trio.aclose_forcefully(stream)
            return
        self._refusing += 1
        try:
            with trio.move_on_after(REFUSE_TIMEOUT):
                exchange = HttpExchange(stream)
                try:
                    if await exchange.read_request() is None:
                        return  # the client left: nobody to answer
                except BadRequest:
                    pass  # busy all the same
                await exchange.respond(BUSY_STATUS, BUSY_BODY, content_type="text/plain")
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)
