"""The hub's y-websocket without I/O: the rooms (codec, sync, relay of what HubDocs applied, awareness
only when it changed, removal on disconnect, limits, coalescing and dropping of slow clients,
the store events they hand to the shell, the connections they mark ready to write); the
websocket connection's core on a made-up clock (messages, keep-alive, the handshake deadline,
too slow); the /yjs auth rules."""

from __future__ import annotations

import math

import pytest
from pycrdt import Doc, Map, Text
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from peerdaemon.core.admission import Admission
from peerdaemon.hub.accounts import Accounts, LimitExceeded, Limits
from peerdaemon.hub.admission import HandshakeWatch
from peerdaemon.hub.transport import CLOSE_TIMEOUT
from peerdaemon.hub.wsconn import WsConn
from peerdaemon.hub.yauth import Admitted, Refused, YjsAuth
from peerdaemon.hub.yjs import store_update
from peerdaemon.hub.ywebsocket import (
    AWARENESS_TIMEOUT,
    MSG_AUTH,
    MSG_AWARENESS,
    MSG_SYNC,
    QUERY_AWARENESS,
    SYNC_STEP1,
    SYNC_STEP2,
    SYNC_UPDATE,
    AwarenessEntry,
    ClientProtocolError,
    Outbox,
    Outlet,
    Rooms,
    StoreUpdate,
    YConn,
    awareness_message,
    decode_awareness,
    decode_message,
    encode_awareness,
    permission_denied,
    read_var_uint,
    sync_step1,
    sync_update,
    take_ready,
    write_var_uint,
)

SPACE = "s1"
DOC = "env-1"


class FakeTicket:
    def __init__(self) -> None:
        self.done = False


class FakeDocs:
    """HubDocs as the rooms see it: `commit()` plays the store making everything durable and
    the relay calling the listeners, then the flush listener."""

    def __init__(self) -> None:
        self.docs: dict[tuple[str, str], Doc] = {}
        self.queued: list[tuple[str, str, bytes, str]] = []
        self.ticket: FakeTicket | None = None
        self.rooms: Rooms | None = None
        self.limit: str | None = None

    def _doc(self, space: str, doc_id: str) -> Doc:
        return self.docs.setdefault((space, doc_id), Doc())

    def state_vector(self, space: str, doc_id: str) -> bytes:
        return self._doc(space, doc_id).get_state()

    def diff(self, space: str, doc_id: str, sv: bytes) -> bytes:
        try:
            return self._doc(space, doc_id).get_update(sv)
        except Exception as exc:
            raise ValueError(str(exc)) from None

    def apply(self, space: str, doc_id: str, update: bytes, origin: str) -> FakeTicket:
        if self.limit:
            raise LimitExceeded(self.limit, "test")
        doc = self._doc(space, doc_id)
        try:
            doc.apply_update(update)
        except Exception as exc:
            raise ValueError(str(exc)) from None
        self.queued.append((space, doc_id, update, origin))
        self.ticket = FakeTicket()
        return self.ticket

    def pending_ticket(self, space: str, doc_id: str) -> FakeTicket | None:
        return self.ticket if self.ticket is not None and not self.ticket.done else None

    def commit(self) -> None:
        assert self.rooms is not None
        if self.ticket is not None:
            self.ticket.done = True
        queued, self.queued = self.queued, []
        for item in queued:
            self.rooms.on_update(*item)
        self.rooms.flush()


class StoringRooms(Rooms):
    """The rooms with what the /yjs endpoint does with their store events (yjs.store_update)."""

    def __init__(self, docs: FakeDocs) -> None:
        super().__init__(docs)
        self.writer = docs

    def receive(self, conn: YConn, data: bytes, now: float | None = None) -> StoreUpdate | None:
        event = super().receive(conn, data, now)
        if event is not None:
            store_update(self.writer, self, event)
        return event


@pytest.fixture
def hub():
    docs = FakeDocs()
    rooms = StoringRooms(docs)
    docs.rooms = rooms
    return docs, rooms


def connect(rooms: Rooms, number: int, doc_id: str = DOC, **outbox_options) -> YConn:
    conn = YConn(number, Outbox(**outbox_options), user="u")
    rooms.join(SPACE, doc_id, conn)
    return conn


