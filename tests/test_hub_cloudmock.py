"""The hub's Cloud Mock, end to end on loopback: the real hub (`serve_hub`), its confined runner
and Mockoon's engine, reached at `/mock/SPACE/ENV/`.

Tokens in each of Apidog's three carriers (and never seen by the engine), 404 that does not tell
off from unknown, limits (413, 429, hosted per owner), live edits through the hub's store and
through a y-websocket client, a daemon turning it on with `env mock`, and a member's hostile
environment that tries to reach the hub's network, files and secrets.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import urllib.parse
import uuid
from pathlib import Path

import pytest
import trio
from helpers import SPACE, client, running_hub, setup_accounts, until
from mockutil import request, require_runner, route, small_env

from peerdaemon.hub.accounts import Accounts
from peerdaemon.hub.mocks import MockConfig
from peerdaemon.hub.ywebsocket import sync_update
from peerdaemon.model import import_environment, prepare
from peerdaemon.model.document import apply_environment, export_environment
from peerdaemon.spaces import SpaceDoc

ME = "TESTDEV"


@pytest.fixture(autouse=True)
def runner(monkeypatch):
    return require_runner(monkeypatch)


class Hosted:
    """A hub with one space (`SPACE`, owned by alice) whose documents the test writes into the
    hub's store directly, as a member's device would through its link."""

    def __init__(self, server, space: str = SPACE) -> None:
        self.server = server
        self.space = space
        self.space_doc = SpaceDoc()
        self.space_doc.init("Team", ME, "test")
        self.docs: dict[str, object] = {}
        self._push_space()

    def _push_space(self, before: bytes | None = None) -> None:
        doc = self.space_doc.doc
        update = doc.get_update(before) if before else doc.get_update()
        self.server.docs.apply(self.space, "space:" + self.space, update, "test")

    def add(self, env: dict, *, access: str = "public", token: str | None = None) -> str:
        env_id = env["uuid"]
        doc, _stored, _ = import_environment(env, env_id)
        self.docs[env_id] = doc
        self.server.docs.apply(self.space, env_id, doc.get_update(), "test")
        before = self.space_doc.doc.get_state()
        self.space_doc.set_state(env_id, "shared", ME)
        self.space_doc.set_mock(env_id, True, access, token or secrets.token_urlsafe(24), ME)
        self._push_space(before)
        return env_id

    def set_mock(self, env_id: str, hub: bool, access: str, token: str) -> None:
        before = self.space_doc.doc.get_state()
        self.space_doc.set_mock(env_id, hub, access, token, ME)
        self._push_space(before)

    def edit(self, env_id: str, change) -> None:
        doc = self.docs[env_id]
        env = export_environment(doc, env_id)
        change(env)
        prepared, _ = prepare(env, env_id)
        before = doc.get_state()
        apply_environment(doc, prepared)
        self.server.docs.apply(self.space, env_id, doc.get_update(before), "test")

    def path(self, env_id: str, rest: str = "") -> str:
        return f"/mock/{self.space}/{env_id}/{rest}"


async def http(server, path: str, **kwargs) -> tuple[int, dict, bytes]:
    return await trio.to_thread.run_sync(lambda: request(server.port, path, **kwargs))


async def served(server, path: str, expected: bytes, **kwargs) -> bool:
    status, _, body = await http(server, path, **kwargs)
    return status == 200 and body == expected


@pytest.fixture
def hubdir(tmp_path: Path) -> Path:
    setup_accounts(tmp_path, "alice", "bob")
    return tmp_path


def echo_env() -> dict:
    """Routes whose answers show what the engine saw of the token carriers."""
    env = small_env("Echo")
    env["routes"].append(
        route(
            "echo",
            "q={{queryParam 'token'}}|h={{header 'X-Mock-Token'}}|b={{body 'token'}}"
            "|x={{queryParam 'x'}}|f={{body 'field'}}",
            method="post",
        )
    )
    ruled = route("ruled", "no token seen")
    seen = {**ruled["responses"][0], "uuid": str(uuid.uuid4()), "body": "the token was seen"}
    seen["default"] = False
    seen["rulesOperator"] = "OR"
    seen["rules"] = [
        {
            "target": "header",
            "modifier": "X-Mock-Token",
            "value": ".+",
            "invert": False,
            "operator": "regex",
        },
        {
            "target": "query",
            "modifier": "token",
            "value": ".+",
            "invert": False,
            "operator": "regex",
        },
    ]
    ruled["responses"].insert(0, seen)
    ruled["responses"][1]["default"] = True
    env["routes"].append(ruled)
    env["rootChildren"].append({"type": "route", "uuid": env["routes"][-2]["uuid"]})
    env["rootChildren"].append({"type": "route", "uuid": ruled["uuid"]})
    return env


async def test_public_mock_serves_and_follows_edits_live(hubdir, nursery):
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env_id = hosted.add(small_env())
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        status, headers, body = await http(server, hosted.path(env_id, "hello?a=1"))
        assert headers["content-type"].startswith("text/plain")
        hosted.edit(env_id, lambda e: e["routes"][0]["responses"][0].update(body="edited"))
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"edited"))
        # an unknown route is Mockoon's own 404, not the hub's
        status, _, body = await http(server, hosted.path(env_id, "nothing-here"))
        assert status == 404 and b"no such mock" not in body


async def test_tokens_in_each_carrier_and_never_seen_by_the_engine(hubdir, nursery):
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        token = secrets.token_urlsafe(24)
        env_id = hosted.add(echo_env(), access="token", token=token)
        hello = hosted.path(env_id, "hello")
        await until(lambda: served(server, f"{hello}?token={token}", b"hello v1"))

        missing = await http(server, hello)
        wrong = await http(server, f"{hello}?token=nope-{token}")
        for status, headers, body in (missing, wrong):
            assert status == 401 and headers["content-type"].startswith("application/json")
            assert json.loads(body)["error"] == "unauthorized"
        assert await served(server, hello, b"hello v1", headers={"X-Mock-Token": token})

        echo = hosted.path(env_id, "echo")
        form = urllib.parse.urlencode({"field": "kept", "token": token}).encode()
        status, _, body = await http(
            server,
            f"{echo}?x=1",
            method="POST",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert (status, body) == (200, b"q=|h=|b=|x=1|f=kept")
        boundary = "----pd" + uuid.uuid4().hex
        multipart = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="field"\r\n\r\nkept\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="token"\r\n\r\n{token}\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        status, _, body = await http(
            server,
            echo,
            method="POST",
            body=multipart,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert (status, body) == (200, b"q=|h=|b=|x=|f=kept")
        status, _, body = await http(
            server, f"{echo}?token={token}", method="POST", headers={"X-Mock-Token": token}
        )
        assert (status, body) == (200, b"q=|h=|b=|x=|f=")

        # a rule on the token header (or query) never matches: the engine never sees it
        status, _, body = await http(server, f"{hosted.path(env_id, 'ruled')}?token={token}")
        assert (status, body) == (200, b"no token seen")
        status, _, body = await http(
            server, hosted.path(env_id, "ruled"), headers={"X-Mock-Token": token}
        )
        assert (status, body) == (200, b"no token seen")
        # (the rule does match a token that reaches the engine: asked on its own port)
        engine_port = server.mocks.port_of(server.mocks.lookup(SPACE, env_id))
        direct = await trio.to_thread.run_sync(
            lambda: request(engine_port, "/ruled", headers={"X-Mock-Token": token})
        )
        assert direct[2] == b"the token was seen"

        # rotated: the old token is refused, the new one works
        new = secrets.token_urlsafe(24)
        hosted.set_mock(env_id, True, "token", new)
        await until(lambda: _status(server, f"{hello}?token={token}", 401))
        assert await served(server, f"{hello}?token={new}", b"hello v1")


async def _status(server, path: str, expected: int) -> bool:
    return (await http(server, path))[0] == expected


async def test_off_and_unknown_are_the_same_404(hubdir, nursery):
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env_id = hosted.add(small_env())
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        hosted.set_mock(env_id, False, "public", secrets.token_urlsafe(24))
        await until(lambda: _status(server, hosted.path(env_id, "hello"), 404))
        off = await http(server, hosted.path(env_id, "hello"))
        unknown = await http(server, hosted.path(str(uuid.uuid4()), "hello"))
        other_space = await http(server, f"/mock/nospace/{env_id}/hello")
        assert off[2] == unknown[2] == other_space[2]
        assert json.loads(off[2]) == {"error": "not-found", "message": "no such mock"}
        # a token-access mock also answers 404 to everyone once it is off
        hosted.set_mock(env_id, False, "token", secrets.token_urlsafe(24))
        assert (await http(server, hosted.path(env_id, "hello")))[2] == off[2]


async def test_limits_body_rate_and_hosted_per_owner(hubdir, nursery):
    with Accounts.open(hubdir) as admin:
        admin.set_limit("mock_body_bytes", 1000)
        admin.set_limit("mock_rps", 3)
        admin.set_limit("hosted_mocks", 1)
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        first = hosted.add(echo_env())
        second = hosted.add(small_env("Second"))
        await until(lambda: served(server, hosted.path(first, "hello"), b"hello v1"))
        # the owner may host one: the second is refused, and says why on the hub
        assert (await http(server, hosted.path(second, "hello")))[0] == 404
        [refused] = [m for m in server.mocks.describe() if m["env"] == second]
        assert refused["state"] == "refused" and "at most 1" in refused["reason"]
        status, _, body = await http(
            server, hosted.path(first, "echo"), method="POST", body=b"x" * 2000
        )
        assert status == 413 and json.loads(body)["error"] == "too-large"
        statuses = [(await http(server, hosted.path(first, "hello")))[0] for _ in range(10)]
        assert 429 in statuses and statuses[0] == 200
        status, headers, _ = await http(server, hosted.path(first, "hello"))
        if status == 429:
            assert int(headers["retry-after"]) >= 1


async def test_an_edit_through_a_yjs_client_reaches_the_cloud_mock(hubdir, nursery):
    tokens = {}
    with Accounts.open(hubdir) as admin:
        tokens["alice"] = admin.add_token("alice")
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env_id = hosted.add(small_env())
        path = hosted.path(env_id, "hello")
        await until(lambda: served(server, path, b"hello v1"))
        async with client(server, SPACE, env_id, tokens["alice"]) as yc:
            env = export_environment(yc.doc, env_id)
            env["routes"][0]["responses"][0]["body"] = "from a web editor"
            prepared, _ = prepare(env, env_id)
            before = yc.doc.get_state()
            apply_environment(yc.doc, prepared)
            await yc.ws.send_message(sync_update(yc.doc.get_update(before)))
            await until(lambda: served(server, path, b"from a web editor"))


class Listener:
    """A TCP listener on loopback that records every connection: a hostile environment's target."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0

    async def run(self) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        while True:
            stream = await listener.accept()
            self.accepted += 1
            async with stream:
                with trio.move_on_after(1):
                    await stream.receive_some(65536)
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nreached"
                )


