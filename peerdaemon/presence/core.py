"""Presence without I/O: y-protocols awareness for many documents and many links.

`Awareness` keeps, per document (an environment id or `space:<id>`), this device's own state
and the states other clients sent, with the y-protocols rules: each client's state has a
clock, a higher clock wins, a `null` state removes a client, our own state is renewed every
`renew` seconds and a remote state nobody renewed for `timeout` seconds is dropped (30 s and 15 s,
as y-protocols). It takes the current time and returns what to send (`Send`: to every link but
one, or to one link) and what changed (`Change`); the shell (`service.py`) moves the bytes.

Where a state came from is remembered (`sources`: the links that delivered its current clock),
so that no ghost stays behind a closed link: when a link closes, the clients only it delivered
are removed (their removal relayed to the other links), and a client seen through two paths (a
LAN link and a hub) stays while one of them is up. Received changes are relayed to the other
links, only what changed (a higher clock, or the removal of a known state), as the hub's room
does: clients re-send what they apply, and relaying blindly multiplies messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.awareness import MAX_STATE, AwarenessEntry, decode_awareness, encode_awareness

__all__ = [
    "MAX_STATE",
    "RENEW",
    "TIMEOUT",
    "Awareness",
    "Change",
    "ClientState",
    "Send",
    "StateTooLarge",
]

TIMEOUT = 30.0
"""A remote state not renewed for this long is dropped (y-protocols' `outdatedTimeout`)."""
RENEW = 15.0
"""Our own states are re-sent (clock + 1) this often, so that others do not time them out."""


class StateTooLarge(ValueError):
    """A state over `MAX_STATE` bytes: refused (ours: the caller's error; a peer's: dropped)."""


@dataclass(frozen=True, slots=True)
class Send:
    """An awareness update (`payload`, the y-protocols encoding) of `doc` to send: to `to` only,
    or (`to` None) to every link except `exclude`."""

    doc: str
    payload: bytes
    exclude: str | None = None
    to: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A client's state of `doc` was added, changed or removed (`state` None)."""

    doc: str
    client: int
    state: dict[str, Any] | None


@dataclass(slots=True)
class ClientState:
    """A remote client's state of one document."""

    clock: int
    text: str  # the JSON text; "null" once removed
    updated: float
    sources: set[str] = field(default_factory=set)

    @property
    def removed(self) -> bool:
        return self.text == "null"


@dataclass(slots=True)
class _Local:
    clock: int
    text: str  # "null" once removed
    sent: float


class Awareness:
    """Every document's awareness on this device (module docstring)."""

    def __init__(
        self,
        client_id: int,
        *,
        timeout: float = TIMEOUT,
        renew: float = RENEW,
        max_state: int = MAX_STATE,
    ) -> None:
        self.client_id = client_id
        self.timeout = timeout
        self.renew = renew
        self.max_state = max_state
        self._local: dict[str, _Local] = {}
        self._remote: dict[str, dict[int, ClientState]] = {}
        self._sends: list[Send] = []
        self._changes: list[Change] = []
        self.refused = 0
        """Remote states dropped for being over `max_state`."""

    # -- outputs -------------------------------------------------------------------------------

    def sends(self) -> list[Send]:
        out, self._sends = self._sends, []
        return out

    def changes(self) -> list[Change]:
        out, self._changes = self._changes, []
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next run: a renewal or a timeout."""
        deadline = math.inf
        for local in self._local.values():
            if not local.text == "null":
                deadline = min(deadline, local.sent + self.renew)
        for clients in self._remote.values():
            for state in clients.values():
                if not state.removed:
                    deadline = min(deadline, state.updated + self.timeout)
        return None if deadline == math.inf else deadline

    # -- reading -------------------------------------------------------------------------------

    def docs(self) -> list[str]:
        """Documents with any live state (ours or others')."""
        out = {d for d, local in self._local.items() if local.text != "null"}
        out |= {d for d, c in self._remote.items() if any(not s.removed for s in c.values())}
        return sorted(out)

    def states(self, doc: str) -> dict[int, dict[str, Any]]:
        """Every live state of `doc`, ours included, by client id."""
        out: dict[int, dict[str, Any]] = {}
        local = self._local.get(doc)
        if local is not None and local.text != "null":
            out[self.client_id] = json.loads(local.text)
        for client, state in self._remote.get(doc, {}).items():
            if not state.removed:
                value = json.loads(state.text)
                out[client] = value if isinstance(value, dict) else {"value": value}
        return out

    def sources_of(self, doc: str, client: int) -> frozenset[str]:
        state = self._remote.get(doc, {}).get(client)
        return frozenset(state.sources) if state is not None else frozenset()

    def snapshot(self, doc: str) -> bytes | None:
        """Every state of `doc` we know (ours and the live remote ones) as one update: what a
        link that just opened is told; None if there is none."""
        entries = []
        local = self._local.get(doc)
        if local is not None and local.text != "null":
            entries.append(AwarenessEntry(self.client_id, local.clock, local.text))
        for client, state in self._remote.get(doc, {}).items():
            if not state.removed:
                entries.append(AwarenessEntry(client, state.clock, state.text))
        return encode_awareness(entries) if entries else None

    # -- our own state -------------------------------------------------------------------------

    def set_local(self, doc: str, state: dict[str, Any] | None, now: float) -> None:
        """Set (or, with None, remove) this device's state of `doc`; sent to every link if it
        changed. `StateTooLarge` over `max_state`."""
        text = "null" if state is None else json.dumps(state, separators=(",", ":"))
        if len(text.encode()) > self.max_state:
            size = len(text.encode())
            raise StateTooLarge(f"a presence state of {size} bytes (the cap is {self.max_state})")
        local = self._local.get(doc)
        if local is None:
            if state is None:
                return
            local = self._local[doc] = _Local(0, "null", now)
        elif local.text == text:
            return
        local.clock += 1
        local.text, local.sent = text, now
        self._send_local(doc, local)
        self._changes.append(Change(doc, self.client_id, state))
        if state is None:
            # forget it: a later set starts over above the clock others saw last
            self._local[doc] = _Local(local.clock, "null", now)

    def _send_local(self, doc: str, local: _Local) -> None:
        entry = AwarenessEntry(self.client_id, local.clock, local.text)
        self._sends.append(Send(doc, encode_awareness([entry])))

    # -- the links -----------------------------------------------------------------------------

    def receive(self, source: str, doc: str, payload: bytes, now: float) -> int:
        """An awareness update of `doc` from link `source`; -> how many entries were accepted.
        `AwarenessError` for bytes that are not one (the link's fault)."""
        entries = decode_awareness(payload)
        clients = self._remote.setdefault(doc, {})
        accepted: list[AwarenessEntry] = []
        for e in entries:
            if e.client == self.client_id:
                self._echo(doc, e, now)
                continue
            if len(e.state) > self.max_state:  # characters <= bytes: a cheap first check
                self.refused += 1
                continue
            if not e.removed and len(e.state.encode()) > self.max_state:
                self.refused += 1
                continue
            current = clients.get(e.client)
            if current is None:
                if e.removed:
                    continue  # the removal of a client we never knew: nothing to relay
                clients[e.client] = ClientState(e.clock, e.state, now, {source})
                accepted.append(e)
                self._changed(doc, e.client, e.state)
                continue
            if e.clock > current.clock or (
                e.clock == current.clock and e.removed and not current.removed
            ):
                changed = e.state != current.text
                current.clock, current.text, current.updated = e.clock, e.state, now
                current.sources = {source}
                accepted.append(e)
                if changed:
                    self._changed(doc, e.client, e.state)
            elif e.clock == current.clock and e.state == current.text:
                current.sources.add(source)  # the same state by another path
        if accepted:
            self._sends.append(Send(doc, encode_awareness(accepted), exclude=source))
        return len(accepted)

    def _echo(self, doc: str, e: AwarenessEntry, now: float) -> None:
        """Our own client id came back: someone removed us (or knows a higher clock): announce
        ourselves again above it, as y-protocols does."""
        local = self._local.get(doc)
        if local is None or local.text == "null" or e.clock < local.clock:
            return
        if e.clock == local.clock and e.state == local.text:
            return
        local.clock = e.clock + 1
        local.sent = now
        self._send_local(doc, local)

    def link_opened(self, source: str, docs: Iterable[str], now: float) -> None:
        """A link that syncs `docs` opened (or syncs more): tell it every state we know of them
        that it did not send us.

        Our own states go out with their clock raised by 2, to every link: whoever removed us
        when an earlier link closed holds our clock + 1 with a `null` state, and y-protocols
        ignores a state whose clock is not above it."""
        for doc in docs:
            local = self._local.get(doc)
            if local is not None and local.text != "null":
                local.clock += 2
                local.sent = now
                self._send_local(doc, local)
            entries = [  # not back to where they came from: it would count as a 2nd path
                AwarenessEntry(client, state.clock, state.text)
                for client, state in self._remote.get(doc, {}).items()
                if not state.removed and source not in state.sources
            ]
            if entries:
                self._sends.append(Send(doc, encode_awareness(entries), to=source))

    def link_closed(self, source: str, now: float) -> None:
        """A link is gone: remove the clients that only it delivered (relayed to the others)."""
        for doc, clients in self._remote.items():
            removed = []
            for client, state in clients.items():
                if source not in state.sources:
                    continue
                state.sources.discard(source)
                if state.sources or state.removed:
                    continue
                state.clock += 1
                state.text, state.updated = "null", now
                removed.append(AwarenessEntry(client, state.clock, "null"))
                self._changed(doc, client, "null")
            if removed:
                self._sends.append(Send(doc, encode_awareness(removed)))

    # -- time ----------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Renew our states that are due; drop remote ones nobody renewed for `timeout`.

        Time-outs are not relayed: every device times out the same silent client itself, and a
        relayed removal would race a renewal arriving by another path."""
        for doc, local in self._local.items():
            if local.text != "null" and now >= local.sent + self.renew:
                local.clock += 1
                local.sent = now
                self._send_local(doc, local)
        for doc, clients in self._remote.items():
            for client, state in clients.items():
                if not state.removed and now >= state.updated + self.timeout:
                    # the clock stays: the client's next renewal is above it
                    state.text, state.updated = "null", now
                    state.sources.clear()
                    self._changed(doc, client, "null")
        self._prune()

    def _prune(self) -> None:
        """Forget removed clients' clocks past a bound (every page reload is a new client)."""
        for doc in list(self._remote):
            clients = self._remote[doc]
            dead = [c for c, s in clients.items() if s.removed]
            if len(dead) > 10_000:
                for c in dead:
                    del clients[c]
            if not clients:
                del self._remote[doc]

    def _changed(self, doc: str, client: int, text: str) -> None:
        state = None if text == "null" else json.loads(text)
        if state is not None and not isinstance(state, dict):
            state = {"value": state}
        self._changes.append(Change(doc, client, state))
