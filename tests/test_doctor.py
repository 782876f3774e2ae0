"""`peerdaemon doctor`: one line per check (ok/warn/fail/skip) saying what to do, `--json`,
exit 0 unless a check failed. Against no daemon, a whole daemon in this process, and a fake
daemon (the socket server with canned answers) for the hub and clock checks; the clock is read
from a small HTTP server whose Date header is set."""

from __future__ import annotations

import email.utils
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonutil import InProcessDaemon
from helpers import LOCAL, FakeHandler, run_cli

from peerdaemon.api.server import serve_unix
from peerdaemon.cli import doctor
from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.mock.install import ENGINE_VERSION, RUNNER_SOURCE

STATES = ("ok", "warn", "fail", "skip")
CHECKS = ["socket", "daemon", "data dir", "mdns", "hub", "node", "runner", "clock"]


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdd"))  # short: AF_UNIX paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def daemon(nursery, base):
    d = InProcessDaemon(base, "alpha")
    await d.start_with(nursery, DaemonConfig(d.data_dir, d.socket_path, name="alpha", mdns=False))
    yield d
    await d.stop()


async def run_doctor(capsys, *argv: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """`doctor --json ARGV`: its exit status and its checks by name (the last of a name)."""
    code = await run_cli("doctor", "--json", *argv)  # --socket after the command: fine
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == (code == 0)
    return code, {c["check"]: c for c in report["checks"]}


async def test_without_a_daemon_the_socket_and_daemon_fail(base, capsys):
    sock = base / "none" / "pd.sock"
    code = await run_cli("--socket", str(sock), "doctor", "--data-dir", str(base / "data"))
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert all(line.split()[0] in STATES for line in lines), out
    assert lines[0].startswith(f"fail  socket      no socket at {sock} -> start the daemon")
    assert "peerdaemon service install" in lines[0]
    assert lines[1].startswith("fail  daemon      not running -> start it: `peerdaemon run`")
    code, checks = await run_doctor(capsys, "--socket", str(sock), "--data-dir", str(base / "d"))
    assert code == 1 and list(checks) == CHECKS
    assert checks["data dir"]["status"] == "skip"  # no such folder yet
    assert checks["hub"]["status"] == "skip" and checks["clock"]["status"] == "skip"


async def test_a_healthy_daemon_passes(daemon, capsys):
    sock = ["--socket", str(daemon.socket_path)]
    code, checks = await run_doctor(capsys, *sock)
    assert code == 0 and list(checks) == CHECKS
    assert (
        checks["socket"]["status"] == "ok"
        and "0600 in a 0700 folder" in checks["socket"]["message"]
    )
    assert checks["daemon"]["status"] == "ok"
    assert checks["daemon"]["message"].startswith(f"pid {os.getpid()} answers")
    assert checks["data dir"]["status"] == "ok"
    assert f"locked by the daemon (pid {os.getpid()})" in checks["data dir"]["message"]
    assert checks["hub"] == {
        "check": "hub",
        "status": "skip",
        "message": "no space syncs through a hub",
        "fix": "",
    }
    assert checks["clock"]["status"] == "skip"
    # the text form: the same checks, one line each, and exit 0 with warnings
    assert await run_cli(*sock, "doctor") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CHECKS) and lines[0].startswith("ok    socket      ")


