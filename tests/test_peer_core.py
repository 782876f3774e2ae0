"""The sans-I/O core's contract with its shells, with no I/O and explicit times: received updates
come out as `UpdateReceived` events and wait for their outcome (in order, before any later
message), a stalled write is `too-slow` through `handle_timer`, the redial `Backoff`, the split
settings, and a package face that loads no trio."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from typing import Any

import pytest
from peerutil import FakeHost, drain_events, exchange, make_identity, make_space, wire
from pycrdt import Doc, Map

from peerdaemon.peer import (
    Backoff,
    Closed,
    DocError,
    DocFailed,
    DocRefused,
    PeerConfig,
    PeerConnection,
    SessionConfig,
    Synced,
    UpdateReceived,
    apply_update,
    messages,
)

S1 = make_space("s1")
ALICE, BOB = make_identity("alice"), make_identity("bob")


def pump(conn: PeerConnection, host: Any) -> list[Any]:
    """What a shell does after each input: apply the reported updates, keep the other events."""
    out = []
    while (event := conn.next_event()) is not None:
        if isinstance(event, UpdateReceived):
            apply_update(conn, event, host)
        else:
            out.append(event)
    return out


def settle(a: PeerConnection, ha: FakeHost, b: PeerConnection, hb: FakeHost) -> None:
    for _ in range(50):
        out_a = a.data_to_send()
        for data in out_a:
            b.receive(data, 0.0)
            pump(b, hb)
        out_b = b.data_to_send()
        for data in out_b:
            a.receive(data, 0.0)
            pump(a, ha)
        if not out_a and not out_b:
            return
    raise AssertionError("never quiet")


def open_pair(**kw: Any) -> tuple[FakeHost, FakeHost, PeerConnection, PeerConnection]:
    """alice holds `env`, bob shares it; both raw connections, synced."""
    ha, hb = FakeHost([S1]), FakeHost([S1])
    ha.add_doc("env", ["s1"], {"v": 0})
    hb.share("env", "s1")
    a = PeerConnection(ALICE, ha, dialer=True, now=0.0, **kw)  # type: ignore[arg-type]
    b = PeerConnection(BOB, hb, dialer=False, now=0.0, **kw)  # type: ignore[arg-type]
    wire(ha, lambda: [a])
    wire(hb, lambda: [b])
    settle(a, ha, b, hb)
    assert a.state == b.state == "open" and hb.values("env") == {"v": 0}
    return ha, hb, a, b


def seal(conn: PeerConnection, msg: dict[str, Any]) -> bytes:
    """A message as `conn` would send it next (after what it already handed out)."""
    assert conn.handshake.channel is not None
    return conn.handshake.channel.seal(msg)


# -- UpdateReceived ------------------------------------------------------------------------------


def test_a_received_update_is_an_event_the_core_never_applies():
    ha, hb, a, b = open_pair()
    ha.edit("env", {"v": 1})
    (data,) = a.data_to_send()
    applied = len(hb.applied)
    b.receive(data, 1.0)
    (event,) = drain_events(b)
    assert isinstance(event, UpdateReceived)
    assert (event.doc, event.origin) == ("env", f"peer:{ALICE.device_id}")
    assert len(hb.applied) == applied and hb.values("env") == {"v": 0}  # not applied by the core
    assert b.awaiting_outcome is event
    hb.apply(event.doc, event.update, event.origin)  # the shell's job
    b.update_applied(event)
    assert b.awaiting_outcome is None and hb.values("env") == {"v": 1}
    assert b.data_to_send() == []  # b's own fan-out skips the update's origin


def test_messages_wait_for_the_outcome_and_a_step1_is_answered_with_the_update_in():
    """Alice sends an update, then a step 1 asking for everything; bob's shell reads both before
    applying anything. The step 1 waits, so its answer includes the update."""
    ha, hb, a, b = open_pair()
    ha.edit("env", {"v": 1, "w": "new"})
    (update,) = a.data_to_send()
    step1 = seal(a, {"t": "sync", "doc": "env", "m": messages.encode_sync(0, b"\x00")})
    b.receive(update, 1.0)
    b.receive(step1, 1.0)  # held: nothing answered yet
    assert b.data_to_send() == []
    (event,) = drain_events(b)
    apply_update(b, event, hb)
    (answer,) = b.data_to_send()  # now the held step 1 is answered
    a.receive(answer, 1.0)
    (step2,) = drain_events(a)
    assert isinstance(step2, UpdateReceived)
    doc = Doc()
    doc.apply_update(step2.update)
    assert doc.get("m", type=Map).to_py() == {"v": 1.0, "w": "new"}


def test_updates_are_applied_in_the_order_received():
    ha, hb, a, b = open_pair()
    for i in range(1, 4):
        ha.edit("env", {"v": i})
    sent = [d for _ in range(3) for d in a.data_to_send()]
    assert len(sent) == 3
    for data in sent:
        b.receive(data, 1.0)
    order = []
    while (event := b.next_event()) is not None:
        assert isinstance(event, UpdateReceived)
        assert b.next_event() is None  # one at a time: the next waits for this one's outcome
        order.append(event.update)
        apply_update(b, event, hb)
    assert [u for d, u, _ in hb.applied[-3:]] == order and len(order) == 3
    assert hb.values("env") == {"v": 3}


def test_a_failed_apply_is_the_documents_error_and_the_connection_goes_on():
    ha, hb, a, b = open_pair()
    ha.edit("env", {"v": 1})
    for data in a.data_to_send():
        b.receive(data, 1.0)
    (event,) = drain_events(b)
    b.update_failed(event, RecursionError("too deep"))
    (failed,) = drain_events(b)
    assert isinstance(failed, DocFailed) and "RecursionError: too deep" in failed.reason
    assert b.state == "open" and b.session is not None and set(b.session.failed) == {"env"}
    ha.edit("env", {"v": 2})  # the next one applies: the error is cleared
    for data in a.data_to_send():
        b.receive(data, 2.0)
    assert pump(b, hb) == [] and b.session.failed == {}


def test_a_refused_apply_is_answered_with_an_error_and_bytes_that_are_no_update_close():
    ha, hb, a, b = open_pair()
    ha.edit("env", {"v": 1})
    for data in a.data_to_send():
        b.receive(data, 1.0)
    (event,) = drain_events(b)
    b.update_failed(event, DocRefused("quota-exceeded", "the space is full"))
    for data in b.data_to_send():
        a.receive(data, 1.0)
    assert drain_events(a) == [DocError("env", "quota-exceeded", "the space is full")]
    assert b.state == "open"
    ha.edit("env", {"v": 2})
    assert a.data_to_send() == []  # alice stops offering what bob refused

    garbage = messages.encode_sync(messages.SYNC_UPDATE, b"\x01\x02garbage")
    b.receive(seal(a, {"t": "sync", "doc": "env", "m": garbage}), 2.0)
    (event,) = drain_events(b)
    b.update_failed(event, ValueError("not an update"))
    (closed,) = drain_events(b)
    assert isinstance(closed, Closed) and closed.reason == "protocol-error"


def test_synced_waits_for_the_outcome_of_the_step2():
    ha, hb = FakeHost([S1]), FakeHost([S1])
    ha.add_doc("env", ["s1"], {"v": 0})
    hb.share("env", "s1")
    a = PeerConnection(ALICE, ha, dialer=True, now=0.0)  # type: ignore[arg-type]
    b = PeerConnection(BOB, hb, dialer=False, now=0.0)  # type: ignore[arg-type]
    exchange(a, b)  # nobody applies anything: b's step 2 from alice waits
    events = drain_events(b)
    (update,) = [e for e in events if isinstance(e, UpdateReceived)]
    assert not any(isinstance(e, Synced) for e in events)
    apply_update(b, update, hb)
    assert Synced(1) in drain_events(b) and hb.values("env") == {"v": 0}


def test_an_outcome_for_another_update_is_a_bug_of_the_shell():
    ha, hb, a, b = open_pair()
    with pytest.raises(RuntimeError):
        b.update_applied(UpdateReceived("env", b"\x00\x00", "peer:x"))


# -- a stalled write: too-slow from handle_timer -------------------------------------------------


def test_a_write_without_progress_for_send_timeout_closes_too_slow():
    config = SessionConfig(ping_interval=1000, idle_timeout=5000, send_timeout=60)
    ha, hb, a, b = open_pair(config=config)
    assert a.get_timer() == 1000
    ha.edit("env", {"v": 1})
    handed = a.data_to_send()
    assert handed
    a.sending(10.0)  # the shell starts writing
    assert a.get_timer() == 70.0
    a.handle_timer(69.9)
    assert a.state == "open"
    a.sending(50.0)  # one message written: progress
    assert a.get_timer() == 110.0
    a.handle_timer(70.0)
    assert a.state == "open"
    a.sent()  # all written: nothing to watch
    assert a.get_timer() == 1000
    a.handle_timer(500.0)
    assert a.state == "open"

    ha.edit("env", {"v": 2})
    handed += a.data_to_send()
    a.sending(600.0)
    ha.edit("env", {"v": 3})  # queued behind the stuck write
    a.handle_timer(660.0)
    (closed,) = [e for e in drain_events(a) if isinstance(e, Closed)]
    assert (closed.reason, closed.by_peer) == ("too-slow", False)
    assert "no progress writing to the peer for 60.0 s" in closed.detail
    (close,) = a.data_to_send()  # the queue was dropped: only the close is left
    for data in [*handed, close]:  # should the stuck writes get through after all
        b.receive(data, 660.0)
        pump(b, hb)
    assert b.closed is not None and b.closed.reason == "too-slow" and b.closed.by_peer
    assert a.get_timer() is None


def test_the_handshake_is_watched_for_a_stalled_write_too():
    a = PeerConnection(ALICE, FakeHost([S1]), dialer=True, now=0.0)  # type: ignore[arg-type]
    assert a.data_to_send()  # the hello
    a.sending(0.0)
    assert a.get_timer() == 10.0  # the handshake timeout comes first
    a.handle_timer(10.0)
    assert a.closed is not None and a.closed.reason == "timeout"
    c = PeerConnection(
        ALICE,
        FakeHost([S1]),  # type: ignore[arg-type]
        dialer=True,
        now=0.0,
        config=SessionConfig(send_timeout=5.0),
    )
    c.sending(1.0)
    assert c.get_timer() == 6.0
    c.handle_timer(6.0)
    assert c.closed is not None and c.closed.reason == "too-slow"


# -- Backoff -------------------------------------------------------------------------------------


class Fixed:
    """A stand-in for random.Random: always the same point of the jitter range."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + (b - a) * self.at


