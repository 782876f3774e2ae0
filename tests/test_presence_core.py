"""The sans-I/O presence core (`peerdaemon.presence.core.Awareness`) and what this device
publishes (`presence.local`), with explicit times: clocks, renewals, time-outs, links closing,
relaying only changes, the size cap. No trio, no sockets."""

from __future__ import annotations

import json

import pytest

from peerdaemon.core.awareness import (
    AwarenessEntry,
    AwarenessError,
    decode_awareness,
    encode_awareness,
)
from peerdaemon.presence import Awareness, Editors, Me, Selection, StateTooLarge, colour_of


def entries(payload: bytes) -> list[tuple[int, int, object]]:
    return [(e.client, e.clock, json.loads(e.state)) for e in decode_awareness(payload)]


def update(*items: tuple[int, int, object]) -> bytes:
    return encode_awareness(
        AwarenessEntry(c, k, json.dumps(s, separators=(",", ":"))) for c, k, s in items
    )


def test_codec_round_trips_and_refuses_junk():
    items = [AwarenessEntry(1, 3, '{"user":{"name":"a"}}'), AwarenessEntry(2**53 - 1, 9, "null")]
    assert decode_awareness(encode_awareness(items)) == items
    with pytest.raises(AwarenessError):
        decode_awareness(encode_awareness([AwarenessEntry(1, 1, "{not json")]))
    with pytest.raises(AwarenessError):
        decode_awareness(b"\x01\x01\x01\x05ab")  # a state cut short


def test_local_state_is_sent_with_a_rising_clock_and_renewed():
    aw = Awareness(7, timeout=30, renew=15)
    aw.set_local("env", {"x": 1}, now=0)
    (send,) = aw.sends()
    assert send.exclude is None and send.to is None
    assert entries(send.payload) == [(7, 1, {"x": 1})]
    aw.set_local("env", {"x": 1}, now=1)
    assert aw.sends() == []  # unchanged: nothing sent
    assert aw.next_deadline() == 15
    aw.handle_timer(14.9)
    assert aw.sends() == []
    aw.handle_timer(15)
    (send,) = aw.sends()
    assert entries(send.payload) == [(7, 2, {"x": 1})]
    aw.set_local("env", None, now=16)
    (send,) = aw.sends()
    assert decode_awareness(send.payload) == [AwarenessEntry(7, 3, "null")]
    assert aw.next_deadline() is None
    aw.set_local("env", {"x": 2}, now=17)  # back: above the clock the removal had
    assert entries(aw.sends()[0].payload) == [(7, 4, {"x": 2})]


def test_remote_changes_are_relayed_once_and_time_out_without_a_relay():
    aw = Awareness(7)
    assert aw.receive("lan:b", "env", update((5, 1, {"n": "b"})), now=0) == 1
    (send,) = aw.sends()
    assert send.exclude == "lan:b" and entries(send.payload) == [(5, 1, {"n": "b"})]
    [change] = aw.changes()
    assert (change.doc, change.client, change.state) == ("env", 5, {"n": "b"})
    # the same clock again (an echo, or another path): nothing to relay, nothing changed
    assert aw.receive("hub:x", "env", update((5, 1, {"n": "b"})), now=1) == 0
    assert aw.sends() == [] and aw.changes() == []
    assert aw.sources_of("env", 5) == {"lan:b", "hub:x"}
    # an older clock is ignored
    assert aw.receive("lan:b", "env", update((5, 0, {"n": "old"})), now=2) == 0
    assert aw.states("env")[5] == {"n": "b"}
    # a renewal (same state, higher clock) is relayed but is no change for subscribers
    assert aw.receive("lan:b", "env", update((5, 2, {"n": "b"})), now=10) == 1
    assert len(aw.sends()) == 1 and aw.changes() == []
    assert aw.next_deadline() == 40
    aw.handle_timer(39.9)
    assert 5 in aw.states("env")
    aw.handle_timer(40)
    assert 5 not in aw.states("env")
    assert aw.sends() == []  # every device times a silent client out itself
    [change] = aw.changes()
    assert change.state is None
    # the client's next renewal is above the clock it had: it is back
    assert aw.receive("lan:b", "env", update((5, 3, {"n": "b"})), now=41) == 1
    assert aw.states("env")[5] == {"n": "b"}


