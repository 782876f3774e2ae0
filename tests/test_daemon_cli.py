"""The `peerdaemon` command as subprocesses against a real daemon subprocess (`peerdaemon run`)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest
from daemonproc import (  # noqa: F401
    PYTHON,
    Daemons,
    child_env,
    daemons_fixture,
    sigint_as_from_a_terminal,
)
from modelutil import FIXTURE_DIR, assert_strict_equal, load
from pycrdt import Doc

from peerdaemon.api.client import Client, ConnectionLost
from peerdaemon.model import apply_environment, export_environment, prepare

CLI_TIMEOUT = 30


# --- helpers ------------------------------------------------------------------------------------
def cli(socket_path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`peerdaemon --socket S ARGS...`, capturing bytes."""
    argv = [PYTHON, "-m", "peerdaemon"]
    if socket_path is not None:
        argv += ["--socket", str(socket_path)]
    return subprocess.run(
        [*argv, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=child_env(),
        timeout=CLI_TIMEOUT,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode())
    return proc.stdout.decode()


def one_line_error(proc: subprocess.CompletedProcess, *, code: int = 1) -> str:
    """Exit `code`, nothing on stdout, exactly one `peerdaemon: ...` line on stderr."""
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peerdaemon: "), err
    assert proc.stdout == b""
    return lines[0]


def unique_env(fixture: str = "test-env.json", **changes) -> dict:
    """A fixture with a fresh uuid, so tests sharing the module's daemon do not collide."""
    env = load(fixture)
    env.update(changes)
    env["uuid"] = f"cli-{os.urandom(6).hex()}"
    return env


@pytest.fixture(scope="module")
def daemon():
    """One daemon for the module's command tests (each test works on its own environments)."""
    factory = Daemons()
    try:
        d = factory.new()
        d.start()
        yield d
    finally:
        factory.cleanup()


@pytest.fixture
def sock(daemon):
    return daemon.socket_path


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def write_json(path, value) -> str:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return str(path)


def api(sock) -> Client:
    """A direct client, for setting up and checking what the command under test did."""
    return Client.connect(sock, timeout=CLI_TIMEOUT)


def imported(sock, env: dict) -> str:
    with api(sock) as client:
        return client.import_env(json.dumps(env))["id"]


def exported(sock, env_id: str) -> dict:
    with api(sock) as client:
        return client.export(env_id)


def patched(sock, env_id: str, path: str, value) -> None:
    with api(sock) as client:
        client.patch(env_id, [{"op": "replace", "path": path, "value": value}])


class LineReader:
    """Lines of a child's stdout, read by a thread, with a bounded wait for each."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self.lines.put(line)
        self.lines.put(b"")  # EOF

    def next(self, timeout: float = 10) -> bytes:
        return self.lines.get(timeout=timeout)


# --- no daemon, bad usage -----------------------------------------------------------------------
def test_status_without_a_daemon(daemons):
    missing = daemons.path("nothing") / "pd.sock"
    line = one_line_error(cli(missing, "status"))
    assert "no peerdaemon is running" in line and str(missing) in line
    one_line_error(cli(missing, "env", "list"))


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("env",),
        ("env", "import"),
        ("env", "export", "x", "--format", "xml"),
        ("status", "--bogus"),
    ],
)
def test_bad_usage_exits_2(args):
    proc = cli(None, *args)
    assert proc.returncode == 2, proc
    assert b"usage:" in proc.stderr and b"Traceback" not in proc.stderr


# --- each command -------------------------------------------------------------------------------
def test_status(daemon, sock):
    text = ok(cli(sock, "status"))
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key: value.strip() for key, value in fields.items()}
    assert fields["pid"] == str(daemon.pid) and fields["socket"] == str(sock)
    assert fields["data dir"] == str(daemon.data_dir)
    status = json.loads(ok(cli(sock, "status", "--json")))
    assert status["pid"] == daemon.pid and status["last_migration"] == 33


def test_import_prints_the_id_alone(sock, workdir):
    env = unique_env()
    path = write_json(workdir / "env.json", env)
    proc = cli(sock, "env", "import", path)
    assert ok(proc) == env["uuid"] + "\n" and proc.stderr == b""
    # Again: refused, one line; with --new-id: a new id.
    line = one_line_error(cli(sock, "env", "import", path))
    assert env["uuid"] in line and "exists" in line
    new = ok(cli(sock, "env", "import", path, "--new-id")).strip()
    assert new != env["uuid"] and len(new) == 36
    # From standard input.
    other = unique_env("callbacks.json")
    proc = cli(sock, "env", "import", "-", stdin=json.dumps(other).encode())
    assert ok(proc) == other["uuid"] + "\n"


def test_import_reports_repairs_on_stderr(sock, workdir):
    demo = json.loads((FIXTURE_DIR / "demo-api-generated-commons-9.9.0.json").read_text())
    demo["uuid"] = f"demo-{os.urandom(4).hex()}"
    proc = cli(sock, "env", "import", write_json(workdir / "demo.json", demo))
    assert ok(proc) == demo["uuid"] + "\n"
    err = proc.stderr.decode().splitlines()
    assert err and all(line.startswith("peerdaemon: repaired: ") for line in err)
    assert any("/routes/6" in line for line in err)


def test_import_errors(sock, workdir):
    bad = workdir / "bad.json"
    bad.write_text('{\n  "uuid": "x",\n  nope\n}')
    line = one_line_error(cli(sock, "env", "import", str(bad)))
    assert "line 3" in line
    one_line_error(cli(sock, "env", "import", "-", stdin=b"[1, 2, 3]"))
    line = one_line_error(cli(sock, "env", "import", str(workdir / "missing.json")))
    assert "missing.json" in line
    one_line_error(cli(sock, "env", "import", "-", stdin=b"\xff\xfe not utf-8"))


def test_newer_environment_is_flagged(sock, workdir):
    env = unique_env("incompatible.json")
    proc = cli(sock, "env", "import", write_json(workdir / "newer.json", env))
    assert ok(proc) == env["uuid"] + "\n"
    assert b"newer" in proc.stderr  # a warning, not an error
    listed = {e["id"]: e for e in json.loads(ok(cli(sock, "env", "list", "--json")))}
    assert listed[env["uuid"]]["newer"] is True
    row = next(r for r in ok(cli(sock, "env", "list")).splitlines() if env["uuid"] in r)
    assert row.rstrip().endswith("newer")
    with api(sock) as client:
        assert env["uuid"] in client.status()["newer"]
    exported = json.loads(ok(cli(sock, "env", "export", env["uuid"])))
    # made valid for this schema (docs/model.md): the lists it lacks are added, the rest kept
    assert_strict_equal(exported, prepare(json.loads(json.dumps(env)), env["uuid"])[0])
    assert_kept(env, exported)


def assert_kept(original, exported, where="$"):
    """Everything the file held is in the export (which may hold more: added defaults), but
    a value whose type this schema does not accept, which gets the default."""
    if isinstance(original, dict):
        assert isinstance(exported, dict), where
        for key, value in original.items():
            assert key in exported, f"{where}.{key}"
            assert_kept(value, exported[key], f"{where}.{key}")
    elif isinstance(original, list):
        assert isinstance(exported, list) and len(exported) == len(original), where
        for i, (a, b) in enumerate(zip(original, exported, strict=True)):
            assert_kept(a, b, f"{where}[{i}]")
    elif type(original) is type(exported):
        assert_strict_equal(exported, original)


def test_list(sock):
    env = unique_env(name="Listed env")
    env_id = imported(sock, env)
    lines = ok(cli(sock, "env", "list")).splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROUTES", "SHARED", "LINKED", "FLAGS"]
    row = next(line for line in lines if line.startswith(env_id))
    assert row.split() == [env_id, "Listed", "env", "11", "-", "-", "-"]
    entries = json.loads(ok(cli(sock, "env", "list", "--json")))
    assert entries == sorted(entries, key=lambda e: e["id"])
    entry = next(e for e in entries if e["id"] == env_id)
    assert entry["name"] == "Listed env" and entry["routes"] == 11 and entry["newer"] is False


def test_export_json_and_yjs(sock, workdir):
    env = unique_env()
    env_id = imported(sock, env)
    out = ok(cli(sock, "env", "export", env_id))
    exported = json.loads(out)
    assert_strict_equal(exported, env)
    assert out == json.dumps(exported, indent=2, ensure_ascii=False) + "\n"  # Mockoon's layout
    target = workdir / "out.json"
    assert ok(cli(sock, "env", "export", env_id, "-o", str(target))) == ""
    assert target.read_text(encoding="utf-8") + "\n" == out  # a file as Mockoon writes it
    update = cli(sock, "env", "export", env_id, "--format", "yjs")
    assert update.returncode == 0, update.stderr
    doc = Doc()
    doc.apply_update(update.stdout)
    assert_strict_equal(export_environment(doc, env_id), env)
    target = workdir / "out.yjs"
    ok(cli(sock, "env", "export", env_id, "--format", "yjs", "-o", str(target)))
    assert target.read_bytes() == update.stdout
    one_line_error(cli(sock, "env", "export", "no-such-env"))


def test_get(sock):
    env = unique_env()
    env_id = imported(sock, env)
    assert_strict_equal(json.loads(ok(cli(sock, "env", "get", env_id))), env)
    assert json.loads(ok(cli(sock, "env", "get", env_id, "/routes/0/endpoint"))) == "test"
    assert "not-found" in one_line_error(cli(sock, "env", "get", env_id, "/routes/99"))
    assert "bad-pointer" in one_line_error(cli(sock, "env", "get", env_id, "routes"))
    assert "not-found" in one_line_error(cli(sock, "env", "get", "no-such-env"))


def test_put_from_a_file_and_stdin(sock, workdir):
    env = unique_env()
    env_id = imported(sock, env)
    env["name"] = "Put from a file"
    assert ok(cli(sock, "env", "put", env_id, write_json(workdir / "put.json", env))) == ""
    assert_strict_equal(exported(sock, env_id), env)
    env["routes"][0]["endpoint"] = "from-stdin"
    ok(cli(sock, "env", "put", env_id, "-", stdin=json.dumps(env).encode()))
    assert_strict_equal(exported(sock, env_id), env)
    assert "line 1" in one_line_error(cli(sock, "env", "put", env_id, "-", stdin=b'{"a": }'))
    one_line_error(cli(sock, "env", "put", env_id, "-", stdin=b'"not an environment"'))
    one_line_error(cli(sock, "env", "put", "no-such-env", "-", stdin=json.dumps(env).encode()))
    assert_strict_equal(exported(sock, env_id), env)


def test_put_of_another_environments_file_is_refused_unless_forced(sock, workdir):
    """`env put ID FILE` where FILE is another environment: exit 1, one line, nothing changed
    (it used to replace ID with the other one's content and exit 0 with a warning)."""
    env, other = unique_env(name="Mine"), unique_env(name="Other")
    env_id, other_id = imported(sock, env), imported(sock, other)
    other_file = write_json(workdir / "other.json", other)
    line = one_line_error(cli(sock, "env", "put", env_id, other_file))
    assert "--force-id" in line and "uuid-mismatch" in line, line
    assert_strict_equal(exported(sock, env_id), env)
    assert_strict_equal(exported(sock, other_id), other)
    stdin = json.dumps(other).encode()
    assert "--force-id" in one_line_error(cli(sock, "env", "put", env_id, "-", stdin=stdin))

    proc = cli(sock, "env", "put", "--force-id", env_id, other_file)
    assert ok(proc) == "" and other_id in proc.stderr.decode()  # the repair note: uuid kept
    assert_strict_equal(exported(sock, env_id), {**other, "uuid": env_id})
    assert_strict_equal(exported(sock, other_id), other)
    no_uuid = {k: v for k, v in env.items() if k != "uuid"}
    assert ok(cli(sock, "env", "put", env_id, write_json(workdir / "no-uuid.json", no_uuid))) == ""
    assert_strict_equal(exported(sock, env_id), env)


def test_patch_from_a_file_and_stdin(sock, workdir):
    env = unique_env()
    env_id = imported(sock, env)
    patch = [{"op": "replace", "path": "/name", "value": "Patched"}]
    assert ok(cli(sock, "env", "patch", env_id, write_json(workdir / "p.json", patch))) == ""
    patch = [{"op": "add", "path": "/headers/-", "value": {"key": "k", "value": "v"}}]
    ok(cli(sock, "env", "patch", env_id, "-", stdin=json.dumps(patch).encode()))
    env["name"] = "Patched"
    env["headers"].append({"key": "k", "value": "v"})
    assert_strict_equal(exported(sock, env_id), env)
    bad = [{"op": "test", "path": "/name", "value": "other"}]
    line = one_line_error(cli(sock, "env", "patch", env_id, "-", stdin=json.dumps(bad).encode()))
    assert "bad-patch" in line
    assert_strict_equal(exported(sock, env_id), env)


def test_merge_a_yjs_update_file(sock, workdir):
    env = unique_env()
    env_id = imported(sock, env)
    replica = Doc()
    with api(sock) as client:
        replica.apply_update(client.export(env_id, "yjs"))
    env["routes"][1]["endpoint"] = "merged"
    apply_environment(replica, prepare(env, env_id)[0])
    update = workdir / "update.yjs"
    update.write_bytes(replica.get_update())
    assert ok(cli(sock, "env", "merge", env_id, str(update))) == ""
    assert_strict_equal(exported(sock, env_id), env)
    # A new id from stdin creates it; garbage is refused.
    new_id = f"merged-{os.urandom(4).hex()}"
    ok(cli(sock, "env", "merge", new_id, "-", stdin=update.read_bytes()))
    assert_strict_equal(exported(sock, new_id), {**env, "uuid": new_id})
    line = one_line_error(cli(sock, "env", "merge", env_id, "-", stdin=b"not a yjs update"))
    assert "bad-update" in line
    assert_strict_equal(exported(sock, env_id), env)


def test_delete(sock):
    env_id = imported(sock, unique_env())
    assert ok(cli(sock, "env", "delete", env_id)) == ""
    assert "not-found" in one_line_error(cli(sock, "env", "delete", env_id))
    with api(sock) as client:
        assert env_id not in [e["id"] for e in client.list_envs()]


def test_watch_prints_one_line_per_change(daemons, sock):
    env_id = imported(sock, unique_env())
    watch = daemons.track(
        subprocess.Popen(
            [PYTHON, "-m", "peerdaemon", "--socket", str(sock), "env", "watch", env_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            preexec_fn=sigint_as_from_a_terminal,
        )
    )
    lines = LineReader(watch.stdout)

    def patch(path: str, value) -> None:
        patched(sock, env_id, path, value)

    # Until the watcher has subscribed, edits are not reported: probe with /name until it is.
    deadline = time.monotonic() + 20
    n = 0
    while True:
        n += 1
        patch("/name", f"probe {n}")
        try:
            line = lines.next(timeout=0.5)
        except queue.Empty:
            assert time.monotonic() < deadline and watch.poll() is None, watch.poll()
            continue
        assert json.loads(line)["paths"] == ["/name"], line
        break
    patch("/routes/0/endpoint", "first")
    patch("/port", 4242)
    got = []
    while len(got) < 2:
        event = json.loads(lines.next())
        if event["paths"] != ["/name"]:  # a late probe
            got.append(event)
    assert got == [
        {"id": env_id, "paths": ["/routes/0/endpoint"], "origin": "local"},
        {"id": env_id, "paths": ["/port"], "origin": "local"},
    ]
    os.kill(watch.pid, signal.SIGINT)  # Ctrl-C: a clean exit
    assert watch.wait(CLI_TIMEOUT) == 0
    lines.thread.join(CLI_TIMEOUT)
    assert b"Traceback" not in watch.stderr.read()


def test_watch_ends_when_the_environment_is_deleted(daemons, sock):
    env_id = imported(sock, unique_env())
    watch = daemons.track(
        subprocess.Popen(
            [PYTHON, "-m", "peerdaemon", "--socket", str(sock), "env", "watch", env_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
    )
    lines = LineReader(watch.stdout)
    deadline = time.monotonic() + 20
    n = 0
    while True:  # wait until it is subscribed (see above)
        n += 1
        patched(sock, env_id, "/name", f"probe {n}")
        try:
            lines.next(timeout=0.5)
            break
        except queue.Empty:
            assert time.monotonic() < deadline and watch.poll() is None
    with api(sock) as client:
        client.delete(env_id)
    while (line := lines.next()) and json.loads(line).get("paths") == ["/name"]:
        pass
    assert json.loads(line) == {"id": env_id, "deleted": True}
    assert lines.next() == b""
    assert watch.wait(CLI_TIMEOUT) == 0
    lines.thread.join(CLI_TIMEOUT)
    one_line_error(cli(sock, "env", "watch", env_id))  # unknown now


# --- the daemon's own life ----------------------------------------------------------------------
def test_restart_keeps_everything(daemons):
    d = daemons.new()
    d.start()
    sock = d.socket_path
    with api(sock) as client:
        ids = [
            client.import_env((FIXTURE_DIR / name).read_text())["id"]
            for name in ("test-env.json", "response-rules.json", "incompatible.json")
        ]
        client.patch(
            ids[0], [{"op": "replace", "path": "/routes/0/responses/0/body", "value": "e"}]
        )
        client.put(ids[1], {**client.export(ids[1]), "name": "put"})
        gone = client.import_env((FIXTURE_DIR / "callbacks.json").read_text())["id"]
        client.delete(gone)
        exports = {i: client.export(i) for i in ids}
        listing = client.list_envs()
        sub = client.subscribe_env(ids[0])  # a subscriber does not hold up a clean stop
        assert d.stop() == 0
        with pytest.raises(ConnectionLost):
            sub.next_event(timeout=CLI_TIMEOUT)
    assert not sock.exists()  # removed on a clean stop
    assert "peerdaemon stopped" in d.output()
    d.start()
    for env_id, before in exports.items():
        assert_strict_equal(json.loads(ok(cli(sock, "env", "export", env_id))), before)
    with api(sock) as client:
        assert client.list_envs() == listing
        status = client.status()
        assert status["environments"] == 3 and status["newer"] == [ids[2]]
    one_line_error(cli(sock, "env", "get", gone))


def test_unusable_socket_path_is_a_one_line_error(daemons):
    d = daemons.new(socket_path=daemons.path("x" * 120) / "pd.sock")
    assert d.spawn().wait(CLI_TIMEOUT) == 1
    errors = [line for line in d.output().splitlines() if line.startswith("peerdaemon: ")]
    assert len(errors) == 1 and "too long" in errors[0], d.output()
    assert "Traceback" not in d.output()


def test_second_daemon_on_the_same_data_dir_is_refused(daemons):
    first = daemons.new()
    first.start()
    second = daemons.new(data_dir=first.data_dir)  # its own socket path
    proc = second.spawn()
    assert proc.wait(CLI_TIMEOUT) == 1
    out = second.output()
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("peerdaemon: ")]
    assert len(errors) == 1, out
    assert str(first.data_dir) in errors[0] and "in use" in errors[0]
    assert f"pid {first.pid}" in errors[0]
    assert not second.socket_path.exists()
    # Another data dir but the first one's socket: refused too.
    third = daemons.new(socket_path=first.socket_path)
    assert third.spawn().wait(CLI_TIMEOUT) == 1
    errors = [line for line in third.output().splitlines() if line.startswith("peerdaemon: ")]
    assert len(errors) == 1 and str(first.socket_path) in errors[0]
    # The first one is unharmed.
    with api(first.socket_path) as client:
        assert client.status()["pid"] == first.pid
