"""The peer handshake and framing, driven in memory (no sockets, explicit times)."""

from __future__ import annotations

import cbor2
import pytest
from peerutil import FakeHost, MemoryConnection, drain_events, exchange, make_identity, make_space

from peerdaemon.model import FIRST_GATED_MODEL, MODEL_VERSION
from peerdaemon.peer import (
    Closed,
    Established,
    HelloReceived,
    PeerConnection,
    SessionConfig,
    Synced,
    messages,
)
from peerdaemon.peer.crypto import (
    DIALER,
    LISTENER,
    Ephemeral,
    SecureChannel,
    auth_payload,
    derive_keys,
    space_tag,
    transcript_hash,
)
from peerdaemon.peer.handshake import Handshake

S1, S2, S3 = make_space("s1"), make_space("s2"), make_space("s3")
ALICE, BOB = make_identity("alice"), make_identity("bob")


def connect(
    host_a: FakeHost,
    host_b: FakeHost,
    *,
    config: SessionConfig | None = None,
    model_a: int = MODEL_VERSION,
    model_b: int = MODEL_VERSION,
    now: float = 0.0,
) -> tuple[PeerConnection, PeerConnection]:
    a = MemoryConnection(ALICE, host_a, dialer=True, now=now, config=config, model=model_a)
    b = MemoryConnection(BOB, host_b, dialer=False, now=now, config=config, model=model_b)
    return a, b


def closed_of(conn: PeerConnection) -> Closed:
    events = [e for e in drain_events(conn) if isinstance(e, Closed)]
    assert len(events) == 1, events
    return events[0]


def established_pair(**kw: object) -> tuple[PeerConnection, PeerConnection]:
    a, b = connect(FakeHost([S1]), FakeHost([S1]), **kw)  # type: ignore[arg-type]
    exchange(a, b)
    assert a.state == b.state == "open"
    drain_events(a)
    drain_events(b)
    return a, b


# -- the happy path ------------------------------------------------------------------------------


def test_handshake_establishes_with_the_common_spaces_only():
    a, b = connect(FakeHost([S1, S2]), FakeHost([S2, S3]))
    exchange(a, b)
    ev_a, ev_b = drain_events(a), drain_events(b)
    assert [type(e) for e in ev_a] == [HelloReceived, Established, Synced]
    assert [type(e) for e in ev_b] == [HelloReceived, Established, Synced]
    est_a, est_b = ev_a[1], ev_b[1]
    assert (est_a.device, est_a.name, est_a.spaces) == (BOB.device_id, "bob", {"s2"})
    assert (est_b.device, est_b.name, est_b.spaces) == (ALICE.device_id, "alice", {"s2"})
    assert a.state == b.state == "open"


def test_dialer_speaks_first_and_listener_proves_nothing_before_the_dialer():
    a, b = connect(FakeHost([S1]), FakeHost([S1]))
    assert b.data_to_send() == []  # the listener waits
    hello_a = a.data_to_send()
    assert len(hello_a) == 1 and cbor2.loads(hello_a[0])["t"] == "hello"
    b.receive(hello_a[0], 0)
    out_b = b.data_to_send()
    assert [cbor2.loads(m)["t"] for m in out_b] == ["hello"]  # no auth before the dialer's
    a.receive(out_b[0], 0)
    assert [cbor2.loads(m)["t"] for m in a.data_to_send()] == ["box"]


def test_hello_is_cleartext_but_everything_after_is_boxed():
    a, b = connect(FakeHost([S1]), FakeHost([S1]))
    a_host = a.host
    a_host.add_doc("env-secret", ["s1"], {"password": "hunter2"})  # type: ignore[attr-defined]
    b.host.share("env-secret", "s1")  # type: ignore[attr-defined]
    wire: list[bytes] = []
    for _ in range(10):
        for d in a.data_to_send():
            wire.append(d)
            b.receive(d, 0)
        for d in b.data_to_send():
            wire.append(d)
            a.receive(d, 0)
    assert b.host.values("env-secret") == {"password": "hunter2"}  # type: ignore[attr-defined]
    types = [cbor2.loads(m)["t"] for m in wire]
    assert types[:2] == ["hello", "hello"] and set(types[2:]) == {"box"}
    assert not any(b"hunter2" in m or b"env-secret" in m or b"s1" in m for m in wire)