def hostile_env(target_port: int, secret_path: Path) -> dict:
    env = small_env("Hostile")
    env["proxyMode"] = True
    env["proxyHost"] = f"http://127.0.0.1:{target_port}"
    files = route("file", "")
    response = files["responses"][0]
    response["bodyType"] = "FILE"
    response["filePath"] = str(secret_path)
    relative = route("relative", "")
    relative["responses"][0]["bodyType"] = "FILE"
    relative["responses"][0]["filePath"] = "../../../../../../../../" + str(secret_path)
    envvar = route(
        "envvar", "[{{getEnvVar 'HOME'}}|{{getEnvVar 'PATH'}}|{{getEnvVar 'MOCKOON_X'}}]"
    )
    callback = {
        "uuid": str(uuid.uuid4()),
        "id": "cb1",
        "uri": f"http://127.0.0.1:{target_port}/callback",
        "name": "cb",
        "documentation": "",
        "method": "get",
        "headers": [],
        "bodyType": "INLINE",
        "body": "",
        "databucketID": "",
        "filePath": "",
        "sendFileAsBody": False,
    }
    env["callbacks"] = [callback]
    calling = route("calling", "called")
    calling["responses"][0]["callbacks"] = [{"uuid": callback["uuid"], "latency": 0}]
    for r in (files, relative, envvar, calling):
        env["routes"].append(r)
        env["rootChildren"].append({"type": "route", "uuid": r["uuid"]})
    return env


