"""Helpers for the peer tests: a SyncHost over a dict of pycrdt Docs, identities, space keys.

`FakeHost` follows the SyncHost contract of docs/architecture.md without the registry or the
store: docs belong to spaces by a plain mapping, every transaction's update goes to the change
listeners with its origin, like the real host. `MemoryConnection` is a `PeerConnection` with the
shell's one duty done in memory (received updates applied at once), for tests that read the
host right after `receive`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
from helpers import LOCAL
from pycrdt import Doc, Map

from peerdaemon.core.identity import Identity
from peerdaemon.model import MODEL_VERSION
from peerdaemon.peer import (
    Event,
    PeerConfig,
    PeerConnection,
    PeerManager,
    UpdateReceived,
    apply_update,
)
from peerdaemon.spaces import SpaceKey

EMPTY_UPDATE = b"\x00\x00"

__all__ = [
    "FAST",
    "Events",
    "FakeHost",
    "Identity",
    "MemoryConnection",
    "Node",
    "SpaceKey",
    "make_identity",
    "make_space",
]


def make_identity(name: str) -> Identity:
    return Identity.generate(name)


def make_space(space_id: str) -> SpaceKey:
    return SpaceKey(space_id, os.urandom(32))


class FakeHost:
    """docs: doc id -> (the spaces sharing it, its pycrdt Doc)."""

    def __init__(self, spaces: Iterable[SpaceKey] = ()) -> None:
        self.spaces: list[SpaceKey] = list(spaces)
        self.docs: dict[str, Doc] = {}
        self.shared: dict[str, set[str]] = {}
        self.applied: list[tuple[str, bytes, str]] = []
        self._listeners: dict[int, Callable[[str, bytes, str], None]] = {}
        self._docs_listeners: dict[int, Callable[[], None]] = {}
        self._next = 1
        self._origin: str | None = None

    # -- test controls ----------------------------------------------------------------------------

    def add_doc(
        self, doc_id: str, space_ids: Iterable[str], values: dict[str, Any] | None = None
    ) -> Doc:
        self.shared[doc_id] = set(space_ids)
        doc = self._doc(doc_id)
        if values:
            self.edit(doc_id, values)
        self.docs_changed()
        return doc

    def share(self, doc_id: str, space_id: str) -> None:
        self.shared.setdefault(doc_id, set()).add(space_id)
        self.docs_changed()

    def join(self, key: SpaceKey) -> None:
        self.spaces.append(key)
        self.docs_changed()

    def leave(self, space_id: str) -> None:
        self.spaces = [k for k in self.spaces if k.id != space_id]
        self.docs_changed()

    def edit(self, doc_id: str, values: dict[str, Any], origin: str = "local") -> None:
        doc = self._doc(doc_id)
        self._origin = origin
        try:
            with doc.transaction():
                m = doc.get("m", type=Map)
                for k, v in values.items():
                    m[k] = v
        finally:
            self._origin = None

    def values(self, doc_id: str) -> dict[str, Any]:
        doc = self.docs.get(doc_id)
        return dict(doc.get("m", type=Map).to_py() or {}) if doc is not None else {}

    def docs_changed(self) -> None:
        for fn in list(self._docs_listeners.values()):
            fn()

    def _doc(self, doc_id: str) -> Doc:
        doc = self.docs.get(doc_id)
        if doc is None:
            doc = self.docs[doc_id] = Doc()

            def on_transaction(event: Any, doc_id: str = doc_id) -> None:
                update = event.update
                if update != EMPTY_UPDATE:
                    origin = self._origin or "local"
                    for fn in list(self._listeners.values()):
                        fn(doc_id, update, origin)

            doc.observe(on_transaction)
        return doc

    # -- SyncHost ---------------------------------------------------------------------------------

    def space_keys(self) -> list[SpaceKey]:
        return list(self.spaces)

    def _mine(self, space_ids: Iterable[str]) -> set[str]:
        return set(space_ids) & {k.id for k in self.spaces}

    def docs_of(self, space_ids: Iterable[str]) -> list[str]:
        ids = self._mine(space_ids)
        return sorted(d for d, s in self.shared.items() if s & ids)

    def allowed(self, doc_id: str, space_ids: Iterable[str]) -> bool:
        return bool(self.shared.get(doc_id, set()) & self._mine(space_ids))

    def state_vector(self, doc_id: str) -> bytes | None:
        if doc_id not in self.shared:
            return None
        doc = self.docs.get(doc_id)
        return doc.get_state() if doc is not None else b"\x00"

    def diff(self, doc_id: str, state_vector: bytes) -> bytes:
        doc = self.docs.get(doc_id)
        if doc is None:
            return EMPTY_UPDATE
        return doc.get_update(state_vector)

    def apply(self, doc_id: str, update: bytes, origin: str) -> None:
        self.applied.append((doc_id, update, origin))
        doc = self._doc(doc_id)
        self._origin = origin
        try:
            doc.apply_update(update)
        except Exception as exc:
            raise ValueError(str(exc)) from None
        finally:
            self._origin = None

    def add_listener(self, fn: Callable[[str, bytes, str], None]) -> int:
        return self._add(self._listeners, fn)

    def remove_listener(self, token: int) -> None:
        self._listeners.pop(token, None)

    def add_docs_listener(self, fn: Callable[[], None]) -> int:
        return self._add(self._docs_listeners, fn)

    def remove_docs_listener(self, token: int) -> None:
        self._docs_listeners.pop(token, None)

    def _add(self, table: dict[int, Any], fn: Any) -> int:
        token = self._next
        self._next += 1
        table[token] = fn
        return token


# -- driving two sans-I/O connections in memory (like aioquic's roundtrip) ----------------------


class MemoryConnection(PeerConnection):
    """A `PeerConnection` whose received updates are applied through its host as soon as it
    reports them, as `Link` does after every message; every other event stays for
    `next_event`, so tests see the events a shell's owner sees."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._kept: deque[Event] = deque()
        super().__init__(*args, **kwargs)

    def receive(self, data: bytes | str, now: float) -> None:
        super().receive(data, now)
        self._apply()

    def next_event(self) -> Event | None:
        self._apply()
        return self._kept.popleft() if self._kept else None

    def _apply(self) -> None:
        while (event := super().next_event()) is not None:
            if isinstance(event, UpdateReceived):
                apply_update(self, event, self.host)  # type: ignore[arg-type]
            else:
                self._kept.append(event)


