"""A store that cannot be read right now (PostgreSQL away, issue 14) is not a document that is
gone: HubDocs keeps it known and reads it once the store answers; stores that would block the
event loop are read ahead in a worker thread (`load_ahead`), and a daemon's link shows it a
document only once read (hub/peers.py `_ScopedDocs`). With a fake store; the real servers are
tests/test_cluster_daemon_loads.py's."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from pycrdt import Doc, Map

from peerdaemon.core.events import EventLog
from peerdaemon.hub.docs import SPACE_PREFIX, HubDocs, StoreUnavailable
from peerdaemon.hub.peers import _ScopedDocs
from peerdaemon.spaces import ENVIRONMENTS, SHARED
from peerdaemon.store import Ticket

SPACE = "s1"
ENV = "env1"


def _update(**values: Any) -> bytes:
    doc = Doc()
    m = doc.get("m", type=Map)
    for k, v in values.items():
        m[k] = v
    return doc.get_update()


def _space_doc(*envs: str) -> bytes:
    doc = Doc()
    shared = doc.get(ENVIRONMENTS, type=Map)
    for env in envs:
        shared[env] = {"state": SHARED}
    return doc.get_update()


class FakeStore:
    """What HubDocs uses of a store; `up` False: reads fail as PostgreSQL's do when it is away.
    `read_updates` (async) makes it a store that `needs_read` (the cluster's)."""

    def __init__(self, docs: dict[str, list[bytes]], *, async_reads: bool = True) -> None:
        self.docs = docs
        self.up = True
        self.sync_reads = 0
        self.async_reads = 0
        if not async_reads:
            self.read_updates = None  # type: ignore[assignment]

    def sizes(self) -> dict[str, tuple[int, int, int]]:
        return {k: (sum(map(len, v)), 0, 0) for k, v in self.docs.items()}

    def updates_of(self, key: str) -> list[bytes]:
        self.sync_reads += 1
        if not self.up:
            raise StoreUnavailable("postgresql: connection refused")
        return list(self.docs.get(key, []))

    async def read_updates(self, key: str) -> list[bytes]:  # type: ignore[no-redef]
        self.async_reads += 1
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise OSError("connection refused")
        return list(self.docs.get(key, []))

    def enqueue_append(self, key: str, update: bytes) -> Ticket:
        self.docs.setdefault(key, []).append(update)
        ticket = Ticket()
        ticket._complete()
        return ticket

    def enqueue_compact(self, key: str, snapshot: bytes) -> Ticket:
        ticket = Ticket()
        ticket._complete()
        return ticket


def _docs(store: FakeStore) -> HubDocs:
    docs = HubDocs(store, EventLog(), sweep_interval=None)  # type: ignore[arg-type]
    docs.load()
    return docs


def _keys(doc: Doc | None) -> set[str]:
    assert doc is not None
    return set(doc.get("m", type=Map).keys())


def test_a_store_away_does_not_forget_a_document() -> None:
    store = FakeStore({f"{SPACE}/{ENV}": [_update(a=1, b=2)]}, async_reads=False)
    docs = _docs(store)
    size, count = docs.size(SPACE, ENV), docs.env_count(SPACE)
    store.up = False
    with pytest.raises(StoreUnavailable):
        docs.get_doc(SPACE, ENV)
    with pytest.raises(StoreUnavailable):  # an update cannot start it again from scratch
        docs.apply(SPACE, ENV, _update(c=3), "daemon")
    assert docs.has(SPACE, ENV) and not docs.is_loaded(SPACE, ENV)
    assert (docs.size(SPACE, ENV), docs.env_count(SPACE)) == (size, count)
    store.up = True
    assert _keys(docs.get_doc(SPACE, ENV)) == {"a", "b"}  # all of it, once it answers
    docs.apply(SPACE, ENV, _update(c=3), "daemon")
    assert _keys(docs.get_doc(SPACE, ENV)) == {"a", "b", "c"}


def test_unreadable_bytes_are_still_skipped() -> None:
    store = FakeStore({f"{SPACE}/{ENV}": [b"\xff\xfe garbage"]}, async_reads=False)
    docs = _docs(store)
    assert docs.get_doc(SPACE, ENV) is None
    assert not docs.has(SPACE, ENV)


async def test_load_ahead_reads_off_the_event_loop_and_waits_for_the_store() -> None:
    store = FakeStore({f"{SPACE}/{ENV}": [_update(a=1)]})
    docs = _docs(store)
    assert docs.needs_read(SPACE, ENV)
    store.up = False
    with pytest.raises(StoreUnavailable):
        await docs.load_ahead(SPACE, ENV)
    assert docs.has(SPACE, ENV) and docs.needs_read(SPACE, ENV)
    store.up = True
    await docs.load_ahead(SPACE, ENV)
    assert docs.is_loaded(SPACE, ENV) and not docs.needs_read(SPACE, ENV)
    assert _keys(docs.get_doc(SPACE, ENV)) == {"a"}
    assert (store.async_reads, store.sync_reads) == (2, 0)


class _Endpoint:
    def __init__(self, docs: HubDocs) -> None:
        self.hub_docs = docs

    def envs_of(self, space: str) -> frozenset[str]:
        return frozenset(self.hub_docs.env_ids(space))

    def space_limits(self, space: str) -> Any:
        return None

    def space_doc_changed(self, space: str) -> None:
        pass


class _Auth:
    accepted = frozenset({SPACE})


class _Conn:
    def __init__(self) -> None:
        self.closed: tuple[str, str] | None = None

    def close(self, reason: str, detail: str = "") -> None:
        self.closed = (reason, detail)


async def test_a_daemons_link_is_shown_documents_once_read_ahead() -> None:
    store = FakeStore(
        {f"{SPACE}/{SPACE_PREFIX}{SPACE}": [_space_doc(ENV)], f"{SPACE}/{ENV}": [_update(a=1)]}
    )
    docs = _docs(store)
    host = _ScopedDocs(_Endpoint(docs), _Auth())  # type: ignore[arg-type]
    host.wakeup = trio.Event()
    host.conn = _Conn()
    assert host.docs_of([SPACE]) == []  # nothing read in the event loop...
    assert host.wanted == {(SPACE, SPACE_PREFIX + SPACE)} and host.wakeup.is_set()
    assert not host.allowed(ENV, [SPACE])
    await docs.load_ahead(SPACE, SPACE_PREFIX + SPACE)  # ...what the link's loader does
    # the environment waits for its read; its files (not stored: nothing to read) do not
    assert host.docs_of([SPACE]) == [SPACE_PREFIX + SPACE, f"files:{ENV}"]
    assert (SPACE, ENV) in host.wanted and not host.allowed(ENV, [SPACE])
    await docs.load_ahead(SPACE, ENV)
    assert host.docs_of([SPACE]) == [SPACE_PREFIX + SPACE, ENV, f"files:{ENV}"]
    assert host.diff(ENV, b"\x00") != b"\x00\x00"
    assert store.sync_reads == 0
    # shown, then dropped from memory, then the store is away: the link closes to redial
    docs.sweep(), docs.sweep()
    assert not docs.is_loaded(SPACE, ENV)
    store.up = False
    host.apply(ENV, _update(b=2), "daemon")
    assert host.conn.closed is not None and host.conn.closed[0] == "shutdown"
    assert docs.has(SPACE, ENV)


async def test_a_remote_update_waits_for_its_document_and_reaches_the_listeners(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another process's update of a document not in memory here: read off the event loop,
    and while the store is away held, not dropped (`ClusterNode._apply_remote`)."""
    pytest.importorskip("psycopg")
    pytest.importorskip("coredis")
    from peerdaemon.hub.cluster.node import ClusterNode

    store = FakeStore({f"{SPACE}/{ENV}": [_update(a=1)]})
    docs = _docs(store)
    heard: list[bytes] = []
    both = trio.Event()

    def listener(space: str, doc: str, update: bytes, origin: str) -> None:
        heard.append(update)
        if len(heard) == 2:
            both.set()

    docs.add_listener(listener)
    node = ClusterNode("redis://127.0.0.1:1", "host=127.0.0.1 port=1")
    node.docs = docs
    node.store = type("S", (), {"RETRY_AFTER": 0.05})()  # type: ignore[assignment]
    store.up = False
    async with trio.open_nursery() as nursery:
        node.nursery = nursery
        nursery.start_soon(docs.run)
        node._apply_remote(SPACE, ENV, _update(b=2), "p2:hub")
        node._apply_remote(SPACE, ENV, _update(c=3), "p2:hub")
        await trio.sleep(1.0)  # (virtual time) it tries, and fails, several times meanwhile
        assert store.async_reads > 5 and not heard
        assert docs.has(SPACE, ENV) and not docs.is_loaded(SPACE, ENV)
        store.up = True
        with trio.fail_after(5):
            await both.wait()
        assert _keys(docs.get_doc(SPACE, ENV)) == {"a", "b", "c"}
        assert store.sync_reads == 0
        nursery.cancel_scope.cancel()


def test_the_cluster_store_does_not_ask_postgresql_in_the_event_loop_again_at_once() -> None:
    """A load in the trio thread that found PostgreSQL away is not tried again for
    `RETRY_AFTER` s: one that does not answer would stall every room at each load."""
    psycopg = pytest.importorskip("psycopg")
    pytest.importorskip("coredis")
    from types import SimpleNamespace

    from peerdaemon.hub.cluster.node import ClusterStore

    node = SimpleNamespace(dsn="host=127.0.0.1 port=1", docstore=SimpleNamespace(on_commit=None))
    store = ClusterStore(node)  # type: ignore[arg-type]
    asked: list[str] = []

    def away(fn: Any) -> Any:
        asked.append("q")
        raise psycopg.OperationalError("connection refused")

    store._loader._run = away  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            store.updates_of(f"{SPACE}/{ENV}")
    assert len(asked) == store.sync_loads == 1
    store._unreachable_at -= store.RETRY_AFTER  # a second later: asked again
    with pytest.raises(StoreUnavailable):
        store.updates_of(f"{SPACE}/{ENV}")
    assert len(asked) == 2
    store.close()