def received(conn: YConn) -> list:
    return [decode_message(bytes(frame)) for frame in conn.outbox.take()]


def edit(key: str, value: object, doc: Doc | None = None) -> tuple[Doc, bytes]:
    doc = doc or Doc()
    before = doc.get_state()
    doc.get("m", type=Map)[key] = value
    return doc, doc.get_update(before)


# ------------------------------------------------------------------------------------- codec
def test_var_uint_roundtrip_and_truncation():
    for n in (0, 1, 127, 128, 300, 2**32 - 1, 2**53):
        data = write_var_uint(n)
        assert read_var_uint(data, 0) == (n, len(data))
    with pytest.raises(ClientProtocolError):
        read_var_uint(b"\x80", 0)


def test_message_codec():
    assert decode_message(sync_step1(b"\x00")) == decode_message(b"\x00\x00\x01\x00")
    m = decode_message(sync_update(b"abc"))
    assert (m.kind, m.sub, m.payload) == (MSG_SYNC, SYNC_UPDATE, b"abc")
    m = decode_message(permission_denied("unauthorized"))
    assert (m.kind, m.sub, m.payload) == (MSG_AUTH, 0, b"unauthorized")
    with pytest.raises(ClientProtocolError):
        decode_message(b"\x00\x02\x05ab")  # length beyond the end
    with pytest.raises(ClientProtocolError):
        decode_message(b"\x00\x07\x00")  # unknown sync type


def test_awareness_codec_checks_json():
    entries = [AwarenessEntry(1, 3, '{"user":{"name":"a"}}'), AwarenessEntry(2**32 - 1, 9, "null")]
    assert decode_awareness(encode_awareness(entries)) == entries
    bad = encode_awareness([AwarenessEntry(1, 1, "{not json")])
    with pytest.raises(ClientProtocolError):
        decode_awareness(bad)


# -------------------------------------------------------------------------------------- sync
def test_server_speaks_first_and_answers_step1(hub):
    docs, rooms = hub
    _, update = edit("a", 1)
    docs.apply(SPACE, DOC, update, "peer:X")
    docs.commit()
    a = connect(rooms, 1)
    first = received(a)
    assert (first[0].kind, first[0].sub) == (MSG_SYNC, SYNC_STEP1)
    assert first[0].payload == docs.state_vector(SPACE, DOC)
    rooms.receive(a, sync_step1(b"\x00"))
    (answer,) = received(a)
    assert answer.sub == SYNC_STEP2
    client = Doc()
    client.apply_update(answer.payload)
    assert client.get("m", type=Map)["a"] == 1


def test_updates_are_relayed_only_once_durable_and_never_echoed(hub):
    docs, rooms = hub
    a, b, c = (connect(rooms, n) for n in (1, 2, 3))
    for conn in (a, b, c):
        received(conn)
    _, update = edit("k", "v")
    rooms.receive(a, sync_update(update))
    assert received(b) == [] and received(c) == []  # not durable yet: nothing leaves
    docs.commit()
    assert received(a) == []  # never back to its origin
    for conn in (b, c):
        (msg,) = received(conn)
        assert (msg.kind, msg.sub) == (MSG_SYNC, SYNC_UPDATE)
        doc = Doc()
        doc.apply_update(msg.payload)
        assert doc.get("m", type=Map)["k"] == "v"


def test_fanout_encodes_once_and_merges_a_durable_batch(hub):
    docs, rooms = hub
    a = connect(rooms, 1)
    readers = [connect(rooms, n) for n in range(2, 12)]
    for conn in (a, *readers):
        received(conn)
    writer = Doc()
    for i in range(5):
        _, update = edit(f"k{i}", i, writer)
        rooms.receive(a, sync_update(update))
    docs.commit()
    frames = [r.outbox.take() for r in readers]
    assert all(len(f) == 1 for f in frames)  # five durable updates, one message
    assert all(f[0] is frames[0][0] for f in frames)  # the very same bytes object for everyone
    doc = Doc()
    doc.apply_update(decode_message(frames[0][0]).payload)
    assert dict(doc.get("m", type=Map)) == {f"k{i}": i for i in range(5)}