def drain_events(conn: Any) -> list[Any]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def exchange(a: Any, b: Any, now: float = 0.0, *, max_rounds: int = 100) -> tuple[int, int]:
    """Deliver everything each side sends until both are quiet; -> (messages a->b, b->a)."""
    sent_ab = sent_ba = 0
    for _ in range(max_rounds):
        out_a = a.data_to_send()
        for data in out_a:
            b.receive(data, now)
        out_b = b.data_to_send()
        for data in out_b:
            a.receive(data, now)
        sent_ab += len(out_a)
        sent_ba += len(out_b)
        if not out_a and not out_b:
            return sent_ab, sent_ba
    raise AssertionError("the connections never went quiet")


def wire(host: FakeHost, conns: Callable[[], Iterable[Any]]) -> None:
    """Fan a host's changes and doc-set changes out to its connections, as the manager does."""
    host.add_listener(
        lambda doc, update, origin: [c.local_update(doc, update, origin) for c in conns()]
    )
    host.add_docs_listener(lambda: [c.docs_changed() for c in conns()])


# -- peer managers over real websockets on 127.0.0.1 (test_peer_link.py, test_peer_limits.py)
FAST = PeerConfig(backoff_initial=0.05, backoff_max=0.4, connect_timeout=2.0, close_grace=0.5)


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **data: Any) -> None:
        self.items.append((type_, data))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [d for t, d in self.items if t == type_]


class Node:
    """One daemon's peer side: identity, host, events, manager (restartable)."""

    def __init__(
        self, name: str, *spaces: Any, config: PeerConfig = FAST, model: int = MODEL_VERSION
    ) -> None:
        self.identity = make_identity(name)
        self.host = FakeHost(spaces)
        self.events = Events()
        self.config = config
        self.model = model
        self.manager: PeerManager | None = None
        self.port: int | None = None

    @property
    def id(self) -> str:
        return self.identity.device_id

    def new_manager(
        self, static: list[tuple[str, int]] | None = None, listen: bool = True
    ) -> PeerManager:
        self.manager = PeerManager(
            self.identity,
            self.host,
            self.events,
            listen=(LOCAL, self.port or 0) if listen else None,
            static_peers=static or [],
            config=self.config,
            model=self.model,
        )
        return self.manager

    @asynccontextmanager
    async def running(
        self, static: list[tuple[str, int]] | None = None, listen: bool = True
    ) -> AsyncIterator[PeerManager]:
        manager = self.new_manager(static, listen)
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(manager.run)
            yield manager
            nursery.cancel_scope.cancel()

    def row(
        self, device: str | None = None, *, address: str | None = None
    ) -> dict[str, Any] | None:
        assert self.manager is not None
        for r in self.manager.peers():
            if (device is not None and r["device"] == device) or (
                address is not None and r["address"] == address
            ):
                return r
        return None

    def state(self, other: Node) -> str | None:
        r = self.row(other.id)
        return r["state"] if r else None
