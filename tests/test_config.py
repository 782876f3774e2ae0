"""The daemon's config file (docs/config.md; core/configfile.py, daemon/config.py, daemon/live.py):
precedence (flags, environment, file, defaults) key by key; one-line errors naming the file, the
line and the key; unknown keys warned with a suggestion; `config set` editing the file in place
with the user's comments kept; settings an older daemon kept in the data dir moved into the file;
a running daemon applying live settings on reload, by `config.reload`, by polling the file and by
SIGHUP on a real process, and keeping the rest pending; a file broken under a running daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from daemonutil import InProcessDaemon, file_config
from helpers import run_cli

import peerdaemon.daemon.live as live_module
from peerdaemon.api.client import Client
from peerdaemon.core import settings as legacy
from peerdaemon.core.configfile import (
    ConfigFileError,
    key_lines,
    read_file,
    set_value,
    unset_value,
)
from peerdaemon.daemon.config import (
    HEADER,
    PEER_DEFAULTS,
    SCHEMA,
    DaemonConfig,
    daemon_config,
    load,
    plan_reload,
)
from peerdaemon.peer import PeerConfig
from peerdaemon.store import Store

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

COMMENTED = """\
# my laptop's peerdaemon
name = "laptop"   # shown to my team

[lan]
# the office LAN
listen = "0.0.0.0:7600"
peers = ["192.0.2.10:7600"]  # the build box

