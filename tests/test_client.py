"""AsyncClient and the blocking Client against serve_unix + the fake Handler."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import FakeHandler
from helpers import until_sync as _wait_for

from peerdaemon.api import server as server_mod
from peerdaemon.api.client import (
    AsyncClient,
    Client,
    ConnectionLost,
    DaemonError,
    DaemonNotRunning,
    ForeignListener,
    open_client,
)
from peerdaemon.api.server import serve_unix


@pytest.fixture
def sock_path(tmp_path_factory):
    return tmp_path_factory.mktemp("c") / "peerdaemon" / "pd.sock"


@pytest.fixture
def handler():
    return FakeHandler()


@pytest.fixture
async def server(nursery, sock_path, handler):
    await nursery.start(partial(serve_unix, sock_path, handler, max_frame=1 << 16))
    return sock_path


# --- AsyncClient ----------------------------------------------------------------------------------
async def test_call_and_bytes(server):
    async with await AsyncClient.connect(server) as c:
        assert await c.call("echo", a=1, b=b"\x00") == {"a": 1, "b": b"\x00"}
        assert await c.call("bytes") == b"\x00\x01\x02"


async def test_open_client_and_daemon_error(server):
    async with open_client(server) as c:
        with pytest.raises(DaemonError) as info:
            await c.call("fail")
        assert info.value.code == "not-found"
        assert info.value.message == "no such thing"
        assert "not-found" in str(info.value)
        assert await c.call("echo") == {}  # still usable


async def test_body_exception_is_not_wrapped_in_a_group(server):
    with pytest.raises(ValueError, match="mine"):
        async with open_client(server):
            raise ValueError("mine")


async def test_concurrent_calls_are_pipelined_and_matched_by_id(server, handler):
    results = {}
    async with open_client(server) as c:

        async def durable(n: int) -> None:
            results[n] = await c.call("durable", gate=f"g{n}", n=n)

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(durable, n)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(a["n"] for _, a in handler.applied) == list(range(5))
            for n in reversed(range(5)):  # acknowledge in reverse order
                handler.gate(f"g{n}").set()
    assert results == {n: {"n": n} for n in range(5)}


async def test_cancelled_call_leaves_client_usable(server, handler):
    async with open_client(server) as c:
        with trio.CancelScope() as scope:

            async def cancel_when_blocked() -> None:
                await handler.blocked.wait()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_blocked)
                await c.call("block", gate="g")
        assert scope.cancelled_caught
        handler.gate("g").set()
        assert await c.call("echo", x=1) == {"x": 1}  # the late "unblocked" reply is ignored


async def test_convenience_methods_send_the_documented_args(server, handler):
    handler.responses.update(
        {
            "status": {"version": "t"},
            "env.list": [{"id": "e1"}],
            "env.import": {"id": "e1", "repairs": []},
            "env.get": "value",
            "env.put": {"changed": True, "repairs": []},
            "env.patch": {"changed": False},
            "env.delete": {"deleted": True},
            "env.export": {"uuid": "e1"},
            "env.merge": {"created": False, "changed": True},
        }
    )
    async with open_client(server) as c:
        assert await c.status() == {"version": "t"}
        assert await c.list_envs() == [{"id": "e1"}]
        assert await c.import_env('{"uuid": "e1"}') == {"id": "e1", "repairs": []}
        await c.import_env({"uuid": "e1"}, new_id=True)
        assert await c.get("e1") == "value"
        await c.get("e1", "/name")
        await c.put("e1", {"uuid": "e1"})
        await c.put("e1", "{}")
        await c.patch("e1", [{"op": "remove", "path": "/x"}])
        await c.patch("e1", "[]")
        await c.delete("e1")
        await c.export("e1")
        await c.export("e1", "yjs", state_vector=b"\x00")
        await c.merge("e1", bytearray(b"\x01"))
    assert handler.applied == [
        ("status", {}),
        ("env.list", {}),
        ("env.import", {"json": '{"uuid": "e1"}'}),
        ("env.import", {"env": {"uuid": "e1"}, "new_id": True}),
        ("env.get", {"id": "e1"}),
        ("env.get", {"id": "e1", "pointer": "/name"}),
        ("env.put", {"id": "e1", "env": {"uuid": "e1"}}),
        ("env.put", {"id": "e1", "json": "{}"}),
        ("env.patch", {"id": "e1", "patch": [{"op": "remove", "path": "/x"}]}),
        ("env.patch", {"id": "e1", "json": "[]"}),
        ("env.delete", {"id": "e1"}),
        ("env.export", {"id": "e1", "format": "json"}),
        ("env.export", {"id": "e1", "format": "yjs", "state_vector": b"\x00"}),
        ("env.merge", {"id": "e1", "update": b"\x01"}),
    ]


async def test_env_subscription_iterates_and_unsubscribes(server, handler):
    async with open_client(server) as c:
        sub = await c.subscribe_env("e1")
        assert sub.initial["snapshot"] == {"uuid": "e1"}
        assert sub.initial["update"] == b"\x00\x00"
        session = handler.sessions[0]
        for n in range(3):
            session.push(sub.sub, {"type": "change", "id": "e1", "n": n})
        got = []
        async for event in sub:
            got.append(event["n"])
            if len(got) == 3:
                break
        assert got == [0, 1, 2]
        await sub.aclose()
        assert handler.closed_subs == [sub.sub]
        assert ("unsubscribe", {"sub": sub.sub}) in handler.applied
        assert [e async for e in sub] == []  # ended


async def test_events_arriving_with_the_subscribe_response_are_kept(server):
    async with open_client(server) as c:
        async with await c._subscribe("subscribe", {"early": [{"n": 1}, {"n": 2}]}) as sub:
            assert [await sub.__anext__(), await sub.__anext__()] == [{"n": 1}, {"n": 2}]


async def test_events_subscription_since(server, handler):
    async with open_client(server) as c:
        sub = await c.subscribe_events(since=41)
        assert sub.initial == {"sub": sub.sub, "cursor": 41}
        sub2 = await c.subscribe_events()
        assert sub2.initial["cursor"] == 0
    assert handler.applied[:2] == [("events.subscribe", {"since": 41}), ("events.subscribe", {})]


async def test_cancelled_subscribe_is_undone(server, handler):
    async with open_client(server) as c:
        with trio.CancelScope() as scope:
            scope.cancel()
            await c.subscribe_env("e1")  # request queued, caller cancelled before the reply
        await handler.sub_closed.wait()  # the client unsubscribed on its own
        assert [op for op, _ in handler.applied] == ["env.subscribe", "unsubscribe"]


async def test_connection_lost_fails_calls_and_subscriptions(nursery, sock_path, handler):
    server_scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await serve_unix(sock_path, handler, task_status=task_status)

    await nursery.start(run_server)
    async with open_client(sock_path) as c:
        sub = await c.subscribe_env("e1")
        async with trio.open_nursery() as inner:

            async def stop_server() -> None:
                await handler.blocked.wait()
                server_scope.cancel()

            inner.start_soon(stop_server)
            with pytest.raises(ConnectionLost):
                await c.call("block", gate="never")
        with pytest.raises(ConnectionLost):
            await sub.__anext__()
        with pytest.raises(ConnectionLost):
            await c.call("echo")
        assert c.closed


async def test_request_larger_than_max_frame_fails_locally(server, handler):
    async with await AsyncClient.connect(server, max_frame=1024) as c:
        with pytest.raises(DaemonError) as info:
            await c.call("echo", blob=b"\x00" * 2048)
        assert info.value.code == "frame-too-large"
        assert await c.call("echo") == {}
    assert handler.applied == [("echo", {})]


async def test_forbidden_is_reported(server, monkeypatch):
    monkeypatch.setattr(server_mod.os, "getuid", lambda: 4242)
    async with open_client(server) as c:
        with pytest.raises(DaemonError) as info:
            await c.call("echo")
        assert info.value.code == "forbidden"


async def test_call_requires_async_with(server):
    c = await AsyncClient.connect(server)
    with pytest.raises(RuntimeError, match="async with"):
        await c.call("echo")
    await c.aclose()


async def test_async_daemon_not_running(tmp_path):
    with pytest.raises(DaemonNotRunning) as info:
        await AsyncClient.connect(tmp_path / "missing.sock")
    assert str(info.value) == (
        f"no peerdaemon is running on {tmp_path / 'missing.sock'} (start one with `peerdaemon run`)"
    )


# --- blocking Client ------------------------------------------------------------------------------
async def test_blocking_client_calls(server, handler):
    def work():
        with Client.connect(server) as c:
            out = [c.call("echo", a=b"\x01"), c.status(), c.get("e1", "/x")]
            with pytest.raises(DaemonError) as info:
                c.call("fail")
            out.append(info.value.code)
            out.append(c.call("echo"))
            return out

    handler.responses["status"] = {"ok": True}
    handler.responses["env.get"] = [1, 2]
    assert await trio.to_thread.run_sync(work) == [
        {"a": b"\x01"},
        {"ok": True},
        [1, 2],
        "not-found",
        {},
    ]


async def test_blocking_client_subscription_generator(server, handler):
    def work():
        with Client.connect(server) as c:
            sub = c.subscribe_env("e1")
            assert sub.initial["snapshot"] == {"uuid": "e1"}
            c.call("emit", sub=sub.sub, event={"type": "change", "n": 1})
            c.call("emit", sub=sub.sub, event={"type": "change", "n": 2})
            events = sub.__iter__()
            got = [next(events)["n"], next(events)["n"]]
            with pytest.raises(TimeoutError):
                sub.next_event(timeout=0.01)
            sub.close()
            assert sub.next_event() is None
            return got, sub.sub

    got, sub = await trio.to_thread.run_sync(work)
    assert got == [1, 2]
    assert handler.closed_subs == [sub]


async def test_blocking_early_events_are_kept(server):
    def work():
        with Client.connect(server) as c:
            sub = c._subscribe("subscribe", {"early": [{"n": 1}]})
            return sub.next_event(timeout=5)

    assert await trio.to_thread.run_sync(work) == {"n": 1}


async def test_blocking_connection_lost(nursery, sock_path, handler):
    server_scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await serve_unix(sock_path, handler, task_status=task_status)

    await nursery.start(run_server)

    def work():
        c = Client.connect(sock_path)
        with pytest.raises(ConnectionLost):
            c.call("block", gate="never")
        assert c.closed
        with pytest.raises(ConnectionLost):
            c.call("echo")

    async with trio.open_nursery() as inner:
        inner.start_soon(partial(trio.to_thread.run_sync, work))
        await handler.blocked.wait()
        server_scope.cancel()


def test_blocking_daemon_not_running(tmp_path):
    with pytest.raises(DaemonNotRunning):
        Client.connect(tmp_path / "missing.sock")
    with pytest.raises(DaemonNotRunning):
        Client.connect("/nonexistent/dir/pd.sock")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(DaemonNotRunning):
        Client.connect(stale)


def test_default_socket_path_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("PEERDAEMON_SOCKET", str(tmp_path / "env.sock"))
    with pytest.raises(DaemonNotRunning) as info:
        Client.connect()
    assert info.value.path == tmp_path / "env.sock"


def test_default_paths(monkeypatch):
    from peerdaemon.core.locations import default_data_dir, default_socket_path

    monkeypatch.delenv("PEERDAEMON_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert str(default_socket_path()) == "/run/user/1000/peerdaemon/peerdaemon.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert str(default_socket_path()) == f"/tmp/peerdaemon-{os.getuid()}/peerdaemon.sock"
    monkeypatch.delenv("PEERDAEMON_DATA_DIR", raising=False)
    assert default_data_dir().name == "peerdaemon"
    monkeypatch.setenv("PEERDAEMON_DATA_DIR", "/srv/pd")
    assert str(default_data_dir()) == "/srv/pd"


async def test_aclose_inside_the_body_does_not_cancel_it(server):
    reached = False
    async with await AsyncClient.connect(server) as c:
        await c.aclose()
        await trio.lowlevel.checkpoint()
        reached = True
        with pytest.raises(ConnectionLost):
            await c.call("echo")
    assert reached


async def test_env_subscription_ends_after_deleted(server, handler):
    async with open_client(server) as c:
        sub = await c.subscribe_env("e1")
        session = handler.sessions[0]
        session.push(sub.sub, {"type": "change", "id": "e1"})
        session.push(sub.sub, {"type": "deleted", "id": "e1"})
        assert [e["type"] async for e in sub] == ["change", "deleted"]
        await sub.aclose()  # no-op: the daemon closed it
    assert "unsubscribe" not in [op for op, _ in handler.applied]


async def test_blocking_env_subscription_ends_after_deleted(server, handler):
    def work():
        with Client.connect(server) as c:
            sub = c.subscribe_env("e1")
            c.call("emit", sub=sub.sub, event={"type": "change"})
            c.call("emit", sub=sub.sub, event={"type": "deleted"})
            return [e["type"] for e in sub]

    assert await trio.to_thread.run_sync(work) == ["change", "deleted"]


# --- who is listening ------------------------------------------------------------------------------
class RawListener:
    """A plain listener that records every byte each client sends until it closes: the
    impostor a client must not talk to."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while chunk := conn.recv(1 << 16):
                    data += chunk
                self.received.append(data)

    def close(self) -> None:
        self.sock.close()


