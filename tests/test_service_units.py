"""The service files (contrib/systemd, contrib/launchd) and `peerdaemon service`.

- the package's copies (peerdaemon/cli/service_units, what `service install` writes) are
  contrib's, byte for byte: contrib/ is the source of truth;
- every unit, as installed (ExecStart naming this venv's peerdaemon), passes `systemd-analyze
  verify`, and keeps the hardening contrib/README.md describes;
- each unit's own command line, environment, runtime/state directories and umask start the daemon
  (it answers on the socket its users' commands look for) and the hub (GET /health), which stop
  cleanly on SIGTERM;
- `service install --root` writes what it should and `uninstall --root` removes it (user,
  --system, --hub), running no service manager; without --root, the systemctl calls (a stand-in
  systemctl on PATH) and `service status`'s line.

Everything listens on loopback only: the daemon without --listen and with PEERDAEMON_NO_MDNS=1,
the hub on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import getpass
import http.client
import json
import os
import plistlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

from peerdaemon.api.client import Client, ClientError
from peerdaemon.cli import service
from peerdaemon.cli.common import CliError

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
PACKAGED = ROOT / "peerdaemon" / "cli" / "service_units"
EXE = Path(sys.executable).parent / "peerdaemon"  # this venv's
SHIPPED = {
    "peerdaemon.service": "systemd",
    "peerdaemon@.service": "systemd",
    "peerdaemon-hub.service": "systemd",
    "peerdaemon-hub.sysusers": "systemd",
    "hub.toml": "systemd",
    "com.peerdaemon.plist": "launchd",
}
UNITS = ("peerdaemon.service", "peerdaemon@.service", "peerdaemon-hub.service")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
USER = getpass.getuser()

FAKE_MANAGER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case " $* " in *" show "*) cat "$FAKE_SHOW" 2>/dev/null;; esac
exit 0
"""


# --- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: socket paths must stay within AF_UNIX's ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pdsu"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test started: SIGKILLed by pid at the end if still running."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def base_env(home: Path) -> dict[str, str]:
    """A service's environment, as systemd builds it: HOME, PATH, and no leftover selection."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PEERDAEMON_", "XDG_", "SUDO_")) and k != "HOME"
    }
    env.update(HOME=str(home), PEERDAEMON_NO_MDNS="1", PYTHONUNBUFFERED="1")
    return env


def fake_managers(tmp: Path) -> Path:
    """tmp/fakebin: systemctl, systemd-sysusers and launchctl that log their arguments."""
    fakebin = tmp / "fakebin"
    fakebin.mkdir(exist_ok=True)
    for name in ("systemctl", "systemd-sysusers", "launchctl"):
        path = fakebin / name
        path.write_text(FAKE_MANAGER)
        path.chmod(0o755)
    return fakebin


def run_service(tmp: Path, *args: str, env: dict[str, str] | None = None):
    """`peerdaemon service ARGS` with HOME in `tmp`, and stand-in service managers on PATH that
    log their arguments (to `tmp/manager.log`) and answer `show` with `tmp/show`."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    fakebin = fake_managers(tmp)
    full = base_env(home)
    full.update(
        PATH=f"{fakebin}{os.pathsep}{os.environ.get('PATH', '')}",
        FAKE_LOG=str(tmp / "manager.log"),
        FAKE_SHOW=str(tmp / "show"),
    )
    full.update(env or {})
    return subprocess.run(
        [str(EXE), "service", *args], env=full, capture_output=True, text=True, timeout=60
    )