def test_a_closed_link_removes_only_the_clients_it_alone_delivered():
    aw = Awareness(7)
    aw.receive("lan:b", "env", update((5, 1, {"n": "b"}), (6, 1, {"n": "c"})), now=0)
    aw.receive("hub:x", "env", update((6, 1, {"n": "c"})), now=0)  # c by two paths
    aw.sends(), aw.changes()
    aw.link_closed("lan:b", now=1)
    assert set(aw.states("env")) == {6}
    (send,) = aw.sends()
    assert send.exclude is None
    assert decode_awareness(send.payload) == [AwarenessEntry(5, 2, "null")]
    assert [(c.client, c.state) for c in aw.changes()] == [(5, None)]
    aw.link_closed("hub:x", now=2)
    assert aw.states("env") == {}


def test_a_removal_is_relayed_and_a_removal_of_ourselves_is_answered():
    aw = Awareness(7)
    aw.set_local("env", {"me": 1}, now=0)
    aw.receive("lan:b", "env", update((5, 1, {"n": "b"})), now=0)
    aw.sends(), aw.changes()
    gone = encode_awareness([AwarenessEntry(5, 1, "null")])  # same clock, null: a removal
    assert aw.receive("lan:b", "env", gone, now=1) == 1
    assert aw.states("env").keys() == {7}
    assert aw.sends()[0].exclude == "lan:b"
    # someone removed us (clock 2 > our 1): we announce ourselves again above it
    aw.receive("lan:b", "env", encode_awareness([AwarenessEntry(7, 2, "null")]), now=2)
    (send,) = aw.sends()
    assert entries(send.payload) == [(7, 3, {"me": 1})]
    # our own state echoed back (the hub's room sends it to its sender too): nothing
    aw.receive("hub:x", "env", update((7, 3, {"me": 1})), now=3)
    assert aw.sends() == [] and aw.states("env").keys() == {7}


def test_a_link_that_opens_gets_a_snapshot_and_our_clock_jumps():
    aw = Awareness(7)
    aw.set_local("space:s", {"me": 1}, now=0)
    aw.receive("lan:b", "space:s", update((5, 4, {"n": "b"})), now=0)
    aw.sends()
    aw.link_opened("lan:c", ["space:s", "env-without-state"], now=1)
    mine, theirs = aw.sends()
    # ours to everyone, 2 above: a peer that removed us when a link closed holds clock + 1
    assert mine.to is None and entries(mine.payload) == [(7, 3, {"me": 1})]
    assert theirs.to == "lan:c" and entries(theirs.payload) == [(5, 4, {"n": "b"})]
    # a link is never told what it sent us: it would take that for a second path
    aw.link_opened("lan:b", ["space:s"], now=2)
    assert [s.to for s in aw.sends()] == [None]


def test_states_over_the_cap_are_refused():
    aw = Awareness(7, max_state=100)
    with pytest.raises(StateTooLarge, match="cap is 100"):
        aw.set_local("env", {"x": "y" * 200}, now=0)
    assert aw.sends() == []
    assert aw.receive("lan:b", "env", update((5, 1, {"x": "y" * 200}), (6, 1, {})), now=0) == 1
    assert aw.refused == 1 and set(aw.states("env")) == {6}


def test_editors_are_per_connection_and_saves_expire():
    eds = Editors(window=10)
    assert eds.set(1, "env", Selection("route", "endpoint"))
    assert not eds.set(1, "env", Selection("route", "endpoint"))
    assert eds.set(2, "env", Selection("route", "endpoint"))  # the same selection: listed once
    assert eds.set(3, "env", Selection("other"))
    assert eds.editing("env") == [
        {"via": "editor", "entity": "route", "field": "endpoint"},
        {"via": "editor", "entity": "other"},
    ]
    assert eds.clear(3) == {"env"}
    assert eds.clear(3) == set()  # the others stay
    assert [e["entity"] for e in eds.editing("env")] == ["route"]
    assert eds.saved("env2", "file", now=0)
    assert not eds.saved("env2", "file", now=5)  # already marked: its end moves
    assert eds.next_deadline() == 15
    assert eds.expire(14) == set()
    assert eds.expire(15) == {"env2"}
    assert eds.editing("env2") == []


def test_identity_state_and_stable_colour():
    me = Me("DEVICE-1", "laptop")
    state = me.state()
    assert state["user"] == {"name": "laptop", "color": colour_of("DEVICE-1")}
    assert state["device"] == {"id": "DEVICE-1", "name": "laptop"} and "editing" not in state
    me.display_name = "Ada"
    assert me.state([])["user"]["name"] == "Ada" and me.state([])["editing"] == []
    assert colour_of("DEVICE-1") == colour_of("DEVICE-1") != colour_of("DEVICE-2")
    assert len(colour_of("x")) == 7 and colour_of("x").startswith("#")
