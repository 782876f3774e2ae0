"""One document failing inside a peer session (docs/peer-protocol.md section 5, "A document
failing locally") is that document's error: the link stays up and the other documents keep
syncing. Sans-I/O, with explicit times."""

from __future__ import annotations

from typing import Any

from peerutil import (
    FakeHost,
    MemoryConnection,
    drain_events,
    exchange,
    make_identity,
    make_space,
    wire,
)

from peerdaemon.peer import Closed, DocFailed, PeerConnection, Synced

S1 = make_space("s1")
ALICE, BOB = make_identity("alice"), make_identity("bob")


class PanicException(BaseException):  # noqa: N818 - named as pycrdt's, which the code matches
    """What pycrdt raises on a Rust panic: a BaseException, yet a failure like any other."""


class FailingHost(FakeHost):
    """A host on which applying, or reading, the documents in `fail` raises `error`."""

    def __init__(
        self,
        *spaces: Any,
        fail_apply: BaseException | None = None,
        fail_diff: BaseException | None = None,
    ) -> None:
        super().__init__(spaces)
        self.fail: set[str] = set()
        self.fail_apply = fail_apply
        self.fail_diff = fail_diff

    def apply(self, doc_id: str, update: bytes, origin: str) -> None:
        if doc_id in self.fail and self.fail_apply is not None:
            raise self.fail_apply
        super().apply(doc_id, update, origin)

    def diff(self, doc_id: str, state_vector: bytes) -> bytes:
        if doc_id in self.fail and self.fail_diff is not None:
            raise self.fail_diff
        return super().diff(doc_id, state_vector)


def connect(ha: FakeHost, hb: FakeHost) -> tuple[PeerConnection, PeerConnection]:
    a = MemoryConnection(ALICE, ha, dialer=True, now=0.0)  # type: ignore[arg-type]
    b = MemoryConnection(BOB, hb, dialer=False, now=0.0)  # type: ignore[arg-type]
    wire(ha, lambda: [a])
    wire(hb, lambda: [b])
    exchange(a, b, 0.0)
    return a, b


def test_a_document_that_fails_to_apply_is_its_error_and_the_link_goes_on():
    ha = FakeHost([S1])
    hb = FailingHost(S1, fail_apply=RecursionError("maximum recursion depth exceeded"))
    ha.add_doc("good", ["s1"], {"v": 1})
    ha.add_doc("bad", ["s1"], {"v": 1})
    hb.share("good", "s1")
    hb.share("bad", "s1")
    hb.fail.add("bad")
    a, b = connect(ha, hb)
    assert a.state == b.state == "open"
    assert hb.values("good") == {"v": 1}
    events = drain_events(b)
    (failed,) = [e for e in events if isinstance(e, DocFailed)]
    assert failed.doc == "bad" and "RecursionError" in failed.reason
    assert Synced(2) in events
    assert b.session is not None and set(b.session.failed) == {"bad"}

    ha.edit("bad", {"v": 2})  # the same failure again: reported once
    ha.edit("good", {"v": 2})
    exchange(a, b, 1.0)
    assert hb.values("good") == {"v": 2}
    assert not [e for e in drain_events(b) if isinstance(e, DocFailed | Closed)]
    # the host recovers: the next update of that document is applied, its error cleared
    hb.fail.clear()
    ha.edit("bad", {"v": 3})
    exchange(a, b, 2.0)
    assert hb.applied[-1][0] == "bad"  # (pending in Yjs: it needs the ones that failed)
    assert b.session.failed == {}
    assert b.state == "open"


def test_a_panic_applying_one_document_does_not_escape_the_connection():
    ha = FakeHost([S1])
    hb = FailingHost(S1, fail_apply=PanicException("rust panicked"))
    ha.add_doc("bad", ["s1"], {"v": 1})
    ha.add_doc("good", ["s1"], {"v": 1})
    hb.share("bad", "s1")
    hb.share("good", "s1")
    hb.fail.add("bad")
    a, b = connect(ha, hb)
    assert b.state == "open" and hb.values("good") == {"v": 1}
    assert [e.doc for e in drain_events(b) if isinstance(e, DocFailed)] == ["bad"]


def test_a_document_that_cannot_be_read_is_not_answered_and_the_others_sync():
    ha = FakeHost([S1])
    hb = FailingHost(S1, fail_diff=RuntimeError("cannot encode type Doc"))
    hb.add_doc("bad", ["s1"], {"b": 1})
    hb.add_doc("good", ["s1"], {"g": 1})
    ha.share("bad", "s1")
    ha.share("good", "s1")
    hb.fail.add("bad")
    a, b = connect(ha, hb)
    assert a.state == b.state == "open"
    assert ha.values("good") == {"g": 1}
    assert ha.values("bad") == {}  # not answered: alice is not in step for it, and not told so
    assert Synced(2) not in drain_events(a)
    (failed,) = [e for e in drain_events(b) if isinstance(e, DocFailed)]
    assert failed.doc == "bad" and "cannot encode type Doc" in failed.reason
    hb.edit("bad", {"b": 2})  # live edits of it still travel
    exchange(a, b, 1.0)
    assert [doc for doc, _, _ in ha.applied].count("bad") == 1
    assert a.state == b.state == "open"


def test_a_bad_update_still_closes_the_link():
    """Not a Yjs update at all is the peer's fault (docs/peer-protocol.md): `protocol-error`."""
    ha, hb = FakeHost([S1]), FakeHost([S1])
    hb.add_doc("env", ["s1"], {"v": 1})
    ha.share("env", "s1")
    a, b = connect(ha, hb)
    from peerdaemon.peer import messages

    assert a.handshake.channel is not None
    m = messages.encode_sync(messages.SYNC_UPDATE, b"\x01\x02garbage")
    b.receive(a.handshake.channel.seal({"t": "sync", "doc": "env", "m": m}), 1.0)
    assert b.closed is not None and b.closed.reason == "protocol-error"
