"""The hub's config file (hub/config.py, docs/hub.md "Config file"): one order of precedence
(flags, the environment, the file, the defaults), unknown keys warned about with their line,
bad values and bad TOML as one line naming the file, the line and the key; `hub config
get/set/list` editing the file in place (comments and other keys kept); a running hub picking up
an edited file (log level, metrics token, default limits) or SIGHUP, and logging what waits for
a restart; `hub serve` with a bad file exiting 1 with one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path

import pytest
import trio
from helpers import SPACE, free_port, setup_accounts, until, until_sync

from peerdaemon.cli import main as cli_main
from peerdaemon.core.configfile import set_value
from peerdaemon.hub import config as hubconfig
from peerdaemon.hub.accounts import Limits
from peerdaemon.hub.docs import SWEEP_INTERVAL
from peerdaemon.hub.http import HttpConfig
from peerdaemon.hub.mocks import MockConfig
from peerdaemon.hub.server import ConfigError, ConfigWatcher, HubConfig, build_config, serve_hub

SAMPLE = """\
# my hub: comments stay
listen = "0.0.0.0:9000"      # public

[limits]
# the quota
bytes_per_env = "15MB"       # a big one
devices_per_user = 3

[mock]
allow_hosts = ["api.example"]
"""


@pytest.fixture
def root_level():
    """The root logger's level, as pytest set it, back after a test where the hub changed it."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def hub_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["hub", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ the schema
def test_the_defaults_are_the_hubs():
    """The schema's defaults are HubConfig's (and HttpConfig's, MockConfig's, Limits'): a hub
    started with no file runs as it did before there was a schema."""
    assert {f.name: f.default for f in fields(HttpConfig)} == hubconfig.HTTP_DEFAULTS
    mock = MockConfig()
    assert {f.name: getattr(mock, f.name) for f in fields(MockConfig)} == hubconfig.MOCK_DEFAULTS
    config = build_config(environ={})
    plain = HubConfig(data_dir=config.data_dir)
    for name in ("listen", "tls_cert", "tls_key", "limits", "http", "mock", "compact_count"):
        assert getattr(config, name) == getattr(plain, name), name
    assert config.compact_bytes == plain.compact_bytes
    assert config.sweep_interval == plain.sweep_interval == SWEEP_INTERVAL  # (hub/docs.py's)
    assert set(config.settings.sources.values()) == {"default"}
    keys = set(hubconfig.schema().by_key)
    assert {f"limits.{f.name}" for f in fields(Limits)} <= keys
    assert {"data_dir", "listen", "tls.cert", "tls.key", "metrics.token", "log.level"} <= keys