def test_tags_are_fresh_per_connection():
    """The same space yields unrelated tags on two connections: nothing to replay or link."""
    tags = []
    for _ in range(2):
        a, b = connect(FakeHost([S1]), FakeHost([S1]))
        exchange(a, b)
        tags.append(a.handshake.own_tags())
    assert tags[0] != tags[1]
    assert a.handshake.th is not None
    assert tags[1] == [space_tag(S1.secret, b"D", a.handshake.th)]


# -- versions ------------------------------------------------------------------------------------


def test_model_mismatch_closes_with_both_versions():
    a, b = connect(FakeHost([S1]), FakeHost([S1]), model_a=1, model_b=2)
    exchange(a, b)
    closed_b = closed_of(b)
    assert (closed_b.reason, closed_b.by_peer) == ("incompatible-version", False)
    assert closed_b.versions == {
        "local": {"proto": 1, "model": 2},
        "remote": {"proto": 1, "model": 1},
    }
    closed_a = closed_of(a)
    assert (closed_a.reason, closed_a.by_peer) == ("incompatible-version", True)
    assert closed_a.versions == {
        "local": {"proto": 1, "model": 1},
        "remote": {"proto": 1, "model": 2},
    }
    assert (
        b.peer_device == ALICE.device_id and a.peer_device == BOB.device_id
    )  # claimed, for the table


def test_future_protocol_hello_is_incompatible_not_malformed():
    """A version-2 hello may have other fields: only `proto` and `model` are read."""
    _, b = connect(FakeHost([S1]), FakeHost([S1]))
    b.receive(cbor2.dumps({"t": "hello", "proto": 2, "model": 7, "device": "X", "shiny": True}), 0)
    closed = closed_of(b)
    assert closed.reason == "incompatible-version"
    assert closed.versions == {
        "local": {"proto": 1, "model": MODEL_VERSION},
        "remote": {"proto": 2, "model": 7},
    }
    (reply,) = b.data_to_send()
    msg = cbor2.loads(reply)
    assert (msg["t"], msg["reason"], msg["proto"], msg["model"]) == (
        "close",
        "incompatible-version",
        1,
        MODEL_VERSION,
    )
    assert msg["device"] == BOB.device_id


# -- authorization -------------------------------------------------------------------------------


def test_no_common_space_is_unauthorized_and_nothing_is_synced():
    host_a, host_b = FakeHost([S1]), FakeHost([S2])
    host_a.add_doc("env-a", ["s1"], {"k": "a"})
    host_b.add_doc("env-b", ["s2"], {"k": "b"})
    a, b = connect(host_a, host_b)
    sent_ab, sent_ba = exchange(a, b)
    closed_b = closed_of(b)
    assert (closed_b.reason, closed_b.by_peer) == ("unauthorized", False)
    closed_a = closed_of(a)
    assert (closed_a.reason, closed_a.by_peer) == ("unauthorized", True)
    assert (sent_ab, sent_ba) == (2, 2)  # a: hello + auth; b: hello + close, nothing else
    assert a.handshake.channel.received == 1  # type: ignore[union-attr]  # the close box only
    assert b.handshake.channel.sent == 1  # type: ignore[union-attr]
    assert host_a.applied == host_b.applied == []
    assert a.established is None and b.established is None


def test_a_man_in_the_middle_cannot_make_auth_verify():
    """M swaps the ephemeral keys in both hellos: it can read both boxes, but each side's
    transcript differs, so the signature re-boxed for the other side does not verify."""
    a, b = connect(FakeHost([S1]), FakeHost([S1]))
    m_to_b, m_to_a = Ephemeral(), Ephemeral()
    (hello_a,) = a.data_to_send()
    fake_a = cbor2.loads(hello_a) | {"eph": m_to_b.public}
    fake_a_raw = cbor2.dumps(fake_a)
    b.receive(fake_a_raw, 0)
    (hello_b,) = b.data_to_send()
    fake_b_raw = cbor2.dumps(cbor2.loads(hello_b) | {"eph": m_to_a.public})
    a.receive(fake_b_raw, 0)
    (auth_box,) = a.data_to_send()
    # M holds the keys of both legs.
    th_a = transcript_hash(hello_a, fake_b_raw)
    th_b = transcript_hash(fake_a_raw, hello_b)
    leg_a = SecureChannel(
        derive_keys(m_to_a.exchange(cbor2.loads(hello_a)["eph"]), th_a), dialer=False
    )
    leg_b = SecureChannel(
        derive_keys(m_to_b.exchange(cbor2.loads(hello_b)["eph"]), th_b), dialer=True
    )
    auth = leg_a.open(cbor2.loads(auth_box), 1 << 20)
    assert auth["t"] == "auth"  # M reads it (tags and signature are bound to th_a)
    b.receive(leg_b.seal(auth), 0)
    closed = closed_of(b)
    assert closed.reason == "unauthorized" and "signature" in closed.detail
    assert b.established is None