def test_backoff_doubles_up_to_the_maximum_and_resets():
    backoff = Backoff(0.5, 6.0, 0.2, Fixed(0.5))  # the middle of the range: no jitter
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    backoff.reset()
    assert backoff.base == 0.5 and backoff.next_delay() == 0.5


def test_backoff_jitter_stays_within_its_range():
    low, high = Fixed(0.0), Fixed(1.0)
    assert Backoff(1.0, 60.0, 0.2, low).next_delay() == pytest.approx(0.8)
    assert Backoff(1.0, 60.0, 0.2, high).next_delay() == pytest.approx(1.2)
    assert low.calls == [(0.8, 1.2)]
    backoff = Backoff(0.5, 60.0, 0.2)  # a real random.Random
    for expected in (0.5, 1.0, 2.0, 4.0):
        assert expected * 0.8 <= backoff.next_delay() <= expected * 1.2


def test_backoff_refuses_settings_that_make_no_sense():
    for args in ((0.0, 1.0, 0.2), (2.0, 1.0, 0.2), (0.5, 1.0, 1.0), (0.5, 1.0, -0.1)):
        with pytest.raises(ValueError):
            Backoff(*args)


def test_peer_config_builds_backoffs_from_its_settings():
    config = PeerConfig(backoff_initial=0.05, backoff_max=0.1, backoff_jitter=0.0)
    backoff = config.new_backoff(Fixed(0.3))
    assert [backoff.next_delay() for _ in range(3)] == [0.05, 0.1, 0.1]