def other_uid() -> int:
    return 65534 if os.getuid() != 65534 else 4242


async def test_a_listener_of_another_user_gets_nothing(tmp_path, monkeypatch):
    """SO_PEERCRED of the listener (faked here: no second user needed): both clients refuse a
    listener of another uid right after connecting, before sending a byte; root's and our own
    are accepted. (Without the check, `space hub ... --token SECRET` handed the token to
    whoever bound a shared `--socket` path first.)"""
    from peerdaemon import cli
    from peerdaemon.api import peercred

    path = tmp_path / "pd.sock"
    impostor = RawListener(path)
    listener_uid = other_uid()
    monkeypatch.setattr(peercred, "peer_credentials", lambda sock: (1, listener_uid, 1))
    try:
        with pytest.raises(ForeignListener) as info:
            Client.connect(path, timeout=10)
        assert f"uid {listener_uid}" in str(info.value) and str(path) in str(info.value)
        with pytest.raises(ForeignListener):
            await AsyncClient.connect(path)
        argv = ["--socket", str(path), "space", "hub", "team", "ws://127.0.0.1:9", "--token=s3"]
        assert await trio.to_thread.run_sync(cli.main, argv) == 1

        def broken(sock):
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(peercred, "peer_credentials", broken)
        with pytest.raises(ForeignListener, match="cannot be checked"):
            Client.connect(path, timeout=10)
        await trio.to_thread.run_sync(_wait_for, lambda: len(impostor.received) == 4)
        assert impostor.received == [b""] * 4  # four connections, not one byte

        for uid in (0, os.getuid()):  # root's daemon, or our own: fine
            monkeypatch.setattr(peercred, "peer_credentials", lambda sock, uid=uid: (1, uid, 1))
            Client.connect(path, timeout=10).close()
            await (await AsyncClient.connect(path)).aclose()
    finally:
        impostor.close()