def test_step1_is_answered_at_once_with_what_is_applied(hub):
    """No wait for the store (docs/hub.md, "Durability"): a new client gets what the document
    holds, committed or not, as a relayed update's receivers do."""
    docs, rooms = hub
    a = connect(rooms, 1)
    b = connect(rooms, 2)
    received(a), received(b)
    _, update = edit("x", 1)
    rooms.receive(a, sync_update(update))
    rooms.receive(b, sync_step1(b"\x00"))
    (msg,) = received(b)  # not committed yet
    assert msg.sub == SYNC_STEP2 and docs.pending_ticket(SPACE, DOC) is not None
    doc = Doc()
    doc.apply_update(msg.payload)
    assert doc.get("m", type=Map)["x"] == 1


def test_bad_messages_close_only_that_connection(hub):
    docs, rooms = hub
    a, b = connect(rooms, 1), connect(rooms, 2)
    received(a), received(b)
    rooms.receive(a, b"\x00\x02\xff\xff")  # truncated
    assert a.closing == (4400, "protocol-error")
    rooms.receive(b, sync_update(b"\x01\x02garbage"))
    assert b.closing == (4400, "bad-update")
    c = connect(rooms, 3)
    _, update = edit("ok", True)
    d = connect(rooms, 4)
    received(c), received(d)
    rooms.receive(c, sync_update(update))
    docs.commit()
    assert len(received(d)) == 1  # the room still works


def test_limit_denies_with_reason_and_closes(hub):
    docs, rooms = hub
    a = connect(rooms, 1)
    received(a)
    docs.limit = "environment-too-large"
    _, update = edit("big", "x" * 100)
    rooms.receive(a, sync_update(update))
    (msg,) = received(a)
    assert (msg.kind, msg.payload) == (MSG_AUTH, b"environment-too-large")
    assert a.closing == (4413, "environment-too-large")
    rooms.receive(a, sync_step1(b"\x00"))  # a closing connection gets nothing more
    assert received(a) == []


# --------------------------------------------------------------------------------- awareness
def aw(*entries: tuple[int, int, str]) -> bytes:
    return awareness_message(encode_awareness(AwarenessEntry(*e) for e in entries))


def awareness_of(msgs: list) -> list[AwarenessEntry]:
    out = []
    for m in msgs:
        assert m.kind == MSG_AWARENESS
        out.extend(decode_awareness(m.payload))
    return out


def test_awareness_is_relayed_only_when_it_changed(hub):
    _, rooms = hub
    a, b, c = (connect(rooms, n) for n in (1, 2, 3))
    for conn in (a, b, c):
        received(conn)
    rooms.receive(a, aw((100, 1, '{"user":"a"}')))
    # to everyone, the sender too: a lone y-websocket client needs to hear something
    assert awareness_of(received(a)) == [AwarenessEntry(100, 1, '{"user":"a"}')]
    assert awareness_of(received(b)) == [AwarenessEntry(100, 1, '{"user":"a"}')]
    received(c)
    # y-websocket clients re-send what they applied: same clock, nothing new -> no relay
    rooms.receive(b, aw((100, 1, '{"user":"a"}')))
    rooms.receive(c, aw((100, 1, '{"user":"a"}')))
    assert received(a) == received(b) == received(c) == []
    # a renewal (clock advanced) is relayed, even with the same state: it keeps clients alive
    rooms.receive(a, aw((100, 2, '{"user":"a"}')))
    assert awareness_of(received(b)) == [AwarenessEntry(100, 2, '{"user":"a"}')]
    received(a), received(c)
    # a stale clock is ignored
    rooms.receive(c, aw((100, 1, '{"user":"forged"}')))
    assert received(a) == [] and received(b) == []


