"""The sync session over in-memory connections: real pycrdt documents, explicit times."""

from __future__ import annotations

import cbor2
from peerutil import (
    FakeHost,
    MemoryConnection,
    drain_events,
    exchange,
    make_identity,
    make_space,
    wire,
)

from peerdaemon.peer import Closed, PeerConnection, SessionConfig, Synced, messages

S1, S2 = make_space("s1"), make_space("s2")
ALICE, BOB, CAROL = make_identity("alice"), make_identity("bob"), make_identity("carol")


class Net:
    """Connections between fake hosts, with each host's changes fanned out to its links."""

    def __init__(self) -> None:
        self.links: list[tuple[PeerConnection, PeerConnection]] = []
        self.by_host: dict[int, list[PeerConnection]] = {}

    def host(self, *spaces: object) -> FakeHost:
        h = FakeHost(spaces)  # type: ignore[arg-type]
        conns = self.by_host.setdefault(id(h), [])
        wire(h, lambda: list(conns))
        return h

    def connect(
        self, ident_a: object, host_a: FakeHost, ident_b: object, host_b: FakeHost, now: float = 0.0
    ) -> tuple[PeerConnection, PeerConnection]:
        a = MemoryConnection(ident_a, host_a, dialer=True, now=now)  # type: ignore[arg-type]
        b = MemoryConnection(ident_b, host_b, dialer=False, now=now)  # type: ignore[arg-type]
        self.by_host[id(host_a)].append(a)
        self.by_host[id(host_b)].append(b)
        self.links.append((a, b))
        self.settle(now)
        return a, b

    def settle(self, now: float = 0.0) -> int:
        """Deliver until every link is quiet; -> messages delivered."""
        total = 0
        while True:
            moved = sum(sum(exchange(a, b, now)) for a, b in self.links)
            total += moved
            if not moved:
                return total


def test_two_hosts_converge_both_ways():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    ha.add_doc("env1", ["s1"], {"from_a": 1, "both": "a"})
    hb.add_doc("env1", ["s1"], {"from_b": 2})
    ha.add_doc("only-a", ["s1"], {"x": "a"})
    hb.share("only-a", "s1")  # shared, not received yet
    hb.add_doc("only-b", ["s1"], {"y": "b"})
    ha.share("only-b", "s1")
    a, b = net.connect(ALICE, ha, BOB, hb)
    for doc in ("env1", "only-a", "only-b"):
        assert ha.values(doc) == hb.values(doc)
    assert hb.values("only-a") == {"x": "a"}
    assert ha.values("only-b") == {"y": "b"}
    assert ha.values("env1") == {"from_a": 1, "both": "a", "from_b": 2}
    ev_a, ev_b = drain_events(a), drain_events(b)
    assert Synced(3) in ev_a and Synced(3) in ev_b
    assert all(origin == f"peer:{BOB.device_id}" for _, _, origin in ha.applied)


def test_live_edits_flow_both_ways_and_are_not_echoed():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    ha.add_doc("env", ["s1"], {"v": 0})
    hb.share("env", "s1")
    a, b = net.connect(ALICE, ha, BOB, hb)
    drain_events(a), drain_events(b)

    ha.edit("env", {"v": 1})
    out_a = a.data_to_send()
    assert len(out_a) == 1  # one update
    for d in out_a:
        b.receive(d, 1.0)
    assert hb.values("env") == {"v": 1}
    # b applied it with origin peer:<a>; b's fan-out must not send it back to a.
    assert b.data_to_send() == []

    hb.edit("env", {"w": 2})
    assert net.settle(2.0) == 1
    assert ha.values("env") == {"v": 1, "w": 2}
    assert a.data_to_send() == []


def test_updates_are_forwarded_along_a_chain_but_never_back():
    net = Net()
    ha, hb, hc = net.host(S1), net.host(S1), net.host(S1)
    for h in (ha, hb, hc):
        h.share("env", "s1")
    ha.edit("env", {"v": 0})
    net.connect(ALICE, ha, BOB, hb)
    net.connect(BOB, hb, CAROL, hc)
    assert hc.values("env") == {"v": 0}
    ha.edit("env", {"v": 1})
    delivered = net.settle(1.0)
    assert hc.values("env") == {"v": 1}
    assert delivered == 2  # a->b, b->c; nothing returns to a or b


def test_docs_outside_the_common_spaces_never_travel():
    net = Net()
    ha, hb = net.host(S1, S2), net.host(S1)
    ha.add_doc("shared", ["s1"], {"ok": True})
    ha.add_doc("private", ["s2"], {"secret": True})
    hb.share("shared", "s1")
    a, b = net.connect(ALICE, ha, BOB, hb)
    assert a.spaces == b.spaces == {"s1"}
    ha.edit("private", {"secret": False})
    net.settle(1.0)
    assert "private" not in hb.docs
    assert [d for d, _, _ in hb.applied] == ["shared"]