def _impostor(path: Path, connections: int, report: int) -> None:
    """In a forked child: become uid 65534, bind `path`, and report on the pipe `report` how
    many bytes each of `connections` clients sent."""
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        os.umask(0)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(4)
        s.settimeout(30)  # the parent failed: do not wait for it forever
        os.write(report, b"ready\n")
        for _ in range(connections):
            conn, _ = s.accept()
            conn.settimeout(20)
            n = 0
            while chunk := conn.recv(65536):
                n += len(chunk)
            os.write(report, f"{n}\n".encode())
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised here
        os.write(report, f"error {exc!r}\n".encode())
    finally:
        os._exit(0)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a listener as another uid")
def test_a_real_listener_of_another_uid_is_refused(capsys):
    """The same with a real second user: as root, a forked child that setuid()s to 65534 binds
    the socket path first (as another user could in a shared directory). Both clients and
    `space hub --token` refuse it, and it reads 0 bytes."""
    from peerdaemon import cli

    shared = Path(tempfile.mkdtemp(prefix="pd-shared-", dir="/tmp"))
    shared.chmod(0o1777)  # like /tmp
    path = shared / "pd.sock"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _impostor(path, 3, write_end)
    os.close(write_end)
    report = os.fdopen(read_end, "r")
    try:
        first = report.readline().strip()
        if first != "ready":
            pytest.skip(f"cannot run a listener as uid 65534: {first}")
        assert os.stat(path).st_uid == 65534
        with pytest.raises(ForeignListener, match="uid 65534"):
            Client.connect(path, timeout=10)

        async def async_client() -> None:
            with pytest.raises(ForeignListener, match="uid 65534"):
                await AsyncClient.connect(path)

        trio.run(async_client)
        argv = ["--socket", str(path), "space", "hub", "team", "ws://127.0.0.1:9"]
        assert cli.main([*argv, "--token=SECRET"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "uid 65534" in err and "SECRET" not in err
        assert [report.readline().strip() for _ in range(3)] == ["0", "0", "0"]  # not one byte
    finally:
        report.close()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        for entry in shared.iterdir():
            entry.unlink()
        shared.rmdir()