async def test_socket_modes_and_a_socket_nobody_answers_on(daemon, base, capsys):
    sock = daemon.socket_path
    os.chmod(sock, 0o666)
    try:
        _, checks = await run_doctor(capsys, "--socket", str(sock))
    finally:
        os.chmod(sock, 0o600)
    assert (
        checks["socket"]["status"] == "warn"
        and "mode 0666, not 0600" in checks["socket"]["message"]
    )
    assert checks["socket"]["fix"]

    stale = base / "stale" / "pd.sock"
    stale.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file, and nobody listening: what a crash leaves
    os.chmod(stale, 0o600)
    code, checks = await run_doctor(capsys, "--socket", str(stale), "--data-dir", str(base / "d"))
    assert code == 1 and checks["socket"]["status"] == "ok"
    assert checks["daemon"]["status"] == "fail" and "nothing answers" in checks["daemon"]["message"]
    assert "`peerdaemon run` replaces" in checks["daemon"]["fix"]


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(60)
"""


async def test_a_data_dir_locked_by_a_process_that_does_not_answer(base, capsys):
    data = base / "data"
    data.mkdir()
    args = ["--socket", str(base / "none.sock"), "--data-dir", str(data)]
    _, checks = await run_doctor(capsys, *args)
    assert checks["data dir"]["status"] == "ok" and "not locked" in checks["data dir"]["message"]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data / "peerdaemon.lock")], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        _, checks = await run_doctor(capsys, *args)
    finally:
        proc.kill()
        proc.wait()
    check = checks["data dir"]
    assert check["status"] == "fail"
    assert f"is locked by pid {proc.pid}, which does not answer on" in check["message"]
    assert f"kill {proc.pid}" in check["fix"]
    _, checks = await run_doctor(capsys, *args)  # the holder is gone: free again
    assert checks["data dir"]["status"] == "ok"


async def test_mdns_interface(daemon, nursery, base, capsys):
    """The checks read the settings the daemon runs with (`config.get`)."""
    sock = ["--socket", str(daemon.socket_path)]
    _, checks = await run_doctor(capsys, *sock)
    assert checks["mdns"]["status"] == "skip"  # this fixture's daemon runs with mDNS off
    await daemon.stop()

    async def doctor_of(**config: Any) -> tuple[int, dict[str, Any]]:
        d = InProcessDaemon(base, "alpha")
        await d.start_with(nursery, DaemonConfig(d.data_dir, d.socket_path, **config))
        try:
            code, checks = await run_doctor(capsys, *sock)
        finally:
            await d.stop()
        return code, checks["mdns"]

    _, mdns = await doctor_of()  # tests run with only loopback
    assert mdns["status"] == "warn"
    assert "no network interface besides loopback" in mdns["message"]
    code, mdns = await doctor_of(mdns_interface="nosuch0")
    assert code == 1 and mdns["status"] == "fail"
    assert "interface nosuch0 (config lan.mdns_interface) does not exist" in mdns["message"]
    assert "lo" in mdns["message"] and "config set lan.mdns_interface" in mdns["fix"]
    _, mdns = await doctor_of(mdns_interface="lo")
    assert mdns["status"] == "fail" and "no multicast" in mdns["message"]
    _, mdns = await doctor_of(mdns=False)
    assert mdns["status"] == "skip" and "off" in mdns["message"]
    await daemon.start_with(nursery, DaemonConfig(daemon.data_dir, daemon.socket_path))


def test_interface_flags_are_read_in_this_network_namespace():
    flags = doctor._if_flags("lo")
    if sys.platform.startswith("linux"):
        assert flags is not None and flags & doctor.IFF_UP and flags & doctor.IFF_LOOPBACK
    assert doctor._if_flags("nosuch0") is None


# --- hubs and the clock, through a fake daemon --------------------------------------------------
@contextmanager
def http_hub(offset: float | None) -> Iterator[str]:
    """An HTTP server answering GET /health with a Date `offset` seconds off (None: no Date)."""

    class Handler(BaseHTTPRequestHandler):
        def date_time_string(self, timestamp: float | None = None) -> str:
            return email.utils.formatdate(time.time() + (offset or 0), usegmt=True)

        def send_header(self, keyword: str, value: str) -> None:
            if keyword == "Date" and offset is None:
                return
            super().send_header(keyword, value)

        def do_GET(self) -> None:
            body = b'{"status": "ok"}\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOCAL, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://{LOCAL}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hub(url: str, **changes: Any) -> dict[str, Any]:
    entry = {
        "url": url,
        "state": "connected",
        "reason": None,
        "detail": "",
        "hub_key": "HUBKEY-1",
        "user": "alice",
        "spaces": {"s1": "ok"},
        "errors": [],
    }
    entry.update(changes)
    return entry


@pytest.fixture
async def fake(nursery, base):
    handler = FakeHandler()
    path = base / "fake" / "pd.sock"
    await nursery.start(partial(serve_unix, path, handler))
    return handler, ["--socket", str(path), "--data-dir", str(base / "data")]


async def test_hubs_key_and_state(fake, capsys):
    handler, args = fake
    with http_hub(0) as url:
        handler.responses["status"] = {"pid": 1, "hub": [hub(url)]}
        code, checks = await run_doctor(capsys, *args)
        assert checks["hub"]["status"] == "ok"
        assert checks["hub"]["message"] == f"{url}: connected, key HUBKEY-1 pinned"
        assert checks["clock"]["status"] == "ok" and url in checks["clock"]["message"]

        handler.responses["status"] = {"pid": 1, "hub": [hub(url, hub_key=None)]}
        _, checks = await run_doctor(capsys, *args)
        assert checks["hub"]["status"] == "warn" and "not pinned" in checks["hub"]["message"]
        assert "--hub-key FINGERPRINT" in checks["hub"]["fix"]

        handler.responses["status"] = {"pid": 1, "hub": [hub(url, spaces={"s1": "forbidden"})]}
        _, checks = await run_doctor(capsys, *args)
        assert (
            checks["hub"]["status"] == "warn" and "not syncing space s1" in checks["hub"]["message"]
        )

        down = hub(url, state="disconnected", reason="unauthorized", detail="bad token")
        handler.responses["status"] = {"pid": 1, "hub": [down]}
        code, checks = await run_doctor(capsys, *args)
        assert code == 1 and checks["hub"]["status"] == "fail"
        assert checks["hub"]["message"] == f"{url}: disconnected (unauthorized: bad token)"
        assert "--token" in checks["hub"]["fix"]


@pytest.mark.parametrize(
    ("offset", "status", "words"),
    [
        (600, "fail", " s ahead of this machine"),  # 599 to 601: the Date is in whole seconds
        (-90, "warn", " s behind this machine"),
        (2, "ok", "within 30 s of"),
        (None, "skip", "without a Date header"),
    ],
)
async def test_clock_skew_against_the_hubs_date(fake, capsys, offset, status, words):
    handler, args = fake
    with http_hub(offset) as url:
        handler.responses["status"] = {"pid": 1, "hub": [hub(url)]}
        code, checks = await run_doctor(capsys, *args)
    assert checks["clock"]["status"] == status and words in checks["clock"]["message"]
    assert (code == 1) == (status == "fail")
    if status in ("warn", "fail"):
        assert "NTP" in checks["clock"]["fix"]


async def test_clock_of_an_unreachable_hub_is_skipped(fake, capsys):
    handler, args = fake
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port = s.getsockname()[1]  # nobody listens there
    handler.responses["status"] = {"pid": 1, "hub": [hub(f"ws://{LOCAL}:{port}")]}
    _, checks = await run_doctor(capsys, *args)
    assert checks["clock"]["status"] == "skip" and "cannot reach" in checks["clock"]["message"]


# --- Node.js and the mock runner ------------------------------------------------------------------
async def test_node_missing_is_a_warning(base, capsys, monkeypatch):
    monkeypatch.setenv("PEERDAEMON_NODE", str(base / "no-node"))
    args = ["--socket", str(base / "none.sock"), "--data-dir", str(base / "data")]
    _, checks = await run_doctor(capsys, *args)
    assert checks["node"]["status"] == "warn" and "Node.js 18+" in checks["node"]["message"]
    assert "only to serve mocks" in checks["node"]["message"]
    assert checks["runner"]["status"] == "skip"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
async def test_node_and_the_runner(base, capsys, monkeypatch):
    monkeypatch.delenv("PEERDAEMON_NODE", raising=False)
    monkeypatch.delenv("PEERDAEMON_MOCK_RUNNER", raising=False)
    data = base / "data"
    args = ["--socket", str(base / "none.sock"), "--data-dir", str(data)]
    _, checks = await run_doctor(capsys, *args)
    assert checks["node"]["status"] == "ok"
    assert checks["runner"]["status"] == "warn"
    assert checks["runner"]["fix"] == "run `peerdaemon mock install`"
    engine = data / "mock-runner" / "node_modules" / "@mockoon" / "commons-server"
    engine.mkdir(parents=True)
    (engine / "package.json").write_text(json.dumps({"version": ENGINE_VERSION}))
    shutil.copyfile(RUNNER_SOURCE / "package-lock.json", data / "mock-runner" / "package-lock.json")
    _, checks = await run_doctor(capsys, *args)
    assert checks["runner"]["status"] == "ok" and ENGINE_VERSION in checks["runner"]["message"]
    (data / "mock-runner" / "package-lock.json").write_text("{}")
    _, checks = await run_doctor(capsys, *args)
    assert checks["runner"]["status"] == "warn" and "outdated" in checks["runner"]["message"]
    assert not (data / "mock-runner" / "runner.mjs").exists()  # doctor changes nothing


async def test_doctor_takes_no_longer_than_its_timeouts(fake, capsys):
    """A hub that accepts and never answers costs one timeout, not a hang."""
    handler, args = fake
    with socket.socket() as listener:
        listener.bind((LOCAL, 0))
        listener.listen()
        url = f"ws://{LOCAL}:{listener.getsockname()[1]}"
        handler.responses["status"] = {"pid": 1, "hub": [hub(url)]}
        old = doctor.TIMEOUT
        doctor.TIMEOUT = 0.5
        try:
            with trio.fail_after(30):
                _, checks = await run_doctor(capsys, *args)
        finally:
            doctor.TIMEOUT = old
    assert checks["clock"]["status"] == "skip" and "cannot reach" in checks["clock"]["message"]