def test_disallowed_doc_is_ignored_then_synced_once_allowed():
    """A share that reaches one side first: the early step 1 is remembered and answered."""
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    ha.add_doc("env", ["s1"], {"a": 1})
    hb.add_doc("other", ["s1"])
    ha.share("other", "s1")
    hb_doc = hb._doc("env")  # b has its own copy, not shared (yet)
    with hb_doc.transaction():
        from pycrdt import Map

        hb_doc.get("m", type=Map)["b"] = 2
    a, b = net.connect(ALICE, ha, BOB, hb)
    assert hb.values("env") == {"b": 2}  # a's step 1 and data were ignored, not applied
    assert b.session is not None and b.session.ignored >= 1
    ha.edit("env", {"a": 3})
    net.settle(1.0)
    assert hb.values("env") == {"b": 2}
    assert not any(doc == "env" for doc, _, _ in hb.applied)

    hb.share("env", "s1")  # the share arrives on b: both directions catch up
    net.settle(2.0)
    assert ha.values("env") == hb.values("env") == {"a": 3, "b": 2}


def test_joining_a_space_mid_connection_announces_it():
    net = Net()
    ha, hb = net.host(S1), net.host(S1, S2)
    hb.add_doc("env2", ["s2"], {"z": 1})
    ha.share("env2", "s2")
    a, b = net.connect(ALICE, ha, BOB, hb)
    assert a.spaces == {"s1"} and "env2" not in ha.docs
    ha.join(S2)
    net.settle(1.0)
    assert a.spaces == b.spaces == {"s1", "s2"}
    assert ha.values("env2") == {"z": 1}


def test_leaving_the_last_common_space_closes_unauthorized():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    a, b = net.connect(ALICE, ha, BOB, hb)
    drain_events(a), drain_events(b)
    ha.leave("s1")
    net.settle(1.0)
    assert [e.reason for e in drain_events(a) if isinstance(e, Closed)] == ["unauthorized"]
    assert [e.reason for e in drain_events(b) if isinstance(e, Closed)] == ["unauthorized"]


def test_bad_update_closes_the_link_and_leaves_the_doc_alone():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    hb.add_doc("env", ["s1"], {"v": 1})
    ha.share("env", "s1")
    a, b = net.connect(ALICE, ha, BOB, hb)
    drain_events(b)
    assert a.handshake.channel is not None
    m = messages.encode_sync(messages.SYNC_UPDATE, b"\x01\x02garbage")
    b.receive(a.handshake.channel.seal({"t": "sync", "doc": "env", "m": m}), 1.0)
    (closed,) = [e for e in drain_events(b) if isinstance(e, Closed)]
    assert closed.reason == "protocol-error" and "rejected" in closed.detail
    assert hb.values("env") == {"v": 1}


def test_bad_sync_payload_closes():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    hb.add_doc("env", ["s1"])
    a, b = net.connect(ALICE, ha, BOB, hb)
    assert a.handshake.channel is not None
    b.receive(a.handshake.channel.seal({"t": "sync", "doc": "env", "m": b"\x07\x00"}), 1.0)
    assert b.state == "closed" and b.closed is not None and b.closed.reason == "protocol-error"


def test_awareness_is_accepted_and_ignored():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    hb.add_doc("env", ["s1"])
    a, b = net.connect(ALICE, ha, BOB, hb)
    assert a.handshake.channel is not None
    b.receive(a.handshake.channel.seal({"t": "awareness", "doc": "env", "m": b"\x00"}), 1.0)
    assert b.state == "open" and b.data_to_send() == []


# -- keep-alive ----------------------------------------------------------------------------------


def test_ping_when_idle_and_pong_keeps_the_link_alive():
    net = Net()
    ha, hb = net.host(S1), net.host(S1)
    a, b = net.connect(ALICE, ha, BOB, hb, now=0.0)
    assert a.get_timer() == 15.0
    a.handle_timer(14.0)
    assert a.data_to_send() == []
    a.handle_timer(15.0)
    (ping,) = a.data_to_send()
    b.receive(ping, 15.0)
    (pong,) = b.data_to_send()
    a.receive(pong, 15.0)
    assert a.get_timer() == 30.0
    assert b.get_timer() == 30.0
    for t in range(30, 300, 15):  # both keep pinging each other: never a timeout
        a.handle_timer(float(t))
        b.handle_timer(float(t))
        exchange(a, b, float(t))
    assert a.state == b.state == "open"


def test_silent_peer_times_out():
    cfg = SessionConfig(ping_interval=15.0, idle_timeout=45.0)
    ha, hb = FakeHost([S1]), FakeHost([S1])
    a = MemoryConnection(ALICE, ha, dialer=True, now=0.0, config=cfg)
    b = MemoryConnection(BOB, hb, dialer=False, now=0.0, config=cfg)
    exchange(a, b, 0.0)
    drain_events(a)
    pings = 0
    while a.state == "open":
        t = a.get_timer()
        assert t is not None
        a.handle_timer(t)
        pings += sum(1 for d in a.data_to_send() if cbor2.loads(d)["t"] == "box")
    assert a.closed is not None and a.closed.reason == "timeout"
    assert t == 45.0 and pings == 3  # pings at 15 and 30, then the close at 45
    (closed,) = [e for e in drain_events(a) if isinstance(e, Closed)]
    assert closed.reason == "timeout"
