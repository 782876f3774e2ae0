"""Connections that have not authenticated yet, on the hub's port (docs/hub.md, "Connections in
their handshake"): the same bounds as the LAN listener (`peer.admission`).

Every accepted connection holds a `Slot` until it is answered (plain HTTP), its token is
accepted (`/yjs`) or the daemon's auth is (`/peer`: the endpoint releases `ws.slot`), or it
ends. Past `max_half_open` in total or `max_half_open_per_ip` from one address, one more is
answered `503 busy` at once and closed (`HubAdmission.refuse`). A websocket still holding its
slot `handshake_timeout` + `CLOSE_TIMEOUT` after its upgrade is cut (`HandshakeWatch`, a rule
the connection's core applies on its timer).
"""

from __future__ import annotations

import logging
import math

import trio

from ..peer import BUSY_BODY, BUSY_STATUS, Admission, Slot
from .transport import CLOSE_TIMEOUT, BadRequest, HttpExchange

__all__ = ["REFUSE_TIMEOUT", "HandshakeWatch", "HubAdmission"]

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


class HubAdmission:
    """Admits each accepted connection (a `Slot`), or refuses it with `503 busy`."""

    def __init__(self, max_half_open: int, max_half_open_per_ip: int) -> None:
        self.admission = Admission(max_half_open, max_half_open_per_ip)
        """Connections not authenticated yet (every path), in total and per remote address."""
        self._refusing = 0

    def admit(self, remote: tuple[str, int] | None) -> Slot | None:
        return self.admission.admit(remote[0] if remote is not None else "?")

    async def refuse(self, stream: trio.abc.Stream, remote: tuple[str, int] | None) -> None:
        """Over the half-open limits: `503 busy` and close, at once. The request head is read
        first (closing with it unread would reset the connection before the client reads the
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