def test_the_removal_of_a_state_the_room_never_had_is_not_relayed(hub):
    """A client with awareness off says `null` for itself on connecting: relayed, every join
    would cost a message to every client of the room (y-protocols does not relay it either)."""
    _, rooms = hub
    a, b = connect(rooms, 1), connect(rooms, 2)
    received(a), received(b)
    rooms.receive(b, aw((200, 1, "null")))
    assert received(a) == received(b) == []
    rooms.receive(b, aw((200, 2, '{"n":1}')))  # its clock was kept: a newer state still counts
    assert awareness_of(received(a)) == [AwarenessEntry(200, 2, '{"n":1}')]
    rooms.receive(b, aw((200, 3, "null")))  # and the removal of a known state is relayed
    assert awareness_of(received(a)) == [AwarenessEntry(200, 3, "null")]


def test_join_gets_states_and_query_awareness_answers(hub):
    _, rooms = hub
    a = connect(rooms, 1)
    rooms.receive(a, aw((100, 4, '{"n":1}')))
    b = connect(rooms, 2)
    msgs = received(b)
    assert msgs[0].sub == SYNC_STEP1
    assert awareness_of(msgs[1:]) == [AwarenessEntry(100, 4, '{"n":1}')]
    rooms.receive(b, QUERY_AWARENESS)
    assert awareness_of(received(b)) == [AwarenessEntry(100, 4, '{"n":1}')]


def test_disconnect_removes_its_awareness_and_broadcasts_it(hub):
    _, rooms = hub
    a, b = connect(rooms, 1), connect(rooms, 2)
    rooms.receive(a, aw((100, 5, '{"n":1}'), (101, 1, '{"n":2}')))
    received(b)
    rooms.leave(a)
    removal = awareness_of(received(b))
    assert sorted(removal, key=lambda e: e.client) == [
        AwarenessEntry(100, 6, "null"),
        AwarenessEntry(101, 2, "null"),
    ]
    rooms.receive(b, aw((100, 6, "null")))  # b echoes the removal: nothing to relay
    c = connect(rooms, 3)
    assert [m.kind for m in received(c)] == [MSG_SYNC]  # no states left
    rooms.receive(b, aw((100, 5, '{"n":1}')))  # an old state cannot come back
    assert received(c) == []


def test_a_state_not_renewed_for_30_s_is_removed_while_its_connection_stays(hub):
    """A client whose page froze keeps its websocket open but stops renewing: its state goes
    after y-protocols' 30 s, for the room and the daemons, and a renewed one stays."""
    _, rooms = hub
    told: list[bytes] = []
    rooms.awareness_listener = lambda space, doc, payload: told.append(payload)
    a, b = connect(rooms, 1), connect(rooms, 2)
    room = a.room
    assert room is not None
    room.on_awareness = lambda payload: told.append(payload)
    rooms.receive(a, aw((100, 1, '{"n":"frozen"}')), now=0.0)
    rooms.receive(b, aw((200, 1, '{"n":"alive"}')), now=0.0)
    assert rooms.expire(10.0) == AWARENESS_TIMEOUT  # the next time-out is due then
    rooms.receive(b, aw((200, 2, '{"n":"alive"}')), now=20.0)  # renewed
    received(a), received(b)
    told.clear()
    assert rooms.expire(AWARENESS_TIMEOUT - 0.1) == AWARENESS_TIMEOUT
    assert received(b) == []
    assert rooms.expire(AWARENESS_TIMEOUT) == 20.0 + AWARENESS_TIMEOUT
    assert awareness_of(received(b)) == [AwarenessEntry(100, 2, "null")]
    assert [decode_awareness(p) for p in told] == [[AwarenessEntry(100, 2, "null")]]
    assert a.closing is None and a.awareness_ids == set()
    c = connect(rooms, 3)
    assert awareness_of(received(c)[1:]) == [AwarenessEntry(200, 2, '{"n":"alive"}')]
    rooms.leave(a)  # its state already went: nothing more to remove
    assert received(b) == []
    assert rooms.expire(100.0) is None and awareness_of(received(b)) == [
        AwarenessEntry(200, 3, "null")
    ]


def test_room_is_dropped_with_its_last_connection(hub):
    _, rooms = hub
    a = connect(rooms, 1)
    assert rooms.clients == 1 and len(rooms.rooms) == 1
    rooms.leave(a)
    assert rooms.clients == 0 and rooms.rooms == {}


