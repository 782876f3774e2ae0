"""A client asking for the whole state (the empty state vector: a client that joins) is answered
from a cache while the document is unchanged (hub/docs.py, `_Entry.whole_state`): encoding a
15 MB environment takes tens of ms, and a reconnect storm asks for it once per client. What it
gets must always be the document as it is now. And the CRDT library is ready before the first
document is made, so that its clients do not wait for an import (a fresh hub's first fan-out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio
from pycrdt import Array, Doc, Map, Text, merge_updates

from peerdaemon.core.events import EventLog
from peerdaemon.hub.docs import EMPTY_STATE_VECTOR, HubDocs
from peerdaemon.store import Store

SPACE = "s1"
ENV = "env-1"


def replica(update: bytes) -> Doc:
    doc = Doc()
    doc.apply_update(update)
    return doc


def texts(doc: Doc) -> dict[str, str]:
    return {k: str(v) for k, v in doc.get("m", type=Map).items()}


def edit(doc: Doc, key: str, text: str) -> bytes:
    before = doc.get_state()
    doc.get("m", type=Map)[key] = Text(text)
    return doc.get_update(before)


def test_a_document_made_by_one_upload_is_answered_with_that_upload(tmp_path: Path) -> None:
    src = Doc()
    for i in range(20):
        edit(src, f"k{i}", "x" * 1000)
    upload = src.get_update()
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        docs.apply(SPACE, ENV, upload, "yws:1")
        # not encoded again: the upload is what the new document reported, byte for byte
        assert docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR) is upload

        docs.apply(SPACE, ENV, edit(src, "k0", "changed"), "yws:1")
        whole = docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR)
        assert whole is not upload
        assert texts(replica(whole)) == texts(src)
        # encoded once while the document stays as it is
        assert docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR) is whole


def test_an_upload_the_document_does_not_report_as_is_is_not_taken_as_its_state(
    tmp_path: Path,
) -> None:
    """An upload holding a whole text of one client and, of another, a part still waiting for
    its start: the new document reports only what it integrated, so the upload is not its
    state; a joining client gets what the document holds, exactly."""
    complete = Doc()
    complete.get("t", type=Text).insert(0, "complete")
    other = Doc()
    text = other.get("u", type=Text)
    text += "hello"
    state = other.get_state()
    text += " world"
    waiting = other.get_update(state)
    upload = merge_updates(complete.get_update(), waiting)
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        docs.apply(SPACE, ENV, upload, "yws:1")
        doc = docs.get_doc(SPACE, ENV)
        assert doc is not None and str(doc.get("t", type=Text)) == "complete"
        whole = docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR)
        assert whole != upload
        assert whole == doc.get_update()


def test_an_update_integrated_without_a_report_drops_the_cached_state(tmp_path: Path) -> None:
    """yrs integrates an update after a gap in its client's clocks and reports an empty update
    (core/registry.py): the document changed all the same, and so does the whole state."""
    writer = Doc()
    items = writer.get("a", type=Array)

    def insert(value: str, at: int | None = None) -> bytes:
        before = writer.get_state()
        items.insert(len(items) if at is None else at, value)
        return writer.get_update(before)

    first, _skipped, after_gap = insert("first"), insert("skipped"), insert("after-gap", 0)
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        docs.apply(SPACE, ENV, first, "yws:1")
        assert list(replica(docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR)).get("a", type=Array)) == [
            "first"
        ]
        docs.apply(SPACE, ENV, after_gap, "yws:1")
        doc = docs.get_doc(SPACE, ENV)
        assert doc is not None and "after-gap" in list(doc.get("a", type=Array))
        whole = docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR)
        assert whole == doc.get_update()
        assert "after-gap" in list(replica(whole).get("a", type=Array))


async def test_a_dropped_document_and_a_compaction_answer_with_the_state_they_hold(
    tmp_path: Path,
) -> None:
    src = Doc()
    with Store.open(tmp_path) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None, compact_count=3)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(docs.run)
            for i in range(5):  # compacted on the way (the snapshot is the cached whole state)
                ticket = docs.apply(SPACE, ENV, edit(src, f"k{i}", f"v{i}"), "yws:1")
                assert texts(replica(docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR))) == texts(src)
            assert ticket is not None
            await ticket.wait()
            await docs.wait_durable(SPACE, ENV)
            while docs.stats()["relay_queued"]:
                await trio.sleep(0.01)
            for _ in range(2):
                docs.sweep()
            assert not docs.is_loaded(SPACE, ENV)
            assert texts(replica(docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR))) == texts(src)
            docs.apply(SPACE, ENV, edit(src, "k9", "after the reload"), "yws:1")
            assert texts(replica(docs.diff(SPACE, ENV, EMPTY_STATE_VECTOR))) == texts(src)
            nursery.cancel_scope.cancel()


def test_the_crdt_library_is_ready_before_the_first_document_is_created(tmp_path: Path) -> None:
    """pycrdt's first Doc in an event loop imports anyio's backend for it (10-20 ms): done
    when the relay starts, it no longer stalls every client of the first document created (a
    fresh hub's first fan-out had its p99 delay up by half). A fresh interpreter shows it."""
    script = f"""
import sys, trio
from peerdaemon.core.events import EventLog
from peerdaemon.hub.docs import HubDocs
from peerdaemon.store import Store

async def main():
    with Store.open({str(tmp_path)!r}) as store:
        docs = HubDocs(store, EventLog(), sweep_interval=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(docs.run)
            print("anyio._backends._trio" in sys.modules)
            nursery.cancel_scope.cancel()

trio.run(main)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
