"""The hub keeps in memory only the documents in use (docs/hub.md, "Storage"): sizes at start,
content on demand, dropped after two idle checkpoints unless a client holds the room or
something waits for the disk or the relay; a dropped document gives clients, daemons' links and
the Cloud Mock the same state; kill -9 after dropping loses nothing."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
from helpers import SPACE, client, running_hub, setup_accounts, until
from mockutil import require_runner, small_env
from pycrdt import Doc, Map, Text

from peerdaemon.core.events import EventLog
from peerdaemon.hub.docs import IDLE_SWEEPS, HubDocs
from peerdaemon.hub.ywebsocket import (
    SYNC_STEP1,
    SYNC_STEP2,
    Outbox,
    Rooms,
    YConn,
    decode_message,
    sync_step1,
)
from peerdaemon.store import Store

HERE = Path(__file__).resolve().parent
CHILD = HERE / "hub_evict_child.py"
TIMEOUT = 60.0
SWEEP = 30.0


def edit(doc: Doc, key: str, value: object) -> bytes:
    before = doc.get_state()
    doc.get("m", type=Map)[key] = value
    return doc.get_update(before)


def content(doc: Doc) -> dict:
    return {"m": dict(doc.get("m", type=Map)), "t": str(doc.get("t", type=Text))}


async def seed(data_dir: Path) -> dict[str, Doc]:
    """Three stored documents of SPACE (written through HubDocs, as clients do)."""
    sources = {f"env-{i}": Doc() for i in range(3)}
    with Store.open(data_dir) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            tickets = []
            for i, (doc_id, src) in enumerate(sources.items()):
                src.get("t", type=Text).insert(0, f"text {i} " * 50)
                tickets.append(docs.apply(SPACE, doc_id, src.get_update(), "peer:X"))
                for k in range(20):
                    tickets.append(docs.apply(SPACE, doc_id, edit(src, f"k{k}", k * i), "peer:X"))
            for ticket in tickets:
                await ticket.wait()
            nursery.cancel_scope.cancel()
    return sources


async def test_only_sizes_are_read_at_start_and_content_when_used(tmp_path: Path) -> None:
    sources = await seed(tmp_path)
    with Store.open(tmp_path) as store:
        stored = {k: v.updates for k, v in store.load().items()}
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        assert docs.load() == 3
        assert docs.stats()["loaded"] == 0
        assert docs.has(SPACE, "env-1") and not docs.has(SPACE, "env-9")
        assert docs.env_count(SPACE) == 3
        assert docs.size(SPACE, "env-1") == sum(len(u) for u in stored[f"{SPACE}/env-1"])
        assert docs.stored_bytes == sum(len(u) for us in stored.values() for u in us)
        assert docs.stats()["loaded"] == 0  # none of that read a document's content
        assert content(docs.get_doc(SPACE, "env-1")) == content(sources["env-1"])
        assert docs.stats()["loaded"] == 1
        assert docs.is_loaded(SPACE, "env-1") and not docs.is_loaded(SPACE, "env-2")
        sv = sources["env-2"].get_state()
        assert docs.state_vector(SPACE, "env-2") == sv
        assert docs.stats()["loaded"] == 2


def join(rooms: Rooms, number: int, doc_id: str) -> YConn:
    conn = YConn(number, Outbox(), user="u")
    rooms.join(SPACE, doc_id, conn)
    return conn


def synced(rooms: Rooms, conn: YConn) -> Doc:
    """What a new client gets: the server's step 1, then its answer to the client's step 1."""
    (first,) = [decode_message(bytes(f)) for f in conn.outbox.take()]
    assert first.sub == SYNC_STEP1
    rooms.receive(conn, sync_step1(b"\x00"))
    (answer,) = [decode_message(bytes(f)) for f in conn.outbox.take()]
    assert answer.sub == SYNC_STEP2
    doc = Doc()
    doc.apply_update(answer.payload)
    return doc


async def test_idle_documents_are_dropped_and_come_back_the_same(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The sweep runs every `SWEEP` seconds (a mock clock): a document nobody holds goes after
    two idle checkpoints, one whose room has a client stays; a client of a dropped document
    gets the same state as before, and its edits apply to it."""
    sources = await seed(tmp_path)
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=SWEEP)
        docs.load()
        rooms = Rooms(docs)
        docs.in_use = lambda space, doc: (space, doc) in rooms.rooms
        docs.add_listener(rooms.on_update)
        docs.add_flush_listener(rooms.flush)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            held = join(rooms, 1, "env-0")
            assert content(synced(rooms, held)) == content(sources["env-0"])
            passer = join(rooms, 2, "env-1")
            assert content(synced(rooms, passer)) == content(sources["env-1"])
            rooms.leave(passer)
            await trio.sleep(SWEEP * (IDLE_SWEEPS - 1) + 1)
            assert docs.is_loaded(SPACE, "env-1")  # one idle checkpoint is not enough
            await trio.sleep(SWEEP)
            assert not docs.is_loaded(SPACE, "env-1")
            assert docs.is_loaded(SPACE, "env-0")  # its client is still there
            await trio.sleep(SWEEP * 10)
            assert docs.is_loaded(SPACE, "env-0")
            assert docs.stats()["loaded"] == 1 and docs.evictions == 1

            again = join(rooms, 3, "env-1")
            assert docs.is_loaded(SPACE, "env-1")
            back = synced(rooms, again)
            assert content(back) == content(sources["env-1"])
            assert back.get_state() == sources["env-1"].get_state()
            # the client's edit goes to the reloaded document, the store and the other client
            rooms.leave(held)
            other = join(rooms, 4, "env-1")
            synced(rooms, other)
            ticket = docs.apply(SPACE, "env-1", edit(back, "after", "reload"), again.origin)
            assert ticket is not None
            await ticket.wait()
            with trio.fail_after(5):
                while not other.outbox.take():
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    with Store.open(tmp_path) as store:
        reread = HubDocs(store, EventLog())
        reread.load()
        expected = content(sources["env-1"])
        expected["m"]["after"] = "reload"
        assert content(reread.get_doc(SPACE, "env-1")) == expected