def manager_calls(tmp: Path) -> list[str]:
    log = tmp / "manager.log"
    return log.read_text().splitlines() if log.exists() else []


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections: key -> every value given (Environment= may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def specifiers(text: str, table: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        assert letter in table, f"specifier %{letter} has no stand-in in this test"
        return table[letter]

    return re.sub(r"%(.)", one, text)


def start_unit(
    unit_text: str,
    *,
    table: dict[str, str],
    env: dict[str, str],
    runtime: Path,
    state: Path,
    argv_map: dict[str, str] | None = None,
    log: Path,
) -> subprocess.Popen:
    """Start a unit's ExecStart as systemd would: its Environment=, RuntimeDirectory= (0700 under
    `runtime`), StateDirectory= (under `state`), WorkingDirectory= and UMask=."""
    svc = parse_unit(unit_text)["Service"]
    (exec_start,) = svc["ExecStart"]
    argv = [(argv_map or {}).get(word, word) for word in shlex.split(specifiers(exec_start, table))]
    full = dict(env)
    for assignment in svc.get("Environment", []):
        for pair in shlex.split(specifiers(assignment, table)):
            key, _, value = pair.partition("=")
            full[key] = value
    for name in svc.get("RuntimeDirectory", []):
        (runtime / specifiers(name, table)).mkdir(mode=0o700, parents=True)
    for name in svc.get("StateDirectory", []):
        (state / specifiers(name, table)).mkdir(mode=0o700, parents=True)
    cwd = specifiers(svc["WorkingDirectory"][0], table) if "WorkingDirectory" in svc else None
    umask = int(svc["UMask"][0], 8)
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            env=full,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.umask(umask),
        )


def stop(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM by pid, as systemd stops it (KillMode=mixed): a clean exit, status 0."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        pytest.fail(f"no exit {STOP_TIMEOUT} s after SIGTERM:\n{log.read_text()}")
    assert code == 0, log.read_text()


def wait_for(what: str, proc: subprocess.Popen, log: Path, probe) -> object:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return probe()
        except (OSError, ClientError, http.client.HTTPException):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not answer within {START_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.1)


def daemon_status(socket: Path) -> dict:
    with Client.connect(socket) as client:
        return client.call("status")


def under(root: Path, path: Path) -> Path:
    return root / path.relative_to(path.anchor)


def user_unit(tmp: Path) -> Path:
    """Where `installed(tmp)` writes the user unit ($HOME is tmp/home)."""
    return under(tmp / "root", tmp / "home" / ".config" / "systemd" / "user" / "peerdaemon.service")


def installed(tmp: Path, *flags: str) -> Path:
    """`service install --root` into tmp/root; returns the root."""
    result = run_service(tmp, "install", "--root", str(tmp / "root"), *flags)
    assert result.returncode == 0, result.stderr
    return tmp / "root"


# --- the files ------------------------------------------------------------------------------------
def test_the_packaged_copies_are_contribs():
    """contrib/ is the source of truth; an installed package carries byte-identical copies."""
    assert sorted(p.name for p in PACKAGED.iterdir()) == sorted(SHIPPED)
    for name, folder in SHIPPED.items():
        assert (PACKAGED / name).read_bytes() == (CONTRIB / folder / name).read_bytes(), (
            f"peerdaemon/cli/service_units/{name} differs from contrib/{folder}/{name}: "
            f"cp contrib/{folder}/{name} peerdaemon/cli/service_units/"
        )


@pytest.mark.parametrize("name", UNITS)
def test_the_units_are_hardened_without_breaking_node(name):
    svc = parse_unit((CONTRIB / "systemd" / name).read_text())["Service"]
    assert svc["ExecStart"][0].startswith(service.SHIPPED_EXE + " ")
    assert svc["Restart"] == ["on-failure"]
    assert svc["NoNewPrivileges"] == ["true"]
    assert svc["SystemCallFilter"] == ["@system-service"]
    # Node's V8 calls pkey_alloc, which @system-service leaves out: EPERM, not a SIGSYS kill
    assert svc["SystemCallErrorNumber"] == ["EPERM"]
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert svc["UMask"] == ["0077"]
    assert svc["SyslogIdentifier"]
    assert "MemoryDenyWriteExecute" not in svc  # Node's JIT writes and runs code
    if name != "peerdaemon.service":  # namespaces: system units only (contrib/README.md)
        assert svc["ProtectSystem"] and svc["PrivateTmp"] == ["true"]
    if name == "peerdaemon@.service":
        assert "ProtectHome" not in svc  # the user's data dir and linked files
        assert svc["User"] == ["%i"]


@pytest.fixture
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run does)")
    return found


def verify(analyze: str, unit: Path, *, user: bool, env: dict[str, str]) -> None:
    cmd = [analyze, *(["--user"] if user else []), "verify", str(unit)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    ours = [line for line in result.stderr.splitlines() if "peerdaemon" in line]
    assert result.returncode == 0 and not ours, f"{' '.join(cmd)}:\n{result.stderr}"


def test_every_installed_unit_passes_systemd_analyze_verify(systemd_analyze, short_tmp):
    root = installed(short_tmp)
    installed(short_tmp, "--system", "--user-name", USER)
    installed(short_tmp, "--hub")
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    env = base_env(short_tmp / "home") | {"XDG_RUNTIME_DIR": str(runtime)}
    system = root / "etc" / "systemd" / "system"
    verify(systemd_analyze, user_unit(short_tmp), user=True, env=env)
    verify(systemd_analyze, system / f"peerdaemon@{USER}.service", user=False, env=env)
    verify(systemd_analyze, system / "peerdaemon-hub.service", user=False, env=env)


def test_an_executable_path_with_spaces_and_percent_signs_is_quoted(systemd_analyze, short_tmp):
    odd = short_tmp / "my apps" / "peer%daemon"
    odd.parent.mkdir()
    odd.symlink_to(EXE)
    text = (PACKAGED / "peerdaemon.service").read_text()
    rendered = service.render("peerdaemon.service", text, str(odd), Path("/home/x"))
    exec_start = parse_unit(rendered)["Service"]["ExecStart"][0]
    assert exec_start == f'"{short_tmp}/my apps/peer%%daemon" run'
    unit = short_tmp / "peerdaemon.service"
    unit.write_text(rendered)
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    env = base_env(short_tmp) | {"XDG_RUNTIME_DIR": str(runtime)}
    verify(systemd_analyze, unit, user=True, env=env)


# --- the units' command lines run ----------------------------------------------------------------
def test_the_user_units_command_line_runs_the_daemon_where_commands_find_it(short_tmp, procs):
    installed(short_tmp)
    text = user_unit(short_tmp).read_text()
    home, runtime = short_tmp / "h", short_tmp / "r"
    home.mkdir()
    runtime.mkdir(mode=0o700)  # the user manager's $XDG_RUNTIME_DIR
    env = base_env(home) | {"XDG_RUNTIME_DIR": str(runtime)}
    log = short_tmp / "daemon.log"
    table = {"h": str(home), "t": str(runtime), "i": USER}
    proc = start_unit(text, table=table, env=env, runtime=runtime, state=home, log=log)
    procs.append(proc)
    socket = runtime / "peerdaemon" / "peerdaemon.sock"
    status = wait_for("the daemon", proc, log, lambda: daemon_status(socket))
    assert status
    assert (home / ".local" / "share" / "peerdaemon").is_dir()  # the user's own data dir
    # a command in the user's session (same $XDG_RUNTIME_DIR, no option) reaches it
    cli = subprocess.run([str(EXE), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    stop(proc, log)


def test_the_system_templates_command_line_runs_the_daemon_for_its_user(short_tmp, procs):
    root = installed(short_tmp, "--system", "--user-name", USER)
    text = (root / "etc" / "systemd" / "system" / "peerdaemon@.service").read_text()
    home, runtime = short_tmp / "h", short_tmp / "r"
    home.mkdir()
    runtime.mkdir()
    env = base_env(home)  # a system service has HOME (from User=), no $XDG_RUNTIME_DIR
    log = short_tmp / "daemon.log"
    table = {"i": USER, "I": USER, "t": str(runtime), "h": "/root"}
    proc = start_unit(text, table=table, env=env, runtime=runtime, state=home, log=log)
    procs.append(proc)
    socket = runtime / f"peerdaemon-{USER}" / "peerdaemon.sock"
    # what `service install --system` tells the user to export, with /run where systemd has it
    assert service.SYSTEM_SOCKET.format(user=USER) == f"/run/peerdaemon-{USER}/peerdaemon.sock"
    assert wait_for("the daemon", proc, log, lambda: daemon_status(socket))
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
    assert (home / ".local" / "share" / "peerdaemon").is_dir()  # the user's data dir
    cli = subprocess.run(
        [str(EXE), "status"],
        env=base_env(home) | {"PEERDAEMON_SOCKET": str(socket)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    stop(proc, log)


def test_the_hub_units_command_line_serves_health(short_tmp, procs):
    root = installed(short_tmp, "--hub")
    text = (root / "etc" / "systemd" / "system" / "peerdaemon-hub.service").read_text()
    state = short_tmp / "state"
    state.mkdir()
    port = free_port()
    config = (root / "etc" / "peerdaemon" / "hub.toml").read_text()
    assert 'listen = "127.0.0.1:8765"' in config and str(service.HUB_DATA) in config
    config = config.replace("127.0.0.1:8765", f"127.0.0.1:{port}")
    config = config.replace(str(service.HUB_DATA), str(state / "peerdaemon-hub"))
    config_path = short_tmp / "hub.toml"
    config_path.write_text(config)
    home = short_tmp / "home"
    home.mkdir(exist_ok=True)
    log = short_tmp / "hub.log"
    proc = start_unit(
        text,
        table={"S": str(state), "t": str(short_tmp / "run")},
        env=base_env(home),
        runtime=short_tmp / "run",
        state=state,
        argv_map={str(service.HUB_CONFIG): str(config_path)},
        log=log,
    )
    procs.append(proc)

    def health() -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200, body
        return json.loads(body)

    assert wait_for("the hub", proc, log, health)["status"] == "ok"
    assert (state / "peerdaemon-hub" / "peerdaemon.sqlite3").exists()
    # the admin commands, given the same config, find the running hub's data dir
    admin = subprocess.run(
        [str(EXE), "hub", "status", "--config", str(config_path), "--json"],
        env=base_env(home),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert admin.returncode == 0, admin.stderr
    assert json.loads(admin.stdout)["running"] is True
    stop(proc, log)


# --- `service install` / `uninstall` / `status` --------------------------------------------------
def test_install_root_writes_the_user_unit_and_uninstall_removes_it(short_tmp):
    root = installed(short_tmp)
    unit = user_unit(short_tmp)
    assert [p for p in root.rglob("*") if p.is_file()] == [unit]
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert parse_unit(unit.read_text())["Service"]["ExecStart"] == [f"{EXE} run"]
    expected = (PACKAGED / "peerdaemon.service").read_text()
    assert unit.read_text() == expected.replace(service.SHIPPED_EXE + " ", f"{EXE} ")
    result = run_service(short_tmp, "uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert not unit.exists()
    assert manager_calls(short_tmp) == []  # --root runs no service manager


def test_install_root_system_writes_the_template(short_tmp):
    root = installed(short_tmp, "--system", "--user-name", "alice")  # need not exist under --root
    unit = root / "etc" / "systemd" / "system" / "peerdaemon@.service"
    assert [p for p in root.rglob("*") if p.is_file()] == [unit]
    svc = parse_unit(unit.read_text())["Service"]
    assert svc["ExecStart"] == [f"{EXE} run"]
    assert svc["Environment"] == ["PEERDAEMON_SOCKET=%t/peerdaemon-%i/peerdaemon.sock"]
    # another user's enabled instance keeps the shared template
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir()
    (wants / "peerdaemon@bob.service").symlink_to(unit)
    result = run_service(
        short_tmp, "uninstall", "--root", str(root), "--system", "--user-name", "alice"
    )
    assert result.returncode == 0, result.stderr
    assert unit.exists() and "peerdaemon@bob.service" in result.stdout
    (wants / "peerdaemon@bob.service").unlink()
    result = run_service(
        short_tmp, "uninstall", "--root", str(root), "--system", "--user-name", "alice"
    )
    assert result.returncode == 0, result.stderr
    assert not unit.exists()
    assert manager_calls(short_tmp) == []


def test_install_root_hub_writes_unit_user_and_config_and_keeps_the_config(short_tmp):
    root = installed(short_tmp, "--hub")
    unit = root / "etc" / "systemd" / "system" / "peerdaemon-hub.service"
    sysusers = root / "etc" / "sysusers.d" / "peerdaemon-hub.conf"
    config = root / "etc" / "peerdaemon" / "hub.toml"
    assert sorted(p for p in root.rglob("*") if p.is_file()) == sorted([unit, sysusers, config])
    svc = parse_unit(unit.read_text())["Service"]
    assert svc["ExecStart"] == [f"{EXE} hub serve --config {service.HUB_CONFIG}"]
    assert svc["User"] == [service.HUB_USER] and svc["StateDirectory"] == ["peerdaemon-hub"]
    assert f"u {service.HUB_USER} " in sysusers.read_text()
    assert config.read_text() == (CONTRIB / "systemd" / "hub.toml").read_text()
    config.write_text('listen = "0.0.0.0:9000"\n')  # the operator's: never overwritten
    again = run_service(short_tmp, "install", "--root", str(root), "--hub")
    assert again.returncode == 0 and f"kept {config}" in again.stdout
    assert config.read_text() == 'listen = "0.0.0.0:9000"\n'
    result = run_service(short_tmp, "uninstall", "--root", str(root), "--hub")
    assert result.returncode == 0, result.stderr
    assert not unit.exists() and config.exists() and sysusers.exists()  # the data's owner stays
    assert manager_calls(short_tmp) == []


def test_install_runs_systemctl_and_status_prints_one_line(short_tmp):
    """Without --root (HOME in a temp dir): the unit in ~/.config/systemd/user, then
    daemon-reload, enable, restart; `status` reads `systemctl show`; uninstall undoes it."""
    result = run_service(short_tmp, "install")
    assert result.returncode == 0, result.stderr
    unit = short_tmp / "home" / ".config" / "systemd" / "user" / "peerdaemon.service"
    assert parse_unit(unit.read_text())["Service"]["ExecStart"] == [f"{EXE} run"]
    assert manager_calls(short_tmp) == [
        "systemctl --user daemon-reload",
        "systemctl --user enable peerdaemon.service",
        "systemctl --user restart peerdaemon.service",
    ]
    assert "journalctl --user -u peerdaemon" in result.stdout

    (short_tmp / "show").write_text(
        "LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\n"
        f"MainPID=4242\nFragmentPath={unit}\nResult=success\n"
    )
    status = run_service(short_tmp, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout == f"peerdaemon.service: active (running, pid 4242), enabled, {unit}\n"
    (short_tmp / "show").write_text(
        "LoadState=loaded\nActiveState=failed\nSubState=failed\nUnitFileState=enabled\n"
        f"MainPID=0\nFragmentPath={unit}\nResult=exit-code\n"
    )
    status = run_service(short_tmp, "status")
    assert status.returncode == 1
    assert status.stdout == f"peerdaemon.service: failed (failed, exit-code), enabled, {unit}\n"

    (short_tmp / "manager.log").unlink()
    result = run_service(short_tmp, "uninstall")
    assert result.returncode == 0, result.stderr
    assert not unit.exists()
    calls = manager_calls(short_tmp)
    assert "systemctl --user disable --now peerdaemon.service" in calls
    assert calls[-1] == "systemctl --user daemon-reload"

    (short_tmp / "show").write_text("LoadState=not-found\nActiveState=inactive\n")
    status = run_service(short_tmp, "status")
    assert (status.returncode, status.stdout) == (
        1,
        "peerdaemon.service: not installed (peerdaemon service install)\n",
    )


def test_no_enable_writes_and_reloads_only(short_tmp):
    result = run_service(short_tmp, "install", "--no-enable")
    assert result.returncode == 0, result.stderr
    assert manager_calls(short_tmp) == ["systemctl --user daemon-reload"]
    assert "systemctl --user enable --now peerdaemon.service" in result.stdout


def test_errors_are_one_line(short_tmp):
    for args in (
        ["install", "--root", str(short_tmp / "r"), "--system", "--user-name", "a b"],
        ["install", "--user-name", "alice"],  # --user-name without --system
        ["status", "--system", "--user-name", "no-such-user-here"],
    ):
        result = run_service(short_tmp, *args)
        assert result.returncode == 1, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("peerdaemon: ")
    no_manager = run_service(short_tmp, "status", env={"PATH": "/nonexistent"})
    assert no_manager.returncode == 1
    assert no_manager.stderr.startswith("peerdaemon: systemctl not found")


# --- launchd ---------------------------------------------------------------------------------------
def test_the_launch_agent_runs_this_peerdaemon_and_logs_in_the_home():
    home = Path("/Users/alice")
    plan = service.plan(platform="darwin", scope="user", home=home)
    (file,) = plan.files
    assert (plan.manager, plan.unit) == ("launchd", "com.peerdaemon")
    assert file.path == home / "Library" / "LaunchAgents" / "com.peerdaemon.plist"
    exe = "/Users/alice/Python & Co/bin/peerdaemon"
    text = (PACKAGED / file.template).read_text()
    agent = plistlib.loads(service.render(file.template, text, exe, home).encode())
    assert agent["Label"] == "com.peerdaemon"
    assert agent["ProgramArguments"] == [exe, "run"]
    assert agent["StandardErrorPath"] == "/Users/alice/Library/Logs/peerdaemon.log"
    assert agent["KeepAlive"] == {"SuccessfulExit": False}  # restarted when it fails
    assert agent["Umask"] == 0o077
    with pytest.raises(CliError):
        service.plan(platform="darwin", scope="hub", home=home)


def test_install_hub_creates_its_user_and_data_dir_then_starts_it(short_tmp, monkeypatch, capsys):
    """Without --root (the system paths moved into a temp dir): systemd-sysusers, the data dir
    owned by the hub's user before the first start (admin commands may come first), then
    daemon-reload, enable, restart."""
    from peerdaemon.cli import main

    etc = short_tmp / "etc"
    monkeypatch.setattr(service, "SYSTEM_UNITS", etc / "systemd" / "system")
    monkeypatch.setattr(service, "HUB_CONFIG", etc / "peerdaemon" / "hub.toml")
    monkeypatch.setattr(service, "HUB_SYSUSERS", etc / "sysusers.d" / "peerdaemon-hub.conf")
    monkeypatch.setattr(service, "HUB_DATA", short_tmp / "var" / "peerdaemon-hub")
    monkeypatch.setattr(service, "HUB_USER", USER)  # one that exists here
    monkeypatch.setattr(service.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", f"{fake_managers(short_tmp)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(short_tmp / "manager.log"))
    monkeypatch.setattr(sys, "argv", [str(EXE), "service", "install", "--hub"])
    assert main(["service", "install", "--hub"]) == 0, capsys.readouterr().err
    assert (etc / "systemd" / "system" / "peerdaemon-hub.service").exists()
    assert (etc / "peerdaemon" / "hub.toml").exists()
    data = short_tmp / "var" / "peerdaemon-hub"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert data.stat().st_uid == os.getuid()
    assert manager_calls(short_tmp) == [
        f"systemd-sysusers {etc / 'sysusers.d' / 'peerdaemon-hub.conf'}",
        "systemctl daemon-reload",
        "systemctl enable peerdaemon-hub.service",
        "systemctl restart peerdaemon-hub.service",
    ]
    assert "journalctl -u peerdaemon-hub" in capsys.readouterr().out