def test_hello_whose_device_id_does_not_match_its_key():
    _, b = connect(FakeHost([S1]), FakeHost([S1]))
    hello = cbor2.loads(make_hello(ALICE)) | {"device": BOB.device_id}
    b.receive(cbor2.dumps(hello), 0)
    assert closed_of(b).reason == "protocol-error"


def test_connecting_to_ourselves_is_detected():
    a = MemoryConnection(ALICE, FakeHost([S1]), dialer=True, now=0)
    b = MemoryConnection(ALICE, FakeHost([S1]), dialer=False, now=0)
    exchange(a, b)
    assert closed_of(b).reason == "self"
    assert closed_of(a).reason == "self"


def make_hello(identity: object) -> bytes:
    conn = MemoryConnection(identity, FakeHost([S1]), dialer=True, now=0, model=MODEL_VERSION)  # type: ignore[arg-type]
    return conn.data_to_send()[0]


# -- framing violations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\x00",  # malformed CBOR
        cbor2.dumps([1, 2]),  # not a map
        cbor2.dumps({"t": "hello"}) + b"\x00",  # trailing bytes
        cbor2.dumps({"x": 1}),  # no t
        cbor2.dumps({"t": "nonsense"}),  # unknown type
        cbor2.dumps({"t": "sync", "doc": "d", "m": b"\x00\x01\x00"}),  # before the handshake
        cbor2.dumps({"t": "box", "n": 0, "c": bytes(32)}),  # a box before the hellos
        cbor2.dumps({"t": "hello", "proto": 1, "model": MODEL_VERSION}),  # missing fields
        b"",
        "a text message",
    ],
)
def test_malformed_or_early_messages_close_with_protocol_error(data):
    _, b = connect(FakeHost([S1]), FakeHost([S1]))
    b.receive(data, 0)
    closed = closed_of(b)
    assert (closed.reason, closed.by_peer) == ("protocol-error", False)
    (reply,) = b.data_to_send()
    assert cbor2.loads(reply)["reason"] == "protocol-error"
    b.receive(make_hello(ALICE), 0)  # nothing happens after the close
    assert b.data_to_send() == [] and drain_events(b) == []


def test_oversized_message_closes_with_too_large():
    _, b = connect(FakeHost([S1]), FakeHost([S1]), config=SessionConfig(max_message=1000))
    b.receive(b"\x00" * 1001, 0)
    assert closed_of(b).reason == "too-large"


def test_oversized_update_after_the_handshake():
    host_a, host_b = FakeHost([S1]), FakeHost([S1])
    host_b.add_doc("env", ["s1"])
    host_a.add_doc("env", ["s1"])
    a, b = connect(host_a, host_b, config=SessionConfig(max_message=4096))
    exchange(a, b)
    drain_events(a), drain_events(b)
    a.config = SessionConfig()  # a sends freely; b enforces its limit
    host_a.edit("env", {"big": "x" * 10_000})
    a.local_update("env", host_a.docs["env"].get_update(), "local")
    exchange(a, b)
    assert closed_of(b).reason == "too-large"
    assert closed_of(a).reason == "too-large"
    assert host_b.values("env") == {}


def test_outgoing_message_over_the_limit_closes_locally():
    a, b = established_pair(config=SessionConfig(max_message=4096))
    a.local_update("s", b"x", "local")  # not allowed: not sent at all
    a.host.add_doc("env", ["s1"])  # type: ignore[attr-defined]
    a.local_update("env", b"y" * 5000, "local")
    closed = closed_of(a)
    assert (closed.reason, closed.by_peer) == ("too-large", False)
    exchange(a, b)
    assert closed_of(b).reason == "too-large"


