"""The Node mock runner (peerdaemon/mock/runner/runner.mjs) against its line protocol
(docs/mock-runner.md), for real: Mockoon's engine @mockoon/commons-server 9.9.0 serving on
127.0.0.1, driven through stdin/stdout JSON lines, and its `--confine` mode against hostile
environments.

The engine comes from tests/interop/node_modules (`npm ci --prefix tests/interop`, the Mockoon CLI
pins the same 9.9.0) through NODE_PATH, as nothing can be installed inside `tests/isolated`. One
test runs the runner on the tree its own package-lock.json pins, when
`peerdaemon mock install --data-dir tests/.mock` has installed it (outside the namespace).

Waits are for events (runner events, HTTP answers, a test server's requests), each bounded.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import http.server
import json
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mockutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER_DIR = ROOT / "peerdaemon" / "mock" / "runner"
RUNNER = RUNNER_DIR / "runner.mjs"
INTEROP_MODULES = ROOT / "tests" / "interop" / "node_modules"
FIXTURES = ROOT / "tests" / "fixtures" / "mockoon"
INSTALLED = ROOT / "tests" / ".mock" / "mock-runner"
"""Where `peerdaemon mock install --data-dir tests/.mock` put the locked tree (README, .ci/run)."""
NODE = shutil.which("node")
WAIT = 15.0  # seconds: the bound on every wait
MAX_EVENT_LINE = 1 << 20
EVENTS = {"ready", "started", "updated", "stopped", "error", "transaction", "blocked", "pong"}

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def engine_env(**extra: str) -> dict[str, str]:
    """The runner's whole environment (the daemon starts it with an empty one): only NODE_PATH."""
    if not (INTEROP_MODULES / "@mockoon" / "commons-server" / "package.json").exists():
        pytest.fail(
            f"@mockoon/commons-server is not installed: run `npm ci --prefix {ROOT / 'tests' / 'interop'}`"
        )
    return {"NODE_PATH": str(INTEROP_MODULES), **extra}


