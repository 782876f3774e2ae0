"""The status page's HTTP API and its safety checks, without a browser (docs/status-page.md):
the API key, the Host check (DNS rebinding), the Origin check, JSON-only POSTs, the event stream,
the key file, TLS off loopback, a port already taken, and another user's connection refused."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from daemonutil import (
    InProcessDaemon,
    base_fixture,  # noqa: F401  (fixture)
)
from helpers import LOCAL, free_port, self_signed
from modelutil import load

from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.status import KEY_FILE, Guard, StatusConfigError, load_or_create_key
from peerdaemon.status.security import check_tls, parse_uid, split_host

ROOT = Path(__file__).resolve().parent.parent


async def start(base: Path, nursery: trio.Nursery, name: str = "a", **config: Any):
    d = InProcessDaemon(base, name)
    config.setdefault("status", True)
    config.setdefault("status_listen", (LOCAL, 0))
    await d.start_with(nursery, DaemonConfig(d.data_dir, d.socket_path, **config))
    return d


@pytest.fixture(name="daemon")
async def daemon_fixture(base, nursery):
    d = await start(base, nursery)
    yield d
    await d.stop()


def port_of(d: InProcessDaemon) -> int:
    return d.daemon.status.port


def key_of(d: InProcessDaemon) -> str:
    return d.daemon.status.key


async def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a connection of its own: (status, lower-case headers, body)."""
    stream = await trio.open_tcp_stream(LOCAL, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        sent = [("Host", host if host is not None else f"127.0.0.1:{port}"), *(headers or [])]
        sent.append(("Content-Length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=path, headers=sent))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status, got, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                got = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            else:
                break
        return status, got, b"".join(chunks)


def keyed(d: InProcessDaemon, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return [("X-API-Key", key_of(d)), *more]


JSON = ("Content-Type", "application/json")


@asynccontextmanager
async def event_stream(port: int, headers: list[tuple[str, str]], path: str = "/api/events"):
    """An open SSE response: yields (status, a function returning the next parsed blocks)."""
    stream = await trio.open_tcp_stream(LOCAL, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        sent = [("Host", f"127.0.0.1:{port}"), *headers]
        await stream.send_all(
            conn.send(h11.Request(method="GET", target=path, headers=sent))
            + conn.send(h11.EndOfMessage())
        )
        buffer = b""
        status = 0

        async def blocks() -> list[dict[str, str]]:
            nonlocal buffer, status
            while b"\n\n" not in buffer:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    buffer += bytes(event.data)
                else:
                    raise AssertionError(f"the stream ended: {event!r}")
            out = []
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                fields: dict[str, str] = {}
                for line in block.decode().split("\n"):
                    if line and not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        fields[name] = fields.get(name, "") + value
                out.append(fields)
            return out

        first = await blocks()
        yield status, first, blocks


# -- the key ------------------------------------------------------------------------------------


async def test_every_api_call_needs_the_key(daemon):
    port = port_of(daemon)
    for path in ("/api/overview", "/api/environments", "/api/peers", "/api/events"):
        status, _, body = await request(port, "GET", path)
        assert status == 401, path
        assert json.loads(body)["error"]["code"] == "bad-api-key"
        status, _, _ = await request(port, "GET", path, headers=[("X-API-Key", "x" * 43)])
        assert status == 401
    status, _, _ = await request(
        port, "POST", "/api/mocks/start", headers=[JSON], body=b'{"id": "x"}'
    )
    assert status == 401
    status, headers, body = await request(port, "GET", "/api/device", headers=keyed(daemon))
    assert status == 200 and headers["content-type"] == "application/json"
    device = json.loads(body)
    assert device["id"] == daemon.daemon.identity.device_id
    assert "api_key" not in device["status_page"] and "open_url" not in device["status_page"]


async def test_the_key_is_kept_0600_and_shown_by_status(base, nursery):
    d = await start(base, nursery)
    path = d.data_dir / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    status = await d.op("status")
    page = status["status_page"]
    assert page["api_key"] == key_of(d) == path.read_text().strip()
    assert page["url"] == f"http://127.0.0.1:{port_of(d)}/"
    assert page["open_url"] == f"{page['url']}#key={key_of(d)}"
    key = key_of(d)
    await d.stop()
    path.chmod(0o644)  # loosened by someone: tightened again, same key
    d = await start(base, nursery)
    assert key_of(d) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await d.stop()


def test_a_key_file_that_holds_nothing_is_replaced(tmp_path):
    (tmp_path / KEY_FILE).write_text("\n")
    key = load_or_create_key(tmp_path)
    assert len(key) >= 40 and (tmp_path / KEY_FILE).read_text().strip() == key
    assert load_or_create_key(tmp_path) == key


# -- Host, Origin, content type -----------------------------------------------------------------


async def test_a_foreign_host_header_is_refused(daemon):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1."""
    port = port_of(daemon)
    for host in (
        f"evil.example:{port}",
        f"localhost.evil.example:{port}",
        "127.0.0.1",  # the port is part of the check
        f"127.0.0.1:{port + 1}",
        f"127.0.0.2:{port}",
        "",
    ):
        for path in ("/", "/api/overview", "/static/app.js"):
            status, _, body = await request(port, "GET", path, headers=keyed(daemon), host=host)
            assert status == 403, (host, path)
            assert b"bad-host" in body
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        status, _, _ = await request(port, "GET", "/api/device", headers=keyed(daemon), host=host)
        assert status == 200, host


async def test_a_foreign_origin_is_refused_on_posts_and_the_stream(daemon):
    port = port_of(daemon)
    env_id = (await daemon.client.import_env(load("test-env.json"), new_id=True))["id"]
    body = json.dumps({"id": env_id}).encode()
    for origin in ("http://evil.example", f"http://localhost:{port + 1}", "null"):
        status, _, text = await request(
            port,
            "POST",
            "/api/mocks/stop",
            headers=keyed(daemon, JSON, ("Origin", origin)),
            body=body,
        )
        assert status == 403, origin
        assert json.loads(text)["error"]["code"] == "bad-origin"
        status, _, _ = await request(
            port, "GET", "/api/events", headers=keyed(daemon, ("Origin", origin))
        )
        assert status == 403
    # this page's own origin passes the check (and reaches the operation: not served)
    status, _, text = await request(
        port,
        "POST",
        "/api/mocks/stop",
        headers=keyed(daemon, JSON, ("Origin", f"http://127.0.0.1:{port}")),
        body=body,
    )
    assert status == 404 and json.loads(text)["error"]["code"] == "not-found"


async def test_posts_must_be_json(daemon):
    port = port_of(daemon)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, _, _ = await request(
            port,
            "POST",
            "/api/spaces/invite",
            headers=keyed(daemon, ("Content-Type", kind)),
            body=b'{"space": "x"}',
        )
        assert status == 415, kind
    status, _, _ = await request(
        port, "POST", "/api/spaces/invite", headers=keyed(daemon, JSON), body=b"{nope"
    )
    assert status == 400
    status, _, _ = await request(
        port, "POST", "/api/spaces/invite", headers=keyed(daemon, JSON), body=b"x" * (70 << 10)
    )
    assert status == 413
    status, _, _ = await request(port, "GET", "/api/mocks/start", headers=keyed(daemon))
    assert status == 405


async def test_the_page_carries_the_key_and_a_strict_policy(daemon):
    port = port_of(daemon)
    status, headers, body = await request(port, "GET", "/")
    assert status == 200
    assert f'<meta name="peerdaemon-api-key" content="{key_of(daemon)}">' in body.decode()
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert "server" not in headers
    for path in ("/static/app.js", "/static/style.css"):
        status, _, body = await request(port, "GET", path)
        assert status == 200 and len(body) > 1000


# -- actions and reads ----------------------------------------------------------------------------


async def test_share_unshare_and_invite_through_the_api(daemon):
    port = port_of(daemon)
    env_id = (await daemon.client.import_env(load("test-env.json"), new_id=True))["id"]
    space = (await daemon.op("space.create", name="Team"))["id"]

    async def post(path: str, body: dict) -> tuple[int, Any]:
        status, _, text = await request(
            port, "POST", path, headers=keyed(daemon, JSON), body=json.dumps(body).encode()
        )
        return status, json.loads(text)

    status, result = await post("/api/environments/share", {"id": env_id, "space": space})
    assert status == 200 and result["space"] == space
    status, _, text = await request(port, "GET", "/api/environments", headers=keyed(daemon))
    (env,) = json.loads(text)
    assert env["space"] == {"id": space, "name": "Team"} and env["size"] > 0
    status, result = await post("/api/spaces/invite", {"space": space})
    assert status == 200 and result["code"].startswith("pd1-")
    status, result = await post("/api/environments/unshare", {"id": env_id})
    assert status == 200
    status, _, text = await request(port, "GET", "/api/environments", headers=keyed(daemon))
    assert json.loads(text)[0]["space"] is None
    status, result = await post("/api/environments/unshare", {"id": env_id})
    assert status == 409 and result["error"]["code"] == "not-shared"
    status, result = await post("/api/environments/share", {"id": env_id})
    assert status == 400


async def test_the_event_stream_follows_the_event_log(daemon):
    port = port_of(daemon)
    cursor = (await daemon.op("status"))["events"]
    async with event_stream(port, keyed(daemon), f"/api/events?since={cursor}") as (
        status,
        first,
        blocks,
    ):
        assert status == 200
        assert first[0]["event"] == "hello"
        assert json.loads(first[0]["data"])["cursor"] == cursor
        env_id = (await daemon.client.import_env(load("test-env.json"), new_id=True))["id"]
        got: list[dict] = [json.loads(b["data"]) for b in first[1:]]
        with trio.fail_after(10):
            while not any(e["type"] == "environment-created" for e in got):
                got += [json.loads(b["data"]) for b in await blocks()]
        created = next(e for e in got if e["type"] == "environment-created")
        assert created["data"]["id"] == env_id and created["id"] > cursor
    # resuming from an id (as a reconnecting client does with Last-Event-ID) replays what followed
    async with event_stream(port, keyed(daemon, ("Last-Event-ID", str(cursor)))) as (
        status,
        first,
        blocks,
    ):
        replay = [json.loads(b["data"]) for b in first[1:]] or [
            json.loads(b["data"]) for b in await blocks()
        ]
        assert replay[0]["id"] == cursor + 1


# -- where it listens ----------------------------------------------------------------------------


def test_off_loopback_only_with_tls(tmp_path):
    with pytest.raises(StatusConfigError, match="not a loopback address.*--status-tls-cert"):
        check_tls(("0.0.0.0", 7611), None, None)
    with pytest.raises(StatusConfigError, match="go together"):
        check_tls(("127.0.0.1", 7611), tmp_path / "c.pem", None)
    check_tls(("127.0.0.1", 0), None, None)
    check_tls(("::1", 0), None, None)
    check_tls(("localhost", 0), None, None)


def test_run_refuses_a_lan_status_address_without_tls(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peerdaemon", "run", "--data-dir", str(tmp_path / "d")]
        + ["--socket", str(tmp_path / "s"), "--status-listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TLS" in lines[0] and lines[0].startswith("peerdaemon: "), lines


async def test_a_port_already_taken_turns_the_page_off_not_the_daemon(base, nursery):
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = await start(base, nursery, status_listen=(LOCAL, port))
        assert d.daemon.status.port is None
        status = await d.op("status")
        assert "cannot listen" in status["status_page"]["error"]
        events = (await d.client.subscribe_events(since=0)).initial["events"]
        assert any(e["type"] == "status-error" for e in events)
        assert (await d.client.list_envs()) == []  # the daemon serves on
        await d.stop()


async def test_no_status_page_when_off(base, nursery):
    d = await start(base, nursery, status=False)
    assert d.daemon.status is None
    assert "status_page" not in await d.op("status")
    assert not (d.data_dir / KEY_FILE).exists()
    await d.stop()


async def test_tls_listener_serves_https(base, nursery, tmp_path):
    cert, key = self_signed(tmp_path)
    port = free_port()
    d = await start(
        base,
        nursery,
        status_listen=("0.0.0.0", port),
        status_tls_cert=cert,
        status_tls_key=key,
    )
    import ssl

    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def get() -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPSConnection(LOCAL, port, context=context, timeout=10)
        conn.request("GET", "/api/device", headers={"X-API-Key": key_of(d)})
        response = conn.getresponse()
        return response.status, response.read()

    status, body = await trio.to_thread.run_sync(get)
    assert status == 200 and json.loads(body)["status_page"]["tls"] is True
    assert (await d.op("status"))["status_page"]["url"] == f"https://127.0.0.1:{port}/"
    await d.stop()


# -- another user -------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
async def test_another_users_connection_is_refused(daemon):
    """The local socket answers only its own user; so does the page (and its embedded key)."""
    port = port_of(daemon)
    script = (
        "import http.client, sys\n"
        f"c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=10)\n"
        "c.request('GET', '/')\n"
        "r = c.getresponse()\n"
        "print(r.status, r.read().decode())\n"
    )

    def as_nobody() -> str:
        return subprocess.run(
            ["/usr/bin/python3", "-I", "-c", script],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
        ).stdout

    out = await trio.to_thread.run_sync(as_nobody)
    assert out.startswith("403 "), out
    assert key_of(daemon) not in out
    # and the same request as ourselves gets the page with the key
    status, _, body = await request(port, "GET", "/")
    assert status == 200 and key_of(daemon) in body.decode()


def test_the_owner_of_a_loopback_connection_is_read_from_proc():
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1DB3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 0100007F:D431 0100007F:1DB3 01 00000000:00000000 00:00000000 00000000  1000        0 2 1\n"
        "   2: 0100007F:1DB3 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n"
    )
    from peerdaemon.status.security import _proc_address

    if sys.byteorder == "little":
        assert _proc_address("127.0.0.1", 0xD431) == "0100007F:D431"
    local, remote = _proc_address("127.0.0.1", 0xD431), _proc_address("127.0.0.1", 0x1DB3)
    assert parse_uid(table, local, remote) == (1000 if sys.byteorder == "little" else None)
    assert parse_uid(table, remote, _proc_address("127.0.0.1", 1)) is None


# -- the checks, one by one --------------------------------------------------------------------


def test_host_parsing_and_the_guard():
    assert split_host("127.0.0.1:80") == ("127.0.0.1", 80)
    assert split_host("[::1]:7611") == ("[::1]", 7611)
    assert split_host("LocalHost") == ("localhost", None)
    for bad in ("::1:80", "a:b", "a:123456", "x/y:1", "user@host:1", "[::1]x", ""):
        assert split_host(bad) is None, bad
    guard = Guard.for_listener("127.0.0.1", 7611, tls=False)
    assert guard.host_ok("localhost:7611") and guard.host_ok("[::1]:7611")
    assert not guard.host_ok("localhost") and not guard.host_ok("10.0.0.1:7611")
    assert guard.origin_ok(None, "localhost:7611")
    assert guard.origin_ok("http://localhost:7611", "localhost:7611")
    assert not guard.origin_ok("http://127.0.0.1:7611", "localhost:7611")  # another origin
    assert not guard.origin_ok("https://localhost:7611", "localhost:7611")
    lan = Guard.for_listener("0.0.0.0", 443, tls=True, extra_hosts=["Box.LAN"])
    assert lan.host_ok("10.0.0.1") and lan.host_ok("box.lan:443") and lan.host_ok("[fe80::1]")
    assert not lan.host_ok("evil.example") and not lan.host_ok("10.0.0.1:80")
    assert lan.origin_ok("https://box.lan", "box.lan:443")
    one = Guard.for_listener("192.168.1.5", 7611, tls=True)
    assert one.host_ok("192.168.1.5:7611") and not one.host_ok("192.168.1.6:7611")