def test_tampered_box_closes():
    a, b = established_pair()
    a.handle_timer(15.0)  # a ping
    (box,) = a.data_to_send()
    msg = cbor2.loads(box)
    msg["c"] = bytes([msg["c"][0] ^ 1]) + msg["c"][1:]
    b.receive(cbor2.dumps(msg), 15.0)
    closed = closed_of(b)
    assert closed.reason == "protocol-error" and "authenticate" in closed.detail


def test_replayed_box_closes():
    a, b = established_pair()
    a.handle_timer(15.0)
    (box,) = a.data_to_send()
    b.receive(box, 15.0)
    assert b.state == "open"
    b.receive(box, 15.0)
    closed = closed_of(b)
    assert closed.reason == "protocol-error" and "replayed" in closed.detail


def test_reordered_boxes_close():
    a, b = established_pair()
    a.handle_timer(15.0)
    a.handle_timer(30.0)
    first, second = a.data_to_send()
    b.receive(second, 30.0)
    assert closed_of(b).reason == "protocol-error"


def test_cleartext_after_encryption_started_closes():
    a, b = established_pair()
    b.receive(cbor2.dumps({"t": "close", "reason": "incompatible-version"}), 1.0)
    assert closed_of(b).reason == "protocol-error"


def test_unknown_inner_message_type_closes():
    a, b = established_pair()
    channel = a.handshake.channel
    assert channel is not None
    b.receive(channel.seal({"t": "teleport"}), 1.0)
    closed = closed_of(b)
    assert closed.reason == "protocol-error" and "teleport" in closed.detail


def test_second_auth_closes():
    a, b = established_pair()
    channel = a.handshake.channel
    assert channel is not None
    b.receive(channel.seal({"t": "auth", "sig": bytes(64), "tags": []}), 1.0)
    assert closed_of(b).reason == "protocol-error"


def test_sync_before_auth_closes():
    a, b = connect(FakeHost([S1]), FakeHost([S1]))
    b.receive(a.data_to_send()[0], 0)
    a.receive(b.data_to_send()[0], 0)
    a.data_to_send()  # a's auth, not delivered
    channel = a.handshake.channel
    assert channel is not None
    b.receive(channel.seal({"t": "sync", "doc": "d", "m": b"\x00\x01\x00"}), 0)
    closed = closed_of(b)
    assert closed.reason == "protocol-error"


def test_peer_close_reason_is_reported():
    a, b = established_pair()
    a.close("duplicate", "another connection is kept")
    exchange(a, b)
    closed = closed_of(b)
    assert (closed.reason, closed.by_peer, closed.detail) == (
        "duplicate",
        True,
        "another connection is kept",
    )
    a2, b2 = established_pair()
    a2.close()  # shutdown
    exchange(a2, b2)
    assert closed_of(b2).reason == "closed"


# -- timers --------------------------------------------------------------------------------------


def test_handshake_timeout():
    _, b = connect(FakeHost([S1]), FakeHost([S1]), now=100.0)
    assert b.get_timer() == 110.0
    b.handle_timer(109.9)
    assert b.state == "handshake"
    b.handle_timer(110.0)
    assert closed_of(b).reason == "timeout"
    assert b.get_timer() is None


def test_messages_validate_sync_codec():
    m = messages.encode_sync(messages.SYNC_UPDATE, b"abc")
    assert messages.decode_sync(m) == (2, b"abc")
    big = messages.encode_sync(messages.SYNC_STEP2, b"z" * 300)
    assert messages.decode_sync(big) == (1, b"z" * 300)
    for bad in (b"", b"\x03\x00", b"\x00\x05ab", b"\x00\x01ab", b"\x80"):
        with pytest.raises(messages.PeerProtocolError):
            messages.decode_sync(bad)


