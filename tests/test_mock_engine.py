"""The mock supervisor's core (peerdaemon/mock/engine.py) and line protocol, without a process:
feed wishes, runner events and times; read commands, notices and deadlines."""

from __future__ import annotations

import random

import pytest

from peerdaemon.core.backoff import Backoff
from peerdaemon.mock.engine import ERROR, RUNNING, STARTING, UNAVAILABLE, MockEngine, ServerSpec
from peerdaemon.mock.protocol import (
    LineReader,
    RunnerEvent,
    RunnerProtocolError,
    encode,
    parse_event,
)


def env(name: str = "e", port: int = 3000) -> dict:
    return {"uuid": "u", "name": name, "port": port, "routes": []}


def engine() -> MockEngine:
    return MockEngine(backoff=Backoff(1.0, 8.0, 0.0, random.Random(0)))


def ev(kind: str, server: str | None = None, **data: object) -> RunnerEvent:
    return RunnerEvent(kind, server, dict(data))


def test_nothing_wanted_no_runner() -> None:
    e = engine()
    assert not e.want_runner(0.0)
    assert e.deadline() is None


def test_start_waits_for_ready_then_sends_start() -> None:
    e = engine()
    e.serve("a", ServerSpec(env(), "/d", 0, "127.0.0.1"), 0.0)
    assert e.take_commands() == []  # no runner yet
    assert e.want_runner(0.0)
    e.spawned(0.0)
    assert not e.want_runner(0.0)
    e.receive(ev("ready", runner=1), 0.1)
    [cmd] = e.take_commands()
    assert cmd["cmd"] == "start" and cmd["id"] == "a" and cmd["port"] == 0
    assert cmd["hostname"] == "127.0.0.1" and cmd["directory"] == "/d"
    e.receive(ev("started", "a", port=4321, hostname="127.0.0.1", tls=False), 0.2)
    server = e.servers["a"]
    assert server.state == RUNNING and server.port == 4321
    assert [n.kind for n in e.take_notices()] == ["runner-ready", "started"]


def running() -> MockEngine:
    e = engine()
    e.serve("a", ServerSpec(env(), "/d"), 0.0)
    e.spawned(0.0)
    e.receive(ev("ready"), 0.0)
    e.receive(ev("started", "a", port=3000), 0.0)
    e.take_commands()
    e.take_notices()
    return e


def test_change_is_an_update_and_coalesces() -> None:
    e = running()
    e.change("a", env("v1"), 1.0)
    e.change("a", env("v2"), 1.0)
    [cmd] = e.take_commands()
    assert cmd == {"cmd": "update", "id": "a", "environment": env("v2")}


def test_fatal_error_is_a_state_and_next_change_retries() -> None:
    e = running()
    e.receive(ev("error", "a", code="PORT_ALREADY_USED", message="in use", fatal=True), 2.0)
    server = e.servers["a"]
    assert server.state == ERROR and server.error["code"] == "PORT_ALREADY_USED"
    e.change("a", env("fixed", 3001), 3.0)
    [cmd] = e.take_commands()
    assert cmd["cmd"] == "start" and cmd["environment"]["port"] == 3001
    assert e.servers["a"].state == STARTING


def test_nonfatal_error_keeps_running() -> None:
    e = running()
    e.receive(ev("error", "a", code="ROUTE_FILE_SERVING_ERROR", message="x", fatal=False), 2.0)
    assert e.servers["a"].state == RUNNING
    assert e.servers["a"].error["code"] == "ROUTE_FILE_SERVING_ERROR"


def test_runner_death_backoff_and_restart_of_every_server() -> None:
    e = running()
    e.serve("b", ServerSpec(env("b", 3002), "/d"), 0.0)
    e.take_commands()
    e.exited("runner exited with code 137", 1.0)
    assert all(s.state == STARTING for s in e.servers.values())
    assert e.take_notices()[-1].kind == "runner-exited"
    assert e.deadline() == pytest.approx(2.0)  # backoff 1 s
    assert not e.want_runner(1.5)
    assert e.want_runner(2.0)
    e.spawned(2.0)
    e.exited("again", 2.5)  # died young: the next wait doubles
    assert e.deadline() == pytest.approx(4.5)
    e.spawned(4.5)
    e.receive(ev("ready"), 4.6)
    started = sorted(c["id"] for c in e.take_commands() if c["cmd"] == "start")
    assert started == ["a", "b"]


def test_runner_never_ready_is_killed() -> None:
    e = engine()
    e.serve("a", ServerSpec(env(), "/d"), 0.0)
    e.spawned(0.0)
    assert e.deadline() == pytest.approx(20.0)
    assert not e.handle_timer(19.0)
    assert e.handle_timer(20.0)


def test_commands_for_a_dead_runner_are_dropped() -> None:
    e = running()
    e.change("a", env("v1"), 1.0)
    e.exited("gone", 1.0)
    assert e.take_commands() == []
    e.spawned(3.0)
    e.receive(ev("ready"), 3.0)
    [cmd] = e.take_commands()
    assert cmd["cmd"] == "start" and cmd["environment"]["name"] == "v1"


def test_unavailable_says_why_and_recovers() -> None:
    e = engine()
    e.serve("a", ServerSpec(env(), "/d"), 0.0)
    e.unavailable("mock serving needs Node.js 18+", 0.0)
    server = e.servers["a"]
    assert server.state == UNAVAILABLE and "Node.js" in server.error["message"]
    assert not e.want_runner(10.0)
    assert e.deadline() == pytest.approx(30.0)  # looked for again: installed meanwhile?
    assert e.want_runner(30.0)
    e.unavailable("still not", 30.0)
    e.available()  # `mock start` again: at once
    assert e.want_runner(31.0)


def test_remove_stops_and_ignores_late_events() -> None:
    e = running()
    assert e.remove("a")
    assert e.take_commands() == [{"cmd": "stop", "id": "a"}]
    e.receive(ev("transaction", "a", status=200), 1.0)  # in flight before the stop
    assert "a" not in e.servers
    assert not e.remove("a")


def test_transactions_count_and_notify() -> None:
    e = running()
    e.receive(ev("transaction", "a", method="GET", path="/x", status=200), 1.0)
    assert e.servers["a"].requests == 1
    [notice] = e.take_notices()
    assert notice.kind == "request" and notice.data["path"] == "/x"


def test_line_reader_and_events() -> None:
    reader = LineReader(max_line=32)
    assert reader.feed(b'{"event":"ready"}\n{"ev') == [b'{"event":"ready"}']
    assert reader.feed(b'ent":"pong","n":1}\n') == [b'{"event":"pong","n":1}']
    with pytest.raises(RunnerProtocolError):
        reader.feed(b"x" * 40)
    assert parse_event(b'{"event":"started","id":"a","port":1}') == RunnerEvent(
        "started", "a", {"port": 1}
    )
    for bad in (
        b"nope",
        b"[1]",
        b'{"event":"what"}',
        b'{"event":"started"}',
        b'{"event":"stopped","id":3}',
    ):
        with pytest.raises(RunnerProtocolError):
            parse_event(bad)
    assert encode({"cmd": "ping", "n": 1}) == b'{"cmd":"ping","n":1}\n'
    with pytest.raises(ValueError):
        encode({"x": float("nan")})