def test_precedence_flag_then_env_then_file_then_default(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(
        'listen = "0.0.0.0:9000"\ndata_dir = "data"\n'
        '[limits]\nbytes_per_env = "15MB"\ndevices_per_user = 3\n'
        '[log]\nlevel = "warning"\n'
    )
    env = {
        "PEERDAEMON_HUB_LISTEN": "127.0.0.2:9001",
        "PEERDAEMON_HUB_LIMITS_BYTES_PER_ENV": "1MiB",
        "PEERDAEMON_HUB_DIR": str(tmp_path / "from-env"),
        "PEERDAEMON_LOG_LEVEL": "error",
    }
    # the file over the defaults
    config = build_config(config_file=path, environ={})
    assert config.listen == ("0.0.0.0", 9000)
    assert config.data_dir == tmp_path / "data"  # relative to the file's folder
    assert config.limits == Limits(bytes_per_env=15_000_000, devices_per_user=3)
    assert config.log_level == "warning"
    sources = config.settings.sources
    assert sources["listen"] == sources["limits.devices_per_user"] == "file"
    assert sources["limits.envs_per_space"] == sources["log.format"] == "default"
    # the environment over the file
    config = build_config(config_file=path, environ=env)
    assert config.listen == ("127.0.0.2", 9001)
    assert config.limits.bytes_per_env == 1 << 20 and config.limits.devices_per_user == 3
    assert config.data_dir == tmp_path / "from-env"
    assert config.log_level == "error"
    sources = config.settings.sources
    assert sources["listen"] == "env PEERDAEMON_HUB_LISTEN"
    assert sources["data_dir"] == "env PEERDAEMON_HUB_DIR"
    assert sources["log.level"] == "env PEERDAEMON_LOG_LEVEL"
    # flags over the environment
    config = build_config(
        config_file=path,
        environ=env,
        listen=("127.0.0.1", 0),
        data_dir=tmp_path / "flag",
        log_level="debug",
    )
    assert config.listen == ("127.0.0.1", 0) and config.data_dir == tmp_path / "flag"
    assert config.log_level == "debug"
    assert {config.settings.sources[k] for k in ("listen", "data_dir", "log.level")} == {"flag"}
    # a bad variable is one line naming it
    with pytest.raises(ConfigError, match=r"^\$PEERDAEMON_HUB_LIMITS_DEVICES_PER_USER='many': "):
        build_config(environ={"PEERDAEMON_HUB_LIMITS_DEVICES_PER_USER": "many"})


def test_unknown_keys_are_warnings_with_their_line_and_a_suggestion(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('listen = "127.0.0.1:9000"\n\n[limits]\nenvs_per_spce = 3\n[tsl]\ncert = "x"\n')
    config = build_config(config_file=path, environ={})
    assert config.warnings == [
        f"{path}:4: unknown key 'limits.envs_per_spce' ignored"
        " (did you mean 'limits.envs_per_space'?)",
        f"{path}:6: unknown key 'tsl.cert' ignored (did you mean 'tls.cert'?)",
    ]
    assert config.limits == Limits() and config.tls_cert is None
    assert config.listen == ("127.0.0.1", 9000)  # the rest of the file applies


def test_a_bad_value_or_bad_toml_is_one_line_with_the_file_line_and_key(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('# a comment\n[limits]\ndevices_per_user = "many"\n')
    with pytest.raises(ConfigError) as info:
        build_config(config_file=path)
    assert str(info.value) == f"{path}:3: limits.devices_per_user must be an integer >= 0"
    path.write_text('listen = "127.0.0.1:9000"\n[connections]\nhead_timeout = 0\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: connections.head_timeout must be"):
        build_config(config_file=path)
    path.write_text('listen = "127.0.0.1:9000"\n[limits\ndevices_per_user = 3\n')
    with pytest.raises(ConfigError) as info:
        build_config(config_file=path)
    assert str(info.value).startswith(f"{path}:2: ") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no such file"):
        build_config(config_file=tmp_path / "missing.toml")  # one given must exist
    # one found at the default location need not
    assert build_config(config_file=tmp_path / "missing.toml", required=False).warnings == []


def test_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "hub.toml"
    path.write_text('data_dir = "../data"\n[tls]\ncert = "c.pem"\nkey = "/abs/k.pem"\n')
    monkeypatch.chdir(tmp_path)
    config = build_config(config_file=Path("etc/hub.toml"), environ={})
    assert config.data_dir == tmp_path / "etc" / ".." / "data"
    assert config.tls_cert == tmp_path / "etc" / "c.pem" and config.tls_key == Path("/abs/k.pem")


def test_the_default_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(hubconfig.CONFIG_ENV, raising=False)
    assert hubconfig.config_path() == (tmp_path / "xdg" / "peerdaemon" / "hub.toml", False)
    monkeypatch.setenv(hubconfig.CONFIG_ENV, str(tmp_path / "env.toml"))
    assert hubconfig.config_path() == (tmp_path / "env.toml", False)
    assert hubconfig.config_path(tmp_path / "x.toml") == (tmp_path / "x.toml", True)


# ------------------------------------------------------------------------------- hub config
def test_set_keeps_comments_and_other_keys_byte_for_byte(tmp_path, capsys):
    path = tmp_path / "hub.toml"
    path.write_text(SAMPLE)
    c = ["--config", str(path)]
    code, out, err = hub_cli(capsys, "config", "set", "limits.bytes_per_env", "32MiB", *c)
    assert (code, err) == (0, "")
    assert out == (
        f"limits.bytes_per_env = 33554432 in {path}:"
        " a running hub applies it within seconds (or at once on SIGHUP)\n"
    )
    assert path.read_text() == SAMPLE.replace('"15MB"       #', '"32MiB"       #')
    code, out, _ = hub_cli(capsys, "config", "set", "fanout.stall_seconds", "5", *c)
    assert code == 0 and out.endswith("it applies at the next start of the hub\n")
    text = path.read_text()
    assert text.startswith(SAMPLE.replace('"15MB"       #', '"32MiB"       #'))
    assert text.endswith("\n[fanout]\nstall_seconds = 5.0\n")
    # "" removes a key, and only it
    before = path.read_text()
    assert hub_cli(capsys, "config", "set", "limits.devices_per_user", "", *c)[0] == 0
    assert path.read_text() == before.replace("devices_per_user = 3\n", "")
    code, _, err = hub_cli(capsys, "config", "get", "limits.devices_per_user", *c)
    assert code == 0  # back to its default
    # a bad value or key: one line, the file untouched
    before = path.read_text()
    for argv, message in (
        (("limits.devices_per_user", "many"), "limits.devices_per_user must be an integer"),
        (("limits.devices", "4"), "did you mean 'limits.devices_per_user'?"),
        (("listen", "nowhere"), "listen"),
    ):
        code, out, err = hub_cli(capsys, "config", "set", *argv, *c)
        assert code == 1 and out == "" and err.count("\n") == 1 and message in err, err
        assert err.startswith("peerdaemon: ")
    assert path.read_text() == before
    # a broken file is reported, not overwritten
    path.write_text(before + "[limits\n")
    code, _, err = hub_cli(capsys, "config", "set", "listen", "127.0.0.1:1", *c)
    assert code == 1 and f"{path}:" in err and err.count("\n") == 1
    assert path.read_text() == before + "[limits\n"


def test_set_then_get_and_unset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(hubconfig.CONFIG_ENV, str(tmp_path / "new" / "hub.toml"))
    code, _, err = hub_cli(capsys, "config", "get", "metrics.token")
    assert code == 1 and err == "peerdaemon: metrics.token is not set\n"
    code, out, _ = hub_cli(capsys, "config", "set", "metrics.token", "s3cret")
    assert code == 0 and "s3cret" not in out and "(set)" in out
    assert (tmp_path / "new" / "hub.toml").read_text().startswith(hubconfig.HEADER)
    assert hub_cli(capsys, "config", "get", "metrics.token") == (0, "s3cret\n", "")
    assert hub_cli(capsys, "config", "set", "listen", "0.0.0.0:9000")[0] == 0
    assert hub_cli(capsys, "config", "get", "listen") == (0, "0.0.0.0:9000\n", "")
    assert hub_cli(capsys, "config", "get", "listen", "--json") == (0, '"0.0.0.0:9000"\n', "")
    assert hub_cli(capsys, "config", "set", "mock.allow_hosts", "a.example,198.51.100.0/24")[0] == 0
    code, out, _ = hub_cli(capsys, "config", "get", "mock.allow_hosts", "--json")
    assert json.loads(out) == ["a.example", "198.51.100.0/24"]
    assert hub_cli(capsys, "config", "set", "metrics.token", "")[0] == 0
    assert hub_cli(capsys, "config", "get", "metrics.token")[0] == 1
    code, _, err = hub_cli(capsys, "config", "get", "nope")
    assert code == 1 and "unknown setting 'nope'" in err and "`peerdaemon hub config list`" in err
    # the variable wins over the file, and `set` says so
    monkeypatch.setenv("PEERDAEMON_HUB_LISTEN", "127.0.0.1:7000")
    code, _, err = hub_cli(capsys, "config", "set", "listen", "0.0.0.0:9001")
    assert code == 0 and "$PEERDAEMON_HUB_LISTEN is set" in err
    assert hub_cli(capsys, "config", "get", "listen")[1] == "127.0.0.1:7000\n"


def test_list_json_shows_values_and_sources(tmp_path, capsys, monkeypatch):
    path = tmp_path / "hub.toml"
    path.write_text(SAMPLE + '[tls]\ncert = "c.pem"\nkey = "k.pem"\n[tpyo]\nx = 1\n')
    monkeypatch.setenv("PEERDAEMON_HUB_LIMITS_DEVICES_PER_USER", "9")
    monkeypatch.setenv("PEERDAEMON_HUB_DIR", str(tmp_path / "d"))
    code, out, err = hub_cli(capsys, "config", "list", "--json", "--config", str(path))
    assert code == 0 and "unknown key 'tpyo.x'" in err  # warned on stderr, not in the JSON
    listed = json.loads(out)
    assert set(listed) == set(hubconfig.schema().by_key)
    assert listed["listen"] == {
        "value": "0.0.0.0:9000",
        "source": "file",
        "live": False,
        "env": "PEERDAEMON_HUB_LISTEN",
        "help": hubconfig.schema().by_key["listen"].help,
    }
    assert listed["tls.cert"]["value"] == str(tmp_path / "c.pem")
    assert listed["data_dir"] == listed["data_dir"] | {
        "value": str(tmp_path / "d"),
        "source": "env PEERDAEMON_HUB_DIR",
        "env": "PEERDAEMON_HUB_DIR",
    }
    assert listed["limits.devices_per_user"] | {"help": ""} == {
        "value": 9,
        "source": "env PEERDAEMON_HUB_LIMITS_DEVICES_PER_USER",
        "live": True,
        "env": "PEERDAEMON_HUB_LIMITS_DEVICES_PER_USER",
        "help": "",
    }
    assert listed["limits.bytes_per_env"]["value"] == 15_000_000
    assert listed["mock.allow_hosts"]["value"] == ["api.example"]
    assert listed["metrics.token"] == listed["metrics.token"] | {
        "value": None,
        "source": "default",
        "live": True,
    }
    assert listed["log.level"]["env"] == "PEERDAEMON_LOG_LEVEL"
    code, out, _ = hub_cli(capsys, "config", "list", "--config", str(path))
    lines = out.splitlines()
    assert lines[0].split() == ["KEY", "VALUE", "SOURCE", "APPLIES"]
    assert ["listen", "0.0.0.0:9000", "file", "restart"] in [line.split() for line in lines]
    assert any(line.split()[:2] == ["limits.devices_per_user", "9"] for line in lines)


def test_a_missing_config_file_given_explicitly_is_an_error(tmp_path, capsys):
    for argv in (("config", "list"), ("status",), ("user", "list")):
        code, _, err = hub_cli(capsys, *argv, "--config", str(tmp_path / "none.toml"))
        assert code == 1 and err == f"peerdaemon: {tmp_path / 'none.toml'}: no such file\n"


# ----------------------------------------------------------------------------------- reload
def resolved(path: Path, **flags):
    return hubconfig.load(path, flags=flags, environ={})


def test_plan_reload_says_what_applies_now_and_what_at_the_next_start(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('listen = "127.0.0.1:9000"\n[limits]\ndevices_per_user = 3\n')
    running = resolved(path, **{"log.level": "warning"})
    path.write_text(
        'listen = "127.0.0.1:9001"\n[limits]\ndevices_per_user = 4\n'
        '[metrics]\ntoken = "t"\n[log]\nlevel = "debug"\n[store]\ncompact_count = 5\n'
        "[oops]\nx = 1\n"
    )
    plan = hubconfig.plan_reload(running, resolved(path, **{"log.level": "warning"}))
    assert plan.live == {"limits.devices_per_user": 4, "metrics.token": "t"}  # not log.level:
    assert plan.pending == {"listen": ("127.0.0.1", 9001), "store.compact_count": 5}  # a flag
    assert len(plan.warnings) == 1 and "'oops.x'" in plan.warnings[0]
    gone = resolved(path.with_name("none.toml"), **{"log.level": "warning"})
    nothing = hubconfig.plan_reload(running, gone)
    assert nothing.live == {"limits.devices_per_user": 2}  # a removed key: back to its default
    assert set(nothing.pending) == {"listen"}
    same = hubconfig.plan_reload(running, running)
    assert (same.live, same.pending) == ({}, {})


async def test_the_watcher_follows_the_file_on_a_mock_clock(tmp_path, autojump_clock, caplog):
    path = tmp_path / "hub.toml"
    path.write_text("# keep me\n[limits]\ndevices_per_user = 3\n")
    config = build_config(config_file=path, data_dir=tmp_path, environ={})
    applied: list[hubconfig.Reload] = []
    watcher = ConfigWatcher(config, applied.append)
    caplog.set_level(logging.INFO, logger="peerdaemon.hub")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        start = trio.current_time()
        await trio.sleep(10)
        assert watcher.reloads == 0  # an unchanged file is not read again
        set_value(watcher.schema, path, "limits.devices_per_user", "4")
        await until(lambda: applied, what="the edit applied")
        assert trio.current_time() - start <= 10 + config.config_poll + 0.1
        assert applied[0].live == {"limits.devices_per_user": 4}
        # needs a restart: logged once, not applied
        set_value(watcher.schema, path, "listen", "127.0.0.1:1")
        await until(lambda: watcher.reloads == 2)
        assert len(applied) == 1
        restart = [r.getMessage() for r in caplog.records if "next start" in r.getMessage()]
        assert restart == [f'hub: listen = "127.0.0.1:1" in {path} applies at the next start']
        # a bad file: one warning, the running settings stay
        text = path.read_text()
        path.write_text(text.replace("devices_per_user = 4", 'devices_per_user = "x"'))
        await until(lambda: watcher.reloads == 3)
        bad = [r for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(bad) == 1 and bad[0].levelno == logging.WARNING
        line = path.read_text().splitlines().index('devices_per_user = "x"') + 1
        assert f"{path}:{line}: limits.devices_per_user must be" in bad[0].getMessage()
        assert watcher.running.values["limits.devices_per_user"] == 4
        await trio.sleep(3 * config.config_poll)
        assert watcher.reloads == 3  # read once, not again until it changes
        # fixed, and asked at once (SIGHUP) with nothing changed: nothing to apply
        path.write_text(text)
        await until(lambda: watcher.reloads == 4)
        assert len(applied) == 1
        before = trio.current_time()
        watcher.request()
        await until(lambda: watcher.reloads == 5)
        assert trio.current_time() - before < config.config_poll
        nursery.cancel_scope.cancel()
    assert path.read_text().startswith("# keep me\n")


@asynccontextmanager
async def hub_on_file(path: Path, data_dir: Path):
    config = build_config(config_file=path, data_dir=data_dir, listen=("127.0.0.1", 0), environ={})
    config.accounts_poll = 0.05
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_hub, config)
        yield server
        nursery.cancel_scope.cancel()


async def metrics_status(port: int, token: str | None = None) -> int:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        data = b""
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return int(data.split(b" ", 2)[1])


async def test_a_running_hub_applies_an_edited_file(tmp_path, root_level, caplog):
    setup_accounts(tmp_path, "alice")
    path = tmp_path / "hub.toml"
    path.write_text('# the hub\n[limits]\ndevices_per_user = 3\n[log]\nlevel = "info"\n')
    logging.getLogger().setLevel(logging.INFO)
    caplog.set_level(logging.INFO, logger="peerdaemon.hub")
    async with hub_on_file(path, tmp_path) as server:
        assert server.accounts.space_limits(SPACE).devices_per_user == 3
        assert await metrics_status(server.port) == 200  # loopback, no token
        schema = hubconfig.schema()
        set_value(schema, path, "log.level", "debug")
        set_value(schema, path, "metrics.token", "t0ken")
        set_value(schema, path, "limits.devices_per_user", "5")
        set_value(schema, path, "limits.bytes_per_env", "1MiB")
        set_value(schema, path, "fanout.stall_seconds", "5")
        await until(lambda: logging.getLogger().level == logging.DEBUG, what="the log level")
        await until(lambda: server.accounts.space_limits(SPACE).devices_per_user == 5)
        assert server.accounts.space_limits(SPACE).bytes_per_env == 1 << 20
        assert server.accounts.limits_for("alice") == Limits(
            devices_per_user=5, bytes_per_env=1 << 20
        )
        assert await metrics_status(server.port) == 401
        assert await metrics_status(server.port, "t0ken") == 200
        assert server.http.config.stall_seconds == 30.0  # at the next start
        messages = [r.getMessage() for r in caplog.records]
        assert f"hub: fanout.stall_seconds = 5.0 in {path} applies at the next start" in messages
        # `hub limits set` still wins over the file's defaults
        server.accounts.set_limit("devices_per_user", 7)
        set_value(schema, path, "limits.devices_per_user", "6")
        set_value(schema, path, "metrics.token", "")
        await until(lambda: server.http.config.metrics_token is None)
        assert server.accounts.space_limits(SPACE).devices_per_user == 7
        assert await metrics_status(server.port) == 200
        # SIGHUP's path: re-read at once
        reloads = server.watcher.reloads
        assert server.reload_config()
        await until(lambda: server.watcher.reloads == reloads + 1)


# ---------------------------------------------------------------------------- hub serve
PYTHON = sys.executable


def serve(tmp_path: Path, config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    with log.open("w") as err:
        return subprocess.Popen(
            [PYTHON, "-m", "peerdaemon", "hub", "serve", "--config", str(config)]
            + ["--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env | {"PEERDAEMON_NO_MDNS": "1"},
        )


def test_hub_serve_with_a_bad_file_exits_1_with_one_line(tmp_path):
    config = tmp_path / "hub.toml"
    config.write_text('listen = "127.0.0.1:9000"\n[limits]\ndevices_per_user = -1\n')
    log = tmp_path / "err"
    proc = serve(tmp_path, config, log)
    assert proc.wait(60) == 1
    assert log.read_text() == (
        f"peerdaemon: {config}:3: limits.devices_per_user must be an integer >= 0\n"
    )


def test_hub_serve_warns_of_unknown_keys_and_rereads_on_sighup(tmp_path):
    config = tmp_path / "hub.toml"
    config.write_text('[limits]\ndevices_per_usr = 4\n[log]\nlevel = "info"\n')
    log = tmp_path / "err"
    proc = serve(tmp_path, config, log)
    try:
        until_sync(lambda: "hub listening" in log.read_text(), what="the hub listening")
        lines = log.read_text().splitlines()
        (warning,) = [line for line in lines if "unknown key" in line]
        assert " WARNING " in warning
        assert warning.endswith(
            f"hub: {config}:2: unknown key 'limits.devices_per_usr' ignored"
            " (did you mean 'limits.devices_per_user'?)"
        )
        config.write_text('[limits]\ndevices_per_user = 4\n[log]\nlevel = "info"\n')
        proc.send_signal(signal.SIGHUP)
        until_sync(lambda: "limits.devices_per_user = 4" in log.read_text(), what="applied")
        assert f"received SIGHUP, re-reading {config}" in log.read_text()
        assert proc.poll() is None  # SIGHUP does not stop it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_sweep_interval_is_a_setting(tmp_path):
    """`[store] sweep_interval`: the idle checkpoints of the documents a hub keeps loaded."""
    path = tmp_path / "hub.toml"
    path.write_text("[store]\nsweep_interval = 4.5\n")
    assert build_config(environ={}).sweep_interval == SWEEP_INTERVAL
    env = {"PEERDAEMON_HUB_STORE_SWEEP_INTERVAL": "7"}
    assert build_config(config_file=path, environ=env).sweep_interval == 7.0
    path.write_text("[store]\nsweep_interval = 0\n")
    with pytest.raises(ConfigError, match="sweep_interval"):
        build_config(config_file=path, environ={})
    path.write_text("[store]\nsweep_interval = 4.5\n")
    async with hub_on_file(path, tmp_path / "data") as server:
        assert server.docs.sweep_interval == 4.5