def test_spec_test_vector():
    """The values of docs/peer-protocol.md section 4.5."""

    eph_d = Ephemeral(lambda n: bytes(range(32)))
    eph_l = Ephemeral(lambda n: bytes(range(32, 64)))
    assert eph_d.public.hex() == "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"
    assert eph_l.public.hex() == "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254"
    shared = eph_d.exchange(eph_l.public)
    assert shared == eph_l.exchange(eph_d.public)
    assert shared.hex() == "9663aa1da97e848a914a436d04163dfbb89178f107f1b5b77ed3854203382854"
    th = transcript_hash(cbor2.dumps({"t": "D"}), cbor2.dumps({"t": "L"}))
    assert th.hex() == "3c0423dc9887657126dfe0a7a291f8bcd58269f62cec890ad56c10b392482fd4"
    keys = derive_keys(shared, th)
    assert keys.dialer_to_listener.hex() == (
        "d74b95aa646b788f9e8764305111219986413648ac50c529003fe1e9671b9fd0"
    )
    assert keys.listener_to_dialer.hex() == (
        "339c1a27f1eab356aa23105935d213348948596110e73051c99dc83da145a4a2"
    )
    assert space_tag(b"\x11" * 32, DIALER, th).hex() == (
        "40583f09054123b550fe19fe853ccf81eec58d2aa8deebfed0ce7722da4432fc"
    )
    box = SecureChannel(keys, dialer=True).seal({"t": "ping"})
    assert box.hex() == (
        "a3617463626f78616e006163581823adb2f79f06da001be2707d172c43e503fc8450a2d8d08f"
    )
    assert SecureChannel(keys, dialer=False).open(cbor2.loads(box), 1024) == {"t": "ping"}


def test_links_accept_newer_models_and_leave_them_to_the_spaces():
    """A device of the next model still links with this one (both ways): what each space syncs
    between them is the space gate's decision (docs/spaces.md "Model versions"); only a device
    from before the gate is refused."""
    for model_a, model_b in (
        (MODEL_VERSION, MODEL_VERSION + 1),
        (MODEL_VERSION + 1, MODEL_VERSION),
    ):
        a, b = connect(FakeHost([S1]), FakeHost([S1]), model_a=model_a, model_b=model_b)
        exchange(a, b)
        assert a.established and b.established, (model_a, model_b)
    a, b = connect(FakeHost([S1]), FakeHost([S1]), model_a=FIRST_GATED_MODEL - 1)
    exchange(a, b)
    assert closed_of(b).reason == "incompatible-version"


def test_dialer_refusing_the_listener_version_closes_in_cleartext():
    """The listener accepted the dialer's hello (and derived keys); the dialer does not accept
    the listener's: its cleartext close is still understood."""
    a = MemoryConnection(ALICE, FakeHost([S1]), dialer=True, now=0, model=1, accepted_models={1})
    b = MemoryConnection(BOB, FakeHost([S1]), dialer=False, now=0, model=2, accepted_models={1, 2})
    exchange(a, b)
    closed_a = closed_of(a)
    assert (closed_a.reason, closed_a.by_peer) == ("incompatible-version", False)
    assert closed_a.versions == {
        "local": {"proto": 1, "model": 1},
        "remote": {"proto": 1, "model": 2},
    }
    closed_b = closed_of(b)
    assert (closed_b.reason, closed_b.by_peer) == ("incompatible-version", True)
    assert closed_b.versions == {
        "local": {"proto": 1, "model": 2},
        "remote": {"proto": 1, "model": 1},
    }


def test_a_listener_echoing_the_dialers_tags_is_not_admitted():
    """Mallory listens without the space secret and sends Alice's own tags back in its auth.

    Tags are bound to the sender's role, so Alice only accepts tags made with the listener's
    role: accepting her own would admit anyone who can copy what she just sent."""
    a = MemoryConnection(ALICE, FakeHost([S1]), dialer=True, now=0, model=MODEL_VERSION)
    mallory = make_identity("mallory")
    m = Handshake(mallory, lambda: [], dialer=False, model=MODEL_VERSION)
    assert m.start() == []
    (hello_a,) = a.data_to_send()
    (hello_m,) = m.receive_hello(cbor2.loads(hello_a), hello_a)
    a.receive(hello_m, 0)
    (auth_box,) = a.data_to_send()
    assert m.channel is not None and m.th is not None
    auth_a = m.channel.open(cbor2.loads(auth_box), 1 << 20)
    assert auth_a["tags"] == [space_tag(S1.secret, DIALER, m.th)]
    echo = {
        "t": "auth",
        "sig": mallory.sign(auth_payload(LISTENER, m.th)),  # a valid signature of its own
        "tags": list(auth_a["tags"]),
    }
    a.receive(m.channel.seal(echo), 0)
    closed = closed_of(a)
    assert (closed.reason, closed.by_peer) == ("unauthorized", False)
    assert a.established is None and a.state != "open"