# ------------------------------------------------------------------------ slow clients
def test_outbox_coalesces_updates_of_a_room():
    outbox = Outbox(coalesce_bytes=200, limit_bytes=1 << 20)
    writer = Doc()
    text = writer.get("t", type=Text)
    outbox.push(b"other")  # not an update: kept in place
    for i in range(40):
        before = writer.get_state()
        text += f"chunk {i};"
        update = writer.get_update(before)
        assert outbox.push(sync_update(update), ("s", "d"), update)
    assert outbox.coalesced >= 1
    frames = outbox.take()
    assert frames[0] == b"other"
    reader = Doc()
    for frame in frames[1:]:
        reader.apply_update(decode_message(frame).payload)
    assert str(reader.get("t", type=Text)) == "".join(f"chunk {i};" for i in range(40))
    assert len(frames) < 10


def test_slow_client_is_dropped_not_the_room(hub):
    docs, rooms = hub
    writer = connect(rooms, 1)
    slow = connect(rooms, 2, coalesce_bytes=2_000, limit_bytes=20_000)
    fast = connect(rooms, 3)
    received(writer), received(fast)
    doc = Doc()
    text = doc.get("t", type=Text)
    for i in range(60):
        before = doc.get_state()
        text += f"{i:04d}" * 100  # distinct content: merging cannot make it small
        rooms.receive(writer, sync_update(doc.get_update(before)))
        docs.commit()
        fast.outbox.take()  # the fast reader keeps up
    assert slow.closing == (1013, "too-slow") and slow.dropped_slow
    assert writer.closing is None and fast.closing is None
    assert len(slow.outbox) == 0  # its backlog is freed


def test_a_single_big_message_is_not_falling_behind():
    outbox = Outbox(coalesce_bytes=10, limit_bytes=100)
    assert outbox.push(b"x" * 10_000)  # the first sync of a large document
    assert not outbox.push(b"y" * 200)


# ---------------------------------------------------------------- events for the shell
def test_a_client_update_is_a_store_event_the_core_does_not_apply():
    docs = FakeDocs()
    rooms = Rooms(docs)  # the core alone: it reads the documents, never writes them
    docs.rooms = rooms
    a = connect(rooms, 1)
    received(a)
    _, update = edit("k", "v")
    event = rooms.receive(a, sync_update(update))
    assert event == StoreUpdate(a, SPACE, DOC, update)
    assert docs.queued == [] and received(a) == []
    assert rooms.receive(a, sync_update(b"\x00\x00")) is None  # an empty update: nothing to do
    assert rooms.receive(a, sync_step1(b"\x00")) is None
    a.close(1000, "")
    assert rooms.receive(a, sync_update(update)) is None  # a closing connection: ignored


def test_events_are_stored_in_order_and_relayed_to_all_but_their_origin(hub):
    docs, rooms = hub
    a, b = connect(rooms, 1), connect(rooms, 2)
    received(a), received(b)
    writer = Doc()
    updates = [edit(f"k{i}", i, writer)[1] for i in range(3)]
    for update in updates:
        rooms.receive(a, sync_update(update))
    assert [q[2] for q in docs.queued] == updates  # applied as they came, before the next one
    assert {q[3] for q in docs.queued} == {a.origin}
    docs.commit()
    assert received(a) == []
    (msg,) = received(b)
    doc = Doc()
    doc.apply_update(msg.payload)
    assert dict(doc.get("m", type=Map)) == {"k0": 0, "k1": 1, "k2": 2}


def test_a_refused_store_event_denies_or_closes_its_connection():
    rooms = Rooms(FakeDocs())
    a, b = connect(rooms, 1), connect(rooms, 2)
    received(a), received(b)
    _, update = edit("big", "x")
    rooms.update_refused(StoreUpdate(a, SPACE, DOC, update), "quota-exceeded")
    (msg,) = received(a)
    assert (msg.kind, msg.payload) == (MSG_AUTH, b"quota-exceeded")
    assert a.closing == (4422, "quota-exceeded")
    rooms.update_refused(StoreUpdate(b, SPACE, DOC, b"junk"), None)
    assert b.closing == (4400, "bad-update") and received(b) == []