async def test_nothing_waiting_for_the_disk_or_the_relay_is_dropped(tmp_path: Path) -> None:
    await seed(tmp_path)
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        docs.load()
        src = Doc()
        src.apply_update(docs.diff(SPACE, "env-0", b"\x00"))
        ticket = docs.apply(SPACE, "env-0", edit(src, "new", 1), "peer:X")
        assert ticket is not None
        for _ in range(IDLE_SWEEPS + 2):  # no writer: the update is not on disk
            docs.sweep()
        assert docs.is_loaded(SPACE, "env-0")
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await ticket.wait()  # on disk, but the relay has not handed it on
            for _ in range(IDLE_SWEEPS + 2):
                docs.sweep()
            assert docs.is_loaded(SPACE, "env-0")
            relayed: list[bytes] = []
            docs.add_listener(lambda space, doc, update, origin: relayed.append(update))
            await nursery.start(docs.run)
            with trio.fail_after(5):
                while docs.stats()["relay_queued"]:
                    await trio.sleep(0.01)
            assert relayed
            for _ in range(IDLE_SWEEPS):
                docs.sweep()
            assert not docs.is_loaded(SPACE, "env-0")
            assert dict(docs.get_doc(SPACE, "env-0").get("m", type=Map))["new"] == 1
            nursery.cancel_scope.cancel()


