"""Bounding the incoming connections that have not authenticated yet, in total and per remote
address: the LAN listener (`peer.link.serve`) and the hub's port (`hub.admission`) both use it.

A connection is admitted (`Admission.admit`) when it is accepted and gets a `Slot`, released
once it has authenticated or has ended. One more past either limit is refused at once: both
listeners answer HTTP `503` with the body `busy\\n` (docs/peer-protocol.md section 7,
"Connections in their handshake"; docs/hub.md, "Connections").
"""

from __future__ import annotations

__all__ = ["BUSY_BODY", "BUSY_STATUS", "Admission", "Slot"]

BUSY_STATUS = 503
BUSY_BODY = b"busy\n"


class Slot:
    """One admitted connection's place among the unauthenticated ones; `release` when it
    authenticates or ends (idempotent)."""

    __slots__ = ("_admission", "ip")

    def __init__(self, admission: Admission, ip: str) -> None:
        self._admission: Admission | None = admission
        self.ip = ip

    @property
    def released(self) -> bool:
        return self._admission is None

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.ip)


class Admission:
    """Counts incoming connections that have not authenticated yet, in total and per remote
    address, and refuses one more past either limit."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.count = 0
        self.by_ip: dict[str, int] = {}
        self.refused = 0

    def admit(self, ip: str) -> Slot | None:
        if self.count >= self.total or self.by_ip.get(ip, 0) >= self.per_ip:
            self.refused += 1
            return None
        self.count += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return Slot(self, ip)

    def _release(self, ip: str) -> None:
        self.count -= 1
        left = self.by_ip[ip] - 1
        if left:
            self.by_ip[ip] = left
        else:
            del self.by_ip[ip]