[log]
level = "info"
"""


# ------------------------------------------------------------------------------ the schema
def test_every_setting_is_documented_with_its_environment_variable():
    doc = (ROOT / "docs" / "config.md").read_text()
    for setting in SCHEMA.settings:
        assert f"`{setting.key}`" in doc, setting.key
        assert f"`{SCHEMA.env_name(setting)}`" in doc, setting.key
    assert SCHEMA.env_name(SCHEMA.by_key["log.level"]) == "PEERDAEMON_LOG_LEVEL"
    assert SCHEMA.env_name(SCHEMA.by_key["data_dir"]) == "PEERDAEMON_DATA_DIR"
    assert SCHEMA.env_name(SCHEMA.by_key["socket"]) == "PEERDAEMON_SOCKET"


def test_the_peer_limits_defaults_are_the_protocols():
    peer = PeerConfig()
    assert {name: getattr(peer, name) for name in PEER_DEFAULTS} == PEER_DEFAULTS


def test_defaults_build_the_daemon_config_run_always_built(tmp_path):
    resolved = load(None, environ={})
    config = daemon_config(resolved)
    assert config.listen is None and config.peers == [] and config.mdns is True
    assert config.max_frame == DaemonConfig.max_frame and config.peer_config is None
    assert config.status is True and config.status_listen == ("127.0.0.1", 7611)
    assert set(resolved.sources.values()) == {"default"}


# ------------------------------------------------------------------------------ precedence
@pytest.mark.parametrize(
    ("key", "flag", "env", "file", "expected_default"),
    [
        ("lan.listen", ("127.0.0.1", 1), "127.0.0.1:2", '[lan]\nlisten = "127.0.0.1:3"\n', None),
        ("name", "f", "e", 'name = "file"\n', None),
        ("limits.max_frame", 4096, "8 KiB", "[limits]\nmax_frame = 16384\n", 64 << 20),
        ("log.level", "debug", "warning", '[log]\nlevel = "error"\n', "info"),
        ("status.enabled", False, "off", "[status]\nenabled = false\n", True),
    ],
)
def test_flags_then_environment_then_file_then_default(
    tmp_path, key, flag, env, file, expected_default
):
    path = tmp_path / "config.toml"
    path.write_text(file)
    variable = SCHEMA.env_name(SCHEMA.by_key[key])
    kind = SCHEMA.by_key[key].kind
    from_file = read_file(SCHEMA, path).values[key]

    def resolved(flags, environ, where):
        r = load(where, flags=flags, environ=environ)
        return r.values[key], r.sources[key]

    assert resolved({key: flag}, {variable: env}, path) == (flag, "flag")
    assert resolved({}, {variable: env}, path) == (
        kind.check(kind.from_text(env)),
        f"env {variable}",
    )
    assert resolved({key: None}, {}, path) == (from_file, "file")
    assert resolved({}, {}, tmp_path / "none.toml") == (expected_default, "default")
    assert resolved({}, {variable: ""}, path) == (from_file, "file")  # empty: not set


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigFileError) as info:
        load(None, environ={"PEERDAEMON_LAN_LISTEN": "999.1.1.1:99999"})
    assert str(info.value).startswith("$PEERDAEMON_LAN_LISTEN='999.1.1.1:99999': lan.listen port ")


# --------------------------------------------------------------------------- reading files
def test_a_bad_value_is_one_line_with_file_line_and_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('name = "x"\n\n[lan]\nmdns = "sometimes"\n')
    with pytest.raises(ConfigFileError) as info:
        read_file(SCHEMA, path)
    assert str(info.value) == f"{path}:4: lan.mdns must be true or false"
    path.write_text('[limits]\nmax_frame = "lots"\n')
    with pytest.raises(ConfigFileError, match=rf"^{re.escape(str(path))}:2: limits.max_frame "):
        read_file(SCHEMA, path)
    path.write_text('lan.listen = "nohost"\n')  # a dotted key at the top
    with pytest.raises(ConfigFileError, match=rf"^{re.escape(str(path))}:1: lan.listen "):
        read_file(SCHEMA, path)


def test_a_toml_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('name = "x"\n[lan\nlisten = 1\n')
    with pytest.raises(ConfigFileError) as info:
        read_file(SCHEMA, path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message


def test_unknown_keys_are_warned_with_their_line_and_the_closest_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('name = "x"\n[lan]\nlisen = "127.0.0.1:1"\n[colour]\nfg = "red"\n')
    file = read_file(SCHEMA, path)
    assert file.values == {"name": "x"}
    assert file.warnings == [
        f"{path}:3: unknown key 'lan.lisen' ignored (did you mean 'lan.listen'?)",
        f"{path}:5: unknown key 'colour.fg' ignored (`peerdaemon config list` shows them all)",
    ]


def test_an_old_name_in_the_file_is_taken_and_warned(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('listen = "127.0.0.1:9"\n')
    file = read_file(SCHEMA, path)
    assert file.values == {"lan.listen": ("127.0.0.1", 9)}
    assert file.warnings == [f"{path}:1: listen is now lan.listen"]


def test_relative_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text('mirror_dir = "mirror"\ndata_dir = "~/pd"\n')
    values = read_file(SCHEMA, path).values
    assert values["mirror_dir"] == tmp_path / "etc" / "mirror"
    assert values["data_dir"] == Path.home() / "pd"


def test_a_missing_file_is_empty_unless_it_was_named(tmp_path):
    assert read_file(SCHEMA, tmp_path / "none.toml").values == {}
    with pytest.raises(ConfigFileError, match="no such file"):
        read_file(SCHEMA, tmp_path / "none.toml", required=True)


def test_key_lines_follow_tables_dotted_keys_and_multiline_strings():
    text = 'a = 1\n[t]\nb = """\nc = 2\n"""\nd.e = 3\n[[arr]]\nf = 4\n[u . "v w"]\ng = 5\n'
    assert key_lines(text) == {"a": 1, "t.b": 3, "t.d.e": 6, "u.v w.g": 10}


# ----------------------------------------------------------------------------------- editing
def test_set_keeps_comments_and_everything_else(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED)
    set_value(SCHEMA, path, "lan.listen", "127.0.0.1:7700")
    assert path.read_text() == COMMENTED.replace("0.0.0.0:7600", "127.0.0.1:7700")
    set_value(SCHEMA, path, "mdns", "off")  # an old name, and a key the table did not have
    text = path.read_text()
    assert "# the office LAN" in text and "# the build box" in text and "# shown to my team" in text
    assert read_file(SCHEMA, path).values["lan.mdns"] is False
    set_value(SCHEMA, path, "status.listen", "127.0.0.1:7612")  # a new table
    set_value(SCHEMA, path, "mirror_dir", "m")  # a top-level key after tables: stays top-level
    values = read_file(SCHEMA, path).values
    assert values["status.listen"] == ("127.0.0.1", 7612)
    assert values["mirror_dir"] == Path("m").absolute()
    assert unset_value(SCHEMA, path, "lan.peers") is True
    assert unset_value(SCHEMA, path, "lan.peers") is False
    text = path.read_text()
    assert "192.0.2.10" not in text and text.startswith("# my laptop's peerdaemon\n")
    assert set_value(SCHEMA, path, "name", "") is None  # "" unsets
    assert 'name = "laptop"' not in path.read_text()


def test_set_creates_the_file_with_its_header_owner_only(tmp_path):
    path = tmp_path / "new" / "config.toml"
    set_value(SCHEMA, path, "lan.peers", "192.0.2.1:1, [2001:db8::1]:2", header=HEADER)
    assert path.read_text().startswith(HEADER)
    assert read_file(SCHEMA, path).values["lan.peers"] == [("192.0.2.1", 1), ("2001:db8::1", 2)]
    assert path.stat().st_mode & 0o777 == 0o600


def test_set_refuses_bad_values_unknown_keys_and_a_broken_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED)
    with pytest.raises(ConfigFileError, match="^lan.listen "):
        set_value(SCHEMA, path, "lan.listen", "999.1.1.1:99999")
    with pytest.raises(ConfigFileError, match=r"unknown setting 'lan.lisen' \(did you mean"):
        set_value(SCHEMA, path, "lan.lisen", "x")
    assert path.read_text() == COMMENTED
    path.write_text("name = \n")
    with pytest.raises(ConfigFileError, match=":1: "):
        set_value(SCHEMA, path, "name", "x")
    assert path.read_text() == "name = \n"  # not overwritten


# ----------------------------------------------------------------------------- reload plans
def test_plan_reload_splits_live_and_at_start(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED)
    running = load(path, environ={})
    set_value(SCHEMA, path, "name", "desk")
    set_value(SCHEMA, path, "lan.listen", "127.0.0.1:1")
    set_value(SCHEMA, path, "log.level", "debug")
    plan = plan_reload(running, load(path, environ={}))
    assert plan.live == {"name": "desk", "log.level": "debug"}
    assert plan.pending == {"lan.listen": ("127.0.0.1", 1)}
    # a flag keeps winning over the file
    plan = plan_reload(running, load(path, flags={"name": "laptop"}, environ={}))
    assert "name" not in plan.live


# ------------------------------------------------------------------ a daemon with a file
async def test_a_running_daemon_applies_live_settings_and_keeps_the_rest_pending(nursery, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        COMMENTED.replace("0.0.0.0:7600", "127.0.0.1:0").replace("192.0.2.10", "127.0.0.1")
    )
    d = InProcessDaemon(tmp_path, "a")
    daemon = await d.start_with(nursery, file_config(d, path))
    assert (await d.op("identity"))["name"] == "laptop"
    statics = {r["address"] for r in (await d.op("peers"))["peers"] if r.get("address")}
    assert "127.0.0.1:7600" in statics

    text = path.read_text()
    text = text.replace('"laptop"', '"desk"').replace("127.0.0.1:7600", "127.0.0.1:7601")
    path.write_text(
        text.replace('level = "info"', 'level = "warning"') + "[store]\ncompact_count = 5\n"
    )
    result = await d.op("config.reload")
    assert result == {
        "file": str(path),
        "applied": ["name", "lan.peers", "log.level"],
        "pending": ["store.compact_count"],
        "refused": {},
        "warnings": [],
    }
    assert (await d.op("identity"))["name"] == "desk"
    statics = {r["address"] for r in (await d.op("peers"))["peers"] if r.get("address")}
    assert "127.0.0.1:7601" in statics and "127.0.0.1:7600" not in statics
    import logging

    assert logging.getLogger().level == logging.WARNING
    got = await d.op("config.get")
    assert got["settings"]["store.compact_count"]["value"] == 1000
    assert got["settings"]["store.compact_count"]["pending"] == 5
    assert (await d.op("status"))["config"] == {
        "file": str(path),
        "pending": ["store.compact_count"],
        "error": None,
    }
    assert daemon.store is not None

    # a file broken under it: one warning, an event, the settings it runs with kept
    path.write_text('name = "x"\n[lan\n')
    with pytest.raises(Exception, match=f"{re.escape(str(path))}:2: "):
        await d.op("config.reload")
    assert (await d.op("identity"))["name"] == "desk"
    assert (await d.op("status"))["config"]["error"].startswith(f"{path}:2: ")
    events = await d.op("events.subscribe", since=0)
    assert events is not None


async def test_a_file_edited_by_hand_is_picked_up(nursery, tmp_path, monkeypatch):
    monkeypatch.setattr(live_module, "POLL_SECONDS", 0.02)
    path = tmp_path / "config.toml"
    path.write_text('name = "one"\n')
    d = InProcessDaemon(tmp_path, "a")
    await d.start_with(nursery, file_config(d, path))
    path.write_text('name = "two"  # renamed by hand\n')
    with trio.fail_after(10):
        while (await d.op("identity"))["name"] != "two":
            await trio.sleep(0.02)


async def test_config_set_over_the_socket_edits_the_daemons_own_file(nursery, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED)
    d = InProcessDaemon(tmp_path, "a")
    await d.start_with(nursery, file_config(d, path, **{"lan.listen": ("127.0.0.1", 0)}))
    result = await d.op("config.set", key="name", value="editor")
    assert result == {"key": "name", "value": "editor", "applies": "now", "file": str(path)}
    result = await d.op("config.set", key="lan.mdns_interface", value="lo")
    assert result["applies"] == "at start"
    text = path.read_text()
    assert "# the office LAN" in text and 'name = "editor"' in text
    assert 'mdns_interface = "lo"' in text
    for args, code in [
        ({"key": "colour", "value": "x"}, "not-found"),
        ({"key": "lan.listen", "value": "nohost"}, "bad-request"),
        ({"key": "name", "value": 3}, "bad-request"),
    ]:
        with pytest.raises(Exception) as info:
            await d.op("config.set", **args)
        assert getattr(info.value, "code", None) == code, args
    assert await d.op("config.get", key="name") == "editor"
    assert await d.op("config.get", key="mdns-interface") is None  # runs without one


async def test_settings_kept_in_the_data_dir_move_into_the_file(nursery, tmp_path):
    d = InProcessDaemon(tmp_path, "a")
    store = Store.open(d.data_dir)
    try:
        store.put_setting(
            legacy.SETTING,
            {"mirror-dir": str(tmp_path / "m"), "peers": [["127.0.0.1", 9]], "mdns": False},
        )
    finally:
        store.close()  # flushes what is queued
    path = tmp_path / "config.toml"
    path.write_text("# mine\n[lan]\npeers = []\n")  # the file wins where it says something
    daemon = await d.start_with(nursery, file_config(d, path, **{"lan.mdns": None}))
    values = read_file(SCHEMA, path).values
    assert values["mirror_dir"] == tmp_path / "m" and values["lan.mdns"] is False
    assert values["lan.peers"] == []
    assert path.read_text().startswith("# mine\n")
    assert daemon.config.mirror_dir == tmp_path / "m" and daemon.config.mdns is False
    assert legacy.stored(daemon.store) == {}


# ------------------------------------------------------------------------- the CLI, no daemon
async def test_config_list_without_a_daemon_shows_sources(tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text('[lan]\nlisten = "127.0.0.1:7600"\nlisen = 1\n')
    monkeypatch.setenv("PEERDAEMON_LOG_LEVEL", "debug")
    argv = ["--config", str(path), "--socket", str(tmp_path / "none.s")]
    assert await run_cli(*argv, "config", "list", "--json") == 0
    view = json.loads(capsys.readouterr().out)
    assert view["running"] is False and view["file"] == str(path)
    rows = view["settings"]
    assert (rows["lan.listen"]["value"], rows["lan.listen"]["source"]) == ("127.0.0.1:7600", "file")
    assert rows["log.level"] == {
        "value": "debug",
        "source": "env PEERDAEMON_LOG_LEVEL",
        "live": True,
        "env": "PEERDAEMON_LOG_LEVEL",
        "help": rows["log.level"]["help"],
    }
    assert rows["lan.mdns"]["source"] == "default"
    assert view["warnings"] == [
        f"{path}:3: unknown key 'lan.lisen' ignored (did you mean 'lan.listen'?)"
    ]
    assert await run_cli(*argv, "config", "set", "lan.peers", "192.0.2.1:1") == 0
    assert (
        capsys.readouterr().out == f"lan.peers set in {path}; the daemon reads it when it starts\n"
    )
    assert await run_cli(*argv, "config", "get", "peers") == 0
    assert capsys.readouterr().out == "192.0.2.1:1\n"
    assert await run_cli(*argv, "config", "path") == 0
    assert capsys.readouterr().out == f"{path}\n"
    assert await run_cli("--config", str(tmp_path / "no.toml"), "config", "list") == 1
    assert "no.toml: no such file" in capsys.readouterr().err


async def test_the_default_file_and_the_socket_it_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert await run_cli("config", "path") == 0
    default = tmp_path / "xdg" / "peerdaemon" / "config.toml"
    assert capsys.readouterr().out == f"{default}\n"
    assert await run_cli("config", "set", "socket", str(tmp_path / "via-file.s")) == 0
    capsys.readouterr()
    assert await run_cli("status") == 1  # clients look for the socket the file names
    assert str(tmp_path / "via-file.s") in capsys.readouterr().err
    monkeypatch.setenv("PEERDAEMON_CONFIG", str(tmp_path / "other.toml"))
    assert await run_cli("config", "path") == 0
    assert capsys.readouterr().out == f"{tmp_path / 'other.toml'}\n"


# -------------------------------------------------------------------- a real daemon process
def _spawn(argv: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    environ.update(PEERDAEMON_NO_MDNS="1", PYTHONUNBUFFERED="1", **env)
    with log.open("wb") as err:
        return subprocess.Popen(
            [PYTHON, "-m", "peerdaemon", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=environ,
        )


def _wait(predicate, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text()}")
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def test_run_takes_its_file_and_sighup_reloads_it(tmp_path):
    path = tmp_path / "config.toml"
    sock = tmp_path / "pd.s"
    path.write_text(
        f'name = "first"\ndata_dir = "data"\nsocket = "{sock}"\ncolour = "red"\n'
        "[status]\nenabled = false\n"
    )
    log = tmp_path / "log"
    proc = _spawn(["run", "--config", str(path)], log)
    try:
        _wait(lambda: "peerdaemon ready" in log.read_text(), proc, log)
        err = log.read_text()
        assert f"peerdaemon: warning: {path}:4: unknown key 'colour' ignored" in err
        assert (tmp_path / "data").is_dir()
        with Client.connect(sock) as client:
            assert client.call("identity")["name"] == "first"
            assert client.call("config.get")["settings"]["data_dir"]["source"] == "file"
        path.write_text(path.read_text().replace('"first"', '"second"'))
        os.kill(proc.pid, signal.SIGHUP)

        def renamed() -> bool:
            with Client.connect(sock) as client:
                return client.call("identity")["name"] == "second"

        _wait(renamed, proc, log)
        assert "config reloaded (" in log.read_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(20)


def test_run_with_a_bad_file_is_one_line_and_exit_1(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[lan]\nlisten = "999.1.1.1:99999"\n')
    argv = [
        PYTHON,
        "-m",
        "peerdaemon",
        "run",
        "--config",
        str(path),
        "--socket",
        str(tmp_path / "s"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"peerdaemon: {path}:2: lan.listen ")
    done = subprocess.run(
        [PYTHON, "-m", "peerdaemon", "run", "--config", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (
        1,
        f"peerdaemon: {tmp_path / 'missing.toml'}: no such file\n",
    )


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("15MB", 15_000_000),
        ("15 mb", 15_000_000),
        ("64MiB", 64 << 20),
        ("64 MiB", 64 << 20),
        ("64M", 64 << 20),
        ("1.5 GiB", 3 << 29),
        ("2 KB", 2000),
        ("10B", 10),
    ],
)
def test_sizes_read_as_the_hub_always_read_them(text, size):
    from peerdaemon.core.configfile import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1", "1 XB", True, None, 1.5, "1,000"])
def test_what_is_not_a_size(text):
    from peerdaemon.core.configfile import parse_size

    with pytest.raises(ValueError):
        parse_size(text)


def test_set_edits_through_a_symlink_and_keeps_the_owner(tmp_path):
    real = tmp_path / "dotfiles" / "peerdaemon.toml"
    real.parent.mkdir()
    real.write_text(COMMENTED)
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    set_value(SCHEMA, link, "name", "desk")
    assert link.is_symlink() and 'name = "desk"' in real.read_text()
    if os.geteuid() == 0:  # root editing a service's file keeps its owner and group
        os.chown(real, 1234, 5678)
        real.chmod(0o640)
        set_value(SCHEMA, link, "name", "box")
        st = real.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 5678, 0o640)


async def test_the_status_page_follows_its_settings_live(nursery, tmp_path):
    """status.* apply without a restart: the page comes up, moves, goes off; a setting it
    cannot take (a LAN address without TLS) is refused and the page stays as it was."""
    path = tmp_path / "config.toml"
    path.write_text("[status]\nenabled = false\n")
    d = InProcessDaemon(tmp_path, "a")
    await d.start_with(nursery, file_config(d, path, **{"status.enabled": None}))
    assert (await d.op("status"))["status_page"]["url"] is None

    async def answers(url: str) -> bool:
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError:
            return False
        async with stream:
            await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            return (await stream.receive_some(64)).startswith(b"HTTP/1.1 ")

    result = await d.op("config.set", key="status.listen", value="127.0.0.1:0")
    assert result["applies"] == "now"
    result = await d.op("config.set", key="status.enabled", value="on")
    assert result["applies"] == "now"
    url = (await d.op("status"))["status_page"]["url"]
    assert url and await answers(url)

    result = await d.op("config.reload")  # nothing changed: nothing restarted
    assert result["applied"] == []
    path.write_text(path.read_text().replace("127.0.0.1:0", "0.0.0.0:0"))
    result = await d.op("config.reload")
    assert result["applied"] == [] and "not a loopback address" in result["warnings"][0]
    assert (await d.op("status"))["status_page"]["url"] == url and await answers(url)

    # the refused address stays in the file: any later reload refuses the section again
    result = await d.op("config.set", key="status.enabled", value="off")
    assert result["applies"] == "refused" and "not a loopback address" in result["reason"]
    assert (await d.op("status"))["status_page"]["url"] == url
    await d.op("config.set", key="status.listen", value="127.0.0.1:0")
    assert (await d.op("status"))["status_page"]["url"] is None
    assert not await answers(url)