# --- the runner process ---------------------------------------------------------------------------
class Runner:
    """A runner child: commands in, events out (read by a thread, checked against the protocol)."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path, script: Path = RUNNER):
        self.stderr_path = stderr
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [NODE or "node", str(script), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.violations: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith(b"\n"):
                self.violations.append(f"unterminated last line {line[:200]!r}")
            if len(line.rstrip(b"\n")) > MAX_EVENT_LINE:
                self.violations.append(f"line of {len(line)} bytes")
            try:
                event = json.loads(line)
            except ValueError:
                self.violations.append(f"not JSON on stdout: {line[:200]!r}")
                continue
            if not isinstance(event, dict) or event.get("event") not in EVENTS:
                self.violations.append(f"not an event: {line[:200]!r}")
                continue
            if event.get("id") is not None and not isinstance(event["id"], str):
                self.violations.append(f"non-string id: {line[:200]!r}")
            self.events.put(event)
        self.events.put(None)

    def send(self, command: dict[str, Any]) -> None:
        self.send_raw(json.dumps(command).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The first event matching `predicate`, and the events read before it."""
        passed: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(
                    f"no {what} within {timeout:g} s; events: {passed}; stderr: {self.stderr()}"
                ) from None
            if event is None:
                self.events.put(None)
                raise AssertionError(
                    f"runner's stdout ended before {what}; events: {passed}; stderr: {self.stderr()}"
                )
            if predicate(event):
                return event, passed
            passed.append(event)

    def expect(self, kind: str, id: Any = ..., timeout: float = WAIT) -> dict[str, Any]:
        return self.expect_with_before(kind, id, timeout)[0]

    def expect_with_before(
        self, kind: str, id: Any = ..., timeout: float = WAIT
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        def match(event: dict[str, Any]) -> bool:
            return event["event"] == kind and (id is ... or event.get("id") == id)

        return self.wait_for(
            match, f"{kind} event" + ("" if id is ... else f" for {id!r}"), timeout
        )

    def start(
        self, id: str, environment: dict[str, Any], directory: Path, **fields: Any
    ) -> dict[str, Any]:
        """Start and wait for `started` (returns it)."""
        self.send(
            {
                "cmd": "start",
                "id": id,
                "environment": environment,
                "directory": str(directory),
                "port": fields.pop("port", 0),
                "hostname": fields.pop("hostname", "127.0.0.1"),
                "logBodyBytes": fields.pop("logBodyBytes", 4096),
                **fields,
            }
        )
        event, before = self.wait_for(
            lambda e: e.get("id") == id and e["event"] in ("started", "error"),
            f"started for {id!r}",
        )
        assert event["event"] == "started", (event, before, self.stderr())
        return event

    def close(self, timeout: float = WAIT) -> int:
        """EOF on stdin; the exit status."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.wait(timeout=timeout)

    def end(self) -> None:
        """Whatever state it is in: ended (by its pid) and reaped."""
        try:
            if self.proc.poll() is None:
                try:
                    self.close(timeout=5)
                except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        finally:
            self.reader.join(timeout=5)


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    """`runners(*args, env=None, script=RUNNER)` -> a started Runner whose `ready` was read."""
    made: list[Runner] = []

    def make(*args: str, env: dict[str, str] | None = None, script: Path = RUNNER) -> Runner:
        runner = Runner(
            list(args),
            engine_env() if env is None else env,
            tmp_path / f"runner{len(made)}.stderr",
            script,
        )
        made.append(runner)
        runner.ready = runner.expect("ready")  # type: ignore[attr-defined]
        return runner

    yield make
    for runner in made:
        runner.end()
    for runner in made:
        assert not runner.violations, runner.violations


# --- HTTP -----------------------------------------------------------------------------------------
def request(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one request (mockutil's, without the headers)."""
    status, _, data = mockutil.request(port, path, method, body, headers, timeout=WAIT)
    return status, data


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now. (Not helpers.free_port: this file
    imports nothing of the daemon.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(WAIT)
        return s.connect_ex(("127.0.0.1", port)) != 0


class Victim:
    """A loopback HTTP server that records every request it gets (what confinement must stop)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.arrived = threading.Condition()
        victim = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with victim.arrived:
                    victim.requests.append((self.command, self.path))
                    victim.arrived.notify_all()
                payload = b"victim-answer"
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, method: str, path: str) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: (method, path) in self.requests, WAIT), (
                self.requests
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def victim() -> Iterator[Victim]:
    server = Victim()
    yield server
    server.close()


# --- environments ---------------------------------------------------------------------------------
def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


BASE = fixture("test-env.json")
TEMPLATE_RESPONSE = BASE["routes"][0]["responses"][0]
TEMPLATE_ROUTE = BASE["routes"][0]


def response(body: str = "", **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(TEMPLATE_RESPONSE)
    out.update(uuid=str(uuid.uuid4()), body=body, headers=[], **fields)
    return out


def route(endpoint: str, *responses: dict[str, Any], method: str = "get") -> dict[str, Any]:
    out = copy.deepcopy(TEMPLATE_ROUTE)
    out.update(
        uuid=str(uuid.uuid4()),
        endpoint=endpoint,
        method=method,
        responses=list(responses or [response()]),
    )
    return out


def environment(*routes: dict[str, Any], **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    out.update(
        uuid=str(uuid.uuid4()),
        name="runner test",
        headers=[{"key": "Content-Type", "value": "text/plain"}],
        routes=list(routes),
        rootChildren=[{"type": "route", "uuid": r["uuid"]} for r in routes],
        folders=[],
        data=[],
        callbacks=[],
    )
    out.update(fields)
    return out


def callback(uri: str, method: str = "post") -> dict[str, Any]:
    out = copy.deepcopy(fixture("callbacks.json")["callbacks"][0])
    out.update(uuid=str(uuid.uuid4()), uri=uri, method=method, body="cb-body", headers=[])
    return out


# --- the runner's files -----------------------------------------------------------------------------
def test_package_and_lock_pin_the_engine():
    package = json.loads((RUNNER_DIR / "package.json").read_text())
    assert package["name"] == "peerdaemon-mock-runner" and package["private"] is True
    pinned = {"@mockoon/commons-server": "9.9.0", "@mockoon/commons": "9.9.0"}
    assert package["dependencies"] == pinned
    lock = json.loads((RUNNER_DIR / "package-lock.json").read_text())
    assert lock["lockfileVersion"] >= 2 and lock["name"] == package["name"]
    assert lock["packages"][""]["dependencies"] == pinned
    for name, version in pinned.items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    for key, entry in lock["packages"].items():
        if key and not entry.get("link"):
            assert entry.get("integrity", "").startswith("sha512-"), key
    assert not (RUNNER_DIR / "node_modules").exists(), "no node_modules is shipped with the runner"


def test_bad_command_line_exits_2_and_writes_nothing(tmp_path):
    for args in (["--bogus"], ["--faker-seed", "x"], ["--allow-host"], ["--allow-host", "a b"]):
        done = subprocess.run(
            [NODE or "node", str(RUNNER), *args],
            env=engine_env(),
            capture_output=True,
            timeout=WAIT,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 2, (args, done)
        assert done.stdout == b"", args
        assert b"usage" in done.stderr


# --- the protocol ----------------------------------------------------------------------------------
def test_ready_then_serving_a_fixture_on_a_free_port(runners, tmp_path):
    runner = runners()
    ready = runner.ready
    assert ready["runner"] == 1 and ready["engine"] == "9.9.0"
    assert ready["node"].startswith("v") and ready["pid"] == runner.proc.pid

    env = fixture("test-env.json")  # port 3000 in the file: the start's port 0 overrides it
    started = runner.start("fx", env, FIXTURES, port=0)
    assert started["port"] > 0 and started["port"] != 3000
    assert started["hostname"] == "127.0.0.1" and started["tls"] is False

    status, body = request(started["port"], "/test2?a=1&b=two")
    assert status == 200 and json.loads(body) == {"route": "test2"}
    tx = runner.expect("transaction", "fx")
    assert (tx["method"], tx["path"], tx["query"], tx["status"]) == (
        "GET",
        "/test2",
        "a=1&b=two",
        200,
    )
    assert tx["routeUUID"] == env["routes"][1]["uuid"]
    assert tx["routeResponseUUID"] == env["routes"][1]["responses"][0]["uuid"]
    assert tx["proxied"] is False and tx["truncated"] is False
    assert isinstance(tx["durationMs"], int) and tx["durationMs"] >= 0
    assert isinstance(tx["time"], int) and abs(tx["time"] / 1000 - time.time()) < 600
    assert json.loads(tx["response"]["body"]) == {"route": "test2"}
    content_type = {"key": "content-type", "value": "application/json; charset=utf-8"}
    assert content_type in tx["response"]["headers"]
    assert any(h["key"] == "host" for h in tx["request"]["headers"])

    # no route: Mockoon's 404, still a transaction
    assert request(started["port"], "/nothing-here")[0] == 404
    tx = runner.expect("transaction", "fx")
    assert tx["status"] == 404 and tx["routeUUID"] is None


def test_update_applies_without_a_restart(runners, tmp_path):
    runner = runners()
    env = environment(route("hello", response("first")))
    started = runner.start("u", env, tmp_path)
    assert request(started["port"], "/hello") == (200, b"first")

    changed = copy.deepcopy(env)
    changed["routes"][0]["responses"][0]["body"] = "second"
    changed["routes"].append(route("added", response("new route")))
    changed["rootChildren"].append({"type": "route", "uuid": changed["routes"][1]["uuid"]})
    runner.send({"cmd": "update", "id": "u", "environment": changed})
    _, before = runner.expect_with_before("updated", "u")
    assert not [e for e in before if e["event"] in ("started", "stopped", "error")], before
    assert request(started["port"], "/hello") == (200, b"second")
    assert request(started["port"], "/added") == (200, b"new route")

    # a refused environment leaves the server as it was
    runner.send({"cmd": "update", "id": "u", "environment": fixture("incompatible.json")})
    error = runner.expect("error", "u")
    assert error["code"] == "ENVIRONMENT_REFUSED" and error["fatal"] is False
    assert request(started["port"], "/hello") == (200, b"second")

    # an update for a server that does not run
    runner.send({"cmd": "update", "id": "nobody", "environment": env})
    error = runner.expect("error", "nobody")
    assert error["code"] == "UNKNOWN_SERVER" and error["fatal"] is False


def test_a_port_change_restarts_that_server_only(runners, tmp_path):
    runner = runners()
    first, second = free_port(), free_port()
    env = environment(route("p", response("on the first port")), port=first)
    other = runner.start("other", environment(route("o", response("other"))), tmp_path)
    started = runner.start("r", env, tmp_path, port=None)  # the environment's own port
    assert started["port"] == first

    moved = copy.deepcopy(env)
    moved["port"] = second
    moved["routes"][0]["responses"][0]["body"] = "on the second port"
    runner.send({"cmd": "update", "id": "r", "environment": moved})
    stopped, _ = runner.expect_with_before("stopped", "r")
    restarted, between = runner.expect_with_before("started", "r")
    assert restarted["port"] == second
    assert not [e for e in between if e["event"] in ("error", "updated")], between
    assert request(second, "/p") == (200, b"on the second port")
    assert refused(first)
    assert request(other["port"], "/o") == (200, b"other")  # the other server never stopped

    # the same port, hostname and TLS settings: no restart
    runner.send({"cmd": "update", "id": "r", "environment": moved})
    _, before = runner.expect_with_before("updated", "r")
    assert not [e for e in before if e["event"] in ("started", "stopped")]

    # TLS on (Mockoon's own certificate): a restart, on the same port
    secure = copy.deepcopy(moved)
    secure["tlsOptions"]["enabled"] = True
    runner.send({"cmd": "update", "id": "r", "environment": secure})
    runner.expect("stopped", "r")
    restarted = runner.expect("started", "r")
    assert restarted["port"] == second and restarted["tls"] is True
    conn = http.client.HTTPSConnection(
        "127.0.0.1", second, timeout=WAIT, context=ssl._create_unverified_context()
    )
    try:
        conn.request("GET", "/p")
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"on the second port")
    finally:
        conn.close()


def test_start_on_a_port_in_use_is_fatal(runners, tmp_path):
    runner = runners()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner.send(
            {
                "cmd": "start",
                "id": "busy",
                "environment": environment(route("x")),
                "directory": str(tmp_path),
                "port": port,
                "hostname": "127.0.0.1",
                "logBodyBytes": 4096,
            }
        )
        error = runner.expect("error", "busy")
    assert error["code"] == "PORT_ALREADY_USED" and error["fatal"] is True
    assert str(port) in error["message"]
    # it is not running: an update knows no such server
    runner.send({"cmd": "update", "id": "busy", "environment": environment(route("x"))})
    assert runner.expect("error", "busy")["code"] == "UNKNOWN_SERVER"


def test_refused_environments_are_fatal_at_start(runners, tmp_path):
    runner = runners()
    for env in (fixture("incompatible.json"), [1, 2], "text"):
        runner.send(
            {
                "cmd": "start",
                "id": "bad",
                "environment": env,
                "directory": str(tmp_path),
                "port": 0,
                "hostname": "127.0.0.1",
            }
        )
        error = runner.expect("error", "bad")
        assert error["code"] == "ENVIRONMENT_REFUSED" and error["fatal"] is True, error


def test_an_old_environment_is_migrated_like_the_cli_does(runners, tmp_path):
    runner = runners()
    env = fixture("basic-folder-2-routes.json")  # lastMigration 32: one migration to apply
    assert env["lastMigration"] < 33
    started = runner.start("old", env, FIXTURES)
    endpoint = env["routes"][0]["endpoint"]
    prefix = f"/{env['endpointPrefix']}" if env["endpointPrefix"] else ""
    assert (
        request(started["port"], f"{prefix}/{endpoint}")[0]
        == env["routes"][0]["responses"][0]["statusCode"]
    )


def test_start_again_replaces_and_stop_stops(runners, tmp_path):
    runner = runners()
    started = runner.start("s", environment(route("v", response("one"))), tmp_path)
    assert request(started["port"], "/v") == (200, b"one")
    runner.send(
        {
            "cmd": "start",
            "id": "s",
            "environment": environment(route("v", response("two"))),
            "directory": str(tmp_path),
            "port": started["port"],
            "hostname": "127.0.0.1",
        }
    )
    runner.expect("stopped", "s")
    again = runner.expect("started", "s")
    assert again["port"] == started["port"]
    assert request(again["port"], "/v") == (200, b"two")

    runner.send({"cmd": "stop", "id": "s"})
    runner.expect("stopped", "s")
    assert refused(again["port"])
    runner.send({"cmd": "stop", "id": "never-started"})
    runner.expect("stopped", "never-started")


def test_ping_answers_after_the_commands_before_it(runners, tmp_path):
    runner = runners()
    runner.send(
        {
            "cmd": "start",
            "id": "a",
            "environment": environment(route("x")),
            "directory": str(tmp_path),
            "port": 0,
            "hostname": "127.0.0.1",
        }
    )
    runner.send({"cmd": "ping", "n": 7})
    pong, before = runner.expect_with_before("pong")
    assert pong["n"] == 7
    assert [e["event"] for e in before] == ["started"]


def test_bad_command_lines_are_reported_and_skipped(runners, tmp_path):
    runner = runners()
    for raw in (
        b"not json\n",
        b"[1,2]\n",
        b'{"no":"cmd"}\n',
        b'{"cmd":"frobnicate","id":"z"}\n',
        b'{"cmd":"start"}\n',
        b'{"cmd":"stop","id":5}\n',
    ):
        runner.send_raw(raw)
        error = runner.expect("error")
        assert error["code"] == "BAD_COMMAND" and error["fatal"] is False, (raw, error)
    assert error["id"] is None
    runner.send_raw(b'{"cmd":"frobnicate","id":"z"}\n')
    assert runner.expect("error")["id"] == "z"

    # a start whose fields are wrong: BAD_COMMAND for its id, nothing started
    runner.send(
        {
            "cmd": "start",
            "id": "w",
            "environment": environment(route("x")),
            "directory": str(tmp_path),
            "port": "80",
        }
    )
    error = runner.expect("error", "w")
    assert error["code"] == "BAD_COMMAND" and error["fatal"] is False

    # a line over 64 MiB is skipped whole, even though it begins like a command
    runner.send_raw(b'{"cmd":"ping","n":1}' + b" " * (64 * 1024 * 1024) + b"\n")
    runner.send({"cmd": "ping", "n": 2})
    error = runner.expect("error")
    assert error["code"] == "BAD_COMMAND" and error["id"] is None
    pong, before = runner.expect_with_before("pong")
    assert pong["n"] == 2 and not before  # no pong 1


def test_transactions_cap_bodies_and_redact_credentials(runners, tmp_path):
    runner = runners()
    long_body = "é" * 60  # 120 bytes
    env = environment(route("echo", response("{{body}}-" + long_body), method="post"))
    started = runner.start("t", env, tmp_path, logBodyBytes=11)
    status, body = request(
        started["port"],
        "/echo",
        "POST",
        body=b"x" * 100,
        headers={"Authorization": "Bearer sekrit", "Content-Type": "text/plain"},
    )
    assert status == 200 and body.decode() == "x" * 100 + "-" + long_body
    tx = runner.expect("transaction", "t")
    assert tx["request"]["body"] == "x" * 11 and tx["request"]["bodyBytes"] == 100
    assert tx["response"]["body"] == "x" * 11 and tx["response"]["bodyBytes"] == 221
    assert tx["truncated"] is True
    auth = [h["value"] for h in tx["request"]["headers"] if h["key"] == "authorization"]
    assert auth == ["Bearer [REDACTED]"]
    assert "sekrit" not in json.dumps(tx)

    # cut at a character boundary, never inside a UTF-8 sequence
    runner.send(
        {
            "cmd": "start",
            "id": "t2",
            "environment": environment(route("e", response(long_body))),
            "directory": str(tmp_path),
            "port": 0,
            "hostname": "127.0.0.1",
            "logBodyBytes": 5,
        }
    )
    port = runner.expect("started", "t2")["port"]
    assert request(port, "/e")[0] == 200
    tx = runner.expect("transaction", "t2")
    assert tx["response"]["body"] == "éé" and tx["truncated"] is True


def test_large_environments_and_transactions_fit_the_lines(runners, tmp_path):
    """A command line of megabytes (read in many chunks) works; a transaction event stays within
    the 1 MiB an event line may take, even with a body that JSON escapes sixfold."""
    runner = runners()
    body = "\u0001" * 700_000  # "\u0001" in JSON: 4.2 MB of command line
    started = runner.start(
        "big", environment(route("big", response(body))), tmp_path, logBodyBytes=10**9
    )
    status, answer = request(started["port"], "/big")
    assert status == 200 and answer == body.encode()
    tx = runner.expect("transaction", "big")  # the reader checks its line's length
    assert tx["truncated"] is True and tx["response"]["bodyBytes"] == 700_000
    assert 0 < len(tx["response"]["body"]) < 700_000 and set(tx["response"]["body"]) == {"\u0001"}


def slow_request(port: int, path: str) -> tuple[threading.Thread, threading.Event, dict[str, Any]]:
    """GET `path` in a thread; the event is set once the request is written to the socket."""
    sent = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            conn.request("GET", path)
            sent.set()
            answer = conn.getresponse()
            result["answer"] = (answer.status, answer.read())
        except Exception as exc:  # reported by the test
            result["error"] = exc
            sent.set()
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, sent, result


def in_flight_env(port: int = 3000) -> dict[str, Any]:
    return environment(
        route("slow", response("old", latency=500)), route("fast", response("fast")), port=port
    )


def test_a_request_in_flight_survives_an_update(runners, tmp_path):
    runner = runners()
    env = in_flight_env()
    started = runner.start("f", env, tmp_path)
    thread, sent, result = slow_request(started["port"], "/slow")
    assert sent.wait(WAIT)
    # the server has routed /slow once it has answered /fast, sent after it on its own connection
    assert request(started["port"], "/fast") == (200, b"fast")
    changed = copy.deepcopy(env)
    changed["routes"][0]["responses"][0]["body"] = "new"
    runner.send({"cmd": "update", "id": "f", "environment": changed})
    runner.expect("updated", "f")
    thread.join(WAIT)
    assert result.get("answer") == (200, b"old"), result
    tx = runner.wait_for(
        lambda e: e["event"] == "transaction" and e["path"] == "/slow", "the slow transaction"
    )[0]
    assert tx["status"] == 200 and tx["durationMs"] >= 450
    assert request(started["port"], "/slow") == (200, b"new")


def test_a_request_in_flight_survives_a_restart(runners, tmp_path):
    runner = runners()
    first, second = free_port(), free_port()
    env = in_flight_env(first)
    runner.start("d", env, tmp_path, port=None)
    thread, sent, result = slow_request(first, "/slow")
    assert sent.wait(WAIT)
    assert request(first, "/fast") == (200, b"fast")
    moved = copy.deepcopy(env)
    moved["port"] = second
    moved["routes"][0]["responses"][0]["body"] = "new"
    runner.send({"cmd": "update", "id": "d", "environment": moved})
    runner.expect("stopped", "d")
    assert runner.expect("started", "d")["port"] == second
    thread.join(WAIT)
    assert result.get("answer") == (200, b"old"), result
    assert request(second, "/fast") == (200, b"fast")
    assert refused(first)


def test_eof_stops_every_server_and_exits_0(runners, tmp_path):
    runner = runners()
    ports = [runner.start(name, environment(route("x")), tmp_path)["port"] for name in ("e1", "e2")]
    assert runner.close() == 0
    stopped = set()
    while True:
        event = runner.events.get(timeout=WAIT)
        if event is None:
            break
        if event["event"] == "stopped":
            stopped.add(event["id"])
    assert stopped == {"e1", "e2"}
    assert all(refused(port) for port in ports)


def ws_route(endpoint: str, body: str) -> dict[str, Any]:
    out = route(endpoint, response(body), method="")
    out.update(type="ws", streamingMode="BROADCAST", streamingInterval=50)
    return out


async def test_websocket_broadcasts_of_two_servers_are_separate(runners, tmp_path):
    """Mockoon keeps one process-wide broadcast context, keyed by route path, closed whole when any
    server stops; the runner gives each server its own. (Blocking runner calls in between are
    fine: the WebSocket messages wait in the sockets.)"""
    import trio
    from trio_websocket import open_websocket_url

    runner = runners()
    ports = {
        name: runner.start(name, environment(ws_route("feed", f"from-{name}")), tmp_path)["port"]
        for name in ("a", "b")
    }
    async with (
        open_websocket_url(f"ws://127.0.0.1:{ports['a']}/feed") as a,
        open_websocket_url(f"ws://127.0.0.1:{ports['b']}/feed") as b,
    ):
        with trio.fail_after(WAIT):
            assert await a.get_message() == "from-a"
            assert await b.get_message() == "from-b"  # the same path on another server: its own
        runner.send({"cmd": "stop", "id": "a"})
        runner.expect("stopped", "a")
        with trio.fail_after(WAIT):  # b's broadcast goes on (20 a second)
            for _ in range(10):
                assert await b.get_message() == "from-b"


def test_faker_seed_makes_answers_repeatable(runners, tmp_path):
    answers = []
    for _ in range(2):
        runner = runners("--faker-seed", "1234")
        port = runner.start("fk", fixture("test-env.json"), FIXTURES)["port"]
        answers.append(request(port, "/faker"))
    assert answers[0][0] == 200 and answers[0] == answers[1]


# --- confinement ------------------------------------------------------------------------------------
SECRET = "TOP-SECRET-7f3a"
ENV_SECRET = "ENV-SECRET-91bc"


def hostile_setup(tmp_path: Path, victim: Victim) -> tuple[dict[str, Any], Path]:
    """An environment that reaches for everything around it, and its directory."""
    (tmp_path / "secret").write_text(SECRET)
    directory = tmp_path / "a" / "b"
    directory.mkdir(parents=True)
    (directory / "ok.txt").write_text("inside the directory")
    (directory / "link.txt").symlink_to(tmp_path / "secret")
    target = f"http://127.0.0.1:{victim.port}"
    by_ip, by_name = (
        callback(f"{target}/by-ip"),
        callback(f"http://localhost:{victim.port}/by-name"),
    )
    by_https = callback(f"https://127.0.0.1:{victim.port}/by-https")
    env = environment(
        route("passwd", response(bodyType="FILE", filePath="/etc/passwd")),
        route("traverse", response(bodyType="FILE", filePath="../../secret")),
        route("link", response(bodyType="FILE", filePath="link.txt")),
        route(
            "templated", response(bodyType="FILE", filePath=str(tmp_path) + "/{{queryParam 'f'}}")
        ),
        route("ok", response(bodyType="FILE", filePath="ok.txt")),
        route("env", response("[{{getEnvVar 'SECRET'}}][{{getEnvVar 'MOCKOON_SECRET'}}]")),
        route("cb-ip", response("called", callbacks=[{"uuid": by_ip["uuid"], "latency": 0}])),
        route("cb-name", response("called", callbacks=[{"uuid": by_name["uuid"], "latency": 0}])),
        route("cb-https", response("called", callbacks=[{"uuid": by_https["uuid"], "latency": 0}])),
        callbacks=[by_ip, by_name, by_https],
        proxyMode=True,
        proxyHost=target,
    )
    return env, directory


def test_without_confine_the_hostile_environment_reaches_out(runners, tmp_path, victim):
    """The control: what --confine must stop does happen without it."""
    env, directory = hostile_setup(tmp_path, victim)
    runner = runners(env=engine_env(MOCKOON_SECRET=ENV_SECRET))
    port = runner.start("h", env, directory)["port"]
    assert SECRET in request(port, "/traverse")[1].decode()
    assert SECRET in request(port, "/link")[1].decode()
    assert SECRET in request(port, "/templated?f=secret")[1].decode()
    assert b"root:" in request(port, "/passwd")[1]
    assert ENV_SECRET in request(port, "/env")[1].decode()
    assert request(port, "/unrouted") == (200, b"victim-answer")  # proxied
    assert ("GET", "/unrouted") in victim.requests
    assert request(port, "/cb-ip") == (200, b"called")
    victim.wait_for("POST", "/by-ip")


def test_confine_refuses_files_outside_env_vars_and_connections(runners, tmp_path, victim):
    env, directory = hostile_setup(tmp_path, victim)
    runner = runners("--confine", env=engine_env(MOCKOON_SECRET=ENV_SECRET))
    assert runner.ready["confine"] is True
    port = runner.start("h", env, directory)["port"]

    for path in ("/passwd", "/traverse", "/link", "/templated?f=secret"):
        status, body = request(port, path)
        assert SECRET not in body.decode() and b"root:" not in body, (path, status, body)
        # Mockoon's own answer for a file it cannot read (with the route's status)
        assert body.startswith(b"Error while serving"), (path, body)
        blocked = runner.wait_for(
            lambda e: e["event"] == "error" and e["code"] == "BLOCKED", f"BLOCKED for {path}"
        )[0]
        assert blocked["id"] == "h" and blocked["fatal"] is False
    assert request(port, "/ok") == (200, b"inside the directory")
    assert request(port, "/env") == (200, b"[][]")

    status, body = request(port, "/unrouted")  # the proxy
    assert status == 504 and b"victim-answer" not in body
    blocked = runner.expect("blocked")
    assert (blocked["id"], blocked["host"], blocked["port"]) == ("h", "127.0.0.1", victim.port)
    error = runner.wait_for(lambda e: e["event"] == "error" and e["code"] == "PROXY_ERROR", "")[0]
    assert error["blocked"] is True and error["fatal"] is False

    assert request(port, "/cb-ip") == (200, b"called")
    blocked = runner.expect("blocked")
    assert (blocked["id"], blocked["host"], blocked["port"]) == ("h", "127.0.0.1", victim.port)
    error = runner.wait_for(lambda e: e["event"] == "error" and e["code"] == "CALLBACK_ERROR", "")[
        0
    ]
    assert error["blocked"] is True and error["fatal"] is False
    assert request(port, "/cb-name") == (200, b"called")
    blocked = runner.expect("blocked")
    assert (blocked["id"], blocked["host"]) == ("h", "localhost")
    assert request(port, "/cb-https") == (200, b"called")
    blocked = runner.expect("blocked")
    assert (blocked["id"], blocked["host"], blocked["port"]) == ("h", "127.0.0.1", victim.port)

    assert runner.close() == 0
    assert victim.requests == []  # the runner is gone: nothing can still arrive
    assert SECRET not in runner.stderr_path.read_text(errors="replace")


def test_confine_refuses_tls_files_outside(runners, tmp_path):
    (tmp_path / "secret").write_text(SECRET)
    directory = tmp_path / "a" / "b"
    directory.mkdir(parents=True)
    runner = runners("--confine")
    tls = {
        "enabled": True,
        "type": "CERT",
        "pfxPath": "",
        "certPath": "../../secret",
        "keyPath": "../../secret",
        "caPath": "",
        "passphrase": "",
    }
    runner.send(
        {
            "cmd": "start",
            "id": "tls",
            "environment": environment(route("x"), tlsOptions=tls),
            "directory": str(directory),
            "port": 0,
            "hostname": "127.0.0.1",
        }
    )
    blocked = runner.expect("error", "tls")
    assert blocked["code"] == "BLOCKED" and blocked["fatal"] is False
    fatal = runner.expect("error", "tls")
    assert fatal["code"] == "CERT_FILE_NOT_FOUND" and fatal["fatal"] is True
    # TLS with Mockoon's own certificate is fine
    tls = {**tls, "certPath": "", "keyPath": ""}
    started = runner.start("tls", environment(route("x"), tlsOptions=tls), directory)
    assert started["tls"] is True


@pytest.mark.parametrize(
    ("allow", "ip_reaches", "name_refusal"),
    [
        (["127.0.0.1"], True, "not in the --allow-host list"),
        (["127.0.0.0/8"], True, "not in the --allow-host list"),
        (["::ffff:127.0.0.0/104"], True, "not in the --allow-host list"),
        (["localhost"], False, "resolves to"),  # the name is allowed, its loopback address is not
        (["*.localhost", "198.51.100.0/24"], False, "not in the --allow-host list"),
        (["localhost", "127.0.0.1"], True, None),
    ],
)
def test_confine_allow_list(runners, tmp_path, victim, allow, ip_reaches, name_refusal):
    env, directory = hostile_setup(tmp_path, victim)
    runner = runners("--confine", *[arg for host in allow for arg in ("--allow-host", host)])
    port = runner.start("h", env, directory)["port"]

    status, body = request(port, "/unrouted")  # the proxy, to 127.0.0.1
    assert request(port, "/cb-ip")[0] == 200  # a callback to 127.0.0.1
    if ip_reaches:
        assert (status, body) == (200, b"victim-answer")
        victim.wait_for("GET", "/unrouted")
        victim.wait_for("POST", "/by-ip")
    else:
        assert status == 504
        for _ in range(2):
            blocked = runner.expect("blocked")
            assert (blocked["id"], blocked["host"], blocked["port"]) == (
                "h",
                "127.0.0.1",
                victim.port,
            )

    assert request(port, "/cb-name")[0] == 200  # a callback to localhost
    if name_refusal is None:
        victim.wait_for("POST", "/by-name")
    else:
        blocked = runner.expect("blocked")
        assert (blocked["id"], blocked["host"]) == ("h", "localhost")
        assert name_refusal in blocked["reason"]
    assert runner.close() == 0  # the runner is gone: what the victim has is all it gets
    kept_out = {("GET", "/unrouted"), ("POST", "/by-ip")} if not ip_reaches else set()
    if name_refusal is not None:
        kept_out.add(("POST", "/by-name"))
    assert not kept_out & set(victim.requests), victim.requests


# --- the locked tree ----------------------------------------------------------------------------------
def test_the_tree_the_lock_pins_serves(runners, tmp_path):
    modules = INSTALLED / "node_modules"
    if not (modules / ".package-lock.json").exists():
        pytest.fail(
            "the locked tree is not installed: run "
            "`.venv/bin/peerdaemon mock install --data-dir tests/.mock` first (needs npm's registry)"
        )
    shipped = hashlib.sha256((RUNNER_DIR / "package-lock.json").read_bytes()).digest()
    assert hashlib.sha256((INSTALLED / "package-lock.json").read_bytes()).digest() == shipped
    copy_dir = tmp_path / "runner"
    copy_dir.mkdir()
    shutil.copy2(RUNNER, copy_dir / "runner.mjs")
    (copy_dir / "node_modules").symlink_to(modules)
    # no NODE_PATH: the engine comes from the runner's own folder
    runner = runners("--confine", env={}, script=copy_dir / "runner.mjs")
    assert runner.ready["engine"] == "9.9.0"
    port = runner.start("lk", fixture("test-env.json"), FIXTURES)["port"]
    assert request(port, "/test2")[0] == 200