async def test_a_hostile_environment_reaches_nothing_of_the_hub(hubdir, nursery, monkeypatch):
    monkeypatch.setenv("MOCKOON_X", "hub-secret")
    secret = hubdir / "secret.txt"
    secret.write_text("the hub's secret")
    target = Listener()
    nursery.start_soon(target.run)
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env_id = hosted.add(hostile_env(target.port, secret))
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        # proxy mode: an unknown route would be proxied to the hub's own loopback
        status, _, body = await http(server, hosted.path(env_id, "not-a-route"))
        assert b"reached" not in body and status != 200
        # file bodies: an absolute path and one that climbs out of the folder
        for name in ("file", "relative"):
            status, _, body = await http(server, hosted.path(env_id, name))
            assert b"the hub's secret" not in body
        # templates read no variable of the hub's process
        status, _, body = await http(server, hosted.path(env_id, "envvar"))
        assert (status, body) == (200, b"[||]")
        # a callback to loopback
        status, _, body = await http(server, hosted.path(env_id, "calling"))
        assert (status, body) == (200, b"called")
        await until(lambda: _blocked(server, 2), what="both outgoing connections refused")
    assert target.accepted == 0


def _blocked(server, n: int) -> bool:
    return len([e for e in server.events.since(0) if e["type"] == "mock-blocked"]) >= n