async def test_a_remote_update_to_a_dropped_document_is_relayed_though_stored_already(
    tmp_path: Path,
) -> None:
    """A cluster (docs/hub-cluster.md): another process commits an update to PostgreSQL and
    appends it to the room's stream; this process, whose copy was dropped, reads it back from
    the store when the stream entry arrives, so applying the entry changes nothing here. The
    daemons this process serves still have not got it: it must be relayed all the same."""
    await seed(tmp_path)
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        docs.load()
        relayed: list[tuple[bytes, str]] = []
        docs.add_listener(lambda space, doc, update, origin: relayed.append((update, origin)))
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            src = Doc()
            src.apply_update(docs.diff(SPACE, "env-0", b"\x00"))
            update = edit(src, "elsewhere", 1)
            ticket = docs.apply(SPACE, "env-0", update, "peer:X")  # (the other process's commit)
            assert ticket is not None
            await ticket.wait()
            with trio.fail_after(5):
                while docs.stats()["relay_queued"]:
                    await trio.sleep(0.01)
            for _ in range(IDLE_SWEEPS):
                docs.sweep()
            assert not docs.is_loaded(SPACE, "env-0")
            relayed.clear()
            assert docs.apply(SPACE, "env-0", update, "other:yws", remote=True) is None
            with trio.fail_after(5):
                while not relayed:
                    await trio.sleep(0.01)
            assert relayed == [(update, "other:yws")]
            # loaded and holding it, the same entry again is a duplicate: not relayed twice
            docs.apply(SPACE, "env-0", update, "other:yws", remote=True)
            assert docs.stats()["relay_queued"] == 0 and len(relayed) == 1
            nursery.cancel_scope.cancel()


async def test_a_dropped_document_serves_a_yjs_client_and_the_cloud_mock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real hub: the space document and an environment dropped, then a y-websocket client
    gets the state it had, and an edit reaches the Cloud Mock, which keeps the environment's
    JSON (not its document) while it serves it."""
    from test_hub_cloudmock import Hosted, http, served

    require_runner(monkeypatch)
    tokens = setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path) as server:
        hosted = Hosted(server)
        env_id = hosted.add(small_env())
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        async with client(server, SPACE, "notes", tokens["alice"]) as a:
            await a.edit("k", "v")
            await a.wait_for(lambda: True)
        await until(lambda: (SPACE, "notes") not in server.rooms.rooms)  # its client is gone
        await until(lambda: not server.docs.stats()["relay_queued"])
        for _ in range(IDLE_SWEEPS):
            server.docs.sweep()
        assert not server.docs.is_loaded(SPACE, env_id)
        assert not server.docs.is_loaded(SPACE, "space:" + SPACE)
        assert not server.docs.is_loaded(SPACE, "notes")
        async with client(server, SPACE, "notes", tokens["alice"]) as b:
            assert b.map() == {"k": "v"}
        hosted.edit(env_id, lambda e: e["routes"][0]["responses"][0].update(body="edited"))
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"edited"))
        status, _, _ = await http(server, hosted.path(env_id, "hello"))
        assert status == 200


# ---------------------------------------------------------------------------- kill -9


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


def test_kill9_after_dropping_documents_loses_nothing(tmp_path: Path) -> None:
    """A child applies updates to a few documents, waiting for each to be durable (the hub's
    promise) and dropping them from memory between rounds, so that most updates go to a
    reloaded document; SIGKILLed, the store holds every update it printed."""
    stderr_path = tmp_path / "child.stderr"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path / "hub")],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    lines: queue.Queue = queue.Queue()
    pump = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
    pump.start()
    raw: list[bytes] = []
    evicted = 0
    try:
        while len(raw) < 300 or evicted < 5:
            line = lines.get(timeout=TIMEOUT)
            assert line is not None, stderr_path.read_text()
            if line.startswith(b"EVICTED"):
                evicted += 1
            else:
                raw.append(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=TIMEOUT)
    pump.join(timeout=TIMEOUT)
    assert child.returncode == -signal.SIGKILL
    while (line := lines.get_nowait()) is not None:
        raw.append(line)
    acked: dict[str, set[str]] = {}
    for line in raw:
        if line.endswith(b"\n") and not line.startswith(b"EVICTED"):
            doc_id, key = line.decode().split()
            acked.setdefault(doc_id, set()).add(key)
    with Store.open(tmp_path / "hub") as store:
        docs = HubDocs(store, EventLog())
        docs.load()
        for doc_id, keys in acked.items():
            doc = docs.get_doc("team", doc_id)  # (the child's space)
            assert doc is not None
            missing = keys - set(doc.get("m", type=Map).keys())
            assert not missing, f"{doc_id}: acknowledged updates lost: {sorted(missing)[:5]}"