# -- the split settings and the package face ------------------------------------------------------


def test_the_core_gets_only_its_own_part_of_the_settings():
    config = PeerConfig(max_message=4096, send_timeout=7.0, close_grace=0.5, backoff_max=3.0)
    session = config.session
    assert type(session) is SessionConfig
    assert (session.max_message, session.send_timeout) == (4096, 7.0)
    assert not hasattr(session, "close_grace") and not hasattr(session, "backoff_max")
    shell_only = {f.name for f in fields(PeerConfig)} - {f.name for f in fields(SessionConfig)}
    assert shell_only == {
        "connect_timeout",
        "close_grace",
        "backoff_initial",
        "backoff_max",
        "backoff_jitter",
        "max_rows",
        "max_half_open",
        "max_half_open_per_ip",
    }


def test_the_package_face_loads_no_trio_until_a_shell_name_is_used():
    code = (
        "import sys\n"
        "import peerdaemon.peer as peer\n"
        "assert 'trio' not in sys.modules, 'the face imported trio'\n"
        "assert peer.PeerConnection and peer.Backoff and peer.PeerConfig\n"
        "from peerdaemon.peer import Link, PeerManager, Unreachable, dial, serve\n"
        "assert 'trio' in sys.modules\n"
        "import peerdaemon.peer.link as link\n"
        "assert Link is link.Link and dial is link.dial\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    import peerdaemon.peer as peer

    for name in peer.__all__:
        assert getattr(peer, name) is not None, name
    with pytest.raises(AttributeError):
        peer.NoSuchName  # noqa: B018