async def test_an_operator_allow_list_admits_a_listed_destination(hubdir, nursery):
    target = Listener()
    nursery.start_soon(target.run)
    async with running_hub(hubdir, mock=MockConfig(allow_hosts=["127.0.0.1"])) as server:
        hosted = Hosted(server)
        env_id = hosted.add(hostile_env(target.port, hubdir / "nothing"))
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        await until(lambda: served(server, hosted.path(env_id, "not-a-route"), b"reached"))
    assert target.accepted >= 1


async def test_a_member_turns_it_on_and_every_device_edit_is_served(tmp_path, nursery, capsys):
    from test_hub_link import Dev, Hub, team  # noqa: PLC0415  (the hub-link tests' harness)

    from peerdaemon import cli  # noqa: PLC0415

    hub = await Hub(tmp_path).start(nursery)
    with Accounts.open(hub.dir) as admin:
        alice = admin.add_user("alice")
    a = await Dev(tmp_path, "a").start(nursery)
    space, [env_id] = await team(a, hub, alice)
    setting = await a.op("env.mock", id=env_id)
    assert setting["hub"] is False and setting["url"] is None
    setting = await a.op("env.mock", id=env_id, hub=True, access="token")
    base_url = f"http://127.0.0.1:{hub.port}/mock/{space}/{env_id}/"
    assert setting["url"] == base_url and len(setting["token"]) >= 16
    path = f"/mock/{space}/{env_id}/test?token={setting['token']}"
    server = hub.server
    [listed] = await a.op("mock.list")  # `mock list` shows the Cloud Mock beside local ones
    assert listed == {
        "id": env_id,
        "name": "env 0",
        "where": "hub",
        "state": "hub",
        "access": "token",
        "url": base_url,
    }
    await until(lambda: served(server, path, b"{}"), what="the Cloud Mock from the daemon")
    await a.op(
        "env.patch",
        id=env_id,
        patch=[{"op": "replace", "path": "/routes/0/responses/0/body", "value": "edited"}],
    )
    await until(lambda: served(server, path, b"edited"), what="a device's edit, served")
    # the CLI shows the setting; --rotate-token replaces the token everywhere
    sock = str(a.socket_path)
    argv = ["--socket", sock, "env", "mock", env_id, "--rotate-token", "--json"]
    assert await trio.to_thread.run_sync(cli.main, argv) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["token"] != setting["token"] and rotated["url"] == base_url
    await until(lambda: _status(server, path, 401), what="the old token refused")
    new_path = f"/mock/{space}/{env_id}/test?token={rotated['token']}"
    assert await served(server, new_path, b"edited")
    argv = ["--socket", sock, "env", "mock", env_id, "--hub", "off"]
    assert await trio.to_thread.run_sync(cli.main, argv) == 0
    assert capsys.readouterr().out.startswith("hub mock: off")
    await until(lambda: _status(server, new_path, 404), what="off: 404")


