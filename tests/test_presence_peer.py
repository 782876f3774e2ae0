"""The peer protocol's `awareness` message (docs/peer-protocol.md 5.1) in the sans-I/O core:
sent only for documents of the link, delivered as an `AwarenessReceived` event, kept for a
document shared a moment later, dropped (the link up) when too large or for a document that
never becomes allowed."""

from __future__ import annotations

from peerutil import FakeHost, MemoryConnection, drain_events, exchange, make_identity, make_space

from peerdaemon.core.awareness import AwarenessEntry, encode_awareness
from peerdaemon.peer import AwarenessReceived, PeerConnection
from peerdaemon.peer.session import MAX_AWARENESS

S1 = make_space("s1")
ALICE, BOB = make_identity("alice"), make_identity("bob")
PAYLOAD = encode_awareness([AwarenessEntry(9, 1, '{"user":{"name":"a"}}')])


def pair(ha: FakeHost, hb: FakeHost) -> tuple[PeerConnection, PeerConnection]:
    a = MemoryConnection(ALICE, ha, dialer=True, now=0.0)
    b = MemoryConnection(BOB, hb, dialer=False, now=0.0)
    exchange(a, b)
    drain_events(a), drain_events(b)
    return a, b


def awareness_events(conn: PeerConnection) -> list[tuple[str, bytes]]:
    return [(e.doc, e.payload) for e in drain_events(conn) if isinstance(e, AwarenessReceived)]


def test_awareness_of_a_shared_document_reaches_the_other_side():
    ha, hb = FakeHost([S1]), FakeHost([S1])
    ha.add_doc("env", ["s1"])
    hb.add_doc("env", ["s1"])
    a, b = pair(ha, hb)
    assert a.send_awareness("env", PAYLOAD)
    assert not a.send_awareness("elsewhere", PAYLOAD)  # not a document of the link: not sent
    exchange(a, b)
    assert awareness_events(b) == [("env", PAYLOAD)]
    assert b.state == a.state == "open"


def test_awareness_before_the_share_is_kept_until_the_document_is_allowed():
    ha, hb = FakeHost([S1]), FakeHost([S1])
    ha.add_doc("env", ["s1"])
    a, b = pair(ha, hb)
    assert a.send_awareness("env", PAYLOAD)
    exchange(a, b)
    assert awareness_events(b) == []  # b does not know the share yet
    hb.share("env", "s1")
    b.docs_changed()
    exchange(a, b)
    assert awareness_events(b) == [("env", PAYLOAD)]


def test_oversized_awareness_is_dropped_and_the_link_stays_up():
    ha, hb = FakeHost([S1]), FakeHost([S1])
    ha.add_doc("env", ["s1"])
    hb.add_doc("env", ["s1"])
    a, b = pair(ha, hb)
    big = b"\x00" * (MAX_AWARENESS + 1)
    assert not a.send_awareness("env", big)  # ours: never sent
    assert a.handshake.channel is not None
    b.receive(a.handshake.channel.seal({"t": "awareness", "doc": "env", "m": big}), 1.0)
    assert awareness_events(b) == [] and b.state == "open"
    assert a.send_awareness("env", PAYLOAD)
    exchange(a, b)
    assert awareness_events(b) == [("env", PAYLOAD)]