def test_connections_with_something_to_write_are_listed_once():
    rooms = Rooms(FakeDocs())
    ready: list[Outlet] = []
    a, b = (YConn(n, Outbox(), ready=ready) for n in (1, 2))
    rooms.join(SPACE, DOC, a)
    assert take_ready(ready) == [a] and ready == []  # the server speaks first
    rooms.join(SPACE, DOC, b)
    rooms.receive(a, aw((7, 1, '{"n":1}')))  # broadcast to both, b had its step 1 already
    rooms.receive(b, aw((8, 1, '{"n":2}')))
    assert take_ready(ready) == [b, a]  # each once, though b got three frames
    assert take_ready(ready) == []
    a.close(1001, "shutdown")  # the decision to close is something to write too
    assert take_ready(ready) == [a]


def test_the_too_slow_rule_is_the_outlets():
    outlet = Outlet(1, Outbox(coalesce_bytes=10, limit_bytes=100), ready=[])
    outlet.send(b"x" * 80)
    outlet.send(b"y" * 80)  # two items past the limit: falling behind
    assert outlet.closing == (1013, "too-slow") and outlet.dropped_slow
    assert len(outlet.outbox) == 0


# ------------------------------------------------------------- the connection core, no I/O
def client_ws() -> Connection:
    return Connection(ConnectionType.CLIENT)


def server_core(now: float = 0.0, watch: HandshakeWatch | None = None, **options) -> WsConn:
    return WsConn(Outlet(1, Outbox(), ready=[]), now=now, watch=watch, **options)


def events_of(core: WsConn, client: Connection) -> list:
    """What the client makes of everything the core has to send (as the writer takes it:
    batch after batch, until none)."""
    while frames := core.data_to_send():
        for frame in frames:
            client.receive_data(bytes(frame))
    return list(client.events())


def test_core_yields_messages_in_order_and_answers_pings_and_a_close():
    core, client = server_core(), client_ws()
    wire = (
        client.send(BytesMessage(b"abc", message_finished=False))
        + client.send(BytesMessage(b"def"))
        + client.send(TextMessage("hi"))
        + client.send(Ping(b"p"))
        + client.send(BytesMessage(b"last"))
        + client.send(CloseConnection(1000, "bye"))
    )
    core.receive_data(wire, now=1.0)
    assert core.next_message() == b"abcdef"
    assert core.next_message() == "hi"
    assert core.outlet.closing is None
    assert core.next_message() == b"last"  # a message before the close is still delivered
    assert core.next_message() is None
    assert core.input_ended and core.outlet.closing == (1000, "bye")
    got = events_of(core, client)  # the pong, then the close echoed
    assert isinstance(got[0], Pong) and got[0].payload == b"p"
    assert isinstance(got[1], CloseConnection) and got[1].code == 1000
    assert core.data_to_send() == [] and core.finished


def test_core_refuses_a_too_large_message_and_a_broken_frame():
    core, client = server_core(max_message=10), client_ws()
    core.receive_data(client.send(BytesMessage(b"x" * 11)), now=0.0)
    assert core.next_message() is None
    assert core.input_ended and core.outlet.closing == (1009, "too-large")
    core = server_core()
    core.receive_data(b"\x82\x03abc", now=0.0)  # not masked: a client must mask
    assert core.next_message() is None
    assert core.input_ended and core.outlet.closing[0] == 1002


def test_core_eof_loses_the_connection_without_a_close_frame():
    core = server_core()
    core.receive_data(None, now=3.0)
    assert core.lost and core.input_ended and core.outlet.closing == (1006, "connection lost")
    assert core.data_to_send() == [] and core.finished


def test_keepalive_pings_a_silent_client_and_cuts_a_dead_one():
    core, client = server_core(ping_interval=30.0), client_ws()
    assert core.get_timer() == 30.0
    core.handle_timer(29.9)
    assert core.data_to_send() == []
    core.handle_timer(30.0)
    (ping,) = events_of(core, client)
    assert isinstance(ping, Ping)
    assert core.get_timer() == 60.0  # pinged once; silent until then: cut
    core.receive_data(client.send(Pong(b"")), now=45.0)  # any frame counts as alive
    assert core.next_message() is None and core.get_timer() == 75.0
    core.handle_timer(75.0)
    assert isinstance(events_of(core, client)[0], Ping)
    core.handle_timer(104.9)
    assert not core.cut
    core.handle_timer(105.0)
    assert core.cut and core.lost and core.outlet.closing == (1006, "timeout")
    assert core.data_to_send() == [] and core.get_timer() == math.inf