async def test_a_hanging_mock_never_slows_the_others(hubdir, nursery):
    async with running_hub(hubdir, mock=MockConfig(max_in_flight=4, request_timeout=2.0)) as server:
        hosted = Hosted(server)
        slow_env = small_env("Slow")
        slow_env["routes"][1]["responses"][0]["latency"] = 60_000  # /slow hangs
        slow = hosted.add(slow_env)
        fast = hosted.add(small_env("Fast"))
        await until(lambda: served(server, hosted.path(slow, "hello"), b"hello v1"))
        await until(lambda: served(server, hosted.path(fast, "hello"), b"hello v1"))
        answers: list[int] = []

        async def hang() -> None:
            answers.append((await http(server, hosted.path(slow, "slow"), timeout=20))[0])

        async with trio.open_nursery() as flood:
            for _ in range(8):
                flood.start_soon(hang)
            await until(lambda: server.http.mocks.in_flight.get(f"{SPACE}/{slow}") == 4)
            with trio.fail_after(2):  # the other mock answers at once meanwhile
                assert await served(server, hosted.path(fast, "hello"), b"hello v1")
        # four were let through and timed out (504); the other four found it full (503)
        assert sorted(answers) == [503] * 4 + [504] * 4


async def test_the_hub_runner_runs_sandboxed(hubdir, nursery, monkeypatch):
    monkeypatch.setenv("MOCKOON_X", "hub-secret")
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env_id = hosted.add(small_env())
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        pid = server.mocks.shell.pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # Node's permission model: it reads only the runner and the mock folders
        assert any(a in (b"--experimental-permission", b"--permission") for a in argv)
        readable = sorted(a for a in argv if a.startswith(b"--allow-fs-read="))
        assert [r.split(b"=", 1)[1].decode() for r in readable] == sorted(
            [str((hubdir / "mock-runner").resolve()), str((hubdir / "mock-files").resolve())]
            if (hubdir / "mock-runner").exists()
            else [
                str(Path(os.environ["PEERDAEMON_MOCK_RUNNER"]).resolve()),
                str((hubdir / "mock-files").resolve()),
            ]
        )
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        assert b"hub-secret" not in Path(f"/proc/{pid}/environ").read_bytes()


async def test_a_client_that_expects_100_continue_gets_it(hubdir, nursery):
    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env_id = hosted.add(echo_env())
        await until(lambda: served(server, hosted.path(env_id, "hello"), b"hello v1"))
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            body = b"field=kept"
            await stream.send_all(
                f"POST {hosted.path(env_id, 'echo')} HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            with trio.fail_after(5):
                interim = await stream.receive_some(1024)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            answer = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"f=kept")


async def test_websocket_routes_are_served_through_the_cloud_mock(hubdir, nursery):
    from trio_websocket import HandshakeError, open_websocket_url  # noqa: PLC0415

    async with running_hub(hubdir) as server:
        hosted = Hosted(server)
        env = small_env("Sockets")
        feed = route("feed", "tick {{queryParam 'x'}}|{{queryParam 'token'}}", method="")
        feed.update(type="ws", streamingMode="BROADCAST", streamingInterval=50)
        env["routes"].append(feed)
        token = secrets.token_urlsafe(24)
        env_id = hosted.add(env, access="token", token=token)
        await until(
            lambda: served(server, f"{hosted.path(env_id, 'hello')}?token={token}", b"hello v1")
        )
        base = f"ws://127.0.0.1:{server.port}{hosted.path(env_id, 'feed')}"
        async with open_websocket_url(f"{base}?x=1&token={token}") as ws:
            with trio.fail_after(5):
                for _ in range(3):  # the engine's broadcast, relayed; it never saw the token
                    assert await ws.get_message() == "tick 1|"
        for url in (base, f"ws://127.0.0.1:{server.port}{hosted.path(str(uuid.uuid4()), 'feed')}"):
            with pytest.raises(HandshakeError) as info:
                async with open_websocket_url(url):
                    pass
            assert getattr(info.value, "status_code", None) in (401, 404)
