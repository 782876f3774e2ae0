"""Mock serving on a device, end to end: a whole daemon in this process, the real runner
(`peerdaemon mock install`, docs/mock-runner.md) and Mockoon's engine, on 127.0.0.1 only.

Served live (an edit reaches the served responses, a request in flight survives it), kept
across restarts, supervised (the runner killed with SIGKILL comes back with every server),
and every failure is a state with a reason: a port in use, no runner, a deleted environment.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
import trio
from daemonutil import (
    InProcessDaemon,
    base_fixture,  # noqa: F401  (fixture)
)
from helpers import TIMEOUT, free_port, run_cli, until
from mockutil import request, require_runner, small_env

from peerdaemon.api.client import DaemonError
from peerdaemon.daemon.supervisor import DaemonConfig


@pytest.fixture(autouse=True)
def runner(monkeypatch):
    return require_runner(monkeypatch)


async def start(base, nursery, name: str = "d") -> InProcessDaemon:
    daemon = InProcessDaemon(base, name)
    await daemon.start_with(nursery, DaemonConfig(daemon.data_dir, daemon.socket_path))
    return daemon


async def events(d: InProcessDaemon) -> list[dict]:
    sub = await d.client.subscribe_events(since=0)
    await sub.aclose()
    return sub.initial["events"]


async def get(port: int, path: str, **kwargs) -> tuple[int, dict, bytes]:
    return await trio.to_thread.run_sync(lambda: request(port, path, **kwargs))


async def body_of(port: int, path: str) -> bytes | None:
    try:
        return (await get(port, path))[2]
    except OSError:
        return None


async def test_start_serves_lists_logs_and_stops(base, nursery):
    d = await start(base, nursery)
    env = small_env()
    env_id = (await d.op("env.import", env=env))["id"]
    port = free_port()
    served = await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    assert served["state"] == "running" and served["port"] == port
    assert served["url"] == f"http://127.0.0.1:{port}/"
    status, headers, body = await get(port, "/hello?x=1")
    assert (status, body) == (200, b"hello v1")
    assert headers["content-type"].startswith("text/plain")
    [listed] = await until(lambda: _requests(d, 1))
    assert listed["id"] == env_id and listed["name"] == "Served" and listed["error"] is None
    logs = await d.op("mock.logs", id=env_id)
    [entry] = logs["entries"]
    assert entry["method"] == "GET" and entry["path"] == "/hello" and entry["status"] == 200
    assert entry["routeUUID"] == env["routes"][0]["uuid"]
    assert entry["routeResponseUUID"] == env["routes"][0]["responses"][0]["uuid"]
    assert isinstance(entry["durationMs"], int | float)
    assert (await d.op("mock.stop", id=env_id))["stopped"]
    assert await d.op("mock.list") == []
    with pytest.raises(OSError):
        await get(port, "/hello")
    with pytest.raises(DaemonError) as info:
        await d.op("mock.stop", id=env_id)
    assert info.value.code == "not-found"
    await d.stop()


async def _requests(d: InProcessDaemon, n: int) -> list | None:
    listed = await d.op("mock.list")
    return listed if listed and listed[0]["requests"] >= n else None


async def test_edits_are_served_live_and_requests_in_flight_survive(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    port = free_port()
    await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    slow: list = []

    async def slow_request() -> None:
        slow.append(await get(port, "/slow"))

    async with trio.open_nursery() as inner:
        inner.start_soon(slow_request)
        await until(lambda: d.daemon.mocks.engine.servers[env_id].requests >= 0)
        for i in range(5):  # edits while /slow is in flight (latency 600 ms)
            await d.op(
                "env.patch",
                id=env_id,
                patch=[{"op": "replace", "path": "/routes/0/responses/0/body", "value": f"v{i}"}],
            )
        await until(lambda: body_of(port, "/hello"), what="served")
        assert await until(
            lambda: _equals(body_of(port, "/hello"), b"v4"), what="the last edit served"
        )
    assert slow == [(200, slow[0][1], b"slow done")]
    # an endpoint renamed: the old path is gone, the new one answers, no restart
    pid = d.daemon.mocks.shell.pid
    await d.op(
        "env.patch",
        id=env_id,
        patch=[{"op": "replace", "path": "/routes/0/endpoint", "value": "hi"}],
    )
    await until(lambda: _equals(body_of(port, "/hi"), b"v4"))
    assert (await get(port, "/hello"))[0] == 404
    assert d.daemon.mocks.shell.pid == pid
    await d.stop()


async def _equals(awaitable, expected):
    return (await awaitable) == expected


async def test_port_change_restarts_only_that_server(base, nursery):
    d = await start(base, nursery)
    a = (await d.op("env.import", env=small_env("A", free_port())))["id"]
    b = (await d.op("env.import", env=small_env("B", free_port())))["id"]
    await d.op("mock.start", id=a)
    served_b = await d.op("mock.start", id=b)
    new_port = free_port()
    await d.op("env.patch", id=a, patch=[{"op": "replace", "path": "/port", "value": new_port}])
    await until(lambda: _equals(body_of(new_port, "/hello"), b"hello v1"))
    assert (await get(served_b["port"], "/hello"))[2] == b"hello v1"
    await d.stop()


async def test_served_mocks_come_back_after_a_restart(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    port = free_port()
    await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    await d.stop()
    with pytest.raises(OSError):
        await get(port, "/hello")  # the runner ended with the daemon
    d2 = await start(base, nursery)
    await until(lambda: body_of(port, "/hello"), what="served again after the restart")
    [listed] = await d2.op("mock.list")
    assert listed["port"] == port and listed["state"] == "running"
    await d2.stop()


async def test_port_in_use_is_a_state_then_fixed(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DaemonError) as info:
            await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
        assert info.value.code == "mock-failed" and str(port) in info.value.message
        [listed] = await d.op("mock.list")
        assert listed["state"] == "error" and listed["error"]["code"] == "PORT_ALREADY_USED"
        assert (await d.op("env.list"))[0]["id"] == env_id  # the daemon goes on
        assert "mock-error" in [e["type"] for e in await events(d)]
    other = free_port()
    served = await d.op("mock.start", id=env_id, port=other, hostname="127.0.0.1")
    assert served["state"] == "running"
    await d.stop()


async def test_runner_killed_comes_back_with_every_server(base, nursery):
    d = await start(base, nursery)
    ports = []
    for name in ("A", "B"):
        env_id = (await d.op("env.import", env=small_env(name)))["id"]
        ports.append(free_port())
        await d.op("mock.start", id=env_id, port=ports[-1], hostname="127.0.0.1")
    pid = d.daemon.mocks.shell.pid
    os.kill(pid, signal.SIGKILL)
    await until(lambda: d.daemon.mocks.shell.pid not in (None, pid), what="a new runner")
    for port in ports:
        await until(lambda port=port: _equals(body_of(port, "/hello"), b"hello v1"))
    assert "mock-runner-exited" in [e["type"] for e in await events(d)]
    await d.stop()


async def test_without_a_runner_serving_says_what_to_run(base, nursery, monkeypatch, tmp_path):
    monkeypatch.setenv("PEERDAEMON_MOCK_RUNNER", str(tmp_path / "nothing-here"))
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    with pytest.raises(DaemonError) as info:
        await d.op("mock.start", id=env_id, port=free_port(), hostname="127.0.0.1")
    assert info.value.code == "mock-unavailable"
    assert "peerdaemon mock install" in info.value.message and "\n" not in info.value.message
    [listed] = await d.op("mock.list")
    assert listed["state"] == "unavailable"
    assert (await d.op("env.get", id=env_id))["name"] == "Served"  # everything else works
    await d.stop()


async def test_deleting_the_environment_stops_its_mock(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    port = free_port()
    await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    await d.op("env.delete", id=env_id)
    await until(lambda: _gone(port), what="the server stopped")
    assert await d.op("mock.list") == []
    await d.stop()


async def _gone(port: int) -> bool:
    try:
        await get(port, "/hello", timeout=1)
    except OSError:
        return True
    return False


async def test_logs_follow_delivers_each_request(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    port = free_port()
    await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    async with await d.client.subscribe("mock.logs", id=env_id, follow=True) as sub:
        assert sub.initial["entries"] == []
        await get(port, "/hello")
        with trio.fail_after(TIMEOUT):
            event = await sub.__anext__()
        assert event["type"] == "request" and event["path"] == "/hello"
        assert event["status"] == 200
    await d.stop()


async def test_cli(base, nursery, capsys):
    d = await start(base, nursery)
    env_id = (await d.op("env.import", env=small_env()))["id"]
    port = free_port()
    sock = str(d.socket_path)
    assert (
        await run_cli(
            "--socket",
            sock,
            "mock",
            "start",
            env_id,
            "--port",
            str(port),
            "--hostname",
            "127.0.0.1",
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == f"http://127.0.0.1:{port}/"
    await get(port, "/hello")
    await until(lambda: _requests(d, 1))
    assert await run_cli("--socket", sock, "mock", "list") == 0
    out = capsys.readouterr().out
    assert env_id in out and "running" in out and f":{port}/" in out
    assert await run_cli("--socket", sock, "mock", "logs", env_id) == 0
    line = capsys.readouterr().out.strip()
    assert "GET  /hello  200" in line and line.endswith("ms")
    assert await run_cli("--socket", sock, "mock", "stop", env_id) == 0
    assert await run_cli("--socket", sock, "mock", "stop", env_id) == 1
    assert capsys.readouterr().err.startswith("peerdaemon: ")
    await d.stop()


async def test_an_edit_on_a_lan_peer_changes_what_this_device_serves(base, nursery):
    from daemonutil import Dev, converged, make_space  # noqa: PLC0415

    a, b = Dev(base, "a"), Dev(base, "b")
    await a.start(nursery)
    await b.start(nursery, a)
    space_id = await make_space(a, b)
    env_id = (await a.op("env.import", env=small_env()))["id"]
    await a.op("env.share", id=env_id, space=space_id)
    await converged([a, b], env_id)
    port = free_port()
    await b.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    assert (await get(port, "/hello"))[2] == b"hello v1"
    await a.op(
        "env.patch",
        id=env_id,
        patch=[{"op": "replace", "path": "/routes/0/responses/0/body", "value": "from a"}],
    )
    await until(lambda: _equals(body_of(port, "/hello"), b"from a"), what="a's edit served on b")
    await b.stop()
    await a.stop()


async def test_a_refused_environment_and_a_missing_file_are_states_with_reasons(base, nursery):
    d = await start(base, nursery)
    env = small_env()
    env["routes"][0]["responses"][0].update(bodyType="FILE", filePath="missing.json")
    env_id = (await d.op("env.import", env=env))["id"]
    port = free_port()
    await d.op("mock.start", id=env_id, port=port, hostname="127.0.0.1")
    status, _, body = await get(port, "/hello")  # Mockoon's own answer for a missing file
    assert status == 200 and b"missing.json" in body
    [listed] = await until(lambda: _errored(d))
    assert listed["state"] == "running" and listed["error"]["code"] == "ROUTE_FILE_SERVING_ERROR"
    # TLS on with a certificate that is not there: Mockoon refuses to start it
    await d.op(
        "env.patch",
        id=env_id,
        patch=[
            {"op": "replace", "path": "/tlsOptions/enabled", "value": True},
            {"op": "replace", "path": "/tlsOptions/certPath", "value": "nope.pem"},
            {"op": "replace", "path": "/tlsOptions/keyPath", "value": "nope.key"},
        ],
    )
    [listed] = await until(lambda: _state(d, "error"))
    assert listed["error"]["code"] == "CERT_FILE_NOT_FOUND"
    assert "mock-error" in [e["type"] for e in await events(d)]
    # fixed: the next change starts it again
    await d.op(
        "env.patch",
        id=env_id,
        patch=[{"op": "replace", "path": "/tlsOptions/enabled", "value": False}],
    )
    await until(lambda: _state(d, "running"))
    assert (await get(port, "/slow"))[0] == 200
    await d.stop()


async def _errored(d: InProcessDaemon) -> list | None:
    listed = await d.op("mock.list")
    return listed if listed and listed[0]["error"] else None


async def _state(d: InProcessDaemon, state: str) -> list | None:
    listed = await d.op("mock.list")
    return listed if listed and listed[0]["state"] == state else None