def test_a_connection_not_authenticated_in_time_is_cut():
    admission = Admission(total=4, per_ip=4)
    slot = admission.admit("a")
    assert slot is not None
    watch = HandshakeWatch.after_upgrade(slot, now=100.0, handshake_timeout=10.0)
    core = server_core(now=100.0, watch=watch)
    assert core.get_timer() == 110.0 + CLOSE_TIMEOUT  # before the first ping
    core.handle_timer(110.0 + CLOSE_TIMEOUT)
    assert core.cut and core.outlet.closing == (1006, "not authenticated in time")

    authenticated = admission.admit("a")
    assert authenticated is not None
    watch = HandshakeWatch.after_upgrade(authenticated, now=100.0, handshake_timeout=10.0)
    core = server_core(now=100.0, watch=watch)
    authenticated.release()
    assert core.get_timer() == 130.0  # only the keep-alive is left
    core.handle_timer(112.0)
    assert not core.cut and core.outlet.closing is None


def test_a_writer_without_progress_makes_the_client_too_slow():
    core = server_core(stall_seconds=5.0)
    assert core.write_deadline == math.inf
    core.write_waiting(10.0)
    core.write_done()  # taken: no deadline
    core.handle_timer(20.0)
    assert core.outlet.closing is None
    core.write_waiting(20.0)
    assert core.get_timer() == 25.0
    core.handle_timer(24.9)
    assert core.outlet.closing is None
    core.handle_timer(25.0)
    assert core.outlet.closing == (1013, "too-slow") and core.outlet.dropped_slow and core.lost


# ------------------------------------------------------------------------ /yjs auth rules
@pytest.fixture
def accounts(tmp_path):
    with Accounts.open(tmp_path, defaults=Limits(devices_per_user=1)) as acc:
        yield acc


def test_auth_rules_in_order(accounts):
    alice, bob = accounts.add_user("alice"), accounts.add_user("bob")
    accounts.create_space(SPACE, "alice")
    auth = YjsAuth(accounts)
    assert auth.admit({}, SPACE, DOC, "yws:1") == Refused("unauthorized")
    assert auth.admit({"token": "wrong"}, SPACE, DOC, "yws:1") == Refused("unauthorized")
    assert auth.admit({"token": bob}, SPACE, DOC, "yws:1").reason == "forbidden"
    assert auth.admit({"token": alice}, SPACE, "bad id!", "yws:1").reason == "bad-request"
    ok = auth.admit({"token": alice, "device": "web"}, SPACE, DOC, "yws:1")
    assert isinstance(ok, Admitted) and (ok.user, ok.device) == ("alice", "web")
    same = auth.admit({"token": alice, "device": "web"}, SPACE, DOC, "yws:2")  # same device
    assert isinstance(same, Admitted)
    other = auth.admit({"token": alice}, SPACE, DOC, "yws:3")  # a device of its own: one too many
    assert other.reason == "too-many-devices"
    ok.lease.release()
    same.lease.release()
    assert isinstance(auth.admit({"token": alice}, SPACE, DOC, "yws:3"), Admitted)


def test_auth_recheck_ends_revoked_tokens_and_lost_memberships(accounts):
    accounts.add_user("alice")
    bob = accounts.add_user("bob")
    accounts.create_space(SPACE, "alice")
    accounts.add_member(SPACE, "bob")
    auth = YjsAuth(accounts)
    ok = auth.admit({"token": bob}, SPACE, DOC, "yws:1")
    assert isinstance(ok, Admitted) and auth.recheck(ok.token_hash, SPACE) is None
    accounts.remove_member(SPACE, "bob")
    assert auth.recheck(ok.token_hash, SPACE) == "forbidden"
    accounts.revoke_token(bob)
    assert auth.recheck(ok.token_hash, SPACE) == "unauthorized"
